"""Per-example metrics of the benchmarks the Qwen3-VL report uses, each following its benchmark's published
definition (and, where that leaves a choice open, lmms-eval's implementation of it):

- `anls`: DocVQA, InfoVQA (average normalised Levenshtein similarity; Biten et al. 2019, ST-VQA).
- `relaxed_accuracy`: ChartQA (numbers within 5 % relative, else exact match; Masry et al. 2022).
- `vqa_accuracy`: TextVQA, VQAv2 (min(#matching annotators / 3, 1) over leave-one-out annotator subsets;
  answers normalised by `vqa_answers.vqa_normalize`, the VQA evaluation's answer processor).
- `ocrbench_match`: OCRBench (a reference contained in the prediction).
- `extract_choice` / `choice_accuracy`: MMMU, Video-MME and other multiple-choice benchmarks (defined in
  `multiple_choice`, which reads the option letter a free-form answer picks).
- `short_answer_match`: MathVista free-form answers (integer / float / text / list).
- `parse_grounding_box` / `grounding_metrics`: RefCOCO-style grounding (IoU >= 0.5 with a 0..1000 box).
- `count_match`: counting benchmarks (CountBench).

Every metric returns a float in [0, 1] for one example; the benchmark's score is the mean over its examples."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from qwen3vl_jax.evaluation.multiple_choice import choice_accuracy, extract_choice
from qwen3vl_jax.evaluation.vqa_answers import vqa_normalize
from qwen3vl_jax.processing.boxes import box_iou, parse_box

# ----------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfoVQA)


def _levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions, each costing 1) between a and b."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (char_a != char_b))
    return row[-1]


def _require_references(references: Sequence[str], metric: str) -> None:
    if isinstance(references, str):
        raise ValueError(f"{metric}: references must be a sequence of strings, got the single string {references!r}")
    if len(references) == 0:
        raise ValueError(f"{metric}: references is empty; an example needs at least one reference answer")
    for reference in references:
        if not isinstance(reference, str):
            raise ValueError(f"{metric}: every reference must be a string, got {reference!r}")


def anls(prediction: str, references: Sequence[str], *, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer (DocVQA, InfoVQA).

    Follows the ST-VQA definition (Biten et al., "Scene Text Visual Question Answering", ICCV 2019), also used by
    DocVQA (Mathew et al., WACV 2021): both strings are lower-cased, stripped and their whitespace runs collapsed
    to one space (as lmms-eval's `anls` does); NL = Levenshtein(a, b) / max(|a|, |b|); the score is
    max over references of (1 - NL), or 0 for a reference with NL >= threshold.

    Two corner cases of lmms-eval's `anls` (and of the official DocVQA script it copies) differ from the
    published definition followed here: it divides by the lengths of the raw, unnormalised strings (different only
    when the raw strings carry extra whitespace) and keeps a score of exactly 1 - threshold (NL == threshold).
    Two empty strings score 1.
    """
    _require_references(references, "anls")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"anls: threshold must be in (0, 1], got {threshold}")
    answer = " ".join(prediction.strip().lower().split())
    best = 0.0
    for reference in references:
        truth = " ".join(reference.strip().lower().split())
        length = max(len(answer), len(truth))
        normalized_distance = _levenshtein(answer, truth) / length if length else 0.0
        if normalized_distance < threshold:
            best = max(best, 1.0 - normalized_distance)
    return best


# ----------------------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)


def _chartqa_float(text: str) -> float | None:
    """The number text spells, a trailing % dividing it by 100 ("45%" -> 0.45); None when it is not a number."""
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str], *, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy of one answer: 1 when, for some reference, both strings are numbers and
    |prediction - reference| / |reference| <= tolerance, or (either is not a number, or the reference is 0) the
    strings are equal ignoring case; else 0.

    Follows ChartQA (Masry et al., ACL 2022, section 5.1, after Methani et al. 2020) as implemented by lmms-eval's
    chartqa `relaxed_correctness`: a number ending in "%" is divided by 100, so "45%" matches "0.45" but not "45";
    nothing else is stripped from a number ("45 %", "$45" and "1,000" are compared as text). The prediction's
    surrounding whitespace is stripped (float() ignores it anyway).
    """
    _require_references(references, "relaxed_accuracy")
    if tolerance < 0:
        raise ValueError(f"relaxed_accuracy: tolerance must be >= 0, got {tolerance}")
    answer = prediction.strip()
    answer_number = _chartqa_float(answer)
    for reference in references:
        truth = reference.strip()
        truth_number = _chartqa_float(truth)
        if answer_number is not None and truth_number:  # a reference of 0 falls back to text, as the reference does
            if abs(answer_number - truth_number) / abs(truth_number) <= tolerance:
                return 1.0
        elif answer.lower() == truth.lower():
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA, VQAv2)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one answer (TextVQA, VQAv2): the mean, over the leave-one-out subsets of the annotators'
    answers (each leaves out one of the N answers), of min(#answers in the subset equal to the prediction / 3, 1),
    prediction and answers normalised by `vqa_normalize`.

    Follows the VQA evaluation (Antol et al., "VQA: Visual Question Answering", ICCV 2015; Singh et al. 2019 for
    TextVQA) as lmms-eval's textvqa `textvqa_process_results` computes it. The benchmarks give N = 10 answers;
    with one answer the leave-one-out subset is empty and the score is always 0, so fewer than 2 raise.
    """
    _require_references(references, "vqa_accuracy")
    if len(references) < 2:
        raise ValueError(
            f"vqa_accuracy: needs the annotators' answers (10 in TextVQA / VQAv2), got {len(references)}; with one "
            "answer every leave-one-out subset is empty and the score would always be 0"
        )
    answer = vqa_normalize(prediction)
    truths = [vqa_normalize(reference) for reference in references]
    matches = sum(truth == answer for truth in truths)
    # leaving out a matching annotator leaves matches - 1 matches in the subset, any other leaves matches
    total = sum(min(1.0, (matches - (truth == answer)) / 3.0) for truth in truths)
    return total / len(truths)


