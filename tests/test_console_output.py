"""Console output as a user sees it: the real `edge-agent` and `fleet` commands as processes, piped, at 80 columns
(listings fit, ids stay whole, no box drawing or colour codes), and what `--wait` says while it follows a rollout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fleet import follow
from tests.conftest import ROOT, SAMPLES, run_cli
from tests.test_fleet_console import Fleet
from tests.update_helpers import build_bundle, wait_until

ANSI = re.compile(r"\x1b\[")
BOX = re.compile(r"[─━│┃┏┓┗┛┡┩╇╋┳┻┼┌┐└┘├┤]")


def assert_fits(text: str, width: int = 80) -> list[str]:
    """Every line at most ``width`` cells, plain text: no ANSI codes, no box drawing."""
    lines = text.splitlines()
    assert lines, "no output"
    for line in lines:
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}\n{text}"
    assert not ANSI.search(text), text
    assert not BOX.search(text), text
    return lines


def whole(text: str, *values: str) -> None:
    """Each value appears unbroken on one line."""
    for value in values:
        assert any(value in line for line in text.splitlines()), f"{value!r} broken or missing:\n{text}"


# ---- edge-agent ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 40])
def test_runtimes_fit_the_width_when_piped(width: int) -> None:
    proc = run_cli("runtimes", env={"COLUMNS": str(width)})
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout, width)
    whole(proc.stdout, "litert", "tflite-runtime", "onnxruntime", "usable")


def test_bench_table_fits_80_columns() -> None:
    proc = run_cli(
        "bench", SAMPLES / "digits-classifier-onnx", "--seconds", "0.3", "--threads", "1", env={"COLUMNS": "80"}
    )
    assert proc.returncode == 0, proc.stderr
    lines = assert_fits(proc.stdout)
    [header] = [ln for ln in lines if "p50" in ln]
    assert header.split() == ["p50", "p95", "p99", "max"]
    [values] = [ln for ln in lines if ln.startswith("latency ms")]
    assert len(values.split()) == 6  # "latency ms" and four figures


# ---- fleet listings ------------------------------------------------------------------------------------------

LONG_IDS = ("camera-entrance-north-01", "camera-loading-dock-south-02", "gate-1")
GROUP = "warehouse-east-building-b"


def publish(fleet: Fleet, tmp_path: Path, version: str = "1.10.0-rc.1") -> str:
    """Publish a digits bundle straight into the fleet's repository (as `fleet bundle publish` does)."""
    target = f"digits-classifier-tflite/digits-classifier-tflite-{version}.tar.gz"
    fleet.repository().add_target(
        build_bundle(tmp_path, version),
        target,
        name="digits-classifier-tflite",
        version=version,
        hardware=["x86_64", "rpi5", "jetson-orin-nano"],
        task="classification",
    )
    return target


@pytest.fixture
def narrow_fleet(tmp_path: Path) -> Fleet:
    fleet = Fleet(tmp_path / "fleet")
    fleet.ok("init")
    for device in LONG_IDS:
        fleet.ok("device", "provision", device, "--group", GROUP, "--tags", "dock", "--hardware", "rpi5")
    fleet.env["COLUMNS"] = "80"
    return fleet


def test_fleet_listings_fit_80_columns_with_ids_whole(narrow_fleet: Fleet, tmp_path: Path) -> None:
    fleet = narrow_fleet
    target = publish(fleet, tmp_path)
    created = fleet.json("deploy", target, "--group", GROUP)
    rid = created["id"]

    devices = fleet.ok("devices")
    assert_fits(devices)
    whole(devices, *LONG_IDS, GROUP, "offline")
    assert "hidden at 80 columns" in devices  # what did not fit is named, not silently lost

    targets = fleet.ok("targets")
    assert_fits(targets)
    whole(targets, "1.10.0-rc.1")
    assert "digits-classifier-tflite" in targets

    audit = fleet.ok("audit")
    assert_fits(audit)
    whole(audit, "device.provision", "rollout.create", "init")

    for args in (("groups",), ("rollout", "list"), ("rollout", "status", rid), ("device", "show", LONG_IDS[1])):
        out = fleet.ok(*args)
        assert_fits(out)
    whole(fleet.ok("rollout", "status", rid), rid, *LONG_IDS)
    whole(fleet.ok("rollout", "list"), rid)

    fleet.env["COLUMNS"] = "200"  # wide: every column, no note
    wide = fleet.ok("devices")
    assert "last seen" in wide and "hidden at" not in wide


# ---- fleet --wait ---------------------------------------------------------------------------------------------


