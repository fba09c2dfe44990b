"""A small HF-like API over the pure functions: load, call with processor outputs, save.

    model = qwen3vl_jax.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...,
                   pixel_values_videos=..., video_grid_thw=...)      # numpy (B, L, vocab)
    model.save_pretrained("path/to/out_dir")
    adapted = qwen3vl_jax.load_pretrained("path/to/hf_dir", adapters="path/to/peft_lora_dir")  # base + LoRA

Inputs are padded to power-of-two buckets (or to `seq_len` / `max_patches`), so calls with different image
sizes reuse one compiled function.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.peft import adapter_lora_config, read_adapters
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.config.model import with_yarn
from qwen3vl_jax.inference.generation import check_max_new_tokens, eos_array, generate
from qwen3vl_jax.inference.sampling import SamplingConfig
from qwen3vl_jax.inputs.model_inputs import (
    PATCH_FIELDS,
    ModelInputs,
    ProcessorOutputs,
    bucket,
    empty_inputs,
    from_hf_batch,
    patch_features,
)
from qwen3vl_jax.inputs.positions import IMAGE, visual_blocks
from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params, init_params
from qwen3vl_jax.modeling.moe import load_balancing_loss
from qwen3vl_jax.parallel.context import align_patches
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, model_inputs_spec, param_shardings, project_mesh
from qwen3vl_jax.storage import write_json


def to_numpy(x: jax.Array) -> np.ndarray:
    """The whole of `x` on this host, also when its shards lie on several processes' devices (then every process
    must call this: it gathers)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Default(enum.Enum):
    """A default that is read from the checkpoint (generation_config.json)."""

    FROM_CHECKPOINT = "from the checkpoint"


