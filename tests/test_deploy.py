"""deploy/: the Kubernetes manifests against the Kubernetes schemas, compose.yaml against the Compose
spec, the systemd units with systemd's own checker, and all of them against the service table (ports, env
names, images whose Bento serves the right class) and the request timeout (a stop lets a request finish)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from embed_core.table import SERVICES
from tests.system_tools import required_tool

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
CONTAINER_PORT = 3000  # where a containerized Bento listens (its Dockerfile's EXPOSE, checked in test_bentos)
# Kubernetes versions to validate against: an older one still in wide use, and the newest the package knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


HPA = K8S / "autoscaling" / "hpa.yaml"
ADAPTER = K8S / "autoscaling" / "prometheus-adapter-values.yaml"
SYSTEMD = REPO / "deploy" / "systemd"


def request_timeout() -> float:
    """The longest a request may run: the services' BentoML traffic timeout (service.py)."""
    import service

    timeouts = {getattr(service, spec.class_name).config["traffic"]["timeout"] for spec in SERVICES.values()}
    [timeout] = timeouts
    return float(timeout)


def k8s_objects() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in manifest_files() for doc in documents(path)}


def bento_class(image: str) -> str:
    """The class the Bento behind an image serves: image `<seed name>:tag` is built from bentos/<seed name>.yaml."""
    seed_name = image.split("/")[-1].split(":")[0]
    return yaml.safe_load((REPO / "bentos" / f"{seed_name}.yaml").read_text())["service"].removeprefix("service:")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [*manifest_files(), HPA], ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error, unknown fields included


