"""The benchmark metrics on cases worked out by hand from each metric's published definition (the arithmetic is in
the comment beside each case). lmms-eval, whose implementations the metrics follow, cannot be installed next to the
project's pins, so it is not run here."""

import pytest

from qwen3vl_jax.evaluation.benchmark_metrics import (
    anls,
    count_match,
    grounding_metrics,
    ocrbench_match,
    parse_grounding_box,
    relaxed_accuracy,
    short_answer_match,
    vqa_accuracy,
)
from qwen3vl_jax.evaluation.multiple_choice import choice_accuracy, extract_choice
from qwen3vl_jax.evaluation.vqa_answers import vqa_normalize


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("hello", ["helo"], 1 - 1 / 5),  # one deletion over max(5, 4) characters
        ("kitten", ["sitting"], 1 - 3 / 7),  # k->s, e->i, +g: 3 edits over max(6, 7)
        ("  Hello   World ", ["hello world"], 1.0),  # lower-cased, stripped, whitespace runs collapsed: equal
        ("color", ["xyz", "colour"], 1 - 1 / 6),  # best reference: 1 insertion over 6; "xyz" has NL 5/5 -> 0
        ("abcde", ["abcxy"], 1 - 2 / 5),  # NL 0.4 < 0.5 keeps its score
        ("ab", ["ac"], 0.0),  # NL 1/2 = threshold -> 0 (ST-VQA: NL >= threshold scores 0)
        ("abcd", ["wxyz"], 0.0),  # NL 4/4
        ("", ["abc"], 0.0),  # empty answer: NL 3/3
        ("", [""], 1.0),  # two empty strings are equal
    ],
)
def test_anls(prediction, references, expected):
    assert anls(prediction, references) == pytest.approx(expected)


def test_anls_threshold_and_bad_inputs():
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)  # NL 1/3
    assert anls("abc", ["abd"], threshold=0.3) == 0.0  # NL 1/3 >= 0.3
    with pytest.raises(ValueError, match="references is empty"):
        anls("abc", [])
    with pytest.raises(ValueError, match="single string"):
        anls("abc", "abc")
    with pytest.raises(ValueError, match="threshold"):
        anls("abc", ["abc"], threshold=0.0)


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("104", ["100"], 1.0),  # |104 - 100| / 100 = 0.04 <= 0.05
        ("105", ["100"], 1.0),  # 0.05: the bound is inclusive
        ("106", ["100"], 0.0),  # 0.06 > 0.05
        ("-5", ["-4.9"], 1.0),  # 0.1 / 4.9 = 0.0204
        ("45%", ["0.45"], 1.0),  # "45%" reads 45 / 100 = 0.45
        ("45%", ["45"], 0.0),  # 0.45 against 45: |0.45 - 45| / 45 = 0.99
        ("45", ["45%"], 0.0),  # 45 against 0.45: relative change 99
        ("12 kg", ["12"], 0.0),  # a unit makes it text: "12 kg" != "12"
        ("Yes", ["yes"], 1.0),  # text: equal ignoring case
        ("yes.", ["yes"], 0.0),  # text: punctuation is not stripped
        ("0", ["0"], 1.0),  # a reference of 0 compares as text: "0" == "0"
        ("0.0", ["0"], 0.0),  # ... so "0.0" != "0"
        (" 7\n", ["7"], 1.0),  # surrounding whitespace stripped
        ("", ["5"], 0.0),  # empty answer
        ("Blue", ["red", "blue"], 1.0),  # several references: any
    ],
)
def test_relaxed_accuracy(prediction, references, expected):
    assert relaxed_accuracy(prediction, references) == expected


def test_relaxed_accuracy_tolerance_and_bad_inputs():
    assert relaxed_accuracy("108", ["100"], tolerance=0.1) == 1.0  # 0.08 <= 0.1
    with pytest.raises(ValueError, match="references is empty"):
        relaxed_accuracy("1", [])
    with pytest.raises(ValueError, match="tolerance"):
        relaxed_accuracy("1", ["1"], tolerance=-0.1)


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("The Dog.", "dog"),  # lower case, article dropped, final period removed
        ("Two dogs!", "2 dogs"),  # number word to digit; "!" touches no space -> replaced by a space, then dropped
        ("t-shirt", "t shirt"),  # "-" touches no space: replaced by a space
        ("well - known", "well known"),  # "-" touches a space: removed
        ("1,000", "1000"),  # commas removed
        ("2.5", "2.5"),  # a period before a digit stays
        ("dont", "don't"),  # contraction restored
        ("None", "0"),  # "none" counts as 0 in the VQA evaluation's number map
        ("the cat's toy", "cat 's toy"),  # "'s" split off
        ("an apple\tpie\n", "apple pie"),  # tabs and newlines are spaces
    ],
)
def test_vqa_normalize(answer, normalized):
    assert vqa_normalize(answer) == normalized


