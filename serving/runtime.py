"""ONNX Runtime behind a narrow interface: `load()` once, then `predict()`.

Small models run inline on the event loop (a few microseconds of ONNX Runtime is cheaper
than a thread hop); a model whose measured warm-up call exceeds `inline_max_us` runs on a
worker thread, so it never blocks the loop. ONNX Runtime releases the GIL while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from monitors.profile import ProfileError, ReferenceProfile
from serving import signature as signature_mod
from serving.batcher import Batcher, BatchingConfig, CallObserver
from serving.datatypes import BYTES, FLOAT_TYPES, INT_TYPES, NUMPY_DTYPES
from serving.errors import InferenceFailed, InvalidInput, ModelLoadError
from serving.model_folder import MODEL_FILE, ModelCard
from serving.signature import Signature, TensorSpec

log = logging.getLogger("servo.serving")


class FeatureSink(Protocol):
    def add(self, rows: npt.NDArray[Any]) -> None: ...


def _rows(inputs: Mapping[str, npt.NDArray[Any]]) -> int:
    shape = next(iter(inputs.values())).shape
    return shape[0] if shape else 1


Arrays = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the data plane checks and records per request, worked out once at load."""

    #: input name -> (spec, only finite values allowed)
    inputs: dict[str, tuple[TensorSpec, bool]]
    outputs: dict[str, TensorSpec]
    output_specs: tuple[TensorSpec, ...]
    #: the predicted class per row (an integer or BYTES output of rank 1), if any
    label_output: str | None = None
    #: class probabilities per row (a float output of rank 2), if any
    probability_output: str | None = None
    #: inputs of rank 3+ with fixed non-batch dims (images: [N, H, W, C]) -> their
    #: elements per row: such an input also takes its rows flattened, [N, H*W*C]
    flat_rows: dict[str, int] = field(default_factory=dict)

    def positions(self, names: list[str] | None) -> tuple[int, int]:
        """Where the label and probability outputs are among `names` (all outputs when
        None); -1 where absent."""
        order = [s.name for s in self.output_specs] if names is None else names
        label = order.index(self.label_output) if self.label_output in order else -1
        probs = order.index(self.probability_output) if self.probability_output in order else -1
        return label, probs

    @classmethod
    def of(cls, signature: Signature, allow_non_finite: list[str]) -> Plan:
        label = next(
            (
                s.name
                for s in signature.outputs
                if len(s.shape) == 1 and (s.datatype in INT_TYPES or s.datatype == BYTES)
            ),
            None,
        )
        probabilities = next(
            (s.name for s in signature.outputs if len(s.shape) == 2 and s.datatype in FLOAT_TYPES),
            None,
        )
        return cls(
            inputs={
                s.name: (s, s.datatype in FLOAT_TYPES and s.name not in allow_non_finite)
                for s in signature.inputs
            },
            outputs={s.name: s for s in signature.outputs},
            output_specs=signature.outputs,
            label_output=label,
            probability_output=probabilities,
            flat_rows={
                s.name: math.prod(s.shape[1:])
                for s in signature.inputs
                if len(s.shape) > 2 and all(d > 0 for d in s.shape[1:])
            },
        )


def decide_inline(warmup_us: float | None, inline_max_us: float) -> bool:
    """Whether a model runs on the event loop: its measured warm-up call (None: it failed)
    took at most `inline_max_us`. Models off the loop are the ones automatic batching
    batches (`OnnxModel.configure_batching`)."""
    return warmup_us is not None and warmup_us <= inline_max_us


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    #: models whose warm-up call takes longer than this run on a worker thread
    inline_max_us: float = 300.0


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """How the gateway talks to remote versions (serving.remote)."""

    #: seconds for one infer request (connect, send, wait, read)
    timeout_s: float = 10.0
    #: seconds to read the version's metadata at load, retried with backoff meanwhile (a
    #: backend still starting); past it the load fails saying why
    metadata_timeout_s: float = 10.0
    #: consecutive failures that open the circuit
    failures: int = 5
    #: seconds the circuit stays open before one request probes the backend
    cooldown_s: float = 5.0
    #: keep-alive connections kept per version (REST; gRPC multiplexes one connection)
    max_connections: int = 32
    #: merged requests (batching at the edge) in flight to the backend at once per version
    batches_in_flight: int = 4


