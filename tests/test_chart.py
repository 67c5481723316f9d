"""The Helm chart `charts/servo`: `helm lint --strict` and `helm template` for the default
values and the scenario values files in charts/servo/ci/; every rendered core manifest
validated with kubernetes-validate (strict: an unknown field fails) against Kubernetes
1.35, and the ServingRuntime against KServe's CRD schema (tests/k8s_schemas/, vendored
from kserve/kserve) made strict the same way. The values schema refuses unknown keys.

Helm is `.tools/helm`, unpacked by `scripts/test-deps.sh helm` (`make test` runs it)."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from retrain.policy import parse_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "servo"
HELM = ROOT / ".tools" / "helm"
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
KUBERNETES_VERSION = "1.35.0"  # the client version of the vendored helm (v4.1)
SCENARIOS = {
    "default": [],
    "production": ["-f", str(CHART / "ci" / "production-values.yaml")],
    "minimal": ["-f", str(CHART / "ci" / "minimal-values.yaml")],
}
CRD_KINDS = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.fail(f"{HELM} is missing: run `bash scripts/test-deps.sh helm` (make test does)")
    result = subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@functools.cache
def rendered(scenario: str) -> tuple[dict[str, Any], ...]:
    out = helm("template", "rel", str(CHART), "--namespace", "ml", *SCENARIOS[scenario]).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def by_kind(scenario: str) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in rendered(scenario):
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def strict(schema: Any) -> Any:
    """The CRD schema with `additionalProperties: false` on every object that lists its
    properties and does not keep unknown fields, so a misspelled key fails."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load(
        (SCHEMAS / f"{CRD_KINDS[(api_version, kind)]}.yaml").read_text(), Loader=yaml.CSafeLoader
    )
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server checks metadata
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_KINDS:
        crd_validator(*key).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(scenario: str) -> None:
    result = helm("lint", "--strict", str(CHART), *SCENARIOS[scenario])
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_manifest_validates(scenario: str) -> None:
    docs = rendered(scenario)
    assert docs
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            pytest.fail(f"{scenario}: {doc['kind']} {doc['metadata']['name']}: {error}")


def test_the_validators_refuse_a_misspelled_field() -> None:
    # The checks above can fail: a typo in a core manifest and in the ServingRuntime.
    deployment = copy.deepcopy(by_kind("default")["Deployment"][0])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    runtime = copy.deepcopy(by_kind("default")["ServingRuntime"][0])
    runtime["spec"]["supportedModelFormats"][0]["autoselect"] = True
    with pytest.raises(jsonschema.ValidationError, match="autoselect"):
        validate(runtime)


def test_what_each_scenario_renders() -> None:
    core = {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "Role"}
    assert set(by_kind("default")) == core | {"RoleBinding", "ServingRuntime", "Pod"}
    assert len(by_kind("default")["Deployment"]) == 2  # gateway and controller
    assert "Secret" not in by_kind("default")  # no token unless one is given
    assert set(by_kind("production")) == set(by_kind("default")) | {"ConfigMap"}
    # minimal: gateway and controller, and the token Secret the chart made from `token.value`
    assert set(by_kind("minimal")) == {"Deployment", "Service", "Secret"}
    (secret,) = by_kind("minimal")["Secret"]
    (controller,) = [
        d for d in by_kind("minimal")["Deployment"] if "controller" in d["metadata"]["name"]
    ]
    pod = controller["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["SERVO_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "token",
    }
    assert secret["stringData"] == {"token": "servo_example_token_for_ci"}
    for scenario in SCENARIOS:  # nothing cluster-wide
        assert not {"ClusterRole", "ClusterRoleBinding"} & set(by_kind(scenario))


