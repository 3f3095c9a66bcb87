"""Pure planner for chunked, resumable target downloads: no I/O, no clocks (time is passed in as ``now``).

A target of ``length`` bytes is fetched in chunks of ``chunk_size`` (the last one shorter). The fleet publishes the
requested chunks on a shared topic, so chunks arrive in any order, duplicated, unrequested (another device asked for
them) or never. The shell drives a :class:`ChunkPlan` like h11 drives a connection::

    plan = ChunkPlan(length, chunk_size, have=ChunkPlan.have_from_bytes(saved, count))
    publish(plan.requests(now))                   # on start and on every tick / arrival
    verdict = plan.accept(index, len(data))       # for every chunk that arrives
    if verdict is Accept.WRITE:
        write(plan.offset(index), data); fsync(); plan.mark_written(index); save(plan.have_to_bytes())
    if reason := plan.failed_reason(now): fail(reason)
    plan.pause() / plan.resume()                  # broker outage: requests in flight are lost, not unanswered

Only :meth:`ChunkPlan.accept` returning ``WRITE`` lets bytes reach the file, and only at ``offset(index)`` with exactly
``expected_size(index)`` bytes, so nothing is ever written beyond ``length`` (the endless-data defence; TUF checks the
hash of the whole file afterwards).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable

from agent.protocol.update import MAX_CHUNKS_PER_REQUEST

#: Most chunks a plan may have: the highest chunk index a ``ChunkRequest`` can carry is 2**24.
MAX_CHUNK_COUNT = (1 << 24) + 1
_BITMAP_MAGIC = b"EDGC"
_BITMAP_HEADER = struct.Struct(">4sI")  # magic, chunk_count
_BITMAP_CRC = struct.Struct(">I")


class Accept(enum.Enum):
    """What the shell does with an arriving chunk."""

    WRITE = "write"  # new and the right size: write it at offset(index), then call mark_written(index)
    DUPLICATE = "duplicate"  # already on disk: ignore
    OUT_OF_RANGE = "out_of_range"  # index outside the target: ignore (endless-data defence)
    WRONG_SIZE = "wrong_size"  # size != expected_size(index): ignore (counted; too many fails the download)


class ChunkPlan:
    """Which chunks of one target are on disk, which to request now, and when to give up.

    Retry rule: a chunk is requested at most ``1 + max_retries`` times; when the last of those requests times out,
    :meth:`failed_reason` names it. A request counts as timed out once it is at least ``timeout_s`` old.
    """

    def __init__(
        self,
        length: int,
        chunk_size: int,
        have: Iterable[int] = (),
        window: int = 32,
        timeout_s: float = 5.0,
        max_retries: int = 8,
        max_bad_chunks: int = 64,
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0 or max_bad_chunks < 0:
            raise ValueError("max_retries and max_bad_chunks must be >= 0")
        self.length = length
        self.chunk_size = chunk_size
        self.chunk_count = -(-length // chunk_size)
        if self.chunk_count > MAX_CHUNK_COUNT:
            raise ValueError(f"{self.chunk_count} chunks is over the {MAX_CHUNK_COUNT}-chunk limit; use larger chunks")
        self.window = window
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_bad_chunks = max_bad_chunks
        self.wrong_size_count = 0
        self.out_of_range_count = 0
        self.duplicate_count = 0
        self._have = bytearray(self.chunk_count)  # 1 = written and durable
        self._have_count = 0
        self._received_bytes = 0
        self._first_missing = 0  # every chunk below this index is on disk
        self._requested: dict[int, float] = {}  # chunk -> time of its latest request still awaiting an answer
        self._attempts: dict[int, int] = {}  # chunk -> requests made (pause() refunds the ones in flight)
        self._paused = False
        for index in have:
            if not 0 <= index < self.chunk_count:
                raise ValueError(f"chunk {index} is outside 0..{self.chunk_count - 1}")
            self.mark_written(index)

    # ---- geometry ---------------------------------------------------------------------------------

    def offset(self, index: int) -> int:
        """Byte offset of chunk ``index`` in the target."""
        self._check(index)
        return index * self.chunk_size

    def expected_size(self, index: int) -> int:
        """Size of chunk ``index``: ``chunk_size`` except for a shorter last chunk."""
        self._check(index)
        return min(self.chunk_size, self.length - index * self.chunk_size)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} is outside 0..{self.chunk_count - 1}")

    # ---- progress ---------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every chunk is on disk (at once for a 0-byte target)."""
        return self._have_count == self.chunk_count

    @property
    def received_bytes(self) -> int:
        """Bytes of the chunks marked written."""
        return self._received_bytes

    @property
    def progress(self) -> int:
        """Bytes on disk, for status reports (same as :attr:`received_bytes`)."""
        return self._received_bytes

    @property
    def paused(self) -> bool:
        return self._paused

    def has(self, index: int) -> bool:
        """Whether chunk ``index`` is on disk (False for indexes outside the target)."""
        return 0 <= index < self.chunk_count and bool(self._have[index])

    def missing(self) -> list[int]:
        """Chunks not on disk yet, ascending."""
        have = self._have
        return [i for i in range(self._first_missing, self.chunk_count) if not have[i]]

    # ---- arrivals ---------------------------------------------------------------------------------

    def accept(self, index: int, size: int) -> Accept:
        """Decide what to do with an arriving chunk; only ``WRITE`` may reach the file (then ``mark_written``).

        Checks in order: out of range, wrong size (counted even for a chunk already on disk), duplicate.
        """
        if not 0 <= index < self.chunk_count:
            self.out_of_range_count += 1
            return Accept.OUT_OF_RANGE
        if size != self.expected_size(index):
            self.wrong_size_count += 1
            return Accept.WRONG_SIZE
        if self._have[index]:
            self.duplicate_count += 1
            return Accept.DUPLICATE
        return Accept.WRITE

    def mark_written(self, index: int) -> None:
        """Record chunk ``index`` as durable on disk (call after the write is flushed); idempotent."""
        self._check(index)
        self._requested.pop(index, None)
        if self._have[index]:
            return
        self._have[index] = 1
        self._have_count += 1
        self._received_bytes += self.expected_size(index)
        while self._first_missing < self.chunk_count and self._have[self._first_missing]:
            self._first_missing += 1

    # ---- requests ---------------------------------------------------------------------------------

    def _timed_out(self, requested_at: float, now: float) -> bool:
        return now - requested_at >= self.timeout_s

    def outstanding(self, now: float) -> list[int]:
        """Chunks requested, not received and not timed out at ``now``, ascending."""
        return sorted(i for i, t in self._requested.items() if not self._timed_out(t, now))

    def requests(self, now: float) -> list[int]:
        """Chunks to ask for now (ascending, at most ``MAX_CHUNKS_PER_REQUEST``); records them as requested at ``now``.

        Keeps at most ``window`` chunks outstanding; re-requests chunks whose request timed out, lowest index first;
        never re-requests a chunk that has used up its retries (see :meth:`failed_reason`). Empty while paused.
        """
        if self._paused or self.done:
            return []
        room = min(self.window - len(self.outstanding(now)), MAX_CHUNKS_PER_REQUEST)
        chosen: list[int] = []
        if room <= 0:
            return chosen
        have, requested, attempts = self._have, self._requested, self._attempts
        limit = 1 + self.max_retries
        for index in range(self._first_missing, self.chunk_count):
            if have[index]:
                continue
            when = requested.get(index)
            if when is not None and not self._timed_out(when, now):
                continue  # still outstanding
            if attempts.get(index, 0) >= limit:
                continue  # retries used up: failed_reason reports it
            chosen.append(index)
            if len(chosen) == room:
                break
        for index in chosen:
            requested[index] = now
            attempts[index] = attempts.get(index, 0) + 1
        return chosen

    def attempts(self, index: int) -> int:
        """How many times chunk ``index`` has been requested (requests lost to a pause not counted)."""
        return self._attempts.get(index, 0)

    def pause(self) -> None:
        """Broker outage: forget requests in flight without counting them as retries; no requests until resume."""
        for index in self._requested:
            self._attempts[index] -= 1
        self._requested.clear()
        self._paused = True

    def resume(self) -> None:
        """Broker back: the next :meth:`requests` asks again for whatever is missing."""
        self._paused = False

    def failed_reason(self, now: float) -> str | None:
        """One line saying why the download cannot succeed, or None while it still can."""
        if self.wrong_size_count > self.max_bad_chunks:
            return f"fleet sent {self.wrong_size_count} chunks of the wrong size"
        limit = 1 + self.max_retries
        for index in sorted(self._requested):
            count = self._attempts.get(index, 0)
            if count >= limit and self._timed_out(self._requested[index], now):
                return f"chunk {index} not received after {count} requests"
        return None

    # ---- persistence ------------------------------------------------------------------------------

    def have_to_bytes(self) -> bytes:
        """Compact, checksummed bitmap of the chunks on disk (see :meth:`have_from_bytes`)."""
        bits = bytearray((self.chunk_count + 7) // 8)
        have = self._have
        for index in range(self.chunk_count):
            if have[index]:
                bits[index >> 3] |= 1 << (index & 7)
        body = _BITMAP_HEADER.pack(_BITMAP_MAGIC, self.chunk_count) + bytes(bits)
        return body + _BITMAP_CRC.pack(zlib.crc32(body))

    @staticmethod
    def have_from_bytes(data: bytes | bytearray | memoryview | None, chunk_count: int) -> set[int]:
        """Chunks recorded by :meth:`have_to_bytes`; an empty set (restart the download) for anything corrupt,
        truncated, missing (None) or written for a different chunk count. Never raises."""
        try:
            raw = bytes(data) if data is not None else b""
        except (TypeError, ValueError):
            return set()
        nbytes = (chunk_count + 7) // 8 if chunk_count >= 0 else -1
        if nbytes < 0 or len(raw) != _BITMAP_HEADER.size + nbytes + _BITMAP_CRC.size:
            return set()
        body, (crc,) = raw[: -_BITMAP_CRC.size], _BITMAP_CRC.unpack(raw[-_BITMAP_CRC.size :])
        magic, count = _BITMAP_HEADER.unpack(body[: _BITMAP_HEADER.size])
        if magic != _BITMAP_MAGIC or count != chunk_count or zlib.crc32(body) != crc:
            return set()
        bits = body[_BITMAP_HEADER.size :]
        have = {i for i in range(chunk_count) if bits[i >> 3] & (1 << (i & 7))}
        if chunk_count % 8 and bits[-1] >> (chunk_count % 8):
            return set()  # bits set past the last chunk: not something have_to_bytes writes
        return have
