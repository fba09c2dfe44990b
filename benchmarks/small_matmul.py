"""What a decode step's weight products cost on this CPU, at 1 and 8 rows, fp32, in XLA (with and without its
YNNPACK matmuls) and in torch, same run:

1. chains of (rows x 512) @ (512 x 1536) @ (1536 x 512) products (100 MB of weights per chain);
2. the products of one decode step of decode_vs_hf.py's model, in its order: per layer q (512 x 512), k and v
   (512 x 256) from the same input, o (512 x 512), gate and up (512 x 1536), down (1536 x 512); 8 layers, then
   the head (512 x 8192); 117 MB of weights, with only cheap elementwise work between the products; in XLA also
   as two other layouts of the same products (q/k/v and gate/up concatenated; every matrix as two column halves).

    python benchmarks/small_matmul.py

A greedy decode step multiplies `batch` rows by every weight matrix once, so its floor is the time these
products take; reported as weight bytes streamed per second (more than the caches hold) against an XLA sum over a
buffer of the same size (what all cores can read). Part 2 is the floor of `decode_vs_hf.py`'s decode step in
each library: its bound is that script's "all-core bound" without the KV cache.
"""

import operator
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

    return xla_seconds_per_step(chain, x, up, down, ynn=ynn)


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

    return seconds_per_step(chain)


# decode_vs_hf.py's model (train_step_vs_hf.HF_CONFIG): its decoder's and head's weight matrices
LAYERS, Q, KV, MLP, VOCAB = 8, 512, 256, 1536, 8192
STEP_SHAPES = dict(q=(HIDDEN, Q), k=(HIDDEN, KV), v=(HIDDEN, KV), o=(Q, HIDDEN), gate=(HIDDEN, MLP), up=(HIDDEN, MLP))
STEP_SHAPES["down"] = (MLP, HIDDEN)
STEP_BYTES = 4 * (LAYERS * sum(a * b for a, b in STEP_SHAPES.values()) + HIDDEN * VOCAB)


def step_weights(make):
    """make(shape) for every matrix of the decode step: (list of per-layer dicts, head)."""
    return [{name: make(shape) for name, shape in STEP_SHAPES.items()} for _ in range(LAYERS)], make((HIDDEN, VOCAB))


def decode_step(x, layers, head, *, silu, pad, matmul=operator.matmul):
    """The decode step's products in its order; between them only what keeps each product's input dependent on
    the last (attention over the cache is left out: q plus the padded k + v stands in for its output). A layer
    with "qkv" / "gate_up" matrices runs those as single products."""
    for w in layers:
        if "qkv" in w:
            qkv = matmul(x, w["qkv"])
            q, k, v = qkv[:, :Q], qkv[:, Q : Q + KV], qkv[:, Q + KV :]
        else:
            q, k, v = (matmul(x, w[name]) for name in ("q", "k", "v"))
        x = x + matmul(q + pad(k + v), w["o"])
        if "gate_up" in w:
            gate_up = matmul(x, w["gate_up"])
            gate, up = gate_up[:, :MLP], gate_up[:, MLP:]
        else:
            gate, up = matmul(x, w["gate"]), matmul(x, w["up"])
        x = x + matmul(silu(gate) * up, w["down"])
    return x + matmul(x, head)[:, :HIDDEN] * 1e-3


def concatenated(w: dict) -> dict:
    """A layer's q, k, v as one (512 x 1024) matrix and gate, up as one (512 x 3072)."""
    qkv = jnp.concatenate([w["q"], w["k"], w["v"]], axis=1)
    return dict(qkv=qkv, o=w["o"], gate_up=jnp.concatenate([w["gate"], w["up"]], axis=1), down=w["down"])


def halves_matmul(x, w):
    """x @ w with w given as its two column halves: two independent products."""
    return jnp.concatenate([x @ w[0], x @ w[1]], axis=1)