class OnnxModel:
    """One loaded model version: an ONNX Runtime session and its signature."""

    platform = "onnx_onnxv1"

    def __init__(
        self, folder: Path, card: ModelCard, options: RuntimeOptions, executor: ThreadPoolExecutor
    ):
        self.folder = folder
        self.options = options
        self._executor = executor
        self.card = card
        self.signature: Signature = self.card.signature
        self.plan = Plan.of(self.signature, card.allow_non_finite)
        self.label_positions = self.plan.positions(None)
        self._session: ort.InferenceSession | None = None
        self._inline = False
        self._output_names: list[str] = []
        self._string_inputs: frozenset[str] = frozenset()
        self.warmup_us: float | None = None
        #: requests (and shadow copies) running on this version now; unload waits for 0
        self.inflight = 0
        self.batcher: Batcher | None = None
        self.observer: CallObserver | None = None
        #: the reference profile from servo.json, checked against the signature at load
        self.profile: ReferenceProfile | None = None
        #: where live rows of the profile's input are counted (set by the gateway)
        self.feature_sink: FeatureSink | None = None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    def load(self) -> None:
        """Read, check and open the model; raises ModelLoadError saying what is wrong."""
        path = self.folder / MODEL_FILE
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a valid ONNX model ({exc})") from None
        graph_signature = signature_mod.from_onnx(proto)
        if graph_signature != self.card.signature:
            raise ModelLoadError(
                f"{self.folder}: servo.json signature {self.card.signature.to_json()} "
                f"does not match the ONNX graph {graph_signature.to_json()}"
            )
        self.signature = graph_signature
        self.plan = Plan.of(graph_signature, self.card.allow_non_finite)
        self.label_positions = self.plan.positions(None)
        self.profile = self._read_profile()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.intra_op_threads
        opts.inter_op_num_threads = self.options.inter_op_threads
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                data, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({exc})") from None
        self._output_names = [spec.name for spec in self.signature.outputs]
        self._string_inputs = frozenset(
            spec.name for spec in self.signature.inputs if spec.datatype == BYTES
        )
        self._warm_up()

    def _read_profile(self) -> ReferenceProfile | None:
        doc = self.card.reference_profile
        if doc is None:
            return None
        where = f"{self.folder / 'servo.json'}"
        try:
            profile = ReferenceProfile.from_json(doc)
        except ProfileError as exc:
            raise ModelLoadError(f"{where}: {exc}") from None
        spec = self.signature.input(profile.input)
        if spec is None or spec.datatype == BYTES or len(spec.shape) < 2:
            raise ModelLoadError(
                f"{where}: reference profile input '{profile.input}' is not a numeric "
                "[N, F] (or [N, H, W, C]) input of the model"
            )
        # an image input's features are its flattened rows
        width = spec.shape[1] if len(spec.shape) == 2 else self.plan.flat_rows.get(spec.name, -1)
        if width not in (-1, len(profile.features)):
            raise ModelLoadError(
                f"{where}: reference profile has {len(profile.features)} features, input "
                f"'{profile.input}' has {width}"
            )
        return profile

    def _warm_up(self) -> None:
        feeds: dict[str, npt.NDArray[Any]] = {}
        for spec in self.signature.inputs:
            shape = [1 if dim < 0 else dim for dim in spec.shape]
            if spec.datatype == BYTES:
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
        assert self._session is not None
        try:
            self._session.run(self._output_names, feeds)
            start = time.perf_counter()
            for _ in range(5):
                self._session.run(self._output_names, feeds)
            self.warmup_us = (time.perf_counter() - start) / 5 * 1e6
        except Exception as exc:  # a model may reject zeros; it still serves, off the loop
            log.warning("%s: warm-up call failed (%s); running it off the event loop", self, exc)
            self.warmup_us = None
        self._inline = decide_inline(self.warmup_us, self.options.inline_max_us)

    @property
    def runs_inline(self) -> bool:
        return self._inline

    def _run(self, inputs: Arrays, outputs: Sequence[str]) -> list[npt.NDArray[Any]]:
        assert self._session is not None, "predict() before load()"
        feeds: Arrays = inputs
        if self._string_inputs:
            feeds = {name: self._as_strings(name, arr) for name, arr in inputs.items()}
        try:
            return list(self._session.run(list(outputs), feeds))
        except Exception as exc:
            raise InferenceFailed(f"model '{self.name}' version {self.version}: {exc}") from None

    def _as_strings(self, name: str, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if name not in self._string_inputs:
            return arr
        out = np.empty(arr.shape, dtype=object)
        flat_out = out.reshape(-1)
        for i, item in enumerate(arr.reshape(-1)):
            try:
                flat_out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"input '{name}': element {i} is not UTF-8 (ONNX strings are UTF-8)"
                ) from None
        return out

    @property
    def batchable(self) -> bool:
        """Every input and output has a variable first (batch) dimension."""
        specs = (*self.signature.inputs, *self.signature.outputs)
        return all(spec.shape and spec.shape[0] == -1 for spec in specs)

    def configure_batching(self, config: BatchingConfig) -> bool:
        """Turn batching on or off (automatic: on for models that run off the event loop);
        returns whether it is on. Requests already queued finish on the old batcher."""
        enabled = (not self._inline) if config.enabled is None else config.enabled
        enabled = enabled and self.batchable
        if self.batcher is not None and enabled and self.batcher.config == config:
            return True
        if self.batcher is not None:
            self.batcher.close()
        self.batcher = self._new_batcher(config) if enabled else None
        return enabled

    def _new_batcher(self, config: BatchingConfig) -> Batcher:
        return Batcher(self._run, self._executor, config, self.observer)

    async def predict(
        self, inputs: Arrays, outputs: Sequence[str] | None = None
    ) -> list[npt.NDArray[Any]]:
        names = self._output_names if outputs is None else outputs
        if self.batcher is not None:
            self.inflight += 1
            try:
                return await self.batcher.submit(inputs, names)
            finally:
                self.inflight -= 1
        observer = self.observer
        if self._inline:
            if observer is None:
                return self._run(inputs, names)
            started = time.perf_counter()
            result = self._run(inputs, names)
            observer.call(_rows(inputs), time.perf_counter() - started)
            return result
        self.inflight += 1
        try:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            result = await loop.run_in_executor(self._executor, self._run, inputs, names)
            if observer is not None:
                observer.call(_rows(inputs), time.perf_counter() - started)
            return result
        finally:
            self.inflight -= 1

    def run_blocking(self, inputs: Arrays) -> dict[str, npt.NDArray[Any]]:
        """Every output, on the calling thread (shadow copies run here, off the loop)."""
        return dict(zip(self._output_names, self._run(inputs, self._output_names), strict=True))

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing runs on this version (True), or the timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.inflight > 0:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def unload(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        self._session = None

    def __repr__(self) -> str:
        return f"OnnxModel({self.card.name!r}, version={self.card.version!r})"
