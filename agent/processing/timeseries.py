"""Time-series windows for sensor models: slicing, streaming windowing, standardization."""

from __future__ import annotations

import numpy as np

from agent.bundle import TimeSeriesInput
from agent.errors import BundleError, InputError
from agent.runtime.base import TensorInfo


def sliding_windows(samples: np.ndarray, window: int, stride: int) -> np.ndarray:
    """(rows, channels) -> (n_windows, window, channels); a view, no copy."""
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[0] < window:
        return np.empty((0, window, samples.shape[-1] if samples.ndim == 2 else 0), dtype=samples.dtype)
    views = np.lib.stride_tricks.sliding_window_view(samples, window, axis=0)[::stride]
    return views.transpose(0, 2, 1)


class Windower:
    """Streaming windowing: push rows as they arrive, get each complete window once.

    Memory is bounded by one window: a ring of ``window`` rows.
    """

    def __init__(self, window: int, stride: int, channels: int) -> None:
        if window <= 0 or stride <= 0:
            raise ValueError("window and stride must be positive")
        self.window, self.stride, self.channels = window, stride, channels
        self._buf = np.zeros((window, channels), dtype=np.float32)
        self._filled = 0
        self._since_last: int | None = None

    def push(self, row: np.ndarray) -> np.ndarray | None:
        """Add one row; return a (window, channels) copy when a window completes."""
        row = np.asarray(row, dtype=np.float32).reshape(-1)
        if row.shape[0] != self.channels:
            raise InputError(f"sensor row has {row.shape[0]} values, expected {self.channels}", "check the line format")
        self._buf = np.roll(self._buf, -1, axis=0)
        self._buf[-1] = row
        self._filled = min(self._filled + 1, self.window)
        if self._filled < self.window:
            return None
        if self._since_last is not None:
            self._since_last += 1
            if self._since_last < self.stride:
                return None
        self._since_last = 0
        return self._buf.copy()

    def reset(self) -> None:
        """Forget partial data (after a gap in the stream a window must not span it)."""
        self._filled = 0
        self._since_last = None


class WindowPreprocessor:
    """Standardizes a (window, channels) block and lays it out as the model input."""

    def __init__(self, spec: TimeSeriesInput, tensor: TensorInfo) -> None:
        channels = len(spec.channels)
        want = spec.window * channels
        concrete = tensor.concrete_shape()
        if int(np.prod(concrete)) != want:
            raise BundleError(
                f"bundle window {spec.window} x {channels} channels = {want} values, "
                f"but model input {tensor.name!r} {list(tensor.shape)} holds {int(np.prod(concrete))}",
                "fix [input].window / channels in bundle.toml",
            )
        for key in ("mean", "std"):
            values = getattr(spec, key)
            if values is not None and len(values) != channels:
                raise BundleError(f"[input].{key} has {len(values)} values for {channels} channels", f"give {channels}")
        self.spec, self.tensor, self.shape = spec, tensor, concrete
        self._mean = np.asarray(spec.mean, dtype=np.float32) if spec.mean else None
        self._std = np.asarray(spec.std, dtype=np.float32) if spec.std else None
        if self._std is not None and np.any(self._std == 0):
            raise BundleError("[input].std contains 0", "use non-zero standard deviations")

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """(window, channels) raw sensor values -> float32 model input (quantized later by the model)."""
        window = np.asarray(window, dtype=np.float32)
        expected = (self.spec.window, len(self.spec.channels))
        if window.shape != expected:
            raise InputError(
                f"sensor window has shape {list(window.shape)}, expected {list(expected)}", "check the input"
            )
        if self._mean is not None:
            window = window - self._mean
        if self._std is not None:
            window = window / self._std
        if self.spec.layout == "NCW":
            window = window.T
        return np.ascontiguousarray(window.reshape(self.shape))
