"""Latency and throughput measurement of the predict path (and of the bare runtime loop)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.predictor import Predictor
from agent.processing.image import ImagePreprocessor


def percentiles(latencies_ms: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(latencies_ms, dtype=np.float64)
    if arr.size == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "min": 0.0, "max": 0.0}
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "p50": round(float(p50), 4),
        "p95": round(float(p95), 4),
        "p99": round(float(p99), 4),
        "mean": round(float(arr.mean()), 4),
        "min": round(float(arr.min()), 4),
        "max": round(float(arr.max()), 4),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def sample_input(predictor: Predictor, rng: np.random.Generator | None = None) -> Callable[[], Any]:
    """A callable running one prediction on a representative synthetic input."""
    rng = rng or np.random.default_rng(0)
    kind = predictor.kind
    if kind == "image":
        pre = predictor._image
        assert isinstance(pre, ImagePreprocessor)
        frame = rng.integers(0, 256, size=(pre.height, pre.width, 3), dtype=np.uint8)
        return lambda: predictor.predict_image(frame)
    if kind == "timeseries":
        spec = predictor.input_spec
        window = rng.normal(size=(spec.window, len(spec.channels))).astype(np.float32)  # type: ignore[union-attr]
        return lambda: predictor.predict_window(window)
    golden = predictor.golden_cases()
    if golden:
        arrays = golden[0][0]
    else:
        arrays = [_random_tensor(t.concrete_shape(), t.dtype, rng) for t in predictor.model.inputs]
    return lambda: predictor.predict_tensors(arrays)


def _random_tensor(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(dtype)
    return rng.random(size=shape).astype(dtype)


def measure(
    step: Callable[[], Any], seconds: float, warmup: int = 20, max_iterations: int | None = None
) -> dict[str, Any]:
    """Run ``step`` repeatedly for ``seconds``; latency percentiles and throughput."""
    for _ in range(warmup):
        step()
    latencies: list[float] = []
    perf = time.perf_counter
    start = perf()
    deadline = start + seconds
    now = start
    while now < deadline and (max_iterations is None or len(latencies) < max_iterations):
        t0 = perf()
        step()
        now = perf()
        latencies.append((now - t0) * 1000.0)
    elapsed = now - start
    return {
        "iterations": len(latencies),
        "seconds": round(elapsed, 3),
        "throughput_per_s": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(latencies),
    }


def interleaved(steps: dict[str, Callable[[], Any]], seconds: float, block: int = 25) -> dict[str, dict[str, Any]]:
    """Measure several steps in alternating blocks of ``block`` calls for ``seconds`` each, so the machine's
    drift and noise (other tenants, frequency changes) hit all of them alike: throughput and latency per step."""
    perf = time.perf_counter
    latencies: dict[str, list[float]] = {name: [] for name in steps}
    spent = dict.fromkeys(steps, 0.0)
    for step in steps.values():
        for _ in range(20):
            step()
    deadline = perf() + seconds * len(steps)
    while perf() < deadline:
        for name, step in steps.items():
            step()  # the first call after another step's block is not counted: all steps start alike
            lat = latencies[name]
            begin = perf()
            for _ in range(block):
                t0 = perf()
                step()
                lat.append((perf() - t0) * 1000.0)
            spent[name] += perf() - begin
    return {
        name: {
            "iterations": len(latencies[name]),
            "seconds": round(spent[name], 3),
            "throughput_per_s": round(len(latencies[name]) / spent[name], 2) if spent[name] else 0.0,
            "latency_ms": percentiles(latencies[name]),
        }
        for name in steps
    }


def bare_loop(predictor: Predictor) -> Callable[[], Any]:
    """The runtime alone: the same model fed ready-made input tensors, no pre/post-processing."""
    model = predictor.model
    rng = np.random.default_rng(1)
    arrays = [_random_tensor(t.concrete_shape(), t.dtype, rng) for t in model.inputs]
    return lambda: model.run_raw(arrays)


def run_bench(predictor: Predictor, seconds: float, step: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Benchmark the predict path; returns a JSON-ready report."""
    info = predictor.model.info
    report = measure(step or sample_input(predictor), seconds)
    return {
        "model": predictor.bundle.name,
        "version": predictor.bundle.version,
        "path": str(info.path),
        "runtime": info.runtime,
        "runtime_version": info.runtime_version,
        "threads": info.threads,
        "providers": info.providers,
        **report,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
