"""A pod in miniature: runs of 2 processes x 4 CPU devices on this machine (experiments.launch_local, gloo
collectives over 127.0.0.1), each compared with the same work in one process with 8 devices (this test process).

Training reads the data as 2 hosts do in both (`data.num_shards=2`) and uses an fsdp mesh over all 8 devices, so
every weight, optimizer state and checkpoint is split across the two processes. Covered: the losses and the
periodic evaluation (on finite sets whose shares end at different batches on the two processes), the final
export and `experiments.export` (one writer, the same bytes), SIGTERM to one process, kill -9 of one process and a
damaged checkpoint that only one process reads, `experiments.eval`, a train step's gradients, sharded loading
(the bytes each process reads), the data shards (every example once; also with 4 processes x 2 devices), the
teacher cache of offline distillation, and the mistakes that must stop a run: another config on one process, an
unreachable coordinator, a workdir in use. The module takes about 4 minutes on 2 cores (one compile per binary
start; the runs are shared between the tests that compare them)."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import CONFIG, ENV, ROOT, XLA_FLAGS, flip_bytes_in_largest_file, losses
from ml_collections import ConfigDict
from multiprocess_worker import data_run_config, example_labels, keep_gradient
from safetensors.numpy import load_file

import qwen3vl_jax
from experiments.cache_teacher import write_cache
from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.hf_export import export_hf
from qwen3vl_jax.checkpoints.train_state import RUN_RECORD, Checkpointer
from qwen3vl_jax.checkpoints.workdir_lock import LOCK_FILE, WorkdirInUse, WorkdirLock
from qwen3vl_jax.data.pipeline import build_dataset
from qwen3vl_jax.data.sources import JsonlSource
from qwen3vl_jax.evaluation.harness import generate_answers, summarize
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.model import abstract_params, init_params
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, batch_shardings, make_mesh, param_shardings
from qwen3vl_jax.training.builder import StepBuilder, processor_from
from qwen3vl_jax.training.teacher_cache import TEACHER_TOP_K, TeacherCache
from qwen3vl_jax.training.train_step import TrainState, make_train_step
from qwen3vl_jax.training.trainer import Trainer, host_data_config

STEPS = 8
# the eval sets' sizes: the two processes' shares of "grounding" (9) and "counting" (13) end after different
# numbers of batches (checked in test_periodic_eval_...), the others are small; video_timestamp is empty (its
# answers do not fit in rows of 128 tokens, so it would count no examples anyway)
EVAL_SIZES = dict(shapes=3, counting=13, grounding=9, ocr=3, video_timestamp=0, digits=3)
RUN_FLAGS = [
    f"--config.steps={STEPS}",
    "--config.log_every=1",
    "--config.eval.batch_size=8",
    "--config.data.seq_len=128",
    "--config.data.max_patches=64",
    "--config.data.batch_size=8",
    "--config.data.num_shards=2",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
    "--config.checkpoint.keep=3",
    "--config.peak_flops_per_device=1e11",
    *(f"--config.eval.sets.{name}.num_examples={n}" for name, n in EVAL_SIZES.items()),
]


def train_command(workdir, *, every=4, export=True, evaluate=True):
    return [
        "experiments.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.checkpoint.every={every}",
        f"--config.export_hf={export}",
        f"--config.eval.every={4 if evaluate else 0}",
        *RUN_FLAGS,
    ]


class Launch:
    """`experiments.launch_local` of `binary` in the background, its output collected."""

    def __init__(self, binary, *, processes=2, devices=4):
        launcher = [sys.executable, "-m", "experiments.launch_local", f"--processes={processes}"]
        launcher.append(f"--devices_per_process={devices}")
        self.process = subprocess.Popen(
            [*launcher, "--", *map(str, binary)],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pid(self, index: int) -> int:
        deadline = time.time() + 60
        while time.time() < deadline:
            for line in list(self.lines):
                if line.startswith(f"[launch_local] process {index} is pid "):
                    return int(line.split()[-1])
            time.sleep(0.05)
        raise AssertionError(f"the launcher did not start process {index}:\n{self.output}")

    def wait(self, timeout=600) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def launch(binary, *, processes=2, devices=4) -> str:
    run = Launch(binary, processes=processes, devices=devices)
    code = run.wait()
    assert code == 0, run.output[-5000:]
    assert f"[launch_local] all {processes} processes ended with exit code 0" in run.output
    return run.output


def wait_for_step(workdir, step, run: Launch):
    deadline = time.time() + 300
    while max(losses(workdir), default=0) < step:
        assert run.process.poll() is None, f"the run ended before step {step}:\n{run.output[-5000:]}"
        assert time.time() < deadline
        time.sleep(0.02)


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def run_config_of(workdir) -> ConfigDict:
    with open(os.path.join(workdir, RUN_RECORD)) as f:
        return ConfigDict(json.load(f)["run_config"])


# ------------------------------------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The workdir of an 8-step run of 2 processes x 4 devices."""
    workdir = tmp_path_factory.mktemp("two_processes")
    output = launch(train_command(workdir))
    assert "[1] process 1 of 2: joining the run through the coordinator at 127.0.0.1:" in output
    return workdir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, two_processes):
    """The same run in this process (8 devices), reading the data as the 2 hosts do (data.num_shards=2)."""
    assert jax.device_count() == 8 and jax.process_count() == 1
    workdir = tmp_path_factory.mktemp("one_process")
    config = run_config_of(two_processes)  # what the 2-process run recorded, flags applied
    trainer = Trainer(config, str(workdir), config_name="configs/tiny.py")
    assert trainer.row_group_count == 1 and trainer.num_shards == 2
    trainer.run()
    return workdir