def test_the_schema_check_can_fail():
    deployment = k8s_objects()[("Deployment", "bge-embed")]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "3000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = k8s_objects()[("Deployment", "bge-embed")]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_service_has_a_deployment_and_a_service_that_agree_with_the_table(name):
    spec = SERVICES[name]
    objects = k8s_objects()
    k8s_name = name.replace("_", "-")
    deployment = objects[("Deployment", k8s_name)]
    service = objects[("Service", k8s_name)]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]

    assert bento_class(container["image"]) == spec.class_name
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", CONTAINER_PORT)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env[spec.quantization_env] == spec.default_quantization
    if spec.shares_model_with is None:
        assert set(env) == {spec.model_env, spec.quantization_env}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    else:  # it runs on the holder's model, reached through the holder's Service: no GPU, no weights of its own
        holder = SERVICES[spec.shares_model_with]
        assert set(env) == {spec.model_env, spec.quantization_env, spec.model_host_env}
        holder_service = objects[("Service", holder.seed_name.replace("_", "-"))]
        [holder_port] = holder_service["spec"]["ports"]
        assert env[spec.model_host_env] == f"http://{holder_service['metadata']['name']}:{holder_port['port']}"
        assert "limits" not in container["resources"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe

    # The model volume: a claim, mounted read-only where <NAME>_MODEL points.
    [mount] = container["volumeMounts"]
    assert env[spec.model_env].startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects

    # Replicas scale behind the Service, which keeps the table's port.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    [service_port] = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (spec.port, "http")


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_pod_drains_before_it_stops_and_has_a_disruption_budget(name):
    objects = k8s_objects()
    k8s_name = name.replace("_", "-")
    deployment = objects[("Deployment", k8s_name)]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # preStop keeps the pod serving while it leaves the endpoints; then SIGTERM, and the longest request
    # must still fit in the grace period, which counts from the start of preStop.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and int(command[1]) >= 5
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + request_timeout()
    # Rolling updates never take the last ready replica away.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = objects[("PodDisruptionBudget", k8s_name)]
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_the_autoscaling_example_scales_each_deployment_on_the_queue_metric_the_services_export():
    from runners.metrics import _metrics

    autoscalers = {doc["metadata"]["name"]: doc for doc in documents(HPA)}
    assert set(autoscalers) == {name.replace("_", "-") for name in SERVICES}
    [rule] = yaml.safe_load(ADAPTER.read_text())["rules"]
    exported = _metrics()["queued"]._name  # the histogram runners/metrics.py feeds with each request's wait
    for name, hpa in autoscalers.items():
        assert ("Deployment", name) in k8s_objects() and hpa["spec"]["scaleTargetRef"]["name"] == name
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # The adapter's rule reads that histogram's _sum and _count series, per pod.
    assert re.fullmatch(rf"\^{exported}_count\$", rule["name"]["matches"])
    assert f"{exported}_sum{{" in rule["metricsQuery"] and f"{exported}_count{{" in rule["metricsQuery"]
    assert rule["seriesQuery"].startswith(f"{exported}_count{{")


def systemd_units() -> dict[str, Path]:
    return {path.stem.removeprefix("embed-").replace("-", "_"): path for path in sorted(SYSTEMD.glob("*.service"))}


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and keys, each key with all its values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_there_is_one_systemd_unit_per_service():
    assert sorted(systemd_units()) == sorted(SERVICES)


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_systemd_unit_restarts_a_crash_gives_up_on_a_loop_and_drains_on_stop(name):
    spec = SERVICES[name]
    unit = unit_settings(systemd_units()[name])
    service, section = unit["Service"], unit["Unit"]
    [exec_start] = service["ExecStart"]
    assert exec_start.split()[1:] == ["-m", "bentoml", "serve", f"service:{spec.class_name}", "--port", str(spec.port)]
    assert service["Restart"] == ["on-failure"]
    assert int(section["StartLimitBurst"][0]) >= 2 and int(section["StartLimitIntervalSec"][0]) >= 60
    assert float(service["TimeoutStopSec"][0]) > request_timeout()
    assert service["KillMode"] == ["mixed"]  # SIGTERM to bentoml serve only, so it drains its workers
    assert service["StandardOutput"] == ["journal"] and service["StandardError"] == ["journal"]
    assert any(path.endswith(f"/{name}.env") for path in service["EnvironmentFile"])
    assert "BENTOML_CONTAINERIZED=true" in service["Environment"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_accepts_the_units(tmp_path):
    """systemd's own checker; the interpreter is pointed at this one, which exists here."""
    systemd_analyze = required_tool("systemd-analyze", package="systemd")
    paths = []
    for path in systemd_units().values():
        copy = tmp_path / path.name
        copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", path.read_text(), flags=re.M))
        paths.append(str(copy))
    checked = subprocess.run([systemd_analyze, "verify", *paths], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr
    # The checker can fail: a misspelt key is reported.
    broken = tmp_path / "broken.service"
    broken.write_text(Path(paths[0]).read_text().replace("Restart=on-failure", "Restrat=on-failure"))
    checked = subprocess.run([systemd_analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Restrat" in checked.stderr


def compose() -> dict:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def test_compose_validates_against_the_compose_spec():
    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(compose()), key=str)
    assert errors == []
    # The schema can fail: a misspelt key is caught.
    broken = compose()
    broken["services"]["bge_embed"]["portz"] = ["1:2"]
    assert list(validator_class(schema).iter_errors(broken))


def test_compose_agrees_with_the_table_and_pins_each_service_to_one_gpu():
    services = compose()["services"]
    assert set(services) == set(SERVICES)
    weights_per_gpu: dict[str, float] = {}
    for name, service in services.items():
        spec = SERVICES[name]
        assert bento_class(service["image"]) == spec.class_name
        assert service["ports"] == [f"{spec.port}:{CONTAINER_PORT}"]
        if spec.shares_model_with is None:
            assert set(service["environment"]) == {spec.model_env, spec.quantization_env}
        else:  # on the holder's model, by default (set the variable empty for a copy of its own)
            host = spec.model_host_env
            assert service["environment"][host] == f"${{{host}-http://{spec.shares_model_with}:{CONTAINER_PORT}}}"
            assert service["depends_on"] == [spec.shares_model_with]
        assert (
            service["environment"][spec.quantization_env]
            == f"${{{spec.quantization_env}:-{spec.default_quantization}}}"
        )
        assert any(volume.endswith(":/models:ro") for volume in service["volumes"])
        assert service["environment"][spec.model_env].startswith("/models/")
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        [gpu] = device["device_ids"]
        assert gpu.startswith(f"${{{spec.env_prefix}_GPU:-")
        default_gpu = gpu.removeprefix(f"${{{spec.env_prefix}_GPU:-").removesuffix("}")
        assert "/health" in " ".join(service["healthcheck"]["test"])
        bytes_per_param = {"none": 2, "int8": 1}[spec.default_quantization]
        held = spec.params_billion * bytes_per_param if spec.shares_model_with is None else 0.0
        weights_per_gpu[default_gpu] = weights_per_gpu.get(default_gpu, 0) + held
    # The default layout is for two 24 GB GPUs, with room left for activations.
    assert sorted(weights_per_gpu) == ["0", "1"]
    assert all(total <= 20 for total in weights_per_gpu.values()), weights_per_gpu
