"""Records -> per-example feature arrays for packing, with the policies for inputs that do not fit or are bad.

A record is a dict with an "id" and either "messages" (a conversation: assistant replies are supervised) or
"document" (interleaved text/media: all text is supervised). Media paths are relative to record["base_dir"].

A preference record (DPO, training/objectives/dpo.py) has "chosen" and "rejected" answers (a string, or an assistant
message's content) after "messages" (the conversation so far, ending with a user turn) or after "prompt" (a
string) with optional "images" / "videos" (shown before it). It becomes one example holding both conversations,
chosen then rejected, each with its own positions and its own copy of the media; the token feature `pair_half`
(1: chosen, 2: rejected) lets `packing.finalize` give the two halves their own segments, so a pair is never
split across rows and the halves never attend each other.
"""

from __future__ import annotations

import logging

import numpy as np

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.model_inputs import sequence_features
from qwen3vl_jax.inputs.positions import IMAGE, VIDEO, visual_blocks
from qwen3vl_jax.processing import DataError, Encoded, Processor

log = logging.getLogger(__name__)

TOKEN_FEATURES = ("input_ids", "targets", "loss_mask", "positions", "pair_half")
PATCH_FEATURES = ("pixel_patches", "patch_group", "pos_embed_index", "pos_embed_weight", "patch_rowcol")
OVERFLOW_POLICIES = ("truncate", "drop")
BAD_INPUT_POLICIES = ("error", "skip")
DROPPED = "dropped"  # key of the marker a skipped record becomes


class TooLong(DataError):
    """A text-only overflow under overflow="drop": always dropped and counted, whatever on_bad_input says."""


def example_features(
    encoded: Encoded, config: ModelConfig, *, seq_len: int, max_patches: int, overflow: str, where: str
) -> dict[str, np.ndarray]:
    """Arrays of one example: input_ids, targets (the next token), loss_mask (the target is supervised) and 3-D
    positions (n, 3) (those of `Qwen3VLModel.get_rope_index`), plus its patch features (PATCH_FEATURES: pixels
    and the grid-dependent ViT inputs, computed here on the host so that the jitted model sees static shapes).

    An example longer than `seq_len` is cut to `seq_len` tokens under overflow="truncate", or raises TooLong
    under "drop". One whose visual tokens reach past `seq_len`, or with more than `max_patches` patches,
    raises DataError (a bad input)."""
    ids, supervised = encoded.input_ids, encoded.supervised
    targets = np.append(ids[1:], 0).astype(np.int32)
    loss_mask = np.append(supervised[1:], False)
    if len(ids) > seq_len:
        visual = np.flatnonzero((ids == config.image_token_id) | (ids == config.video_token_id))
        if len(visual) and visual[-1] >= seq_len:
            raise DataError(
                f"{where}: {len(ids)} tokens do not fit seq_len = {seq_len} and visual tokens reach "
                f"position {visual[-1]}, so the text cannot be truncated"
            )
        if overflow == "drop":
            raise TooLong(f"{where}: {len(ids)} tokens do not fit seq_len = {seq_len}")
        ids, targets, loss_mask = ids[:seq_len], targets[:seq_len], loss_mask[:seq_len]
    patches = len(encoded.pixel_values) + len(encoded.pixel_values_videos)
    if patches > max_patches:
        raise DataError(f"{where}: {patches} patches do not fit max_patches = {max_patches}")
    merge = config.vision.spatial_merge_size
    images, videos = visual_blocks(encoded.image_grid_thw, encoded.video_grid_thw, merge=merge)
    image_iter, video_iter = iter(images), iter(videos)
    pixels = {IMAGE: encoded.pixel_values, VIDEO: encoded.pixel_values_videos}
    try:
        features = sequence_features(config, ids, images=image_iter, videos=video_iter, pixels=pixels, where=where)
    except ValueError as e:
        raise DataError(str(e)) from None
    if next(image_iter, None) or next(video_iter, None):
        raise DataError(f"{where}: more images/videos than placeholder tokens")
    return dict(
        features,
        input_ids=ids.astype(np.int32),
        targets=targets,
        loss_mask=loss_mask.astype(np.int32),
        pair_half=np.zeros(len(ids), np.int32),
    )


