"""The floor of `train_step_vs_hf.py`'s step on this CPU: its decoder and LM-head matmuls alone, each at the step's
shape (forward x @ w, and the two backward products g @ w.T and x.T @ g), in XLA (with and without XLA:CPU's
YNNPACK matmuls) and in torch, same run, fp32.

    python benchmarks/train_step_matmuls.py

These products are ~80% of the step's FLOPs; how fast each library runs them bounds how far one framework's step
can get ahead of the other's (docs/results/performance.md).
"""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
from train_step_vs_hf import BATCH, LENGTH, TEXT

TOKENS = BATCH * LENGTH


def products() -> list[tuple[int, int, int]]:
    """(in, out, count per step) of every decoder and LM-head weight matrix."""
    hidden, mlp, layers = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_hidden_layers"]
    q = TEXT["num_attention_heads"] * TEXT["head_dim"]
    kv = TEXT["num_key_value_heads"] * TEXT["head_dim"]
    return [
        (hidden, q, layers),  # q_proj
        (q, hidden, layers),  # o_proj
        (hidden, kv, 2 * layers),  # k_proj, v_proj
        (hidden, mlp, 2 * layers),  # gate_proj, up_proj
        (mlp, hidden, layers),  # down_proj
        (hidden, TEXT["vocab_size"], 1),  # lm_head
    ]


def best_seconds(run, repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def operands(rows: int, cols_in: int, cols_out: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols_in), dtype=np.float32)
    w = rng.standard_normal((cols_in, cols_out), dtype=np.float32)
    g = rng.standard_normal((rows, cols_out), dtype=np.float32)
    return x, w, g


def xla_seconds(cols_in: int, cols_out: int, *, ynn: bool) -> float:
    options = {} if ynn else {"xla_cpu_experimental_ynn_fusion_type": ""}
    x, w, g = (jax.device_put(a) for a in operands(TOKENS, cols_in, cols_out))
    forward = jax.jit(lambda x, w: x @ w, compiler_options=options)
    input_grad = jax.jit(lambda g, w: g @ w.T, compiler_options=options)
    weight_grad = jax.jit(lambda x, g: x.T @ g, compiler_options=options)
    return sum(
        best_seconds(lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)))
        for f, a, b in ((forward, x, w), (input_grad, g, w), (weight_grad, x, g))
    )


def torch_seconds(cols_in: int, cols_out: int) -> float:
    x, w, g = (torch.from_numpy(a) for a in operands(TOKENS, cols_in, cols_out))
    return sum(best_seconds(run) for run in (lambda: x @ w, lambda: g @ w.T, lambda: x.T @ g))


def main():
    torch.set_num_threads(os.cpu_count())
    frameworks = {
        "XLA (YNNPACK matmuls, the default)": lambda i, o: xla_seconds(i, o, ynn=True),
        "XLA (its own matmuls, YNNPACK off)": lambda i, o: xla_seconds(i, o, ynn=False),
        "torch": torch_seconds,
    }
    flops = sum(count * 3 * 2 * TOKENS * i * o for i, o, count in products())
    print(f"{TOKENS} tokens; decoder + LM-head matmuls, forward and backward: {flops / 1e9:.0f} GFLOP per step; fp32")
    print(f"{os.cpu_count()} CPU cores; best of 5 per product")
    totals = {}
    for name, seconds in frameworks.items():
        totals[name] = sum(count * seconds(i, o) for i, o, count in products())
    reference = totals["torch"]
    for name, total in totals.items():
        speed = reference / total
        print(f"  {name:36s} {total:6.3f} s/step  {flops / total / 1e9:5.0f} GFLOP/s  {speed:.2f}x torch's speed")


if __name__ == "__main__":
    main()
