"""Tests of the built-in synthetic tasks and the sklearn digits source: record format, determinism, and that the
answers/meta actually describe the generated pixels."""

import json
import pickle
import re

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image
from scipy import ndimage

from qwen3vl_jax.data.digits import DigitsSource
from qwen3vl_jax.data.drawing import BACKGROUND, PALETTE, SHAPES
from qwen3vl_jax.data.synthetic import (
    ALL_TASKS,
    CELL_PX,
    PROBE_TASKS,
    SMALL_MARK_PX,
    TASKS,
    SyntheticSource,
    make_record,
)
from qwen3vl_jax.processing.boxes import box_iou, parse_box

N_CHECK = 30  # indices checked per task for content tests


def _user(record):
    return record["messages"][0]["content"]


def _frames(record) -> list:
    """Returns the record's images (or video frames) as uint8 arrays."""
    visual = _user(record)[0]
    images = visual["video"] if visual["type"] == "video" else [visual["image"]]
    return [np.asarray(im) for im in images]


def _image(record) -> np.ndarray:
    (image,) = _frames(record)
    return image


def _question(record) -> str:
    return _user(record)[1]["text"]


def _mask(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == PALETTE[colour], axis=-1)


def _bbox(mask: np.ndarray):
    """Returns the [top, bottom) x [left, right) slices of the mask's true pixels."""
    ys, xs = np.nonzero(mask)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def _shape_of(mask: np.ndarray) -> str:
    """Classifies a single filled shape by how much of its bounding box it fills."""
    fill = mask[_bbox(mask)].mean()
    if fill > 0.99:
        return "square"
    if 0.65 <= fill <= 0.9:
        return "circle"
    if 0.45 <= fill <= 0.63:
        return "triangle"
    return f"unknown (fill {fill:.2f})"


# ---------------------------------------------------------------- format and determinism


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("image_size", [32, 64, 448])
def test_record_format(task, image_size):
    for index in (0, 1) if image_size != 448 else (0,):
        record = make_record(task, index, seed=3, image_size=image_size)
        assert set(record) == {"id", "task", "messages", "answer", "meta"}
        assert record["id"] == f"{task}/{index}" and record["task"] == task
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        visual, text = user["content"]
        assert text["type"] == "text" and isinstance(text["text"], str) and text["text"]
        if task == "video_timestamp":
            assert visual["type"] == "video" and visual["fps"] == 2.0
            images = visual["video"]
        else:
            assert visual["type"] == "image"
            images = [visual["image"]]
        for image in images:
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (image_size, image_size)
        assert isinstance(record["answer"], str) and record["answer"] == assistant["content"]
        assert json.loads(json.dumps(record["meta"])) == record["meta"]
        restored = pickle.loads(pickle.dumps(record))
        assert all(np.array_equal(a, b) for a, b in zip(_frames(restored), _frames(record), strict=True))


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task):
    for index in range(3):
        a, b = make_record(task, index, seed=5), make_record(task, index, seed=5)
        assert (a["id"], _question(a), a["answer"], a["meta"]) == (b["id"], _question(b), b["answer"], b["meta"])
        assert all(np.array_equal(x, y) for x, y in zip(_frames(a), _frames(b), strict=True))


@pytest.mark.parametrize("task", TASKS)
def test_index_and_seed_change_the_example(task):
    for index in range(5):
        base = np.stack(_frames(make_record(task, index, seed=0)))
        assert not np.array_equal(base, np.stack(_frames(make_record(task, index + 1, seed=0))))
        assert not np.array_equal(base, np.stack(_frames(make_record(task, index, seed=1))))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"nope.*shapes"):
        make_record("nope", 0)
    with pytest.raises(ValueError):
        make_record("shapes", -1)
    with pytest.raises(ValueError):
        make_record("video_timestamp", 0, num_frames=7)
    with pytest.raises(ValueError):
        make_record("video_timestamp", 0, num_frames=2)


# ---------------------------------------------------------------- per-task content


def test_shapes():
    asked = set()
    for index in range(N_CHECK):
        record = make_record("shapes", index)
        image, meta = _image(record), record["meta"]
        assert meta["colour"] in PALETTE and meta["shape"] in SHAPES
        for colour in PALETTE:
            assert _mask(image, colour).any() == (colour == meta["colour"]), colour
        assert _shape_of(_mask(image, meta["colour"])) == meta["shape"]
        kind = "colour" if "colour" in _question(record) else "shape"
        assert record["answer"] == meta[kind]
        asked.add(kind)
    assert asked == {"colour", "shape"}


