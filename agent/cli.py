"""``edge-agent`` command line: infer | describe | bench | batch | runtimes."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent import logging as agent_logging
from agent.errors import AgentError
from agent.hints import error_line, one_fix_hint

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _threads(text: str) -> int | None:
    """``--threads``: a positive count, or ``default`` for the runtime's own choice."""
    if text.strip().lower() in ("default", "auto"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise AgentError(f"--threads {text}: not a thread count", "give --threads 1 or more, or --threads default")
    return value


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=["litert", "tflite-runtime", "onnxruntime"],
        help="runtime backend (default: best for the format)",
    )
    p.add_argument("--threads", default=None, help="inference threads, 1 or more, or 'default' (runtime's choice)")
    p.add_argument(
        "--provider",
        action="append",
        dest="providers",
        help="ONNX execution provider, in order of preference (repeatable)",
    )
    p.add_argument(
        "--delegate", action="append", dest="delegates", help="TFLite external delegate library (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Run quantized TFLite/ONNX models on local input.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error (default: warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("infer", help="predict on image / .npy / .npz / sensor .csv files")
    p.add_argument("model", type=Path, metavar="MODEL_OR_BUNDLE")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    _add_runtime_options(p)

    p = sub.add_parser("describe", help="show a model's inputs, outputs, quantization and bundle metadata")
    p.add_argument("model", type=Path, metavar="MODEL_OR_BUNDLE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-golden", action="store_true", help="do not run the bundle's golden vectors")
    _add_runtime_options(p)

    p = sub.add_parser("bench", help="latency percentiles, throughput and peak RSS of the predict path")
    p.add_argument("model", type=Path, metavar="MODEL_OR_BUNDLE")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--input", type=Path, help="benchmark on this input file instead of a synthetic one")
    p.add_argument("--json", action="store_true")
    _add_runtime_options(p)

    p = sub.add_parser("batch", help="predict a directory of files or a video into JSONL (resumable)")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_OR_BUNDLE")
    p.add_argument("--input", type=Path, required=True, metavar="DIR|VIDEO")
    p.add_argument("--output", type=Path, required=True, metavar="RESULTS.jsonl")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_runtime_options(p)

    p = sub.add_parser("run", help="run the daemon (the embedded default when no --config is given)")
    p.add_argument("--config", type=Path, help="agent.toml (default: embedded sample pipelines)")
    p.add_argument("--device-id", help="override device_id from the config")
    p.add_argument(
        "--broker",
        help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883 or mqtts://user:pass@host:8883 (overrides [mqtt].broker)",
    )
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], help="MQTT protocol version (overrides [mqtt].protocol)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until SIGTERM)")
    p.add_argument("--results", choices=["text", "json"], help="stdout result format (overrides [sinks.stdout].format)")
    p.add_argument(
        "--log-format", choices=["auto", "json", "text"], default="auto", help="auto: JSON under systemd or when piped"
    )

    p = sub.add_parser("check", help="validate config, detect the board, list runtimes, probe sources, models, broker")
    p.add_argument("--config", type=Path, help="agent.toml (default: embedded sample pipelines)")
    p.add_argument("--device-id", help="override device_id from the config")
    p.add_argument("--broker", help="MQTT broker URL to probe (overrides [mqtt].broker)")
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], help="MQTT protocol version")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("runtimes", help="list runtime backends and execution providers usable here")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenCV's own log lines ("[ WARN:0@0.1] global cap_v4l.cpp ...") would reach the terminal raw; our errors say
    # what failed. Set before cv2 is imported; OPENCV_LOG_LEVEL=WARNING in the environment brings them back.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines ("moov atom not found")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command in ("run",):
        log_json = {"json": True, "text": False}.get(getattr(args, "log_format", "auto"))
        agent_logging.configure(args.log_level, json=log_json)
    else:  # one-shot commands: warnings as plain ``edge-agent: warning: ...`` lines
        agent_logging.configure_cli(args.log_level)
    handler = {
        "infer": cmd_infer,
        "describe": cmd_describe,
        "bench": cmd_bench,
        "batch": cmd_batch,
        "runtimes": cmd_runtimes,
        "run": cmd_run,
        "check": cmd_check,
    }
    try:
        if getattr(args, "threads", None) is not None:
            args.threads = _threads(args.threads)
        return handler[args.command](args)
    except AgentError as exc:
        print(f"edge-agent: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


def _open(args: argparse.Namespace, model: Path) -> Any:
    from agent.predictor import Predictor

    return Predictor.open(
        model, runtime=args.runtime, threads=args.threads, providers=args.providers, delegates=args.delegates
    )


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_infer(args: argparse.Namespace) -> int:
    from agent.inputs import predict_file

    predictor = _open(args, args.model)
    failures = 0
    try:
        for path in args.inputs:
            try:
                for key, pred in predict_file(predictor, path):
                    record = {"input": key} | pred.to_dict()
                    print(json.dumps(record) if args.json else _human(record), flush=True)
            except AgentError as exc:
                failures += 1
                if args.json:
                    print(json.dumps({"input": str(path), "error": error_line(exc)}), flush=True)
                print(f"edge-agent: error: {error_line(exc)}", file=sys.stderr)
    finally:
        predictor.close()
    return EXIT_USAGE if failures else EXIT_OK


def _human(record: dict[str, Any]) -> str:
    head = f"{record['input']}: "
    ms = f"  ({record['latency_ms']:.2f} ms)"
    task = record["task"]
    if task == "classification":
        tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in record["top"])
        return f"{head}{record['label']}{ms}  top: {tops}"
    if task == "detection":
        dets = record["detections"]
        parts = [f"{d['label']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]" for d in dets]
        return f"{head}{len(dets)} detection(s){ms}" + ("".join(f"\n  {p}" for p in parts))
    if task == "anomaly":
        verdict = "ANOMALY" if record["anomaly"] else "normal"
        return f"{head}{verdict} score {record['score']:.4f} (threshold {record['threshold']}){ms}"
    outs = "; ".join(
        f"{name} {o['shape']}" + (f" argmax {o['argmax']}" if "argmax" in o else "")
        for name, o in record["outputs"].items()
    )
    return f"{head}{outs}{ms}"


