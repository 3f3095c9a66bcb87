"""Synthetic source for tests and the demo: generated frames or vibration-like sensor rows."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.sources.base import Sample, Source

TYPE = "synthetic"


class SyntheticSourceConfig(BaseModel):
    """``[sources.NAME] type = "synthetic"``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["synthetic"] = "synthetic"
    kind: Literal["image", "row"] = "image"
    rate: float = Field(default=10.0, gt=0)  # samples per second; 0 pacing is not allowed
    width: int = Field(default=320, gt=0)
    height: int = Field(default=240, gt=0)
    channels: int = Field(default=3, gt=0)  # rows: values per row
    anomaly_every: int = Field(default=0, ge=0)  # rows: every N rows inject a burst (0: never)
    seed: int = 0
    count: int | None = Field(default=None, gt=0)  # stop after this many samples


Config = SyntheticSourceConfig


class SyntheticSource(Source):
    def __init__(self, config: SyntheticSourceConfig, name: str) -> None:
        super().__init__(name)
        self.config = config
        self.kind = config.kind
        self._rng = np.random.default_rng(config.seed)
        self._n = 0
        self._next_due = time.monotonic()
        self.health.connected = True

    @property
    def finished(self) -> bool:
        return self.config.count is not None and self._n >= self.config.count

    @property
    def nominal_rate(self) -> float:
        return self.config.rate

    def read(self, timeout: float = 1.0) -> Sample | None:
        if self.closed or self.finished:
            return None
        wait = self._next_due - time.monotonic()
        if wait > timeout:
            self._wait(timeout)
            return None
        if wait > 0 and self._wait(wait):
            return None
        self._next_due = max(self._next_due, time.monotonic() - 1.0) + 1.0 / self.config.rate
        self._n += 1
        data = self._frame() if self.kind == "image" else self._row()
        return self._sample(data, gap=self._n == 1)

    def _frame(self) -> np.ndarray:
        c = self.config
        frame = self._rng.integers(0, 40, size=(c.height, c.width, 3), dtype=np.uint8)
        x = int((self._n * 7) % max(1, c.width - 40))
        frame[c.height // 3 : c.height // 3 + 40, x : x + 40] = (40, 200, 240)
        return frame

    def _row(self) -> np.ndarray:
        c = self.config
        t = self._n / 100.0
        base = np.asarray([np.sin(2 * np.pi * (5 + i) * t + i) for i in range(c.channels)], dtype=np.float32)
        row = base + self._rng.normal(0, 0.05, size=c.channels).astype(np.float32)
        if c.anomaly_every and (self._n % c.anomaly_every) < 16:
            row *= 4.0
        return row


def create(config: SyntheticSourceConfig, name: str) -> SyntheticSource:
    return SyntheticSource(config, name)
