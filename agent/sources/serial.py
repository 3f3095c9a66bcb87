"""Serial-sensor source: one row of channel values per text line (CSV or JSON lines) from a serial port.

``port`` is anything pyserial's ``serial_for_url`` opens: /dev/ttyUSB0, a /dev/serial/by-id/... link,
COM3, ``loop://``, ``socket://host:port``, ``rfc2217://...``. pyserial is imported only when the port is
opened, so the config validates where it is not installed.

Behaviour worth knowing:

* Each ``read`` returns one row (kind ``"row"``): float32 values in ``channels`` order. Windowing is
  the pipeline's job; the first row after every (re)open has ``gap=True``.
* Bad lines (non-numeric or non-finite values, wrong field count, bad JSON, missing keys, undecodable
  bytes, lines over ``max_line_bytes``) are skipped and counted in ``health.errors``; blank lines are ignored.
* The first line after each open may be the tail of a line the device was sending while we opened.
  It is used when it is a CSV header or a complete JSON object, otherwise dropped without an error:
  a CSV tail such as ``"51,1.02"`` of ``"23.51,1.02"`` would parse as a silently wrong row.
* A vanished device (read error, EIO on a pty, the port path gone) closes the handle, counts an
  error and is reopened with backoff; every failed open attempt counts an error too (as in camera).
* A connected port silent (no valid line) for ``stall_after`` seconds counts one stall per episode.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import os
import threading
import time
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.sources.base import Backoff, Sample, Source

log = structlog.get_logger(__name__)

TYPE = "serial"
PYSERIAL_MISSING = "pyserial is not installed: pip install 'edge-inference-agent[serial]'"
# pyserial's Serial.BAUDRATES plus rates common on microcontrollers (MIDI, Marlin/Arduino 250000, ...).
STANDARD_BAUDRATES = (
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 14400, 19200, 28800, 31250, 38400,
    56000, 57600, 76800, 115200, 128000, 230400, 250000, 256000, 460800, 500000, 576000, 921600, 1000000,
    1152000, 1500000, 2000000, 2500000, 3000000, 3500000, 4000000,
)  # fmt: skip
_RELEARN_AFTER = 3  # header-less CSV: consecutive lines of one new field count before it is adopted
_MAX_CHUNK = 4096


class SerialSourceConfig(BaseModel):
    """``[sources.NAME] type = "serial"``: a sensor printing one CSV or JSON line per sample."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["serial"] = "serial"
    port: str = Field(min_length=1)  # /dev/ttyUSB0, /dev/serial/by-id/..., COM3, loop://, socket://host:port
    baudrate: int = 115200
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: Literal[1, 1.5, 2] = 1
    format: Literal["csv", "json"] = "csv"
    # csv: taken by name from a header line the device prints, else the first len(channels) fields;
    # json: keys of each line's object, "accel.x" for nested values (or a literal "accel.x" key)
    channels: list[str] = Field(min_length=1)
    delimiter: str = Field(default=",", min_length=1)  # csv only; whitespace (" " or "\t") = any run of blanks
    read_timeout: float = Field(default=1.0, gt=0)  # longest single wait on the port; bounds close() latency
    reconnect_initial: float = Field(default=0.5, gt=0)
    reconnect_max: float = Field(default=10.0, gt=0)
    stall_after: float = Field(default=5.0, gt=0)  # seconds without a valid line while connected = one stall
    max_line_bytes: int = Field(default=4096, ge=16)  # longer lines are discarded and counted as errors

    @field_validator("baudrate")
    @classmethod
    def _standard_baudrate(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("baudrate must be positive, e.g. 115200 or 9600")
        if value not in STANDARD_BAUDRATES:
            typo = difflib.get_close_matches(str(value), [str(rate) for rate in STANDARD_BAUDRATES], n=1)
            closest = typo[0] if typo else min(STANDARD_BAUDRATES, key=lambda rate: abs(rate - value))
            raise ValueError(f"baudrate {value} is not a standard rate (did you mean {closest}?)")
        return value

    @field_validator("channels")
    @classmethod
    def _clean_channels(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if any(not name for name in names):
            raise ValueError("channel names must not be empty")
        if len(set(names)) != len(names):
            raise ValueError(f"channel names must be unique: {names}")
        return names

    @field_validator("delimiter")
    @classmethod
    def _one_line_delimiter(cls, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("delimiter must not contain a line break")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> SerialSourceConfig:
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_max must be >= reconnect_initial")
        return self


Config = SerialSourceConfig


def _pyserial() -> Any | None:
    try:
        import serial
    except ImportError:
        return None
    return serial


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lookup(obj: dict[str, Any], key: str) -> Any:
    """``obj[key]``, else walk ``key`` split on dots (list items by index); KeyError when absent."""
    if key in obj:
        return obj[key]
    value: Any = obj
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(key)
    return value


class _BadLine(ValueError):
    """A line that cannot become a row; the message goes to ``health.last_error``."""


class SerialSource(Source):
    """Rows from a serial sensor. ``read`` is meant for one consumer thread; ``close`` works from any thread."""

    kind = "row"

    def __init__(self, config: SerialSourceConfig, name: str) -> None:
        super().__init__(name)
        self.config = config
        self._port: Any = None  # the open pyserial handle
        self._handle_lock = threading.Lock()  # guards swapping self._port against close() in another thread
        self._read_lock = threading.Lock()  # held by read(); close() takes it before closing the handle
        self._backoff = Backoff(config.reconnect_initial, config.reconnect_max)
        self._retry_at = 0.0  # monotonic time of the next open attempt
        self._opened_before = False
        self._down_since: float | None = None  # an outage logged (one line), its recovery not yet
        self._is_path = "://" not in config.port and os.name == "posix"
        self._split_blanks = not config.delimiter.strip()
        self._poll = config.read_timeout  # timeout currently set on the handle
        # line assembly
        self._buf = bytearray()
        self._skipping = False  # dropping the rest of an over-long line
        self._fresh = True  # the next line is the first since open: it may be a fragment
        self._gap = False
        # csv columns: from a header (kept across reconnects until a new header), or learnt widths
        self._columns: list[int] | None = None
        self._width: int | None = None
        self._odd_width: int | None = None
        self._odd_count = 0
        # stall detection
        self._last_line_at = time.monotonic()
        self._stalled = False

    # ---- public -------------------------------------------------------------------------------

    def read(self, timeout: float = 1.0) -> Sample | None:
        """The next row, or None when none arrived within ``timeout`` (device absent, silent, or closed)."""
        if self.closed:
            return None
        deadline = time.monotonic() + max(0.0, timeout)
        with self._read_lock:
            polled = False
            while not self.closed:
                line = self._next_line()
                if line is not None:
                    row = self._parse_line(line)
                    if row is not None:
                        return self._emit(row)
                    continue
                if polled and time.monotonic() >= deadline:
                    return None
                if self._port is None and not self._open(deadline):
                    if time.monotonic() >= deadline:
                        return None
                    continue
                chunk = self._read_chunk(deadline - time.monotonic())
                polled = True
                if chunk:
                    self._feed(chunk)
                self._check_stall()
        return None

    def close(self) -> None:
        """Stop: a ``read`` blocked in another thread returns None promptly; the port is closed."""
        super().close()
        with self._handle_lock:
            if self._port is not None:
                with contextlib.suppress(Exception):
                    self._port.cancel_read()
        acquired = self._read_lock.acquire(timeout=self.config.read_timeout + 1.0)
        try:
            self._close_handle()
            self.health.connected = False
        finally:
            if acquired:
                self._read_lock.release()

    def probe(self) -> str | None:
        """None when the port opens right now (or is already open here), else a one-line reason and fix."""
        if self._port is not None:
            return None
        serial = _pyserial()
        if serial is None:
            port = self.config.port
            return f"pyserial is not installed, needed for serial port {port} (fix: pip install 'edge-inference-agent[serial]')"
        try:
            port = self._make_port(serial)
        except Exception as exc:
            return self._explain(exc)
        with contextlib.suppress(Exception):
            port.close()
        return None

    # ---- port handling ------------------------------------------------------------------------

    def _make_port(self, serial: Any) -> Any:
        options: dict[str, Any] = {
            "baudrate": self.config.baudrate,
            "bytesize": self.config.bytesize,
            "parity": self.config.parity,
            "stopbits": self.config.stopbits,
            "timeout": self.config.read_timeout,
        }
        if self._is_path:
            options["exclusive"] = True  # flock: a second reader would steal half the bytes of every line
        return serial.serial_for_url(self.config.port, **options)

    def _open(self, deadline: float) -> bool:
        """One open attempt once the backoff delay has passed (waiting for it at most until ``deadline``)."""
        now = time.monotonic()
        if now < self._retry_at and (
            self._wait(min(self._retry_at, deadline) - now) or time.monotonic() < self._retry_at
        ):
            return False
        serial = _pyserial()
        if serial is None:
            if self.health.last_error != PYSERIAL_MISSING:
                self.health.errors += 1
                self.health.last_error = PYSERIAL_MISSING
            self._wait(deadline - time.monotonic())  # nothing will change: do not spin the caller
            return False
        try:
            port = self._make_port(serial)
        except Exception as exc:
            self.health.connected = False
            self.health.errors += 1
            self.health.last_error = self._explain(exc)
            self._retry_at = time.monotonic() + self._backoff.next_delay()
            self._log_outage("serial port unavailable: retrying", self.health.last_error)
            return False
        with self._handle_lock:
            if self.closed:
                port.close()
                return False
            self._port = port
        if self._opened_before:
            self.health.reconnects += 1
        self._opened_before = True
        if self._down_since is not None:
            log.info(
                "serial port back",
                source=self.name,
                port=self.config.port,
                down_s=round(time.monotonic() - self._down_since, 1),
            )
            self._down_since = None
        self.health.connected = True
        self._poll = self.config.read_timeout
        self._buf.clear()
        self._skipping = False
        self._fresh = True
        self._gap = True
        self._width = self._width if self._columns is not None else None
        self._odd_width, self._odd_count = None, 0
        self._last_line_at = time.monotonic()
        self._stalled = False
        return True

    def _read_chunk(self, wait: float) -> bytes | None:
        """Bytes from the port (b"" on timeout), or None after the device vanished."""
        port = self._port
        try:
            poll = max(0.0, min(self.config.read_timeout, wait))
            if abs(poll - self._poll) > 0.005:
                port.timeout = poll  # on POSIX this is a tcsetattr: only when it really changes
                self._poll = poll
            size = min(max(port.in_waiting, 1), max(_MAX_CHUNK, self.config.max_line_bytes))
            data = port.read(size)
        except Exception as exc:
            if not self.closed:
                self._lost(f"serial port {self.config.port} failed: {exc}")
            return None
        if not data and self._is_path and not os.path.exists(self.config.port):
            self._lost(f"serial port {self.config.port} disappeared")
            return None
        return data

    def _lost(self, reason: str) -> None:
        self._close_handle()
        self.health.connected = False
        self.health.errors += 1
        self.health.last_error = _one_line(reason)
        self._retry_at = time.monotonic() + self._backoff.next_delay()
        self._log_outage("serial port lost: reconnecting", self.health.last_error)

    def _log_outage(self, event: str, error: str) -> None:
        """One warning per outage (not per retry); its end is logged when the port opens again."""
        if self._down_since is None and not self.closed:
            self._down_since = time.monotonic()
            log.warning(event, source=self.name, port=self.config.port, error=error)

    def _close_handle(self) -> None:
        with self._handle_lock:
            port, self._port = self._port, None
        if port is not None:
            with contextlib.suppress(Exception):
                port.close()

    def _explain(self, exc: BaseException) -> str:
        """A one-line reason the port cannot be opened, naming the port and the fix."""
        port, setting = self.config.port, f"[sources.{self.name}].port"
        code = getattr(exc, "errno", None)
        if (self._is_path and not os.path.exists(port)) or code == errno.ENOENT:
            return f"serial port {port} does not exist (fix: plug the sensor in or set {setting})"
        if code in (errno.EACCES, errno.EPERM):
            return (
                f"no permission to open serial port {port} "
                "(fix: add the agent's user to the dialout group: sudo usermod -aG dialout $USER, then log in again)"
            )
        if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
            return (
                f"serial port {port} is in use by another program "
                "(fix: stop it: ModemManager, a serial console, or a second edge-agent)"
            )
        detail = _one_line(getattr(exc, "strerror", None) or exc, 160)
        if isinstance(exc, ValueError):
            return f"invalid serial settings for {port}: {detail} (fix: check [sources.{self.name}])"
        return f"cannot open serial port {port}: {detail} (fix: check the device and {setting})"

    # ---- lines --------------------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        if self._skipping:
            end = chunk.find(b"\n")
            if end < 0:
                return
            chunk, self._skipping = chunk[end + 1 :], False
        self._buf += chunk

    def _next_line(self) -> bytes | None:
        """The next complete line without its line break; over-long lines are dropped and counted."""
        limit = self.config.max_line_bytes
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > limit:
                    self._buf.clear()
                    self._skipping = True
                    self._fresh = False
                    self._bad(f"line longer than {limit} bytes discarded")
                return None
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if len(line.rstrip(b"\r")) > limit:
                self._fresh = False
                self._bad(f"line longer than {limit} bytes discarded")
                continue
            return line

    def _parse_line(self, raw: bytes) -> np.ndarray | None:
        """The row in a line, or None (blank line, header, dropped fragment, or a counted bad line)."""
        fresh, self._fresh = self._fresh, False
        try:
            text = raw.decode("utf-8").strip().lstrip("\ufeff")
            if not text:
                return None
            row = self._parse_json(text) if self.config.format == "json" else self._parse_csv(text, fresh)
        except UnicodeDecodeError:
            if not fresh:
                self._bad(f"undecodable bytes {raw[:40]!r}")
            return None
        except _BadLine as exc:
            if not fresh:
                self._bad(str(exc))
            return None
        self._last_line_at = time.monotonic()  # a header is a valid line too
        self._stalled = False
        return row

    def _parse_csv(self, text: str, fresh: bool) -> np.ndarray | None:
        parts = text.split() if self._split_blanks else text.split(self.config.delimiter)
        fields = [part.strip().strip('"') for part in parts]
        channels = self.config.channels
        if set(channels).issubset(fields) and not all(_is_number(f) for f in fields):
            first: dict[str, int] = {}
            for index, name in enumerate(fields):
                first.setdefault(name, index)
            self._columns, self._width = [first[c] for c in channels], len(fields)
            return None
        if fresh:
            raise _BadLine("possible fragment")  # not counted: see the module docstring
        if len(fields) < len(channels):
            raise _BadLine(f"line has {len(fields)} fields, expected {len(channels)}: {text[:60]!r}")
        self._check_width(len(fields), text)
        picked = [fields[i] for i in self._columns] if self._columns is not None else fields[: len(channels)]
        values = []
        for name, field in zip(channels, picked, strict=True):
            try:
                values.append(float(field))
            except ValueError:
                raise _BadLine(f"channel {name}: {field[:30]!r} is not a number") from None
        row = self._finite(values)
        if self._width is None:
            self._width = len(fields)  # learnt from the first good line
        return row

    def _check_width(self, width: int, text: str) -> None:
        """Same field count as the header (or as earlier lines): catches merged and truncated lines."""
        if self._width is None or width == self._width:
            self._odd_width, self._odd_count = None, 0
            return
        if self._columns is None:  # no header: a lasting new layout is adopted after a few lines
            self._odd_count = self._odd_count + 1 if width == self._odd_width else 1
            self._odd_width = width
            if self._odd_count >= _RELEARN_AFTER:
                self._width, self._odd_width, self._odd_count = width, None, 0
                return
        raise _BadLine(f"line has {width} fields, expected {self._width}: {text[:60]!r}")

    def _parse_json(self, text: str) -> np.ndarray:
        try:
            obj = json.loads(text)
        except ValueError:
            raise _BadLine(f"not valid JSON: {text[:60]!r}") from None
        if not isinstance(obj, dict):
            raise _BadLine(f"JSON line is not an object: {text[:60]!r}")
        values = []
        for name in self.config.channels:
            try:
                value = _lookup(obj, name)
            except KeyError:
                raise _BadLine(f"key {name!r} missing in {text[:60]!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _BadLine(f"key {name!r} is not a number: {str(value)[:30]!r}")
            try:
                values.append(float(value))
            except OverflowError:
                raise _BadLine(f"key {name!r} is out of range") from None
        return self._finite(values)

    def _finite(self, values: list[float]) -> np.ndarray:
        with np.errstate(over="ignore"):  # 1e40 becomes inf in float32 and is reported below
            row = np.asarray(values, dtype=np.float32)
        if not np.all(np.isfinite(row)):
            bad = [name for name, ok in zip(self.config.channels, np.isfinite(row), strict=True) if not ok]
            raise _BadLine(f"non-finite value for {', '.join(bad)}")
        return row

    # ---- health -------------------------------------------------------------------------------

    def _bad(self, reason: str) -> None:
        self.health.errors += 1
        self.health.last_error = _one_line(f"bad line from {self.config.port}: {reason}")

    def _emit(self, row: np.ndarray) -> Sample:
        gap, self._gap = self._gap, False
        self._backoff.reset()  # a row proves the connection works
        return self._sample(row, gap=gap)

    def _check_stall(self) -> None:
        if self._stalled or not self.health.connected:
            return
        if time.monotonic() - self._last_line_at >= self.config.stall_after:
            self._stalled = True
            self.health.stalls += 1


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def create(config: SerialSourceConfig, name: str) -> SerialSource:
    return SerialSource(config, name)
