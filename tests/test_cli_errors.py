"""The binaries' errors: one line `error: ...` on stderr naming what and where, exit 2 for a usage error (a bad
flag, an unknown config field, a flag value that does not parse), 1 for an error while running (a bad data
record); the traceback only with --verbose. The binaries run as subprocesses, failing before anything compiles
(the bad record: after loading a tiny checkpoint only)."""

import subprocess
import sys

import pytest
from helpers import ENV, ROOT, with_byte_processor

from experiments import cli


def run_binary(binary: str, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"experiments.{binary}", *arguments]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last line of stderr, which must be the only line of the error report."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize(
    "binary, arguments, expected",
    [
        (
            "train",
            ["--config=configs/tiny.py", "--config.optimizer.lrr=1e-3"],
            "error: unknown config field optimizer.lrr in --config=configs/tiny.py; did you mean: optimizer.lr",
        ),
        ("eval", ["--checkpoint=/nonexistent", "--batch_size=eight"], "error: flag --batch_size=eight: "),
        (
            "export",
            ["--config=configs/tiny.py", "--config.data.seq_lenght=64", "--workdir=/nonexistent", "--output=/tmp/x"],
            "error: unknown config field data.seq_lenght in --config=configs/tiny.py; did you mean: data.seq_len",
        ),
        ("export", ["--workdir=/nonexistent"], "error: flag --output=None: Flag --output must have a value"),
        ("eval", [], "error: give exactly one of --checkpoint and --workdir"),
    ],
    ids=[
        "train_unknown_config_field",
        "eval_bad_flag_value",
        "export_unknown_config_field",
        "export_missing_flag",
        "eval_usage",
    ],
)
def test_usage_errors_are_one_line_and_exit_2(binary, arguments, expected):
    result = run_binary(binary, *arguments)
    assert result.returncode == cli.USAGE_ERROR, result.stderr[-3000:]
    assert error_line(result).startswith(expected), error_line(result)


def test_verbose_shows_the_traceback_above_the_line():
    result = run_binary("train", "--config=configs/tiny.py", "--config.steps=many", "--verbose")
    assert result.returncode == cli.USAGE_ERROR
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: flag --config.steps=many: ")


def test_a_bad_record_is_named_on_one_line(tiny, tmp_path):
    checkpoint = with_byte_processor(tiny.path, tmp_path / "tiny")
    data = tmp_path / "qa.jsonl"
    good = '{"messages": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}]}'
    data.write_text(f'{good}\n{good}\n{{"messages": [{{"role": "user", "content": "cut off\n')
    config = tmp_path / "bad_record.py"
    config.write_text(
        "from qwen3vl_jax.training.run_config import run_config\n\n\n"
        "def get_config():\n"
        "    c = run_config()\n"
        f"    c.model.init_from = {checkpoint!r}\n"
        "    c.update(steps=1, export_hf=False, peak_flops_per_device=1e11)\n"
        f"    c.data.sources = dict(qa=dict(kind='jsonl', path={str(data)!r}))\n"
        "    c.data.update(seq_len=64, max_patches=16, batch_size=4, on_bad_input='error', shuffle=False)\n"
        "    return c\n"
    )
    result = run_binary("train", f"--config={config}", f"--workdir={tmp_path / 'work'}")
    assert result.returncode == cli.RUN_ERROR, result.stderr[-3000:]
    assert error_line(result).startswith("error: example qa.jsonl:3: invalid JSON"), error_line(result)


def test_other_errors_name_their_type_and_where_they_were_raised():
    def lookup():
        return {}["context"]

    try:
        lookup()
    except KeyError as e:
        line = cli.describe(e)
    assert line.startswith("KeyError: 'context' (raised at ") and "test_cli_errors.py:" in line and "lookup" in line
