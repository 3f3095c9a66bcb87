"""Pipeline: drop policy and rate cap (pure), then real threads with a real model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.config import PipelineConfig
from agent.pipeline import LatestQueue, Pipeline, effective_cap, rate_gate
from agent.predictor import Predictor
from agent.sources.synthetic import SyntheticSource, SyntheticSourceConfig
from tests import onnx_models
from tests.daemon_helpers import wait_until


def test_latest_queue_newest_wins_and_counts_drops() -> None:
    q = LatestQueue(2)
    assert q.put(1) is False and q.put(2) is False
    assert q.put(3) is True and q.dropped == 1
    assert [q.get(0), q.get(0)] == [2, 3]
    assert q.get(0.01) is None
    q.put(4)
    q.close()
    assert q.get(0) == 4 and q.get(0) is None and q.closed_and_empty


def test_latest_queue_blocking_put_waits_for_room() -> None:
    q = LatestQueue(1)
    q.put("a")
    done = threading.Event()

    def producer() -> None:
        q.put("b", block=True)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.2)
    assert not done.is_set()  # backpressure, nothing dropped
    assert q.get(1) == "a"
    t.join(2)
    assert done.is_set() and q.get(1) == "b" and q.dropped == 0
    stop = threading.Event()
    q.put("c")
    stop.set()
    assert q.put("d", block=True, stop=stop) is True  # a stopping pipeline does not wait forever


@pytest.mark.parametrize(
    ("last", "now", "cap", "passes"),
    [(None, 5.0, 2.0, True), (1.0, 1.4, 2.0, False), (1.0, 1.5, 2.0, True), (1.0, 1.001, None, True)],
)
def test_rate_gate(last: float | None, now: float, cap: float | None, passes: bool) -> None:
    assert rate_gate(last, now, cap) is passes


def test_effective_cap_under_throttling() -> None:
    assert effective_cap(10.0, 1.0, 50.0) == 10.0
    assert effective_cap(None, 1.0, 50.0) is None
    assert effective_cap(10.0, 0.5, 50.0) == 5.0
    assert effective_cap(None, 0.5, 40.0) == 20.0  # no configured cap: half of what it ran at
    assert effective_cap(None, 0.5, 0.0) is None
    assert effective_cap(1.0, 0.01, 0.0) == 0.1  # never stops entirely


def make_pipeline(tmp_path: Path, rate: float, **cfg: object) -> tuple[Pipeline, list[dict]]:
    model = onnx_models.float_image_classifier(tmp_path / "m.onnx", channels=3, size=8, classes=4)
    predictor = Predictor.open(model)
    source = SyntheticSource(SyntheticSourceConfig(rate=rate, width=64, height=48), "syn")
    results: list[dict] = []
    config = PipelineConfig(source="syn", model=str(model), **cfg)
    return Pipeline("p", config, source, predictor, results.append), results


def test_pipeline_runs_and_reports(tmp_path: Path) -> None:
    pipe, results = make_pipeline(tmp_path, rate=50)
    pipe.start()
    try:
        assert wait_until(lambda: len(results) >= 20, timeout=20)
    finally:
        pipe.stop()
        pipe.predictor.close()
    seqs = [r["seq"] for r in results]
    assert seqs == list(range(1, len(seqs) + 1))
    snap = pipe.snapshot()
    assert snap["processed"] == len(results) and snap["model"] == "m" and snap["source_health"]["connected"]
    assert snap["latency_ms"]["p50"] > 0 and not snap["stalled"]


def test_rate_cap_and_thermal_factor(tmp_path: Path) -> None:
    pipe, results = make_pipeline(tmp_path, rate=200, max_fps=20)
    factor = {"value": 1.0}
    pipe.rate_factor = lambda: factor["value"]
    pipe.start()
    try:
        time.sleep(2.0)
        normal = len(results)
        factor["value"] = 0.25  # the board runs hot: 5 fps
        time.sleep(0.3)
        before = len(results)
        time.sleep(2.0)
        hot = len(results) - before
    finally:
        pipe.stop()
        pipe.predictor.close()
    assert 20 <= normal <= 50  # ~40 at 20 fps over 2 s, generous for a noisy machine
    assert hot <= 16  # ~10 at 5 fps
    assert pipe.stats.skipped > 0
