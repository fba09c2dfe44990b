"""One compile serves any mix of image sizes; padding never changes real outputs."""

import jax
import numpy as np
from hf_reference import batch_inputs, build_prompt

from qwen3vl_jax.modeling import Qwen3VL, abstract_params


def test_one_compile_serves_different_image_sizes(tiny):
    traces = []

    def forward(params, inputs):
        traces.append(1)  # runs once per trace, i.e. once per compilation
        return Qwen3VL(tiny.config).apply({"params": params}, inputs)

    forward = jax.jit(forward)
    layouts = [
        [("text", 3), ("image", (6, 4)), ("text", 5)],
        [("image", (10, 12)), ("text", 2)],
        [("text", 1), ("image", (2, 2)), ("image", (8, 8)), ("text", 3)],
        [("text", 2), ("video", (2, 6, 6)), ("text", 1)],
    ]
    rng = np.random.default_rng(0)
    for parts in layouts:
        batch = batch_inputs(tiny.config, [build_prompt(tiny.config, parts, rng=rng)])
        inputs, _ = tiny.ours.prepare(**batch, seq_len=64, max_patches=256)
        np.testing.assert_allclose(
            np.asarray(forward(tiny.ours.params, inputs))[:, : batch["input_ids"].shape[1]],
            tiny.ours(**batch),
            atol=1e-5,
            rtol=0,
        )
    assert len(traces) == 1


def test_padding_does_not_change_logits(tiny, rng):
    batch = batch_inputs(
        tiny.config, [build_prompt(tiny.config, [("text", 4), ("image", (4, 6)), ("text", 3)], rng=rng)]
    )
    small = tiny.ours(**batch)
    large = tiny.ours(**batch, seq_len=256, max_patches=1024)
    np.testing.assert_allclose(large, small, atol=1e-5, rtol=0)


def test_layers_are_scanned_stacks_with_logical_axes(tiny):
    """The decoder is one scanned stack (leading `layers` axis) and the ViT is split into scanned stacks
    ending at each DeepStack tap; every parameter carries logical axis names."""
    boxed = abstract_params(tiny.config, boxed=True)
    q_proj = boxed["decoder"]["layers"]["q_proj"]["kernel"]
    assert q_proj.names == ("layers", "embed", "q_heads", "head_dim")
    assert q_proj.value.shape[0] == tiny.config.text.num_hidden_layers
    stacks = {k: v["attn_qkv"]["kernel"].value.shape[0] for k, v in boxed["visual"].items() if k.startswith("blocks")}
    assert stacks == {"blocks_0": 1, "blocks_1": 1, "blocks_2": 1}  # taps after blocks 0 and 1 of 3
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert all(len(x.names) == len(x.value.shape) for x in leaves)
