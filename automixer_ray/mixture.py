"""Joint influence, regrouping and density weights on Ray Data (steps 6 and 7 of AutoMixer).

This implements the reduction of AutoMixer (Chang et al., "AutoMixer: Checkpoint Artifacts as
Automatic Data Mixers", ACL 2025, arXiv 2506.21910) with these definitions:

- Each influence column I_{c,t} (artifact checkpoint c, task t) is standardised over the scored
  corpus samples: Z_{c,t} = (I_{c,t} - mean) / std, with the population std (ddof = 0).
- The joint score at checkpoint c is J_c(x) = sum_t u_t Z_{c,t}(x), where the task weights u_t
  (uniform by default) are normalised to sum to 1.
- Groups: one per artifact checkpoint c, labelled with its tasks {t : c*(t) = c} and ranked by
  J_c; or, with ``group_by="task"``, one per task t ranked by Z_{c*(t),t}. Each group keeps the top
  ceil(K% of the scored samples), at least one. A sample may sit in several groups.
- Each kept sample has the density p(x) ~ exp(beta * mean_c J_c(x)), the mean running over the
  artifact checkpoints. A group's weight is its share of the density mass,
  w_g = sum_{x in g} p(x) / sum_{g'} sum_{x in g'} p(x), computed with log-sum-exp.
- Duplicates: rows of one sample_id that would all be scored are copies of the same text. With
  ``duplicates="drop"`` only the copy with the smallest location is ranked and the others count as
  skipped "duplicate"; with ``"keep"`` every copy is ranked. Either way ``counts["duplicates"]``
  is the number of copies beyond the first.
- With a token budget B, group g supplies w_g * B tokens: a group that contains more keeps the
  shortest top-ranked prefix that reaches w_g * B tokens (epochs 1), and a group that contains fewer
  repeats for w_g * B / n_tokens_g epochs. Without a budget every group is kept whole, epochs 1.

Every statistic is a streaming aggregation over Ray Data blocks, and each group's ranking is a
distributed ``Dataset.sort`` whose rows stream into a Parquet writer, so the corpus never
gathers on the driver.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from automixer_ray.config import MixtureConfig
from automixer_ray.influence import influence_column
from automixer_ray.manifest import atomic_output, join_uri
from automixer_ray.raycluster import shuffle_partitions

logger = logging.getLogger(__name__)

# Scores are rounded to this many decimals before ranking, so that float noise from a different
# batch composition (and hence a different summation order) cannot reorder samples.
SCORE_DECIMALS = 6
# A sample whose skip_reason is null but whose influence value is null or not finite.
MISSING_SCORE = "missing_score"
# A scored sample whose sample_id already occurs at a smaller location (``duplicates="drop"``).
DUPLICATE = "duplicate"
DUPLICATE_POLICIES = ("keep", "drop")
REQUIRED_SAMPLE_COLUMNS = ("sample_id", "source", "uri", "row", "char_start", "char_end", "location", "n_tokens")
OPTIONAL_SAMPLE_COLUMNS = ("doc_id",)
LOG_DENSITY = "__log_density"
GROUP_FILE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("location", pa.string()),
    ("uri", pa.string()),
    ("row", pa.int64()),
    ("char_start", pa.int64()),
    ("char_end", pa.int64()),
    ("rank", pa.int64()),
    ("joint_score", pa.float64()),
    ("n_tokens", pa.int32()),
])
_MAX_NAME_CHARS = 100


def sanitize_group_name(label: str) -> str:
    """Turn a checkpoint or task label into a file-name-safe group name.

    Characters outside ``[A-Za-z0-9._-]`` become "_", and leading or trailing dots are stripped,
    so a name cannot hold "/", start with "..", or be absolute.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:_MAX_NAME_CHARS]
    return name or "group"


