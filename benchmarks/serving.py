"""Serving benchmark, side by side in one run (a script, not a timed test).

  limit   raw ONNX Runtime in-process, one row per call (no server at all)
  peer    the stock KServe ModelServer serving the same ONNX model via a plain kserve.Model
  mlserver  MLServer with a custom ONNX Runtime runtime (own virtual environment)
  servo   `servo serve`

Every server is pinned to one core (taskset), the load generator to the other: wrk for
REST (JSON and binary tensor extension), benchmarks/grpc_load.py for gRPC (raw contents).
Two models: the digits classifier ([N,64] FP32) and a medium MLP ([N,784]->1024->1024->10).
Prints a Markdown table with req/s, p50, p99 and the ratios to the peer and the limit.

    python benchmarks/serving.py [--seconds 5] [--concurrency 1,16,64] [--no-mlserver]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from serving.grpc_stubs import pb  # noqa: E402
from servo.demo import digits_holdout, export_digits, export_medium_mlp  # noqa: E402
from tests.servers import free_port  # noqa: E402

LOAD_CPU, SERVER_CPU = "0", "1"
PROTOCOLS = ("rest-json", "rest-binary", "grpc")


@dataclass
class Model:
    name: str
    folder: Path
    row: np.ndarray

    @property
    def features(self) -> int:
        return int(self.row.shape[1])


def build_models(root: Path) -> list[Model]:
    export_digits(root / "digits" / "1")
    export_medium_mlp(root / "mlp" / "1")
    x_test, _ = digits_holdout()
    mlp_row = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    return [
        Model("digits", root / "digits" / "1", x_test[:1]),
        Model("mlp", root / "mlp" / "1", mlp_row),
    ]


# --- the limit ---------------------------------------------------------------------------


def limit(model: Model, seconds: float) -> dict[str, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model.folder / "model.onnx"), opts)
    feeds = {"input": model.row}
    for _ in range(100):
        session.run(None, feeds)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return {
        "rps": len(times) / sum(times),
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": float(np.quantile(times, 0.99)) * 1000,
    }


# --- payloads ----------------------------------------------------------------------------


@dataclass
class Payload:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def rest_json(model: Model) -> Payload:
    doc = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, model.features],
                "datatype": "FP32",
                "data": model.row.reshape(-1).tolist(),
            }
        ]
    }
    return Payload(orjson.dumps(doc), {"Content-Type": "application/json"})


def rest_binary(model: Model) -> Payload:
    raw = model.row.astype("<f4").tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, model.features],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return Payload(
        head + raw,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        },
    )


def grpc_request(model: Model) -> bytes:
    message = pb.ModelInferRequest(model_name=model.name)
    item = message.inputs.add()
    item.name, item.datatype = "input", "FP32"
    item.shape.extend([1, model.features])
    message.raw_input_contents.append(model.row.astype("<f4").tobytes())
    data: bytes = message.SerializeToString()
    return data


# --- servers -----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    command: list[str]
    http_port: int
    grpc_port: int
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, workdir: Path, models: list[Model]) -> None:
        self.log = workdir / f"{self.name}.log"
        with self.log.open("wb") as handle:
            self.process = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, *self.command],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=workdir,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                url = f"http://127.0.0.1:{self.http_port}/v2/models/{{}}/ready"
                if all(httpx.get(url.format(m.name), timeout=2).status_code == 200 for m in models):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def servo_server(
    models: list[Model], env: dict[str, str] | None = None, routes: Path | None = None
) -> Server:
    http, grpc = free_port(), free_port()
    command = [sys.executable, "-m", "servo.cli", "serve"]
    command += ["--routes", str(routes)] if routes else [str(m.folder) for m in models]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--log-level", "WARNING"]
    return Server("servo", command, http, grpc, {"PYTHONPATH": str(ROOT), **(env or {})})


# --- the gateway's own costs (Servo only) ---------------------------------------------------


@dataclass
class Setup:
    label: str
    model: Model
    protocols: tuple[str, ...]
    concurrency: int
    env: dict[str, str]
    routes: Path | None = None


def gateway_setups(models: dict[str, Model], workdir: Path) -> list[Setup]:
    digits = models["digits"]
    shadow = export_digits(workdir / "models" / "digits" / "2", version="2", seed=1)
    routes = workdir / "routes.json"
    routes.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "digits",
                        "champion": {"version": "1", "path": str(digits.folder)},
                        "shadows": [
                            {"version": shadow.version, "path": str(workdir / "models/digits/2")}
                        ],
                    }
                ]
            }
        )
    )
    off = {"SERVO_METRICS": "false", "SERVO_BATCHING": "off"}
    on = {"SERVO_METRICS": "true", "SERVO_BATCHING": "off"}
    logged = {**on, "SERVO_PAYLOAD_LOG_DIR": str(workdir / "payload-log")}
    mlp = models["mlp"]
    protocols = ("rest-json", "rest-binary", "grpc")
    batch_on = {**on, "SERVO_BATCHING": "on", "SERVO_BATCH_MAX_ROWS": "64"}
    return [
        Setup("digits: recorder + routing off", digits, ("rest-json",), 16, off),
        Setup("digits: recorder on, champion only", digits, ("rest-json",), 16, on),
        Setup("digits: recorder on, champion + 1 shadow", digits, ("rest-json",), 16, on, routes),
        Setup("digits: recorder on + payload log", digits, ("rest-json",), 16, logged),
        Setup("mlp: batching off", mlp, protocols, 64, on),
        Setup("mlp: batching on (max 64 rows)", mlp, protocols, 64, batch_on),
    ]


def gateway(
    models: dict[str, Model], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for setup in gateway_setups(models, workdir):
        server = servo_server([setup.model], setup.env, setup.routes)
        print(f"== servo, {setup.label}", flush=True)
        server.start(workdir, [setup.model])
        try:
            for protocol in setup.protocols:
                cell = Cell(server, setup.model, protocol, setup.concurrency)
                row = {"setup": setup.label, "protocol": protocol, "concurrency": setup.concurrency}
                row.update(run_load(cell, args.seconds, workdir))
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    return rows


def gateway_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| setup | protocol | conc. | req/s | p50 ms | p99 ms | x baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for row in rows:
        key = (row["setup"].split(":")[0], row["protocol"])
        base.setdefault(key, row["rps"])
        ratio = row["rps"] / base[key]
        out.append(
            f"| {row['setup']} | {row['protocol']} | {row['concurrency']} | {row['rps']:,.0f} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {ratio:.2f} |"
        )
    return "\n".join(out)


def kserve_server(models: list[Model]) -> Server:
    http, grpc = free_port(), free_port()
    command = [sys.executable, str(HERE / "kserve_peer.py"), str(http), str(grpc)]
    return Server("kserve", command + [str(m.folder) for m in models], http, grpc)


def mlserver_server(models: list[Model], venv: Path, workdir: Path) -> Server:
    http, grpc = free_port(), free_port()
    repo = workdir / "mlserver"
    for model in models:
        folder = repo / model.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model.name,
                    "implementation": "onnx_runtime.OnnxRuntime",
                    "parameters": {"uri": str(model.folder / "model.onnx")},
                }
            )
        )
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http,
                "grpc_port": grpc,
                "metrics_port": free_port(),
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    command = [str(venv / "bin" / "mlserver"), "start", str(repo)]
    return Server("mlserver", command, http, grpc, {"PYTHONPATH": str(HERE / "mlserver_peer")})


def ensure_mlserver_venv(venv: Path) -> bool:
    if (venv / "bin" / "mlserver").exists():
        return True
    print(f"creating {venv} for MLServer (once)...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "mlserver", "onnxruntime"], check=True
        )
    except subprocess.CalledProcessError as exc:
        print(f"MLServer unavailable ({exc}); skipping it", flush=True)
        return False
    return True


# --- load --------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(
    url: str, payload: Payload, concurrency: int, seconds: float, workdir: Path, *,
    cpus: str = LOAD_CPU,
) -> dict[str, Any]:  # fmt: skip
    body_file = workdir / "body.bin"
    body_file.write_bytes(payload.body)
    lines = [
        'wrk.method = "POST"',
        f'local f = io.open("{body_file}", "rb")',
        "wrk.body = f:read('*all')",
        "f:close()",
        *(f'wrk.headers["{k}"] = "{v}"' for k, v in payload.headers.items()),
    ]
    script = workdir / "post.lua"
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    sock = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": errors,
        "socket_errors": sock.group(0) if sock else "",
    }


def grpc_load(
    target: str, request: bytes, concurrency: int, seconds: float, workdir: Path
) -> dict[str, Any]:
    path = workdir / "request.pb"
    path.write_bytes(request)
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CPU,
            sys.executable,
            str(HERE / "grpc_load.py"),
            target,
            str(path),
            str(concurrency),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def check(server: Server, model: Model, protocol: str) -> str | None:
    """One request first: the reply must be a 200 with an output. None means fine."""
    try:
        if protocol == "grpc":
            import grpc as grpclib

            from serving.grpc_stubs import pb_grpc

            with grpclib.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                reply = stub.ModelInfer(
                    pb.ModelInferRequest.FromString(grpc_request(model)), timeout=10
                )
                return None if reply.outputs else "no outputs"
        payload = rest_json(model) if protocol == "rest-json" else rest_binary(model)
        url = f"http://127.0.0.1:{server.http_port}/v2/models/{model.name}/infer"
        reply = httpx.post(url, content=payload.body, headers=payload.headers, timeout=10)
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}: {reply.text[:120]}"
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:120]}"


@dataclass(frozen=True)
class Cell:
    server: Server
    model: Model
    protocol: str
    concurrency: int


def run_load(cell: Cell, seconds: float, workdir: Path) -> dict[str, Any]:
    server, model, c = cell.server, cell.model, cell.concurrency
    if cell.protocol == "grpc":
        target = f"127.0.0.1:{server.grpc_port}"
        return grpc_load(target, grpc_request(model), c, seconds, workdir)
    payload = rest_json(model) if cell.protocol == "rest-json" else rest_binary(model)
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{model.name}/infer"
    return wrk(url, payload, c, seconds, workdir)


# --- report ------------------------------------------------------------------------------

HEADER = (
    "| model | protocol | conc. | server | req/s | p50 ms | p99 ms "
    "| x peer (KServe) | x limit (ORT) |"
)


def table(results: list[dict[str, Any]], limits: dict[str, dict[str, float]]) -> str:
    rows = [HEADER, "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    peer = {
        (r["model"], r["protocol"], r["concurrency"]): r for r in results if r["server"] == "kserve"
    }
    for r in results:
        key = f"| {r['model']} | {r['protocol']} | {r['concurrency']} | {r['server']} "
        if "error" in r:
            rows.append(key + f"| n/a: {r['error']} | | | | |")
            continue
        base = peer.get((r["model"], r["protocol"], r["concurrency"]))
        ratio = f"{r['rps'] / base['rps']:.2f}" if base and "rps" in base else "-"
        to_limit = r["rps"] / limits[r["model"]]["rps"]
        rows.append(
            key + f"| {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {ratio} | {to_limit:.3f} |"
        )
    lines = [
        "| model | raw ONNX Runtime in-process (the limit): calls/s | p50 ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {m} | {v['rps']:,.0f} | {v['p50_ms']:.3f} |" for m, v in limits.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(rows)


def goals(results: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, on the digits model over REST JSON at concurrency 16."""
    found = {
        r["server"]: r
        for r in results
        if (r["model"], r["protocol"], r["concurrency"]) == ("digits", "rest-json", 16)
        and "rps" in r
    }
    servo, peer, mls = found.get("servo"), found.get("kserve"), found.get("mlserver")
    out = []
    prefix = "digits, REST JSON, c16:"
    if servo and peer:
        ratio = servo["rps"] / peer["rps"]
        out.append(f"{prefix} Servo/KServe req/s = {ratio:.2f}x (goal >= 5x)")
        out.append(
            f"{prefix} Servo p99 {servo['p99_ms']:.2f} ms vs KServe p50 "
            f"{peer['p50_ms']:.2f} ms (goal: below)"
        )
    if servo and mls:
        out.append(f"{prefix} Servo/MLServer req/s = {servo['rps'] / mls['rps']:.2f}x (goal >= 3x)")
    return out


