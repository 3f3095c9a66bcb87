"""The outbox on a really full file system (a 5 MB tmpfs, filled with a file): acknowledged messages whose delete
fails are never handed out again, are deleted once space returns, and a restart sends none of them twice; the
write-ahead log stays bounded (bytes per stored result printed)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.outbox import JOURNAL_SIZE_LIMIT, WAL_AUTOCHECKPOINT_PAGES, Outbox
from agent.mqtt.outbox_policy import OutboxLimits
from tests.daemon_helpers import start_agent, stop, wait_until
from tests.mosquitto import Broker
from tests.test_mqtt import agent_config, results_of

PAYLOAD = b'{"v":1,"pipeline":"digits","label":"7","score":0.98,"pub_seq":%d,"run_id":"r1","ts":1796310765.1}' + (
    b" " * 150
)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 5 MB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system says it is full (down to the last byte)."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_deletes_that_fail_on_a_full_disk_are_retried_and_nothing_is_sent_twice(small_fs: Path) -> None:
    path = small_fs / "outbox.db"
    limits = OutboxLimits(max_rows=1_000_000, max_bytes=1 << 40)
    with Outbox(path, limits) as ob:
        ids = [ob.append("edge/dev1/results/digits", PAYLOAD % i) for i in range(300)]
    assert all(i is not None for i in ids)
    # restarted: the WAL starts empty, so a delete needs new disk space for its log frames
    ob = Outbox(path, limits)
    try:
        filler = fill(small_fs)
        assert ob.append("edge/dev1/results/digits", PAYLOAD % 999) is None  # full: dropped, counted
        assert ob.stats()["dropped"]["disk_full"] == 1
        delivered = [i for i in ids[:200] if i is not None]
        ob.ack_many(delivered)  # the broker has them: the delete cannot be written
        stats = ob.stats()
        assert stats["delete_backlog"] == len(delivered), stats
        assert stats["rows"] == 300
        # never handed out again while the agent runs, whatever the cursor
        assert [m.id for m in ob.pending(0, limit=1000)] == ids[200:]
        assert [m.id for m in ob.pending(ids[250], limit=1000)] == ids[251:]
        assert ob.wait_for_pending(ids[-1], timeout=0.2) is False  # nothing new: no busy loop on backlog rows
        filler.unlink()  # space returns
        assert wait_until(lambda: ob.stats()["delete_backlog"] == 0, 30)
        assert ob.stats()["rows"] == 100 and ob.stats()["acked"] == len(delivered)
    finally:
        ob.close()
    with Outbox(path, limits) as again:  # after a restart only the undelivered ones are sent
        assert [m.id for m in again.pending(0, limit=1000)] == ids[200:]


def test_a_backlog_still_there_at_close_is_deleted_when_space_came_back_before(small_fs: Path) -> None:
    path = small_fs / "outbox.db"
    with Outbox(path) as ob:
        ids = [ob.append("t", PAYLOAD % i) for i in range(50)]
    ob = Outbox(path)
    filler = fill(small_fs)
    ob.ack_many(ids[:30])
    assert ob.stats()["delete_backlog"] == 30
    filler.unlink()
    ob.close()  # the last try, with room again
    with Outbox(path) as again:
        assert [m.id for m in again.pending(0, limit=100)] == ids[30:]


def test_the_write_ahead_log_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    limits = OutboxLimits(max_rows=1_000_000, max_bytes=1 << 40)
    wal = Path(f"{path}-wal")
    largest = 0
    with Outbox(path, limits) as ob:
        page = ob._conn.execute("PRAGMA page_size").fetchone()[0]
        for i in range(5000):
            ob.append("edge/dev1/results/digits", PAYLOAD % i)
            if i % 50 == 0:
                largest = max(largest, wal.stat().st_size if wal.exists() else 0)
        rows = ob.stats()["rows"]
        on_disk = sum(p.stat().st_size for p in (path, wal, Path(f"{path}-shm")) if p.exists())
        per_result = on_disk / rows
        print(
            f"\n{rows} stored results of {len(PAYLOAD % 0)} bytes: {on_disk} bytes on disk "
            f"({per_result:.0f} bytes per stored result), largest WAL seen {largest} bytes"
        )
        bound = max(JOURNAL_SIZE_LIMIT, (WAL_AUTOCHECKPOINT_PAGES + 16) * (page + 24))
        assert largest <= bound
        assert per_result < 2 * len(PAYLOAD % 0) + 200


def test_agent_on_a_full_disk_sends_nothing_twice_after_a_restart(
    small_fs: Path, tmp_path: Path, broker: Broker, mqtt_client: Any
) -> None:
    """A real agent, its outbox on the 5 MB tmpfs: broker down (results pile up), disk filled, broker up (the
    stored results are delivered while the disk is full), space freed, agent restarted: nothing of the first run
    arrives again after the restart."""
    outbox = small_fs / "outbox.sqlite"
    config = agent_config(tmp_path, broker.url, rate=20.0, mqtt_extra=f'[mqtt.outbox]\npath = "{outbox}"\n')
    sub = mqtt_client(broker, "edge/dev1/#", client_id="consumer", clean_start=False, session_expiry=600)
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    filler: Path | None = None
    try:
        sub.wait_for("edge/dev1/results/digits", count=20, timeout=60)
        broker.wait_for_save()
        broker.stop()  # broker down: results wait in the outbox
        assert wait_until(lambda: outbox.stat().st_size > 0, 10)
        time.sleep(3.0)  # about 60 results stored
        filler = fill(small_fs)  # disk full: new results are dropped, the stored ones stay
        time.sleep(1.0)
        broker.restart()
        sub.wait_connected(timeout=20, connects=2)

        def events(name: str) -> list[dict[str, Any]]:
            lines = (tmp_path / "stderr.txt").read_text().splitlines()
            return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == name]

        # really full (telemetry goes through the outbox too, so the agent's log tells): new results are dropped,
        # the stored ones are delivered and their deletes deferred
        assert wait_until(lambda: events("outbox_disk_full") and events("outbox_delete_deferred"), 30)
        filler.unlink()  # space returns
        filler = None
        assert wait_until(lambda: events("outbox_delete_backlog_over"), 30)
        deleted = events("outbox_delete_backlog_over")[0]["deleted"]
        assert wait_until(lambda: events("outbox_disk_full_over"), 30)  # appends work again
        dropped = events("outbox_disk_full_over")[0]["dropped"]
        print(f"\nwhile full: {dropped} results dropped, {deleted} deletes deferred then done")
        assert deleted > 0
        assert stop(proc) == 0
        first = results_of(sub.messages())
        runs = {r["run_id"] for r in first}
        assert len(runs) == 1
        restart_at = len(sub.messages())
        proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
        assert wait_until(lambda: len({r["run_id"] for r in results_of(sub.messages())}) == 2, 60)
        time.sleep(2.0)
    finally:
        if filler is not None:
            filler.unlink()
        assert stop(proc) == 0
    after = results_of(sub.messages()[restart_at:])
    resent = [r for r in after if r["run_id"] in runs]
    assert resent == [], f"{len(resent)} results of the first run sent again after the restart"
    seen = [(r["run_id"], r["pub_seq"]) for r in results_of(sub.messages())]
    print(f"results received: {len(seen)}, duplicates overall: {len(seen) - len(set(seen))}")
