"""Benchmark evaluation: the readers (parquet and arrow files in the Hugging Face datasets layout, JSONL with a
media folder), the task builders (prompts, references, grounding boxes, skipped rows), and a tiny model evaluated
on parquet data for two tasks: the files written, per-example metrics equal to the metric functions on the
predictions, an example the processor refuses counted as skipped, an interrupted run resumed without answering an
example twice, length-bucketed batches, and the video needle-in-a-haystack task through the same harness."""

import io
import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import image, write_video
from PIL import Image

from qwen3vl_jax.evaluation import benchmark_metrics as metrics
from qwen3vl_jax.evaluation.benchmarks import Skipped, get_task, read_examples
from qwen3vl_jax.evaluation.examples import BenchmarkExample
from qwen3vl_jax.evaluation.harness import evaluate_benchmark
from qwen3vl_jax.evaluation.lengths import length_batches, prompt_length
from qwen3vl_jax.evaluation.readers import Row, data_files, read_rows
from qwen3vl_jax.evaluation.video_niah import needle_found, niah_examples
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(name: str, *, size: tuple[int, int]) -> bytes:
    """A crop of a real test image (width, height), PNG-encoded."""
    with Image.open(image(name)) as photo:
        crop = photo.convert("RGB").crop((0, 0, *size))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    return buffer.getvalue()


def docvqa_rows(count: int, *, start: int = 0) -> list[dict]:
    """DocVQA rows of varying question length, each with its own image, as lmms-lab/DocVQA holds them."""
    return [
        {
            "questionId": 100 + i,
            "question": f"What is written in box {i}?" + " Look closely." * (i % 3),
            "image": {"bytes": png("page.png", size=(40 + 4 * i, 56)), "path": f"page_{i}.png"},
            "answers": [f"box {i}", f"the box {i}"],
            "question_types": ["layout"],
        }
        for i in range(start, start + count)
    ]


