"""The processor against transformers' image processor, the spec's video formulas worked by hand, and the real
Qwen3 tokenizer applied to the rendered chat template."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import qwen3vl_jax
from qwen3vl_jax.processing import DataError, Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.processing.image import smart_resize

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MEDIA = os.path.join(DATA, "media")
TOKENIZER_DIR = os.path.join(DATA, "qwen3_tokenizer")
IMAGES = ["astronaut.png", "chelsea.png", "coffee.png", "page.png", "text.png", "china.jpg", "grace_hopper.jpg"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A checkpoint-like dir with the real Qwen3 tokenizer and the Qwen3-VL chat template (no preprocessor
    configs: the released defaults apply)."""
    path = tmp_path_factory.mktemp("qwen")
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path / name)
    return str(path)


@pytest.fixture(scope="module")
def proc(qwen_dir):
    return qwen3vl_jax.load_processor(qwen_dir)


def test_image_pixels_and_grids_equal_transformers(proc):
    """Same PIL bicubic resize and float math as transformers' PIL image processor: exact (tolerance 0). (The
    torchvision 'Fast' processor resizes with antialiasing and differs by a few 1e-2.)"""
    hf = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})
    for name in IMAGES:
        image = Image.open(os.path.join(MEDIA, name))
        ref = hf(image, return_tensors="np")
        ours = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=name)
        np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"], err_msg=name)


def test_smart_resize_limits_and_errors():
    assert smart_resize(300, 451, 32, 65536, 16777216) == (288, 448)
    assert smart_resize(10, 10, 32, 65536, 16777216) == (256, 256)     # scaled up to min_pixels
    assert smart_resize(8000, 8000, 32, 65536, 16777216) == (4096, 4096)  # scaled down to max_pixels
    with pytest.raises(DataError, match="aspect ratio"):
        smart_resize(10, 2010, 32, 65536, 16777216)
    with pytest.raises(DataError, match="zero size"):
        smart_resize(0, 10, 32, 65536, 16777216)


def test_video_sampling_grid_and_timestamps_by_hand(proc):
    """bikes.mp4: 250 frames at 25 fps. Spec §5.2: n = int(250 / 25 * 2) = 20 frames at
    round(linspace(0, 249, 20)); video smart_resize of 272x640 with 20 frames: round(8.5) = 8 (banker's) ->
    256, 640 -> grid (10, 16, 40). Timestamps: mean time of each pair, e.g. (0 + 13) / 2 / 25 = 0.26."""
    indices = [0, 13, 26, 39, 52, 66, 79, 92, 105, 118, 131, 144, 157, 170, 183, 197, 210, 223, 236, 249]
    video = proc.process_video(os.path.join(MEDIA, "bikes.mp4"))
    assert video.grid == (10, 16, 40)
    np.testing.assert_allclose(video.timestamps, [(indices[2 * k] + indices[2 * k + 1]) / 2 / 25 for k in range(10)])
    assert [f"{t:.1f}" for t in video.timestamps[:3]] == ["0.3", "1.3", "2.4"]
    # bigbuckbunny.mp4: 132 frames at 25 fps -> int(10.56) = 10 frames; 720x1280: round(22.5) = 22 -> 704
    assert proc.process_video(os.path.join(MEDIA, "bigbuckbunny.mp4")).grid == (5, 44, 80)


def test_odd_frame_count_is_padded_with_the_last_frame():
    """5 frames recorded at 2 fps: n = int(5 / 2 * 2) = 5 (odd) -> the last frame is repeated; timestamps of
    indices [0, 1, 2, 3, 4, 4] at 2 fps are [0.25, 1.25, 2.0]."""
    proc = Processor(byte_tokenizer(), load_chat_template(None), VisionProcessingConfig(video_min_pixels=0))
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
    proc = Processor(byte_tokenizer(), load_chat_template(None), config)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2)]
    video = proc.process_video(frames, fps=1.0)
    assert video.grid == (1, 4, 6)
    rows = video.pixels.reshape(24, 3, 2, 256)
    for slot, frame in enumerate(frames):
        image = proc.process_image(frame).pixels.reshape(24, 3, 2, 256)
        np.testing.assert_array_equal(rows[:, :, slot], image[:, :, 0])


