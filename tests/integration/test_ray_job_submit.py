"""Submit jobs/automix.py to a local Ray head with `ray job submit`, token authentication on."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from automixer_ray.manifest import read_manifest

pytestmark = pytest.mark.timeout(900)

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    """A local Ray head on 127.0.0.1 with token authentication, stopped after the test."""
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # Ray's socket paths must stay under the 107-byte AF_UNIX limit, so its folder is short.
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="amray-", dir="/tmp"),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    env.pop("RAY_ADDRESS", None)
    dashboard_port = _free_port()
    command = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", "0",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
               "--disable-usage-stats"]
    subprocess.run(command, env=env, check=True, timeout=180, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, timeout=120, capture_output=True)


def test_submit_automix_job(ray_head, tmp_path, shared_data, proxy_run):
    address, env = ray_head
    output = tmp_path / "out"
    config = {
        "corpus": {"uris": [str(shared_data / "corpus" / "wikitext"), str(shared_data / "corpus" / "news" / "tech")],
                   "max_samples": 60},
        "checkpoints": {"uris": [str(proxy_run)]},
        "tasks": {"root": str(shared_data / "tasks"), "names": ["boolq", "piqa"], "max_influence_examples": 8},
        "influence": {"batch_size": 8},
        "output": {"uri": str(output)},
    }
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT / "jobs"),
               "--", sys.executable, "automix.py", str(config_path)]
    completed = subprocess.run(command, env=env, timeout=800, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "succeeded" in completed.stdout + completed.stderr
    manifest = read_manifest(str(output / "manifest.json"))
    assert manifest["counts"]["read"] == 60
    assert set(manifest["selected"]) == {"boolq", "piqa"}
    assert abs(sum(group["weight"] for group in manifest["groups"]) - 1.0) < 1e-9
