"""The default run: a small Qwen3-VL trained from scratch on the built-in tasks, on a laptop CPU.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/qwen3vl_tiny

Optional: a prepared TFDS dataset (ArrayRecord format) mixed in, here CLEVR's question-answer pairs:

    python -m experiments.train --config=configs/tiny.py --config.data.sources.tfds.weight=1 \
        --config.data.sources.tfds.name=clevr:3.1.0 --config.data.sources.tfds.data_dir=gs://bucket/tfds

Byte-level tokenizer, 64 px images (4 visual tokens each), 8-frame videos; rows of 384 tokens packed from
several examples. Expected on 2 CPU cores: ~6 minutes; loss 5.5 -> 0.7; held-out exact match digits ~0.99,
shapes ~0.65, counting ~0.6, video timestamps 1.0 (README: the numbers seen).
"""

from ml_collections import ConfigDict

TASKS = ("shapes", "counting", "grounding", "ocr", "video_timestamp")
EVAL_SEED = 1_000_003  # synthetic eval examples are drawn with another seed than training


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.steps = 1500
    c.log_every = 10
    c.export_hf = True
    c.peak_flops_per_device = 0.0  # 0: known TPU figure, else measured on this machine
    c.model = ConfigDict(
        dict(
            preset="tiny",
            init_from="",
            overrides=dict(
                text=dict(
                    hidden_size=128,
                    intermediate_size=384,
                    num_hidden_layers=4,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=32,
                    rope_theta=10000.0,
                    mrope_section=(6, 5, 5),
                ),
                vision=dict(
                    depth=2,
                    hidden_size=64,
                    intermediate_size=128,
                    num_heads=2,
                    out_hidden_size=128,
                    num_position_embeddings=64,
                    deepstack_visual_indexes=(0, 1),
                ),
                dtype="float32",
                param_dtype="float32",
                remat="dots",
                attention_impl="xla",
            ),
        )
    )
    c.processing = ConfigDict(
        dict(image_min_pixels=64 * 64, image_max_pixels=64 * 64, video_min_pixels=0, video_max_pixels=8 * 64 * 64)
    )
    synthetic = dict(kind="synthetic", tasks=TASKS, size=1_000_000, image_size=64, num_frames=8)
    c.data = ConfigDict(
        dict(
            sources=dict(
                synthetic=dict(synthetic, weight=5.0),
                digits=dict(kind="digits", split="train", image_size=64),
                # off (weight 0) until switched on from the command line: see the module docstring
                tfds=dict(
                    kind="tfds",
                    name="",
                    split="train",
                    data_dir="",
                    image_key="image",
                    question_key="question_answer/question",
                    answer_key="question_answer/answer",
                    prompt="",
                    answer_choice="random",
                    weight=0.0,
                ),
            ),
            seq_len=384,
            max_patches=256,
            batch_size=8,
            seed=0,
            workers=0,
            overflow="truncate",
            on_bad_input="error",
        )
    )
    shapes = dict(seq_len=384, max_patches=256)
    c.eval = ConfigDict(
        dict(
            every=500,
            batch_size=8,
            sets={
                task: dict(num_examples=96, data=dict(shapes, sources=[dict(synthetic, tasks=(task,), seed=EVAL_SEED)]))
                for task in TASKS
            }
            | {
                "digits": dict(
                    num_examples=96, data=dict(shapes, sources=[dict(kind="digits", split="eval", image_size=64)])
                )
            },
        )
    )
    c.optimizer = ConfigDict(
        dict(
            lr=3e-3,
            warmup_steps=100,
            final_lr_ratio=0.1,
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            weight_decay=0.01,
            clip_norm=1.0,
            freeze=(),
        )
    )
    c.loss_normalization = "sqrt"
    c.grad_accum_steps = 1
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    c.checkpoint = ConfigDict(dict(every=200, keep=3))
    return c
