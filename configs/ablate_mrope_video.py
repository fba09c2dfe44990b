"""MRoPE ablation on video: interleaved vs chunked on the full model, 3 seeds each; tested on held-out 8-frame
videos (as in training) and on 16-frame videos (longer than any seen in training).

    python -m experiments.ablate --config=configs/ablate_mrope_video.py --workdir=/tmp/ablate_mrope_video

The task (video_timestamp): a square turns from blue to red; answer the time of the change. Qwen3-VL carries
time as `<t seconds>` text before each frame group and gives every group the same t position, so this asks
whether the layout matters when the answer must be read from the right group. README: the measured table.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, sweep_config, synthetic
from qwen3vl_jax.data.synthetic import EVAL_SEED


def get_config() -> ConfigDict:
    video = synthetic(("video_timestamp",))
    frames_16 = dict(video, seed=EVAL_SEED, num_frames=16)
    return sweep_config(
        name="MRoPE layout on video: interleaved vs chunked",
        description="Trained on the video timestamp task with 8 frames at 2 fps (4 temporal groups, answers "
        "1.2-3.2 s); evaluated by greedy decoding on held-out 8-frame videos and on 16-frame videos "
        "(8 groups, answers up to 7.2 s: longer than any training video).",
        base=base_config(dict(video=dict(video, weight=1.0)), steps=1000, seq_len=176, max_patches=64),
        variants={"interleaved": {}, "chunked": dict(model=dict(overrides=dict(mrope_layout="chunked")))},
        eval_sets=dict(frames_8=(48, [dict(video, seed=EVAL_SEED)]), frames_16=(48, [frames_16])),
        columns=[(frames, m) for frames in ("frames_8", "frames_16") for m in ("exact_match", "abs_error_seconds")],
        max_new_tokens=12,
    )
