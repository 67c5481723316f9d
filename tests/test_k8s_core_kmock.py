"""The chart's core objects through the kubernetes client, and its Role against the code.

1. The rendered chart (ci/kubernetes-values.yaml with a token and a policy, so every core
   kind renders) applied to the kmock emulator with `kubernetes.utils.create_from_dict`
   (the typed APIs a `kubectl apply`-like client uses) and read back with the typed
   `read_namespaced_*` calls: each object comes back as the chart wrote it, so every field
   the chart sets is one the client's models know (an unknown one is dropped on the way).
2. The Role: the (group, resource, verb) triples the controller needs are derived from
   the code (every `*_namespaced_*` API call in the project's packages, found in their
   syntax trees: today those of servo/deploy.py and retrain/k8s_jobs.py, translated
   through the kubernetes client's own path template for that call, as the API server's
   request-info rules do); the chart's Role must grant each. The same translation of the
   requests kmock saw while the deployer and the Job runner really ran shows that the
   derivation misses none of their calls (and that the run made all of them but the
   deployer's replace: kmock serves no PUT).

What kmock can and cannot prove here: it stores and returns objects, so it shows the
client speaks these APIs with these bodies; it checks no schema (kubernetes-validate does,
tests/test_chart.py), applies no label selector server-side, runs no controller, and
enforces no RBAC: that the Role is enough on a real API server (no other verb or resource
asked, e.g. by a client upgrade) needs a real cluster (docs/kubernetes.md).
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

kmock = pytest.importorskip("kmock", reason="the k8s extra (kmock) is not installed")
client = pytest.importorskip("kubernetes.client")

from kubernetes import utils  # noqa: E402

from tests.test_chart import CHART, helm  # noqa: E402
from tests.test_k8s_jobs import NS, Emulator, play_controller, runner, spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: every module of the project's packages: any of them may call the Kubernetes API
SOURCES = tuple(
    path
    for package in ("servo", "retrain", "serving", "monitors", "registry")
    for path in sorted((ROOT / package).rglob("*.py"))
)
CODE_AGENT, TEST_AGENT = "servo-controller", "test-plays-kubernetes"
#: kind -> (typed API, the snake_case in its read_namespaced_* method)
CORE = {
    "Deployment": ("AppsV1Api", "deployment"),
    "Service": ("CoreV1Api", "service"),
    "ConfigMap": ("CoreV1Api", "config_map"),
    "Secret": ("CoreV1Api", "secret"),
    "ServiceAccount": ("CoreV1Api", "service_account"),
    "PersistentVolumeClaim": ("CoreV1Api", "persistent_volume_claim"),
    "PodDisruptionBudget": ("PolicyV1Api", "pod_disruption_budget"),
    "Role": ("RbacAuthorizationV1Api", "role"),
    "RoleBinding": ("RbacAuthorizationV1Api", "role_binding"),
}
API_CLASSES = ("CoreV1Api", "BatchV1Api", "AppsV1Api", "CustomObjectsApi")


@functools.cache
def rendered() -> tuple[dict[str, Any], ...]:
    out = helm(
        "template", "rel", str(CHART), "--namespace", NS,
        "-f", str(CHART / "ci" / "kubernetes-values.yaml"),
        "--set", "token.value=servo_kmock_token",
        "--set-string", "controller.policy=models: {}",
    ).stdout  # fmt: skip
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render() -> list[dict[str, Any]]:
    return copy.deepcopy(list(rendered()))


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator()
    yield emu
    emu.close()


def api_client(emulator: Emulator, agent: str) -> Any:
    api = client.ApiClient(client.Configuration(host=emulator.url))
    api.user_agent = agent
    return api


def test_the_charts_core_objects_round_trip_through_the_client(emulator: Emulator) -> None:
    docs = [d for d in render() if d["kind"] in CORE]
    assert {d["kind"] for d in docs} == set(CORE)  # every core kind is covered
    with api_client(emulator, CODE_AGENT) as api:
        for doc in docs:
            utils.create_from_dict(api, doc, namespace=NS)
        for doc in docs:
            cls, snake = CORE[doc["kind"]]
            read = getattr(getattr(client, cls)(api), f"read_namespaced_{snake}")
            back = api.sanitize_for_serialization(read(doc["metadata"]["name"], NS))
            where = f"{doc['kind']} {doc['metadata']['name']}"
            for key in doc.keys() - {"metadata"}:
                assert back[key] == doc[key], f"{where}: {key} changed on the way"
            for key in ("name", "labels", "annotations"):
                assert back["metadata"].get(key) == doc["metadata"].get(key), where
        # the comparison can fail: a misspelled field does not come back
        typo = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
        typo["metadata"]["name"] = "typo"
        typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
        utils.create_from_dict(api, typo, namespace=NS)
        back = api.sanitize_for_serialization(
            client.AppsV1Api(api).read_namespaced_deployment("typo", NS)
        )
        assert "imagePullPolcy" not in back["spec"]["template"]["spec"]["containers"][0]
        assert back["spec"] != typo["spec"]
        listed = client.AppsV1Api(api).list_namespaced_deployment(NS).items
        assert sorted(d.metadata.name for d in listed) == [
            "rel-servo-controller",
            "rel-servo-gateway",
            "typo",
        ]


# -- the Role against the code's calls --------------------------------------------------


def rbac_attributes(method: str, path: str, params: dict[str, str]) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) of a namespaced request, as the API
    server's request-info rules derive them: GET of a collection is list (watch with
    ?watch), of an object get; POST create, PUT update, PATCH patch, DELETE delete."""
    found = re.fullmatch(r"/(?:api/[^/]+|apis/([^/]+)/[^/]+)/namespaces/[^/]+/([^/]+)(/.*)?", path)
    assert found, f"not a namespaced API path: {path}"
    group, resource, rest = found.group(1) or "", found.group(2), found.group(3) or ""
    parts = [p for p in rest.split("/") if p]
    named = bool(parts)
    if len(parts) > 1:
        resource = f"{resource}/{parts[1]}"
    if method == "GET":
        verb = "get" if named else ("watch" if params.get("watch") in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        if method == "DELETE" and not named:
            verb = "deletecollection"
    return group, resource, verb


def api_calls(source: Path) -> set[str]:
    """The Kubernetes API methods (`*_namespaced_*`) the module calls or passes on."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Attribute) and re.fullmatch(
            r"(create|get|read|list|replace|patch|delete|watch)_namespaced_\w+", node.attr
        ):
            names.add(node.attr)
    return names


def path_template(method_name: str) -> tuple[str, str]:
    """(HTTP method, path template) of a client API method, from the client's own code."""
    for cls in API_CLASSES:
        method = getattr(getattr(client, cls), f"{method_name}_with_http_info", None)
        if method is not None:
            found = re.search(r"'(/api[^']*)', '(GET|POST|PUT|PATCH|DELETE)'",
                              inspect.getsource(method))  # fmt: skip
            assert found, f"{cls}.{method_name}: no path in the client's code"
            return found.group(2), found.group(1)
    raise AssertionError(f"{method_name}: no such method in {', '.join(API_CLASSES)}")


def needed_by_the_code() -> set[tuple[str, str, str]]:
    from servo.deploy import API_VERSION, GROUP, PLURAL

    needed = set()
    callers = {source.relative_to(ROOT).as_posix(): api_calls(source) for source in SOURCES}
    callers = {where: names for where, names in callers.items() if names}
    assert set(callers) == {"servo/deploy.py", "retrain/k8s_jobs.py"}, sorted(callers)
    for names in callers.values():
        for name in names:
            method, template = path_template(name)
            path = template.format(group=GROUP, version=API_VERSION, plural=PLURAL,
                                   namespace=NS, name="x")  # fmt: skip
            needed.add(rbac_attributes(method, path, {}))
    return needed


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def the_role() -> dict[str, Any]:
    (role,) = [d for d in render() if d["kind"] == "Role"]
    return role


def test_the_role_grants_every_call_the_code_makes() -> None:
    needed = needed_by_the_code()
    # the derivation found the calls of both modules (not an empty set that passes)
    assert ("serving.kserve.io", "inferenceservices", "create") in needed
    assert ("batch", "jobs", "delete") in needed and ("", "pods/log", "get") in needed
    missing = needed - granted(the_role())
    assert not missing, f"the chart's Role does not grant {sorted(missing)}"
    # and the check fails on a Role without one of them
    role = the_role()
    for rule in role["rules"]:
        if rule["resources"] == ["jobs"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "delete"]
    assert needed - granted(role) == {("batch", "jobs", "delete")}


def test_the_requests_the_code_really_sends_are_the_derived_ones(emulator: Emulator) -> None:
    """The deployer and the Job runner run against kmock; every request they sent (told
    apart from the test's own by the User-Agent) maps to a derived triple."""
    from servo.deploy import KubernetesDeployer, Target

    code, test = api_client(emulator, CODE_AGENT), api_client(emulator, TEST_AGENT)
    with code, test:
        deployer = KubernetesDeployer(client.CustomObjectsApi(code), namespace=NS, poll_s=0.05)
        target = Target("digits", 3, "pvc://rel-servo-data/versions/digits/3")
        deployed = deployer.apply(target)
        # a second apply would replace it (PUT): kmock serves no PUT; the real API server
        # of tests/test_k8s_deployer.py does
        kserve = client.CustomObjectsApi(test)
        ready = {"status": {"url": "http://digits-3.ml", "observedGeneration": 1,
                            "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
        kserve.patch_namespaced_custom_object_status(
            "serving.kserve.io", "v1beta1", NS, "inferenceservices", deployed.name, ready
        )
        assert deployer.wait_ready("digits", 3, timeout=10).url == "http://digits-3.ml"
        assert [d.version for d in deployer.versions("digits")] == [3]
        deployer.delete("digits", 3)
        controller = play_controller(test, {"type": "Complete", "reason": "CompletionsReached"})
        runner(code).run(spec())
        controller.join(10)
    sent = set()
    for method in ("get", "post", "put", "patch", "delete"):
        for request in emulator.requests(method):
            if request.headers.get("User-Agent") == CODE_AGENT:
                sent.add(rbac_attributes(method.upper(), request.url.path, dict(request.params)))
    needed = needed_by_the_code()
    assert sent <= needed, f"sent but not derived from the code: {sorted(sent - needed)}"
    # the run exercised all the code can ask for but replace (update), which kmock lacks
    assert needed - sent == {("serving.kserve.io", "inferenceservices", "update")}
