"""Tokenizers (the `tokenizers` library): a checkpoint's `tokenizer.json`, or a byte-level tokenizer with the
Qwen special tokens for from-scratch training of tiny models (vocabulary 282 instead of 151,669)."""

from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# The tokens Qwen3 adds after its byte-level BPE vocabulary, in id order (151643 ...); the first 14 are special.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
NUM_SPECIAL = 14


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_tokenizer() -> Tokenizer:
    """Bytes 0..255 are ids 0..255; the Qwen added tokens follow (ids 256..281)."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for i, token in enumerate(QWEN_ADDED_TOKENS):
        special = i < NUM_SPECIAL
        added = AddedToken(token, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([added])
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """`path/tokenizer.json`."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    return Tokenizer.from_file(file)


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a token the model needs; a clear error when the tokenizer lacks it."""
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no token {token!r}")
    return i
