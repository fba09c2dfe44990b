"""orbax checkpoints of the train state together with the grain iterator state, so that a resumed run
continues exactly (same params, optimizer, step, RNG and next batch)."""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from qwen3vl_jax.checkpoints import storage
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.model import abstract_params

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"  # in the workdir: which config and model its checkpoints belong to


class Checkpointer:
    """Async orbax CheckpointManager keeping the newest `keep` checkpoints under `directory`. A checkpoint
    is only visible once completely written (orbax writes to a temporary dir and renames it), so a crash
    during a save leaves the previous checkpoint as the latest."""

    def __init__(self, directory: str, *, keep: int, every: int):
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(storage.absolute(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def maybe_save(self, step: int, state: Any, *, iterator: grain.DatasetIterator, force: bool = False) -> bool:
        """Starts an async save of `state` and the iterator position at `step` when due (or forced) and not
        already saved."""
        if step == self.latest_step() or (not force and step % self.every):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, *, iterator: grain.DatasetIterator) -> Any:
        """The state saved at `step` (laid out as `abstract_state`: ShapeDtypeStructs with shardings); the
        iterator is moved to the saved position."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)
        )
        restored = self.manager.restore(step, args=args)
        log.info("restored step %d from %s", step, self.manager.directory)
        return restored.state

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the train state saved at `step` (no data iterator), e.g. for evaluation."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

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


def record_run(workdir: str, config: ModelConfig, *, config_name: str) -> None:
    """Writes the workdir's run record (process 0): the config's name, the model and its parameter shapes."""
    if jax.process_index() == 0:
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        record = dict(config=config_name, model=describe(config), parameter_shapes=parameter_shapes(config))
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
