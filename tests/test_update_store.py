"""The persisted update store: round trips, stale writers, corrupt files, and atomicity under a real ``kill -9``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.update.state import (
    Activate,
    Downloaded,
    HistoryEntry,
    Offer,
    Progress,
    StartDownload,
    StartValidation,
    Target,
    UpdateState,
    ValidationPassed,
    new_update,
    recover,
    transition,
)
from agent.update.store import StaleWrite, UpdateStore

ROOT = Path(__file__).resolve().parents[1]
TARGET = Target("digits", "1.2.0", "cd" * 32, 4096, ())


def offered() -> UpdateState:
    return new_update(Offer("u-1", TARGET, "1.1.0"), 0.0)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_load_without_a_file_is_none(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json")
    assert store.load() is None
    assert store.stored_counter() == 0
    assert store.ran_versions() == frozenset()


def test_round_trip_through_every_step(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "state" / "update.json")  # creates the directory
    state = offered()
    store.save(state)
    assert store.load() == state
    for i, event in enumerate(
        [StartDownload(), Progress(100), Downloaded(True), StartValidation(), ValidationPassed(), Activate()]
    ):
        state = transition(state, event, float(i + 1))
        store.save(state)
        assert store.load() == state
    state = recover(state, 50.0)  # restart in activating
    store.save(state)
    loaded = store.load()
    assert loaded == state
    assert loaded is not None and loaded.needs_slot_check
    assert leftovers(tmp_path / "state") == []
    document = json.loads((tmp_path / "state" / "update.json").read_text())
    assert document["format"] == 1
    assert document["save_counter"] == state.save_counter


def test_stale_save_is_refused(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json")
    first = offered()
    second = transition(first, StartDownload(), 1.0)
    store.save(second)
    with pytest.raises(StaleWrite, match=r"save_counter 1 is not greater than the stored 2"):
        store.save(first)
    with pytest.raises(StaleWrite):
        store.save(second)  # the same counter twice is stale too
    assert store.load() == second
    # another store on the same file (another writer) sees the same counter
    with pytest.raises(StaleWrite):
        UpdateStore(tmp_path / "update.json").save(first)


def test_clear_keeps_the_counter_so_stale_writers_stay_refused(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json")
    state = transition(offered(), StartDownload(), 1.0)
    store.save(state)
    store.clear()
    assert store.load() is None
    assert store.stored_counter() == state.save_counter
    with pytest.raises(StaleWrite):
        store.save(state)
    # a new update continues the counter from the previous one
    nxt = new_update(Offer("u-2", TARGET, "1.1.0"), 2.0, previous=state)
    store.save(nxt)
    assert store.load() == nxt


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\xff\xfe garbage",
        b"[]",
        b'{"format": 99, "save_counter": 1, "state": null}',
        b'{"format": 1, "save_counter": 3, "state": {"update_id": "u"}}',
        b'{"format": 1, "save_counter": 3, "state": {"state": "exploded"}}',
    ],
)
def test_corrupt_file_is_moved_aside_and_load_returns_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "update.json"
    path.write_bytes(content)
    store = UpdateStore(path, clock=lambda: 1234.5)
    assert store.load() is None
    assert not path.exists()
    aside = tmp_path / "update.json.corrupt-1234500"
    assert aside.read_bytes() == content
    # and the store works again afterwards
    store.save(offered())
    assert store.load() == offered()


def test_corrupt_state_with_valid_json_but_torn_invariant(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json", clock=lambda: 7.0)
    state = transition(transition(offered(), StartDownload(), 1.0), Downloaded(True), 2.0)
    store.save(state)
    path = tmp_path / "update.json"
    document = json.loads(path.read_text())
    document["state"]["progress"] = 1  # downloaded with a partial file: refused
    path.write_text(json.dumps(document))
    assert store.load() is None
    assert (tmp_path / "update.json.corrupt-7000").exists()


def test_unreadable_file_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    path.mkdir()  # reading a directory raises IsADirectoryError
    store = UpdateStore(path, clock=lambda: 1.0)
    assert store.load() is None


def test_ran_versions_are_persisted(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json")
    store.record_committed("1.1.0")
    store.record_committed("1.2.0")
    store.record_committed("1.1.0")
    assert UpdateStore(tmp_path / "update.json").ran_versions() == {"1.1.0", "1.2.0"}
    assert (tmp_path / "update.ran-versions.json").exists()
    # a corrupt state file does not lose them, and clear() keeps them
    (tmp_path / "update.json").write_text("torn")
    assert store.load() is None
    store.clear()
    assert store.ran_versions() == {"1.1.0", "1.2.0"}
    with pytest.raises(ValueError):
        store.record_committed("")


def test_corrupt_ran_versions_is_moved_aside(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json", clock=lambda: 2.0)
    (tmp_path / "update.ran-versions.json").write_text('{"format": 1, "versions": [1, 2]}')
    assert store.ran_versions() == frozenset()
    assert (tmp_path / "update.ran-versions.json.corrupt-2000").exists()
    store.record_committed("1.0.0")
    assert store.ran_versions() == {"1.0.0"}


def test_failed_replace_keeps_the_old_state_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = UpdateStore(tmp_path / "update.json")
    old = offered()
    store.save(old)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk yanked")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk yanked"):
        store.save(transition(old, StartDownload(), 1.0))
    monkeypatch.undo()
    assert store.load() == old
    assert leftovers(tmp_path) == []


def test_load_removes_temp_files_left_by_a_killed_writer(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update.json")
    store.save(offered())
    (tmp_path / ".update.json.tmp-123-abcd").write_text('{"torn')
    (tmp_path / ".update.ran-versions.json.tmp-123-abcd").write_text("")
    assert store.load() == offered()
    assert leftovers(tmp_path) == []


# -- kill -9 -----------------------------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, sys
    from dataclasses import replace
    from agent.update.state import HistoryEntry, Target, UpdateState
    from agent.update.store import UpdateStore

    path, acks, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    target = Target("digits", "1.2.0", "cd" * 32, 10_000_000, ())
    store = UpdateStore(path)
    fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    counter = start
    while True:
        state = UpdateState(
            update_id="u-kill",
            target=target,
            from_version="1.1.0",
            state="downloading",
            progress=counter * 7,
            save_counter=counter,
            attempts=(("downloading", 1), ("offered", 1)),
            entered_at=float(counter),
            # a payload of varying size, so that a torn write would show
            history=tuple(HistoryEntry("downloading", float(counter), "x" * (counter % 40)) for _ in range(1 + counter % 40)),
        )
        store.save(state)
        os.write(fd, b"%d\\n" % counter)
        counter += 1
    """
)


