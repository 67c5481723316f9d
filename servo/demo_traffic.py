"""The demo's traffic: held-out digits sent to a real gateway over HTTP, their labels sent
back after a delay with a labeler's token, and a drift switched on at will.

The held-out digits (the rows the champion never trained on) are split in two pools:
`stream` feeds the drifted traffic whose labels the loop retrains on, `fresh` the drifted
traffic after the retrain (shadow, canary, after the promotion), so the accuracy measured
after the promotion is on images whose drifted versions no model trained on. Every answer
is kept: when, in which phase, which version answered, the prediction, the truth, the row
sent (the demo's oracle is scored on the same rows), and when its label was stored.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: the phases of the traffic: undrifted held-out digits, then drifted ones from the pool the
#: loop retrains on, then drifted ones from the pool kept for measuring
BEFORE, DRIFT, FRESH = "before", "drift", "fresh"
PHASES = (BEFORE, DRIFT, FRESH)


@dataclass(frozen=True)
class Drift:
    """A new scanner: strokes moved `shift` pixels right and thickened (each pixel also
    takes `thicken` times its right neighbour), sensor noise (Gaussian, `noise` grey
    levels of 16), and a new class mix (`class_weights`, relative, per class 0..9)."""

    shift: int = 1
    thicken: float = 0.6
    noise: float = 1.0
    class_weights: tuple[float, ...] = (4, 4, 4, 4, 4, 1, 1, 1, 1, 1)

    def apply(self, x: npt.NDArray[Any], rng: np.random.Generator) -> npt.NDArray[np.float32]:
        """Rows of 64 (8x8 images, grey levels 0..16) drifted; a new noise draw per call."""
        images = np.asarray(x, dtype=np.float64).reshape(-1, 8, 8)
        if self.shift:
            pad = np.zeros_like(images[:, :, : self.shift])
            images = np.concatenate([pad, images[:, :, : -self.shift]], axis=2)
        if self.thicken:
            right = np.concatenate([images[:, :, 1:], np.zeros_like(images[:, :, :1])], axis=2)
            images = np.maximum(images, self.thicken * right)
        if self.noise:
            images = images + rng.normal(0.0, self.noise, images.shape)
        return np.clip(images, 0.0, 16.0).reshape(-1, 64).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"shift": self.shift, "thicken": self.thicken, "noise": self.noise,
                "class_weights": list(self.class_weights)}  # fmt: skip


@dataclass(frozen=True)
class Pools:
    """The held-out digits: all of them (undrifted traffic), and the two drift pools."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    stream: npt.NDArray[np.int64]  # indices into x, y
    fresh: npt.NDArray[np.int64]

    @classmethod
    def split(cls, x: npt.NDArray[Any], y: npt.NDArray[Any], fresh: float = 0.33,
              seed: int = 0) -> Pools:  # fmt: skip
        from sklearn.model_selection import train_test_split

        index = np.arange(len(y))
        stream, kept = train_test_split(
            index, test_size=fresh, random_state=seed, stratify=y
        )  # fmt: skip
        return cls(np.asarray(x, np.float32), np.asarray(y, np.int64), np.sort(stream),
                   np.sort(kept))  # fmt: skip


@dataclass
class Answers:
    """What the traffic saw, one entry per request (columns, appended in order)."""

    at: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    version: list[str] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    truth: list[int] = field(default_factory=list)
    rows: list[npt.NDArray[np.float32]] = field(default_factory=list)
    #: when the label was acknowledged stored (None: not yet, or never)
    labelled_at: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.at)

    def correct(self) -> npt.NDArray[np.bool_]:
        n = len(self)
        same: npt.NDArray[np.bool_] = np.asarray(self.predicted[:n]) == np.asarray(self.truth[:n])
        return same


