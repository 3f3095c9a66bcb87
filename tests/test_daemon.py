"""The daemon as a real process: sd_notify over a real socket, watchdog, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests import onnx_models
from tests.daemon_helpers import NotifySocket, serial_anomaly_config, start_agent, stop, wait_until

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


@pytest.mark.parametrize(
    ("preprocess_thread", "inference"), [("own", "thread"), ("capture", "thread"), ("capture", "process")]
)
def test_sigterm_flushes_queued_results(
    tmp_path: Path, notify: NotifySocket, preprocess_thread: str, inference: str
) -> None:
    # windows of value 2e5 take ~0.5 s each: with a queue of 8, several are queued when SIGTERM lands (and with
    # inference in a process, one more is in the worker)
    config = write_config(tmp_path, [2e5] * 400, rate=2000.0, loop=False)
    settings = (
        f'stall_timeout = 30.0\nqueue_size = 8\npreprocess_thread = "{preprocess_thread}"\ninference = "{inference}"'
    )
    config.write_text(config.read_text().replace("stall_timeout = 1.0", settings))
    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        notify.wait_for("READY", "1", timeout=30)
        time.sleep(0.5)
        assert len(inference_workers(tmp_path)) == (inference == "process")
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
    log = (tmp_path / "stderr.txt").read_text()
    assert "inference stays in a thread" not in log and "inference process died" not in log
    assert not inference_workers(tmp_path)  # an inference process does not outlive the agent


def inference_workers(tmp_path: Path) -> list[int]:
    """Inference processes running a model under ``tmp_path``."""
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE
        and "agent.offload" in (p.info["cmdline"] or [])
        and str(tmp_path) in " ".join(p.info["cmdline"])
    ]


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


def test_serial_sensor_unplugged_and_replugged(tmp_path: Path, notify: NotifySocket) -> None:
    """The anomaly pipeline on a real pty behind a by-id style symlink; the device vanishes and returns."""
    from tests.test_source_serial import Feeder, Pty

    rows = [
        ln
        for ln in (Path(__file__).parent.parent / "agent/samples/inputs/sensor_normal.csv").read_text().splitlines()[1:]
        if ln
    ]
    link = tmp_path / "usb-sensor"

    def line(i: int) -> bytes:
        return b"ax,ay,az\n" if i % 50 == 0 else (rows[i % len(rows)] + "\n").encode()

    pty = Pty()
    link.symlink_to(pty.path)
    feeder = Feeder(pty, line, interval=0.002)
    feeder.start()
    results = tmp_path / "results.jsonl"
    config = serial_anomaly_config(tmp_path, link, results)
    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        notify.wait_for("READY", "1", timeout=30)
        assert wait_until(lambda: len(read_results(results)) >= 20, timeout=20)
        # unplug: the link dangles and the pty goes away
        feeder.stop()
        link.unlink()
        link.symlink_to(tmp_path / "gone")
        pty.close()
        time.sleep(1.0)
        during = len(read_results(results))
        time.sleep(1.0)
        assert len(read_results(results)) == during  # nothing while unplugged
        assert proc.poll() is None  # and the daemon is still up
        # replug: a new device node behind the same link
        pty = Pty()
        link.unlink()
        link.symlink_to(pty.path)
        feeder = Feeder(pty, line, interval=0.002)
        feeder.start()
        assert wait_until(lambda: len(read_results(results)) >= during + 20, timeout=20)
        records = read_results(results)
        assert all(r["task"] == "anomaly" for r in records)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    finally:
        feeder.stop()
        assert stop(proc) == 0
        pty.close()


def test_hot_board_lowers_the_rate_and_says_so(tmp_path: Path, notify: NotifySocket) -> None:
    """A Raspberry Pi 4 (detected from copies of its /proc and /sys files) heats up and cools down."""
    import shutil

    board = tmp_path / "board"
    shutil.copytree(Path(__file__).parent / "fixtures" / "boards" / "rpi4", board)
    temp_file = board / "sys/class/thermal/thermal_zone0/temp"
    temp_file.write_text("50000\n")
    model = onnx_models.float_image_classifier(tmp_path / "m.onnx", channels=3, size=8, classes=4)
    results = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'board_root = "{board}"\nthermal_interval = 0.2\nstatus_interval = 0.5\n'
        f'[sources.cam]\ntype = "synthetic"\nrate = 200\nwidth = 32\nheight = 32\n'
        f'[pipelines.p]\nsource = "cam"\nmodel = "{model}"\nmax_fps = 40\nsinks = ["jsonl"]\n'
        f'[sinks.jsonl]\npath = "{results}"\n'
    )

    def rate_over(seconds: float) -> float:
        before = len(read_results(results))
        time.sleep(seconds)
        return (len(read_results(results)) - before) / seconds

    proc = start_agent(["run", "--config", str(config)], notify, output_dir=tmp_path)
    try:
        notify.wait_for("READY", "1", timeout=30)
        time.sleep(0.5)
        cool = rate_over(2.0)
        t0 = time.monotonic()
        temp_file.write_text("75000\n")  # above throttle_c = 72 in rpi4.toml
        status = notify.wait_for("STATUS", since=t0, timeout=10)
        assert wait_until(
            lambda: any("thermal throttle" in m["STATUS"] for _, m in notify.having("STATUS", since=t0)), 10
        )
        time.sleep(0.5)
        hot = rate_over(2.0)
        temp_file.write_text("60000\n")  # below resume_c = 67
        t1 = time.monotonic()
        assert wait_until(lambda: any("thermal" not in m["STATUS"] for _, m in notify.having("STATUS", since=t1)), 10)
    finally:
        assert stop(proc) == 0
    assert cool > 25 and hot < cool * 0.7, (cool, hot, status)
    log = (tmp_path / "stderr.txt").read_text()
    assert '"thermal state changed"' in log and '"state": "throttle"' in log and '"profile": "rpi4"' in log