# ----------------------------------------------------------------------------------------------------------------
# OCRBench

OCRBENCH_CATEGORIES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
_FORMULA_CATEGORY = "Handwritten Mathematical Expression Recognition"


def _fold_fullwidth(text: str) -> str:
    """Full-width ASCII forms (U+FF01..U+FF5E) to ASCII, the ideographic space (U+3000) to a space."""
    return "".join(
        " " if char == "\u3000" else chr(ord(char) - 0xFEE0) if "\uff01" <= char <= "\uff5e" else char for char in text
    )


def ocrbench_match(prediction: str, references: Sequence[str], *, category: str) -> float:
    """OCRBench's score of one answer: 1 when some reference answer is a substring of the prediction.

    Follows OCRBench (Liu et al., "OCRBench: on the hidden mystery of OCR in large multimodal models", 2024) as
    lmms-eval's `ocrbench_process_results` scores it: for the "Handwritten Mathematical Expression Recognition"
    category (the HME100k formulas) spaces and newlines are removed from both strings and case is kept; for every
    other category both are lower-cased, stripped, full-width ASCII folded to ASCII and newlines turned into spaces.
    `category` is one of `OCRBENCH_CATEGORIES`. An empty reference (a substring of every answer) raises.
    """
    _require_references(references, "ocrbench_match")
    if category not in OCRBENCH_CATEGORIES:
        raise ValueError(f"ocrbench_match: unknown category {category!r}; OCRBench's are {OCRBENCH_CATEGORIES}")
    if category == _FORMULA_CATEGORY:
        normalize = lambda text: text.strip().replace("\n", "").replace(" ", "")  # noqa: E731
    else:
        normalize = lambda text: _fold_fullwidth(text).lower().strip().replace("\n", " ")  # noqa: E731
    answer = normalize(prediction)
    for reference in references:
        truth = normalize(reference)
        if not truth:
            raise ValueError(f"ocrbench_match: reference {reference!r} is empty after normalisation")
        if truth in answer:
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------------------------------------
# MathVista free-form answers

MATHVISTA_ANSWER_TYPES = ("integer", "float", "text", "list")
_QUOTED_ANSWER = re.compile(r'The answer is "(.*)"\.')
# a number, thousands separators allowed ("1,000"), sign and decimal part optional
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _mathvista_number(text: str, *, answer_type: str, precision: int | None) -> str | None:
    """The number in text as MathVista's `normalize_extracted_answer` writes it: str(int(float(x))) for integers,
    str(round(float(x), precision)) for floats; the text itself when it is a number, else its last number; None
    when it has none."""
    try:
        value = float(text)
    except ValueError:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        value = float(numbers[-1].replace(",", ""))
    if not math.isfinite(value):
        return None
    return str(int(value)) if answer_type == "integer" else str(round(value, precision))


