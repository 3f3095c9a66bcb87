"""End-to-end daemon pipeline benchmark: a video file through the int8 classifier.

Compares the pipelined agent as configured by default (decode | pre-process | inference | post-process and sinks
in threads; ``inference = "auto"`` puts this fast model in a process of its own given 2 CPUs) and with the other
place for inference (a thread of the agent, or a process when auto chose a thread) with the bare
runtime loop over the same decoded frames (invoke only), with a plain
sequential decode + pre-process + invoke loop over the same video file, and with the least a
threaded Python pipeline does (a decode thread feeding an invoke thread), in the same run; and
measures capture-to-result latency and RSS (the agent's and its inference process's) over a
soak run of the default configuration.
"""

from __future__ import annotations

import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

from agent.benchmark import percentiles
from agent.config import parse_config
from agent.daemon import Daemon
from agent.predictor import Predictor

SAMPLES = Path(__file__).resolve().parent.parent / "agent" / "samples"
BUNDLE = SAMPLES / "digits-classifier-tflite"
QUEUE = 2  # per-stage queue of the benchmarked pipeline (the daemon's default is 1)
FRAMES = 6000  # 200 s of 30 fps video: about a second for the agent at thousands of frames a second (shorter runs
# let one hiccup of a shared machine move a round's figure by 10%)


def make_video(path: Path, frames: int = FRAMES, size: tuple[int, int] = (320, 240)) -> Path:
    digits = [cv2.imread(str(p)) for p in sorted((SAMPLES / "inputs").glob("digit_*.png"))]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, size)
    for i in range(frames):
        frame = cv2.resize(digits[i % len(digits)], size, interpolation=cv2.INTER_LINEAR)
        writer.write(frame)
    writer.release()
    return path


