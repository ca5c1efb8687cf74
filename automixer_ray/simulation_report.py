"""The proxy simulation's report: the summary table, the choice of a mixture and a learning curve.

A candidate's score on a task is its metric at the last evaluated step, as a mean and a sample
standard deviation (ddof = 1) over seeds. Task ``average`` is, per seed, the mean over tasks, then
the mean and standard deviation of those per-seed averages. Two candidates differ on a task only
when their means differ by more than the larger of their two standard deviations. A smaller
difference is reported as "no difference".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen before pyplot loads)
import pandas as pd  # noqa: E402

from automixer_ray.config import SimulationConfig  # noqa: E402
from automixer_ray.evaluation import LOWER_IS_BETTER  # noqa: E402
from automixer_ray.manifest import atomic_output, join_uri, read_manifest  # noqa: E402
from automixer_ray.report import save_figure  # noqa: E402

logger = logging.getLogger(__name__)

AVERAGE = "average"
BASELINE = "uniform"


@dataclass(frozen=True, kw_only=True)
class SimulationReport:
    """The report's files, the chosen candidate and the summary it was chosen from."""

    table_uri: str
    curve_uri: str
    chosen: str
    chosen_manifest_uri: str
    summary: pd.DataFrame


def per_seed_scores(results: pd.DataFrame, metric: str, step: int | None = None) -> pd.DataFrame:
    """Return one row per (candidate, seed, task) at ``step`` (default: each run's last step), plus task average."""
    rows = results[results["metric"] == metric]
    if rows.empty:
        raise ValueError(f"the results contain no rows for metric {metric!r}, only {sorted(set(results['metric']))}")
    if step is None:
        last = rows.groupby(["candidate", "seed"])["step"].transform("max")
        rows = rows[rows["step"] == last]
    else:
        rows = rows[rows["step"] == step]
    scores = rows[["candidate", "seed", "task", "value"]]
    average = scores.groupby(["candidate", "seed"], as_index=False)["value"].mean().assign(task=AVERAGE)
    return pd.concat([scores, average[["candidate", "seed", "task", "value"]]], ignore_index=True)


