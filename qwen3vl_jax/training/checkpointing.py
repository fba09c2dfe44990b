"""orbax checkpoints of the train state together with the grain iterator state, so that a resumed run
continues exactly (same params, optimizer, step, RNG and next batch)."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from qwen3vl_jax import storage

log = logging.getLogger(__name__)


class Checkpointer:
    """Async orbax CheckpointManager keeping the newest `keep` checkpoints under `directory`. A checkpoint
    is only visible once completely written (orbax writes to a temporary dir and renames it), so a crash
    during a save leaves the previous checkpoint as the latest."""

    def __init__(self, directory: str, *, keep: int, every: int):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(storage.absolute(directory), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def maybe_save(self, step: int, state: Any, iterator: grain.DatasetIterator, *, force: bool = False) -> bool:
        """Starts an async save of `state` and the iterator position at `step` when due (or forced) and not
        already saved."""
        if step == self.latest_step() or (not force and step % self.every):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator) -> Any:
        """The state saved at `step` (laid out as `abstract_state`: ShapeDtypeStructs with shardings); the
        iterator is moved to the saved position."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(iterator))
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
