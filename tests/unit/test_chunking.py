"""Chunking real corpus documents with the real byte-level BPE tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from automixer_ray.chunking import (
    SAMPLE_COLUMNS,
    SAMPLE_SCHEMA,
    ChunkAndTokenize,
    chunk_document,
    chunk_documents,
    rows_to_table,
)
from automixer_ray.corpus import content_id, list_shards, read_record_text, read_shard

LOCATION = re.compile(r"^(?P<uri>.+)#row=(?P<row>\d+)&chars=(?P<start>\d+)-(?P<end>\d+)$")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def records(shared_data) -> list[dict]:
    """Real records of every format, a long book, the Latin-1 file and the Parquet empty rows."""
    corpus = shared_data / "corpus"
    uris = [str(corpus / "wikitext"), str(corpus / "stackexchange"), str(corpus / "news" / "sport"),
            str(corpus / "books" / "the_raven.txt"), str(corpus / "books" / "a_modest_proposal.txt")]
    records = [record for shard in list_shards(uris) for record in read_shard(shard)]
    # A slice of each source keeps the per-chunk re-tokenization checks fast.
    quota = {"wikitext": 8, "stackexchange": 200, "sport": 60, "books": 2}
    kept: list[dict] = []
    for record in records:
        if quota[record["source"]] > 0 or record["uri"].endswith("sport/199.txt"):
            quota[record["source"]] -= 1
            kept.append(record)
    return kept


def _check_rows_against_record(rows: list[dict], record: dict, tokenizer, chunk_num_tokens: int) -> None:
    text = record["text"]
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert np.concatenate([row["input_ids"] for row in rows]).tolist() == whole
    assert rows[0]["char_start"] == 0
    assert rows[-1]["char_end"] == len(text)
    for index, row in enumerate(rows):
        assert row["chunk"] == index
        assert 1 <= row["n_tokens"] <= chunk_num_tokens
        assert row["n_tokens"] == len(row["input_ids"])
        assert row["input_ids"].dtype == np.int32
        span = text[row["char_start"]:row["char_end"]]
        assert tokenizer(span, add_special_tokens=False)["input_ids"] == row["input_ids"].tolist()
        assert row["sample_id"] == content_id(span)
        assert row["doc_id"] == record["doc_id"]
        if index > 0:
            assert row["char_start"] == rows[index - 1]["char_end"]


def test_chunk_long_book_exact_spans(records, tokenizer):
    book = next(r for r in records if r["uri"].endswith("a_modest_proposal.txt"))
    rows = chunk_document(book, tokenizer, 64)
    assert len(rows) > 50
    assert all(row["skip_reason"] is None for row in rows)
    _check_rows_against_record(rows, book, tokenizer, 64)


@pytest.mark.parametrize("chunk_num_tokens", [5, 128])
def test_chunk_every_record_no_loss(records, tokenizer, chunk_num_tokens):
    rows = chunk_documents(records, tokenizer, chunk_num_tokens)
    assert {(row["uri"], row["row"]) for row in rows} == {(r["uri"], r["row"]) for r in records}
    by_record: dict[tuple, list[dict]] = {}
    for row in rows:
        by_record.setdefault((row["uri"], row["row"]), []).append(row)
    for record in records:
        record_rows = by_record[(record["uri"], record["row"])]
        if record["skip_reason"] is not None:
            assert len(record_rows) == 1
            assert record_rows[0]["skip_reason"] == record["skip_reason"]
            assert record_rows[0]["n_tokens"] == 0
            assert len(record_rows[0]["input_ids"]) == 0
        else:
            _check_rows_against_record(record_rows, record, tokenizer, chunk_num_tokens)


def test_rows_have_exact_columns_and_locations(records, tokenizer):
    record = next(r for r in records if r["uri"].endswith("wikitext2-test.jsonl.gz") and r["row"] == 3)
    rows = chunk_document(record, tokenizer, 128)
    assert len(rows) > 1
    for row in rows:
        assert tuple(row) == SAMPLE_COLUMNS
        match = LOCATION.match(row["location"])
        assert match is not None
        assert match["uri"] == record["uri"]
        text = read_record_text(match["uri"], int(match["row"]))
        assert text[int(match["start"]):int(match["end"])] == text[row["char_start"]:row["char_end"]]
        assert (int(match["start"]), int(match["end"])) == (row["char_start"], row["char_end"])


def test_latin1_record_chunks(records, tokenizer):
    record = next(r for r in records if r["uri"].endswith("sport/199.txt"))
    assert "\ufffd" in record["text"]
    rows = chunk_document(record, tokenizer, 16)
    _check_rows_against_record(rows, record, tokenizer, 16)


def test_multibyte_characters_never_split(tokenizer, records):
    base = next(r for r in records if r["skip_reason"] is None)
    text = "Zoë’s café — naïve “quotes” 東京 🙂🙂🙂 résumé. " * 5
    record = dict(base, text=text, doc_id=content_id(text))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    # 4 tokens fit the longest UTF-8 character, so no cut falls inside one. Words longer than
    # the chunk are cut between characters, where re-tokenizing the span may merge differently.
    rows = chunk_document(record, tokenizer, 4)
    assert np.concatenate([row["input_ids"] for row in rows]).tolist() == whole
    assert "".join(text[row["char_start"]:row["char_end"]] for row in rows) == text
    assert max(row["n_tokens"] for row in rows) <= 4
    _check_rows_against_record(chunk_document(record, tokenizer, 16), record, tokenizer, 16)


def test_trailing_single_token_is_too_short(tokenizer, records):
    base = next(r for r in records if r["skip_reason"] is None)
    text = "The cat sat on the mat."
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    record = dict(base, text=text, doc_id=content_id(text))
    rows = chunk_document(record, tokenizer, count - 1)
    assert len(rows) == 2
    assert rows[0]["skip_reason"] is None
    assert rows[1]["skip_reason"] == "too_short"
    assert rows[1]["n_tokens"] == 1
    assert text[rows[1]["char_start"]:rows[1]["char_end"]] == "."


def test_rows_to_table_schema(records, tokenizer):
    rows = chunk_documents(records[:40], tokenizer, 128)
    table = rows_to_table(rows)
    assert table.schema == SAMPLE_SCHEMA
    assert table.num_rows == len(rows)
    assert table.column("input_ids")[0].as_py() == rows[0]["input_ids"].tolist()


def test_chunk_and_tokenize_numpy_batch(records, tokenizer, tokenizer_dir):
    subset = records[:30]
    batch = {name: np.array([r[name] for r in subset], dtype=object) for name in subset[0]}
    table = ChunkAndTokenize(tokenizer_dir, 128)(batch)
    expected = rows_to_table(chunk_documents(subset, tokenizer, 128))
    assert table.equals(expected)


def test_chunk_and_tokenize_rejects_tiny_chunks(tokenizer_dir):
    with pytest.raises(ValueError, match="chunk_num_tokens=1"):
        ChunkAndTokenize(tokenizer_dir, 1)


def test_chunk_and_tokenize_in_ray_data(ray_local, records, tokenizer, tokenizer_dir):
    subset = [r for r in records if "stackexchange" in r["uri"]][:200]
    dataset = ray_local.data.from_items(subset).map_batches(
        ChunkAndTokenize, fn_constructor_kwargs={"tokenizer_path": tokenizer_dir, "chunk_num_tokens": 64},
        batch_size=50, concurrency=1)
    table = pa.concat_tables(ray_local.get(dataset.to_arrow_refs())).sort_by([("uri", "ascending"), ("row", "ascending"),
                                                           ("chunk", "ascending")])
    expected = rows_to_table(chunk_documents(subset, tokenizer, 64))
    assert table.num_rows == expected.num_rows
    assert table.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
    assert table.column("input_ids").to_pylist() == expected.column("input_ids").to_pylist()
    assert table.column("skip_reason").to_pylist() == expected.column("skip_reason").to_pylist()
