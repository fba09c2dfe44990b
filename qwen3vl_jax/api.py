"""A small HF-like API over the pure functions: load, call with processor outputs, save.

    model = qwen3vl_jax.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...,
                   pixel_values_videos=..., video_grid_thw=...)      # numpy (B, L, vocab)
    model.save_pretrained("path/to/out_dir")

Inputs are padded to power-of-two buckets (or to `seq_len` / `max_patches`), so calls with different image
sizes reuse one compiled function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.storage import write_json
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inference.generation import eos_array, generate
from qwen3vl_jax.inference.sampling import SamplingConfig
from qwen3vl_jax.inputs.model_inputs import (
    PATCH_FIELDS,
    ModelInputs,
    bucket,
    empty_inputs,
    from_hf_batch,
    patch_features,
)
from qwen3vl_jax.inputs.positions import IMAGE, visual_blocks
from qwen3vl_jax.modeling.model import Qwen3VL, init_params
from qwen3vl_jax.modeling.moe import load_balancing_loss


class Qwen3VLModel:
    """A config, its parameters and jitted entry points."""

    def __init__(self, config: ModelConfig, params: Any, generation_config: dict | None = None):
        self.config = config
        self.params = params
        self.generation_config = generation_config or {}  # eos_token_id / pad_token_id, as in HF's file
        self.module = Qwen3VL(config)
        self.forward = jax.jit(lambda p, x: self.module.apply({"params": p}, x))
        self.vision_forward = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=Qwen3VL.encode_vision))
        self.aux_loss = jax.jit(
            lambda p, x: load_balancing_loss(
                self.module.apply({"params": p}, x, method=Qwen3VL.logits_and_router_logits)[1],
                x.segment_ids.reshape(-1) > 0,
                config.text.num_experts_per_tok,
            )
        )

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> Qwen3VLModel:
        """A randomly initialised model."""
        return cls(config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed)))

    def prepare(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        *,
        seq_len: int | None = None,
        max_patches: int | None = None,
    ) -> tuple[ModelInputs, np.ndarray]:
        """Static-shape ModelInputs and rope_deltas (B, 1) from HF processor outputs. `mm_token_type_ids` is
        accepted and not needed: token types follow from the image / video token ids."""
        return from_hf_batch(
            self.config,
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            seq_len=seq_len,
            max_patches=max_patches,
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        *,
        seq_len: int | None = None,
        max_patches: int | None = None,
    ) -> np.ndarray:
        """Logits (B, L, vocab) as float32 numpy for HF processor outputs (numpy or torch tensors)."""
        inputs, _ = self.prepare(
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            seq_len=seq_len,
            max_patches=max_patches,
        )
        logits = self.forward(self.params, inputs)
        return np.asarray(logits[:, : np.shape(input_ids)[1]], np.float32)

    def router_aux_loss(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
    ) -> float:
        """The MoE load-balancing loss of these inputs over their real tokens, as transformers' `aux_loss`."""
        if not self.config.text.is_moe:
            raise ValueError("router_aux_loss needs an MoE model")
        inputs, _ = self.prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        return float(self.aux_loss(self.params, inputs))

    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_ids: Sequence[int] | int | None = "default",
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """New token ids (B, max_new_tokens) as numpy for HF processor outputs (left padding, as transformers
        generates). A row ends at its first eos token (kept) and is `pad_token_id` after it. eos / pad default
        to the checkpoint's generation_config.json (no eos: always max_new_tokens)."""
        inputs, _ = self.prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        eos = self.generation_config.get("eos_token_id") if eos_token_ids == "default" else eos_token_ids
        pad = self.generation_config.get("pad_token_id", 0) if pad_token_id is None else pad_token_id
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        tokens = generate(
            self.params,
            inputs,
            jax.random.PRNGKey(seed),
            eos_array(eos),
            jnp.int32(pad or 0),
            config=self.config,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
        return np.asarray(tokens)

    def encode_vision(self, pixel_values, grid_thw, *, max_patches: int | None = None):
        """The ViT alone, like transformers' `model.visual(pixel_values, grid_thw)`: merged visual tokens
        (N / m^2, out_hidden) and the list of DeepStack features of the same shape, float32 numpy."""
        c = self.config.vision
        blocks, _ = visual_blocks(grid_thw, None, c.spatial_merge_size)
        n = sum(b.num_patches for b in blocks)
        pixels = np.asarray(pixel_values, np.float32)
        if pixels.shape != (n, c.patch_dim):
            raise ValueError(f"pixel_values shape {pixels.shape} != ({n}, {c.patch_dim}) implied by grid_thw")
        max_patches = max_patches or bucket(n, 256)
        if n > max_patches:
            raise ValueError(f"grid_thw describes {n} patches, more than max_patches = {max_patches}")
        features = patch_features(blocks, {IMAGE: pixels}, c)
        fields = empty_inputs(1, 1, max_patches, c.patch_dim)
        for name in PATCH_FIELDS:
            fields[name][0, :n] = features[name]
        fields["patch_segment_ids"][0, :n] = features["patch_group"]
        merged, deepstack = self.vision_forward(self.params, ModelInputs(**fields))
        tokens = n // c.spatial_merge_size**2

        def as_numpy(x):
            return np.asarray(x[0, :tokens], np.float32)

        return as_numpy(merged), [as_numpy(x) for x in deepstack]

    def save_pretrained(
        self, path: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, expert_layout: str = "hub"
    ):
        """Writes an HF checkpoint directory that transformers loads (`dtype` defaults to param_dtype; MoE
        experts in the released "hub" layout or the "transposed" one of transformers 5.x)."""
        hf_io.save_params(
            path,
            jax.device_get(self.params),
            self.config,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            expert_layout=expert_layout,
        )
        if self.generation_config:
            write_json(os.path.join(path, hf_io.GENERATION_CONFIG), self.generation_config)


def load_pretrained(
    path: str, dtype: str | None = None, param_dtype: str | None = None, **overrides: Any
) -> Qwen3VLModel:
    """Loads an HF Qwen3-VL checkpoint directory. `dtype` (compute) and `param_dtype` (storage) default to
    the checkpoint's dtype; other ModelConfig fields (e.g. mrope_layout) may be overridden."""
    config = hf_io.load_config(path, **overrides)
    dtype = dtype or config.dtype
    config = config.replace(dtype=dtype, param_dtype=param_dtype or dtype)
    return Qwen3VLModel(config, jax.device_put(hf_io.load_params(path, config)), hf_io.load_generation_config(path))
