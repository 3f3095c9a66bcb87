"""Replay source: images from a directory (or glob), or sensor rows from a CSV file, at a set rate."""

from __future__ import annotations

import glob
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.errors import InputError
from agent.sources.base import Sample, Source

TYPE = "replay"


class ReplaySourceConfig(BaseModel):
    """``[sources.NAME] type = "replay"``: ``path`` is a directory, a glob, an image or a sensor CSV."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["replay"] = "replay"
    path: str
    rate: float = Field(default=10.0, gt=0)  # samples per second
    loop: bool = True
    channels: list[str] | None = None  # CSV: columns to read (default: all numeric columns)


Config = ReplaySourceConfig
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


class ReplaySource(Source):
    def __init__(self, config: ReplaySourceConfig, name: str) -> None:
        super().__init__(name)
        self.config = config
        self._items: list[Path] | np.ndarray | None = None
        self._index = 0
        self._next_due = 0.0
        self._done = False
        self.kind = "row" if config.path.lower().endswith(".csv") else "image"

    @property
    def nominal_rate(self) -> float:
        return self.config.rate

    def _load(self) -> None:
        from agent.inputs import read_series

        path = Path(self.config.path)
        if self.kind == "row":
            if not path.is_file():
                raise InputError(f"replay {self.name}: {path} does not exist", f"fix [sources.{self.name}].path")
            channels = self.config.channels or _header_channels(path)
            self._items = read_series(path, channels)
        else:
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            elif path.is_file():
                files = [path]
            else:
                files = sorted(Path(p) for p in glob.glob(self.config.path) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(
                    f"replay {self.name}: no images at {self.config.path}", f"fix [sources.{self.name}].path"
                )
            self._items = files
        self.health.connected = True

    def probe(self) -> str | None:
        try:
            self._load()
        except InputError as exc:
            return str(exc)
        return None

    @property
    def finished(self) -> bool:
        return self._done

    def read(self, timeout: float = 1.0) -> Sample | None:
        if self.closed or self._done:
            return None
        if self._items is None:
            try:
                self._load()
            except InputError as exc:
                self.health.errors += 1
                self.health.last_error = str(exc)
                self._wait(min(timeout, 1.0))
                return None
        assert self._items is not None
        now = time.monotonic()
        if self._next_due > now:
            wait = self._next_due - now
            if wait > timeout:
                self._wait(timeout)
                return None
            if self._wait(wait):
                return None
        self._next_due = max(self._next_due, time.monotonic() - 1.0) + 1.0 / self.config.rate
        if self._index >= len(self._items):
            if not self.config.loop:
                self._done = True
                return None
            self._index = 0
        item = self._items[self._index]
        self._index += 1
        if self.kind == "row":
            return self._sample(np.asarray(item, dtype=np.float32), gap=self._index == 1)
        from agent.inputs import read_image

        try:
            return self._sample(read_image(item))  # type: ignore[arg-type]
        except InputError as exc:
            self.health.errors += 1
            self.health.last_error = str(exc)
            return None


def _header_channels(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        first = fh.readline().strip()
    names = [c.strip() for c in first.split(",") if c.strip()]
    try:
        [float(n) for n in names]
    except ValueError:
        return names
    return [f"c{i}" for i in range(len(names))]


def create(config: ReplaySourceConfig, name: str) -> ReplaySource:
    return ReplaySource(config, name)
