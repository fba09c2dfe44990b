"""The small Qwen3-VL and training recipe shared by the CPU ablation sweeps (configs/ablate_*.py).

A 2-layer decoder (hidden 128, head_dim 32 with MRoPE sections [6, 5, 5]: Qwen3-VL's proportions) at the
released rotary base 5e6, a 2-block ViT, the byte tokenizer, rows of about one example each, videos of up to 16
frames of 64 px kept at full size, no periodic eval (the sweep evaluates every run by generation when it has
finished).
"""

from ml_collections import ConfigDict

from configs import tiny


def synthetic(tasks, seed: int = 0, **options) -> dict:
    return dict(kind="synthetic", tasks=tuple(tasks), size=1_000_000, seed=seed, image_size=64, num_frames=8, **options)


def base_config(
    sources: dict, steps: int, *, seq_len: int, max_patches: int, max_pixels: int = 256 * 256
) -> ConfigDict:
    """seq_len / max_patches: rows of about one example (longer examples are dropped and counted)."""
    c = tiny.get_config()
    c.steps = steps
    c.log_every = 50
    c.export_hf = False
    text = c.model.overrides.text
    text.update(num_hidden_layers=2, rope_theta=5e6)
    # the switches the sweeps flip (ModelConfig fields; listed so that a typo in a sweep is an error)
    c.model.overrides.update(mrope_layout="interleaved", deepstack=True, vision_positions=True)
    c.processing = ConfigDict(
        dict(image_min_pixels=32 * 32, image_max_pixels=max_pixels, video_min_pixels=0, video_max_pixels=16 * 64 * 64)
    )
    c.data = ConfigDict(
        dict(
            sources=sources,
            seq_len=seq_len,
            max_patches=max_patches,
            batch_size=8,
            seed=0,
            workers=0,
            overflow="drop",
            on_bad_input="error",
        )
    )
    c.eval = ConfigDict(dict(every=0, batch_size=8, sets={}))
    c.optimizer.update(warmup_steps=50)
    c.checkpoint = ConfigDict(dict(every=200, keep=1))
    return c
