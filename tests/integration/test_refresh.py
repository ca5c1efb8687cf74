"""Incremental refresh, resume after a kill, and determinism across actor counts and batch sizes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from automixer_ray.config import config_from_dict
from automixer_ray.manifest import group_file_uri, read_manifest
from automixer_ray.pipeline import run_job

pytestmark = pytest.mark.timeout(900)

NEWS_FILES = [("business", f"{i:03d}.txt") for i in range(1, 8)] + [("tech", f"{i:03d}.txt") for i in range(1, 7)]
ADDED_FILE = NEWS_FILES[-1]


def _corpus(root: Path, shared_data: Path, files) -> Path:
    for category, name in files:
        target = root / "news" / category / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "corpus" / "news" / category / name, target)
    return root


def _config(corpus_dir: Path, shared_data: Path, checkpoints: str, output: Path, **ray_settings) -> dict:
    # Two checkpoints of the proxy run keep each job short while still scoring in two actor pools
    # whenever the two tasks pick different checkpoints.
    run = Path(checkpoints)
    return {
        "corpus": {"uris": [str(corpus_dir)]},
        "checkpoints": {"uris": [str(run / "checkpoint-000050"), str(run / "checkpoint-000150")]},
        "tasks": {"root": str(shared_data / "tasks"), "names": ["boolq", "piqa"], "max_influence_examples": 8},
        "influence": {"batch_size": ray_settings.pop("batch_size", 4)},
        "mixture": {"top_k_percent": 50.0, "beta": 1.0, "token_budget": 6000},
        "output": {"uri": str(output)},
        "ray": {"shards_per_wave": len(NEWS_FILES), **ray_settings},
    }


def _groups(manifest_uri: str) -> dict:
    """Return each group's weight, epochs and ranked (sample_id, location) list."""
    manifest = read_manifest(manifest_uri)
    result = {}
    for group in manifest["groups"]:
        table = pq.read_table(group_file_uri(manifest_uri, group)).to_pandas()
        result[group["name"]] = {
            "weight": group["weight"],
            "epochs": group["epochs"],
            "n_tokens": group["n_tokens"],
            # Runs read copies of the corpus in different folders: compare locations below the root.
            "ranked": [(rank, sample_id, location.split("/news/", 1)[1])
                       for rank, sample_id, location in zip(table["rank"], table["sample_id"], table["location"])],
        }
    return result


def _assert_same_mixture(left_uri: str, right_uri: str) -> None:
    left, right = _groups(left_uri), _groups(right_uri)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name]["ranked"] == right[name]["ranked"], name
        assert left[name]["weight"] == pytest.approx(right[name]["weight"], rel=1e-6), name
        assert left[name]["epochs"] == pytest.approx(right[name]["epochs"], rel=1e-6), name
        assert left[name]["n_tokens"] == right[name]["n_tokens"], name
    assert read_manifest(left_uri)["counts"] == read_manifest(right_uri)["counts"]


@pytest.fixture(scope="module")
def full_corpus(tmp_path_factory, shared_data) -> Path:
    return _corpus(tmp_path_factory.mktemp("full-corpus"), shared_data, NEWS_FILES)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, full_corpus, shared_data, proxy_run, ray_local):
    """An uninterrupted run on the full corpus: one actor per checkpoint, batches of 4."""
    output = tmp_path_factory.mktemp("baseline") / "out"
    result = run_job(config_from_dict(_config(full_corpus, shared_data, proxy_run, output, actors_per_checkpoint=1)))
    return result


def test_refresh_scores_only_new_shard(tmp_path, shared_data, proxy_run, baseline, caplog):
    corpus_dir = _corpus(tmp_path / "corpus", shared_data, NEWS_FILES[:-1])
    config = config_from_dict(_config(corpus_dir, shared_data, proxy_run, tmp_path / "out", actors_per_checkpoint=1))
    first = run_job(config)
    assert first.version == 1

    _corpus(corpus_dir, shared_data, [ADDED_FILE])
    with caplog.at_level(logging.INFO, logger="automixer_ray"):
        second = run_job(config, refresh=True)
    total = len(NEWS_FILES)
    assert f"{total - 1} of {total} shards reused, 1 to score" in caplog.text
    assert "from 1 shards recorded as complete" in caplog.text
    assert second.version == 2
    assert read_manifest(second.manifest_uri)["version"] == 2
    old = tmp_path / "out" / "manifests" / "v000001" / "manifest.json"
    assert read_manifest(str(old))["counts"]["read"] < read_manifest(second.manifest_uri)["counts"]["read"]
    _assert_same_mixture(second.manifest_uri, baseline.manifest_uri)


def test_refresh_without_previous_run_fails(tmp_path, shared_data, proxy_run, full_corpus):
    from automixer_ray.outputs import OutputError

    config = config_from_dict(_config(full_corpus, shared_data, proxy_run, tmp_path / "empty"))
    with pytest.raises(OutputError, match="nothing to refresh"):
        run_job(config, refresh=True)


def test_more_actors_and_other_batch_size_same_mixture(tmp_path, shared_data, proxy_run, full_corpus, baseline):
    config = config_from_dict(_config(full_corpus, shared_data, proxy_run, tmp_path / "out",
                                      actors_per_checkpoint=2, batch_size=16, shards_per_wave=13))
    result = run_job(config)
    _assert_same_mixture(result.manifest_uri, baseline.manifest_uri)


def _completed_shards(output: Path) -> int:
    influence = output / "influence"
    if not influence.is_dir():
        return 0
    return sum(1 for entry in influence.iterdir() if (entry / "_SUCCESS").exists())


def test_killed_job_resumes_to_identical_manifest(tmp_path, shared_data, proxy_run, full_corpus, baseline, caplog):
    output = tmp_path / "out"
    # The killed run commits 4 shards per wave, and the resumed run scores the rest in one wave.
    # Ray settings are not part of the config fingerprint, so the resumed run may change them.
    data = _config(full_corpus, shared_data, proxy_run, output, actors_per_checkpoint=1, shards_per_wave=4)
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(data))
    # Ray's socket paths must stay under the 107-byte AF_UNIX limit, so its folder is short.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="amray-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "killed-job.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "automixer_ray.cli", "run", "--config", str(config_path)],
                               env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while _completed_shards(output) < 4:
            if process.poll() is not None:
                pytest.fail("the job ended before it could be killed:\n"
                            + (tmp_path / "killed-job.log").read_text(errors="replace")[-4000:])
            assert time.monotonic() < deadline, "the job completed no shards within 600 s"
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        log.close()
    completed = _completed_shards(output)
    assert 4 <= completed < len(NEWS_FILES)

    data["ray"]["shards_per_wave"] = len(NEWS_FILES)
    with caplog.at_level(logging.INFO, logger="automixer_ray"):
        result = run_job(config_from_dict(data))
    assert f"{completed} of {len(NEWS_FILES)} shards reused" in caplog.text
    assert not (output / "influence" / "_staging").exists()
    _assert_same_mixture(result.manifest_uri, baseline.manifest_uri)
