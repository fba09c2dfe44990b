"""The processor against transformers' image processor, transformers' video sampling formulas worked by hand on a
real camera clip and on clips encoded here, and the real Qwen3 tokenizer applied to the rendered chat template."""

import os
import re

import numpy as np
import pytest
from helpers import CAMERA_CLIP, IMAGES, frame_level, image, write_qwen_tokenizer_dir, write_video
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import qwen3vl_jax
from qwen3vl_jax.processing import DataError, Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.processing.image import smart_resize
from qwen3vl_jax.processing.video import decode_video


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A checkpoint-like dir with the real Qwen3 tokenizer and the Qwen3-VL chat template (no preprocessor
    configs: the released defaults apply)."""
    return write_qwen_tokenizer_dir(str(tmp_path_factory.mktemp("qwen")))


@pytest.fixture(scope="module")
def proc(qwen_dir):
    return qwen3vl_jax.load_processor(qwen_dir)


def test_image_pixels_and_grids_equal_transformers(proc):
    """Same PIL bicubic resize and float math as transformers' PIL image processor: exact (tolerance 0). (The
    torchvision 'Fast' processor resizes with antialiasing and differs by a few 1e-2.)"""
    hf = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )
    for name in IMAGES:
        picture = Image.open(image(name))
        ref = hf(picture, return_tensors="np")
        ours = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[picture])
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=name)
        np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"], err_msg=name)


LIMITS = dict(factor=32, min_pixels=65536, max_pixels=16777216)  # the released image processor's


def test_smart_resize_limits_and_errors():
    assert smart_resize(300, 451, **LIMITS) == (288, 448)
    assert smart_resize(10, 10, **LIMITS) == (256, 256)  # scaled up to min_pixels
    assert smart_resize(8000, 8000, **LIMITS) == (4096, 4096)  # scaled down to max_pixels
    with pytest.raises(DataError, match="aspect ratio"):
        smart_resize(10, 2010, **LIMITS)
    with pytest.raises(DataError, match="zero size"):
        smart_resize(0, 10, **LIMITS)


def test_video_sampling_grid_and_timestamps_by_hand(proc):
    """The real camera clip: 250 frames at 25 fps. transformers' `Qwen3VLVideoProcessor.sample_frames`: n =
    int(250 / 25 * 2) = 20 frames at round(linspace(0, 249, 20)); its video smart_resize of 272x640 with 20
    frames: round(8.5) = 8 (banker's) -> 256, 640 -> grid (10, 16, 40). Timestamps
    (`Qwen3VLProcessor._calculate_timestamps`): mean time of each pair, e.g. (0 + 13) / 2 / 25 = 0.26."""
    indices = [0, 13, 26, 39, 52, 66, 79, 92, 105, 118, 131, 144, 157, 170, 183, 197, 210, 223, 236, 249]
    video = proc.process_video(CAMERA_CLIP)
    assert video.grid == (10, 16, 40)
    np.testing.assert_allclose(video.timestamps, [(indices[2 * k] + indices[2 * k + 1]) / 2 / 25 for k in range(10)])
    assert [f"{t:.1f}" for t in video.timestamps[:3]] == ["0.3", "1.3", "2.4"]


# Clips encoded here (frame i is grey level frame_level(i)): (frames, recorded fps, height, width) -> the sampled
# indices, grid and group timestamps worked by hand with the formulas above (numpy rounds halves to even).
ENCODED_CLIPS = {
    # n = int(15 / 6 * 2) = 5: odd, so the last sampled frame is repeated; round(linspace(0, 14, 5)) = 0 3.5 7 10.5 14
    "odd_sampled_count": ((15, 6, 64, 96), [0, 4, 7, 10, 14], (3, 4, 6), [(0 + 4) / 12, (7 + 10) / 12, 14 / 6]),
    # 2 / 7 frames per recorded frame: n = int(30 / 7 * 2) = 8, round(linspace(0, 29, 8)) = 0 4.14 8.29 12.43 ...
    "fps_not_dividing": (
        (30, 7, 64, 64),
        [0, 4, 8, 12, 17, 21, 25, 29],
        (4, 4, 4),
        [4 / 14, 20 / 14, 38 / 14, 54 / 14],
    ),
    # fewer frames than min_frames = 4: all 3 are taken, then padded to 2 temporal groups
    "three_frames": ((3, 30, 64, 64), [0, 1, 2], (2, 4, 4), [1 / 60, 2 / 30]),
    # 720x1280 with n = int(20 / 4 * 2) = 10 frames: 720 / 32 = 22.5 rounds to 22 (banker's) -> 704
    # round(linspace(0, 19, 10)) = 0 2.11 4.22 6.33 8.44 10.56 12.67 14.78 16.89 19
    "bankers_rounding": ((20, 4, 720, 1280), [0, 2, 4, 6, 8, 11, 13, 15, 17, 19], (5, 44, 80), None),
}


@pytest.mark.parametrize("case", ENCODED_CLIPS)
def test_encoded_clips_sample_the_right_frames(proc, tmp_path, case):
    (num_frames, fps, height, width), indices, grid, timestamps = ENCODED_CLIPS[case]
    path = write_video(str(tmp_path / f"{case}.mp4"), num_frames=num_frames, fps=fps, height=height, width=width)
    frames, sampled, native_fps = decode_video(path, fps=2.0, min_frames=4, max_frames=768)
    assert sampled.tolist() == indices and native_fps == fps
    # the decoded frames are the sampled ones (the moving square aside, each frame is one grey level)
    assert [int(np.median(np.asarray(f))) for f in frames] == pytest.approx([frame_level(i) for i in indices], abs=3)
    video = proc.process_video(path)
    assert video.grid == grid
    if timestamps is not None:
        np.testing.assert_allclose(video.timestamps, timestamps)


def test_a_clip_shorter_than_one_temporal_group_is_an_error_naming_it(proc, tmp_path):
    path = write_video(str(tmp_path / "one_frame.mp4"), num_frames=1, fps=25, height=64, width=64)
    with pytest.raises(DataError, match=r"one_frame\.mp4: a video needs at least 2 frames, got 1"):
        proc.process_video(path)


def test_odd_frame_count_is_padded_with_the_last_frame():
    """5 frames recorded at 2 fps: n = int(5 / 2 * 2) = 5 (odd) -> the last frame is repeated; timestamps of
    indices [0, 1, 2, 3, 4, 4] at 2 fps are [0.25, 1.25, 2.0]."""
    proc = Processor(byte_tokenizer(), load_chat_template(None), config=VisionProcessingConfig(video_min_pixels=0))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(5)]
    video = proc.process_video(frames, fps=2.0)
    assert video.grid == (3, 4, 6)
    np.testing.assert_allclose(video.timestamps, [0.25, 1.25, 2.0])
    last_group = video.pixels[-24:].reshape(24, 3, 2, 16 * 16)
    np.testing.assert_array_equal(last_group[:, :, 0], last_group[:, :, 1])


def test_video_patchify_equals_the_image_path_per_frame():
    """A 2-frame video's rows hold frame 0 in temporal slot 0 and frame 1 in slot 1, each laid out exactly as
    the image path lays out that frame."""
    config = VisionProcessingConfig(image_min_pixels=0, video_min_pixels=0, video_max_pixels=2 * 64 * 96)
    proc = Processor(byte_tokenizer(), load_chat_template(None), config=config)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2)]
    video = proc.process_video(frames, fps=1.0)
    assert video.grid == (1, 4, 6)
    rows = video.pixels.reshape(24, 3, 2, 256)
    for slot, frame in enumerate(frames):
        alone = proc.process_image(frame).pixels.reshape(24, 3, 2, 256)
        np.testing.assert_array_equal(rows[:, :, slot], alone[:, :, 0])


def test_timestamp_tokens(proc):
    assert proc.tokenizer.encode("<0.3 seconds>", add_special_tokens=False).ids == [27, 15, 13, 18, 6486, 29]


def test_input_ids_equal_qwen_tokenizer_on_rendered_template(proc, qwen_dir):
    """Reference: transformers renders the chat template; pads are expanded by hand (image: t*h*w/4 pads;
    video: per temporal group `<t seconds><vs>` + h*w/4 pads + `<ve>`, the format of transformers 4.57's
    `Qwen3VLProcessor.__call__`); the Qwen3 tokenizer
    (tokenizers library) tokenises the result."""
    picture = Image.open(image("chelsea.png"))
    video = CAMERA_CLIP
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What animal?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "And here?"}]},
    ]
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(qwen_dir, "tokenizer.json"))
    template = load_chat_template(qwen_dir)
    text = hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert proc.apply_chat_template(messages, add_generation_prompt=True) == text

    # chelsea.png 451x300 -> 448x288 -> grid (1, 18, 28) -> 126 tokens; bikes.mp4 -> grid (10, 16, 40)
    indices = [0, 13, 26, 39, 52, 66, 79, 92, 105, 118, 131, 144, 157, 170, 183, 197, 210, 223, 236, 249]
    frames = "".join(
        f"<{(indices[2 * k] + indices[2 * k + 1]) / 2 / 25:.1f} seconds><|vision_start|>"
        + "<|video_pad|>" * 160
        + "<|vision_end|>"
        for k in range(10)
    )
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 126).replace(
        "<|vision_start|><|video_pad|><|vision_end|>", frames
    )
    expected = Tokenizer.from_file(os.path.join(qwen_dir, "tokenizer.json")).encode(expanded).ids

    batch = proc(text=[text], images=[picture], videos=[video])
    assert batch["input_ids"][0].tolist() == expected
    assert batch["image_grid_thw"].tolist() == [[1, 18, 28]] and batch["video_grid_thw"].tolist() == [[10, 16, 40]]
    assert batch["pixel_values_videos"].shape == (10 * 16 * 40, 1536)
    np.testing.assert_array_equal(
        batch["mm_token_type_ids"][0], (np.array(expected) == 151655) * 1 + (np.array(expected) == 151656) * 2
    )


def test_only_assistant_replies_are_supervised(proc):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": image("coffee.jpg")}, {"type": "text", "text": "What is this?"}],
        },
        {"role": "assistant", "content": "Coffee."},
        {"role": "user", "content": "Hot or cold?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hot."}]},
    ]
    encoded = proc.encode_conversation(messages)
    supervised = encoded.input_ids[encoded.supervised]
    assert proc.decode(supervised, skip_special_tokens=False) == "Coffee.<|im_end|>Hot.<|im_end|>"
    # everything before the first reply is context, as is the second user turn
    text = proc.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.count("<|image_pad|>") == 24 * 38 // 4
    assert encoded.image_grid_thw.tolist() == [[1, 24, 38]]


def test_a_prompt_encodes_as_the_batch_call_of_its_generation_prompt(proc):
    """encode_prompt (what rollouts sample from) = __call__ on apply_chat_template(add_generation_prompt=True):
    the same ids and pixels; nothing supervised."""
    coffee = image("coffee.jpg")
    messages = [{"role": "user", "content": [{"type": "image", "image": coffee}, {"type": "text", "text": "What?"}]}]
    encoded = proc.encode_prompt(messages)
    batch = proc(text=proc.apply_chat_template(messages, add_generation_prompt=True), images=[coffee])
    np.testing.assert_array_equal(encoded.input_ids, batch["input_ids"][0])
    np.testing.assert_array_equal(encoded.pixel_values, batch["pixel_values"])
    np.testing.assert_array_equal(encoded.image_grid_thw, batch["image_grid_thw"])
    assert not encoded.supervised.any()
    assert proc.decode(encoded.input_ids[-3:], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_document_supervises_all_text(proc):
    encoded = proc.encode_document(
        [
            {"type": "text", "text": "A photo: "},
            {"type": "image", "image": image("astronaut.jpg")},
            {"type": "text", "text": " The end."},
        ]
    )
    pads = encoded.input_ids == 151655
    assert pads.sum() == 32 * 32 // 4
    np.testing.assert_array_equal(encoded.supervised, ~pads)
    assert encoded.input_ids[-1] == 151643  # <|endoftext|>


def test_batch_left_padding(proc):
    batch = proc(text=["Hi", "A longer text here"])
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0].tolist()[-1] == 1 and batch["attention_mask"][0, 0] == 0
    assert batch["input_ids"][0, 0] == 151643
    right = proc(text=["Hi", "A longer text here"], padding_side="right")
    assert right["attention_mask"][0, 0] == 1


def test_save_and_load_processor(proc, tmp_path):
    custom = Processor(
        proc.tokenizer, proc.chat_template, config=VisionProcessingConfig(image_min_pixels=1024, fps=1.0)
    )
    custom.save_pretrained(str(tmp_path))
    loaded = qwen3vl_jax.load_processor(str(tmp_path))
    assert loaded.config == custom.config and loaded.chat_template == custom.chat_template
    assert loaded.tokenizer.encode("hello <|im_start|>").ids == proc.tokenizer.encode("hello <|im_start|>").ids


def test_placeholder_and_media_counts_must_match(proc):
    coffee = image("coffee.jpg")
    with pytest.raises(DataError, match="more image placeholders than images"):
        proc(text=["<|vision_start|><|image_pad|><|vision_end|> twice <|image_pad|>"], images=[coffee])
    with pytest.raises(DataError, match="more images than image placeholders"):
        proc(text=["no placeholder"], images=[coffee])
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": coffee}, {"type": "text", "text": "and a stray <|image_pad|>"}],
        }
    ]
    with pytest.raises(DataError, match="more image placeholders than images"):
        proc.encode_conversation(messages)


def test_video_timestamps_switch_leaves_out_only_the_time_text():
    """video_timestamps=False (an ablation switch): the same tokens without each group's `<t seconds>`."""
    from qwen3vl_jax.data.synthetic import make_record

    record = make_record("video_timestamp", 2, num_frames=8)
    messages = record["messages"][:1]
    (item,) = [c for c in messages[0]["content"] if c["type"] == "video"]
    texts = {}
    for on in (True, False):
        config = VisionProcessingConfig(video_min_pixels=0, video_max_pixels=8 * 64 * 64, video_timestamps=on)
        proc = Processor(byte_tokenizer(), load_chat_template(None), config=config)
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        batch = proc(text=[text], videos=[item["video"]], video_fps=item["fps"])
        texts[on] = proc.decode(batch["input_ids"][0], skip_special_tokens=False)
    groups = re.findall(r"<(\d+\.\d) seconds>", texts[True])
    assert groups == ["0.2", "1.2", "2.2", "3.2"]  # 8 frames at 2 fps in pairs
    assert "seconds>" not in texts[False] and texts[False].count("<|vision_start|>") == 4
    assert re.sub(r"<\d+\.\d seconds>", "", texts[True]) == texts[False]
