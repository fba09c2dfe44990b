"""orbax checkpoints of the train state together with the grain iterator state, so that a resumed run
continues exactly (same params, optimizer, step, RNG and next batch)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import jax.experimental.multihost_utils
import orbax.checkpoint as ocp

from qwen3vl_jax import storage
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.parallel.multihost import gather_text

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"  # in the workdir: which config and model its checkpoints belong to
ON_CORRUPT = ("previous", "error")  # config.checkpoint.on_corrupt
STATE_ITEM, DATA_ITEM = "state", "data"  # a checkpoint's items: the train state and the data iterator's position
DAMAGED_SUFFIX = "_damaged"  # `<checkpoints>_damaged/<step>`: where damaged checkpoints are moved, kept for inspection


class DamagedCheckpoint(RuntimeError):
    """A checkpoint that cannot be read back (names its step, directory and what failed)."""


def describe_restore_error(error: BaseException) -> str:
    """The line of a restore error (or of what caused it) that says what could not be read, e.g. TensorStore's
    `Error reading "params.decoder...kernel/0.0.0" in OCDBT database ...: ZSTD_decompressStream() failed`."""
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines += [line.strip() for line in str(error).splitlines() if line.strip()]
        error = error.__cause__ or error.__context__
    return next((line for line in lines if "Error reading" in line), lines[-1] if lines else "unknown error")


class Checkpointer:
    """Async orbax CheckpointManager keeping the newest `keep` checkpoints under `directory`. A checkpoint
    is only visible once completely written (orbax writes to a temporary dir and renames it), so a crash
    during a save leaves the previous checkpoint as the latest."""

    def __init__(self, directory: str, *, keep: int, every: int):
        self.every = every
        self.directory = storage.absolute(directory)
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def maybe_save(self, step: int, state: Any, *, iterator: grain.DatasetIterator, force: bool = False) -> bool:
        """Starts an async save of `state` and the iterator position at `step` when due (or forced) and not
        already saved."""
        if step == self.latest_step() or (not force and step % self.every):
            return False
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: grain.checkpoint.CheckpointSave(iterator)}
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, *, iterator: grain.DatasetIterator | None = None) -> Any:
        """The state saved at `step` (laid out as `abstract_state`: ShapeDtypeStructs with shardings); `iterator`
        (when given) is moved to the saved position. Each process reads its own devices' part of the state and its
        own iterator position, through orbax's and grain's checkpoint handlers rather than the manager: the
        manager ends a restore with a barrier across processes, which a process whose read failed never reaches
        (the others would then meet it in their next collective and fail or hang)."""
        directory = self.manager.directory / str(step)
        handler = ocp.StandardCheckpointHandler()
        try:
            state = handler.restore(directory / STATE_ITEM, args=ocp.args.StandardRestore(abstract_state))
        finally:
            handler.close()
        if iterator is not None:
            grain.checkpoint.CheckpointHandler().restore(
                directory / DATA_ITEM, args=grain.checkpoint.CheckpointRestore(iterator)
            )
        log.info("restored step %d from %s", step, self.manager.directory)
        return state

    def restore_newest_intact(
        self, abstract_state: Any, *, make_iterator, on_corrupt: str = "previous"
    ) -> tuple[int, Any, grain.DatasetIterator, list[dict]]:
        """(step, state, iterator, damaged) from the newest checkpoint that reads back whole. A checkpoint that
        does not (flipped bytes, a truncated file) raises DamagedCheckpoint naming its step and what failed under
        on_corrupt="error"; under "previous" it is logged, moved to `<directory>_damaged/<step>` (kept, out of
        the way of the next save of that step) and the one before it is tried. `damaged`: one record per
        checkpoint passed over. `make_iterator()`: a fresh data iterator for each try."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"checkpoint.on_corrupt {on_corrupt!r} not in {ON_CORRUPT}")
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            iterator = make_iterator()
            state, error, detail = self._restore_on_every_process(step, abstract_state, iterator=iterator)
            if not detail:
                return step, state, iterator, damaged
            message = f"the checkpoint of step {step} in {self.directory} is damaged: {detail}"
            if on_corrupt == "error":
                raise DamagedCheckpoint(
                    f"{message}\nResume from the one before it with checkpoint.on_corrupt='previous', or move "
                    f"{os.path.join(self.directory, str(step))} away."
                ) from error
            moved = self._move_aside(step)
            log.error("%s; moved it to %s and trying the checkpoint before it", message, moved)
            damaged.append(dict(step=step, error=detail, moved_to=moved))
        raise DamagedCheckpoint(
            f"no checkpoint in {self.directory} reads back whole ({len(damaged)} damaged, moved to "
            f"{self.directory + DAMAGED_SUFFIX}); delete the workdir's checkpoints to start over"
        )

    def _move_aside(self, step: int) -> str:
        """Moves the step's directory to `<directory>_damaged/<step>` (process 0) and re-reads the remaining steps."""
        target = storage.path(self.directory + DAMAGED_SUFFIX) / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.rename(target.parent / f"{step}.{len(list(target.parent.iterdir()))}")
            (storage.path(self.directory) / str(step)).rename(target)
        jax.experimental.multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        return str(target)

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the train state saved at `step` (no data iterator), e.g. for evaluation; DamagedCheckpoint on every
        process when any process cannot read its part."""
        state, error, detail = self._restore_on_every_process(step, abstract_state)
        if detail:
            message = f"the checkpoint of step {step} in {self.directory} is damaged: {detail}"
            raise DamagedCheckpoint(message) from error
        return state

    def _restore_on_every_process(
        self, step: int, abstract_state: Any, *, iterator: grain.DatasetIterator | None = None
    ) -> tuple[Any, Exception | None, str]:
        """(state, this process's error, what failed): `restore`, and then what failed on any process ("" when
        nothing did), the same on every process. Each process reads its own part of the checkpoint, so all of
        them must pass a step over when one cannot read it."""
        state, error = None, None
        try:
            state = self.restore(step, abstract_state, iterator=iterator)
        except Exception as e:  # whatever the storage layers raise for data that does not read back
            error = e
        details = gather_text(describe_restore_error(error) if error is not None else "")
        if len(details) == 1:
            return state, error, details[0]
        return state, error, "; ".join(f"on process {index}: {text}" for index, text in enumerate(details) if text)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class WorkdirMismatch(ValueError):
    """The workdir's checkpoints belong to a model of other parameter shapes than this run's."""


def describe(config: ModelConfig) -> str:
    """One line naming a model's size: decoder, experts, ViT, vocabulary."""
    t, v = config.text, config.vision
    experts = (
        f", {t.num_experts} experts top-{t.num_experts_per_tok} of width {t.moe_intermediate_size}" if t.is_moe else ""
    )
    return (
        f"decoder {t.num_hidden_layers} x {t.hidden_size} (heads {t.num_attention_heads}/{t.num_key_value_heads}"
        f" of {t.head_dim}, mlp {t.intermediate_size}{experts}), ViT {v.depth} x {v.hidden_size}, "
        f"vocab {t.vocab_size}"
    )


