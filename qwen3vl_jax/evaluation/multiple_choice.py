"""Multiple-choice answers (MMMU, Video-MME, ...): `extract_choice` reads the option letter a free-form answer
picks (MMMU's `parse_multi_choice_response`, with Video-MME's answer phrases), `choice_accuracy` scores it against
the right letter. Options are lettered A, B, ... in order; `benchmark_metrics` lists these with the other
metrics."""

from __future__ import annotations

import re
from collections.abc import Sequence


def _option_letters(options: Sequence[str], metric: str) -> list[str]:
    if isinstance(options, str):
        raise ValueError(f"{metric}: options must be a sequence of option texts, got the single string {options!r}")
    if len(options) == 0:
        raise ValueError(f"{metric}: options is empty; a multiple-choice question needs at least one option")
    if len(options) > 26:
        raise ValueError(f"{metric}: {len(options)} options; letters A..Z name at most 26")
    return [chr(ord("A") + index) for index in range(len(options))]


def _last_of(patterns: dict[str, re.Pattern], text: str) -> str | None:
    """The letter whose pattern's last match starts latest in text, None when no pattern matches."""
    best, best_start = None, -1
    for letter, pattern in patterns.items():
        for match in pattern.finditer(text):
            if match.start() > best_start:
                best, best_start = letter, match.start()
    return best


def extract_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter ("A" for options[0], ...) a free-form answer picks, None when none can be read.

    Follows MMMU's `parse_multi_choice_response` (Yue et al., MMMU, CVPR 2024; the same function in lmms-eval's
    mmmu task) with Video-MME-style answers added. Letters are upper case; rules in order, the first that finds a
    letter decides:

    1. an answer phrase followed by a letter ("The answer is B", "Answer: (B)", "the best option is B") — the
       last such phrase (Video-MME's answer prefixes);
    2. a letter leading the answer, followed by ".", ":" or ")" ("B. text", "B) text");
    3. a bracketed letter "(B)" — the one occurring last (MMMU);
    4. a letter standing alone between whitespace or the answer's ends ("B", "so B is right") — the one occurring
       last (MMMU's " B " test, any whitespace counting as a space);
    5. a letter after whitespace followed by ".", ":" or ")" — the one occurring last (lmms-eval's "B." rule);
    6. for answers longer than 5 words, an option's text contained in the answer (ignoring case) — the option
       whose text occurs last (MMMU).

    Before rules 1-5 the answer is stripped of "*" (markdown bold) and of leading / trailing , . ! ? ; : '
    (MMMU). Unlike MMMU, which picks a random option when nothing parses, this returns None (scored wrong).
    """
    letters = _option_letters(options, "extract_choice")
    text = prediction.replace("*", "").strip()
    for char in ",.!?;:'":
        text = text.strip(char)
    text = text.strip()
    if not text:
        return None
    letter_group = "(" + "|".join(letters) + ")"

    answer_words = r"(?i:answer|(?:best|correct) (?:option|choice))(?:\s+is)?\s*[:：]?\s*[(\[]?"
    phrase = re.compile(answer_words + letter_group + r"(?![A-Za-z0-9])")
    phrase_matches = list(phrase.finditer(text))
    if phrase_matches:
        return phrase_matches[-1].group(1)
    leading = re.match(letter_group + r"[.:)](?:\s|$)", text)
    if leading:
        return leading.group(1)
    for pattern in (r"\({}\)", r"(?<!\S){}(?!\S)", r"(?<!\S){}[.:)]"):
        found = _last_of({letter: re.compile(pattern.format(letter)) for letter in letters}, text)
        if found is not None:
            return found
    padded = prediction.strip()
    for char in ",.!?;:'":
        padded = padded.strip(char)
    if len(padded.split()) > 5:
        lowered = padded.lower()
        starts = {letter: lowered.rfind(option.lower()) for letter, option in zip(letters, options) if option.strip()}
        found = [letter for letter, start in starts.items() if start >= 0]
        if found:
            return max(found, key=lambda letter: starts[letter])
    return None


def choice_accuracy(prediction: str, *, options: Sequence[str], answer: str) -> float:
    """1 when `extract_choice(prediction, options)` is `answer` (the right option's letter), else 0 (also when no
    letter can be read). Used by MMMU, Video-MME and the other multiple-choice benchmarks."""
    letters = _option_letters(options, "choice_accuracy")
    if answer not in letters:
        raise ValueError(
            f"choice_accuracy: answer {answer!r} is not one of the option letters {letters} of {len(options)} options"
        )
    return float(extract_choice(prediction, options) == answer)
