"""Bad inputs fed to the real job: each ends in a counted skip or a clear error, and no job hangs.

One job runs on a corpus that mixes real documents with every kind of bad record. Its counts,
influence table and mixture are checked row by row. The inputs that must fail do so before any
Ray work starts, except a damaged shard, which is found only when it is read.
"""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from automixer_ray.checkpoints import CheckpointError
from automixer_ray.config import ConfigError, MixtureConfig, config_from_dict
from automixer_ray.corpus import CorpusError
from automixer_ray.manifest import read_manifest
from automixer_ray.mixture import build_mixture
from automixer_ray.outputs import OutputError
from automixer_ray.pipeline import run_job
from automixer_ray.tasks import TaskError

pytestmark = pytest.mark.timeout(900)

CHUNK_TOKENS = 64
# Bad JSONL lines and the skip reason each must get.
BAD_LINES = [
    (b'{"text": ""}', "empty_text"),
    (b'{"text": "  \\n\\t "}', "empty_text"),
    (b'{"title": "no text field"}', "missing_text_field"),
    (b'{"text": 42}', "non_string_text"),
    (b'{"text": "unterminated', "malformed_json"),
    (b'[1, 2, 3]', "not_an_object"),
]


def _real_documents(shared_data, count: int) -> list[str]:
    """Return the first 800 characters (cut at a space) of ``count`` real BBC news articles."""
    paths = sorted((shared_data / "corpus" / "news").glob("*/*.txt"))[:count]
    texts = [path.read_text(encoding="utf-8", errors="replace")[:800].rsplit(" ", 1)[0] for path in paths]
    assert len(texts) == count
    return texts


def _long_document(shared_data) -> str:
    """A real book excerpt of about 12,000 characters: far longer than the 128-token context."""
    path = sorted((shared_data / "corpus" / "books").rglob("*.txt"))[0]
    # The corpus reader drops a leading byte order mark, so the expected text has none either.
    return path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")[:12_000]


