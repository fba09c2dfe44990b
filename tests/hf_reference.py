"""Helpers that build the transformers reference: random tiny HF Qwen3-VL checkpoints and prompts."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import transformers

from qwen3vl_jax.config import ModelConfig, to_hf

torch.set_num_threads(2)

# model_type -> (the transformers model class, its config class)
HF_CLASSES = {
    "qwen3_vl": (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig),
    "qwen3_vl_moe": (transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig),
    "qwen3_5": (transformers.Qwen3_5ForConditionalGeneration, transformers.Qwen3_5Config),
    "qwen3_5_moe": (transformers.Qwen3_5MoeForConditionalGeneration, transformers.Qwen3_5MoeConfig),
}


def hf_model(config: ModelConfig, seed: int = 0, dtype=torch.float32):
    """A transformers model of `config`'s model_type (Qwen3-VL or Qwen3.5, dense or MoE) whose weights are all
    perturbed away from their init (norm scales != 1, biases != 0), so that no parameter can be mapped wrongly
    unnoticed."""
    torch.manual_seed(seed)
    model_class, config_class = HF_CLASSES[config.model_type]
    model = model_class(config_class(**to_hf(config))).eval()
    generator = torch.Generator().manual_seed(seed)
    # Qwen3.5's zero-centred RMSNorms scale by 1 + w: their weights are perturbed around 0 (a scale near 1, as in
    # the other norms; around 1 each norm would double the activations)
    zero_centred = {
        name
        for name, module in model.named_modules()
        if type(module).__name__ in ("Qwen3_5RMSNorm", "Qwen3_5MoeRMSNorm")
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.removesuffix(".weight") in zero_centred:
                p.copy_(0.2 * noise)
            elif name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p.shape[-1] if "experts" in name else p[0].numel()  # experts: (E, out, in)
                p.copy_(noise / np.sqrt(fan_in))
    return model.to(dtype)


def float64_copy(model):
    """A float64 copy of a transformers model: the exact reference where float32 itself strays (the chunked gated
    delta rule). MoE experts run in the eager loop (torch's grouped matmul has no float64)."""
    exact = copy.deepcopy(model).double()
    for module in exact.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
    return exact


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
    """The model's logits for numpy inputs as float32 numpy; a float64 model (`float64_copy`) gets its pixels in
    float64 and gives float64 logits."""
    exact = next(model.parameters()).dtype == torch.float64
    tensors = {
        k: torch.from_numpy(v.astype(np.float64) if exact and v.dtype.kind == "f" else v) for k, v in inputs.items()
    }
    with torch.no_grad():
        out = model(**tensors)
    return out.logits.numpy() if exact else out.logits.float().numpy()
