"""deploy/: the Kubernetes manifests against the Kubernetes schemas, compose.yaml against the Compose
spec, and both against the service table (ports, env names, images whose Bento serves the right class)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from runners.table import SERVICES

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
CONTAINER_PORT = 3000  # where a containerized Bento listens (its Dockerfile's EXPOSE, checked in test_bentos)
# Kubernetes versions to validate against: an older one still in wide use, and the newest the package knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in manifest_files() for doc in documents(path)}


def bento_class(image: str) -> str:
    """The class the Bento behind an image serves: image `<seed name>:tag` is built from bentos/<seed name>.yaml."""
    seed_name = image.split("/")[-1].split(":")[0]
    return yaml.safe_load((REPO / "bentos" / f"{seed_name}.yaml").read_text())["service"].removeprefix("service:")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
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
    assert set(env) == {spec.model_env, spec.quantization_env}
    assert env[spec.quantization_env] == spec.default_quantization
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
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
        assert set(service["environment"]) == {spec.model_env, spec.quantization_env}
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
        weights_per_gpu[default_gpu] = weights_per_gpu.get(default_gpu, 0) + spec.params_billion * bytes_per_param
    # The default layout is for two 24 GB GPUs, with room left for activations.
    assert sorted(weights_per_gpu) == ["0", "1"]
    assert all(total <= 20 for total in weights_per_gpu.values()), weights_per_gpu
