"""Greedy decode throughput against HF transformers' `generate` and against the memory-bandwidth bound.

    python benchmarks/decode_vs_hf.py

Model: the 43.5M-parameter Qwen3-VL of train_step_vs_hf.py (its `HF_CONFIG`: ViT 4 x 256, text 8 x 512 with
8 query / 4 kv heads of dim 64, vocab 8192), fp32. Workload: a 64-token text prompt, 64 new tokens, greedy,
batch 1 and 8; every row generates all 64 tokens (no eos). Each measurement runs in
a fresh process. Reported: end-to-end new tokens/s (prompt processing included, as `generate` is used) and
the decode rate alone, from the time difference between generating 64 and 32 tokens. The bound: bytes read
per decode step (the decoder's and the head's weights, plus the keys and values cached so far) divided by a
read bandwidth measured in the same run over a buffer of exactly that size, i.e. the rate of a decoder that
only streams what it must read. Two bandwidths: numpy's sum (one core) and XLA's sum on all cores (what a
decoder using all cores can stream).
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

PROMPT, NEW, BATCHES = 64, 64, (1, 8)


def read_bandwidth(num_bytes: float, *, all_cores: bool, seconds: float = 2.0) -> float:
    """Bytes per second of summing a float32 array of `num_bytes`: numpy (one core) or jitted XLA (all cores)."""
    data = np.ones(int(num_bytes) // 4, np.float32)
    if all_cores:
        import jax
        import jax.numpy as jnp

        device_data, total = jax.device_put(data), jax.jit(jnp.sum)

        def read():
            return total(device_data).block_until_ready()

    else:
        read = data.sum
    read()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        read()
        runs += 1
    return runs * data.nbytes / (time.perf_counter() - start)


def prompt(batch: int) -> dict:
    ids = np.random.default_rng(0).integers(0, 8000, (batch, PROMPT))
    return dict(input_ids=ids, attention_mask=np.ones_like(ids))


def seconds_hf(batch: int, *, new: int, repeats: int) -> float:
    import torch
    import transformers
    from train_step_vs_hf import HF_CONFIG

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**HF_CONFIG)).eval()
    inputs = {k: torch.from_numpy(v) for k, v in prompt(batch).items()}

    def run():
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out.shape[1] == PROMPT + new

    return timed(run, repeats)


def seconds_jax(batch: int, *, new: int, repeats: int) -> float:
    import jax
    from train_step_vs_hf import HF_CONFIG

    import qwen3vl_jax
    from qwen3vl_jax.modeling.model import init_params

    config = qwen3vl_jax.from_hf({"model_type": "qwen3_vl", **HF_CONFIG})
    model = qwen3vl_jax.Qwen3VLModel(config, init_params(config, jax.random.PRNGKey(0)))
    inputs = prompt(batch)

    def run():
        out = model.generate(**inputs, max_new_tokens=new, eos_token_ids=None)
        assert out.shape == (batch, new)

    return timed(run, repeats)


def timed(run, repeats: int) -> float:
    run()  # warm-up: compilation for jax
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def bytes_per_step(batch: int) -> float:
    """Weights read per decode step (decoder layers, final norm, lm_head; one embedding row is negligible)
    plus the mean KV cache read, in fp32."""
    h, inter, layers, heads, kv, hd, vocab = 512, 1536, 8, 8, 4, 64, 8192
    layer = h * (heads * hd) * 2 + h * (kv * hd) * 2 + 3 * h * inter + 2 * h + 2 * hd
    weights = layers * layer + h + h * vocab
    mean_cached = PROMPT + (NEW - 1) / 2
    cache = layers * batch * mean_cached * 2 * kv * hd
    return 4.0 * (weights + cache)


def measure(framework: str, batch: int, *, repeats: int) -> dict:
    """In a fresh process: end-to-end new tokens/s for NEW tokens and the decode-only steps/s."""
    measurement = [sys.executable, __file__, f"--measure={framework}:{batch}", f"--repeats={repeats}"]
    out = subprocess.check_output(measurement, text=True)
    seconds = json.loads(out.strip().splitlines()[-1])
    return dict(
        end_to_end=batch * NEW / seconds[str(NEW)],
        decode=batch * (NEW - NEW // 2) / (seconds[str(NEW)] - seconds[str(NEW // 2)]),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.measure:
        framework, batch = args.measure.split(":")
        timer = seconds_hf if framework == "hf" else seconds_jax
        return print(json.dumps({str(n): timer(int(batch), new=n, repeats=args.repeats) for n in (NEW // 2, NEW)}))
    print(
        f"model 43.5M parameters, fp32, {PROMPT}-token prompt, {NEW} new tokens, greedy; {os.cpu_count()} CPU "
        f"cores; each measurement in a fresh process"
    )
    for batch in BATCHES:
        step_bytes = bytes_per_step(batch)
        bounds = {
            cores: batch * read_bandwidth(step_bytes, all_cores=cores == "all cores") / step_bytes
            for cores in ("1 core", "all cores")
        }
        hf, ours = measure("hf", batch, repeats=args.repeats), measure("jax", batch, repeats=args.repeats)
        print(
            f"batch {batch}: {step_bytes / 1e6:.0f} MB read per step; bandwidth bound "
            + ", ".join(f"{bound:.0f} tokens/s ({cores})" for cores, bound in bounds.items())
        )
        for name, result in (("HF generate", hf), ("qwen3vl_jax", ours)):
            print(
                f"  {name:12s} end-to-end {result['end_to_end']:7.1f} tokens/s | decode {result['decode']:7.1f} "
                f"tokens/s = "
                + ", ".join(f"{result['decode'] / bound:.0%}" for bound in bounds.values())
                + " of the bounds"
            )
        print(
            f"  qwen3vl_jax / HF: {ours['end_to_end'] / hf['end_to_end']:.2f}x end-to-end, "
            f"{ours['decode'] / hf['decode']:.2f}x decode"
        )


if __name__ == "__main__":
    main()
