"""What a decode step's weight products cost on this CPU: chains of (rows x 512) @ (512 x 1536) @ (1536 x 512)
products at 1 and 8 rows, fp32, in XLA (with and without its YNNPACK matmuls) and in torch, same run.

    python benchmarks/small_matmul.py

A greedy decode step multiplies `batch` rows by every weight matrix once, so its floor is the time these
products take; reported as weight bytes streamed per second (the products read 100 MB of weights per chain, more
than the caches hold) against an XLA sum over a buffer of the same size (what all cores can read).
"""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch

HIDDEN, WIDTH, PAIRS, STEPS = 512, 1536, 16, 16
WEIGHT_BYTES = 2 * PAIRS * HIDDEN * WIDTH * 4


def xla_seconds(rows: int, *, ynn: bool) -> float:
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * PAIRS)
    up = [jax.random.normal(k, (HIDDEN, WIDTH)) * 0.04 for k in keys[:PAIRS]]
    down = [jax.random.normal(k, (WIDTH, HIDDEN)) * 0.04 for k in keys[PAIRS:]]
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, HIDDEN))

    def chain(x, up, down):
        def step(_, x):
            for a, b in zip(up, down):
                x = jnp.tanh(jnp.tanh(x @ a) @ b)
            return x

        return jax.lax.fori_loop(0, STEPS, step, x)

    options = {} if ynn else {"xla_cpu_experimental_ynn_fusion_type": ""}
    run = jax.jit(chain, compiler_options=options)
    jax.block_until_ready(run(x, up, down))
    return min(_timed(lambda: jax.block_until_ready(run(x, up, down))) for _ in range(3)) / STEPS


def torch_seconds(rows: int) -> float:
    torch.set_num_threads(os.cpu_count())
    up = [torch.randn(HIDDEN, WIDTH) * 0.04 for _ in range(PAIRS)]
    down = [torch.randn(WIDTH, HIDDEN) * 0.04 for _ in range(PAIRS)]
    x = torch.randn(rows, HIDDEN)

    def chain():
        y = x
        with torch.no_grad():
            for _ in range(STEPS):
                for a, b in zip(up, down):
                    y = torch.tanh(torch.tanh(y @ a) @ b)
        return y

    chain()
    return min(_timed(chain) for _ in range(3)) / STEPS


def read_seconds() -> float:
    data = jax.device_put(np.ones(WEIGHT_BYTES // 4, np.float32))
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    return min(_timed(lambda: total(data).block_until_ready()) for _ in range(10))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    read = read_seconds()
    print(
        f"{os.cpu_count()} CPU cores; {PAIRS} pairs of {HIDDEN}x{WIDTH} / {WIDTH}x{HIDDEN} fp32 weights "
        f"({WEIGHT_BYTES / 1e6:.0f} MB) per chain; XLA sum over {WEIGHT_BYTES / 1e6:.0f} MB: "
        f"{WEIGHT_BYTES / read / 1e9:.1f} GB/s"
    )
    for rows in (1, 8):
        results = {
            "XLA (YNNPACK matmuls)": xla_seconds(rows, ynn=True),
            "XLA (its own matmuls)": xla_seconds(rows, ynn=False),
            "torch": torch_seconds(rows),
        }
        for name, seconds in results.items():
            rate = WEIGHT_BYTES / seconds / 1e9
            print(
                f"  {rows} row(s), {name:22s} {seconds * 1e3:6.2f} ms per chain  {rate:5.1f} GB/s"
                f"  {results['torch'] / seconds:4.2f}x torch  {read / seconds:4.0%} of the read rate"
            )


if __name__ == "__main__":
    main()
