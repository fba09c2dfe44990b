"""Packing isolates examples; the grain pipeline resumes exactly, shards per host, and handles bad inputs by
policy (error naming the example, or skip and count)."""

import json
import os

import grain
import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from helpers import CAMERA_CLIP, image, random_params
from PIL import Image

from qwen3vl_jax.config import preset
from qwen3vl_jax.data.features import DROPPED, Featurizer
from qwen3vl_jax.data.packing import finalize, pack
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.data.sources import JsonlSource, llava_to_messages, make_source
from qwen3vl_jax.data.synthetic import make_record
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling import Qwen3VL
from qwen3vl_jax.processing import DataError, Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template

CONFIG = preset("tiny")
SMALL_MEDIA = VisionProcessingConfig(
    image_min_pixels=32 * 32, image_max_pixels=96 * 96, video_min_pixels=0, video_max_pixels=8 * 64 * 64
)


@pytest.fixture(scope="module")
def processor():
    return Processor(byte_tokenizer(), load_chat_template(None), config=SMALL_MEDIA)


def featurizer(processor, seq_len=256, max_patches=512, **kw):
    return Featurizer(processor, CONFIG, seq_len=seq_len, max_patches=max_patches, **kw)


def packed_rows(features, *, seq_len, max_patches, num_bins):
    ds = (
        pack(
            grain.MapDataset.source(features).to_iter_dataset(),
            seq_len=seq_len,
            max_patches=max_patches,
            num_bins=num_bins,
        )
        .map(lambda row: finalize(row, CONFIG))
        .batch(num_bins)
    )
    return TrainingBatch.from_arrays(next(iter(ds)))


@jax.jit
def per_token_loss(params, batch):
    logits = Qwen3VL(CONFIG).apply({"params": params}, batch.inputs)
    logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
    return -jax.numpy.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]


def test_packed_examples_equal_each_example_alone(processor):
    """Attention, positions, DeepStack and the ViT are all segment-isolated: every token of every packed example
    gets the loss (and so the logits) it gets when the example is alone in its row."""
    records = [
        make_record("grounding", 0),
        make_record("video_timestamp", 1),
        make_record("shapes", 2),
        {"id": "doc", "document": [{"type": "text", "text": "plain text in between"}]},
        make_record("counting", 3),
        make_record("ocr", 4, image_size=96),
    ]
    features = [featurizer(processor)(r) for r in records]
    params = random_params(CONFIG, 0)
    packed = packed_rows(features, seq_len=256, max_patches=512, num_bins=2)
    assert (packed.segment_ids.max(axis=1) >= 2).all(), "each row must hold several examples"
    assert (np.unique(packed.patch_segment_ids[0]) > 0).sum() >= 3  # several images / video groups in a row
    packed_loss = np.asarray(per_token_loss(params, packed))
    for f in features:
        alone = packed_rows([f], seq_len=256, max_patches=512, num_bins=1)
        alone_loss = np.asarray(per_token_loss(params, alone))[0, : len(f["input_ids"])]
        matches = [
            (r, s)
            for r in range(2)
            for s in range(1, packed.segment_ids[r].max() + 1)
            if np.array_equal(packed.input_ids[r][packed.segment_ids[r] == s], f["input_ids"])
        ]
        assert len(matches) == 1
        r, s = matches[0]
        np.testing.assert_allclose(packed_loss[r][packed.segment_ids[r] == s], alone_loss, atol=2e-5, rtol=0)


def preference_records():
    """Three preference pairs about shapes images: two from a prompt with images, one from messages."""
    records = []
    for i in range(3):
        source = make_record("shapes", i)
        (image,) = [c["image"] for c in source["messages"][0]["content"] if c["type"] == "image"]
        right, wrong = source["answer"], "blue" if source["answer"] != "blue" else "red"
        if i < 2:
            records.append(
                dict(id=f"pair{i}", prompt=f"What is shape {i}?", images=[image], chosen=right, rejected=wrong)
            )
        else:
            records.append(dict(id=f"pair{i}", messages=source["messages"][:1], chosen=right, rejected=wrong))
    return records


