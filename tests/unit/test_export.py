"""Exports of a manifest's mixture for Hugging Face interleaving and Megatron blends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from automixer_ray.config import JobConfig
from automixer_ray.export import export_manifest
from automixer_ray.manifest import build_manifest, write_manifest
from automixer_ray.mixture import MixtureResult

WEIGHTS = {"checkpoint-100": 0.2, "checkpoint-200": 0.3, "checkpoint-300": 0.5}


@pytest.fixture(scope="module")
def manifest_uri(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("run")
    (output / "groups").mkdir()
    groups = []
    for name, weight in WEIGHTS.items():
        pq.write_table(pa.table({"sample_id": [f"{name}-0"], "n_tokens": [12]}), output / "groups" / f"{name}.parquet")
        groups.append({"name": name, "checkpoint": name, "tasks": [name], "weight": weight, "n_samples": 1,
                       "n_tokens": 12, "epochs": 1.0, "path": f"groups/{name}.parquet"})
    checkpoints = [{"name": name, "path": f"/runs/{name}", "step": i, "fingerprint": "0" * 16}
                   for i, name in enumerate(WEIGHTS)]
    manifest = build_manifest(config=JobConfig(), checkpoints=checkpoints, capability={"metric": "acc", "matrix": []},
                              selected={name: name for name in WEIGHTS}, layers=[],
                              projector={"kind": "gaussian", "seed": 1},
                              mixture=MixtureResult(groups=groups, column_stats={},
                                                    counts={"read": 3, "scored": 3, "skipped": {}}))
    return write_manifest(str(output), manifest)


def test_hf_interleave_parses(manifest_uri, tmp_path):
    path = export_manifest(manifest_uri, format="hf-interleave", output=str(tmp_path / "mixture.hf.json"))
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    assert spec["format"] == "hf-interleave"
    assert spec["groups"] == list(WEIGHTS)
    assert spec["probabilities"] == pytest.approx(list(WEIGHTS.values()), abs=1e-12)
    assert math.fsum(spec["probabilities"]) == pytest.approx(1.0, abs=1e-12)
    for data_file, name in zip(spec["data_files"], WEIGHTS):
        assert Path(data_file).is_file()
        assert pq.read_table(data_file).column("sample_id").to_pylist() == [f"{name}-0"]
    assert spec["stopping_strategy"] == "all_exhausted"
    assert any("interleave_datasets" in line for line in spec["usage"])
    # The probabilities are valid for numpy's weighted choice, which interleave_datasets uses.
    np.random.default_rng(0).choice(len(spec["probabilities"]), size=10, p=spec["probabilities"])


def test_megatron_blend_parses(manifest_uri, tmp_path):
    path = export_manifest(str(Path(manifest_uri).parent), format="megatron", output=str(tmp_path / "blend.json"))
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    blend = spec["data_path"]
    assert len(blend) == 2 * len(WEIGHTS)
    weights, prefixes = blend[0::2], blend[1::2]
    assert weights == pytest.approx(list(WEIGHTS.values()), abs=1e-12)
    run = Path(manifest_uri).parent
    assert prefixes == [str(run / "groups" / f"{name}_text_document") for name in WEIGHTS]
    tokens = spec["data_path_arg"].split()
    assert [float(token) for token in tokens[0::2]] == pytest.approx(weights, abs=1e-9)
    assert tokens[1::2] == prefixes


def test_export_rejects_unknown_format(manifest_uri, tmp_path):
    with pytest.raises(ValueError, match="'parquet' is invalid"):
        export_manifest(manifest_uri, format="parquet", output=str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()
