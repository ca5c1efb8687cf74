"""The AutoMixer job on Ray: from a raw corpus, checkpoints and benchmarks to weighted group manifests.

Stages (each logs what it starts with and what it produced):

1. capability matrix and checkpoint selection, one Ray task per checkpoint;
2. task gradients for every artifact checkpoint (one Ray task each), then layer selection;
3. a Ray Data stream: read shards -> chunk and tokenize -> one scoring actor pool per artifact
   checkpoint -> the influence table in Parquet;
4. the reduction on Ray Data (standardisation, groups, density weights, token budget);
5. the manifest (written atomically) and the report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import ray
import ray.data

from automixer_ray import corpus
from automixer_ray.checkpoints import CheckpointInfo, check_remote_code, discover_checkpoints
from automixer_ray.config import JobConfig
from automixer_ray.evaluation import capability_matrix, drop_long_examples, format_matrix, select_checkpoints
from automixer_ray.influence import (
    layer_scores,
    select_layers,
    task_gradients_for_checkpoint,
)
from automixer_ray.manifest import FORMAT_VERSION, write_manifest
from automixer_ray.mixture import build_mixture
from automixer_ray.cache import (
    InfluenceCache,
    ScoringIdentity,
    count_rows_by_key,
    read_influence,
    shard_key,
    subsample_max_key,
    write_staged_rows,
)
from automixer_ray.outputs import OutputError, OutputLayout, claim_output, next_version
from automixer_ray.projection import ProjectorIdentity
from automixer_ray.raycluster import STREAM_TASK_CPUS, init_local_ray
from automixer_ray.samples import build_sample_dataset, model_context_length, score_samples, subsample_threshold
from automixer_ray.tasks import prepare_task_splits

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """Locations of a finished job's outputs, and its headline counts."""

    output_uri: str
    manifest_uri: str
    version: int
    report_uri: str
    counts: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ScoringPlan:
    """Inputs of the scoring actors: artifact checkpoints, kept layers and task gradients."""

    artifacts: list[CheckpointInfo]
    selected: dict[str, str]
    task_names: list[str]
    layer_names: list[str]
    kept_layers: list[str]
    layer_scores: dict[str, float]
    block_size: int
    # checkpoint name -> [num_tasks, num_kept_layers * block_size] float32
    task_matrices: dict[str, np.ndarray]
    # checkpoint name -> projector identity of the kept layers (a dict)
    identities: dict[str, dict]


def select_artifact_checkpoints(config: JobConfig, checkpoints: list[CheckpointInfo], influence_examples: dict,
                                layout: OutputLayout):
    """Step 1: score every checkpoint on every influence split and pick c*(t) per task."""
    logger.info("capability matrix: %d checkpoints x %d tasks, metric %s",
                len(checkpoints), len(influence_examples), config.evaluation.metric)
    matrix = capability_matrix(checkpoints, influence_examples, batch_size=config.evaluation.batch_size,
                               allow_pickle=config.checkpoints.allow_pickle,
                               trust_remote_code=config.checkpoints.trust_remote_code)
    matrix.to_parquet(layout.capability, index=False)
    selected = select_checkpoints(matrix, config.evaluation.metric)
    logger.info("capability matrix (%s):\n%s", config.evaluation.metric,
                format_matrix(matrix, config.evaluation.metric, selected))
    by_name = {info.name: info for info in checkpoints}
    artifacts = sorted({by_name[name] for name in selected.values()}, key=lambda info: info.step)
    logger.info("artifact checkpoints: %s", ", ".join(info.name for info in artifacts))
    return matrix, selected, artifacts


def plan_scoring(config: JobConfig, artifacts: list[CheckpointInfo], selected: dict[str, str],
                 influence_examples: dict) -> ScoringPlan:
    """Steps 3 and 4: task gradients per artifact checkpoint, then discriminative layer selection."""
    remote = ray.remote(num_cpus=1, num_gpus=_gpus_per_task())(task_gradients_for_checkpoint)
    refs = {
        info.name: remote.remote(info.path, influence_examples, projection=config.projection,
                                 batch_size=config.influence.batch_size,
                                 allow_pickle=config.checkpoints.allow_pickle,
                                 trust_remote_code=config.checkpoints.trust_remote_code)
        for info in artifacts
    }
    gradients = {name: ray.get(ref) for name, ref in refs.items()}
    first = next(iter(gradients.values()))
    layer_names, block_size = list(first.layer_names), first.block_size
    task_names = sorted(influence_examples)
    scores = layer_scores({name: g.gradients for name, g in gradients.items()}, layer_names, block_size)
    kept = select_layers(scores, config.influence.keep_layers, layer_names)
    logger.info("kept %d of %d layers by discriminativeness: %s", len(kept), len(layer_names), ", ".join(kept))

    kept_index = [layer_names.index(name) for name in kept]
    columns = np.concatenate([np.arange(i * block_size, (i + 1) * block_size) for i in kept_index])
    matrices, identities = {}, {}
    for name, g in gradients.items():
        # [num_tasks, num_kept_layers * block_size]
        matrices[name] = np.stack([g.gradients[task][columns] for task in task_names]).astype(np.float32)
        identities[name] = g.identity.restricted_to(kept).to_dict()
    return ScoringPlan(artifacts=artifacts, selected=selected, task_names=task_names, layer_names=layer_names,
                       kept_layers=kept, layer_scores=scores, block_size=block_size,
                       task_matrices=matrices, identities=identities)