def test_preference_pairs_pack_whole_with_isolated_halves(processor):
    """A pair is one packed example whose halves get segments 2s - 1 (chosen) and 2s (rejected), their own
    positions and their own copy of the image: each half's per-token loss in the packed row equals that of its
    conversation alone as a plain example."""
    from qwen3vl_jax.data.features import preference_conversations

    records = preference_records()
    features = [featurizer(processor)(r) for r in records]
    packed = packed_rows(features, seq_len=256, max_patches=512, num_bins=2)
    params = random_params(CONFIG, 0)
    packed_loss = np.asarray(per_token_loss(params, packed))
    found = 0
    for record in records:
        for half, messages in enumerate(preference_conversations(record)):
            plain = featurizer(processor)({"id": "plain", "messages": messages})
            alone = packed_rows([plain], seq_len=256, max_patches=512, num_bins=1)
            alone_loss = np.asarray(per_token_loss(params, alone))[0, : len(plain["input_ids"])]
            for r in range(2):
                for s in range(1, packed.segment_ids[r].max() + 1):
                    here = packed.segment_ids[r] == s
                    if np.array_equal(packed.input_ids[r][here], plain["input_ids"]):
                        assert s % 2 == (1 if half == 0 else 0)  # chosen odd, rejected even
                        np.testing.assert_array_equal(packed.loss_mask[r][here], plain["loss_mask"])
                        np.testing.assert_allclose(packed_loss[r][here], alone_loss, atol=2e-5, rtol=0)
                        found += 1
    assert found == 6


def test_a_preference_pair_that_does_not_fit_is_never_truncated(processor):
    record = preference_records()[0]
    record["chosen"] = "a long answer " * 20
    dropped = featurizer(processor, seq_len=128, overflow="drop")(record)
    assert "do not fit seq_len = 128 (one answer of a preference pair)" in dropped[DROPPED]
    with pytest.raises(DataError, match=r"pair0: .*do not fit seq_len = 128"):
        featurizer(processor, seq_len=128, overflow="truncate")(record)
    with pytest.raises(DataError, match="pair1: a preference record needs a non-empty 'rejected' answer"):
        featurizer(processor)(dict(preference_records()[1], rejected=""))
    from qwen3vl_jax.data.features import preference_conversations

    pair = preference_records()[0]  # each half fits a row alone, the two together do not
    halves = [
        len(featurizer(processor)({"id": "h", "messages": m})["input_ids"]) for m in preference_conversations(pair)
    ]
    dropped = featurizer(processor, seq_len=max(halves) + 8, overflow="drop")(pair)
    assert f"the preference pair's {sum(halves)} tokens do not fit seq_len = {max(halves) + 8}" in dropped[DROPPED]


def tiny_data(sources, **kw):
    return DataConfig(sources=tuple(sources), **{"seq_len": 192, "max_patches": 256, "batch_size": 2, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_pipeline_yields_identical_batches(processor, workers):
    config = tiny_data(
        [{"kind": "synthetic", "size": 500, "weight": 2.0}, {"kind": "digits", "split": "train", "image_size": 32}],
        workers=workers,
        seed=3,
    )
    dataset = build_dataset(config, processor, model_config=CONFIG)
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(dataset)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives serialisation
    got = [next(resumed) for _ in range(3)]
    for iterator_ in (iterator, resumed):
        getattr(iterator_, "close", lambda: None)()
    for a, b in zip(expected, got):
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def conversation(text, answer, *, media=()):
    return {
        "messages": [
            {"role": "user", "content": [*media, {"type": "text", "text": text}]},
            {"role": "assistant", "content": answer},
        ]
    }


def test_per_host_shards_are_disjoint_and_complete(processor, tmp_path):
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"document": [{"type": "text", "text": f"doc {i:02d}"}]} for i in range(12)]
    )
    seen = []
    for shard in range(2):
        config = tiny_data(
            [{"kind": "jsonl", "path": path}], shuffle=False, num_epochs=1, seq_len=16, batch_size=1, packing_bins=1
        )
        for batch in build_dataset(config, processor, model_config=CONFIG, shard_index=shard, shard_count=2):
            ids, segments = batch.input_ids[0], batch.segment_ids[0]
            seen += [(shard, processor.decode(ids[segments == s])) for s in range(1, segments.max() + 1)]
    texts = {t for _, t in seen}
    assert texts == {f"doc {i:02d}" for i in range(12)}
    assert len(seen) == 12 and {s for s, _ in seen} == {0, 1}


