"""Shared fixtures: sample bundles, scratch models, running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------ service logs: shown on failure only

# Services a test starts (brokers, agents, fleet servers) write their output to files, never to the terminal;
# a failing test's report gets the tail of each file registered here (brokers: tests/mqtt_fixtures.py).
_SERVICE_LOGS = pytest.StashKey[list[tuple[str, Path]]]()
SERVICE_LOG_LINES = 40


@pytest.fixture
def service_log(request: pytest.FixtureRequest) -> Callable[[str, Path], Path]:
    """``register(title, path) -> path``: the tail of ``path`` is added to this test's report if it fails."""

    def register(title: str, path: Path) -> Path:
        request.node.stash.setdefault(_SERVICE_LOGS, []).append((title, Path(path)))
        return Path(path)

    return register


def log_tail(path: Path, lines: int = SERVICE_LOG_LINES) -> str:
    """The last ``lines`` lines of a log file (a note when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for title, path in item.stash.get(_SERVICE_LOGS, []):
            report.sections.append((f"{title} log ({path}, last {SERVICE_LOG_LINES} lines)", log_tail(path)))


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