class Qwen3VLModel:
    """A config, its parameters and jitted entry points. With a `mesh`, the parameters live sharded on it (as
    `param_shardings(..., rules=rules)` lays them out: FSDP and / or tensor parallel), every call runs under it
    with the batch split over the batch axes, and generation's KV cache is split by batch and key/value heads.
    The mesh may lack some of the axes data, fsdp, context, tensor, expert (they count as size 1:
    `parallel.sharding.project_mesh`)."""

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        generation_config: dict | None = None,
        mesh: Mesh | None = None,
        rules: Any = DEFAULT_RULES,
    ):
        self.config = config
        self.params = params
        self.mesh, self.rules = (None if mesh is None else project_mesh(mesh)), rules
        self.generation_config = generation_config or {}  # eos_token_id / pad_token_id, as in HF's file
        self.module = Qwen3VL(config)
        self.forward = jax.jit(lambda params, inputs: self.module.apply({"params": params}, inputs))
        self.vision_forward = jax.jit(
            lambda params, inputs: self.module.apply({"params": params}, inputs, method=Qwen3VL.encode_vision)
        )
        self.vision_hidden_forward = jax.jit(
            lambda params, inputs: self.module.apply({"params": params}, inputs, method=Qwen3VL.vision_hidden_states)
        )
        self.aux_loss = jax.jit(
            lambda params, inputs: load_balancing_loss(
                self.module.apply({"params": params}, inputs, method=Qwen3VL.logits_and_router_logits)[1],
                inputs.segment_ids.reshape(-1) > 0,
                top_k=config.text.num_experts_per_tok,
            )
        )

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> Qwen3VLModel:
        """A randomly initialised model."""
        return cls(config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed)))

    @contextlib.contextmanager
    def _on_mesh(self):
        """The mesh and logical axis rules the calls run under (nothing without a mesh)."""
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def _batch_split(self, inputs: ModelInputs) -> ModelInputs:
        """`inputs` with their batch dimension split over the mesh's batch axes and their tokens and patches over
        `context` (where they divide them: `model_inputs_spec`). On a mesh of several processes each process passes
        the same whole inputs and places the parts its devices hold."""
        if self.mesh is None:
            return inputs

        def put(name, x):
            x = np.asarray(x)
            spec = model_inputs_spec(name, x.shape, mesh=self.mesh, rules=self.rules)
            return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda index: x[index])

        return ModelInputs(**{name: put(name, value) for name, value in vars(inputs).items()})

    def prepare(
        self, input_ids, *, seq_len: int | None = None, max_patches: int | None = None, **processor_outputs
    ) -> tuple[ModelInputs, np.ndarray]:
        """Static-shape ModelInputs and rope_deltas (B, 1) from HF processor outputs (the fields of
        `ProcessorOutputs`: input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
        video_grid_thw, mm_token_type_ids). On a mesh with a `context` axis each row's patches are laid out so that
        no image or video temporal group crosses a context shard (parallel/context.align_patches)."""
        outputs = ProcessorOutputs(input_ids, **processor_outputs)
        inputs, rope_deltas = from_hf_batch(self.config, outputs, seq_len=seq_len, max_patches=max_patches)
        shards = 1 if self.mesh is None else self.mesh.shape["context"]
        if shards > 1 and inputs.patch_segment_ids.shape[1]:  # each context shard runs the ViT on its own patches
            rows = [
                align_patches({name: np.asarray(value)[b] for name, value in vars(inputs).items()}, shards=shards)
                for b in range(inputs.input_ids.shape[0])
            ]
            inputs = ModelInputs(**{name: np.stack([row[name] for row in rows]) for name in vars(inputs)})
        return inputs, rope_deltas

    def __call__(
        self, input_ids, *, seq_len: int | None = None, max_patches: int | None = None, **processor_outputs
    ) -> np.ndarray:
        """Logits (B, L, vocab) as float32 numpy for HF processor outputs (numpy or torch tensors)."""
        inputs, _ = self.prepare(input_ids, seq_len=seq_len, max_patches=max_patches, **processor_outputs)
        with self._on_mesh():
            logits = self.forward(self.params, self._batch_split(inputs))
        return to_numpy(logits[:, : np.shape(input_ids)[1]]).astype(np.float32)

    def router_aux_loss(self, input_ids, **processor_outputs) -> float:
        """The MoE load-balancing loss of these inputs over their real tokens, as transformers' `aux_loss`."""
        if not self.config.text.is_moe:
            raise ValueError("router_aux_loss needs an MoE model")
        inputs, _ = self.prepare(input_ids, **processor_outputs)
        with self._on_mesh():
            return float(to_numpy(self.aux_loss(self.params, self._batch_split(inputs))))

    def generate(
        self,
        input_ids,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_ids: Sequence[int] | int | Default | None = Default.FROM_CHECKPOINT,
        pad_token_id: int | None = None,
        return_logprobs: bool = False,
        **processor_outputs,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """New token ids (B, max_new_tokens) as numpy for HF processor outputs (left padding, as transformers
        generates); return_logprobs: and each new token's log-probability under the model (log softmax of its
        logits, before temperature and filters; float32, 0 after a row's end). A row ends at its first eos token
        (kept) and is `pad_token_id` after it. eos / pad default to the checkpoint's generation_config.json;
        eos_token_ids=None: no eos, always max_new_tokens. pad may be any 32-bit integer (one outside the
        vocabulary keeps the padding apart from tokens). A bad argument
        (max_new_tokens < 1, temperature <= 0 when sampling, top_k < 0, top_p outside (0, 1], an eos id outside
        the vocabulary) raises a ValueError naming it, before anything is compiled."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        vocab = self.config.text.vocab_size
        eos = self.generation_config.get("eos_token_id") if eos_token_ids is Default.FROM_CHECKPOINT else eos_token_ids
        eos_list = [] if eos is None else [eos] if isinstance(eos, (int, np.integer)) else list(eos)
        for token in eos_list:
            if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"eos_token_ids must be token ids in [0, {vocab}) (the vocabulary), got {eos!r}")
        pad = self.generation_config.get("pad_token_id", 0) if pad_token_id is None else pad_token_id
        pad = 0 if pad is None else pad
        int32 = np.iinfo(np.int32)
        if not isinstance(pad, (int, np.integer)) or isinstance(pad, bool) or not int32.min <= pad <= int32.max:
            raise ValueError(f"pad_token_id must be one 32-bit integer, got {pad!r}")
        inputs, _ = self.prepare(input_ids, **processor_outputs)
        with self._on_mesh():
            tokens = generate(
                self.params,
                self._batch_split(inputs),
                rng=jax.random.PRNGKey(seed),
                eos_ids=eos_array([int(token) for token in eos_list]),
                pad_id=jnp.int32(pad),
                config=self.config,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                with_logprobs=return_logprobs,
            )
        if return_logprobs:
            tokens, logprobs = tokens
            return to_numpy(tokens), to_numpy(logprobs)
        return to_numpy(tokens)

    def encode_vision(self, pixel_values, grid_thw, *, max_patches: int | None = None):
        """The ViT alone, like transformers' `model.visual(pixel_values, grid_thw)`: merged visual tokens
        (N / m^2, out_hidden) and the list of DeepStack features of the same shape, float32 numpy."""
        inputs, n = self._vision_inputs(pixel_values, grid_thw, max_patches=max_patches)
        with self._on_mesh():
            merged, deepstack = self.vision_forward(self.params, self._batch_split(inputs))
        tokens = n // self.config.vision.spatial_merge_size**2

        def as_numpy(x):
            return to_numpy(x[0, :tokens]).astype(np.float32)

        return as_numpy(merged), [as_numpy(x) for x in deepstack]

    def vision_hidden_states(self, pixel_values, grid_thw, *, max_patches: int | None = None) -> list[np.ndarray]:
        """The ViT's patch features (N, hidden) before its first block and after each of its blocks (depth + 1
        arrays, float32 numpy), in the processor's patch order (each merged token's m^2 patches consecutive):
        what layer probes read."""
        inputs, n = self._vision_inputs(pixel_values, grid_thw, max_patches=max_patches)
        with self._on_mesh():
            hidden_states = self.vision_hidden_forward(self.params, self._batch_split(inputs))
        return [to_numpy(x[0, :n]).astype(np.float32) for x in hidden_states]

    def _vision_inputs(self, pixel_values, grid_thw, *, max_patches: int | None) -> tuple[ModelInputs, int]:
        """One row of patch fields for the images / videos of grid_thw, and their number of patches."""
        vision = self.config.vision
        blocks, _ = visual_blocks(grid_thw, None, merge=vision.spatial_merge_size)
        n = sum(block.num_patches for block in blocks)
        pixels = np.asarray(pixel_values, np.float32)
        if pixels.shape != (n, vision.patch_dim):
            raise ValueError(f"pixel_values shape {pixels.shape} != ({n}, {vision.patch_dim}) implied by grid_thw")
        max_patches = max_patches or bucket(n, 256)
        if n > max_patches:
            raise ValueError(f"grid_thw describes {n} patches, more than max_patches = {max_patches}")
        features = patch_features(blocks, pixels={IMAGE: pixels}, vision=vision)
        fields = empty_inputs(1, seq_len=1, max_patches=max_patches, patch_dim=vision.patch_dim)
        for name in PATCH_FIELDS:
            fields[name][0, :n] = features[name]
        fields["patch_segment_ids"][0, :n] = features["patch_group"]
        return ModelInputs(**fields), n

    def with_adapters(self, path: str) -> Qwen3VLModel:
        """This model with the PEFT LoRA adapters of directory `path` added to its weights (rank, alpha and the
        adapted layers from the directory: `checkpoints.peft.adapter_lora_config`), on the same mesh (the
        adapters sharded like the weights they adapt). The model itself must have no adapters."""
        if self.config.lora.rank:
            raise ValueError(
                f"the model already has LoRA adapters ({self.config.lora}): merge them into its weights "
                "(checkpoints.peft.merge_lora) before adding others"
            )
        config = self.config.replace(lora=adapter_lora_config(path, self.config))
        adapters = read_adapters(path, config)
        flat = flatten_dict(self.params)
        if self.mesh is None:
            flat.update({name: jax.device_put(value) for name, value in adapters.items()})
        else:
            shardings = flatten_dict(param_shardings(abstract_params(config, boxed=True), self.mesh, rules=self.rules))
            for name, value in adapters.items():  # every process reads the same file and places its devices' part
                flat[name] = jax.make_array_from_callback(
                    value.shape, shardings[name], lambda index, value=value: value[index]
                )
        return Qwen3VLModel(
            config, unflatten_dict(flat), generation_config=self.generation_config, mesh=self.mesh, rules=self.rules
        )

    def save_pretrained(
        self, path: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, expert_layout: str = "hub"
    ):
        """Writes an HF checkpoint directory that transformers loads (`dtype` defaults to param_dtype; MoE
        experts in the released "hub" layout or the "transposed" one of transformers 5.x). On a mesh of several
        processes every process calls this and process 0 writes."""
        hf_io.save_params(
            path,
            self.params,  # gathered one tensor at a time (every process of a multi-process mesh calls this)
            config=self.config,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            expert_layout=expert_layout,
        )
        if self.generation_config and jax.process_index() == 0:
            write_json(os.path.join(path, hf_io.GENERATION_CONFIG), self.generation_config)


def load_pretrained(
    path: str,
    dtype: str | None = None,
    param_dtype: str | None = None,
    *,
    adapters: str | None = None,
    mesh: Mesh | None = None,
    rules: Any = DEFAULT_RULES,
    yarn_factor: float | None = None,
    **overrides: Any,
) -> Qwen3VLModel:
    """Loads an HF Qwen3-VL checkpoint directory (local or gs://). `dtype` (compute) and `param_dtype` (storage)
    default to the checkpoint's dtype; other ModelConfig fields (e.g. mrope_layout) may be overridden. `adapters`:
    a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as `peft` or a LoRA training
    run writes it) to add to the base (`Qwen3VLModel.with_adapters`). With a `mesh` (e.g. `make_mesh({"fsdp": 4,
    "tensor": 2})` or `jax.make_mesh((4, 2), ("fsdp", "tensor"))`: axes it lacks count as size 1) each device reads
    its shard of every parameter straight from the files and the model runs sharded (`Qwen3VLModel`); without,
    the model is on one device. `yarn_factor`: YaRN on the text MRoPE for inputs that many times longer than the
    checkpoint's max_position_embeddings (`config.model.with_yarn`)."""
    if adapters is not None and "lora" in overrides:
        raise ValueError("give either adapters= (their LoRA settings come from the adapter directory) or lora=")
    config = hf_io.load_config(path, **overrides)
    if yarn_factor is not None:
        config = with_yarn(config, factor=yarn_factor)
    dtype = dtype or config.dtype
    config = config.replace(dtype=dtype, param_dtype=param_dtype or dtype)
    generation_config = hf_io.load_generation_config(path)
    if mesh is None:
        model = Qwen3VLModel(
            config, jax.device_put(hf_io.load_params(path, config)), generation_config=generation_config
        )
    else:
        mesh = project_mesh(mesh)
        shardings = param_shardings(abstract_params(config, boxed=True), mesh, rules=rules)
        params = hf_io.load_params(path, config, shardings)
        model = Qwen3VLModel(config, params, generation_config=generation_config, mesh=mesh, rules=rules)
    return model if adapters is None else model.with_adapters(adapters)
