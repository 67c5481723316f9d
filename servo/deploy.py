"""Where a model version runs: the `Deployer` interface and its two implementations.

- `EmbeddedDeployer`: in the gateway's own process (today's `servo up` / `servo serve
  --from-registry`): the registry's route table is the deployment, the gateway loads every
  version it names; nothing is created elsewhere.
- `KubernetesDeployer`: one KServe `InferenceService` (serving.kserve.io/v1beta1) per
  model version, named `<model>-v<version>` and labelled so that a selector finds a
  model's versions; the gateway stays in front of them (routing, canary, shadow).

Every failure is a `DeployError` naming the object and what the server said."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

GROUP, API_VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
MODEL_LABEL, VERSION_LABEL = "servo.dev/model", "servo.dev/version"
MANAGED_BY = ("app.kubernetes.io/managed-by", "servo")
FORMATS = ("onnx", "tensorflow")
#: DNS-1035 label (what KServe requires of an InferenceService name)
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAME_MAX = 63
#: KServe's model states that no waiting will fix
_TERMINAL = ("BlockedByFailedLoad", "InvalidSpec")


class DeployError(Exception):
    """A deployment failed; `status` is the API server's HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """One model version to deploy: its artifact folder's URI on the artifact store and
    its format ("tensorflow" for a version kept as a SavedModel)."""

    model: str
    version: int
    storage_uri: str
    model_format: str = "onnx"

    def __post_init__(self) -> None:
        if self.model_format not in FORMATS:
            raise DeployError(
                f"model format {self.model_format!r} is not one of {', '.join(FORMATS)}"
            )
        if not self.storage_uri:
            raise DeployError(f"{self.model} version {self.version}: no storage URI")
        service_name(self.model, self.version)


@dataclass(frozen=True)
class Deployed:
    """A deployed version as its backend sees it now."""

    model: str
    version: int
    ready: bool
    #: where it answers OIP: KServe's status.address.url (inside the cluster), else its url
    url: str | None = None
    #: the backend's object name and resourceVersion (Kubernetes), "" when embedded
    name: str = ""
    resource_version: str = ""
    #: the conditions that are not True, as "Type: reason: message" lines
    problems: tuple[str, ...] = field(default=())


class Deployer(Protocol):
    def apply(self, target: Target) -> Deployed: ...

    def delete(self, model: str, version: int) -> None: ...

    def versions(self, model: str) -> list[Deployed]: ...

    def wait_ready(self, model: str, version: int, timeout: float) -> Deployed: ...

    def status(self, model: str, version: int) -> Deployed: ...


def service_name(model: str, version: int) -> str:
    """`<model>-v<version>`, refused unless it is a DNS-1035 label: lowercase letters,
    digits and '-', starting with a letter, at most 63 characters."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DeployError(f"version {version!r} is not a positive integer")
    name = f"{model}-v{version}"
    if not _DNS_1035.fullmatch(model) or len(name) > _NAME_MAX:
        raise DeployError(
            f"model name {model!r} cannot name an InferenceService: {name!r} must be a "
            f"DNS-1035 label (lowercase letters, digits and '-', starting with a letter, "
            f"ending with a letter or digit, at most {_NAME_MAX} characters)"
        )
    return name


