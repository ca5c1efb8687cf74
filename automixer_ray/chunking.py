"""Cut corpus records into samples of at most ``chunk_num_tokens`` tokens, each with its exact text span.

A document is tokenized once, without special tokens. Chunks are consecutive runs of its tokens.
A cut falls only between two pre-tokenizer words where one exists within the chunk (the
tokenizer's ``word_ids``), so for a byte-level BPE tokenizer without a prefix space (the one
``automixer_ray.tokenizer`` trains, and GPT-2's) re-tokenizing ``text[char_start:char_end]``
gives exactly the chunk's ``input_ids``. A single word longer than a chunk is cut between tokens
at a character boundary. There, and for tokenizers that add a prefix space or normalize text,
``input_ids`` stay the tokens of the whole-document tokenization that fall in the span.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from automixer_ray.corpus import content_id

logger = logging.getLogger(__name__)

# The sample-row contract shared by every stage after the corpus (docs/DESIGN.md, "Sample rows").
SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("uri", pa.string()),
    ("row", pa.int64()),
    ("chunk", pa.int32()),
    ("char_start", pa.int64()),
    ("char_end", pa.int64()),
    ("location", pa.string()),
    ("n_tokens", pa.int32()),
    ("input_ids", pa.list_(pa.int32())),
    ("skip_reason", pa.string()),
])
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)


def sample_location(uri: str, row: int, char_start: int, char_end: int) -> str:
    """Return the location string that points a sample back at its raw record and character span."""
    return f"{uri}#row={row}&chars={char_start}-{char_end}"


def _sample_row(record: Mapping[str, Any], chunk: int, char_start: int, char_end: int, text: str,
                input_ids: np.ndarray, skip_reason: Optional[str]) -> dict:
    uri, row = str(record["uri"]), int(record["row"])
    return {
        "sample_id": content_id(text) if text else str(record["doc_id"]),
        "doc_id": str(record["doc_id"]),
        "source": str(record["source"]),
        "uri": uri,
        "row": row,
        "chunk": chunk,
        "char_start": char_start,
        "char_end": char_end,
        "location": sample_location(uri, row, char_start, char_end),
        "n_tokens": int(len(input_ids)),
        "input_ids": input_ids,
        "skip_reason": skip_reason,
    }


def chunk_boundaries(text: str, offsets: Sequence[tuple[int, int]], word_ids: Sequence[Optional[int]],
                     chunk_num_tokens: int) -> list[tuple[int, int]]:
    """Return [start, end) token ranges of at most ``chunk_num_tokens`` that cover every token once.

    Each cut moves back to the nearest safe word boundary inside the chunk, or failing that to the
    nearest character boundary (a multi-byte character split across byte tokens is never cut).
    If no such boundary exists, the cut stays at ``chunk_num_tokens`` tokens.
    """
    if chunk_num_tokens < 1:
        raise ValueError(f"chunk_num_tokens={chunk_num_tokens} is invalid; it must be at least 1")
    num_tokens = len(offsets)
    ranges = []
    start = 0
    while start < num_tokens:
        end = min(start + chunk_num_tokens, num_tokens)
        if end < num_tokens:
            end = _best_cut(text, offsets, word_ids, start, end)
        ranges.append((start, end))
        start = end
    return ranges


def _is_word_cut(text: str, offsets, word_ids, cut: int) -> bool:
    if word_ids[cut] is not None and word_ids[cut] == word_ids[cut - 1]:
        return False
    # GPT-2's pre-tokenizer splits "\r\n" + "x" into "\r", "\n", "x" only because a letter follows
    # (the lookahead in \s+(?!\S)). Cut there, and the chunk's trailing run would become one word.
    position = offsets[cut][0]
    return not (0 < position < len(text) and text[position - 1].isspace() and not text[position].isspace())


def _best_cut(text: str, offsets, word_ids, start: int, end: int) -> int:
    for cut in range(end, start, -1):
        if _is_word_cut(text, offsets, word_ids, cut):
            return cut
    for cut in range(end, start, -1):
        if offsets[cut][0] >= offsets[cut - 1][1]:
            return cut
    return end


def chunk_encoding(record: Mapping[str, Any], input_ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                   word_ids: Sequence[Optional[int]], chunk_num_tokens: int) -> list[dict]:
    """Build the sample rows of one tokenized record (see :func:`chunk_document`)."""
    text = record["text"]
    ids = np.asarray(input_ids, dtype=np.int32)
    rows = []
    for index, (start, end) in enumerate(chunk_boundaries(text, offsets, word_ids, chunk_num_tokens)):
        char_start, char_end = int(offsets[start][0]), int(offsets[end - 1][1])
        chunk_ids = ids[start:end]
        # A 1-token chunk has no next-token target, so it cannot be scored; it is kept and counted.
        reason = "too_short" if len(chunk_ids) < 2 else None
        rows.append(_sample_row(record, index, char_start, char_end, text[char_start:char_end], chunk_ids, reason))
    if not rows:
        rows.append(_skipped_row(record, "empty_text"))
    return rows


def _skipped_row(record: Mapping[str, Any], reason: str) -> dict:
    return _sample_row(record, 0, 0, 0, "", np.zeros(0, dtype=np.int32), reason)


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; chunking needs "
                         "offset mappings, so load it with AutoTokenizer.from_pretrained(path, use_fast=True)")


def chunk_documents(records: Sequence[Mapping[str, Any]], tokenizer, chunk_num_tokens: int) -> list[dict]:
    """Chunk many records with one batched tokenizer call; rows come out in record order."""
    _check_tokenizer(tokenizer)
    live = [i for i, record in enumerate(records) if not record.get("skip_reason")]
    encodings = {}
    if live:
        batch = tokenizer([records[i]["text"] for i in live], add_special_tokens=False,
                          return_offsets_mapping=True, return_attention_mask=False, verbose=False)
        for position, i in enumerate(live):
            encodings[i] = (batch["input_ids"][position], batch["offset_mapping"][position],
                            batch.word_ids(position))
    rows: list[dict] = []
    for i, record in enumerate(records):
        if i in encodings:
            rows.extend(chunk_encoding(record, *encodings[i], chunk_num_tokens))
        else:
            rows.append(_skipped_row(record, str(record["skip_reason"])))
    return rows


def chunk_document(record: Mapping[str, Any], tokenizer, chunk_num_tokens: int) -> list[dict]:
    """Cut one record (a dict from ``corpus.read_shard``) into sample rows.

    Each row has exactly the sample columns: ``sample_id`` (16 hex digits of BLAKE2b over the
    chunk text), ``doc_id``, ``source``, ``uri``, ``row``, ``chunk``, ``char_start``/``char_end``
    (the chunk's span in the record text), ``location``, ``n_tokens``, ``input_ids`` (np.int32) and
    ``skip_reason``. A skipped record becomes one row with no tokens and its reason. A 1-token
    chunk keeps its token and gets ``too_short``.
    """
    return chunk_documents([record], tokenizer, chunk_num_tokens)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Pack sample rows into an Arrow table with :data:`SAMPLE_SCHEMA`."""
    columns = {name: [row[name] for row in rows] for name in SAMPLE_COLUMNS}
    columns["input_ids"] = pa.array([np.asarray(ids, dtype=np.int32) for ids in columns["input_ids"]],
                                    type=pa.list_(pa.int32()))
    return pa.Table.from_pydict(columns, schema=SAMPLE_SCHEMA)


def _batch_records(batch: Any) -> list[dict]:
    """Turn a Ray Data batch (dict of numpy columns, pyarrow Table or pandas DataFrame) into records."""
    if isinstance(batch, pa.Table):
        columns = batch.to_pydict()
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        columns = {name: list(batch[name]) for name in batch.columns}
    else:
        columns = {name: list(values) for name, values in batch.items()}
    count = len(next(iter(columns.values()), []))
    records = []
    for i in range(count):
        record = {name: values[i] for name, values in columns.items()}
        reason = record.get("skip_reason")
        record["skip_reason"] = reason if isinstance(reason, str) and reason else None
        records.append(record)
    return records


class ChunkAndTokenize:
    """Callable for Ray Data ``map_batches``: record batches in, sample batches (Arrow tables) out.

    The tokenizer loads once per worker, and each batch is tokenized in one call. Use it with
    ``dataset.map_batches(ChunkAndTokenize, fn_constructor_kwargs={...}, concurrency=N)``.
    """

    def __init__(self, tokenizer_path: str, chunk_num_tokens: int) -> None:
        from transformers import AutoTokenizer

        if chunk_num_tokens < 2:
            raise ValueError(f"chunk_num_tokens={chunk_num_tokens} is invalid; a sample needs at least 2 "
                             "tokens to have a next-token target")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, use_fast=True)
        _check_tokenizer(self.tokenizer)
        self.chunk_num_tokens = chunk_num_tokens

    def __call__(self, batch: Any) -> pa.Table:
        records = _batch_records(batch)
        return rows_to_table(chunk_documents(records, self.tokenizer, self.chunk_num_tokens))
