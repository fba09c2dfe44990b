"""Turning conversations, images and videos into token ids and pixel patches, as transformers' `Qwen3VLProcessor`."""

from qwen3vl_jax.processing.errors import DataError
from qwen3vl_jax.processing.processor import Encoded, Processor, VisionProcessingConfig, load_processor
from qwen3vl_jax.processing.tokenizer import byte_tokenizer

__all__ = ["DataError", "Encoded", "Processor", "VisionProcessingConfig", "byte_tokenizer", "load_processor"]
