"""Serving p99 during a retrain (issue 10, point 2): a script, not a timed test.

Starts `servo up` (digits bootstrapped into a fresh folder), then alternates, in one run,
wrk phases at one concurrency (default 16) without and with a retrain running in a worker
process (servo.worker.TrainingJob, the one the loop uses; back to back, so a retrain runs
for the whole phase). The server is pinned to --server-cpus, wrk to --load-cpus and the
worker to --worker-cpus (taskset / sched_setaffinity). Prints a Markdown table per phase
and the ratio of the median p99 with a retrain to the median p99 without.

    python benchmarks/retrain_p99.py [--seconds 10] [--rounds 3] [--concurrency 16]
        [--server-cpus 1] [--load-cpus 0] [--worker-cpus 2,3]

With fewer than 4 cores the defaults share: the worker runs on the load generator's core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import Payload, free_port, wrk  # noqa: E402
from servo.demo import digits_holdout  # noqa: E402


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def start_up(directory: Path, cpus: set[int], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = [
        "taskset", "-c", ",".join(map(str, sorted(cpus))), sys.executable, "-m", "servo.cli",
        "up", "--dir", str(directory), "--http-port", str(port), "--grpc-port",
        str(free_port()), "--admin-port", str(free_port()), "--log-level", "WARNING",
    ]  # fmt: skip
    with log.open("wb") as handle:
        process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=directory)
    url = f"http://127.0.0.1:{port}/v2/models/digits/ready"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"servo up exited:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit(f"servo up not ready:\n{log.read_text()}")


class Retrainer:
    """Keeps one retrain running in a worker process, back to back, until stopped."""

    def __init__(self, work: Path, params: dict[str, Any], nice: int):
        self.work = work
        self.params = params
        self.nice = nice
        self.runs: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy_s = 0.0

    def _loop(self) -> None:
        from servo.loop_train import start_worker
        from servo.worker import TrainSpec

        registry = f"sqlite:///{self.work / 'registry.db'}"
        while not self._stop.is_set():
            spec = TrainSpec(
                registry_url=registry, work_dir=str(self.work), name="digits",
                params=self.params, trigger="manual", triggered_by=None, artifacts=None,
                cache=False,
            )  # fmt: skip
            started = time.monotonic()
            job = start_worker(spec, self.work / "logs", self.nice)  # as the loop does
            while job.poll() is None:
                if self._stop.wait(0.05):
                    job.stop(grace_s=5)
                    break
            outcome = job.wait()
            self.busy_s += time.monotonic() - started
            self.runs.append({"status": outcome.status, "s": time.monotonic() - started})

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    many = (os.cpu_count() or 1) >= 4
    parser.add_argument("--server-cpus", default="1")
    parser.add_argument("--load-cpus", default="0")
    parser.add_argument("--worker-cpus", default="2,3" if many else "0")
    parser.add_argument("--hidden", default="256,256", help="the retrain's MLP layers")
    parser.add_argument("--nice", type=int, default=10, help="the worker's niceness (the loop's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset")
    load_cpus, worker_cpus = _cpus(args.load_cpus), _cpus(args.worker_cpus)
    with tempfile.TemporaryDirectory(prefix="servo-retrain-p99-") as tmp:
        root = Path(tmp)
        (root / "up").mkdir()
        (root / "worker").mkdir()
        process, port = start_up(root / "up", _cpus(args.server_cpus), root / "up.log")
        os.sched_setaffinity(0, worker_cpus)  # the worker processes inherit it
        x, _ = digits_holdout()
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "data": [float(v) for v in x[0]]}]}).encode()  # fmt: skip
        payload = Payload(body, {"Content-Type": "application/json"})
        url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
        params = {"seed": 1, "hidden": [int(v) for v in args.hidden.split(",")], "max_iter": 300}
        retrainer = Retrainer(root / "worker", params, args.nice)
        rows: list[dict[str, Any]] = []
        try:
            wrk_cpus = ",".join(map(str, sorted(load_cpus)))
            wrk(url, payload, args.concurrency, 2, root, cpus=wrk_cpus)  # warm-up
            for round_ in range(args.rounds):
                for phase in ("idle", "retrain"):
                    if phase == "retrain":
                        retrainer.start()
                        time.sleep(1.0)  # the worker is past its imports, training
                    busy_before = retrainer.busy_s
                    result = wrk(url, payload, args.concurrency, args.seconds, root, cpus=wrk_cpus)
                    if phase == "retrain":
                        retrainer.stop()
                    rows.append({"round": round_ + 1, "phase": phase, **result,
                                 "retrain_s": retrainer.busy_s - busy_before})  # fmt: skip
        finally:
            retrainer.stop()
            process.terminate()
            process.wait(timeout=60)
    ratio = report(args, rows, retrainer.runs)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio, "runs": retrainer.runs}))


def report(args: argparse.Namespace, rows: list[dict[str, Any]],
           runs: list[dict[str, Any]]) -> float:  # fmt: skip
    """Print the table; returns the ratio of the median p99s (retrain / idle)."""
    idle = [r["p99_ms"] for r in rows if r["phase"] == "idle"]
    busy = [r["p99_ms"] for r in rows if r["phase"] == "retrain"]
    ratio = statistics.median(busy) / statistics.median(idle)
    print(f"servo up, digits, REST JSON, concurrency {args.concurrency}, {args.seconds:g} s "
          f"phases; server cpus {args.server_cpus}, wrk cpus {args.load_cpus}, worker cpus "
          f"{args.worker_cpus} (nice {args.nice})\n")  # fmt: skip
    print("| round | phase | req/s | p50 ms | p99 ms | errors | retrain busy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        busy_share = (
            f"{min(1.0, r['retrain_s'] / args.seconds):.0%}" if r["phase"] != "idle" else "-"
        )
        print(f"| {r['round']} | {r['phase']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} "
              f"| {r['p99_ms']:.2f} | {r['errors']} | {busy_share} |")  # fmt: skip
    finished = [r for r in runs if r["status"] == "succeeded"]
    median_s = statistics.median([r["s"] for r in finished]) if finished else 0.0
    print(f"\nretrains run: {len(runs)} ({len(finished)} finished; median {median_s:.1f} s each)")
    print(f"p99 with a retrain / p99 without (medians of {args.rounds} rounds): {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
