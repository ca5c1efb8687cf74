"""The job's output folder: layout, ownership by one config, and small atomic writes.

Every output path goes through fsspec, so the folder can be local or in an object store
(``s3://``, ``gs://``). A folder belongs to the job whose config fingerprint is recorded in its
``job.yaml``; another job may write there only with ``overwrite``, which first removes the old
results so that two jobs' files never mix.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import yaml

from automixer_ray.config import JobConfig, save_resolved_config

logger = logging.getLogger(__name__)

JOB_FILE = "job.yaml"


class OutputError(RuntimeError):
    """An output folder that cannot be used for this job."""


@dataclass(frozen=True)
class OutputLayout:
    """Paths of the job's outputs under one root URI."""

    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def job_file(self) -> str:
        return self.path(JOB_FILE)

    @property
    def capability(self) -> str:
        return self.path("capability.parquet")

    @property
    def influence(self) -> str:
        return self.path("influence")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def full_uri(uri: str) -> str:
    """Return ``uri`` with its protocol; a plain path becomes an absolute ``file://`` URI."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol is None:
        return "file://" + os.path.abspath(uri)
    return uri


def claim_output(config: JobConfig, *, overwrite: bool) -> OutputLayout:
    """Create or reuse the output folder for ``config``; refuse another job's folder unless ``overwrite``.

    A folder made by the same config (same fingerprint) is reused, which lets a restarted job reuse
    what it had finished.
    """
    layout = OutputLayout(root=config.output.uri.rstrip("/"))
    fs, root = filesystem(layout.root)
    fingerprint = config.fingerprint()
    if fs.exists(root) and fs.ls(root):
        previous = _recorded_fingerprint(layout)
        if previous == fingerprint:
            logger.info("output folder %s belongs to this config (fingerprint %s); reusing it", layout.root, fingerprint)
            return layout
        if not overwrite:
            what = f"the results of another job (config fingerprint {previous})" if previous else "other files"
            raise OutputError(
                f"output folder {layout.root} already contains {what}; choose another output URI, "
                "or pass --overwrite (output.overwrite: true) to delete them first")
        logger.warning("deleting the previous contents of %s (--overwrite)", layout.root)
        for entry in fs.ls(root, detail=False):
            fs.rm(entry, recursive=True)
    fs.makedirs(root, exist_ok=True)
    save_resolved_config(config, layout.job_file)
    return layout


def _recorded_fingerprint(layout: OutputLayout) -> str | None:
    fs, path = filesystem(layout.job_file)
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    return data.get("fingerprint")


def write_json_atomic(uri: str, payload: Any) -> None:
    """Write JSON so that readers see either the old file or the whole new one, never a part."""
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    temp = f"{parent}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
    with fs.open(temp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
    fs.mv(temp, path)
