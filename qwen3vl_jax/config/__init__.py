"""The model configuration (`model`), its presets (`presets`) and the transformers config.json form (`hf_json`)."""

from qwen3vl_jax.config.hf_json import from_hf, to_hf
from qwen3vl_jax.config.model import LoraConfig, ModelConfig, TextConfig, VisionConfig
from qwen3vl_jax.config.presets import PRESETS, preset

__all__ = ["PRESETS", "LoraConfig", "ModelConfig", "TextConfig", "VisionConfig", "from_hf", "preset", "to_hf"]