def _write_jsonl(path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.fixture(scope="module")
def bad_corpus(shared_data, tmp_path_factory):
    """A corpus folder with real documents and every kind of bad record; returns (folder, facts)."""
    root = tmp_path_factory.mktemp("bad_corpus")
    documents = _real_documents(shared_data, 6)
    good_lines = [json.dumps({"text": text}).encode() for text in documents[:4]]
    # The replacement character takes the place of the invalid bytes, so the record is kept and scored.
    invalid_utf8 = b'{"text": "' + json.dumps(documents[4][:200])[1:-1].encode() + b' \xff\xfe end"}'
    _write_jsonl(root / "wiki" / "part-0.jsonl", good_lines + [invalid_utf8] + [line for line, _ in BAD_LINES])
    (root / "wiki" / "empty.jsonl").write_bytes(b"")
    # The first two documents again, in another source: the same samples at other locations.
    _write_jsonl(root / "mirror" / "copy.jsonl", good_lines[:2])
    long_text = _long_document(shared_data)
    (root / "books").mkdir()
    (root / "books" / "long.txt").write_text(long_text, encoding="utf-8")
    (root / "tables").mkdir()
    pq.write_table(pa.table({"text": [documents[5], None]}), root / "tables" / "part.parquet")
    facts = {"documents": documents, "long_text": long_text,
             "long_uri": (root / "books" / "long.txt").as_uri()}
    return root, facts


def job_config(corpus_uris, proxy_run, tasks_dir, output, **sections) -> dict:
    data = {
        "corpus": {"uris": [str(uri) for uri in corpus_uris], "chunk_num_tokens": CHUNK_TOKENS},
        "checkpoints": {"uris": [str(proxy_run)]},
        "tasks": {"root": str(tasks_dir), "names": ["arc_easy"], "max_influence_examples": 4},
        "evaluation": {"batch_size": 8},
        "influence": {"batch_size": 8},
        "mixture": {"top_k_percent": 50.0},
        "output": {"uri": str(output)},
        # One scoring wave, because each wave starts its own actor pools, which costs more than
        # scoring a corpus this small.
        "ray": {"shards_per_wave": 64},
    }
    for key, value in sections.items():
        section, name = key.split("__")
        data[section][name] = value
    return data


@pytest.fixture(scope="module")
def bad_job(bad_corpus, shared_data, proxy_run, ray_local, tmp_path_factory):
    folder, facts = bad_corpus
    output = tmp_path_factory.mktemp("bad_job") / "out"
    result = run_job(config_from_dict(job_config([folder], proxy_run, shared_data / "tasks", output)))
    influence = pd.concat([pd.read_parquet(path) for path in _influence_files(result)], ignore_index=True)
    return result, influence, facts


def _influence_files(result) -> list[str]:
    """Return the influence table files that the job's manifest lists (paths relative to the output folder)."""
    manifest = read_manifest(result.manifest_uri)
    return [os.path.join(result.output_uri, path) for path in manifest["influence"]["files"]]


def test_bad_records_counted_by_reason(bad_job):
    result, influence, _ = bad_job
    counts = read_manifest(result.manifest_uri)["counts"]
    expected: dict[str, int] = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    # The Parquet row with a null text.
    expected["missing_text_field"] += 1
    for reason, count in expected.items():
        assert counts["skipped"].get(reason) == count, reason
    assert counts["read"] == len(influence)
    assert counts["read"] == counts["scored"] + sum(counts["skipped"].values())


def test_skipped_rows_in_influence_table(bad_job):
    _, influence, _ = bad_job
    skipped = influence[influence.skip_reason.notna()]
    for _, reason in BAD_LINES:
        assert reason in set(skipped.skip_reason), reason
    influence_columns = [name for name in influence.columns if "/" in name]
    assert influence_columns
    assert skipped[influence_columns].isna().all().all()


def test_invalid_utf8_replaced_and_scored(bad_job):
    _, influence, _ = bad_job
    rows = influence[influence.uri.str.endswith("wiki/part-0.jsonl") & (influence.row == 4)]
    assert len(rows) >= 1
    assert rows.skip_reason.isna().all()


def test_empty_file_adds_nothing(bad_job):
    _, influence, _ = bad_job
    assert not influence.uri.str.endswith("empty.jsonl").any()


def test_long_document_chunked_whole(bad_job, proxy_run):
    _, influence, facts = bad_job
    chunks = influence[influence.uri == facts["long_uri"]].sort_values("chunk")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(proxy_run, "checkpoint-000150"))
    n_tokens = len(tokenizer(facts["long_text"], add_special_tokens=False)["input_ids"])
    assert n_tokens > 10 * CHUNK_TOKENS
    assert chunks.n_tokens.sum() == n_tokens
    assert (chunks.n_tokens <= CHUNK_TOKENS).all()
    assert list(chunks.chunk) == list(range(len(chunks)))
    assert chunks.char_start.iloc[0] == 0
    assert chunks.char_end.iloc[-1] == len(facts["long_text"])
    assert list(chunks.char_start.iloc[1:]) == list(chunks.char_end.iloc[:-1])


def test_cross_shard_duplicates_counted(bad_job):
    result, influence, _ = bad_job
    counts = read_manifest(result.manifest_uri)["counts"]
    scored = influence[influence.skip_reason.isna()]
    mirrored = scored[scored.uri.str.endswith("mirror/copy.jsonl")]
    assert len(mirrored) >= 2
    assert set(mirrored.sample_id) <= set(scored[~scored.uri.str.endswith("mirror/copy.jsonl")].sample_id)
    assert counts["duplicates"] == int(scored.sample_id.duplicated().sum())
    assert counts["duplicates"] >= len(mirrored)


def test_duplicates_dropped_on_job_table(bad_job, ray_local, tmp_path):
    """The reduction with duplicates="drop" over the influence table that the job wrote."""
    result, influence, _ = bad_job
    manifest = read_manifest(result.manifest_uri)
    mixture = build_mixture(ray_local.data.read_parquet(_influence_files(result)), selected=manifest["selected"],
                            config=MixtureConfig(top_k_percent=100.0), output_dir=str(tmp_path), duplicates="drop")
    scored = influence[influence.skip_reason.isna()]
    assert mixture.counts["skipped"]["duplicate"] == int(scored.sample_id.duplicated().sum())
    assert mixture.counts["scored"] == scored.sample_id.nunique()
    assert mixture.counts["read"] == mixture.counts["scored"] + sum(mixture.counts["skipped"].values())
    ranked = pq.read_table(tmp_path / mixture.groups[0]["path"]).to_pandas()
    assert ranked.sample_id.is_unique
    assert len(ranked) == scored.sample_id.nunique()


# ---------------------------------------------------------------- errors before any work


def _no_output(path) -> bool:
    return not os.path.exists(path) or not os.listdir(path)


