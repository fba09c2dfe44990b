"""Train-step throughput against HF transformers (PyTorch) on the same small-but-real Qwen3-VL, same batch,
same machine, same precision (fp32), in one run; and model-FLOPs utilisation against a matmul peak measured
in the same run. Each measurement runs in a fresh process (torch's idle OpenMP threads would otherwise slow
whatever runs next). Ours is measured without rematerialisation and with remat="dots" (matmul outputs
kept, the rest recomputed): on CPU the smaller set of saved activations is faster, not slower.

    python benchmarks/train_step_vs_hf.py [--steps 8]

Model: `HF_CONFIG` below, a small-but-real Qwen3-VL of 43.5M parameters (ViT 4 x 256 with DeepStack taps after
blocks 1-3; text 8 x 512, 8 query / 4 kv heads of dim 64; vocab 8192), shared with decode_vs_hf.py. Workload:
batch 4 x 512 tokens, each sample one 224x224 image (grid 1x14x14 -> 49 image tokens), labels = input ids
(every position supervised), AdamW.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import transformers
from ml_collections import ConfigDict

from qwen3vl_jax.config import from_hf
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.inputs.model_inputs import ProcessorOutputs, from_hf_batch
from qwen3vl_jax.modeling.model import init_params
from qwen3vl_jax.training.metrics import device_peak_flops, train_flops
from qwen3vl_jax.training.optimizer import make_optimizer
from qwen3vl_jax.training.train_step import TrainState, make_train_step

VISION = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16, temporal_patch_size=2)
VISION.update(
    spatial_merge_size=2, out_hidden_size=512, num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3]
)
TEXT = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
TEXT.update(head_dim=64, vocab_size=8192)
TEXT["rope_parameters"] = dict(rope_type="default", rope_theta=5e6, mrope_section=[12, 10, 10], mrope_interleaved=True)
TOKEN_IDS = dict(image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003)
HF_CONFIG = dict(vision_config=VISION, text_config=TEXT, **TOKEN_IDS)
BATCH, LENGTH, GRID = 4, 512, (1, 14, 14)


def make_batch(rng):
    tokens = GRID[1] * GRID[2] // 4
    ids = rng.integers(0, 8000, (BATCH, LENGTH))
    ids[:, 10] = 8002
    ids[:, 11 : 11 + tokens] = 8000
    ids[:, 11 + tokens] = 8003
    pixels = rng.standard_normal((BATCH * GRID[1] * GRID[2], 1536)).astype(np.float32)
    return dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        pixel_values=pixels,
        image_grid_thw=np.array([GRID] * BATCH),
        mm_token_type_ids=(ids == 8000).astype(np.int64),
    )


def time_steps(step, steps):
    step()  # warm-up (compilation for jax)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def hf_seconds_per_step(batch, steps):
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**HF_CONFIG)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}

    def step():
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()

    return time_steps(step, steps), sum(p.numel() for p in model.parameters())


def make_jax_step(batch, *, remat):
    """Our jitted train step on `batch` as a no-argument callable that runs one step to completion, and the model
    FLOPs per step."""
    config = from_hf({"model_type": "qwen3_vl", **HF_CONFIG}, remat=remat)
    outputs = ProcessorOutputs(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    )
    inputs, _ = from_hf_batch(config, outputs, seq_len=LENGTH, max_patches=GRID[1] * GRID[2])
    arrays = {f: np.asarray(getattr(inputs, f)) for f in inputs.__dataclass_fields__}
    arrays["targets"] = np.concatenate([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], axis=1).astype(np.int32)
    arrays["loss_mask"] = np.ones((BATCH, LENGTH), np.int32)
    arrays["loss_mask"][:, -1] = 0  # like HF's shifted labels: the last position has no target
    training_batch = TrainingBatch.from_arrays(dict(arrays, num_dropped=np.zeros(BATCH, np.int32)))
    params = init_params(config, jax.random.PRNGKey(0))
    # AdamW as the HF side's torch.optim.AdamW(lr=1e-4, weight_decay=0.01), no schedule and no clipping
    adamw = ConfigDict(dict(lr=1e-4, warmup_steps=0, final_lr_ratio=1.0, clip_norm=1e9, freeze=()))
    adamw.update(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    optimizer, schedule = make_optimizer(adamw, total_steps=1000, params=params)
    step_fn = make_train_step(config, optimizer=optimizer, schedule=schedule, loss_normalization="token")
    train_step = jax.jit(step_fn, donate_argnums=0)
    state = [TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(0))]
    training_batch = jax.device_put(training_batch)

    def step():
        state[0], metrics = train_step(state[0], training_batch)
        jax.block_until_ready(metrics)

    return step, train_flops(config, batch=BATCH, seq_len=LENGTH, patches=GRID[1] * GRID[2])


def jax_seconds_per_step(batch, steps, *, remat):
    step, flops = make_jax_step(batch, remat=remat)
    return time_steps(step, steps), flops


def measure(framework: str, steps: int) -> None:
    """Runs in its own process: prints one JSON line with the seconds per step of `framework`."""
    batch = make_batch(np.random.default_rng(0))
    if framework == "hf":
        seconds, params = hf_seconds_per_step(batch, steps)
        print(json.dumps(dict(seconds=seconds, params=params)))
    else:
        seconds, flops = jax_seconds_per_step(batch, steps, remat=framework.split(":")[1])
        print(json.dumps(dict(seconds=seconds, flops=flops, peak=device_peak_flops(measure_seconds=2.0))))


def run(framework: str, steps: int) -> dict:
    out = subprocess.check_output([sys.executable, __file__, f"--measure={framework}", f"--steps={steps}"], text=True)
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.steps)
    hf = run("hf", args.steps)
    ours = {remat: run(f"jax:{remat}", args.steps) for remat in ("none", "dots")}
    flops, peak = ours["none"]["flops"], ours["none"]["peak"]
    tokens = BATCH * LENGTH
    print(
        f"model {hf['params'] / 1e6:.1f}M parameters; batch {BATCH} x {LENGTH} tokens + {BATCH} images 224x224; "
        f"fp32; {os.cpu_count()} CPU cores; each measurement in a fresh process, {args.steps} steps after warm-up"
    )
    print(
        f"measured fp32 matmul peak (jax, 2048^3): {peak / 1e9:.0f} GFLOP/s; model FLOPs per step: {flops / 1e9:.0f} G"
    )
    rows = [("HF transformers (torch)", hf)] + [(f"qwen3vl_jax remat={r}", ours[r]) for r in ours]
    for name, result in rows:
        seconds = result["seconds"]
        print(
            f"  {name:26s} {seconds:6.3f} s/step  {tokens / seconds:7.1f} tokens/s  MFU {flops / seconds / peak:5.1%}"
            + ("" if result is hf else f"  {hf['seconds'] / seconds:.2f}x HF")
        )


if __name__ == "__main__":
    main()
