"""A traffic client for the loop tests: digits requests to a real gateway, labels sent back
after a delay, and a drift (a changed class mix plus a pixel shift) switched on at will.
Every answer is kept (id, version that answered, prediction, truth, drifted or not)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from servo.demo import digits_holdout

#: the drifted traffic: only these classes, every image shifted right by SHIFT columns
DRIFT_CLASSES = (0, 1, 2, 3, 4)
SHIFT = 2


def drifted(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Digits images (rows of 64) shifted right by SHIFT columns (wrapping)."""
    images = x.reshape(-1, 8, 8)
    return np.roll(images, SHIFT, axis=2).reshape(-1, 64).astype(np.float32)


@dataclass(frozen=True)
class Answer:
    id: str
    version: str
    predicted: int
    truth: int
    drift: bool
    at: float


class Traffic:
    """`start()` sends requests on `senders` threads (each one request at a time) until
    `stop()`; `drift = True` switches the traffic; labels follow each answer after
    `label_delay_s` (batched, with a labeler's bearer token if given)."""

    def __init__(
        self,
        url: str,
        *,
        label_token: str | None = None,
        label_delay_s: float = 0.5,
        every_s: float = 0.01,
        model: str = "digits",
        seed: int = 0,
        senders: int = 1,
    ):
        self.url = url
        self.model = model
        self.label_delay_s = label_delay_s
        self.every_s = every_s
        self.headers = {"Authorization": f"Bearer {label_token}"} if label_token else {}
        x, y = digits_holdout()
        self.x, self.y = x.astype(np.float32), y.astype(int)
        keep = np.isin(self.y, DRIFT_CLASSES)
        self.x_drift, self.y_drift = drifted(self.x[keep]), self.y[keep]
        self.seed = seed
        self.senders = senders
        self.drift = False
        self.labels = True
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        #: ids of the labels the gateway answered `"stored": true` (durable, it says)
        self.stored: list[str] = []
        self._pending: deque[tuple[float, str, int]] = deque()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[httpx.Client] = []

    def _row(self, rng: np.random.Generator) -> tuple[npt.NDArray[Any], int, bool]:
        drift = self.drift
        xs, ys = (self.x_drift, self.y_drift) if drift else (self.x, self.y)
        i = int(rng.integers(0, len(ys)))
        return xs[i], int(ys[i]), drift

    def _send(self, client: httpx.Client, rng: np.random.Generator) -> None:
        while not self._stop.is_set():
            row, truth, drift = self._row(rng)
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                "data": [float(v) for v in row]}]}  # fmt: skip
            try:
                reply = client.post(f"{self.url}/v2/models/{self.model}/infer", json=body)
            except httpx.TransportError as exc:
                self.errors.append(str(exc))
                time.sleep(0.2)
                continue
            if reply.status_code != 200:
                self.errors.append(f"{reply.status_code} {reply.text[:200]}")
                time.sleep(0.2)
                continue
            doc = reply.json()
            predicted = int(doc["outputs"][0]["data"][0])
            answer = Answer(doc["id"], str(doc["model_version"]), predicted, truth, drift,
                            time.time())  # fmt: skip
            self.answers.append(answer)
            if self.labels:
                self._pending.append((time.monotonic() + self.label_delay_s, answer.id, truth))
            time.sleep(self.every_s)

    def _label(self, client: httpx.Client) -> None:
        while not self._stop.wait(0.2):
            due = []
            now = time.monotonic()
            while self._pending and self._pending[0][0] <= now:
                _, rid, truth = self._pending.popleft()
                due.append({"id": rid, "label": truth})
            if not due:
                continue
            try:
                reply = client.post(f"{self.url}/v2/models/{self.model}/feedback", json=due,
                                    headers=self.headers)  # fmt: skip
                if reply.status_code != 200:
                    self.errors.append(f"feedback {reply.status_code} {reply.text[:200]}")
                elif reply.json().get("stored") is True:
                    self.stored.extend(item["id"] for item in due)
            except httpx.TransportError as exc:
                self.errors.append(f"feedback: {exc}")

    def start(self) -> Traffic:
        self._stop.clear()
        first = np.random.default_rng(self.seed)
        rngs = [first, *first.spawn(self.senders - 1)]
        jobs: list[tuple[Any, tuple[Any, ...]]] = [(self._send, (rng,)) for rng in rngs]
        for target, args in [*jobs, (self._label, ())]:
            client = httpx.Client(timeout=10)
            self._clients.append(client)
            thread = threading.Thread(target=target, args=(client, *args), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()
        for client in self._clients:
            client.close()
        self._clients.clear()

    def accuracy(self, *, version: str | None = None, drift: bool | None = None,
                 since: float = 0.0) -> tuple[float, int]:  # fmt: skip
        """(accuracy, n) of the answers kept, optionally of one version / traffic / period."""
        chosen = [a for a in list(self.answers)
                  if (version is None or a.version == version)
                  and (drift is None or a.drift == drift) and a.at >= since]  # fmt: skip
        if not chosen:
            return 0.0, 0
        return sum(a.predicted == a.truth for a in chosen) / len(chosen), len(chosen)
