"""The ablation sweep: confidence intervals, overrides, and the binary end to end on a tiny sweep (two variants x
two seeds): table and plot written, finished runs skipped, an interrupted run resumed from its checkpoint."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ENV, ROOT, random_params
from ml_collections import ConfigDict
from scipy import stats

from qwen3vl_jax.ablation.report import aggregate, markdown_table, mean_and_ci, paired_table, paired_test
from qwen3vl_jax.ablation.sweep import Run, merge, run_config, run_dir, runs_of

SWEEP = textwrap.dedent("""
    from ml_collections import ConfigDict
    from configs.ablation_base import base_config, synthetic

    def get_config():
        c = ConfigDict()
        c.name, c.description = "tiny sweep", "two variants, two seeds"
        c.base = base_config(dict(grid=dict(synthetic(("grid_grounding",), grid_sizes=(2,)), weight=1.0)), steps=STEPS,
                             seq_len=80, max_patches=16)
        c.base.log_every, c.base.checkpoint.every = 1, 2
        c.variants = ConfigDict({"interleaved": {}, "chunked": dict(model=dict(overrides=dict(
            mrope_layout="chunked")))}, sort_keys=False)
        c.seeds = (0, 1)
        c.eval = ConfigDict(dict(batch_size=4, max_new_tokens=4, sets=dict(grid=dict(num_examples=4, sources=[
            synthetic(("grid_grounding",), seed=99, grid_sizes=(2,))]))))
        c.columns = [("grid", "x_accuracy"), ("grid", "exact_match")]
        return c
