"""The default run: a small Qwen3-VL trained from scratch on the built-in tasks, on a laptop CPU.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/qwen3vl_tiny

Optional: a prepared TFDS dataset (ArrayRecord format) mixed in, here CLEVR's question-answer pairs:

    python -m experiments.train --config=configs/tiny.py --config.data.sources.tfds.weight=1 \
        --config.data.sources.tfds.name=clevr:3.1.0 --config.data.sources.tfds.data_dir=gs://bucket/tfds

To start from an HF checkpoint instead (`--config.model.init_from=/path/to/checkpoint`): its config.json is the
model (the tiny-cpu preset is not used); this file's one model setting, remat "dots", applies on top of it.

Byte-level tokenizer, 64 px images (4 visual tokens each), 8-frame videos; rows of 384 tokens packed from
several examples. Expected on 2 CPU cores: ~6 minutes; loss 5.5 -> 0.7; held-out exact match digits ~0.99,
shapes ~0.65, counting ~0.6, video timestamps 1.0 (docs/results/training_runs.md: the numbers seen).
"""

from ml_collections import ConfigDict

from qwen3vl_jax.data.synthetic import EVAL_SEED
from qwen3vl_jax.training.run_config import model_settings, run_config

TASKS = ("shapes", "counting", "grounding", "ocr", "video_timestamp")


def get_config() -> ConfigDict:
    c = run_config()
    c.steps = 1500
    c.model = model_settings("tiny-cpu", remat="dots")
    c.processing = ConfigDict(dict(image_min_pixels=64 * 64, image_max_pixels=64 * 64))
    c.processing.update(video_min_pixels=0, video_max_pixels=8 * 64 * 64)
    synthetic = dict(kind="synthetic", tasks=TASKS, size=1_000_000, image_size=64, num_frames=8)
    digits = dict(kind="digits", split="train", image_size=64)
    # off (weight 0) until switched on from the command line: see the module docstring
    tfds = dict(kind="tfds", name="", split="train", data_dir="", image_key="image", prompt="", weight=0.0)
    tfds.update(question_key="question_answer/question", answer_key="question_answer/answer", answer_choice="random")
    c.data.sources = dict(synthetic=dict(synthetic, weight=5.0), digits=digits, tfds=tfds)
    c.data.update(seq_len=384, max_patches=256)
    held_out = {task: dict(synthetic, tasks=(task,), seed=EVAL_SEED) for task in TASKS}
    held_out["digits"] = dict(digits, split="eval")
    c.eval.sets = {name: dict(num_examples=96, sources=[source]) for name, source in held_out.items()}
    c.eval.every = 500
    c.optimizer.update(lr=3e-3, b2=0.98, weight_decay=0.01)
    c.checkpoint.every = 200
    return c
