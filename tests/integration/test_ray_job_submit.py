"""Submit jobs/automix.py to a local Ray head with `ray job submit`, token authentication on."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", "0",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
               "--num-cpus", "2", "--disable-usage-stats"]
    # `ray stop` would stop every Ray on the machine, the test session's own included, so the head
    # runs in its own process group (--block keeps its processes there) and only that group stops.
    head = subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_head(address, env, head)
        yield address, env
    finally:
        # `ray start --block` ignores SIGTERM while its children run, so SIGKILL follows after 5 s.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=5 if sig == signal.SIGTERM else 30)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_for_head(address: str, env: dict, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with code {head.returncode}")
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"the Ray head at {address} did not answer within 180 s")


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
        # One scoring wave: waves only matter for resuming (tests/integration/test_refresh.py).
        "ray": {"shards_per_wave": 1000},
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
