"""What a training config builds before any data is read: the model config, the processor, and the jitted,
sharded train and eval steps with their state shardings on a mesh. Shared by the trainer (real devices), the TPU
compile planner (devices of a topology description) and the eval binary."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.train_state import abstract_like
from qwen3vl_jax.modeling.model import abstract_params, init_params
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, batch_shardings, param_shardings
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer, load_processor
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.model_source import model_config_from
from qwen3vl_jax.training.objectives import objective_from
from qwen3vl_jax.training.optimizer import make_optimizer
from qwen3vl_jax.training.train_step import TrainState, make_train_step


def processor_from(config: ConfigDict) -> Processor:
    """The checkpoint's own processor when initialising from one, else the byte tokenizer with the bundled
    chat template; config.processing overrides the vision settings either way."""
    settings = config.processing.to_dict()
    if config.model.init_from:
        return load_processor(config.model.init_from, **settings)
    return Processor(byte_tokenizer(), load_chat_template(None), config=VisionProcessingConfig(**settings))


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
        # [[logical axis, mesh axis | [mesh axes] | None], ...] (lists once the config went through JSON)
        self.rules = tuple(
            (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules
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
        self.objective = objective_from(config, self.model_config)
        # a teacher or a reference: the train step's argument after (state, batch), on the same mesh and rules
        self.frozen_model = self.objective.frozen_model(self.model_config)
        if self.frozen_model is not None:
            self.frozen_shardings = param_shardings(
                abstract_params(self.frozen_model.config, boxed=True), mesh, rules=self.rules
            )
        frozen = (self.frozen_shardings,) if self.frozen_model is not None else ()
        step_fn = make_train_step(
            self.model_config,
            objective=self.objective,
            optimizer=self.optimizer,
            schedule=self.schedule,
            loss_normalization=config.loss_normalization,
            grad_accum_steps=config.grad_accum_steps,
            loss_chunk=config.loss_chunk,
            freeze=tuple(config.optimizer.freeze),
        )
        batch = batch_shardings(mesh)
        train_batch = batch_shardings(mesh, extra=self.objective.batch_fields)
        self.train_step = jax.jit(
            step_fn,
            in_shardings=(self.shardings, train_batch, *frozen),
            out_shardings=(self.shardings, replicated),
            donate_argnums=0,
        )
        self.eval_takes_frozen = self.objective.frozen_in_eval and self.frozen_model is not None
        self.eval_step = jax.jit(
            self.objective.make_eval_step(self.model_config, loss_chunk=config.loss_chunk),
            in_shardings=(self.shardings.params, batch, *(frozen if self.eval_takes_frozen else ())),
            out_shardings=replicated,
        )

    @functools.cached_property
    def frozen_params(self) -> tuple:
        """The train step's arguments after (state, batch): (the frozen model's parameters,) — a teacher's, each
        device's shard read from its checkpoint files, or the step-0 parameters (a reference) — or ()."""
        frozen = self.frozen_model
        if frozen is None:
            return ()
        if not frozen.checkpoint:
            return (self.initial_params(),)
        return (hf_io.load_params(frozen.checkpoint, frozen.config, self.frozen_shardings),)

    @property
    def eval_frozen_params(self) -> tuple:
        """The eval step's arguments after (params, batch)."""
        return self.frozen_params if self.eval_takes_frozen else ()

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
            fresh = tuple(self.config.model.init_fresh)
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

    def abstract_frozen_params(self) -> tuple:
        """frozen_params' shapes, dtypes and shardings (compile target)."""
        if self.frozen_model is None:
            return ()
        boxed = abstract_params(self.frozen_model.config)
        return (abstract_like(nn.meta.unbox(boxed), self.frozen_shardings),)

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
        rows = data.rows_per_device
        return rows * self.mesh.devices.size // self.mesh.shape["context"] if rows else data.batch_size