def preference_conversations(record: dict) -> tuple[list[dict], list[dict]]:
    """The chosen and the rejected conversation of a preference record (see the module docstring)."""
    if "messages" in record:
        prompt = list(record["messages"])
        if not prompt or prompt[-1].get("role") != "user":
            raise DataError("a preference record's messages must end with a user turn (the answers follow it)")
    elif "prompt" in record:
        media = [{"type": "image", "image": x} for x in record.get("images", [])]
        media += [{"type": "video", "video": x} for x in record.get("videos", [])]
        prompt = [{"role": "user", "content": [*media, {"type": "text", "text": record["prompt"]}]}]
    else:
        raise DataError("a preference record needs 'messages' or 'prompt' before its answers")
    answers = []
    for key in ("chosen", "rejected"):
        answer = record.get(key)
        if not answer:
            raise DataError(f"a preference record needs a non-empty {key!r} answer")
        answers.append([*prompt, {"role": "assistant", "content": answer}])
    return answers[0], answers[1]


def pair_features(chosen: dict[str, np.ndarray], rejected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One example of both halves: token and patch features concatenated, chosen first; the rejected half's
    patch groups numbered after the chosen half's (its images are separate images for the ViT)."""
    rejected = dict(rejected, patch_group=rejected["patch_group"] + int(chosen["patch_group"].max(initial=0)))
    pair = {name: np.concatenate([chosen[name], rejected[name]]) for name in chosen}
    pair["pair_half"] = np.concatenate(
        [np.full(len(chosen["input_ids"]), 1, np.int32), np.full(len(rejected["input_ids"]), 2, np.int32)]
    )
    return pair


class Featurizer:
    """record -> example features, or a {DROPPED: reason} marker (bad inputs under on_bad_input="skip", and
    too-long examples under overflow="drop"). Picklable, so it runs inside grain worker processes."""

    def __init__(
        self,
        processor: Processor,
        config: ModelConfig,
        *,
        seq_len: int,
        max_patches: int,
        overflow: str = "truncate",
        on_bad_input: str = "error",
    ):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow policy {overflow!r} not in {OVERFLOW_POLICIES}")
        if on_bad_input not in BAD_INPUT_POLICIES:
            raise ValueError(f"bad-input policy {on_bad_input!r} not in {BAD_INPUT_POLICIES}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(processor, name) != getattr(config, name):
                raise ValueError(
                    f"tokenizer and model disagree on {name}: {getattr(processor, name)} vs {getattr(config, name)}"
                )
        self.processor, self.config = processor, config
        self.seq_len, self.max_patches = seq_len, max_patches
        self.overflow, self.on_bad_input = overflow, on_bad_input

    def __call__(self, record: dict) -> dict:
        where = f"example {record.get('id', '?')}"
        try:
            if "error" in record:  # a source could not even read the record
                raise DataError(record["error"])
            if "chosen" in record or "rejected" in record:
                return self.preference_pair(record, where=where)
            encoded = self.encode(record)
            return example_features(
                encoded,
                self.config,
                seq_len=self.seq_len,
                max_patches=self.max_patches,
                overflow=self.overflow,
                where=where,
            )
        except DataError as e:
            message = str(e) if str(e).startswith(where) else f"{where}: {e}"
            if self.on_bad_input == "error" and not isinstance(e, TooLong):
                raise DataError(message) from None
            log.warning("skipping %s", message)
            return {DROPPED: message}

    def preference_pair(self, record: dict, *, where: str) -> dict[str, np.ndarray]:
        """Both answers of a preference record as one example; a pair that does not fit one row whole is too long
        (dropped and counted under overflow="drop", else a bad input): truncating it would cut an answer."""
        base_dir = record.get("base_dir", "")
        too_long = TooLong if self.overflow == "drop" else DataError
        try:
            halves = [
                example_features(
                    self.processor.encode_conversation(messages, base_dir),
                    self.config,
                    seq_len=self.seq_len,
                    max_patches=self.max_patches,
                    overflow="drop",
                    where=where,
                )
                for messages in preference_conversations(record)
            ]
        except TooLong as e:
            raise too_long(f"{e} (one answer of a preference pair)") from None
        pair = pair_features(*halves)
        tokens, patches = len(pair["input_ids"]), len(pair["pixel_patches"])
        if patches > self.max_patches:
            raise DataError(
                f"{where}: the preference pair's {patches} patches do not fit max_patches = {self.max_patches}"
            )
        if tokens > self.seq_len:
            raise too_long(f"{where}: the preference pair's {tokens} tokens do not fit seq_len = {self.seq_len}")
        return pair

    def encode(self, record: dict) -> Encoded:
        base_dir = record.get("base_dir", "")
        if "messages" in record:
            return self.processor.encode_conversation(record["messages"], base_dir)
        if "document" in record:
            return self.processor.encode_document(record["document"], base_dir)
        raise DataError("record has neither 'messages' nor 'document'")
