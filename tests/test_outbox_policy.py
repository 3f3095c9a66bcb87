"""Outbox drop policy (pure): every branch, the boundaries, eviction order and counts, and invariants."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.mqtt.outbox_policy import (
    BULK,
    CRITICAL,
    DISK_FULL,
    DROP_REASONS,
    EVICTED_BYTES,
    EVICTED_ROWS,
    EXPIRED,
    IO_ERROR,
    OVERSIZE,
    Admission,
    Candidate,
    OutboxLimits,
    OutboxState,
    admit,
    expiry_cutoff,
    is_expired,
    plan_evictions,
)

L = OutboxLimits(max_rows=10, max_bytes=1000, max_age_s=100.0, max_payload_bytes=300)
EMPTY = OutboxState(0, 0, None)


def test_defaults_and_reason_names() -> None:
    d = OutboxLimits()
    assert (d.max_rows, d.max_bytes, d.max_age_s, d.max_payload_bytes) == (100_000, 64 * 2**20, 7 * 86400, 131072)
    assert (OVERSIZE, EVICTED_ROWS, EVICTED_BYTES, EXPIRED, DISK_FULL, IO_ERROR) == DROP_REASONS
    assert DROP_REASONS == ("oversize", "evicted_rows", "evicted_bytes", "expired", "disk_full", "io_error")
    assert (BULK, CRITICAL) == ("bulk", "critical")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_rows": 0},
        {"max_bytes": 0},
        {"max_payload_bytes": -1},
        {"max_age_s": 0},
        {"max_age_s": -1.0},
        {"max_age_s": float("nan")},
    ],
)
def test_limits_are_validated(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        OutboxLimits(**kwargs)


def test_limits_edge_values_are_allowed() -> None:
    OutboxLimits(max_rows=1, max_bytes=1, max_payload_bytes=0, max_age_s=None)
    OutboxLimits(max_age_s=1e-9)


# --------------------------------------------------------------------------------------------- admit

NO_EVICT = Admission(accept=True)


@pytest.mark.parametrize(
    ("state", "size", "now", "limits", "expected"),
    [
        # payload size: exactly at the cap is fine, one over is oversize, never stored
        (EMPTY, 0, 0.0, L, NO_EVICT),
        (EMPTY, 300, 0.0, L, NO_EVICT),
        (EMPTY, 301, 0.0, L, Admission(accept=False, reason=OVERSIZE)),
        (OutboxState(10, 1000, 0.0), 301, 1e9, L, Admission(accept=False, reason=OVERSIZE)),  # checked first
        # larger than max_bytes (but under the payload cap): could never fit
        (EMPTY, 50, 0.0, OutboxLimits(max_bytes=50, max_payload_bytes=100), NO_EVICT),
        (EMPTY, 51, 0.0, OutboxLimits(max_bytes=50, max_payload_bytes=100), Admission(False, OVERSIZE)),
        # rows: one short of the limit fits, at the limit one must go, over it (limits lowered) several
        (OutboxState(9, 0, 0.0), 0, 0.0, L, NO_EVICT),
        (OutboxState(10, 0, 0.0), 0, 0.0, L, Admission(True, evict_rows=1)),
        (OutboxState(13, 0, 0.0), 0, 0.0, L, Admission(True, evict_rows=4)),
        (OutboxState(1, 0, 0.0), 0, 0.0, OutboxLimits(max_rows=1), Admission(True, evict_rows=1)),
        # bytes: landing exactly on the limit fits, one byte over needs that byte freed
        (OutboxState(1, 700, 0.0), 300, 0.0, L, NO_EVICT),
        (OutboxState(1, 701, 0.0), 300, 0.0, L, Admission(True, evict_bytes=1)),
        (OutboxState(1, 1000, 0.0), 1, 0.0, L, Admission(True, evict_bytes=1)),
        (OutboxState(1, 1000, 0.0), 0, 0.0, L, NO_EVICT),
        (OutboxState(5, 1500, 0.0), 200, 0.0, L, Admission(True, evict_bytes=700)),
        # both limits at once
        (OutboxState(10, 1000, 0.0), 300, 0.0, L, Admission(True, evict_rows=1, evict_bytes=300)),
        # age: exactly max_age_s old is kept, a hair older expires (cutoff = now - max_age_s)
        (OutboxState(1, 1, 0.0), 1, 100.0, L, NO_EVICT),
        (OutboxState(1, 1, 0.0), 1, 100.5, L, Admission(True, expire_before=0.5)),
        (OutboxState(10, 1000, 0.0), 1, 500.0, L, Admission(True, expire_before=400.0, evict_rows=1, evict_bytes=1)),
        (OutboxState(1, 1, 0.0), 1, 1e12, OutboxLimits(max_age_s=None), NO_EVICT),  # never expires
        (OutboxState(1, 1, 50.0), 1, 0.0, L, NO_EVICT),  # stamped in the future (clock stepped back)
        (EMPTY, 1, 1e12, L, NO_EVICT),
    ],
)
def test_admit(state: OutboxState, size: int, now: float, limits: OutboxLimits, expected: Admission) -> None:
    assert admit(state, size, now, limits) == expected
    assert admit(state, size, now, limits, CRITICAL) == expected  # priority changes what is evicted, not how much


@pytest.mark.parametrize(("size", "priority"), [(-1, BULK), (1, "urgent"), (1, "")])
def test_admit_rejects_bad_arguments(size: int, priority: str) -> None:
    with pytest.raises(ValueError):
        admit(EMPTY, size, 0.0, L, priority)


@pytest.mark.parametrize(
    ("created_at", "now", "max_age_s", "expired"),
    [
        (0.0, 100.0, 100.0, False),
        (0.0, 100.000001, 100.0, True),
        (-1.0, 100.0, 100.0, True),
        (0.0, 1e15, None, False),
        (200.0, 100.0, 100.0, False),
    ],
)
def test_is_expired(created_at: float, now: float, max_age_s: float | None, expired: bool) -> None:
    limits = OutboxLimits(max_age_s=max_age_s)
    assert is_expired(created_at, now, limits) is expired
    assert expiry_cutoff(now, limits) == (None if max_age_s is None else now - max_age_s)


# --------------------------------------------------------------------------------------------- plan_evictions


def cands(*pairs: tuple[int, int]) -> list[Candidate]:
    return [Candidate(i, s) for i, s in pairs]


@pytest.mark.parametrize(
    ("bulk", "critical", "rows", "nbytes", "ids", "by_rows", "by_bytes", "n_critical", "enough"),
    [
        # nothing needed: nothing taken
        (cands((1, 10)), cands((2, 10)), 0, 0, (), 0, 0, 0, True),
        # rows: the oldest bulk ones, in id order
        (cands((1, 10), (2, 10), (3, 10)), [], 1, 0, (1,), 1, 0, 0, True),
        (cands((1, 10), (2, 10), (3, 10)), [], 2, 0, (1, 2), 2, 0, 0, True),
        # bytes: as many oldest as needed to free them, counted as bytes evictions
        (cands((1, 10), (2, 10), (3, 10)), [], 0, 15, (1, 2), 0, 2, 0, True),
        (cands((1, 10), (2, 10), (3, 10)), [], 0, 20, (1, 2), 0, 2, 0, True),
        (cands((1, 10), (2, 10), (3, 10)), [], 0, 21, (1, 2, 3), 0, 3, 0, True),
        # both: the first evict_rows count as rows evictions, the rest as bytes evictions
        (cands((1, 10), (2, 10), (3, 10)), [], 1, 25, (1, 2, 3), 1, 2, 0, True),
        (cands((1, 100), (2, 10)), [], 2, 5, (1, 2), 2, 0, 0, True),
        # empty payloads free no bytes: keep going
        (cands((1, 0), (2, 0), (3, 10)), [], 0, 5, (1, 2, 3), 0, 3, 0, True),
        # critical messages are older but bulk goes first
        (cands((5, 1), (6, 1)), cands((1, 100), (2, 100)), 1, 0, (5,), 1, 0, 0, True),
        (cands((5, 1), (6, 1)), cands((1, 100), (2, 100)), 2, 0, (5, 6), 2, 0, 0, True),
        # ... and only when no bulk is left, the oldest critical
        (cands((5, 1)), cands((1, 100), (2, 100)), 2, 0, (5, 1), 2, 0, 1, True),
        (cands((5, 1)), cands((1, 100), (2, 100)), 0, 150, (5, 1, 2), 0, 3, 2, True),
        ([], cands((1, 100), (2, 100)), 1, 0, (1,), 1, 0, 1, True),
        # candidates run out (only when the caller's counts are wrong)
        (cands((1, 10)), [], 2, 0, (1,), 1, 0, 0, False),
        ([], [], 0, 1, (), 0, 0, 0, False),
    ],
)
def test_plan_evictions(
    bulk: list[Candidate],
    critical: list[Candidate],
    rows: int,
    nbytes: int,
    ids: tuple[int, ...],
    by_rows: int,
    by_bytes: int,
    n_critical: int,
    enough: bool,
) -> None:
    ev = plan_evictions(bulk, critical, rows, nbytes)
    assert ev.ids == ids
    assert (ev.by_rows, ev.by_bytes, ev.critical, ev.enough) == (by_rows, by_bytes, n_critical, enough)
    sizes = {c.id: c.size for c in [*bulk, *critical]}
    assert ev.freed_bytes == sum(sizes[i] for i in ids)
    assert ev.counts == {k: v for k, v in ((EVICTED_ROWS, by_rows), (EVICTED_BYTES, by_bytes)) if v}


def test_plan_evictions_consumes_lazily() -> None:
    """The shell feeds database cursors: nothing beyond what is needed may be read."""
    consumed: list[int] = []

    def gen(pairs: list[tuple[int, int]]) -> Iterator[Candidate]:
        for i, s in pairs:
            consumed.append(i)
            yield Candidate(i, s)

    def boom() -> Iterator[Candidate]:
        raise AssertionError("critical messages read while bulk ones were enough")
        yield  # pragma: no cover

    ev = plan_evictions(gen([(1, 5), (2, 5), (3, 5), (4, 5)]), boom(), 1, 8)
    assert ev.ids == (1, 2) and consumed == [1, 2]


# --------------------------------------------------------------------------------------------- properties


@dataclass(frozen=True)
class Row:
    id: int
    priority: str
    size: int
    created_at: float


def state_of(rows: list[Row]) -> OutboxState:
    return OutboxState(len(rows), sum(r.size for r in rows), min((r.created_at for r in rows), default=None))


def apply(rows: list[Row], size: int, now: float, limits: OutboxLimits, priority: str):
    """What the I/O shell does with the decision, on a list instead of a table."""
    adm = admit(state_of(rows), size, now, limits, priority)
    if not adm.accept:
        return rows, adm, None, []
    expired: list[Row] = []
    if adm.expire_before is not None:
        expired = [r for r in rows if r.created_at < adm.expire_before]
        rows = [r for r in rows if r.created_at >= adm.expire_before]
        adm = admit(state_of(rows), size, now, limits, priority)
        assert adm.expire_before is None  # the second answer never asks to expire again
    bulk = [Candidate(r.id, r.size) for r in rows if r.priority == BULK]
    crit = [Candidate(r.id, r.size) for r in rows if r.priority == CRITICAL]
    ev = plan_evictions(bulk, crit, adm.evict_rows, adm.evict_bytes)
    gone = set(ev.ids)
    new_id = max((r.id for r in rows), default=0) + 1
    return [*(r for r in rows if r.id not in gone), Row(new_id, priority, size, now)], adm, ev, expired


rows_strategy = st.lists(
    st.tuples(st.sampled_from([BULK, CRITICAL]), st.integers(0, 400), st.floats(0, 1000)), max_size=40
).map(lambda xs: [Row(i + 1, p, s, t) for i, (p, s, t) in enumerate(xs)])
limits_strategy = st.builds(
    OutboxLimits,
    max_rows=st.integers(1, 30),
    max_bytes=st.integers(1, 5000),
    max_age_s=st.one_of(st.none(), st.floats(1, 1000)),
    max_payload_bytes=st.integers(0, 600),
)


@settings(max_examples=400, deadline=None)
@given(
    rows=rows_strategy,
    limits=limits_strategy,
    size=st.integers(0, 700),
    now=st.floats(0, 2000),
    priority=st.sampled_from([BULK, CRITICAL]),
)
def test_properties_of_one_append(rows: list[Row], limits: OutboxLimits, size: int, now: float, priority: str) -> None:
    after, adm, ev, expired = apply(rows, size, now, limits, priority)
    fits = size <= min(limits.max_payload_bytes, limits.max_bytes)
    assert adm.accept is fits
    if not fits:
        assert adm.reason == OVERSIZE and after == rows  # rejected: nothing touched
        return
    assert ev is not None and ev.enough
    # the limits hold afterwards, even when the store was over them before (limits lowered)
    assert len(after) <= limits.max_rows
    assert sum(r.size for r in after) <= limits.max_bytes
    # nothing expired is left, nothing unexpired was expired
    cutoff = expiry_cutoff(now, limits)
    if cutoff is not None:
        assert all(r.created_at >= cutoff for r in after[:-1])
        assert all(r.created_at < cutoff for r in expired)
    else:
        assert expired == []
    # eviction takes the oldest bulk first; critical only once no bulk is left
    by_id = {r.id: r for r in rows}
    evicted = [by_id[i] for i in ev.ids]
    kept_old = after[:-1]
    if any(r.priority == CRITICAL for r in evicted):
        assert not any(r.priority == BULK for r in kept_old)
    for p in (BULK, CRITICAL):
        ev_p = [r.id for r in evicted if r.priority == p]
        kept_p = [r.id for r in kept_old if r.priority == p]
        assert ev_p == sorted(ev_p)
        assert not ev_p or not kept_p or max(ev_p) < min(kept_p)  # a prefix: the oldest of that priority
    # minimal: sparing the last evicted message would break a limit
    if ev.ids:
        spared = [*kept_old, by_id[ev.ids[-1]]]
        assert len(spared) + 1 > limits.max_rows or sum(r.size for r in spared) + size > limits.max_bytes
    assert ev.by_rows + ev.by_bytes == len(ev.ids)
    assert ev.by_rows == min(len(ev.ids), max(0, len(rows) - len(expired) + 1 - limits.max_rows))
    assert after[-1].size == size and after[-1].priority == priority  # the new message is always stored


@settings(max_examples=200, deadline=None)
@given(
    limits=limits_strategy,
    appends=st.lists(st.tuples(st.integers(0, 700), st.sampled_from([BULK, CRITICAL]), st.floats(0, 50)), max_size=60),
)
def test_properties_of_a_stream(limits: OutboxLimits, appends: list[tuple[int, str, float]]) -> None:
    """A stream of appends with the clock moving forward: limits always hold, counts add up."""
    rows: list[Row] = []
    now = 0.0
    accepted = dropped = 0
    for size, priority, dt in appends:
        now += dt
        rows, adm, ev, expired = apply(rows, size, now, limits, priority)
        if not adm.accept:
            continue
        accepted += 1
        dropped += len(expired) + len(ev.ids)
        assert len(rows) <= limits.max_rows and sum(r.size for r in rows) <= limits.max_bytes
        assert [r.id for r in rows] == sorted(r.id for r in rows)  # replay order is append order
    assert len(rows) == accepted - dropped
