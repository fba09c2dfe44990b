"""Linear probes on every ViT layer of trained checkpoints (qwen3vl_jax/ablation/vit_probe.py): held-out
balanced accuracy of predicting each grid cell's content (empty or its small square's colour) from that layer's
features, per checkpoint seed, beside the same architecture with random weights.

    python -m experiments.probe_vit --checkpoint='/tmp/ablate_deepstack_stage1/runs/coarse/seed_{seed}/hf' \
        --seeds=0,1,2 --output=/tmp/ablate_deepstack_stage1/probe.md

Writes a markdown table (mean ± 95% CI over the seeds per layer) to --output and prints it.
"""

from absl import flags, logging

import qwen3vl_jax
from experiments import cli
from qwen3vl_jax import storage
from qwen3vl_jax.ablation.report import mean_and_ci
from qwen3vl_jax.ablation.vit_probe import CLASSES, cell_data, image_records, probe_layers
from qwen3vl_jax.data.synthetic import EVAL_SEED

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory; {seed} is replaced by each seed.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Checkpoint seeds (also the random baseline's init seeds).")
_TRAIN = flags.DEFINE_integer("train_images", 300, "Images whose cells fit the probes.")
_TEST = flags.DEFINE_integer("test_images", 150, "Held-out images whose cells score them.")
_GRID = flags.DEFINE_integer("grid", 6, "Cells per side of the small-object grids.")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown file for the table.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    train_records = image_records(_TRAIN.value, seed=EVAL_SEED + 1, grid=_GRID.value)
    test_records = image_records(_TEST.value, seed=EVAL_SEED + 2, grid=_GRID.value)
    columns: dict[str, list[list[float]]] = {"trained": [], "random weights": []}
    for seed in _SEEDS.value:
        path = _CHECKPOINT.value.format(seed=seed)
        processor = qwen3vl_jax.load_processor(path)
        trained = qwen3vl_jax.load_pretrained(path)
        random = qwen3vl_jax.Qwen3VLModel.from_config(trained.config, seed=int(seed))
        for name, model in (("trained", trained), ("random weights", random)):
            scores = probe_layers(cell_data(model, processor, train_records), cell_data(model, processor, test_records))
            columns[name].append(scores.balanced_accuracy)
            print(f"seed {seed} {name}: " + ", ".join(f"{s:.3f}" for s in scores.balanced_accuracy), flush=True)
    depth = len(columns["trained"][0]) - 1
    lines = [
        f"Linear probe per ViT layer: balanced accuracy of a cell's content ({len(CLASSES)} classes: empty or the "
        f"colour of its 8 px square; chance {1 / len(CLASSES):.3f}) on {_TEST.value} held-out {_GRID.value} x "
        f"{_GRID.value} grids, fitted on {_TRAIN.value}; mean ± 95% CI over seeds {', '.join(_SEEDS.value)} of "
        f"`{_CHECKPOINT.value}`.",
        "",
        "| layer | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for layer in range(depth + 1):
        name = "patch embedding" if layer == 0 else f"block {layer - 1}"
        cells = []
        for runs in columns.values():
            mean, ci = mean_and_ci([run[layer] for run in runs])
            cells.append(f"{mean:.3f}" if ci != ci else f"{mean:.3f} ± {ci:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if _OUTPUT.value:
        with storage.path(_OUTPUT.value).open("w") as f:
            f.write(text)


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint"])
    cli.run(main)
