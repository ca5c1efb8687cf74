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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from automixer_ray import corpus
from automixer_ray.checkpoints import CheckpointInfo, discover_checkpoints
from automixer_ray.config import JobConfig
from automixer_ray.evaluation import capability_matrix, format_matrix, select_checkpoints
from automixer_ray.influence import (
    layer_scores,
    select_layers,
    task_gradients_for_checkpoint,
)
from automixer_ray.manifest import FORMAT_VERSION, write_manifest
from automixer_ray.mixture import build_mixture
from automixer_ray.outputs import OutputLayout, claim_output
from automixer_ray.raycluster import STREAM_TASK_CPUS, init_local_ray
from automixer_ray.samples import build_sample_dataset, score_samples, subsample_threshold
from automixer_ray.tasks import prepare_task_splits

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """Where a finished job put its outputs, and its headline counts."""

    output_uri: str
    manifest_uri: str
    report_uri: str
    counts: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ScoringPlan:
    """What the scoring actors need: artifact checkpoints, kept layers and task gradients."""

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


def run_job(config: JobConfig) -> JobResult:
    """Run the whole AutoMixer job for ``config`` and return where its outputs are."""
    started = time.monotonic()
    config.validate_inputs()
    logger.info("AutoMixer job %s starting: corpus %s, checkpoints %s, tasks %s, output %s",
                config.fingerprint(), config.corpus.uris, config.checkpoints.uris,
                config.tasks.root or sorted(config.tasks.files), config.output.uri)
    shards = corpus.list_shards(config.corpus.uris, format=config.corpus.format)
    checkpoints = discover_checkpoints(config.checkpoints.uris, allow_pickle=config.checkpoints.allow_pickle)
    splits = prepare_task_splits(config.tasks)
    layout = claim_output(config, overwrite=config.output.overwrite)
    init_local_ray(config.ray.address)

    matrix, selected, artifacts = select_artifact_checkpoints(config, checkpoints, splits.influence, layout)
    plan = plan_scoring(config, artifacts, selected, splits.influence)

    max_key = subsample_threshold(config, shards, tokenizer_path=checkpoints[0].path)
    samples = build_sample_dataset(config, shards, tokenizer_path=checkpoints[0].path, max_key=max_key)
    scored = score_samples(config, samples, plan)
    logger.info("scoring %d shards into %s", len(shards), layout.influence)
    scored.write_parquet(layout.influence, ray_remote_args={"num_cpus": STREAM_TASK_CPUS})

    influence = ray.data.read_parquet(layout.influence)
    mixture = build_mixture(influence, selected=selected, config=config.mixture, output_dir=layout.root)
    manifest = _manifest(config, checkpoints, matrix, plan, mixture)
    manifest_uri = write_manifest(layout.root, manifest)
    from automixer_ray.report import write_report

    report_files = write_report(layout.root, manifest, influence)
    elapsed = time.monotonic() - started
    logger.info("AutoMixer job finished in %.0f s: read %d, scored %d, skipped %s; %d groups; manifest %s; report %s",
                elapsed, mixture.counts["read"], mixture.counts["scored"], mixture.counts["skipped"],
                len(mixture.groups), manifest_uri, report_files[0] if report_files else "none")
    return JobResult(output_uri=layout.root, manifest_uri=manifest_uri,
                     report_uri=layout.path("report"), counts=mixture.counts)


def _manifest(config: JobConfig, checkpoints: list[CheckpointInfo], matrix, plan: ScoringPlan, mixture) -> dict:
    first_identity = next(iter(plan.identities.values()))
    return {
        "format_version": FORMAT_VERSION,
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
        "influence": {"metric": config.influence.metric, "path": "influence"},
        "counts": mixture.counts,
        "column_stats": mixture.column_stats,
        "groups": mixture.groups,
    }
