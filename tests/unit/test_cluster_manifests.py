"""Checks of the deployment files in cluster/: they parse, and what they name exists and agrees.

The launcher config is validated with Ray's own schema and checks. The KubeRay manifests are read
as plain YAML. Every entrypoint must name a script in this repository and a config path that a
ConfigMap mount provides. Every Ray container must use the same image variable, and token
authentication must stay on. The tests use no network and no Kubernetes API.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from automixer_ray.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO_ROOT / "cluster"
LAUNCHER = CLUSTER_DIR / "ray-cluster.yaml"
RAYJOB = CLUSTER_DIR / "kuberay-rayjob.yaml"
CRONJOB = CLUSTER_DIR / "refresh-cronjob.yaml"
EXAMPLE_CONFIG = CLUSTER_DIR / "job.example.yaml"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"
README = CLUSTER_DIR / "README.md"

IMAGE_VARIABLE = "${AUTOMIXER_IMAGE}"
KUBECTL_IMAGE_VARIABLE = "${KUBECTL_IMAGE}"


def _documents(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _only(path: Path, kind: str) -> dict:
    found = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name} must contain one {kind}, found {len(found)}"
    return found[0]


def _pinned_ray_version() -> str:
    text = (REPO_ROOT / "requirements" / "constraints.txt").read_text(encoding="utf-8")
    match = re.search(r"^ray==(\S+)$", text, flags=re.MULTILINE)
    assert match, "requirements/constraints.txt has no ray==X pin"
    return match.group(1)


def _refresh_rayjob() -> dict:
    """Return the RayJob template that the refresh CronJob's pod creates."""
    cronjob = _only(CRONJOB, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    config_maps = {doc["metadata"]["name"]: doc for doc in _documents(CRONJOB) if doc.get("kind") == "ConfigMap"}
    config_map = config_maps[volume["configMap"]["name"]]
    (item,) = volume["configMap"]["items"]
    return yaml.safe_load(config_map["data"][item["key"]])


def _rayjobs() -> dict[str, dict]:
    return {"kuberay-rayjob.yaml": _only(RAYJOB, "RayJob"), "refresh template": _refresh_rayjob()}


def _pod_specs(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker group {group['groupName']}"] = group["template"]["spec"]
    pods["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]
    return pods


def _mounted_files(pod: dict) -> dict[str, dict]:
    """Return the files that ConfigMap volumes provide in the pod's first container, keyed by path."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files = {}
    for mount in pod["containers"][0].get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        for item in volume["configMap"].get("items", []):
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = {"volume": volume, "key": item["key"]}
    return files


def _mount_paths(pod: dict) -> list[str]:
    return [mount["mountPath"] for mount in pod["containers"][0].get("volumeMounts", [])]


def _readme_commands() -> list[str]:
    """Return the shell lines of the README's code blocks, with continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_every_manifest_parses():
    paths = sorted(CLUSTER_DIR.glob("*.yaml"))
    names = [path.name for path in paths]
    for expected in ("ray-cluster.yaml", "kuberay-rayjob.yaml", "refresh-cronjob.yaml", "job.example.yaml"):
        assert expected in names
    for path in paths:
        assert _documents(path), f"{path.name} has no YAML documents"


def test_launcher_passes_ray_schema():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    (config,) = _documents(LAUNCHER)
    jsonschema.validate(config, schema)

    # The checks `ray up` runs, after filling in the provider's defaults (no cloud calls).
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(config))


def test_launcher_head_and_gpu_workers():
    (config,) = _documents(LAUNCHER)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types

    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    gpu_workers = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "the launcher config has no worker type with GPUs"
    for name, spec in gpu_workers.items():
        assert spec["min_workers"] >= 1, f"{name} starts no workers"
        assert spec["min_workers"] <= spec["max_workers"]
        assert spec["max_workers"] <= config["max_workers"]


def test_launcher_setup_installs_project():
    (config,) = _documents(LAUNCHER)
    mounts = config["file_mounts"]
    project_dirs = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert project_dirs, "file_mounts does not mount the working directory"
    project_dir = project_dirs[0].replace("~", "$HOME", 1)

    installs = [command for command in config["setup_commands"] if "pip install" in command]
    assert installs, "setup_commands has no pip install"
    install = installs[0]
    assert f"{project_dir}/requirements/constraints.txt" in install
    assert f'"{project_dir}[s3]"' in install
    assert (REPO_ROOT / "requirements" / "constraints.txt").is_file()
    assert (REPO_ROOT / "pyproject.toml").is_file()


def test_launcher_keeps_token_auth():
    (config,) = _documents(LAUNCHER)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts, f"{key} has no ray start"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"{key} starts Ray without RAY_AUTH_MODE=token"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_launcher_dashboard_binds_loopback():
    (config,) = _documents(LAUNCHER)
    (head_start,) = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in LAUNCHER.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "refresh template"])
