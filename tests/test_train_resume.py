"""The train binary survives kill -9: the same command resumes from the newest complete checkpoint and
reproduces the uninterrupted loss sequence exactly, also when the kill lands in the middle of a save."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from helpers import ENV, ROOT, command, flip_bytes_in_largest_file, losses
from tensorboardX.proto.event_pb2 import Event

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def run(workdir, *, steps, every):
    result = subprocess.run(
        command(workdir, steps=steps, every=every), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def start_and_kill(workdir, *, steps, every, after_step):
    process = subprocess.Popen(
        command(workdir, steps=steps, every=every),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while max(losses(workdir), default=0) < after_step:
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def checkpoint_dirs(workdir):
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if TMP_SUFFIX in n]


def tensorboard_scalars(workdir) -> dict[str, list[float]]:
    """Scalars of the TensorBoard event files (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    scalars: dict[str, list[float]] = {}
    folder = os.path.join(workdir, "tensorboard")
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The workdir of a 16-step run checkpointed every 4 steps (the newest two kept: 12 and 16)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(workdir, steps=16, every=4)
    assert sorted(losses(workdir)) == list(range(1, 17))
    assert tensorboard_scalars(workdir)["train/loss"] == pytest.approx([losses(workdir)[s] for s in range(1, 17)])
    return workdir


@pytest.fixture(scope="module")
def reference(uninterrupted):
    return losses(uninterrupted)


def test_kill_9_then_rerun_resumes_with_identical_losses(tmp_path, reference):
    start_and_kill(tmp_path, steps=16, every=4, after_step=9)
    assert max(losses(tmp_path)) < 16
    output = run(tmp_path, steps=16, every=4)
    assert "resumed from the checkpoint of step" in output
    assert losses(tmp_path) == reference  # bit-identical, step by step


def test_kill_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path, reference):
    """Checkpoint every step so that saves are nearly always in flight; kill until a kill catches one (an
    unfinalised temporary checkpoint dir is left behind), then resume."""
    for attempt in range(10):
        start_and_kill(tmp_path, steps=16, every=1, after_step=min(3 + attempt, 14))
        finished, in_flight = checkpoint_dirs(tmp_path)
        if in_flight:
            break
    assert in_flight, "no kill landed during a save"
    output = run(tmp_path, steps=16, every=1)
    assert f"resumed from the checkpoint of step {finished[-1]}" in output
    assert losses(tmp_path) == reference


def flip_bytes_in_newest_checkpoint(workdir) -> int:
    """Flips bytes inside the largest data file of the newest checkpoint (what a bad disk or copy does)."""
    newest = checkpoint_dirs(workdir)[0][-1]
    flip_bytes_in_largest_file(os.path.join(workdir, "checkpoints", str(newest)))
    return newest


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_or_stops_naming_it(tmp_path, uninterrupted, reference):
    shutil.copytree(uninterrupted, tmp_path / "run")
    damaged = flip_bytes_in_newest_checkpoint(tmp_path / "run")
    assert damaged == 16
    shutil.copytree(tmp_path / "run", tmp_path / "strict")
    # checkpoint.on_corrupt="error": the run stops and names the step
    strict = subprocess.run(
        [*command(tmp_path / "strict", steps=16, every=4), "--config.checkpoint.on_corrupt=error"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert strict.returncode != 0
    assert "the checkpoint of step 16 in" in strict.stderr and "is damaged: " in strict.stderr
    # tensorstore's reason, which depends on where the flipped bytes land (a checksum or the read itself)
    reason = strict.stderr.split("is damaged: ")[1].splitlines()[0]
    assert "Data corruption detected" in reason or "Error reading" in reason, reason
    # the default ("previous"): said loudly, the damaged checkpoint kept aside, resumed from step 12
    output = run(tmp_path / "run", steps=16, every=4)
    assert "WARNING: the checkpoint of step 16 is damaged" in output
    assert "resumed from the checkpoint of step 12" in output
    assert os.path.isdir(tmp_path / "run" / "checkpoints_damaged" / "16")
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    trained = [r["step"] for r in records if r.get("split") == "train"]
    assert trained == [*range(1, 17), *range(13, 17)]  # steps 13-16 run again ...
    assert losses(tmp_path / "run") == reference  # ... bit-identical
    assert {"step": 12, "split": "checkpoint", "damaged_checkpoint_step": 16} in records


def test_default_workdir_is_named_after_the_config_and_another_model_is_not_resumed_there(tmp_path):
    """Without --workdir the run goes to <temp dir>/qwen3vl_runs/tiny (announced); nothing named qwen3vl_jax
    appears in the temp dir, where it would shadow the package for any Python started there. The same workdir
    refuses a model of other shapes, naming both."""
    env = dict(ENV, TMPDIR=str(tmp_path))
    no_workdir = [arg for arg in command("unused", steps=2, every=1) if not arg.startswith("--workdir")]
    first = subprocess.run(no_workdir, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    workdir = tmp_path / "qwen3vl_runs" / "tiny"
    assert f"workdir: {workdir}" in first.stdout + first.stderr
    assert sorted(losses(workdir)) == [1, 2] and "qwen3vl_jax" not in os.listdir(tmp_path)

    wider = [
        *no_workdir,
        "--config.steps=4",
        "--config.model.overrides.text.hidden_size=256",
        "--config.model.overrides.vision.out_hidden_size=256",
    ]
    second = subprocess.run(wider, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1
    assert (
        f"{workdir} holds checkpoints of another model" in second.stderr
        and "saved:    configs/tiny.py: decoder 4 x 128" in second.stderr
        and "this run: configs/tiny.py: decoder 4 x 256" in second.stderr
    ), second.stderr[-3000:]
    assert sorted(losses(workdir)) == [1, 2]  # nothing trained or overwritten
