"""The report: four readable PNG plots and a summary that links them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from automixer_ray.config import JobConfig
from automixer_ray.manifest import build_manifest
from automixer_ray.mixture import MixtureResult
from automixer_ray.report import MAX_PLOT_ROWS, _influence_sample, write_report

SELECTED = {"arc_easy": "checkpoint-100", "piqa": "checkpoint-200", "boolq": "checkpoint-200"}
SOURCES = ["books", "news", "shakespeare", "stackexchange", "wikitext"]


def _influence(n_rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "sample_id": [f"{i:016x}" for i in range(n_rows)],
        "source": rng.choice(SOURCES, n_rows),
        "n_tokens": rng.integers(10, 128, n_rows).astype(np.int32),
        "skip_reason": np.where(rng.random(n_rows) < 0.05, "empty_text", None),
    })
    for checkpoint in sorted(set(SELECTED.values())):
        for task in SELECTED:
            offset = frame["source"].map({s: 0.01 * i for i, s in enumerate(SOURCES)})
            frame[f"{checkpoint}/{task}"] = (offset + 0.02 * rng.normal(size=n_rows)).astype(np.float32)
    return frame


def _manifest(output: Path, frame: pd.DataFrame) -> dict:
    (output / "groups").mkdir(parents=True)
    scored = frame[frame.skip_reason.isna()]
    groups = []
    for name, weight in (("checkpoint-100", 0.4), ("checkpoint-200", 0.6)):
        part = scored.sample(n=200, random_state=len(groups))
        pq.write_table(pa.Table.from_pandas(part[["sample_id", "source", "n_tokens"]], preserve_index=False),
                       output / "groups" / f"{name}.parquet")
        groups.append({"name": name, "checkpoint": name, "tasks": [t for t, c in SELECTED.items() if c == name],
                       "weight": weight, "n_samples": 200, "n_tokens": int(part.n_tokens.sum()), "epochs": 1.0,
                       "path": f"groups/{name}.parquet"})
    checkpoints = [{"name": f"checkpoint-{step}", "path": f"/runs/checkpoint-{step}", "step": step,
                    "fingerprint": f"{step:016x}"} for step in (100, 200, 300)]
    matrix = [{"checkpoint": c["name"], "step": c["step"], "task": task, "gold_nll": 4.0 - 0.001 * c["step"] + 0.1 * j}
              for c in checkpoints for j, task in enumerate(SELECTED)]
    counts = {"read": len(frame), "scored": len(scored), "skipped": {"empty_text": len(frame) - len(scored)}}
    return build_manifest(config=JobConfig(), checkpoints=checkpoints, capability={"metric": "gold_nll", "matrix": matrix},
                          selected=SELECTED, layers=[], projector={"kind": "rademacher", "seed": 0},
                          mixture=MixtureResult(groups=groups, column_stats={}, counts=counts))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    frame = _influence(3000)
    manifest = _manifest(output, frame)
    return output, manifest, write_report(str(output), manifest, frame)


def test_report_writes_all_files(report):
    output, _, written = report
    names = sorted(Path(uri).name for uri in written)
    assert names == ["capability.png", "group_sources.png", "group_weights.png", "influence_by_source.png",
                     "summary.md"]
    assert Path(written[0]).name == "summary.md"
    for uri in written:
        assert Path(uri).parent == output / "report"


def test_report_pngs_are_readable_images(report):
    _, _, written = report
    for uri in written:
        if uri.endswith(".png"):
            with Image.open(uri) as image:
                assert image.format == "PNG"
                assert image.width >= 300
                assert image.height >= 200


def test_summary_links_plots_and_numbers(report):
    output, manifest, _ = report
    summary = (output / "report" / "summary.md").read_text(encoding="utf-8")
    for name in ("capability.png", "group_weights.png", "influence_by_source.png", "group_sources.png"):
        assert f"]({name})" in summary
    assert f"samples read: {manifest['counts']['read']}" in summary
    assert "| checkpoint-200 | checkpoint-200 | piqa, boolq | 0.6000 | 200 |" in summary
    assert "| arc_easy | checkpoint-100 |" in summary


def test_influence_sample_caps_rows():
    frame = _influence(MAX_PLOT_ROWS + 5000, seed=1)
    sample = _influence_sample(frame, ["source", "skip_reason", "checkpoint-100/piqa"])
    assert len(sample) <= MAX_PLOT_ROWS
    assert sample["skip_reason"].isna().all()


def test_report_from_ray_dataset(ray_local, tmp_path):
    frame = _influence(1500, seed=2)
    manifest = _manifest(tmp_path, frame)
    dataset = ray_local.data.from_pandas(frame)
    written = write_report(str(tmp_path), manifest, dataset)
    assert (tmp_path / "report" / "influence_by_source.png").is_file()
    assert len(written) == 5
