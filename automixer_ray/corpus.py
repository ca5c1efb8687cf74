"""Read a raw pretraining corpus: list its shards, read records, give each a stable id and location.

A shard is one file: JSONL (plain, ``.gz`` or ``.zst``), Parquet, or plain text (one document per
file). Every record gets a content id, a source name and a location (file URI and row) so that a
manifest can point back at the raw text. Files are read through fsspec, so local paths and remote
URIs (``s3://...``) work alike. docs/CORPUS.md describes the layout a user brings.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import logging
import random
from array import array
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Optional

import fsspec

logger = logging.getLogger(__name__)

FORMAT_EXTENSIONS = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"),
    "parquet": (".parquet",),
    "text": (".txt", ".md", ".text"),
}
ShardFormat = Literal["jsonl", "parquet", "text"]
DecodeErrors = Literal["replace", "skip"]
_BLOCK_SIZE = 1 << 20


class CorpusError(ValueError):
    """A corpus location that matches no shards, a shard that cannot be read, or a record not found."""


@dataclass(frozen=True, kw_only=True)
class Shard:
    """One corpus file: its full URI, its format and the source name taken from its parent folder."""

    uri: str
    format: ShardFormat
    source: str


def content_id(text: str) -> str:
    """Return 16 hex digits of BLAKE2b over the UTF-8 bytes of ``text``: the id of a document or sample."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def format_from_name(name: str) -> Optional[ShardFormat]:
    """Return the shard format that a file name's extension implies, or None for an unknown extension."""
    lower = name.lower()
    for shard_format, extensions in FORMAT_EXTENSIONS.items():
        if lower.endswith(extensions):
            return shard_format
    return None


def _all_extensions() -> str:
    return ", ".join(ext for exts in FORMAT_EXTENSIONS.values() for ext in exts)


def _is_hidden(path: str) -> bool:
    # Dot files and marker files such as Spark's _SUCCESS are never corpus shards.
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def _source_of(path: str, root: Optional[str] = None) -> str:
    """Name a file's source: the first folder below ``root`` when the user named a folder, else the
    file's parent folder. ``corpus/news/sport/001.txt`` under ``corpus/`` is source ``news``."""
    if root is not None:
        relative = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else ""
        parts = relative.split("/")
        if len(parts) >= 2 and parts[0]:
            return parts[0]
        root_name = root.rstrip("/").rsplit("/", 1)[-1]
        if root_name:
            return root_name
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] else "default"


def _expand_uri(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str], bool, Optional[str]]:
    """Return the file system, the files behind ``uri``, whether ``uri`` named one file directly, and
    the folder that names sources (``uri`` itself when it is a folder, else None)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if glob.has_magic(path):
        files: list[str] = []
        for match in fs.glob(path):
            files.extend(fs.find(match) if fs.isdir(match) else [match])
        return fs, files, False, None
    if fs.isdir(path):
        return fs, fs.find(path), False, path
    if fs.isfile(path):
        return fs, [path], True, None
    raise FileNotFoundError(f"corpus location {uri} not found; pass an existing file, folder or glob")


def list_shards(uris: list[str], *, format: str = "auto") -> list[Shard]:
    """Expand files, folders (recursively) and globs into shards, sorted by URI and deduplicated.

    With ``format="auto"`` the extension picks the reader. A file named directly with an unknown
    extension is an error, and files with unknown extensions inside a folder or glob are skipped and
    counted. With an explicit format every file found is read in that format.
    Hidden files (names starting with "." or "_") inside folders and globs are always skipped.
    """
    if format not in ("auto", *FORMAT_EXTENSIONS):
        raise CorpusError(f"format={format!r} is invalid; allowed values: 'auto', 'jsonl', 'parquet', 'text'")
    if isinstance(uris, str):
        uris = [uris]
    shards: dict[str, Shard] = {}
    for uri in uris:
        fs, files, direct, source_root = _expand_uri(uri)
        skipped: list[str] = []
        found = 0
        for path in files:
            if not direct and _is_hidden(path):
                continue
            shard_format = format if format != "auto" else format_from_name(path)
            if shard_format is None:
                if direct:
                    raise CorpusError(f"corpus file {uri} has an unknown extension; rename it to one of "
                                      f"{_all_extensions()} or pass the format explicitly")
                skipped.append(path)
                continue
            full_uri = fs.unstrip_protocol(path)
            shards[full_uri] = Shard(uri=full_uri, format=shard_format, source=_source_of(path, source_root))
            found += 1
        if skipped:
            logger.info("skipped %d files with unknown extensions under %s (first: %s)", len(skipped), uri, skipped[0])
        if found == 0:
            looked_for = _all_extensions() if format == "auto" else f"any file read as {format}"
            raise CorpusError(f"corpus location {uri} matches no shards; looked for {looked_for}")
    result = [shards[key] for key in sorted(shards)]
    logger.info("listed %d shards from %d locations", len(result), len(uris))
    return result


def shard_fingerprint(shard: Shard) -> str:
    """Return a content fingerprint of the shard's raw bytes.

    Uses the ETag or checksum that the file system reports (object stores do), else a BLAKE2b hash
    of the bytes. Either changes when the content changes.
    """
    fs, path = fsspec.core.url_to_fs(shard.uri)
    info = fs.info(path)
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum", "sha256"):
        value = info.get(key)
        if isinstance(value, str) and value.strip('"'):
            return f"{key.lower()}:{value.strip(chr(34))}"
    digest = hashlib.blake2b(digest_size=16)
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK_SIZE), b""):
            digest.update(block)
    return f"blake2b:{digest.hexdigest()}"


# ----------------------------------------------------------------------------------------------
# Text values: one decode policy for every format, so read_shard and read_record_text agree.


def _decode_bytes(raw: bytes, decode_errors: DecodeErrors) -> tuple[Optional[str], bool]:
    """Decode UTF-8 bytes; return (text, replaced), or (None, False) when the policy skips them."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        if decode_errors == "skip":
            return None, False
        return raw.decode("utf-8", errors="replace"), True


