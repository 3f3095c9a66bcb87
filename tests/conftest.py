"""Shared fixtures: sample bundles, scratch models, running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.mqtt_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "agent" / "samples"
FIXTURES = ROOT / "tests" / "fixtures"
INPUTS = SAMPLES / "inputs"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


def run_cli(
    *args: str | Path, timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``edge-agent ARGS`` as a real process; returns the completed process (text mode)."""
    full_env = os.environ.copy() | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=full_env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user error: non-zero exit, no traceback, exactly one line on stderr naming the problem."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("edge-agent: error: "), line
    assert "(fix: " in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), line
    return line