def xla_step_seconds(rows: int, *, ynn: bool, layout: str = "separate") -> float:
    """layout "separate": every matrix its own product; "concatenated": q/k/v and gate/up as single products;
    "halves": every product as two products over column halves of its matrix."""
    keys = iter(jax.random.split(jax.random.PRNGKey(0), LAYERS * len(STEP_SHAPES) + 1))
    layers, head = step_weights(lambda shape: jax.random.normal(next(keys), shape) * 0.04)
    matmul = operator.matmul
    if layout == "concatenated":
        layers = [concatenated(w) for w in layers]
    elif layout == "halves":
        layers, head = jax.tree.map(lambda w: tuple(jnp.split(w, 2, axis=1)), (layers, head))
        matmul = halves_matmul
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, HIDDEN))

    def steps(x, layers, head):
        def pad(a):
            return jnp.pad(a, ((0, 0), (0, Q - KV)))

        def step(_, x):
            return decode_step(x, layers, head, silu=jax.nn.silu, pad=pad, matmul=matmul)

        return jax.lax.fori_loop(0, STEPS, step, x)

    return xla_seconds_per_step(steps, x, layers, head, ynn=ynn)


def torch_step_seconds(rows: int) -> float:
    torch.set_num_threads(os.cpu_count())
    layers, head = step_weights(lambda shape: torch.randn(*shape) * 0.04)
    x = torch.randn(rows, HIDDEN)

    def pad(a):
        return torch.nn.functional.pad(a, (0, Q - KV))

    def steps():
        y = x
        with torch.no_grad():
            for _ in range(STEPS):
                y = decode_step(y, layers, head, silu=torch.nn.functional.silu, pad=pad)
        return y

    return seconds_per_step(steps)


def read_seconds(num_bytes: int = WEIGHT_BYTES) -> float:
    data = jax.device_put(np.ones(num_bytes // 4, np.float32))
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    return min(_timed(lambda: total(data).block_until_ready()) for _ in range(10))


def seconds_per_step(run) -> float:
    """run() once to warm up, then the best of 3 runs of STEPS steps, per step."""
    run()
    return min(_timed(run) for _ in range(3)) / STEPS


def xla_seconds_per_step(fn, *args, ynn: bool) -> float:
    """seconds_per_step of fn(*args) jitted, with or without XLA:CPU's YNNPACK matmuls."""
    options = {} if ynn else {"xla_cpu_experimental_ynn_fusion_type": ""}
    run = jax.jit(fn, compiler_options=options)
    return seconds_per_step(lambda: jax.block_until_ready(run(*args)))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(rows: int, results: dict[str, float], *, num_bytes: int, read: float, unit: str) -> None:
    for name, seconds in results.items():
        print(
            f"  {rows} row(s), {name:33s} {seconds * 1e3:6.2f} ms per {unit}  {num_bytes / seconds / 1e9:5.1f} GB/s"
            f"  {results['torch'] / seconds:4.2f}x torch  {read / seconds:4.0%} of the read rate"
        )


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
        report(rows, results, num_bytes=WEIGHT_BYTES, read=read, unit="chain")
    read = read_seconds(STEP_BYTES)
    print(
        f"the weight products of one decode step of decode_vs_hf.py's model ({STEP_BYTES / 1e6:.0f} MB); XLA sum over "
        f"{STEP_BYTES / 1e6:.0f} MB: {STEP_BYTES / read / 1e9:.1f} GB/s"
    )
    for rows in (1, 8):
        results = {
            "XLA (YNNPACK matmuls)": xla_step_seconds(rows, ynn=True),
            "XLA (its own matmuls)": xla_step_seconds(rows, ynn=False),
            "XLA, q/k/v + gate/up concatenated": xla_step_seconds(rows, ynn=True, layout="concatenated"),
            "XLA, every matrix in two halves": xla_step_seconds(rows, ynn=True, layout="halves"),
            "torch": torch_step_seconds(rows),
        }
        report(rows, results, num_bytes=STEP_BYTES, read=read, unit="step")


if __name__ == "__main__":
    main()
