"""The Colab notebook tpu/qwen3vl_colab.ipynb runs top to bottom on CPU and shows what it claims: the processor's
grids, a falling loss, generated answers and two figures."""

import ast
import json
import math
import os
import re

import nbformat
from helpers import ROOT, tiny_config
from nbclient import NotebookClient

from qwen3vl_jax.data.synthetic import make_record
from qwen3vl_jax.training.builder import processor_from

NOTEBOOK = os.path.join(ROOT, "tpu", "qwen3vl_colab.ipynb")


def text_of(cell) -> str:
    """Everything a code cell printed (stdout; stderr holds the progress bar)."""
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def printed(text: str, label: str):
    match = re.search(rf"^{re.escape(label)}:? (.+)$", text, re.M)
    assert match, f"no line '{label}: ...' in\n{text}"
    return match.group(1)


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "stored with outputs"

    # One CPU device, as a Colab CPU runtime or a laptop has (not conftest's 8 fake devices, not libtpu);
    # TMPDIR keeps the notebook's workdir inside this test's tmp_path.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TMPDIR=str(tmp_path))
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": ROOT}})
    client.execute(env=env)  # raises CellExecutionError naming the cell if any cell fails

    cells = {cell.metadata["tags"][0]: cell for cell in code}
    assert list(cells) == ["install", "model", "media", "processing", "train", "generate", "loss"]
    for cell in code:
        assert not [out for out in cell.outputs if out.output_type == "error"]
    assert os.path.realpath(printed(text_of(cells["install"]), "repository")) == os.path.realpath(ROOT)
    assert "[CpuDevice(id=0)]" in text_of(cells["model"])  # the kernel got the environment above
    assert re.search(r"^[\d,]+ parameters$", text_of(cells["model"]), re.M)

    # the grids and visual token counts printed are what the processor of configs/tiny.py returns
    processor = processor_from(tiny_config())
    image_record, video_record = make_record("shapes", 0), make_record("video_timestamp", 0)
    image = image_record["messages"][0]["content"][0]["image"]
    video = video_record["messages"][0]["content"][0]
    batch = processor(
        text=[processor.apply_chat_template(r["messages"]) for r in (image_record, video_record)],
        images=[image],
        videos=[video["video"]],
        video_fps=video["fps"],
    )
    out = text_of(cells["processing"])
    assert ast.literal_eval(printed(out, "image_grid_thw")) == batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert ast.literal_eval(printed(out, "video_grid_thw")) == batch["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert int(printed(out, "image tokens")) == (batch["input_ids"] == processor.image_token_id).sum() == 4
    assert int(printed(out, "video tokens")) == (batch["input_ids"] == processor.video_token_id).sum() == 16
    assert "<0.2 seconds><|vision_start|><|video_pad|> x 4<|vision_end|><1.2 seconds>" in out
    assert "<|vision_start|><|image_pad|> x 4<|vision_end|>" in out

    # training wrote its metrics and the HF export into the workdir it printed, inside tmp_path
    workdir = printed(text_of(cells["train"]), "workdir")
    assert os.path.realpath(workdir).startswith(os.path.realpath(tmp_path))
    assert os.path.exists(os.path.join(workdir, "hf", "model.safetensors"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    assert {r["split"] for r in records} > {"train", "eval/shapes", "eval/video_timestamp"}

    # the loss printed at the end is the recorded one: finite and well below the start
    match = re.search(r"^loss ([\d.]+) at step (\d+) -> ([\d.naif]+) at step (\d+)$", text_of(cells["loss"]), re.M)
    assert match, text_of(cells["loss"])
    first, last = float(match.group(1)), float(match.group(3))
    assert (int(match.group(2)), int(match.group(4))) == (train[0]["step"], train[-1]["step"])
    assert math.isclose(first, train[0]["loss"], abs_tol=1e-4) and math.isclose(last, train[-1]["loss"], abs_tol=1e-4)
    assert math.isfinite(last) and last < 0.6 * first

    # one generated answer per held-out record, printed next to its reference
    lines = [line for line in text_of(cells["generate"]).splitlines() if "generated:" in line]
    assert len(lines) == 3 and all("reference:" in line for line in lines)
    assert [line.split()[0] for line in lines] == ["shapes/0", "counting/0", "video_timestamp/0"]

    # the frames and the loss curve are figures
    for name in ("media", "loss"):
        assert any("image/png" in out.get("data", {}) for out in cells[name].outputs), name
