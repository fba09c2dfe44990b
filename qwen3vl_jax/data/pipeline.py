"""The grain input pipeline: sources -> shuffle/repeat -> per-host shard -> featurize (in worker processes)
-> multimodal packing -> batches of static shape. Its iterator state is checkpointable (get_state/set_state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
from absl import flags

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.data.features import Featurizer
from qwen3vl_jax.data.packing import finalize, pack, pad_batch
from qwen3vl_jax.data.sources import mixture
from qwen3vl_jax.inputs.batch import TrainingBatch, concatenate
from qwen3vl_jax.processing import Processor


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline reads and the static shapes it produces."""

    sources: tuple[dict, ...]
    seq_len: int = 512  # tokens per packed row
    max_patches: int = 1024  # ViT patches per packed row (multiple of 4)
    batch_size: int = 8  # packed rows per batch (per host)
    packing_bins: int | None = None  # rows filled at once by first-fit packing (default: batch_size)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_examples: int | None = None  # only the first N examples of the (mixed, shuffled) stream; None: all
    workers: int = 0  # grain worker processes (0: in the main process)
    overflow: str = "truncate"  # examples longer than seq_len: "truncate" text or "drop"
    on_bad_input: str = "error"  # unreadable / invalid examples: "error" or "skip" (counted, logged)
    # the mesh's context axis: each row's patch buffer is laid out so that no image / temporal group crosses a
    # context shard's slot (parallel.context.align_patches); set by the trainer from its mesh
    context_shards: int = 1

    @classmethod
    def from_dict(cls, values: Any) -> DataConfig:
        """From a dict / ConfigDict; `sources` may be a list of specs or a mapping name -> spec (the form whose
        fields can be overridden on the command line: --config.data.sources.sft.path=...)."""
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        sources = values["sources"]
        values["sources"] = tuple(dict(s) for s in (sources.values() if isinstance(sources, dict) else sources))
        return cls(**values)


def build_dataset(
    config: DataConfig,
    processor: Processor,
    *,
    model_config: ModelConfig,
    shard_index: int = 0,
    shard_count: int = 1,
    shards_read: int = 1,
) -> grain.IterDataset:
    """TrainingBatches of numpy arrays (their num_dropped: examples skipped under on_bad_input="skip" since the
    previous batch). A finite dataset's last batch is filled up with empty rows.

    The (shuffled) stream is split into `shard_count` shards, shard s holding examples s, s + shard_count, ...;
    this reader reads shards shard_index .. shard_index + shards_read - 1. Each shard fills batch_size /
    shards_read rows of every batch, packed on its own: one process reading k shards sees exactly the batches
    that k processes reading one shard each see together (its rows in shard order)."""
    merge = model_config.vision.spatial_merge_size
    if config.max_patches % merge**2:
        raise ValueError(f"max_patches {config.max_patches} must be a multiple of {merge**2}")
    if config.batch_size % shards_read or not 0 <= shard_index <= shard_count - shards_read:
        raise ValueError(
            f"cannot read shards {shard_index}..{shard_index + shards_read - 1} of {shard_count} into batches of "
            f"{config.batch_size} rows (each shard fills an equal share of the rows)"
        )
    if shards_read > 1:
        rows = dataclasses.replace(config, batch_size=config.batch_size // shards_read, workers=0)
        per_shard = [
            _shard_batches(rows, processor, model_config=model_config, shard_index=s, shard_count=shard_count)
            for s in range(shard_index, shard_index + shards_read)
        ]
        ds = _ShardRows(per_shard, rows=rows)
    else:
        ds = _shard_batches(
            config, processor, model_config=model_config, shard_index=shard_index, shard_count=shard_count
        )
    if config.workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use the defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    return ds


class _ShardRows(grain.IterDataset):
    """Batches whose rows are the batches of several shards side by side; a shard whose share of a finite dataset
    has ended fills its rows with padding until every shard has ended (as a process does, multihost.in_lockstep)."""

    def __init__(self, shards: list[grain.IterDataset], *, rows: DataConfig):
        super().__init__(shards)
        self._rows = rows

    def __iter__(self) -> grain.DatasetIterator:
        return _ShardRowsIterator([iter(shard) for shard in self._parents], rows=self._rows)


class _ShardRowsIterator(grain.DatasetIterator):
    def __init__(self, shards: list[grain.DatasetIterator], *, rows: DataConfig):
        super().__init__(shards)
        self._shards, self._rows, self._ended = shards, rows, [False] * len(shards)

    def __next__(self) -> TrainingBatch:
        batches = []
        for index, shard in enumerate(self._shards):
            batch = None if self._ended[index] else next(shard, None)
            self._ended[index] = batch is None
            batches.append(batch)
        if all(self._ended):
            raise StopIteration
        rows = self._rows
        patch_dim = next(b for b in batches if b is not None).pixel_patches.shape[-1]
        filler = TrainingBatch.empty(
            rows.batch_size, seq_len=rows.seq_len, max_patches=rows.max_patches, patch_dim=patch_dim
        )
        return concatenate([filler if batch is None else batch for batch in batches])

    def get_state(self) -> dict:
        return dict(shards=[shard.get_state() for shard in self._shards], ended=list(self._ended))

    def set_state(self, state: dict) -> None:
        for shard, shard_state in zip(self._shards, state["shards"]):
            shard.set_state(shard_state)
        self._ended = list(state["ended"])


def _shard_batches(
    config: DataConfig, processor: Processor, *, model_config: ModelConfig, shard_index: int, shard_count: int
) -> grain.IterDataset:
    """One shard's packed batches of config.batch_size rows (build_dataset without worker processes)."""
    featurize = Featurizer(
        processor,
        model_config,
        seq_len=config.seq_len,
        max_patches=config.max_patches,
        overflow=config.overflow,
        on_bad_input=config.on_bad_input,
    )
    ds = mixture(config.sources)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_examples is not None:
        ds = ds[: config.num_examples]
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds[shard_index::shard_count].map(featurize).to_iter_dataset()
    ds = pack(
        ds, seq_len=config.seq_len, max_patches=config.max_patches, num_bins=config.packing_bins or config.batch_size
    )
    finalize_row = functools.partial(finalize, config=model_config, context_shards=config.context_shards)
    ds = ds.map(finalize_row).batch(config.batch_size, drop_remainder=False)
    return ds.map(functools.partial(pad_batch, batch_size=config.batch_size))
