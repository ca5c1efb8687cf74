"""The proxy simulation on local Ray: real corpus, eight real benchmarks, tiny proxies, two seeds."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from automixer_ray.config import TasksConfig, config_from_dict
from automixer_ray.loader import MixtureDataset
from automixer_ray.manifest import read_manifest
from automixer_ray.simulation import RESULT_COLUMNS, run_simulation, table_fingerprint
from automixer_ray.tasks import prepare_task_splits

pytestmark = pytest.mark.timeout(900)

SEEDS = [0, 1]
CANDIDATES = {"automixer_k40_b0", "automixer_k40_b1", "uniform", "source_proportional"}


@pytest.fixture(scope="module")
def simulated(finished_job):
    """Simulate on the shared finished job's influence table (the simulation skips a job it finds)."""
    data, job = finished_job
    config = config_from_dict({
        **data,
        "mixture": {**data["mixture"], "group_by": "task", "token_budget": None},
        # 20 steps of 4 x 128 tokens per proxy, scored every 10 steps on 8 eval examples per task.
        "simulation": {"top_k_percents": [40.0], "betas": [0.0, 1.0], "seeds": SEEDS, "token_budget": 4 * 128 * 20,
                       "hidden_size": 32, "context_length": 128, "batch_size": 4, "eval_every": 10,
                       "max_eval_examples": 8},
    })
    return config, run_simulation(config, output_uri=job.output_uri)


def test_eval_examples_never_reach_influence(simulated):
    config, result = simulated
    job_output = os.path.dirname(result.output_uri)
    manifest = read_manifest(job_output)
    splits = prepare_task_splits(TasksConfig(**manifest["config"]["tasks"]))
    capability = pd.read_parquet(os.path.join(job_output, "capability.parquet"))
    used = pd.read_parquet(os.path.join(result.output_uri, "eval_examples.parquet"))
    assert set(used["task"]) == set(splits.influence)
    for task, examples in splits.influence.items():
        influence_ids = {example.example_id for example in examples}
        eval_ids = set(used.loc[used["task"] == task, "example_id"])
        assert eval_ids, task
        assert not eval_ids & influence_ids, task
        # The capability matrix (and the task gradients, from the same split) saw exactly V_t.
        assert set(capability.loc[capability["task"] == task, "n_examples"]) == {len(influence_ids)}, task


def test_candidates_share_influence_table(simulated):
    _, result = simulated
    job_output = os.path.dirname(result.output_uri)
    influence = pd.read_parquet(os.path.join(job_output, "influence"))
    scored_ids = set(influence.loc[influence["skip_reason"].isna(), "sample_id"])
    fingerprint = table_fingerprint(os.path.join(job_output, "influence"))
    folder = os.path.join(result.output_uri, "candidates")
    assert set(os.listdir(folder)) == CANDIDATES
    for name in CANDIDATES:
        manifest = read_manifest(os.path.join(folder, name))
        assert manifest["simulation_candidate"]["influence_fingerprint"] == fingerprint, name
        for group in manifest["groups"]:
            ids = set(pq.read_table(os.path.join(folder, name, group["path"])).column("sample_id").to_pylist())
            assert ids <= scored_ids, (name, group["name"])


def test_training_draws_follow_weights(simulated):
    _, result = simulated
    draws = pd.read_parquet(os.path.join(result.output_uri, "draws.parquet"))
    for (candidate, seed), rows in draws.groupby(["candidate", "seed"]):
        manifest = read_manifest(os.path.join(result.output_uri, "candidates", candidate))
        weights = {group["name"]: group["weight"] for group in manifest["groups"]}
        counts = dict(zip(rows["group"], rows["draws"]))
        assert set(counts) <= set(weights), candidate
        total = sum(counts.values())
        assert total > 0
        for group, weight in weights.items():
            # Binomial sampling error: each count lies within 4 standard deviations of its mean.
            sigma = math.sqrt(total * weight * (1 - weight))
            assert abs(counts.get(group, 0) - total * weight) <= 4 * sigma + 1, (candidate, seed, group)


def test_results_cover_every_run(simulated):
    _, result = simulated
    results = pd.read_parquet(result.results_uri)
    assert list(results.columns) == RESULT_COLUMNS
    assert set(results["candidate"]) == CANDIDATES
    assert set(results["seed"]) == set(SEEDS)
    assert set(results["step"]) == {10, 20}
    assert set(results["metric"]) == {"acc", "acc_norm", "gold_nll"}
    per_run = results.groupby(["candidate", "seed", "step"])["task"].nunique()
    assert set(per_run) == {8}
    assert results["value"].notna().all()


def test_report_and_chosen_manifest(simulated):
    _, result = simulated
    assert result.chosen in CANDIDATES
    report_dir = os.path.dirname(result.report_uri)
    assert os.path.getsize(os.path.join(report_dir, "learning_curve.png")) > 0
    with open(result.report_uri, encoding="utf-8") as handle:
        table = handle.read()
    for name in CANDIDATES:
        assert name in table
    averages = result.summary[result.summary["task"] == "average"]
    assert set(averages["candidate"]) == CANDIDATES
    assert set(averages["n_seeds"]) == {len(SEEDS)}
    with open(result.chosen_manifest_uri, encoding="utf-8") as handle:
        chosen = json.load(handle)
    assert chosen["simulation_candidate"]["name"] == result.chosen
    dataset = MixtureDataset(result.chosen_manifest_uri, num_samples=3)
    assert len(list(dataset)) == 3