def test_glob_without_matches_fails_first(tmp_path, shared_data, proxy_run):
    output = tmp_path / "out"
    config = config_from_dict(job_config([tmp_path / "nothing" / "*.jsonl"], proxy_run, shared_data / "tasks", output))
    with pytest.raises(CorpusError, match=r"nothing/\*\.jsonl matches no shards"):
        run_job(config)
    assert _no_output(output)


def test_other_jobs_output_rejected(bad_corpus, tmp_path, shared_data, proxy_run):
    folder, _ = bad_corpus
    output = tmp_path / "out"
    output.mkdir()
    (output / "job.yaml").write_text("fingerprint: 0123456789abcdef\n")
    (output / "manifest.json").write_text("{}")
    config = config_from_dict(job_config([folder], proxy_run, shared_data / "tasks", output))
    with pytest.raises(OutputError, match="0123456789abcdef") as error:
        run_job(config)
    assert "--overwrite" in str(error.value)
    assert (output / "job.yaml").read_text() == "fingerprint: 0123456789abcdef\n"
    assert (output / "manifest.json").read_text() == "{}"


def _generic(index: int, **fields) -> dict:
    record = {"id": f"ex-{index}", "context": f"Question {index}:", "choices": [" yes", " no"], "gold": 0}
    record.update(fields)
    return record


@pytest.mark.parametrize(("records", "pattern"), [
    (None, r"custom\.jsonl not found"),
    ([_generic(0), "{broken"], r"custom\.jsonl line 2: invalid JSON"),
    ([_generic(0, gold=5)], r"line 1: gold label 5 is out of range for 2 choices"),
    ([_generic(0, choices=[" only"])], r"line 1: an example needs at least 2 choices"),
    ([_generic(0, choices=[])], r"line 1: an example needs at least 2 choices"),
    ([_generic(0), _generic(0)], r"line 2: example id 'ex-0' repeats line 1"),
], ids=["missing", "malformed", "label_range", "one_choice", "no_choices", "duplicate_id"])
def test_bad_task_file_fails_first(bad_corpus, tmp_path, proxy_run, records, pattern):
    folder, _ = bad_corpus
    task_file = tmp_path / "custom.jsonl"
    if records is not None:
        task_file.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    data = job_config([folder], proxy_run, tmp_path, tmp_path / "out")
    data["tasks"] = {"files": {"custom": str(task_file)}, "max_influence_examples": 4}
    with pytest.raises(TaskError, match=pattern):
        run_job(config_from_dict(data))
    assert _no_output(tmp_path / "out")


def test_task_named_twice_rejected(bad_corpus, tmp_path, shared_data, proxy_run):
    folder, _ = bad_corpus
    data = job_config([folder], proxy_run, shared_data / "tasks", tmp_path / "out")
    data["tasks"]["names"] = ["arc_easy", "piqa", "arc_easy"]
    with pytest.raises(ConfigError, match=r"tasks.names lists \['arc_easy'\] more than once"):
        config_from_dict(data)


def test_pickle_only_checkpoint_fails_first(bad_corpus, tmp_path, shared_data, proxy_run):
    import torch
    from safetensors.torch import load_file

    folder, _ = bad_corpus
    checkpoint = tmp_path / "run" / "checkpoint-000150"
    shutil.copytree(os.path.join(proxy_run, "checkpoint-000150"), checkpoint)
    torch.save(load_file(str(checkpoint / "model.safetensors")), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    config = config_from_dict(job_config([folder], tmp_path / "run", shared_data / "tasks", tmp_path / "out"))
    with pytest.raises(CheckpointError, match="only pickled weights") as error:
        run_job(config)
    assert "checkpoints.allow_pickle" in str(error.value)
    assert _no_output(tmp_path / "out")


def test_damaged_parquet_fails_job(bad_corpus, tmp_path, shared_data, proxy_run, ray_local):
    """A Parquet file cut in half is found when read; the job stops and names it instead of hanging."""
    _, facts = bad_corpus
    damaged = tmp_path / "corpus" / "tables" / "part.parquet"
    damaged.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": facts["documents"][:3]}), damaged)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    config = config_from_dict(job_config([tmp_path / "corpus"], proxy_run, shared_data / "tasks", tmp_path / "out"))
    with pytest.raises(Exception) as error:
        run_job(config)
    assert "part.parquet is damaged or truncated" in str(error.value)
