"""experiments.export: any saved step of a run as an HF directory that transformers loads, with our logits."""

import os
import subprocess
import sys

import numpy as np
import transformers
from helpers import ENV, ROOT, command
from hf_reference import batch_inputs, build_prompt, hf_logits
from ml_collections import ConfigDict

import qwen3vl_jax
from qwen3vl_jax import storage
from qwen3vl_jax.checkpoints.train_state import RUN_RECORD, Checkpointer
from qwen3vl_jax.parallel.sharding import make_mesh
from qwen3vl_jax.training.builder import StepBuilder


def test_export_of_step_2_of_a_3_step_run_loads_in_transformers_with_our_logits(tmp_path):
    workdir, output = tmp_path / "run", tmp_path / "step2_hf"
    subprocess.run(command(workdir, steps=3, every=1), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    export = [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", "--step=2", f"--output={output}"]
    result = subprocess.run(export, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported step 2 of {workdir}" in result.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.exists(output / name), name

    # step 2's parameters, restored here from the run's own checkpoint
    config = ConfigDict(storage.read_json(str(workdir / RUN_RECORD))["run_config"])
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
    checkpointer = Checkpointer(str(workdir / "checkpoints"), keep=3, every=1)
    params = checkpointer.restore_state(2, builder.abstract_state()).params
    checkpointer.close()
    ours = qwen3vl_jax.Qwen3VLModel(builder.model_config, params)

    reference = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(output)).eval()
    parts = [("text", 3), ("image", (4, 6)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]
    inputs = batch_inputs(
        builder.model_config, [build_prompt(builder.model_config, parts, rng=np.random.default_rng(1))]
    )
    np.testing.assert_allclose(ours(**inputs), hf_logits(reference, inputs), atol=1e-4, rtol=0)
    # and step 2 is not step 3: the export is of the step asked for
    checkpointer = Checkpointer(str(workdir / "checkpoints"), keep=3, every=1)
    later = qwen3vl_jax.Qwen3VLModel(
        builder.model_config, checkpointer.restore_state(3, builder.abstract_state()).params
    )
    checkpointer.close()
    assert np.abs(later(**inputs) - ours(**inputs)).max() > 1e-4
