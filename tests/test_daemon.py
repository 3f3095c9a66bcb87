"""The daemon as a real process: sd_notify over a real socket, watchdog, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests import onnx_models
from tests.daemon_helpers import NotifySocket, start_agent, stop, wait_until

SLOW_BUNDLE = """
name = "slowpoke"
version = "1.0.0"
task = "raw"
model = "slow.onnx"
[input]
kind = "timeseries"
window = 4
stride = 4
channels = ["v"]
"""


@pytest.fixture()
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def write_slow_bundle(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    onnx_models.slow_on_demand(root / "slow.onnx")
    (root / "bundle.toml").write_text(SLOW_BUNDLE)
    return root


def write_config(
    tmp_path: Path, csv_rows: list[float], *, rate: float = 200.0, loop: bool = True, extra: str = ""
) -> Path:
    bundle = write_slow_bundle(tmp_path / "bundle")
    csv = tmp_path / "values.csv"
    csv.write_text("v\n" + "\n".join(str(v) for v in csv_rows) + "\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "dev1"\nstatus_interval = 0.5\n'
        f'[sources.values]\ntype = "replay"\npath = "{csv}"\nrate = {rate}\nloop = {str(loop).lower()}\n'
        f'[pipelines.slow]\nsource = "values"\nmodel = "{bundle}"\nstall_timeout = 1.0\nsinks = ["stdout", "jsonl"]\n'
        f'[sinks.stdout]\nformat = "json"\n[sinks.jsonl]\npath = "{tmp_path / "results.jsonl"}"\n' + extra
    )
    return config


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ready_status_and_watchdog_pings(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, [1.0] * 40)
    proc = start_agent(["run", "--config", str(config)], notify, watchdog_usec=400_000, output_dir=tmp_path)
    try:
        ready = notify.wait_for("READY", "1")
        assert "slowpoke 1.0.0" in ready.get("STATUS", "")
        assert read_results(tmp_path / "results.jsonl") or wait_until(
            lambda: bool(read_results(tmp_path / "results.jsonl")), 5
        )
        t0 = time.monotonic()
        assert wait_until(lambda: len(notify.having("WATCHDOG", "1", since=t0)) >= 4, timeout=10)
        status = notify.wait_for("STATUS", since=t0)
        assert "fps" in status["STATUS"]
    finally:
        assert stop(proc) == 0
    assert notify.having("STOPPING", "1")


def test_watchdog_pings_stop_while_inference_is_stalled(tmp_path: Path, notify: NotifySocket) -> None:
    # 5 s of quick windows, then one window whose inference runs for many seconds (a real stall)
    rows = [1.0] * 2000 + [6e6] * 4 + [1.0] * 40
    config = write_config(tmp_path, rows, rate=400.0, loop=False)
    proc = start_agent(["run", "--config", str(config)], notify, watchdog_usec=400_000, output_dir=tmp_path)
    try:
        notify.wait_for("READY", "1")
        assert wait_until(lambda: len(notify.having("WATCHDOG", "1")) >= 2, timeout=10)
        # the daemon notices the inference in flight for longer than stall_timeout (1 s) ...
        stderr = tmp_path / "stderr.txt"
        assert wait_until(lambda: "pipeline stalled" in stderr.read_text(), timeout=40)
        time.sleep(0.5)
        t_quiet = time.monotonic()
        time.sleep(2.0)
        # ... and sends no more pings although the process is alive: systemd would restart it
        assert proc.poll() is None
        assert notify.having("WATCHDOG", "1", since=t_quiet) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sighup_reloads_without_restarting(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, [1.0] * 40)
    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        notify.wait_for("READY", "1")
        other = tmp_path / "second.jsonl"
        text = config.read_text().replace(str(tmp_path / "results.jsonl"), str(other))
        config.write_text(text)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", since=t0)
        notify.wait_for("READY", "1", since=t0)
        assert wait_until(lambda: bool(read_results(other)), timeout=10)
        assert proc.poll() is None  # same process
        # an invalid config on reload is refused and the running pipelines keep going
        config.write_text(text + "\n[pipelines.broken]\nsource = 'nope'\nmodel = 'x'\n")
        t1 = time.monotonic()
        before = len(read_results(other))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY", "1", since=t1)
        assert wait_until(lambda: len(read_results(other)) > before + 5, timeout=10)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert "reload refused" in (tmp_path / "stderr.txt").read_text()


def test_sigterm_flushes_queued_results(tmp_path: Path, notify: NotifySocket) -> None:
    # windows of value 2e5 take ~0.5 s each: with a queue of 8, several are queued when SIGTERM lands
    config = write_config(tmp_path, [2e5] * 400, rate=2000.0, loop=False)
    config.write_text(config.read_text().replace("stall_timeout = 1.0", "stall_timeout = 30.0\nqueue_size = 8"))
    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        notify.wait_for("READY", "1", timeout=30)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    results = read_results(tmp_path / "results.jsonl")
    seqs = [r["seq"] for r in results]
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing torn
    assert len(seqs) >= 3
    stdout_lines = [json.loads(x) for x in (tmp_path / "stdout.txt").read_text().splitlines() if x.startswith("{")]
    assert [r["seq"] for r in stdout_lines] == seqs
    assert notify.having("STOPPING", "1")


def test_embedded_default_runs_without_config(tmp_path: Path) -> None:
    proc = start_agent(["run", "--duration", "4", "--results", "json"], output_dir=tmp_path)
    assert proc.wait(timeout=60) == 0
    out = [json.loads(x) for x in (tmp_path / "stdout.txt").read_text().splitlines() if x.startswith("{")]
    pipelines = {r["pipeline"] for r in out}
    assert pipelines == {"digits", "vibration"}
    assert any(r["task"] == "classification" for r in out) and any(r["task"] == "anomaly" for r in out)
    assert "embedded default" in (tmp_path / "stderr.txt").read_text()


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import assert_one_line_error, run_cli

    config = tmp_path / "agent.toml"
    config.write_text(
        '[sources.cam]\ntype = "camera"\ndevice = 0\nfps = -3\n[pipelines.p]\nsource = "cam"\nmodel = "m.onnx"\n'
    )
    line = assert_one_line_error(run_cli("run", "--config", config), "sources.cam.fps")
    assert "greater than 0" in line
    config.write_text('[sources.cam]\ntype = "webcam"\n[pipelines.p]\nsource = "cam"\nmodel = "m.onnx"\n')
    assert_one_line_error(run_cli("check", "--config", config), "sources.cam")
    config.write_text('[sources.cam]\ntype = "synthetic"\n[pipelines.p]\nsource = "camera"\nmodel = "m.onnx"\n')
    assert_one_line_error(run_cli("run", "--config", config), "no source named 'camera'")
    assert_one_line_error(run_cli("run", "--config", tmp_path / "missing.toml"), "does not exist")
    assert os.path.exists(config)