def test_two_processes_write_the_losses_of_one_process_reading_the_same_shards(two_processes, one_process):
    multi, single = records(two_processes, "train"), records(one_process, "train")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    for a, b in zip(multi, single):
        # the same global batches on the same mesh; gloo's reductions round differently (measured: <= 1.5e-7)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-6, err_msg=f"step {a['step']}")
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=2e-6, err_msg=f"step {a['step']}")
    assert multi[0]["loss"] != multi[-1]["loss"]  # it trains


def test_periodic_eval_evaluates_every_example_once_and_agrees(two_processes, one_process):
    """Every eval set's first num_examples examples, each once, although the processes' shares of two sets end
    after different numbers of batches (every process runs as many as the longest; its padding counts for
    nothing), and the same metrics as one process."""
    config = run_config_of(two_processes)
    processor = processor_from(config)
    uneven = []
    for name, size in EVAL_SIZES.items():
        once = dict(config.data.to_dict(), sources=config.eval.sets[name].sources, shuffle=False, num_epochs=1)
        data = host_data_config(dict(once, num_examples=size), global_batch_size=8, row_group_count=2, context_shards=1)
        shares = [build_dataset(data, processor, model_config=CONFIG, shard_index=s, shard_count=2) for s in (0, 1)]
        if len(list(shares[0])) != len(list(shares[1])):
            uneven.append(name)
    assert {"grounding", "counting"} <= set(uneven), uneven  # the case that used to hang

    multi, single = records(two_processes, "eval/grounding"), records(one_process, "eval/grounding")
    assert [r["step"] for r in multi] == [4, 8]
    for name, size in EVAL_SIZES.items():
        multi, single = records(two_processes, f"eval/{name}"), records(one_process, f"eval/{name}")
        for a, b in zip(multi, single, strict=True):
            assert a["examples"] == b["examples"] == size, name
            assert a["exact_match"] == b["exact_match"], name
            np.testing.assert_allclose(a["token_ce"], b["token_ce"], rtol=2e-6, err_msg=name)


def test_final_exports_hold_the_same_tensors(two_processes, one_process):
    """The run's final HF export (written by process 0 from weights split across both processes) against the
    one-process run's: the same files, the same tensors up to the runs' rounding."""
    multi, single = two_processes / "hf", one_process / "hf"
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
    a, b = load_file(multi / "model.safetensors"), load_file(single / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5, err_msg=key)
    assert (multi / "config.json").read_text() == (single / "config.json").read_text()