def test_the_last_partial_batch_of_a_finite_dataset_is_filled_with_empty_rows(processor, tmp_path):
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"document": [{"type": "text", "text": f"document {i}"}]} for i in range(5)]
    )
    config = tiny_data(
        [{"kind": "jsonl", "path": path}], shuffle=False, num_epochs=1, seq_len=16, batch_size=2, packing_bins=1
    )  # one document per row: 5 rows in batches of 2
    batches = list(build_dataset(config, processor, model_config=CONFIG))
    assert [b.input_ids.shape for b in batches] == [(2, 16)] * 3
    last = batches[-1]
    assert last.segment_ids[0].max() == 1 and not last.segment_ids[1].any()
    assert not last.loss_mask[1].any() and (last.visual_index[1] == -1).all()
    texts = [processor.decode(b.input_ids[r][b.segment_ids[r] > 0]) for b in batches for r in range(2)]
    assert texts == [f"document {i}" for i in range(5)] + [""]


def test_jsonl_conversations_llava_and_documents(processor, tmp_path):
    os.symlink(image("coffee.jpg"), tmp_path / "coffee.jpg")
    os.symlink(CAMERA_CLIP, tmp_path / "clip.mp4")
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            conversation("What is it?", "Coffee.", media=[{"type": "image", "image": "coffee.jpg"}]),
            {
                "image": "coffee.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "Coffee."},
                ],
            },
            {"document": [{"type": "text", "text": "A clip:"}, {"type": "video", "video": "clip.mp4"}]},
        ],
    )
    source = JsonlSource(path)
    assert len(source) == 3
    qwen, llava, document = (featurizer(processor, seq_len=4096, max_patches=8192)(source[i]) for i in range(3))
    np.testing.assert_array_equal(qwen["input_ids"], llava["input_ids"])  # LLaVA becomes the same conversation
    assert qwen["loss_mask"].sum() == len("Coffee.") + 1
    assert (document["patch_group"].max(), document["loss_mask"].sum() > 0) == (10, True)
    assert llava_to_messages({"image": ["a", "b"], "conversations": [{"from": "human", "value": "hi"}]})[0]["content"][
        :2
    ] == [{"type": "image", "image": "a"}, {"type": "image", "image": "b"}]


def test_array_record_source(processor, tmp_path):
    rows = [conversation(f"question {i}", f"answer {i}") for i in range(5)]
    writer = ArrayRecordWriter(str(tmp_path / "data.array_record"), "group_size:1")
    for row in rows:
        writer.write(json.dumps(row).encode())
    writer.close()
    source = make_source({"kind": "array_record", "paths": [str(tmp_path / "data.array_record")]})
    assert len(source) == 5
    assert source[3]["messages"] == rows[3]["messages"]