def test_timestamp_tokens(proc):
    assert proc.tokenizer.encode("<0.3 seconds>", add_special_tokens=False).ids == [27, 15, 13, 18, 6486, 29]


def test_input_ids_equal_qwen_tokenizer_on_rendered_template(proc, qwen_dir):
    """Reference: transformers renders the chat template; pads are expanded by hand (image: t*h*w/4 pads;
    video: per temporal group `<t seconds><vs>` + h*w/4 pads + `<ve>`, spec §5.3); the Qwen3 tokenizer
    (tokenizers library) tokenises the result."""
    image = Image.open(os.path.join(MEDIA, "chelsea.png"))
    video = os.path.join(MEDIA, "bikes.mp4")
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What animal?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "And here?"}]},
    ]
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(qwen_dir, "tokenizer.json"))
    template = open(os.path.join(qwen_dir, "chat_template.jinja")).read()
    text = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
    assert proc.apply_chat_template(messages, add_generation_prompt=True) == text

    # chelsea.png 451x300 -> 448x288 -> grid (1, 18, 28) -> 126 tokens; bikes.mp4 -> grid (10, 16, 40)
    indices = [0, 13, 26, 39, 52, 66, 79, 92, 105, 118, 131, 144, 157, 170, 183, 197, 210, 223, 236, 249]
    frames = "".join(f"<{(indices[2 * k] + indices[2 * k + 1]) / 2 / 25:.1f} seconds><|vision_start|>"
                     + "<|video_pad|>" * 160 + "<|vision_end|>" for k in range(10))
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 126).replace(
        "<|vision_start|><|video_pad|><|vision_end|>", frames)
    expected = Tokenizer.from_file(os.path.join(qwen_dir, "tokenizer.json")).encode(expanded).ids

    batch = proc(text=[text], images=[image], videos=[video])
    assert batch["input_ids"][0].tolist() == expected
    assert batch["image_grid_thw"].tolist() == [[1, 18, 28]] and batch["video_grid_thw"].tolist() == [[10, 16, 40]]
    assert batch["pixel_values_videos"].shape == (10 * 16 * 40, 1536)
    np.testing.assert_array_equal(batch["mm_token_type_ids"][0], (np.array(expected) == 151655) * 1
                                  + (np.array(expected) == 151656) * 2)


def test_only_assistant_replies_are_supervised(proc):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": os.path.join(MEDIA, "coffee.png")},
                                     {"type": "text", "text": "What is this?"}]},
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


def test_document_supervises_all_text(proc):
    encoded = proc.encode_document([{"type": "text", "text": "A photo: "},
                                    {"type": "image", "image": os.path.join(MEDIA, "astronaut.png")},
                                    {"type": "text", "text": " The end."}])
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
    custom = Processor(proc.tokenizer, proc.chat_template, VisionProcessingConfig(image_min_pixels=1024, fps=1.0))
    custom.save_pretrained(str(tmp_path))
    loaded = qwen3vl_jax.load_processor(str(tmp_path))
    assert loaded.config == custom.config and loaded.chat_template == custom.chat_template
    assert loaded.tokenizer.encode("hello <|im_start|>").ids == proc.tokenizer.encode("hello <|im_start|>").ids


def test_placeholder_and_media_counts_must_match(proc):
    image = os.path.join(MEDIA, "coffee.png")
    with pytest.raises(DataError, match="more image placeholders than images"):
        proc(text=["<|vision_start|><|image_pad|><|vision_end|> twice <|image_pad|>"], images=[image])
    with pytest.raises(DataError, match="more images than image placeholders"):
        proc(text=["no placeholder"], images=[image])
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "and a stray <|image_pad|>"}]}]
    with pytest.raises(DataError, match="more image placeholders than images"):
        proc.encode_conversation(messages)