def _gpus_per_task() -> float:
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_job(config: JobConfig, *, refresh: bool = False) -> JobResult:
    """Run the whole AutoMixer job for ``config`` and return where its outputs are.

    Shards whose influence rows are already in the output's cache under the same scoring identity
    are reused, so a restarted job continues and a ``refresh`` scores only new or changed shards.
    Each run writes a new manifest version; ``manifest.json`` at the top is the latest.
    """
    started = time.monotonic()
    config.validate_inputs()
    logger.info("AutoMixer %s %s starting: corpus %s, checkpoints %s, tasks %s, output %s",
                "refresh" if refresh else "job", config.fingerprint(), config.corpus.uris, config.checkpoints.uris,
                config.tasks.root or sorted(config.tasks.files), config.output.uri)
    shards = corpus.list_shards(config.corpus.uris, format=config.corpus.format)
    checkpoints = discover_checkpoints(config.checkpoints.uris, allow_pickle=config.checkpoints.allow_pickle)
    for info in checkpoints:
        check_remote_code(info.path, trust_remote_code=config.checkpoints.trust_remote_code)
    splits = prepare_task_splits(config.tasks)
    if refresh and not _has_manifest(config.output.uri):
        raise OutputError(f"nothing to refresh: {config.output.uri} has no manifest.json; "
                          "run `automixer run` first with this config")
    layout = claim_output(config, overwrite=config.output.overwrite, allow_config_change=refresh)
    influence_examples = drop_long_examples(splits.influence, checkpoints[0].path,
                                            model_context_length(checkpoints[0].path))
    init_local_ray(config.ray.address)

    matrix, selected, artifacts = select_artifact_checkpoints(config, checkpoints, influence_examples, layout)
    plan = plan_scoring(config, artifacts, selected, influence_examples)
    tokenizer_path = checkpoints[0].path
    max_key = subsample_threshold(config, shards, tokenizer_path=tokenizer_path)
    if max_key is None:
        max_key = subsample_max_key(config.corpus.sample_fraction)
    keys = score_missing_shards(config, shards, plan, layout, tokenizer_path=tokenizer_path, max_key=max_key)

    files = InfluenceCache(layout.influence).files([keys[shard.uri] for shard in shards])
    if not files:
        raise OutputError(f"the corpus gave no samples to score ({len(shards)} shards); "
                          "check corpus.uris and corpus.text_field")
    influence = read_influence(files)
    version = next_version(layout)
    version_dir = layout.version_dir(version)
    mixture = build_mixture(influence, selected=selected, config=config.mixture, output_dir=version_dir,
                            duplicates=config.corpus.duplicates)
    manifest = _manifest(config, checkpoints, matrix, plan, mixture, version=version,
                         influence_files=[_relative(layout.root, uri) for uri in files])
    write_manifest(version_dir, manifest)
    manifest_uri = write_manifest(layout.root, _relocated(manifest, f"manifests/v{version:06d}"))

    from automixer_ray.report import write_report

    report_files = write_report(version_dir, manifest, influence)
    elapsed = time.monotonic() - started
    logger.info("AutoMixer job finished in %.0f s: read %d, scored %d, skipped %s; %d groups; "
                "manifest %s (version %d); report %s", elapsed, mixture.counts["read"], mixture.counts["scored"],
                mixture.counts["skipped"], len(mixture.groups), manifest_uri, version,
                report_files[0] if report_files else "none")
    return JobResult(output_uri=layout.root, manifest_uri=manifest_uri, version=version,
                     report_uri=f"{version_dir}/report", counts=mixture.counts)


def _has_manifest(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri.rstrip("/") + "/manifest.json")
    return fs.exists(path)


def _relative(root: str, uri: str) -> str:
    _, root_path = fsspec.core.url_to_fs(root)
    _, path = fsspec.core.url_to_fs(uri)
    return path[len(root_path.rstrip("/")) + 1:] if path.startswith(root_path.rstrip("/") + "/") else uri


