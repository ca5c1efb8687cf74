"""The job report: PNG plots of the capability matrix, the mixture and the influence, and ``summary.md``.

Plots are drawn with matplotlib's Agg backend (no display needed) and written through fsspec, so
the report can sit beside a manifest on an object store.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Optional

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from automixer_ray.manifest import atomic_output, capability_values, join_uri  # noqa: E402

logger = logging.getLogger(__name__)

# At most this many influence rows are plotted; a larger table is sampled down to it.
MAX_PLOT_ROWS = 20_000
# The metrics where a lower value is better; the heatmap reverses its colours for them.
LOWER_IS_BETTER = {"gold_nll"}


def save_figure(figure: plt.Figure, uri: str) -> str:
    """Write ``figure`` as a PNG to ``uri`` atomically (any fsspec URI) and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    with atomic_output(uri) as handle:
        handle.write(buffer.getvalue())
    return uri


def _checkpoint_order(manifest: dict[str, Any], names: set[str]) -> list[str]:
    steps = {entry["name"]: entry["step"] for entry in manifest["checkpoints"]}
    return sorted(names, key=lambda name: (steps.get(name, math.inf), name))


def plot_capability(manifest: dict[str, Any], uri: str) -> Optional[str]:
    """Draw the capability matrix (checkpoints x tasks) with each task's selected checkpoint boxed."""
    values = capability_values(manifest)
    if not values:
        logger.warning("the manifest's capability matrix is empty; no heatmap drawn")
        return None
    metric = manifest["capability"]["metric"]
    selected = manifest["selected"]
    tasks = list(dict.fromkeys([*selected, *(task for _, task in values)]))
    checkpoints = _checkpoint_order(manifest, {checkpoint for checkpoint, _ in values})
    grid = np.array([[values.get((c, t), np.nan) if values.get((c, t)) is not None else np.nan for t in tasks]
                     for c in checkpoints], dtype=float)  # [checkpoints, tasks]

    figure, axes = plt.subplots(figsize=(1.2 * len(tasks) + 3, 0.45 * len(checkpoints) + 2))
    image = axes.imshow(grid, aspect="auto", cmap="viridis_r" if metric in LOWER_IS_BETTER else "viridis")
    figure.colorbar(image, ax=axes, label=metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    axes.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right")
    axes.set_yticks(range(len(checkpoints)), checkpoints)
    for column, task in enumerate(tasks):
        if selected.get(task) in checkpoints:
            row = checkpoints.index(selected[task])
            axes.add_patch(plt.Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    if grid.size <= 200:
        for (row, column), value in np.ndenumerate(grid):
            if np.isfinite(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                axes.text(column, row, f"{value:.3g}", ha="center", va="center", fontsize=7, color=colour)
    axes.set_title(f"Capability matrix ({metric}); red boxes: selected checkpoint per task")
    return save_figure(figure, uri)


def plot_group_weights(manifest: dict[str, Any], uri: str) -> str:
    """Draw one bar per group: its sampling weight, labelled with its tasks."""
    groups = manifest["groups"]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.0 * len(groups) + 2), 4))
    bars = axes.bar(range(len(groups)), [group["weight"] for group in groups], color="tab:blue")
    axes.bar_label(bars, labels=[f"{group['weight']:.3f}" for group in groups], fontsize=8)
    labels = [f"{group['name']}\n({', '.join(group['tasks'])})" for group in groups]
    axes.set_xticks(range(len(groups)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("weight")
    axes.set_title("Group sampling weights")
    return save_figure(figure, uri)


def _influence_sample(influence: Any, columns: list[str]) -> pd.DataFrame:
    """Return at most MAX_PLOT_ROWS scored rows of ``columns`` from a Ray Dataset or a DataFrame."""
    if isinstance(influence, pd.DataFrame):
        frame = influence[columns]
        if len(frame) > MAX_PLOT_ROWS:
            frame = frame.sample(n=MAX_PLOT_ROWS, random_state=0)
    else:
        dataset = influence.select_columns(columns)
        total = dataset.count()
        if total > MAX_PLOT_ROWS:
            # Bernoulli sampling, with a margin so that the limit, not the draw, sets the size.
            dataset = dataset.random_sample(min(1.0, 1.2 * MAX_PLOT_ROWS / total), seed=0)
        frame = dataset.limit(MAX_PLOT_ROWS).to_pandas()
    return frame[frame["skip_reason"].isna() | (frame["skip_reason"] == "")]


def plot_influence_by_source(manifest: dict[str, Any], influence: Any, uri: str) -> Optional[str]:
    """Draw, for each task, box plots of the selected checkpoint's influence per source."""
    selected = manifest["selected"]
    columns = {task: f"{checkpoint}/{task}" for task, checkpoint in selected.items()}
    frame = _influence_sample(influence, ["source", "skip_reason", *dict.fromkeys(columns.values())])
    if frame.empty:
        logger.warning("no scored rows to plot the influence distribution from")
        return None
    sources = sorted(frame["source"].unique())
    n_cols = min(3, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), squeeze=False)
    for axis, (task, column) in zip(axes.flat, columns.items()):
        data = [frame.loc[frame["source"] == source, column].dropna().to_numpy() for source in sources]
        axis.boxplot(data, showfliers=False)
        axis.set_xticks(range(1, len(sources) + 1), sources, rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{task} ({selected[task]})", fontsize=9)
        axis.set_ylabel("influence", fontsize=8)
    for axis in list(axes.flat)[len(columns):]:
        axis.set_visible(False)
    figure.suptitle(f"Influence by source ({len(frame)} scored samples plotted)")
    figure.tight_layout()
    return save_figure(figure, uri)


def _group_source_tokens(output_dir: str, manifest: dict[str, Any]) -> pd.DataFrame:
    """Return tokens per (group, source) from the group files, one row per group."""
    rows = {}
    for group in manifest["groups"]:
        with fsspec.open(join_uri(output_dir, group["path"]), "rb") as handle:
            table = pq.read_table(handle, columns=["source", "n_tokens"]).to_pandas()
        rows[group["name"]] = table.groupby("source")["n_tokens"].sum()
    return pd.DataFrame(rows).T.fillna(0)


def plot_group_sources(output_dir: str, manifest: dict[str, Any], uri: str) -> tuple[str, pd.DataFrame]:
    """Draw each group's token share by source as stacked horizontal bars."""
    tokens = _group_source_tokens(output_dir, manifest)
    shares = tokens.div(tokens.sum(axis=1).replace(0, 1), axis=0)
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(shares) + 2))
    left = np.zeros(len(shares))
    colours = plt.get_cmap("tab10")
    for i, source in enumerate(shares.columns):
        axes.barh(shares.index, shares[source], left=left, label=source, color=colours(i % 10))
        left += shares[source].to_numpy()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of the group's tokens")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=min(5, len(shares.columns)), fontsize=8)
    axes.set_title("Token share by source in each group")
    return save_figure(figure, uri), shares


