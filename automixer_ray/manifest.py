"""The manifest contract (step 8 of AutoMixer): what a mixture job hands to training data loaders.

AutoMixer (Chang et al., "AutoMixer: Checkpoint Artifacts as Automatic Data Mixers", ACL 2025,
arXiv 2506.21910) ends with a data mixture: task-aligned groups of raw corpus samples and one
sampling weight per group. ``manifest.json`` records that mixture together with everything that
produced it (config and fingerprint, checkpoints, capability matrix and selections, kept layers,
projector, sample counts), so that a loader can follow it and a reader can audit it.
docs/MANIFEST.md describes every key.

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed and fsynced,
and ``os.replace`` moves them into place, so a reader sees the old manifest or the new one and
never a partial file. On object stores (any non-local fsspec URI) the manifest is written to a
temporary key and then moved, which relies on the store's single PUT being atomic.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import json
import logging
import math
import os
import posixpath
import tempfile
import uuid
from typing import Any, BinaryIO, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Top-level keys every manifest has; docs/MANIFEST.md documents each one.
REQUIRED_KEYS = (
    "format_version", "config_fingerprint", "config", "checkpoints", "capability", "selected",
    "layers", "projector", "counts", "groups", "created_at",
)
CHECKPOINT_KEYS = ("name", "path", "step", "fingerprint")
LAYER_KEYS = ("name", "score", "kept")
GROUP_KEYS = ("name", "checkpoint", "tasks", "weight", "n_samples", "n_tokens", "epochs", "path")
# Group weights are normalised shares, so their sum differs from 1 by float rounding only.
WEIGHT_SUM_TOLERANCE = 1e-6


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or breaks the contract in docs/MANIFEST.md."""


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the folder entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[BinaryIO]:
    """Open ``uri`` for binary writing so that it appears whole or not at all.

    Local files: a temporary file in the same folder, fsync, ``os.replace``. Other fsspec URIs:
    a temporary key beside the target, then ``fs.mv``. If the body raises, the temporary file is
    removed and an existing file at ``uri`` stays untouched.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    parent, name = posixpath.split(path)
    if _is_local(fs):
        os.makedirs(parent or ".", exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=parent or ".", prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise
        _fsync_dir(parent or ".")
        return

    tmp_path = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open(tmp_path, "wb") as handle:
            yield handle
        fs.mv(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(tmp_path):
                fs.rm(tmp_path)
        raise


def join_uri(base: str, relative: str) -> str:
    """Join a relative path onto a folder path or URI with "/" (fsspec URIs use "/" everywhere)."""
    return base.rstrip("/") + "/" + relative.lstrip("/")


def manifest_folder(manifest_uri: str) -> str:
    """Return the folder that contains ``manifest_uri``, which group file paths are relative to."""
    return manifest_uri.rstrip("/").rsplit("/", 1)[0] if "/" in manifest_uri else "."


def group_file_uri(manifest_uri: str, group: dict[str, Any]) -> str:
    """Return the full URI of a group's Parquet file from its manifest-relative ``path``."""
    return join_uri(manifest_folder(manifest_uri), group["path"])


def write_manifest(output_dir: str, manifest: dict[str, Any]) -> str:
    """Validate ``manifest`` and write it atomically as ``output_dir/manifest.json``; return its URI."""
    validate_manifest(manifest)
    uri = join_uri(output_dir, MANIFEST_NAME)
    # json.dump writes in pieces, so a value that fails to encode (NaN, an unknown type) fails
    # mid-write. The temporary file then goes away and the previous manifest stays in place.
    with atomic_output(uri) as handle:
        writer = codecs.getwriter("utf-8")(handle)
        json.dump(manifest, writer, indent=2, allow_nan=False, ensure_ascii=False)
        writer.write("\n")
    logger.info("wrote manifest %s: %d group(s), %d sample(s) read", uri, len(manifest["groups"]),
                manifest["counts"]["read"])
    return uri


def resolve_manifest_uri(uri: str) -> str:
    """Return ``uri`` itself, or ``uri/manifest.json`` when ``uri`` is a folder."""
    fs, path = fsspec.core.url_to_fs(uri)
    return join_uri(uri, MANIFEST_NAME) if fs.isdir(path) else uri


