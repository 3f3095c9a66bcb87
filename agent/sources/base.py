"""The input-source plugin interface.

A source is one small module with one pydantic config model (discriminated on
``type``) and a ``Source`` subclass. Sources own their reconnect logic: ``read``
never raises for a vanished device; it reports it in ``health`` and keeps trying
with backoff until ``close``.
"""

from __future__ import annotations

import abc
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

SampleKind = Literal["image", "row"]


@dataclass(frozen=True)
class Sample:
    """One unit of input: a BGR/gray frame (kind image) or one row of sensor values (kind row)."""

    data: np.ndarray
    timestamp: float  # time.time() at capture
    seq: int  # per-source sequence number, gaps mean data lost at the source
    monotonic: float = field(default_factory=time.monotonic)
    gap: bool = False  # True for the first sample after a reconnect: windows must not span it


class FrameHint(NamedTuple):
    """The least a consumer needs of each frame: a picture at least ``width`` x ``height`` pixels, in gray when
    ``gray`` (a gray model). Sources may deliver smaller or gray frames down to that (e.g. decode a JPEG at 1/4
    size), saving the decoding of pixels pre-processing would throw away."""

    width: int
    height: int
    gray: bool

    @staticmethod
    def merge(a: FrameHint | None, b: FrameHint | None) -> FrameHint | None:
        """What two consumers of the same frames need (None: full frames)."""
        if a is None or b is None:
            return None
        return FrameHint(max(a.width, b.width), max(a.height, b.height), a.gray and b.gray)


@dataclass
class SourceHealth:
    """Counters every source keeps; reported in telemetry."""

    connected: bool = False
    samples: int = 0
    reconnects: int = 0
    stalls: int = 0
    errors: int = 0
    last_error: str | None = None
    last_sample_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Backoff:
    """Exponential backoff with a cap; ``reset`` after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Source(abc.ABC):
    """An input source. Thread-safe to ``close`` from another thread."""

    kind: SampleKind = "image"

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = SourceHealth()
        self._closed = threading.Event()
        self._seq = 0

    @abc.abstractmethod
    def read(self, timeout: float = 1.0) -> Sample | None:
        """Next sample, or None when nothing arrived within ``timeout`` (or the source ended/closed)."""

    @property
    def finished(self) -> bool:
        """True when a finite source (file, directory) has delivered everything."""
        return False

    @property
    def live(self) -> bool:
        """Live sources (cameras, sensors) drop stale samples under overload; others apply backpressure."""
        return True

    @property
    def nominal_rate(self) -> float | None:
        """Samples a second this source delivers at most: ``math.inf`` when it is read as fast as it is processed
        (not live), None when a live source does not say (a camera without a set fps, a serial sensor)."""
        return None if self.live else math.inf

    def close(self) -> None:
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def probe(self) -> str | None:
        """For `edge-agent check`: None when the source can be opened now, else why not."""
        return None

    def want_frames(self, hint: FrameHint | None) -> None:  # noqa: B027 - optional for sources
        """What the consumer needs of each frame from now on (None: full frames); image sources may use it."""

    def _sample(self, data: np.ndarray, gap: bool = False) -> Sample:
        self._seq += 1
        now = time.time()
        self.health.samples += 1
        self.health.last_sample_at = now
        return Sample(data=data, timestamp=now, seq=self._seq, gap=gap)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless closed; True when closed meanwhile."""
        return self._closed.wait(seconds)
