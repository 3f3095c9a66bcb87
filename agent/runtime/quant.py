"""Affine quantization helpers (pure NumPy)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agent.runtime.base import QuantParams


@functools.lru_cache(maxsize=256)
def _broadcast(params: QuantParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(params.scales, dtype=np.float32)
    zero = np.asarray(params.zero_points, dtype=np.float32)
    if params.per_channel and params.axis is not None:
        shape = [1] * ndim
        shape[params.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    elif not params.per_channel:
        scale, zero = scale.reshape(()), zero.reshape(())
    scale.setflags(write=False)
    zero.setflags(write=False)
    return scale, zero


def quantize(x: np.ndarray, params: QuantParams, dtype: np.dtype) -> np.ndarray:
    """Float -> integer: ``round(x / scale) + zero_point``, saturated to ``dtype``."""
    scale, zero = _broadcast(params, np.ndim(x))
    info = np.iinfo(dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) / scale + zero)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """Integer -> float32: ``scale * (q - zero_point)``."""
    scale, zero = _broadcast(params, np.ndim(q))
    out = q.astype(np.float32)
    out -= zero
    out *= scale
    return out


def uint8_lut(params: QuantParams | None, dtype: np.dtype, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Lookup table per channel mapping a uint8 pixel straight to the model's input value.

    ``value = (pixel - mean) / std``, then quantized when ``params`` is given.
    Returns an array of shape (256, channels) in ``dtype``.
    """
    pixels = np.arange(256, dtype=np.float32)[:, None]
    real = (pixels - mean[None, :]) / std[None, :]
    if params is not None and np.dtype(dtype).kind in "iu":
        return quantize(real, params, dtype)
    return real.astype(dtype)
