"""`make test`'s output: services log to files, their logs are shown for a failing test only, the summary is last.

A small test file using a real fixture broker and the ``service_log`` fixture runs through ``python -m pytest``
in a subprocess, with ``-s`` (no capture: anything a service wrote to the terminal would show) and ``-rA``
(passing tests' report sections too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

INNER = """
from tests.mosquitto import Subscriber


def _talk(broker):
    with Subscriber(broker, "#") as sub:
        sub.publish("edge/log-check", b"x")


def test_broker_fails(broker):
    _talk(broker)
    assert False, "failing on purpose"


def test_broker_passes(broker):
    _talk(broker)


def test_service_fails(service_log, tmp_path):
    (tmp_path / "svc.log").write_text("early line\\nSVC-MARKER-FAILING\\n")
    service_log("svc", tmp_path / "svc.log")
    assert False, "failing on purpose"


def test_service_passes(service_log, tmp_path):
    (tmp_path / "svc.log").write_text("SVC-MARKER-PASSING\\n")
    service_log("svc", tmp_path / "svc.log")
"""


def _section(output: str, test_name: str) -> str:
    """The failure section of ``test_name`` in pytest's report (up to the next section header)."""
    start = re.search(rf"^_+ {test_name} _+$", output, re.M)
    assert start, output
    end = re.search(r"^(_+ \w+ _+|=+ .* =+)$", output[start.end() :], re.M)
    return output[start.end() : start.end() + end.start()] if end else output[start.end() :]


def test_service_logs_show_for_failing_tests_only_and_the_summary_is_last(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    env = os.environ.copy() | {"PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-s", "-p", "tests.conftest", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out

    # the failing broker test's report carries the broker's log (its start and the test's publish) ...
    failing = _section(out, "test_broker_fails")
    assert "mosquitto log (" in failing and "mosquitto version" in failing, out
    assert "Received PUBLISH" in failing and "edge/log-check" in failing, out
    # ... and nothing from a broker reached the terminal anywhere else (with -s nothing would hide it)
    assert out.count("mosquitto version") == failing.count("mosquitto version"), out
    assert out.count("mosquitto log (") == 1, out

    # the service_log fixture: the registered file's tail for the failing test, nothing for the passing one
    assert "SVC-MARKER-FAILING" in _section(out, "test_service_fails"), out
    assert "svc log (" in _section(out, "test_service_fails"), out
    assert "SVC-MARKER-PASSING" not in out, out

    # the summary is the last line
    last = [ln for ln in out.splitlines() if ln.strip()][-1]
    assert re.fullmatch(r"=*\s*2 failed, 2 passed in [\d.]+s( \([\d:]+\))?\s*=*", last), out
