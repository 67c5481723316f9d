"""Server-side render time of every ops console page, with 1,000 pipeline runs and 100
promotion requests in the registry (issue 13: each under 200 ms).

The registry is tests/console_seed.py's (real trained champion and candidate, a pending
promotion with real evidence, a finished rollout, a failed run, the loop's checks) plus
`bulk(runs, requests)`. Each page is asked for N times in-process, through the admin app's
own dispatch (routing, session and token check against the registry, the page's queries,
Jinja2 and the SVG charts; no socket), after one warm-up request; the table gives the
median and p95 of those N and their ratio to the limit.

    python benchmarks/console.py [--runs 1000] [--requests 100] [-n 20] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrain.rollout import ImmediateRollout
from serving.http import AsgiApp, Request
from servo.admin import build_admin_app
from servo.auth import Authenticator
from tests.console_seed import MODEL, Seeded, bulk, seed

LIMIT_MS = 200.0
COOKIE = re.compile(rb"^servo_console=([^;]+)")
FORM_COOKIE = re.compile(rb"^([a-z_]+)=([^;]*)")


@dataclass
class Timing:
    page: str
    path: str
    status: int
    bytes: int
    median_ms: float
    p95_ms: float

    @property
    def ratio(self) -> float:
        return self.p95_ms / LIMIT_MS


def pages(seeded: Seeded) -> dict[str, str]:
    """Every console page: name -> path (the seeded records' own)."""
    return {
        "models": "/console/models",
        "promotions": "/console/promotions",
        "promotion": f"/console/promotions/{seeded.promotion}",
        "runs": "/console/runs",
        "run": f"/console/runs/{seeded.failed_run}",
        "rollouts": "/console/rollouts",
        "rollout": f"/console/rollouts/{seeded.rollout}",
        "monitors": "/console/monitors",
        "monitor": f"/console/monitors/{MODEL}",
    }


@dataclass
class InProcess:
    """The admin app called directly, on one event loop (as the admin server's thread)."""

    app: AsgiApp
    loop: asyncio.AbstractEventLoop

    def __call__(self, method: str, path: str, headers: list[tuple[bytes, bytes]],
                 body: bytes = b"") -> tuple[int, bytes, list[tuple[bytes, bytes]]]:  # fmt: skip
        target, _, query = path.partition("?")
        request = Request(method, target, {}, headers, body, query.encode())
        response = self.loop.run_until_complete(self.app.dispatch(request))
        return response.status, response.body, response.headers


def log_in(call: InProcess, token: str) -> list[tuple[bytes, bytes]]:
    """The headers of a logged-in browser (the login form's nonce, then the session)."""
    status, body, headers = call("GET", "/console/login", [])
    jar = dict(m.groups() for k, v in headers if k == b"set-cookie" if (m := FORM_COOKIE.match(v)))
    nonce = re.search(rb'name="nonce" value="([^"]+)"', body)
    if status != 200 or nonce is None:
        raise RuntimeError(f"no login form ({status})")
    form = urllib.parse.urlencode({"token": token, "nonce": nonce.group(1).decode()}).encode()
    cookie = b"; ".join(k + b"=" + v for k, v in jar.items())
    form_headers = [(b"content-type", b"application/x-www-form-urlencoded"), (b"cookie", cookie)]
    status, _, headers = call("POST", "/console/login", form_headers, form)
    sessions = [m.group(1) for k, v in headers if k == b"set-cookie" if (m := COOKIE.match(v))]
    if status != 303 or not sessions:
        raise RuntimeError(f"login refused ({status})")
    return [(b"cookie", b"servo_console=" + sessions[0])]


def measure(call: InProcess, headers: list[tuple[bytes, bytes]], name: str, path: str,
            n: int) -> Timing:  # fmt: skip
    status, body, _ = call("GET", path, headers)  # warm-up (templates compiled)
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        status, body, _ = call("GET", path, headers)
        seconds.append(time.perf_counter() - start)
    ms = sorted(s * 1e3 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return Timing(name, path, status, len(body), statistics.median(ms), p95)


def run(directory: Path, runs: int, requests: int, n: int) -> list[Timing]:
    seeded = seed(directory)
    bulk(seeded.store, runs=runs, requests=requests)
    app = build_admin_app(
        seeded.store,
        rollout=ImmediateRollout(seeded.store),
        authenticator=Authenticator(seeded.store),
    )
    call = InProcess(app, asyncio.new_event_loop())
    try:
        headers = log_in(call, seeded.tokens["viewer"])
        return [measure(call, headers, name, path, n) for name, path in pages(seeded).items()]
    finally:
        call.loop.close()
        seeded.store.close()


def table(timings: list[Timing]) -> str:
    lines = [f"{'page':<11} {'status':>6} {'KiB':>7} {'median ms':>10} {'p95 ms':>8} "
             f"{'p95/limit':>9}  path"]  # fmt: skip
    lines += [f"{t.page:<11} {t.status:>6} {t.bytes / 1024:>7.1f} {t.median_ms:>10.1f} "
              f"{t.p95_ms:>8.1f} {t.ratio:>9.2f}  {t.path}" for t in timings]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("-n", type=int, default=20, help="renders per page (default 20)")
    parser.add_argument("--dir", type=Path, help="where the registry goes (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="servo-console-bench-") as scratch:
        directory = args.dir or Path(scratch) / "s"
        timings = run(directory, args.runs, args.requests, args.n)
    print(f"{args.runs} runs, {args.requests} promotion requests in the registry; "
          f"{args.n} renders per page; limit {LIMIT_MS:.0f} ms")  # fmt: skip
    print(table(timings))
    missing = [t.page for t in timings if t.status != 200]
    slow = [t.page for t in timings if t.status == 200 and t.p95_ms >= LIMIT_MS]
    if missing:
        print(f"not rendered (status != 200): {', '.join(missing)}")
    if slow:
        print(f"over the limit: {', '.join(slow)}")
    return 1 if missing or slow else 0


if __name__ == "__main__":
    sys.exit(main())
