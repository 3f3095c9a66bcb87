"""Handoff: the lossless producer -> consumer queue that wakes its consumer only when it sleeps idle."""

from __future__ import annotations

import threading

import pytest

from agent.handoff import Handoff
from tests.daemon_helpers import wait_until


def test_items_arrive_in_order_in_batches_none_lost() -> None:
    q: Handoff[int] = Handoff(maxsize=1000)
    got: list[int] = []
    batches: list[int] = []

    def consume() -> None:
        while (batch := q.take_all()) is not None:
            batches.append(len(batch))
            got.extend(batch)

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=lambda k=k: [q.put(k * 10_000 + i) for i in range(2000)]) for k in range(3)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    q.close()
    consumer.join(10)
    assert not consumer.is_alive()
    assert sorted(got) == sorted(k * 10_000 + i for k in range(3) for i in range(2000))
    for k in range(3):  # each producer's items in its order
        mine = [v for v in got if v // 10_000 == k]
        assert mine == sorted(mine)
    assert sum(batches) == 6000


def test_an_idle_consumer_is_woken_by_the_next_item() -> None:
    q: Handoff[str] = Handoff(maxsize=10, nap=0.001)
    got: list[str] = []
    consumer = threading.Thread(target=lambda: [got.extend(b) for b in iter(q.take_all, None)])
    consumer.start()
    assert wait_until(lambda: q._idle, timeout=5)  # nothing to do: asleep until woken
    q.put("late")
    assert wait_until(lambda: got == ["late"], timeout=5)
    q.close()
    consumer.join(5)
    assert not consumer.is_alive()


def test_a_full_queue_holds_the_producer_back_and_times_out() -> None:
    q: Handoff[int] = Handoff(maxsize=2)
    assert q.put(1) and q.put(2)
    assert q.put(3, timeout=0.2) is False  # nobody consumes: the item is refused, not dropped silently
    done = threading.Event()
    threading.Thread(target=lambda: (q.put(3), done.set())).start()
    assert not done.wait(0.3)
    assert q.take_all() == [1, 2]
    assert done.wait(5)
    assert q.take_all() == [3]


def test_close_drains_then_ends_and_refuses_new_items() -> None:
    q: Handoff[int] = Handoff(maxsize=5)
    q.put(1)
    q.put(2)
    q.close()
    assert q.closed and q.put(3) is False
    assert q.take_all() == [1, 2]
    assert q.take_all() is None


def test_close_releases_a_producer_waiting_for_room() -> None:
    q: Handoff[int] = Handoff(maxsize=1)
    q.put(1)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(q.put(2)))
    t.start()
    assert not wait_until(lambda: bool(result), timeout=0.3)
    q.close()
    t.join(5)
    assert result == [False]


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Handoff(0)