def expected_state(counter: int) -> UpdateState:
    return UpdateState(
        update_id="u-kill",
        target=Target("digits", "1.2.0", "cd" * 32, 10_000_000, ()),
        from_version="1.1.0",
        state="downloading",
        progress=counter * 7,
        save_counter=counter,
        attempts=(("downloading", 1), ("offered", 1)),
        entered_at=float(counter),
        history=tuple(
            HistoryEntry("downloading", float(counter), "x" * (counter % 40)) for _ in range(1 + counter % 40)
        ),
    )


def _acked(acks: Path) -> list[int]:
    lines = acks.read_bytes().split(b"\n")
    return [int(line) for line in lines[:-1]]  # the last piece may be a half-written line


@pytest.mark.timeout(120)
def test_kill_9_at_random_instants_never_tears_the_state(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    acks = tmp_path / "acks"
    store = UpdateStore(path)
    rng = random.Random(20261123)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    next_counter = 1
    written_total = 0
    for _ in range(8):
        acks.write_bytes(b"")
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(acks), str(next_counter)], env=env, cwd=ROOT
        )
        try:
            deadline = time.monotonic() + 60
            while not acks.read_bytes():  # wait until it is writing, then kill it at a random instant
                assert child.poll() is None, "writer died on its own"
                assert time.monotonic() < deadline, "writer never started"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        acked = _acked(acks)
        assert acked, "no save completed before the kill"
        written_total += len(acked)
        loaded = store.load()
        assert loaded is not None, "the state file was torn or lost"
        # either the last acknowledged save, or the one after it (renamed but killed before the ack)
        assert loaded.save_counter in (acked[-1], acked[-1] + 1)
        assert loaded == expected_state(loaded.save_counter)
        assert leftovers(tmp_path) == []
        assert not list(tmp_path.glob("*.corrupt-*"))
        next_counter = loaded.save_counter + 1
    assert written_total > 8  # the kills landed in a tight loop of saves, not before it
