"""Cache a teacher's top-k logits over a distillation run's batches, for offline distillation.

    python -m experiments.cache_teacher --config=configs/tiny.py --config.distill.teacher=/path/to/teacher/hf \
        --cache_dir=/tmp/teacher_cache [--config.distill.top_k=32]
    python -m experiments.train --config=configs/tiny.py --config.objective=distill \
        --config.distill.teacher_cache=/tmp/teacher_cache ...

The config is the student's training config as for online distillation (read with objective "distill"): its data
(config and seed), vision processing, steps and distill.all_text_tokens decide which batches and positions are
cached, and a student run reading the cache must have the same ones (qwen3vl_jax.training.teacher_cache). Run
again on the same directory, it continues after the last step written. Several processes (--coordinator_address
... or the JAX_* variables; experiments.launch_local) each read their share of the data as the trainer would and
process 0 writes whole global batches; one process with --config.data.num_shards=N writes the same cache as N
processes.
"""

import dataclasses
import itertools
import os

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict, config_flags
from tqdm import tqdm

from experiments import cli
from experiments.distributed_flags import join_run
from qwen3vl_jax import storage
from qwen3vl_jax.api import to_numpy
from qwen3vl_jax.data.pipeline import build_dataset
from qwen3vl_jax.parallel.sharding import batch_shardings, global_batch, make_mesh, row_groups
from qwen3vl_jax.training.builder import StepBuilder, processor_from
from qwen3vl_jax.training.objectives.distill import make_top_k_step
from qwen3vl_jax.training.teacher_cache import (
    METADATA,
    TeacherCacheError,
    comparable_data,
    step_file,
    stream_description,
    write_metadata,
    write_step,
)
from qwen3vl_jax.training.trainer import data_shards, host_data_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "The student's training config (with distill.teacher).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where the cache goes (local or gs://).", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config, directory = _CONFIG.value, _CACHE_DIR.value
    if not config.distill.teacher:
        raise app.UsageError("set --config.distill.teacher to the teacher's HF checkpoint directory")
    join_run(config)
    write_cache(config, directory)
    print(f"cached the teacher's top {config.distill.top_k} logits of {config.steps} steps in {directory}")


def write_cache(config: ConfigDict, directory: str) -> None:
    """The teacher's (config.distill.teacher) top-k logits for each of the config.steps batches of a training
    run with `config`, from the first step not yet in `directory`. With several processes each reads its share of
    the data as the trainer does and computes its rows; process 0 writes whole global batches."""
    config = ConfigDict(config.to_dict())
    config.objective = "distill"  # the student's run as online distillation from distill.teacher
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
    teacher = builder.objective.teacher  # an OnlineDistillation: distill.teacher is set (distill.teacher_cache not)
    row_group, row_group_count = row_groups(builder.mesh)
    first_shard, shards_read, num_shards = data_shards(
        config.data.num_shards, row_group=row_group, row_group_count=row_group_count
    )
    data = host_data_config(
        config.data,
        global_batch_size=builder.global_batch_size(config.data),
        row_group_count=row_group_count,
        context_shards=builder.mesh.shape["context"],
    )
    metadata = dict(
        teacher=config.distill.teacher,
        top_k=config.distill.top_k,
        vocab_size=teacher.text.vocab_size,
        all_text_tokens=config.distill.all_text_tokens,
        steps=config.steps,
        data=stream_description(dataclasses.asdict(data), row_group_count=row_group_count, num_shards=num_shards),
        processing=comparable_data(config.processing.to_dict()),
    )
    existing = os.path.join(directory, METADATA)
    if storage.path(existing).exists():
        previous = {k: v for k, v in storage.read_json(existing).items() if k != "format"}
        if previous != metadata:
            raise TeacherCacheError(f"{existing} was written for another run; use a new --cache_dir")
    # process 0's view of where to continue, on every process (before it writes anything)
    start = next(step for step in itertools.count() if not storage.path(step_file(directory, step)).exists())
    start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
    if jax.process_index() == 0:
        write_metadata(directory, **metadata)

    top_k_step = jax.jit(
        make_top_k_step(
            teacher,
            k=config.distill.top_k,
            chunk=config.loss_chunk,
            all_text_tokens=config.distill.all_text_tokens,
        ),
        in_shardings=(builder.frozen_shardings, batch_shardings(builder.mesh)),
    )
    (teacher_params,) = builder.frozen_params
    processor = processor_from(config)
    dataset = build_dataset(
        data,
        processor,
        model_config=builder.model_config,
        shard_index=first_shard,
        shard_count=num_shards,
        shards_read=shards_read,
    )
    iterator = iter(dataset)
    with jax.set_mesh(builder.mesh), nn.logical_axis_rules(builder.rules):
        for step in tqdm(range(config.steps), desc="teacher top-k", disable=jax.process_index() != 0):
            batch = next(iterator)
            if step < start:  # written by an earlier run: the stream is replayed to reach the first missing step
                continue
            rows = global_batch(batch, builder.mesh, row_group_count=row_group_count)
            top_logits, top_ids, keep = (to_numpy(x) for x in top_k_step(teacher_params, rows))
            input_ids, loss_mask = to_numpy(rows.input_ids), to_numpy(rows.loss_mask)  # the global batch
            if jax.process_index() == 0:
                write_step(
                    directory,
                    step,
                    input_ids=input_ids,
                    loss_mask=loss_mask,
                    keep=keep,
                    top_logits=top_logits,
                    top_ids=top_ids,
                )


if __name__ == "__main__":
    cli.run(main)