@pytest.mark.parametrize(
    "matching, expected",
    [
        # 10 annotators, `matching` of them gave the prediction; leaving out a matching one leaves matching - 1
        (4, (4 * 1 + 6 * 1) / 10),  # 3/3 or 4/3, capped at 1 -> 1.0
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (0, 0.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matching, expected):
    references = ["Two"] * matching + ["three"] * (10 - matching)
    assert vqa_accuracy("2", references) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_rejects_bad_inputs():
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0  # "the dog." -> "dog"
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("", ["dog"] * 10) == 0.0  # empty answer
    assert vqa_accuracy("25", ["2.5"] * 10) == 0.0  # the decimal period stays
    with pytest.raises(ValueError, match="annotators"):
        vqa_accuracy("dog", ["dog"])  # one answer: every leave-one-out subset is empty
    with pytest.raises(ValueError, match="references is empty"):
        vqa_accuracy("dog", [])


@pytest.mark.parametrize(
    "prediction, references, category, expected",
    [
        ("The text reads HELLO world", ["hello"], "Regular Text Recognition", 1.0),  # lower-cased substring
        ("helo", ["hello"], "Regular Text Recognition", 0.0),
        ("ＡＢＣ１２３", ["abc123"], "Digit String Recognition", 1.0),  # full-width folded to "ABC123", lower-cased
        ("hello\nworld", ["hello world"], "Scene Text-centric VQA", 1.0),  # newline -> space
        ("cat", ["dog", "ca"], "Doc-oriented VQA", 1.0),  # several references: any contained
        ("", ["a"], "Key Information Extraction", 0.0),  # empty answer
        ("x ^ { 2 } + 1", ["x^{2}+1"], "Handwritten Mathematical Expression Recognition", 1.0),  # spaces removed
        ("\\frac{1}\n{2}", ["\\frac{1}{2}"], "Handwritten Mathematical Expression Recognition", 1.0),  # newline too
        ("X^{2}+1", ["x^{2}+1"], "Handwritten Mathematical Expression Recognition", 0.0),  # case kept
    ],
)
def test_ocrbench_match(prediction, references, category, expected):
    assert ocrbench_match(prediction, references, category=category) == expected


def test_ocrbench_match_rejects_bad_inputs():
    with pytest.raises(ValueError, match="unknown category"):
        ocrbench_match("a", ["a"], category="Text Recognition")
    with pytest.raises(ValueError, match="empty after normalisation"):
        ocrbench_match("a", [" "], category="Regular Text Recognition")


OPTIONS = ("cat", "dog", "red bird", "fish")


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is D.", "D"),  # answer phrase (Video-MME)
        ("Answer: (A)", "A"),
        ("The answer is B, not A", "B"),  # the phrase decides over the later standalone A
        ("B. dog", "B"),  # leading letter with a period (Video-MME)
        ("C) red bird", "C"),
        ("B. Because option A is wrong", "B"),  # the leading letter decides over the later standalone A
        ("**B**", "B"),  # markdown bold
        ("(A) is wrong and (B) is right", "B"),  # MMMU: the bracketed letter occurring last
        ("First A, then on reflection D", "D"),  # MMMU: the standalone letter occurring last
        ("I believe the animal shown is a dog", "B"),  # 8 words > 5: option text "dog"
        ("Not a cat, it is clearly a red bird", "C"),  # both texts occur; "red bird" occurs last
        ("a dog", None),  # 2 words: option texts are not read in answers of 5 words or fewer
        ("b", None),  # letters are upper case
        ("USA", None),  # a letter inside a word is no answer
        ("E", None),  # not a letter of the 4 options
        ("", None),  # empty answer
        ("xyz", None),  # nothing parses: None (MMMU's reference would pick a random option)
    ],
)
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


def test_choice_accuracy():
    assert choice_accuracy("The answer is B", options=OPTIONS, answer="B") == 1.0
    assert choice_accuracy("The answer is B", options=OPTIONS, answer="A") == 0.0
    assert choice_accuracy("no idea", options=OPTIONS, answer="A") == 0.0  # nothing parses: wrong
    with pytest.raises(ValueError, match="options is empty"):
        choice_accuracy("A", options=(), answer="A")
    with pytest.raises(ValueError, match="not one of the option letters"):
        choice_accuracy("A", options=OPTIONS, answer="E")
    with pytest.raises(ValueError, match="not one of the option letters"):
        choice_accuracy("A", options=OPTIONS, answer="b")


