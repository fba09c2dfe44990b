"""TFDS datasets as a data source: a tiny dataset prepared here in ArrayRecord format (no TensorFlow), its
features mapped to conversations, bad records under the bad-input policy, per-host shards, resumption, and two
training steps with an eval on it."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import image, tiny_config
from PIL import Image

from qwen3vl_jax.config import preset
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.data.sources import make_source
from qwen3vl_jax.processing import DataError, Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.trainer import Trainer

COLOURS = ("red", "green", "blue", "white")
CORRUPT_PNG, EMPTY_ANSWERS = 5, 8  # the two bad examples of the train split


def photo_png(index: int) -> bytes:
    """A 48x64 crop of a real photo, PNG-encoded."""
    with Image.open(image("chelsea.png")) as photo:
        crop = photo.convert("RGB").crop((index * 20, 0, index * 20 + 64, 48))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    return buffer.getvalue()


def example(index: int, *, train: bool) -> dict:
    colour = COLOURS[index % len(COLOURS)]
    square = np.zeros((32 + 8 * (index % 3), 40, 3), np.uint8)
    square[8:24, 8:24] = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255,) * 3}[colour]
    return {
        "square": square,
        "png": b"not an image" if train and index == CORRUPT_PNG else photo_png(index),
        "question": f"example {index}: what colour is the square?",
        "answers": [] if train and index == EMPTY_ANSWERS else [colour, f"{colour} square", f"a {colour} one"],
        "qa": {
            "question": [f"example {index}: is it a cat?", f"example {index}: how many cats?"],
            "answer": ["yes", "one"],
        },
    }


class TinyVqa(tfds.core.GeneratorBasedBuilder):
    """12 train and 4 test examples: a drawn square (uint8 tensor), a photo crop (PNG bytes), a question with
    three reference answers, and two question-answer pairs."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "square": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
                    "png": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "question": tfds.features.Text(),
                    "answers": tfds.features.Sequence(tfds.features.Text()),
                    "qa": tfds.features.Sequence({"question": tfds.features.Text(), "answer": tfds.features.Text()}),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12, train=True), "test": self._generate_examples(4, train=False)}

    def _generate_examples(self, count, *, train):
        for index in range(count):
            yield index, example(index, train=train)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    TinyVqa(data_dir=path, file_format="array_record").download_and_prepare()
    return path


def squares(data_dir, **kw):
    return dict(
        kind="tfds",
        name="tiny_vqa",
        data_dir=data_dir,
        image_key="square",
        question_key="question",
        answer_key="answers",
        **kw,
    )


def photo_pairs(data_dir, **kw):
    return dict(
        kind="tfds",
        name="tiny_vqa",
        data_dir=data_dir,
        image_key="png",
        question_key="qa/question",
        answer_key="qa/answer",
        answer_choice="random",
        **kw,
    )


def by_example(source) -> dict[int, dict]:
    """Records keyed by the example number written in their question (TFDS stores examples in hashed order)."""
    out = {}
    for i in range(len(source)):
        record = source[i]
        if "messages" in record:
            text = record["messages"][0]["content"][-1]["text"]
            out[int(text.split(":")[0].split()[-1])] = record
        else:
            out[-i - 1] = record
    return out


def test_features_become_conversations(data_dir):
    source = make_source(squares(data_dir, split="test", prompt="Answer in one word."))
    assert len(source) == 4
    records = by_example(source)
    assert sorted(records) == [0, 1, 2, 3]
    user, assistant = records[2]["messages"]
    picture, text = user["content"]
    np.testing.assert_array_equal(picture["image"], example(2, train=False)["square"])
    assert text == {"type": "text", "text": "Answer in one word.\nexample 2: what colour is the square?"}
    assert assistant == {"role": "assistant", "content": "blue"}  # answer_choice="first"
    assert records[2]["id"].startswith("tiny_vqa/test:")

    # question-answer pairs drawn per example: the question and its own answer, the same draw on every read
    pairs = make_source(photo_pairs(data_dir, split="test", seed=3))
    drawn = [
        (r["messages"][0]["content"][-1]["text"].split(": ")[1], r["messages"][1]["content"])
        for r in by_example(pairs).values()
    ]
    assert set(drawn) <= {("is it a cat?", "yes"), ("how many cats?", "one")} and len(set(drawn)) == 2
    assert by_example(pairs) == by_example(make_source(photo_pairs(data_dir, split="test", seed=3)))
    assert isinstance(by_example(pairs)[0]["messages"][0]["content"][0]["image"], bytes)