def cmd_describe(args: argparse.Namespace) -> int:
    predictor = _open(args, args.model)
    try:
        bundle, info = predictor.bundle, predictor.model.info
        golden = None if args.no_golden or bundle.metadata.golden is None else predictor.verify_golden()
        report = {
            "bundle": {
                "name": bundle.name,
                "version": bundle.version,
                "task": bundle.task,
                "inferred": bundle.inferred,
                "sha256": bundle.sha256,
                "input": predictor.input_spec.model_dump(),
                "labels": bundle.labels,
                "hardware": bundle.metadata.hardware,
                "thresholds": bundle.metadata.thresholds,
                "accuracy": bundle.metadata.accuracy,
            },
            "model": info.to_dict(),
            "golden": None if golden is None else {"passed": not golden, "problems": golden},
        }
    finally:
        predictor.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_describe(report)
    return EXIT_FAIL if golden else EXIT_OK


def _print_describe(report: dict[str, Any]) -> None:
    from rich.markup import escape

    console = _console()
    b, m = report["bundle"], report["model"]
    origin = " (no bundle metadata: inferred)" if b["inferred"] else ""
    console.print(f"[bold]{escape(b['name'])}[/bold] {b['version']}  task={b['task']}{origin}")
    console.print(
        f"model {escape(m['path'])} ({m['format']}) on {m['runtime']} {m['runtime_version']}"
        + (f" providers={m['providers']}" if m["providers"] else "")
    )
    from agent.tables import Col, Listing

    columns = [
        Col("name", min_width=12),
        Col("shape", whole=True),
        Col("dtype", whole=True),
        Col("scale", min_width=10),
        Col("zero point", min_width=8, drop=1),
    ]
    for title, tensors in (("inputs", m["inputs"]), ("outputs", m["outputs"])):
        rows = []
        for t in tensors:
            q = t["quantization"]
            scale = (
                "-"
                if q is None
                else (f"per-channel x{len(q['scale'])} (axis {q['axis']})" if q["per_channel"] else f"{q['scale']:.6g}")
            )
            zp = "-" if q is None else ("per-channel" if q["per_channel"] else str(q["zero_point"]))
            if q and q.get("in_graph"):
                scale += " (in graph)"
            rows.append([t["name"], str(t["shape"]), t["dtype"], scale, zp])
        console.print(Listing(title, columns, rows))
    if b["labels"]:
        console.print(f"labels: {escape(', '.join(b['labels'][:20]))}" + (" ..." if len(b["labels"]) > 20 else ""))
    if b["accuracy"]:
        console.print("accuracy: " + ", ".join(f"{k}={v}" for k, v in b["accuracy"].items()))
    g = report["golden"]
    if g is not None:
        console.print("golden vectors: " + ("[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]"))
        for problem in g["problems"]:
            console.print(f"  {escape(problem)}")


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.benchmark import run_bench
    from agent.inputs import predict_file

    if args.seconds <= 0:
        raise AgentError("--seconds must be positive", "e.g. --seconds 5")
    predictor = _open(args, args.model)
    try:
        step = None
        if args.input is not None:
            path = args.input
            list(predict_file(predictor, path))  # fail early on a bad input

            def step() -> None:
                for _ in predict_file(predictor, path):
                    pass

        report = run_bench(predictor, args.seconds, step)
    finally:
        predictor.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from rich.text import Text

        from agent.tables import Col, print_table

        lat = report["latency_ms"]
        console = _console()
        console.print(
            Text(
                f"{report['model']} {report['version']} on {report['runtime']} {report['runtime_version']}"
                f" (threads={report['threads'] or 'default'})"
            ),
            overflow="fold",
        )
        console.print(
            Text(
                f"{report['iterations']} predictions in {report['seconds']} s: {report['throughput_per_s']} /s,"
                f" peak RSS {report['peak_rss_mb']} MB"
            ),
            overflow="fold",
        )
        keys = ("p50", "p95", "p99", "max")
        columns = [Col("", whole=True), *(Col(k, whole=True, justify="right") for k in keys)]
        print_table(console, None, columns, [["latency ms", *(f"{lat[k]:.3f}" for k in keys)]])
    return EXIT_OK


