"""The training run's config (ml_collections): every field a run reads (`experiments.train`, `eval`, `export`,
`compile`, `cache_teacher`, the ablation sweeps), with its default and its meaning. A config file starts from
`run_config()` and sets what it changes; any field can be overridden on the command line
(`--config.optimizer.lr=1e-3`). Sections that mirror a dataclass (data: DataConfig, lora: LoraConfig) take their
defaults from it.

The model (config.model): `preset` names a preset (qwen3vl_jax.config.presets), or `init_from` an HF checkpoint
whose config.json is then the model (the preset is not used). `overrides` holds every ModelConfig field (`text`
and `vision` nested), each None unless given: a config file's `model_settings(preset, **changes)` or a command
line flag (`--config.model.overrides.text.rope_theta=1e6`) gives it. Given fields apply on top of the preset or
the checkpoint; on a checkpoint each one that changes a value is logged, and one that changes its parameter
shapes stops the run naming the field and both values (qwen3vl_jax.training.model_source).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any

from ml_collections import ConfigDict, config_dict

from qwen3vl_jax.config import LoraConfig, ModelConfig, preset
from qwen3vl_jax.data.pipeline import DataConfig
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES
from qwen3vl_jax.training.model_source import SECTIONS, explicit_overrides

# DataConfig fields a run config does not set: the trainer derives them (context_shards from the mesh) or the
# config holds them in another form (sources as {name: spec})
_DERIVED_DATA_FIELDS = ("sources", "context_shards")


def run_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.log_every = 10
    c.export_hf = True  # the final model and its processor as an HF checkpoint in <workdir>/hf
    c.peak_flops_per_device = 0.0  # for MFU; 0: the chip's public figure on TPU, else a matmul rate measured here
    # the run's label, named when a workdir holds another model's checkpoints (experiments.export; experiments.train
    # names its config file instead)
    c.name = ""

    # preset / init_from (an HF checkpoint directory, "": none) / overrides: see the module docstring; init_fresh:
    # parameter path prefixes ("visual/deepstack_merger") initialised randomly instead of read from init_from (parts
    # the checkpoint lacks, e.g. DeepStack mergers added to a model trained without them)
    c.model = model_settings("tiny")
    # VisionProcessingConfig fields (pixel limits, fps) set on top of the byte tokenizer's defaults or init_from's
    # preprocessor config; a field not set here is theirs
    c.processing = ConfigDict()

    # sources: {name: source spec (qwen3vl_jax.data.sources)}; packed rows of seq_len tokens and max_patches
    # patches; batch_size rows per step, or rows_per_device x devices when rows_per_device > 0
    # (the other fields: qwen3vl_jax.data.pipeline.DataConfig, whose defaults they take: packing_bins, seed, shuffle,
    # num_epochs, num_examples, workers, overflow "truncate" | "drop", on_bad_input "error" | "skip")
    c.data = ConfigDict(dict(sources={}, **dataclass_defaults(DataConfig, skip=_DERIVED_DATA_FIELDS)))
    c.data.rows_per_device = 0
    # the stream is split into num_shards shards (shard s: examples s, s + num_shards, ...), each filling an equal
    # share of every batch's rows, packed on its own; a process reads its rows' shards. 0: one shard per group of
    # processes reading distinct rows (each host its own). A run of 1 process with num_shards = N reads the data
    # exactly as a run of N processes does: the same global batches.
    c.data.num_shards = 0

    # eval every `every` steps (0: never) on sets {name: {num_examples, sources: [specs]}}; mode "teacher_forced":
    # the objective's metrics on the sets packed into the training data's row shapes; "generate": answers generated
    # greedily (max_new_tokens, batch_size prompts at a time) and scored per task (qwen3vl_jax.evaluation.metrics)
    c.eval = ConfigDict(dict(every=0, batch_size=8, sets={}, mode="teacher_forced", max_new_tokens=32))

    c.optimizer = ConfigDict(dict(lr=3e-4, warmup_steps=100, final_lr_ratio=0.1, clip_norm=1.0, freeze=()))
    c.optimizer.update(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    c.loss_normalization = "sqrt"  # qwen3vl_jax.training.loss: "sqrt" | "token" | "sample"
    # what the run minimises, one module of qwen3vl_jax/training/objectives each, set up by its section below:
    # "sft": the (weighted) cross-entropy; "distill": strong-to-weak distillation from a teacher (c.distill);
    # "dpo": preference tuning on preference records (data.features: "chosen" / "rejected" answers) against the
    # step-0 weights, or a LoRA model's base (c.dpo); "grpo": reinforcement learning with verifiable rewards (c.grpo)
    c.objective = "sft"
    c.dpo = ConfigDict(dict(beta=0.1, variant="sigmoid"))
    # "grpo" (training/objectives/grpo.py): reinforcement learning on prompt records (training/prompts.py). Each
    # rollout samples group_size completions of max_completion_tokens tokens at most (temperature, top_k, top_p)
    # for prompts_per_step prompts of max_prompt_tokens tokens at most, scores them with the records' rewards
    # (`rewards`: the default for records, sources and tasks naming none: names or {name, weight, options}), and
    # normalises them per group (scale_rewards "group" | "batch" | "none"); updates_per_rollout steps then train
    # on it. variant "grpo" (a ratio per token) | "gspo" (per sequence); clip_low / clip_high bound the ratio;
    # aggregation "token" | "sequence"; beta: the k3 KL to the step-0 weights (a LoRA model's base);
    # mask_truncated: no loss on completions cut at max_completion_tokens; dynamic_sampling: groups whose rewards
    # all equal are replaced by further prompts' (up to max_sampling_rounds generations). Each row of data.seq_len
    # tokens holds data.seq_len // (max_prompt_tokens + max_completion_tokens) sequences.
    c.grpo = ConfigDict(dict(prompts_per_step=0, group_size=8, max_prompt_tokens=256, max_completion_tokens=64))
    c.grpo.update(temperature=1.0, top_k=0, top_p=1.0, scale_rewards="group", rewards=())
    c.grpo.update(variant="grpo", clip_low=0.2, clip_high=0.2, aggregation="token", beta=0.0, updates_per_rollout=1)
    c.grpo.update(mask_truncated=False, dynamic_sampling=False, max_sampling_rounds=3)
    # LoRA adapters (config.model.LoraConfig) on a frozen base: rank 0 trains the whole model; with rank > 0 only
    # the adapters train and carry optimizer state, and the run exports them in the PEFT format (<workdir>/lora)
    # beside the merged model (<workdir>/hf)
    c.lora = ConfigDict(dataclass_defaults(LoraConfig))  # rank, alpha, dropout, targets
    # objective "distill" (training/objectives/distill.py): teacher = an HF checkpoint directory of the same family
    # (online); loss = alpha KL_T(teacher || student) T^2 + (1 - alpha) CE, the KL over the supervised tokens
    # or, with all_text_tokens, every text token. Offline: teacher_cache = a directory of the teacher's top_k
    # logits written by experiments.cache_teacher for this run's batches (training/teacher_cache.py)
    c.distill = ConfigDict(dict(teacher="", alpha=0.5, temperature=1.0, all_text_tokens=False))
    c.distill.update(teacher_cache="", top_k=32)
    c.grad_accum_steps = 1
    # the LM head and the loss run this many positions at a time (0: the whole row), so that the (tokens, vocab)
    # logits and their gradient never exist whole (qwen3vl_jax.modeling.lm_head)
    c.loss_chunk = 0
    # device mesh axis sizes (qwen3vl_jax.parallel.sharding.MESH_AXES; -1: the remaining devices): data parallel,
    # FSDP (parameters and optimizer state split), context (each row's sequence split, parallel/context.py),
    # tensor parallel, expert parallel (MoE)
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1, expert=1))
    # [[logical axis, mesh axis | [mesh axes] | None], ...]: where each logical axis of the parameters and the
    # batch is split (parallel.sharding.DEFAULT_RULES)
    c.sharding_rules = DEFAULT_RULES
    # on_corrupt: a newest checkpoint that does not read back is moved aside and the run resumes from the one
    # before it ("previous"), or the run stops naming it ("error")
    c.checkpoint = ConfigDict(dict(every=500, keep=3, on_corrupt="previous"))
    return c


def config_from_file(path: str, arg: str | None = None) -> ConfigDict:
    """`get_config(arg)` (or `get_config()`) of a config file such as configs/tiny.py, as `--config=path[:arg]`
    gives it to the experiments, for code that runs without absl flags (tests, benchmarks, notebooks)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"config_file_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def model_settings(preset_name: str, **changes: Any) -> ConfigDict:
    """`config.model` for a preset: every ModelConfig field under `overrides` (so that any of them can be set on the
    command line: --config.model.overrides.text.hidden_size=256), None except `changes` (ModelConfig fields,
    `text=dict(...)` / `vision=dict(...)` for theirs), which apply on top of the preset, or on top of init_from's
    config.json when a run sets it. LoRA is set in config.lora."""
    given = explicit_overrides(changes)
    preset(preset_name, **given)  # a bad value stops here, in the config file, naming the field
    overrides = ConfigDict(_placeholders(ModelConfig, skip=("lora",)))
    for name, value in given.items():
        if name in SECTIONS:
            overrides[name].update(value)
        else:
            overrides[name] = value
    return ConfigDict(dict(preset=preset_name, init_from="", init_fresh=(), overrides=overrides))


def dataclass_defaults(cls: type, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """{field: default} of a dataclass's fields with a default, for a config section that mirrors it; a None default
    becomes a typed placeholder (None until set, and settable from the command line)."""
    hints = typing.get_type_hints(cls)
    defaults = {}
    for field in dataclasses.fields(cls):
        if field.name in skip or field.default is dataclasses.MISSING:
            continue
        is_none = field.default is None
        defaults[field.name] = config_dict.placeholder(_field_type(hints[field.name])) if is_none else field.default
    return defaults


def _placeholders(cls: type, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A typed None placeholder for each field of a dataclass but `skip`; ModelConfig's `text` and `vision` as
    sections of their own."""
    hints = typing.get_type_hints(cls)
    return {
        field.name: (
            ConfigDict(_placeholders(SECTIONS[field.name]))
            if cls is ModelConfig and field.name in SECTIONS
            else config_dict.placeholder(_field_type(hints[field.name]))
        )
        for field in dataclasses.fields(cls)
        if field.name not in skip
    }


def _field_type(hint: Any) -> type:
    """The Python type a command-line value of a field annotated `hint` parses as (int | None -> int,
    tuple[int, ...] -> tuple)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint
