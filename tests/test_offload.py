"""Inference in a child process: the slot layout and status records (pure), then real worker processes running
the sample models, killed with real signals, and pipelines that use them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import PipelineConfig
from agent.errors import AgentError
from agent.offload import SLOTS, InferenceProcess, SlotLayout, read_status, write_status
from agent.pipeline import (
    AUTO_PROCESS_BELOW_MS,
    AUTO_PROCESS_BUSY,
    Pipeline,
    inference_in_process,
    inference_rate,
)
from agent.predictor import Predictor
from tests.daemon_helpers import wait_until
from tests.test_source_camera import SAMPLES, digit_video

CLASSIFIER = SAMPLES / "digits-classifier-tflite"


def test_slot_layout_places_every_tensor_aligned_after_the_header() -> None:
    layout = SlotLayout.for_shapes(
        [((1, 32, 32, 1), np.dtype(np.int8)), ((1, 3), np.dtype(np.float32))],
        [((1, 10), np.dtype(np.int8)), ((2, 5, 4), np.dtype(np.float32))],
    )
    offsets = [off for off, _, _ in layout.inputs + layout.outputs]
    assert offsets == [256, 256 + 1024, 256 + 1024 + 64, 256 + 1024 + 64 + 64]
    assert all(off % 64 == 0 for off in offsets) and layout.size == offsets[-1] + 192  # 160 bytes, rounded up
    assert SlotLayout.from_json(layout.to_json()) == layout
    buffer = bytearray(layout.size * 2)
    start, ins, outs = layout.views(buffer, 1)
    assert start == layout.size and [a.shape for a in ins] == [(1, 32, 32, 1), (1, 3)]
    outs[1][...] = 7.5  # views write into the shared buffer
    assert np.frombuffer(buffer, np.float32, 40, layout.size + layout.outputs[1][0]).tolist() == [7.5] * 40


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, None),
        ("input 'x' has shape [1, 3]", "input 'x' has shape [1, 3]"),
        ("é" * 300, "é" * 120),  # truncated to fit the header, on a character boundary here
        ("", ""),
    ],
)
def test_status_records_round_trip(error: str | None, expected: str | None) -> None:
    buffer = bytearray(1024)
    write_status(buffer, 512, error, 1.25)
    assert read_status(buffer, 512) == (expected, 1.25)


def start_worker(predictor: Predictor, results: list[Any], **kwargs: Any) -> InferenceProcess:
    return InferenceProcess.for_model(
        predictor.model, predictor.load_args, lambda ticket, raw, ms: results.append((ticket, raw, ms)), **kwargs
    )


def digit_inputs(predictor: Predictor, count: int) -> list[list[np.ndarray]]:
    import cv2

    frames = [cv2.imread(str(SAMPLES / "inputs" / f"digit_{i % 10}.png")) for i in range(count)]
    return [predictor.model_inputs(predictor.prepare(f)) for f in frames]


@pytest.mark.parametrize("bundle", ["digits-classifier-tflite", "digits-classifier-onnx", "sensor-anomaly"])
def test_worker_gives_what_the_runtime_gives_here_in_order(bundle: str) -> None:
    predictor = Predictor.open(SAMPLES / bundle, threads=1)
    results: list[Any] = []
    try:
        if predictor.kind == "timeseries":
            rng = np.random.default_rng(3)
            spec = predictor.input_spec
            inputs = [
                predictor.model_inputs(predictor.prepare(rng.normal(size=(spec.window, len(spec.channels)))))
                for _ in range(40)
            ]
        else:
            inputs = digit_inputs(predictor, 40)
        expected = [[o.copy() for o in predictor.model.run_raw(arrays)] for arrays in inputs]
        worker = start_worker(predictor, results)
        try:
            for i, arrays in enumerate(inputs):  # more frames than slots: submit waits for room
                assert worker.submit(arrays, i, timeout=10.0)
            assert wait_until(lambda: len(results) == len(inputs), timeout=30)
            assert worker.busy_since is None
        finally:
            worker.close()
    finally:
        predictor.close()
    assert [ticket for ticket, _, _ in results] == list(range(40))
    for (_, raw, ms), want in zip(results, expected, strict=True):
        assert not isinstance(raw, str) and ms > 0
        assert all(np.array_equal(a, b) for a, b in zip(raw, want, strict=True))
    assert worker.pid is not None and not Path(f"/proc/{worker.pid}").exists()  # stopped and reaped


def test_inputs_that_do_not_fit_are_refused_at_submit() -> None:
    predictor = Predictor.open(CLASSIFIER, threads=1)
    results: list[Any] = []
    worker = start_worker(predictor, results)
    try:
        with pytest.raises(AgentError, match=r"does not fit \[\[1, 32, 32, 1\]\]"):
            worker.submit([np.zeros((1, 16, 16, 1), np.int8)], "x")
        with pytest.raises(AgentError, match="does not fit"):
            worker.submit([np.zeros((1, 32, 32, 1), np.float32)], "x")
        assert worker.submit(digit_inputs(predictor, 1)[0], "ok")  # the refused ones took no slot
        assert wait_until(lambda: len(results) == 1, timeout=10)
    finally:
        worker.close()
        predictor.close()


def test_a_model_the_worker_cannot_load_is_refused_at_start() -> None:
    predictor = Predictor.open(CLASSIFIER, threads=1)
    try:
        with pytest.raises(AgentError, match="inference process did not start: runtime onnxruntime cannot run tflite"):
            InferenceProcess.for_model(
                predictor.model, predictor.load_args | {"runtime": "onnxruntime"}, lambda *a: None
            )
        with pytest.raises(AgentError, match="outputs do not keep one shape"):
            InferenceProcess(  # slots sized for outputs the model does not give
                str(predictor.model.info.path),
                predictor.load_args,
                [(t.concrete_shape(), t.dtype) for t in predictor.model.inputs],
                [((1, 11), np.dtype(np.int8))],
                lambda *a: None,
            )
    finally:
        predictor.close()


def test_a_killed_worker_fails_what_it_held_and_refuses_more() -> None:
    predictor = Predictor.open(CLASSIFIER, threads=1)
    results: list[Any] = []
    worker = start_worker(predictor, results)
    try:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGSTOP)  # frames pile up in the stopped worker
        inputs = digit_inputs(predictor, 5)
        for i, arrays in enumerate(inputs):
            assert worker.submit(arrays, i)
        assert worker.busy_since is not None
        os.kill(worker.pid, signal.SIGKILL)
        assert wait_until(lambda: len(results) == 5, timeout=10)
        assert worker.failed == "inference process exited with code -9"
        assert all(raw == worker.failed for _, raw, _ in results)
        assert worker.submit(inputs[0], "late") is False
    finally:
        worker.close()
        predictor.close()


def test_the_worker_ends_when_the_agent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from agent.predictor import Predictor\n"
        "from agent.offload import InferenceProcess\n"
        f"p = Predictor.open({str(CLASSIFIER)!r}, threads=1)\n"
        "m = p.model\n"
        "w = InferenceProcess.for_model(m, p.load_args, lambda *a: None)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=os.environ | {"PYTHONPATH": str(root)},
    )
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{worker_pid}").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        # the worker's parent is gone: init reaps it once it exits, which it does at the end of its ready pipe
        assert wait_until(lambda: not _running(worker_pid), timeout=10)
    finally:
        parent.kill()
        parent.wait()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def video_pipeline(
    tmp_path: Path, frames: int, camera: dict[str, Any] | None = None, **cfg: Any
) -> tuple[Pipeline, list[dict[str, Any]], Predictor]:
    """The classifier over a Motion-JPEG file of digits, inference in a process unless ``cfg`` says otherwise;
    ``camera``: source settings (a replay as fast as processed unless told otherwise)."""
    from agent.sources.camera import CameraSource, CameraSourceConfig

    video = digit_video(tmp_path / "digits.avi", frames=frames)
    predictor = Predictor.open(CLASSIFIER, threads=1)
    source = CameraSource(CameraSourceConfig(device=str(video), **({"realtime": False} | (camera or {}))), "video")
    results: list[dict[str, Any]] = []
    config = PipelineConfig(source="video", model="m", queue_size=2, **({"inference": "process"} | cfg))
    return Pipeline("p", config, source, predictor, results.append), results, predictor


@pytest.mark.parametrize("preprocess_thread", ["own", "capture"])
def test_replay_through_an_inference_process_gives_every_result_in_order(
    tmp_path: Path, preprocess_thread: str
) -> None:
    """In the capture thread (a replay): frames go straight to the worker; with a pre-processing thread, through
    the inference thread. Every frame is classified as in a thread, in order; the worker ends with the pipeline."""
    pipe, results, predictor = video_pipeline(tmp_path, 60, preprocess_thread=preprocess_thread)
    pipe.start()
    stages = [t.name for t in pipe._threads]
    worker = pipe._offload
    try:
        assert worker is not None and worker.slots == SLOTS
        assert pipe.snapshot()["inference"] == "process"
        assert wait_until(lambda: pipe.finished, timeout=60)
    finally:
        pipe.stop()
        predictor.close()
    assert [r["seq"] for r in results] == list(range(1, 61)) and pipe.stats.processed == 60
    assert [r["label"] for r in results] == [str(i % 10) for i in range(60)]
    assert pipe.stats.errors == 0 and pipe.stats.dropped == 0 and len(pipe.stats.infer_ms) == 60
    own = preprocess_thread == "own"
    assert stages == ["p-capture", *(["p-pre", "p-infer"] if own else []), "p-post"]
    assert worker.pid is not None and not _running(worker.pid)


def test_a_live_source_keeps_two_frames_in_the_worker(tmp_path: Path) -> None:
    from agent.sources.synthetic import SyntheticSource, SyntheticSourceConfig
    from tests import onnx_models

    model = onnx_models.float_image_classifier(tmp_path / "m.onnx", channels=3, size=8, classes=4)
    predictor = Predictor.open(model)
    source = SyntheticSource(SyntheticSourceConfig(rate=100, width=64, height=48), "syn")
    results: list[dict[str, Any]] = []
    pipe = Pipeline(
        "p", PipelineConfig(source="syn", model=str(model), inference="process"), source, predictor, results.append
    )
    pipe.start()
    try:
        assert pipe._offload is not None and pipe._offload.slots == 2 and not pipe._direct
        assert wait_until(lambda: len(results) >= 30, timeout=30)
    finally:
        pipe.stop()
        predictor.close()
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
    assert not pipe.stalled()


def test_worker_death_fails_the_pipeline_without_taking_the_agent_down(tmp_path: Path) -> None:
    pipe, results, predictor = video_pipeline(
        tmp_path, 30, camera={"realtime": True, "loop": True}, preprocess_thread="capture"
    )
    pipe.start()
    try:
        worker = pipe._offload
        assert worker is not None and worker.pid is not None
        assert wait_until(lambda r=results: len(r) >= 5, timeout=30)
        os.kill(worker.pid, signal.SIGKILL)
        assert wait_until(lambda: pipe.failed is not None, timeout=15)
        assert pipe.failed == "inference process exited with code -9" and pipe.stalled()
        assert not pipe.finished  # a failure is not the end of the input: the daemon reports it, systemd restarts us
    finally:
        pipe.stop()
        predictor.close()


def test_hot_swap_starts_the_new_models_worker_and_stops_the_old_one(tmp_path: Path) -> None:
    pipe, results, predictor = video_pipeline(
        tmp_path, 30, camera={"realtime": True, "fps": 200, "loop": True}, preprocess_thread="capture"
    )
    onnx = Predictor.open(SAMPLES / "digits-classifier-onnx", threads=1)
    pipe.start()
    try:
        first = pipe._offload
        assert first is not None
        assert wait_until(lambda: len(results) >= 10, timeout=30)
        old = pipe.swap_predictor(onnx)
        assert old is predictor and pipe._offload is not first and pipe._offload is not None
        assert wait_until(lambda: any(r["model"] == "digits-classifier-onnx" for r in results), timeout=30)
        assert first.pid is not None and wait_until(lambda: not _running(first.pid), timeout=15)
        count = len(results)
        assert wait_until(lambda: len(results) >= count + 10, timeout=30)
    finally:
        pipe.stop()
        predictor.close()
        onnx.close()
    models = [r["model"] for r in results]
    switch = models.index("digits-classifier-onnx")
    assert set(models[:switch]) == {"digits-classifier-tflite"} and set(models[switch:]) == {"digits-classifier-onnx"}
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1)) and pipe.stats.errors == 0
    last = pipe._offloads[-1]
    assert last.pid is not None and not _running(last.pid)


def test_closing_twice_and_from_two_threads_is_harmless() -> None:
    predictor = Predictor.open(CLASSIFIER, threads=1)
    worker = start_worker(predictor, [])
    try:
        closers = [threading.Thread(target=worker.close) for _ in range(2)]
        for t in closers:
            t.start()
        for t in closers:
            t.join(20)
        worker.close()
        assert worker.submit(digit_inputs(predictor, 1)[0], "late") is False
    finally:
        predictor.close()
    assert worker.pid is not None and not _running(worker.pid)


INF = float("inf")


@pytest.mark.parametrize(
    ("setting", "cpus", "inference_ms", "rate", "expected"),
    [
        ("thread", 8, 0.1, INF, False),
        ("process", 1, 50.0, 1.0, True),  # asked for: whatever the machine and the model
        ("process", 4, None, None, True),
        ("auto", 2, 0.13, INF, True),  # a fast model, a file read as fast as processed, a second CPU
        ("auto", 16, 4.99, INF, True),
        ("auto", 4, AUTO_PROCESS_BELOW_MS, INF, False),  # from here a thread costs under 1%: no second process
        ("auto", 4, 40.0, INF, False),
        ("auto", 1, 0.13, INF, False),  # one CPU: the two processes would take turns on it
        ("auto", 4, None, INF, False),  # not timed (the model failed to run on zeros)
        ("auto", 4, 0.13, 30.0, False),  # a 30 fps camera: inference busy 0.4% of the time, GIL waits cost nothing
        ("auto", 4, 0.13, None, False),  # a live source that does not say its rate (serial, camera without fps)
        ("auto", 4, 2.0, 100.0, True),  # busy 20% of the time: from here it pays
        ("auto", 4, 2.0, 99.0, False),
    ],
)
def test_where_the_model_runs(
    setting: str, cpus: int, inference_ms: float | None, rate: float | None, expected: bool
) -> None:
    assert inference_in_process(setting, cpus, inference_ms, rate) is expected
    assert AUTO_PROCESS_BUSY == 0.2


@pytest.mark.parametrize(
    ("source_rate", "max_fps", "stride", "expected"),
    [
        (INF, None, None, INF),  # a file read as fast as processed
        (INF, 50.0, None, 50.0),  # ... under a cap
        (30.0, 50.0, None, 30.0),
        (None, None, None, None),  # unknown
        (None, 10.0, None, 10.0),  # unknown, but capped
        (100.0, None, 16, 6.25),  # sensor rows, a window every 16 rows
        (INF, None, 16, INF),
    ],
)
def test_inferences_a_second_a_pipeline_may_run(
    source_rate: float | None, max_fps: float | None, stride: int | None, expected: float | None
) -> None:
    assert inference_rate(source_rate, max_fps, stride) == expected


def test_a_model_is_timed_by_its_fastest_run_within_a_budget(tmp_path: Path) -> None:
    from tests import onnx_models

    fast = Predictor.open(CLASSIFIER, threads=1)
    slow = Predictor.open(onnx_models.slow_on_demand(tmp_path / "slow.onnx", base_trips=100_000))
    try:
        took = fast.inference_ms()
        assert took is not None and 0 < took < AUTO_PROCESS_BELOW_MS
        started = time.monotonic()
        slow_ms = slow.inference_ms(runs=5, budget_ms=1.0)  # the first run spends the budget: timed once
        assert slow_ms is not None and slow_ms >= AUTO_PROCESS_BELOW_MS
        assert time.monotonic() - started < 3 * slow_ms / 1000.0 + 0.5
    finally:
        fast.close()
        slow.close()


@contextlib.contextmanager
def cpus_allowed(cpus: set[int]):
    """This thread may run on ``cpus`` only (the pipeline decides in the thread that starts it)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_auto_runs_the_sample_classifier_in_a_process_given_two_cpus(tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs (CI has 2)")
    pipe, results, predictor = video_pipeline(tmp_path, 40, inference="auto")
    pipe.start()
    try:
        assert pipe._offload is not None and pipe.snapshot()["inference"] == "process"
        assert wait_until(lambda: pipe.finished, timeout=60)
    finally:
        pipe.stop()
        predictor.close()
    assert [r["label"] for r in results] == [str(i % 10) for i in range(40)]


def test_auto_keeps_the_model_in_a_thread_on_one_cpu(tmp_path: Path) -> None:
    pipe, results, predictor = video_pipeline(tmp_path, 40, inference="auto")
    with cpus_allowed({min(os.sched_getaffinity(0))}):
        pipe.start()
    try:
        assert pipe._offload is None and pipe.snapshot()["inference"] == "thread"
        assert wait_until(lambda: pipe.finished, timeout=60)
    finally:
        pipe.stop()
        predictor.close()
    assert [r["label"] for r in results] == [str(i % 10) for i in range(40)] and pipe.stats.errors == 0


def test_auto_keeps_a_slow_model_in_a_thread_and_decides_again_at_a_hot_swap(tmp_path: Path) -> None:
    """A model over the line runs in a thread; a hot swap to a fast one moves inference into a process."""
    from agent.sources.replay import ReplaySource, ReplaySourceConfig
    from tests import onnx_models
    from tests.test_daemon import SLOW_BUNDLE

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs (CI has 2)")
    bundles = {}
    for name, trips in (("slow", 100_000), ("quick", 0)):
        root = tmp_path / name
        root.mkdir()
        onnx_models.slow_on_demand(root / "slow.onnx", base_trips=trips)
        (root / "bundle.toml").write_text(SLOW_BUNDLE)
        bundles[name] = Predictor.open(root)
    csv = tmp_path / "values.csv"
    csv.write_text("v\n" + "\n".join("1.0" for _ in range(400)) + "\n")
    # rows as fast as the replay can pace them: inference would be busy all the time
    source = ReplaySource(ReplaySourceConfig(path=str(csv), rate=1e6), "values")
    results: list[dict[str, Any]] = []
    config = PipelineConfig(source="values", model="m", inference="auto")
    pipe = Pipeline("p", config, source, bundles["slow"], results.append)
    pipe.start()
    try:
        assert pipe._offload is None and pipe.snapshot()["inference"] == "thread"
        assert wait_until(lambda: len(results) >= 1, timeout=30)
        pipe.swap_predictor(bundles["quick"])
        assert pipe._offload is not None and pipe.snapshot()["inference"] == "process"
        count = len(results)
        assert wait_until(lambda: len(results) >= count + 20, timeout=30)
    finally:
        pipe.stop()
        for predictor in bundles.values():
            predictor.close()
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1)) and pipe.stats.errors == 0
    values = [r["outputs"]["y"]["values"] for r in results]  # the trips each model ran: its base + 1
    switch = values.index([1.0])
    assert (
        switch >= 1
        and set(map(tuple, values[:switch])) == {(100_001.0,)}
        and set(map(tuple, values[switch:])) == {(1.0,)}
    )


