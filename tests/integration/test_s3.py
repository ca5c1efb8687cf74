"""The whole job reading from and writing to an S3-compatible server (moto) on 127.0.0.1, through s3fs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.timeout(900)

BUCKET = "automixer-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1 with one bucket; yields the environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield fs, env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_job_round_trip_through_s3(s3_server, tmp_path, shared_data, proxy_run):
    fs, env = s3_server
    for category, count in (("business", 5), ("tech", 5)):
        for i in range(1, count + 1):
            name = f"{i:03d}.txt"
            fs.put(str(shared_data / "corpus" / "news" / category / name), f"{BUCKET}/corpus/news/{category}/{name}")
    fs.put(str(shared_data / "corpus" / "stackexchange"), f"{BUCKET}/corpus/stackexchange", recursive=True)
    for task in ("boolq", "piqa"):
        fs.put(str(shared_data / "tasks" / task / "validation.jsonl"), f"{BUCKET}/tasks/{task}/validation.jsonl")

    config = {
        "corpus": {"uris": [f"s3://{BUCKET}/corpus"], "max_samples": 80},
        "checkpoints": {"uris": [str(proxy_run)]},
        "tasks": {"root": f"s3://{BUCKET}/tasks", "max_influence_examples": 8},
        "influence": {"batch_size": 8},
        "output": {"uri": f"s3://{BUCKET}/runs/first"},
        # One scoring wave: waves only matter for resuming (tests/integration/test_refresh.py).
        "ray": {"shards_per_wave": 1000},
    }
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # Ray's socket paths must stay under the 107-byte AF_UNIX limit, so its folder is short.
    run_env = {**os.environ, **env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="amray-", dir="/tmp")}
    run_env.pop("RAY_ADDRESS", None)
    completed = subprocess.run([sys.executable, "-m", "automixer_ray.cli", "run", "--config", str(config_path),
                                "--log-level", "DEBUG"],
                               env=run_env, capture_output=True, text=True, timeout=800)
    assert completed.returncode == 0, completed.stderr[-6000:]

    with fs.open(f"{BUCKET}/runs/first/manifest.json", "r") as handle:
        manifest = json.load(handle)
    assert manifest["counts"]["read"] == 80
    assert set(manifest["selected"]) == {"boolq", "piqa"}
    sources = set()
    for group in manifest["groups"]:
        with fs.open(f"{BUCKET}/runs/first/{group['path']}", "rb") as handle:
            table = pq.read_table(handle)
        assert table.num_rows == group["n_samples"]
        assert all(uri.startswith("s3://") for uri in table.column("uri").to_pylist())
        sources.update(table.column("source").to_pylist())
    assert sources <= {"news", "stackexchange"}
    assert fs.exists(f"{BUCKET}/runs/first/job.yaml")
    assert fs.exists(f"{BUCKET}/runs/first/capability.parquet")
    report = f"{BUCKET}/runs/first/{manifest['version_path']}/report/summary.md"
    assert fs.exists(report)
