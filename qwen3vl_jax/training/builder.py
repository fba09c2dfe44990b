"""What a training config builds before any data is read: the model config, the processor, and the jitted,
sharded train and eval steps with their state shardings on a mesh. Shared by the trainer (real devices), the TPU
compile planner (devices of a topology description) and the eval binary."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.train_state import abstract_like
from qwen3vl_jax.config import ModelConfig, preset
from qwen3vl_jax.modeling.model import abstract_params, init_params
from qwen3vl_jax.parallel.sharding import (
    DEFAULT_RULES,
    TEACHER_TOP_K,
    TRAINING_BATCH,
    batch_shardings,
    param_shardings,
)
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer, load_processor
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.optimizer import make_optimizer
from qwen3vl_jax.training.train_step import (
    Distillation,
    PreferenceTuning,
    TrainState,
    make_eval_step,
    make_preference_eval_step,
    make_train_step,
)

OBJECTIVES = ("sft", "dpo")


def model_config_from(config: ConfigDict) -> ModelConfig:
    """An HF checkpoint's config (config.model.init_from) or a preset, with config.model.overrides."""
    overrides = config.model.overrides.to_dict() if config.model.get("overrides") else {}
    if config.get("lora"):  # --config.lora.rank=16 on any train config
        overrides["lora"] = config.lora.to_dict()
    if config.model.init_from:
        return hf_io.load_config(config.model.init_from, **overrides)
    return preset(config.model.preset, **overrides)


def processor_from(config: ConfigDict) -> Processor:
    """The checkpoint's own processor when initialising from one, else the byte tokenizer with the bundled
    chat template; config.processing overrides the vision settings either way."""
    settings = config.processing.to_dict() if config.get("processing") else {}
    if config.model.init_from:
        return load_processor(config.model.init_from, **settings)
    return Processor(byte_tokenizer(), load_chat_template(None), config=VisionProcessingConfig(**settings))


def distillation_from(config: ConfigDict, student: ModelConfig) -> Distillation | None:
    """config.distill (teacher: an HF checkpoint directory, or teacher_cache: its cached top-k logits; both empty:
    no distillation) for `student`: the teacher runs in the student's compute and parameter dtypes and attention
    implementation."""
    settings = config.get("distill")
    if not settings or not (settings.teacher or settings.get("teacher_cache")):
        return None
    if not 0.0 <= settings.alpha <= 1.0 or settings.temperature <= 0:
        raise ValueError(f"distill.alpha must be in [0, 1] and distill.temperature > 0, got {settings}")
    if settings.get("teacher_cache"):
        if settings.teacher:
            raise ValueError("distill.teacher and distill.teacher_cache are both set: online or offline, choose one")
        return Distillation(
            None, alpha=settings.alpha, temperature=settings.temperature, all_text_tokens=settings.all_text_tokens
        )
    same = dict(dtype=student.dtype, param_dtype=student.param_dtype, attention_impl=student.attention_impl)
    teacher = hf_io.load_config(settings.teacher, **same)
    if teacher.text.vocab_size != student.text.vocab_size:
        raise ValueError(
            f"teacher {settings.teacher} has a vocabulary of {teacher.text.vocab_size}, the student "
            f"{student.text.vocab_size}: distillation needs the same tokenizer"
        )
    # the batch's patch features (pixels, position-embedding taps, rotary ids) are computed for the student's ViT
    geometry = ("patch_size", "temporal_patch_size", "spatial_merge_size", "num_position_embeddings", "in_channels")
    differ = [f for f in geometry if getattr(teacher.vision, f) != getattr(student.vision, f)]
    if differ:
        raise ValueError(f"teacher {settings.teacher}: its ViT differs from the student's in {differ}")
    return Distillation(
        teacher, alpha=settings.alpha, temperature=settings.temperature, all_text_tokens=settings.all_text_tokens
    )


def preference_from(config: ConfigDict) -> PreferenceTuning | None:
    """config.objective "dpo" -> config.dpo (beta, variant); "sft" (the default) -> None."""
    objective = config.get("objective", "sft")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
    return PreferenceTuning(beta=config.dpo.beta, variant=config.dpo.variant) if objective == "dpo" else None


