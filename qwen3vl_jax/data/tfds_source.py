"""TFDS datasets as conversation records: `tfds.data_source` (random access over ArrayRecord files, local or
`gs://`, no TensorFlow needed to read) with a mapping from the dataset's features to one question-answer turn.

    {"kind": "tfds", "name": "coco_captions", "split": "train", "data_dir": "gs://my-bucket/tensorflow_datasets",
     "image_key": "image", "question_key": "", "prompt": "Describe the image.", "answer_key": "captions/text",
     "answer_choice": "random"}

Keys name features; "a/b" reaches into nested features (e.g. a Sequence of dicts). An image feature may hold a
decoded uint8 array (TFDS `Image`, or a `Tensor` of shape (H, W[, C])), a stack or list of them (several images),
or encoded PNG/JPEG bytes; a video feature holds frames (T, H, W, C) or a list of encoded frames, recorded at
`video_fps`. The question is the `question_key` text, after the fixed `prompt` text when both are given. A list
of answers gives its first (answer_choice="first") or one drawn with a seed per example ("random":
deterministic, the same on every host and after a resume); a list of questions with a list of answers of the
same length is a list of pairs, chosen the same way.
"""

from __future__ import annotations

import numpy as np

ANSWER_CHOICES = ("first", "random")


class TfdsSource:
    """Record i is the conversation built from example i of a prepared TFDS split (`split` may be sliced, e.g.
    "train[:10%]"). A record whose features cannot be mapped becomes {"id", "error"}, for the bad-input policy."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        *,
        image_key: str = "image",
        video_key: str = "",
        question_key: str = "question",
        answer_key: str = "answer",
        prompt: str = "",
        answer_choice: str = "first",
        video_fps: float = 0.0,
        seed: int = 0,
    ):
        import tensorflow_datasets as tfds  # imported here: only runs that read TFDS pay for it

        if answer_choice not in ANSWER_CHOICES:
            raise ValueError(f"tfds source {name}: answer_choice {answer_choice!r} not in {ANSWER_CHOICES}")
        if not (question_key or prompt):
            raise ValueError(f"tfds source {name}: give a question_key, a prompt, or both")
        if video_key and not video_fps > 0:
            raise ValueError(f"tfds source {name}: video_key {video_key!r} needs the frames' rate video_fps > 0")
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        features = self._source.dataset_info.features
        for key in (image_key, video_key, question_key, answer_key):
            if key and not _has_feature(features, key):
                raise ValueError(f"tfds source {name}: no feature {key!r} in {name}/{split}; its features: {features}")
        self.name, self.split = name, split
        self.image_key, self.video_key = image_key, video_key
        self.question_key, self.answer_key, self.prompt = question_key, answer_key, prompt
        self.answer_choice, self.video_fps, self.seed = answer_choice, video_fps, seed

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record_id = f"{self.name}/{self.split}:{index}"
        try:
            return {"id": record_id, "messages": self._conversation(self._source[index], index)}
        except (ValueError, KeyError) as e:
            return {"id": record_id, "error": str(e)}

    def _conversation(self, example: dict, index: int) -> list[dict]:
        content = []
        if self.image_key:
            content += [{"type": "image", "image": image} for image in _items(_get(example, self.image_key))]
        if self.video_key:
            frames = list(_items(_get(example, self.video_key)))
            content.append({"type": "video", "video": frames, "fps": self.video_fps})
        answers = _texts(_get(example, self.answer_key), self.answer_key)
        questions = _texts(_get(example, self.question_key), self.question_key) if self.question_key else [""]
        paired = len(questions) > 1  # question-answer pairs, e.g. CLEVR's question_answer/{question, answer}
        if paired and len(answers) != len(questions):
            raise ValueError(
                f"{len(questions)} questions ({self.question_key!r}) but {len(answers)} answers "
                f"({self.answer_key!r}): a list of questions needs one answer each"
            )
        if self.answer_choice == "first":
            choice = 0
        else:  # a generator per (seed, example): the same choice whatever order or process reads the example
            choice = int(np.random.default_rng((self.seed, index)).integers(len(answers)))
        question, answer = questions[choice if paired else 0], answers[choice]
        content.append({"type": "text", "text": "\n".join(t for t in (self.prompt, question) if t)})
        return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r})"


def _has_feature(features, path: str) -> bool:
    feature = features
    for part in path.split("/"):
        while hasattr(feature, "feature"):  # Sequence(...) holds its element feature
            feature = feature.feature
        if not hasattr(feature, "keys") or part not in feature.keys():
            return False
        feature = feature[part]
    return True


def _get(example: dict, path: str):
    value = example
    for part in path.split("/"):
        value = value[part]
    return value


def _items(value) -> list:
    """One image (an array (H, W[, C]) or encoded bytes) or several (a list, or a stacked array) -> a list."""
    if isinstance(value, (bytes, np.ndarray)) and not (isinstance(value, np.ndarray) and value.ndim == 4):
        return [value]
    return list(value)


def _text(value, key: str) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"feature {key!r} is not text: {type(value).__name__}")


def _texts(value, key: str) -> list[str]:
    """A text or a list of texts -> a non-empty list of strings."""
    values = [value] if isinstance(value, (bytes, str)) or np.ndim(value) == 0 else list(value)
    if not values:
        raise ValueError(f"feature {key!r} is an empty list")
    return [_text(v, key) for v in values]
