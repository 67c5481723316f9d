"""`servo demo`: the whole loop on one machine, in a few minutes.

It starts `servo up` (a real process: on its empty registry it trains the digits model and
serves it) with a demo policy (checks every second, short windows, small evidence and
canary steps), sends held-out digits with labels following (servo.demo_traffic), then
drifts the traffic: a new scanner (shifted, thickened, noisy strokes) and another class
mix. The monitors alarm, the loop retrains on the recent labelled rows, shadows the
candidate and files a promotion request; the demo approves it as an ops user (an approver
token, over the admin API; `--interactive`: a person does), the candidate rolls out and the
accuracy recovers. Then the timeline, the summary table (servo.demo_report), a PNG and a
JSON summary; `servo up` keeps serving until Ctrl-C (`--exit`: stopped at once).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servo.demo_traffic import BEFORE, DRIFT, FRESH, Drift, Pools, Traffic

if TYPE_CHECKING:
    from registry.store import RegistryStore

MODEL = "digits"
#: a folder the demo made (it may empty it again on the next run)
MARKER = ".servo-demo"
#: the loop's policy for the demo: every second, short windows, little evidence needed
POLICY = """\
# servo demo's policy: a loop that reacts in seconds, not hours. The monitors look every
# second at the last 2 s (about 500 requests: the held-out digits are 450, a longer window
# would repeat them). 2 alarmed checks in a row raise the alarm; the retrain then waits for
# 3,000 labelled rows since the alarm (10 s at 300 req/s, more on a slower machine). Its
# 20 s window holds all of them even at half that rate (a 10 s window once held only
# 1,500 on a loaded machine, and the candidate reached 93.5 % of the oracle); the newest
# 10 % are held out and the newest of the rest trained on (share 0.6: about 2,300 rows),
# so the rows from before the drift are the first left out
defaults:
  check_every_s: 1
  monitor_window_s: 2
  trigger: {on: [accuracy_stall, input_drift], k: 2, cooldown_s: 3600, budget_per_day: 3}
  retrain: {window_s: 20, min_labelled: 3000, wait_s: 60, share: 0.6, holdout: 0.1,
            params: {holdout: 0.15}}
  shadow: {min_labelled: 200, timeout_s: 120}
  gates: {live_margin: 0.02, offline_margin: 0.05, latency_p99_ratio: 20.0}
  approval: {auto: false}
  # the canary: a look every second, 100 canary requests at least per step, judged on
  # errors, latency above 0.1 s and wrong answers; an event rate below 5 % counts as
  # negligible, so a metric without events passes by the floor test after about 100
  # canary requests (the default 0.001 would take some 5,000)
  rollout: {strategy: canary, steps: [10, 50, 100], look_every_s: 1, min_requests: 100,
            negligible_rate: 0.05, metrics: [errors, latency, incorrect],
            latency_threshold_s: 0.1, step_timeout_s: 60}
"""


class DemoError(RuntimeError):
    """The demo could not go on; the message says where and why (and where the log is)."""


@dataclass(frozen=True)
class DemoOptions:
    dir: Path
    http_port: int = 8080
    grpc_port: int = 8081
    admin_port: int = 8082
    interactive: bool = False
    plot: Path | None = None
    exit: bool = False
    #: requests per second of the traffic
    rate: float = 300.0
    #: seconds of undrifted traffic before the drift
    before_s: float = 15.0
    #: answers of the new champion measured after its promotion
    after_n: int = 1500
    #: how long any one phase may take before the demo gives up
    phase_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class Run:
    """What the demo saw: the traffic, the loop's events and its own marks."""

    options: DemoOptions
    started: float
    traffic: Traffic
    up_log: Path
    marks: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)
    champion: int = 1
    candidate: int | None = None


def prepare(directory: Path) -> None:
    """An empty folder for the run: a new one, or one an earlier demo made (emptied);
    anything else is refused."""
    if directory.exists():
        if not directory.is_dir():
            raise DemoError(f"{directory} is not a folder")
        if any(directory.iterdir()):
            if not (directory / MARKER).exists():
                raise DemoError(
                    f"{directory} is not empty and not a folder `servo demo` made; "
                    "name a new one with --dir"
                )
            shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by `servo demo`; the next run empties it\n")


