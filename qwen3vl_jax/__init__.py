"""qwen3vl_jax: Qwen3-VL in JAX/Flax, numerically identical to transformers."""

from qwen3vl_jax.api import Qwen3VLModel, load_pretrained
from qwen3vl_jax.config import ModelConfig, TextConfig, VisionConfig, from_hf, preset, to_hf
from qwen3vl_jax.inputs.model_inputs import ModelInputs
from qwen3vl_jax.inputs.positions import rope_index
from qwen3vl_jax.processing import Processor, load_processor

__all__ = [
    "ModelConfig",
    "ModelInputs",
    "Processor",
    "Qwen3VLModel",
    "TextConfig",
    "VisionConfig",
    "from_hf",
    "load_pretrained",
    "load_processor",
    "preset",
    "rope_index",
    "to_hf",
]