def test_counting():
    counts = set()
    for index in range(N_CHECK):
        record = make_record("counting", index)
        image, meta = _image(record), record["meta"]
        mask = _mask(image, meta["colour"])
        labels, n = ndimage.label(mask)
        assert n == ndimage.label(mask, structure=np.ones((3, 3)))[1]  # separated: diagonal contacts do not merge
        assert n == meta["count"] == int(record["answer"])
        assert 1 <= n <= 5
        assert meta["shape"] in _question(record)
        for component in range(1, n + 1):
            assert _shape_of(labels == component) == meta["shape"]
        counts.add(n)
    assert len(counts) > 2


@pytest.mark.parametrize("image_size", [64, 100])
def test_grounding(image_size):
    for index in range(N_CHECK):
        record = make_record("grounding", index, image_size=image_size)
        image, meta = _image(record), record["meta"]
        assert parse_box(record["answer"]) == tuple(meta["box"])
        assert all(0 <= v <= 1000 for v in meta["box"])
        assert meta["colour"] in _question(record) and meta["shape"] in _question(record)
        x1, y1, x2, y2 = (round(v * image_size / 1000) for v in meta["box"])
        full = _mask(image, meta["colour"])
        inside = full[y1:y2, x1:x2]
        # Shapes are separated, so the box holds exactly the target: tight on all four sides and of the right kind.
        assert inside.any()
        assert _bbox(inside) == (slice(0, y2 - y1), slice(0, x2 - x1))
        assert _shape_of(inside) == meta["shape"]
        labels, n = ndimage.label(full)
        if n == 1:  # no distractor shares the target's colour
            assert inside.sum() >= 0.9 * full.sum()
        # The target is unique: other shapes of its colour are of another kind.
        for component in set(range(1, n + 1)) - set(np.unique(labels[y1:y2, x1:x2])):
            assert _shape_of(labels == component) != meta["shape"]
        # At least one distractor: some other pixel outside the box is neither background nor the target.
        outside = image.copy()
        outside[y1:y2, x1:x2] = BACKGROUND
        assert len(np.unique(outside.reshape(-1, 3), axis=0)) >= 2


@pytest.mark.parametrize("image_size", [32, 64, 448])
def test_ocr(image_size):
    for index in range(N_CHECK if image_size == 64 else 5):
        record = make_record("ocr", index, image_size=image_size)
        grey = _image(record).astype(int).sum(-1) / 3
        assert re.fullmatch(r"[A-Z0-9]{3,8}", record["answer"])
        assert record["meta"]["text"] == record["answer"]
        assert np.median(grey) > 200  # light background
        assert grey.min() < 100  # dark text
        dark = grey < 128
        # The text fits: no dark pixels on the border.
        assert not (dark[0].any() or dark[-1].any() or dark[:, 0].any() or dark[:, -1].any())


@pytest.mark.parametrize("num_frames", [4, 8, 12])
def test_video_timestamp(num_frames):
    seen = set()
    for index in range(N_CHECK):
        record = make_record("video_timestamp", index, num_frames=num_frames)
        frames, meta = _frames(record), record["meta"]
        fps = _user(record)[0]["fps"]
        assert len(frames) == num_frames and {f.shape for f in frames} == {(64, 64, 3)}
        first_red = meta["frame"]
        assert first_red % 2 == 0 and 2 <= first_red <= num_frames - 2
        rows, cols = _bbox(_mask(frames[0], "blue"))
        cy, cx = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
        for i, frame in enumerate(frames):
            assert tuple(frame[cy, cx]) == PALETTE["blue" if i < first_red else "red"], i
        assert meta["seconds"] == (first_red + first_red + 1) / 2 / fps
        assert record["answer"] == f"{meta['seconds']:.1f} seconds"
        seen.add(first_red)
    assert len(seen) == num_frames // 2 - 1  # every allowed switch frame occurs


# ---------------------------------------------------------------- box helpers


def test_video_timestamp_mixed_lengths():
    """A tuple of frame counts: each example draws its own; a single count keeps every record as it was."""
    counts = set()
    for index in range(N_CHECK):
        record = make_record("video_timestamp", index, num_frames=[4, 8, 12])
        (video,) = [c["video"] for c in _user(record) if c["type"] == "video"]
        meta = record["meta"]
        assert len(video) == meta["num_frames"] and 0 < meta["frame"] < meta["num_frames"]
        counts.add(meta["num_frames"])
    assert counts == {4, 8, 12}
    assert make_record("video_timestamp", 3, num_frames=(8,))["meta"]["num_frames"] == 8
    with pytest.raises(ValueError, match="even frame counts >= 4"):
        make_record("video_timestamp", 0, num_frames=(4, 7))


