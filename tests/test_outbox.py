"""The SQLite outbox on real files: order, persistence (kill -9 included), limits, disk full, corruption, threads."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog

from agent.mqtt.outbox import Outbox, OutboxError, OutboxMessage, is_corrupt, is_disk_full
from agent.mqtt.outbox_policy import CRITICAL, DROP_REASONS, OutboxLimits

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ids(ob: Outbox, **kw: int) -> list[int]:
    return [m.id for m in ob.pending(limit=10**9, **kw)]


def dropped(ob: Outbox) -> dict[str, int]:
    return {k: v for k, v in ob.stats()["dropped"].items() if v}


# --------------------------------------------------------------------------------------------- basics


def test_append_pending_ack_in_order(tmp_path: Path) -> None:
    clock = Clock()
    with Outbox(tmp_path / "o.sqlite", clock=clock) as ob:
        got = []
        for i in range(5):
            clock.t += 1
            got.append(
                ob.append(
                    f"edge/d/{i}", f"p{i}".encode(), qos=1, retain=i == 2, priority=CRITICAL if i == 3 else "bulk"
                )
            )
        assert got == [1, 2, 3, 4, 5]
        msgs = ob.pending()
        assert msgs[2] == OutboxMessage(3, "edge/d/2", b"p2", 1, True, "bulk", 1_000_003.0)
        assert msgs[3].priority == CRITICAL and msgs[0].retain is False
        assert ids(ob) == [1, 2, 3, 4, 5]
        assert ids(ob, after_id=2) == [3, 4, 5]
        assert [m.id for m in ob.pending(after_id=1, limit=2)] == [2, 3]
        ob.ack(2)
        ob.ack(2)  # idempotent
        ob.ack(99)  # unknown: ignored
        ob.ack_many([4, 1, 4])
        ob.ack_many([])
        assert ids(ob) == [3, 5]
        clock.t += 10
        s = ob.stats()
        assert (s["rows"], s["bytes"], s["appended"], s["acked"]) == (2, 4, 5, 3)
        assert s["oldest_age_s"] == pytest.approx(12.0)
        assert s["dropped"] == dict.fromkeys(DROP_REASONS, 0)
        ob.append("t", "text payload")  # str is stored as UTF-8
        assert ob.pending(after_id=5)[0].payload == b"text payload"
        ob.append("t", memoryview(b"mv"))
        assert ob.pending(after_id=6)[0].payload == b"mv"


def test_empty_outbox_stats(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        assert ob.stats()["oldest_age_s"] is None and ob.stats()["rows"] == 0 and ob.pending() == []


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"topic": ""}, ValueError),
        ({"qos": 3}, ValueError),
        ({"priority": "urgent"}, ValueError),
        ({"payload": 42}, TypeError),
    ],
)
def test_append_rejects_invalid_arguments(tmp_path: Path, kwargs: dict, exc: type[Exception]) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        with pytest.raises(exc):
            ob.append(**({"topic": "t", "payload": b"x"} | kwargs))
        assert ob.stats()["rows"] == 0


def test_schema_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "o.sqlite"  # parent directories are created
    with Outbox(path) as ob:
        assert ob._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        ob.append("t", b"x")
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
        cols = [r[1] for r in raw.execute("PRAGMA table_info(messages)")]
        assert cols == ["id", "topic", "payload", "qos", "retain", "priority", "created_at", "size"]
        raw.close()
    with Outbox(path, synchronous="full") as ob:
        assert ob._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(ValueError):
        Outbox(path, synchronous="sometimes")


def test_persists_across_reopen_and_never_reuses_ids(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        for i in range(3):
            ob.append("t", bytes([i]) * 10)
        ob.ack(3)  # the newest: without AUTOINCREMENT its id would be handed out again
    with Outbox(path) as ob:
        assert ids(ob) == [1, 2] and ob.stats()["rows"] == 2 and ob.stats()["bytes"] == 20
        assert ob.append("t", b"new") == 4
        ob.ack(3)  # a late PUBACK for the old message 3 must not touch message 4
        assert ids(ob) == [1, 2, 4]
    assert ob.append("t", b"after close") is None and ob.pending() == []
    ob.ack(1)  # after close: nothing happens
    ob.close()  # twice is fine


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="cannot open the MQTT outbox"):
        Outbox(tmp_path)  # a directory
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutboxError, match="cannot create the outbox directory"):
        Outbox(tmp_path / "file" / "o.sqlite")


# --------------------------------------------------------------------------------------------- kill -9

PAYLOAD_SRC = """
import hashlib
def payload(i):
    return hashlib.sha256(str(i).encode()).digest() * (1 + i % 150)
