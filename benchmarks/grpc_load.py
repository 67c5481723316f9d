"""A closed-loop gRPC load generator for ModelInfer: N concurrent callers for a fixed time,
sending one pre-serialised request (no client-side protobuf work), reporting JSON.

    python benchmarks/grpc_load.py TARGET REQUEST_FILE CONCURRENCY SECONDS
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import uvloop

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def main(target: str, body: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", -1)]
    ) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out
        await call(body, timeout=30)  # warm the connection
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                try:
                    await call(body, timeout=30)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    count = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(count - 1, int(q * count))] * 1000 if count else float("nan")

    return {
        "rps": count / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
        "requests": count,
    }


if __name__ == "__main__":
    target, path, concurrency, seconds = sys.argv[1:5]
    result = uvloop.run(main(target, Path(path).read_bytes(), int(concurrency), float(seconds)))
    print(json.dumps(result))