def test_parse_box():
    assert parse_box("<|box_start|>(1,2),(30,400)<|box_end|>") == (1, 2, 30, 400)
    assert parse_box("it is at <|box_start|>(1, 2), (30, 400)<|box_end|> I think") == (1, 2, 30, 400)
    assert parse_box("<|box_start|>(5,6),(7,8)<|box_end|> <|box_start|>(1,2),(3,4)<|box_end|>") == (5, 6, 7, 8)
    assert parse_box("no box here") is None
    assert parse_box("<|box_start|>(1,2)<|box_end|>") is None
    assert parse_box("<|box_start|>(1,2),(3,x)<|box_end|>") is None
    assert parse_box("<|box_start|>(1,2),(3,4)") is None


def test_box_iou():
    assert box_iou((10, 20, 30, 40), (10, 20, 30, 40)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (20, 0, 30, 10)) == 0.0  # disjoint along x only
    assert box_iou((0, 20, 10, 30), (0, 0, 10, 10)) == 0.0  # disjoint along y only
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0
    assert box_iou((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0


# ---------------------------------------------------------------- sources


def test_synthetic_source():
    source = SyntheticSource(size=23, seed=4, image_size=32, num_frames=4)
    assert len(source) == 23
    for i in (0, 1, 4, 5, 12, 22):
        record = source[np.int64(i)]
        task = TASKS[i % len(TASKS)]
        assert record["task"] == task and record["id"] == f"{task}/{i // len(TASKS)}"
        expected = make_record(task, i // len(TASKS), seed=4, image_size=32, num_frames=4)
        assert record["answer"] == expected["answer"]
        assert all(np.array_equal(a, b) for a, b in zip(_frames(record), _frames(expected), strict=True))
    for i in (23, 100, -1):
        with pytest.raises(IndexError):
            source[i]
    restored = pickle.loads(pickle.dumps(source))
    assert repr(restored) == repr(source) == repr(SyntheticSource(size=23, seed=4, image_size=32, num_frames=4))
    assert np.array_equal(_image(restored[7]), _image(source[7]))

    single = SyntheticSource(tasks=("counting", "ocr"), size=4)
    assert [single[i]["id"] for i in range(4)] == ["counting/0", "ocr/0", "counting/1", "ocr/1"]
    with pytest.raises(ValueError, match="bogus"):
        SyntheticSource(tasks=("shapes", "bogus"))
    with pytest.raises(ValueError):
        SyntheticSource(size=0)


@pytest.fixture(scope="module")
def sklearn_digits():
    return sklearn.datasets.load_digits()


def test_digits_source(sklearn_digits):
    n = len(sklearn_digits.target)
    train, eval_ = DigitsSource("train"), DigitsSource("eval")
    assert len(eval_) == round(0.2 * n) and len(train) + len(eval_) == n
    assert set(train.indices.tolist()).isdisjoint(eval_.indices.tolist())
    assert set(train.indices.tolist()) | set(eval_.indices.tolist()) == set(range(n))
    assert not np.array_equal(DigitsSource("eval", seed=1).indices, eval_.indices)

    for source in (train, eval_):
        for i in (0, 1, len(source) - 1):
            record = source[i]
            j = int(source.indices[i])
            label = int(sklearn_digits.target[j])
            assert record["id"] == f"digits-{source.split}/{i}" and record["task"] == "digits"
            assert record["answer"] == record["messages"][1]["content"] == str(label)
            assert record["meta"] == {"label": label}
            image = _user(record)[0]["image"]
            assert image.mode == "RGB" and image.size == (64, 64)
            pixels = np.asarray(image).astype(int)
            # Nearest upscaling by 8: every 8x8 block is constant and equals the sklearn pixel scaled to 0..255.
            assert np.array_equal(pixels, np.repeat(np.repeat(pixels[::8, ::8], 8, 0), 8, 1))
            assert np.abs(pixels[::8, ::8, 0] - sklearn_digits.images[j] * 255 / 16).max() <= 0.5
        with pytest.raises(IndexError):
            source[len(source)]

    assert DigitsSource("train", image_size=40)[0]["messages"][0]["content"][0]["image"].size == (40, 40)
    restored = pickle.loads(pickle.dumps(eval_))
    assert repr(restored) == repr(eval_) and np.array_equal(_image(restored[3]), _image(eval_[3]))
    with pytest.raises(ValueError):
        DigitsSource("test")


# ---------------------------------------------------------------- probe tasks of the ablations


def test_small_object_counting_counts_the_squares_and_marks_say_where_they_are():
    counts = set()
    for index in range(N_CHECK):
        record = make_record("small_object_counting", index, seed=2, grid_sizes=(6,))
        image, meta = _image(record), record["meta"]
        _labels, count = ndimage.label(~np.all(image == BACKGROUND, axis=-1))
        assert record["answer"] == str(count) == str(len(meta["marks"]))
        counts.add(count)
        for row, col, colour in meta["marks"]:  # each listed square: 8 x 8 pixels of its colour in its cell
            cell = image[row * CELL_PX : (row + 1) * CELL_PX, col * CELL_PX : (col + 1) * CELL_PX]
            assert _mask(cell, colour).sum() == SMALL_MARK_PX**2
        assert meta["marks"][0] == [meta["row"], meta["col"], meta["colour"]]
    assert counts == {2, 3, 4}


@pytest.mark.parametrize("task", ["grid_grounding", "small_object_grounding"])
def test_grid_tasks_answer_the_target_cell(task):
    grids = set()
    for index in range(N_CHECK):
        record = make_record(task, index, seed=2, grid_sizes=(4, 8, 12))
        image, meta = _image(record), record["meta"]
        grid, row, col = meta["grid"], meta["row"], meta["col"]
        grids.add(grid)
        assert image.shape == (grid * CELL_PX, grid * CELL_PX, 3)
        assert (
            parse_box(record["answer"])
            == tuple(meta["box"])
            == tuple(round(1000 * v / grid) for v in (col, row, col + 1, row + 1))
        )
        target = _mask(image, meta["colour"])
        cell = (slice(row * CELL_PX, (row + 1) * CELL_PX), slice(col * CELL_PX, (col + 1) * CELL_PX))
        assert target.sum() == target[cell].sum() > 0  # the target colour is inside the answer's cell only
        marked = ~np.all(image == BACKGROUND, axis=-1)
        if task == "grid_grounding":
            assert target[cell].all() and marked.sum() == CELL_PX**2  # one whole cell, the rest identical grey
        else:
            assert target.sum() == SMALL_MARK_PX**2
            _labels, count = ndimage.label(marked)
            assert 2 <= count <= 4  # the target and 1..3 distractors of other colours
    assert grids == {4, 8, 12}


def test_text_reverse_is_text_only():
    for index in range(N_CHECK):
        record = make_record("text_reverse", index)
        (item,) = _user(record)
        text = record["meta"]["text"]
        assert item == {"type": "text", "text": item["text"]} and item["text"].endswith(text)
        assert record["answer"] == text[::-1] and 8 <= len(text) <= 20


def test_probe_tasks_are_appended_and_validated():
    """A record's RNG key holds its task's index in ALL_TASKS: appending the probe tasks keeps every default
    task's records as they were."""
    assert ALL_TASKS[: len(TASKS)] == TASKS and set(PROBE_TASKS) == set(ALL_TASKS[len(TASKS) :])
    mixed = SyntheticSource(tasks=("shapes", "text_reverse"), size=4, seed=4)
    assert [mixed[i]["id"] for i in range(4)] == ["shapes/0", "text_reverse/0", "shapes/1", "text_reverse/1"]
    with pytest.raises(ValueError, match="grid_sizes"):
        make_record("grid_grounding", 0, grid_sizes=(1,))


def test_small_object_presence_asks_about_present_and_absent_colours():
    answers = []
    for index in range(N_CHECK):
        record = make_record("small_object_presence", index, seed=3, grid_sizes=(6,))
        image, meta = _image(record), record["meta"]
        asked = meta["asked"]
        assert asked in _user(record)[1]["text"]
        assert record["answer"] == ("yes" if _mask(image, asked).sum() > 0 else "no")  # read from the pixels
        answers.append(record["answer"])
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_colour_preference_pairs_prefer_the_shapes_colour():
    for index in range(N_CHECK):
        record = make_record("colour_preference", index, seed=4)
        image = _image(record)
        assert record["messages"][-1]["role"] == "user" and record["chosen"] != record["rejected"]
        assert _mask(image, record["chosen"]).sum() > 0 and _mask(image, record["rejected"]).sum() == 0
