"""Supervised fine-tuning: the weighted token cross-entropy of the supervised (answer) tokens, normalised over the
whole batch as `loss_normalization` says (training/loss.py). `config.objective = "sft"`; no config section."""

from __future__ import annotations

from typing import Any

import jax
from ml_collections import ConfigDict

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.training.objectives.base import (
    Counters,
    Objective,
    StepSettings,
    token_counters,
    token_losses,
    weighted_ce,
)


class CrossEntropy(Objective):
    """sum(w * CE) / sum(w) over the batch's supervised tokens."""

    def loss(
        self,
        params: Any,
        batch: TrainingBatch,
        *,
        frozen_params: Any,
        totals: dict[str, jax.Array],
        settings: StepSettings,
        dropout_rng: jax.Array | None,
    ) -> tuple[jax.Array, Counters, Any]:
        del frozen_params
        ce, correct, router_logits = token_losses(
            settings.model, params, batch, loss_chunk=settings.loss_chunk, dropout_rng=dropout_rng
        )
        term = weighted_ce(ce, batch, normalization=settings.normalization, total_weight=totals["ce_weight"])
        return term, token_counters(ce, correct, batch, ce=term), router_logits


def from_config(config: ConfigDict, model_config: ModelConfig) -> CrossEntropy:
    del config, model_config
    return CrossEntropy()
