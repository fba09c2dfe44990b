"""The eval metrics, and the eval binary on an HF checkpoint with a JSONL dataset and on a training workdir."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, XLA_FLAGS, command, image

from qwen3vl_jax.evaluation.metrics import character_accuracy, score
from qwen3vl_jax.processing import Processor, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template


def test_metrics():
    assert character_accuracy("HELLO", "HELLO") == 1.0
    assert character_accuracy("HELO", "HELLO") == pytest.approx(0.8)  # one deletion in five characters
    assert character_accuracy("", "ABC") == 0.0 and character_accuracy("XXXXXXXX", "AB") == 0.0
    box = {"box": [100, 100, 300, 300]}
    truth = dict(reference="", meta=box)
    assert score("grounding", "<|box_start|>(100,100),(300,300)<|box_end|>", **truth)["box_hit"] == 1.0
    half = score("grounding", "<|box_start|>(100,100),(300,200)<|box_end|>", **truth)
    assert half["iou"] == pytest.approx(0.5) and half["box_hit"] == 1.0
    assert score("grounding", "no box", **truth) == {
        "exact_match": 0.0,
        "iou": 0.0,
        "box_hit": 0.0,
        "x_accuracy": 0.0,
        "y_accuracy": 0.0,
    }
    # per-axis: the centre (350, 200) of a box in the right row but the next column
    shifted = score("grid_grounding", "<|box_start|>(300,100),(400,300)<|box_end|>", **truth)
    assert (shifted["x_accuracy"], shifted["y_accuracy"], shifted["box_hit"]) == (0.0, 1.0, 0.0)
    assert score("text_reverse", "CBX", reference="CBA", meta={})["char_accuracy"] == pytest.approx(2 / 3)
    timestamp = dict(reference="2.5 seconds", meta={"seconds": 2.25})
    assert score("video_timestamp", "2.5 seconds", **timestamp)["abs_error_seconds"] == 0
    assert score("video_timestamp", "3.0 seconds", **timestamp)["abs_error_seconds"] == 0.5
    assert "abs_error_seconds" not in score("video_timestamp", "soon", **timestamp)
    assert score("qa", " red ", reference="red", meta={}) == {"exact_match": 1.0}


def run_eval(args, tmp_path, *, env=ENV):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.eval", f"--output={tmp_path / 'report'}", "--max_new_tokens=4", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Evaluation of")
    return summary, predictions


@pytest.fixture(scope="module")
def checkpoint_and_data(tiny, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval_inputs")
    checkpoint = tmp_path / "hf"
    shutil.copytree(tiny.path, checkpoint)
    Processor(byte_tokenizer(), load_chat_template(None)).save_pretrained(str(checkpoint))
    data = tmp_path / "qa.jsonl"
    coffee = image("coffee.jpg")
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": coffee}, {"type": "text", "text": f"question {i}"}],
                },
                {"role": "assistant", "content": "answer"},
            ]
        }
        for i in range(3)
    ]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                {"role": "assistant", "content": "answer"},
            ]
        }
    )
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return checkpoint, data


@pytest.fixture(scope="module")
def single_device_eval(checkpoint_and_data, tmp_path_factory):
    checkpoint, data = checkpoint_and_data
    args = [f"--checkpoint={checkpoint}", f"--jsonl={data}", "--batch_size=2"]
    return run_eval(args, tmp_path_factory.mktemp("single"))


def test_eval_binary_on_an_hf_checkpoint_and_a_jsonl_dataset(single_device_eval):
    summary, predictions = single_device_eval
    assert summary["qa.jsonl"]["examples"] == 4
    assert [("error" in p) for p in predictions] == [False, False, False, True]
    assert "missing.png does not exist" in predictions[3]["error"]


def test_eval_binary_sharded_over_the_config_mesh(checkpoint_and_data, single_device_eval, tmp_path):
    """With --config the checkpoint is loaded and evaluated sharded over 4 devices (fsdp 2 x tensor 2): the
    same answers as on one device."""
    checkpoint, data = checkpoint_and_data
    config = tmp_path / "tiny_without_eval_sets.py"  # the tiny config's mesh fields, only the JSONL set evaluated
    config.write_text(
        "from configs.tiny import get_config as tiny\n\n\ndef get_config():\n"
        "    config = tiny()\n    config.eval.sets = {}\n    return config\n"
    )
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    args = [f"--checkpoint={checkpoint}", f"--jsonl={data}", "--batch_size=2", f"--config={config}", *mesh]
    env = dict(ENV, XLA_FLAGS=f"{XLA_FLAGS} --xla_force_host_platform_device_count=4")
    _, predictions = run_eval([*args, "--num_examples=3"], tmp_path, env=env)  # the first 3
    assert [p["set"] for p in predictions] == ["qa.jsonl"] * 3
    assert predictions == single_device_eval[1][:3]


def test_eval_binary_on_a_training_workdir(tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(command(workdir, steps=4, every=4), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    summary, _predictions = run_eval(
        [f"--workdir={workdir}", "--config=configs/tiny.py", "--num_examples=2", "--batch_size=2"], tmp_path
    )
    assert set(summary) == {"shapes", "counting", "grounding", "ocr", "video_timestamp", "digits"}
    assert all(s["examples"] == 2 for s in summary.values())
    assert {"iou", "box_hit"} <= set(summary["grounding"]) and "char_accuracy" in summary["ocr"]