def read_manifest(uri: str) -> dict[str, Any]:
    """Read and validate a manifest from a ``manifest.json`` URI or from the folder that contains it."""
    uri = resolve_manifest_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError as error:
        raise ManifestError(f"manifest {uri} not found; pass the manifest.json a mixture job wrote "
                            "or the folder that contains it") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"manifest {uri} is not valid UTF-8 JSON: {error}") from error
    try:
        validate_manifest(manifest)
    except ManifestError as error:
        raise ManifestError(f"manifest {uri} is invalid: {error}") from error
    return manifest


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entries(key: str, entries: Any, fields: tuple[str, ...]) -> None:
    _require(isinstance(entries, list), f"{key} must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        _require(isinstance(entry, dict), f"{key}[{i}] must be a mapping, got {type(entry).__name__}")
        missing = [name for name in fields if name not in entry]
        _require(not missing, f"{key}[{i}] is missing {', '.join(missing)}; each entry needs {', '.join(fields)}")


def _check_version(manifest: dict[str, Any]) -> None:
    version = manifest.get("format_version")
    _require(isinstance(version, int) and not isinstance(version, bool),
             f"format_version={version!r} is invalid; expected the integer {FORMAT_VERSION}")
    _require(version <= FORMAT_VERSION,
             f"format_version={version} is newer than this reader ({FORMAT_VERSION}); upgrade automixer-ray")
    _require(version == FORMAT_VERSION,
             f"format_version={version} is no longer supported (this reader reads {FORMAT_VERSION}); "
             "rerun the mixture job to write a current manifest")


def _check_checkpoints(manifest: dict[str, Any]) -> set[str]:
    checkpoints = manifest["checkpoints"]
    _check_entries("checkpoints", checkpoints, CHECKPOINT_KEYS)
    names = [entry["name"] for entry in checkpoints]
    _require(all(isinstance(name, str) and name for name in names), f"checkpoints have an empty or non-string name: {names}")
    _require(len(set(names)) == len(names), f"checkpoints list a name twice: {names}")
    for entry in checkpoints:
        _require(_is_count(entry["step"]), f"checkpoint {entry['name']} has step={entry['step']!r}; expected an integer >= 0")
    return set(names)


def _check_capability(manifest: dict[str, Any]) -> None:
    capability = manifest["capability"]
    _require(isinstance(capability, dict) and "metric" in capability and "matrix" in capability,
             "capability must be a mapping with metric and matrix")
    matrix = capability["matrix"]
    if isinstance(matrix, list):
        for i, record in enumerate(matrix):
            _require(isinstance(record, dict) and "checkpoint" in record and "task" in record,
                     f"capability.matrix[{i}] must be a record with checkpoint, task and metric values, got {record!r}")
        return
    _require(isinstance(matrix, dict) and all(isinstance(row, dict) for row in matrix.values()),
             "capability.matrix must be a list of records {checkpoint, task, <metric>: value, ...} "
             "or a mapping checkpoint -> {task: value}")


def capability_values(manifest: dict[str, Any]) -> dict[tuple[str, str], Optional[float]]:
    """Return the capability matrix as {(checkpoint, task): value of capability.metric}, from either form."""
    capability = manifest["capability"]
    metric, matrix = capability["metric"], capability["matrix"]
    if isinstance(matrix, list):
        return {(record["checkpoint"], record["task"]): record.get(metric) for record in matrix}
    return {(checkpoint, task): value for checkpoint, row in matrix.items() for task, value in row.items()}


def _check_selected(manifest: dict[str, Any], checkpoint_names: set[str]) -> None:
    selected = manifest["selected"]
    _require(isinstance(selected, dict) and selected, "selected must be a non-empty mapping task -> checkpoint name")
    unknown = sorted({name for name in selected.values() if name not in checkpoint_names})
    _require(not unknown, f"selected names checkpoint(s) {unknown} that are not in checkpoints")


def _check_counts(manifest: dict[str, Any]) -> None:
    counts = manifest["counts"]
    _require(isinstance(counts, dict) and all(k in counts for k in ("read", "scored", "skipped")),
             "counts must be a mapping with read, scored and skipped")
    skipped = counts["skipped"]
    _require(isinstance(skipped, dict) and all(_is_count(v) for v in skipped.values()),
             f"counts.skipped must map skip reason -> count, got {skipped!r}")
    _require(_is_count(counts["read"]) and _is_count(counts["scored"]),
             f"counts.read and counts.scored must be integers >= 0, got {counts['read']!r}, {counts['scored']!r}")
    total = counts["scored"] + sum(skipped.values())
    _require(counts["read"] == total,
             f"counts.read={counts['read']} differs from scored + skipped = {total}; every sample read must be "
             "counted as scored or skipped")


def _check_group_path(name: str, path: Any) -> None:
    _require(isinstance(path, str) and path, f"group {name} has path={path!r}; expected a relative file path")
    parts = path.split("/")
    _require("://" not in path and not path.startswith("/") and "\\" not in path and ".." not in parts,
             f"group {name} has path={path!r}; it must be relative to the manifest's folder and stay inside it")


def _check_groups(manifest: dict[str, Any], checkpoint_names: set[str]) -> None:
    groups = manifest["groups"]
    _check_entries("groups", groups, GROUP_KEYS)
    _require(len(groups) > 0, "groups is empty; a mixture needs at least one group")
    names = [group["name"] for group in groups]
    _require(len(set(names)) == len(names), f"groups list a name twice: {names}")
    for group in groups:
        name = group["name"]
        _require(group["checkpoint"] in checkpoint_names,
                 f"group {name} names checkpoint {group['checkpoint']!r}, which is not in checkpoints")
        _require(isinstance(group["tasks"], list), f"group {name} has tasks={group['tasks']!r}; expected a list")
        _require(_is_number(group["weight"]) and group["weight"] > 0,
                 f"group {name} has weight={group['weight']!r}; expected a finite number > 0")
        _require(_is_count(group["n_samples"]) and group["n_samples"] > 0,
                 f"group {name} has n_samples={group['n_samples']!r}; expected an integer >= 1")
        _require(_is_count(group["n_tokens"]), f"group {name} has n_tokens={group['n_tokens']!r}; expected an integer >= 0")
        _require(_is_number(group["epochs"]) and group["epochs"] > 0,
                 f"group {name} has epochs={group['epochs']!r}; expected a finite number > 0")
        _check_group_path(name, group["path"])
    total = math.fsum(group["weight"] for group in groups)
    _require(abs(total - 1.0) <= WEIGHT_SUM_TOLERANCE, f"group weights sum to {total!r}; they must sum to 1")


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Check ``manifest`` against the contract; raise :class:`ManifestError` naming the first problem."""
    _require(isinstance(manifest, dict), f"a manifest must be a JSON object, got {type(manifest).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    _require(not missing, f"manifest is missing required key(s) {', '.join(missing)}")
    _check_version(manifest)
    _require(isinstance(manifest["config_fingerprint"], str) and manifest["config_fingerprint"],
             "config_fingerprint must be a non-empty string")
    _require(isinstance(manifest["config"], dict), "config must be a mapping (the resolved job config)")
    checkpoint_names = _check_checkpoints(manifest)
    _check_capability(manifest)
    _check_selected(manifest, checkpoint_names)
    _check_entries("layers", manifest["layers"], LAYER_KEYS)
    projector = manifest["projector"]
    _require(isinstance(projector, dict) and "kind" in projector and "seed" in projector,
             "projector must be a mapping with at least kind and seed")
    _check_counts(manifest)
    _check_groups(manifest, checkpoint_names)
    _require(isinstance(manifest["created_at"], str), "created_at must be an ISO 8601 string")


def build_manifest(
    *,
    config: Any,
    checkpoints: list[dict[str, Any]],
    capability: dict[str, Any],
    selected: dict[str, str],
    layers: list[dict[str, Any]],
    projector: dict[str, Any],
    mixture: Any,
    created_at: Optional[str] = None,
) -> dict[str, Any]:
    """Assemble a manifest from a job's parts; ``config`` is a ``JobConfig`` and ``mixture`` a ``MixtureResult``.

    The result is validated, so a pipeline bug surfaces here rather than in a training loader.
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "config_fingerprint": config.fingerprint(),
        "config": config.to_dict(),
        "checkpoints": checkpoints,
        "capability": capability,
        "selected": dict(selected),
        "layers": layers,
        "projector": projector,
        "counts": mixture.counts,
        "groups": mixture.groups,
        "column_stats": mixture.column_stats,
        "created_at": created_at or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_manifest(manifest)
    return manifest