@dataclass(kw_only=True)
class MixtureResult:
    """The mixture a reduction produced: group entries for the manifest, statistics and counts."""

    # One dict per group: name, checkpoint, tasks, weight, n_samples, n_tokens, epochs, path
    # (relative to the output folder), plus top_k_samples/top_k_tokens before the token budget.
    groups: list[dict[str, Any]]
    # Influence column -> {"mean", "std", "count"} over the scored samples.
    column_stats: dict[str, dict[str, float]]
    # {"read": int, "scored": int, "skipped": {reason: int}, "duplicates": int};
    # read = scored + sum(skipped), and duplicates counts copies beyond the first of a sample_id.
    counts: dict[str, Any]
    # Normalised task weights u_t used in the joint scores.
    task_weights: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class _GroupPlan:
    name: str
    checkpoint: str
    tasks: list[str]
    # The group's ranking score is sum_k coefficients[k] * Z[columns[k]].
    coefficients: list[float]


def _normalised_task_weights(tasks: list[str], config: MixtureConfig) -> dict[str, float]:
    unknown = sorted(set(config.task_weights) - set(tasks))
    if unknown:
        logger.warning("mixture.task_weights names task(s) %s that have no selected checkpoint; ignoring them", unknown)
    raw = {task: float(config.task_weights.get(task, 1.0)) for task in tasks}
    total = math.fsum(raw.values())
    if total <= 0:
        raise ValueError(f"mixture.task_weights={config.task_weights} gives every task weight 0; "
                         "give at least one task a positive weight")
    return {task: weight / total for task, weight in raw.items()}


def _unique_names(labels: list[str]) -> list[str]:
    names: list[str] = []
    for label in labels:
        base = sanitize_group_name(label)
        name, suffix = base, 2
        while name in names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        names.append(name)
    return names


def _plan_groups(selected: dict[str, str], columns: list[str], task_weights: dict[str, float],
                 group_by: str) -> list[_GroupPlan]:
    tasks = list(task_weights)
    artifacts = sorted(set(selected.values()))
    plans: list[_GroupPlan] = []
    if group_by == "checkpoint":
        names = _unique_names(artifacts)
        for name, checkpoint in zip(names, artifacts):
            coefficients = [0.0] * len(columns)
            for task in tasks:
                coefficients[columns.index(influence_column(checkpoint, task))] = task_weights[task]
            plans.append(_GroupPlan(name=name, checkpoint=checkpoint,
                                    tasks=[t for t in tasks if selected[t] == checkpoint], coefficients=coefficients))
    else:
        names = _unique_names(tasks)
        for name, task in zip(names, tasks):
            coefficients = [0.0] * len(columns)
            coefficients[columns.index(influence_column(selected[task], task))] = 1.0
            plans.append(_GroupPlan(name=name, checkpoint=selected[task], tasks=[task], coefficients=coefficients))
    return plans


def _density_coefficients(selected: dict[str, str], columns: list[str], task_weights: dict[str, float],
                          beta: float) -> list[float]:
    # log p(x) = beta * mean_c J_c(x) = sum_{c,t} (beta * u_t / C) * Z_{c,t}(x).
    artifacts = sorted(set(selected.values()))
    coefficients = [0.0] * len(columns)
    for checkpoint in artifacts:
        for task, weight in task_weights.items():
            coefficients[columns.index(influence_column(checkpoint, task))] = beta * weight / len(artifacts)
    return coefficients


def _influence_values(batch: pa.Table, columns: list[str]) -> np.ndarray:
    """Return the batch's influence columns as float64 with NaN for nulls, shape [rows, columns]."""
    if len(batch) == 0:
        return np.zeros((0, len(columns)))
    return np.column_stack([batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                            for name in columns])


