"""The CLI on the sample bundles, as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import INPUTS, ROOT, SAMPLES, assert_one_line_error, run_cli

TFLITE = SAMPLES / "digits-classifier-tflite"
ONNX = SAMPLES / "digits-classifier-onnx"


@pytest.mark.parametrize("bundle", [TFLITE, ONNX], ids=["tflite", "onnx"])
def test_infer_classifies_every_sample_digit(bundle: Path) -> None:
    digits = sorted(INPUTS.glob("digit_*.png"))
    assert len(digits) == 10
    proc = run_cli("infer", bundle, *digits, "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["label"] for r in records] == [p.stem.split("_")[1] for p in digits]
    assert all(r["task"] == "classification" and len(r["top"]) == 3 for r in records)
    assert proc.stderr == ""  # no runtime chatter


def test_infer_human_output_and_npy(tmp_path: Path) -> None:
    proc = run_cli("infer", TFLITE, INPUTS / "digit_4.png")
    assert proc.returncode == 0 and ": 4 " in proc.stdout and "top:" in proc.stdout
    tensor = tmp_path / "x.npy"
    img = cv2.imread(str(INPUTS / "digit_4.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    np.save(tensor, img.reshape(1, 32, 32, 1))
    proc = run_cli("infer", TFLITE, tensor, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["label"] == "4"


def test_describe_json_reports_quantization_and_golden() -> None:
    proc = run_cli("describe", TFLITE, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    [inp] = report["model"]["inputs"]
    assert inp["dtype"] == "int8" and inp["quantization"]["scale"] == pytest.approx(1 / 255, rel=1e-3)
    assert report["golden"]["passed"] is True
    assert report["bundle"]["labels"][:3] == ["0", "1", "2"]


def test_describe_human() -> None:
    proc = run_cli("describe", ONNX)
    assert proc.returncode == 0, proc.stderr
    assert "golden vectors: pass" in proc.stdout and "onnxruntime" in proc.stdout


@pytest.mark.parametrize("bundle", [TFLITE, ONNX], ids=["tflite", "onnx"])
def test_bench_json(bundle: Path) -> None:
    proc = run_cli("bench", bundle, "--seconds", "0.5", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["iterations"] > 10 and report["throughput_per_s"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["peak_rss_mb"] > 10 and report["runtime_version"]
    assert report["threads"] == 1


def test_bench_on_a_given_input() -> None:
    proc = run_cli("bench", TFLITE, "--seconds", "0.3", "--input", INPUTS / "digit_1.png")
    assert proc.returncode == 0, proc.stderr
    assert "predictions in" in proc.stdout and "p99" in proc.stdout


def test_runtimes_json() -> None:
    proc = run_cli("runtimes", "--json")
    assert proc.returncode == 0
    report = {r["name"]: r for r in json.loads(proc.stdout)}
    assert report["litert"]["available"] and report["onnxruntime"]["available"]
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert set(report) == {"litert", "tflite-runtime", "onnxruntime"}


def make_input_dir(root: Path, copies: int = 3) -> Path:
    root.mkdir()
    for i in range(copies):
        for digit in sorted(INPUTS.glob("digit_*.png")):
            (root / f"{i:02d}_{digit.name}").write_bytes(digit.read_bytes())
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_directory_and_resume(tmp_path: Path) -> None:
    inputs = make_input_dir(tmp_path / "in")
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "results.jsonl"
    proc = run_cli("batch", "--model", TFLITE, "--input", inputs, "--output", out, "--json")
    assert proc.returncode == 1  # one input failed; the rest are done
    summary = json.loads(proc.stdout)
    broken = str(inputs / "broken.png")
    assert summary == {"total": 31, "done": 30, "skipped": 0, "errors": 1, "failed": [broken], "output": str(out)}
    [named] = [ln for ln in proc.stderr.splitlines() if ln.strip()]  # the failed input, by name, on one line
    assert named.startswith(f"edge-agent: error: {broken}: ") and named.count("(fix: ") == 1
    records = read_jsonl(out)
    assert len(records) == 31 and sum("error" in r for r in records) == 1
    labels = {Path(r["input"]).name: r.get("label") for r in records}
    assert labels["00_digit_7.png"] == "7"
    # a run killed mid-write leaves a torn last line: resume cuts it and redoes only the missing inputs
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    proc = run_cli("batch", "--model", TFLITE, "--input", inputs, "--output", out, "--json")
    summary = json.loads(proc.stdout)
    assert summary["skipped"] == 10 and summary["done"] + summary["errors"] == 21
    records = read_jsonl(out)
    keys = [r["input"] for r in records]
    assert len(keys) == len(set(keys)) == 31


def test_batch_survives_sigkill_and_resumes(tmp_path: Path) -> None:
    inputs = make_input_dir(tmp_path / "in", copies=40)  # 400 images
    out = tmp_path / "results.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "agent.cli",
        "batch",
        "--model",
        str(ONNX),
        "--input",
        str(inputs),
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 20_000):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(out.read_text().splitlines())
    assert 0 < partial < 400
    proc2 = run_cli("batch", "--model", ONNX, "--input", inputs, "--output", out, "--json")
    assert proc2.returncode == 0, proc2.stderr
    summary = json.loads(proc2.stdout)
    assert summary["skipped"] >= partial - 1 and summary["errors"] == 0
    keys = [r["input"] for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) == 400


def test_batch_video(tmp_path: Path) -> None:
    video = tmp_path / "digits.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    for digit in sorted(INPUTS.glob("digit_*.png")):
        img = cv2.resize(cv2.imread(str(digit)), (64, 64), interpolation=cv2.INTER_NEAREST)
        writer.write(img)
    writer.release()
    out = tmp_path / "video.jsonl"
    proc = run_cli("batch", "--model", TFLITE, "--input", video, "--output", out)
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out)
    assert [r["input"].rsplit("=", 1)[1] for r in records] == [str(i) for i in range(10)]
    assert sum(r["label"] == str(i) for i, r in enumerate(records)) >= 9  # JPEG-compressed frames
    proc = run_cli("batch", "--model", TFLITE, "--input", video, "--output", out, "--json")
    assert json.loads(proc.stdout)["skipped"] == 10


def test_detector_decodes_grid_and_suppresses_duplicates() -> None:
    scenes = sorted(INPUTS.glob("scene_*.png"))
    assert scenes
    proc = run_cli("infer", SAMPLES / "digits-detector", *scenes, "--json")
    assert proc.returncode == 0, proc.stderr
    for line, scene in zip(proc.stdout.splitlines(), scenes, strict=True):
        record = json.loads(line)
        height, width = cv2.imread(str(scene)).shape[:2]
        dets = record["detections"]
        assert dets, scene
        assert record["candidates"] > len(dets)  # several grid cells fire per digit: NMS keeps one
        for det in dets:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height  # mapped back through the letterbox
            assert det["label"] in [str(i) for i in range(10)] and det["score"] >= 0.4
    proc = run_cli("describe", SAMPLES / "digits-detector", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["golden"]["passed"]


def test_batch_refuses_an_output_holding_another_models_results(tmp_path: Path) -> None:
    inputs = make_input_dir(tmp_path / "in")
    out = tmp_path / "results.jsonl"
    assert run_cli("batch", "--model", TFLITE, "--input", inputs, "--output", out).returncode == 0
    before = out.read_bytes()
    proc = run_cli("batch", "--model", ONNX, "--input", inputs, "--output", out)
    line = assert_one_line_error(proc, "another model", "digits-classifier-tflite", "another --output")
    assert str(out) in line
    assert out.read_bytes() == before  # nothing mixed in, nothing lost
    # the same model resumes (nothing left to do)
    proc = run_cli("batch", "--model", TFLITE, "--input", inputs, "--output", out, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["skipped"] == 30
    assert all(r["model_sha256"] == read_jsonl(out)[0]["model_sha256"] for r in read_jsonl(out))


def test_batch_with_no_inputs_warns(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an input")
    proc = run_cli("batch", "--model", TFLITE, "--input", empty, "--output", tmp_path / "out.jsonl")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("edge-agent: warning: no inputs in ") and ".png" in line


def test_batch_interrupted_says_how_to_resume(tmp_path: Path) -> None:
    inputs = make_input_dir(tmp_path / "in", copies=40)  # 400 images
    out = tmp_path / "results.jsonl"
    args = ["batch", "--model", str(ONNX), "--input", str(inputs), "--output", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert wait_for_file(out, 2_000)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the batch finished before the interrupt arrived")
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    [line] = stderr.splitlines()
    assert "interrupted" in line and line.endswith("edge-agent " + " ".join(args))
    resumed = run_cli(*args, "--json")
    summary = json.loads(resumed.stdout)
    assert resumed.returncode == 0 and summary["skipped"] > 0 and summary["skipped"] + summary["done"] == 400


def wait_for_file(path: Path, size: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return True
        time.sleep(0.01)
    return False