def test_a_missing_feature_or_a_bad_mapping_is_an_error_naming_it(data_dir):
    with pytest.raises(ValueError, match=r"no feature 'caption' in tiny_vqa/train"):
        make_source(squares(data_dir, split="train") | {"answer_key": "caption"})
    with pytest.raises(ValueError, match="answer_choice 'best'"):
        make_source(squares(data_dir, answer_choice="best"))
    with pytest.raises(ValueError, match="question_key, a prompt, or both"):
        make_source(squares(data_dir) | {"question_key": ""})


PROCESSOR = Processor(
    byte_tokenizer(),
    load_chat_template(None),
    config=VisionProcessingConfig(image_min_pixels=32 * 32, image_max_pixels=64 * 64),
)
CONFIG = preset("tiny")


def data(sources, **kw):
    return DataConfig(
        sources=tuple(sources),
        **{
            "seq_len": 256,
            "max_patches": 128,
            "batch_size": 1,
            "packing_bins": 1,
            "shuffle": False,
            "num_epochs": 1,
            **kw,
        },
    )


def test_bad_records_are_named_in_errors_or_skipped_and_counted(data_dir):
    """Example 5 has corrupt PNG bytes (a photo-pairs record fails in the processor), example 8 an empty answer
    list (a squares record fails in the source)."""
    for spec, reason in (
        (photo_pairs(data_dir), r"12 bytes of image data is unreadable or corrupt"),
        (squares(data_dir), r"feature 'answers' is an empty list"),
    ):
        with pytest.raises(DataError, match=rf"example tiny_vqa/train:\d+: {reason}"):
            list(build_dataset(data([spec]), PROCESSOR, model_config=CONFIG))
        batches = list(build_dataset(data([spec], on_bad_input="skip"), PROCESSOR, model_config=CONFIG))
        assert sum(int(b.num_dropped.sum()) for b in batches) == 1
        assert sum(int(b.segment_ids.max()) for b in batches) == 11


def test_mixed_sharded_and_resumable(data_dir):
    """Mixed by weight with a built-in source; two hosts read disjoint, complete halves; a resumed iterator
    continues with identical batches."""
    spec = squares(data_dir, split="test")
    seen = []
    for shard in range(2):
        for batch in build_dataset(data([spec]), PROCESSOR, model_config=CONFIG, shard_index=shard, shard_count=2):
            ids, segments = batch.input_ids[0], batch.segment_ids[0]
            seen += [(shard, PROCESSOR.decode(ids[segments == s])) for s in range(1, segments.max() + 1)]
    questions = sorted(text.split("user\n")[1].split("?")[0] for _, text in seen)
    assert questions == [f"example {i}: what colour is the square" for i in range(4)]
    assert {shard for shard, _ in seen} == {0, 1}

    mixed = data(
        [spec | {"weight": 3.0}, {"kind": "synthetic", "size": 100, "image_size": 32, "weight": 1.0}],
        shuffle=True,
        num_epochs=None,
        seed=1,
        batch_size=2,
        packing_bins=2,
    )
    iterator = iter(build_dataset(mixed, PROCESSOR, model_config=CONFIG))
    for _ in range(2):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(2)]
    resumed = iter(build_dataset(mixed, PROCESSOR, model_config=CONFIG))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(2)]):
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def test_two_training_steps_and_an_eval_on_a_tfds_dataset(data_dir, tmp_path):
    """The default config with its optional TFDS source switched on (the others off) and an eval set on the TFDS
    test split; the corrupt example is skipped and counted."""
    config = tiny_config()
    config.steps, config.log_every, config.export_hf, config.peak_flops_per_device = 2, 1, False, 1e11
    for source in config.data.sources.values():
        source.weight = 0.0
    config.data.sources.tfds.update(photo_pairs(data_dir), weight=1.0)
    config.data.update(seq_len=128, max_patches=64, batch_size=8, on_bad_input="skip")  # 8 rows: one per device
    config.eval.update(every=2, batch_size=8)
    config.eval.sets = {"tiny_vqa": dict(num_examples=4, sources=[squares(data_dir, split="test")])}
    results = Trainer(config, str(tmp_path)).run()
    assert results["tiny_vqa/examples"] == 4 and 0 <= results["tiny_vqa/exact_match"] <= 1
    assert np.isfinite(results["tiny_vqa/token_ce"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train] == [1, 2] and all(np.isfinite(line["loss"]) for line in train)
    # 8 rows of 128 tokens hold more than the 12 examples: the corrupt one was met and skipped
    assert sum(line["dropped_examples"] for line in train) >= 1