def _clean_text(value: Any, decode_errors: DecodeErrors) -> tuple[str, bool, Optional[str]]:
    """Turn a raw field value into (text, decode_replaced, skip_reason)."""
    if value is None:
        return "", False, "missing_text_field"
    if isinstance(value, (bytes, bytearray, memoryview)):
        text, replaced = _decode_bytes(bytes(value), decode_errors)
        if text is None:
            return "", False, "invalid_utf8"
        value = text
    elif not isinstance(value, str):
        return "", False, "non_string_text"
    else:
        replaced = False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A JSON string can carry lone surrogates ("\ud800"), which are not valid UTF-8.
        if decode_errors == "skip":
            return "", False, "invalid_utf8"
        value = value.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
        replaced = True
    if not value.strip():
        return "", replaced, "empty_text"
    return value, replaced, None


def _make_record(shard: Shard, row: int, text: str, source: str, replaced: bool,
                 skip_reason: Optional[str]) -> dict:
    # A skipped record has no text to hash, so its id hashes its location: distinct and stable.
    doc_id = content_id(text) if skip_reason is None else content_id(f"{shard.uri}#row={row}")
    return {"doc_id": doc_id, "source": source, "uri": shard.uri, "row": row, "text": text,
            "skip_reason": skip_reason, "decode_replaced": replaced}


def _record_source(record: Any, source_field: Optional[str], default: str) -> str:
    if source_field is None or not isinstance(record, dict):
        return default
    value = record.get(source_field)
    if isinstance(value, str) and value:
        return value
    return default


# ----------------------------------------------------------------------------------------------
# Byte streams: decompressed blocks with truncation checks, then lines with their offsets.


def _iter_zstd_blocks(handle) -> Iterator[bytes]:
    """Decompress a (possibly multi-frame) zstd stream, raising EOFError when a frame is cut short."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    obj = decompressor.decompressobj()
    pending = False
    for block in iter(lambda: handle.read(_BLOCK_SIZE), b""):
        while block:
            pending = True
            out = obj.decompress(block)
            if out:
                yield out
            if obj.eof:
                block = obj.unused_data
                obj = decompressor.decompressobj()
                pending = False
            else:
                block = b""
    if pending:
        raise EOFError("zstd stream ended before the end-of-frame marker")


def _iter_blocks(uri: str) -> Iterator[bytes]:
    """Yield the decompressed bytes of a file in blocks; EOFError/OSError on a damaged stream."""
    fs, path = fsspec.core.url_to_fs(uri)
    lower = path.lower()
    with fs.open(path, "rb") as raw:
        if lower.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as handle:
                yield from iter(lambda: handle.read(_BLOCK_SIZE), b"")
        elif lower.endswith(".zst"):
            yield from _iter_zstd_blocks(raw)
        else:
            yield from iter(lambda: raw.read(_BLOCK_SIZE), b"")


def _iter_lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset in the decompressed stream, line without its newline) for each line."""
    buffer = b""
    offset = 0
    for block in _iter_blocks(uri):
        buffer += block
        lines = buffer.split(b"\n")
        buffer = lines.pop()
        for line in lines:
            yield offset, line
            offset += len(line) + 1
    if buffer:
        yield offset, buffer


