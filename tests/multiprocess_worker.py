"""The per-process half of tests/test_multiprocess.py: run by `experiments.launch_local` as every process of a
multi-process run, it does what the test then compares with the same work done in one process with 8 devices,
and writes its results to OUT (argv[1]) as `process_<i>.npz` / `.json`:

- agreement: gather_text with texts of different lengths, any_process, and in_lockstep over streams of unequal
  lengths with a global reduction per item (a process that stopped early would leave the others hanging);
- a train step (with an "optimizer" that keeps the gradient as its state) on the global batch
  given in `batch.npz` from the parameters given in `params.npz` (each process placing only its devices' boxes),
  each process passing only its rows: the loss, the gradient norm and the gradients;
- sharded loading of the HF checkpoint at argv[2] onto an fsdp mesh over both processes: the bytes each process
  read, the bytes its devices' boxes hold, and checksums of every parameter;
- the trainer's data: the user texts of every example in this process's batches over one epoch of the JSONL
  source argv[3] (each example names its index).
"""

import dataclasses
import json
import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import RecordingFile, data_bytes_read
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.config import preset
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.parallel.multihost import any_process, gather_text, in_lockstep, initialize_distributed
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, batch_shardings, global_batch, make_mesh, param_shardings
from qwen3vl_jax.training.builder import train_state_shardings
from qwen3vl_jax.training.run_config import run_config
from qwen3vl_jax.training.train_step import TrainState, make_train_step
from qwen3vl_jax.training.trainer import Trainer

CONFIG = preset("tiny")


def agreement() -> dict:
    index = jax.process_index()
    texts = gather_text("x" * (3 + 5 * index))
    flags = (any_process(index == 1), any_process(False))
    mesh = make_mesh({"data": -1})
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
    sums = []
    for item in in_lockstep(range(3 if index == 0 else 1), filler=lambda: -1):
        rows = TrainingBatch.empty(4, seq_len=2, max_patches=4, patch_dim=1)
        rows = global_batch(rows.replace(input_ids=np.full((4, 2), item, np.int32)), mesh).input_ids
        sums.append(int(total(rows)))
    return dict(texts=texts, any=flags, lockstep_sums=sums)


def keep_gradient() -> optax.GradientTransformation:
    """An "optimizer" whose state is the gradient of the last step (the parameters stay as they are)."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree_util.tree_map(jnp.zeros_like, grads), grads),
    )


def placed(arrays: dict[str, np.ndarray], shardings: Any) -> Any:
    """The tree of `shardings` with each leaf the global array named by `jax.tree_util.keystr` of its path in
    `arrays`, laid out by that sharding (each process placing only its own devices' boxes)."""

    def leaf(path, sharding):
        value = arrays[jax.tree_util.keystr(path)]
        return jax.make_array_from_callback(value.shape, sharding, value.__getitem__)

    return jax.tree_util.tree_map_with_path(leaf, shardings)


def train_step(directory: str) -> dict:
    """Loss, gradient norm and gradients of one step on the global batch in directory/batch.npz from the
    parameters in directory/params.npz (by `jax.tree_util.keystr` of their paths), fsdp over all devices: every
    weight split across both processes."""
    with np.load(os.path.join(directory, "batch.npz")) as stored:
        batch = TrainingBatch.from_arrays(dict(stored))
    with np.load(os.path.join(directory, "params.npz")) as stored:
        initial = dict(stored)
    mesh = make_mesh({"fsdp": -1})
    rows = batch.batch_size // jax.process_count()
    mine = jax.tree_util.tree_map(
        lambda value: value[jax.process_index() * rows : (jax.process_index() + 1) * rows], batch
    )
    optimizer = keep_gradient()
    step = make_train_step(CONFIG, optimizer=optimizer, schedule=lambda count: 1.0, loss_normalization="sqrt")
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = train_state_shardings(abstract_params(CONFIG, boxed=True), optimizer, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        params = placed(initial, shardings.params)
        state = TrainState(
            step=jnp.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1)
        )
        state = jax.device_put(state, shardings)
        sharded = jax.jit(step, in_shardings=(shardings, batch_shardings(mesh)), out_shardings=(shardings, replicated))
        new_state, metrics = sharded(state, global_batch(mine, mesh))
    flat = jax.tree_util.tree_flatten_with_path(new_state.opt_state)[0]
    gathered = {jax.tree_util.keystr(path): multihost_utils.process_allgather(g, tiled=True) for path, g in flat}
    metrics = {k: float(v.addressable_data(0)) for k, v in metrics.items()}  # replicated
    return dict(metrics=metrics, gradients=gathered)


def sharded_loading(path: str) -> dict:
    config = hf_io.load_config(path)
    mesh = make_mesh({"fsdp": -1})
    shardings = param_shardings(abstract_params(config, boxed=True), mesh)
    params = hf_io.load_params(path, config, shardings, opener=RecordingFile)
    boxes = 0  # the bytes of the distinct boxes this process's devices hold, from jax's index maps alone
    checksums = {}
    for (key, array), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(shardings)
    ):
        mine = {
            tuple((s.start, s.stop) for s in index)
            for device, index in sharding.devices_indices_map(array.shape).items()
            if device.process_index == jax.process_index()
        }
        for box in mine:
            boxes += int(np.prod([(stop or dim) - (start or 0) for (start, stop), dim in zip(box, array.shape)]))
        whole = np.asarray(multihost_utils.process_allgather(array, tiled=True), np.float64)
        checksums[jax.tree_util.keystr(key)] = [float(whole.sum()), float(np.abs(whole).sum())]
    return dict(bytes_read=data_bytes_read(), box_elements=boxes, checksums=checksums)