def decoded_frames(video: Path) -> Iterator[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame
    finally:
        cap.release()


def bare_fps(video: Path, threads: int) -> float:
    """The runtime alone over the same frames: tensors prepared up front, timed loop of invoke only."""
    predictor = Predictor.open(BUNDLE, threads=threads)
    try:
        tensors = [predictor.prepare(f).tensors for f in decoded_frames(video)]
        model = predictor.model
        for t in tensors[:20]:
            model.run_raw(t)
        start = time.perf_counter()
        for t in tensors:
            model.run_raw(t)
        return len(tensors) / (time.perf_counter() - start)
    finally:
        predictor.close()


def bare_video_fps(video: Path, threads: int) -> float:
    """A plain sequential loop over the video file: decode, pre-process, invoke (what the pipeline does, minus
    threads, queues, post-processing and sinks)."""
    predictor = Predictor.open(BUNDLE, threads=threads)
    try:
        model = predictor.model
        frames = 0
        start = time.perf_counter()
        cap = cv2.VideoCapture(str(video))
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            model.run_raw(predictor.prepare(frame).tensors)
            frames += 1
        cap.release()
        return frames / (time.perf_counter() - start)
    finally:
        predictor.close()


def threaded_fps(video: Path, threads: int) -> float:
    """The least a threaded Python pipeline does, as a reference for what threads cost on this machine: one thread
    reads the video's Motion-JPEG packets, decodes them at the model's size (as the agent does) and pre-processes;
    the calling thread runs the model on them, through a plain queue of 8. No post-processing, no results."""
    from agent.sources.camera import jpeg_decode_flags

    predictor = Predictor.open(BUNDLE, threads=threads)
    frames: queue.Queue[list[np.ndarray] | None] = queue.Queue(8)

    def produce() -> None:
        cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
        try:
            width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            flags = jpeg_decode_flags(width, height, predictor.frame_hint)
            cap.set(cv2.CAP_PROP_FORMAT, -1)  # raw packets
            while True:
                ok, packet = cap.read()
                if not ok:
                    return
                frames.put(predictor.prepare(cv2.imdecode(packet, flags)).tensors)
        finally:
            cap.release()
            frames.put(None)

    try:
        model = predictor.model
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        first = frames.get()
        assert first is not None, f"no frame decoded from {video}"
        model.run_raw(first)
        start = time.perf_counter()  # from the first result to the last, as the agent's steady_fps counts
        count = 0
        while (tensors := frames.get()) is not None:
            model.run_raw(tensors)
            count += 1
        elapsed = time.perf_counter() - start
        producer.join()
        return count / elapsed
    finally:
        predictor.close()


def agent_run(
    video: Path,
    threads: int,
    out_dir: Path,
    loop: bool = False,
    duration: float | None = None,
    inference: str = "auto",
) -> dict[str, Any]:
    config = parse_config(
        {
            "device_id": "bench",
            "sources": {"video": {"type": "camera", "device": str(video), "realtime": False, "loop": loop}},
            "pipelines": {
                "video": {
                    "source": "video",
                    "model": str(BUNDLE),
                    "threads": threads,
                    "queue_size": QUEUE,
                    "sinks": ["jsonl"],
                    "inference": inference,
                }
            },
            "sinks": {"jsonl": {"path": str(out_dir / "results.jsonl")}},
            "log_level": "warning",
        }
    )
    daemon = Daemon(config, duration=duration)
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    proc = psutil.Process()

    def sample_rss() -> None:  # the agent's and its inference process's
        t0 = time.monotonic()
        while not stop.wait(2.0):
            try:
                total = sum(p.memory_info().rss for p in [proc, *proc.children()])
            except psutil.Error:  # a child ended in between
                continue
            rss.append((time.monotonic() - t0, total / 2**20))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    start = time.perf_counter()
    snapshot: dict[str, Any] = {}
    original_shutdown = daemon._shutdown

    def capture_then_shutdown() -> None:
        stop.set()  # RSS of the running agent only, its inference process included
        for name, p in daemon.pipelines.items():
            snapshot[name] = {
                "processed": p.stats.processed,
                "dropped": p.stats.dropped,
                "latency": list(p.stats.latencies_ms),
                "inference": p.snapshot()["inference"],
            }
        original_shutdown()

    daemon._shutdown = capture_then_shutdown  # type: ignore[method-assign]
    daemon.run()
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    snap = snapshot["video"]
    return {
        "elapsed_s": elapsed,
        "processed": snap["processed"],
        "dropped": snap["dropped"],
        "fps": steady_fps(out_dir / "results.jsonl", snap["processed"] / elapsed),
        "latency_ms": percentiles(snap["latency"]),
        "inference": snap["inference"],
        "rss": rss,
    }


def other_place(inference: str) -> str:
    """The place for inference the default configuration did not choose."""
    return "thread" if inference == "process" else "process"


def steady_fps(results: Path, fallback: float) -> float:
    """Results per second between the first and the last result (model loading and start-up excluded,
    as they are from the bare loop)."""
    import json

    try:
        lines = results.read_text().splitlines()
        first, last = json.loads(lines[0])["ts"], json.loads(lines[-1])["ts"]
    except (OSError, IndexError, ValueError, KeyError):
        return fallback
    return (len(lines) - 1) / (last - first) if last > first else fallback


def cpu_times() -> tuple[int, int] | None:
    """(all, stolen) CPU time in ticks since boot from /proc/stat, None where there is none: on a VM, time the
    hypervisor gave to other guests ("steal") makes every figure of a run noisier."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """Share of the CPU time between two ``cpu_times`` readings the hypervisor stole, in percent."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    return round(100.0 * (end[1] - start[1]) / (end[0] - start[0]), 2)


def run(threads: int = 1, rounds: int = 7, soak_seconds: float = 120.0, frames: int = FRAMES) -> dict[str, Any]:
    """Rounds alternate bare loop, sequential loop and agent, so machine noise hits them alike; the ratios are the
    medians of each round's own ratio."""
    began = cpu_times()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        video = make_video(tmpdir / "digits.avi", frames)
        bare, bare_video, threaded, agent, ratios, ratios_video, ratios_threaded = [], [], [], [], [], [], []
        alt, ratios_alt = [], []  # the other place for inference than the default's choice
        latency: dict[str, float] = {}
        latency_alt: dict[str, float] = {}
        chosen = "auto"
        for _ in range(rounds):
            bare.append(bare_fps(video, threads))
            bare_video.append(bare_video_fps(video, threads))
            threaded.append(threaded_fps(video, threads))
            result = agent_run(video, threads, tmpdir)
            chosen = result["inference"]
            agent.append(result["fps"])
            ratios.append(agent[-1] / bare[-1])
            ratios_video.append(agent[-1] / bare_video[-1])
            ratios_threaded.append(agent[-1] / threaded[-1])
            latency = result["latency_ms"]
            (tmpdir / "results.jsonl").unlink(missing_ok=True)
            result = agent_run(video, threads, tmpdir, inference=other_place(chosen))
            alt.append(result["fps"])
            ratios_alt.append(alt[-1] / bare[-1])
            latency_alt = result["latency_ms"]
            (tmpdir / "results.jsonl").unlink(missing_ok=True)
        report: dict[str, Any] = {
            "frames": frames,
            "rounds": rounds,
            "threads": threads,
            "bare_fps": round(statistics.median(bare), 1),
            "agent_fps": round(statistics.median(agent), 1),
            "agent_inference": chosen,
            "ratio": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "bare_video_fps": round(statistics.median(bare_video), 1),
            "ratio_video": round(statistics.median(ratios_video), 3),
            "threaded_fps": round(statistics.median(threaded), 1),
            "threaded_ratio": round(statistics.median([t / b for t, b in zip(threaded, bare, strict=True)]), 3),
            "ratio_threaded": round(statistics.median(ratios_threaded), 3),
            "agent_latency_ms": latency,
            "steal_pct": steal_share(began, cpu_times()),
            "alt_inference": other_place(chosen),
            "alt_fps": round(statistics.median(alt), 1),
            "alt_ratio": round(statistics.median(ratios_alt), 3),
            "alt_ratio_range": [round(min(ratios_alt), 3), round(max(ratios_alt), 3)],
            "alt_latency_ms": latency_alt,
        }
        if soak_seconds > 0:
            soak_began = cpu_times()
            soak = agent_run(video, threads, tmpdir, loop=True, duration=soak_seconds)
            samples = soak["rss"]
            steady = [v for t, v in samples if t >= min(60.0, soak_seconds / 4)]
            report["soak"] = {
                "inference": soak["inference"],
                "seconds": round(soak["elapsed_s"], 1),
                "processed": soak["processed"],
                "fps": round(soak["fps"], 1),
                "latency_ms": soak["latency_ms"],
                "rss_start_mb": round(steady[0], 1) if steady else None,
                "rss_end_mb": round(steady[-1], 1) if steady else None,
                "rss_growth_mb": round(steady[-1] - steady[0], 1) if len(steady) > 1 else None,
                "rss_max_mb": round(max(v for _, v in samples), 1) if samples else None,
                "steal_pct": steal_share(soak_began, cpu_times()),
            }
        return report
