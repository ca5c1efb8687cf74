"""Corpus reading on the real corpus folders and on files written from real corpus text."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from automixer_ray.corpus import (
    CorpusError,
    Shard,
    content_id,
    iter_texts,
    list_shards,
    read_record_text,
    read_shard,
    shard_fingerprint,
)

NEWS_SOURCES = {"business", "entertainment", "politics", "sport", "tech"}


@pytest.fixture(scope="module")
def corpus_dir(shared_data) -> Path:
    return shared_data / "corpus"


@pytest.fixture(scope="module")
def news_texts(corpus_dir) -> list[str]:
    paths = sorted((corpus_dir / "news" / "tech").glob("*.txt"))[:20]
    return [path.read_text(encoding="utf-8") for path in paths]


def _only(shards: list[Shard], suffix: str) -> Shard:
    matches = [shard for shard in shards if shard.uri.endswith(suffix)]
    assert len(matches) == 1, f"expected one shard ending in {suffix}, found {len(matches)}"
    return matches[0]


def test_list_shards_real_corpus(corpus_dir):
    shards = list_shards([str(corpus_dir)])
    formats = Counter(shard.format for shard in shards)
    assert formats == {"text": 16 + 1 + 2225, "parquet": 1, "jsonl": 2}
    uris = [shard.uri for shard in shards]
    assert uris == sorted(uris)
    assert len(set(uris)) == len(uris)
    assert all(uri.startswith("file:///") for uri in uris)
    sources = {shard.source for shard in shards}
    assert sources == {"books", "news", "shakespeare", "stackexchange", "wikitext"}


def test_source_is_parent_folder_without_corpus_root(corpus_dir):
    shards = list_shards([str(corpus_dir / "news" / "*" / "00*.txt")])
    assert {shard.source for shard in shards} == NEWS_SOURCES
    named_folder = list_shards([str(corpus_dir / "news" / "sport")])
    assert {shard.source for shard in named_folder} == {"sport"}


def test_list_shards_dedups_overlap(corpus_dir):
    shards = list_shards([str(corpus_dir / "wikitext"), str(corpus_dir / "wikitext" / "*.jsonl.gz"),
                          f"file://{corpus_dir}/wikitext/wikitext2-test.jsonl.gz"])
    assert [Path(shard.uri).name for shard in shards] == ["wikitext2-test.jsonl.gz", "wikitext2-valid.jsonl.gz"]


def test_list_shards_no_match_names_uri(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(CorpusError) as error:
        list_shards([pattern])
    assert pattern in str(error.value)
    assert ".parquet" in str(error.value)


def test_list_shards_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_shards([str(tmp_path / "nowhere")])


def test_list_shards_skips_unknown_extensions(tmp_path, corpus_dir):
    folder = tmp_path / "mixed"
    (folder / "deep").mkdir(parents=True)
    shutil.copy(corpus_dir / "news" / "tech" / "001.txt", folder / "deep" / "a.txt")
    (folder / "notes.csv").write_text("a,b\n")
    (folder / ".hidden.txt").write_text("hidden")
    shards = list_shards([str(folder)])
    assert [Path(shard.uri).name for shard in shards] == ["a.txt"]
    assert shards[0].source == "deep"


def test_list_shards_direct_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="unknown extension"):
        list_shards([str(path)])
    assert list_shards([str(path)], format="text")[0].format == "text"


def test_read_wikitext_jsonl_gz(corpus_dir):
    shards = list_shards([str(corpus_dir / "wikitext")])
    records = [record for shard in shards for record in read_shard(shard)]
    assert len(records) == 122
    assert all(record["skip_reason"] is None for record in records)
    assert all(record["source"] == "wikitext" for record in records)
    with gzip.open(corpus_dir / "wikitext" / "wikitext2-test.jsonl.gz", "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())["text"]
    test_records = [r for r in records if r["uri"].endswith("wikitext2-test.jsonl.gz")]
    assert test_records[0]["row"] == 0
    assert test_records[0]["text"] == first
    assert test_records[0]["doc_id"] == hashlib.blake2b(first.encode(), digest_size=8).hexdigest()


def test_read_parquet_real(corpus_dir):
    shard = list_shards([str(corpus_dir / "stackexchange")])[0]
    records = list(read_shard(shard))
    table = pq.read_table(corpus_dir / "stackexchange" / "cardano-posts.parquet")
    assert len(records) == table.num_rows
    assert [record["row"] for record in records] == list(range(table.num_rows))
    texts = table.column("text").to_pylist()
    empty = sum(1 for text in texts if not (text or "").strip())
    assert Counter(record["skip_reason"] for record in records) == {None: len(texts) - empty, "empty_text": empty}
    for row in (0, 17, table.num_rows - 1):
        if records[row]["skip_reason"] is None:
            assert read_record_text(shard.uri, row) == texts[row]


def test_parquet_source_field_and_row_groups(tmp_path, news_texts):
    path = tmp_path / "multi.parquet"
    sources = [f"kind{i % 3}" for i in range(len(news_texts))]
    pq.write_table(pa.table({"body": news_texts, "origin": sources}), path, row_group_size=6)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    shard = list_shards([str(path)])[0]
    records = list(read_shard(shard, text_field="body", source_field="origin"))
    assert [record["source"] for record in records] == sources
    assert [record["text"] for record in records] == news_texts
    assert read_record_text(shard.uri, 19, text_field="body") == news_texts[19]
    with pytest.raises(CorpusError, match="row 20 not found"):
        read_record_text(shard.uri, 20, text_field="body")


def test_parquet_missing_column_skips_rows(tmp_path, news_texts):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": news_texts[:3]}), path)
    records = list(read_shard(list_shards([str(path)])[0]))
    assert [record["skip_reason"] for record in records] == ["missing_text_field"] * 3


def _hard_jsonl_lines(news_texts: list[str]) -> list[bytes]:
    """Real records plus one of each malformed case, as raw JSONL lines (row = index)."""
    good = [json.dumps({"text": text, "source": "wire"}).encode() for text in news_texts[:3]]
    return good + [
        b"",  # blank line: no record, but it keeps its line number
        b'{"text": "unterminated',
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   \n"}).encode(),
        b'{"text": "caf\xe9 latin-1 byte"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"[1, 2, 3]",
        json.dumps({"text": news_texts[3]}).encode(),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_formats_and_skip_reasons(tmp_path, news_texts, suffix):
    payload = b"\n".join(_hard_jsonl_lines(news_texts)) + b"\n"
    path = tmp_path / ("wire" + suffix)
    if suffix == ".jsonl.gz":
        payload = gzip.compress(payload)
    elif suffix == ".jsonl.zst":
        payload = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(payload)
    shard = list_shards([str(path)])[0]
    assert shard.format == "jsonl"

    records = list(read_shard(shard, source_field="source"))
    rows = [record["row"] for record in records]
    assert rows == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    reasons = [record["skip_reason"] for record in records]
    assert reasons == [None, None, None, "malformed_json", "missing_text_field", "non_string_text",
                       "empty_text", None, None, "not_an_object", None]
    assert [record["source"] for record in records[:3]] == ["wire"] * 3
    assert records[-1]["source"] == tmp_path.name
    assert records[7]["decode_replaced"] is True
    assert records[7]["text"] == "caf\ufffd latin-1 byte"
    assert records[8]["decode_replaced"] is True
    assert "\ud800" not in records[8]["text"]
    assert [record["text"] for record in records[:3]] == news_texts[:3]
    assert records[0]["doc_id"] == content_id(news_texts[0])
    for record in records:
        if record["skip_reason"] is None:
            assert read_record_text(shard.uri, record["row"]) == record["text"]

    skipped = list(read_shard(shard, decode_errors="skip"))
    assert skipped[7]["skip_reason"] == "invalid_utf8"
    assert skipped[8]["skip_reason"] == "invalid_utf8"
    with pytest.raises(CorpusError, match="invalid_utf8"):
        read_record_text(shard.uri, 9, decode_errors="skip")


def test_ids_are_content_based_across_formats(tmp_path, news_texts, corpus_dir):
    source = corpus_dir / "news" / "tech" / "001.txt"
    text = source.read_text(encoding="utf-8")
    (tmp_path / "copy.jsonl").write_text(json.dumps({"text": text}) + "\n")
    pq.write_table(pa.table({"text": [text]}), tmp_path / "copy.parquet")
    shutil.copy(source, tmp_path / "copy.txt")
    ids = {shard.format: next(read_shard(shard))["doc_id"] for shard in list_shards([str(tmp_path)])}
    assert set(ids) == {"jsonl", "parquet", "text"}
    assert set(ids.values()) == {content_id(text)}


def test_latin1_news_file_decode_policy(corpus_dir):
    shard = _only(list_shards([str(corpus_dir / "news" / "sport")]), "sport/199.txt")
    replaced = next(read_shard(shard))
    assert replaced["skip_reason"] is None
    assert replaced["decode_replaced"] is True
    assert "\ufffd" in replaced["text"]
    raw = (corpus_dir / "news" / "sport" / "199.txt").read_bytes()
    assert replaced["text"] == raw.decode("utf-8", errors="replace")
    assert read_record_text(shard.uri, 0) == replaced["text"]
    skipped = next(read_shard(shard, decode_errors="skip"))
    assert skipped["skip_reason"] == "invalid_utf8"
    assert skipped["text"] == ""


def test_text_file_round_trip(corpus_dir):
    shard = list_shards([str(corpus_dir / "shakespeare")])[0]
    records = list(read_shard(shard))
    assert len(records) == 1
    assert records[0]["row"] == 0
    assert records[0]["source"] == "shakespeare"
    assert read_record_text(shard.uri, 0) == records[0]["text"]
    with pytest.raises(CorpusError, match="row 0"):
        read_record_text(shard.uri, 1)


def test_truncated_gzip_raises(tmp_path, corpus_dir):
    data = (corpus_dir / "wikitext" / "wikitext2-valid.jsonl.gz").read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="cut.jsonl.gz"):
        list(read_shard(list_shards([str(path)])[0]))


def test_truncated_zstd_raises(tmp_path, news_texts):
    payload = "\n".join(json.dumps({"text": text}) for text in news_texts).encode()
    data = zstandard.ZstdCompressor().compress(payload)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="cut.jsonl.zst"):
        list(read_shard(list_shards([str(path)])[0]))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_parquet_raises(tmp_path, corpus_dir, damage):
    data = (corpus_dir / "stackexchange" / "cardano-posts.parquet").read_bytes()
    path = tmp_path / "bad.parquet"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a parquet file" * 100)
    with pytest.raises(CorpusError, match="bad.parquet"):
        list(read_shard(list_shards([str(path)])[0]))


def test_fingerprint_follows_content(tmp_path, news_texts):
    path = tmp_path / "doc.txt"
    path.write_text(news_texts[0])
    shard = list_shards([str(path)])[0]
    before = shard_fingerprint(shard)
    assert shard_fingerprint(shard) == before
    path.write_text(news_texts[1])
    assert shard_fingerprint(shard) != before


def test_read_record_text_cache_sees_changes(tmp_path, news_texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": text}) for text in news_texts[:3]) + "\n")
    uri = list_shards([str(path)])[0].uri
    assert read_record_text(uri, 1) == news_texts[1]
    path.write_text("\n".join(json.dumps({"text": text}) for text in news_texts[5:12]) + "\n")
    assert read_record_text(uri, 6) == news_texts[11]


def test_iter_texts_cap_samples_every_source(corpus_dir):
    pieces = list(iter_texts([str(corpus_dir)], max_chars=300_000, seed=0))
    assert sum(len(piece) for piece in pieces) == 300_000
    assert all(len(piece) <= 8192 for piece in pieces)
    assert pieces == list(iter_texts([str(corpus_dir)], max_chars=300_000, seed=0))
    joined = "\n".join(pieces)
    # Sorted order would give books only; each marker below belongs to one other source.
    assert "Gutenberg" in joined
    assert "Cardano" in joined
    assert "<unk>" in joined
    assert "Citizen" in joined
