"""The pure chunk planner: geometry, every Accept path, windows, timeouts, retries, pause/resume, persistence."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.protocol.update import MAX_CHUNKS_PER_REQUEST
from agent.update.transfer import MAX_CHUNK_COUNT, Accept, ChunkPlan


def write_all(plan: ChunkPlan, indexes: list[int]) -> None:
    for i in indexes:
        assert plan.accept(i, plan.expected_size(i)) is Accept.WRITE
        plan.mark_written(i)


# ---- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "chunk_size", "count", "last"),
    [
        (0, 10, 0, None),
        (1, 10, 1, 1),
        (9, 10, 1, 9),
        (10, 10, 1, 10),
        (11, 10, 2, 1),
        (30, 10, 3, 10),  # an exact multiple: the last chunk is full
        (31, 10, 4, 1),
        (5, 1, 5, 1),
    ],
)
def test_geometry(length: int, chunk_size: int, count: int, last: int | None) -> None:
    plan = ChunkPlan(length, chunk_size)
    assert plan.chunk_count == count
    assert plan.missing() == list(range(count))
    if count:
        assert plan.expected_size(count - 1) == last
        assert plan.offset(count - 1) == (count - 1) * chunk_size
        assert sum(plan.expected_size(i) for i in range(count)) == length
        assert all(plan.expected_size(i) == chunk_size for i in range(count - 1))
    for bad in (-1, count):
        with pytest.raises(IndexError):
            plan.expected_size(bad)
        with pytest.raises(IndexError):
            plan.offset(bad)


def test_zero_length_target_is_done_at_once() -> None:
    plan = ChunkPlan(0, 1024)
    assert plan.done and plan.progress == 0 and plan.received_bytes == 0
    assert plan.requests(0.0) == []
    assert plan.missing() == []
    assert plan.failed_reason(1e9) is None
    assert plan.accept(0, 0) is Accept.OUT_OF_RANGE
    assert ChunkPlan.have_from_bytes(plan.have_to_bytes(), 0) == set()


def test_one_byte_target() -> None:
    plan = ChunkPlan(1, 1024)
    assert plan.requests(0.0) == [0]
    assert plan.accept(0, 1024) is Accept.WRONG_SIZE
    assert plan.accept(1, 1) is Accept.OUT_OF_RANGE
    assert plan.accept(0, 1) is Accept.WRITE
    assert not plan.done
    plan.mark_written(0)
    assert plan.done and plan.progress == 1
    assert plan.accept(0, 1) is Accept.DUPLICATE
    assert plan.requests(100.0) == []


def test_exact_multiple_of_chunk_size() -> None:
    plan = ChunkPlan(4096, 1024)
    assert plan.requests(0.0) == [0, 1, 2, 3]
    assert plan.accept(3, 1024) is Accept.WRITE
    assert plan.accept(3, 0) is Accept.WRONG_SIZE
    assert plan.accept(4, 0) is Accept.OUT_OF_RANGE
    write_all(plan, [3, 1, 0, 2])
    assert plan.done and plan.progress == 4096


@pytest.mark.parametrize(
    "kwargs",
    [
        {"length": -1, "chunk_size": 10},
        {"length": 10, "chunk_size": 0},
        {"length": 10, "chunk_size": 1, "window": 0},
        {"length": 10, "chunk_size": 1, "timeout_s": 0},
        {"length": 10, "chunk_size": 1, "timeout_s": float("nan")},
        {"length": 10, "chunk_size": 1, "max_retries": -1},
        {"length": 10, "chunk_size": 1, "max_bad_chunks": -1},
        {"length": MAX_CHUNK_COUNT + 1, "chunk_size": 1},
        {"length": 10, "chunk_size": 1, "have": [10]},
        {"length": 10, "chunk_size": 1, "have": [-1]},
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ChunkPlan(**kwargs)


# ---- accept ---------------------------------------------------------------------------------------


def test_every_accept_path_and_counters() -> None:
    plan = ChunkPlan(25, 10)  # chunks of 10, 10, 5
    assert plan.accept(0, 10) is Accept.WRITE
    assert plan.accept(0, 10) is Accept.WRITE  # not on disk until mark_written
    assert not plan.has(0) and plan.progress == 0
    plan.mark_written(0)
    assert plan.has(0) and plan.progress == 10
    assert plan.accept(0, 10) is Accept.DUPLICATE
    assert plan.accept(0, 9) is Accept.WRONG_SIZE  # size is checked before "already have"
    assert plan.accept(2, 10) is Accept.WRONG_SIZE  # the last chunk is short
    assert plan.accept(1, 5) is Accept.WRONG_SIZE
    assert plan.accept(3, 10) is Accept.OUT_OF_RANGE
    assert plan.accept(10**9, 10) is Accept.OUT_OF_RANGE
    assert plan.accept(-1, 10) is Accept.OUT_OF_RANGE
    assert plan.accept(2, 5) is Accept.WRITE
    assert (plan.wrong_size_count, plan.out_of_range_count, plan.duplicate_count) == (3, 3, 1)
    assert plan.missing() == [1, 2]
    assert not plan.has(3) and not plan.has(-1)


def test_mark_written_is_idempotent_and_checked() -> None:
    plan = ChunkPlan(20, 10)
    plan.mark_written(1)
    plan.mark_written(1)
    assert plan.progress == 10 and plan.missing() == [0]
    with pytest.raises(IndexError):
        plan.mark_written(2)
    with pytest.raises(IndexError):
        plan.mark_written(-1)


def test_unrequested_chunks_are_written() -> None:
    plan = ChunkPlan(100, 10, window=2)
    assert plan.requests(0.0) == [0, 1]
    write_all(plan, [7, 8])  # another device asked for them
    assert plan.missing() == [0, 1, 2, 3, 4, 5, 6, 9]
    write_all(plan, [0, 1])
    assert plan.requests(0.1) == [2, 3]


# ---- requests: window, timeouts, retries ----------------------------------------------------------


def test_window_limits_outstanding() -> None:
    plan = ChunkPlan(100, 10, window=3, timeout_s=5)
    assert plan.requests(0.0) == [0, 1, 2]
    assert plan.requests(1.0) == []
    assert plan.outstanding(1.0) == [0, 1, 2]
    write_all(plan, [1])
    assert plan.requests(2.0) == [3]
    write_all(plan, [0, 2, 3])
    assert plan.requests(3.0) == [4, 5, 6]
    assert plan.attempts(4) == 1 and plan.attempts(9) == 0


def test_requests_capped_per_call() -> None:
    plan = ChunkPlan(1000, 1, window=1000)
    first = plan.requests(0.0)
    assert first == list(range(MAX_CHUNKS_PER_REQUEST))
    second = plan.requests(0.0)
    assert second == list(range(MAX_CHUNKS_PER_REQUEST, 2 * MAX_CHUNKS_PER_REQUEST))
    assert len(plan.outstanding(0.0)) == 2 * MAX_CHUNKS_PER_REQUEST


def test_timeouts_re_request_in_ascending_order() -> None:
    plan = ChunkPlan(50, 10, window=3, timeout_s=5)
    assert plan.requests(0.0) == [0, 1, 2]
    write_all(plan, [1])
    assert plan.requests(1.0) == [3]
    assert plan.requests(4.9) == []
    # 0 and 2 time out at 5.0 (requests at least timeout_s old); 3 is still outstanding
    assert plan.outstanding(5.0) == [3]
    assert plan.requests(5.0) == [0, 2]
    assert plan.attempts(0) == 2 and plan.attempts(2) == 2 and plan.attempts(3) == 1
    assert plan.requests(6.0) == [3]  # 3 timed out; one slot free: the lowest candidate wins over new chunk 4
    assert plan.requests(6.0) == []
    assert plan.outstanding(6.0) == [0, 2, 3]
    write_all(plan, [0])
    assert plan.requests(9.0) == [4]
    assert plan.requests(10.0) == [2]  # 2 timed out again (requested at 5.0)
    assert plan.attempts(2) == 3


def test_timed_out_chunks_are_re_requested_before_higher_new_ones() -> None:
    plan = ChunkPlan(100, 10, window=2, timeout_s=1)
    assert plan.requests(0.0) == [0, 1]
    write_all(plan, [1])
    assert plan.requests(0.5) == [2]
    assert plan.requests(1.0) == [0]  # 0 timed out, 2 still outstanding
    assert plan.requests(1.5) == [2]


def test_retries_exhausted_fail_with_reason() -> None:
    plan = ChunkPlan(30, 10, window=8, timeout_s=1, max_retries=2)
    now = 0.0
    assert plan.requests(now) == [0, 1, 2]
    write_all(plan, [0, 2])
    for attempt in (2, 3):  # 1 + max_retries requests in all
        assert plan.failed_reason(now + 0.5) is None
        now += 1
        assert plan.requests(now) == [1]
        assert plan.attempts(1) == attempt
    assert plan.failed_reason(now + 0.99) is None  # the last request has not timed out yet
    assert plan.requests(now + 1) == []  # no fourth request
    assert plan.failed_reason(now + 1) == "chunk 1 not received after 3 requests"
    # a late arrival still completes the download
    write_all(plan, [1])
    assert plan.done and plan.failed_reason(now + 100) is None


def test_default_retries_message() -> None:
    plan = ChunkPlan(10, 1, timeout_s=5)
    now = 0.0
    while plan.requests(now):
        now += 5
    assert plan.attempts(0) == 9
    assert plan.failed_reason(now) == "chunk 0 not received after 9 requests"


def test_zero_retries() -> None:
    plan = ChunkPlan(10, 10, timeout_s=1, max_retries=0)
    assert plan.requests(0.0) == [0]
    assert plan.requests(1.0) == []
    assert plan.failed_reason(1.0) == "chunk 0 not received after 1 requests"


def test_exhausted_chunk_does_not_block_the_others() -> None:
    plan = ChunkPlan(30, 10, window=1, timeout_s=1, max_retries=0)
    assert plan.requests(0.0) == [0]
    assert plan.requests(1.0) == [1]
    assert plan.failed_reason(1.0) == "chunk 0 not received after 1 requests"


def test_wrong_size_limit() -> None:
    plan = ChunkPlan(100, 10, max_bad_chunks=64)
    for _ in range(64):
        assert plan.accept(0, 3) is Accept.WRONG_SIZE
    assert plan.failed_reason(0.0) is None
    assert plan.accept(1, 11) is Accept.WRONG_SIZE
    assert plan.wrong_size_count == 65
    assert plan.failed_reason(0.0) == "fleet sent 65 chunks of the wrong size"


def test_out_of_range_and_duplicates_never_fail() -> None:
    plan = ChunkPlan(10, 10, max_bad_chunks=0)
    write_all(plan, [0])
    for i in range(1000):
        plan.accept(i + 1, 10)
        plan.accept(0, 10)
    assert plan.failed_reason(0.0) is None


# ---- pause / resume -------------------------------------------------------------------------------


def test_pause_forgets_requests_without_counting_retries() -> None:
    plan = ChunkPlan(50, 10, window=2, timeout_s=5, max_retries=1)
    assert plan.requests(0.0) == [0, 1]
    assert plan.requests(5.0) == [0, 1]  # second (last allowed) request of both
    plan.pause()
    assert plan.paused
    assert plan.attempts(0) == 1 and plan.attempts(1) == 1  # the lost requests are refunded
    assert plan.outstanding(6.0) == []
    assert plan.requests(6.0) == []  # nothing while paused
    assert plan.failed_reason(100.0) is None  # no timeouts while paused
    write_all(plan, [4])  # chunks still arrive during the outage
    plan.resume()
    assert not plan.paused
    assert plan.requests(100.0) == [0, 1]
    assert plan.attempts(0) == 2
    assert plan.failed_reason(104.9) is None
    assert plan.failed_reason(105.0) == "chunk 0 not received after 2 requests"


def test_repeated_outages_never_exhaust_retries() -> None:
    plan = ChunkPlan(10, 10, timeout_s=1, max_retries=0)
    for k in range(20):
        plan.resume()
        assert plan.requests(float(k)) == [0]
        plan.pause()
    assert plan.attempts(0) == 0
    assert plan.failed_reason(1000.0) is None


def test_pause_then_resume_keeps_the_window() -> None:
    plan = ChunkPlan(100, 10, window=4)
    assert plan.requests(0.0) == [0, 1, 2, 3]
    plan.pause()
    plan.resume()
    assert plan.requests(0.1) == [0, 1, 2, 3]
    assert plan.requests(0.2) == []


# ---- persistence ----------------------------------------------------------------------------------


def test_resume_from_persisted_bitmap() -> None:
    plan = ChunkPlan(95, 10, window=4)
    assert plan.requests(0.0) == [0, 1, 2, 3]
    write_all(plan, [0, 2, 9])
    saved = plan.have_to_bytes()
    # the process restarts: a new plan from the bitmap, no request state carried over
    have = ChunkPlan.have_from_bytes(saved, 10)
    assert have == {0, 2, 9}
    again = ChunkPlan(95, 10, have=have, window=4)
    assert again.progress == 10 + 10 + 5
    assert again.missing() == [1, 3, 4, 5, 6, 7, 8]
    assert again.requests(0.0) == [1, 3, 4, 5]
    assert again.accept(9, 5) is Accept.DUPLICATE
    write_all(again, again.missing())
    assert again.done and again.progress == 95
    assert ChunkPlan.have_from_bytes(again.have_to_bytes(), 10) == set(range(10))


def test_bitmap_is_compact() -> None:
    plan = ChunkPlan(10_000 * 1024, 1024)
    assert len(plan.have_to_bytes()) < 10_000 // 8 + 16


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b[:-1],
        lambda b: b + b"\0",
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:9] + bytes([b[9] ^ 0x04]) + b[10:],  # a flipped bit: the checksum catches it
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),
        lambda b: None,
        lambda b: "not bytes",
    ],
)
def test_corrupt_bitmap_gives_empty_set(mangle) -> None:
    plan = ChunkPlan(100, 10)
    write_all(plan, [1, 5])
    good = plan.have_to_bytes()
    assert ChunkPlan.have_from_bytes(good, 10) == {1, 5}
    assert ChunkPlan.have_from_bytes(mangle(good), 10) == set()


def test_bitmap_for_another_chunk_count_is_ignored() -> None:
    plan = ChunkPlan(100, 10)
    write_all(plan, [1])
    assert ChunkPlan.have_from_bytes(plan.have_to_bytes(), 11) == set()
    assert ChunkPlan.have_from_bytes(plan.have_to_bytes(), 16) == set()
    assert ChunkPlan.have_from_bytes(plan.have_to_bytes(), -1) == set()


def test_bitmap_with_bits_past_the_end_is_rejected() -> None:
    import struct
    import zlib

    body = struct.pack(">4sI", b"EDGC", 3) + bytes([0b1000_0001])  # bit 7 set for a 3-chunk target
    assert ChunkPlan.have_from_bytes(body + struct.pack(">I", zlib.crc32(body)), 3) == set()
    body = struct.pack(">4sI", b"EDGC", 3) + bytes([0b0000_0101])
    assert ChunkPlan.have_from_bytes(body + struct.pack(">I", zlib.crc32(body)), 3) == {0, 2}


@given(st.binary(max_size=64), st.integers(min_value=-2, max_value=300))
def test_have_from_bytes_never_raises(data: bytes, count: int) -> None:
    have = ChunkPlan.have_from_bytes(data, count)
    assert all(0 <= i < count for i in have)


@given(st.integers(min_value=0, max_value=200), st.data())
def test_bitmap_round_trip(count: int, data: st.DataObject) -> None:
    have = data.draw(st.sets(st.integers(min_value=0, max_value=count - 1))) if count else set()
    plan = ChunkPlan(count * 7, 7, have=have)
    assert ChunkPlan.have_from_bytes(plan.have_to_bytes(), count) == have


# ---- property: any delivery pattern converges -----------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(min_value=0, max_value=3000),
    chunk_size=st.integers(min_value=1, max_value=400),
    window=st.integers(min_value=1, max_value=40),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    drop=st.floats(min_value=0.0, max_value=0.7),
    dup=st.floats(min_value=0.0, max_value=0.5),
    junk=st.floats(min_value=0.0, max_value=0.3),
    outage=st.floats(min_value=0.0, max_value=0.1),
    have_fraction=st.floats(min_value=0.0, max_value=1.0),
)
@example(length=3000, chunk_size=1, window=1, seed=1, drop=0.7, dup=0.5, junk=0.3, outage=0.1, have_fraction=0.0)
@example(length=3000, chunk_size=7, window=40, seed=2, drop=0.7, dup=0.5, junk=0.3, outage=0.1, have_fraction=0.5)
@example(length=2048, chunk_size=256, window=3, seed=3, drop=0.0, dup=0.0, junk=0.0, outage=0.0, have_fraction=1.0)
def test_any_delivery_pattern_converges(
    length: int,
    chunk_size: int,
    window: int,
    seed: int,
    drop: float,
    dup: float,
    junk: float,
    outage: float,
    have_fraction: float,
) -> None:
    rng = random.Random(seed)
    source = rng.randbytes(length)
    max_retries = 6
    count = -(-length // chunk_size)
    have = {i for i in range(count) if rng.random() < have_fraction}
    disk = bytearray(length)
    for i in have:
        disk[i * chunk_size : (i + 1) * chunk_size] = source[i * chunk_size : (i + 1) * chunk_size]
    plan = ChunkPlan(
        length, chunk_size, have=have, window=window, timeout_s=1.0, max_retries=max_retries, max_bad_chunks=10**9
    )
    drops: dict[int, int] = {}
    in_flight: list[tuple[int, bytes]] = []
    now = 0.0

    def deliver(index: int, data: bytes) -> None:
        verdict = plan.accept(index, len(data))
        if verdict is Accept.WRITE:
            offset = plan.offset(index)
            assert offset >= 0 and offset + len(data) <= length  # never a byte beyond the target
            disk[offset : offset + len(data)] = data
            plan.mark_written(index)
        else:
            assert verdict is not Accept.DUPLICATE or plan.has(index)

    for _step in range(100_000):
        # what was delayed last step arrives now (before any check): delays stay below timeout_s
        arriving, in_flight = in_flight, []
        for index, data in arriving:
            deliver(index, data)
        if plan.done:
            break
        assert plan.failed_reason(now) is None
        if plan.paused:
            plan.resume()
        elif rng.random() < outage:
            plan.pause()
        for index in plan.requests(now):
            assert 0 <= index < count and not plan.has(index)
            # drop some (never a chunk's last allowed request, so a retry-bounded plan can converge)
            if rng.random() < drop and drops.get(index, 0) < max_retries:
                drops[index] = drops.get(index, 0) + 1
                continue
            piece = source[index * chunk_size : (index + 1) * chunk_size]
            in_flight.append((index, piece))
            if rng.random() < dup:
                in_flight.append((index, piece))
        # junk from the fleet: out of range, wrong size, unrequested but valid
        if rng.random() < junk:
            in_flight.append((count + rng.randrange(5), b"x" * chunk_size))
        if count and rng.random() < junk:
            in_flight.append((rng.randrange(count), b"x" * (chunk_size + 1)))
        if count and rng.random() < junk:
            i = rng.randrange(count)
            in_flight.append((i, source[i * chunk_size : (i + 1) * chunk_size]))
        rng.shuffle(in_flight)
        keep = rng.randrange(len(in_flight) + 1)  # the rest arrives next step, out of order
        arriving, in_flight = in_flight[keep:], in_flight[:keep]
        for index, data in arriving:
            deliver(index, data)
        now += rng.choice((0.0, 0.3, 0.9))
    assert plan.done, f"stuck with {plan.missing()[:10]} missing"
    assert plan.progress == plan.received_bytes == length
    assert bytes(disk) == source
    assert plan.failed_reason(now) is None
    assert ChunkPlan.have_from_bytes(plan.have_to_bytes(), count) == set(range(count))
