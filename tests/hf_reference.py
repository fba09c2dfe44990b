"""Helpers that build the transformers reference: random tiny HF Qwen3-VL checkpoints and prompts."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

from qwen3vl_jax.config import ModelConfig, to_hf

torch.set_num_threads(2)


def hf_model(config: ModelConfig, seed: int = 0, dtype=torch.float32):
    """A transformers Qwen3VLForConditionalGeneration for `config` whose weights are all perturbed away from
    their init (norm scales != 1, biases != 0), so that no parameter can be mapped wrongly unnoticed."""
    torch.manual_seed(seed)
    if config.text.is_moe:
        model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(**to_hf(config)))
    else:
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**to_hf(config)))
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p.shape[-1] if "experts" in name else p[0].numel()  # experts: (E, out, in)
                p.copy_(noise / np.sqrt(fan_in))
    return model.to(dtype)


def save_hf(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


@dataclasses.dataclass
class Prompt:
    """One sample: token ids plus the pixel rows and grids of its images and videos (HF processor layout)."""

    ids: list
    images: list = dataclasses.field(default_factory=list)  # (pixels (n, patch_dim), grid)
    videos: list = dataclasses.field(default_factory=list)


def build_prompt(config: ModelConfig, parts, *, rng: np.random.Generator) -> Prompt:
    """parts: ("text", n) | ("image", (h, w)) | ("video", (t, h, w)) with h, w in patches. Images render as
    <vs> pads <ve>; each video temporal group as <timestamp text> <vs> pads <ve>, with no outer <vs> ... <ve>
    around the video (transformers 4.57's format)."""
    c, m = config, config.vision.spatial_merge_size

    def text(n):
        return rng.integers(0, 256, n).tolist()  # byte ids: never a special token

    prompt = Prompt([])
    for kind, arg in parts:
        if kind == "text":
            prompt.ids += text(arg)
        elif kind == "image":
            h, w = arg
            prompt.ids += [c.vision_start_token_id] + [c.image_token_id] * (h * w // m**2) + [c.vision_end_token_id]
            prompt.images.append((rng.standard_normal((h * w, c.vision.patch_dim)).astype(np.float32), (1, h, w)))
        elif kind == "video":
            t, h, w = arg
            for _ in range(t):
                prompt.ids += (
                    text(6) + [c.vision_start_token_id] + [c.video_token_id] * (h * w // m**2) + [c.vision_end_token_id]
                )
            prompt.videos.append((rng.standard_normal((t * h * w, c.vision.patch_dim)).astype(np.float32), (t, h, w)))
        else:
            raise ValueError(kind)
    return prompt


def batch_inputs(config: ModelConfig, prompts: list[Prompt], pad_id: int = 0) -> dict:
    """Left-padded HF-processor-style numpy batch (input_ids, attention_mask, mm_token_type_ids, pixels)."""
    length = max(len(p.ids) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, length - len(p.ids) :] = p.ids
        mask[b, length - len(p.ids) :] = 1
    out = dict(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=(ids == config.image_token_id) * 1 + (ids == config.video_token_id) * 2,
    )
    for kind, pixel_key, grid_key in (
        ("images", "pixel_values", "image_grid_thw"),
        ("videos", "pixel_values_videos", "video_grid_thw"),
    ):
        items = [item for p in prompts for item in getattr(p, kind)]
        if items:
            out[pixel_key] = np.concatenate([x for x, _ in items])
            out[grid_key] = np.array([g for _, g in items], np.int64)
    return out


def hf_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.logits.float().numpy()