def _relocated(manifest: dict, prefix: str) -> dict:
    """Return a copy of a version's manifest whose group paths are relative to the output root."""
    groups = [{**group, "path": f"{prefix}/{group['path']}"} for group in manifest["groups"]]
    return {**manifest, "groups": groups, "version_path": prefix}


def scoring_identity(config: JobConfig, plan: ScoringPlan, max_key: str | None) -> ScoringIdentity:
    """Collect everything the influence rows depend on besides the shard itself."""
    tasks = config.tasks
    return ScoringIdentity(
        checkpoints={info.name: info.fingerprint for info in plan.artifacts},
        projector={name: ProjectorIdentity.from_dict(identity).fingerprint()
                   for name, identity in plan.identities.items()},
        kept_layers=list(plan.kept_layers),
        tasks=list(plan.task_names),
        task_inputs={"root": tasks.root, "names": tasks.names, "files": tasks.files,
                     "influence_fraction": tasks.influence_fraction, "seed": tasks.seed,
                     "max_influence_examples": tasks.max_influence_examples},
        reading={"text_field": config.corpus.text_field, "source_field": config.corpus.source_field,
                 "decode_errors": config.corpus.decode_errors, "chunk_num_tokens": config.corpus.chunk_num_tokens,
                 "sample_seed": config.corpus.sample_seed, "max_key": max_key,
                 "metric": config.influence.metric, "format": config.corpus.format},
    )


def score_missing_shards(config: JobConfig, shards: list, plan: ScoringPlan, layout: OutputLayout, *,
                         tokenizer_path: str, max_key: str | None) -> dict[str, str]:
    """Score every shard without a completed cache entry, in waves; return shard URI -> cache key."""
    cache = InfluenceCache(layout.influence)
    identity = scoring_identity(config, plan, max_key)
    cache.check_identity(identity)
    identity_key = identity.key()
    keys = {shard.uri: shard_key(shard.uri, corpus.shard_fingerprint(shard), identity_key) for shard in shards}
    pending = [shard for shard in shards if not cache.is_complete(keys[shard.uri])]
    reused = len(shards) - len(pending)
    logger.info("influence cache %s: %d of %d shards reused, %d to score", layout.influence, reused,
                len(shards), len(pending))
    for shard in shards[:20]:
        logger.debug("shard %s: %s", shard.uri, "pending" if shard in pending else "reused")
    waves = _waves(pending, config.ray.shards_per_wave)
    for number, wave in enumerate(waves, start=1):
        logger.info("scoring wave %d of %d: %d shards (%s ... %s)", number, len(waves), len(wave),
                    wave[0].uri, wave[-1].uri)
        staging = cache.new_staging()
        samples = build_sample_dataset(config, wave, tokenizer_path=tokenizer_path, max_key=max_key)
        written = score_samples(config, samples, plan).map_batches(
            write_staged_rows, fn_kwargs={"staging": staging, "keys_by_uri": {s.uri: keys[s.uri] for s in wave}},
            batch_format="pyarrow", batch_size=None, num_cpus=STREAM_TASK_CPUS)
        counts = count_rows_by_key(list(written.iter_batches(batch_format="pyarrow", batch_size=None)))
        for shard in wave:
            cache.commit(staging, keys[shard.uri], shard.uri, counts.get(keys[shard.uri], 0))
        cache.remove_staging(staging)
        logger.info("wave %d of %d done: %d samples from %d shards recorded as complete", number, len(waves),
                    sum(counts.values()), len(wave))
    cache.prune(set(keys.values()))
    return keys


def _waves(pending: list, shards_per_wave: int | None) -> list[list]:
    if not pending:
        return []
    size = shards_per_wave or max(1, math.ceil(len(pending) / 4))
    return [pending[i:i + size] for i in range(0, len(pending), size)]


def _manifest(config: JobConfig, checkpoints: list[CheckpointInfo], matrix, plan: ScoringPlan, mixture, *,
              version: int, influence_files: list[str]) -> dict:
    first_identity = next(iter(plan.identities.values()))
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_fingerprint": config.fingerprint(),
        "config": config.to_dict(),
        "checkpoints": [info.to_dict() for info in checkpoints],
        "capability": {"metric": config.evaluation.metric, "matrix": matrix.to_dict(orient="records")},
        "selected": plan.selected,
        "artifact_checkpoints": [info.name for info in plan.artifacts],
        "tasks": plan.task_names,
        "layers": [{"name": name, "score": float(plan.layer_scores[name]), "kept": name in plan.kept_layers}
                   for name in plan.layer_names],
        "projector": first_identity,
        "influence": {"metric": config.influence.metric, "files": influence_files},
        "counts": mixture.counts,
        "column_stats": mixture.column_stats,
        "groups": mixture.groups,
    }
