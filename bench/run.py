"""Benchmarks (`make bench`). Ratios against a baseline measured in the same run, never asserted.

inference: the agent's predict path (pre-process + infer + post-process) vs the bare
runtime loop (set input, invoke, get output) on the same model, input and threads, and, for
the classifiers, vs the least hand-written code doing the same job (bench/handwritten.py).
They alternate in blocks of 25 calls so machine noise and drift hit all alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.benchmark import bare_loop, interleaved, peak_rss_mb  # noqa: E402
from agent.inputs import read_image  # noqa: E402
from agent.predictor import Predictor  # noqa: E402
from bench.handwritten import classifier_loop  # noqa: E402

SAMPLES = ROOT / "agent" / "samples"
CASES = [
    ("digits-classifier-tflite", "digit_7.png"),
    ("digits-classifier-onnx", "digit_7.png"),
    ("digits-detector", "scene_0.png"),
]


def bench_inference(bundle: str, image: str, threads: int, seconds: float) -> dict[str, Any]:
    predictor = Predictor.open(SAMPLES / bundle, threads=threads)
    try:
        frame = read_image(SAMPLES / "inputs" / image)
        agent_step = lambda: predictor.predict_image(frame)  # noqa: E731
        info = predictor.model.info
        steps = {"bare": bare_loop(predictor), "agent": agent_step}
        hand = classifier_loop(predictor.bundle, info.runtime, threads, frame)
        if hand is not None:
            steps["hand"] = hand
        runs = interleaved(steps, seconds)
        bare_fps, agent_fps = runs["bare"]["throughput_per_s"], runs["agent"]["throughput_per_s"]
        hand_fps = runs["hand"]["throughput_per_s"] if hand is not None else None
        bare_p50 = runs["bare"]["latency_ms"]["p50"]
        agent_p50, agent_p99 = runs["agent"]["latency_ms"]["p50"], runs["agent"]["latency_ms"]["p99"]
        own_us = agent_own_time_us(predictor, frame)
        return {
            "bundle": bundle,
            "runtime": f"{info.runtime} {info.runtime_version}",
            "threads": threads,
            "input": f"{image} {frame.shape[1]}x{frame.shape[0]}",
            "bare_per_s": bare_fps,
            "agent_per_s": agent_fps,
            "ratio": round(agent_fps / bare_fps, 4),
            "overhead_pct": round((bare_fps / agent_fps - 1) * 100, 2),
            # the agent's time per prediction beyond the runtime's: under 5% of any model slower than 20x this
            "extra_us": round(1e6 / agent_fps - 1e6 / bare_fps, 2),
            "bare_p50_ms": bare_p50,
            "agent_p50_ms": agent_p50,
            "agent_p99_ms": agent_p99,
            "agent_own_us": own_us,
            "agent_own_pct": round(own_us / (1e6 / bare_fps) * 100, 2),
            # the least code doing the same job on the runtime's API (bench/handwritten.py), classifiers only
            "hand_per_s": hand_fps,
            "hand_ratio": round(hand_fps / bare_fps, 4) if hand_fps else None,
            "ratio_hand": round(agent_fps / hand_fps, 4) if hand_fps else None,
        }
    finally:
        predictor.close()


def agent_own_time_us(predictor: Predictor, frame: Any) -> float:
    """The agent's own work per prediction measured alone (pre-processing as predict_image does it, then
    post-processing of the model's outputs), without the runtime: what the ratio's overhead is made of besides
    the runtime running slower after other work has used the caches."""
    prepared = predictor.prepare(frame)
    raw = predictor.infer(prepared)
    steps = {"pre": lambda: predictor.prepare(frame), "post": lambda: predictor.finish(raw, prepared)}
    if predictor._fill_input:  # predict_image writes into the runtime's buffer instead of preparing
        buffer = prepared.tensors[0].copy()
        image = predictor._image
        steps["pre"] = lambda: image.fill(frame, buffer)  # type: ignore[union-attr]
    runs = interleaved(steps, 1.0, block=200)
    return round(sum(1e6 / r["throughput_per_s"] for r in runs.values()), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, help="inference: per case and side (default 6); fleet: paced telemetry (default 30)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--soak-seconds", type=float, default=120.0, help="pipeline soak run (RSS growth); 600 for the full figure"
    )
    parser.add_argument("--only", choices=["inference", "pipeline", "mqtt", "update", "fleet"], help="run one part")
    parser.add_argument("--fleet-devices", type=int, default=10_000, help="fleet: simulated devices")
    parser.add_argument("--fleet-rate", type=float, default=1000.0, help="fleet: telemetry messages/s, all devices")
    parser.add_argument("--fleet-burst", type=int, default=20_000, help="fleet: messages of the unpaced burst")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()

    from rich.console import Console

    console = Console(width=max(Console().width, 150))
    np.random.seed(0)
    results = []
    report: dict[str, Any] = {}
    if args.only in (None, "inference"):
        for bundle, image in CASES:
            console.print(f"inference: {bundle} ...")
            results.append(bench_inference(bundle, image, args.threads, args.seconds or 8.0))
        report["inference"] = results
        print_inference(console, results)
    if args.only in (None, "pipeline"):
        from bench.pipeline_bench import run as run_pipeline

        console.print(f"pipeline: video through the int8 classifier (soak {args.soak_seconds:.0f} s) ...")
        pipe = run_pipeline(threads=args.threads, soak_seconds=args.soak_seconds)
        report["pipeline"] = pipe
        console.print(
            f"pipeline ({pipe['frames']} frames, threads={pipe['threads']}, {pipe['rounds']} rounds), default "
            f'configuration (inference = "auto": in a {pipe["agent_inference"]}): agent '
            f"{pipe['agent_fps']} fps vs bare loop {pipe['bare_fps']} fps -> ratio {pipe['ratio']} "
            f"(rounds {pipe['ratio_range'][0]}-{pipe['ratio_range'][1]}); vs a sequential decode+invoke loop over the video "
            f"{pipe['bare_video_fps']} fps -> ratio {pipe['ratio_video']}; a bare two-thread decode|invoke loop reaches "
            f"{pipe['threaded_fps']} fps ({pipe['threaded_ratio']} of the bare loop), the agent {pipe['ratio_threaded']} of it; "
            f"capture->result p50 {pipe['agent_latency_ms']['p50']} ms, "
            f"p99 {pipe['agent_latency_ms']['p99']} ms"
        )
        console.print(
            f'pipeline with inference in a {pipe["alt_inference"]} (inference = "{pipe["alt_inference"]}"): '
            f"{pipe['alt_fps']} fps -> ratio {pipe['alt_ratio']} "
            f"(rounds {pipe['alt_ratio_range'][0]}-{pipe['alt_ratio_range'][1]}); "
            f"capture->result p50 {pipe['alt_latency_ms']['p50']} ms, p99 {pipe['alt_latency_ms']['p99']} ms; "
            f"CPU time stolen by the hypervisor during the rounds: {pipe['steal_pct']}%"
        )
        if "soak" in pipe:
            s = pipe["soak"]
            console.print(
                f"soak (inference in a {s['inference']}) {s['seconds']} s: {s['processed']} results at {s['fps']} fps, p99 {s['latency_ms']['p99']} ms; "
                f"RSS {s['rss_start_mb']} -> {s['rss_end_mb']} MB (growth {s['rss_growth_mb']} MB, max {s['rss_max_mb']} MB); "
                f"stolen {s['steal_pct']}%"
            )
    if args.only in (None, "mqtt"):
        from bench.mqtt_bench import run as run_mqtt

        console.print("mqtt: results through the outbox vs a bare paho loop; replay after a 10-minute outage ...")
        m = run_mqtt()
        report["mqtt"] = m
        r = m["replay"]
        console.print(
            f"mqtt ({m['messages']} x {m['payload_bytes']} B, QoS 1, inflight {m['inflight']}): agent outbox "
            f"{m['agent_outbox_per_s']}/s vs bare paho {m['bare_paho_per_s']}/s -> ratio {m['ratio']}; "
            f"replay of {r['backlog']} queued results: {r['replay_per_s']}/s ({r['replay_s']} s)"
        )
    if args.only in (None, "update"):
        from bench.update_bench import run as run_update

        console.print("update: 20 MB bundle over MQTT chunks vs mosquitto_pub -f; hot swap under load ...")
        u = run_update()
        report["update"] = u
        sw = u["swap"]
        console.print(
            f"update transfer of {u['bundle_bytes'] / 1e6:.1f} MB ({u['chunk_size']} B chunks, hash verified): "
            f"{u['agent_transfer_s']} s ({u['agent_mb_per_s']} MB/s) vs mosquitto_pub -f {u['mosquitto_pub_s']} s "
            f"({u['mosquitto_pub_mb_per_s']} MB/s) -> ratio {u['ratio']}; hot swap: gap across the swap "
            f"{sw['gap_across_swap_ms']} ms, longest within 1 s {sw['max_gap_within_1s_ms']} ms vs steady interval "
            f"{sw['steady_interval_ms']} ms (x{sw['ratio_across']} / x{sw['ratio_max_within_1s']}), results lost: "
            f"{sw['results_lost']}"
        )
    if args.only in (None, "fleet"):
        from bench.fleet_bench import print_report as print_fleet
        from bench.fleet_bench import run as run_fleet

        fleet = run_fleet(
            args.fleet_devices, args.fleet_rate, args.seconds or 30.0, args.fleet_burst, log=console.print
        )
        report["fleet"] = fleet
        print_fleet(console, fleet)
    console.print(f"peak RSS {peak_rss_mb():.0f} MB")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    console.print(f"written {args.output}")
    return 0


def print_inference(console: Any, results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(
        title="predict path (agent) vs bare runtime loop, same model/input/threads",
        title_justify="left",
        caption="extra us: the agent's time per prediction beyond the bare loop's; hand-written: the least code doing "
        "the same job on the runtime's own API (bench/handwritten.py; its ratio to the bare loop), and the agent's "
        "ratio to it; own us: the agent's pre- and post-processing timed alone (share of the bare loop's time)",
        caption_justify="left",
    )
    for col in (
        "bundle",
        "runtime",
        "thr",
        "bare /s",
        "agent /s",
        "agent/bare",
        "overhead",
        "extra us",
        "hand-written /s",
        "agent/hand",
        "bare p50 ms",
        "agent p50 ms",
        "agent p99 ms",
        "own us",
    ):
        table.add_column(col)
    for r in results:
        table.add_row(
            r["bundle"],
            r["runtime"],
            str(r["threads"]),
            f"{r['bare_per_s']:.0f}",
            f"{r['agent_per_s']:.0f}",
            f"{r['ratio']:.3f}",
            f"{r['overhead_pct']:.1f}%",
            f"{r['extra_us']:.1f}",
            f"{r['hand_per_s']:.0f} ({r['hand_ratio']:.3f})" if r["hand_per_s"] else "-",
            f"{r['ratio_hand']:.3f}" if r["ratio_hand"] else "-",
            f"{r['bare_p50_ms']:.3f}",
            f"{r['agent_p50_ms']:.3f}",
            f"{r['agent_p99_ms']:.3f}",
            f"{r['agent_own_us']:.1f} ({r['agent_own_pct']:.1f}%)",
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
