"""A small real-image task: scikit-learn's bundled handwritten digits (no download).

``sklearn.datasets.load_digits()`` holds 1,797 8x8 grey images with values 0..16. Each record shows one digit,
scaled to 0..255 (white digit on black, as in the data) and upscaled with nearest-neighbour to
``image_size`` x ``image_size`` RGB, and asks "Which digit is shown in the image?"; the answer is ``str(label)``.
Records have the same format as ``qwen3vl_jax.data.synthetic`` records, with task "digits" and meta ``{"label"}``.
The train/eval split is a fixed permutation of all indices (seeded), so the two splits are disjoint.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SPLITS = ("train", "eval")
QUESTION = "Which digit is shown in the image?"


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 8, 8] scaled to 0..255, labels int64 [N]), read once per process."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    data = sklearn_load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    images.flags.writeable = False
    labels = data.target.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


class DigitsSource:
    """A grain-compatible random-access source of digit records: ``len()`` and ``__getitem__(i) -> record``.

    ``indices`` holds the sklearn dataset index behind each record of this split."""

    def __init__(self, split: str = "train", image_size: int = 64, seed: int = 0, eval_fraction: float = 0.2):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
        self.split, self.image_size, self.seed, self.eval_fraction = split, int(image_size), int(seed), eval_fraction
        n = len(load_digits()[1])
        order = np.random.default_rng(seed).permutation(n)
        n_eval = round(eval_fraction * n)
        self.indices = order[:n_eval] if split == "eval" else order[n_eval:]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        """Returns record i of this split; raises IndexError outside [0, len)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self!r}")
        images, labels = load_digits()
        j = int(self.indices[i])
        image = Image.fromarray(images[j]).resize((self.image_size, self.image_size), Image.NEAREST)
        answer = str(int(labels[j]))
        return {
            "id": f"digits-{self.split}/{i}",
            "task": "digits",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image.convert("RGB")}, {"type": "text", "text": QUESTION}],
                },
                {"role": "assistant", "content": answer},
            ],
            "answer": answer,
            "meta": {"label": int(labels[j])},
        }

    def __repr__(self) -> str:
        return (
            f"DigitsSource(split={self.split!r}, image_size={self.image_size}, seed={self.seed}, "
            f"eval_fraction={self.eval_fraction})"
        )
