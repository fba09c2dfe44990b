"""Multimodal packing: several examples share one fixed-length token row and one fixed-size patch buffer.

grain's first-fit packer places each example into the first row where both its tokens and its patches fit,
giving per-feature segment ids (1, 2, ... per example, 0 = padding). `finalize` turns a packed row into the
model's arrays: positions restart per example (they were computed per example), each example's visual
tokens map to its own patches because both are stored in example order, and the ViT gets one segment per
(example, temporal group) so nothing attends across examples.
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.data.features import DROPPED, PATCH_FEATURES, TOKEN_FEATURES
from qwen3vl_jax.inputs.batch import BATCH_FIELDS, TrainingBatch
from qwen3vl_jax.inputs.model_inputs import visual_index
from qwen3vl_jax.parallel.context import align_patches

NUM_DROPPED = "num_dropped"
log = logging.getLogger(__name__)


def pack(dataset: grain.IterDataset, *, seq_len: int, max_patches: int, num_bins: int) -> grain.IterDataset:
    """Packs example features (see data.features) into rows of seq_len tokens and max_patches patches; the
    markers of skipped examples are removed and counted."""
    lengths = {**{k: seq_len for k in TOKEN_FEATURES}, **{k: max_patches for k in PATCH_FEATURES}}
    return grain.experimental.FirstFitPackIterDataset(
        _CountDrops(dataset),
        length_struct=lengths,
        num_packing_bins=num_bins,
        shuffle_bins=False,
        meta_features=(NUM_DROPPED,),
    )


def finalize(row: dict, config: ModelConfig, *, context_shards: int = 1) -> dict[str, np.ndarray]:
    """A packed row -> the TrainingBatch arrays of one row (no batch axis): the ModelInputs fields, targets,
    loss_mask and the number of examples dropped before the examples of this row. patch_segment_ids is derived
    from the examples' own patch groups (`patch_group`, 1, 2, ... within an example): one id per (example, temporal
    group) of the row. With context_shards > 1 the patch buffer is laid out for context parallelism
    (parallel.context.align_patches)."""
    segments = row["input_ids_segment_ids"]
    pair = row["pair_half"]
    if pair.any():  # preference pairs (data.features): example s -> chosen half 2s - 1, rejected half 2s
        segments = np.where(pair > 0, 2 * segments - (pair == 1), segments).astype(segments.dtype)
    patch_segments = row["pixel_patches_segment_ids"]
    finalized = dict(
        input_ids=row["input_ids"],
        segment_ids=segments,
        positions=np.ascontiguousarray(row["positions"].T),
        visual_index=visual_index(row["input_ids"], segments, config=config),
        pixel_patches=row["pixel_patches"],
        patch_segment_ids=_group_ids(patch_segments, row["patch_group"]),
        pos_embed_index=row["pos_embed_index"],
        pos_embed_weight=row["pos_embed_weight"],
        patch_rowcol=row["patch_rowcol"],
        targets=row["targets"],
        loss_mask=row["loss_mask"],
        num_dropped=np.int32(sum(row.get(NUM_DROPPED, ()))),
    )
    return align_patches(finalized, shards=context_shards)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> TrainingBatch:
    """Stacked rows (the TrainingBatch arrays) as a TrainingBatch of `batch_size` rows: the last, partial batch of a
    finite dataset is filled up with empty rows (all padding: no token in them is trained on, scored or counted),
    so that no example is lost and shapes stay static."""
    missing = batch_size - len(batch["input_ids"])
    if missing:
        batch = {
            name: np.concatenate([value, np.full((missing, *value.shape[1:]), BATCH_FIELDS[name].fill, value.dtype)])
            for name, value in batch.items()
        }
    return TrainingBatch.from_arrays(batch)


def _group_ids(example: np.ndarray, group: np.ndarray) -> np.ndarray:
    """1, 2, ... for each distinct consecutive (example, group) pair; 0 for padding."""
    real = example > 0
    key = example.astype(np.int64) * (int(group.max(initial=0)) + 1) + group
    new = real & (key != np.concatenate([[-1], key[:-1]]))
    return (np.cumsum(new) * real).astype(np.int32)


class _CountDrops(grain.IterDataset):
    """Removes the markers of skipped examples and records how many preceded each kept example."""

    def __iter__(self):
        return _CountDropsIterator(self._parent.__iter__())


class _CountDropsIterator(grain.DatasetIterator):
    def __next__(self) -> dict:
        dropped = 0
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if dropped:
                    log.warning("%d skipped examples at the end of the data are not reported in any batch", dropped)
                raise
            if DROPPED in element:
                dropped += 1
                continue
            element[NUM_DROPPED] = dropped
            return element

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
