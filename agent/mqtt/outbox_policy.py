"""Outbox drop policy (pure: no I/O, no clock; the caller passes ``now``).

Every MQTT result and event is written to the on-disk outbox before it is published at QoS 1, and
is deleted only when the broker acknowledges it (PUBACK): delivery is at least once across broker
outages and agent restarts, and replay after a reconnect or a restart is in append order (ascending
id). The outbox is bounded. When it cannot keep everything it drops messages by these rules, and
counts every dropped message under exactly one reason:

1. ``oversize``: a payload larger than ``max_payload_bytes`` (default 128 KiB, AWS IoT Core's
   limit), or larger than ``max_bytes`` (it could never fit), is rejected by ``append`` and never
   stored. A payload of exactly ``max_payload_bytes`` is accepted.
2. ``expired``: a stored message older than ``max_age_s`` (default 7 days; ``None``: never) is
   deleted, whatever its priority. Expiry is lazy: it runs whenever the outbox is used (append,
   pending, stats), not on a timer, so an expired message is never handed out for publishing.
   "Older" means ``created_at < now - max_age_s`` on the wall clock (``created_at`` is stored with
   the message, so ages survive restarts); a message of exactly ``max_age_s`` is kept. Expiry runs
   before eviction, so expired messages free room without being counted as evicted.
3. ``evicted_rows`` / ``evicted_bytes``: when storing a new message would leave more than
   ``max_rows`` messages or more than ``max_bytes`` payload bytes, the oldest messages are evicted
   to make room and the new one is stored (newest wins). Oldest ``bulk`` messages (results) go
   first, in id order; ``critical`` messages (events such as update states) are evicted only once
   no ``bulk`` message is left, again oldest first. Exactly as many are evicted as needed to fit:
   the first ``rows + 1 - max_rows`` of them are counted ``evicted_rows``, any further ones (needed
   to free bytes) ``evicted_bytes``. A message that brings the store exactly to a limit needs no
   eviction.
4. ``disk_full``: when the storage reports that the disk or the database is full (SQLITE_FULL),
   the new message is dropped and counted; older messages are kept (they are already durable), and
   any expiry or eviction planned for the new message is rolled back with it. One warning is
   logged per episode (until an append succeeds again). Acknowledged messages whose delete the
   full disk refuses are not dropped nor sent again: they wait in the delete backlog (telemetry
   ``outbox.delete_backlog``) and are deleted once space returns (see ``agent.mqtt.outbox``).
5. ``io_error``: any other storage error while appending: the new message is dropped and counted,
   the error logged. The caller (the pipeline) never sees an exception for a storage problem.

Sizes are payload bytes only; topics and SQLite's own overhead are not counted, so the file on disk
is somewhat larger than ``max_bytes``. Drop counters live in memory (they restart at zero with the
agent); the messages themselves persist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

BULK = "bulk"  # results: evicted first when the outbox is full
CRITICAL = "critical"  # events (update states, ...): evicted only when nothing else is left
PRIORITIES = (BULK, CRITICAL)

OVERSIZE = "oversize"
EVICTED_ROWS = "evicted_rows"
EVICTED_BYTES = "evicted_bytes"
EXPIRED = "expired"
DISK_FULL = "disk_full"
IO_ERROR = "io_error"
DROP_REASONS = (OVERSIZE, EVICTED_ROWS, EVICTED_BYTES, EXPIRED, DISK_FULL, IO_ERROR)


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of the outbox; see the module docstring for what happens at each."""

    max_rows: int = 100_000
    max_bytes: int = 64 * 2**20
    max_age_s: float | None = 7 * 86400
    max_payload_bytes: int = 128 * 1024  # AWS IoT Core's cap on one message

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_payload_bytes < 0:
            raise ValueError(f"max_payload_bytes must be >= 0, got {self.max_payload_bytes}")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {self.max_age_s}")


@dataclass(frozen=True)
class OutboxState:
    """What is stored now: message count, payload bytes, ``created_at`` of the oldest (None: empty)."""

    rows: int
    bytes: int
    oldest_created_at: float | None


