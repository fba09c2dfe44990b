"""The training loop behind `python -m experiments.train`: model, processor, mesh, sharded state, data,
checkpoints (resumed automatically), metrics, periodic eval and the final HF export."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from qwen3vl_jax import storage
from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.checkpoints.hf_export import export_hf
from qwen3vl_jax.checkpoints.peft import merge_lora, save_adapters
from qwen3vl_jax.checkpoints.train_state import Checkpointer, check_resumable, record_run
from qwen3vl_jax.checkpoints.workdir_lock import WorkdirLock
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.evaluation.harness import eval_records, generate_answers, summarize
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.parallel.multihost import StopSignal, check_same_settings, in_lockstep, initialize_distributed
from qwen3vl_jax.parallel.sharding import global_batch, make_mesh, row_groups
from qwen3vl_jax.training.builder import StepBuilder, processor_from
from qwen3vl_jax.training.metrics import MetricWriter, device_peak_flops, train_flops
from qwen3vl_jax.training.objectives.base import DataEnvironment, RunDescription

EVAL_MODES = ("teacher_forced", "generate")


def report(message: str) -> None:
    """A line on the console of process 0 that does not break the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


def host_data_config(data: Any, *, global_batch_size: int, row_group_count: int, context_shards: int) -> DataConfig:
    """config.data (or an eval set's data dict) as this host's DataConfig: its row group's share of the batch."""
    if global_batch_size % row_group_count:
        raise ValueError(f"batch_size {global_batch_size} is not divisible by {row_group_count} groups of hosts")
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    for field in ("rows_per_device", "num_shards"):  # resolved into the batch size and the shards read
        values.pop(field, None)
    values.update(batch_size=global_batch_size // row_group_count, context_shards=context_shards)
    return DataConfig.from_dict(values)


def data_shards(num_shards: int, *, row_group: int, row_group_count: int) -> tuple[int, int, int]:
    """(first shard, shards read, shard count) of the processes in row group `row_group` of `row_group_count` for
    config.data.num_shards (0: one shard per row group): each group reads an equal run of consecutive shards."""
    num_shards = num_shards or row_group_count
    if num_shards % row_group_count:
        raise ValueError(
            f"data.num_shards {num_shards} must be a multiple of the {row_group_count} groups of processes that "
            f"read distinct rows of the batch (each group reads an equal number of shards)"
        )
    shards_read = num_shards // row_group_count
    return row_group * shards_read, shards_read, num_shards


class Trainer(StepBuilder):
    def __init__(self, config: ConfigDict, workdir: str, *, config_name: str = ""):
        """`config_name` (e.g. the config file) is recorded in the workdir and named when a later run of another
        model refuses to resume there. Every process of a multi-process run builds its Trainer with the same
        config and workdir (checked: a difference stops all of them, naming it). The workdir is locked from here
        until `run` returns (WorkdirInUse when another run holds it)."""
        initialize_distributed()
        check_same_settings(
            dict(run_config=json.loads(config.to_json_best_effort()), workdir=storage.absolute(workdir)),
            what="config or workdir",
        )
        # before anything touches the workdir (orbax's manager clears unfinished saves): WorkdirInUse when another
        # run trains there; released when `run` returns
        self.lock = WorkdirLock(workdir)
        self.lock.acquire()
        super().__init__(config, make_mesh(config.mesh.to_dict()))
        self.workdir, self.config_name = workdir, config_name
        report(f"workdir: {workdir}")
        self.processor = processor_from(config)
        self.row_group, self.row_group_count = row_groups(self.mesh)  # hosts holding the same rows read the same data
        self.first_shard, self.shards_read, self.num_shards = data_shards(
            config.data.num_shards, row_group=self.row_group, row_group_count=self.row_group_count
        )
        self.data_config = self._data_config(config.data, self.global_batch_size(config.data))
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep, every=config.checkpoint.every
        )
        self.writer = MetricWriter(workdir)
        if config.eval.get("mode", "teacher_forced") not in EVAL_MODES:
            raise ValueError(f"eval.mode {config.eval.mode!r} is not one of {EVAL_MODES}")
        self.training_data = self.objective.training_data(
            DataEnvironment(
                config=config,
                data=self.data_config,
                processor=self.processor,
                model_config=self.model_config,
                mesh=self.mesh,
                rules=self.rules,
                row_group=self.row_group,
                row_group_count=self.row_group_count,
                packed_batches=self.dataset,
            )
        )
        self.objective.check_run(
            RunDescription(
                data=self.data_config,
                row_group_count=self.row_group_count,
                num_shards=self.num_shards,
                processing=config.processing.to_dict(),
                steps=config.steps,
                vocab_size=self.model_config.text.vocab_size,
            )
        )

    def _data_config(self, data: Any, global_batch_size: int) -> DataConfig:
        if global_batch_size % self.num_shards:
            raise ValueError(
                f"a batch of {global_batch_size} rows cannot be split into data.num_shards = {self.num_shards} equal "
                f"shares (one per shard of the data)"
            )
        return host_data_config(
            data,
            global_batch_size=global_batch_size,
            row_group_count=self.row_group_count,
            context_shards=self.mesh.shape["context"],
        )

    def dataset(self, data_config: DataConfig):
        """This process's batches: its row group's data.num_shards / groups shards of the stream, side by side."""
        return build_dataset(
            data_config,
            self.processor,
            model_config=self.model_config,
            shard_index=self.first_shard,
            shard_count=self.num_shards,
            shards_read=self.shards_read,
        )

    def run(self) -> dict[str, float]:
        """Trains config.steps steps (resuming from the newest checkpoint), returns the last eval metrics; the
        final train state stays in `self.state`. SIGTERM to any process saves a checkpoint of the same step on
        every process and returns."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict[str, float]:
        config = self.config
        if self.checkpointer.latest_step() is None:
            record_run(self.workdir, self.model_config, config_name=self.config_name, run_config=config)
            step, state, iterator = 0, self.initial_state(), iter(self.training_data.dataset())
        else:
            check_resumable(self.workdir, self.model_config, config_name=self.config_name)
            step, state, iterator, damaged = self.checkpointer.restore_newest_intact(
                self.abstract_state(),
                make_iterator=lambda: iter(self.training_data.dataset()),
                on_corrupt=config.checkpoint.on_corrupt,
            )
            for record in damaged:
                report(
                    f"WARNING: the checkpoint of step {record['step']} is damaged ({record['error']}); it was moved "
                    f"to {record['moved_to']} and this run resumes from an earlier one"
                )
                self.writer.write(step, dict(damaged_checkpoint_step=record["step"]), prefix="checkpoint")
            report(f"resumed from the checkpoint of step {step} in {self.workdir}")
        peak = config.peak_flops_per_device or device_peak_flops()
        flops = train_flops(
            self.model_config,
            batch=self.data_config.batch_size * self.row_group_count,
            seq_len=self.data_config.seq_len,
            patches=self.data_config.max_patches,
        )
        results: dict[str, float] = {}
        progress = tqdm(total=config.steps, initial=step, disable=jax.process_index() != 0, dynamic_ncols=True)
        window = _Window()  # since the last log line
        frozen = self.frozen_params  # (a teacher's or a reference's parameters,) or ()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), StopSignal() as stop:
            while step < config.steps:
                host = self.training_data.next_batch(iterator, step=step, params=state.params)
                batch = host.batch
                window.add(host, tokens=int((batch.segment_ids > 0).sum()) * self.row_group_count)
                state, metrics = self.train_step(
                    state, global_batch(batch, self.mesh, row_group_count=self.row_group_count), *frozen
                )
                step += 1
                if step % config.log_every == 0 or step == config.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the steps
                    metrics.update(window.metrics(step_flops=flops, peak_flops=peak * jax.device_count()))
                    self.writer.write(step, metrics)
                    shown = {k: f"{metrics[k]:.3f}" for k in self.objective.progress_metrics if k in metrics}
                    progress.set_postfix(**shown, tok_s=f"{metrics['tokens_per_second']:.0f}")
                    window = _Window()
                progress.update(1)
                self.checkpointer.maybe_save(step, state, iterator=iterator)
                if config.eval.every and (step % config.eval.every == 0 or step == config.steps):
                    results = self.evaluate(state.params, step)
                if step < config.steps and stop.reached(step):
                    report(f"SIGTERM: saving a checkpoint of step {step} on every process and stopping")
                    break
            self.checkpointer.maybe_save(step, state, iterator=iterator, force=True)
        progress.close()
        self.checkpointer.wait()
        if step == config.steps and config.export_hf:
            self.export(state.params, os.path.join(self.workdir, "hf"))
        self.checkpointer.close()
        self.writer.close()
        self.state = state
        return results

    def evaluate(self, params: Any, step: int) -> dict[str, float]:
        """Per eval set (config.eval.sets), its metrics as config.eval.mode says: "teacher_forced" (the
        objective's, `evaluate_teacher_forced`) or "generate" (answers generated greedily and scored per task,
        `evaluate_by_generation`)."""
        if self.config.eval.get("mode", "teacher_forced") == "generate":
            return self.evaluate_by_generation(params, step)
        return self.evaluate_teacher_forced(params, step)

    def evaluate_by_generation(self, params: Any, step: int) -> dict[str, float]:
        """Per eval set: the first num_examples records answered greedily (up to eval.max_new_tokens tokens) by
        the parameters where they lie on the mesh, scored per task as experiments.eval scores them
        (evaluation/metrics.py: exact match, IoU for grounding, ...)."""
        model = Qwen3VLModel(self.model_config, params, mesh=self.mesh, rules=self.rules)
        results = {}
        for name, eval_set in self.config.eval.sets.items():
            answers = generate_answers(
                model,
                self.processor,
                records=eval_records(eval_set.sources, eval_set.num_examples),
                set_name=name,
                batch_size=self.config.eval.batch_size,
                max_new_tokens=self.config.eval.max_new_tokens,
            )
            metrics = summarize(answers)[name]
            self.writer.write(step, metrics, prefix=f"eval/{name}")
            line = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "examples")
            report(f"step {step} eval {name} (generated): {line} ({metrics['examples']:.0f} examples)")
            results.update({f"{name}/{k}": v for k, v in metrics.items()})
        return results

    def evaluate_teacher_forced(self, params: Any, step: int) -> dict[str, float]:
        """Per eval set: the objective's eval metrics (`Objective.eval_summary`: token cross-entropy and
        teacher-forced exact match — every answer token is the argmax, exactly what greedy decoding would answer —
        or, for preference tuning, preference accuracy and reward margin) over its first num_examples examples,
        each once, packed into the training data's row shapes and split between the processes as the training data
        is."""
        results = {}
        for name, eval_set in self.config.eval.sets.items():
            once = dict(self.config.data.to_dict(), sources=eval_set.sources, shuffle=False, num_epochs=1, workers=0)
            data = self._data_config(dict(once, num_examples=eval_set.num_examples), self.config.eval.batch_size)
            padding = functools.partial(
                TrainingBatch.empty,
                data.batch_size,
                seq_len=data.seq_len,
                max_patches=data.max_patches,
                patch_dim=self.model_config.vision.patch_dim,
            )
            totals: dict[str, float] = {}
            # every process runs as many batches as the one with the most (its share of a finite set)
            for batch in in_lockstep(self.dataset(data), filler=padding):
                rows = global_batch(batch, self.mesh, row_group_count=self.row_group_count)
                sums = jax.device_get(self.eval_step(params, rows, *self.eval_frozen_params))
                totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
            summary = self.objective.eval_summary(totals)
            metrics = summary.metrics
            self.writer.write(step, metrics, prefix=f"eval/{name}")
            report(f"step {step} eval {name}: {summary.line} ({summary.count:.0f} examples)")
            results.update({f"{name}/{k}": v for k, v in metrics.items()})
        return results

    def export(self, params: Any, path: str) -> None:
        """The trained model and its processor as an HF checkpoint directory (`export_hf`); a LoRA run also writes
        its adapters in the PEFT format to <workdir>/lora and exports the model with them merged."""
        config = self.model_config
        if config.lora.rank:
            adapters = os.path.join(self.workdir, "lora")
            if jax.process_index() == 0:
                save_adapters(adapters, params, config, base_model=self.config.model.init_from)
            report(f"saved the LoRA adapters (PEFT format) to {adapters}")
            params, config = merge_lora(params, config)
        export_hf(path, params, config=config, processor=self.processor)
        report(f"exported the model and its processor to {path}")


class _Window:
    """What the steps since the last log line add up to: their number, tokens, dropped examples, the host's batch
    metrics (averaged over the steps that report each) and the seconds spent making batches."""

    def __init__(self):
        self.start, self.steps, self.tokens, self.dropped, self.batch_seconds = time.perf_counter(), 0, 0, 0, 0.0
        self.host_metrics: dict[str, list[float]] = {}

    def add(self, host, *, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.dropped += int(host.batch.num_dropped.sum())
        self.batch_seconds += host.seconds
        for name, value in host.metrics.items():
            self.host_metrics.setdefault(name, []).append(float(value))

    def metrics(self, *, step_flops: float, peak_flops: float) -> dict[str, float]:
        """tokens/s and MFU over the window's wall time; with batches made while the devices waited (rollouts):
        batch_seconds and update_seconds per step and the update phase's tokens/s."""
        seconds = time.perf_counter() - self.start
        metrics = dict(
            tokens_per_second=self.tokens / seconds,
            dropped_examples=self.dropped,
            mfu=self.steps * step_flops / seconds / peak_flops,
        )
        if self.batch_seconds:
            update_seconds = max(seconds - self.batch_seconds, 1e-9)
            metrics.update(
                batch_seconds=self.batch_seconds / self.steps,
                update_seconds=update_seconds / self.steps,
                update_tokens_per_second=self.tokens / update_seconds,
            )
        metrics.update({name: sum(values) / len(values) for name, values in self.host_metrics.items()})
        return metrics
