"""The Kubernetes deployer wired into the loop, against the real Kubernetes API server of
../shared/k8s-testenv (tests/test_k8s_deployer.py starts it) and a real SQLite registry.
No KServe controller runs there: the test plays it (`KServe`): for a new
InferenceService it starts a real Servo model server on 127.0.0.1 on the version's folder
(found from its storageUri) and patches `status` (url, Ready), or writes a failed load.

Shown: the reconciler records each routed version's endpoint; a gateway in the
`servo serve --from-registry` form (the real Server with RegistryRouteSource) answers a
Ready version through the remote backend (the backend's own request counter moves) and a
not-Ready one from its folder (the detail names the problem); unrouting deletes the
InferenceService after the grace; the loop deploys a candidate and shadows it only once
Ready, and a failed load or a timeout is a loop event with the deployer's message."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.store import Invalid, NotFound, RegistryStore
from retrain.policy import parse_config
from serving.routes import RouteSource, StaticRouteSource
from serving.server import Server
from servo.deploy import DeployError, KubernetesDeployer, storage_uri
from servo.loop import Controller, ControllerConfig
from servo.reconcile import KubernetesConfig, Reconciler
from servo.routes import RegistryRouteSource, table_from_deployments
from servo.settings import Settings
from servo.worker import TrainOutcome
from tests.crash import wait_for as _wait_for
from tests.test_k8s_deployer import GROUP, PLURAL, VERSION, _cond, kube  # noqa: F401
from tests.test_routing import BODY

PREFIX = "pvc://servo-data/"


def wait_for(condition: Callable[[], Any], timeout: float = 120) -> Any:
    """tests.crash.wait_for (a hang guard) polling every 50 ms: the conditions ask the
    API server."""
    return _wait_for(condition, timeout, every=0.05)


# a real Servo server on its own thread and event loop


class ServoThread:
    def __init__(self, source: RouteSource):
        settings = Settings(http_port=0, grpc_enabled=False, monitor_every_s=0)
        self.server = Server(settings.serving_config(), source)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.run(),), daemon=True
        )
        self.thread.start()
        wait_for(lambda: self.server.http_port is not None)  # a hang guard, not a speed test
        self.url = f"http://127.0.0.1:{self.server.http_port}"

    def requests(self, model: str, version: str) -> float:
        """The server's own count of requests that `model` `version` answered."""
        total = 0.0
        for family in self.server.registry.collect():
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "servo_requests_total" and (
                    labels.get("model"), labels.get("version")) == (model, version):  # fmt: skip
                    total += sample.value
        return total

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def champion_served_by(gateway: ServoThread, url: str | None) -> bool:
    """Whether the gateway's digits champion (version 1) is loaded from `url` (None: its
    folder) and its route installed."""
    entry = gateway.server.repository.find("digits", "1")
    live = gateway.server.router.state.live.get("digits")
    return entry is not None and entry.url == url and live is not None and (
        live.champion is entry.model)  # fmt: skip


# KServe's part, played


class KServe:
    """Plays KServe's controller: `play()` handles each InferenceService without a status
    yet: a version in `fail` gets a failed load, one in `silent` nothing, any other a real
    Servo model server on the folder its storageUri names (under `data`) and Ready."""

    def __init__(self, deployer: KubernetesDeployer, data: Path):
        self.deployer = deployer
        self.data = data
        self.fail: set[tuple[str, int]] = set()
        self.silent: set[tuple[str, int]] = set()
        self.backends: dict[str, ServoThread] = {}

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.deployer.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, "default", PLURAL, name, {"status": status}
        )

    def play(self) -> None:
        found = self.deployer.api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
        for obj in found["items"]:
            name, labels = obj["metadata"]["name"], obj["metadata"]["labels"]
            key = (labels["servo.dev/model"], int(labels["servo.dev/version"]))
            if obj.get("status") or key in self.silent:
                continue
            if key in self.fail:
                message = "failed to load model: model.onnx: protobuf parsing failed"
                self._status(name, {
                    "conditions": [
                        _cond("PredictorReady", "False", "ModelLoadFailed", message),
                        _cond("Ready", "False", "ModelLoadFailed", message)],
                    "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                    "lastFailureInfo": {"reason": "ModelLoadFailed",
                                                        "message": message}},
                })  # fmt: skip
                continue
            uri = obj["spec"]["predictor"]["model"]["storageUri"]
            assert uri.startswith(PREFIX), uri
            folder = self.data / uri.removeprefix(PREFIX)
            backend = ServoThread(StaticRouteSource([folder]))
            self.backends[name] = backend
            wait_for(lambda b=backend: b.server.dataplane.ready())  # type: ignore[misc]
            # KServe's public URL, and the address inside the cluster (what the gateway calls)
            self._status(name, {"url": f"http://{name}.servo.example.com",
                                "address": {"url": backend.url}, "conditions": [
                _cond("PredictorReady", "True"), _cond("Ready", "True")]})  # fmt: skip

    def unready(self, name: str, message: str) -> None:
        self._status(
            name,
            {
                "conditions": [
                    _cond("PredictorReady", "False", "PodEvicted", message),
                    _cond("Ready", "False", "PodEvicted", message),
                ]
            },
        )

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()


