"""3-D MRoPE positions on the host equal transformers' `get_rope_index` exactly."""

import numpy as np
import pytest
import torch
from hf_reference import batch_inputs, build_prompt

import qwen3vl_jax


def hf_rope_index(tiny, inputs):
    def as_torch(k):
        return torch.from_numpy(inputs[k]) if k in inputs else None

    with torch.no_grad():
        pos, deltas = tiny.hf.model.get_rope_index(
            as_torch("input_ids"),
            as_torch("mm_token_type_ids"),
            as_torch("image_grid_thw"),
            as_torch("video_grid_thw"),
            attention_mask=as_torch("attention_mask"),
        )
    return pos.numpy(), deltas.numpy()


def our_rope_index(config, inputs):
    return qwen3vl_jax.rope_index(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
    )


def test_worked_example_by_hand(tiny):
    """Worked by hand from `Qwen3VLModel.get_rope_index`: [a b c VS I*6 VE d e ts ts VS V*8 VE ts ts VS V*8 VE
    f g h] with image (1,6,4), video (2,4,8)."""
    c = tiny.config
    vs, ve, img, vid = c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id
    ids = [1, 2, 3, vs] + [img] * 6 + [ve, 4, 5, 6, 7, vs] + [vid] * 8 + [ve, 6, 7, vs] + [vid] * 8 + [ve, 8, 9, 10]
    inputs = dict(input_ids=np.array([ids]), image_grid_thw=np.array([[1, 6, 4]]), video_grid_thw=np.array([[2, 4, 8]]))
    pos, delta = our_rope_index(c, inputs)
    expected_t = (
        [0, 1, 2, 3] + [4] * 6 + [7, 8, 9, 10, 11, 12] + [13] * 8 + [17, 18, 19, 20] + [21] * 8 + [25, 26, 27, 28]
    )
    np.testing.assert_array_equal(pos[0, 0], expected_t)
    np.testing.assert_array_equal(pos[1, 0, 4:10], [4, 4, 5, 5, 6, 6])
    np.testing.assert_array_equal(pos[2, 0, 4:10], [4, 5, 4, 5, 4, 5])
    assert delta[0, 0] == -11


@pytest.mark.parametrize(
    "parts_per_row",
    [
        [[("text", 9)]],
        [[("text", 4), ("image", (6, 4)), ("text", 3)]],
        [[("image", (8, 2)), ("image", (4, 10)), ("text", 2)]],
        [[("text", 2), ("video", (3, 4, 6)), ("text", 5)]],
        [
            [("text", 3), ("image", (4, 4)), ("text", 9)],
            [("text", 6)],
            [("text", 2), ("image", (6, 8)), ("video", (2, 4, 4)), ("text", 5), ("image", (2, 2))],
        ],
    ],
    ids=["text", "image", "consecutive_images", "video", "padded_batch_mixed"],
)
def test_positions_and_deltas_equal_transformers(tiny, parts_per_row, rng):
    inputs = batch_inputs(tiny.config, [build_prompt(tiny.config, parts, rng=rng) for parts in parts_per_row])
    ref_pos, ref_deltas = hf_rope_index(tiny, inputs)
    pos, deltas = our_rope_index(tiny.config, inputs)
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_array_equal(pos[:, real], ref_pos[:, real])
    np.testing.assert_array_equal(deltas, ref_deltas)


def test_placeholder_mismatch_names_the_item(tiny, rng):
    inputs = batch_inputs(tiny.config, [build_prompt(tiny.config, [("text", 3), ("image", (4, 4))], rng=rng)])
    with pytest.raises(
        ValueError,
        match=r"batch row 0: 4 image placeholder tokens .* image 0 \(grid t,h,w = "
        r"\(1, 6, 4\)\) needs 6",
    ):
        our_rope_index(tiny.config, dict(inputs, image_grid_thw=np.array([[1, 6, 4]])))
    with pytest.raises(ValueError, match=r"image 1 .* has no placeholder tokens"):
        tiny.ours(
            **dict(
                inputs,
                image_grid_thw=np.array([[1, 4, 4], [1, 2, 2]]),
                pixel_values=np.zeros((20, tiny.config.vision.patch_dim), np.float32),
            )
        )
    with pytest.raises(ValueError, match="pixel_values has 16 patch rows but image_grid_thw describes 24"):
        tiny.ours(**dict(inputs, image_grid_thw=np.array([[1, 6, 4]])))
