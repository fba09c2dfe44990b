"""Dataset rows -> `BenchmarkExample`s, one builder per benchmark of `benchmarks.TASKS`: the columns of the set's
Hugging Face layout (as lmms-eval's `doc_to_visual` / `doc_to_text` read them) and the prompt the Qwen3-VL
evaluation phrases. Each builder's docstring names its dataset, split, columns, prompt and the reference they
follow. A row that lacks a column or holds an undecodable image raises `RowError`."""

from __future__ import annotations

import ast
import io
import math
import re
from typing import Any

from PIL import Image, UnidentifiedImageError

from qwen3vl_jax.evaluation.benchmark_metrics import OCRBENCH_CATEGORIES
from qwen3vl_jax.evaluation.examples import BenchmarkExample
from qwen3vl_jax.evaluation.readers import Row, RowError, image_source, video_file

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option letter only."
COUNT_PROMPT = (
    "Look at the image carefully and count the objects. Answer with just a number, without any additional text."
)
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm")


# ------------------------------------------------------------------------------------------------ row helpers


def _value(row: Row, column: str) -> Any:
    value = row.values.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowError(f"row {row.index}: no value in column {column!r}")
    return value


def _text(row: Row, column: str) -> str:
    value = _value(row, column)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"row {row.index}: column {column!r} is not a non-empty text")
    return value


def _texts(row: Row, column: str) -> tuple[str, ...]:
    """A list column of texts (or one text) as a non-empty tuple."""
    value = _value(row, column)
    values = [value] if isinstance(value, str) else list(value)
    if not values or not all(isinstance(v, str) for v in values):
        raise RowError(f"row {row.index}: column {column!r} is not a non-empty list of texts")
    return tuple(values)


def _id(row: Row, column: str, task: str) -> str:
    value = row.values.get(column)
    return f"{task}:{value}" if value is not None and str(value) else f"{task}:row{row.index}"


def _image(row: Row, column: str) -> tuple[Any, tuple[int, int]]:
    """(what the processor reads, (width, height)) of an image column; RowError when it cannot be decoded."""
    source = image_source(_value(row, column), base_dir=row.base_dir, column=column)
    if hasattr(source, "shape"):
        return source, (int(source.shape[1]), int(source.shape[0]))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            return source, image.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", str(e))  # PIL names the in-memory file by its address
        raise RowError(f"row {row.index}: column {column!r} holds an undecodable image ({reason})") from None


def _user(*media: dict, text: str) -> list[dict]:
    return [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]


def _image_item(source: Any) -> dict:
    return {"type": "image", "image": source}