@pytest.fixture
def deployer(kube: Any) -> Iterator[KubernetesDeployer]:  # noqa: F811
    from kubernetes import client

    made = KubernetesDeployer(client.CustomObjectsApi(kube), poll_s=0.05)
    yield made
    for deployed in made.managed():  # each test starts with none
        made.delete(deployed.model, deployed.version)


@pytest.fixture
def data(model_root: Path) -> Path:
    """servo up's data folder: the version folders are under it (digits/1, digits/2)."""
    return model_root


@pytest.fixture
def store(tmp_path: Path, data: Path) -> Iterator[RegistryStore]:
    made = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    made.create_schema()
    for version in (1, 2):
        made.register_version("digits", (data / "digits" / str(version)).as_uri())
    yield made
    made.close()


@pytest.fixture
def kserve(deployer: KubernetesDeployer, data: Path) -> Iterator[KServe]:
    played = KServe(deployer, data)
    yield played
    played.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# the registry's endpoints and the route table (no API server needed)


def test_endpoints_give_the_gateway_a_url_and_move_the_revision(
    store: RegistryStore, data: Path
) -> None:
    store.set_deployments("digits", [(1, "champion", 100.0), (2, "other", 100.0)], actor="ops")
    before = store.deployments_revision()
    assert [r["url"] for r in store.deployments()["digits"]] == [None, None]
    assert store.set_endpoint("digits", 1, backend="kubernetes", name="digits-v1", url=None,
                              ready=False, detail="no status yet")  # fmt: skip
    assert [r["url"] for r in store.deployments()["digits"]] == [None, None]  # not ready
    not_ready = store.deployments_revision()
    assert not_ready != before
    url = "http://digits-v1.servo.svc.cluster.local"
    assert store.set_endpoint("digits", 1, backend="kubernetes", name="digits-v1", url=url,
                              ready=True)  # fmt: skip
    ready = store.deployments_revision()
    assert ready != not_ready
    rows = store.deployments()["digits"]
    assert [r["url"] for r in rows] == [url, None]
    # the same again writes nothing: the gateways do not re-read for nothing
    assert not store.set_endpoint("digits", 1, backend="kubernetes", name="digits-v1", url=url,
                                  ready=True)  # fmt: skip
    assert store.deployments_revision() == ready
    (only,) = store.endpoints("digits")
    assert (only.version, only.name, only.url, only.ready, only.detail) == (
        1, "digits-v1", url, True, "")  # fmt: skip
    table = table_from_deployments(store.deployments())
    route = table.models["digits"]
    assert route.champion.url == url and route.champion.path == data / "digits" / "1"
    assert route.others[0].url is None and route.others[0].path == data / "digits" / "2"
    with pytest.raises(Invalid, match="a ready endpoint needs a url"):
        store.set_endpoint("digits", 2, backend="kubernetes", name="digits-v2", url=None,
                           ready=True)  # fmt: skip
    with pytest.raises(NotFound, match="no version 9"):
        store.set_endpoint("digits", 9, backend="kubernetes", name="digits-v9", url=None,
                           ready=False)  # fmt: skip
    assert store.delete_endpoint("digits", 1, reason="gone")
    assert not store.delete_endpoint("digits", 1)
    assert store.deployments_revision() != ready
    assert [r["url"] for r in store.deployments()["digits"]] == [None, None]
    actions = [e["action"] for e in store.audit(subject="digits")]
    assert actions == ["deploy", "endpoint_set", "endpoint_set", "endpoint_delete"]