def test_rayjob_entrypoint_names_repo_files(name):
    rayjob = _rayjobs()[name]
    spec = rayjob["spec"]
    program, script, config_path = shlex.split(spec["entrypoint"])
    assert program == "python"
    assert (REPO_ROOT / script).is_file(), f"{name} runs {script}, which is not in the repository"

    head_files = _mounted_files(_pod_specs(rayjob)["head"])
    assert config_path in head_files, f"{name} reads {config_path}, which no ConfigMap mount on the head provides"
    assert head_files[config_path]["key"] == "job.yaml"

    # The entrypoint's relative script path resolves in the image's copy of the repository.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert runtime_env["working_dir"] == workdir.group(1)


def test_rayjob_scripts_match_commands():
    assert shlex.split(_rayjobs()["kuberay-rayjob.yaml"]["spec"]["entrypoint"])[1] == "jobs/automix.py"
    assert shlex.split(_rayjobs()["refresh template"]["spec"]["entrypoint"])[1] == "jobs/refresh.py"


def test_readme_creates_mounted_configmap():
    commands = [line for line in _readme_commands() if line.startswith("kubectl create configmap")]
    assert len(commands) == 1
    words = shlex.split(commands[0])
    config_map_name = words[3]
    key, _, source = next(word for word in words if word.startswith("--from-file=")).split("=", 1)[1].partition("=")

    for name, rayjob in _rayjobs().items():
        head_files = _mounted_files(_pod_specs(rayjob)["head"])
        volume = head_files["/config/job.yaml"]["volume"]
        assert volume["configMap"]["name"] == config_map_name, f"{name} mounts another ConfigMap"
        assert head_files["/config/job.yaml"]["key"] == key
    assert (REPO_ROOT / source).resolve() == EXAMPLE_CONFIG


def test_example_config_loads():
    config = load_config(str(EXAMPLE_CONFIG))
    config.validate_inputs()
    assert config.corpus.uris[0].startswith("s3://")
    assert config.tasks.root.startswith("s3://")
    assert config.output.uri.startswith("s3://")
    assert config.ray.address == "auto"


def test_checkpoints_mounted_on_every_ray_pod():
    config = load_config(str(EXAMPLE_CONFIG))
    for name, rayjob in _rayjobs().items():
        for role, pod in _pod_specs(rayjob).items():
            if role == "submitter":
                continue
            for uri in config.checkpoints.uris:
                assert any(uri.startswith(path.rstrip("/") + "/") for path in _mount_paths(pod)), (
                    f"{name} {role} does not mount the checkpoint folder {uri}")


def test_images_set_and_consistent():
    version = _pinned_ray_version()
    for name, rayjob in _rayjobs().items():
        assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == version
        for role, pod in _pod_specs(rayjob).items():
            for container in pod["containers"]:
                assert container["image"] == IMAGE_VARIABLE, f"{name} {role} uses image {container['image']!r}"

    (launcher,) = _documents(LAUNCHER)
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert base.group(1) == launcher["docker"]["image"]

    cronjob = _only(CRONJOB, "CronJob")
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == KUBECTL_IMAGE_VARIABLE


