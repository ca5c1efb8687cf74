"""The job's output folder: layout, ownership by one config, and small atomic writes.

Every output path goes through fsspec, so the folder can be local or in an object store
(``s3://``, ``gs://``). A folder belongs to the job whose config fingerprint is recorded in its
``job.yaml``. Another job may write there only with ``overwrite``, which first removes the old
results so that two jobs' files never mix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

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

    def version_dir(self, version: int) -> str:
        return self.path("manifests", f"v{version:06d}")


def next_version(layout: OutputLayout) -> int:
    """Return the number of the next manifest version (1 for the first)."""
    fs, path = filesystem(layout.path("manifests"))
    if not fs.exists(path):
        return 1
    numbers = [int(name.rsplit("/", 1)[-1][1:]) for name in fs.ls(path, detail=False)
               if name.rsplit("/", 1)[-1].startswith("v") and name.rsplit("/", 1)[-1][1:].isdigit()]
    return max(numbers, default=0) + 1


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def full_uri(uri: str) -> str:
    """Return ``uri`` with its protocol; a plain path becomes an absolute ``file://`` URI."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol is None:
        return "file://" + os.path.abspath(uri)
    return uri


def claim_output(config: JobConfig, *, overwrite: bool, allow_config_change: bool = False) -> OutputLayout:
    """Create or reuse the output folder for ``config``; refuse another job's folder unless ``overwrite``.

    A folder made by the same config (same fingerprint) is reused, which lets a restarted job reuse
    what it had finished. A refresh (``allow_config_change``) may also take over a folder of this
    job made with an earlier config: its cached rows are checked shard by shard, not trusted whole.
    """
    layout = OutputLayout(root=config.output.uri.rstrip("/"))
    fs, root = filesystem(layout.root)
    fingerprint = config.fingerprint()
    if fs.exists(root) and fs.ls(root):
        previous = _recorded_fingerprint(layout)
        if previous == fingerprint:
            logger.info("output folder %s belongs to this config (fingerprint %s); reusing it", layout.root, fingerprint)
            return layout
        if previous is not None and allow_config_change:
            logger.warning("refreshing %s with a changed config (fingerprint %s -> %s)",
                           layout.root, previous, fingerprint)
            save_resolved_config(config, layout.job_file)
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
