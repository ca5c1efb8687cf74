"""The whole job on local Ray: real corpus (all five sources), eight real benchmarks, a trained proxy."""

from __future__ import annotations

import math
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from automixer_ray.config import config_from_dict
from automixer_ray.manifest import read_manifest
from automixer_ray.pipeline import run_job
from shared_job import job_config

pytestmark = pytest.mark.timeout(900)

SOURCES = {"books", "news", "shakespeare", "stackexchange", "wikitext"}


def test_manifest_contract(finished_job):
    data, result = finished_job
    config = config_from_dict(data)
    manifest = read_manifest(result.manifest_uri)
    for key in ("format_version", "config_fingerprint", "checkpoints", "capability", "selected", "layers",
                "projector", "counts", "groups"):
        assert key in manifest, key
    assert manifest["config_fingerprint"] == config.fingerprint()
    assert set(manifest["selected"]) == {"arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa",
                                         "piqa", "siqa", "winogrande"}
    checkpoint_names = {c["name"] for c in manifest["checkpoints"]}
    assert set(manifest["selected"].values()) <= checkpoint_names
    assert any(layer["kept"] for layer in manifest["layers"])
    for group in manifest["groups"]:
        for key in ("name", "checkpoint", "tasks", "weight", "n_samples", "n_tokens", "epochs", "path"):
            assert key in group, key


def test_counts_add_up(finished_job):
    _, result = finished_job
    manifest = read_manifest(result.manifest_uri)
    counts = manifest["counts"]
    assert counts["read"] == 240
    assert counts["read"] == counts["scored"] + sum(counts["skipped"].values())
    table = pd.read_parquet(os.path.join(result.output_uri, "influence"))
    assert len(table) == counts["read"]
    # The same text at two locations (a licence header shared by books) has one sample id.
    assert not table.duplicated(["sample_id", "location"]).any()


def test_all_sources_scored(finished_job):
    _, result = finished_job
    table = pd.read_parquet(os.path.join(result.output_uri, "influence"))
    assert set(table["source"]) == SOURCES


def test_weights_and_groups(finished_job):
    _, result = finished_job
    manifest = read_manifest(result.manifest_uri)
    weights = [group["weight"] for group in manifest["groups"]]
    assert all(weight > 0 for weight in weights)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-9)
    for group in manifest["groups"]:
        frame = pq.read_table(os.path.join(result.output_uri, group["path"])).to_pandas()
        assert len(frame) == group["n_samples"]
        assert frame["n_tokens"].sum() == group["n_tokens"]
        assert frame["joint_score"].is_monotonic_decreasing
        assert list(frame["rank"]) == list(range(len(frame)))


def test_report_written(finished_job):
    _, result = finished_job
    report = result.report_uri
    assert os.path.isfile(os.path.join(report, "summary.md"))
    pngs = [name for name in os.listdir(report) if name.endswith(".png")]
    assert len(pngs) >= 4


def test_other_config_output_rejected(finished_job, shared_data, proxy_run):
    from automixer_ray.outputs import OutputError

    _, result = finished_job
    other = config_from_dict(job_config(shared_data / "corpus", shared_data / "tasks", proxy_run,
                                        result.output_uri, **{"mixture.beta": 0.0}))
    with pytest.raises(OutputError, match="--overwrite"):
        run_job(other)
