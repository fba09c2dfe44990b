"""MRoPE ablation on video: interleaved vs chunked, each with and without the `<t seconds>` text, 3 seeds each;
trained on videos of mixed lengths (4-12 frames), tested on 8 frames (inside the training range) and on 16 and
24 frames (longer than any training video).

    python -m experiments.ablate --config=configs/ablate_mrope_video.py --workdir=/tmp/ablate_mrope_video

The task (video_timestamp): a square turns from blue to red; answer the time of the change. Qwen3-VL carries
time as `<t seconds>` text before each frame group and gives every group the same t position, so with the text
the answer can be read from the right group's timestamp; without it (`*_no_time`, processing.video_timestamps
off) only the groups' order tells the time. docs/results/ablations.md: the measured table.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, sweep_config, synthetic
from qwen3vl_jax.data.synthetic import EVAL_SEED

TRAIN_FRAMES = (4, 6, 8, 10, 12)
TEST_FRAMES = (8, 16, 24)


def get_config() -> ConfigDict:
    video = synthetic(("video_timestamp",), num_frames=TRAIN_FRAMES)
    base = base_config(dict(video=dict(video, weight=1.0)), steps=1000, seq_len=256, max_patches=128)
    base.processing.update(video_max_pixels=max(TEST_FRAMES) * 64 * 64, video_timestamps=True)
    no_time = dict(processing=dict(video_timestamps=False))
    chunked = dict(model=dict(overrides=dict(mrope_layout="chunked")))
    return sweep_config(
        name="MRoPE layout on video, with and without timestamps: interleaved vs chunked",
        description="Trained on the video timestamp task with 4-12 frames at 2 fps (2-6 temporal groups, "
        "answers 1.2-5.2 s); evaluated by greedy decoding on held-out videos of 8 frames and of 16 and 24 "
        "frames (answers up to 11.2 s: longer than any training video). `_no_time`: no `<t seconds>` text.",
        base=base,
        variants={
            "interleaved": {},
            "chunked": chunked,
            "interleaved_no_time": no_time,
            "chunked_no_time": {**chunked, **no_time},
        },
        eval_sets={
            f"frames_{n}": (48, [synthetic(("video_timestamp",), seed=EVAL_SEED, num_frames=n)]) for n in TEST_FRAMES
        },
        columns=[(f"frames_{n}", m) for n in TEST_FRAMES for m in ("exact_match", "abs_error_seconds")],
        max_new_tokens=12,
        paired=(("interleaved", "chunked"), ("interleaved", "interleaved_no_time"), ("chunked", "chunked_no_time")),
    )
