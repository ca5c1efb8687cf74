"""The mixture loader: weighted group draws, rank-order cycling, determinism, resume and sharding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from transformers import AutoTokenizer

from automixer_ray.config import CorpusConfig, JobConfig
from automixer_ray.loader import DRAW_BLOCK, DrawSequence, MixtureDataset, build_ray_dataset
from automixer_ray.manifest import build_manifest, write_manifest
from automixer_ray.mixture import GROUP_FILE_SCHEMA, MixtureResult

WEIGHTS = {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}
GROUP_SIZES = {"alpha": 12, "beta": 5, "gamma": 2}
CHUNK_CHARS = 300


def _chunks(shared_data: Path) -> list[dict]:
    """Character chunks of real BBC business articles, read here independently of the corpus reader."""
    chunks = []
    for path in sorted((shared_data / "corpus" / "news" / "business").glob("*.txt"))[:8]:
        text = path.read_text(encoding="utf-8")
        for start in range(0, min(len(text), 3 * CHUNK_CHARS), CHUNK_CHARS):
            piece = text[start:start + CHUNK_CHARS]
            chunks.append({"uri": path.as_uri(), "text": piece, "char_start": start, "char_end": start + len(piece),
                           "sample_id": hashlib.blake2b(piece.encode("utf-8"), digest_size=8).hexdigest()})
    return chunks


def _group_table(chunks: list[dict], tokenizer) -> pa.Table:
    return pa.table({
        "sample_id": [c["sample_id"] for c in chunks],
        "doc_id": [None] * len(chunks),
        "source": ["business"] * len(chunks),
        "location": [f"{c['uri']}#row=0&chars={c['char_start']}-{c['char_end']}" for c in chunks],
        "uri": [c["uri"] for c in chunks],
        "row": [0] * len(chunks),
        "char_start": [c["char_start"] for c in chunks],
        "char_end": [c["char_end"] for c in chunks],
        "rank": list(range(len(chunks))),
        "joint_score": [float(-i) for i in range(len(chunks))],
        "n_tokens": [len(tokenizer(c["text"], add_special_tokens=False)["input_ids"]) for c in chunks],
    }).cast(GROUP_FILE_SCHEMA)


@pytest.fixture(scope="module")
def mixture(shared_data, tiny_gpt2_dir, tmp_path_factory):
    """A manifest with three groups of real news chunks; returns (manifest URI, group chunks)."""
    output = tmp_path_factory.mktemp("loader")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    chunks = _chunks(shared_data)
    groups, by_group, offset = [], {}, 0
    for name, size in GROUP_SIZES.items():
        by_group[name] = chunks[offset:offset + size]
        offset += size
        table = _group_table(by_group[name], tokenizer)
        (output / "groups").mkdir(exist_ok=True)
        pq.write_table(table, output / "groups" / f"{name}.parquet")
        groups.append({"name": name, "checkpoint": "checkpoint-000000", "tasks": [name], "weight": WEIGHTS[name],
                       "n_samples": size, "n_tokens": int(sum(table.column("n_tokens").to_pylist())),
                       "epochs": 1.0, "path": f"groups/{name}.parquet"})
    n_chunks = sum(GROUP_SIZES.values())
    manifest = build_manifest(
        config=JobConfig(corpus=CorpusConfig(uris=[str(shared_data / "corpus" / "news")])),
        checkpoints=[{"name": "checkpoint-000000", "path": tiny_gpt2_dir, "step": 0, "fingerprint": "0" * 16}],
        capability={"metric": "gold_nll", "matrix": []},
        selected={name: "checkpoint-000000" for name in GROUP_SIZES},
        layers=[], projector={"kind": "rademacher", "seed": 0},
        mixture=MixtureResult(groups=groups, column_stats={},
                              counts={"read": n_chunks, "scored": n_chunks, "skipped": {}}),
    )
    return write_manifest(str(output), manifest), by_group, tokenizer


def _ids(dataset: MixtureDataset, n: int) -> list[tuple[int, str, str]]:
    rows = []
    for row in dataset.iter_locations():
        rows.append((row["draw_index"], row["group"], row["sample_id"]))
        if len(rows) == n:
            break
    return rows


def test_items_hold_tokenized_chunks(mixture):
    manifest_uri, by_group, tokenizer = mixture
    texts = {c["sample_id"]: c["text"] for chunks in by_group.values() for c in chunks}
    items = list(MixtureDataset(manifest_uri, num_samples=25))
    assert [item["draw_index"] for item in items] == list(range(25))
    for item in items:
        assert item["input_ids"].dtype == torch.long
        assert item["input_ids"].dim() == 1
        expected = tokenizer(texts[item["sample_id"]], add_special_tokens=False)["input_ids"]
        assert item["input_ids"].tolist() == expected


def test_groups_cycle_in_rank_order(mixture):
    manifest_uri, by_group, _ = mixture
    drawn: dict[str, list[str]] = {name: [] for name in by_group}
    for _, group, sample_id in _ids(MixtureDataset(manifest_uri), 200):
        drawn[group].append(sample_id)
    for name, chunks in by_group.items():
        ranked = [c["sample_id"] for c in chunks]
        expected = [ranked[i % len(ranked)] for i in range(len(drawn[name]))]
        assert drawn[name] == expected
        assert len(drawn[name]) > len(ranked), f"group {name} was not drawn often enough to cycle"


def test_group_frequencies_match_weights(mixture):
    manifest_uri, _, _ = mixture
    n = 20000
    groups = [group for _, group, _ in _ids(MixtureDataset(manifest_uri, seed=3), n)]
    observed = np.array([groups.count(name) for name in WEIGHTS])
    expected = np.array(list(WEIGHTS.values())) * n
    result = stats.chisquare(observed, expected)
    assert result.pvalue > 1e-4, f"observed {observed.tolist()} against expected {expected.tolist()}"


def test_same_seed_same_sequence(mixture):
    manifest_uri, _, _ = mixture
    first = _ids(MixtureDataset(manifest_uri, seed=11), 300)
    again = _ids(MixtureDataset(manifest_uri, seed=11), 300)
    other = _ids(MixtureDataset(manifest_uri, seed=12), 300)
    assert first == again
    assert first != other


def test_resume_continues_exact_sequence(mixture):
    manifest_uri, _, _ = mixture
    whole = [item["sample_id"] for item in MixtureDataset(manifest_uri, seed=5, num_samples=30)]

    first = MixtureDataset(manifest_uri, seed=5, num_samples=30)
    head = []
    for item in first:
        head.append(item["sample_id"])
        if len(head) == 12:
            break
    state = first.state_dict()
    assert state["samples_yielded"] == 12

    resumed = MixtureDataset(manifest_uri, seed=5, num_samples=30)
    resumed.load_state_dict(state)
    tail = [item["sample_id"] for item in resumed]
    assert head + tail == whole


def test_ranks_disjoint_and_complete(mixture):
    manifest_uri, _, _ = mixture
    single = _ids(MixtureDataset(manifest_uri, seed=2, num_samples=500), 500)
    shards = [_ids(MixtureDataset(manifest_uri, seed=2, num_samples=500, rank=r, world_size=3), 500) for r in range(3)]
    for rank, shard in enumerate(shards):
        assert all(draw % 3 == rank for draw, _, _ in shard)
    merged = sorted(row for shard in shards for row in shard)
    assert merged == single
    assert len(merged) == len({draw for draw, _, _ in merged})


def test_dataloader_workers_keep_order_and_resume(mixture):
    manifest_uri, _, _ = mixture
    expected = _ids(MixtureDataset(manifest_uri, seed=4, num_samples=60, rank=1, world_size=2), 60)
    dataset = MixtureDataset(manifest_uri, seed=4, num_samples=60, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    assert [item["draw_index"] for item in loader] == [draw for draw, _, _ in expected]

    # Resuming under workers: the training loop consumed 7 samples, so the loader starts at the 8th.
    resumed = MixtureDataset(manifest_uri, seed=4, num_samples=60, rank=1, world_size=2)
    resumed.load_state_dict({"seed": 4, "rank": 1, "world_size": 2, "samples_yielded": 7})
    loader = torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=2)
    assert [item["sample_id"] for item in loader] == [sample_id for _, _, sample_id in expected[7:]]


def test_load_state_rejects_other_sharding(mixture):
    manifest_uri, _, _ = mixture
    dataset = MixtureDataset(manifest_uri, seed=1)
    with pytest.raises(ValueError, match="world_size=4"):
        dataset.load_state_dict({"seed": 1, "rank": 0, "world_size": 4, "samples_yielded": 3})
    with pytest.raises(ValueError, match="samples_yielded"):
        dataset.load_state_dict({"seed": 1, "samples_yielded": -1})


def test_invalid_rank_raises(mixture):
    manifest_uri, _, _ = mixture
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        MixtureDataset(manifest_uri, rank=2, world_size=2)


def test_draw_positions_across_blocks():
    sequence = DrawSequence([0.6, 0.4], seed=9)
    whole = list(sequence.iter_draws(0, DRAW_BLOCK + 50))
    window = list(sequence.iter_draws(DRAW_BLOCK - 20, DRAW_BLOCK + 50))
    assert whole[DRAW_BLOCK - 20:] == window
    counts = np.bincount([group for _, group, _ in whole], minlength=2)
    assert sequence.cursors_at(DRAW_BLOCK + 50).tolist() == counts.tolist()


def test_ray_dataset_matches_loader(ray_local, mixture):
    manifest_uri, _, _ = mixture
    n = DRAW_BLOCK + 100  # two draw blocks, so the second task starts from carried cursors
    dataset = build_ray_dataset(manifest_uri, num_samples=n, seed=6)
    rows = dataset.select_columns(["draw_index", "group", "sample_id"]).to_pandas()
    expected = _ids(MixtureDataset(manifest_uri, seed=6, num_samples=n), n)
    assert list(zip(rows.draw_index, rows.group, rows.sample_id)) == expected