def test_export_binary_with_two_processes_writes_the_bytes_of_one(two_processes, tmp_path):
    """experiments.export of the run's step 4 by 2 processes (every tensor gathered from both, process 0 writes)
    against the same export by one process with 8 devices: byte for byte."""
    launch(["experiments.export", f"--workdir={two_processes}", "--step=4", f"--output={tmp_path / 'two'}"])
    config = run_config_of(two_processes)
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
    checkpointer = Checkpointer(str(two_processes / "checkpoints"), keep=3, every=1)
    params = checkpointer.restore_state(4, builder.abstract_state()).params
    checkpointer.close()
    export_hf(str(tmp_path / "one"), params, config=builder.model_config, processor=processor_from(config))
    names = sorted(os.listdir(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "two")) == names and "model.safetensors" in names
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_sigterm_to_one_process_then_kill_9_then_a_damaged_checkpoint_resume_as_uninterrupted(two_processes, tmp_path):
    """One workdir through what a pod's hosts go through, checkpointing every 2 steps: SIGTERM to process 1 only
    (a maintenance event on one host): both processes save the same step and exit 0. Relaunched, it resumes
    there; kill -9 of process 1: the launcher stops process 0. The newest checkpoint is then damaged in the part
    only process 1 reads: both processes pass it over and resume from the one before. The losses are those of
    the uninterrupted run, bit for bit."""
    workdir = tmp_path / "run"
    command = train_command(workdir, every=2, export=False, evaluate=False)
    first = Launch(command)
    wait_for_step(workdir, 1, first)
    os.kill(first.pid(1), signal.SIGTERM)
    assert first.wait() == 0, first.output[-5000:]
    stopped = max(losses(workdir))
    assert 1 <= stopped <= STEPS - 3, first.output[-3000:]
    assert f"SIGTERM: saving a checkpoint of step {stopped} on every process and stopping" in first.output
    saved = saved_steps(workdir)
    assert saved[-1] == stopped  # although `every` is 2 (when the step is odd)
    assert sorted(os.listdir(workdir / "checkpoints" / str(stopped) / "data")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    second = Launch(command)
    deadline = time.time() + 300
    while not [step for step in saved_steps(workdir) if step > stopped]:  # a newer checkpoint, complete
        assert second.process.poll() is None and time.time() < deadline, second.output[-5000:]
        time.sleep(0.02)
    os.kill(second.pid(1), signal.SIGKILL)
    assert second.wait() == 128 + signal.SIGKILL
    assert "[launch_local] process 1 ended with signal SIGKILL: stopping the others" in second.output
    assert f"resumed from the checkpoint of step {stopped}" in second.output
    saved = saved_steps(workdir)
    assert len(saved) >= 2 and saved[-1] < STEPS

    newest = saved[-1]
    damaged = flip_bytes_in_largest_file(workdir / "checkpoints" / str(newest) / "state" / "ocdbt.process_1")
    assert damaged
    third = launch(command)
    assert f"the checkpoint of step {newest} is damaged (on process 1: " in third
    assert f"resumed from the checkpoint of step {saved[-2]}" in third
    assert losses(workdir) == losses(two_processes)  # every step, the ones run again included


def saved_steps(workdir) -> list[int]:
    """The steps of the complete checkpoints (orbax renames a checkpoint's folder to its step once written)."""
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def test_eval_binary_with_two_processes_gives_the_one_process_answers(two_processes, tmp_path):
    """experiments.eval of the run's export by 2 processes on a JSONL set of 5 (batches of 4: 4 + 1): each
    example answered once, the same answers and summary as one process."""
    questions = tmp_path / "questions.jsonl"
    with open(questions, "w") as f:
        for i in range(5):
            messages = [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    checkpoint = two_processes / "hf"
    flags = [f"--checkpoint={checkpoint}", f"--jsonl={questions}", "--batch_size=4", "--max_new_tokens=4"]
    launch(["experiments.eval", *flags, f"--output={tmp_path / 'eval'}"])
    with open(tmp_path / "eval" / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    assert [p["id"] for p in predictions] == [f"questions.jsonl:{i}" for i in range(1, 6)]

    model = qwen3vl_jax.load_pretrained(str(checkpoint), mesh=make_mesh({"data": -1}))
    source = JsonlSource(str(questions))
    expected = generate_answers(
        model,
        qwen3vl_jax.load_processor(str(checkpoint)),
        records=[source[i] for i in range(len(source))],
        set_name="questions.jsonl",
        batch_size=4,
        max_new_tokens=4,
    )
    assert [p["prediction"] for p in predictions] == [e["prediction"] for e in expected]
    with open(tmp_path / "eval" / "summary.json") as f:
        assert json.load(f) == summarize(expected)


# ------------------------------------------------------------------------------------------------ the worker


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """A JSONL source of 23 text examples, each naming its index ("example 7: ...") and of varying length."""
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    with open(path, "w") as f:
        for i in range(23):
            messages = [
                {"role": "user", "content": f"example {i}: what comes after {i}?" + " and then" * (i % 4)},
                {"role": "assistant", "content": str(i + 1)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_worker(out, *, processes, devices, parts, checkpoint, questions) -> list[dict]:
    launch(
        [os.path.join("tests", "multiprocess_worker.py"), out, checkpoint, questions, parts],
        processes=processes,
        devices=devices,
    )
    results = []
    for index in range(processes):
        with open(out / f"process_{index}.json") as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module")
def initial_params():
    """The tiny model's step-0 parameters (PRNGKey(0)), fsdp over this process's 8 devices: the train step of
    the worker (which reads them, rather than compiling the initialisation again on 2 processes) and of
    test_a_train_step starts from them. The sharded initialisation on 2 processes is compared with one process's
    by test_two_processes_write_the_losses_of_one_process_reading_the_same_shards (the first step's loss)."""
    mesh = make_mesh({"fsdp": -1})
    shardings = param_shardings(abstract_params(CONFIG, boxed=True), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return jax.jit(init_params, static_argnums=0, out_shardings=shardings)(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def worker(tmp_path_factory, batch, tiny, questions, initial_params):
    """tests/multiprocess_worker.py run by 2 processes x 4 devices: the directory and the results per process."""
    out = tmp_path_factory.mktemp("worker")
    np.savez(out / "batch.npz", **batch.arrays)
    flat = jax.tree_util.tree_flatten_with_path(initial_params)[0]
    np.savez(out / "params.npz", **{jax.tree_util.keystr(path): np.asarray(value) for path, value in flat})
    return out, run_worker(out, processes=2, devices=4, parts="all", checkpoint=tiny.path, questions=questions)


@pytest.fixture(scope="module")
def worker_4x2(tmp_path_factory, tiny, questions):
    """The worker's cheap parts (agreement, data shards) run by 4 processes x 2 devices."""
    out = tmp_path_factory.mktemp("worker_4x2")
    return out, run_worker(
        out, processes=4, devices=2, parts="agreement,data", checkpoint=tiny.path, questions=questions
    )


@pytest.mark.parametrize("layout", ["worker", "worker_4x2"])
def test_processes_agree_on_texts_flags_and_stream_ends(layout, request):
    _, results = request.getfixturevalue(layout)
    count = len(results)
    for index, result in enumerate(results):
        agreement = result["agreement"]
        assert result["process_index"] == index and result["process_count"] == count
        assert agreement["texts"] == ["x" * (3 + 5 * i) for i in range(count)]
        assert agreement["any"] == [True, False]
        # process 0 has items 0, 1, 2, the others only item 0 and then fillers (-1); each passes 8 values a step
        assert agreement["lockstep_sums"] == [0, 8 * 1 - 8 * (count - 1), 8 * 2 - 8 * (count - 1)]


def test_a_train_step_gives_the_one_process_loss_and_gradients(worker, batch, initial_params):
    """The gradients (kept as its state by an "optimizer" that leaves the parameters alone) with fsdp over the 8
    devices of 2 processes against the same in one process."""
    out, results = worker
    mesh = make_mesh({"fsdp": -1})
    optimizer = keep_gradient()
    step = make_train_step(CONFIG, optimizer=optimizer, schedule=lambda count: 1.0, loss_normalization="sqrt")
    params = initial_params
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
        new_state, metrics = jax.jit(step)(state, jax.device_put(batch, batch_shardings(mesh)))
    with np.load(out / "gradients.npz") as stored:
        multi = dict(stored)
    flat = {
        jax.tree_util.keystr(path): np.asarray(g)
        for path, g in jax.tree_util.tree_flatten_with_path(new_state.opt_state)[0]
    }
    assert multi.keys() == flat.keys() and len(flat) > 50
    for name, gradient in flat.items():
        assert np.abs(gradient).max() > 0, name
        # measured: within 2.3e-7 of each tensor's largest entry (gloo's reductions round differently)
        np.testing.assert_allclose(multi[name], gradient, rtol=0, atol=1e-6 * np.abs(gradient).max(), err_msg=name)
    for result in results:
        np.testing.assert_allclose(result["metrics"]["loss"], float(metrics["loss"]), rtol=2e-6)
        np.testing.assert_allclose(result["metrics"]["grad_norm"], float(metrics["grad_norm"]), rtol=2e-6)


def test_sharded_loading_reads_each_process_boxes_only(worker, tiny):
    """Each process reads the bytes of its own devices' boxes of every tensor (fsdp over both processes: about
    half of the checkpoint each), and the arrays equal the one-process load."""
    _, results = worker
    files = [os.path.join(tiny.path, n) for n in os.listdir(tiny.path) if n.endswith(".safetensors")]
    total = sum(os.path.getsize(file) for file in files)
    config = hf_io.load_config(tiny.path)
    single = hf_io.load_params(tiny.path, config)
    expected = {
        jax.tree_util.keystr(path): [
            float(np.asarray(x, np.float64).sum()),
            float(np.abs(np.asarray(x, np.float64)).sum()),
        ]
        for path, x in jax.tree_util.tree_flatten_with_path(single)[0]
    }
    for result in results:
        loading = result["loading"]
        assert loading["bytes_read"] == loading["box_elements"] * 4  # float32 files: only its boxes, once
        assert loading["bytes_read"] < 0.75 * total
        assert loading["checksums"].keys() == expected.keys()
        for name, sums in expected.items():
            np.testing.assert_allclose(loading["checksums"][name], sums, rtol=1e-6, err_msg=name)
    assert sum(r["loading"]["bytes_read"] for r in results) >= 0.95 * total


@pytest.mark.parametrize("layout", ["worker", "worker_4x2"])
def test_hosts_read_their_shards_every_example_once_as_one_process_does(layout, request, questions, tmp_path):
    """Over an epoch of a finite source every example appears exactly once across the processes, and one process
    reading data.num_shards = (the number of processes) sees the same global batches (process 0's rows, then
    process 1's, ...)."""
    _, results = request.getfixturevalue(layout)
    count = len(results)
    assert [r["data"]["row_group"] for r in results] == list(range(count))
    seen = [label for r in results for batch in r["data"]["batches"] for row in batch for label in row]
    assert sorted(seen) == sorted(f"example {i}" for i in range(23))  # each once

    trainer = Trainer(data_run_config(questions, num_shards=count), str(tmp_path / "single"))
    single = [example_labels(b) for b in trainer.dataset(dataclasses.replace(trainer.data_config, num_epochs=1))]
    trainer.lock.release()
    trainer.checkpointer.close()
    trainer.writer.close()
    shares = [r["data"]["batches"] for r in results]
    padding = [[]] * (4 // count)  # a process whose share has ended contributes empty rows
    combined = [
        [row for share in shares for row in (share[i] if i < len(share) else padding)]
        for i in range(max(map(len, shares)))
    ]
    assert single == combined


# ------------------------------------------------------------------------------------------------ mistakes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_alone(workdir, *, env) -> subprocess.CompletedProcess:
    """The train binary in one process (its output captured)."""
    command = [sys.executable, "-m", *train_command(workdir, export=False)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def by_hand(index, *, port, workdir, extra=()):
    """A train process of a 2-process run started by hand, with the JAX_* environment variables."""
    env = dict(ENV, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
    env.update(JAX_INITIALIZATION_TIMEOUT="60", XLA_FLAGS=f"{XLA_FLAGS} --xla_force_host_platform_device_count=4")
    command = [sys.executable, "-m", *train_command(workdir, export=False), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_processes_started_with_different_configs_all_stop_naming_the_difference(tmp_path):
    port = free_port()
    workdir = tmp_path / "run"
    processes = [
        by_hand(0, port=port, workdir=workdir),
        by_hand(1, port=port, workdir=workdir, extra=["--config.data.seed=7"]),
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 1, output[-3000:]
        assert "the 2 processes of this run were started with different command line or configs" in output
        assert "config.data.seed: 7 on process 1, 0 on process 0" in output
    assert not os.path.exists(workdir / "metrics.jsonl")


def test_a_process_that_cannot_reach_the_coordinator_stops_naming_it(tmp_path):
    port = free_port()  # nobody listens there
    env = dict(ENV, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    env["JAX_INITIALIZATION_TIMEOUT"] = "3"
    start = time.time()
    result = train_alone(tmp_path, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"error: cannot reach the coordinator at 127.0.0.1:{port} within 3 s" in result.stderr
    assert time.time() - start < 60


def test_a_workdir_in_use_is_refused_and_free_again_after_its_holder_dies(tmp_path):
    """The train binary refuses a workdir whose lock another run holds (naming it) and does not touch it; a
    lock whose holder died (kill -9) is free. The bucket form (a lease renewed by its holder) refuses a fresh
    lease of another run and takes over an expired one."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qwen3vl_jax.checkpoints.workdir_lock import WorkdirLock; "
            f"lock = WorkdirLock({str(tmp_path)!r}); lock.acquire(); print('locked', flush=True); time.sleep(600)",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    result = train_alone(tmp_path, env=ENV)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"error: {tmp_path} is in use by another run (" in result.stderr
    assert f"pid {holder.pid}, 1 process(es)" in result.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl") and not os.path.exists(tmp_path / RUN_RECORD)
    with pytest.raises(WorkdirInUse, match=f"pid {holder.pid}"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()  # the kernel released the dead holder's lock
    lock.release()

    lease = tmp_path / "bucket"
    first = WorkdirLock(str(lease), lease=True)
    first.acquire()
    with pytest.raises(WorkdirInUse, match=r"its lease was renewed \d+ s ago"):
        WorkdirLock(str(lease), lease=True).acquire()
    first.release()
    assert not os.path.exists(lease / LOCK_FILE)
    stale = dict(host="elsewhere", pid=1, processes=16, started="2026-01-01T00:00:00+00:00", id="x", renewed=0.0)
    (lease / LOCK_FILE).write_text(json.dumps(stale))
    second = WorkdirLock(str(lease), lease=True)
    second.acquire()  # an expired lease is taken over
    second.release()


def test_teacher_cache_of_two_processes_equals_one_process_reading_two_shards(two_processes, tmp_path):
    """experiments.cache_teacher by 2 processes (each its rows, process 0 writes whole global batches) against its
    write_cache in this process with 8 devices reading data.num_shards=2: the same files; a one-process student
    run accepts the 2-process cache, and each process's rows of it are the rows of the whole batch."""
    teacher = [f"--config.distill.teacher={two_processes / 'hf'}", "--config.distill.top_k=8", "--config.steps=2"]
    binary = ["experiments.cache_teacher", "--config=configs/tiny.py", *RUN_FLAGS, *teacher]
    launch([*binary, f"--cache_dir={tmp_path / 'two'}"])
    config = run_config_of(two_processes)  # configs/tiny.py with RUN_FLAGS, as the 2-process run recorded it
    config.distill.teacher, config.distill.top_k, config.steps = str(two_processes / "hf"), 8, 2
    write_cache(config, str(tmp_path / "one"))  # this process, 8 devices, data.num_shards=2
    assert (tmp_path / "two" / "cache.json").read_text() == (tmp_path / "one" / "cache.json").read_text()
    for step in range(2):
        with (
            np.load(tmp_path / "two" / f"step_{step:08d}.npz") as two,
            np.load(tmp_path / "one" / f"step_{step:08d}.npz") as single,
        ):
            assert two.keys() == single.keys()
            for name in ("input_ids", "loss_mask", "positions", "top_ids"):
                np.testing.assert_array_equal(two[name], single[name], err_msg=name)
            np.testing.assert_allclose(two["top_logits"], single["top_logits"], rtol=0, atol=1e-5)
            input_ids, loss_mask = two["input_ids"], two["loss_mask"]

    empty = TrainingBatch.empty(len(input_ids), seq_len=input_ids.shape[1], max_patches=4, patch_dim=1)
    rows = empty.replace(input_ids=input_ids, loss_mask=loss_mask)
    cache = TeacherCache(str(tmp_path / "two"))
    whole = cache.add_to(rows, 1)
    for first_row in (0, 4):  # the two processes' halves
        half = jax.tree_util.tree_map(lambda value, start=first_row: value[start : start + 4], rows)
        part = cache.add_to(half, 1, first_row=first_row)
        for name in TEACHER_TOP_K:
            np.testing.assert_array_equal(part.extra[name], whole.extra[name][first_row : first_row + 4], err_msg=name)
    assert whole.extra["teacher_top_ids"].any()

    config.distill.teacher, config.distill.teacher_cache = "", str(tmp_path / "two")
    config.objective = "distill"
    student = Trainer(config, str(tmp_path / "student"))
    assert student.objective.cache is not None and student.num_shards == 2
    student.lock.release()
    student.checkpointer.close()
    student.writer.close()
