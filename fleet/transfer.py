"""Serving the TUF repository to devices over MQTT: metadata by request/response, target chunks fanned out.

A chunk is published once on ``fleet/targets/<sha256>/<chunk_size>/<index>`` for every device subscribed there;
requests for a chunk that is already queued are merged, so N devices starting the same download cost about one
copy of the bytes from the server (the broker does the fan-out).
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.protocol import ProtocolError, encode
from agent.protocol.update import (
    METADATA_PIECE,
    FileResponse,
    chunk_topic,
    parse_chunk_request,
    parse_fetch_request,
    request_wildcards,
)

log = structlog.get_logger(__name__)
MAX_UNACKED = 128


class RepositoryFiles(Protocol):
    def read_metadata(self, name: str) -> bytes | None: ...
    def find_by_sha256(self, sha256: str) -> Path | None: ...


class RepositoryServer:
    """Answers ``update/fetch`` and ``update/chunks`` requests of every device on ``link``."""

    def __init__(
        self,
        link: Any,
        repository: RepositoryFiles,
        device_template: str = "edge/{device_id}/",
        max_queue: int = 100_000,
        rate_limit_bps: float | None = None,
    ) -> None:
        self.link, self.repository = link, repository
        self.topics = request_wildcards(device_template)
        self.max_queue = max_queue
        self.rate_limit_bps = rate_limit_bps  # cap on chunk bytes per second (slow or metered links)
        self._queue: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files: dict[str, tuple[Path, int]] = {}
        self.stats = {
            "metadata_requests": 0,
            "chunk_requests": 0,
            "chunks_published": 0,
            "chunks_merged": 0,
            "bad_requests": 0,
        }

    def start(self) -> None:
        self.link.subscribe(self.topics["fetch"], self._on_fetch)
        self.link.subscribe(self.topics["chunks"], self._on_chunks)
        self._thread = threading.Thread(target=self._publish_loop, name="chunk-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    # ---- metadata ---------------------------------------------------------------------------------

    def _on_fetch(self, message: Any) -> None:
        reply_topic = message.topic.rsplit("/", 1)[0] + "/file"
        try:
            request = parse_fetch_request(message.payload)
        except ProtocolError as exc:
            self.stats["bad_requests"] += 1
            log.warning("bad metadata request", topic=message.topic, error=str(exc))
            return
        self.stats["metadata_requests"] += 1
        data = self.repository.read_metadata(request.path)
        if data is None:
            response = FileResponse(id=request.id, path=request.path, status="not_found")
        else:
            piece = data[request.offset : request.offset + METADATA_PIECE]
            response = FileResponse(
                id=request.id,
                path=request.path,
                status="ok",
                offset=request.offset,
                total=len(data),
                data=base64.b64encode(piece).decode(),
            )
        self.link.publish(reply_topic, encode(response), qos=1)

    # ---- chunks -----------------------------------------------------------------------------------

    def _on_chunks(self, message: Any) -> None:
        try:
            request = parse_chunk_request(message.payload)
        except ProtocolError as exc:
            self.stats["bad_requests"] += 1
            log.warning("bad chunk request", topic=message.topic, error=str(exc))
            return
        self.stats["chunk_requests"] += 1
        if self._file(request.target) is None:
            log.warning("chunk request for an unknown target", target=request.target, topic=message.topic)
            return
        with self._cond:
            for index in request.chunks:
                key = (request.target, request.chunk_size, index)
                if key in self._queue:
                    self.stats["chunks_merged"] += 1
                elif len(self._queue) < self.max_queue:
                    self._queue[key] = None
            self._cond.notify_all()

    def _file(self, sha256: str) -> tuple[Path, int] | None:
        known = self._files.get(sha256)
        if known is not None:
            return known
        path = self.repository.find_by_sha256(sha256)
        if path is None:
            return None
        try:
            entry = (path, path.stat().st_size)
        except OSError:
            return None
        self._files[sha256] = entry
        return entry

    def _publish_loop(self) -> None:
        handles: dict[Path, int] = {}
        pending: deque[Any] = deque()
        next_send = time.monotonic()
        try:
            while not self._stop.is_set():
                with self._cond:
                    while not self._queue and not self._stop.is_set():
                        self._cond.wait(0.5)
                    if self._stop.is_set():
                        return
                    (sha256, chunk_size, index), _ = self._queue.popitem(last=False)
                if not self.link.connected.is_set():
                    # Broker gone: what is queued is stale (devices ask again after they reconnect).
                    pending.clear()
                    with self._cond:
                        self._queue.clear()
                    continue
                try:
                    data = self._read_chunk(handles, sha256, chunk_size, index)
                except OSError as exc:
                    log.error("cannot read target chunk", target=sha256, index=index, error=str(exc))
                    continue
                if data is None:
                    continue
                pending.append(self.link.publish(chunk_topic(sha256, chunk_size, index), data, qos=1))
                self.stats["chunks_published"] += 1
                if self.rate_limit_bps:
                    next_send = max(next_send, time.monotonic() - 1.0) + len(data) / self.rate_limit_bps
                    delay = next_send - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                # Keep what paho holds in memory bounded: at most MAX_UNACKED chunks not yet acknowledged.
                while pending and (_settled(pending[0]) or len(pending) > MAX_UNACKED):
                    info = pending.popleft()
                    if not _settled(info):
                        self.link.wait_published(info, 10.0)
        finally:
            for fd in handles.values():
                os.close(fd)

    def _read_chunk(self, handles: dict[Path, int], sha256: str, chunk_size: int, index: int) -> bytes | None:
        entry = self._file(sha256)
        if entry is None:
            return None
        path, size = entry
        offset = index * chunk_size
        if offset >= size:
            return None
        fd = handles.get(path)
        if fd is None:
            fd = handles[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, chunk_size, offset)


def _settled(info: Any) -> bool:
    """Acknowledged, or failed (not connected): either way nothing to wait for."""
    if info.rc != 0:
        return True
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return True