def storage_uri(artifact_uri: str, data_dir: Path, prefix: str) -> str:
    """The storageUri of a version's artifact folder: a file:// URI under `data_dir` (servo
    up's data folder) gets `prefix` in place of that folder (e.g. `pvc://servo-data/`, the
    volume that holds it); any other URI (s3://, gs://, pvc://) is the store's own and is
    kept. A file:// URI without a prefix, or outside `data_dir`, is refused: KServe's
    storage initializer cannot read the controller's disk."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("file", ""):
        return artifact_uri
    folder = Path(unquote(parsed.path))
    if not prefix:
        raise DeployError(
            f"artifact {artifact_uri} is a local folder: set SERVO_K8S_STORAGE_PREFIX (e.g. "
            f"pvc://servo-data/) to the volume holding {data_dir}"
        )
    try:
        relative = folder.resolve().relative_to(data_dir.resolve())
    except ValueError:
        raise DeployError(
            f"artifact {artifact_uri} is not under the data folder {data_dir} that "
            f"SERVO_K8S_STORAGE_PREFIX {prefix} stands for"
        ) from None
    return prefix.rstrip("/") + "/" + relative.as_posix()


def model_format(folder: Path | None) -> str:
    """ "tensorflow" for a version folder kept as a SavedModel (saved_model.pb, no
    model.onnx), else "onnx" (also when the folder cannot be read here)."""
    saved = folder is not None and (folder / "saved_model.pb").is_file()
    if saved and folder is not None and not (folder / "model.onnx").is_file():
        return "tensorflow"
    return "onnx"


# embedded


class RouteTable(Protocol):
    """What `EmbeddedDeployer` needs of `registry.store.RegistryStore`."""

    def deployments(self) -> dict[str, list[dict[str, Any]]]: ...


class EmbeddedDeployer:
    """Versions served inside the gateway process: the registry's route table
    (`RegistryStore.set_deployments` & co.) is the deployment, and the gateway loads what
    it names. `apply` creates nothing: the version is ready once the route table names it
    and it is servable; `delete` refuses while it is routed (change the routes first)."""

    def __init__(self, store: RouteTable, gateway_url: str = "") -> None:
        self._store = store
        self._url = gateway_url.rstrip("/")

    def _row(self, model: str, version: int, row: Mapping[str, Any]) -> Deployed:
        ready = bool(row["servable"])
        return Deployed(
            model=model,
            version=version,
            ready=ready,
            url=f"{self._url}/v2/models/{model}/versions/{version}" if self._url else None,
            problems=() if ready else (f"version {version} is not servable",),
        )

    def versions(self, model: str) -> list[Deployed]:
        rows = self._store.deployments().get(model, [])
        return [self._row(model, int(r["version"]), r) for r in rows]

    def _find(self, model: str, version: int) -> Deployed | None:
        return next((d for d in self.versions(model) if d.version == version), None)

    def status(self, model: str, version: int) -> Deployed:
        found = self._find(model, version)
        if found is None:
            raise DeployError(
                f"{model} version {version} is not in the route table: the embedded "
                f"gateway serves what `servo deploy` routes",
                HTTPStatus.NOT_FOUND,
            )
        return found

    def apply(self, target: Target) -> Deployed:
        return self.status(target.model, target.version)

    def delete(self, model: str, version: int) -> None:
        if self._find(model, version) is not None:
            raise DeployError(
                f"{model} version {version} is routed: remove it from the route table first",
                HTTPStatus.CONFLICT,
            )

    def wait_ready(self, model: str, version: int, timeout: float) -> Deployed:
        found = self.status(model, version)
        if not found.ready:
            raise DeployError(f"{model} version {version}: " + "; ".join(found.problems))
        return found


# Kubernetes


def _problems(status: Mapping[str, Any]) -> tuple[str, ...]:
    out = [
        f"{c.get('type')}: {c.get('reason') or 'no reason'}: {c.get('message') or 'no message'}"
        for c in status.get("conditions") or ()
        if c.get("status") != "True"
    ]
    failure = (status.get("modelStatus") or {}).get("lastFailureInfo") or {}
    if failure:
        out.append(f"model: {failure.get('reason')}: {failure.get('message')}")
    return tuple(out)


def _ready(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def _server_message(exc: Exception) -> str:
    """The Status object's message of an ApiException (its body), else str(exc)."""
    body = getattr(exc, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return str(message or body or exc)


def api_error(exc: Exception, what: str) -> DeployError:
    """DeployError for an ApiException answering `what` (e.g. "create digits-v3")."""
    status = getattr(exc, "status", None)
    message = _server_message(exc)
    if status == HTTPStatus.NOT_FOUND:
        text = f"{what}: not found (404): {message}"
    elif status == HTTPStatus.CONFLICT:
        text = f"{what}: conflict (409): {message}"
    elif status == HTTPStatus.BAD_REQUEST:
        text = f"{what}: refused by the API server (400): {message}"
    elif status == HTTPStatus.UNPROCESSABLE_ENTITY:
        text = f"{what}: refused by the InferenceService schema (422): {message}"
    elif status == HTTPStatus.FORBIDDEN and "exceeded quota" in message:
        text = f"{what}: namespace quota exceeded (403): {message}"
    elif status == HTTPStatus.FORBIDDEN:
        text = f"{what}: forbidden (403; check the service account's Role): {message}"
    else:
        text = f"{what}: API server answered {status}: {message}"
    return DeployError(text, status)


def load_kube_config(kubeconfig: str | None = None) -> None:
    """The kubernetes client's default configuration: `kubeconfig` when given, else the
    pod's service account (in a cluster), else ~/.kube/config."""
    from kubernetes import config

    if kubeconfig is not None:
        config.load_kube_config(kubeconfig)
        return
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class KubernetesDeployer:
    """One KServe InferenceService per version in `namespace`. `runtime`: None lets KServe
    pick its own runtime for the format; a name selects that ServingRuntime (Servo's own,
    installed by the chart). `predictor`: extra predictor fields (resources, minReplicas,
    serviceAccountName, ...), checked by the server's schema (strict field validation)."""

    def __init__(
        self,
        api: CustomObjectsApi | None = None,
        *,
        namespace: str = "default",
        runtime: str | None = None,
        predictor: Mapping[str, Any] | None = None,
        kubeconfig: str | None = None,
        conflict_retries: int = 3,
        poll_s: float = 0.2,
    ) -> None:
        if api is None:
            from kubernetes import client

            load_kube_config(kubeconfig)
            api = client.CustomObjectsApi()
        self.api = api
        self.namespace = namespace
        self.runtime = runtime
        self.predictor = dict(predictor or {})
        self.conflict_retries = conflict_retries
        self.poll_s = poll_s

    def manifest(self, target: Target) -> dict[str, Any]:
        name = service_name(target.model, target.version)
        model: dict[str, Any] = {
            "modelFormat": {"name": target.model_format},
            "protocolVersion": "v2",
            "storageUri": target.storage_uri,
        }
        if self.runtime:
            model["runtime"] = self.runtime
        return {
            "apiVersion": f"{GROUP}/{API_VERSION}",
            "kind": "InferenceService",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    MODEL_LABEL: target.model,
                    VERSION_LABEL: str(target.version),
                    MANAGED_BY[0]: MANAGED_BY[1],
                },
            },
            "spec": {"predictor": {**self.predictor, "model": model}},
        }

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(GROUP, API_VERSION, self.namespace, PLURAL, *args, **kwargs)
        except ApiException as exc:
            raise api_error(exc, what) from None

    def get(self, model: str, version: int) -> dict[str, Any]:
        name = service_name(model, version)
        obj: dict[str, Any] = self._call(f"get {name}", self.api.get_namespaced_custom_object, name)
        return obj

    def apply(self, target: Target, resource_version: str | None = None) -> Deployed:
        """Create the version's InferenceService, or replace its spec and Servo's labels
        (other labels and annotations are kept). `resource_version`: replace only that
        revision (a 409 if it changed since); without it, a concurrent change is re-read
        and retried `conflict_retries` times."""
        body = self.manifest(target)
        name = body["metadata"]["name"]
        if resource_version is None:
            try:
                created = self._call(
                    f"create {name}",
                    self.api.create_namespaced_custom_object,
                    body,
                    field_validation="Strict",
                )
                return self._deployed(created)
            except DeployError as exc:
                if exc.status != HTTPStatus.CONFLICT:
                    raise
        last = ""
        for _ in range(self.conflict_retries + 1):
            current = self.get(target.model, target.version)
            seen = current["metadata"]["resourceVersion"]
            if resource_version is not None and seen != resource_version:
                raise DeployError(
                    f"replace {name}: conflict (409): changed since resourceVersion "
                    f"{resource_version} (now {seen}); read it again before changing it",
                    HTTPStatus.CONFLICT,
                )
            current["metadata"].setdefault("labels", {}).update(body["metadata"]["labels"])
            current["spec"] = body["spec"]
            try:
                replaced = self._call(
                    f"replace {name}",
                    self.api.replace_namespaced_custom_object,
                    name,
                    current,
                    field_validation="Strict",
                )
                return self._deployed(replaced)
            except DeployError as exc:
                if exc.status != HTTPStatus.CONFLICT or resource_version is not None:
                    raise
                last = str(exc)
        raise DeployError(
            f"replace {name}: still conflicting after {self.conflict_retries} retries "
            f"(someone else keeps changing it): {last}",
            HTTPStatus.CONFLICT,
        )

    def delete(self, model: str, version: int) -> None:
        name = service_name(model, version)
        self._call(f"delete {name}", self.api.delete_namespaced_custom_object, name)

    def versions(self, model: str) -> list[Deployed]:
        """The model's versions deployed by Servo, by label selector, lowest first."""
        service_name(model, 1)
        found = self._call(
            f"list {model}",
            self.api.list_namespaced_custom_object,
            label_selector=f"{MODEL_LABEL}={model},{MANAGED_BY[0]}={MANAGED_BY[1]}",
        )
        return sorted((self._deployed(o) for o in found["items"]), key=lambda d: d.version)

    def managed(self) -> list[Deployed]:
        """Every InferenceService of the namespace that Servo manages (its managed-by
        label), whatever the model, by model and version."""
        found = self._call(
            "list managed InferenceServices",
            self.api.list_namespaced_custom_object,
            label_selector=f"{MANAGED_BY[0]}={MANAGED_BY[1]}",
        )
        return sorted(
            (self._deployed(o) for o in found["items"]), key=lambda d: (d.model, d.version)
        )

    def status(self, model: str, version: int) -> Deployed:
        return self._deployed(self.get(model, version))

    def wait_ready(self, model: str, version: int, timeout: float) -> Deployed:
        """Poll until the Ready condition is True (returns with the status URL). A model
        KServe gave up on (failed load, invalid spec) fails at once; after `timeout`
        seconds, fails with the conditions that are not True (image pull errors and the
        like come from KServe's reason and message there)."""
        started = time.monotonic()
        while True:
            deployed = self.poll_ready(model, version, timeout, time.monotonic() - started)
            if deployed is not None:
                return deployed
            time.sleep(self.poll_s)

    def poll_ready(
        self, model: str, version: int, timeout: float, waited: float
    ) -> Deployed | None:
        """One look of `wait_ready` for a caller that has waited `waited` seconds of
        `timeout` (the loop, once per check): the version once Ready, None while it may
        still become Ready, DeployError when KServe gave up or the time is up."""
        name = service_name(model, version)
        obj = self.get(model, version)
        deployed = self._deployed(obj)
        if deployed.ready:
            return deployed
        model_status = (obj.get("status") or {}).get("modelStatus") or {}
        transition = model_status.get("transitionStatus")
        if transition in _TERMINAL:
            raise DeployError(f"{name} failed ({transition}): " + "; ".join(deployed.problems))
        if waited >= timeout:
            why = "; ".join(deployed.problems) or "no status conditions reported yet"
            pull = "image pull failing; " if "ImagePull" in why else ""
            raise DeployError(f"{name} not Ready within {timeout:g} s: {pull}{why}")
        return None

    def _deployed(self, obj: Mapping[str, Any]) -> Deployed:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        status = obj.get("status") or {}
        problems = _problems(status)
        # a status written for an older spec says nothing about this one
        observed, generation = status.get("observedGeneration"), meta.get("generation")
        stale = observed is not None and generation is not None and observed < generation
        if stale:
            problems += (f"status is of generation {observed}, the spec is at {generation}",)
        return Deployed(
            model=labels.get(MODEL_LABEL, ""),
            version=int(labels.get(VERSION_LABEL, 0)),
            ready=_ready(status) and not stale,
            # the cluster-internal address (what a gateway pod calls) before the public URL
            url=(status.get("address") or {}).get("url") or status.get("url"),
            name=meta["name"],
            resource_version=meta.get("resourceVersion", ""),
            problems=problems,
        )