@pytest.mark.parametrize(
    "prediction, references, answer_type, precision, expected",
    [
        ("3.7", ["3"], "integer", None, 1.0),  # str(int(float("3.7"))) = "3" (truncates, as MathVista)
        ("The answer is 12 apples", ["12"], "integer", None, 1.0),  # the last number in the answer
        ("x = 3, so the area is 9", ["9"], "integer", None, 1.0),  # last number: 9, not 3
        ("1,000", ["1000"], "integer", None, 1.0),  # thousands separator
        ("many", ["3"], "integer", None, 0.0),  # no number
        ("", ["3"], "integer", None, 0.0),  # empty answer
        ("1.456", ["1.46"], "float", 2, 1.0),  # round(1.456, 2) = 1.46
        ("1.4", ["1.40"], "float", 2, 1.0),  # both sides written as str(round(x, 2)) = "1.4"
        ("2.04", ["2.1"], "float", 1, 0.0),  # round(2.04, 1) = 2.0 != 2.1
        ("-0.5 m", ["-0.5"], "float", 1, 1.0),  # a unit around the number
        (" yes ", ["yes"], "text", None, 1.0),  # stripped
        ("Yes", ["yes"], "text", None, 0.0),  # case kept
        ('The answer is "red".', ["red"], "text", None, 1.0),  # the quoted answer
        ("[1, 2]", ["[1, 2]"], "list", None, 1.0),
        ("[1,2]", ["[1, 2]"], "list", None, 0.0),  # compared as written
        ("7", ["6", "7"], "integer", None, 1.0),  # several references: any
    ],
)
def test_short_answer_match(prediction, references, answer_type, precision, expected):
    assert short_answer_match(prediction, references, answer_type=answer_type, precision=precision) == expected


def test_short_answer_match_rejects_bad_inputs():
    with pytest.raises(ValueError, match="answer_type"):
        short_answer_match("1", ["1"], answer_type="number")
    with pytest.raises(ValueError, match="precision"):
        short_answer_match("1.5", ["1.5"], answer_type="float")
    with pytest.raises(ValueError, match="is no number"):
        short_answer_match("1", ["one"], answer_type="integer")


@pytest.mark.parametrize(
    "prediction, box",
    [
        ('```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "dog"}]\n```', (100, 200, 300, 400)),
        ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', (1, 2, 3, 4)),  # the first box
        ('[{"bbox_2d": [5, 6, 7.5, 8], "lab', (5, 6, 7.5, 8)),  # JSON cut short
        ("<|box_start|>(10,20),(30,40)<|box_end|>", (10, 20, 30, 40)),  # Qwen2-VL's box tokens
        ("The dog is at [1, 2, 3, 4].", (1, 2, 3, 4)),  # a bare list
        ("[1, 2, 3]", None),  # three numbers are no box
        ("no box here", None),
    ],
)
def test_parse_grounding_box(prediction, box):
    assert parse_grounding_box(prediction) == box


@pytest.mark.parametrize(
    "prediction, box, iou",
    [
        ("[0, 0, 100, 100]", (0, 0, 100, 100), 1.0),  # identical
        ("[0, 0, 100, 100]", (0, 0, 100, 50), 5000 / 10000),  # inside: 100*50 over 100*100 -> exactly 0.5, a hit
        ("[0, 0, 100, 100]", (50, 0, 150, 100), 5000 / 15000),  # 50*100 over 10000 + 10000 - 5000 -> 1/3, a miss
        ("[200, 200, 300, 300]", (0, 0, 100, 100), 0.0),  # disjoint
        ("I cannot find it", (0, 0, 100, 100), 0.0),  # no box
    ],
)
def test_grounding_metrics(prediction, box, iou):
    metrics = grounding_metrics(prediction, box)
    assert metrics == {"iou": pytest.approx(iou), "iou_0.5": float(iou >= 0.5)}


def test_grounding_metrics_rejects_bad_boxes():
    with pytest.raises(ValueError, match="4 numbers"):
        grounding_metrics("[0, 0, 1, 1]", (0, 0, 1))
    with pytest.raises(ValueError, match=r"0\.\.1000"):
        grounding_metrics("[0, 0, 1, 1]", (0, 0, 1920, 1080))  # pixels, not Qwen's 0..1000 coordinates
    with pytest.raises(ValueError, match="empty"):
        grounding_metrics("[0, 0, 1, 1]", (10, 0, 10, 5))


@pytest.mark.parametrize(
    "prediction, count, expected",
    [
        ("3", 3, 1.0),
        ("There are three dogs.", 3, 1.0),  # number word
        ("Twelve", 12, 1.0),  # any case
        ("zero", 0, 1.0),
        ("7.", 7, 1.0),  # sentence period
        ("I count 4 cats and 2 dogs", 2, 0.0),  # the first number (4) decides
        ("2.5", 2, 0.0),  # a fractional first number is no count
        ("someone", 1, 0.0),  # "one" inside a word is no number
        ("", 0, 0.0),  # empty answer
    ],
)
def test_count_match(prediction, count, expected):
    assert count_match(prediction, count) == expected


def test_count_match_rejects_bad_counts():
    for count in (-1, 2.0, True):
        with pytest.raises(ValueError, match="count must be an integer"):
            count_match("2", count)
