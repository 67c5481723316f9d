"""The data plane shared by REST and gRPC: route, validate, run, record, answer.

Nothing that fails validation here reaches ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import random
import time
from typing import Any

import numpy as np
import orjson

from monitors.payload_log import FEEDBACK, PREDICTIONS
from serving import feedback as feedback_mod
from serving.errors import InferenceFailed, InvalidInput, ModelNotFound, ModelNotReady, ServingError
from serving.feedback import FeedbackIndex, Label
from serving.model_folder import valid_name
from serving.offloop import OffloopDecoder
from serving.payload_log import PayloadLog
from serving.recorder import FEEDBACK_DELAY_BUCKETS, Recorder
from serving.repository import ModelRepository, State, shown
from serving.router import Router, bucket
from serving.routes import CHAMPION
from serving.runtime import OnnxModel, Plan
from serving.shadow import ShadowCopy, ShadowRunner
from serving.signature import TensorSpec
from serving.types import MAX_ID_CHARS, InferRequest, InferResponse, Tensor

log = logging.getLogger("servo.serving")

UNKNOWN = "_unknown"


class RequestIds:
    """Ids for requests that bring none: a random per-process prefix and a counter
    (unique without a system call per request)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


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
        self.feedback_index = FeedbackIndex(feedback_index_size)
        self._ids = RequestIds()
        #: decodes bodies over its threshold in a worker process (the endpoints ask it)
        self.offloop = offloop if offloop is not None else OffloopDecoder(0)

    # health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return bool(self.router.state.live) and self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": self.server_name,
            "version": self.server_version,
            "extensions": ["binary_tensor_data"],
        }

    def _resolve_version(self, name: str, version: str | None) -> str:
        return self.router.champion_version(name) if version is None else version

    def model_ready(self, name: str, version: str | None = None) -> bool:
        entry = self.repository.entry(name, self._resolve_version(name, version))
        return entry.state is State.READY

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
        feeds, output_names, specs = self._check(model, request)
        arrays = await model.predict(feeds, output_names)
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
        log = self.payload_log
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
            if not spec.accepts_shape(tensor.shape):
                raise InvalidInput(
                    f"input '{tensor.name}': expected shape {list(spec.shape)} "
                    f"(-1: any size), got {tensor.shape}"
                )
            if not tensor.data.size:
                raise InvalidInput(
                    f"input '{tensor.name}': shape {tensor.shape} has no elements "
                    "(an empty batch is not run)"
                )
            # one reduction on the common path; a non-finite sum (also reached by overflow
            # of large finite values) takes the exact check
            if finite_only and not math.isfinite(tensor.data.sum(dtype=np.float64)):
                finite = np.isfinite(tensor.data)
                if not finite.all():
                    index = int(np.argmin(finite.reshape(-1)))
                    raise InvalidInput(
                        f"input '{tensor.name}': NaN or Inf at flat index {index}; "
                        "this input only takes finite values"
                    )
            feeds[tensor.name] = tensor.data
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

    # feedback

    async def feedback(self, name: str, labels: list[Label]) -> dict[str, Any]:
        if name not in self.router.state.champions and name not in self.repository.names():
            raise ModelNotFound(f"model '{shown(name, valid_name)}' not found")
        index = self.feedback_index
        result = {"accepted": 0, "correct": 0, "incorrect": 0, "unmatched": 0, "duplicates": 0}
        fresh: list[Label] = []
        for label in labels:
            if index.labelled(label.id) or any(label.id == f.id for f in fresh):
                result["duplicates"] += 1
            else:
                fresh.append(label)
        found: dict[str, Any] = {}
        if fresh and self.payload_log is not None:
            # labels older than the memory (or from before a restart) live in the log
            loop = asyncio.get_running_loop()
            root = self.payload_log.config.root
            ids = [label.id for label in fresh]
            payload_log = self.payload_log

            def labelled() -> set[str]:
                payload_log.flush()  # labels still queued must be on disk before we look
                return feedback_mod.labelled_in_log(root, name, ids)

            seen = await loop.run_in_executor(None, labelled)
            result["duplicates"] += sum(label.id in seen for label in fresh)
            fresh = [label for label in fresh if label.id not in seen]
            missing = [label.id for label in fresh if self._remembered(name, label.id) is None]
            outputs = {
                e.version: e.model.plan.label_output
                for e in self.repository.entries()
                if e.name == name and e.model is not None
            }
            found = await loop.run_in_executor(
                None, feedback_mod.lookup_logged, root, name, missing, outputs
            )
        unknown: list[Label] = []
        for label in fresh:
            remembered = self._remembered(name, label.id) or found.get(label.id)
            if remembered is None:
                unknown.append(label)
            else:
                self._score(name, label, remembered, result)
        for label in unknown:
            result["unmatched"] += 1
            result["accepted"] += 1
            self.recorder.count(self.recorder.feedback_unmatched, (name,))
            self._store(label, name, None, "unmatched")
            index.mark(label.id)
        result["stored"] = self.payload_log is not None
        return result

    def _remembered(self, name: str, ident: str) -> Any:
        remembered = self.feedback_index.get(ident)
        return remembered if remembered is not None and remembered.model == name else None

    def _score(self, name: str, label: Label, remembered: Any, result: dict[str, Any]) -> None:
        predicted = remembered.labels
        if predicted is None:
            outcome = "unscored"  # the model has no class output to compare with
        else:
            truth = label.values
            if len(truth) == 1 and predicted.size > 1:
                raise InvalidInput(
                    f"id '{label.id}': the prediction has {predicted.size} rows; "
                    "send one label per row"
                )
            if len(truth) != predicted.size:
                raise InvalidInput(
                    f"id '{label.id}': {len(truth)} labels for a prediction of "
                    f"{predicted.size} rows"
                )
            hits = sum(
                feedback_mod.label_text(p) == t
                for p, t in zip(predicted.reshape(-1).tolist(), truth, strict=True)
            )
            misses = len(truth) - hits
            labels = (name, remembered.version)
            self.recorder.histogram(
                self.recorder.feedback_delay, labels, FEEDBACK_DELAY_BUCKETS
            ).observe(max(0.0, time.time() - remembered.at))
            if hits:
                self.recorder.count(self.recorder.feedback, (*labels, "correct"), hits)
            if misses:
                self.recorder.count(self.recorder.feedback, (*labels, "incorrect"), misses)
            result["correct"] += hits
            result["incorrect"] += misses
            outcome = "correct" if misses == 0 else "incorrect"
        result["accepted"] += 1
        self._store(label, name, remembered.version, outcome)
        self.feedback_index.mark(label.id)

    def _store(self, label: Label, name: str, version: str | None, outcome: str) -> None:
        if self.payload_log is None:
            return
        text = label.values[0] if len(label.values) == 1 else orjson.dumps(label.values).decode()
        self.payload_log.submit(
            FEEDBACK,
            {
                "id": label.id,
                "time": feedback_mod.now(),
                "model": name,
                "version": version,
                "label": text,
                "outcome": outcome,
            },
        )

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
        if version is None and name in self.router.state.champions:
            labels = (name, "", "", protocol)
        elif known is not None:
            labels = (name, known.version, self.router.role(name, known.version), protocol)
        else:  # never a label value taken from an unknown client string
            labels = (name if name in self.router.state.champions else UNKNOWN, "", "", protocol)
        self.recorder.request(labels, str(int(error.status)), time.perf_counter() - started)
