"""The compile planner AOT-compiles the train step for a TPU topology with libtpu on this CPU machine."""

from helpers import compile_for_tpu


def test_tiny_train_step_compiles_for_v5p_and_fits():
    out = compile_for_tpu("configs/tiny.py", "--config.mesh.data=2", "--config.mesh.fsdp=2", timeout=600)
    assert "(4 x TPU v5), mesh {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 1, 'expert': 1}" in out
    assert "-> fits" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert 0.01 < float(total.split()[1]) < 1.0  # GiB per chip: the tiny model is small but not nothing
