"""The video needle in a haystack: the needle on the temporal pair and at the timestamp its example reports (read
back from the processor's own prompt), the grid, a camera clip looped into a haystack, scoring and the report."""

import dataclasses
import re

import numpy as np
import pytest
from helpers import CAMERA_CLIP
from PIL import Image

from qwen3vl_jax.data.drawing import canvas
from qwen3vl_jax.evaluation.niah_video import CARD_COLOUR, NEEDLE_OBJECTS, draw_object
from qwen3vl_jax.evaluation.video_niah import (
    check_processor_keeps_every_frame,
    needle_found,
    niah_examples,
    summarize_grid,
    write_niah_report,
)
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template

GRID = dict(fps=1.0, haystack=None, needles_per_cell=1, seed=0, image_size=64)


def frames_of(example) -> list[np.ndarray]:
    (video,) = [item for item in example.messages[0]["content"] if item.get("type") == "video"]
    return [np.asarray(frame) for frame in video["video"]]


def card_pixels(frame: np.ndarray) -> int:
    return int(np.all(frame == CARD_COLOUR, axis=-1).sum())


@pytest.fixture(scope="module")
def depth_examples():
    """An 8-frame video at 1 fps (4 temporal pairs) with the needle at depths 0, 0.5 and 1."""
    return niah_examples(lengths=(8,), depths=(0.0, 0.5, 1.0), **GRID)


def test_the_needle_fills_one_temporal_pair_at_the_depth(depth_examples):
    """Depth 0 is the first pair, 1 the last, 0.5 of 4 pairs is pair round(1.5) = 2 (halves up); the card's white
    fills both frames of the pair and no other frame (the synthetic haystack never draws white)."""
    for example, needle_frame in zip(depth_examples, (0, 4, 6)):
        assert example.meta["needle_frame"] == needle_frame and example.meta["num_frames"] == 8
        frames = frames_of(example)
        assert len(frames) == 8 and all(frame.shape == (64, 64, 3) for frame in frames)
        white = [card_pixels(frame) for frame in frames]
        needle = {needle_frame, needle_frame + 1}
        assert all(white[i] > 0.3 * 64 * 64 for i in needle), white
        assert all(white[i] == 0 for i in range(8) if i not in needle), white


def test_the_reported_timestamp_is_the_one_the_model_reads(depth_examples):
    """needle_seconds is the processor's timestamp of the needle's pair (`Processor.process_video`), and its
    `<t seconds>` text is the one before that pair's tokens in the encoded prompt: at 1 fps, pair k of frames
    (2k, 2k + 1) is at 2k + 0.5 s."""
    config = VisionProcessingConfig(video_min_pixels=0, video_max_pixels=8 * 64 * 64)
    processor = Processor(byte_tokenizer(), load_chat_template(None), config=config)
    for example, seconds in zip(depth_examples, (0.5, 4.5, 6.5)):
        check_processor_keeps_every_frame(config, fps=GRID["fps"], num_frames=example.meta["num_frames"])
        pair = example.meta["needle_frame"] // 2
        (video,) = [item for item in example.messages[0]["content"] if item.get("type") == "video"]
        timestamps = processor.process_video(video["video"], fps=video["fps"]).timestamps
        assert example.meta["needle_seconds"] == timestamps[pair] == seconds
        prompt = processor.encode_prompt(example.messages)
        text = processor.decode(prompt.input_ids, skip_special_tokens=False)
        assert re.findall(r"<(\d+\.\d) seconds>", text)[pair] == f"{example.meta['needle_seconds']:.1f}"


def test_a_processor_that_would_resample_the_video_is_refused():
    """A processor sampling fewer frames than the video holds (lower fps, or max_frames too small) would merge
    the needle with haystack frames."""
    with pytest.raises(ValueError, match="max_frames >= 8"):
        check_processor_keeps_every_frame(VisionProcessingConfig(fps=2.0), fps=4.0, num_frames=8)
    with pytest.raises(ValueError, match="keeps 6 of a 8-frame"):
        check_processor_keeps_every_frame(VisionProcessingConfig(max_frames=6), fps=2.0, num_frames=8)


