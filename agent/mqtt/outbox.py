"""Store-and-forward outbox: every result and event is on disk before it is published, until PUBACK.

Use: a pipeline thread calls ``append`` (the message is durable when it returns an id); a publisher
thread loops ``wait_for_pending(cursor)`` / ``pending(cursor)``, publishes each message at QoS 1
with a small in-flight window and advances ``cursor`` to the last id handed to paho; paho's network
thread calls ``ack(id)`` on PUBACK. After a reconnect the publisher resets ``cursor`` to 0 so every
unacknowledged message is sent again, oldest first; after an agent restart the same happens by
construction. Delivery is at least once: a message published but not acknowledged before a
disconnect or a crash is sent again, so consumers may see duplicates (the payload carries its own
sequence number / timestamp for that).

What is dropped when the outbox is full, too old or the disk is full is decided by the pure
``agent.mqtt.outbox_policy`` (its docstring is the documented drop policy); this module only does
what it decides. Drop counters are kept in memory and restart at zero; messages persist.

A full disk: appends fail and are dropped (counted). Deletes of acknowledged messages need room in the write-ahead
log too; when one fails, the WAL is checkpointed (RESTART, so the next write reuses the space the WAL file already
has) and the delete tried again; if it still fails, the ids wait in memory (the delete backlog): they are never
handed out again by ``pending`` (so not sent twice while the agent runs), the delete is retried at most once a
second and at ``close``, so once space returns they go and a restart sends nothing twice. Only a crash while the
disk is still full can leave them to be sent once more (at least once). The WAL is checkpointed every
``WAL_AUTOCHECKPOINT_PAGES`` pages and truncated to ``JOURNAL_SIZE_LIMIT`` after, so its size stays bounded
whatever the traffic.

Storage: one SQLite file, one connection shared by all threads under a lock. Ids come from
``AUTOINCREMENT`` and are never reused, so a late PUBACK for an evicted message cannot delete a
newer message that would otherwise have been given the same id. The file is assumed to be used
by one process at a time (the agent).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.errors import AgentError
from agent.mqtt.outbox_policy import (
    BULK,
    CRITICAL,
    DISK_FULL,
    DROP_REASONS,
    EXPIRED,
    IO_ERROR,
    Candidate,
    OutboxLimits,
    OutboxState,
    admit,
    check_priority,
    expiry_cutoff,
    plan_evictions,
)

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1  # PRAGMA user_version
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26

_SCHEMA = f"""
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    priority TEXT NOT NULL,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX messages_priority ON messages (priority, id);
CREATE INDEX messages_created_at ON messages (created_at);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_CANDIDATE_PAGE = 1024
WAL_AUTOCHECKPOINT_PAGES = 128  # about 512 KiB of WAL at 4 KiB pages (an append writes about 4 pages)
JOURNAL_SIZE_LIMIT = 512 * 1024  # WAL bytes kept after a checkpoint: room deletes reuse on a full disk
_BACKLOG_RETRY_S = 1.0
_FULL = "full"  # episode key: appends are evicting older messages
_BACKLOG = "delete_backlog"  # episode key: acknowledged messages could not be deleted