class Traffic:
    """Requests at `rate` per second in all from `senders` threads (one keep-alive
    connection each), labels `label_delay_s` after each answer from another (batched, with
    the labeler's bearer token). `phase` switches what is sent; `start()`, `stop()`."""

    def __init__(
        self,
        host: str,
        port: int,
        pools: Pools,
        *,
        drift: Drift,
        label_token: str | None,
        rate: float = 60.0,
        senders: int = 3,
        label_delay_s: float = 1.0,
        model: str = "digits",
        seed: int = 0,
        clock: Any = time.time,
    ):
        self.host, self.port, self.model = host, port, model
        self.pools, self.drift = pools, drift
        self.rate, self.senders, self.label_delay_s = rate, senders, label_delay_s
        self.headers = {"Content-Type": "application/json"}
        self.label_headers = dict(self.headers)
        if label_token:
            self.label_headers["Authorization"] = f"Bearer {label_token}"
        self.clock = clock
        self.rng = np.random.default_rng(seed)
        self.phase = BEFORE
        self._decks: dict[str, list[int]] = {}
        self.answers = Answers()
        self.failed: list[str] = []
        self.label_failures: list[str] = []
        self._pending: deque[tuple[float, int, str, int]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # what is sent

    def _deck(self, phase: str) -> list[int]:
        """One round of a phase's digits, shuffled: every held-out digit once (before the
        drift), or each digit of the pool as many times as its class's weight (drifted).
        Rounds, not draws with replacement: a window of requests then holds each digit at
        most once or twice, as fresh traffic would (draws with replacement repeat some
        digits more, which the input-drift test rightly reads as a changed distribution)."""
        pools = self.pools
        if phase == BEFORE:
            deck = np.arange(len(pools.y))
        else:
            pool = pools.stream if phase == DRIFT else pools.fresh
            copies = np.asarray(self.drift.class_weights)[pools.y[pool]]
            deck = np.repeat(pool, np.maximum(1, np.round(copies)).astype(np.int64))
        return [int(i) for i in self.rng.permutation(deck)]

    def _pick(self, phase: str) -> tuple[npt.NDArray[np.float32], int]:
        pools = self.pools
        with self._lock:
            deck = self._decks.get(phase)
            if not deck:
                deck = self._decks[phase] = self._deck(phase)
            i = deck.pop()
            if phase == BEFORE:
                return pools.x[i], int(pools.y[i])
            return self.drift.apply(pools.x[i : i + 1], self.rng)[0], int(pools.y[i])

    def _send(self) -> None:
        client = _Client(self.host, self.port)
        path = f"/v2/models/{self.model}/infer"
        every = self.senders / self.rate
        due = time.monotonic()
        try:
            while not self._stop.is_set():
                phase = self.phase
                row, truth = self._pick(phase)
                tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64],
                          "data": row.tolist()}  # fmt: skip
                body = json.dumps({"inputs": [tensor]})
                status, text = client.post(path, body, self.headers)
                if status != 200:
                    self.failed.append(f"{phase}: {_failure(status, text)}")
                else:
                    self._keep(json.loads(text), phase, row, truth)
                due += every
                pause = due - time.monotonic()
                if pause > 0:
                    self._stop.wait(pause)
                else:
                    due = time.monotonic()  # behind (a loaded machine): no burst to catch up
        finally:
            client.close()

    def _keep(self, doc: dict[str, Any], phase: str, row: npt.NDArray[np.float32],
              truth: int) -> None:  # fmt: skip
        a = self.answers
        with self._lock:
            index = len(a)
            a.at.append(self.clock())
            a.phase.append(phase)
            a.version.append(str(doc["model_version"]))
            a.predicted.append(int(doc["outputs"][0]["data"][0]))
            a.truth.append(truth)
            a.rows.append(row)
            a.labelled_at.append(None)
            self._pending.append(
                (time.monotonic() + self.label_delay_s, index, str(doc["id"]), truth)
            )

    # labels

    def _label(self) -> None:
        client = _Client(self.host, self.port)
        path = f"/v2/models/{self.model}/feedback"
        try:
            while not self._stop.wait(0.1):
                now = time.monotonic()
                due: list[tuple[int, str, int]] = []
                while self._pending and self._pending[0][0] <= now:
                    _, index, rid, truth = self._pending.popleft()
                    due.append((index, rid, truth))
                if not due:
                    continue
                body = json.dumps([{"id": rid, "label": truth} for _, rid, truth in due])
                status, text = client.post(path, body, self.label_headers)
                if status != 200 or not json.loads(text).get("stored"):
                    self.label_failures.append(_failure(status, text))
                    continue
                stored_at = self.clock()
                with self._lock:
                    for index, _, _ in due:
                        self.answers.labelled_at[index] = stored_at
        finally:
            client.close()

    def start(self) -> Traffic:
        self._stop.clear()
        targets = [(f"send-{i}", self._send) for i in range(self.senders)]
        for name, target in [*targets, ("label", self._label)]:
            thread = threading.Thread(target=target, name=f"demo-traffic-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()

    # what it saw

    def answered_by(self, version: str, since: float) -> int:
        """Answers of `version` at or after `since` (Unix seconds)."""
        with self._lock:
            at, versions = list(self.answers.at), list(self.answers.version)
        return sum(v == version for t, v in zip(at, versions, strict=True) if t >= since)

    def labelled(self, *, phases: tuple[str, ...], until: float) -> int:
        """Labels of `phases` stored at or before `until`."""
        a = self.answers
        with self._lock:
            return sum(
                1 for p, at in zip(a.phase, a.labelled_at, strict=False)
                if p in phases and at is not None and at <= until
            )  # fmt: skip


class _Client:
    """One keep-alive HTTP connection; a request that fails closes it (the next one opens
    a new one). `post` returns the status and body, or status 0 and the error."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.connection: http.client.HTTPConnection | None = None

    def post(self, path: str, body: str, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
            self.connection.request("POST", path, body, headers)
            reply = self.connection.getresponse()
            return reply.status, reply.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return 0, f"{type(exc).__name__}: {exc}".encode()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _failure(status: int, text: bytes) -> str:
    return text.decode(errors="replace") if status == 0 else f"HTTP {status} {text[:200]!r}"