def _damaged(shard_uri: str, error: Exception) -> CorpusError:
    return CorpusError(f"corpus file {shard_uri} is damaged or truncated ({type(error).__name__}: {error}); "
                       "replace it with a complete copy or remove it from the corpus")


# ----------------------------------------------------------------------------------------------
# Record readers, one per format.


def _parse_json_line(line: bytes, row: int, decode_errors: DecodeErrors) -> tuple[Any, bool, Optional[str]]:
    """Return (parsed object, decode_replaced, skip_reason) for one JSONL line."""
    if row == 0 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    text, replaced = _decode_bytes(line, decode_errors)
    if text is None:
        return None, False, "invalid_utf8"
    try:
        return json.loads(text), replaced, None
    except json.JSONDecodeError:
        return None, replaced, "malformed_json"


def _jsonl_record(shard: Shard, row: int, line: bytes, text_field: str, source_field: Optional[str],
                  decode_errors: DecodeErrors) -> dict:
    obj, line_replaced, reason = _parse_json_line(line, row, decode_errors)
    if reason is None and not isinstance(obj, dict):
        reason = "not_an_object"
    if reason is not None:
        return _make_record(shard, row, "", shard.source, line_replaced, reason)
    if text_field not in obj:
        return _make_record(shard, row, "", _record_source(obj, source_field, shard.source), False,
                            "missing_text_field")
    text, replaced, reason = _clean_text(obj[text_field], decode_errors)
    return _make_record(shard, row, text, _record_source(obj, source_field, shard.source),
                        replaced or line_replaced, reason)


def _read_jsonl(shard: Shard, text_field: str, source_field: Optional[str],
                decode_errors: DecodeErrors) -> Iterator[dict]:
    # A record's row is its 0-based line number, so blank lines leave gaps in the row numbers.
    try:
        for row, (_, line) in enumerate(_iter_lines(shard.uri)):
            if line.strip():
                yield _jsonl_record(shard, row, line, text_field, source_field, decode_errors)
    except (EOFError, OSError) as error:
        raise _damaged(shard.uri, error) from error


def _open_parquet(uri: str):
    import pyarrow
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except (pyarrow.ArrowException, OSError) as error:
        raise _damaged(uri, error) from error


def _read_parquet(shard: Shard, text_field: str, source_field: Optional[str],
                  decode_errors: DecodeErrors) -> Iterator[dict]:
    import pyarrow

    parquet_file = _open_parquet(shard.uri)
    names = set(parquet_file.schema_arrow.names)
    if text_field not in names:
        logger.warning("parquet file %s has no column %r (columns: %s); every row is skipped as "
                       "missing_text_field", shard.uri, text_field, ", ".join(sorted(names)))
    columns = [name for name in (text_field, source_field) if name is not None and name in names]
    row = 0
    try:
        for group in range(parquet_file.metadata.num_row_groups):
            table = parquet_file.read_row_group(group, columns=columns)
            texts = table.column(text_field).to_pylist() if text_field in names else [None] * table.num_rows
            sources = (table.column(source_field).to_pylist() if source_field in names
                       else [None] * table.num_rows)
            for value, source in zip(texts, sources):
                text, replaced, reason = _clean_text(value, decode_errors)
                source = source if isinstance(source, str) and source else shard.source
                yield _make_record(shard, row, text, source, replaced, reason)
                row += 1
    except (pyarrow.ArrowException, OSError) as error:
        raise _damaged(shard.uri, error) from error