def _scored_mask(batch: pa.Table, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (scored, has_reason) row masks: scored rows have no skip reason and finite values."""
    reasons = batch.column("skip_reason").cast(pa.string())
    has_reason = pc.fill_null(pc.not_equal(reasons, ""), False).to_numpy(zero_copy_only=False)
    has_reason = np.asarray(has_reason, dtype=bool)
    finite = np.isfinite(values).all(axis=1)
    return ~has_reason & finite, has_reason


def _later_copy_mask(batch: pa.Table, scored: np.ndarray, first_copies: Optional[dict[str, str]]) -> np.ndarray:
    """Return the rows that are scored copies of a sample_id whose first copy sits at another location."""
    later = np.zeros(len(batch), dtype=bool)
    if not first_copies:
        return later
    ids = batch.column("sample_id").to_pylist()
    locations = batch.column("location").to_pylist()
    for row in np.flatnonzero(scored).tolist():
        first = first_copies.get(ids[row])
        later[row] = first is not None and locations[row] != first
    return later


def _scored_ids(batch: pa.Table, *, columns: list[str]) -> pa.Table:
    values = _influence_values(batch, columns)
    scored, _ = _scored_mask(batch, values)
    return batch.select(["sample_id", "location"]).filter(pa.array(scored))


def _rows_with_ids(batch: pa.Table, *, ids: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("sample_id"), value_set=pa.array(ids, type=pa.string())))


def find_first_copies(influence: ray.data.Dataset, columns: list[str]) -> tuple[dict[str, str], int]:
    """Find sample_ids that more than one scored row carries; return (id -> smallest location, extra copies).

    One grouped count over the scored (sample_id, location) pairs finds the repeated ids, and a
    second pass collects the locations of only those rows. Only repeated ids reach the driver.
    """
    scored_ids = influence.map_batches(_scored_ids, fn_kwargs={"columns": columns}, batch_format="pyarrow")
    grouped = scored_ids.groupby("sample_id", num_partitions=shuffle_partitions(influence.count()))
    repeated = [row["sample_id"] for row in grouped.count().iter_rows() if row["count()"] > 1]
    if not repeated:
        return {}, 0
    # NOTE: the repeated ids and their locations are held on the driver. A corpus with tens of
    # millions of repeated samples would need a distributed join here instead.
    first: dict[str, str] = {}
    copies = 0
    for row in scored_ids.map_batches(_rows_with_ids, fn_kwargs={"ids": repeated}, batch_format="pyarrow").iter_rows():
        sample_id, location = row["sample_id"], row["location"]
        copies += 1
        if sample_id not in first or location < first[sample_id]:
            first[sample_id] = location
    return first, copies - len(first)


def _partial_stats(batch: pa.Table, columns: list[str], first_copies: Optional[dict[str, str]] = None) -> pa.Table:
    """Per-batch counts and per-column (mean, M2) over the scored rows, merged later with Chan's formula."""
    values = _influence_values(batch, columns)
    scored, has_reason = _scored_mask(batch, values)
    later = _later_copy_mask(batch, scored, first_copies)
    scored &= ~later
    skipped: dict[str, int] = {}
    if later.any():
        skipped[DUPLICATE] = int(later.sum())
    if has_reason.any():
        reasons = batch.column("skip_reason").cast(pa.string()).filter(pa.array(has_reason))
        for item in pc.value_counts(reasons).to_pylist():
            skipped[item["values"]] = item["counts"]
    n_missing = int((~scored & ~has_reason & ~later).sum())
    if n_missing:
        skipped[MISSING_SCORE] = n_missing
    n = int(scored.sum())
    if n:
        mean = values[scored].mean(axis=0)
        m2 = ((values[scored] - mean) ** 2).sum(axis=0)
    else:
        mean = m2 = np.zeros(len(columns))
    return pa.table({"n_read": [len(batch)], "n_scored": [n], "skipped": [json.dumps(skipped)],
                     "mean": [mean.tolist()], "m2": [m2.tolist()]})


def _column_statistics(influence: ray.data.Dataset, columns: list[str], first_copies: Optional[dict[str, str]] = None
                       ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Stream over the table once; return (counts, mean [m], population std [m]) for ``columns``.

    Rows that :func:`_later_copy_mask` flags against ``first_copies`` count as skipped "duplicate".
    """
    partials = influence.map_batches(_partial_stats, fn_kwargs={"columns": columns, "first_copies": first_copies},
                                     batch_format="pyarrow")
    read = scored = 0
    skipped: dict[str, int] = {}
    mean = np.zeros(len(columns))
    m2 = np.zeros(len(columns))
    for row in partials.iter_rows():
        read += row["n_read"]
        for reason, count in json.loads(row["skipped"]).items():
            skipped[reason] = skipped.get(reason, 0) + count
        n_b = row["n_scored"]
        if n_b == 0:
            continue
        # Chan et al.'s parallel update of the mean and the sum of squared deviations.
        mean_b, m2_b = np.asarray(row["mean"]), np.asarray(row["m2"])
        total = scored + n_b
        delta = mean_b - mean
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta ** 2 * scored * n_b / total
        scored = total
    counts = {"read": read, "scored": scored, "skipped": dict(sorted(skipped.items()))}
    if scored == 0:
        raise ValueError(f"the influence table has no scored samples (read {read}, skipped {counts['skipped']}); "
                         "check the skip reasons and the scoring stage")
    std = np.sqrt(m2 / scored)
    for name, value in zip(columns, std):
        if not np.isfinite(value) or value == 0.0:
            raise ValueError(f"influence column {name!r} has std {value} over {scored} scored samples, so it "
                             "cannot be standardised; a constant column means the scoring failed for that "
                             "(checkpoint, task), so check its task gradient")
    return counts, mean, std


def _score_batch(batch: pa.Table, *, columns: list[str], mean: list[float], std: list[float],
                 group_coefficients: list[list[float]], density_coefficients: list[float],
                 sample_columns: list[str], first_copies: Optional[dict[str, str]] = None) -> pa.Table:
    """Keep the scored rows of a batch with their group ranking scores and log density."""
    values = _influence_values(batch, columns)
    scored, _ = _scored_mask(batch, values)
    scored &= ~_later_copy_mask(batch, scored, first_copies)
    kept = batch.filter(pa.array(scored))
    z = (values[scored] - np.asarray(mean)) / np.asarray(std)  # [rows, columns]
    out = {name: kept.column(name) for name in sample_columns}
    for g, coefficients in enumerate(group_coefficients):
        out[f"__score_{g}"] = np.round(z @ np.asarray(coefficients), SCORE_DECIMALS)  # [rows]
    out[LOG_DENSITY] = z @ np.asarray(density_coefficients)  # [rows]
    return pa.table(out)


def _check_order(previous: Optional[tuple[float, str, str]], scores: np.ndarray, ids: list[str],
                 locations: list[str]) -> None:
    """Raise if rows are not in (score descending, sample_id ascending, location ascending) order.

    Equal sample ids are legal: the same text at two locations (a shared licence header, say) has
    one content id, and the location orders such copies.
    """
    if previous is not None and len(ids):
        scores = np.concatenate([[previous[0]], scores])
        ids = [previous[1], *ids]
        locations = [previous[2], *locations]
    steps = np.diff(scores)  # [rows - 1]
    bad = np.flatnonzero(steps > 0).tolist()
    bad += [i for i in np.flatnonzero(steps == 0).tolist()
            if (ids[i + 1], locations[i + 1]) < (ids[i], locations[i])]
    if bad:
        i = min(bad)
        raise RuntimeError(f"ranked rows arrived out of order at sample {ids[i + 1]} (score {scores[i + 1]}) after "
                           f"{ids[i]} (score {scores[i]}); the sort's output order was not preserved")


def _group_file_batch(batch: pa.Table, score_column: str, first_rank: int) -> pa.Table:
    n = len(batch)
    columns = {
        "sample_id": batch.column("sample_id"),
        "doc_id": batch.column("doc_id") if "doc_id" in batch.column_names else pa.nulls(n, pa.string()),
        "source": batch.column("source"),
        "location": batch.column("location"),
        "uri": batch.column("uri"),
        "row": batch.column("row"),
        "char_start": batch.column("char_start"),
        "char_end": batch.column("char_end"),
        "rank": pa.array(np.arange(first_rank, first_rank + n, dtype=np.int64)),
        "joint_score": batch.column(score_column),
        "n_tokens": batch.column("n_tokens"),
    }
    return pa.table(columns).cast(GROUP_FILE_SCHEMA)


def _write_ranked(scored: ray.data.Dataset, score_column: str, n_keep: int, uri: str) -> dict[str, Any]:
    """Sort by (score desc, sample_id asc), stream the top ``n_keep`` rows to Parquet at ``uri``.

    Returns the row count, token count and log-sum-exp of the log density over the written rows.
    """
    ranked = scored.sort([score_column, "sample_id", "location"], descending=[True, False, False]).limit(n_keep)
    ranked.context.execution_options.preserve_order = True
    n_rows, n_tokens, previous = 0, 0, None
    log_max, scaled_sum = -math.inf, 0.0
    with atomic_output(uri) as handle, pq.ParquetWriter(handle, GROUP_FILE_SCHEMA) as writer:
        for batch in ranked.iter_batches(batch_format="pyarrow", batch_size=65536):
            scores = batch.column(score_column).to_numpy(zero_copy_only=False)
            ids = batch.column("sample_id").to_pylist()
            locations = batch.column("location").to_pylist()
            _check_order(previous, scores, ids, locations)
            if len(ids):
                previous = (float(scores[-1]), ids[-1], locations[-1])
            writer.write_table(_group_file_batch(batch, score_column, n_rows))
            n_rows += len(batch)
            n_tokens += int(pc.sum(batch.column("n_tokens")).as_py() or 0)
            # Running log-sum-exp: rescale the partial sum whenever the maximum grows.
            log_density = batch.column(LOG_DENSITY).to_numpy(zero_copy_only=False)
            if len(log_density):
                new_max = max(log_max, float(log_density.max()))
                scaled_sum = scaled_sum * math.exp(log_max - new_max) + float(np.exp(log_density - new_max).sum())
                log_max = new_max
    return {"n_samples": n_rows, "n_tokens": n_tokens, "log_mass": log_max + math.log(scaled_sum)}


def _write_prefix(staged_uri: str, final_uri: str, token_target: float) -> tuple[int, int]:
    """Copy the shortest top-ranked prefix of ``staged_uri`` that reaches ``token_target`` tokens."""
    n_rows = n_tokens = 0
    with fsspec.open(staged_uri, "rb") as source, atomic_output(final_uri) as handle, \
            pq.ParquetWriter(handle, GROUP_FILE_SCHEMA) as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=65536):
            if n_tokens >= token_target:
                break
            tokens = np.cumsum(batch.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.int64)) + n_tokens
            # Rows up to and including the first one whose running total reaches the target.
            stop = int(np.searchsorted(tokens, token_target, side="left")) + 1
            part = pa.Table.from_batches([batch]).slice(0, stop)
            writer.write_table(part)
            n_rows += len(part)
            n_tokens = int(tokens[min(stop, len(tokens)) - 1])
    return n_rows, n_tokens


def _copy_file(staged_uri: str, final_uri: str) -> None:
    with fsspec.open(staged_uri, "rb") as source, atomic_output(final_uri) as handle:
        while chunk := source.read(1 << 22):
            handle.write(chunk)


def _finish_groups(plans: list[_GroupPlan], written: list[dict[str, Any]], staged: list[str],
                   output_dir: str, token_budget: Optional[int]) -> list[dict[str, Any]]:
    """Turn ranked groups into weighted manifest entries, applying the token budget."""
    log_masses = np.array([entry["log_mass"] for entry in written])
    weights = np.exp(log_masses - np.logaddexp.reduce(log_masses))
    weights = weights / weights.sum()
    groups = []
    for plan, entry, staged_uri, weight in zip(plans, written, staged, weights.tolist()):
        path = f"groups/{plan.name}.parquet"
        final_uri = join_uri(output_dir, path)
        n_samples, n_tokens, epochs = entry["n_samples"], entry["n_tokens"], 1.0
        target = None if token_budget is None else weight * token_budget
        if target is not None and n_tokens == 0:
            raise ValueError(f"group {plan.name} contains no tokens, so it cannot supply {target:.0f} tokens of the "
                             "budget; check n_tokens in the influence table")
        if target is not None and n_tokens > target:
            n_samples, n_tokens = _write_prefix(staged_uri, final_uri, target)
        else:
            _copy_file(staged_uri, final_uri)
            if target is not None:
                epochs = target / n_tokens
        groups.append({
            "name": plan.name, "checkpoint": plan.checkpoint, "tasks": plan.tasks, "weight": weight,
            "n_samples": n_samples, "n_tokens": n_tokens, "epochs": epochs, "path": path,
            "top_k_samples": entry["n_samples"], "top_k_tokens": entry["n_tokens"], "token_target": target,
        })
        logger.info("group %s (checkpoint %s, tasks %s): weight %.4f, %d samples, %d tokens, %.3f epochs",
                    plan.name, plan.checkpoint, plan.tasks, weight, n_samples, n_tokens, epochs)
    return groups


def _check_inputs(influence: ray.data.Dataset, selected: dict[str, str], columns: list[str]) -> list[str]:
    if not selected:
        raise ValueError("selected is empty; pass the artifact checkpoint chosen for each task (task -> checkpoint)")
    names = influence.schema().names
    missing = [name for name in (*REQUIRED_SAMPLE_COLUMNS, "skip_reason", *columns) if name not in names]
    if missing:
        raise ValueError(f"the influence table is missing column(s) {missing}; it has {names}. Each (artifact "
                         "checkpoint, task) needs a column named 'checkpoint/task'")
    return [*REQUIRED_SAMPLE_COLUMNS, *(name for name in OPTIONAL_SAMPLE_COLUMNS if name in names)]


def build_mixture(influence: ray.data.Dataset, *, selected: dict[str, str], config: MixtureConfig,
                  output_dir: str, duplicates: str = "keep") -> MixtureResult:
    """Standardise, rank, regroup and weigh the scored samples; write one Parquet file per group.

    ``selected`` maps each task to its artifact checkpoint c*(t). Group files go to
    ``output_dir/groups/<name>.parquet``; the returned groups hold paths relative to ``output_dir``.
    ``duplicates`` is the ``corpus.duplicates`` policy. With "drop" only the first copy (smallest
    location) of each sample_id is ranked and the others count as skipped "duplicate". With "keep"
    every copy is ranked.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates={duplicates!r} is invalid; allowed values: 'keep', 'drop'")
    tasks = list(selected)
    artifacts = sorted(set(selected.values()))
    columns = [influence_column(checkpoint, task) for checkpoint in artifacts for task in tasks]
    sample_columns = _check_inputs(influence, selected, columns)
    task_weights = _normalised_task_weights(tasks, config)
    # Both passes below read the same columns, so read them once into the object store (which
    # spills to disk when full) instead of reading the table twice.
    influence = influence.select_columns([*sample_columns, "skip_reason", *columns]).materialize()

    first_copies, n_copies = find_first_copies(influence, columns)
    if n_copies:
        logger.warning("influence table: %d sample id(s) occur more than once among scored rows (%d extra "
                       "copies); corpus.duplicates=%s, so they are %s", len(first_copies), n_copies, duplicates,
                       "counted as skipped 'duplicate'" if duplicates == "drop" else "all ranked")
    dropped = first_copies if duplicates == "drop" else None
    counts, mean, std = _column_statistics(influence, columns, dropped)
    counts["duplicates"] = n_copies
    logger.info("influence table: %d read, %d scored, skipped %s", counts["read"], counts["scored"], counts["skipped"])
    plans = _plan_groups(selected, columns, task_weights, config.group_by)
    scored = influence.map_batches(_score_batch, batch_format="pyarrow", fn_kwargs={
        "columns": columns, "mean": mean.tolist(), "std": std.tolist(),
        "group_coefficients": [plan.coefficients for plan in plans],
        "density_coefficients": _density_coefficients(selected, columns, task_weights, config.beta),
        "sample_columns": sample_columns, "first_copies": dropped,
    }).materialize()
    del influence  # the scored rows are materialised, so the projected table can be freed

    n_keep = max(1, math.ceil(config.top_k_percent / 100.0 * counts["scored"]))
    staging = join_uri(output_dir, f"groups/.staging-{uuid.uuid4().hex}")
    fs, staging_path = fsspec.core.url_to_fs(staging)
    try:
        staged = [join_uri(staging, f"{plan.name}.parquet") for plan in plans]
        written = [_write_ranked(scored, f"__score_{g}", n_keep, uri) for g, uri in enumerate(staged)]
        groups = _finish_groups(plans, written, staged, output_dir, config.token_budget)
    finally:
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)

    column_stats = {name: {"mean": float(m), "std": float(s), "count": counts["scored"]}
                    for name, m, s in zip(columns, mean, std)}
    return MixtureResult(groups=groups, column_stats=column_stats, counts=counts, task_weights=task_weights)
