"""Proxy simulation: train a small proxy on each candidate mixture and judge it on held-out evals.

This is the last step of AutoMixer (Chang et al., "AutoMixer: Checkpoint Artifacts as Automatic
Data Mixers", ACL 2025, arXiv 2506.21910). Each candidate mixture trains a fresh small proxy for
the same token budget, and the proxies are scored on examples that the influence step never saw.
This module implements it with these definitions:

- AutoMixer candidates: one per (K, beta) in ``simulation.top_k_percents`` x ``simulation.betas``,
  each built by ``mixture.build_mixture`` from the finished job's influence table (the same table
  for every candidate) with ``token_budget = simulation.token_budget``.
- ``uniform``: one group that holds every scored sample of the influence table in a seeded random
  order, so each draw is a uniform choice among the samples not drawn yet.
- ``source_proportional``: one group per source, weighted by the source's share of the scored
  tokens, each in a seeded random order.
- Every candidate trains ``simulation.steps`` steps of [batch_size, context_length] tokens per
  seed, with the same initial weights for a seed, drawing its samples through
  ``loader.MixtureDataset``. It is scored on each task's eval split E_t (the tasks config the job
  ran with), never on the influence split V_t, every ``eval_every`` steps and after the last one.

Outputs under ``<output>/simulation/``: ``candidates/<name>/`` (a manifest and its group files),
``runs/<name>/seed-<s>/`` (the proxy checkpoint), ``simulation.parquet``, ``eval_examples.parquet``,
``draws.parquet``, ``report/`` and ``chosen_manifest.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from automixer_ray.cache import read_influence
from automixer_ray.config import SIMULATION_BASELINES, JobConfig, SimulationConfig, TasksConfig
from automixer_ray.manifest import atomic_output, join_uri, read_manifest, write_manifest
from automixer_ray.mixture import GROUP_FILE_SCHEMA, build_mixture, sanitize_group_name
from automixer_ray.raycluster import shuffle_partitions
from automixer_ray.tasks import Example, limit_examples, prepare_task_splits

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["candidate", "seed", "step", "task", "metric", "value"]
_BASELINE_COLUMNS = ["sample_id", "doc_id", "source", "location", "uri", "row", "char_start", "char_end", "n_tokens"]


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A candidate mixture: its name, kind (``automixer`` or a baseline) and manifest URI."""

    name: str
    kind: str
    manifest_uri: str
    top_k_percent: Optional[float] = None
    beta: Optional[float] = None


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Output locations of a finished simulation, the chosen candidate and the summary table."""

    output_uri: str
    results_uri: str
    report_uri: str
    chosen: str
    chosen_manifest_uri: str
    # One row per (candidate, task) including task "average": mean, std and seed count at the last step.
    summary: pd.DataFrame


def candidate_name(top_k_percent: float, beta: float) -> str:
    """Return the folder-safe name of the AutoMixer candidate for (K, beta), e.g. ``automixer_k25_b1``."""
    return sanitize_group_name(f"automixer_k{top_k_percent:g}_b{beta:g}")


def _parquet_paths(fs, path: str) -> list[str]:
    """Return the Parquet files below a table folder (or the one file ``path``) of ``fs``, in name order."""
    names = sorted(fs.find(path)) if fs.isdir(path) else [path]
    return [name for name in names if name.endswith(".parquet")]


def table_fingerprint(uri: str) -> str:
    """Return 16 hex digits of BLAKE2b over the table's Parquet files (names and bytes, in name order)."""
    fs, path = fsspec.core.url_to_fs(uri)
    digest = hashlib.blake2b(digest_size=8)
    for name in _parquet_paths(fs, path):
        digest.update(name[len(path):].encode("utf-8"))
        with fs.open(name, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def read_influence_table(uri: str) -> ray.data.Dataset:
    """Open the influence table folder ``uri`` as a dataset, reading its many small files in groups."""
    fs, path = fsspec.core.url_to_fs(uri)
    return read_influence([fs.unstrip_protocol(name) for name in _parquet_paths(fs, path)])


# ---------------------------------------------------------------- eval split


def eval_splits(tasks: TasksConfig, max_examples: Optional[int]) -> tuple[dict[str, list[Example]], dict[str, set]]:
    """Return (eval examples per task, influence example ids per task) for the job's task config.

    The eval examples are E_t, capped at ``max_examples`` by a seeded choice. Raises
    ``RuntimeError`` if any eval example id is also in the influence split V_t.
    """
    splits = prepare_task_splits(tasks)
    examples = {task: limit_examples(held_out, max_examples, seed=tasks.seed)
                for task, held_out in splits.eval.items()}
    influence_ids = {task: {example.example_id for example in chosen} for task, chosen in splits.influence.items()}
    for task, chosen in examples.items():
        leaked = sorted({example.example_id for example in chosen} & influence_ids.get(task, set()))
        if leaked:
            raise RuntimeError(f"task {task}: eval examples {leaked[:5]} are also in the influence split; "
                               "the split must be disjoint, so check tasks.influence_fraction and tasks.seed")
        if not chosen:
            raise ValueError(f"task {task} has no eval examples; lower tasks.influence_fraction so that E_t is "
                             "not empty")
    return examples, influence_ids


def drop_unscorable(examples: dict[str, list[Example]], tokenizer_path: str,
                    context_length: int) -> dict[str, list[Example]]:
    """Drop eval examples that the proxy cannot score; the same ones for every candidate."""
    from automixer_ray.evaluation import drop_long_examples

    return drop_long_examples(examples, tokenizer_path, context_length, split="eval")


# ---------------------------------------------------------------- candidates


def _candidate_manifest(job_manifest: dict, job_config: JobConfig, *, groups: list[dict], counts: dict,
                        column_stats: dict, mixture_overrides: dict, description: dict) -> dict:
    config = dataclasses.replace(job_config, mixture=dataclasses.replace(job_config.mixture, **mixture_overrides))
    manifest = dict(job_manifest)
    manifest.update({
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_fingerprint": config.fingerprint(),
        "config": config.to_dict(),
        "counts": counts,
        "column_stats": column_stats,
        "groups": groups,
        "simulation_candidate": description,
    })
    return manifest


def build_automixer_candidate(job_manifest: dict, job_config: JobConfig, *, influence_uri: str,
                              influence_fingerprint: str, top_k_percent: float, beta: float,
                              output_dir: str) -> Candidate:
    """Build the AutoMixer candidate for (K, beta) from the influence table into ``output_dir``."""
    settings = job_config.simulation
    overrides = {"top_k_percent": top_k_percent, "beta": beta, "token_budget": settings.token_budget}
    mixture_config = dataclasses.replace(job_config.mixture, **overrides)
    result = build_mixture(read_influence_table(influence_uri), selected=job_manifest["selected"],
                           config=mixture_config, output_dir=output_dir)
    name = candidate_name(top_k_percent, beta)
    description = {"name": name, "kind": "automixer", "top_k_percent": top_k_percent, "beta": beta,
                   "token_budget": settings.token_budget, "influence_uri": influence_uri,
                   "influence_fingerprint": influence_fingerprint}
    manifest = _candidate_manifest(job_manifest, job_config, groups=result.groups, counts=result.counts,
                                   column_stats=result.column_stats, mixture_overrides=overrides,
                                   description=description)
    uri = write_manifest(output_dir, manifest)
    return Candidate(name=name, kind="automixer", manifest_uri=uri, top_k_percent=top_k_percent, beta=beta)


def _scored_rows(batch: pa.Table, *, influence_columns: list[str], seed: int, by_source: bool) -> pa.Table:
    """Keep the rows that the reduction counts as scored, with their baseline group and a seeded order key."""
    reasons = batch.column("skip_reason").cast(pa.string()).to_pylist()
    keep = np.array([reason is None or reason == "" for reason in reasons], dtype=bool)
    for name in influence_columns:
        values = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        keep &= np.isfinite(values)
    kept = batch.filter(pa.array(keep)).select(_BASELINE_COLUMNS)
    keys = [hashlib.blake2b(f"{seed}:{sid}:{loc}".encode(), digest_size=8).hexdigest()
            for sid, loc in zip(kept.column("sample_id").to_pylist(), kept.column("location").to_pylist())]
    group = kept.column("source") if by_source else pa.array(["all"] * len(kept), type=pa.string())
    return kept.append_column("__group", group).append_column("__order", pa.array(keys, type=pa.string()))


def _write_shuffled_groups(rows: ray.data.Dataset, targets: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """Write each group's rows in their random order until its token target; return each group's counts.

    ``targets`` maps a group label to (file URI, token target). One distributed sort by
    (group, order key) feeds every group file.
    """
    ordered = rows.sort(["__group", "__order"])
    ordered.context.execution_options.preserve_order = True
    counts = {label: {"n_samples": 0, "n_tokens": 0} for label in targets}
    with contextlib.ExitStack() as stack:
        writers: dict[str, pq.ParquetWriter] = {}
        for batch in ordered.iter_batches(batch_format="pyarrow", batch_size=65536):
            for label in dict.fromkeys(batch.column("__group").to_pylist()):
                uri, target = targets[label]
                done = counts[label]
                if done["n_tokens"] >= target:
                    continue
                part = batch.filter(pc.equal(batch.column("__group"), label))
                tokens = np.cumsum(part.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.int64))
                tokens += done["n_tokens"]
                stop = min(int(np.searchsorted(tokens, target, side="left")) + 1, len(part))
                part = part.slice(0, stop)
                columns = {name: part.column(name) for name in _BASELINE_COLUMNS}
                columns["rank"] = pa.array(np.arange(done["n_samples"], done["n_samples"] + stop, dtype=np.int64))
                columns["joint_score"] = pa.nulls(stop, pa.float64())
                if label not in writers:
                    handle = stack.enter_context(atomic_output(uri))
                    writers[label] = stack.enter_context(pq.ParquetWriter(handle, GROUP_FILE_SCHEMA))
                writers[label].write_table(pa.table(columns).select(GROUP_FILE_SCHEMA.names).cast(GROUP_FILE_SCHEMA))
                done["n_samples"] += stop
                done["n_tokens"] = int(tokens[stop - 1])
    for label, (uri, target) in targets.items():
        done = counts[label]
        if done["n_samples"] == 0:
            raise ValueError(f"baseline group file {uri} would be empty; the influence table has no scored samples "
                             f"in group {label}")
        done["epochs"] = target / done["n_tokens"] if done["n_tokens"] < target else 1.0
        done["token_target"] = target
    return counts


def build_baseline_candidate(kind: str, job_manifest: dict, job_config: JobConfig, *, influence_uri: str,
                             influence_fingerprint: str, output_dir: str) -> Candidate:
    """Build the ``uniform`` or ``source_proportional`` baseline over the scored samples of the table."""
    if kind not in SIMULATION_BASELINES:
        raise ValueError(f"baseline {kind!r} is invalid; allowed: {', '.join(SIMULATION_BASELINES)}")
    budget = job_config.simulation.token_budget
    seed = job_config.corpus.sample_seed
    rows = read_influence_table(influence_uri).map_batches(_scored_rows, batch_format="pyarrow", fn_kwargs={
        "influence_columns": list(job_manifest["column_stats"]), "seed": seed,
        "by_source": kind == "source_proportional"}).materialize()
    grouped = rows.groupby("__group", num_partitions=shuffle_partitions(rows.count()))
    totals = {row["__group"]: row["sum(n_tokens)"] for row in grouped.sum("n_tokens").iter_rows()}
    total = sum(totals.values())
    shares = {label: tokens / total for label, tokens in sorted(totals.items())}
    names = dict(zip(shares, _unique_group_names(list(shares))))
    targets = {label: (join_uri(output_dir, f"groups/{names[label]}.parquet"), share * budget)
               for label, share in shares.items()}
    counts = _write_shuffled_groups(rows, targets)
    # NOTE: baseline groups are not ranked by any checkpoint. Their "checkpoint" field names the
    # job's first artifact checkpoint only because the manifest contract requires a known name.
    checkpoint = job_manifest["artifact_checkpoints"][0]
    groups = []
    for label, share in shares.items():
        groups.append({"name": names[label], "checkpoint": checkpoint, "tasks": [], "weight": share,
                       "path": f"groups/{names[label]}.parquet", **counts[label]})
        logger.info("baseline %s group %s: weight %.4f, %d samples, %d tokens, %.3f epochs", kind, names[label],
                    share, counts[label]["n_samples"], counts[label]["n_tokens"], counts[label]["epochs"])
    description = {"name": kind, "kind": kind, "token_budget": budget, "order_seed": seed,
                   "influence_uri": influence_uri, "influence_fingerprint": influence_fingerprint}
    manifest = _candidate_manifest(job_manifest, job_config, groups=groups, counts=job_manifest["counts"],
                                   column_stats=job_manifest["column_stats"],
                                   mixture_overrides={"token_budget": budget}, description=description)
    return Candidate(name=kind, kind=kind, manifest_uri=write_manifest(output_dir, manifest))


def _unique_group_names(labels: list[str]) -> list[str]:
    names: list[str] = []
    for label in labels:
        base = name = sanitize_group_name(label)
        suffix = 2
        while name in names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        names.append(name)
    return names


def build_candidates(job_manifest: dict, job_config: JobConfig, *, influence_uri: str,
                     simulation_dir: str) -> list[Candidate]:
    """Build every AutoMixer candidate of the (K, beta) grid and every baseline, from one influence table."""
    settings = job_config.simulation
    fingerprint = table_fingerprint(influence_uri)
    logger.info("influence table %s has fingerprint %s; building %d AutoMixer candidates and baselines %s",
                influence_uri, fingerprint, len(settings.top_k_percents) * len(settings.betas), settings.baselines)
    candidates = []
    for top_k_percent in settings.top_k_percents:
        for beta in settings.betas:
            folder = join_uri(simulation_dir, f"candidates/{candidate_name(top_k_percent, beta)}")
            candidates.append(build_automixer_candidate(
                job_manifest, job_config, influence_uri=influence_uri, influence_fingerprint=fingerprint,
                top_k_percent=top_k_percent, beta=beta, output_dir=folder))
    for kind in settings.baselines:
        folder = join_uri(simulation_dir, f"candidates/{kind}")
        candidates.append(build_baseline_candidate(kind, job_manifest, job_config, influence_uri=influence_uri,
                                                   influence_fingerprint=fingerprint, output_dir=folder))
    return candidates


# ---------------------------------------------------------------- one proxy


def _evaluate(model, tokenizer, eval_examples: dict[str, list[Example]], *, batch_size: int,
              device: str) -> dict[str, dict[str, float]]:
    from automixer_ray.evaluation import score_examples, task_metrics

    return {task: task_metrics(score_examples(model, tokenizer, examples, batch_size=batch_size, device=device))
            for task, examples in eval_examples.items()}


def _counted_tokens(dataset, draws: dict[str, int]):
    """Yield each draw's token ids and count the draws per group as training pulls them."""
    for item in dataset:
        draws[item["group"]] = draws.get(item["group"], 0) + 1
        yield item["input_ids"].tolist()


def train_candidate(candidate: str, manifest_uri: str, *, seed: int, settings: SimulationConfig,
                    eval_examples: dict[str, list[Example]], tokenizer_path: str, output_dir: str,
                    eval_batch_size: int) -> dict[str, Any]:
    """Train one proxy on a candidate's mixture and score it on the eval splits, inside a Ray task.

    Returns ``{"candidate", "seed", "rows", "draws"}``: result rows with the columns of
    ``RESULT_COLUMNS`` (every metric of every task at each evaluated step) and how many samples
    training drew from each group.
    """
    import torch

    from automixer_ray.checkpoints import load_tokenizer
    from automixer_ray.loader import MixtureDataset
    from automixer_ray.proxy import build_model, pack_token_batches, train_causal_lm

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    tokenizer = load_tokenizer(tokenizer_path)
    model = build_model(arch=settings.arch, vocab_size=len(tokenizer), context_length=settings.context_length,
                        num_layers=settings.num_layers, hidden_size=settings.hidden_size,
                        num_heads=settings.num_heads, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, seed=seed).to(device)
    dataset = MixtureDataset(manifest_uri, tokenizer=tokenizer, seed=seed)
    draws: dict[str, int] = {}
    batches = pack_token_batches(_counted_tokens(dataset, draws), batch_size=settings.batch_size,
                                 context_length=settings.context_length, eos_id=tokenizer.eos_token_id,
                                 seed=seed, buffer_rows=max(8 * settings.batch_size, 64))
    rows: list[dict[str, Any]] = []

    def record(step: int, metrics: dict[str, dict[str, float]]) -> None:
        for task, values in metrics.items():
            rows.extend({"candidate": candidate, "seed": seed, "step": step, "task": task, "metric": metric,
                         "value": value} for metric, value in values.items())

    def eval_fn(trained, step: int) -> dict:
        metrics = _evaluate(trained, tokenizer, eval_examples, batch_size=eval_batch_size, device=device)
        record(step, metrics)
        return {f"eval_{task}_{name}": value for task, values in metrics.items() for name, value in values.items()}

    steps = settings.steps
    started = time.monotonic()
    train_causal_lm(model, tokenizer, batches, steps=steps, learning_rate=settings.learning_rate,
                    warmup_steps=max(1, steps // 10), save_every=steps, output_dir=output_dir, seed=seed,
                    eval_fn=eval_fn, eval_every=settings.eval_every, progress=False)
    if steps % settings.eval_every:
        record(steps, _evaluate(model, tokenizer, eval_examples, batch_size=eval_batch_size, device=device))
    logger.info("candidate %s seed %d: %d steps in %.0f s, draws per group %s",
                candidate, seed, steps, time.monotonic() - started, draws)
    return {"candidate": candidate, "seed": seed, "rows": rows, "draws": draws}


# ---------------------------------------------------------------- driver


def _max_parallel(settings: SimulationConfig) -> tuple[int, float]:
    """Return (proxies trained at once, GPUs per proxy) from the config or the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if settings.max_parallel is not None:
        return settings.max_parallel, gpus
    if gpus:
        return max(1, int(resources["GPU"])), gpus
    # Leave one CPU for the driver and Ray's own work.
    return max(1, int(resources.get("CPU", 1)) - 1), gpus


def _run_trainings(candidates: list[Candidate], settings: SimulationConfig, eval_examples: dict,
                   *, tokenizer_path: str, runs_dir: str, eval_batch_size: int) -> list[dict]:
    parallel, gpus = _max_parallel(settings)
    remote = ray.remote(num_cpus=1, num_gpus=gpus)(train_candidate)
    examples_ref = ray.put(eval_examples)
    jobs = [(candidate, seed) for seed in settings.seeds for candidate in candidates]
    logger.info("training %d proxies (%d candidates x %d seeds), %d at a time, %d steps each, %.0f GPU each",
                len(jobs), len(candidates), len(settings.seeds), parallel, settings.steps, gpus)
    pending: dict[Any, tuple[Candidate, int]] = {}
    outputs = []
    while jobs or pending:
        while jobs and len(pending) < parallel:
            candidate, seed = jobs.pop(0)
            run_dir = join_uri(runs_dir, f"{candidate.name}/seed-{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            ref = remote.remote(candidate.name, candidate.manifest_uri, seed=seed, settings=settings,
                                eval_examples=examples_ref, tokenizer_path=tokenizer_path, output_dir=run_dir,
                                eval_batch_size=eval_batch_size)
            pending[ref] = (candidate, seed)
        done, _ = ray.wait(list(pending), num_returns=1)
        candidate, seed = pending.pop(done[0])
        try:
            outputs.append(ray.get(done[0]))
        except ray.exceptions.RayTaskError as error:
            raise RuntimeError(f"training the proxy of candidate {candidate.name} with seed {seed} failed: "
                               f"{error}") from error
        logger.info("finished candidate %s seed %d (%d left)", candidate.name, seed, len(jobs) + len(pending))
    return outputs


def _ensure_job(config: JobConfig, output_uri: str) -> dict:
    """Return the finished job's manifest, running the job first when ``output_uri`` has none."""
    fs, path = fsspec.core.url_to_fs(join_uri(output_uri, "manifest.json"))
    if not fs.exists(path):
        from automixer_ray.pipeline import run_job

        logger.info("no manifest in %s; running the AutoMixer job first", output_uri)
        run_job(dataclasses.replace(config, output=dataclasses.replace(config.output, uri=output_uri)))
    manifest = read_manifest(output_uri)
    ran = {key: value for key, value in manifest["config"].items() if key not in ("simulation", "output")}
    ours = {key: value for key, value in config.to_dict().items() if key not in ("simulation", "output")}
    if ran != ours:
        differing = sorted(key for key in set(ran) | set(ours) if ran.get(key) != ours.get(key))
        logger.warning("the job in %s ran with a config that differs from this one in %s; the simulation uses "
                       "the job's tasks config so that the eval split matches its influence split",
                       output_uri, differing)
    return manifest


def run_simulation(config: JobConfig, *, output_uri: str | None = None) -> SimulationResult:
    """Build candidate mixtures, train a proxy per candidate and seed on Ray, evaluate and report.

    ``output_uri`` is the finished job's output folder (default ``config.output.uri``). The job
    runs first when that folder has no manifest. Outputs go to ``<output_uri>/simulation/``.
    """
    from automixer_ray.raycluster import init_local_ray
    from automixer_ray.simulation_report import write_simulation_report

    started = time.monotonic()
    output_uri = (output_uri or config.output.uri).rstrip("/")
    settings = config.simulation
    init_local_ray(config.ray.address)
    job_manifest = _ensure_job(config, output_uri)
    simulation_dir = join_uri(output_uri, "simulation")
    job_tasks = TasksConfig(**job_manifest["config"]["tasks"])
    checkpoint_paths = {entry["name"]: entry["path"] for entry in job_manifest["checkpoints"]}
    tokenizer_path = checkpoint_paths[job_manifest["artifact_checkpoints"][0]]
    examples, _ = eval_splits(job_tasks, settings.max_eval_examples)
    examples = drop_unscorable(examples, tokenizer_path, settings.context_length)
    _write_eval_ids(examples, join_uri(simulation_dir, "eval_examples.parquet"))

    candidates = build_candidates(job_manifest, config, influence_uri=join_uri(output_uri, "influence"),
                                  simulation_dir=simulation_dir)
    outputs = _run_trainings(candidates, settings, examples, tokenizer_path=tokenizer_path,
                             runs_dir=join_uri(simulation_dir, "runs"),
                             eval_batch_size=config.evaluation.batch_size)

    results = pd.DataFrame([row for output in outputs for row in output["rows"]], columns=RESULT_COLUMNS)
    results = results.sort_values(["candidate", "seed", "step", "task", "metric"], kind="stable")
    results_uri = join_uri(simulation_dir, "simulation.parquet")
    results.to_parquet(results_uri, index=False)
    draws = pd.DataFrame([{"candidate": o["candidate"], "seed": o["seed"], "group": group, "draws": count}
                          for o in outputs for group, count in o["draws"].items()])
    draws.to_parquet(join_uri(simulation_dir, "draws.parquet"), index=False)

    report = write_simulation_report(results, candidates, metric=config.evaluation.metric,
                                     simulation_dir=simulation_dir, settings=settings)
    logger.info("simulation finished in %.0f s: %d candidates x %d seeds; chosen %s; report %s",
                time.monotonic() - started, len(candidates), len(settings.seeds), report.chosen, report.table_uri)
    return SimulationResult(output_uri=simulation_dir, results_uri=results_uri, report_uri=report.table_uri,
                            chosen=report.chosen, chosen_manifest_uri=report.chosen_manifest_uri,
                            summary=report.summary)


def _write_eval_ids(examples: dict[str, list[Example]], uri: str) -> None:
    rows = [{"task": task, "example_id": example.example_id} for task, chosen in examples.items() for example in chosen]
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    pd.DataFrame(rows, columns=["task", "example_id"]).to_parquet(uri, index=False)
