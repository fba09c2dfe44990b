"""Prompt records for reinforcement learning: a question with its media, the reference answer and the reward that
scores sampled answers against it (training/rewards.py). Any source of data.sources yields them:

    {"messages": [..., {"role": "user", "content": [...]}], "answer": "B", "reward": "choice"}
    {"prompt": "How many apples?", "images": ["img/apples.png"], "answer": "3",
     "reward": {"name": "numeric", "abs_tolerance": 0.5}}
    a conversation ending with the assistant's answer (the built-in tasks, SFT records): the prompt is the
    conversation before it and the reference its text, or the record's "answer" when it has one

`reward` is a reward name, a spec ({"name", "weight", options...}) or a list of specs (their weighted sum);
without one the record takes its source spec's "reward" (data.sources), else its built-in task's (TASK_REWARDS),
else the run's default (config.grpo.rewards). `meta` (a dict) goes to the reward functions (e.g. a grounding
task's true box). Media paths are relative to the record's base_dir (the JSONL file's folder).

`PromptEncoder` turns a record into a `Prompt` (the record, tokenised up to the model's turn, with its pixels);
`prompt_batches` yields `PromptBatch`es of a fixed number of them from the shuffled, repeated sources, skipping
(and counting) bad records under on_bad_input="skip".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.data.features import BAD_INPUT_POLICIES
from qwen3vl_jax.data.sources import mixture, split_record
from qwen3vl_jax.processing import DataError, Encoded, Processor
from qwen3vl_jax.training.rewards import RewardSpec, reward_function

log = logging.getLogger(__name__)

# the reward each built-in task's answers are scored with (data/synthetic.py, data/digits.py)
TASK_REWARDS: dict[str, str] = dict(
    shapes="exact",
    counting="exact",
    grounding="box_iou",
    ocr="exact",
    video_timestamp="timestamp",
    digits="exact",
    grid_grounding="box_iou",
    small_object_grounding="box_iou",
    small_object_counting="exact",
    small_object_presence="exact",
    text_reverse="exact",
)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt: its id, the conversation up to the model's turn (ending with a user turn), the reference answer,
    the reward functions that score answers (RewardSpec) and the `meta` they read; media paths relative to
    base_dir."""

    id: str
    messages: list[dict]
    reference: str
    reward: tuple[RewardSpec, ...]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base_dir: str = ""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A PromptRecord and its tokens up to the model's turn with its pixels (processor.encode_prompt)."""

    record: PromptRecord
    encoded: Encoded

    @property
    def num_patches(self) -> int:
        return len(self.encoded.pixel_values) + len(self.encoded.pixel_values_videos)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts for one rollout and the number of bad records skipped while reading them."""

    prompts: list[Prompt]
    dropped: int = 0


def reward_specs(value: Any) -> tuple[RewardSpec, ...]:
    """A record's or a config's "reward": a name, a spec dict or a list of them, as RewardSpecs (each function
    resolved once here, so that an unknown name fails now, naming it)."""
    if value is None or (isinstance(value, Sequence) and not isinstance(value, str) and not value):
        return ()
    items = [value] if isinstance(value, (str, Mapping)) or hasattr(value, "to_dict") else list(value)
    items = [item.to_dict() if hasattr(item, "to_dict") else item for item in items]  # ConfigDicts
    specs = tuple(spec if isinstance(spec, RewardSpec) else RewardSpec.from_dict(spec) for spec in items)
    for spec in specs:
        reward_function(spec.name)
    return specs


def prompt_record(record: Mapping[str, Any], *, default_reward: Sequence[RewardSpec] = ()) -> PromptRecord:
    """A source's record as a PromptRecord (module docstring); DataError naming what is wrong with it."""
    if "error" in record:  # a source could not read it
        raise DataError(record["error"])
    if "messages" in record:
        messages = list(record["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages, reference = split_record(dict(record, messages=messages))
        elif "answer" not in record:
            raise DataError("a prompt record whose messages end with a user turn needs an 'answer' (the reference)")
        else:
            reference = record["answer"]
        if not messages or messages[-1].get("role") != "user":
            raise DataError("a prompt record's messages must end with a user turn (before the answer, if any)")
    elif "prompt" in record:
        if "answer" not in record:
            raise DataError("a prompt record needs an 'answer' (the reference the reward compares with)")
        media = [{"type": "image", "image": x} for x in record.get("images", [])]
        media += [{"type": "video", "video": x} for x in record.get("videos", [])]
        messages = [{"role": "user", "content": [*media, {"type": "text", "text": str(record["prompt"])}]}]
        reference = record["answer"]
    else:
        raise DataError("a prompt record needs 'messages' or 'prompt' (and an 'answer')")
    meta = record.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise DataError(f"a prompt record's 'meta' must be an object, got {type(meta).__name__}")
    try:
        reward = reward_specs(record.get("reward"))
    except ValueError as error:
        raise DataError(str(error)) from None
    reward = reward or reward_specs(TASK_REWARDS.get(record.get("task", ""))) or tuple(default_reward)
    if not reward:
        raise DataError(
            "the prompt record names no reward (its 'reward', its source's 'reward', a built-in task, or "
            "config.grpo.rewards)"
        )
    return PromptRecord(
        id=str(record.get("id", "?")),
        messages=messages,
        reference=str(reference),
        reward=reward,
        meta=dict(meta),
        base_dir=record.get("base_dir", ""),
    )


class PromptEncoder:
    """record -> Prompt, or {"dropped": reason} for a bad record under on_bad_input="skip" (one whose prompt has
    more than max_prompt_tokens tokens or max_prompt_patches patches is bad: it fits no rollout slot).
    Picklable, so it runs inside grain worker processes."""

    def __init__(
        self,
        processor: Processor,
        config: ModelConfig,
        *,
        max_prompt_tokens: int,
        max_prompt_patches: int,
        default_reward: Sequence[RewardSpec] = (),
        on_bad_input: str = "error",
    ):
        if on_bad_input not in BAD_INPUT_POLICIES:
            raise ValueError(f"bad-input policy {on_bad_input!r} not in {BAD_INPUT_POLICIES}")
        if processor.image_token_id != config.image_token_id or processor.video_token_id != config.video_token_id:
            raise ValueError("the processor's and the model's image / video token ids differ")
        self.processor, self.config = processor, config
        self.max_prompt_tokens, self.max_prompt_patches = max_prompt_tokens, max_prompt_patches
        self.default_reward, self.on_bad_input = tuple(default_reward), on_bad_input

    def __call__(self, record: dict) -> Prompt | dict:
        where = f"prompt record {record.get('id', '?')}"
        try:
            prompt = prompt_record(record, default_reward=self.default_reward)
            encoded = self.processor.encode_prompt(prompt.messages, prompt.base_dir)
            tokens = len(encoded.input_ids)
            patches = len(encoded.pixel_values) + len(encoded.pixel_values_videos)
            if tokens > self.max_prompt_tokens:
                raise DataError(f"{tokens} prompt tokens do not fit grpo.max_prompt_tokens = {self.max_prompt_tokens}")
            if patches > self.max_prompt_patches:
                raise DataError(
                    f"{patches} patches do not fit a rollout slot's {self.max_prompt_patches} (data.max_patches / "
                    f"sequences per row)"
                )
            return Prompt(prompt, encoded)
        except DataError as error:
            message = f"{where}: {error}"
            if self.on_bad_input == "error":
                raise DataError(message) from None
            log.warning("skipping %s", message)
            return {"dropped": message}


def prompt_batches(
    sources: Sequence[dict],
    encoder: PromptEncoder,
    *,
    prompts: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    workers: int = 0,
) -> grain.IterDataset:
    """PromptBatches of `prompts` prompts each from the mixed `sources` (shuffled with `seed`, repeated
    num_epochs times, None: forever); bad records are skipped and counted (PromptEncoder). The last batch of a
    finite stream may be short. Checkpointable like the training pipeline (get_state / set_state)."""
    if prompts < 1:
        raise ValueError(f"a rollout needs at least one prompt, got {prompts}")
    ds = mixture(sources)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(encoder).to_iter_dataset()
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return _PromptBatches(ds, prompts=prompts)


class _PromptBatches(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, *, prompts: int):
        super().__init__(parent)
        self._prompts = prompts

    def __iter__(self) -> grain.DatasetIterator:
        return _PromptBatchesIterator(self._parent.__iter__(), prompts=self._prompts)


class _PromptBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, prompts: int):
        super().__init__(parent)
        self._prompts = prompts

    def __next__(self) -> PromptBatch:
        prompts, dropped = [], 0
        while len(prompts) < self._prompts:
            try:
                element = next(self._parent)
            except StopIteration:
                if prompts:
                    break
                if dropped:
                    log.warning(
                        "%d skipped prompt records at the end of the data are not reported in any batch", dropped
                    )
                raise
            if isinstance(element, Prompt):
                prompts.append(element)
            else:
                dropped += 1
        return PromptBatch(prompts, dropped)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
