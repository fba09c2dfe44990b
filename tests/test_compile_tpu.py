"""The compile planner AOT-compiles the train step (and a GRPO config's rollout generation) for a TPU topology with
libtpu on this CPU machine."""

import os

import jax
import numpy as np
from helpers import ROOT, compile_for_tpu

from qwen3vl_jax.inputs.model_inputs import ProcessorOutputs, from_hf_batch
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.training.model_source import model_config_from
from qwen3vl_jax.training.run_config import config_from_file


def test_tiny_train_step_compiles_for_v5p_and_fits():
    splash = "--config.model.overrides.attention_impl=splash"
    mesh = ("--config.mesh.data=2", "--config.mesh.fsdp=2")
    out = compile_for_tpu("configs/tiny.py", *mesh, splash, "--step_time=extrapolated", timeout=600)
    assert "(4 x TPU v5), mesh {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 1, 'expert': 1}" in out
    assert "-> fits" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert 0.01 < float(total.split()[1]) < 1.0  # GiB per chip: the tiny model is small but not nothing
    # outside the attention kernels: tiny saves every matmul's output (remat="dots"), so XLA runs the model's
    # matmuls and no more, less the gradient of the pixels (the patch embedding's input; ~2% of this model)
    flops = next(line for line in out.splitlines() if "matmul FLOPs per token" in line)
    ratio = float(flops.split("->")[1].split("x")[0])
    assert 0.95 < ratio <= 1.0, flops
    assert "splash_mha_fwd" in out
    # and XLA's own cost analysis beside it (loop bodies once, so it may only be smaller than what runs)
    cost = next(line for line in out.splitlines() if "XLA cost analysis" in line)
    assert 0 < float(cost.split(": ")[1].split(" TFLOP")[0]), cost
    # the modeled step time: too shallow a ViT to extrapolate from (2 blocks, 2 DeepStack taps), so unrolled whole
    assert "too shallow to extrapolate" in out and "(unrolled)" in out
    modeled = next(line for line in out.splitlines() if "modeled step time per chip" in line)
    compiler, kernels = (float(part.split(" ms")[0]) for part in modeled.split("= ")[1].split(" + "))
    assert 0 < compiler and 0 < kernels, modeled  # the splash kernels' share is added
    mfu = next(line for line in out.splitlines() if "modeled MFU" in line)
    assert 0 < float(mfu.split("modeled MFU ")[1].split("%")[0]) < 100, mfu


def test_grpo_plan_compiles_the_update_and_the_rollouts_generation_and_exits_0_when_both_fit():
    out = compile_for_tpu("configs/grpo_toy.py", timeout=600)  # asserts exit status 0
    config = config_from_file(os.path.join(ROOT, "configs/grpo_toy.py"))
    model_config, grpo, data = model_config_from(config), config.grpo, config.data
    # the generator's buffers for the largest prompt a rollout takes: max_prompt_tokens tokens, holding an image
    # with as many patches as a sequence's share of a training row (grid 1 x 2 x w), as the HF processor gives it
    # to Qwen3VLModel.prepare
    rows = grpo.prompts_per_step * grpo.group_size
    slot_patches = data.max_patches // (data.seq_len // (grpo.max_prompt_tokens + grpo.max_completion_tokens))
    merge = model_config.vision.spatial_merge_size
    slot_patches -= slot_patches % merge**2
    image = [model_config.vision_start_token_id, *[model_config.image_token_id] * (slot_patches // merge**2)]
    image.append(model_config.vision_end_token_id)
    prompt = [100] * (grpo.max_prompt_tokens - len(image)) + image
    inputs, _ = from_hf_batch(
        model_config,
        ProcessorOutputs(
            input_ids=np.asarray([prompt] * rows),
            pixel_values=np.zeros((rows * slot_patches, model_config.vision.patch_dim), np.float32),
            image_grid_thw=np.asarray([[1, 2, slot_patches // 2]] * rows),
        ),
    )
    prompt_tokens, patches = inputs.input_ids.shape[1], inputs.pixel_patches.shape[1]
    update, rollout = out.split("\nrollout: ")
    assert "\nupdate: the train step on the packed rollout\n" in update
    assert rollout.startswith(
        f"generation of {rows} rows x {prompt_tokens} prompt tokens + {patches} patches, "
        f"{grpo.max_completion_tokens} new tokens"
    ), rollout.splitlines()[0]

    def gib(block: str, name: str) -> float:
        return float(next(line for line in block.splitlines() if line.strip().startswith(name + " ")).split()[-4])

    for block in (update, rollout):
        assert "-> fits" in block and 0 < gib(block, "total") < 1.0
    # beside the generation the chips hold the rest of the train state: Adam's two float32 moments of every
    # parameter (replicated: grpo_toy's mesh is data-parallel only)
    params = sum(x.size for x in jax.tree_util.tree_leaves(abstract_params(model_config)))
    assert abs(gib(rollout, "optimizer state") - 2 * 4 * params / 2**30) <= 0.006
    parts = [gib(rollout, name) for name in ("arguments", "outputs", "temporaries", "code", "optimizer state")]
    assert abs(sum(parts) - gib(rollout, "aliased (donated)") - gib(rollout, "total")) <= 0.03
    assert out.rstrip().endswith("GRPO step: both phases fit")


def test_generate_plan_compiles_context_parallel_inference_and_counts_the_kv_cache():
    """--mode=generate: the tiny MoE model's prefill of one 2,048-token row split over 4 context shards (splash
    attention on the prompt; megablox experts on a mesh without an expert axis, in a shard_map as a Pallas kernel
    must be) and greedy decoding, its KV cache split over context."""
    flags = ["--config.mesh.fsdp=1", "--config.mesh.context=4", "--config.model.overrides.attention_impl=splash"]
    flags += ["--config.model.overrides.moe_backend=megablox"]
    flags += ["--config.data.seq_len=2048", "--config.data.max_patches=1024", "--config.data.batch_size=1"]
    out = compile_for_tpu("configs/tiny_moe.py", *flags, "--mode=generate", "--max_new_tokens=32", timeout=600)
    assert "mesh {'data': 1, 'fsdp': 1, 'context': 4, 'tensor': 1, 'expert': 1}" in out
    text = model_config_from(config_from_file(os.path.join(ROOT, "configs/tiny_moe.py"))).text
    # every layer's keys and values of 2,048 + 32 tokens, a quarter on each chip (float32: tiny computes in it)
    cache = text.num_hidden_layers * 2 * text.num_key_value_heads * (2048 + 32) * text.head_dim * 4 / 4
    assert "generate: 1 x 2048 prompt tokens + 1024 patches, 32 new tokens (greedy)" in out
    assert f"KV cache {cache / 2**30:.2f} GiB per chip" in out
    assert "-> fits" in out
    kernels = out.split("Pallas (Mosaic) kernel calls: ")[1].split()[0]
    assert int(kernels) >= 3, kernels  # splash on the prompt, megablox's grouped matmuls