class OutboxError(AgentError):
    """The outbox file cannot be opened or created at all (permissions, missing volume, ...)."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: str
    created_at: float


def _close_quietly(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.close()


def is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the disk is full, or the database hit ``max_page_count`` (same error, same path)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    return (code is not None and code & 0xFF == _SQLITE_FULL) or "database or disk is full" in str(exc)


def is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB: the file is not a (sound) SQLite database."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(exc)
    return "file is not a database" in text or "malformed" in text


class _Unusable(Exception):
    """The file opened but cannot be used as our outbox (corrupt or unknown schema)."""

    def __init__(self, tag: str, detail: str) -> None:
        super().__init__(detail)
        self.tag = tag
        self.detail = detail


class Outbox:
    """On-disk FIFO of MQTT messages awaiting PUBACK; safe to use from several threads."""

    def __init__(
        self,
        path: str | Path,
        limits: OutboxLimits | None = None,
        clock: Callable[[], float] = time.time,
        synchronous: str = "NORMAL",
        check_integrity: bool = True,
    ) -> None:
        """Open (or create) the outbox at ``path``.

        ``synchronous``: with WAL, ``NORMAL`` makes every committed message survive the agent
        being killed (``kill -9``, OOM killer, crash): the commit is in the WAL file in the OS page
        cache before ``append`` returns. It does not fsync per message, so the last messages before
        a power cut or kernel panic may be lost (never the database itself). ``FULL`` fsyncs the
        WAL on every commit and survives power loss too, at the cost of one fsync per message (slow
        on SD cards). ``check_integrity`` runs ``PRAGMA quick_check`` at open (reads the whole file).
        A corrupt file, or one with an unknown schema, is moved aside (never deleted) and the outbox
        starts empty. Raises ``OutboxError`` only when the file cannot be opened or created at all.
        """
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self.limits = limits if limits is not None else OutboxLimits()
        self._clock = clock
        self._synchronous = synchronous
        self._check_integrity = check_integrity
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._rows = 0
        self._bytes = 0
        self._appended = 0
        self._acked = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._episode: dict[str, int] = {}  # "full" / DISK_FULL / IO_ERROR -> drops since its warning was logged
        self._oversize_logged = False
        self._backlog: set[int] = set()  # acknowledged ids whose delete failed: never handed out again
        self._backlog_tried = 0.0
        self.moved_aside: list[Path] = []  # files this instance moved out of the way
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox directory {self.path.parent}: {exc.strerror or exc}",
                "point mqtt.outbox.path at a writable directory",
            ) from exc
        self._conn = self._open()

    # ----------------------------------------------------------------------------------- open

    def _connect(self) -> sqlite3.Connection:
        """Open and check the file. A corrupt or foreign file is moved aside and a fresh one opened.

        The move happens while SQLite still holds the old file open: closing it first would let
        SQLite checkpoint its WAL into it or delete that WAL, and the evidence would change.
        """
        conn = self._raw_connect()
        try:
            self._prepare(conn)
            return conn
        except _Unusable as exc:
            tag, detail = exc.tag, exc.detail
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                _close_quietly(conn)
                raise
            tag, detail = "corrupt", str(exc)
        try:
            self._move_aside(tag, detail)
        finally:
            _close_quietly(conn)
        conn = self._raw_connect()
        try:
            self._prepare(conn)
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _raw_connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        # Read-only checks first: a file that is not ours must be moved aside unchanged.
        if self._check_integrity:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise _Unusable("corrupt", "; ".join(map(str, problems)))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        fresh = version == 0 and not tables
        if not fresh and (version != SCHEMA_VERSION or "messages" not in tables):
            raise _Unusable("incompatible", f"schema version {version}, tables {sorted(tables)}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("outbox_not_wal", path=str(self.path), journal_mode=mode)
        # WAL + NORMAL: a commit survives the process being killed, not necessarily power loss.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")  # truncate the WAL after checkpoints
        if fresh:
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        rows, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        self._rows, self._bytes = int(rows), int(size)

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except (OSError, sqlite3.Error, _Unusable) as exc:
            raise self._open_error(exc) from exc

    def _open_error(self, exc: BaseException) -> OutboxError:
        fix = "free disk space" if is_disk_full(exc) else "check that the outbox path is a writable file"
        return OutboxError(f"cannot open the MQTT outbox {self.path}: {exc}", fix)

    def _move_aside(self, tag: str, detail: str) -> None:
        """Rename the database (and its -wal/-shm) to ``<name>.<tag>-<UTC time>``; never delete it."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        base = self.path.with_name(f"{self.path.name}.{tag}-{stamp}")
        n = 1
        while any(Path(f"{base}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            base = self.path.with_name(f"{self.path.name}.{tag}-{stamp}-{n}")
            n += 1
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                dst = Path(f"{base}{suffix}")
                src.rename(dst)
                moved.append(dst)
        self.moved_aside.extend(moved)
        log.error(
            "outbox_moved_aside",
            reason=tag,
            detail=detail,
            path=str(self.path),
            moved_to=str(base),
            files=[str(p) for p in moved],
            note="the outbox starts empty; the old messages are kept in the moved file",
        )

    def _recover_corrupt(self, exc: BaseException) -> bool:
        """At run time: the file went bad under us. Move it aside and start empty (lock held)."""
        try:
            self._move_aside("corrupt", str(exc))
        except OSError as err:  # keep using the file: errors are counted, nothing is deleted
            log.error("outbox_recovery_failed", path=str(self.path), error=str(err))
            return False
        _close_quietly(self._conn)
        try:
            self._conn = self._connect()
        except (OSError, sqlite3.Error, _Unusable) as err:
            log.error("outbox_recovery_failed", path=str(self.path), error=str(err))
            self._conn = sqlite3.connect(":memory:", check_same_thread=False)  # later calls fail softly, counted
            return False
        return True

    # ----------------------------------------------------------------------------------- write

    def append(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str,
        qos: int = 1,
        retain: bool = False,
        priority: str = BULK,
    ) -> int | None:
        """Store a message; returns its id once it is durable, or None when it was dropped (counted).

        Never raises for storage problems (full disk, I/O errors, corruption): those drop the new
        message, count it and log. Raises ``ValueError``/``TypeError`` only for invalid arguments.
        """
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty string")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        check_priority(priority)
        if not isinstance(payload, (bytes, bytearray, memoryview, str)):
            raise TypeError(f"payload must be bytes or str, got {type(payload).__name__}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        with self._cond:
            if self._closed:
                log.warning("outbox_append_after_close", path=str(self.path), topic=topic)
                return None
            now = self._clock()
            for attempt in (1, 2):
                try:
                    row_id = self._append_locked(topic, data, qos, retain, priority, now)
                    break
                except sqlite3.Error as exc:
                    self._rollback()
                    if attempt == 1 and is_corrupt(exc) and self._recover_corrupt(exc):
                        continue  # retry once on the fresh file
                    self._drop_for_error(exc, topic=topic, size=len(data))
                    return None
            if row_id is None:
                return None
            self._episode_over(DISK_FULL)
            self._episode_over(IO_ERROR)
            self._retry_backlog_locked()  # there was room for this one: maybe for the deletes too
            self._cond.notify_all()
            return row_id

    def _append_locked(self, topic: str, data: bytes, qos: int, retain: bool, priority: str, now: float) -> int | None:
        size = len(data)
        adm = admit(self._state(), size, now, self.limits, priority)
        if not adm.accept:
            assert adm.reason is not None
            self._dropped[adm.reason] += 1
            first = not self._oversize_logged
            self._oversize_logged = True
            (log.warning if first else log.debug)(
                "outbox_dropped", reason=adm.reason, topic=topic, size=size, limit=self.limits.max_payload_bytes
            )
            return None
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        rows, nbytes = self._rows, self._bytes
        expired = 0
        if adm.expire_before is not None:
            sizes = [
                r[0]
                for r in conn.execute("DELETE FROM messages WHERE created_at < ? RETURNING size", (adm.expire_before,))
            ]
            expired = len(sizes)
            rows, nbytes = rows - expired, nbytes - sum(sizes)
            adm = admit(OutboxState(rows, nbytes, self._oldest()), size, now, self.limits, priority)
        eviction = None
        if adm.evict_rows or adm.evict_bytes:
            eviction = plan_evictions(
                self._candidates(BULK), self._candidates(CRITICAL), adm.evict_rows, adm.evict_bytes
            )
            conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in eviction.ids])
            rows, nbytes = rows - len(eviction.ids), nbytes - eviction.freed_bytes
            if not eviction.enough:  # only if our counts disagree with the file; store it anyway
                log.error("outbox_eviction_short", evict_rows=adm.evict_rows, evict_bytes=adm.evict_bytes)
        cur = conn.execute(
            "INSERT INTO messages (topic, payload, qos, retain, priority, created_at, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (topic, data, qos, int(bool(retain)), priority, now, size),
        )
        conn.execute("COMMIT")
        # Committed: only now does the in-memory view change.
        self._rows, self._bytes = rows + 1, nbytes + size
        self._appended += 1
        if expired:
            self._dropped[EXPIRED] += expired
            log.debug("outbox_expired", count=expired, max_age_s=self.limits.max_age_s)
        if eviction is None:
            self._episode_over(_FULL)
        else:
            for reason, n in eviction.counts.items():
                self._dropped[reason] += n
            if _FULL not in self._episode:
                log.warning(
                    "outbox_full", path=str(self.path), rows=rows + 1, bytes=nbytes + size, note="evicting oldest"
                )
            self._episode[_FULL] = self._episode.get(_FULL, 0) + len(eviction.ids)
            if eviction.critical:
                log.warning("outbox_evicted_critical", count=eviction.critical)
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def _candidates(self, priority: str) -> Iterator[Candidate]:
        """Stored messages of ``priority``, oldest first, read in growing pages (no cursor left open)."""
        after, page_size = 0, 8
        while True:
            page = self._conn.execute(
                "SELECT id, size FROM messages WHERE priority = ? AND id > ? ORDER BY id LIMIT ?",
                (priority, after, page_size),
            ).fetchall()
            for row_id, size in page:
                yield Candidate(row_id, size)
            if len(page) < page_size:
                return
            after, page_size = page[-1][0], min(page_size * 4, _CANDIDATE_PAGE)

    def ack(self, message_id: int) -> None:
        """The broker acknowledged ``message_id``: delete it. Unknown or already deleted ids are ignored."""
        self.ack_many((message_id,))

    def ack_many(self, ids: Iterable[int]) -> None:
        """Delete several acknowledged messages in one transaction (idempotent). When the delete fails (full disk),
        the ids join the delete backlog: never handed out again, deleted as soon as the disk lets it."""
        ids = {int(i) for i in ids}
        if not ids:
            return
        with self._cond:
            if self._closed:
                return
            self._delete_locked(ids | self._backlog)

    def _delete_locked(self, ids: set[int]) -> bool:
        """Delete ``ids``; on a full disk checkpoint the WAL and try once more; failing that, keep them in the
        backlog (lock held)."""
        self._backlog_tried = time.monotonic()
        for attempt in (1, 2):
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                sizes = []
                for message_id in sorted(ids):
                    sizes += [
                        r[0]
                        for r in self._conn.execute("DELETE FROM messages WHERE id = ? RETURNING size", (message_id,))
                    ]
                self._conn.execute("COMMIT")
                break
            except sqlite3.Error as exc:
                self._rollback()
                if is_corrupt(exc):
                    log.warning("outbox_ack_failed", error=str(exc), ids=len(ids))
                    self._recover_corrupt(exc)
                    self._backlog.clear()  # the ids belonged to the file moved aside
                    return False
                if attempt == 1 and is_disk_full(exc) and self._checkpoint_restart():
                    continue
                new = ids - self._backlog
                self._backlog |= ids
                if _BACKLOG not in self._episode:  # one line per episode
                    self._episode[_BACKLOG] = 0
                    log.warning(
                        "outbox_delete_deferred",
                        path=str(self.path),
                        error=str(exc),
                        note="acknowledged messages are kept out of sending and deleted once the disk allows",
                    )
                self._episode[_BACKLOG] += len(new)
                return False
        self._rows -= len(sizes)
        self._bytes -= sum(sizes)
        self._acked += len(sizes)
        self._backlog -= ids
        if not self._backlog and _BACKLOG in self._episode:
            log.info("outbox_delete_backlog_over", path=str(self.path), deleted=self._episode.pop(_BACKLOG))
        return True

    def _checkpoint_restart(self) -> bool:
        """Copy the WAL into the database and make the next write start the WAL over (reusing its file's space)."""
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
        except sqlite3.Error:
            return False
        return busy == 0

    def _retry_backlog_locked(self, force: bool = False) -> None:
        if self._backlog and (force or time.monotonic() - self._backlog_tried >= _BACKLOG_RETRY_S):
            self._delete_locked(set(self._backlog))

    # ----------------------------------------------------------------------------------- read

    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Up to ``limit`` stored messages with id > ``after_id``, oldest first (expired ones removed first)."""
        with self._cond:
            if self._closed:
                return []
            self._expire_locked(self._clock())
            self._retry_backlog_locked()
            try:
                rows = self._conn.execute(
                    "SELECT id, topic, payload, qos, retain, priority, created_at FROM messages"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (int(after_id), int(limit) + len(self._backlog)),
                ).fetchall()
            except sqlite3.Error as exc:
                log.error("outbox_read_failed", error=str(exc))
                if is_corrupt(exc):
                    self._recover_corrupt(exc)
                return []
            rows = [r for r in rows if r[0] not in self._backlog][: int(limit)]  # acknowledged: never again
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def wait_for_pending(self, after_id: int = 0, timeout: float | None = None) -> bool:
        """Block until a message with id > ``after_id`` is stored (True), or ``timeout`` passes / close (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                self._retry_backlog_locked()
                try:
                    ids = self._conn.execute(
                        "SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                        (int(after_id), len(self._backlog) + 1),
                    ).fetchall()
                    if any(r[0] not in self._backlog for r in ids):
                        return True
                except sqlite3.Error as exc:
                    log.error("outbox_read_failed", error=str(exc))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return False

    def stats(self) -> dict[str, Any]:
        """Rows, payload bytes and oldest age now; appended/acked/dropped counts since this process opened it."""
        with self._cond:
            now = self._clock()
            oldest = None
            if not self._closed:
                self._expire_locked(now)
                self._retry_backlog_locked()
                with contextlib.suppress(sqlite3.Error):
                    oldest = self._oldest()
            return {
                "rows": self._rows,
                "bytes": self._bytes,
                "oldest_age_s": None if oldest is None else max(0.0, now - oldest),
                "appended": self._appended,
                "acked": self._acked,
                "dropped": dict(self._dropped),
                "delete_backlog": len(self._backlog),  # acknowledged, not yet deleted (full disk)
            }

    def close(self) -> None:
        """Close the database (checkpointing the WAL); waiters wake up and later calls do nothing."""
        with self._cond:
            if self._closed:
                return
            self._retry_backlog_locked(force=True)
            if self._backlog:
                log.warning("outbox_closed_with_delete_backlog", count=len(self._backlog), note="sent again at start")
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._cond.notify_all()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- helpers (lock held)

    def _state(self) -> OutboxState:
        return OutboxState(self._rows, self._bytes, self._oldest())

    def _oldest(self) -> float | None:
        return self._conn.execute("SELECT min(created_at) FROM messages").fetchone()[0]

    def _expire_locked(self, now: float) -> None:
        cutoff = expiry_cutoff(now, self.limits)
        if cutoff is None:
            return
        try:
            oldest = self._oldest()
            if oldest is None or oldest >= cutoff:
                return
            self._conn.execute("BEGIN IMMEDIATE")
            sizes = [
                r[0] for r in self._conn.execute("DELETE FROM messages WHERE created_at < ? RETURNING size", (cutoff,))
            ]
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.warning("outbox_expiry_failed", error=str(exc))  # retried on the next call
            return
        self._rows -= len(sizes)
        self._bytes -= sum(sizes)
        self._dropped[EXPIRED] += len(sizes)
        log.debug("outbox_expired", count=len(sizes), max_age_s=self.limits.max_age_s)

    def _rollback(self) -> None:
        """Undo a failed transaction and re-read the counts from the file (they are the truth)."""
        with contextlib.suppress(sqlite3.Error):
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            rows, size = self._conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
            self._rows, self._bytes = int(rows), int(size)

    def _drop_for_error(self, exc: sqlite3.Error, **fields: Any) -> None:
        reason = DISK_FULL if is_disk_full(exc) else IO_ERROR
        self._dropped[reason] += 1
        if reason not in self._episode:  # one log line per episode, not one per message
            self._episode[reason] = 0
            if reason == DISK_FULL:
                log.warning("outbox_disk_full", path=str(self.path), error=str(exc), **fields)
            else:
                log.error("outbox_io_error", path=str(self.path), error=str(exc), **fields)
        self._episode[reason] += 1

    def _episode_over(self, reason: str) -> None:
        if reason in self._episode:
            log.info(f"outbox_{reason}_over", path=str(self.path), dropped=self._episode.pop(reason))