def cmd_batch(args: argparse.Namespace) -> int:
    import contextlib

    from agent.batch import list_inputs, run_batch

    predictor = _open(args, args.model)
    resume = "edge-agent " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])

    def failed(key: str, message: str) -> None:
        print(f"edge-agent: error: {key}: {one_fix_hint(message)}", file=sys.stderr, flush=True)

    try:
        if args.input.is_dir() and not list_inputs(args.input):
            from agent.inputs import INPUT_SUFFIXES

            print(
                f"edge-agent: warning: no inputs in {args.input} (looked for {', '.join(sorted(INPUT_SUFFIXES))})",
                file=sys.stderr,
            )
            return EXIT_FAIL
        bar_cm: Any = contextlib.nullcontext(None)
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar_cm = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=_console(stderr=True),
            )
        with bar_cm as bar:
            task = bar.add_task(f"batch {args.input.name}", total=None) if bar else None

            def progress(advance: int, total: int | None) -> None:
                if bar is None:
                    return
                if total is not None:
                    bar.update(task, total=total or None)
                if advance:
                    bar.advance(task, advance)

            try:
                summary = run_batch(predictor, args.input, args.output, progress, on_error=failed)
            except KeyboardInterrupt:
                print(
                    f"edge-agent: interrupted: results so far are in {args.output}; to resume, run the same command:"
                    f" {resume}",
                    file=sys.stderr,
                )
                return 130
    finally:
        predictor.close()
    if args.json:
        print(json.dumps(summary.to_dict() | {"output": str(args.output)}))
    else:
        print(
            f"{summary.done} predicted, {summary.skipped} already in {args.output}, {summary.errors} failed"
            f" of {summary.total} input(s)"
        )
    if summary.total == 0:
        print(f"edge-agent: warning: {args.input} gave no inputs to predict", file=sys.stderr)
    return EXIT_FAIL if summary.errors or summary.total == 0 else EXIT_OK