def test_storage_uri_maps_the_data_folder_to_the_volume(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "models" / "digits" / "3"
    assert storage_uri(folder.as_uri(), tmp_path / "data", PREFIX) == (
        "pvc://servo-data/models/digits/3"
    )
    assert storage_uri("s3://bucket/digits/3", tmp_path, PREFIX) == "s3://bucket/digits/3"
    with pytest.raises(DeployError, match="set SERVO_K8S_STORAGE_PREFIX"):
        storage_uri(folder.as_uri(), tmp_path / "data", "")
    with pytest.raises(DeployError, match="not under the data folder"):
        storage_uri((tmp_path / "elsewhere").as_uri(), tmp_path / "data", PREFIX)


def test_settings_name_the_kubernetes_deployer(monkeypatch: pytest.MonkeyPatch) -> None:
    from servo import settings as settings_module
    from servo.reconcile import kubernetes_config

    monkeypatch.setattr(settings_module, "NAMESPACE_FILE", Path("/nonexistent/namespace"))
    assert Settings().k8s_namespace == "default"
    assert kubernetes_config(Settings(), Path("/data")) is None  # embedded by default
    monkeypatch.setenv("SERVO_DEPLOYER", "kubernetes")
    monkeypatch.setenv("SERVO_K8S_NAMESPACE", "servo")
    monkeypatch.setenv("SERVO_K8S_RUNTIME", "servo-runtime")
    monkeypatch.setenv("SERVO_K8S_STORAGE_PREFIX", PREFIX)
    made = kubernetes_config(Settings(), Path("/data"))
    assert made is not None
    assert (made.namespace, made.runtime, made.storage_prefix, made.data_dir) == (
        "servo", "servo-runtime", PREFIX, Path("/data"))  # fmt: skip
    assert (made.ready_timeout_s, made.grace_s) == (600.0, 60.0)
    monkeypatch.setenv("SERVO_DEPLOYER", "kserve")
    with pytest.raises(ValueError, match="embedded"):
        Settings()


# the reconciler and a gateway, on the real API server


def test_reconciler_endpoints_remote_answers_fallback_and_grace(
    deployer: KubernetesDeployer, kserve: KServe, store: RegistryStore, data: Path
) -> None:
    clock = Clock()
    config = KubernetesConfig(storage_prefix=PREFIX, data_dir=data, grace_s=60.0)
    reconciler = Reconciler(store, deployer, config, clock=clock)
    store.set_deployments("digits", [(1, "champion", 100.0), (2, "other", 100.0)], actor="ops")
    reconciler.reconcile()
    made = {d.name: d for d in deployer.managed()}
    assert sorted(made) == ["digits-v1", "digits-v2"]
    storage = deployer.get("digits", 2)["spec"]["predictor"]["model"]["storageUri"]
    assert storage == "pvc://servo-data/digits/2"
    assert [(e.version, e.ready, e.detail) for e in store.endpoints()] == [
        (1, False, "no status conditions reported yet"),
        (2, False, "no status conditions reported yet"),
    ]
    gateway = ServoThread(RegistryRouteSource(store, poll_s=0.05))
    try:
        wait_for(gateway.server.dataplane.ready)
        assert gateway.server.repository.find("digits", "1").url is None  # its folder, for now
        kserve.fail.add(("digits", 2))
        kserve.play()  # v1: a real model server and Ready; v2: a failed load
        reconciler.reconcile()
        backend = kserve.backends["digits-v1"]
        ends = {e.version: e for e in store.endpoints()}
        assert (ends[1].ready, ends[1].url, ends[1].detail) == (True, backend.url, "")
        assert ends[2].ready is False and ends[2].url is None
        assert "ModelLoadFailed" in ends[2].detail and "protobuf parsing failed" in ends[2].detail

        # the gateway follows: v1 through the remote backend, v2 still from its folder
        wait_for(lambda: champion_served_by(gateway, backend.url))
        assert gateway.server.repository.find("digits", "2").url is None
        with httpx.Client(base_url=gateway.url) as http:
            before = backend.requests("digits", "1")
            for _ in range(3):
                answer = http.post("/v2/models/digits/infer", content=BODY)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model_version"] == "1"
            # it reached the backend (which counts an answer just after sending it)
            wait_for(lambda: backend.requests("digits", "1") == before + 3)
            direct = httpx.post(f"{backend.url}/v2/models/digits/infer", content=BODY)
            assert answer.json()["outputs"] == direct.json()["outputs"]
            local = http.post("/v2/models/digits/versions/2/infer", content=BODY)
            assert local.status_code == 200 and local.json()["model_version"] == "2"
            assert backend.requests("digits", "2") == 0
            # v1's InferenceService stops being Ready: the gateway serves its folder again
            kserve.unready("digits-v1", "the predictor's pod was evicted")
            reconciler.reconcile()
            assert "evicted" in store.endpoints()[0].detail
            wait_for(lambda: champion_served_by(gateway, None))
            served = backend.requests("digits", "1")
            assert http.post("/v2/models/digits/infer", content=BODY).status_code == 200
            assert backend.requests("digits", "1") == served
    finally:
        gateway.close()


def test_unrouted_inference_services_go_after_the_grace(
    deployer: KubernetesDeployer, store: RegistryStore, data: Path
) -> None:
    clock = Clock()
    config = KubernetesConfig(storage_prefix=PREFIX, data_dir=data, grace_s=60.0)
    reconciler = Reconciler(store, deployer, config, clock=clock)
    store.set_deployments("digits", [(1, "champion", 100.0), (2, "other", 100.0)], actor="ops")
    reconciler.reconcile()
    assert [e.version for e in store.endpoints()] == [1, 2]
    # unrouted: kept through the grace, then deleted with its endpoint
    store.set_deployments("digits", [(1, "champion", 100.0)], actor="ops")
    reconciler.reconcile()
    clock.now += 59.0
    reconciler.reconcile()
    assert [d.version for d in deployer.managed()] == [1, 2]
    clock.now += 1.0
    reconciler.reconcile()
    assert [d.version for d in deployer.managed()] == [1]
    with pytest.raises(DeployError, match="not found"):
        deployer.get("digits", 2)
    assert [e.version for e in store.endpoints()] == [1]
    # routed again within the grace: kept, and its timer starts over
    both, one = [(1, "champion", 100.0), (2, "other", 100.0)], [(1, "champion", 100.0)]
    for rows, seconds in ((both, 0.0), (one, 50.0), (both, 0.0), (one, 50.0)):
        store.set_deployments("digits", rows, actor="ops")
        reconciler.reconcile()
        clock.now += seconds
    reconciler.reconcile()  # 100 s since it was first unrouted, 50 s since the last time
    assert [d.version for d in deployer.managed()] == [1, 2]
    # someone deletes a routed one: the next round creates it again
    uid = deployer.get("digits", 1)["metadata"]["uid"]
    deployer.delete("digits", 1)
    reconciler.reconcile()
    assert deployer.get("digits", 1)["metadata"]["uid"] != uid


def test_reconciler_errors_are_decisions_and_retried(
    deployer: KubernetesDeployer, store: RegistryStore, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    outside = store.register_version("digits", (tmp_path / "digits" / "3").as_uri())
    store.set_deployments("digits", [(outside, "champion", 100.0)], actor="ops")
    config = KubernetesConfig(storage_prefix=PREFIX, data_dir=tmp_path / "data")
    reconciler = Reconciler(store, deployer, config)
    with caplog.at_level("WARNING", logger="servo"):
        reconciler.reconcile()
        reconciler.reconcile()  # said once, tried again
    failed = [r for r in caplog.records if r.getMessage() == "reconcile_failed"]
    assert len(failed) == 1
    assert "not under the data folder" in failed[0].fields["error"]  # type: ignore[attr-defined]
    (endpoint,) = store.endpoints()
    assert not endpoint.ready and "not under the data folder" in endpoint.detail
    assert deployer.managed() == []
    assert reconciler.rounds == 2


# the loop: a candidate deployed, shadowed once Ready


class Scheduler:
    def on(self, name: str, fn: Callable[[str], None]) -> None:
        pass

    def start(self) -> None:
        pass

    def schedule_checks(self, model: str, every_s: float) -> None:
        pass

    def schedule_cron(self, model: str, cron: str | None) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class FinishedJob:
    """A training worker that has finished with `version` (the worker itself is
    tests/test_worker.py's; here the loop's next steps are under test)."""

    version: int

    def poll(self) -> TrainOutcome:
        return TrainOutcome("succeeded", None, self.version, False, {}, None, "")

    def stop(self) -> TrainOutcome:
        return self.poll()


def _controller(
    store: RegistryStore, deployer: KubernetesDeployer, data: Path, tmp_path: Path,
    clock: Clock, timeout_s: float = 600.0,
) -> Controller:  # fmt: skip
    kubernetes = KubernetesConfig(storage_prefix=PREFIX, data_dir=data, ready_timeout_s=timeout_s,
                                  every_s=0.05, grace_s=0.0)  # fmt: skip
    settings = ControllerConfig(directory=tmp_path, registry_url=str(store.engine.url),
                                payload_root=tmp_path / "payload",
                                kubernetes=kubernetes)  # fmt: skip
    return Controller(store, config=parse_config("{}"), reports=object(),  # type: ignore[arg-type]
                      rollout=object(), scheduler=Scheduler(), settings=settings,  # type: ignore[arg-type]
                      clock=clock, deployer=deployer)  # fmt: skip


def _retrained(controller: Controller, store: RegistryStore, version: int) -> None:
    """The model as a finished retrain leaves it: retraining, its worker done."""
    store.set_loop_state("digits", "retraining", {"job": {"trigger": "manual"}})
    controller._jobs["digits"] = FinishedJob(version)


def _events(store: RegistryStore) -> list[dict[str, Any]]:
    """The loop's events since the retrain finished."""
    return [
        e for e in store.loop_events("digits") if e["kind"] not in ("check", "retrain_finished")
    ]


def test_the_loop_shadows_a_candidate_only_once_ready(
    deployer: KubernetesDeployer, kserve: KServe, store: RegistryStore, data: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    store.set_deployments("digits", [(1, "champion", 100.0)], actor="ops")
    clock = Clock()
    controller = _controller(store, deployer, data, tmp_path, clock)
    controller.start()  # the reconciler thread too (grace 0: only wanted versions live)
    try:
        assert controller.reconciler is not None
        wait_for(lambda: [d.version for d in deployer.managed()] == [1])
        kserve.silent.add(("digits", 2))  # KServe has not got to it yet
        _retrained(controller, store, 2)
        controller.tick("digits")
        state = store.loop_states()["digits"]
        assert state["state"] == "retraining"
        assert state["detail"]["deploying"]["version"] == 2
        assert [e["kind"] for e in _events(store)] == ["candidate_deploying"]
        assert _events(store)[0]["detail"]["storage_uri"] == "pvc://servo-data/digits/2"
        clock.now += 30
        controller.tick("digits")  # not Ready yet: still waiting, not shadowed
        rounds = controller.reconciler.rounds
        wait_for(lambda: controller.reconciler.rounds > rounds + 1)  # type: ignore[union-attr]
        assert [d.version for d in deployer.managed()] == [1, 2]  # the reconciler keeps it
        deployer.delete("digits", 2)  # gone while deploying (by hand, or a kill before apply)
        controller.tick("digits")
        assert [d.version for d in deployer.managed()] == [1, 2]  # the loop applied it again
        assert store.loop_states()["digits"]["state"] == "retraining"
        assert [r["version"] for r in store.deployments()["digits"]] == [1]
        kserve.silent.clear()
        kserve.play()
        clock.now += 1
        controller.tick("digits")
        assert store.loop_states()["digits"]["state"] == "shadowing"
        kinds = [e["kind"] for e in _events(store)]
        assert kinds == ["candidate_deploying", "candidate_ready", "shadow_started"]
        assert _events(store)[1]["detail"]["url"] == kserve.backends["digits-v2"].url
        assert [(r["version"], r["role"]) for r in store.deployments()["digits"]] == [
            (1, "champion"), (2, "shadow")]  # fmt: skip
        # its endpoint is recorded with the shadow: the gateways call it from the start
        assert store.deployments()["digits"][1]["url"] == kserve.backends["digits-v2"].url
    finally:
        controller.stop()
    assert controller.reconciler._thread is None  # stopped with the controller


@pytest.mark.parametrize("how", ["failed_load", "timeout"])
def test_a_candidate_not_ready_is_not_shadowed(
    how: str, deployer: KubernetesDeployer, kserve: KServe, store: RegistryStore, data: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    store.set_deployments("digits", [(1, "champion", 100.0)], actor="ops")
    clock = Clock()
    controller = _controller(store, deployer, data, tmp_path, clock, timeout_s=120.0)
    (kserve.fail if how == "failed_load" else kserve.silent).add(("digits", 2))
    try:
        _retrained(controller, store, 2)
        controller.tick("digits")
        kserve.play()
        controller.stop()  # a restart waits on, to the same deadline (kept in the registry)
        controller = _controller(store, deployer, data, tmp_path, clock, timeout_s=120.0)
        clock.now += 60
        controller.tick("digits")
        if how == "timeout":  # within the timeout: waiting on
            assert store.loop_states()["digits"]["state"] == "retraining"
            clock.now += 60
            controller.tick("digits")
        assert store.loop_states()["digits"]["state"] == "watching"
        failed = _events(store)[-1]
        assert failed["kind"] == "deploy_failed" and failed["detail"]["version"] == 2
        error = failed["detail"]["error"]
        if how == "failed_load":
            assert "digits-v2 failed (BlockedByFailedLoad)" in error
            assert "protobuf parsing failed" in error
        else:
            assert "digits-v2 not Ready within 120 s" in error
        assert "shadow_started" not in [e["kind"] for e in _events(store)]
        assert [r["version"] for r in store.deployments()["digits"]] == [1]
        assert store.loop_states()["digits"]["detail"].get("deploying") is None
    finally:
        controller.stop()
