"""The Helm chart `charts/servo`: `helm lint --strict` and `helm template` for the default
values and the scenario values files in charts/servo/ci/; every rendered core manifest
validated with kubernetes-validate (strict: an unknown field fails) against Kubernetes
1.35, and the ServingRuntime against KServe's CRD schema (tests/k8s_schemas/, vendored
from kserve/kserve) made strict the same way; the ServiceMonitor (no vendored CRD) against
a strict schema of the fields the chart writes. The values schema refuses unknown keys;
the pods' arguments parse as the servo commands' options.

Helm is `.tools/helm`, unpacked by `scripts/test-deps.sh helm` (`make test` runs it)."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import click
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
PROMETHEUS = "http://prometheus-operated.monitoring:9090"
#: the defaults, with the one required value (the controller's Prometheus)
DEFAULT = ["--set", f"controller.prometheusUrl={PROMETHEUS}"]
SCENARIOS = {
    "default": DEFAULT,
    "production": ["-f", str(CHART / "ci" / "production-values.yaml")],
    "minimal": ["-f", str(CHART / "ci" / "minimal-values.yaml")],
    "kubernetes": ["-f", str(CHART / "ci" / "kubernetes-values.yaml")],
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


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required)}  # fmt: skip


_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
#: the ServiceMonitor fields the chart writes (monitoring.coreos.com/v1), closed
SERVICE_MONITOR = jsonschema.Draft7Validator(
    _closed(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _closed({"name": {"type": "string"}, "labels": _STRINGS}, ("name",)),
            "spec": _closed(
                {
                    "selector": _closed({
                        "matchLabels": _STRINGS,
                        "matchExpressions": {"type": "array", "items": _closed({
                            "key": {"type": "string"},
                            "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                            "values": {"type": "array", "items": {"type": "string"}},
                        }, ("key", "operator"))},
                    }),
                    "namespaceSelector": _closed(
                        {"matchNames": {"type": "array", "items": {"type": "string"}}}
                    ),
                    "endpoints": {"type": "array", "minItems": 1, "items": _closed({
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                    }, ("port",))},
                },
                ("selector", "endpoints"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )
)  # fmt: skip


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_KINDS:
        crd_validator(*key).validate(doc)
    elif doc["kind"] == "ServiceMonitor":
        SERVICE_MONITOR.validate(doc)
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
    monitor = copy.deepcopy(by_kind("kubernetes")["ServiceMonitor"][0])
    monitor["spec"]["endpoints"][0]["scrape_interval"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="scrape_interval"):
        validate(monitor)


def test_what_each_scenario_renders() -> None:
    core = {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "Role"}
    assert set(by_kind("default")) == core | {"RoleBinding", "ServingRuntime", "Pod"}
    assert len(by_kind("default")["Deployment"]) == 2  # gateway and controller
    assert len(by_kind("default")["Service"]) == 2  # gateway and controller
    assert "Secret" not in by_kind("default")  # no token unless one is given
    assert set(by_kind("production")) == set(by_kind("default")) | {"ConfigMap"}
    # kubernetes: the data claim it creates (the payload log's is an existing one)
    assert set(by_kind("kubernetes")) == set(by_kind("default")) | {
        "PersistentVolumeClaim",
        "ServiceMonitor",
    }
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
    (registry_env,) = container["env"]  # no payload log without its shared volume
    assert registry_env["valueFrom"]["secretKeyRef"] == {"name": "servo-registry", "key": "url"}
    service = component("default", "Service", "gateway")
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
    assert container["args"][:3] == ["up", "--dir=/var/lib/servo", "--no-serve-models"]
    assert f"--prometheus={PROMETHEUS}" in container["args"]
    assert {"--admin-host=0.0.0.0", "--admin-port=8082"} <= set(container["args"])
    # an empty registry is trained on before the gateway listens: 60 x 5 s to start
    assert container["startupProbe"] == {
        "httpGet": {"path": "/v2/health/live", "port": "http"},
        "periodSeconds": 5,
        "failureThreshold": 60,
    }
    # it routes no model: /v2/health/ready ("every routed champion serves") never holds
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
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
    assert "--prometheus=http://prometheus-operated.monitoring:9090" in container["args"]
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


def component(scenario: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [
        d
        for d in by_kind(scenario)[kind]
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == name
    ]
    return doc


def pod_of(scenario: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = component(scenario, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_the_controller_needs_its_prometheus() -> None:
    result = helm("template", "rel", str(CHART), check=False)
    assert result.returncode != 0
    assert "controller.prometheusUrl is required with controller.enabled" in result.stderr
    # without the controller nothing needs it
    off = helm("template", "rel", str(CHART), "--set", "controller.enabled=false").stdout
    docs = [d for d in yaml.safe_load_all(off) if d]
    components = {d["metadata"]["labels"].get("app.kubernetes.io/component") for d in docs}
    assert "controller" not in components and "gateway" in components
    bad = helm("template", "rel", str(CHART), "--set", "controller.prometheusUrl=prom:9090",
               check=False)  # fmt: skip
    assert bad.returncode != 0 and "prometheusUrl" in bad.stderr  # the schema's pattern


def test_the_pods_arguments_are_servo_options() -> None:
    """The chart's args parse as `servo up` and `servo serve` options (click's own parser,
    with its checks: an option that does not exist or a bad value fails here)."""
    from servo.cli import main

    for scenario in SCENARIOS:
        for name in ("gateway", "controller"):
            _, container = pod_of(scenario, name)
            command, *args = container["args"]
            sub = main.commands[command]
            context = sub.make_context(command, list(args))
            if name == "controller":
                assert context.params["serve_models"] is False
                assert context.params["admin_host"] == "0.0.0.0"
                assert context.params["prometheus_url"].startswith("http")
    with pytest.raises(click.NoSuchOption, match="No such option"):
        main.commands["up"].make_context("up", ["--no-serve-model"])


def test_the_pods_env_names_are_servo_settings() -> None:
    """Every SERVO_* variable the chart sets is read: a Settings field (SERVO_ prefix), an
    option of the pod's servo command, or (SERVO_TOKEN) of the CLI run in the pod with
    `kubectl exec` (a misspelled name would be ignored silently)."""
    from servo.cli import main
    from servo.settings import Settings

    def envvars(command: click.Command) -> set[str]:
        found = {p.envvar for p in command.params if isinstance(p.envvar, str)}
        for sub in getattr(command, "commands", {}).values():
            found |= envvars(sub)
        return found

    fields = {f"SERVO_{name.upper()}" for name in Settings.model_fields}
    everywhere = envvars(main)
    assert "SERVO_TOKEN" in everywhere
    for scenario in SCENARIOS:
        for name in ("gateway", "controller"):
            _, container = pod_of(scenario, name)
            command = main.commands[container["args"][0]]
            options = envvars(command) | ({"SERVO_TOKEN"} & everywhere)
            env = {e["name"] for e in container["env"] if e["name"].startswith("SERVO_")}
            assert env, f"{scenario} {name}: no SERVO_ variable"
            assert env <= fields | options, f"{scenario} {name}: {env - fields - options}"
    assert {"SERVO_DEPLOYER", "SERVO_K8S_RUNTIME", "SERVO_K8S_STORAGE_PREFIX"} <= fields


def test_controller_service_selects_the_controller() -> None:
    service = component("kubernetes", "Service", "controller")
    deployment = component("kubernetes", "Deployment", "controller")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"admin": (9443, "admin"), "metrics": (9090, "http")}
    _, container = pod_of("kubernetes", "controller")
    named = {p["name"] for p in container["ports"]}
    assert {target for _, target in ports.values()} <= named
    assert service["metadata"]["annotations"] == {"example.com/team": "ml-platform"}
    # the default ports: admin 8082, metrics 8080
    default = component("default", "Service", "controller")
    assert {p["name"]: p["port"] for p in default["spec"]["ports"]} == {
        "admin": 8082,
        "metrics": 8080,
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"  # the only operator the chart uses
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_the_service_monitor_scrapes_gateway_and_controller_metrics() -> None:
    (monitor,) = by_kind("kubernetes")["ServiceMonitor"]
    spec = monitor["spec"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert spec["namespaceSelector"] == {"matchNames": ["ml"]}
    selected = [s for s in by_kind("kubernetes")["Service"]
                if _selects(spec["selector"], s["metadata"]["labels"])]  # fmt: skip
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected) == [
        "controller",
        "gateway",
    ]
    scraped = {}
    for service in selected:  # each Service has one of the endpoints' ports: its /metrics
        names = {p["name"] for p in service["spec"]["ports"]}
        (endpoint,) = [e for e in spec["endpoints"] if e["port"] in names]
        scraped[service["metadata"]["labels"]["app.kubernetes.io/component"]] = endpoint
    assert scraped["gateway"]["port"] == "http" and scraped["controller"]["port"] == "metrics"
    assert all(e["path"] == "/metrics" and e["interval"] == "15s" for e in scraped.values())
    assert "ServiceMonitor" not in by_kind("default")  # off by default


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container["volumeMounts"]}


def _volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["volumes"]}


def test_payload_log_and_data_volumes_are_shared() -> None:
    gateway_pod, gateway = pod_of("kubernetes", "gateway")
    controller_pod, controller = pod_of("kubernetes", "controller")
    for pod, container in ((gateway_pod, gateway), (controller_pod, controller)):
        env = {e["name"]: e.get("value") for e in container["env"]}
        mount = _mounts(container)["payload-log"]
        assert env["SERVO_PAYLOAD_LOG_DIR"] == mount["mountPath"] == "/var/lib/servo-payload"
        assert not mount.get("readOnly")
        claim = _volumes(pod)["payload-log"]["persistentVolumeClaim"]
        assert claim == {"claimName": "servo-payload-logs"}  # the existing claim
    # data: written by the controller (its --dir), read-only in the gateways
    assert _mounts(controller)["data"] == {"name": "data", "mountPath": "/var/lib/servo"}
    assert "--dir=/var/lib/servo" in controller["args"]
    assert _volumes(controller_pod)["data"]["persistentVolumeClaim"] == {
        "claimName": "rel-servo-data"
    }
    assert _mounts(gateway)["data"]["readOnly"] is True
    assert _mounts(gateway)["data"]["mountPath"] == "/var/lib/servo"  # the artifact URIs' path
    assert _volumes(gateway_pod)["data"]["persistentVolumeClaim"] == {
        "claimName": "rel-servo-data",
        "readOnly": True,
    }
    (pvc,) = by_kind("kubernetes")["PersistentVolumeClaim"]  # data only: payload's exists
    assert pvc["metadata"]["name"] == "rel-servo-data"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "efs-sc"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "annotations" not in pvc["metadata"]  # keep: false
    # off (the default): emptyDirs, no claim; the gateways log no payload (unread)
    for name in ("gateway", "controller"):
        pod, container = pod_of("default", name)
        assert _volumes(pod)["data"] == {"name": "data", "emptyDir": {}}
        assert not _mounts(container)["data"].get("readOnly")
    pod, container = pod_of("default", "controller")
    assert _volumes(pod)["payload-log"] == {"name": "payload-log", "emptyDir": {}}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SERVO_PAYLOAD_LOG_DIR"] == _mounts(container)["payload-log"]["mountPath"]
    pod, container = pod_of("default", "gateway")
    assert "payload-log" not in _volumes(pod) and "payload-log" not in _mounts(container)
    assert "SERVO_PAYLOAD_LOG_DIR" not in {e["name"] for e in container["env"]}
    assert "PersistentVolumeClaim" not in by_kind("default")
    # a created payload claim is kept on uninstall by default
    out = helm("template", "rel", str(CHART), *DEFAULT,
               "--set", "payloadLog.persistence.enabled=true").stdout  # fmt: skip
    (created,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PersistentVolumeClaim"]
    assert created["metadata"]["name"] == "rel-servo-payload-log"
    assert created["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert created["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_deployer_settings_reach_the_controller() -> None:
    _, controller = pod_of("kubernetes", "controller")
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert env["SERVO_DEPLOYER"] == "kubernetes"
    assert env["SERVO_K8S_RUNTIME"] == "rel-servo-runtime"  # the chart's ServingRuntime
    (runtime,) = by_kind("kubernetes")["ServingRuntime"]
    assert runtime["metadata"]["name"] == env["SERVO_K8S_RUNTIME"]
    # the data claim's root is the controller's --dir: file:///var/lib/servo/x -> pvc://.../x
    assert env["SERVO_K8S_STORAGE_PREFIX"] == "pvc://rel-servo-data/"
    _, default = pod_of("default", "controller")
    env = {e["name"]: e.get("value") for e in default["env"]}
    assert env["SERVO_DEPLOYER"] == "embedded" and env["SERVO_K8S_STORAGE_PREFIX"] == ""
    _, minimal = pod_of("minimal", "controller")  # no ServingRuntime: KServe's own
    assert {e["name"]: e.get("value") for e in minimal["env"]}["SERVO_K8S_RUNTIME"] == ""
    _, gateway = pod_of("kubernetes", "gateway")
    assert "SERVO_DEPLOYER" not in {e["name"] for e in gateway["env"]}


def test_pipeline_steps_as_jobs_reach_the_controller() -> None:
    """pipeline.steps=kubernetes: the settings servo.train.step_executor reads (its Jobs
    run the chart's image, with the data claim mounted where the controller has it);
    refused without the data claim."""
    from servo.settings import Settings

    pod, controller = pod_of("kubernetes", "controller")
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert env["SERVO_STEPS"] == "kubernetes"
    assert env["SERVO_K8S_JOB_IMAGE"] == controller["image"]
    assert env["SERVO_K8S_JOB_CLAIM"] == "rel-servo-data"
    assert env["SERVO_K8S_JOB_SERVICE_ACCOUNT"] == pod["serviceAccountName"]
    mounts = {m["mountPath"]: m["name"] for m in controller["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = volumes[mounts["/var/lib/servo"]]  # the controller's --dir: the Jobs' mount path
    assert data["persistentVolumeClaim"]["claimName"] == env["SERVO_K8S_JOB_CLAIM"]
    fields = {k.removeprefix("SERVO_").lower(): v for k, v in env.items()
              if k.startswith(("SERVO_STEPS", "SERVO_K8S_JOB"))}  # fmt: skip
    settings = Settings(**fields)
    assert settings.steps == "kubernetes" and settings.k8s_job_timeout_s == 1800
    _, default = pod_of("default", "controller")
    assert "SERVO_STEPS" not in {e["name"] for e in default["env"]}  # local: the default
    result = helm("template", "rel", str(CHART), *DEFAULT, "--set", "pipeline.steps=kubernetes",
                  check=False)  # fmt: skip
    assert result.returncode != 0
    assert "pipeline.steps=kubernetes needs data.persistence.enabled" in result.stderr


def test_the_kubernetes_deployer_needs_a_storage_prefix() -> None:
    kind = ["--set", "deployer.kind=kubernetes"]
    result = helm("template", "rel", str(CHART), *DEFAULT, *kind, check=False)
    assert result.returncode != 0
    assert "deployer.kind=kubernetes needs data.persistence.enabled" in result.stderr
    out = helm("template", "rel", str(CHART), *DEFAULT, *kind,
               "--set", "deployer.storagePrefix=s3://bucket/servo/",
               "--set", "deployer.runtime=kserve-mlserver").stdout  # fmt: skip
    (controller,) = [d for d in yaml.safe_load_all(out)
                     if d and d["metadata"]["name"] == "rel-servo-controller"
                     and d["kind"] == "Deployment"]  # fmt: skip
    env = {e["name"]: e.get("value") for e in controller["spec"]["template"]["spec"]
           ["containers"][0]["env"]}  # fmt: skip
    assert env["SERVO_K8S_STORAGE_PREFIX"] == "s3://bucket/servo/"
    assert env["SERVO_K8S_RUNTIME"] == "kserve-mlserver"
    bad = helm("template", "rel", str(CHART), *DEFAULT, "--set", "deployer.kind=kserve",
               check=False)  # fmt: skip
    assert bad.returncode != 0 and "deployer" in bad.stderr
