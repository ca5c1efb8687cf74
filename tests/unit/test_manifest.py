"""The manifest contract: atomic writes, reading back, and validation errors."""

from __future__ import annotations

import copy
import json
import math

import fsspec
import pytest

from automixer_ray.config import JobConfig
from automixer_ray.manifest import (
    FORMAT_VERSION,
    ManifestError,
    build_manifest,
    capability_values,
    group_file_uri,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from automixer_ray.mixture import MixtureResult


def _manifest() -> dict:
    mixture = MixtureResult(
        groups=[
            {"name": "checkpoint-100", "checkpoint": "checkpoint-100", "tasks": ["arc_easy"], "weight": 0.25,
             "n_samples": 10, "n_tokens": 640, "epochs": 1.0, "path": "groups/checkpoint-100.parquet"},
            {"name": "checkpoint-200", "checkpoint": "checkpoint-200", "tasks": ["piqa", "boolq"], "weight": 0.75,
             "n_samples": 12, "n_tokens": 700, "epochs": 1.5, "path": "groups/checkpoint-200.parquet"},
        ],
        column_stats={"checkpoint-100/arc_easy": {"mean": 0.1, "std": 0.02, "count": 40}},
        counts={"read": 50, "scored": 40, "skipped": {"empty_text": 7, "invalid_utf8": 3}},
    )
    checkpoints = [{"name": f"checkpoint-{step}", "path": f"/runs/proxy/checkpoint-{step}", "step": step,
                    "fingerprint": f"{step:016x}"} for step in (100, 200, 300)]
    matrix = [{"checkpoint": c["name"], "step": c["step"], "task": task, "gold_nll": 3.0 - 0.001 * c["step"]}
              for c in checkpoints for task in ("arc_easy", "piqa", "boolq")]
    return build_manifest(
        config=JobConfig(),
        checkpoints=checkpoints,
        capability={"metric": "gold_nll", "matrix": matrix},
        selected={"arc_easy": "checkpoint-100", "piqa": "checkpoint-200", "boolq": "checkpoint-200"},
        layers=[{"name": "transformer.h.0.mlp.c_fc", "score": 0.4, "kept": True},
                {"name": "transformer.h.1.mlp.c_fc", "score": 0.1, "kept": False}],
        projector={"kind": "rademacher", "seed": 0, "k_in": 16, "k_out": 16},
        mixture=mixture,
    )


def test_build_manifest_fills_identity():
    manifest = _manifest()
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["config_fingerprint"] == JobConfig().fingerprint()
    assert manifest["config"] == JobConfig().to_dict()
    assert manifest["created_at"].endswith("+00:00")


def test_write_read_roundtrip_local(tmp_path):
    manifest = _manifest()
    uri = write_manifest(str(tmp_path), manifest)
    assert uri == str(tmp_path / "manifest.json")
    assert read_manifest(uri) == manifest
    assert read_manifest(str(tmp_path)) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_write_read_roundtrip_fsspec_memory():
    manifest = _manifest()
    uri = write_manifest("memory://automixer-test/run", manifest)
    assert uri == "memory://automixer-test/run/manifest.json"
    assert read_manifest(uri) == manifest
    fs = fsspec.filesystem("memory")
    assert fs.ls("/automixer-test/run", detail=False) == ["/automixer-test/run/manifest.json"]
    fs.rm("/automixer-test", recursive=True)


@pytest.mark.parametrize("bad_value", [float("nan"), object()], ids=["nan", "unknown_type"])
def test_failed_write_keeps_old_manifest(tmp_path, bad_value):
    old = _manifest()
    write_manifest(str(tmp_path), old)
    before = (tmp_path / "manifest.json").read_bytes()

    new = _manifest()
    new["config"]["mixture"]["beta"] = bad_value  # fails to encode after the first keys were written
    with pytest.raises((ValueError, TypeError)):
        write_manifest(str(tmp_path), new)

    assert (tmp_path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"], "a temporary file was left behind"
    assert read_manifest(str(tmp_path)) == old


def test_write_rejects_invalid_manifest(tmp_path):
    manifest = _manifest()
    del manifest["groups"]
    with pytest.raises(ManifestError, match="groups"):
        write_manifest(str(tmp_path), manifest)
    assert not (tmp_path / "manifest.json").exists()


def _set(manifest: dict, path: str, value) -> None:
    node = manifest
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value


_DELETE = object()

INVALID_CASES = [
    ("created_at", _DELETE, "missing required key.*created_at"),
    ("format_version", FORMAT_VERSION + 1, "newer than this reader"),
    ("format_version", "1", "format_version='1' is invalid"),
    ("format_version", 0, "no longer supported"),
    ("config_fingerprint", "", "config_fingerprint"),
    ("groups.0.weight", 0.5, "sum to 1.25"),
    ("groups.0.weight", -0.25, "weight=-0.25"),
    ("groups.0.weight", math.inf, "weight=inf"),
    ("groups.0.n_samples", 0, "n_samples=0"),
    ("groups.0.epochs", 0, "epochs=0"),
    ("groups.0.path", "../outside.parquet", "stay inside"),
    ("groups.0.path", "/abs/group.parquet", "stay inside"),
    ("groups.0.path", "s3://bucket/group.parquet", "stay inside"),
    ("groups.0.checkpoint", "checkpoint-999", "checkpoint-999"),
    ("groups.0.name", "checkpoint-200", "name twice"),
    ("groups.1.tasks", _DELETE, r"groups\[1\] is missing tasks"),
    ("selected.piqa", "checkpoint-999", "checkpoint-999"),
    ("counts.read", 49, "counts.read=49"),
    ("counts.skipped", {"empty_text": -1}, "counts.skipped"),
    ("checkpoints.0.step", -5, "step=-5"),
    ("checkpoints.1.name", "checkpoint-100", "name twice"),
    ("capability.matrix", "table", "capability.matrix"),
    ("projector", {"seed": 0}, "projector"),
    ("layers.0.kept", _DELETE, r"layers\[0\] is missing kept"),
]


@pytest.mark.parametrize("path,value,message", INVALID_CASES, ids=[f"{p}={v!r}"[:40] for p, v, _ in INVALID_CASES])
def test_validate_rejects(path, value, message):
    manifest = copy.deepcopy(_manifest())
    _set(manifest, path, value)
    with pytest.raises(ManifestError, match=message):
        validate_manifest(manifest)


def test_validate_rejects_non_object():
    with pytest.raises(ManifestError, match="JSON object"):
        validate_manifest([1, 2])


def test_read_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nowhere" / "manifest.json"))


def test_read_invalid_json(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1,', encoding="utf-8")
    with pytest.raises(ManifestError, match="not valid UTF-8 JSON"):
        read_manifest(str(tmp_path / "manifest.json"))


def test_read_names_uri_on_invalid_content(tmp_path):
    manifest = _manifest()
    manifest["groups"][0]["weight"] = 0.5
    (tmp_path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ManifestError, match=r"manifest .*manifest.json is invalid: group weights sum"):
        read_manifest(str(tmp_path))


def test_capability_values_both_forms():
    manifest = _manifest()
    records = capability_values(manifest)
    assert records[("checkpoint-200", "piqa")] == pytest.approx(2.8)
    assert len(records) == 9
    manifest["capability"]["matrix"] = {"checkpoint-100": {"piqa": 2.9}, "checkpoint-200": {"piqa": 2.8}}
    validate_manifest(manifest)
    assert capability_values(manifest) == {("checkpoint-100", "piqa"): 2.9, ("checkpoint-200", "piqa"): 2.8}


def test_group_file_uri_joins_manifest_folder():
    group = {"path": "groups/a.parquet"}
    assert group_file_uri("/runs/x/manifest.json", group) == "/runs/x/groups/a.parquet"
    assert group_file_uri("s3://bucket/run/manifest.json", group) == "s3://bucket/run/groups/a.parquet"