def test_gateway_ports_probes_and_defaults() -> None:
    (gateway,) = [
        d for d in by_kind("default")["Deployment"] if d["metadata"]["name"].endswith("gateway")
    ]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["serve", "--from-registry", "--host=0.0.0.0"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080,
        "grpc": 8081,
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert "resources" not in container  # unset by default
    assert "startupProbe" not in container
    assert pod["securityContext"]["runAsNonRoot"] is True
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "servo-registry", "key": "url"}
    (service,) = by_kind("default")["Service"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8080, "grpc": 8081}
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    (hook,) = by_kind("default")["Pod"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = hook["spec"]["containers"][0]["command"][-1]
    assert "/v2/health/ready" in script and "/metrics" in script


def test_controller_runs_servo_up_with_a_startup_probe() -> None:
    (controller,) = [
        d for d in by_kind("default")["Deployment"] if d["metadata"]["name"].endswith("controller")
    ]
    pod = controller["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["up", "--dir=/var/lib/servo", "--host=0.0.0.0"]
    assert "--admin-port=8082" in container["args"]
    # an empty registry is trained on before the gateway listens: 60 x 5 s to start
    assert container["startupProbe"] == {
        "httpGet": {"path": "/v2/health/live", "port": "http"},
        "periodSeconds": 5,
        "failureThreshold": 60,
    }
    assert pod["serviceAccountName"] == "rel-servo"
    assert "SERVO_TOKEN" not in {e["name"] for e in container["env"]}
    (binding,) = by_kind("default")["RoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-servo", "namespace": "ml"}
    ]
    (role,) = by_kind("default")["Role"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"inferenceservices", "jobs", "configmaps"} <= resources


def test_production_values_reach_the_manifests() -> None:
    kinds = by_kind("production")
    (controller,) = [
        d for d in kinds["Deployment"] if d["metadata"]["name"] == "servo-prod-controller"
    ]
    container = controller["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/servo:0.1.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["SERVO_REGISTRY_URL"]["valueFrom"]["secretKeyRef"]["name"] == "servo-postgres"
    assert env["SERVO_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "servo-ops-token"
    assert env["SERVO_PROMETHEUS_URL"]["value"] == "http://prometheus-operated.monitoring:9090"
    assert {"name": "policy", "mountPath": "/etc/servo", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert env["SERVO_POLICY_FILE"]["value"] == "/etc/servo/servo.yaml"
    (config,) = kinds["ConfigMap"]
    # the mounted servo.yaml is one `servo up` accepts, with the scenario's values in it
    loop = parse_config(config["data"]["servo.yaml"], where="ConfigMap servo.yaml")
    assert loop.for_model("digits").trigger.k == 2
    assert loop.for_model("digits").shadow.min_labelled == 500
    (runtime,) = kinds["ServingRuntime"]
    assert runtime["spec"]["supportedModelFormats"][0] == {
        "name": "onnx",
        "version": "1",
        "autoSelect": True,
        "priority": 2,
    }
    (pdb,) = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == "25%"


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("replica=2", "''"),
        ("gateway.replicaCount=2", "'/gateway'"),
        ("rbac.clusterWide=true", "'/rbac'"),
    ],
)
def test_the_values_schema_refuses_an_unknown_key(setting: str, where: str) -> None:
    result = helm("template", "rel", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    key = setting.split("=", maxsplit=1)[0].rsplit(".", 1)[-1]
    assert f"at {where}: additional properties '{key}' not allowed" in result.stderr


def test_every_object_level_of_the_values_schema_is_closed() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object":
            extra = node.get("additionalProperties")
            # closed, or a map whose values are scalars (labels, annotations, quantities)
            closed = extra is False or (
                isinstance(extra, dict) and extra.get("type") in ("string", ["string", "number"])
            )
            assert closed, f"{path or '/'}: additionalProperties must be false"
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}/{name}")
        items = node.get("items")
        if isinstance(items, dict):
            walk(items, f"{path}[]")

    walk(json.loads((CHART / "values.schema.json").read_text()), "")


def test_values_yaml_is_commented_line_by_line() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^\s*[A-Za-z][\w.-]*:")
    for number, line in enumerate(lines):
        if key.match(line):
            previous = next(p for p in reversed(lines[:number]) if p.strip())
            assert previous.lstrip().startswith("#"), f"values.yaml:{number + 1}: {line.strip()}"
