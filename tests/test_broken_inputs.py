"""Broken inputs, one pipeline at a time: a corrupt golden file, a missing camera, a serial port that vanishes and
returns. Each gives one clear log line (and an event on MQTT); the other pipelines keep running; READY=1 comes once
the healthy ones run, with the failing one named in STATUS=."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import load_bundle
from agent.errors import BundleError
from tests.conftest import ROOT, assert_one_line_error, run_cli
from tests.daemon_helpers import NotifySocket, serial_anomaly_config, start_agent, stop, wait_until
from tests.mosquitto import Broker, Subscriber

SAMPLE = ROOT / "agent" / "samples" / "digits-classifier-tflite"
INPUTS = ROOT / "agent" / "samples" / "inputs"
DIGIT = next(iter(sorted(INPUTS.glob("digit_*.png"))))


@pytest.fixture()
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def corrupt_bundle(tmp_path: Path, keep: float = 0.5) -> Path:
    """A copy of the sample bundle with golden.npz cut short."""
    bundle = tmp_path / "broken-bundle"
    shutil.copytree(SAMPLE, bundle)
    golden = bundle / "golden.npz"
    os.truncate(golden, int(golden.stat().st_size * keep))
    return bundle


def two_pipelines(tmp_path: Path, broker: Broker, broken: str) -> tuple[Path, Path]:
    """Config: a healthy ``good`` pipeline (replayed digits) and a ``bad`` one (``broken`` is its TOML)."""
    results = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "dev1"\nstate_dir = "{tmp_path / "state"}"\nstatus_interval = 0.5\n'
        f'[sources.digits]\ntype = "replay"\npath = "{INPUTS}/digit_*.png"\nrate = 20.0\n'
        f'[pipelines.good]\nsource = "digits"\nmodel = "sample:digits-classifier-tflite"\nsinks = ["jsonl"]\n'
        f'[sinks.jsonl]\npath = "{results}"\n'
        f'[mqtt]\nbroker = "{broker.url}"\ntelemetry_interval = 60\nreconnect_min = 0.2\nreconnect_max = 1.0\n' + broken
    )
    return config, results


def good_results(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("pipeline") == "good")


def events(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.messages("edge/dev1/events")]


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncated_golden_file_is_a_bundle_error(tmp_path: Path, keep: float) -> None:
    bundle = load_bundle(corrupt_bundle(tmp_path, keep))
    with pytest.raises(BundleError, match=r"golden vectors file 'golden\.npz' is corrupt or truncated"):
        bundle.golden_vectors()


def test_cli_commands_on_a_corrupt_golden_file_say_one_line(tmp_path: Path) -> None:
    bundle = corrupt_bundle(tmp_path)
    for args in (("infer", bundle, DIGIT), ("describe", bundle)):
        assert_one_line_error(run_cli(*args), "golden.npz", "corrupt or truncated")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[sources.digits]\ntype = "replay"\npath = "{INPUTS}/digit_*.png"\n'
        f'[pipelines.bad]\nsource = "digits"\nmodel = "{bundle}"\nsinks = []\n'
    )
    check = run_cli("check", "--config", config, "--json")
    assert "Traceback" not in check.stderr, check.stderr
    [pipe] = [c for c in json.loads(check.stdout)["checks"] if c["what"] == "pipeline bad"]
    assert not pipe["ok"] and "golden.npz" in pipe["detail"] and "corrupt or truncated" in pipe["detail"], pipe
    plain = run_cli("check", "--config", config)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr + plain.stdout


def _run_beside_a_broken_pipeline(
    tmp_path: Path, broker: Broker, notify: NotifySocket, broken: str, status_needle: str, event_kind: str
) -> str:
    """Start the daemon with ``good`` and ``bad``; the healthy one keeps delivering. Returns the daemon's stderr."""
    config, results = two_pipelines(tmp_path, broker, broken)
    sub = Subscriber(broker, "edge/dev1/#")
    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        ready = notify.wait_for("READY", "1", timeout=60)
        assert "good:" in ready.get("STATUS", ""), ready
        # STATUS= names the failing pipeline (at READY, or in the next status update)
        assert wait_until(
            lambda: any(status_needle in f.get("STATUS", "") for _, f in notify.having("STATUS")), timeout=30
        ), notify.having("STATUS")
        event = sub.wait_for(lambda m: m.topic == "edge/dev1/events" and event_kind in m.payload.decode(), 30)[0]
        body = json.loads(event.payload)
        assert body["kind"] == event_kind and body["detail"]["pipeline"] == "bad", body
        before = good_results(results)
        assert wait_until(lambda: good_results(results) >= before + 20, timeout=30)  # results keep flowing
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        sub.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr, stderr
    return stderr


