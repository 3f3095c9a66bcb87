"""Camera source over real streams: an MJPEG HTTP stream that drops and hangs, video files, missing devices."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np

from agent.predictor import Predictor
from agent.sources.base import FrameHint
from agent.sources.camera import CameraSource, CameraSourceConfig, jpeg_decode_flags
from tests.daemon_helpers import wait_until
from tests.mjpeg_server import MjpegServer

SAMPLES = Path(__file__).resolve().parent.parent / "agent" / "samples"


def read_n(source: CameraSource, n: int, timeout: float = 15.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        sample = source.read(timeout=0.5)
        if sample is not None:
            got.append(sample)
        elif source.finished:  # a video file read to its end: nothing more will come
            break
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


# ---- Motion-JPEG decoded at the size the model needs ----------------------------------------------


def test_close_while_a_file_is_read_in_another_thread(tmp_path: Path) -> None:
    """The daemon stops a pipeline by closing its source from another thread while the capture thread decodes:
    the capture must not be released under a read (it was: an AttributeError, or worse, a read of freed memory)."""
    video = write_video(tmp_path / "clip.avi", frames=30, size=(320, 240))
    frames_read = 0
    for attempt in range(25):
        source = CameraSource(CameraSourceConfig(device=str(video), realtime=False, loop=True), "file")
        errors: list[BaseException] = []
        frames = [0]

        def reader(source: CameraSource = source, errors: list = errors, frames: list = frames) -> None:
            try:
                while not source.closed:
                    if source.read(timeout=0.5) is not None:
                        frames[0] += 1
            except BaseException as exc:  # whatever escaped the reader is the failure
                errors.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.002 * (attempt % 7))  # close at varying points of a decode, including the first open
        source.close()
        t.join(5)
        assert not t.is_alive() and errors == [], (attempt, errors)
        assert source.read(timeout=0.1) is None and source._cap is None  # released, and nothing reopens it
        frames_read += frames[0]
    assert frames_read > 0  # the closes did land in the middle of reading


def test_jpeg_decode_flags_pick_the_smallest_covering_scale() -> None:
    keep = cv2.IMREAD_IGNORE_ORIENTATION
    assert jpeg_decode_flags(320, 240, None) == cv2.IMREAD_COLOR | keep
    assert jpeg_decode_flags(320, 240, FrameHint(32, 32, True)) == cv2.IMREAD_REDUCED_GRAYSCALE_4 | keep  # 80x60
    assert jpeg_decode_flags(320, 240, FrameHint(32, 30, True)) == cv2.IMREAD_REDUCED_GRAYSCALE_8 | keep  # 40x30
    assert jpeg_decode_flags(321, 241, FrameHint(41, 31, False)) == cv2.IMREAD_REDUCED_COLOR_8 | keep  # 41x31
    assert jpeg_decode_flags(1280, 720, FrameHint(224, 224, False)) == cv2.IMREAD_REDUCED_COLOR_2 | keep
    assert jpeg_decode_flags(320, 240, FrameHint(224, 224, True)) == cv2.IMREAD_GRAYSCALE | keep
    assert jpeg_decode_flags(320, 240, FrameHint(640, 480, False)) == cv2.IMREAD_COLOR | keep
    assert FrameHint.merge(FrameHint(32, 32, True), FrameHint(64, 16, False)) == FrameHint(64, 32, False)
    assert FrameHint.merge(FrameHint(32, 32, True), None) is None


def digit_video(path: Path, frames: int = 20, size: tuple[int, int] = (320, 240), fourcc: str = "MJPG") -> Path:
    digits = [cv2.imread(str(SAMPLES / "inputs" / f"digit_{d}.png")) for d in range(10)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, size)
    for i in range(frames):
        writer.write(cv2.resize(digits[i % 10], size, interpolation=cv2.INTER_LINEAR))
    writer.release()
    return path


def read_all(video: Path, hint: FrameHint | None, decode: str = "auto") -> tuple[list, CameraSource]:
    source = CameraSource(CameraSourceConfig(device=str(video), realtime=False, decode=decode), "file")  # type: ignore[arg-type]
    source.want_frames(hint)
    try:
        return read_n(source, 1000, timeout=20), source
    finally:
        source.close()


def test_mjpeg_file_is_decoded_at_the_model_size(tmp_path: Path) -> None:
    video = digit_video(tmp_path / "digits.avi")
    full, _ = read_all(video, None)
    gray, _ = read_all(video, FrameHint(32, 32, True))
    colour, _ = read_all(video, FrameHint(32, 32, False))
    off, _ = read_all(video, FrameHint(32, 32, True), decode="full")
    assert len(full) == len(gray) == len(colour) == len(off) == 20
    assert full[0].data.shape == off[0].data.shape == (240, 320, 3)
    assert gray[0].data.shape == (60, 80) and colour[0].data.shape == (60, 80, 3)
    assert [s.seq for s in gray] == [s.seq for s in full] and gray[0].gap
    for small, big in zip(gray, full, strict=True):  # the same picture, decoded small: close to a resized full frame
        reference = cv2.resize(cv2.cvtColor(big.data, cv2.COLOR_BGR2GRAY), (80, 60), interpolation=cv2.INTER_AREA)
        assert np.abs(small.data.astype(int) - reference).mean() < 4


def test_other_codecs_and_detectors_get_full_frames(tmp_path: Path) -> None:
    video = digit_video(tmp_path / "digits.mp4", frames=5, fourcc="mp4v")
    frames, _ = read_all(video, FrameHint(32, 32, True))
    assert len(frames) == 5 and frames[0].data.shape == (240, 320, 3)
    detector = Predictor.open(SAMPLES / "digits-detector")
    classifier = Predictor.open(SAMPLES / "digits-classifier-tflite")
    try:
        assert detector.frame_hint is None  # boxes are reported in frame pixels
        assert classifier.frame_hint == FrameHint(32, 32, True)
    finally:
        detector.close()
        classifier.close()


def test_corrupt_jpeg_packet_is_counted_and_skipped(tmp_path: Path) -> None:
    video = digit_video(tmp_path / "digits.avi", frames=10)
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 3) if data[i : i + 3] == b"\xff\xd8\xff"]
    assert len(starts) == 10
    data[starts[4] : starts[4] + 2] = b"\x00\x00"  # the fifth frame is no JPEG any more
    video.write_bytes(bytes(data))
    frames, source = read_all(video, FrameHint(32, 32, True))
    assert len(frames) == 9 and all(f.data.shape == (60, 80) for f in frames)
    assert source.health.errors == 1 and source.health.last_error == "corrupt JPEG frame skipped"


def test_mjpeg_http_stream_is_decoded_small_and_survives_a_drop() -> None:
    server = MjpegServer(fps=30).start()  # 160x120
    source = CameraSource(CameraSourceConfig(device=server.url, reconnect_initial=0.2, reconnect_max=0.5), "cam")
    source.want_frames(FrameHint(32, 32, False))
    try:
        first = read_n(source, 5)
        assert len(first) == 5 and first[0].data.shape == (60, 80, 3)  # 1/2: 1/4 would be 30 rows
        server.stop()
        assert wait_until(lambda: not source.health.connected, timeout=10)
        server.start()
        source.want_frames(FrameHint(64, 64, True))  # a new model: frames follow it
        assert wait_until(lambda: (s := source.read(timeout=0.5)) is not None and s.data.shape == (120, 160), 15)
        assert source.health.reconnects >= 1
    finally:
        source.close()
        server.stop()