def test_readme_substitutes_every_image_variable():
    readme = README.read_text(encoding="utf-8")
    for path in (RAYJOB, CRONJOB):
        used = set(re.findall(r"\$\{(\w+)\}", path.read_text(encoding="utf-8")))
        (command,) = [line for line in _readme_commands() if line.startswith("envsubst") and path.name in line]
        substituted = set(re.findall(r"\$(\w+)", shlex.split(command)[1]))
        assert used == substituted, f"{path.name} uses {sorted(used)} but the README substitutes {sorted(substituted)}"
        for variable in used:
            assert f"export {variable}=" in readme


def test_dockerfile_copies_existing_paths():
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("COPY"):
            continue
        words = [word for word in line.split()[1:] if not word.startswith("--")]
        for source in words[:-1]:
            assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"


def test_token_auth_never_disabled():
    for name, rayjob in _rayjobs().items():
        auth = rayjob["spec"]["rayClusterSpec"]["authOptions"]
        assert auth["mode"] == "token", f"{name} sets authOptions.mode={auth['mode']!r}"
        assert auth["secretName"] == "automixer-ray-auth"
    assert "kubectl create secret generic automixer-ray-auth --from-literal=auth_token=" in README.read_text(
        encoding="utf-8")

    for path in sorted(CLUSTER_DIR.iterdir()):
        text = path.read_text(encoding="utf-8")
        for value in re.findall(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?(\w+)", text):
            assert value == "token", f"{path.name} sets RAY_AUTH_MODE={value}"
        assert not re.search(r"mode:\s*['\"]?disabled", text), f"{path.name} disables authOptions"


def test_readme_local_commands_use_loopback():
    commands = _readme_commands()
    addresses = [word for line in commands for word in shlex.split(line, posix=False) if word.startswith("http")]
    assert addresses, "the README shows no job API address"
    for address in addresses:
        assert address.startswith("http://127.0.0.1:"), f"the README sends requests to {address}"

    forwards = [line for line in commands if "port-forward" in line]
    assert forwards
    for line in forwards:
        assert "--address 127.0.0.1" in line, f"port-forward listens beyond loopback: {line}"
    for line in commands:
        assert "0.0.0.0" not in line
        assert "localhost" not in line


def test_readme_submit_command_runs_example():
    submits = [line for line in _readme_commands() if line.startswith("ray job submit")]
    assert len(submits) == 1
    words = shlex.split(submits[0])
    assert words[words.index("--address") + 1] == "http://127.0.0.1:8265"
    assert words[words.index("--working-dir") + 1] == "."
    command = words[words.index("--") + 1:]
    assert command == ["python", "jobs/automix.py", "cluster/job.example.yaml"]


def test_refresh_cronjob_waits_for_rayjob():
    cronjob = _only(CRONJOB, "CronJob")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]

    (template_path,) = re.findall(r"kubectl create -f (\S+)", script)
    assert template_path in _mounted_files(pod)
    assert "jobDeploymentStatus" in script
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] > _refresh_rayjob()["spec"]["activeDeadlineSeconds"]

    role = _only(CRONJOB, "Role")
    binding = _only(CRONJOB, "RoleBinding")
    assert pod["serviceAccountName"] == binding["subjects"][0]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (rule,) = role["rules"]
    assert rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) == {"create", "get"}


def test_rayjobs_clean_up_clusters():
    for name, rayjob in _rayjobs().items():
        spec = rayjob["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0, name


def test_entry_points_build_cli_arguments():
    from automixer_ray.cli import submit_arguments

    assert submit_arguments("refresh", ["job.yaml", "--output", "s3://b/run"]) == [
        "refresh", "--config", "job.yaml", "--output", "s3://b/run"]
    assert submit_arguments("run", ["--config", "s3://b/job.yaml"]) == ["run", "--config", "s3://b/job.yaml"]
    for name, command in (("automix", "run"), ("refresh", "refresh"), ("simulate", "simulate")):
        usage = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / f"{name}.py"), "--help"],
                               capture_output=True, text=True, timeout=120)
        assert usage.returncode == 0, usage.stderr
        assert f"usage: automixer {command}" in usage.stdout, name
