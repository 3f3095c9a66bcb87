"""The benchmarks still run (`make bench`): a short pipeline and inference run, figures well-formed. Speed is not
asserted here, only that each side measured something and the ratios are computed from the same run."""

from __future__ import annotations

import os

import pytest

from bench.pipeline_bench import run as run_pipeline
from bench.run import bench_inference


def test_pipeline_bench_runs_every_side() -> None:
    report = run_pipeline(threads=1, rounds=1, soak_seconds=0, frames=90)
    for key in ("bare_fps", "agent_fps", "bare_video_fps", "threaded_fps", "alt_fps"):
        assert report[key] > 0, key
    # one round: the ratios are that round's (the reported fps are rounded to 0.1)
    assert report["ratio"] == pytest.approx(report["agent_fps"] / report["bare_fps"], abs=2e-3)
    assert report["ratio_threaded"] == pytest.approx(report["agent_fps"] / report["threaded_fps"], abs=2e-3)
    assert report["alt_ratio"] == pytest.approx(report["alt_fps"] / report["bare_fps"], abs=2e-3)
    assert report["alt_ratio_range"] == [report["alt_ratio"]] * 2
    assert report["agent_latency_ms"]["p50"] > 0 and report["alt_latency_ms"]["p50"] > 0
    # the default (auto) and the other place for inference both ran; on 2 CPUs auto runs this model in a process
    assert {report["agent_inference"], report["alt_inference"]} == {"thread", "process"}
    if len(os.sched_getaffinity(0)) >= 2:
        assert report["agent_inference"] == "process"
    assert "soak" not in report
    assert report["steal_pct"] is None or 0 <= report["steal_pct"] <= 100


def test_steal_share_of_cpu_time() -> None:
    from bench.pipeline_bench import cpu_times, steal_share

    assert steal_share((1000, 10), (2000, 60)) == 5.0
    assert steal_share(None, (2000, 60)) is None and steal_share((1000, 10), (1000, 10)) is None
    now = cpu_times()
    assert now is not None and now[0] >= now[1] >= 0  # this Linux machine has /proc/stat


def test_inference_bench_compares_agent_and_bare_loop() -> None:
    result = bench_inference("digits-classifier-tflite", "digit_7.png", threads=1, seconds=0.3)
    assert result["bare_per_s"] > 0 and result["agent_per_s"] > 0 and result["agent_own_us"] > 0
    assert result["ratio"] == pytest.approx(result["agent_per_s"] / result["bare_per_s"], abs=2e-4)
    assert result["input"] == "digit_7.png 32x32"
    per_prediction_us = 1e6 / result["agent_per_s"] - 1e6 / result["bare_per_s"]
    assert result["extra_us"] == pytest.approx(per_prediction_us, abs=0.01)
    assert result["hand_per_s"] > 0
    assert result["ratio_hand"] == pytest.approx(result["agent_per_s"] / result["hand_per_s"], abs=2e-4)


@pytest.mark.parametrize("bundle", ["digits-classifier-tflite", "digits-classifier-onnx"])
def test_the_hand_written_reference_does_the_agents_job(bundle: str) -> None:
    """The inference bench's hand-written loop is a fair reference: the agent's labels and scores, every digit."""
    from agent.inputs import read_image
    from agent.predictor import Predictor
    from bench.handwritten import classifier_loop
    from bench.run import SAMPLES

    predictor = Predictor.open(SAMPLES / bundle, threads=1)
    try:
        for digit in range(10):
            frame = read_image(SAMPLES / "inputs" / f"digit_{digit}.png")
            hand = classifier_loop(predictor.bundle, predictor.model.info.runtime, 1, frame)
            assert hand is not None
            agent = predictor.predict_image(frame).result["top"]
            mine = hand()
            assert [label for label, _ in mine] == [c["label"] for c in agent]
            assert [score for _, score in mine] == pytest.approx([c["score"] for c in agent], abs=1e-5)
            assert mine[0][0] == str(digit)
    finally:
        predictor.close()
    detector = Predictor.open(SAMPLES / "digits-detector", threads=1)
    try:
        frame = read_image(SAMPLES / "inputs" / "scene_0.png")
        assert classifier_loop(detector.bundle, detector.model.info.runtime, 1, frame) is None  # classifiers only
    finally:
        detector.close()