def measure(
    servers: list[Server], models: list[Model], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for server in servers:
        print(f"== {server.name}", flush=True)
        server.start(workdir, models)
        try:
            for model in models:
                for protocol in args.protocols.split(","):
                    problem = check(server, model, protocol)
                    for c in (int(c) for c in args.concurrency.split(",")):
                        row: dict[str, Any] = {
                            "server": server.name,
                            "model": model.name,
                            "protocol": protocol,
                            "concurrency": c,
                        }
                        if problem is None:
                            cell = Cell(server, model, protocol, c)
                            row.update(run_load(cell, args.seconds, workdir))
                        else:
                            row["error"] = problem
                        results.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            server.stop()
    order = {"kserve": 0, "mlserver": 1, "servo": 2}
    results.sort(
        key=lambda r: (
            r["model"],
            PROTOCOLS.index(r["protocol"]),
            r["concurrency"],
            order[r["server"]],
        )
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--models", default="digits,mlp")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--servers", default="kserve,mlserver,servo")
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--mlserver-venv", type=Path, default=HERE / ".venv-mlserver")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--section", choices=["all", "peers", "gateway"], default="all",
        help="peers: Servo vs KServe/MLServer/ORT; gateway: routing, recorder, batching costs",
    )  # fmt: skip
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset (Debian packages wrk and util-linux)")
    wanted_servers = args.servers.split(",")
    if args.no_mlserver and "mlserver" in wanted_servers:
        wanted_servers.remove("mlserver")
    workdir = Path(tempfile.mkdtemp(prefix="servo-bench-"))
    try:
        all_models = build_models(workdir / "models")
        models = [m for m in all_models if m.name in args.models.split(",")]
        args.out.mkdir(parents=True, exist_ok=True)
        if args.section in ("all", "peers"):
            limits = {m.name: limit(m, min(args.seconds, 3.0)) for m in models}
            servers: list[Server] = []
            for name in wanted_servers:
                if name == "servo":
                    servers.append(servo_server(models))
                elif name == "kserve":
                    servers.append(kserve_server(models))
                elif name == "mlserver" and ensure_mlserver_venv(args.mlserver_venv):
                    servers.append(mlserver_server(models, args.mlserver_venv, workdir))
            results = measure(servers, models, args, workdir)
            report = table(results, limits)
            summary = goals(results)
            text = report + "\n\n" + "\n".join(f"- {line}" for line in summary) + "\n"
            print("\n" + text)
            (args.out / "serving.md").write_text(text)
            (args.out / "serving.json").write_text(
                json.dumps({"limits": limits, "results": results}, indent=1)
            )
        if args.section in ("all", "gateway"):
            rows = gateway({m.name: m for m in all_models}, args, workdir)
            text = gateway_table(rows) + "\n"
            print("\n" + text)
            (args.out / "gateway.md").write_text(text)
            (args.out / "gateway.json").write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