def parameter_shapes(config: ModelConfig) -> dict[str, list[int]]:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape) for path, leaf in leaves}


def record_run(workdir: str, config: ModelConfig, *, config_name: str, run_config: Any = None) -> None:
    """Writes the workdir's run record (process 0): the config's name, the model and its parameter shapes, and
    the whole run config (a ConfigDict, as JSON) that experiments.export rebuilds the model from."""
    if jax.process_index() == 0:
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        record = dict(config=config_name, model=describe(config), parameter_shapes=parameter_shapes(config))
        if run_config is not None:
            record["run_config"] = json.loads(run_config.to_json_best_effort())
        storage.write_json(os.path.join(workdir, RUN_RECORD), record)


def check_resumable(workdir: str, config: ModelConfig, *, config_name: str) -> None:
    """Raises WorkdirMismatch, naming both models, when the run recorded in `workdir` has other parameter shapes
    than `config` (a workdir without a record, from an older version, is not checked)."""
    file = os.path.join(workdir, RUN_RECORD)
    if not storage.path(file).exists():
        log.warning("%s has no %s: cannot check that its checkpoints belong to this model", workdir, RUN_RECORD)
        return
    saved = storage.read_json(file)
    shapes = parameter_shapes(config)
    if saved["parameter_shapes"] == shapes:
        return
    differ = sorted(
        k for k in shapes.keys() | saved["parameter_shapes"].keys() if shapes.get(k) != saved["parameter_shapes"].get(k)
    )
    first = differ[0]
    raise WorkdirMismatch(
        f"{workdir} holds checkpoints of another model, so this run cannot resume there.\n"
        f"  saved:    {saved['config'] or 'a config'}: {saved['model']}\n"
        f"  this run: {config_name or 'this config'}: {describe(config)}\n"
        f"  {len(differ)} parameters differ, e.g. {first}: {saved['parameter_shapes'].get(first)} saved, "
        f"{shapes.get(first)} now.\nGive another --workdir, or delete this one to start over."
    )
