"""What a gateway in front of a remote backend costs, side by side in one run (a script,
not a timed test).

  direct    the load generator calls the backend (`servo serve` on the digits model)
  gateway   it calls a `servo serve --routes` gateway whose digits version is the backend's
            (serving.remote), over the same protocol: REST (binary tensors) -> REST, or
            gRPC (raw contents) -> gRPC; batching at the edge automatic (on)
  no-batch  the same gateway with SERVO_BATCHING=off (each request its own backend call)

The backend and the gateways share one core (taskset), the load generator has the other:
a gateway's req/s relative to direct is then the share of a core the backend keeps when a
gateway sits in front, and its added p50/p99 at concurrency 1 the latency it adds per hop.
Every cell is measured `--repeats` times, the setups alternating within each round; the
table gives medians and the ratios to direct.

    python benchmarks/remote.py [--seconds 3] [--repeats 3] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import (  # noqa: E402
    Cell,
    Model,
    Server,
    build_models,
    check,
    run_load,
    servo_server,
)

PROTOCOLS = {"rest": "rest-binary", "grpc": "grpc"}  # client side, and gateway -> backend


def gateway_server(
    backend: Server, model: Model, protocol: str, workdir: Path, batching: bool
) -> Server:
    url = (
        f"grpc://127.0.0.1:{backend.grpc_port}"
        if protocol == "grpc"
        else f"http://127.0.0.1:{backend.http_port}"
    )
    routes = workdir / f"routes-{protocol}-{batching}.json"
    champion = {"version": "1", "url": url, "path": str(model.folder)}
    routes.write_text(json.dumps({"models": [{"name": model.name, "champion": champion}]}))
    env = {"SERVO_METRICS": "true", "SERVO_BATCHING": "auto" if batching else "off"}
    server = servo_server([model], env, routes)
    server.name = f"gateway-{protocol}{'' if batching else '-nobatch'}"
    return server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--protocols", default="rest,grpc")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset (Debian packages wrk and util-linux)")
    workdir = Path(tempfile.mkdtemp(prefix="servo-bench-remote-"))
    servers: list[Server] = []
    try:
        model = next(m for m in build_models(workdir / "models") if m.name == "digits")
        backend = servo_server([model], {"SERVO_METRICS": "true"})
        backend.name = "backend"
        backend.start(workdir, [model])
        servers.append(backend)
        setups: dict[str, dict[str, Server]] = {}
        for protocol in args.protocols.split(","):
            setups[protocol] = {"direct": backend}
            for label, batching in (("gateway", True), ("no-batch", False)):
                server = gateway_server(backend, model, protocol, workdir, batching)
                server.start(workdir, [model])
                servers.append(server)
                setups[protocol][label] = server
        runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        for round_ in range(args.repeats):
            for protocol, by_label in setups.items():
                for c in (int(c) for c in args.concurrency.split(",")):
                    for label, server in by_label.items():
                        problem = check(server, model, PROTOCOLS[protocol])
                        if problem is not None:
                            sys.exit(f"{label} {protocol}: {problem}")
                        cell = Cell(server, model, PROTOCOLS[protocol], c)
                        result = run_load(cell, args.seconds, workdir)
                        runs.setdefault((protocol, c, label), []).append(result)
                        row = {"round": round_, "protocol": protocol, "c": c, "setup": label}
                        print(json.dumps(row | result), flush=True)
        text = table(runs)
        print("\n" + text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "remote.md").write_text(text)
        cells = [{"protocol": p, "c": c, "setup": s, "runs": r} for (p, c, s), r in runs.items()]
        (args.out / "remote.json").write_text(json.dumps(cells, indent=1))
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def table(runs: dict[tuple[str, int, str], list[dict[str, Any]]]) -> str:
    def med(key: tuple[str, int, str], field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    out = [
        "| protocol | conc. | setup | req/s | p50 ms | p99 ms | x direct req/s "
        "| added p50 ms | added p99 ms | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for protocol, c, label in runs:
        key, base = (protocol, c, label), (protocol, c, "direct")
        rps, p50, p99 = med(key, "rps"), med(key, "p50_ms"), med(key, "p99_ms")
        errors = sum(int(r.get("errors", 0)) for r in runs[key])
        out.append(
            f"| {protocol} | {c} | {label} | {rps:,.0f} | {p50:.2f} | {p99:.2f} "
            f"| {rps / med(base, 'rps'):.2f} | {p50 - med(base, 'p50_ms'):+.2f} "
            f"| {p99 - med(base, 'p99_ms'):+.2f} | {errors} |"
        )
    rounds = len(next(iter(runs.values())))
    return "\n".join(out) + f"\n\nmedians of {rounds} rounds\n"


if __name__ == "__main__":
    main()