def test_check_says_where_each_pipelines_model_runs(tmp_path: Path) -> None:
    """`edge-agent check --json` as a real process: auto's choice with two CPUs and with one, and a pinned thread."""
    config = tmp_path / "agent.toml"
    config.write_text(
        '[sources.syn]\ntype = "synthetic"\nrate = 5000\n'
        f'[pipelines.auto]\nsource = "syn"\nmodel = "{CLASSIFIER}"\n'
        f'[pipelines.pinned]\nsource = "syn"\nmodel = "{CLASSIFIER}"\ninference = "thread"\n'
    )

    def check(cpus: set[int]) -> dict[str, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "check", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        checks = json.loads(proc.stdout)["checks"]
        return {c["what"]: c for c in checks if c["what"].startswith("pipeline ")}

    one = check({min(os.sched_getaffinity(0))})
    assert (
        one["pipeline auto"]["inference"] == "thread"
        and "(auto: at most 5000/s, 1 CPU)" in one["pipeline auto"]["detail"]
    )
    assert one["pipeline pinned"]["inference"] == "thread" and "auto" not in one["pipeline pinned"]["detail"]
    if len(os.sched_getaffinity(0)) >= 2:
        two = check(os.sched_getaffinity(0))
        detail = two["pipeline auto"]["detail"]
        assert two["pipeline auto"]["inference"] == "process", detail
        assert re.search(
            r"inference in a process \(auto: \d+\.\d\d ms an inference, at most 5000/s, \d+ CPUs\)", detail
        ), detail
        assert two["pipeline pinned"]["inference"] == "thread"


def test_auto_keeps_a_fast_model_of_a_slow_live_source_in_a_thread(tmp_path: Path) -> None:
    """A 30 fps camera keeps the classifier busy a fraction of a percent: no second process; at 5,000 frames a
    second (a high-speed camera) it gets one."""
    from agent.sources.synthetic import SyntheticSource, SyntheticSourceConfig

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs (CI has 2)")
    for rate, place in ((30.0, "thread"), (5000.0, "process")):
        predictor = Predictor.open(CLASSIFIER, threads=1)
        source = SyntheticSource(SyntheticSourceConfig(rate=rate, width=64, height=48), "syn")
        results: list[dict[str, Any]] = []
        pipe = Pipeline("p", PipelineConfig(source="syn", model="m"), source, predictor, results.append)
        pipe.start()
        try:
            assert pipe.snapshot()["inference"] == place, rate
            assert wait_until(lambda r=results: len(r) >= 5, timeout=30)
        finally:
            pipe.stop()
            predictor.close()
        assert pipe.stats.errors == 0


def test_a_model_is_not_timed_where_no_time_could_choose_a_process(tmp_path: Path) -> None:
    """Under 40 inferences a second no model fast enough for a process keeps it busy a fifth of the time: auto
    decides without running the model (a slow model's timing run is not spent at start)."""
    from agent.pipeline import choose_inference

    predictor = Predictor.open(CLASSIFIER, threads=1)
    try:
        for rate in (None, 10.0, 40.0):
            assert choose_inference("auto", predictor, rate)[::2] == (False, None), rate
        in_process, cpus, took_ms = choose_inference("auto", predictor, 41.0)
        assert took_ms is not None and took_ms > 0
        assert in_process is (cpus >= 2 and 41.0 * took_ms / 1000.0 >= AUTO_PROCESS_BUSY)
        assert choose_inference("thread", predictor, math.inf)[::2] == (False, None)
        assert choose_inference("process", predictor, None)[::2] == (True, None)
    finally:
        predictor.close()
