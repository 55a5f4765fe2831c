"""deploy/ manifests: Docker and Kubernetes are not available here, so check that they parse, reference the
image and commands this repository builds, keep token authentication on, take every credential from a
secret, and name specs that `labfleet validate` accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from tests.conftest import REPO, run_cli

DEPLOY = REPO / "deploy"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGE = f"labfleet:{VERSION}"


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(node):
    if isinstance(node, dict):
        if "image" in node and "name" in node:
            yield node
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def test_dockerfile_builds_from_files_that_exist():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:2\.60\.\d+-py311$", text, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert "--build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu" in text  # the GPU variant, documented
    for source in re.findall(r"^COPY(?: --\S+)* (.+) \S+$", text, re.M):
        for name in source.split():
            assert (REPO / name).exists(), f"Dockerfile copies {name}, which the repository lacks"
    assert f"-t {IMAGE}" in text and "ENV RAY_AUTH_MODE=token" in text


def test_kubernetes_manifests_use_the_image_token_auth_and_secrets():
    files = sorted((DEPLOY / "kuberay").glob("*.yaml")) + sorted((DEPLOY / "mlflow").glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml"}
    kinds = set()
    for path in files:
        for doc in _documents(path):
            kinds.add(doc["kind"])
            for container in _containers(doc):
                assert container["image"] in (IMAGE, f"{IMAGE}-gpu"), (path.name, container["image"])
                env = {e["name"]: e for e in container.get("env", [])}
                if container["name"].startswith("ray-"):
                    assert env["RAY_AUTH_MODE"]["value"] == "token", path.name
                    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], path.name
                for name, entry in env.items():
                    if any(word in name for word in ("PASSWORD", "TOKEN", "URI")) and name != "MLFLOW_TRACKING_URI" \
                            and name != "RAY_AUTH_MODE":
                        assert "valueFrom" in entry and "value" not in entry, f"{path.name}: {name} is not a secret"
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= kinds
    (cluster,) = _documents(DEPLOY / "kuberay" / "raycluster.yaml")
    groups = {g["groupName"]: g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]}
    (gpu,) = groups["gpu"]["containers"]
    assert gpu["image"] == f"{IMAGE}-gpu" and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for spec in [cluster["spec"]["headGroupSpec"]["template"]["spec"], *groups.values()]:
        shm = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in spec["containers"][0]["volumeMounts"])
    mlflow = (DEPLOY / "mlflow" / "mlflow.yaml").read_text()
    assert "--app-name basic-auth" in mlflow and "MLFLOW_ADMIN_PASSWORD" in mlflow


def test_rayjob_entrypoint_names_a_command_and_a_spec_that_validate(tmp_path: Path):
    (job,) = _documents(DEPLOY / "kuberay" / "rayjob.yaml")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "labfleet"] and args[3] in ("run", "suite", "sweep")
    spec = Path(args[4])
    assert spec.parts[:3] == ("/", "opt", "labfleet"), "the image keeps the repository at /opt/labfleet"
    local = REPO.joinpath(*spec.parts[3:])
    assert local.is_file()
    assert args[args.index("--tracking-uri") + 1].startswith("http://")
    result = run_cli("validate", str(local), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_launcher_config_keeps_token_auth():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert config["docker"]["image"] == IMAGE
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if command.strip().startswith("RAY_AUTH_MODE") or "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command


def test_local_scripts_parse():
    import subprocess

    for script in (DEPLOY / "local").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script.name
        usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
        assert usage.returncode == 2 and "usage" in usage.stderr
