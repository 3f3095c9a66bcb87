"""The tflite-runtime backend for real, in a venv with NumPy < 2 (built by `make tflite-venv`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import INPUTS, ROOT, SAMPLES

VENV = ROOT / ".venv-tflite"


def venv_python() -> Path:
    python = VENV / "bin" / "python"
    unavailable = VENV / "UNAVAILABLE"
    reason = unavailable.read_text().strip() if unavailable.exists() else None
    if not python.exists():
        reason = f"{VENV.name} is missing: run `make tflite-venv`"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_python()), "-m", "agent.cli", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_fallback_runs_the_int8_classifier_when_litert_is_absent() -> None:
    proc = run("runtimes", "--json")
    report = {r["name"]: r for r in json.loads(proc.stdout)}
    assert report["tflite-runtime"]["available"], report
    assert not report["litert"]["available"]
    proc = run("describe", SAMPLES / "digits-classifier-tflite", "--json")
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    assert described["model"]["runtime"] == "tflite-runtime"
    assert described["golden"]["passed"]
    digits = sorted(INPUTS.glob("digit_*.png"))
    proc = run("infer", SAMPLES / "digits-classifier-tflite", *digits, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["label"] for x in proc.stdout.splitlines()] == [p.stem[-1] for p in digits]