def short_answer_match(
    prediction: str, references: Sequence[str], *, answer_type: str = "text", precision: int | None = None
) -> float:
    """MathVista's score of one free-form answer: 1 when the normalised prediction equals a normalised reference.

    Follows MathVista (Lu et al., ICLR 2024) as lmms-eval's mathvista task scores it (`normalize_extracted_answer`
    then `safe_equal`, a stripped string comparison): "integer" answers compare as str(int(float(x))) (truncating),
    "float" answers as str(round(float(x), precision)), "text" and "list" answers as stripped strings (case
    kept). MathVista first extracts the answer with an LLM; this rule-based stand-in takes the quoted answer of
    'The answer is "x".' when present, the whole answer when it is a number, else (integer / float) the last number
    in it ("1,000" counting as 1000). References are normalised the same way (a numeric reference that is no
    number raises).
    """
    _require_references(references, "short_answer_match")
    if answer_type not in MATHVISTA_ANSWER_TYPES:
        raise ValueError(f"short_answer_match: answer_type {answer_type!r} is not one of {MATHVISTA_ANSWER_TYPES}")
    if answer_type == "float" and (precision is None or precision < 0):
        raise ValueError(f"short_answer_match: float answers need a precision >= 0 (decimals kept), got {precision}")
    answer = prediction.strip()
    quoted = _QUOTED_ANSWER.search(answer)
    if quoted:
        answer = quoted.group(1).strip()
    if answer_type in ("text", "list"):
        return float(any(answer == reference.strip() for reference in references))
    answer_number = _mathvista_number(answer, answer_type=answer_type, precision=precision)
    for reference in references:
        truth = _mathvista_number(reference.strip(), answer_type=answer_type, precision=precision)
        if truth is None:
            raise ValueError(f"short_answer_match: reference {reference!r} of an {answer_type} answer is no number")
        if answer_number == truth:
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------------------------------------
# Grounding

_COORDINATE = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BBOX_2D = re.compile(r'"bbox_2d"\s*:\s*\[' + ",".join([_COORDINATE] * 4) + r"\]")
_BARE_BOX = re.compile(r"\[" + ",".join([_COORDINATE] * 4) + r"\]")


def parse_grounding_box(prediction: str) -> tuple[float, float, float, float] | None:
    """The first box (x1, y1, x2, y2) of a grounding answer, in the answer's 0..1000 coordinates, None when none.

    Reads Qwen3-VL's JSON form ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` (fenced in ```json or not;
    the first "bbox_2d" counts), then Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
    (`qwen3vl_jax.processing.boxes.parse_box`), then a bare list ``[x1, y1, x2, y2]``. Coordinates are returned
    as written (not reordered or clipped).
    """
    # a regex rather than json.loads: it also reads a JSON answer cut short by the token limit
    match = _BBOX_2D.search(prediction)
    if match is not None:
        return tuple(float(value) for value in match.groups())
    tokens_box = parse_box(prediction)
    if tokens_box is not None:
        return tuple(float(value) for value in tokens_box)
    match = _BARE_BOX.search(prediction)
    return None if match is None else tuple(float(value) for value in match.groups())


def grounding_metrics(prediction: str, box: Sequence[float]) -> dict[str, float]:
    """{"iou": IoU of the answer's box (`parse_grounding_box`) with the reference box, "iou_0.5": 1 when that IoU
    is >= 0.5 else 0} — RefCOCO / RefCOCO+ / RefCOCOg accuracy@0.5 (Kazemzadeh et al. 2014; Mao et al. 2016).
    `box` is (x1, y1, x2, y2) in 0..1000 coordinates with x1 < x2, y1 < y2. Both 0 when no box parses."""
    if isinstance(box, str) or len(box) != 4:
        raise ValueError(f"grounding_metrics: box must be 4 numbers (x1, y1, x2, y2), got {box!r}")
    if not all(isinstance(value, int | float) and 0 <= value <= 1000 for value in box):
        raise ValueError(f"grounding_metrics: box {box!r} must hold numbers in 0..1000 (Qwen's normalised coordinates)")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"grounding_metrics: box {box!r} is empty; it needs x1 < x2 and y1 < y2")
    predicted = parse_grounding_box(prediction)
    if predicted is None:
        return {"iou": 0.0, "iou_0.5": 0.0}
    iou = box_iou(predicted, tuple(float(value) for value in box))
    return {"iou": iou, "iou_0.5": float(iou >= 0.5)}


# ----------------------------------------------------------------------------------------------------------------
# Counting

_COUNT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
_COUNT_TOKEN = re.compile(r"\d+(?:\.\d+)?|\b(?:" + "|".join(_COUNT_WORDS) + r")\b", re.IGNORECASE)


def count_match(prediction: str, count: int) -> float:
    """1 when the first number in the answer — digits, or a number word zero..twenty (any case) — equals `count`,
    else 0 (also when the answer has no number, or its first number has a fractional part: "2.5").

    Counting benchmarks (CountBench, Paiss et al. 2023) score an exact count; lmms-eval's countbench compares the
    whole answer after mapping a number word to digits, which this extends to answers in a sentence
    ("There are three dogs.").
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count_match: count must be an integer >= 0, got {count!r}")
    match = _COUNT_TOKEN.search(prediction)
    if match is None:
        return 0.0
    token = match.group().lower()
    value = float(_COUNT_WORDS.index(token)) if token in _COUNT_WORDS else float(token)
    return float(value == count)


__all__ = [
    "MATHVISTA_ANSWER_TYPES",
    "OCRBENCH_CATEGORIES",
    "anls",
    "choice_accuracy",
    "count_match",
    "extract_choice",
    "grounding_metrics",
    "ocrbench_match",
    "parse_grounding_box",
    "relaxed_accuracy",
    "short_answer_match",
    "vqa_accuracy",
]
