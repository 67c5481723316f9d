"""The canary judge's counts (retrain.rollout.CountsSource) from the embedded gateway's own
metrics (serving.recorder.Recorder), cumulative per version since it was loaded, or, with
`servo up --prometheus`, the same series summed over every gateway Prometheus scrapes:

- errors: requests (servo_requests, every code) and the 5xx answers among them;
- latency: requests (servo_request_duration_seconds) and those slower than the threshold,
  a bucket edge: `_count - bucket{le=threshold}`, exact, as PromQL would count it;
- incorrect: labelled rows (servo_feedback) and the incorrect ones.

The recorder is mutated on the serving event loop, so the counts are read there (one
snapshot per look, a few dict walks), never from the runner's thread directly. Prometheus
answers as of its last scrape (the looks lag by a scrape interval; a gateway that restarts
makes a sum go back, and the runner takes that look as its new baseline).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from retrain.rollout import Cumulative

if TYPE_CHECKING:
    from monitors.sources import PrometheusSource
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


class PrometheusCounts:
    """The same counts from PromQL instant queries (three per look)."""

    def __init__(self, source: PrometheusSource):
        self.source = source

    def cumulative(
        self, model: str, versions: Sequence[int], latency_threshold_s: float
    ) -> Cumulative:
        wanted = {str(int(v)): int(v) for v in versions}
        selector = f'model="{model}",version=~"{"|".join(wanted)}"'
        out: dict[int, dict[str, list[int]]] = {
            v: {"errors": [0, 0], "latency": [0, 0], "incorrect": [0, 0]} for v in wanted.values()
        }
        by = self._sums
        for (version, code), n in by("servo_requests_total", selector, "code").items():
            row = out[wanted[version]]["errors"]
            row[0] += n
            row[1] += n if code.startswith("5") else 0
        for (version, le), n in by("servo_request_duration_seconds_bucket", selector, "le").items():
            row = out[wanted[version]]["latency"]
            if le == "+Inf":
                row[0] += n
                row[1] += n
            elif float(le) == latency_threshold_s:  # requests at or under the threshold
                row[1] -= n
        for (version, outcome), n in by("servo_feedback_total", selector, "outcome").items():
            row = out[wanted[version]]["incorrect"]
            if outcome in ("correct", "incorrect"):
                row[0] += n
                row[1] += n if outcome == "incorrect" else 0
        return {v: {m: (pair[0], pair[1]) for m, pair in metrics.items()}
                for v, metrics in out.items()}  # fmt: skip

    def _sums(self, metric: str, selector: str, label: str) -> dict[tuple[str, str], int]:
        rows = self.source.query(f"sum by (version, {label}) ({metric}{{{selector}}})")
        return {
            (str(r["metric"].get("version", "")), str(r["metric"].get(label, ""))): round(
                float(r["value"][1])
            )
            for r in rows
        }
