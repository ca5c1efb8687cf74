"""Faults during a local job: a scoring actor killed mid-batch must not change the mixture."""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from automixer_ray.config import config_from_dict
from automixer_ray.manifest import group_file_uri, read_manifest
from automixer_ray.pipeline import run_job

pytestmark = pytest.mark.timeout(900)

# Part of a scoring actor's process title, which Ray sets from the actor's name.
SCORING_TITLE = "MapBatches(ScoringActor)"


def fault_corpus(shared_data, folder):
    """Copy 12 real BBC news articles and 12 Shakespeare files into two source folders."""
    for source, pattern in (("news", "news/*/*.txt"), ("shakespeare", "shakespeare/**/*.txt")):
        target = folder / source
        target.mkdir(parents=True)
        for index, path in enumerate(sorted(shared_data.joinpath("corpus").glob(pattern))[:12]):
            shutil.copy(path, target / f"{index:03d}.txt")
    return folder


def fault_config(corpus, proxy_run, tasks_dir, output) -> dict:
    return {
        "corpus": {"uris": [str(corpus)], "chunk_num_tokens": 64, "max_samples": 64},
        "checkpoints": {"uris": [str(proxy_run)]},
        "tasks": {"root": str(tasks_dir), "names": ["arc_easy", "piqa"], "max_influence_examples": 4},
        "evaluation": {"batch_size": 8},
        "influence": {"batch_size": 2},
        "mixture": {"top_k_percent": 50.0, "beta": 1.0},
        "output": {"uri": str(output)},
        # One scoring wave, because each wave starts its own actor pools, which costs more than
        # scoring a corpus this small.
        "ray": {"shards_per_wave": 64},
    }


@pytest.fixture(scope="module")
def corpus_dir(shared_data, tmp_path_factory):
    return fault_corpus(shared_data, tmp_path_factory.mktemp("fault_corpus"))


@pytest.fixture(scope="module")
def clean_job(corpus_dir, shared_data, proxy_run, ray_local, tmp_path_factory):
    output = tmp_path_factory.mktemp("clean") / "out"
    return run_job(config_from_dict(fault_config(corpus_dir, proxy_run, shared_data / "tasks", output)))


def _scoring_actors() -> list[dict]:
    """Return the live scoring actors of this driver's Ray, with their process ids.

    The public state API (``ray.util.state.list_actors``) needs the dashboard, which the local Ray
    of the tests does not start, so this reads the actor table from the GCS directly.
    """
    import ray

    actors = []
    for actor in ray._private.state.actors().values():
        if actor["State"] != "ALIVE" or not actor["Pid"]:
            continue
        try:
            with open(f"/proc/{actor['Pid']}/cmdline", "rb") as handle:
                title = handle.read().decode(errors="replace")
        except OSError:
            continue
        if SCORING_TITLE in title:
            actors.append({"actor_id": actor["ActorID"], "pid": actor["Pid"], "title": title})
    return actors


class ActorKiller(threading.Thread):
    """Kill the first scoring actor seen running a batch, with SIGKILL, once."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.killed: dict | None = None

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for actor in _scoring_actors():
                # Ray titles a worker "ray::<actor>.<method>" while the method runs, and Ray Data
                # hands each batch to the actor's "submit" method.
                if ".submit" in actor["title"]:
                    os.kill(actor["pid"], signal.SIGKILL)
                    self.killed = actor
                    return
            time.sleep(0.02)


def _num_restarts(actor_id: str) -> int:
    import ray

    return ray._private.state.actors()[actor_id]["NumRestarts"]


def _ranked_groups(result) -> dict[str, list[tuple[str, int]]]:
    manifest = read_manifest(result.manifest_uri)
    groups = {}
    for group in manifest["groups"]:
        table = pq.read_table(group_file_uri(result.manifest_uri, group).removeprefix("file://"),
                              columns=["sample_id", "rank"])
        groups[group["name"]] = list(zip(table.column("sample_id").to_pylist(), table.column("rank").to_pylist()))
    return groups


def test_killed_scoring_actor_same_mixture(clean_job, corpus_dir, shared_data, proxy_run, tmp_path):
    killer = ActorKiller()
    killer.start()
    try:
        result = run_job(config_from_dict(fault_config(corpus_dir, proxy_run, shared_data / "tasks", tmp_path / "out")))
    finally:
        killer.stop.set()
        killer.join(timeout=10)

    assert killer.killed is not None, "no scoring actor was seen running a batch"
    assert _num_restarts(killer.killed["actor_id"]) >= 1

    clean = read_manifest(clean_job.manifest_uri)
    faulty = read_manifest(result.manifest_uri)
    assert faulty["counts"] == clean["counts"]
    assert faulty["selected"] == clean["selected"]
    assert [layer["name"] for layer in faulty["layers"] if layer["kept"]] == \
        [layer["name"] for layer in clean["layers"] if layer["kept"]]
    assert [group["name"] for group in faulty["groups"]] == [group["name"] for group in clean["groups"]]
    for mine, reference in zip(faulty["groups"], clean["groups"]):
        assert mine["n_samples"] == reference["n_samples"], mine["name"]
        assert mine["n_tokens"] == reference["n_tokens"], mine["name"]
        assert math.isclose(mine["weight"], reference["weight"], rel_tol=1e-6), mine["name"]
    assert _ranked_groups(result) == _ranked_groups(clean_job)