def test_overflow_policies(processor):
    long_text = {"id": "long", "document": [{"type": "text", "text": "x" * 300}]}
    truncated = featurizer(processor, seq_len=100)(long_text)
    assert len(truncated["input_ids"]) == 100 and truncated["targets"][-1] == ord("x")  # still predicts the next
    dropped = featurizer(processor, seq_len=100, overflow="drop")(long_text)  # even with on_bad_input="error"
    assert dropped == {DROPPED: "example long: 301 tokens do not fit seq_len = 100"}
    late_image = {
        "id": "late",
        "document": [{"type": "text", "text": "y" * 120}, {"type": "image", "image": image("coffee.jpg")}],
    }
    with pytest.raises(DataError, match=r"example late: .* visual tokens reach position"):
        featurizer(processor, seq_len=100)(late_image)


def corrupt_files(tmp_path):
    with open(image("coffee.jpg"), "rb") as photo, open(CAMERA_CLIP, "rb") as clip:
        (tmp_path / "broken.png").write_bytes(photo.read()[:300])
        (tmp_path / "broken.mp4").write_bytes(clip.read()[:5000])
    Image.new("RGB", (2500, 10)).save(tmp_path / "thin.png")


BAD_RECORDS = {
    "corrupt_image": ([{"type": "image", "image": "broken.png"}], r"broken\.png is unreadable or corrupt"),
    "corrupt_video": ([{"type": "video", "video": "broken.mp4"}], r"broken\.mp4"),
    "missing_file": ([{"type": "image", "image": "nowhere.png"}], r"nowhere\.png does not exist"),
    "zero_size_image": ([{"type": "image", "image": np.zeros((0, 8, 3), np.uint8)}], "zero size"),
    "aspect_ratio": ([{"type": "image", "image": "thin.png"}], "aspect ratio must be at most 200"),
    "too_many_visual_tokens": ([{"type": "image", "image": np.zeros((512, 512, 3), np.uint8)}], "do not fit"),
    "placeholder_mismatch": (
        [{"type": "image", "image": np.zeros((64, 64, 3), np.uint8)}, {"type": "text", "text": "stray <|image_pad|>"}],
        "more image placeholders",
    ),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_inputs_raise_naming_the_example_or_are_skipped(processor, tmp_path, case):
    corrupt_files(tmp_path)
    media, message = BAD_RECORDS[case]
    record = {**conversation("q", "a", media=media), "id": f"bad/{case}", "base_dir": str(tmp_path)}
    processor = Processor(
        processor.tokenizer,
        processor.chat_template,
        config=VisionProcessingConfig(image_min_pixels=0, image_max_pixels=512 * 512),
    )
    with pytest.raises(DataError, match=rf"example bad/{case}: .*{message}"):
        featurizer(processor, seq_len=128, max_patches=256)(record)
    skipped = featurizer(processor, seq_len=128, max_patches=256, on_bad_input="skip")(record)
    assert skipped.keys() == {DROPPED} and f"bad/{case}" in skipped[DROPPED]


def test_skipped_examples_are_counted_in_batches(processor, tmp_path):
    corrupt_files(tmp_path)
    rows = []
    for i in range(20):
        bad = i % 4 == 1
        rows.append(
            "{not json"
            if i == 6
            else conversation(
                f"q{i}", "a", media=[{"type": "image", "image": "broken.png" if bad else image("coffee.jpg")}]
            )
        )
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = tiny_data(
        [{"kind": "jsonl", "path": path}],
        shuffle=False,
        num_epochs=1,
        on_bad_input="skip",
        seq_len=512,
        max_patches=512,
        batch_size=1,
        packing_bins=1,
    )
    batches = list(build_dataset(config, processor, model_config=CONFIG))
    assert sum(int(b.num_dropped.sum()) for b in batches) == 6  # 5 broken images + 1 invalid JSON line
    assert sum(int(b.segment_ids.max()) for b in batches) == 14
    strict = DataConfig.from_dict({**config.__dict__, "on_bad_input": "error"})
    with pytest.raises(DataError, match=r"example mixed\.jsonl:2: .*broken\.png"):
        list(build_dataset(strict, processor, model_config=CONFIG))