def _read_text_file(uri: str, decode_errors: DecodeErrors) -> tuple[str, bool, Optional[str]]:
    try:
        raw = b"".join(_iter_blocks(uri))
    except (EOFError, OSError) as error:
        raise _damaged(uri, error) from error
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return _clean_text(raw, decode_errors)


def read_shard(shard: Shard, *, text_field: str = "text", source_field: Optional[str] = None,
               decode_errors: DecodeErrors = "replace") -> Iterator[dict]:
    """Yield one dict per record of ``shard``; skipped records are yielded too, with a reason.

    Keys: ``doc_id``, ``source``, ``uri``, ``row``, ``text``, ``skip_reason`` and
    ``decode_replaced`` (True when invalid UTF-8 was replaced with U+FFFD). ``doc_id`` is 16 hex
    digits of BLAKE2b over the text, and a skipped record hashes its location instead. ``row`` is the 0-based line
    number in JSONL, the row index in Parquet, and 0 for a plain-text file (one document).
    A damaged file raises :class:`CorpusError` naming it.
    """
    if decode_errors not in ("replace", "skip"):
        raise CorpusError(f"decode_errors={decode_errors!r} is invalid; allowed values: 'replace', 'skip'")
    if shard.format == "jsonl":
        records = _read_jsonl(shard, text_field, source_field, decode_errors)
    elif shard.format == "parquet":
        records = _read_parquet(shard, text_field, source_field, decode_errors)
    elif shard.format == "text":
        text, replaced, reason = _read_text_file(shard.uri, decode_errors)
        records = iter([_make_record(shard, 0, text, shard.source, replaced, reason)])
    else:
        raise CorpusError(f"shard {shard.uri} has format {shard.format!r}; allowed: jsonl, parquet, text")
    count = replaced = 0
    for record in records:
        count += 1
        replaced += bool(record["decode_replaced"])
        yield record
    if count == 0:
        # An empty file loses nothing, but a user who expected data there should hear of it.
        logger.warning("corpus file %s contains no records", shard.uri)
    if replaced:
        logger.warning("corpus file %s: %d of %d records had invalid UTF-8, replaced with U+FFFD "
                       "(corpus.decode_errors=replace; set it to skip to drop such records)",
                       shard.uri, replaced, count)


# ----------------------------------------------------------------------------------------------
# Reading one record back from its location.


@functools.lru_cache(maxsize=16)
def _jsonl_line_offsets(uri: str, version: str) -> array:
    """Return the byte offset of every line of a JSONL file; ``version`` keys the cache to its content."""
    offsets = array("q")
    for offset, _ in _iter_lines(uri):
        offsets.append(offset)
    return offsets


def _file_version(uri: str) -> str:
    fs, path = fsspec.core.url_to_fs(uri)
    info = fs.info(path)
    keys = ("size", "mtime", "LastModified", "ETag", "etag", "created")
    return json.dumps({key: str(info.get(key)) for key in keys}, sort_keys=True)


def _read_jsonl_line(uri: str, row: int) -> bytes:
    offsets = _jsonl_line_offsets(uri, _file_version(uri))
    if not 0 <= row < len(offsets):
        raise CorpusError(f"row {row} not found in {uri}, which has {len(offsets)} lines")
    start = offsets[row]
    end = offsets[row + 1] - 1 if row + 1 < len(offsets) else None
    if not uri.lower().endswith((".gz", ".zst")):
        fs, path = fsspec.core.url_to_fs(uri)
        with fs.open(path, "rb") as handle:
            handle.seek(start)
            line = handle.read(end - start) if end is not None else handle.read()
            return line.rstrip(b"\n")
    # NOTE: a compressed stream cannot seek, so each read decompresses from the start of the file.
    for offset, line in _iter_lines(uri):
        if offset == start:
            return line
    raise CorpusError(f"row {row} not found in {uri}; the file changed while it was read")


def _read_parquet_value(uri: str, row: int, text_field: str) -> Any:
    parquet_file = _open_parquet(uri)
    metadata = parquet_file.metadata
    first = 0
    for group in range(metadata.num_row_groups):
        count = metadata.row_group(group).num_rows
        if first <= row < first + count:
            if text_field not in parquet_file.schema_arrow.names:
                return None
            table = parquet_file.read_row_group(group, columns=[text_field])
            return table.column(text_field)[row - first].as_py()
        first += count
    raise CorpusError(f"row {row} not found in {uri}, which has {metadata.num_rows} rows")


