"""The training batch: packed rows as the data pipeline yields them and the train and eval steps take them. Its
field table (BATCH_FIELDS: shapes, dtypes, padding, which axis a context-parallel mesh splits) is the one list
that the pipeline, the sharding rules (parallel/sharding.py), the step and the compile planner read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import numpy as np

from qwen3vl_jax.inputs.model_inputs import INPUT_FIELDS, ArrayField, ModelInputs

# the model's inputs, then what the loss reads, then what the host reports (never read by a step)
BATCH_FIELDS = dict(
    INPUT_FIELDS,
    targets=ArrayField(("L",)),
    loss_mask=ArrayField(("L",)),
    num_dropped=ArrayField(()),
)


@flax.struct.dataclass
class TrainingBatch:
    """B packed rows of L tokens and P patches. The ModelInputs fields (model_inputs.py), then:

    targets      (B, L) int32: the next token of each position
    loss_mask    (B, L) int32: 1 where the target is supervised (an answer token)
    num_dropped  (B,) int32: examples skipped (bad inputs, too long) before each row's examples, for the metrics
    extra        {name: (B, L, ...) array}: what an objective adds to its batches (offline distillation: the
                 teacher's top-k logits and ids, training/objectives/distill.py); split like the tokens
    """

    input_ids: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    visual_index: jax.Array
    pixel_patches: jax.Array
    patch_segment_ids: jax.Array
    pos_embed_index: jax.Array
    pos_embed_weight: jax.Array
    patch_rowcol: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    num_dropped: jax.Array
    extra: dict[str, Any] = flax.struct.field(default_factory=dict)

    @property
    def inputs(self) -> ModelInputs:
        """The model's inputs."""
        return ModelInputs(**{name: getattr(self, name) for name in INPUT_FIELDS})

    @property
    def arrays(self) -> dict[str, Any]:
        """Every array by name: the BATCH_FIELDS, then the extra ones."""
        return {**{name: getattr(self, name) for name in BATCH_FIELDS}, **self.extra}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None) -> TrainingBatch:
        """From {name: array} holding every BATCH_FIELDS name (and nothing else)."""
        unknown = sorted(set(arrays) - set(BATCH_FIELDS))
        missing = sorted(set(BATCH_FIELDS) - set(arrays))
        if unknown or missing:
            raise ValueError(
                f"a training batch's arrays are {list(BATCH_FIELDS)}: unknown {unknown}, missing {missing}"
            )
        return cls(**arrays, extra=dict(extra or {}))

    @classmethod
    def empty(cls, batch_size: int, *, seq_len: int, max_patches: int, patch_dim: int) -> TrainingBatch:
        """`batch_size` rows of padding (numpy): nothing in them is trained on, scored or counted."""
        sizes = dict(seq_len=seq_len, max_patches=max_patches, patch_dim=patch_dim)
        return cls.from_arrays(
            {
                name: np.full(field.shape(batch_size, **sizes), field.fill, field.dtype)
                for name, field in BATCH_FIELDS.items()
            }
        )

    @classmethod
    def abstract(
        cls,
        batch_size: int,
        *,
        seq_len: int,
        max_patches: int,
        patch_dim: int,
        extra: Mapping[str, jax.ShapeDtypeStruct] | None = None,
    ) -> TrainingBatch:
        """ShapeDtypeStructs of a batch (a compile target)."""
        sizes = dict(seq_len=seq_len, max_patches=max_patches, patch_dim=patch_dim)
        return cls.from_arrays(
            {
                name: jax.ShapeDtypeStruct(field.shape(batch_size, **sizes), field.dtype)
                for name, field in BATCH_FIELDS.items()
            },
            extra=extra,
        )

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


def concatenate(batches: list[TrainingBatch]) -> TrainingBatch:
    """Batches' rows one after the other (numpy)."""
    return jax.tree_util.tree_map(lambda *arrays: np.concatenate(arrays), *batches)