def test_deploy_wait_without_a_server_warns_and_exits_3_on_timeout(narrow_fleet: Fleet, tmp_path: Path) -> None:
    fleet = narrow_fleet
    target = publish(fleet, tmp_path)
    proc = fleet("deploy", target, "--devices", ",".join(LONG_IDS), "--wait", "--wait-timeout", "8")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "no fleet server is driving rollouts" in ln]
    assert len(warnings) == 1 and "fleet serve" in warnings[0], proc.stderr
    for device in LONG_IDS:  # each device's state, once, as first seen
        assert sum(f"] {device}: " in ln for ln in proc.stderr.splitlines()) == 1, proc.stderr
    assert "still running after --wait-timeout 8 s" in proc.stderr
    rid = json.loads(fleet.ok("rollout", "list", "--json"))[0]["id"]
    status = fleet("rollout", "status", rid, "--wait", "--wait-timeout", "1", "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["wait"]["timed_out"] is True
    assert fleet("rollout", "status", rid).returncode == 0  # not waited for: running is no failure
    plain = fleet("deploy", target, "--group", GROUP)  # without --wait: said at once, in one line
    assert plain.returncode == 0 and plain.stderr.count("no fleet server is driving rollouts") == 1, plain.stderr


def test_rollback_takes_wait_options(narrow_fleet: Fleet) -> None:
    proc = narrow_fleet("rollback", "--help")
    assert proc.returncode == 0 and "--wait" in proc.stdout and "--wait-timeout" in proc.stdout


WAIT_ARGS = ("--devices", "dev1", "--health-window", "3", "--wait", "--wait-timeout", "120")


def test_deploy_wait_follows_a_real_device_through_its_states(tmp_path: Path, broker: Any) -> None:
    """`fleet serve` (in-process), a real agent, and `fleet deploy --wait` as a process: one line per change."""
    from tests.test_fleet_e2e import FleetUnderTest

    fut = FleetUnderTest(tmp_path, broker)
    try:
        fut.start_agent("dev1")
        fut.wait_online("dev1")
        # deploy checks the health window against the device's reported result rate: wait until it has one
        assert wait_until(lambda: (fut.server.registry.devices()[0].get("fps") or 0) > 0, 30)
        target = fut.publish("1.1.0")
        config = tmp_path / "fleet.toml"
        config.write_text(tomli_w.dumps({"data_dir": fut.config.data_dir, "broker": {"url": broker.url}}))
        proc = subprocess.run(
            [sys.executable, "-m", "fleet.console", "--config", str(config), "deploy", target, *WAIT_ARGS],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "80", "FLEET_ACTOR": "tester"},
        )
    finally:
        fut.close()
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert not any("no fleet server" in ln for ln in lines), proc.stderr
    device_lines = [ln.split("] ", 1)[1] for ln in lines if "] dev1: " in ln]
    assert len(device_lines) == len(set(device_lines)), device_lines  # a line per change, no repeats
    assert any("(trial)" in ln and "health window 3 s" in ln for ln in device_lines), device_lines
    assert device_lines[-1].startswith("dev1: succeeded"), device_lines
    assert any("completed" in ln for ln in lines), proc.stderr
    assert_fits(proc.stdout)


# ---- the follower's core ---------------------------------------------------------------------------------------


def _info(status: str, **devices: tuple[str, str | None]) -> dict[str, Any]:
    return {
        "id": "r-1",
        "status": status,
        "reason": None,
        "summary": {"waves": [1], "wave": 0},
        "devices": {d: {"state": s, "device_state": ds, "reason": None} for d, (s, ds) in devices.items()},
    }


def test_follow_reports_changes_once_and_counts_the_health_window_down() -> None:
    seen = follow.FollowState(started=0.0)
    first = follow.changes(seen, _info("running", a=("sent", "offered"), b=("pending", None)), 0.0, 30.0)
    assert first == ["rollout r-1: running", "wave 1/1: 1 device(s)", "a: sent (offered)", "b: pending"]
    assert follow.changes(seen, _info("running", a=("sent", "offered"), b=("pending", None)), 1.0, 30.0) == []
    trial = follow.changes(seen, _info("running", a=("sent", "trial"), b=("pending", None)), 2.0, 30.0)
    assert trial == ["a: sent (trial); health window 30 s"]
    assert follow.changes(seen, _info("running", a=("sent", "trial"), b=("pending", None)), 5.0, 30.0) == []
    tick = follow.changes(seen, _info("running", a=("sent", "trial"), b=("pending", None)), 12.5, 30.0)
    assert tick == ["a: trial, health window ends in about 20 s"]
    done = follow.changes(seen, _info("completed", a=("succeeded", "committed"), b=("skipped", None)), 14.0, 30.0)
    assert done == ["rollout r-1: completed", "a: succeeded (committed)", "b: skipped"]
    default = follow.FollowState(started=0.0)
    assert "60 s (the agent's default)" in follow.changes(default, _info("running", a=("sent", "trial")), 0.0, None)[-1]


def test_server_silence() -> None:
    assert follow.server_silent(None, 100.0)
    assert follow.server_silent(90.0, 100.0) and not follow.server_silent(99.0, 100.0)
    line = follow.silence_warning(None, 100.0, " --config f.toml")
    assert line.startswith("fleet: warning: ") and "fleet serve --config f.toml" in line and "\n" not in line
