"""The training run's config (ml_collections): every field `experiments.train` reads, with its default. A config
file starts from `run_config()` and sets what it changes; any field can be overridden on the command line
(`--config.optimizer.lr=1e-3`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from ml_collections import ConfigDict

from qwen3vl_jax.config import preset


def run_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.log_every = 10
    c.export_hf = True  # the final model and its processor as an HF checkpoint in <workdir>/hf
    c.peak_flops_per_device = 0.0  # for MFU; 0: the chip's public figure on TPU, else a matmul rate measured here

    # a preset (qwen3vl_jax.config.presets) or an HF checkpoint to start from; ModelConfig field overrides;
    # init_fresh: parameter path prefixes ("visual/deepstack_merger") initialised randomly instead of read from
    # init_from (parts the checkpoint lacks, e.g. DeepStack mergers added to a model trained without them)
    c.model = ConfigDict(dict(preset="tiny", init_from="", init_fresh=(), overrides={}))
    c.processing = ConfigDict()  # VisionProcessingConfig fields (pixel limits, fps)

    # sources: {name: source spec (qwen3vl_jax.data.sources)}; packed rows of seq_len tokens and max_patches
    # patches; batch_size rows per step, or rows_per_device x devices when rows_per_device > 0
    c.data = ConfigDict(dict(sources={}, seq_len=512, max_patches=1024, batch_size=8, rows_per_device=0))
    c.data.update(seed=0, workers=0, overflow="truncate", on_bad_input="error")
    # the stream is split into num_shards shards (shard s: examples s, s + num_shards, ...), each filling an equal
    # share of every batch's rows, packed on its own; a process reads its rows' shards. 0: one shard per group of
    # processes reading distinct rows (each host its own). A run of 1 process with num_shards = N reads the data
    # exactly as a run of N processes does: the same global batches.
    c.data.num_shards = 0

    # teacher-forced eval every `every` steps (0: never) on sets {name: {num_examples, sources: [specs]}}, packed
    # into the training data's row shapes
    c.eval = ConfigDict(dict(every=0, batch_size=8, sets={}))

    c.optimizer = ConfigDict(dict(lr=3e-4, warmup_steps=100, final_lr_ratio=0.1, clip_norm=1.0, freeze=()))
    c.optimizer.update(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    c.loss_normalization = "sqrt"  # qwen3vl_jax.training.loss: "sqrt" | "token" | "sample"
    # "sft": the (weighted) cross-entropy; "dpo": preference tuning on preference records (data.features: "chosen" /
    # "rejected" answers) against the step-0 weights, or a LoRA model's base (training/dpo.py)
    c.objective = "sft"
    c.dpo = ConfigDict(dict(beta=0.1, variant="sigmoid"))
    # LoRA adapters (config.model.LoraConfig) on a frozen base: rank 0 trains the whole model; with rank > 0 only
    # the adapters train and carry optimizer state, and the run exports them in the PEFT format (<workdir>/lora)
    # beside the merged model (<workdir>/hf)
    c.lora = ConfigDict(
        dict(
            rank=0,
            alpha=16.0,
            dropout=0.0,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    )
    # strong-to-weak distillation (training/distill.py): teacher = an HF checkpoint directory of the same family
    # (empty: off); loss = alpha KL_T(teacher || student) T^2 + (1 - alpha) CE, the KL over the supervised tokens
    # or, with all_text_tokens, every text token. Offline: teacher_cache = a directory of the teacher's top_k
    # logits written by experiments.cache_teacher for this run's batches (training/teacher_cache.py)
    c.distill = ConfigDict(dict(teacher="", alpha=0.5, temperature=1.0, all_text_tokens=False))
    c.distill.update(teacher_cache="", top_k=32)
    c.grad_accum_steps = 1
    # the LM head and the loss run this many positions at a time (0: the whole row), so that the (tokens, vocab)
    # logits and their gradient never exist whole (qwen3vl_jax.modeling.lm_head)
    c.loss_chunk = 0
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))  # -1: the remaining devices
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


def model_settings(preset_name: str, **changes) -> ConfigDict:
    """`config.model` for a preset: every ModelConfig field of preset(preset_name, **changes) under `overrides`,
    so that any of them can be set on the command line (--config.model.overrides.text.hidden_size=256)."""
    fields = dataclasses.asdict(preset(preset_name, **changes))
    return ConfigDict(dict(preset=preset_name, init_from="", init_fresh=(), overrides=fields))
