"""The canary judge's counts (retrain.rollout.CountsSource) from the embedded gateway's own
metrics (serving.recorder.Recorder), cumulative per version since it was loaded:

- errors: requests (servo_requests, every code) and the 5xx answers among them;
- latency: requests (servo_request_duration_seconds) and those slower than the threshold,
  a bucket edge: `_count - bucket{le=threshold}`, exact, as PromQL would count it;
- incorrect: labelled rows (servo_feedback) and the incorrect ones.

The recorder is mutated on the serving event loop, so the counts are read there (one
snapshot per look, a few dict walks), never from the runner's thread directly.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from retrain.rollout import Cumulative

if TYPE_CHECKING:
    from serving.recorder import Recorder


def counts(
    recorder: Recorder, model: str, versions: Sequence[int], latency_threshold_s: float
) -> Cumulative:
    """The cumulative counts of `versions` of `model` (call it on the recorder's thread)."""
    wanted = {str(v): int(v) for v in versions}
    requests: dict[int, list[int]] = {v: [0, 0] for v in wanted.values()}
    for (name, version, _variant, _protocol, code), n in list(recorder.requests.items()):
        if name == model and version in wanted:
            row = requests[wanted[version]]
            row[0] += n
            row[1] += n if code.startswith("5") else 0
    slow: dict[int, list[int]] = {v: [0, 0] for v in wanted.values()}
    for (name, version, _variant, _protocol), histogram in list(recorder.duration.items()):
        if name == model and version in wanted:
            # counts[i]: observations in (edge[i-1], edge[i]]; above the threshold edge: the
            # buckets after it (a threshold off the edges counts from the next edge up)
            edge = bisect.bisect_left(histogram.buckets, latency_threshold_s)
            row = slow[wanted[version]]
            row[0] += sum(histogram.counts)
            row[1] += sum(histogram.counts[edge + 1 :])
    labelled: dict[int, list[int]] = {v: [0, 0] for v in wanted.values()}
    for (name, version, outcome), n in list(recorder.feedback.items()):
        if name == model and version in wanted and outcome in ("correct", "incorrect"):
            row = labelled[wanted[version]]
            row[0] += n
            row[1] += n if outcome == "incorrect" else 0
    return {
        version: {
            "errors": (requests[version][0], requests[version][1]),
            "latency": (slow[version][0], slow[version][1]),
            "incorrect": (labelled[version][0], labelled[version][1]),
        }
        for version in wanted.values()
    }


class EmbeddedCounts:
    """`cumulative(...)` from a thread other than the serving loop's (a rollout's runner):
    the snapshot runs on the serving event loop."""

    def __init__(
        self, recorder: Recorder, loop: asyncio.AbstractEventLoop, *, timeout_s: float = 10.0
    ):
        self.recorder = recorder
        self.loop = loop
        self.timeout_s = timeout_s

    def cumulative(
        self, model: str, versions: Sequence[int], latency_threshold_s: float
    ) -> Cumulative:
        async def on_loop() -> Cumulative:
            return counts(self.recorder, model, versions, latency_threshold_s)

        future = asyncio.run_coroutine_threadsafe(on_loop(), self.loop)
        return future.result(self.timeout_s)
