"""The ViT on the packed patch buffer equals transformers' `model.visual`, padding included."""

import numpy as np
import torch
from transformers import vision_utils

from qwen3vl_jax.inputs.patch_geometry import patch_geometry

GRIDS = np.array([[1, 6, 4], [2, 4, 8], [1, 10, 12], [1, 2, 2]])  # images of different sizes and a 2-group video


def hf_visual(tiny, pixels, *, grids):
    with torch.no_grad():
        out = tiny.hf.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids))
    return out.pooler_output.numpy(), [x.numpy() for x in out.deepstack_features]


def test_vit_and_every_deepstack_feature_equal_transformers(tiny, rng):
    pixels = rng.standard_normal((int(GRIDS.prod(-1).sum()), tiny.config.vision.patch_dim)).astype(np.float32)
    ref_merged, ref_deepstack = hf_visual(tiny, pixels, grids=GRIDS)
    merged, deepstack = tiny.ours.encode_vision(pixels, GRIDS)
    assert len(deepstack) == len(ref_deepstack) == len(tiny.config.vision.deepstack_visual_indexes)
    np.testing.assert_allclose(merged, ref_merged, atol=1e-5, rtol=0)
    for ours, ref in zip(deepstack, ref_deepstack):
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_hidden_states_after_every_block_equal_transformers(tiny, rng):
    """The probe features: what forward hooks see on transformers' ViT (patch embedding + position embedding,
    the input of blocks[0]; then each block's output), in the same patch order."""
    pixels = rng.standard_normal((int(GRIDS.prod(-1).sum()), tiny.config.vision.patch_dim)).astype(np.float32)
    visual, seen = tiny.hf.model.visual, []
    hooks = [
        visual.blocks[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True)
    ]
    hooks += [block.register_forward_hook(lambda module, args, output: seen.append(output)) for block in visual.blocks]
    try:
        hf_visual(tiny, pixels, grids=GRIDS)
    finally:
        for hook in hooks:
            hook.remove()
    hidden_states = tiny.ours.vision_hidden_states(pixels, GRIDS)
    assert len(hidden_states) == len(seen) == tiny.config.vision.depth + 1
    for ours, ref in zip(hidden_states, seen):
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5, rtol=0)


def test_padding_and_neighbours_do_not_change_an_image(tiny, rng):
    """An image's tokens are the same alone, in a larger (padded) buffer, and packed after other images."""
    dim = tiny.config.vision.patch_dim
    image = rng.standard_normal((6 * 4, dim)).astype(np.float32)
    other = rng.standard_normal((8 * 8, dim)).astype(np.float32)
    alone, alone_ds = tiny.ours.encode_vision(image, [[1, 6, 4]])
    padded, padded_ds = tiny.ours.encode_vision(image, [[1, 6, 4]], max_patches=512)
    packed, packed_ds = tiny.ours.encode_vision(np.concatenate([other, image]), [[1, 8, 8], [1, 6, 4]])
    np.testing.assert_array_equal(padded, alone)
    np.testing.assert_allclose(packed[16:], alone, atol=1e-6, rtol=0)
    for a, b, c in zip(alone_ds, padded_ds, packed_ds):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_allclose(c[16:], a, atol=1e-6, rtol=0)


def test_host_geometry_equals_transformers_helpers(tiny):
    """Pos-embed taps/weights and rotary ids computed in numpy equal transformers' torch helpers exactly."""
    vc = tiny.config.vision
    grids = torch.from_numpy(GRIDS)
    ref_index, ref_weight = vision_utils.get_vision_interpolation_indices_and_weights(
        grids,
        num_grid_per_side=vc.grid_per_side,
        mode="bilinear",
        align_corners=True,
        spatial_merge_size=vc.spatial_merge_size,
    )
    ref_rowcol = vision_utils.get_vision_position_ids(grids, vc.spatial_merge_size)
    geometry = dict(merge=vc.spatial_merge_size, side=vc.grid_per_side)
    index, weight, rowcol = (
        np.concatenate(parts) for parts in zip(*(patch_geometry(tuple(g), **geometry) for g in GRIDS.tolist()))
    )
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(weight, ref_weight.numpy())
    np.testing.assert_array_equal(rowcol, ref_rowcol.numpy())
