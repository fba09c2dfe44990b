"""The Qwen3-VL processor (transformers' `Qwen3VLProcessor`) with an HF-like API.

    proc = qwen3vl_jax.load_processor("path/to/hf_dir")
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=[text], images=[image, ...], videos=["clip.mp4", ...])
    # numpy: input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
    #        pixel_values_videos, video_grid_thw

Each `<|image_pad|>` becomes one pad per merged token; each `<|vision_start|><|video_pad|><|vision_end|>`
becomes, per temporal group, `<t seconds><|vision_start|>` + pads + `<|vision_end|>`: the format of
transformers 4.57, the version the released checkpoints were published for (5.x's
`Qwen3VLProcessor.replace_video_token` swaps only the `<|video_pad|>`, which keeps an extra outer
`<|vision_start|>` ... `<|vision_end|>` around the video). For training, `encode_conversation` /
`encode_document` also say which tokens are supervised.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from qwen3vl_jax.processing import chat
from qwen3vl_jax.processing import image as image_ops
from qwen3vl_jax.processing import video as video_ops
from qwen3vl_jax.processing.errors import DataError
from qwen3vl_jax.processing.tokenizer import load_tokenizer, token_id
from qwen3vl_jax.storage import read_json, write_json

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
_PLACEHOLDERS = re.compile(
    r"(?P<image><\|image_pad\|>)|(?P<video>(?:<\|vision_start\|>)?<\|video_pad\|>"
    r"(?:<\|vision_end\|>)?)"
)


@dataclasses.dataclass(frozen=True)
class VisionProcessingConfig:
    """Resize and normalisation settings (preprocessor_config.json / video_preprocessor_config.json).
    Defaults are the released Qwen3-VL checkpoints' values, not the transformers class defaults
    (`Qwen2VLImageProcessor` has patch 14 and CLIP mean/std)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # an ablation switch, not an HF setting (never saved): False leaves out the `<t seconds>` text before each
    # video frame group, so a model can tell time only from the groups' order
    video_timestamps: bool = True

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclasses.dataclass
class Encoded:
    """One tokenised example with its pixels, in the layout of the HF processor outputs."""

    input_ids: np.ndarray  # (n,) int32
    supervised: np.ndarray  # (n,) bool: the token is a training target
    pixel_values: np.ndarray  # (image patches, patch_dim) float32
    image_grid_thw: np.ndarray  # (images, 3) int64
    pixel_values_videos: np.ndarray  # (video patches, patch_dim) float32
    video_grid_thw: np.ndarray  # (videos, 3) int64


@dataclasses.dataclass
class _Visual:
    pixels: np.ndarray
    grid: tuple[int, int, int]
    timestamps: list[float] | None = dataclasses.field(default=None, kw_only=True)  # videos only