@dataclass(frozen=True)
class Admission:
    """The decision for one new message.

    ``accept`` False: drop it, counted under ``reason``, and touch nothing else. Otherwise, in one
    transaction: delete the messages with ``created_at < expire_before`` (when set; counted
    ``expired``), then, if ``evict_rows`` or ``evict_bytes`` is non-zero, evict what
    ``plan_evictions`` picks, then store the message. ``evict_rows``/``evict_bytes`` are computed
    on the state passed in: when ``expire_before`` is set, re-read the state after expiring and ask
    ``admit`` again (the second answer has no ``expire_before``).
    """

    accept: bool
    reason: str | None = None
    expire_before: float | None = None
    evict_rows: int = 0  # messages that must go so that rows + 1 <= max_rows
    evict_bytes: int = 0  # payload bytes that must be freed so that bytes + size <= max_bytes


class Candidate(NamedTuple):
    """A stored message that may be evicted: its id and payload size."""

    id: int
    size: int


@dataclass(frozen=True)
class Eviction:
    """Messages to evict, in order, and how to count them."""

    ids: tuple[int, ...]
    by_rows: int  # counted EVICTED_ROWS
    by_bytes: int  # counted EVICTED_BYTES
    freed_bytes: int
    critical: int  # how many of ``ids`` are critical messages
    enough: bool  # False only when the candidates ran out before room was made

    @property
    def counts(self) -> dict[str, int]:
        return {reason: n for reason, n in ((EVICTED_ROWS, self.by_rows), (EVICTED_BYTES, self.by_bytes)) if n}


def check_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    return priority


def expiry_cutoff(now: float, limits: OutboxLimits) -> float | None:
    """Messages with ``created_at`` strictly below this are expired; None: nothing ever expires."""
    return None if limits.max_age_s is None else now - limits.max_age_s


def is_expired(created_at: float, now: float, limits: OutboxLimits) -> bool:
    cutoff = expiry_cutoff(now, limits)
    return cutoff is not None and created_at < cutoff


def admit(state: OutboxState, size: int, now: float, limits: OutboxLimits, priority: str = BULK) -> Admission:
    """Decide what to do with a new message of ``size`` payload bytes appended at ``now``."""
    check_priority(priority)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size > limits.max_payload_bytes or size > limits.max_bytes:
        return Admission(accept=False, reason=OVERSIZE)
    expire_before = None
    if state.oldest_created_at is not None and is_expired(state.oldest_created_at, now, limits):
        expire_before = expiry_cutoff(now, limits)
    return Admission(
        accept=True,
        expire_before=expire_before,
        evict_rows=max(0, state.rows + 1 - limits.max_rows),
        evict_bytes=max(0, state.bytes + size - limits.max_bytes),
    )


def plan_evictions(
    bulk: Iterable[Candidate], critical: Iterable[Candidate], evict_rows: int, evict_bytes: int
) -> Eviction:
    """Pick the fewest oldest messages that free ``evict_rows`` rows and ``evict_bytes`` bytes.

    ``bulk`` and ``critical`` are the stored messages of each priority in ascending id (oldest
    first). They are consumed lazily, bulk first: a critical message is taken only once every bulk
    message has been taken, and only as far as needed, so the caller can feed database cursors.
    """
    ids: list[int] = []
    freed = n_critical = 0
    tagged = chain(((c, False) for c in bulk), ((c, True) for c in critical))
    while len(ids) < evict_rows or freed < evict_bytes:
        nxt = next(tagged, None)
        if nxt is None:
            break
        cand, is_critical = nxt
        ids.append(cand.id)
        freed += cand.size
        n_critical += is_critical
    by_rows = min(len(ids), evict_rows)
    return Eviction(
        ids=tuple(ids),
        by_rows=by_rows,
        by_bytes=len(ids) - by_rows,
        freed_bytes=freed,
        critical=n_critical,
        enough=len(ids) >= evict_rows and freed >= evict_bytes,
    )