"""

CHILD = (
    PAYLOAD_SRC
    + """
import os, signal, sys, threading, time
from agent.mqtt.outbox import Outbox
path, start, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ob = Outbox(path)
def killer():
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=killer, daemon=True).start()
i = start
while True:
    rid = ob.append(f"t/{i}", payload(i), priority="critical" if i % 7 == 0 else "bulk")
    os.write(1, b"%d %d\\n" % (i, rid))
    if i % 10 == 9:
        os.write(1, b"a %d\\n" % (rid - 5))
        ob.ack(rid - 5)
        os.write(1, b"A %d\\n" % (rid - 5))
    i += 1
"""
)


def test_kill_9_mid_stream_loses_nothing_that_was_returned(tmp_path: Path) -> None:
    ns: dict = {}
    exec(PAYLOAD_SRC, ns)
    payload = ns["payload"]
    path = tmp_path / "o.sqlite"
    expected: dict[int, int] = {}  # id -> i, for every append that returned
    acked: set[int] = set()  # acks that returned: must be gone
    maybe_acked: set[int] = set()  # acks killed in flight: either way
    last_id = 0
    for rnd, delay in enumerate((0.05, 0.15, 0.3)):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(rnd * 1_000_000), str(delay)],
            capture_output=True,
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        lines = proc.stdout.decode().splitlines()
        round_ids, started = [], set()
        for line in lines:
            a, b = line.split()
            if a == "a":
                started.add(int(b))
            elif a == "A":
                acked.add(int(b))
            else:
                expected[int(b)] = int(a)
                round_ids.append(int(b))
        maybe_acked |= started - acked
        assert len(round_ids) > 20
        assert round_ids == sorted(set(round_ids)) and round_ids[0] > last_id  # strictly increasing, never reused
        last_id = round_ids[-1]

        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("SELECT count(*) FROM messages WHERE size != length(payload)").fetchone()[0] == 0
        raw.close()
        with Outbox(path) as ob:
            rows = {m.id: m for m in ob.pending(limit=10**9)}
            assert ob.stats()["rows"] == len(rows)
        for rid, i in expected.items():
            if rid in acked:
                assert rid not in rows
            elif rid not in maybe_acked:
                assert rid in rows, f"append {i} returned id {rid} but the row is gone"
        for m in rows.values():  # no torn rows: every payload matches its topic
            assert m.payload == payload(int(m.topic[2:])), m.id
        extra = sorted(set(rows) - set(expected))
        assert len(extra) <= 1  # committed, then killed before the id was printed
        if extra:
            assert extra[0] > last_id and rows[extra[0]].topic == f"t/{expected[last_id] + 1}"
            expected[extra[0]] = expected[last_id] + 1
            last_id = extra[0]


# --------------------------------------------------------------------------------------------- limits


def test_rows_limit_evicts_oldest_bulk_first_and_keeps_critical(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_rows=3)) as ob:
        ob.append("event", b"c1", priority=CRITICAL)  # 1
        ob.append("r", b"b2")  # 2
        ob.append("r", b"b3")  # 3
        assert ids(ob) == [1, 2, 3] and dropped(ob) == {}  # exactly at the limit: nothing evicted
        ob.append("r", b"b4")
        assert ids(ob) == [1, 3, 4]
        ob.append("r", b"b5")
        ob.append("r", b"b6")
        assert ids(ob) == [1, 5, 6]
        ob.append("event", b"c7", priority=CRITICAL)
        ob.append("event", b"c8", priority=CRITICAL)
        assert ids(ob) == [1, 7, 8]  # all bulk gone before any critical
        ob.append("r", b"b9")  # only critical left: the oldest critical goes
        assert ids(ob) == [7, 8, 9]
        assert dropped(ob) == {"evicted_rows": 6}
        assert ob.stats()["rows"] == 3


def test_bytes_limit_evicts_as_many_as_needed(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_bytes=100, max_payload_bytes=100)) as ob:
        ob.append("r", b"a" * 40)
        ob.append("e", b"c" * 10, priority=CRITICAL)
        ob.append("r", b"b" * 40)
        ob.append("r", b"d" * 10)  # 100: exactly full, nothing evicted
        assert ids(ob) == [1, 2, 3, 4] and ob.stats()["bytes"] == 100
        ob.append("r", b"e" * 85)  # needs 85 bytes: bulk 40 + 40 + 10 go, critical 2 stays
        assert ids(ob) == [2, 5] and ob.stats()["bytes"] == 95
        assert dropped(ob) == {"evicted_bytes": 3}
        ob.append("r", b"f" * 100)  # needs 95: bulk 5 (85), then critical 2 (10)
        assert ids(ob) == [6] and ob.stats()["bytes"] == 100
        assert dropped(ob) == {"evicted_bytes": 5}


def test_lowered_limits_after_restart_are_enforced_on_next_append(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        for _ in range(10):
            ob.append("r", b"x")
    with Outbox(path, OutboxLimits(max_rows=3)) as ob:
        assert ob.stats()["rows"] == 10  # not touched until the next append
        ob.append("r", b"y")
        assert ids(ob) == [9, 10, 11] and dropped(ob) == {"evicted_rows": 8}


def test_oversize_is_rejected_and_never_stored(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob, structlog.testing.capture_logs() as logs:
        assert ob.append("r", b"x" * (128 * 1024)) == 1  # exactly AWS IoT Core's cap
        assert ob.append("r", b"x" * (128 * 1024 + 1)) is None
        assert ob.append("r", b"x" * (200 * 1024)) is None
        assert ids(ob) == [1] and dropped(ob) == {"oversize": 2} and ob.stats()["appended"] == 1
    assert [e["log_level"] for e in logs if e["event"] == "outbox_dropped"] == ["warning", "debug"]


def test_age_expiry_with_injected_clock(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_age_s=100), clock=clock) as ob:
        ob.append("r", b"a")  # t=1000
        clock.t = 1050.0
        ob.append("e", b"b", priority=CRITICAL)  # t=1050
        clock.t = 1100.0  # the first is exactly max_age_s old: kept
        assert ids(ob) == [1, 2] and ob.stats()["oldest_age_s"] == 100.0
        clock.t = 1100.5
        assert ids(ob) == [2] and dropped(ob) == {"expired": 1}  # expired on read, never handed out
        clock.t = 1200.0
        assert ob.append("r", b"c") == 3  # expired on append too (critical expires like bulk)
        assert ids(ob) == [3] and dropped(ob) == {"expired": 2}
        assert ob.stats()["rows"] == 1 and ob.stats()["bytes"] == 1
        clock.t = 1000.0  # clock stepped back: a message from the "future" is kept, age reads 0
        assert ids(ob) == [3] and ob.stats()["oldest_age_s"] == 0.0
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_age_s=None), clock=Clock(1e12)) as ob:
        assert ids(ob) == [3]


def test_expiry_frees_room_before_eviction(tmp_path: Path) -> None:
    clock = Clock(0.0)
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_rows=2, max_age_s=10), clock=clock) as ob:
        ob.append("r", b"a")
        clock.t = 5
        ob.append("r", b"b")
        clock.t = 11
        ob.append("r", b"c")  # full, but the first has expired: no eviction needed
        assert ids(ob) == [2, 3] and dropped(ob) == {"expired": 1}


# --------------------------------------------------------------------------------------------- failures


def test_disk_full_drops_the_new_message_and_keeps_the_old(tmp_path: Path) -> None:
    """``max_page_count`` makes SQLite fail with SQLITE_FULL, the very error a full disk gives."""
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_rows=2)) as ob:
        assert ob.append("r", b"small") == 1
        assert ob.append("e", b"c" * 100, priority=CRITICAL) == 2
        pages = ob._conn.execute("PRAGMA page_count").fetchone()[0]
        ob._conn.execute(f"PRAGMA max_page_count = {pages}")  # no room to grow
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):  # needs an eviction of 1, then fails: the eviction is rolled back
                assert ob.append("r", b"x" * 20_000) is None
        assert ids(ob) == [1, 2] and ob.stats()["rows"] == 2 and ob.stats()["bytes"] == 105
        assert dropped(ob) == {"disk_full": 3}  # not counted as evicted: nothing was
        assert [e["event"] for e in logs] == ["outbox_disk_full"]  # one warning per episode
        assert logs[0]["log_level"] == "warning" and "database or disk is full" in logs[0]["error"]
        ob.ack(1)  # acks still work on a full disk
        assert ids(ob) == [2]
        ob._conn.execute("PRAGMA max_page_count = 1073741823")  # space again
        with structlog.testing.capture_logs() as logs:
            assert ob.append("r", b"x" * 20_000) == 3  # the failed appends' ids were rolled back, never handed out
        assert [(e["event"], e.get("dropped")) for e in logs] == [("outbox_disk_full_over", 3)]
        assert ids(ob) == [2, 3] and ob.stats()["appended"] == 3


class FaultyConnection:
    """Wraps the real connection; raises ``error`` for statements starting with ``fail_on``."""

    def __init__(self, conn: sqlite3.Connection, fail_on: str, error: sqlite3.Error) -> None:
        self.conn, self.fail_on, self.error = conn, fail_on, error

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(self.fail_on):
            raise self.error
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_other_io_errors_drop_and_log_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        ob.append("r", b"kept")
        real = ob._conn
        ob._conn = FaultyConnection(real, "INSERT", sqlite3.OperationalError("disk I/O error"))
        with structlog.testing.capture_logs() as logs:
            assert ob.append("r", b"a") is None
            assert ob.append("r", b"b") is None
        assert [(e["event"], e["log_level"]) for e in logs] == [("outbox_io_error", "error")]
        assert dropped(ob) == {"io_error": 2} and ids(ob) == [1]
        ob._conn = real
        assert ob.append("r", b"c") == 2


def test_corruption_at_run_time_moves_the_file_aside_and_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        ob.append("r", b"old")
        ob._conn = FaultyConnection(ob._conn, "INSERT", sqlite3.DatabaseError("database disk image is malformed"))
        with structlog.testing.capture_logs() as logs:
            assert ob.append("r", b"new") == 1  # retried on a fresh file
        assert [e["event"] for e in logs] == ["outbox_moved_aside"]
        assert [m.payload for m in ob.pending()] == [b"new"]
        moved = ob.moved_aside[0]
    old = sqlite3.connect(moved)  # nothing deleted: the old message is in the moved file
    assert old.execute("SELECT payload FROM messages").fetchall() == [(b"old",)]
    old.close()


def test_garbage_file_at_open_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    garbage = b"this is not sqlite" * 500
    path.write_bytes(garbage)
    Path(f"{path}-wal").write_bytes(b"stale wal")
    with structlog.testing.capture_logs() as logs, Outbox(path, clock=Clock(0.0)) as ob:
        assert ob.append("r", b"fresh") == 1 and ids(ob) == [1]
    moved = tmp_path / "o.sqlite.corrupt-19700101T000000Z"
    assert moved.read_bytes() == garbage
    assert Path(f"{moved}-wal").read_bytes() == b"stale wal"  # its WAL goes with it, never onto the new file
    (event,) = [e for e in logs if e["event"] == "outbox_moved_aside"]
    assert event["log_level"] == "error" and event["moved_to"] == str(moved) and event["reason"] == "corrupt"
    # a second corrupt file in the same second gets its own name
    path.write_bytes(garbage)
    with Outbox(path, clock=Clock(0.0)) as ob:
        assert ob.moved_aside == [tmp_path / "o.sqlite.corrupt-19700101T000000Z-1"]


def test_damaged_database_at_open_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        for i in range(200):
            ob.append("r", bytes([i % 256]) * 3000)
    data = bytearray(path.read_bytes())
    assert len(data) > 100 * 4096
    data[20 * 4096 : 40 * 4096] = b"\xa5" * (20 * 4096)  # scribble over table pages, keep the header
    path.write_bytes(bytes(data))
    with structlog.testing.capture_logs() as logs, Outbox(path) as ob:
        assert ob.stats()["rows"] == 0 and ob.append("r", b"fresh") == 1
    assert ob.moved_aside[0].read_bytes() == bytes(data)  # moved unchanged (its -wal/-shm go with it)
    assert {p.name for p in ob.moved_aside[1:]} <= {f"{ob.moved_aside[0].name}-wal", f"{ob.moved_aside[0].name}-shm"}
    assert [e["reason"] for e in logs if e["event"] == "outbox_moved_aside"] == ["corrupt"]


def test_unknown_schema_is_moved_aside_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    other = sqlite3.connect(path)
    other.executescript("CREATE TABLE something (x); INSERT INTO something VALUES (1); PRAGMA user_version = 7;")
    other.close()
    with Outbox(path, clock=Clock(0.0)) as ob:
        assert ob.append("r", b"x") == 1
        assert ob.moved_aside == [tmp_path / "o.sqlite.incompatible-19700101T000000Z"]  # left as it was: no WAL
    moved = sqlite3.connect(ob.moved_aside[0])
    assert moved.execute("SELECT x FROM something").fetchall() == [(1,)]
    assert moved.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    moved.close()


def test_error_classifiers() -> None:
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(sqlite3.OperationalError("disk I/O error"))
    assert is_corrupt(sqlite3.DatabaseError("file is not a database"))
    assert is_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
    assert not is_corrupt(sqlite3.OperationalError("database or disk is full"))


# --------------------------------------------------------------------------------------------- threads


def test_threads_append_while_another_acks(tmp_path: Path) -> None:
    n_threads, per_thread = 4, 150
    with Outbox(tmp_path / "o.sqlite") as ob:
        done = threading.Event()
        returned: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def producer(k: int) -> None:
            try:
                returned[k] = [ob.append(f"t/{k}", f"{k}:{j}".encode()) for j in range(per_thread)]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def acker() -> None:
            while not done.is_set():
                if ob.wait_for_pending(0, 0.05):
                    ob.ack_many(m.id for m in ob.pending(limit=50)[::2])

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
        ack_thread = threading.Thread(target=acker)
        ack_thread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        done.set()
        ack_thread.join(30)
        assert not errors
        all_ids = [i for k in range(n_threads) for i in returned[k]]
        assert None not in all_ids and len(set(all_ids)) == n_threads * per_thread
        for k in range(n_threads):  # each thread's messages are replayed in its own order
            assert returned[k] == sorted(returned[k])
        s = ob.stats()
        assert s["appended"] == n_threads * per_thread and s["acked"] + s["rows"] == s["appended"] and s["acked"] > 0
        left = ob.pending(limit=10**9)
        assert [m.id for m in left] == sorted(m.id for m in left)
        assert all(m.payload == f"{m.topic[2:]}:{returned[int(m.topic[2:])].index(m.id)}".encode() for m in left)


def test_wait_for_pending_wakes_on_append_from_another_thread(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        t0 = time.monotonic()
        assert ob.wait_for_pending(0, timeout=0.05) is False
        assert 0.04 <= time.monotonic() - t0 < 1.0
        result: list[bool] = []
        waiter = threading.Thread(target=lambda: result.append(ob.wait_for_pending(0, timeout=10)))
        waiter.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        ob.append("t", b"x")
        waiter.join(5)
        assert result == [True] and time.monotonic() - t0 < 1.0
        assert ob.wait_for_pending(0, timeout=0) is True  # already there: no wait
        assert ob.wait_for_pending(1, timeout=0) is False  # nothing after id 1
        waiter = threading.Thread(target=lambda: result.append(ob.wait_for_pending(1, timeout=None)))
        waiter.start()
        time.sleep(0.05)
        ob.close()  # closing wakes waiters, who get False
        waiter.join(5)
        assert result == [True, False]