class Processor:
    def __init__(
        self, tokenizer: Tokenizer, chat_template: str, *, config: VisionProcessingConfig = VisionProcessingConfig()
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.config = config
        self.image_token_id = token_id(tokenizer, "<|image_pad|>")
        self.video_token_id = token_id(tokenizer, "<|video_pad|>")
        self.vision_start_token_id = token_id(tokenizer, "<|vision_start|>")
        self.vision_end_token_id = token_id(tokenizer, "<|vision_end|>")
        self.pad_token_id = token_id(tokenizer, "<|endoftext|>")
        self.eos_token_ids = (token_id(tokenizer, "<|im_end|>"), self.pad_token_id)

    # ---------------------------------------------------------------------------------------------- text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        return chat.render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------- media

    def process_image(self, source: Any, base_dir: str = "") -> _Visual:
        """smart_resize + bicubic resize + normalise + patchify, as `Qwen2VLImageProcessorPil`."""
        config = self.config
        img = image_ops.load_image(source, base_dir)
        limits = dict(factor=config.factor, min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels)
        h, w = image_ops.smart_resize(img.height, img.width, **limits)
        frame = image_ops.resize_and_normalize(img, height=h, width=w, mean=config.mean, std=config.std)
        pixels, grid = image_ops.patchify(frame[None], **_patching(config))
        return _Visual(pixels, grid)

    def process_video(self, source: Any, *, fps: float | None = None, base_dir: str = "") -> _Visual:
        """A video file (decoded with PyAV) or a list of frames recorded at `fps`: sample at config.fps,
        resize all frames alike and patchify (`Qwen3VLVideoProcessor`), and compute the group timestamps
        (`Qwen3VLProcessor._calculate_timestamps`)."""
        config = self.config
        sampling = dict(fps=config.fps, min_frames=config.min_frames, max_frames=config.max_frames)
        if isinstance(source, (str, os.PathLike)):
            where = f"video file {os.path.join(base_dir, os.fspath(source))}"
            frames, indices, native_fps = video_ops.decode_video(os.path.join(base_dir, os.fspath(source)), **sampling)
        else:
            where = "video frames"
            frames, indices, native_fps = video_ops.frames_as_video(source, native_fps=fps, **sampling)
        sizes = {(frame.height, frame.width) for frame in frames}
        if len(sizes) != 1:
            raise DataError(f"{where} have different sizes {sorted(sizes)}")
        ((height, width),) = sizes
        try:
            limits = dict(factor=config.factor, min_pixels=config.video_min_pixels, max_pixels=config.video_max_pixels)
            h, w = video_ops.video_smart_resize(
                height, width, num_frames=len(frames), temporal=config.temporal_patch_size, **limits
            )
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        normalize = dict(height=h, width=w, mean=config.mean, std=config.std)
        stack = np.stack([image_ops.resize_and_normalize(frame, **normalize) for frame in frames])
        pixels, grid = image_ops.patchify(stack, **_patching(config))
        timestamps = video_ops.group_timestamps(indices, native_fps=native_fps, temporal=config.temporal_patch_size)
        return _Visual(pixels, grid, timestamps=[float(t) for t in timestamps])

    # ---------------------------------------------------------------------------------------------- batches

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        *,
        video_fps: float | None = None,
        padding_side: str = "left",
    ) -> dict[str, np.ndarray]:
        """HF-style batch. Images and videos are consumed in order across the texts, one per placeholder.
        Frame lists in `videos` need `video_fps` (their recording rate)."""
        texts = [text] if isinstance(text, str) else list(text)
        image_items = [self.process_image(x) for x in images or []]
        video_items = [self.process_video(x, fps=video_fps) for x in videos or []]
        queues = dict(images=iter(image_items), videos=iter(video_items))
        ids = [self._tokenize(self._expand(t, **queues, where=f"text {i}"))[0] for i, t in enumerate(texts)]
        _check_all_used(tuple(queues.values()))
        return self._pad(ids, padding_side) | _pixel_arrays(image_items, video_items, config=self.config)

    def encode_conversation(self, messages: list[dict], base_dir: str = "") -> Encoded:
        """A full conversation for SFT: every assistant reply (through its `<|im_end|>`) is supervised.
        Media items: {"type": "image", "image": PIL | uint8 array | path} and {"type": "video", "video":
        path | [frames], "fps": recording rate of a frame list}; paths relative to `base_dir`."""
        text = self.apply_chat_template(messages)
        images, videos = self._media(message_items(messages), base_dir)
        text = self._expand(text, images=iter(images), videos=iter(videos), where="conversation", exhaustive=True)
        ids, offsets = self._tokenize(text)
        supervised = np.zeros(len(ids), bool)
        for start, end in chat.assistant_spans(text):
            supervised |= (offsets[:, 0] >= start) & (offsets[:, 0] < end)
        return Encoded(ids, supervised, **_pixel_arrays(images, videos, config=self.config))

    def encode_prompt(self, messages: list[dict], base_dir: str = "") -> Encoded:
        """A conversation up to the model's turn, for sampling an answer: the chat template with the generation
        prompt (`<|im_start|>assistant\n`) appended; nothing is supervised. The same ids as `apply_chat_template(
        messages, add_generation_prompt=True)` through `__call__`."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        images, videos = self._media(message_items(messages), base_dir)
        text = self._expand(text, images=iter(images), videos=iter(videos), where="prompt", exhaustive=True)
        ids, _ = self._tokenize(text)
        return Encoded(ids, np.zeros(len(ids), bool), **_pixel_arrays(images, videos, config=self.config))

    def encode_document(self, items: list[dict], base_dir: str = "") -> Encoded:
        """An interleaved document for pre-training: text items verbatim, media as placeholders, ended by
        `<|endoftext|>`; every token except the image/video pads is supervised."""
        parts = []
        for item in items:
            kind = media_kind(item)
            parts.append(
                IMAGE_PLACEHOLDER
                if kind == "image"
                else VIDEO_PLACEHOLDER
                if kind == "video"
                else str(item.get("text", ""))
            )
        images, videos = self._media(items, base_dir)
        queues = dict(images=iter(images), videos=iter(videos))
        text = self._expand("".join(parts) + "<|endoftext|>", **queues, where="document", exhaustive=True)
        ids, _ = self._tokenize(text)
        supervised = (ids != self.image_token_id) & (ids != self.video_token_id)
        return Encoded(ids, supervised, **_pixel_arrays(images, videos, config=self.config))

    # ---------------------------------------------------------------------------------------------- helpers

    def _media(self, items: list[dict], base_dir: str) -> tuple[list[_Visual], list[_Visual]]:
        images, videos = [], []
        for item in items:
            kind = media_kind(item)
            if kind is not None and item.get(kind) is None:
                raise DataError(f"a {kind} item has no {kind!r} field: {item}")
            if kind == "image":
                images.append(self.process_image(item["image"], base_dir))
            elif kind == "video":
                videos.append(self.process_video(item["video"], fps=item.get("fps"), base_dir=base_dir))
        return images, videos

    def _expand(self, text: str, *, images, videos, where: str, exhaustive: bool = False) -> str:
        merge = self.config.merge_size**2

        def replace(match):
            if match.group("image"):
                item = next(images, None)
                if item is None:
                    raise DataError(f"{where}: more image placeholders than images")
                return "<|image_pad|>" * (int(np.prod(item.grid)) // merge)
            item = next(videos, None)
            if item is None:
                raise DataError(f"{where}: more video placeholders than videos")
            _, h, w = item.grid
            return "".join(
                (f"<{t:.1f} seconds>" if self.config.video_timestamps else "")
                + "<|vision_start|>"
                + "<|video_pad|>" * (h * w // merge)
                + "<|vision_end|>"
                for t in item.timestamps
            )

        expanded = _PLACEHOLDERS.sub(replace, text)
        if exhaustive:
            _check_all_used((images, videos), where)
        return expanded

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(encoding.ids, np.int32), np.asarray(encoding.offsets, np.int64).reshape(-1, 2)

    def _pad(self, ids: list[np.ndarray], side: str) -> dict[str, np.ndarray]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        length = max(len(x) for x in ids)
        input_ids = np.full((len(ids), length), self.pad_token_id, np.int64)
        mask = np.zeros((len(ids), length), np.int64)
        for b, x in enumerate(ids):
            window = slice(length - len(x), length) if side == "left" else slice(0, len(x))
            input_ids[b, window], mask[b, window] = x, 1
        types = (input_ids == self.image_token_id) * 1 + (input_ids == self.video_token_id) * 2
        return dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types * mask)

    def save_pretrained(self, path: str) -> None:
        """tokenizer.json, chat_template.jinja and the two preprocessor configs, as HF checkpoints hold them."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(self.chat_template)
        c = self.config
        common = dict(
            patch_size=c.patch_size,
            temporal_patch_size=c.temporal_patch_size,
            merge_size=c.merge_size,
            image_mean=list(c.mean),
            image_std=list(c.std),
        )
        write_json(
            os.path.join(path, "preprocessor_config.json"),
            dict(
                common,
                size=dict(shortest_edge=c.image_min_pixels, longest_edge=c.image_max_pixels),
                image_processor_type="Qwen2VLImageProcessorFast",
                processor_class="Qwen3VLProcessor",
            ),
        )
        write_json(
            os.path.join(path, "video_preprocessor_config.json"),
            dict(
                common,
                size=dict(shortest_edge=c.video_min_pixels, longest_edge=c.video_max_pixels),
                fps=c.fps,
                min_frames=c.min_frames,
                max_frames=c.max_frames,
                video_processor_type="Qwen3VLVideoProcessor",
                processor_class="Qwen3VLProcessor",
            ),
        )