def read_record_text(uri: str, row: int, *, text_field: str = "text", decode_errors: DecodeErrors = "replace",
                     format: str = "auto") -> str:
    """Read one record's text back from its raw location, exactly as :func:`read_shard` returned it.

    Parquet reads only the row group that contains ``row``. JSONL line offsets are cached per file
    (a small LRU keyed by the file's size and modification time or ETag). A record that
    :func:`read_shard` skips raises :class:`CorpusError` with the reason.
    """
    shard_format = format_from_name(uri) if format == "auto" else format
    if shard_format is None:
        raise CorpusError(f"cannot tell the format of {uri} from its extension; pass format='jsonl', "
                          "'parquet' or 'text'")
    if shard_format == "text":
        if row != 0:
            raise CorpusError(f"row {row} not found in {uri}: a plain-text file is one record, row 0")
        text, _, reason = _read_text_file(uri, decode_errors)
    elif shard_format == "parquet":
        text, _, reason = _clean_text(_read_parquet_value(uri, row, text_field), decode_errors)
    else:
        try:
            line = _read_jsonl_line(uri, row)
        except (EOFError, OSError) as error:
            raise _damaged(uri, error) from error
        shard = Shard(uri=uri, format="jsonl", source="")
        record = _jsonl_record(shard, row, line, text_field, None, decode_errors) if line.strip() else None
        text, reason = (record["text"], record["skip_reason"]) if record else ("", "blank_line")
    if reason is not None:
        raise CorpusError(f"record {uri} row {row} has no text to read back ({reason})")
    return text


# ----------------------------------------------------------------------------------------------
# Streams across many shards.


def interleave_by_weight(streams: dict[str, Iterator[Any]], weights: dict[str, float], *,
                         seed: int) -> Iterator[Any]:
    """Yield items from several streams, each time from a stream drawn with probability ∝ its weight.

    An exhausted stream drops out; the others go on until all are exhausted.
    """
    rng = random.Random(seed)
    active = {name: stream for name, stream in streams.items() if weights.get(name, 0) > 0}
    while active:
        names = sorted(active)
        name = rng.choices(names, weights=[weights[n] for n in names])[0]
        try:
            yield next(active[name])
        except StopIteration:
            del active[name]


def shards_by_source(shards: Iterable[Shard]) -> tuple[dict[str, list[Shard]], dict[str, float]]:
    """Group shards by source and weigh each source by the raw bytes of its shards."""
    groups: dict[str, list[Shard]] = defaultdict(list)
    sizes: dict[str, float] = defaultdict(float)
    for shard in shards:
        groups[shard.source].append(shard)
        fs, path = fsspec.core.url_to_fs(shard.uri)
        sizes[shard.source] += float(fs.size(path) or 1)
    return dict(groups), dict(sizes)


def _split_text(text: str, piece_chars: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(start + piece_chars, len(text))
        if end < len(text):
            space = text.rfind(" ", start + piece_chars // 2, end)
            end = space + 1 if space > 0 else end
        yield text[start:end]
        start = end


def _source_texts(shards: list[Shard], text_field: str, piece_chars: int) -> Iterator[str]:
    for shard in shards:
        for record in read_shard(shard, text_field=text_field):
            if record["skip_reason"] is None:
                yield from _split_text(record["text"], piece_chars)


def iter_texts(uris: list[str], *, text_field: str = "text", max_chars: Optional[int] = None,
               seed: int = 0) -> Iterator[str]:
    """Yield the texts of a corpus (skipped records left out) for tokenizer training.

    Texts come in pieces of at most 8,192 characters, cut at spaces where possible, drawn from the sources
    in proportion to their bytes on disk. So a ``max_chars`` cap samples every source and not only
    the first in sorted order. The last piece is cut so that at most ``max_chars`` characters come out.
    """
    groups, sizes = shards_by_source(list_shards(uris))
    streams = {source: _source_texts(shards, text_field, 8192) for source, shards in groups.items()}
    total = 0
    for piece in interleave_by_weight(streams, sizes, seed=seed):
        if max_chars is not None and total + len(piece) >= max_chars:
            if max_chars > total:
                yield piece[: max_chars - total]
            return
        total += len(piece)
        yield piece
