"""Update I/O over MQTT: TUF metadata by request/response, target bytes in chunks the broker fans out.

All trust decisions live elsewhere (``tuf.ngclient`` for metadata, ``TargetFile.verify_length_and_hashes`` for
targets, ``ChunkPlan`` for what to accept); this module only moves bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from agent.errors import AgentError
from agent.protocol import ProtocolError, Topics, encode
from agent.protocol.update import (
    METADATA_PATH,
    ChunkRequest,
    FetchRequest,
    FileResponse,
    chunk_request_topic,
    chunk_topic,
    fetch_topic,
    file_topic,
    parse_chunk_topic,
    parse_file_response,
)
from agent.update.transfer import Accept, ChunkPlan

log = structlog.get_logger(__name__)
METADATA_BASE_URL = "mqtt://fleet/metadata/"
BITMAP_SUFFIX = ".chunks"


class TransferError(AgentError):
    """A transfer that cannot go on (fleet silent, disk error); the update fails with this reason."""


class MqttMetadataFetcher(FetcherInterface):
    """``tuf.ngclient`` fetcher: each metadata file is requested piece by piece on ``update/fetch``."""

    def __init__(self, link: Any, topics: Topics, timeout_s: float = 10.0, attempts: int = 3) -> None:
        self.link, self.topics = link, topics
        self.timeout_s, self.attempts = timeout_s, attempts
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[FileResponse]]] = {}
        link.subscribe(file_topic(topics), self._on_file)

    def _on_file(self, message: Any) -> None:
        try:
            response = parse_file_response(message.payload)
        except ProtocolError as exc:
            log.warning("metadata response refused", error=str(exc))
            return
        with self._lock:
            waiter = self._waiting.get(response.id)
        if waiter is not None:
            waiter[1].append(response)
            waiter[0].set()

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(METADATA_BASE_URL):
            raise tuf_errors.DownloadError(f"{url} is not a fleet metadata URL")
        path = url.removeprefix(METADATA_BASE_URL)
        if not METADATA_PATH.match(path):
            raise tuf_errors.DownloadError(f"metadata name {path!r} is not allowed")
        return self._pieces(path)

    def _pieces(self, path: str) -> Iterator[bytes]:
        offset = 0
        while True:
            response = self._request(path, offset)
            if response.status == "not_found":
                raise tuf_errors.DownloadHTTPError(f"{path} is not on the fleet", 404)
            if response.status != "ok":
                raise tuf_errors.DownloadError(f"fleet could not serve {path}: {response.error or 'error'}")
            if response.offset != offset:
                raise tuf_errors.DownloadError(f"fleet answered offset {response.offset} for {path}, asked {offset}")
            try:
                data = response.decoded()
            except ProtocolError as exc:
                raise tuf_errors.DownloadError(str(exc)) from None
            if data:
                yield data
            offset += len(data)
            if not data or offset >= response.total:
                return

    def _request(self, path: str, offset: int) -> FileResponse:
        for _ in range(self.attempts):
            if not self.link.connected:
                _wait_connected(self.link, self.timeout_s)
            request_id = uuid.uuid4().hex[:16]
            event, box = threading.Event(), []
            with self._lock:
                self._waiting[request_id] = (event, box)
            try:
                request = FetchRequest(id=request_id, path=path, offset=offset)
                self.link.publish_now(fetch_topic(self.topics), encode(request), qos=1)
                if event.wait(self.timeout_s) and box:
                    return box[0]
            finally:
                with self._lock:
                    self._waiting.pop(request_id, None)
        raise tuf_errors.SlowRetrievalError(
            f"no answer from the fleet for {path} after {self.attempts} requests of {self.timeout_s:g} s"
        )


def _wait_connected(link: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not link.connected:
        if time.monotonic() >= deadline:
            raise tuf_errors.DownloadError("not connected to the MQTT broker")
        time.sleep(0.05)


class ChunkDownload:
    """Download one target (by SHA-256) into ``<downloads>/<sha256>.part`` from chunks published on the fan-out
    topic; which chunks are durable is kept in ``<sha256>.part.chunks`` so a restart asks only for the rest."""

    def __init__(
        self,
        link: Any,
        topics: Topics,
        path: Path,
        sha256: str,
        length: int,
        chunk_size: int,
        *,
        window: int = 32,
        timeout_s: float = 5.0,
        max_retries: int = 8,
        persist_every_s: float = 1.0,
    ) -> None:
        self.link, self.topics, self.path = link, topics, Path(path)
        self.sha256, self.length, self.chunk_size = sha256, length, chunk_size
        self.bitmap_path = self.path.with_name(self.path.name + BITMAP_SUFFIX)
        self.persist_every_s = persist_every_s
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._dirty = False
        self.duplicates = self.ignored = 0
        have = self._load_have()
        self.plan = ChunkPlan(
            length, chunk_size, have=have, window=window, timeout_s=timeout_s, max_retries=max_retries
        )

    def _load_have(self) -> set[int]:
        """Chunks known durable from an earlier run (bitmap written only after the data was fsynced)."""
        try:
            size = self.path.stat().st_size
            data = self.bitmap_path.read_bytes()
        except OSError:
            return set()
        if size != self.length:
            return set()
        count = -(-self.length // self.chunk_size)
        return ChunkPlan.have_from_bytes(data, count)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self.length:
                os.ftruncate(fd, self.length)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _on_chunk(self, message: Any) -> None:
        try:
            sha, size, index = parse_chunk_topic(message.topic)
        except ProtocolError:
            return
        if sha != self.sha256 or size != self.chunk_size:
            return
        payload = message.payload
        with self._cond:
            verdict = self.plan.accept(index, len(payload))
            if verdict is Accept.DUPLICATE:
                self.duplicates += 1
                return
            if verdict is not Accept.WRITE:
                self.ignored += 1
                log.warning("chunk ignored", index=index, size=len(payload), verdict=verdict.name)
                return
            if self._fd is None:
                return
            os.pwrite(self._fd, payload, self.plan.offset(index))
            self.plan.mark_written(index)
            self._dirty = True
            self._cond.notify_all()

    def _persist(self) -> None:
        """fsync the data, then record which chunks it holds (atomic replace)."""
        with self._cond:
            if not self._dirty or self._fd is None:
                return
            os.fsync(self._fd)
            bitmap = self.plan.have_to_bytes()
            self._dirty = False
        tmp = self.bitmap_path.with_name(self.bitmap_path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(bitmap)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.bitmap_path)

    def run(self, stop: threading.Event, progress: Callable[[int], None] | None = None) -> Path:
        """Fetch every missing chunk; returns the file (length right, hash NOT yet checked). Raises TransferError."""
        try:
            self._open()
        except OSError as exc:
            raise TransferError(
                f"cannot write the download {self.path}: {exc.strerror}", "check the state directory"
            ) from None
        topic = chunk_topic(self.sha256, self.chunk_size)
        self.link.subscribe(topic, self._on_chunk)
        last_persist = last_progress = time.monotonic()
        connected = True
        try:
            while True:
                now = time.monotonic()
                with self._cond:
                    if self.plan.done:
                        break
                    if stop.is_set():
                        raise TransferError("download interrupted", "it resumes when the agent runs again")
                    if not self.link.connected:
                        if connected:
                            self.plan.pause()
                            connected = False
                        wanted: list[int] = []
                    else:
                        if not connected:
                            self.plan.resume()
                            connected = True
                        reason = self.plan.failed_reason(now)
                        if reason:
                            raise TransferError(reason, "check that the fleet server is running and serves this target")
                        wanted = self.plan.requests(now)
                if wanted:
                    request = ChunkRequest(target=self.sha256, chunk_size=self.chunk_size, chunks=wanted)
                    self.link.publish_now(chunk_request_topic(self.topics), encode(request), qos=1)
                if now - last_persist >= self.persist_every_s:
                    self._persist()
                    last_persist = now
                if progress is not None and now - last_progress >= 1.0:
                    progress(self.plan.progress)
                    last_progress = now
                with self._cond:
                    if not self.plan.done:
                        self._cond.wait(0.05)
            self._persist()
        finally:
            self.link.unsubscribe(topic)
            with self._cond:
                fd, self._fd = self._fd, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)
        return self.path

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.bitmap_path.unlink(missing_ok=True)
