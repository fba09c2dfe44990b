"""Linear probes on the ViT's layers: how much of a small-object grid's per-cell detail each layer still holds.

The images are the `small_object_grounding` grids (synthetic.py): G x G cells of 32 px, one LLM visual token
each, 2..4 of them holding an 8 px square of a palette colour. For every layer (the patch embedding, then the
output of each block) a cell's feature is its merged token's m^2 patch features side by side (what the patch
mergers read), and a multinomial logistic regression, fitted on the cells of training images, predicts the
cell's content: empty or the colour of its square (1 + 6 classes). Reported: balanced accuracy (mean recall over
the classes; chance 1/7) on the cells of held-out images. A layer that has lost which cell holds which colour
scores low even when the model answers coarse questions about the image well: that is the detail DeepStack
hands the decoder from earlier layers (Qwen3-VL report, section 2: DeepStack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.data.drawing import PALETTE
from qwen3vl_jax.data.synthetic import make_record
from qwen3vl_jax.processing import Processor

CLASSES = ("empty", *PALETTE)


@dataclasses.dataclass(frozen=True)
class CellData:
    """features[layer] (cells, m^2 * hidden) and labels (cells,) indexing CLASSES, over a set of images."""

    features: list[np.ndarray]
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """Held-out balanced accuracy per layer: 0 is the patch embedding, i the output of block i - 1."""

    balanced_accuracy: list[float]


def image_records(count: int, *, seed: int, grid: int) -> list[dict]:
    return [make_record("small_object_grounding", i, seed=seed, grid_sizes=(grid,)) for i in range(count)]


def cell_data(model: Qwen3VLModel, processor: Processor, records: Sequence[dict]) -> CellData:
    """Every cell of every record's image: its merged token's patch features at each ViT layer and its label."""
    merge = model.config.vision.spatial_merge_size
    per_layer: list[list[np.ndarray]] = []
    labels = []
    for record in records:
        (image,) = [c["image"] for c in record["messages"][0]["content"] if c["type"] == "image"]
        visual = processor.process_image(image)
        grid = record["meta"]["grid"]
        t, h, w = visual.grid
        if (t, h // merge, w // merge) != (1, grid, grid):
            raise ValueError(
                f"{record['id']}: the processor made a patch grid {visual.grid}, not one merged token per cell of the "
                f"{grid} x {grid} grid (check processing.image_max_pixels)"
            )
        hidden_states = model.vision_hidden_states(visual.pixels, [visual.grid])
        if not per_layer:
            per_layer = [[] for _ in hidden_states]
        for layer, states in enumerate(hidden_states):  # (patches, hidden) -> (cells, m^2 hidden)
            per_layer[layer].append(states.reshape(grid * grid, -1))
        cell_labels = np.zeros(grid * grid, np.int64)
        for row, col, colour in record["meta"]["marks"]:
            cell_labels[row * grid + col] = CLASSES.index(colour)
        labels.append(cell_labels)
    return CellData([np.concatenate(layer) for layer in per_layer], np.concatenate(labels))


def probe_layers(train: CellData, test: CellData, *, regularization: float = 1.0) -> LayerScores:
    """Fits one standardised logistic regression per layer on `train`, scores it on `test`."""
    scores = []
    for train_x, test_x in zip(train.features, test.features, strict=True):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
        probe.fit(train_x, train.labels)
        scores.append(float(balanced_accuracy_score(test.labels, probe.predict(test_x))))
    return LayerScores(scores)
