"""Rate-limited logging, pure: the first ``burst`` lines per key in each period, then one summary per period.

A flood of bad input must not turn into a flood of log lines (or reports): ``RateLimiter.admit`` says whether this
occurrence may be logged; ``RateLimiter.summaries`` returns, once per finished period, how many were held back per key
so the caller can write one line with the counts. No clock of its own: callers pass ``now`` (monotonic seconds).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class _Window:
    start: float
    admitted: int = 0
    suppressed: int = 0


@dataclass
class RateLimiter:
    """Per key: at most ``burst`` admitted occurrences per ``period_s``; the rest are counted as suppressed."""

    burst: int = 5
    period_s: float = 60.0
    max_keys: int = 256  # a bound on the keys tracked (keys are chosen by the caller: a fixed, small set)
    _windows: dict[str, _Window] = field(default_factory=dict)
    _pending: dict[str, int] = field(default_factory=dict)  # suppressed counts of finished periods, not yet summarised

    def admit(self, key: str, now: float) -> bool:
        """True when this occurrence of ``key`` at ``now`` may be logged."""
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.period_s:
            self._close(key, window)
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys:
                key = "other"
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(now)
        if window.admitted < self.burst:
            window.admitted += 1
            return True
        window.suppressed += 1
        return False

    def summaries(self, now: float) -> dict[str, int]:
        """Suppressed counts per key of the periods that have ended by ``now`` (each period reported once)."""
        for key, window in list(self._windows.items()):
            if now - window.start >= self.period_s:
                self._close(key, window)
        out, self._pending = self._pending, {}
        return out

    def _close(self, key: str, window: _Window) -> None:
        del self._windows[key]
        if window.suppressed:
            self._pending[key] = self._pending.get(key, 0) + window.suppressed


class RateLog:
    """A ``RateLimiter`` wired to a structlog logger: ``warning(key, event, **kw)`` logs the first ``burst`` per key
    and minute; the suppressed counts come out as one ``"<summary_event>"`` line per minute (on the next call, or
    ``flush``). Thread-safe."""

    def __init__(self, logger: object, summary_event: str, burst: int = 5, period_s: float = 60.0) -> None:
        self.log, self.summary_event = logger, summary_event
        self.limiter = RateLimiter(burst=burst, period_s=period_s)
        self._lock = threading.Lock()  # callers in several threads

    def warning(self, key: str, event: str, now: float, **kw: object) -> None:
        self.flush(now)
        with self._lock:
            admitted = self.limiter.admit(key, now)
        if admitted:
            self.log.warning(event, **kw)  # type: ignore[attr-defined]

    def flush(self, now: float) -> None:
        with self._lock:
            held = self.limiter.summaries(now)
        if held:
            self.log.warning(self.summary_event, suppressed=held, total=sum(held.values()))  # type: ignore[attr-defined]
