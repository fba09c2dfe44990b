"""Pure-functional Flax modules of Qwen3-VL (one mechanism per file)."""

from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params, dummy_inputs, init_params

__all__ = ["Qwen3VL", "abstract_params", "dummy_inputs", "init_params"]
