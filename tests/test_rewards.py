"""Verifiable rewards (qwen3vl_jax/training/rewards.py) on hand-written completions, the awkward ones included: no
box, a malformed box, an empty answer, numbers with separators and percentages, option letters in their usual
forms, a reasoning block before the answer, and a user's reward that raises (0 for that completion, counted)."""

import math

import numpy as np
import pytest

from qwen3vl_jax.training.rewards import (
    REWARDS,
    Rewards,
    RewardSpec,
    answer_text,
    choice_letter,
    first_number,
    reward_function,
)

BOX = "<|box_start|>(100,200),(300,400)<|box_end|>"  # 200 x 200


def score(name, completion, reference, meta=None, **options):
    return REWARDS[name](completion, reference, meta or {}, **options)


def test_the_answer_is_the_text_after_the_reasoning():
    assert answer_text("<think>3 + 4 = 7</think> 7") == "7"
    assert answer_text("no reasoning here ") == "no reasoning here"
    assert answer_text("<think>a</think>x</think> y") == "y"
    assert score("exact", "<think>it is blue</think>blue", "blue") == 1.0


def test_exact():
    assert score("exact", "  a   red\ncircle ", "a red circle") == 1.0
    assert score("exact", "A red circle", "a red circle") == 0.0
    assert score("exact", "A red circle", "a red circle", case_sensitive=False) == 1.0
    assert score("exact", "", "a red circle") == 0.0


def test_numeric():
    assert [first_number(t) for t in ("1,234 apples", "12.5%", "-3 degrees", "none", ".5")] == [
        1234,
        12.5,
        -3,
        None,
        0.5,
    ]
    assert score("numeric", "There are 7 circles.", "7") == 1.0
    assert score("numeric", "7.0", "7") == 1.0
    assert score("numeric", "8", "7") == 0.0
    assert score("numeric", "", "7") == 0.0  # empty answer
    assert score("numeric", "about 103", "100", rel_tolerance=0.05) == 1.0  # 3 <= 1e-6 + 0.05 * 100
    assert score("numeric", "about 106", "100", rel_tolerance=0.05) == 0.0
    with pytest.raises(ValueError, match="holds no number"):
        score("numeric", "7", "seven")


def test_choice():
    forms = ["B", "(B)", "B.", "B) red", "B: red", "the answer is B", "Answer: (B)", "b", "<think>not A</think>B"]
    assert [choice_letter(answer_text(t)) for t in forms] == ["B"] * len(forms)
    assert [choice_letter(t) for t in ("I think so", "a cat", "", "answer is apple")] == [None] * 4
    assert score("choice", "(C) green", "C") == 1.0
    assert score("choice", "(C) green", "(B) red") == 0.0
    assert score("choice", "", "C") == 0.0


def test_box_iou():
    half = "<|box_start|>(200,200),(300,400)<|box_end|>"  # 100 x 200 inside BOX: IoU 1/2
    shifted = "<|box_start|>(200,300),(400,500)<|box_end|>"  # overlap 100 x 100: IoU 10000 / 70000
    assert score("box_iou", f"it is at {BOX}", BOX) == 1.0
    assert score("box_iou", half, BOX) == pytest.approx(0.5)
    assert score("box_iou", shifted, BOX) == pytest.approx(1 / 7)
    assert score("box_iou", shifted, "", meta={"box": [100, 200, 300, 400]}) == pytest.approx(1 / 7)
    assert score("box_iou", half, BOX, threshold=0.5) == 1.0
    assert score("box_iou", shifted, BOX, threshold=0.5) == 0.0
    assert score("box_iou", "no box here", BOX) == 0.0
    assert score("box_iou", "<|box_start|>(100,200),(300<|box_end|>", BOX) == 0.0  # malformed
    assert score("box_iou", "", BOX) == 0.0
    with pytest.raises(ValueError, match="holds a box"):
        score("box_iou", BOX, "somewhere")


def test_timestamp():
    assert score("timestamp", "at 3.5 seconds", "3.5") == 1.0
    assert score("timestamp", "4", "3.5") == pytest.approx(0.5)
    assert score("timestamp", "4", "3.5", scale=2.0) == pytest.approx(0.75)
    assert score("timestamp", "9", "3.5") == 0.0
    assert score("timestamp", "4", "3.5", tolerance=0.5) == 1.0
    assert score("timestamp", "4.1", "3.5", tolerance=0.5) == 0.0
    assert score("timestamp", "never", "3.5") == 0.0
    assert score("timestamp", "2", "at the start", meta={"seconds": 2.0}) == 1.0


def test_format():
    assert score("format", "<think>count them</think> 7", "") == 1.0
    assert score("format", "<think>\nmulti\nline\n</think>\n7", "") == 1.0
    assert score("format", "7", "") == 0.0
    assert score("format", "<think>no answer after</think>  ", "") == 0.0
    assert score("format", "ANSWER: 7", "", pattern=r"^ANSWER: \S") == 1.0


def length_bonus(completion, reference, meta, *, per_char=0.1):
    """A user's reward (reached by its dotted path in the tests below)."""
    return per_char * len(completion)


def fails_on_x(completion, reference, meta):
    if "x" in completion:
        raise RuntimeError("cannot score x")
    return 1.0


def not_finite(completion, reference, meta):
    return math.nan if completion == "nan" else 1.0


def test_rewards_combine_with_weights_and_a_raising_reward_gives_0_and_is_counted(caplog):
    rewards = Rewards(
        [
            "exact",
            dict(name="test_rewards.length_bonus", weight=0.5, per_char=0.2),
            dict(name="test_rewards.fails_on_x", weight=2.0),
            RewardSpec("test_rewards.not_finite"),
        ]
    )
    completions, references = ["red", "x", "nan"], ["red", "red", "red"]
    scores = rewards(completions, references, [{}, {}, {}])
    np.testing.assert_allclose(scores.per_reward["exact"], [1, 0, 0])
    np.testing.assert_allclose(scores.per_reward["test_rewards.length_bonus"], [0.6, 0.2, 0.6])
    np.testing.assert_allclose(scores.per_reward["test_rewards.fails_on_x"], [1, 0, 1])
    np.testing.assert_allclose(scores.per_reward["test_rewards.not_finite"], [1, 1, 0])
    np.testing.assert_allclose(scores.total, [1 + 0.3 + 2 + 1, 0 + 0.1 + 0 + 1, 0 + 0.3 + 2 + 0])
    assert scores.failures == {
        "exact": 0,
        "test_rewards.length_bonus": 0,
        "test_rewards.fails_on_x": 1,
        "test_rewards.not_finite": 1,
    }
    assert "cannot score x" in caplog.text


def test_bad_reward_specs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'bleu' is neither a built-in one"):
        reward_function("bleu")
    with pytest.raises(ValueError, match=r"'test_rewards.missing': cannot import it"):
        reward_function("test_rewards.missing")
    with pytest.raises(ValueError, match="is not a function"):
        reward_function("test_rewards.BOX")
    with pytest.raises(ValueError, match="given twice"):
        Rewards(["exact", {"name": "exact", "weight": 2}])
    with pytest.raises(ValueError, match="needs a 'name'"):
        Rewards([{"weight": 1.0}])
    with pytest.raises(ValueError, match="no reward functions"):
        Rewards([])
    with pytest.raises(ValueError, match="one each"):
        Rewards(["exact"])(["a"], ["a", "b"], [{}])
