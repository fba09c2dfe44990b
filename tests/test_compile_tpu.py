"""The compile planner AOT-compiles the train step for a TPU topology with libtpu on this CPU machine."""

import os
import subprocess
import sys

from helpers import ROOT


def test_tiny_train_step_compiles_for_v5p_and_fits():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.compile",
            "--config=configs/tiny.py",
            "--topology=v5p:2x2x1",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "(4 x TPU v5), mesh {'data': 2, 'fsdp': 2, 'tensor': 1, 'expert': 1}" in out
    assert "-> fits" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert 0.01 < float(total.split()[1]) < 1.0  # GiB per chip: the tiny model is small but not nothing
