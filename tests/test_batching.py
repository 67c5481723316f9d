"""Adaptive batching: identical results, real merging, failures isolated per request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.batcher import BatchingConfig
from serving.errors import InferenceFailed
from serving.recorder import ModelMetrics, Recorder
from serving.repository import ModelRepository
from serving.runtime import OnnxModel, RuntimeOptions, decide_inline
from tests.models import gather_model, write_model


@pytest.fixture
def repository() -> Iterator[ModelRepository]:
    repo = ModelRepository()
    yield repo
    repo.close()


def load(
    repository: ModelRepository, folder: Path, config: BatchingConfig
) -> tuple[OnnxModel, Recorder]:
    entry = repository.load_folder(folder)
    assert entry.model is not None, entry.error
    recorder = Recorder()
    entry.model.observer = ModelMetrics(recorder, entry.name, entry.version)
    assert entry.model.configure_batching(config) is bool(config.enabled)
    return entry.model, recorder


async def concurrently(model: OnnxModel, requests: list[dict[str, Any]]) -> list[Any]:
    return await asyncio.gather(*(model.predict(r) for r in requests), return_exceptions=True)


def test_batched_results_equal_unbatched(model_root: Path, repository: ModelRepository) -> None:
    rng = np.random.default_rng(3)
    requests = [
        {"input": rng.random((int(rng.integers(1, 4)), 784), dtype=np.float32)} for _ in range(48)
    ]
    batched, recorder = load(
        repository, model_root / "mlp" / "1", BatchingConfig(True, max_rows=16, max_delay_us=5000)
    )
    results = asyncio.run(concurrently(batched, requests))
    expected = [batched.run_blocking(r)["probabilities"] for r in requests]
    for got, want, request in zip(results, expected, requests, strict=True):
        assert got[0].shape == (request["input"].shape[0], 10)
        # bit for bit: ONNX Runtime (one thread) computes each row the same in a batch
        np.testing.assert_array_equal(got[0], want)
    rows = recorder.batch_rows[("mlp", "1")]
    calls = sum(rows.counts)
    assert calls < len(requests)  # merged
    assert sum(n for n, le in zip(rows.counts, (*rows.buckets, 1e9), strict=True) if le > 1) > 0
    # every call stayed within max_rows (a request over it would run alone)
    assert sum(rows.counts[i] for i, b in enumerate(rows.buckets) if b > 16) == 0
    queue = recorder.queue[("mlp", "1")]
    assert sum(queue.counts) == len(requests)


def test_digits_batched_labels_identical(model_root: Path, repository: ModelRepository) -> None:
    from servo.demo import digits_holdout

    x_test, _ = digits_holdout()
    requests = [{"input": x_test[i : i + 1]} for i in range(64)]
    model, _ = load(repository, model_root / "digits" / "1", BatchingConfig(True, 32, 2000))
    results = asyncio.run(concurrently(model, requests))
    for got, request in zip(results, requests, strict=True):
        want = model.run_blocking(request)
        np.testing.assert_array_equal(got[0], want["label"])
        np.testing.assert_array_equal(got[1], want["probabilities"])


def test_a_failing_request_fails_alone(tmp_path: Path, repository: ModelRepository) -> None:
    folder = write_model(tmp_path / "gather" / "1", gather_model(), "gather")
    model, _ = load(repository, folder, BatchingConfig(True, 32, 5000))
    requests = [{"idx": np.array([[i % 10]], dtype=np.int64)} for i in range(20)]
    requests[7] = {"idx": np.array([[99]], dtype=np.int64)}
    results = asyncio.run(concurrently(model, requests))
    assert isinstance(results[7], InferenceFailed)
    for i, got in enumerate(results):
        if i != 7:
            np.testing.assert_array_equal(got[0], [[np.arange(3) + 3 * (i % 10)]])


def test_batching_off_and_forced_on(model_root: Path, repository: ModelRepository) -> None:
    model, _ = load(repository, model_root / "digits" / "2", BatchingConfig(False))
    assert model.batcher is None
    assert model.configure_batching(BatchingConfig(True)) is True and model.batcher is not None
    assert model.configure_batching(BatchingConfig(False)) is False and model.batcher is None


@pytest.mark.parametrize(
    ("inline_max_us", "inline"),
    [(0.0, False), (1e12, True)],  # no warm-up call takes 0 us, every one is under 11 days
    ids=["slower-than-the-limit", "faster-than-the-limit"],
)
def test_automatic_batching_follows_the_inline_decision(
    model_root: Path, inline_max_us: float, inline: bool
) -> None:
    """Automatic batching batches exactly the models that run off the event loop; the
    limit forces each side whatever this machine's speed (the decision itself, from given
    measurements, is tested below)."""
    repository = ModelRepository(RuntimeOptions(inline_max_us=inline_max_us))
    try:
        entry = repository.load_folder(model_root / "digits" / "1")
        assert entry.model is not None, entry.error
        assert entry.model.warmup_us is not None and entry.model.runs_inline is inline
        assert entry.model.configure_batching(BatchingConfig(None)) is (not inline)
        assert (entry.model.batcher is None) is inline
    finally:
        repository.close()


def test_the_inline_decision_from_given_measurements() -> None:
    assert decide_inline(120.0, 300.0) and decide_inline(300.0, 300.0)  # at the limit: inline
    assert not decide_inline(300.5, 300.0) and not decide_inline(5000.0, 300.0)
    assert not decide_inline(None, 300.0)  # the warm-up call failed: off the loop
    assert not decide_inline(1.0, 0.0) and decide_inline(0.0, 0.0)
