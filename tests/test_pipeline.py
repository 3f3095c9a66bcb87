"""Pipeline: drop policy and rate cap (pure), then real threads with a real model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.config import PipelineConfig
from agent.pipeline import (
    REPLAY_QUEUE,
    LatestQueue,
    Pipeline,
    effective_cap,
    own_preprocess_thread,
    rate_gate,
    usable_cpus,
)
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
    assert pipe._pre_q.maxsize == pipe._infer_q.maxsize == 1  # a live source keeps the configured queue size
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


@pytest.mark.parametrize(
    ("setting", "cpus", "own"),
    [("auto", 1, False), ("auto", 2, False), ("auto", 3, True), ("auto", 64, True)]
    + [("own", n, True) for n in (1, 4)]
    + [("capture", n, False) for n in (1, 4)],
)
def test_preprocessing_gets_its_own_thread_where_there_are_cpus_for_it(setting: str, cpus: int, own: bool) -> None:
    assert own_preprocess_thread(setting, cpus) is own


def test_usable_cpus_follows_the_affinity_mask() -> None:
    import os

    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("preprocess_thread", ["own", "capture"])
def test_mjpeg_video_through_the_classifier_decoded_small_or_full(tmp_path: Path, preprocess_thread: str) -> None:
    """A Motion-JPEG file is decoded at the model's size (gray, 1/4 scale) and classified as well as full frames;
    post-processing runs in its own stage and every result arrives, in order, whichever thread pre-processes."""
    from agent.sources.base import FrameHint
    from agent.sources.camera import CameraSource, CameraSourceConfig
    from tests.test_source_camera import SAMPLES, digit_video

    video = digit_video(tmp_path / "digits.avi", frames=40)
    labels: dict[str, list[str]] = {}
    for decode in ("auto", "full"):
        predictor = Predictor.open(SAMPLES / "digits-classifier-tflite", threads=1)
        source = CameraSource(CameraSourceConfig(device=str(video), realtime=False, decode=decode), "video")  # type: ignore[arg-type]
        results: list[dict] = []
        # in a thread: the stages asserted below (tests/test_offload.py has those with inference in a process)
        config = PipelineConfig(
            source="video", model="m", queue_size=2, preprocess_thread=preprocess_thread, inference="thread"
        )  # type: ignore[arg-type]
        pipe = Pipeline("p", config, source, predictor, results.append)
        pipe.start()
        stages = [t.name for t in pipe._threads]
        try:
            assert wait_until(lambda p=pipe: p.finished, timeout=60)
        finally:
            pipe.stop()
            predictor.close()
        assert source.frame_hint == FrameHint(32, 32, True)
        assert [r["seq"] for r in results] == list(range(1, 41)) and pipe.stats.processed == 40
        assert pipe.stats.dropped == 0 and pipe._infer_q.maxsize == REPLAY_QUEUE  # a file: deeper queues, no drops
        own = preprocess_thread == "own"
        assert stages == ["p-capture", *(["p-pre"] if own else []), "p-infer", "p-post"]
        assert pipe.snapshot()["preprocess_thread"] == preprocess_thread
        labels[decode] = [r["label"] for r in results]
    expected = [str(i % 10) for i in range(40)]
    assert labels["full"] == expected and labels["auto"] == expected


def test_shadow_candidate_widens_the_frames(tmp_path: Path) -> None:
    from agent.sources.base import FrameHint
    from agent.sources.camera import CameraSource, CameraSourceConfig
    from tests.test_source_camera import SAMPLES

    current = Predictor.open(SAMPLES / "digits-classifier-tflite", threads=1)
    detector = Predictor.open(SAMPLES / "digits-detector", threads=1)
    (tmp_path / "wide").mkdir()
    onnx_models.float_image_classifier(tmp_path / "wide" / "model.onnx", channels=3, size=48, classes=4)
    (tmp_path / "wide" / "bundle.toml").write_text(
        'name = "wide"\nversion = "1.0.0"\ntask = "classification"\nmodel = "model.onnx"\n'
        '[input]\nkind = "image"\ncolor = "rgb"\n'
    )
    wide = Predictor.open(tmp_path / "wide")
    raw = Predictor.open(tmp_path / "wide" / "model.onnx")  # a bare model: task raw, full frames
    source = CameraSource(CameraSourceConfig(device="unused.avi"), "cam")
    pipe = Pipeline("p", PipelineConfig(source="cam", model="m"), source, current, lambda r: None)
    try:
        pipe.source.want_frames(pipe._frame_hint())
        assert source.frame_hint == FrameHint(32, 32, True)
        pipe.watch_frames(wide)
        assert source.frame_hint == FrameHint(48, 48, False)  # big enough and in colour for both
        pipe.watch_frames(detector)
        assert source.frame_hint is None  # full frames while a detector watches
        pipe.watch_frames(raw)
        assert source.frame_hint is None
        pipe.watch_frames(None)
        assert source.frame_hint == FrameHint(32, 32, True)
        pipe.swap_predictor(wide)
        assert source.frame_hint == FrameHint(48, 48, False)
    finally:
        for p in (current, detector, wide, raw):
            p.close()
