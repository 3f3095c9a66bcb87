"""Camera source over real streams: an MJPEG HTTP stream that drops and hangs, video files, missing devices."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np

from agent.sources.camera import CameraSource, CameraSourceConfig
from tests.daemon_helpers import wait_until
from tests.mjpeg_server import MjpegServer


def read_n(source: CameraSource, n: int, timeout: float = 15.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        sample = source.read(timeout=0.5)
        if sample is not None:
            got.append(sample)
    return got


def test_stream_loss_and_recovery() -> None:
    server = MjpegServer(fps=30).start()
    source = CameraSource(CameraSourceConfig(device=server.url, reconnect_initial=0.2, reconnect_max=0.5), "cam")
    try:
        first = read_n(source, 5)
        assert len(first) == 5 and first[0].data.shape == (120, 160, 3)
        assert source.health.connected
        server.stop()
        assert wait_until(lambda: not source.health.connected, timeout=10)
        while source.read(timeout=0.2) is not None:  # drain what was grabbed before the drop
            pass
        assert source.read(timeout=0.5) is None
        assert source.health.errors >= 1 and source.health.last_error
        server.start()  # the same URL comes back
        resumed = read_n(source, 5)
        assert len(resumed) == 5
        assert resumed[0].gap  # windows/trackers must not span the outage
        assert source.health.reconnects >= 1 and source.health.connected
        assert [s.seq for s in resumed] == sorted(s.seq for s in resumed)
    finally:
        source.close()
        server.stop()


def test_hung_stream_is_a_stall_and_recovers() -> None:
    server = MjpegServer(fps=30).start()
    cfg = CameraSourceConfig(device=server.url, stall_after=1.0, reconnect_initial=0.2, reconnect_max=0.5)
    source = CameraSource(cfg, "cam")
    try:
        assert len(read_n(source, 3)) == 3
        server.freeze.set()  # connection stays open, no frames: cap.read() blocks
        assert wait_until(lambda: source.read(timeout=0.2) is None and source.health.stalls >= 1, timeout=15)
        server.freeze.clear()
        assert len(read_n(source, 3)) == 3
    finally:
        source.close()
        server.stop()


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, size)
    for i in range(frames):
        img = np.full((size[1], size[0], 3), i * 20 % 255, dtype=np.uint8)
        writer.write(img)
    writer.release()
    return path


def test_video_file_every_frame_then_finished(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi")
    source = CameraSource(CameraSourceConfig(device=str(video), realtime=False), "file")
    try:
        got = read_n(source, 20, timeout=10)
        assert len(got) == 12
        assert wait_until(lambda: source.finished, timeout=5)
        assert source.read(timeout=0.2) is None
    finally:
        source.close()


def test_video_file_loops(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=5)
    source = CameraSource(CameraSourceConfig(device=str(video), realtime=False, loop=True), "file")
    try:
        assert len(read_n(source, 12, timeout=10)) == 12
        assert not source.finished
    finally:
        source.close()


def test_missing_device_is_reported_not_raised(tmp_path: Path) -> None:
    source = CameraSource(CameraSourceConfig(device="/dev/video99", reconnect_initial=0.1, reconnect_max=0.2), "cam")
    try:
        assert "does not exist" in (source.probe() or "")
        assert source.read(timeout=0.5) is None
        assert wait_until(lambda: source.health.errors >= 1, timeout=5)
        assert not source.health.connected
    finally:
        source.close()
    missing = CameraSource(CameraSourceConfig(device=str(tmp_path / "nope.mp4")), "file")
    assert "does not exist" in (missing.probe() or "")


def test_close_unblocks_read() -> None:
    server = MjpegServer(fps=30).start()
    server.freeze.set()
    source = CameraSource(CameraSourceConfig(device=server.url), "cam")
    result: list = []
    t = threading.Thread(target=lambda: result.append(source.read(timeout=30)))
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    source.close()
    t.join(5)
    assert not t.is_alive() and result == [None] and time.monotonic() - t0 < 5
    server.stop()
