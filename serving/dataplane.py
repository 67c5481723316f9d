"""The data plane shared by REST and gRPC: route, validate, run, record, answer.

Nothing that fails validation here reaches ONNX Runtime.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import numpy as np

from monitors.payload_log import PREDICTIONS
from serving import feedback as feedback_mod
from serving.errors import (
    InferenceFailed,
    InvalidInput,
    ModelNotReady,
    ServingError,
)
from serving.feedback import ANONYMOUS, Caller, FeedbackService
from serving.ids import RequestIds
from serving.labels import Label
from serving.offloop import OffloopDecoder
from serving.payload_log import PayloadLog
from serving.recorder import Recorder
from serving.repository import ModelRepository, State
from serving.router import Router, bucket
from serving.routes import CHAMPION
from serving.runtime import OnnxModel, Plan
from serving.shadow import ShadowCopy, ShadowRunner
from serving.signature import TensorSpec
from serving.types import MAX_ID_CHARS, InferRequest, InferResponse, Tensor

log = logging.getLogger("servo.serving")

UNKNOWN = "_unknown"


class DataPlane:
    def __init__(
        self,
        *,
        repository: ModelRepository,
        router: Router,
        recorder: Recorder,
        shadows: ShadowRunner,
        server_name: str,
        server_version: str,
        recording: bool = True,
        payload_log: PayloadLog | None = None,
        feedback_index_size: int = 100_000,
        offloop: OffloopDecoder | None = None,
    ):
        self.repository = repository
        self.router = router
        self.recorder = recorder
        self.shadows = shadows
        self.server_name = server_name
        self.server_version = server_version
        #: metrics on (the default); off only to measure what they cost
        self.recording = recording
        self.payload_log = payload_log
        self.feedbacks = FeedbackService(
            repository=repository,
            router=router,
            recorder=recorder,
            payload_log=payload_log,
            index_size=feedback_index_size,
        )
        self.feedback_index = self.feedbacks.index
        self._ids = RequestIds()
        #: decodes bodies over its threshold in a worker process (the endpoints ask it)
        self.offloop = offloop if offloop is not None else OffloopDecoder(0)

    # health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Every routed model's champion serves. A candidate, canary, shadow or other
        version that failed to load does not make the server unready (a readiness probe
        would take every replica out for one bad candidate): it shows on its own ready
        endpoint and in servo_model_load_failures_total."""
        state = self.router.state
        return bool(state.champions) and all(name in state.live for name in state.champions)

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": self.server_name,
            "version": self.server_version,
            "extensions": ["binary_tensor_data"],
        }

    def _resolve_version(self, name: str, version: str | None) -> str:
        return self.router.champion_version(name) if version is None else version

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.model_readiness(name, version)[0]

    def model_readiness(self, name: str, version: str | None = None) -> tuple[bool, str | None]:
        """Whether the version serves, and if not, why (its state and load error)."""
        entry = self.repository.entry(name, self._resolve_version(name, version))
        if entry.state is State.READY:
            return True, None
        why = f"version {entry.version} is {entry.state.value}"
        return False, f"{why}: {entry.error}" if entry.error else why

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        model = self.repository.model(name, self._resolve_version(name, version))
        if version is None:
            versions = [
                v
                for v in self.repository.versions(name)
                if self.repository.entry(name, v).state is State.READY
            ]
        else:
            versions = [version]
        return {
            "name": model.name,
            "versions": versions,
            "platform": model.platform,
            **model.signature.to_json(),
        }

    # inference

    async def infer(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        routing_key: str | None = None,
    ) -> InferResponse:
        if request.id is None:
            request.id = self._ids.next()
        elif len(request.id) > MAX_ID_CHARS:  # ids are kept (feedback index, payload log)
            raise InvalidInput(
                f"'id' must be at most {MAX_ID_CHARS} characters (got {len(request.id)})"
            )
        route = None
        key_bucket = 0
        if version is None:
            route = self.router.live(name)
            if route is None:  # unknown (404), or its champion failed to load (503, why)
                self.repository.model(name, self.router.champion_version(name))
                raise ModelNotReady(f"model '{name}' has no route")
            if route.canary is not None or route.shadows:
                key_bucket = bucket(routing_key or request.id)
            model, variant = route.choose(key_bucket)
        else:
            model = self.repository.model(name, version)
            variant = self.router.role(name, version)
        log = self.payload_log
        try:
            feeds, output_names, specs = self._check(model, request)
            started = time.perf_counter() if log is not None else 0.0
            arrays = await model.predict(feeds, output_names)
        except ServingError as exc:
            exc.answered_by = (model.version, variant)
            raise
        if model.feature_sink is not None and model.profile is not None:
            model.feature_sink.add(feeds[model.profile.input])
        label_at, probs_at = (
            model.label_positions if output_names is None else model.plan.positions(output_names)
        )
        if self.recording and (label_at >= 0 or probs_at >= 0):
            self.recorder.predictions_for((name, model.version, variant)).add(
                arrays[label_at] if label_at >= 0 else None,
                arrays[probs_at] if probs_at >= 0 else None,
            )
        self.feedback_index.remember(
            request.id, name, model.version, arrays[label_at] if label_at >= 0 else None
        )
        if log is not None and (log.config.sample >= 1.0 or random.random() < log.config.sample):
            log.submit(
                PREDICTIONS,
                {
                    "id": request.id,
                    "time": feedback_mod.now(),
                    "model": name,
                    "version": model.version,
                    "variant": variant,
                    "inputs": [(t.name, t.datatype, t.data) for t in request.inputs],
                    "outputs": [
                        (s.name, s.datatype, a) for s, a in zip(specs, arrays, strict=True)
                    ],
                    "latency_s": time.perf_counter() - started,
                },
            )
        if route is not None and variant == CHAMPION and route.shadows:
            outputs = {spec.name: array for spec, array in zip(specs, arrays, strict=True)}
            for shadow, shadow_cut in route.shadows:
                if key_bucket < shadow_cut:
                    self.shadows.submit(
                        ShadowCopy(
                            name, shadow, feeds, outputs, model.plan.label_output, request.id
                        )
                    )
        return InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=[
                Tensor(spec.name, spec.datatype, list(array.shape), array)
                for spec, array in zip(specs, arrays, strict=True)
            ],
            variant=variant,
        )

    def _check(
        self, model: OnnxModel, request: InferRequest
    ) -> tuple[dict[str, Any], list[str] | None, tuple[TensorSpec, ...]]:
        plan: Plan = model.plan
        feeds: dict[str, Any] = {}
        for tensor in request.inputs:
            found = plan.inputs.get(tensor.name)
            if found is None:
                raise InvalidInput(
                    f"model '{model.name}' has no input '{tensor.name}' "
                    f"(inputs: {', '.join(plan.inputs)})"
                )
            spec, finite_only = found
            if tensor.name in feeds:
                raise InvalidInput(f"input '{tensor.name}' appears more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input '{tensor.name}': expected datatype {spec.datatype}, "
                    f"got {tensor.datatype}"
                )
            data = tensor.data
            if not spec.accepts_shape(tensor.shape):
                width = plan.flat_rows.get(tensor.name)
                rows = tensor.shape[0] if tensor.shape else -1
                if (
                    width is None
                    or len(tensor.shape) != 2
                    or tensor.shape[1] != width
                    or spec.shape[0] not in (-1, rows)
                ):
                    flat = (
                        ""
                        if width is None
                        else f" or its rows flattened [{spec.shape[0]}, {width}]"
                    )
                    raise InvalidInput(
                        f"input '{tensor.name}': expected shape {list(spec.shape)}{flat} "
                        f"(-1: any size), got {tensor.shape}"
                    )
                data = data.reshape(rows, *spec.shape[1:])  # row-major: a view
            if not data.size:
                raise InvalidInput(
                    f"input '{tensor.name}': shape {tensor.shape} has no elements "
                    "(an empty batch is not run)"
                )
            # one reduction on the common path; a non-finite sum (also reached by overflow
            # of large finite values) takes the exact check
            if finite_only and not math.isfinite(data.sum(dtype=np.float64)):
                finite = np.isfinite(data)
                if not finite.all():
                    index = int(np.argmin(finite.reshape(-1)))
                    raise InvalidInput(
                        f"input '{tensor.name}': NaN or Inf at flat index {index}; "
                        "this input only takes finite values"
                    )
            feeds[tensor.name] = data
        if len(feeds) != len(plan.inputs):
            missing = [n for n in plan.inputs if n not in feeds]
            raise InvalidInput(f"model '{model.name}' needs input(s) {', '.join(missing)}")
        if not request.outputs:
            return feeds, None, plan.output_specs
        output_names: list[str] = []
        for wanted in request.outputs:
            if wanted.name not in plan.outputs:
                raise InvalidInput(
                    f"model '{model.name}' has no output '{wanted.name}' "
                    f"(outputs: {', '.join(plan.outputs)})"
                )
            if wanted.name in output_names:
                raise InvalidInput(f"output '{wanted.name}' is requested more than once")
            output_names.append(wanted.name)
        return feeds, output_names, tuple(plan.outputs[n] for n in output_names)

    # feedback (serving.feedback: validation, joins, durable storage, the writer check)

    async def feedback(
        self, name: str, labels: list[Label], caller: Caller = ANONYMOUS
    ) -> dict[str, Any]:
        return await self.feedbacks.submit(name, labels, caller)

    # request accounting: every infer answer of every protocol is counted here, through
    # record_success or failed (the endpoints see parse errors too)

    def record_success(self, response: InferResponse, protocol: str, started: float) -> None:
        if not self.recording:
            return
        labels = (response.model_name, response.model_version, response.variant, protocol)
        self.recorder.request(labels, "200", time.perf_counter() - started)

    def failed(
        self, name: str, version: str | None, protocol: str, exc: Exception, started: float
    ) -> ServingError:
        """Count a failed request and return the error to answer: `exc` itself when it is a
        ServingError, else (a bug) a logged 500 that says no more than that."""
        if isinstance(exc, ServingError):
            error = exc
        else:
            log.error("unhandled error answering %s over %s", name, protocol, exc_info=exc)
            error = InferenceFailed("internal server error")
        self.record_failure(name, version, protocol, error, started)
        return error

    def record_failure(
        self, name: str, version: str | None, protocol: str, error: ServingError, started: float
    ) -> None:
        if not self.recording:
            return
        known = self.repository.find(name, version) if version is not None else None
        if version is None and error.answered_by is not None:  # routed, then failed
            labels = (name, *error.answered_by, protocol)
        elif version is None and name in self.router.state.champions:
            labels = (name, "", "", protocol)
        elif known is not None:
            labels = (name, known.version, self.router.role(name, known.version), protocol)
        else:  # never a label value taken from an unknown client string
            labels = (name if name in self.router.state.champions else UNKNOWN, "", "", protocol)
        self.recorder.request(labels, str(int(error.status)), time.perf_counter() - started)
