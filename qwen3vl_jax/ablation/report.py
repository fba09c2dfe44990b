"""Aggregating a sweep: mean and 95% confidence interval over seeds per (variant, eval set, metric), paired
tests between variants over their common seeds, a markdown table and a PNG plot."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

# results of one run: {eval set: {metric: value}}
RunResults = Mapping[str, Mapping[str, float]]


def mean_and_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (nan for a single value)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan
    sem = values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * sem)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """variant a - variant b on one metric over the seeds both finished: the same seed means the same data order
    and initialisation, so the per-seed differences are the paired samples."""

    seeds: tuple[int, ...]
    mean_difference: float
    ci: float  # half-width of the 95% Student-t interval of the mean difference
    t_pvalue: float  # two-sided paired t-test (nan when every difference is the same)
    permutation_pvalue: float  # two-sided exact sign-flip test of the mean difference (all 2^n sign patterns)


def paired_test(a: Mapping[int, float], b: Mapping[int, float]) -> PairedTest:
    """a, b: {seed: value}. Differences a - b over the common seeds (at least two)."""
    seeds = tuple(sorted(set(a) & set(b)))
    if len(seeds) < 2:
        raise ValueError(f"a paired test needs at least two common seeds, got {list(seeds)}")
    first = np.array([a[s] for s in seeds], np.float64)
    second = np.array([b[s] for s in seeds], np.float64)
    difference = first - second
    mean, ci = mean_and_ci(difference)
    t_pvalue = float(stats.ttest_rel(first, second).pvalue) if np.ptp(difference) > 1e-9 else math.nan
    permutation = stats.permutation_test(
        (first, second),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
        alternative="two-sided",
        vectorized=True,
    )
    return PairedTest(seeds, mean, ci, t_pvalue, float(permutation.pvalue))


def paired_table(
    per_seed: Mapping[str, Mapping[int, RunResults]],
    *,
    pairs: Sequence[tuple[str, str]],
    columns: Sequence[tuple[str, str]],
) -> str:
    """Markdown: for each (variant a, variant b) and column, the paired test of a - b. per_seed: {variant:
    {seed: run results}}; pairs or columns without two common seeds with the metric are listed as such."""
    lines = [
        "| a - b | metric | seeds | mean difference ± 95% CI | paired t-test p | exact sign-flip p |",
        "|---|---|---|---|---|---|",
    ]
    for first, second in pairs:
        for eval_set, metric in columns:
            values = [
                {
                    seed: run[eval_set][metric]
                    for seed, run in per_seed.get(v, {}).items()
                    if metric in run.get(eval_set, {})
                }
                for v in (first, second)
            ]
            name = f"| {first} - {second} | {eval_set} {metric} |"
            if len(set(values[0]) & set(values[1])) < 2:
                lines.append(f"{name} – | fewer than two common seeds | – | – |")
                continue
            test = paired_test(*values)
            # the t statistic is undefined when every seed's difference is the same
            t_pvalue = "– (equal differences)" if math.isnan(test.t_pvalue) else f"{test.t_pvalue:.4f}"
            lines.append(
                f"{name} {', '.join(map(str, test.seeds))} | {test.mean_difference:+.3f} ± {test.ci:.3f} | "
                f"{t_pvalue} | {test.permutation_pvalue:.4f} |"
            )
    return "\n".join(lines) + "\n"


def aggregate(results: Mapping[str, Sequence[RunResults]], columns: Sequence[tuple[str, str]]) -> dict:
    """{variant: {(set, metric): (mean, ci, per-seed values)}} over the runs (one per seed) of each variant."""
    table = {}
    for variant, runs in results.items():
        table[variant] = {}
        for eval_set, metric in columns:
            values = [run[eval_set][metric] for run in runs if metric in run.get(eval_set, {})]
            if values:
                table[variant][eval_set, metric] = (*mean_and_ci(values), values)
    return table


def markdown_table(table: dict, *, columns: Sequence[tuple[str, str]], seeds: Mapping[str, Sequence[int]]) -> str:
    """Rows: variants; columns: `set metric` as mean ± 95% CI."""
    header = "| variant | seeds | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"
    lines = [header, "|---|---|" + "---|" * len(columns)]
    for variant, cells in table.items():
        row = []
        for column in columns:
            if column not in cells:
                row.append("–")
                continue
            mean, ci, values = cells[column]
            cell = f"{mean:.3f}" if math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"
            if len(values) < len(seeds[variant]):  # runs without the metric (e.g. no answer had a number)
                cell += f" ({len(values)} of {len(seeds[variant])} seeds)"
            row.append(cell)
        lines.append(f"| {variant} | {', '.join(map(str, seeds[variant]))} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, *, columns: Sequence[tuple[str, str]], path: str, title: str) -> None:
    """One panel per column: a bar per variant (mean, 95% CI error bar) with the per-seed values as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(table)
    width = min(4, len(columns))
    rows = math.ceil(len(columns) / width)
    fig, axes = plt.subplots(rows, width, figsize=(3.2 * width, 3.0 * rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for i, variant in enumerate(variants):
            if column not in table[variant]:
                continue
            mean, ci, values = table[variant][column]
            ax.bar(i, mean, yerr=None if math.isnan(ci) else ci, capsize=4, color=f"C{i}", alpha=0.7)
            ax.plot([i] * len(values), values, "k.", markersize=4)
        ax.set_title(" ".join(column), fontsize=9)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