def _summary(manifest: dict[str, Any], plots: dict[str, Optional[str]], shares: pd.DataFrame) -> str:
    counts = manifest["counts"]
    skipped = ", ".join(f"{reason} {count}" for reason, count in counts["skipped"].items()) or "none"
    lines = [
        "# AutoMixer report", "",
        f"- config fingerprint: `{manifest['config_fingerprint']}`, written {manifest['created_at']}",
        f"- samples read: {counts['read']}, scored: {counts['scored']}, skipped: {skipped}",
        f"- selection metric: {manifest['capability']['metric']}", "",
        "## Selected checkpoints", "", "| task | checkpoint |", "|---|---|",
        *(f"| {task} | {checkpoint} |" for task, checkpoint in manifest["selected"].items()), "",
        "## Groups", "", "| group | checkpoint | tasks | weight | samples | tokens | epochs | top source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in manifest["groups"]:
        top = shares.loc[group["name"]].idxmax() if group["name"] in shares.index and shares.shape[1] else "-"
        lines.append(f"| {group['name']} | {group['checkpoint']} | {', '.join(group['tasks'])} | {group['weight']:.4f} "
                     f"| {group['n_samples']} | {group['n_tokens']} | {group['epochs']:.3g} | {top} |")
    lines += ["", "## Plots", ""]
    titles = {"capability": "Capability matrix", "weights": "Group weights",
              "influence": "Influence by source", "sources": "Token share by source"}
    for key, title in titles.items():
        if plots.get(key):
            name = plots[key].rstrip("/").rsplit("/", 1)[-1]
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def write_report(output_dir: str, manifest: dict[str, Any], influence: Any) -> list[str]:
    """Write ``output_dir/report/`` (four PNG plots and ``summary.md``); return the URIs, summary first.

    ``influence`` is the influence table as a ``ray.data.Dataset`` or a pandas DataFrame. At most
    MAX_PLOT_ROWS of its rows are plotted, sampled when it has more. None skips that plot.
    """
    folder = join_uri(output_dir, "report")
    plots: dict[str, Optional[str]] = {
        "capability": plot_capability(manifest, join_uri(folder, "capability.png")),
        "weights": plot_group_weights(manifest, join_uri(folder, "group_weights.png")),
        "influence": None if influence is None else plot_influence_by_source(
            manifest, influence, join_uri(folder, "influence_by_source.png")),
    }
    plots["sources"], shares = plot_group_sources(output_dir, manifest, join_uri(folder, "group_sources.png"))
    summary_uri = join_uri(folder, "summary.md")
    with atomic_output(summary_uri) as handle:
        handle.write(_summary(manifest, plots, shares).encode("utf-8"))
    written = [summary_uri] + [uri for uri in plots.values() if uri]
    logger.info("wrote the report to %s: %s", folder, ", ".join(uri.rsplit("/", 1)[-1] for uri in written))
    return written
