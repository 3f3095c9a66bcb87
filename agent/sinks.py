"""Result sinks (stdout, JSONL file) behind one bounded dispatch thread."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import structlog

from agent.config import JsonlSinkConfig, StdoutSinkConfig
from agent.handoff import Handoff
from agent.jsonlines import dumps, encode

log = structlog.get_logger(__name__)


class Sink:
    name = "sink"

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def publish(self) -> None:
        """End of a batch of writes: hand what was written to the OS (visible to readers, not yet durable)."""

    def flush(self) -> None:
        """Make written records durable/visible."""

    def close(self) -> None:
        self.flush()


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, config: StdoutSinkConfig, stream: TextIO | None = None) -> None:
        self.config = config
        self.stream = stream or sys.stdout
        self._counts: dict[str, int] = {}

    def write(self, record: dict[str, Any]) -> None:
        pipeline = record.get("pipeline", "")
        n = self._counts.get(pipeline, 0) + 1
        self._counts[pipeline] = n
        if (n - 1) % self.config.every:
            return
        line = dumps(record) if self.config.format == "json" else format_result(record)
        with contextlib.suppress(BrokenPipeError, ValueError):  # stdout closed: nothing more to show there
            self.stream.write(line + "\n")

    def publish(self) -> None:
        self.flush()

    def flush(self) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.stream.flush()


def format_result(record: dict[str, Any]) -> str:
    """One readable line per result."""
    head = f"[{record.get('pipeline')}#{record.get('seq')}] {record.get('model')}:"
    task = record.get("task")
    lat = f"({record.get('latency_ms', 0):.1f} ms)"
    if task == "classification":
        return f"{head} {record.get('label')} {record.get('score') or 0:.3f} {lat}"
    if task == "detection":
        dets = record.get("detections", [])
        summary = ", ".join(f"{d['label']} {d['score']:.2f}" for d in dets[:5]) or "nothing"
        return f"{head} {len(dets)} detection(s): {summary} {lat}"
    if task == "anomaly":
        verdict = "ANOMALY" if record.get("anomaly") else "normal"
        return f"{head} {verdict} score {record.get('score'):.4f} {lat}"
    return f"{head} {', '.join(record.get('outputs', {}))} {lat}"


class JsonlSink(Sink):
    """Appends one JSON object per line; rotates to PATH.1 beyond ``max_bytes``.

    Lines are buffered and handed to the OS once per batch (``publish``), not one write call per result.
    """

    name = "jsonl"

    def __init__(self, config: JsonlSinkConfig) -> None:
        self.path = Path(config.path)
        self.max_bytes = config.max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._open()
        self._failed = False

    def _open(self) -> BinaryIO:
        fh = self.path.open("ab")
        self._size = os.fstat(fh.fileno()).st_size
        return fh

    def write(self, record: dict[str, Any]) -> None:
        line = encode(record) + b"\n"
        try:
            if self._size + len(line) > self.max_bytes and self._size:
                self._rotate()
            self._fh.write(line)
            self._size += len(line)
        except OSError as exc:
            self._report(exc)

    def publish(self) -> None:
        try:
            self._fh.flush()
            self._failed = False
        except OSError as exc:  # kept in the buffer: written once the disk has room again
            self._report(exc)

    def _report(self, exc: OSError) -> None:
        """Disk full, removed directory: reported once per episode; the daemon keeps running."""
        if not self._failed:
            log.error("jsonl sink cannot write", path=str(self.path), error=exc.strerror)
        self._failed = True

    def _rotate(self) -> None:
        self._fh.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._fh = self._open()

    def flush(self) -> None:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(OSError):
            self._fh.close()


class ResultBus:
    """Fans results out to sinks from one thread; ``emit`` blocks briefly when the queue is full.

    Results reach the dispatcher through a ``Handoff``: the inference side does not pay a thread
    wake-up per result while results keep coming.
    """

    def __init__(self, sinks: dict[str, Sink], maxsize: int = 10_000) -> None:
        self.sinks = sinks
        self._queue: Handoff[tuple[list[str], dict[str, Any]]] = Handoff(maxsize)
        self._thread = threading.Thread(target=self._run, name="result-bus", daemon=True)
        self.delivered = 0
        self.overflowed = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def start(self) -> None:
        self._thread.start()

    def emitter(self, sink_names: list[str]) -> Callable[[dict[str, Any]], None]:
        names = [n for n in sink_names if n in self.sinks]

        def emit(record: dict[str, Any]) -> None:
            if not self._queue.put((names, record), timeout=5.0):
                self.overflowed += 1
                if self._queue.closed:
                    log.warning("result after the sinks closed, dropped", pipeline=record.get("pipeline"))
                    return
                log.error("result queue full for 5 s: a sink is stuck, result dropped", pipeline=record.get("pipeline"))

        return emit

    def _run(self) -> None:
        while (batch := self._queue.take_all()) is not None:
            written: set[str] = set()
            for names, record in batch:
                for name in names:
                    try:
                        self.sinks[name].write(record)
                    except Exception:  # a sink bug must not stop the others
                        log.exception("sink failed", sink=name)
                    written.add(name)
                for listener in self.listeners:
                    listener(record)
                self.delivered += 1
            for name in written:
                try:
                    self.sinks[name].publish()
                except Exception:
                    log.exception("sink failed", sink=name)

    def depth(self) -> int:
        return len(self._queue)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver everything queued, then flush and close the sinks."""
        self._queue.close()
        self._thread.join(timeout)
        for sink in self.sinks.values():
            sink.close()
