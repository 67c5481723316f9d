"""The Kubernetes deployer kept in line with the route table (`SERVO_DEPLOYER=kubernetes`):
a thread of the controller that, every few seconds,

- gives every routed version a KServe InferenceService (`KubernetesDeployer.apply`, its
  storageUri from the version's artifact URI: `servo.deploy.storage_uri`),
- records what its status says as the version's endpoint in the registry (ready with the
  status URL, or the conditions that are not True as the detail): the gateways call a
  ready one (`servo.routes`) and serve the folder themselves until then,
- deletes a managed InferenceService whose version has not been routed (nor is being
  deployed by the loop as a candidate) for `grace_s`, and its endpoint row.

Every failure (a DeployError, a registry that is down) is logged as a decision and
tried again next round; it never stops the thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from servo import logs
from servo.deploy import (
    Deployed,
    DeployError,
    KubernetesDeployer,
    Target,
    model_format,
    storage_uri,
)

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from servo.settings import Settings

log = logging.getLogger("servo.reconcile")

BACKEND = "kubernetes"
ACTOR = "reconciler"
Key = tuple[str, int]


@dataclass(frozen=True)
class KubernetesConfig:
    """How the controller runs versions on Kubernetes (the `SERVO_K8S_*` settings)."""

    namespace: str = "default"
    #: a ServingRuntime name; "" lets KServe pick its own for the format
    runtime: str = ""
    #: the storageUri prefix that stands for `data_dir` (servo.deploy.storage_uri)
    storage_prefix: str = ""
    #: servo up's data folder, where the versions' folders are
    data_dir: Path = Path()
    #: a candidate's InferenceService must be Ready this soon, or it is not shadowed
    ready_timeout_s: float = 600.0
    #: seconds between reconciler rounds
    every_s: float = 5.0
    #: an unrouted managed InferenceService lives this long before it is deleted
    grace_s: float = 60.0
    #: extra predictor fields (resources, minReplicas, serviceAccountName, ...)
    predictor: dict[str, Any] = field(default_factory=dict)

    def deployer(self) -> KubernetesDeployer:
        """A deployer with the in-cluster configuration (a kubeconfig outside a pod)."""
        return KubernetesDeployer(
            namespace=self.namespace, runtime=self.runtime or None, predictor=self.predictor
        )

    def target(self, model: str, version: int, artifact_uri: str) -> Target:
        """The InferenceService's Target of a version whose folder is `artifact_uri`."""
        parsed = urlparse(artifact_uri)
        folder = Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None
        return Target(
            model,
            version,
            storage_uri(artifact_uri, self.data_dir, self.storage_prefix),
            model_format(folder),
        )


def kubernetes_config(settings: Settings, data_dir: Path) -> KubernetesConfig | None:
    """The controller's Kubernetes configuration, None with the embedded deployer."""
    if settings.deployer != "kubernetes":
        return None
    return KubernetesConfig(
        namespace=settings.k8s_namespace,
        runtime=settings.k8s_runtime,
        storage_prefix=settings.k8s_storage_prefix,
        data_dir=data_dir,
        ready_timeout_s=settings.k8s_ready_timeout_s,
        every_s=settings.k8s_reconcile_s,
        grace_s=settings.k8s_unrouted_grace_s,
    )


def deploying(store: RegistryStore) -> set[Key]:
    """The candidates the loop is deploying now (loop state detail "deploying"): not
    routed yet, but theirs are wanted."""
    out: set[Key] = set()
    for model, row in store.loop_states().items():
        candidate = (row.get("detail") or {}).get("deploying") or {}
        if candidate.get("version") is not None:
            out.add((model, int(candidate["version"])))
    return out


def endpoint_of(deployed: Deployed) -> tuple[str | None, bool, str]:
    """(url, ready, detail) to record for a deployed version."""
    if deployed.ready and deployed.url:
        return deployed.url, True, ""
    problems = list(deployed.problems)
    if deployed.ready:
        problems.append("Ready, but the status has no URL")
    return None, False, "; ".join(problems) or "no status conditions reported yet"


