"""The one ``Model`` interface every runtime backend implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agent.errors import InputError
from agent.runtime import quant

T = TypeVar("T")


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``.

    ``axis`` is None for per-tensor parameters, else the quantized dimension
    (per-channel: one scale and zero point per index along ``axis``).
    """

    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    axis: int | None = None
    in_graph: bool = False  # float tensor quantized inside the graph (ONNX QDQ), informative only

    @property
    def per_channel(self) -> bool:
        return len(self.scales) > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": list(self.scales) if self.per_channel else self.scales[0],
            "zero_point": list(self.zero_points) if self.per_channel else self.zero_points[0],
            "per_channel": self.per_channel,
            "axis": self.axis,
            "in_graph": self.in_graph,
        }


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (``-1`` or a symbol name for dynamic dims), dtype and quantization."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype
    quant: QuantParams | None = None
    index: int = 0

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None and not self.quant.in_graph and self.dtype.kind in "iu"

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) or d < 0 for d in self.shape)

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape with dynamic dims filled: the first dim with ``batch``, others with 1."""
        out = []
        for i, dim in enumerate(self.shape):
            if isinstance(dim, int) and dim >= 0:
                out.append(dim)
            else:
                out.append(batch if i == 0 else 1)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "quantization": self.quant.to_dict() if self.quant else None,
        }


@dataclass
class ModelInfo:
    """What a loaded model says about itself."""

    path: Path
    format: str  # "tflite" | "onnx"
    runtime: str
    runtime_version: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    threads: int | None = None
    providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "threads": self.threads,
            "providers": self.providers,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


class Model(abc.ABC):
    """A loaded model: describe inputs/outputs, predict, close.

    ``predict`` takes float (or already-quantized) arrays and returns float32
    outputs: float inputs to an int8/uint8 tensor are quantized with the model's
    own parameters and integer outputs are dequantized.
    """

    info: ModelInfo
    _fill_buffer: np.ndarray | None = None  # run_into's input buffer, made at the first call

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.info.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.info.outputs

    def predict(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Run one inference; returns outputs in model order, dequantized to float32."""
        return self.dequantize_outputs(self.predict_raw(inputs))

    def dequantize_outputs(self, raw: list[np.ndarray]) -> list[np.ndarray]:
        """Raw outputs (``run_raw``) to what ``predict`` returns: quantized integer outputs to float32."""
        return [quant.dequantize(a, t.quant) if t.is_quantized else a for t, a in zip(self.outputs, raw, strict=True)]

    def predict_raw(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """``predict`` without the dequantization: outputs as the runtime returns them."""
        return self.run_raw(self.model_inputs(inputs))

    def model_inputs(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """``inputs`` as ``run_raw`` takes them: one array per model input, in the input's dtype."""
        specs = self.info.inputs
        if type(inputs) is list and len(inputs) == 1 == len(specs):  # the common case, without _arrange
            return [self.prepare_input(specs[0], inputs[0])]
        arrays = self._arrange(inputs)
        return [self.prepare_input(t, a) for t, a in zip(self.inputs, arrays, strict=True)]

    def prepare_input(self, tensor: TensorInfo, array: np.ndarray) -> np.ndarray:
        """Cast or quantize ``array`` to ``tensor``'s dtype and check its shape."""
        if (  # the common case (pre-processing already produced the exact tensor): nothing to do
            type(array) is np.ndarray
            and array.dtype == tensor.dtype
            and array.shape == tensor.shape
            and array.flags.c_contiguous
        ):
            return array
        array = np.asarray(array)
        if array.ndim == len(tensor.shape) - 1 and tensor.shape and tensor.concrete_shape()[0] == 1:
            array = array[np.newaxis]
        if array.ndim != len(tensor.shape) or any(
            isinstance(d, int) and d >= 0 and d != s for d, s in zip(tensor.shape, array.shape, strict=False)
        ):
            raise InputError(
                f"input {tensor.name!r} has shape {list(array.shape)} but the model expects {list(tensor.shape)}",
                "give an array of the model's input shape (see `edge-agent describe MODEL`)",
            )
        if array.dtype == tensor.dtype:
            return np.ascontiguousarray(array)
        if tensor.is_quantized and array.dtype.kind == "f":
            return quant.quantize(array, tensor.quant, tensor.dtype)
        if tensor.dtype.kind in "iu" and array.dtype.kind == "f":
            raise InputError(
                f"input {tensor.name!r} is {tensor.dtype} without quantization parameters; got float data",
                f"give {tensor.dtype} data",
            )
        return np.ascontiguousarray(array.astype(tensor.dtype, copy=False))

    def _arrange(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            missing = [t.name for t in self.inputs if t.name not in inputs]
            if missing:
                raise InputError(f"missing model inputs {missing}", f"give arrays for {[t.name for t in self.inputs]}")
            return [inputs[t.name] for t in self.inputs]
        inputs = list(inputs)
        if len(inputs) != len(self.inputs):
            raise InputError(
                f"the model has {len(self.inputs)} inputs but {len(inputs)} arrays were given",
                f"give one array per input: {[t.name for t in self.inputs]}",
            )
        return inputs

    @abc.abstractmethod
    def run_raw(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run on arrays already in the model's dtypes; return raw outputs (no dequantization)."""

    def run_into(self, fill: Callable[[np.ndarray], T | None]) -> tuple[T | None, list[np.ndarray] | None]:
        """Run a one-input model on an input written in place: ``fill(buffer)`` writes the input into ``buffer`` (a
        C-contiguous array of the input's shape and dtype, possibly the runtime's own memory, valid only during the
        call) and returns a value, or None to give up. Returns that value and the raw outputs (None when it gave
        up, without running). Not thread-safe: callers serialize inference, as for ``run_raw``.
        """
        buffer = self._fill_buffer
        if buffer is None:
            (tensor,) = self.inputs
            buffer = self._fill_buffer = np.empty(tensor.concrete_shape(), dtype=tensor.dtype)
        done = fill(buffer)
        return (None, None) if done is None else (done, self.run_raw([buffer]))

    def warm_up(self) -> None:
        """One inference on zeros so first-call allocations happen at load time."""
        self.run_raw([np.zeros(t.concrete_shape(), dtype=t.dtype) for t in self.inputs])

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release the runtime's resources."""

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
