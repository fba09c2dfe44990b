"""Greedy decode throughput against HF transformers' `generate` and against the memory-bandwidth bound.

    python benchmarks/decode_vs_hf.py

Model: the 43.5M-parameter Qwen3-VL of shared/bench_reference.md, fp32. Workload: a 64-token text prompt,
64 new tokens, greedy, batch 1 and 8; every row generates all 64 tokens (no eos). Each measurement runs in
a fresh process. The bound: bytes read per decode step (the decoder's and the head's weights, plus the
keys and values cached so far) divided by a memory read bandwidth measured in the same run (numpy sum over
1 GiB), i.e. the tokens/s of a decoder that only streams what it must read.
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


def read_bandwidth(seconds: float = 2.0) -> float:
    """Bytes per second of numpy summing a 1 GiB float32 array."""
    data = np.ones(2**28, np.float32)
    data.sum()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        data.sum()
        runs += 1
    return runs * data.nbytes / (time.perf_counter() - start)


def prompt(batch: int) -> dict:
    ids = np.random.default_rng(0).integers(0, 8000, (batch, PROMPT))
    return dict(input_ids=ids, attention_mask=np.ones_like(ids))


def seconds_hf(batch: int, repeats: int) -> float:
    import torch
    import transformers
    from train_step_vs_hf import HF_CONFIG

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**HF_CONFIG)).eval()
    inputs = {k: torch.from_numpy(v) for k, v in prompt(batch).items()}

    def run():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == PROMPT + NEW

    return timed(run, repeats)


def seconds_jax(batch: int, repeats: int) -> float:
    import jax
    import qwen3vl_jax
    from qwen3vl_jax.modeling.model import init_params
    from train_step_vs_hf import HF_CONFIG

    config = qwen3vl_jax.from_hf({"model_type": "qwen3_vl", **HF_CONFIG})
    model = qwen3vl_jax.Qwen3VLModel(config, init_params(config, jax.random.PRNGKey(0)))
    inputs = prompt(batch)

    def run():
        out = model.generate(**inputs, max_new_tokens=NEW, eos_token_ids=None)
        assert out.shape == (batch, NEW)

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.measure:
        framework, batch = args.measure.split(":")
        seconds = (seconds_hf if framework == "hf" else seconds_jax)(int(batch), args.repeats)
        return print(json.dumps(dict(seconds=seconds)))
    bandwidth = read_bandwidth()
    print(f"model 43.5M parameters, fp32, {PROMPT}-token prompt, {NEW} new tokens, greedy; {os.cpu_count()} CPU "
          f"cores; measured read bandwidth {bandwidth / 1e9:.1f} GB/s; each measurement in a fresh process")
    for batch in BATCHES:
        results = {}
        for framework in ("hf", "jax"):
            out = subprocess.run([sys.executable, __file__, f"--measure={framework}:{batch}",
                                  f"--repeats={args.repeats}"], check=True, capture_output=True, text=True).stdout
            results[framework] = batch * NEW / json.loads(out.strip().splitlines()[-1])["seconds"]
        bound = batch * bandwidth / bytes_per_step(batch)
        print(f"batch {batch}: HF generate {results['hf']:7.1f} tokens/s ({results['hf'] / bound:5.1%} of bound) | "
              f"qwen3vl_jax {results['jax']:7.1f} tokens/s ({results['jax'] / bound:5.1%} of bound) | "
              f"bound {bound:7.1f} tokens/s | {results['jax'] / results['hf']:.2f}x HF")


if __name__ == "__main__":
    main()