""")


def test_mean_and_ci():
    mean, ci = mean_and_ci([1.0, 2.0, 3.0])  # sd 1, n 3: t(0.975, 2) = 4.3027 (tables)
    assert mean == 2.0 and ci == pytest.approx(4.302653 / 3**0.5, rel=1e-6)
    assert mean_and_ci([0.5])[0] == 0.5 and mean_and_ci([0.5])[1] != mean_and_ci([0.5])[1]  # nan: one seed


def test_paired_test_by_hand():
    """a - b over the common seeds: the t-test from its formula, the sign-flip p by enumerating all 2^n signs."""
    a = {0: 0.72, 1: 0.17, 2: 0.69, 3: 0.75, 4: 0.66, 5: 0.81, 9: 0.5}
    b = {0: 0.17, 1: 0.09, 2: 0.19, 3: 0.12, 4: 0.16, 5: 0.17}
    test = paired_test(a, b)
    d = np.array([a[s] - b[s] for s in range(6)])
    t = d.mean() / (d.std(ddof=1) / np.sqrt(6))
    assert test.seeds == (0, 1, 2, 3, 4, 5) and test.mean_difference == pytest.approx(d.mean())
    assert test.t_pvalue == pytest.approx(2 * stats.t.sf(abs(t), 5), rel=1e-9)
    signs = np.array(list(itertools.product((1, -1), repeat=6)))
    assert test.permutation_pvalue == pytest.approx(np.mean(np.abs((signs * d).mean(1)) >= d.mean() - 1e-12))
    assert test.permutation_pvalue == pytest.approx(2 / 64)  # every difference positive: only +all and -all
    constant = paired_test({0: 0.2, 1: 0.4}, {0: 0.1, 1: 0.3})  # equal differences: no variance, no t-test
    assert np.isnan(constant.t_pvalue) and constant.permutation_pvalue == 0.5  # ++ and -- of 4 sign patterns
    with pytest.raises(ValueError, match="at least two common seeds"):
        paired_test({0: 1.0, 1: 1.0}, {1: 0.0, 2: 0.0})
    per_seed = {
        "x": {s: {"grid": {"acc": v}} for s, v in a.items()},
        "y": {s: {"grid": {"acc": v}} for s, v in b.items()},
    }
    table = paired_table(per_seed, pairs=[("x", "y"), ("y", "x")], columns=[("grid", "acc"), ("grid", "other")])
    assert f"| x - y | grid acc | 0, 1, 2, 3, 4, 5 | {d.mean():+.3f} ± " in table and "| y - x | grid acc |" in table
    assert "| x - y | grid other | – | fewer than two common seeds |" in table
    tied = {
        "x": {0: {"grid": {"acc": 0.2}}, 1: {"grid": {"acc": 0.2}}},
        "y": {0: {"grid": {"acc": 0.2}}, 1: {"grid": {"acc": 0.2}}},
    }
    table = paired_table(tied, pairs=[("x", "y")], columns=[("grid", "acc")])
    assert "| x - y | grid acc | 0, 1 | +0.000 ± 0.000 | – (equal differences) | 1.0000 |" in table


def test_a_metric_missing_from_some_runs_says_over_how_many_seeds():
    columns = [("video", "exact_match"), ("video", "abs_error_seconds")]
    runs = [
        {"video": {"exact_match": 0.5, "abs_error_seconds": 1.0}},
        {"video": {"exact_match": 0.7}},
        {"video": {"exact_match": 0.6, "abs_error_seconds": 2.0}},
    ]
    table = markdown_table(aggregate({"a": runs}, columns), columns=columns, seeds={"a": [0, 1, 2]})
    # sd 0.1, n 3: 4.302653 * 0.1 / sqrt(3); sd 0.7071, n 2: t(0.975, 1) = 12.7062 * 0.5 (tables)
    assert "| a | 0, 1, 2 | 0.600 ± 0.248 | 1.500 ± 6.353 (2 of 3 seeds) |" in table


def test_the_mean_of_the_eval_sets_weighs_each_set_the_same():
    from qwen3vl_jax.ablation.sweep import with_mean_of_sets

    results = {"a": {"examples": 96, "exact_match": 0.5, "error": 2.0}, "b": {"examples": 10, "exact_match": 1.0}}
    mean = with_mean_of_sets(results)["mean_of_sets"]
    assert mean == {"exact_match": 0.75, "error": 2.0}  # error: only set a has it
    with pytest.raises(ValueError, match="may not be named 'mean_of_sets'"):
        with_mean_of_sets({"mean_of_sets": {"exact_match": 1.0}})


def test_overrides_must_name_existing_fields():
    model = dict(init_from="/stage1/runs/coarse/seed_{seed}/hf", overrides=dict(mrope_layout="interleaved"))
    base = ConfigDict(dict(model=model, seed=0, data=dict(seed=0)))
    sweep = ConfigDict(
        dict(base=base, variants=dict(c=dict(model=dict(overrides=dict(mrope_layout="chunked")))), seeds=(3,))
    )
    config = run_config(sweep, Run("c", 3))
    assert config.model.overrides.mrope_layout == "chunked" and config.seed == config.data.seed == 3
    assert config.model.init_from == "/stage1/runs/coarse/seed_3/hf"  # a second stage starts from seed 3's run
    assert base.model.overrides.mrope_layout == "interleaved"  # the base is not modified
    with pytest.raises(KeyError, match=r"model\.overrides\.mrope_layot"):
        merge(ConfigDict(base.to_dict()), dict(model=dict(overrides=dict(mrope_layot="chunked"))))
    with pytest.raises(ValueError, match="variant name"):
        runs_of(ConfigDict(dict(variants={"a/b": {}}, seeds=(0,))))
    with pytest.raises(ValueError, match=r"paired \('a', 'c'\).*unknown: \['c'\]"):
        runs_of(ConfigDict(dict(variants={"a": {}, "b": {}}, seeds=(0,), paired=(("a", "c"),))))


def ablate(config, workdir, *, flags=()):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.ablate", f"--config={config}", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_sweep_runs_reports_skips_and_resumes(tmp_path):
    config = tmp_path / "sweep.py"
    config.write_text(SWEEP.replace("STEPS", "4"))
    workdir = tmp_path / "sweep"
    sweep = ConfigDict(dict(variants={"interleaved": {}, "chunked": {}}, seeds=(0, 1)))
    # an interrupted first run: 2 of its 4 steps done and checkpointed, no results (shard 0 of 4 runs only it)
    first = run_dir(str(workdir), Run("interleaved", 0))
    out = ablate(config, workdir, flags=["--num_shards=4", "--shard_index=0", "--config.base.steps=2"])
    assert "[1/1] interleaved/seed_0" in out and not (workdir / "results.md").exists()  # 3 runs missing
    os.remove(os.path.join(first, "results.json"))

    out = ablate(config, workdir)
    assert "resumed from the checkpoint of step 2" in out  # the interrupted run continues, then 3 new runs
    with open(os.path.join(first, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert steps == [1, 2, 3, 4]
    report = (workdir / "results.md").read_text()
    assert "| interleaved | 0, 1 |" in report and "| chunked | 0, 1 |" in report and "±" in report
    assert (workdir / "results.png").read_bytes()[:4] == b"\x89PNG"
    values = json.loads((workdir / "results.json").read_text())
    assert len(values["chunked"]["grid/exact_match"]) == 2

    stamps = {r.name: os.path.getmtime(os.path.join(run_dir(str(workdir), r), "results.json")) for r in runs_of(sweep)}
    out = ablate(config, workdir)  # everything finished: nothing runs again, the report is rewritten
    assert "[4/4] chunked/seed_1: finished earlier, skipped" in out and "| chunked | 0, 1 |" in out
    assert stamps == {
        r.name: os.path.getmtime(os.path.join(run_dir(str(workdir), r), "results.json")) for r in runs_of(sweep)
    }


def test_vit_probe_cells_and_scores():
    """Each grid cell is one merged token whose label is its square's colour (or empty); a probe scores 1.0 on
    a layer that holds the labels and about chance on one that holds noise."""
    from qwen3vl_jax.ablation.vit_probe import CLASSES, CellData, cell_data, image_records, probe_layers
    from qwen3vl_jax.api import Qwen3VLModel
    from qwen3vl_jax.config import preset
    from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
    from qwen3vl_jax.processing.chat import load_chat_template

    config = preset("tiny")
    model = Qwen3VLModel(config, random_params(config, 0))
    processor = Processor(
        byte_tokenizer(), load_chat_template(None), config=VisionProcessingConfig(image_min_pixels=32 * 32)
    )
    records = image_records(3, seed=5, grid=4)
    data = cell_data(model, processor, records)
    assert len(data.features) == config.vision.depth + 1
    assert all(f.shape == (3 * 16, 4 * config.vision.hidden_size) for f in data.features)
    for i, record in enumerate(records):
        labels = data.labels[16 * i : 16 * (i + 1)]
        marks = {(row * 4 + col): CLASSES.index(colour) for row, col, colour in record["meta"]["marks"]}
        assert {cell: label for cell, label in enumerate(labels) if label} == marks

    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), 700)
    informative = np.eye(len(CLASSES))[labels] + 0.1 * rng.standard_normal((700, len(CLASSES)))
    noise = rng.standard_normal((700, 8))
    train, test = (CellData([informative[s], noise[s]], labels[s]) for s in (slice(0, 500), slice(500, None)))
    scores = probe_layers(train, test).balanced_accuracy
    assert scores[0] == 1.0 and scores[1] < 0.35  # chance 1/7
