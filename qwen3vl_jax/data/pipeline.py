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
) -> grain.IterDataset:
    """Batches (dicts of numpy arrays with a leading batch axis): the ModelInputs fields plus `targets`,
    `loss_mask` and `num_dropped` (examples skipped under on_bad_input="skip" since the previous batch). A finite
    dataset's last batch is filled up with empty rows.
    Host `shard_index` of `shard_count` reads its own slice of the (shuffled) stream."""
    merge = model_config.vision.spatial_merge_size
    if config.max_patches % merge**2:
        raise ValueError(f"max_patches {config.max_patches} must be a multiple of {merge**2}")
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
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds[shard_index::shard_count].map(featurize).to_iter_dataset()
    ds = pack(
        ds, seq_len=config.seq_len, max_patches=config.max_patches, num_bins=config.packing_bins or config.batch_size
    )
    finalize_row = functools.partial(finalize, config=model_config, context_shards=config.context_shards)
    ds = ds.map(finalize_row).batch(config.batch_size, drop_remainder=False)
    ds = ds.map(functools.partial(pad_batch, batch_size=config.batch_size))
    if config.workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use the defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    return ds