class Demo:
    def __init__(self, options: DemoOptions, echo: Callable[[str], None] = print):
        self.options = options
        self.echo = echo
        self.directory = options.dir.resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self.store: RegistryStore | None = None
        self._seen = 0

    # servo up

    def start_up(self) -> Path:
        from servo.up import registry_url_for

        o = self.options
        policy = self.directory / "servo.yaml"
        policy.write_text(POLICY)
        log = self.directory / "up.log"
        args = [sys.executable, "-m", "servo.cli", "up", "--dir", str(self.directory),
                "--http-port", str(o.http_port), "--grpc-port", str(o.grpc_port),
                "--admin-port", str(o.admin_port), "--policy", str(policy),
                "--log-format", "json"]  # fmt: skip
        with log.open("ab") as handle:
            self.process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)
        self.until(self._ready, "servo up to train digits and serve it", log)
        from registry.store import RegistryStore

        self.store = RegistryStore(registry_url_for(self.directory))
        return log

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.options.http_port}/v2/models/{MODEL}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop_up(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self.store is not None:
            self.store.close()
            self.store = None
        return process.returncode

    def until(self, what: Callable[[], Any], waiting_for: str, log: Path,
              timeout_s: float | None = None) -> Any:  # fmt: skip
        """Poll `what` (and print the loop's new events) until it is truthy."""
        timeout_s = self.options.phase_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            if self.process is not None and self.process.poll() is not None:
                raise DemoError(f"servo up stopped ({self.process.returncode}) while waiting "
                                f"for {waiting_for}; its log: {log}")  # fmt: skip
            time.sleep(0.2)
        raise DemoError(f"gave up waiting {timeout_s:.0f} s for "
                        f"{waiting_for}; servo up's log: {log}")  # fmt: skip

    # the loop's events, printed as they come

    def poll(self, run: Run) -> list[dict[str, Any]]:
        assert self.store is not None
        new = [e for e in self.store.loop_events(MODEL) if e["id"] > self._seen]
        for row in new:
            self._seen = max(self._seen, int(row["id"]))
            event = {**row, "t": _unix(row["at"]) - run.started}
            run.events.append(event)
            if event["kind"] != "check":
                self.echo(f"  {event['t']:6.1f} s  loop: {event['kind']}{_brief(event)}")
        return new

    def event(self, run: Run, kind: str, after: str = "drift") -> dict[str, Any] | None:
        """The first loop event `kind` after the demo's mark `after`."""
        self.poll(run)
        since = run.marks[after] - run.started
        return next((e for e in run.events if e["kind"] == kind and e["t"] >= since), None)

    def mark(self, run: Run, name: str, text: str) -> None:
        run.marks[name] = time.time()
        self.echo(f"  {run.marks[name] - run.started:6.1f} s  demo: {text}")

    # the run

    def run(self) -> dict[str, Any]:
        from servo.demo import digits_holdout
        from servo.demo_report import summarize

        o = self.options
        started = time.time()
        prepare(self.directory)
        self.echo(f"servo demo in {self.directory} (servo up's log: up.log)")
        self.echo("  starting servo up: it trains the digits model on its empty registry ...")
        log = self.start_up()
        assert self.store is not None
        labeler = self.store.create_token("demo-traffic", "labeler", actor="servo-demo")
        approver = self.store.create_token("demo-ops", "approver", actor="servo-demo")
        x, y = digits_holdout(o.seed)
        traffic = Traffic("127.0.0.1", o.http_port, Pools.split(x, y, seed=o.seed),
                          drift=Drift(), label_token=labeler, rate=o.rate, seed=o.seed)  # fmt: skip
        run = Run(o, started, traffic, log)
        run.champion = int(self.store.alias(MODEL, "champion") or 1)
        self.mark(run, "serving", f"digits version {run.champion} serves; traffic starts "
                  f"({o.rate:.0f} req/s, labels 1 s later)")  # fmt: skip
        traffic.start()
        try:
            self._phases(run, approver, log)
        finally:
            traffic.stop()
        self.poll(run)
        return summarize(run)

    def _phases(self, run: Run, approver: str, log: Path) -> None:
        o, traffic = self.options, run.traffic
        end_before = time.time() + o.before_s
        self.until(lambda: time.time() >= end_before and (self.poll(run) or True),
                   "the undrifted traffic", log)  # fmt: skip
        early = self.event(run, "alarm", after="serving")
        if early is not None:
            raise DemoError(f"the monitors alarmed before the drift ({_brief(early)}), a false "
                            f"alarm; servo up's log: {log}")  # fmt: skip
        traffic.phase = DRIFT
        self.mark(run, "drift", "drift: a new scanner (shifted, thicker, noisy strokes), "
                  "classes 0-4 four times as frequent")  # fmt: skip
        self.until(lambda: self.event(run, "alarm"), "the monitors to alarm", log)
        finished = self.until(lambda: self.event(run, "retrain_finished"), "the retrain", log)
        detail = finished["detail"] or {}
        if detail.get("status") != "succeeded" or detail.get("version") is None:
            raise DemoError(f"the retrain did not succeed: {detail}; worker log: "
                            f"{detail.get('log')}")  # fmt: skip
        run.candidate = int(detail["version"])
        traffic.phase = FRESH
        self.mark(run, "fresh", "drifted traffic from now on from digits kept out of the "
                  "retrain's data")  # fmt: skip
        request = self.until(lambda: self._filed(run), "the promotion request", log)
        run.request = request
        if request["status"] != "pending":
            raise DemoError(f"promotion request {request['id']} was {request['status']}: "
                            f"{(request.get('decision') or {}).get('reason')}")  # fmt: skip
        self._approve(run, request, approver, log)
        self.until(lambda: self._finished(run), "the rollout", log)
        promoted = self.store.promotion(int(request["id"])) if self.store else {}
        if promoted.get("status") != "promoted":
            raise DemoError(f"promotion request {request['id']} ended {promoted.get('status')}: "
                            f"{promoted.get('status_reason')}")  # fmt: skip
        self.mark(run, "promoted", f"version {run.candidate} is champion")
        since = run.marks["promoted"]
        self.until(lambda: traffic.answered_by(str(run.candidate), since) >= o.after_n,
                   f"{o.after_n} answers of the new champion", log)  # fmt: skip

    def _filed(self, run: Run) -> dict[str, Any] | None:
        assert self.store is not None
        self.poll(run)
        for request in self.store.promotions(model=MODEL):
            if int(request["version"]) == run.candidate:
                return request
        return None

    def _finished(self, run: Run) -> bool:
        assert self.store is not None
        held = self.event(run, "canary_held")
        if held is not None:
            raise DemoError(f"the canary holds: {(held['detail'] or {}).get('reason')}")
        return str(self.store.promotion(int(run.request["id"]))["status"]) != "approved"

    def _approve(self, run: Run, request: dict[str, Any], token: str, log: Path) -> None:
        live = (request.get("evidence") or {}).get("live") or {}
        self.echo(
            f"  promotion request {request['id']}: version {request['version']} on "
            f"{live.get('n_labelled')} labelled shadow requests: "
            f"{_pct(live.get('candidate_accuracy'))} vs the champion's "
            f"{_pct(live.get('champion_accuracy'))}"
        )
        url = f"http://127.0.0.1:{self.options.admin_port}/admin/promotions/{request['id']}/approve"
        body = {"reason": "servo demo: candidate ahead on the drifted traffic",
                "evidence_hash": request["evidence_hash"]}  # fmt: skip
        if self.options.interactive:
            self.echo("  approve it as an approver (the demo waits), e.g. with the demo's token:")
            self.echo(f"    curl -s -X POST {url} -H 'Authorization: Bearer {token}' "
                      f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'")  # fmt: skip
            assert self.store is not None
            store, rid = self.store, int(request["id"])
            self.until(lambda: store.promotion(rid)["status"] != "pending",
                       "a person's decision", log, timeout_s=3600.0)  # fmt: skip
            self.mark(run, "approved", f"decided: {store.promotion(rid)['status']}")
            return
        reply = _post(url, body, token)
        self.mark(run, "approved", f"demo-ops (approver token) approved request "
                  f"{request['id']} over the admin API: {reply.get('status')}")  # fmt: skip

    def example(self) -> tuple[str, str, str]:
        """A request that works (the first held-out digit), asked once: the URL, the body
        and what came back."""
        from servo.demo import digits_holdout

        x, y = digits_holdout(self.options.seed)
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "data": [float(v) for v in x[0]]}]})  # fmt: skip
        url = f"http://127.0.0.1:{self.options.http_port}/v2/models/{MODEL}/infer"
        request = urllib.request.Request(url, data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = json.loads(reply.read())
        label, version = answer["outputs"][0]["data"][0], answer["model_version"]
        said = f"served: the first held-out digit (a {y[0]}) is predicted as {label}"
        said += f" by version {version}"
        return url, body, said


def serve_until_stopped(demo: Demo) -> int | None:
    """Wait for Ctrl-C or SIGTERM, then stop `servo up`."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if demo.process is not None and demo.process.poll() is not None:
            break
    return demo.stop_up()


def _post(url: str, body: dict[str, Any], token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            doc: dict[str, Any] = json.loads(reply.read())
            return doc
    except urllib.error.HTTPError as exc:
        raise DemoError(f"the admin API refused the approval: {exc.code} "
                        f"{exc.read()[:300]!r}") from None  # fmt: skip


def _unix(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


def _brief(event: dict[str, Any]) -> str:
    detail = event.get("detail") or {}
    keys = ("signals", "trigger", "status", "version", "request", "n_labelled", "percent",
            "to_percent", "decision", "reason")  # fmt: skip
    shown = [f"{k}={detail[k]}" for k in keys if detail.get(k) not in (None, [], "")]
    text = ", ".join(shown)
    return f" ({text[:150]})" if text else ""


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if isinstance(value, int | float) else "?"


__all__ = ["BEFORE", "MARKER", "POLICY", "Demo", "DemoError", "DemoOptions", "Run", "prepare",
           "serve_until_stopped"]  # fmt: skip
