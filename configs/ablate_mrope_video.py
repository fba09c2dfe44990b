"""MRoPE ablation on video: interleaved vs chunked on the full model, 3 seeds each; tested on held-out 8-frame
videos (as in training) and on 16-frame videos (longer than any seen in training).

    python -m experiments.ablate --config=configs/ablate_mrope_video.py --workdir=/tmp/ablate_mrope_video

The task (video_timestamp): a square turns from blue to red; answer the time of the change. Qwen3-VL carries
time as `<t seconds>` text before each frame group and gives every group the same t position, so this asks
whether the layout matters when the answer must be read from the right group. README: the measured table.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, synthetic

EVAL_SEED = 1_000_003


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "MRoPE layout on video: interleaved vs chunked"
    c.description = (
        "Trained on the video timestamp task with 8 frames at 2 fps (4 temporal groups, answers "
        "1.2-3.2 s); evaluated by greedy decoding on held-out 8-frame videos and on 16-frame videos "
        "(8 groups, answers up to 7.2 s: longer than any training video)."
    )
    video = synthetic(("video_timestamp",))
    c.base = base_config(dict(video=dict(video, weight=1.0)), steps=1000, seq_len=176, max_patches=64)
    c.variants = ConfigDict(
        {"interleaved": {}, "chunked": dict(model=dict(overrides=dict(mrope_layout="chunked")))}, sort_keys=False
    )
    c.seeds = (0, 1, 2)
    c.eval = ConfigDict(
        dict(
            batch_size=16,
            max_new_tokens=12,
            sets=dict(
                frames_8=dict(num_examples=48, sources=[dict(video, seed=EVAL_SEED)]),
                frames_16=dict(num_examples=48, sources=[dict(video, seed=EVAL_SEED, num_frames=16)]),
            ),
        )
    )
    c.columns = [
        ("frames_8", "exact_match"),
        ("frames_8", "abs_error_seconds"),
        ("frames_16", "exact_match"),
        ("frames_16", "abs_error_seconds"),
    ]
    return c