def summarize(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Return the mean, sample std (ddof 1, NaN for one seed) and seed count per (candidate, task)."""
    scores = per_seed_scores(results, metric)
    summary = scores.groupby(["candidate", "task"], as_index=False)["value"].agg(
        mean="mean", std=lambda values: values.std(ddof=1), n_seeds="count")
    return summary


def compare(mean: float, std: float, base_mean: float, base_std: float, *, lower_is_better: bool) -> str:
    """Return "better", "worse" or "no difference" for a mean against a baseline's, given seed spreads.

    The spread is the larger of the two standard deviations (0 where a candidate has one seed).
    """
    spread = max(0.0 if math.isnan(std) else std, 0.0 if math.isnan(base_std) else base_std)
    difference = mean - base_mean
    if abs(difference) <= spread:
        return "no difference"
    improved = difference < 0 if lower_is_better else difference > 0
    return "better" if improved else "worse"


def choose_candidate(summary: pd.DataFrame, metric: str) -> str:
    """Return the candidate with the best mean on task ``average`` (ties go to the first by name)."""
    averages = summary[summary["task"] == AVERAGE].sort_values("candidate")
    ordered = averages.sort_values("mean", ascending=LOWER_IS_BETTER[metric], kind="stable")
    return str(ordered.iloc[0]["candidate"])


def markdown_table(summary: pd.DataFrame, metric: str, chosen: str) -> str:
    """Render every candidate's mean ± std per task and on average, with its verdict against uniform."""
    lower = LOWER_IS_BETTER[metric]
    tasks = sorted(set(summary["task"]) - {AVERAGE}) + [AVERAGE]
    cells = {(row.candidate, row.task): row for row in summary.itertuples(index=False)}
    header = ["candidate", *tasks, f"{AVERAGE} vs {BASELINE}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for candidate in sorted(set(summary["candidate"])):
        row = [f"**{candidate}**" if candidate == chosen else candidate]
        for task in tasks:
            cell = cells[(candidate, task)]
            std = "n/a" if math.isnan(cell.std) else f"{cell.std:.4f}"
            row.append(f"{cell.mean:.4f} ± {std}")
        base = cells.get((BASELINE, AVERAGE))
        mine = cells[(candidate, AVERAGE)]
        if candidate == BASELINE or base is None:
            row.append("baseline" if candidate == BASELINE else "n/a")
        else:
            row.append(compare(mine.mean, mine.std, base.mean, base.std, lower_is_better=lower))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict_counts(summary: pd.DataFrame, metric: str, candidate: str) -> dict[str, list[str]]:
    """Return the tasks where ``candidate`` is better, worse or no different from uniform."""
    cells = {(row.candidate, row.task): row for row in summary.itertuples(index=False)}
    verdicts: dict[str, list[str]] = {"better": [], "worse": [], "no difference": []}
    for task in sorted(set(summary["task"])):
        mine, base = cells.get((candidate, task)), cells.get((BASELINE, task))
        if mine is None or base is None:
            continue
        verdict = compare(mine.mean, mine.std, base.mean, base.std, lower_is_better=LOWER_IS_BETTER[metric])
        verdicts[verdict].append(task)
    return verdicts


def plot_learning_curves(results: pd.DataFrame, metric: str, candidates: list[str], uri: str) -> str:
    """Plot the task-average ``metric`` against step for ``candidates``: mean over seeds, ±1 std band."""
    rows = results[results["metric"] == metric]
    per_seed = rows.groupby(["candidate", "seed", "step"], as_index=False)["value"].mean()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for candidate in candidates:
        curve = per_seed[per_seed["candidate"] == candidate].groupby("step")["value"].agg(["mean", "std"])
        curve["std"] = curve["std"].fillna(0.0)
        axis.plot(curve.index, curve["mean"], marker="o", label=candidate)
        axis.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"], alpha=0.2)
    direction = "lower is better" if LOWER_IS_BETTER[metric] else "higher is better"
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"{metric}, mean over tasks ({direction})")
    axis.set_title("Held-out eval splits: mean over seeds, band = ±1 std")
    axis.legend()
    return save_figure(figure, uri)


def _chosen_manifest(manifest_uri: str, candidate: str) -> dict[str, Any]:
    """Return the candidate's manifest with group paths made relative to the simulation folder."""
    manifest = read_manifest(manifest_uri)
    for group in manifest["groups"]:
        group["path"] = f"candidates/{candidate}/{group['path']}"
    return manifest


def write_simulation_report(results: pd.DataFrame, candidates: list, *, metric: str, simulation_dir: str,
                            settings: SimulationConfig) -> SimulationReport:
    """Write ``report/simulation.md``, ``report/learning_curve.png`` and ``chosen_manifest.json``.

    The learning curve shows the chosen candidate, the best AutoMixer candidate and uniform.
    """
    summary = summarize(results, metric)
    chosen = choose_candidate(summary, metric)
    report_dir = join_uri(simulation_dir, "report")
    fs, path = fsspec.core.url_to_fs(report_dir)
    fs.makedirs(path, exist_ok=True)
    automixer = [candidate.name for candidate in candidates if candidate.kind == "automixer"]
    best_automixer = choose_candidate(summary[summary["candidate"].isin(automixer)], metric) if automixer else None
    # The chosen mixture, the best AutoMixer candidate (when a baseline won) and uniform, each once.
    shown = list(dict.fromkeys(name for name in (chosen, best_automixer, BASELINE) if name is not None))
    curve_uri = plot_learning_curves(results, metric, shown, join_uri(report_dir, "learning_curve.png"))

    by_name = {candidate.name: candidate for candidate in candidates}
    chosen_uri = join_uri(simulation_dir, "chosen_manifest.json")
    with atomic_output(chosen_uri) as handle:
        handle.write(json.dumps(_chosen_manifest(by_name[chosen].manifest_uri, chosen), indent=2,
                                allow_nan=False).encode("utf-8"))
    verdicts = verdict_counts(summary, metric, chosen)
    direction = "lower is better" if LOWER_IS_BETTER[metric] else "higher is better"
    text = "\n".join([
        "# Proxy simulation",
        "",
        f"Metric: `{metric}` ({direction}) on each task's eval split, at the last step "
        f"({settings.steps} steps of {settings.batch_size} x {settings.context_length} tokens); mean ± std "
        f"over seeds {settings.seeds}. A difference no larger than the larger std counts as no difference.",
        "",
        markdown_table(summary, metric, chosen),
        "",
        f"Chosen: **{chosen}** (best mean on `{AVERAGE}`).",
        f"Against {BASELINE}: better on {verdicts['better'] or 'none'}, worse on {verdicts['worse'] or 'none'}, "
        f"no difference on {verdicts['no difference'] or 'none'}.",
        "",
        "![learning curve](learning_curve.png)",
        "",
    ])
    table_uri = join_uri(report_dir, "simulation.md")
    with atomic_output(table_uri) as handle:
        handle.write(text.encode("utf-8"))
    logger.info("simulation report %s: chosen %s; against %s %s", table_uri, chosen, BASELINE, verdicts)
    return SimulationReport(table_uri=table_uri, curve_uri=curve_uri, chosen=chosen,
                            chosen_manifest_uri=chosen_uri, summary=summary)