def _lettered(options: tuple[str, ...]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


# ------------------------------------------------------------------------------------------------ image tasks


def _vqa_task(name: str, *, id_column: str, answers_column: str, capitalize: bool = False, post_prompt: str):
    def build(row: Row) -> list[BenchmarkExample]:
        image, _ = _image(row, "image")
        question = _text(row, "question")
        question = question.capitalize() if capitalize else question
        return [
            BenchmarkExample(
                id=_id(row, id_column, name),
                task=name,
                messages=_user(_image_item(image), text=f"{question}\n{post_prompt}"),
                references=_texts(row, answers_column),
                meta={key: row.values[key] for key in ("type", "question_types") if key in row.values},
            )
        ]

    return build


docvqa_examples = _vqa_task("docvqa", id_column="questionId", answers_column="answers", post_prompt=SHORT_ANSWER)
docvqa_examples.__doc__ = """DocVQA (lmms-lab/DocVQA, config DocVQA, split validation: questionId, question, image,
answers). Prompt: "{question}\\nAnswer the question using a single word or phrase." (lmms-eval docvqa_val)."""
infovqa_examples = _vqa_task("infovqa", id_column="questionId", answers_column="answers", post_prompt=SHORT_ANSWER)
infovqa_examples.__doc__ = """InfographicVQA (lmms-lab/DocVQA, config InfographicVQA, split validation: questionId,
question, image, answers). Prompt as DocVQA's (lmms-eval infovqa_val)."""
chartqa_examples = _vqa_task(
    "chartqa", id_column="", answers_column="answer", post_prompt="Answer the question with a single word."
)
chartqa_examples.__doc__ = """ChartQA (lmms-lab/ChartQA, split test: type "human_test" | "augmented_test", question,
answer, image). Prompt: "{question}\\nAnswer the question with a single word." (lmms-eval chartqa)."""
textvqa_examples = _vqa_task(
    "textvqa", id_column="question_id", answers_column="answers", capitalize=True, post_prompt=SHORT_ANSWER
)
textvqa_examples.__doc__ = """TextVQA (lmms-lab/textvqa, split validation: question_id, question, image, answers —
the 10 annotators'). Prompt: the question capitalised, then "\\nAnswer the question using a single word or
phrase." (lmms-eval textvqa_val)."""


def ocrbench_examples(row: Row) -> list[BenchmarkExample]:
    """OCRBench (echo840/OCRBench, split test: dataset, question, question_type — the category —, answer — a list
    —, image). Prompt: the question alone (lmms-eval ocrbench); scored per category (`ocrbench_match`)."""
    image, _ = _image(row, "image")
    category = _text(row, "question_type")
    if category not in OCRBENCH_CATEGORIES:
        raise RowError(f"row {row.index}: question_type {category!r} is not an OCRBench category")
    return [
        BenchmarkExample(
            id=_id(row, "id", "ocrbench"),
            task="ocrbench",
            messages=_user(_image_item(image), text=_text(row, "question").strip()),
            references=_texts(row, "answer"),
            meta={"category": category, "dataset": row.values.get("dataset")},
        )
    ]


def refcoco_examples(row: Row) -> list[BenchmarkExample]:
    """RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding, one example per expression.
    lmms-lab/RefCOCO (split val; also test, testA, testB): question_id, image, answer — the expressions —, bbox
    [x, y, w, h] in pixels (converted to Qwen's 0..1000 coordinates of the image); or the TFDS `ref_coco` layout
    (objects/bbox normalised [ymin, xmin, ymax, xmax], objects/refexp/raw). Prompt (Qwen3-VL's grounding form,
    answered as JSON {"bbox_2d": [x1, y1, x2, y2]}): 'Locate "{expression}" in the image and report its bbox
    coordinates in JSON format.'"""
    image, (width, height) = _image(row, "image")
    if "objects" in row.values:  # TFDS ref_coco: one image with its objects, each with its expressions
        objects = _value(row, "objects")
        targets = [
            (
                [1000 * x for x in (box[1], box[0], box[3], box[2])],
                refexp["raw"] if isinstance(refexp, dict) else refexp,
            )
            for box, refexp in zip(objects["bbox"], objects["refexp"])
        ]
    else:
        x, y, w, h = (float(v) for v in _value(row, "bbox"))
        box = [1000 * x / width, 1000 * y / height, 1000 * (x + w) / width, 1000 * (y + h) / height]
        targets = [(box, _texts(row, "answer"))]
    base_id = _id(row, "question_id", "refcoco")
    examples = []
    for number, (box, expressions) in enumerate(targets):
        box = [min(1000.0, max(0.0, float(v))) for v in box]
        for index, expression in enumerate([expressions] if isinstance(expressions, str) else expressions):
            prompt = f'Locate "{expression}" in the image and report its bbox coordinates in JSON format.'
            examples.append(
                BenchmarkExample(
                    id=f"{base_id}/{number}/{index}" if len(targets) > 1 else f"{base_id}/{index}",
                    task="refcoco",
                    messages=_user(_image_item(image), text=prompt),
                    references=(expression,),
                    meta={"box": [round(v, 2) for v in box]},
                )
            )
    if not examples:
        raise RowError(f"row {row.index}: no referring expressions")
    return examples


def countbench_examples(row: Row) -> list[BenchmarkExample]:
    """CountBenchQA (vikhyatk/CountBenchQA, split test: image, text, question, number; the 491 CountBench images
    still online, with PaliGemma's questions). nielsr/countbench (split train: image_url, text, number, image) has
    no questions: its rows are skipped as lacking `question`. Prompt: "Look at the image carefully and count the
    objects. Answer with just a number, without any additional text. {question}" (lmms-eval countbench)."""
    image, _ = _image(row, "image")
    number = _value(row, "number")
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    return [
        BenchmarkExample(
            id=_id(row, "id", "countbench"),
            task="countbench",
            messages=_user(_image_item(image), text=f"{COUNT_PROMPT} {_text(row, 'question').strip()}"),
            references=(str(number),),
            meta={"count": number},
        )
    ]


def mmmu_examples(row: Row) -> list[BenchmarkExample]:
    """MMMU (lmms-lab/MMMU, split validation: id, question, options — a Python list written as a string —,
    answer, question_type "multiple-choice" | "open", image_1 .. image_7). Prompt: Qwen3-VL's (lmms-eval
    mmmu_val's qwen3_vl kwargs): the images that the question and options name as `<image n>` first, in n order,
    then "Question: {question}\\nOptions:\\nA. ...\\nAnswer with the option letter only."; an open question (no
    options) ends "\\nAnswer the question using a single word or phrase." instead (lmms-eval's open prompt)."""
    question = _text(row, "question")
    options = _value(row, "options")
    options = tuple(str(o) for o in (ast.literal_eval(options) if isinstance(options, str) else options))
    numbers = sorted({int(n) for n in re.findall(r"<image (\d+)>", question + " ".join(options))})
    images = [_image_item(_image(row, f"image_{n}")[0]) for n in numbers]
    answer = _value(row, "answer")
    multiple_choice = _value(row, "question_type") == "multiple-choice"
    if multiple_choice:
        text = f"Question: {question}\nOptions:\n{_lettered(options)}\n{OPTION_LETTER}"
        references = (str(answer),)
    else:
        text = f"Question: {question}\n{SHORT_ANSWER}"
        references = tuple(str(a) for a in ast.literal_eval(answer)) if str(answer).startswith("[") else (str(answer),)
    return [
        BenchmarkExample(
            id=_id(row, "id", "mmmu"),
            task="mmmu",
            messages=_user(*images, text=text),
            references=references,
            options=options if multiple_choice else (),
            meta={"question_type": row.values["question_type"], "subfield": row.values.get("subfield")},
        )
    ]


def mathvista_examples(row: Row) -> list[BenchmarkExample]:
    """MathVista (AI4Math/MathVista, split testmini: pid, question, decoded_image — or image, a path —, choices,
    unit, precision, answer, question_type "multi_choice" | "free_form", answer_type). Prompt: lmms-eval's
    mathvista_testmini_format (zero-shot "format-prompt"): the question (+ " (Unit: u)"), the choices as "A. ...",
    then "Answer with the option's letter from the given choices directly." or, free-form, "Answer the question
    using a single integer number." / "... a single floating-point number with two decimal places." / "... a
    Python list."."""
    column = "decoded_image" if row.values.get("decoded_image") is not None else "image"
    image, _ = _image(row, column)
    question, answer = _text(row, "question"), str(_value(row, "answer"))
    unit = row.values.get("unit")
    lines = [f"{question} (Unit: {unit})" if unit else question]
    answer_type = str(_value(row, "answer_type"))
    precision = row.values.get("precision")
    precision = None if precision is None or math.isnan(float(precision)) else int(precision)
    meta = {"question_type": _value(row, "question_type"), "answer_type": answer_type, "precision": precision}
    options = ()
    if meta["question_type"] == "multi_choice":
        options = tuple(str(c) for c in _value(row, "choices"))
        if answer not in options:
            raise RowError(f"row {row.index}: answer {answer!r} is not one of the choices {list(options)}")
        lines.append(_lettered(options))
        lines.append("Answer with the option's letter from the given choices directly.")
        answer = chr(ord("A") + options.index(answer))
    elif answer_type == "integer":
        lines.append("Answer the question using a single integer number.")
    elif answer_type == "float":
        places = {1: "one decimal place", 2: "two decimal places"}.get(precision, f"{precision} decimal places")
        lines.append(f"Answer the question using a single floating-point number with {places}.")
    elif answer_type == "list":
        lines.append("Answer the question using a Python list.")
    else:
        lines.append(SHORT_ANSWER)
    return [
        BenchmarkExample(
            id=_id(row, "pid", "mathvista"),
            task="mathvista",
            messages=_user(_image_item(image), text="\n".join(lines)),
            references=(answer,),
            options=options,
            meta=meta,
        )
    ]


# ------------------------------------------------------------------------------------------------ video tasks


def videomme_examples(row: Row) -> list[BenchmarkExample]:
    """Video-MME (lmms-lab/Video-MME, split test: videoID, question_id, duration "short" | "medium" | "long",
    domain, task_type, question, options ["A. ...", ...], answer — a letter). The videos (the dataset's
    videos_chunked_*.zip) are read from the media folder (--media_dir, else the parquet file's folder), as
    <videoID>.mp4 there or in its data/ folder. Prompt: Qwen3-VL's (lmms-eval videomme's qwen3_vl kwargs): the
    video, then "Question: {question}\\nOptions:\\n{options}\\nAnswer with the option letter only."."""
    video_id = _text(row, "videoID")
    try:
        video = video_file(video_id, media_dir=row.base_dir, column="videoID", suffixes=VIDEO_SUFFIXES)
    except RowError:
        video = video_file(f"data/{video_id}", media_dir=row.base_dir, column="videoID", suffixes=VIDEO_SUFFIXES)
    options = _texts(row, "options")
    texts = tuple(re.sub(r"^\s*[A-Z][.)]\s*", "", option) for option in options)
    text = f"Question: {_text(row, 'question')}\nOptions:\n{chr(10).join(options)}\n{OPTION_LETTER}"
    return [
        BenchmarkExample(
            id=_id(row, "question_id", "videomme"),
            task="videomme",
            messages=_user({"type": "video", "video": video}, text=text),
            references=(_text(row, "answer").strip(),),
            options=texts,
            meta={key: row.values.get(key) for key in ("videoID", "duration", "domain", "task_type")},
        )
    ]