class Reconciler:
    def __init__(
        self,
        store: RegistryStore,
        deployer: KubernetesDeployer,
        config: KubernetesConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.deployer = deployer
        self.config = config
        self.clock = clock
        #: unrouted managed versions: when this process first saw them so
        self._unrouted: dict[Key, float] = {}
        #: the Targets this process applied (a changed one is applied again)
        self._applied: dict[Key, Target] = {}
        #: the last error per (what, key), logged once until it changes
        self._errors: dict[tuple[str, Key], str] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    # the thread

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="servo-reconciler", daemon=True)
        self._thread.start()
        logs.decision("reconciler_started", namespace=self.config.namespace,
                      every_s=self.config.every_s, grace_s=self.config.grace_s)  # fmt: skip

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.reconcile()
            except Exception as exc:  # the registry or the API server is down: next round
                self._failed("round", ("", 0), exc)
            self._stopping.wait(self.config.every_s)

    # one round

    def reconcile(self) -> None:
        """One round: routed versions applied and their endpoints recorded, unrouted
        ones past the grace deleted."""
        routed: dict[Key, str] = {}
        for model, rows in self.store.deployments().items():
            for row in rows:
                if row.get("servable", True) and row["artifact_uri"]:
                    routed[(model, int(row["version"]))] = str(row["artifact_uri"])
        wanted = set(routed) | deploying(self.store)
        try:
            existing = {(d.model, d.version): d for d in self.deployer.managed()}
        except DeployError as exc:
            self._failed("list", ("", 0), exc)
            return
        self._clear("list", ("", 0))
        for key, uri in sorted(routed.items()):
            self._routed(key, uri, existing.get(key))
        now = self.clock()
        for key in list(self._unrouted):
            if key in wanted or key not in existing:
                self._unrouted.pop(key)
        for key, deployed in sorted(existing.items()):
            if key not in wanted:
                self._unused(key, deployed, now)
        for endpoint in self.store.endpoints():
            key = (endpoint.model, endpoint.version)
            if endpoint.backend == BACKEND and key not in existing and key not in wanted:
                self.store.delete_endpoint(*key, ACTOR, "its InferenceService is gone")
        self.rounds += 1

    def _routed(self, key: Key, uri: str, found: Deployed | None) -> None:
        model, version = key
        try:
            target = self.config.target(model, version, uri)
            if found is None or self._applied.get(key) != target:
                found = self.deployer.apply(target)
                self._applied[key] = target
                logs.decision("inference_service_applied", model=model, version=version,
                              name=found.name, storage_uri=target.storage_uri)  # fmt: skip
        except DeployError as exc:
            self._failed("apply", key, exc)
            detail = f"not deployed: {exc}"
            self._record(key, found, None, False, detail)
            return
        self._clear("apply", key)
        url, ready, detail = endpoint_of(found)
        self._record(key, found, url, ready, detail)

    def _record(
        self, key: Key, found: Deployed | None, url: str | None, ready: bool, detail: str
    ) -> None:
        model, version = key
        name = found.name if found is not None and found.name else f"{model}-v{version}"
        changed = self.store.set_endpoint(
            model, version, backend=BACKEND, name=name, url=url, ready=ready, detail=detail,
            actor=ACTOR,
        )  # fmt: skip
        if changed:
            level = logging.INFO if ready else logging.WARNING
            logs.decision("endpoint_ready" if ready else "endpoint_not_ready", level,
                          model=model, version=version, name=name, url=url,
                          detail=detail or None)  # fmt: skip

    def _unused(self, key: Key, deployed: Deployed, now: float) -> None:
        since = self._unrouted.setdefault(key, now)
        if now - since < self.config.grace_s:
            return
        model, version = key
        try:
            self.deployer.delete(model, version)
        except DeployError as exc:
            if exc.status != HTTPStatus.NOT_FOUND:  # gone already: what was wanted
                self._failed("delete", key, exc)
                return
        self._clear("delete", key)
        self._unrouted.pop(key, None)
        self._applied.pop(key, None)
        self.store.delete_endpoint(model, version, ACTOR, f"unrouted for {now - since:.0f} s")
        logs.decision("inference_service_deleted", model=model, version=version,
                      name=deployed.name, unrouted_s=round(now - since, 1))  # fmt: skip

    def _failed(self, what: str, key: Key, exc: Exception) -> None:
        message = str(exc) or type(exc).__name__
        if self._errors.get((what, key)) == message:
            return  # said already; tried again every round
        self._errors[(what, key)] = message
        model, version = key
        logs.decision("reconcile_failed", logging.WARNING, action=what,
                      model=model or None, version=version or None, error=message)  # fmt: skip

    def _clear(self, what: str, key: Key) -> None:
        self._errors.pop((what, key), None)
