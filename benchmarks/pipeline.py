"""`servo train`'s pipeline in process: a first run against a cached re-run (a script, not a
timed test; tests/test_train.py and tests/test_pipeline.py assert that the re-run is all
cache hits, this measures what that saves).

For each repeat: a fresh registry and work folder, `servo.train.train()` once (every step
runs), then again (every step a cache hit). Printed side by side: medians of the whole
call and of the steps' own durations, the ratio, and the bounds the tests used to assert
(first run under 30 s on 2 cores, cached steps under 1 s in all).

    python benchmarks/pipeline.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.store import RegistryStore
from servo.train import train

LIMITS_S = {"first": 30.0, "cached": 1.0}


def one(root: Path) -> dict[str, float]:
    store = RegistryStore(f"sqlite:///{root / 'r.db'}")
    store.create_schema()
    try:
        out: dict[str, float] = {}
        for kind in ("first", "cached"):
            started = time.perf_counter()
            result = train(store, work=root / "w")
            out[kind] = time.perf_counter() - started
            out[f"{kind}_steps"] = sum(s.duration_s for s in result.run.steps.values())
            statuses = {s.status for s in result.run.steps.values()}
            want = {"succeeded"} if kind == "first" else {"cached"}
            if statuses != want:
                raise SystemExit(f"{kind} run: steps {statuses}, expected {want}")
        return out
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="servo-pipeline-bench-") as tmp:
            runs.append(one(Path(tmp)))
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("| run | whole call s | steps s | limit s |")
    print("|---|---:|---:|---:|")
    for kind in ("first", "cached"):
        print(f"| {kind} | {median[kind]:.3f} | {median[kind + '_steps']:.3f} "
              f"| {LIMITS_S[kind]:.0f} |")  # fmt: skip
    print(
        f"\nfirst / cached: {median['first'] / median['cached']:.1f}x (whole call), "
        f"medians of {args.repeat}"
    )


if __name__ == "__main__":
    main()