def test_daemon_runs_the_healthy_pipeline_beside_one_with_a_corrupt_golden_file(
    tmp_path: Path, broker: Broker, notify: NotifySocket
) -> None:
    bundle = corrupt_bundle(tmp_path)
    stderr = _run_beside_a_broken_pipeline(
        tmp_path,
        broker,
        notify,
        f'[sources.digits2]\ntype = "replay"\npath = "{INPUTS}/digit_*.png"\nrate = 20.0\n'
        f'[pipelines.bad]\nsource = "digits2"\nmodel = "{bundle}"\nsinks = []\n',
        "bad: FAILED (golden vectors file 'golden.npz' is corrupt or truncated",
        "pipeline_failed",
    )
    lines = [ln for ln in stderr.splitlines() if "pipeline not started" in ln]
    assert len(lines) == 1 and "golden.npz" in lines[0] and "bad" in lines[0], stderr


def test_daemon_runs_the_healthy_pipeline_beside_a_missing_camera(
    tmp_path: Path, broker: Broker, notify: NotifySocket
) -> None:
    stderr = _run_beside_a_broken_pipeline(
        tmp_path,
        broker,
        notify,
        '[sources.cam]\ntype = "camera"\ndevice = "/dev/video99"\nreconnect_initial = 0.1\nreconnect_max = 0.3\n'
        '[pipelines.bad]\nsource = "cam"\nmodel = "sample:digits-classifier-tflite"\nsinks = []\n',
        "bad: WAITING for source cam (cannot open '/dev/video99')",
        "source_lost",
    )
    lines = [ln for ln in stderr.splitlines() if "camera unavailable" in ln]
    assert len(lines) == 1 and "/dev/video99" in lines[0], stderr  # one line, not one per retry


def test_serial_port_outage_and_recovery_are_logged_once_each(tmp_path: Path, notify: NotifySocket) -> None:
    from tests.test_source_serial import Feeder, Pty

    rows = [ln for ln in (INPUTS / "sensor_normal.csv").read_text().splitlines()[1:] if ln]
    link = tmp_path / "usb-sensor"
    pty = Pty()
    link.symlink_to(pty.path)
    feeder = Feeder(pty, lambda i: (rows[i % len(rows)] + "\n").encode(), interval=0.002)
    feeder.start()
    results = tmp_path / "results.jsonl"
    config = serial_anomaly_config(tmp_path, link, results)

    def count() -> int:
        return len(results.read_text().splitlines()) if results.exists() else 0

    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    stderr = tmp_path / "stderr.txt"
    try:
        notify.wait_for("READY", "1", timeout=30)
        assert wait_until(lambda: count() >= 20, timeout=20)
        feeder.stop()
        link.unlink()
        link.symlink_to(tmp_path / "gone")
        pty.close()
        assert wait_until(lambda: "serial port lost" in stderr.read_text(), timeout=20), stderr.read_text()
        assert wait_until(
            lambda: any("WAITING for source vib" in f.get("STATUS", "") for _, f in notify.having("STATUS")), 20
        )
        time.sleep(1.0)  # several reconnect attempts while it is away
        pty = Pty()
        link.unlink()
        link.symlink_to(pty.path)
        feeder = Feeder(pty, lambda i: (rows[i % len(rows)] + "\n").encode(), interval=0.002)
        feeder.start()
        assert wait_until(lambda: "serial port back" in stderr.read_text(), timeout=20), stderr.read_text()
        during = count()
        assert wait_until(lambda: count() >= during + 20, timeout=20)
    finally:
        feeder.stop()
        assert stop(proc) == 0
        pty.close()
    text = stderr.read_text()
    lost = [ln for ln in text.splitlines() if "serial port lost" in ln or "serial port unavailable" in ln]
    back = [ln for ln in text.splitlines() if "serial port back" in ln]
    assert len(lost) == 1 and str(link) in lost[0], text  # one line for the outage, not one per retry
    assert len(back) == 1 and str(link) in back[0], text


def test_daemon_with_only_a_missing_camera_still_signals_ready_naming_it(tmp_path: Path, notify: NotifySocket) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'status_interval = 0.5\n[sources.cam]\ntype = "camera"\ndevice = "/dev/video99"\nreconnect_max = 0.5\n'
        '[pipelines.door]\nsource = "cam"\nmodel = "sample:digits-classifier-tflite"\nsinks = []\n'
    )
    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        ready = notify.wait_for("READY", "1", timeout=60)  # the daemon runs and retries: systemd may go on
        assert "door: WAITING for source cam (cannot open '/dev/video99')" in ready.get("STATUS", ""), ready
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