def write_parquet(path, rows: list[dict], *, image_columns=("image",)) -> str:
    schema = {column: IMAGE_STRUCT for column in image_columns}
    table = pa.Table.from_pylist(rows, schema=pa.schema([(k, schema.get(k) or _type(rows, k)) for k in rows[0]]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def _type(rows, column):
    return pa.array([r[column] for r in rows]).type


@pytest.fixture(scope="module")
def docvqa_dir(tmp_path_factory):
    """An HF-layout DocVQA folder: validation in two files (6 good rows, then an undecodable image and a row
    without a question), and a test file that must not be read."""
    root = tmp_path_factory.mktemp("hub") / "DocVQA"
    bad = docvqa_rows(2, start=6)
    bad[0]["image"] = {"bytes": b"not an image", "path": "broken.png"}
    bad[1]["question"] = None
    write_parquet(root / "validation-00000-of-00002.parquet", docvqa_rows(4))
    write_parquet(root / "validation-00001-of-00002.parquet", docvqa_rows(2, start=4) + bad)
    write_parquet(root / "test-00000-of-00001.parquet", docvqa_rows(1, start=50))
    return str(root)


def mmmu_row(i: int, *, images: int = 1, open_question: bool = False) -> dict:
    names = " and ".join(f"<image {n}>" for n in range(1, images + 1))
    row = {
        "id": f"validation_Art_{i}",
        "question": f"Which colour dominates {names}?",
        "options": "[]" if open_question else "['red', 'green', 'blue']",
        "answer": "['blue', 'navy']" if open_question else "ABC"[i % 3],
        "question_type": "open" if open_question else "multiple-choice",
        "subfield": "Art",
    }
    for n in range(1, 8):
        row[f"image_{n}"] = {"bytes": png("chelsea.png", size=(48, 32 + 8 * n)), "path": None} if n <= images else None
    return row


@pytest.fixture(scope="module")
def processor():
    config = VisionProcessingConfig(image_min_pixels=64 * 64, image_max_pixels=64 * 64)
    return Processor(byte_tokenizer(), load_chat_template(None), config=config)


# ------------------------------------------------------------------------------------------------ readers


def test_readers_parquet_arrow_and_jsonl(docvqa_dir, tmp_path):
    # a folder: the validation files only, in order, lazily; the Image struct and the list column as stored
    files = data_files(docvqa_dir, split="validation")
    assert [os.path.basename(f) for f in files] == [
        "validation-00000-of-00002.parquet",
        "validation-00001-of-00002.parquet",
    ]
    rows = list(read_rows(docvqa_dir, split="validation"))
    assert [r.index for r in rows] == list(range(8)) and rows[0].base_dir == docvqa_dir
    assert rows[5].values["answers"] == ["box 5", "the box 5"]
    assert rows[2].values["image"] == {"bytes": png("page.png", size=(48, 56)), "path": "page_2.png"}
    assert [r.values["questionId"] for r in read_rows(docvqa_dir, split="test")] == [150]
    assert len(list(read_rows(f"{docvqa_dir}/validation-*.parquet"))) == 8  # a glob
    with pytest.raises(FileNotFoundError, match=r"no 'testmini' files .* splits \['test', 'validation'\]"):
        data_files(docvqa_dir, split="testmini")
    with pytest.raises(FileNotFoundError, match=r"no \.parquet or \.arrow data files at"):
        data_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_files(str(tmp_path / "missing"))

    # Arrow: the stream format HF datasets writes (save_to_disk) and the random-access file format
    table = pa.Table.from_pylist(docvqa_rows(3), schema=pq.read_schema(files[0]))
    stream_dir = tmp_path / "saved" / "validation"
    stream_dir.mkdir(parents=True)
    with pa.ipc.new_stream(str(stream_dir / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    with pa.ipc.new_file(str(tmp_path / "docvqa-validation.arrow"), table.schema) as writer:
        writer.write_table(table)
    for location in (str(tmp_path / "saved"), str(tmp_path / "docvqa-validation.arrow")):
        read = list(read_rows(location, split="validation"))
        assert [r.values["question"] for r in read] == table.column("question").to_pylist()
        assert read[1].values["image"]["bytes"] == table.column("image")[1]["bytes"].as_py()

    # JSONL: media paths relative to the file's folder, or to a media folder; a bad line is a row with an error
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(png("coffee.jpg", size=(64, 48)))
    lines = [
        json.dumps({"questionId": 1, "question": "What is this?", "image": "media/a.png", "answers": ["coffee"]}),
        "{not json",
        json.dumps({"questionId": 2, "question": "And this?", "image": "a.png", "answers": ["cup"]}),
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    task = get_task("docvqa")
    items = list(read_examples(task, str(tmp_path / "qa.jsonl")))
    assert [type(i).__name__ for i in items] == ["BenchmarkExample", "Skipped", "Skipped"]
    assert items[0].messages[0]["content"][0]["image"] == str(media / "a.png")
    assert "invalid JSON" in items[1].reason and "a.png does not exist" in items[2].reason
    with_media = list(read_examples(task, str(tmp_path / "qa.jsonl"), media_dir=str(media)))
    assert with_media[2].messages[0]["content"][0]["image"] == str(media / "a.png")


# ------------------------------------------------------------------------------------------------ task builders


def test_task_builders(docvqa_dir):
    items = list(read_examples(get_task("docvqa"), docvqa_dir))
    examples = [i for i in items if not isinstance(i, Skipped)]
    assert [e.id for e in examples] == [f"docvqa:{100 + i}" for i in range(6)]
    # lmms-lab/DocVQA's root folder: the task reads its config's subfolder, DocVQA
    from_root = read_examples(get_task("docvqa"), os.path.dirname(docvqa_dir))
    assert [i.id for i in from_root if not isinstance(i, Skipped)] == [e.id for e in examples]
    (picture, text) = examples[1].messages[0]["content"]
    assert picture["image"] == png("page.png", size=(44, 56))
    assert text["text"] == "What is written in box 1? Look closely.\nAnswer the question using a single word or phrase."
    assert examples[1].references == ("box 1", "the box 1")
    skipped = [i for i in items if isinstance(i, Skipped)]
    assert [s.id for s in skipped] == ["docvqa:row6", "docvqa:row7"]
    assert "undecodable image" in skipped[0].reason and "no value in column 'question'" in skipped[1].reason

    # MMMU: the images the question names, in order, then the Qwen3-VL multiple-choice prompt
    task = get_task("mmmu")
    (example,) = task.examples(Row(0, mmmu_row(1, images=2), ""))
    content = example.messages[0]["content"]
    assert [item["image"] for item in content[:2]] == [mmmu_row(1, images=2)[f"image_{n}"]["bytes"] for n in (1, 2)]
    assert content[2]["text"] == (
        "Question: Which colour dominates <image 1> and <image 2>?\nOptions:\nA. red\nB. green\nC. blue\n"
        "Answer with the option letter only."
    )
    assert example.options == ("red", "green", "blue") and example.references == ("B",)
    assert task.score(example, "B") == {"accuracy": 1.0} and task.score(example, "The answer is C.")["accuracy"] == 0
    (open_example,) = task.examples(Row(1, mmmu_row(2, open_question=True), ""))
    assert open_example.references == ("blue", "navy") and task.score(open_example, "navy") == {"accuracy": 1.0}
    missing_image = dict(mmmu_row(3), image_1=None)
    with pytest.raises(Exception, match="no value in column 'image_1'"):
        task.examples(Row(3, missing_image, ""))

    # RefCOCO: a pixel box [x, y, w, h] -> 0..1000 coordinates of the image, one example per expression
    task = get_task("refcoco")
    picture = png("coffee.jpg", size=(200, 100))
    row = {"question_id": "7", "image": {"bytes": picture, "path": None}, "bbox": [20, 10, 100, 50]}
    examples = task.examples(Row(0, {**row, "answer": ["left cup", "the cup"]}, ""))
    assert [e.id for e in examples] == ["refcoco:7/0", "refcoco:7/1"]
    assert examples[0].meta["box"] == [100.0, 100.0, 600.0, 600.0]
    assert 'Locate "the cup" in the image' in examples[1].messages[0]["content"][1]["text"]
    assert task.score(examples[0], '{"bbox_2d": [100, 100, 600, 600]}') == {"iou": 1.0, "iou_0.5": 1.0}
    # the TFDS ref_coco layout: normalised [ymin, xmin, ymax, xmax] boxes with their expressions
    objects = {"bbox": np.array([[0.1, 0.1, 0.6, 0.6]]), "refexp": [{"raw": ["left cup"]}]}
    (tfds_example,) = task.examples(Row(0, {"image": np.zeros((100, 200, 3), np.uint8), "objects": objects}, ""))
    assert tfds_example.meta["box"] == [100.0, 100.0, 600.0, 600.0]

    # MathVista: a multiple-choice answer becomes its letter; free-form answers keep type and precision
    task = get_task("mathvista")
    base = {"pid": "3", "question": "How long is it?", "decoded_image": {"bytes": picture, "path": None}}
    (choice,) = task.examples(
        Row(0, {**base, "choices": ["2", "4"], "answer": "4", "question_type": "multi_choice", "answer_type": "text",
                "unit": None, "precision": None}, "")
    )  # fmt: skip
    assert choice.references == ("B",) and choice.messages[0]["content"][1]["text"].endswith(
        "A. 2\nB. 4\nAnswer with the option's letter from the given choices directly."
    )
    (free,) = task.examples(
        Row(0, {**base, "choices": None, "answer": "1.5", "question_type": "free_form", "answer_type": "float",
                "unit": "cm", "precision": 1.0}, "")
    )  # fmt: skip
    assert free.messages[0]["content"][1]["text"] == (
        "How long is it? (Unit: cm)\nAnswer the question using a single floating-point number with one decimal place."
    )
    assert task.score(free, "1.50") == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown benchmark task 'docvqa2'"):
        get_task("docvqa2")


# ------------------------------------------------------------------------------------------------ with a model


class CountingModel:
    """A model whose generate calls are counted (with their rows' prompt lengths), and that raises after
    `fail_after` calls (a run killed between batches)."""

    def __init__(self, model, *, fail_after: int | None = None):
        self.model, self.fail_after, self.calls = model, fail_after, []

    def generate(self, **inputs):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(np.asarray(inputs["attention_mask"]).sum(axis=1).tolist())
        return self.model.generate(**inputs)


def predictions_of(directory) -> list[dict]:
    with open(os.path.join(directory, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_tasks_on_parquet_data(tiny, processor, docvqa_dir, tmp_path):
    truncated = mmmu_row(3)  # its header reads, its pixels do not: the processor's DataError
    truncated["image_1"]["bytes"] = truncated["image_1"]["bytes"][:3000]
    mmmu_file = write_parquet(
        tmp_path / "MMMU" / "validation-00000-of-00001.parquet",
        [mmmu_row(0), mmmu_row(1), mmmu_row(2, open_question=True), truncated],
        image_columns=[f"image_{n}" for n in range(1, 8)],
    )
    output = str(tmp_path / "eval")
    model = CountingModel(tiny.ours)
    run = dict(output=output, batch_size=2, max_new_tokens=4, progress=False)
    for name, data in (("docvqa", docvqa_dir), ("mmmu", mmmu_file)):
        task = get_task(name)
        summary = evaluate_benchmark(model, processor, task=task, examples=read_examples(task, data), **run)
        directory = os.path.join(output, name)
        assert sorted(os.listdir(directory)) == ["predictions.jsonl", "report.md", "summary.json"]
        with open(os.path.join(directory, "summary.json")) as f:
            assert json.load(f) == summary
        answered = [r for r in predictions_of(directory) if "error" not in r]
        for record in answered:
            assert set(record) >= {"id", "task", "prediction", "references", "metrics", "meta"}
            assert record["task"] == name
        assert summary["examples"] == len(answered) and summary["headline"] == task.headline
        for metric in summary["metrics"]:
            assert summary["metrics"][metric] == pytest.approx(np.mean([r["metrics"][metric] for r in answered]))
        with open(os.path.join(directory, "report.md")) as f:
            assert f.read().startswith(f"# {name}: ")

    docvqa = predictions_of(os.path.join(output, "docvqa"))
    assert len(docvqa) == 6
    for record in docvqa:
        assert record["metrics"] == {"anls": metrics.anls(record["prediction"], record["references"])}
    with open(os.path.join(output, "docvqa", "summary.json")) as f:
        skipped = json.load(f)["skipped"]
    assert skipped["count"] == 2 and [s["id"] for s in skipped["items"]] == ["docvqa:row6", "docvqa:row7"]

    mmmu = {r["id"]: r for r in predictions_of(os.path.join(output, "mmmu"))}
    multiple_choice = mmmu["mmmu:validation_Art_1"]
    expected = metrics.choice_accuracy(multiple_choice["prediction"], options=["red", "green", "blue"], answer="B")
    assert multiple_choice["metrics"] == {"accuracy": expected}
    assert multiple_choice["options"] == ["red", "green", "blue"]
    open_answer = mmmu["mmmu:validation_Art_2"]
    expected = metrics.short_answer_match(open_answer["prediction"], ["blue", "navy"])
    assert open_answer["metrics"] == {"accuracy": expected}
    # the truncated image: an error record, counted as skipped; its batch-mate answered in a batch of 2 again
    assert "truncated" in mmmu["mmmu:validation_Art_3"]["error"] and "metrics" not in mmmu["mmmu:validation_Art_3"]
    with open(os.path.join(output, "mmmu", "summary.json")) as f:
        summary = json.load(f)
    assert summary["examples"] == 3 and summary["skipped"]["items"][0]["id"] == "mmmu:validation_Art_3"
    assert summary["groups"]["question_type"]["open"]["examples"] == 1
    assert all(len(call) == 2 for call in model.calls)

    # length buckets: 6 docvqa examples in 3 batches, each batch's prompts no shorter than the next batch's
    docvqa_calls = model.calls[:3]
    assert all(min(a) >= max(b) for a, b in itertools.pairwise(docvqa_calls)), docvqa_calls


def test_an_interrupted_run_resumes_without_repeating_an_example(tiny, processor, docvqa_dir, tmp_path):
    task, output = get_task("docvqa"), str(tmp_path / "eval")
    run = dict(task=task, output=output, batch_size=2, max_new_tokens=4, progress=False)
    killed = CountingModel(tiny.ours, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmark(killed, processor, examples=read_examples(task, docvqa_dir), **run)
    predictions_file = os.path.join(output, "docvqa", "predictions.jsonl")
    first_batch = predictions_of(os.path.join(output, "docvqa"))
    assert len(killed.calls) == 1 and len(first_batch) == 2
    with open(predictions_file, "a") as f:
        f.write('{"id": "docvqa:10')  # a write torn by the kill

    resumed = CountingModel(tiny.ours)
    summary = evaluate_benchmark(resumed, processor, examples=read_examples(task, docvqa_dir), **run)
    assert len(resumed.calls) == 2  # the 4 examples left, in 2 batches: the first batch is not generated again
    predictions = predictions_of(os.path.join(output, "docvqa"))
    ids = [r["id"] for r in predictions]
    assert sorted(ids) == [f"docvqa:{100 + i}" for i in range(6)] and len(set(ids)) == 6
    assert predictions[:2] == first_batch
    assert summary["examples"] == 6 and summary["skipped"]["count"] == 2

    again = CountingModel(tiny.ours)  # everything answered: nothing generated, the same summary
    assert evaluate_benchmark(again, processor, examples=read_examples(task, docvqa_dir), **run) == summary
    assert again.calls == []


def test_length_bucketing(processor, tmp_path):
    assert length_batches([5, 100, 7, 98, 50, 52, 6], batch_size=2) == [[1, 3], [5, 4], [2, 6], [0]]
    task = get_task("docvqa")
    short, long = (
        task.examples(Row(0, {**docvqa_rows(1)[0], "question": question}, ""))[0]
        for question in ("Short?", "A much longer question about the page " * 4)
    )
    text = lambda example: example.messages[0]["content"][1]["text"]  # noqa: E731
    # the byte tokenizer: one token per character
    assert prompt_length(processor, long) - prompt_length(processor, short) == len(text(long)) - len(text(short))
    for example in (short, long):  # the processor's prompt, image pads included
        template = processor.apply_chat_template(example.messages, add_generation_prompt=True)
        inputs = processor(text=[template], images=[example.messages[0]["content"][0]["image"]])
        assert prompt_length(processor, example) == inputs["input_ids"].shape[1]
    # videos: a file (frames sampled from its metadata's count and rate) and a frame list with its fps
    clip = write_video(str(tmp_path / "clip.mp4"), num_frames=13, fps=5, height=40, width=72)
    frames = [np.full((40, 72, 3), 10 * i, np.uint8) for i in range(9)]
    for video, fps in ((clip, None), (frames, 3.0)):
        content = [{"type": "video", "video": video, "fps": fps}, {"type": "text", "text": "What happens?"}]
        example = BenchmarkExample(
            id="v", task="videomme", messages=[{"role": "user", "content": content}], references=("A",)
        )
        template = processor.apply_chat_template(example.messages, add_generation_prompt=True)
        inputs = processor(text=[template], videos=[video], video_fps=fps)
        assert prompt_length(processor, example) == inputs["input_ids"].shape[1]


def test_video_niah_through_the_harness(tiny, processor, tmp_path):
    """The video_niah task on a 2 x 2 grid of short synthetic videos: per-example needle_found, the summary per
    length and depth, and the NIAH heat map and table beside the results."""
    task = get_task("video_niah")
    grid = dict(lengths=(2.0, 4.0), depths=(0.0, 1.0), fps=2.0, haystack=None, needles_per_cell=1, seed=0)
    examples = niah_examples(**grid, image_size=32)
    run = dict(output=str(tmp_path), batch_size=2, max_new_tokens=4, progress=False)
    summary = evaluate_benchmark(tiny.ours, processor, task=task, examples=examples, **run)
    directory = tmp_path / "video_niah"
    assert sorted(os.listdir(directory)) == [
        "niah.md",
        "niah_heatmap.png",
        "predictions.jsonl",
        "report.md",
        "summary.json",
    ]
    by_id = {example.id: example for example in examples}
    for record in predictions_of(directory):
        assert record["metrics"] == {"needle_found": needle_found(record["prediction"], by_id[record["id"]])}
    assert summary["examples"] == 4 and summary["groups"]["length"]["4.0"]["examples"] == 2
    assert set(summary["groups"]["depth"]) == {"0.0", "1.0"}
