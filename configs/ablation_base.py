"""The small Qwen3-VL, training recipe and sweep layout shared by the CPU ablation sweeps (configs/ablate_*.py).

A 2-layer decoder (hidden 128, head_dim 32 with MRoPE sections [6, 5, 5]: Qwen3-VL's proportions) at the
released rotary base 5e6, a 2-block ViT, the byte tokenizer, rows of about one example each, videos of up to 16
frames of 64 px kept at full size, no periodic eval (the sweep evaluates every run by generation when it has
finished).
"""

from ml_collections import ConfigDict

from configs import tiny


def synthetic(tasks, seed: int = 0, **options) -> dict:
    defaults = dict(kind="synthetic", tasks=tuple(tasks), size=1_000_000, seed=seed, image_size=64, num_frames=8)
    return {**defaults, **options}


def base_config(
    sources: dict, steps: int, *, seq_len: int, max_patches: int, max_pixels: int = 256 * 256
) -> ConfigDict:
    """seq_len / max_patches: rows of about one example (longer examples are dropped and counted)."""
    c = tiny.get_config()
    c.steps = steps
    c.log_every = 50
    c.export_hf = False
    c.model.overrides.text.update(num_hidden_layers=2, rope_theta=5e6)
    c.processing.update(image_min_pixels=32 * 32, image_max_pixels=max_pixels, video_max_pixels=16 * 64 * 64)
    c.data.sources = sources
    c.data.update(seq_len=seq_len, max_patches=max_patches, overflow="drop")
    c.eval = ConfigDict(dict(every=0, batch_size=8, sets={}))
    c.optimizer.warmup_steps = 50
    c.checkpoint.keep = 1
    return c


def sweep_config(
    *,
    name: str,
    description: str,
    base: ConfigDict,
    variants: dict,
    eval_sets: dict,
    columns: list,
    max_new_tokens: int,
    seeds: tuple[int, ...] = (0, 1, 2),
    paired: tuple[tuple[str, str], ...] = (),
) -> ConfigDict:
    """A sweep (qwen3vl_jax.ablation.sweep): `variants` (in report order) x `seeds`, each run evaluated by
    greedy generation on `eval_sets` {name: (num_examples, [source specs])}; `columns`: the report's
    (eval set, metric) pairs; `paired`: (variant a, variant b) pairs tested seed by seed."""
    c = ConfigDict(dict(name=name, description=description, base=base, seeds=seeds, columns=columns, paired=paired))
    c.variants = ConfigDict(variants, sort_keys=False)
    sets = {set_name: dict(num_examples=n, sources=sources) for set_name, (n, sources) in eval_sets.items()}
    c.eval = ConfigDict(dict(batch_size=16, max_new_tokens=max_new_tokens, sets=sets))
    return c
