"""The compile planner AOT-compiles the train step for a TPU topology with libtpu on this CPU machine."""

from helpers import compile_for_tpu


def test_tiny_train_step_compiles_for_v5p_and_fits():
    splash = "--config.model.overrides.attention_impl=splash"
    out = compile_for_tpu("configs/tiny.py", "--config.mesh.data=2", "--config.mesh.fsdp=2", splash, timeout=600)
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