def test_the_grid_has_one_example_per_cell_and_needle_and_is_deterministic():
    grid = dict(lengths=(4, 6, 10), depths=(0.0, 0.3, 1.0), fps=2.0, haystack=None, needles_per_cell=2, image_size=32)
    examples = niah_examples(**grid, seed=3)
    assert len(examples) == 3 * 3 * 2 and len({e.id for e in examples}) == len(examples)
    assert {(e.meta["length"], e.meta["depth"]) for e in examples} == {
        (length, depth) for length in grid["lengths"] for depth in grid["depths"]
    }
    assert all(e.task == "video_niah" and e.meta["num_frames"] == 2 * e.meta["length"] for e in examples)
    again = niah_examples(**grid, seed=3)
    assert [e.references for e in again] == [e.references for e in examples]
    np.testing.assert_array_equal(frames_of(again[-1])[3], frames_of(examples[-1])[3])
    other = niah_examples(**grid, seed=4)
    assert [e.references for e in other] != [e.references for e in examples]


def test_a_camera_clip_is_looped_into_the_haystack():
    """bikes.mp4 (10 s) at 2 fps gives 20 frames; a 16 s haystack of 32 frames repeats them from frame 20, with
    frames resized to a longer side of image_size (640x272 -> 64x27)."""
    (example,) = niah_examples(
        lengths=(16,), depths=(0.25,), fps=2.0, haystack=CAMERA_CLIP, needles_per_cell=1, seed=0, image_size=64
    )
    frames = frames_of(example)
    needle_frame = example.meta["needle_frame"]
    assert len(frames) == 32 and frames[0].shape == (27, 64, 3)
    assert needle_frame == 8 and example.meta["needle_seconds"] == (8 + 9) / 2 / 2.0
    for i in range(12):
        if i not in (needle_frame, needle_frame + 1):
            np.testing.assert_array_equal(frames[i], frames[i + 20])
    assert not np.array_equal(frames[needle_frame], frames[needle_frame + 20])  # the same haystack frame, no card
    assert not np.array_equal(frames[needle_frame + 1], frames[needle_frame + 21])
    white = [card_pixels(frame) for frame in frames]
    assert min(white[8:10]) > 0.3 * 64 * 27 and max(white[:8] + white[10:]) < 0.05 * 64 * 27, white


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(depths=(0.5, 1.5)), "depth 1.5 is outside"),
        (dict(depths=(-0.1,)), "depth -0.1 is outside"),
        (dict(lengths=(8, 2)), "length 2 s at 1.0 fps gives 2 frames, shorter than 2 temporal pairs"),
        (dict(lengths=(5,)), "length 5 s at 1.0 fps gives 5 frames, an odd count"),
        (dict(lengths=(4.5,)), "length 4.5 s at 1.0 fps is 4.5 frames"),
        (dict(lengths=(8, 8)), "lengths must be distinct"),
        (dict(haystack="no/such/clip.mp4"), "no/such/clip.mp4"),
        (dict(image_size=16), "image_size"),
        (dict(needles_per_cell=0), "needles_per_cell"),
        (dict(needle="picture"), "needle must be one of ('code', 'object'), got 'picture'"),
    ],
)
def test_bad_inputs_are_named(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        niah_examples(**{**GRID, "lengths": (8,), "depths": (0.5,), **change})


def test_the_code_is_found_as_a_word_of_the_prediction(depth_examples):
    example = dataclasses.replace(depth_examples[0], references=("K7QX",))
    assert needle_found("The code on the card is K7QX.", example) == 1.0
    assert needle_found("  k7qx  ", example) == 1.0
    assert needle_found("K 7 Q X", example) == 1.0
    assert needle_found("The code is K7QY.", example) == 0.0
    assert needle_found("K7QX9", example) == 0.0  # a longer code is another code
    assert needle_found("", example) == 0.0


def test_the_object_needle_is_a_lettered_choice_of_the_object_drawn():
    """Each object example offers the four object classes in its own order; its reference letter names the class
    drawn white on the needle pair (the same white pixels as that class drawn alone, not another's); the answer's
    letter scores it."""
    examples = niah_examples(**{**GRID, "lengths": (8,), "depths": (0.0, 1.0), "needles_per_cell": 3}, needle="object")
    letters = "ABCD"
    for example in examples:
        assert sorted(example.options) == sorted(NEEDLE_OBJECTS)
        (letter,) = example.references
        drawn = example.meta["needle_value"]
        assert example.options[letters.index(letter)] == drawn
        question = example.messages[0]["content"][1]["text"]
        assert all(f"{x}. {option}" in question for x, option in zip(letters, example.options))
        frames = frames_of(example)
        needle_frame = example.meta["needle_frame"]
        white = {name: np.all(np.asarray(draw_object(canvas(64), name)) == CARD_COLOUR, -1) for name in NEEDLE_OBJECTS}
        for i, frame in enumerate(frames):
            mask = np.all(frame == CARD_COLOUR, axis=-1)
            if i in (needle_frame, needle_frame + 1):
                assert [name for name in white if np.array_equal(mask, white[name])] == [drawn]
            else:
                assert not mask.any()
        wrong = next(x for x in letters if x != letter)
        assert needle_found(f"The answer is {letter}.", example) == 1.0
        assert needle_found(f"({wrong})", example) == 0.0 and needle_found("", example) == 0.0
    assert len({e.meta["needle_value"] for e in examples}) > 1 and len({e.references for e in examples}) > 1


def hand_made_results() -> list[dict]:
    """Two lengths x two depths: (30 s, 0) 2 of 2 found, (30 s, 1) 1 of 2, (90 s, 0) 0 of 2, (90 s, 1) 1 of 2 (the
    other an example that failed with an error)."""
    found = {(30, 0.0): [1, 1], (30, 1.0): [1, 0], (90, 0.0): [0, 0], (90, 1.0): [1, None]}
    results = []
    for (length, depth), values in found.items():
        for i, value in enumerate(values):
            result = dict(
                id=f"video_niah/{length}s/depth{depth}/{i}",
                task="video_niah",
                prediction="",
                references=("K7QX",),
                meta=dict(length=length, depth=depth, needle_frame=0, needle_seconds=0.25, num_frames=2 * length),
            )
            if value is None:
                result.update(error="unreadable frames", metrics={"exact_match": 0.0})
            else:
                result["metrics"] = {"needle_found": float(value)}
            results.append(result)
    return results


def test_the_report_writes_the_grid_as_a_heatmap_and_a_table(tmp_path):
    results = hand_made_results()
    other_task = dict(id="docvqa/0", task="docvqa", prediction="", references=("x",), meta={}, metrics={"anls": 1.0})
    grid = summarize_grid([*results, other_task])
    assert grid["lengths"] == [30, 90] and grid["depths"] == [0.0, 1.0]
    assert grid["accuracy"] == [[1.0, 0.0], [0.5, 0.5]] and grid["examples"] == [[2, 2], [2, 2]]
    assert grid["overall"] == 4 / 8 and grid["total"] == 8
    write_niah_report(results, directory=str(tmp_path / "report"))
    table = (tmp_path / "report" / "niah.md").read_text()
    assert "| depth \\ length | 30 s | 1.5 min |" in table
    assert "| 0 | 1.000 (2) | 0.000 (2) |" in table and "| 1 | 0.500 (2) | 0.500 (2) |" in table
    with Image.open(tmp_path / "report" / "niah_heatmap.png") as heatmap:
        assert heatmap.format == "PNG" and min(heatmap.size) > 100


def test_the_report_needs_each_result_placed_and_scored():
    (result, *_) = hand_made_results()
    with pytest.raises(ValueError, match=r"video_niah/30s/depth0\.0/0.*meta"):
        summarize_grid([{**result, "meta": {}}])
    with pytest.raises(ValueError, match=r"video_niah/30s/depth0\.0/0.*needle_found"):
        summarize_grid([{**result, "metrics": {}}])
    with pytest.raises(ValueError, match="no video_niah results"):
        summarize_grid([])