def load_processor(path: str, **overrides: Any) -> Processor:
    """The processor of an HF checkpoint dir: tokenizer.json, the chat template (chat_template.jinja /
    .json / tokenizer_config.json, else the bundled Qwen3-VL one) and the preprocessor configs (released
    defaults for what they omit). `overrides` are VisionProcessingConfig fields."""
    config = dataclasses.replace(read_vision_config(path), **overrides)
    return Processor(load_tokenizer(path), chat.load_chat_template(path), config=config)


def read_vision_config(path: str) -> VisionProcessingConfig:
    fields = {}
    for name, prefix in (("preprocessor_config.json", "image"), ("video_preprocessor_config.json", "video")):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        hf = read_json(file)
        size = hf.get("size") or {}
        fields[f"{prefix}_min_pixels"] = size.get("shortest_edge", hf.get("min_pixels"))
        fields[f"{prefix}_max_pixels"] = size.get("longest_edge", hf.get("max_pixels"))
        for key in ("patch_size", "temporal_patch_size", "merge_size", "fps", "min_frames", "max_frames"):
            fields[key] = hf.get(key)
        fields["mean"], fields["std"] = hf.get("image_mean"), hf.get("image_std")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if v is not None}
    return VisionProcessingConfig(**fields)


def message_items(messages: list[dict]) -> list[dict]:
    """The content items of a conversation, in order (a message whose content is a string has none)."""
    return [item for m in messages if isinstance(m.get("content"), list) for item in m["content"]]


def media_kind(item: dict) -> str | None:
    """ "image", "video" or None (text) for a content item."""
    if item.get("type") == "image" or "image" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    return None


def _check_all_used(queues, where: str = "batch") -> None:
    for queue, name in zip(queues, ("image", "video")):
        if next(queue, None) is not None:
            raise DataError(f"{where}: more {name}s than {name} placeholders in the text")


def _patching(config: VisionProcessingConfig) -> dict:
    """The `image.patchify` settings of `config`."""
    return dict(patch=config.patch_size, merge=config.merge_size, temporal=config.temporal_patch_size)


def _pixel_arrays(images: list[_Visual], videos: list[_Visual], *, config: VisionProcessingConfig) -> dict:
    dim = 3 * config.temporal_patch_size * config.patch_size**2

    def stack(items):
        pixels = np.concatenate([x.pixels for x in items]) if items else np.zeros((0, dim), np.float32)
        return pixels, np.array([x.grid for x in items], np.int64).reshape(-1, 3)

    (pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw) = stack(images), stack(videos)
    return dict(
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
    )
