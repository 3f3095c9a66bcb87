"""Helpers to run the real daemon as a subprocess with a real sd_notify socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET; collects messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def having(self, key: str, value: str | None = None, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if t >= since and key in m and (value is None or m[key] == value)]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0, since: float = 0.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.having(key, value, since)
            if found:
                return found[0][1]
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value} notification within {timeout}s; got {self.messages[-10:]}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


def start_agent(
    args: list[str],
    notify: NotifySocket | None = None,
    watchdog_usec: int | None = None,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    output_dir: Path | None = None,
) -> subprocess.Popen[str]:
    """Start ``edge-agent ARGS``; stdout/stderr go to files in ``output_dir`` (no pipe to fill up)."""
    env = os.environ.copy() | {"PYTHONUNBUFFERED": "1"} | (extra_env or {})
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=cwd or ROOT,
        env=env,
        stdout=(output_dir / "stdout.txt").open("w") if output_dir else subprocess.DEVNULL,
        stderr=(output_dir / "stderr.txt").open("w") if output_dir else subprocess.DEVNULL,
        text=True,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def stop(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def serial_anomaly_config(tmp_path: Path, port: Path, results: Path) -> Path:
    """agent.toml: the sample anomaly model on a serial sensor at ``port`` (quick reconnects) into ``results``."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'status_interval = 0.5\n[sources.vib]\ntype = "serial"\nport = "{port}"\nchannels = ["ax", "ay", "az"]\n'
        f"read_timeout = 0.1\nreconnect_initial = 0.1\nreconnect_max = 0.3\n"
        f'[pipelines.bearing]\nsource = "vib"\nmodel = "sample:sensor-anomaly"\nsinks = ["jsonl"]\n'
        f'[sinks.jsonl]\npath = "{results}"\n'
    )
    return config