def _load_config(args: argparse.Namespace) -> Any:
    from agent.config import default_config, load_config

    if args.config is None:
        return default_config()
    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import Daemon
    from agent.logging import configure

    config = _load_config(args)
    _apply_overrides(config, args)
    if args.results:
        config.sinks.stdout.format = args.results
    if args.log_level == "warning":  # the daemon logs at the config's level unless --log-level was given
        configure(config.log_level, json={"json": True, "text": False}.get(args.log_format))
    if args.config is None:
        print(
            "edge-agent: no --config given: running the embedded default (sample models on sample input)",
            file=sys.stderr,
        )

    def reload_config() -> Any:  # SIGHUP: the file again, with the same command-line overrides
        fresh = _load_config(args)
        _apply_overrides(fresh, args)
        if args.results:
            fresh.sinks.stdout.format = args.results
        return fresh

    daemon = Daemon(config, config_path=args.config, duration=args.duration, reload_config=reload_config)
    daemon.install_signal_handlers()
    return daemon.run()


def _apply_overrides(config: Any, args: argparse.Namespace) -> None:
    """Command-line flags win over the config file."""
    from pydantic import ValidationError

    from agent.config import MqttConfig

    if args.device_id:
        from agent.protocol import DEVICE_ID

        if not DEVICE_ID.match(args.device_id):
            raise AgentError(
                f"--device-id {args.device_id!r} is not valid", "use letters, digits and _ . : - (at most 128)"
            )
        config.device_id = args.device_id
    if args.broker or args.mqtt_protocol:
        try:
            base = config.mqtt.model_dump() if config.mqtt else {}
            if args.broker:
                base["broker"] = args.broker
            if args.mqtt_protocol:
                base["protocol"] = args.mqtt_protocol
            config.mqtt = MqttConfig.model_validate(base)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise AgentError(f"--broker: {msg}", "use mqtt://host:1883 or mqtts://user:pass@host:8883") from None


def cmd_check(args: argparse.Namespace) -> int:
    from agent.check import run_checks

    config = _load_config(args)
    _apply_overrides(config, args)
    report = run_checks(config)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        console = _console()
        from rich.markup import escape

        for item in report["checks"]:
            if not item["ok"]:
                mark = "[red]FAIL[/red]"
            elif item.get("available") is False:  # a runtime this device does without: not a failure, not "ok"
                mark = "[dim]--[/dim]  "
            else:
                mark = "[green]ok[/green]  "
            console.print(f"{mark} {escape(item['what'])}: {escape(one_fix_hint(str(item['detail'])))}")
        console.print("all checks passed" if report["ok"] else "[red]problems found[/red]")
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_runtimes(args: argparse.Namespace) -> int:
    from agent.runtime import runtime_report

    report = runtime_report()
    if args.json:
        print(json.dumps([r.to_dict() for r in report], indent=2))
        return EXIT_OK
    from rich.text import Text

    from agent.tables import Col, print_table

    rows = [
        [
            r.name,
            ", ".join(r.formats),
            Text("usable", style="green") if r.available else Text("unusable", style="red"),
            (r.version if r.available else (r.reason or "")) or "",
            " ".join(p.removesuffix("ExecutionProvider") for p in r.providers or []),
        ]
        for r in report
    ]
    columns = [
        Col("runtime", whole=True),
        Col("formats", whole=True),
        Col("status", whole=True),
        Col("version / reason", min_width=20),
        Col("execution providers", min_width=12, drop=1),
    ]
    print_table(_console(), "runtimes", columns, rows)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
