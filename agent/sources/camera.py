"""Camera source through OpenCV ``VideoCapture``: device index/path, video file, RTSP/HTTP URL, GStreamer pipeline.

A grabber thread keeps only the newest frame (so latency stays bounded), reopens the
stream with backoff when it drops, and a stuck ``cap.read()`` (a hung RTSP stream) is
detected as a stall: the grabber is abandoned and a fresh one started.

Motion-JPEG read through FFmpeg (video files, HTTP/RTSP MJPEG) is taken as raw packets and
decoded here at the size and colour the model needs: OpenCV's JPEG decoder scales by 1/2, 1/4
or 1/8 inside the DCT and skips chroma for gray, so a small model does not pay for decoding
pixels its pre-processing would throw away (``decode = "full"`` turns this off).
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from agent.sources.base import Backoff, FrameHint, Sample, Source

log = structlog.get_logger(__name__)

# FFmpeg's own stderr chatter ("Stream ends prematurely") is noise: we report stream health ourselves.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

TYPE = "camera"
BACKENDS = {"auto": "CAP_ANY", "v4l2": "CAP_V4L2", "gstreamer": "CAP_GSTREAMER", "ffmpeg": "CAP_FFMPEG"}


class CameraSourceConfig(BaseModel):
    """``[sources.NAME] type = "camera"``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["camera"] = "camera"
    device: int | str = (
        0  # index, /dev/videoN, video file, rtsp://..., http://..., or a GStreamer pipeline ("... ! appsink")
    )
    backend: Literal["auto", "v4l2", "gstreamer", "ffmpeg"] = "auto"
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0)
    loop: bool = False  # video files: start again at the end
    realtime: bool = True  # video files: deliver at the file's frame rate, like a camera
    reconnect_initial: float = Field(default=0.5, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    stall_after: float = Field(default=10.0, gt=0)  # seconds without a frame while connected
    # auto: Motion-JPEG read by FFmpeg is decoded at the size/colour the model needs; full: always full BGR frames
    decode: Literal["auto", "full"] = "auto"


Config = CameraSourceConfig


def jpeg_decode_flags(width: int, height: int, hint: FrameHint | None) -> int:
    """``cv2.imdecode`` flags for a ``width`` x ``height`` JPEG: the smallest DCT-scaled size (1/8, 1/4, 1/2) that
    still covers ``hint`` (libjpeg rounds scaled sizes up), in gray when the hint says so; full BGR without a hint.
    EXIF orientation is ignored, as video decoders do."""
    import cv2

    keep = cv2.IMREAD_IGNORE_ORIENTATION
    if hint is None:
        return cv2.IMREAD_COLOR | keep
    for scale, gray, colour in (
        (8, cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8),
        (4, cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
        (2, cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
    ):
        if -(-width // scale) >= hint.width and -(-height // scale) >= hint.height:
            return (gray if hint.gray else colour) | keep
    return (cv2.IMREAD_GRAYSCALE if hint.gray else cv2.IMREAD_COLOR) | keep


class JpegCapture:
    """A ``VideoCapture`` in FFmpeg's raw mode on a Motion-JPEG stream: ``read`` decodes each packet at the
    reduced size and colour the consumer currently wants; a corrupt packet is counted and skipped."""

    def __init__(self, cap: Any, width: int, height: int, source: CameraSource) -> None:
        self.cap, self.width, self.height, self._source = cap, width, height, source
        self._flags: tuple[FrameHint | None, int] | None = None

    def read(self) -> tuple[bool, np.ndarray | None]:
        import cv2

        for _ in range(8):
            ok, packet = self.cap.read()
            if not ok or packet is None:
                return False, None
            hint = self._source.frame_hint
            if self._flags is None or self._flags[0] != hint:
                self._flags = (hint, jpeg_decode_flags(self.width, self.height, hint))
            try:
                frame = cv2.imdecode(packet, self._flags[1]) if packet.size else None
            except cv2.error:
                frame = None
            if frame is not None:
                return True, frame
            self._source.health.errors += 1
            self._source.health.last_error = "corrupt JPEG frame skipped"
        return False, None

    def get(self, prop: int) -> float:
        return self.cap.get(prop)

    def set(self, prop: int, value: float) -> bool:
        return self.cap.set(prop, value)

    def release(self) -> None:
        self.cap.release()


def _is_file(device: int | str) -> bool:
    return isinstance(device, str) and "://" not in device and "!" not in device and not device.startswith("/dev/")


class CameraSource(Source):
    kind = "image"

    def __init__(self, config: CameraSourceConfig, name: str) -> None:
        super().__init__(name)
        self.config = config
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._frame_gap = False
        self._generation = 0
        self._grabber: threading.Thread | None = None
        self._finished = False
        self._last_frame_at = time.monotonic()
        self._is_file = _is_file(config.device)
        self._cap: Any = None  # direct (non-realtime file) mode only
        self._cap_lock = threading.Lock()  # close() from another thread waits for a read in progress
        self.frame_hint: FrameHint | None = None
        self._down_since: float | None = None  # an outage logged (one line), its recovery not yet

    # ---- public -------------------------------------------------------------------------------

    def read(self, timeout: float = 1.0) -> Sample | None:
        if self.closed:
            return None
        if self._is_file and not self.config.realtime:
            return self._read_direct()
        if self._grabber is None:
            self._start_grabber()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._frame is None and not self.closed and not self._finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
                self._check_stall()
            if self._frame is None:
                self._check_stall()
                return None
            frame, gap = self._frame, self._frame_gap
            self._frame, self._frame_gap = None, False
            self._cond.notify_all()
        return self._sample(frame, gap=gap)

    @property
    def live(self) -> bool:
        return not (self._is_file and not self.config.realtime)

    @property
    def nominal_rate(self) -> float | None:
        return self.config.fps if self.live else math.inf

    def _read_direct(self) -> Sample | None:
        """Video file as fast as the consumer reads: decode in the caller's thread, every frame in order."""
        with self._cap_lock:  # the capture is never released under a read
            if self._finished or self.closed:
                return None
            return self._read_direct_locked()

    def _read_direct_locked(self) -> Sample | None:
        if self._cap is None:
            self._cap = self._open()
            if self._cap is None:
                self.health.errors += 1
                self.health.last_error = f"cannot open {self.config.device!r}"
                self._finished = True
                return None
            self.health.connected = True
            self._frame_gap = True
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._cap.release()
            self._cap = None
            self.health.connected = False
            if not self.config.loop:
                self._finished = True
            return None
        gap, self._frame_gap = self._frame_gap, False
        return self._sample(frame, gap=gap)

    @property
    def finished(self) -> bool:
        return self._finished and self._frame is None

    def close(self) -> None:
        super().close()
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        with self._cap_lock:
            if self._cap is not None:
                self._cap.release()
                self._cap = None

    def probe(self) -> str | None:
        if self._is_file and not Path(str(self.config.device)).exists():
            return f"camera {self.name}: video file {self.config.device} does not exist (fix: check [sources.{self.name}].device)"
        if (
            isinstance(self.config.device, str)
            and self.config.device.startswith("/dev/")
            and not Path(self.config.device).exists()
        ):
            return f"camera {self.name}: {self.config.device} does not exist (fix: plug the camera in or fix the device path)"
        cap = self._open()
        if cap is None:
            return f"camera {self.name}: cannot open {self.config.device!r} (fix: check the device, URL or pipeline)"
        ok, _ = cap.read()
        cap.release()
        return (
            None
            if ok
            else f"camera {self.name}: {self.config.device!r} opened but gave no frame (fix: check the stream)"
        )

    def want_frames(self, hint: FrameHint | None) -> None:
        """Streams opened from now on take Motion-JPEG raw when there is a hint; open ones follow it frame by frame."""
        self.frame_hint = hint

    # ---- grabber ------------------------------------------------------------------------------

    def _start_grabber(self) -> None:
        with self._cond:
            self._spawn_grabber()

    def _spawn_grabber(self) -> None:
        """With the lock held: a new grabber generation; an older, stuck grabber exits when it wakes."""
        self._generation += 1
        self._last_frame_at = time.monotonic()
        self._grabber = threading.Thread(
            target=self._grab_loop, args=(self._generation,), name=f"camera-{self.name}", daemon=True
        )
        self._grabber.start()

    def _check_stall(self) -> None:
        """Called with the lock held: a connected stream silent for ``stall_after`` gets a new grabber."""
        if self.closed or self._finished or not self.health.connected:
            return
        if time.monotonic() - self._last_frame_at < self.config.stall_after:
            return
        self.health.stalls += 1
        self.health.connected = False
        self.health.last_error = f"no frame for {self.config.stall_after:.0f} s: reopening"
        self._log_outage("camera stalled: reopening", self.health.last_error)
        self._spawn_grabber()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self.closed

    def _open(self) -> Any:
        import cv2

        device = self.config.device
        api = getattr(cv2, BACKENDS[self.config.backend], cv2.CAP_ANY)
        if isinstance(device, str) and "!" in device and self.config.backend == "auto":
            api = cv2.CAP_GSTREAMER
        cap = cv2.VideoCapture(device, api)
        if not cap.isOpened():
            cap.release()
            return None
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self.config.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
        if self.config.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        if self.config.fps and not self._is_file:
            cap.set(cv2.CAP_PROP_FPS, self.config.fps)
        if self.config.decode == "auto" and self.frame_hint is not None and cap.getBackendName() == "FFMPEG":
            fourcc = (int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).to_bytes(4, "little")
            width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if fourcc == b"MJPG" and width > 0 and height > 0 and cap.set(cv2.CAP_PROP_FORMAT, -1):
                return JpegCapture(cap, width, height, self)
        return cap

    def _grab_loop(self, generation: int) -> None:
        import cv2

        backoff = Backoff(self.config.reconnect_initial, self.config.reconnect_max)
        first_open = self.health.samples == 0 and self.health.reconnects == 0
        cap = None
        try:
            while self._current(generation):
                if cap is None:
                    cap = self._open()
                    if cap is None:
                        self.health.errors += 1
                        self.health.last_error = f"cannot open {self.config.device!r}"
                        self._log_outage("camera unavailable: retrying", self.health.last_error)
                        if self._wait(backoff.next_delay()):
                            return
                        continue
                    if not first_open:
                        self.health.reconnects += 1
                    first_open = False
                    self.health.connected = True
                    if self._down_since is not None:
                        down_s = round(time.monotonic() - self._down_since, 1)
                        log.info("camera back", source=self.name, device=str(self.config.device), down_s=down_s)
                        self._down_since = None
                    self._mark_gap()
                    file_fps = cap.get(cv2.CAP_PROP_FPS) if self._is_file else 0.0
                    interval = (
                        1.0 / (self.config.fps or file_fps)
                        if self._is_file and self.config.realtime and (self.config.fps or file_fps)
                        else 0.0
                    )
                    next_due = time.monotonic()
                ok, frame = cap.read()
                if not self._current(generation):
                    return
                if not ok or frame is None:
                    cap.release()
                    cap = None
                    self.health.connected = False
                    if self._is_file and not self.config.loop:
                        with self._cond:
                            self._finished = True
                            self._cond.notify_all()
                        return
                    if not self._is_file:
                        self.health.errors += 1
                        self.health.last_error = "stream ended or frame grab failed: reconnecting"
                        self._log_outage("camera lost: reconnecting", self.health.last_error)
                        if self._wait(backoff.next_delay()):
                            return
                    continue
                backoff.reset()
                if interval:
                    next_due += interval
                    delay = next_due - time.monotonic()
                    if delay > 0 and self._wait(delay):
                        return
                with self._cond:
                    if not self._current(generation):
                        return
                    self._frame = frame
                    self._last_frame_at = time.monotonic()
                    self._cond.notify_all()
                if self._is_file and not self.config.realtime:
                    self._wait_consumed(generation)
        finally:
            if cap is not None:
                cap.release()

    def _log_outage(self, event: str, error: str) -> None:
        """One warning per outage (not per retry); its end is logged when the camera opens again."""
        if self._down_since is None and not self.closed:
            self._down_since = time.monotonic()
            log.warning(event, source=self.name, device=str(self.config.device), error=error)

    def _mark_gap(self) -> None:
        with self._cond:
            self._frame_gap = True

    def _wait_consumed(self, generation: int) -> None:
        """Non-realtime files: hand over every frame (the consumer paces the reading)."""
        with self._cond:
            while self._frame is not None and self._current(generation):
                self._cond.wait(0.1)


def create(config: CameraSourceConfig, name: str) -> CameraSource:
    return CameraSource(config, name)