def train_state_shardings(boxed_params: Any, optimizer, mesh: Mesh, *, rules=DEFAULT_RULES) -> TrainState:
    """The NamedShardings of a TrainState whose parameters are `boxed_params` (`abstract_params(config,
    boxed=True)`) and whose optimizer is `optimizer` (an optax GradientTransformation): parameters and optimizer
    state by their logical axes, step and RNG replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=param_shardings(boxed_params, mesh, rules=rules),
        opt_state=param_shardings(jax.eval_shape(optimizer.init, boxed_params), mesh, rules=rules),
        rng=replicated,
    )


class StepBuilder:
    """The model, optimizer, state shardings and jitted train / eval steps of a config on a mesh. Shared by the
    trainer (real devices) and the TPU compile planner (devices of a topology description)."""

    def __init__(self, config: ConfigDict, mesh: Mesh):
        self.config, self.mesh = config, mesh
        rules = config.get("sharding_rules")  # [[logical axis, mesh axis | [mesh axes] | None], ...]
        self.rules = (
            tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
            if rules
            else DEFAULT_RULES
        )
        self.model_config = model_config_from(config)
        boxed = abstract_params(self.model_config, boxed=True)
        self.optimizer, self.schedule = make_optimizer(
            config.optimizer,
            total_steps=config.steps,
            params=nn.meta.unbox(boxed),
            lora=self.model_config.lora.rank > 0,
        )
        replicated = NamedSharding(mesh, PartitionSpec())
        self.shardings = train_state_shardings(boxed, self.optimizer, mesh, rules=self.rules)
        self.distillation = distillation_from(config, self.model_config)
        self.preference = preference_from(config)
        # DPO without LoRA: the frozen reference (the step-0 weights) is the step's third argument, like a teacher
        self.needs_reference = self.preference is not None and not self.model_config.lora.rank
        step_fn = make_train_step(
            self.model_config,
            optimizer=self.optimizer,
            schedule=self.schedule,
            loss_normalization=config.loss_normalization,
            grad_accum_steps=config.grad_accum_steps,
            loss_chunk=config.loss_chunk,
            freeze=tuple(config.optimizer.freeze),
            distill=self.distillation,
            preference=self.preference,
        )
        # offline distillation: the train batches carry the teacher's top-k logits
        self.offline_distillation = self.distillation is not None and self.distillation.teacher is None
        batch = batch_shardings(mesh)
        train_batch = batch_shardings(mesh, TRAINING_BATCH + TEACHER_TOP_K) if self.offline_distillation else batch
        in_shardings = (self.shardings, train_batch)
        if self.distillation and not self.offline_distillation:  # the teacher on the same mesh, same rules
            teacher = abstract_params(self.distillation.teacher, boxed=True)
            self.teacher_shardings = param_shardings(teacher, mesh, rules=self.rules)
            in_shardings += (self.teacher_shardings,)
        elif self.needs_reference:
            in_shardings += (self.shardings.params,)
        self.train_step = jax.jit(
            step_fn, in_shardings=in_shardings, out_shardings=(self.shardings, replicated), donate_argnums=0
        )
        if self.preference is None:
            self.eval_step = jax.jit(
                make_eval_step(self.model_config, loss_chunk=config.loss_chunk),
                in_shardings=(self.shardings.params, batch),
                out_shardings=replicated,
            )
        else:  # held-out pairs: preference accuracy and reward margin against the same reference
            eval_shardings = (self.shardings.params, batch) + ((self.shardings.params,) if self.needs_reference else ())
            self.eval_step = jax.jit(
                make_preference_eval_step(self.model_config, self.preference, loss_chunk=config.loss_chunk),
                in_shardings=eval_shardings,
                out_shardings=replicated,
            )

    def teacher_params(self) -> tuple:
        """The train step's arguments after (state, batch): (the teacher's parameters,) when distilling, each
        device's shard read from the checkpoint files; (the step-0 parameters,) as DPO's frozen reference; else ()."""
        if self.needs_reference:
            return (self.initial_params(),)
        if not self.distillation or self.offline_distillation:
            return ()
        path = self.config.distill.teacher
        return (hf_io.load_params(path, self.distillation.teacher, self.teacher_shardings),)

    def initial_state(self) -> TrainState:
        """Step 0: the checkpoint's weights (config.model.init_from) or random ones (config.seed), fresh optimizer
        state, laid out on the mesh."""
        params, shardings = self.initial_params(), self.shardings
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
        state = TrainState(
            step=jnp.int32(0), params=params, opt_state=opt_state, rng=jax.random.PRNGKey(self.config.seed + 1)
        )
        return jax.device_put(state, shardings)  # laid out exactly as train_step returns it: no recompile

    def initial_params(self) -> Any:
        """The step-0 parameters (the same on every call: the checkpoint's, and random ones from config.seed)."""
        mc, shardings = self.model_config, self.shardings
        if self.config.model.init_from:
            # each device's shard read straight from the checkpoint files (no whole copy of the model on a host)
            fresh = tuple(self.config.model.get("init_fresh", ()))
            params = hf_io.load_params(self.config.model.init_from, mc, shardings.params, fresh=fresh)
            params = flatten_dict(params)
            missing = sorted(set(flatten_dict(shardings.params)) - set(params))
            if missing:  # the parts not read (init_fresh, LoRA adapters) start from random weights (config.seed)

                def init_missing(key):  # XLA drops the initialisers of every other parameter
                    flat = flatten_dict(init_params(mc, key))
                    return {"/".join(name): flat[name] for name in missing}

                flat_shardings = flatten_dict(shardings.params)
                out = {"/".join(name): flat_shardings[name] for name in missing}
                drawn = jax.jit(init_missing, out_shardings=out)(jax.random.PRNGKey(self.config.seed))
                params.update({name: drawn["/".join(name)] for name in missing})
            params = unflatten_dict(params)
        else:
            init = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)
            params = init(mc, jax.random.PRNGKey(self.config.seed))
        return params

    def abstract_teacher(self) -> tuple:
        """teacher_params()'s shapes, dtypes and shardings (compile target)."""
        if self.needs_reference:
            return (self.abstract_state().params,)
        if not self.distillation or self.offline_distillation:
            return ()
        return (abstract_like(nn.meta.unbox(abstract_params(self.distillation.teacher)), self.teacher_shardings),)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (restore and compile target)."""
        params = nn.meta.unbox(abstract_params(self.model_config))
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.optimizer.init, params),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
        return abstract_like(state, self.shardings)

    def global_batch_size(self, data: Any) -> int:
        """data.rows_per_device x devices when set (configs that scale with the slice; a row split over the
        context axis counts once for all its shards), else data.batch_size."""
        rows = data.get("rows_per_device", 0) if hasattr(data, "get") else 0
        return rows * self.mesh.devices.size // self.mesh.shape["context"] if rows else data.batch_size
