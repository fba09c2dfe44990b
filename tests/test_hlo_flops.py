"""Matmul FLOPs counted from compiled HLO, loops by their trip count: exact on programs whose FLOPs are known,
for XLA:CPU (dots) and XLA:TPU (libtpu, convolutions) alike."""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3vl_jax.training import hlo_flops
from qwen3vl_jax.training.hlo_flops import count_flops

STEPS, ROWS, WIDTH = 7, 64, 128
MATMUL = 2 * ROWS * WIDTH * WIDTH  # one (ROWS, WIDTH) @ (WIDTH, WIDTH)


def scanned_layers(weights, x):
    """STEPS layers in a scan: STEPS matmuls forward, 2 x STEPS more for the gradient."""

    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, x, weights)
    return jnp.sum(h)


def compiled_text(fn, *, platform: str) -> str:
    shapes = dict(weights=(STEPS, WIDTH, WIDTH), x=(ROWS, WIDTH))
    if platform == "cpu":
        return jax.jit(fn).lower(*(jnp.zeros(s) for s in shapes.values())).compile().as_text()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    replicated = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=replicated) for s in shapes.values()]
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_scan_is_counted_once_per_step(platform):
    forward = count_flops(compiled_text(scanned_layers, platform=platform))
    assert forward.matmul_flops == STEPS * MATMUL
    assert forward.unknown_trip_counts == []
    backward = count_flops(compiled_text(jax.grad(scanned_layers), platform=platform))
    assert backward.matmul_flops == 3 * STEPS * MATMUL
    assert backward.unknown_trip_counts == []


def test_a_loop_of_unknown_length_is_named_and_counted_once():
    def data_dependent(weights, x):
        def body(carry):
            i, h = carry
            return i + 1, jnp.tanh(h @ weights[0])

        return jax.lax.while_loop(lambda c: c[1].sum() < c[0] * x.sum(), body, (0.0, x))[1]

    program = count_flops(compiled_text(data_dependent, platform="cpu"))
    assert program.matmul_flops == MATMUL
    assert len(program.unknown_trip_counts) == 1


def test_window_pairs_count_the_positions_that_read_real_input():
    """The arithmetic count of (output, window) pairs equals counting them one by one."""
    for size, window, stride, pad_low, pad_high, rhs_dilation in itertools.product(
        (1, 3, 8), (1, 2, 5), (1, 2, 3), (0, 1, 4), (0, 2), (1, 2)
    ):
        output = (size + pad_low + pad_high - (window - 1) * rhs_dilation - 1) // stride + 1
        if output < 1:
            continue
        expected = sum(
            0 <= o * stride + k * rhs_dilation - pad_low < size for o in range(output) for k in range(window)
        )
        counted = hlo_flops._window_pairs(
            size=size,
            output=output,
            window=window,
            stride=stride,
            pad_low=pad_low,
            lhs_dilation=1,
            rhs_dilation=rhs_dilation,
        )
        assert counted == expected, (size, window, stride, pad_low, pad_high, rhs_dilation)


def test_collectives_are_counted_by_their_result_bytes_once_per_loop_trip():
    """A scan of STEPS steps that all-gathers a row of 64 floats (16 on each of 4 devices) each step: STEPS x 64 x 4
    bytes of all-gather results per device."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec(None, "x"), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    def gather_each_step(weights, x):  # weights (STEPS, 16) here: this device's quarter of each row
        def body(h, row):
            return h * jax.lax.all_gather(row, "x", tiled=True).sum(), None

        return jax.lax.scan(body, x, weights)[0]

    weights, x = jnp.ones((STEPS, 64)), jnp.ones(())
    program = count_flops(jax.jit(gather_each_step).lower(weights, x).compile().as_text())
    assert program.collective_bytes == STEPS * 64 * 4
