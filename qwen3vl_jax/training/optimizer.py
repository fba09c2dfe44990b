"""optax AdamW with linear warmup + cosine decay, global-norm clipping, and optional freezing of the ViT,
the mergers or the LLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from qwen3vl_jax.modeling.layers import is_lora

FREEZABLE = ("vision", "mergers", "llm")


def learning_rate_schedule(lr: float, *, warmup_steps: int, total_steps: int, final_lr_ratio: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=lr * final_lr_ratio,
    )


def part_of(path: tuple[str, ...]) -> str:
    """Which freezable part a parameter belongs to: "vision" (patch embed, position table, blocks),
    "mergers" (main and DeepStack mergers) or "llm" (embedding, decoder, head)."""
    if path[0] != "visual":
        return "llm"
    return "mergers" if path[1] == "merger" or path[1].startswith("deepstack_merger") else "vision"


def is_frozen(path: tuple[str, ...], *, freeze: Sequence[str], lora: bool) -> bool:
    """A parameter of a frozen part, or, when training LoRA adapters, any parameter that is not an adapter."""
    return part_of(path) in freeze or (lora and not is_lora(path))


def stop_frozen_gradients(params: Any, freeze: Sequence[str], *, lora: bool = False) -> Any:
    """params with jax.lax.stop_gradient on the frozen parts: no backward pass runs into a frozen ViT (nor are
    its activations kept for one), and the frozen parameters' gradients are zero. lora: every parameter but the
    adapters is frozen (their weight gradients are never computed)."""
    if not freeze and not lora:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (
            jax.lax.stop_gradient(p) if is_frozen(tuple(k.key for k in path), freeze=freeze, lora=lora) else p
        ),
        params,
    )


def make_optimizer(
    config: Any, *, total_steps: int, params: Any, lora: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """config: lr, warmup_steps, final_lr_ratio, b1, b2, eps, weight_decay, clip_norm, freeze (subset of
    FREEZABLE). Weight decay applies to matrices only (not norms or biases). Frozen parameters get zero updates
    and no optimizer state; with lora, everything but the LoRA adapters is frozen."""
    freeze: Sequence[str] = tuple(config.freeze)
    unknown = set(freeze) - set(FREEZABLE)
    if unknown:
        raise ValueError(f"cannot freeze {sorted(unknown)}; freezable parts are {FREEZABLE}")
    schedule = learning_rate_schedule(
        config.lr, warmup_steps=config.warmup_steps, total_steps=total_steps, final_lr_ratio=config.final_lr_ratio
    )
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    adamw = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask
        ),
    )
    if not freeze and not lora:
        return adamw, schedule
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if is_frozen(tuple(k.key for k in path), freeze=freeze, lora=lora) else "trained",
        params,
    )
    return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels), schedule
