"""A lossless FIFO from producer threads to one consumer thread that wakes the consumer sparingly.

Waking a sleeping thread costs the producer a futex call and both of them a GIL hand-off
(tens of microseconds on a small board or a VM): per item, that is a sizeable share of a
fast model's inference. Here a ``put`` wakes the consumer only when it sleeps idle; while
items keep coming the consumer looks again every ``nap`` seconds and takes all that
gathered. At low rates every item still wakes it at once.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """Never drops an item: a full queue makes ``put`` wait (up to its timeout)."""

    def __init__(self, maxsize: int, nap: float = 0.002) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize, self.nap = maxsize, nap
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._idle = False  # the consumer sleeps until woken: the next put wakes it
        self._waiting_for_room = 0
        self._closed = False

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Append ``item``; False when the queue stayed full for ``timeout`` seconds (None: wait as long as it
        takes) or is closed."""
        with self._cond:
            if self._closed:
                return False
            if len(self._items) >= self.maxsize and not self._wait_for_room(timeout):
                return False
            self._items.append(item)
            if self._idle:
                self._cond.notify_all()
            return True

    def _wait_for_room(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiting_for_room += 1
        try:
            while len(self._items) >= self.maxsize and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.notify_all()  # the consumer may be napping: it has work
                self._cond.wait(remaining if remaining is not None else 0.5)
            return not self._closed
        finally:
            self._waiting_for_room -= 1

    def take_all(self) -> list[T] | None:
        """Everything queued, waiting for at least one item; None once closed and drained."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(self.nap)  # items arriving meanwhile gather without waking us
                if not self._items and not self._closed:
                    self._idle = True
                    while not self._items and not self._closed:
                        self._cond.wait()
                    self._idle = False
            if not self._items:
                return None
            batch = list(self._items)
            self._items.clear()
            if self._waiting_for_room:
                self._cond.notify_all()
            return batch

    def close(self) -> None:
        """No more items: the consumer drains what is queued, then gets None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)
