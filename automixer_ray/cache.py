"""The influence table as a per-shard cache: keys, staged writes and completion markers.

Each corpus shard's influence rows live in ``influence/<shard key>/``. The key hashes everything
the rows depend on: the shard's URI and content fingerprint, how it is read and chunked, which
samples the subsample keeps, and the scoring identity (checkpoint fingerprints, projector, kept
layers, tasks and their gradients' inputs). A shard's folder counts only once its ``_SUCCESS``
marker exists. The marker is written after every row of the shard is in place, so a job killed at
any point leaves complete shards and nothing else that a restart would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

logger = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"
SCORING_STATE = "_SCORING.json"
STAGING = "_staging"


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True, kw_only=True)
class ScoringIdentity:
    """Inputs of every influence row besides its shard; a change here invalidates the cache."""

    checkpoints: dict[str, str]  # artifact checkpoint name -> content fingerprint
    projector: dict[str, str]  # artifact checkpoint name -> projector identity fingerprint
    kept_layers: list[str]
    tasks: list[str]
    task_inputs: dict[str, Any]  # task files, split and evaluation settings behind the task gradients
    reading: dict[str, Any]  # text and source fields, decode policy, chunk size, subsample, metric

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoints": self.checkpoints, "projector": self.projector, "kept_layers": self.kept_layers,
                "tasks": self.tasks, "task_inputs": self.task_inputs, "reading": self.reading}

    def key(self) -> str:
        return _digest(self.to_dict())

    def changes_from(self, previous: dict[str, Any]) -> list[str]:
        """Name each part that differs from ``previous`` (an earlier ``to_dict()``), for the log."""
        current = self.to_dict()
        return [f"{name} changed ({previous.get(name)!r} -> {value!r})"
                for name, value in current.items() if previous.get(name) != value]


def shard_key(shard_uri: str, shard_fingerprint: str, identity_key: str) -> str:
    return _digest({"uri": shard_uri, "fingerprint": shard_fingerprint, "scoring": identity_key})


class InfluenceCache:
    """The ``influence/`` folder of one output: completed shards, staging and the scoring state."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)

    def shard_dir(self, key: str) -> str:
        return f"{self.root}/{key}"

    def refresh_listings(self) -> None:
        """Drop fsspec's cached folder listings: Ray workers write here from other processes."""
        self.fs.invalidate_cache()

    def is_complete(self, key: str) -> bool:
        return self.fs.exists(f"{self.path}/{key}/{SUCCESS_MARKER}")

    def files(self, keys: list[str]) -> list[str]:
        """Return the Parquet files of the given completed shards (shards without rows have none)."""
        self.refresh_listings()
        found = []
        for key in keys:
            for name in sorted(self.fs.ls(f"{self.path}/{key}", detail=False)):
                if name.endswith(".parquet"):
                    found.append(self.fs.unstrip_protocol(name))
        return found

    def check_identity(self, identity: ScoringIdentity) -> None:
        """Compare with the identity of the previous run, log what changed, and record the new one."""
        state_path = f"{self.path}/{SCORING_STATE}"
        if self.fs.exists(state_path):
            with self.fs.open(state_path, "r", encoding="utf-8") as handle:
                previous = json.load(handle)
            changes = identity.changes_from(previous)
            if changes:
                logger.warning("cached influence rows are invalid and will be rescored: %s", "; ".join(changes))
        self.fs.makedirs(self.path, exist_ok=True)
        with self.fs.open(state_path, "w", encoding="utf-8") as handle:
            json.dump(identity.to_dict(), handle, indent=2, sort_keys=True)

    def new_staging(self) -> str:
        return f"{self.root}/{STAGING}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def commit(self, staging: str, key: str, shard_uri: str, num_rows: int) -> None:
        """Move a shard's staged files into place, then write its completion marker."""
        self.refresh_listings()
        target = f"{self.path}/{key}"
        _, staged_path = fsspec.core.url_to_fs(f"{staging}/{key}")
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.makedirs(target, exist_ok=True)
        # Move file by file: a recursive move of a prefix on S3 also tries to copy the "folder"
        # key itself, which does not exist there.
        staged_files = self.fs.find(staged_path) if self.fs.exists(staged_path) else []
        for staged_file in staged_files:
            self.fs.mv(staged_file, f"{target}/{staged_file.rsplit('/', 1)[-1]}")
        marker = {"shard": shard_uri, "rows": num_rows, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self.fs.open(f"{target}/{SUCCESS_MARKER}", "w", encoding="utf-8") as handle:
            json.dump(marker, handle)

    def remove_staging(self, staging: str) -> None:
        _, path = fsspec.core.url_to_fs(staging)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def prune(self, keep: set[str]) -> int:
        """Delete shard folders and staging left by earlier runs that the current corpus no longer uses."""
        self.refresh_listings()
        removed = 0
        if not self.fs.exists(self.path):
            return 0
        for entry in self.fs.ls(self.path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name in keep or name == SCORING_STATE:
                continue
            self.fs.rm(entry, recursive=True)
            removed += 1
        if removed:
            logger.info("removed %d stale entries from %s (shards no longer in the corpus, old scoring or "
                        "unfinished staging)", removed, self.root)
        return removed


def write_staged_rows(table: pa.Table, *, staging: str, keys_by_uri: dict[str, str]) -> pa.Table:
    """Write a block's influence rows into ``staging/<shard key>/``; return rows written per shard.

    File names hash the rows' locations, so a retried task rewrites the same file instead of adding
    a second copy of its rows.
    """
    uris = table.column("uri").to_pylist()
    locations = table.column("location").to_pylist()
    fs, base = fsspec.core.url_to_fs(staging)
    out_keys, out_counts = [], []
    for uri in sorted(set(uris)):
        rows = [i for i, value in enumerate(uris) if value == uri]
        part = table.take(pa.array(rows, type=pa.int64()))
        name = hashlib.sha256("\n".join(locations[i] for i in rows).encode("utf-8")).hexdigest()[:20]
        key = keys_by_uri[uri]
        folder = f"{base}/{key}"
        fs.makedirs(folder, exist_ok=True)
        temp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open(temp, "wb") as handle:
            pq.write_table(part, handle)
        fs.mv(temp, f"{folder}/part-{name}.parquet")
        out_keys.append(key)
        out_counts.append(len(rows))
    return pa.table({"shard_key": pa.array(out_keys, pa.string()), "rows": pa.array(out_counts, pa.int64())})


def count_rows_by_key(tables: list[pa.Table]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in tables:
        for key, rows in zip(table.column("shard_key").to_pylist(), table.column("rows").to_pylist()):
            counts[key] = counts.get(key, 0) + int(rows)
    return counts


def subsample_max_key(fraction: Optional[float]) -> Optional[str]:
    """Return the subsample key threshold that keeps about ``fraction`` of all samples, or None."""
    if fraction is None or fraction >= 1.0:
        return None
    return f"{int(fraction * float(2 ** 64)) - 1:016x}" if fraction > 0 else "0" * 16


# ray.data.read_parquet starts work per file, so on 2 CPUs it took 37 s to read 502 small shard files.
# Eight tasks that each read their share with pyarrow took 2 s. Each task reads this many files.
FILES_PER_READ_TASK = 64
ROWS_PER_INFLUENCE_BLOCK = 100_000


def _read_file_group(batch: pa.Table) -> Iterator[pa.Table]:
    """Read the Parquet files named in ``batch["uri"]``; yield blocks of whole files, each of at least
    ROWS_PER_INFLUENCE_BLOCK rows except the last."""
    pending, rows = [], 0
    for uri in batch.column("uri").to_pylist():
        with fsspec.open(uri, "rb") as handle:
            pending.append(pq.read_table(handle))
        rows += pending[-1].num_rows
        if rows >= ROWS_PER_INFLUENCE_BLOCK:
            yield pa.concat_tables(pending)
            pending, rows = [], 0
    if pending:
        yield pa.concat_tables(pending)


def read_influence(files: list[str]) -> ray.data.Dataset:
    """Open influence Parquet files (local paths or fsspec URIs) as one dataset.

    Going through fsspec means the read uses the same credentials and endpoint settings
    (``AWS_ENDPOINT_URL`` and the like) as every other read and write of the job.
    """
    if not files:
        raise ValueError("no influence files were given; pass the Parquet files of a finished job's influence table")
    num_tasks = math.ceil(len(files) / FILES_PER_READ_TASK)
    listing = ray.data.from_items([{"uri": uri} for uri in files], override_num_blocks=num_tasks)
    return listing.map_batches(_read_file_group, batch_format="pyarrow", batch_size=None)