def data_shards(jsonl: str, workdir: str) -> dict:
    """Per batch of this process over one epoch of `jsonl`, read as the trainer reads it (its row group's shard of
    data.num_shards = one per process), the "example N" label of each example in row order."""
    trainer = Trainer(data_run_config(jsonl, num_shards=jax.process_count()), workdir)
    batches = [
        example_labels(batch) for batch in trainer.dataset(dataclasses.replace(trainer.data_config, num_epochs=1))
    ]
    trainer.checkpointer.close()
    trainer.writer.close()
    return dict(row_group=trainer.row_group, batches=batches)


def data_run_config(jsonl: str, *, num_shards: int) -> ConfigDict:
    """A tiny run over the JSONL source, its batches of 4 rows read as `num_shards` shards."""
    config = run_config()
    config.steps = 1
    config.model = ConfigDict(dict(preset="tiny", init_from="", init_fresh=(), overrides={}))
    config.data.sources = {"qa": dict(kind="jsonl", path=str(jsonl))}
    config.data.update(seq_len=64, max_patches=64, batch_size=4, num_shards=num_shards)
    return config


def example_labels(batch: TrainingBatch) -> list[list[str]]:
    """Per row, the "example N" label of each example packed into it (byte tokenizer: ids < 256 are bytes)."""
    labels = []
    for row, segments in zip(batch.input_ids, batch.segment_ids):
        labels.append([])
        for segment in range(1, int(segments.max(initial=0)) + 1):
            text = bytes(int(t) for t in row[segments == segment] if t < 256).decode(errors="replace")
            labels[-1].append(re.search(r"example \d+", text).group(0))
    return labels


def main(out: str, checkpoint: str, jsonl: str, parts: str = "all") -> None:
    """`parts`: "all", or "agreement,data" (the cheap parts, for runs of more processes)."""
    initialize_distributed()  # from the JAX_* variables the launcher sets
    results = dict(process_index=jax.process_index(), process_count=jax.process_count())
    results["agreement"] = agreement()
    if parts == "all":
        step = train_step(out)
        results["metrics"] = step["metrics"]
        results["loading"] = sharded_loading(checkpoint)
    results["data"] = data_shards(jsonl, os.path.join(out, "data_workdir"))
    with open(os.path.join(out, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(results, f)
    if parts == "all" and jax.process_index() == 0:
        np.savez(os.path.join(out, "gradients.npz"), **step["gradients"])


if __name__ == "__main__":
    main(*sys.argv[1:5])
