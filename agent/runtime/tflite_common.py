"""Shared TFLite interpreter wrapper for the LiteRT and tflite-runtime backends (same API)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError, InputError, ModelLoadError
from agent.runtime.base import Model, ModelInfo, QuantParams, T, TensorInfo

log = structlog.get_logger(__name__)
TFLITE_MAGIC = b"TFL3"
_stderr_lock = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[list[str]]:
    """Capture what the C++ runtime prints on fd 2 (e.g. "INFO: Created TensorFlow Lite XNNPACK delegate").

    INFO lines are dropped; anything else is collected in the yielded list for the
    caller to log (on success) or to leave to the error it raises (on failure).
    """
    kept: list[str] = []
    with _stderr_lock, tempfile.TemporaryFile(mode="w+b") as tmp:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield kept
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            kept.extend(ln for ln in text.splitlines() if ln.strip() and not ln.startswith("INFO:"))


def check_tflite_file(path: Path) -> None:
    """Refuse files that are not TFLite flatbuffers before the runtime sees them."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {path}: {exc.strerror}", "check the path and permissions") from None
    if size < 16 or head[4:8] != TFLITE_MAGIC:
        raise ModelLoadError(
            f"{path.name} is not a TFLite model (missing TFL3 identifier; corrupt, truncated or another format)",
            "re-export or re-download the model",
        )


def _quant(detail: dict[str, Any]) -> QuantParams | None:
    qp = detail.get("quantization_parameters") or {}
    scales = np.asarray(qp.get("scales", []), dtype=np.float64)
    zeros = np.asarray(qp.get("zero_points", []), dtype=np.int64)
    if scales.size == 0:
        scale, zero = detail.get("quantization", (0.0, 0))
        if not scale:
            return None
        return QuantParams((float(scale),), (int(zero),))
    if zeros.size == 1 and scales.size > 1:
        zeros = np.repeat(zeros, scales.size)
    axis = int(qp.get("quantized_dimension", 0)) if scales.size > 1 else None
    return QuantParams(tuple(float(s) for s in scales), tuple(int(z) for z in zeros), axis)


def _tensor_info(detail: dict[str, Any]) -> TensorInfo:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorInfo(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in shape),
        dtype=np.dtype(detail["dtype"]),
        quant=_quant(detail),
        index=int(detail["index"]),
    )


class TFLiteModel(Model):
    """A TFLite model run by an ``Interpreter`` class (LiteRT's or tflite-runtime's)."""

    def __init__(
        self,
        path: Path,
        interpreter_cls: Any,
        runtime: str,
        runtime_version: str,
        threads: int | None = None,
        delegates: list[Any] | None = None,
    ) -> None:
        check_tflite_file(path)
        try:
            with quiet_native_stderr() as said:
                self._interp = interpreter_cls(
                    model_path=str(path), num_threads=threads, experimental_delegates=delegates or None
                )
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(_explain(path, exc), _fix_for(exc)) from None
        if said:
            log.warning("tflite runtime messages at load", model=path.name, messages=said)
        self.info = ModelInfo(
            path=path,
            format="tflite",
            runtime=runtime,
            runtime_version=runtime_version,
            inputs=[_tensor_info(d) for d in self._interp.get_input_details()],
            outputs=[_tensor_info(d) for d in self._interp.get_output_details()],
            threads=threads,
        )
        self._shapes = {t.index: tuple(t.concrete_shape()) for t in self.info.inputs}
        first = self.info.inputs[0] if self.info.inputs else None
        single = first is not None and len(self.info.inputs) == 1 and not first.is_dynamic
        self._static_shape = tuple(first.concrete_shape()) if single and first is not None else None
        self._first_index = first.index if first is not None else -1
        self._output_indices = [t.index for t in self.info.outputs]

    def run_raw(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        interp = self._interp
        if len(inputs) == 1 and self._static_shape is not None and inputs[0].shape == self._static_shape:
            interp.set_tensor(self._first_index, inputs[0])  # the common case: one input of the loaded shape
            self._invoke()
            return [interp.get_tensor(i) for i in self._output_indices]
        for tensor, array in zip(self.info.inputs, inputs, strict=True):
            if self._shapes[tensor.index] != array.shape:
                self._resize(tensor, array.shape)
            interp.set_tensor(tensor.index, array)
        self._invoke()
        return [interp.get_tensor(t.index) for t in self.info.outputs]

    def run_into(self, fill: Callable[[np.ndarray], T | None]) -> tuple[T | None, list[np.ndarray] | None]:
        """``fill`` writes straight into the interpreter's input tensor: no input array, no ``set_tensor`` copy."""
        (tensor,) = self.info.inputs
        if self._shapes[tensor.index] != self._static_shape:  # resized for another caller's shape
            return super().run_into(fill)
        interp = self._interp
        view = interp.tensor(tensor.index)()
        try:
            done = fill(view)
        finally:
            del view  # the interpreter refuses to run while a view of its memory is alive
        if done is None:
            return None, None
        self._invoke()
        return done, [interp.get_tensor(t.index) for t in self.info.outputs]

    def _invoke(self) -> None:
        try:
            self._interp.invoke()
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                f"inference failed: {str(exc).strip().splitlines()[0]}", "check the input shapes"
            ) from None

    def _resize(self, tensor: TensorInfo, shape: tuple[int, ...]) -> None:
        try:
            self._interp.resize_tensor_input(tensor.index, list(shape), strict=True)
            self._interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                f"input {tensor.name!r} cannot take shape {list(shape)}: {str(exc).strip().splitlines()[0]}",
                f"give shape {list(tensor.shape)}",
            ) from None
        self._shapes[tensor.index] = shape

    def close(self) -> None:
        self._interp = None  # type: ignore[assignment]


class DelegateSpec(BaseModel):
    """An external delegate: its shared library and the options ``load_delegate`` hands it (as strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    library: str = Field(min_length=1)
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


DelegateEntry = str | DelegateSpec  # a bare library, or a library with options


def delegate_specs(
    delegates: Sequence[str | DelegateSpec | Mapping[str, Any]] | None, where: str = "delegates"
) -> list[tuple[str, dict[str, str]]]:
    """(library, options) for each delegate: a bare library name, or ``{library = ..., options = {...}}``.

    A bad entry raises AgentError naming ``where.N.KEY`` and the fix.
    """
    specs = []
    for index, entry in enumerate(delegates or []):
        if isinstance(entry, str):
            specs.append((entry, {}))
            continue
        try:
            spec = entry if isinstance(entry, DelegateSpec) else DelegateSpec.model_validate(entry)
        except ValidationError as exc:
            first = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
            loc = [str(p) for p in first["loc"]]
            key = ".".join(loc[:2] if loc[0] == "options" else loc)  # drop pydantic's union-member tag
            if first["type"] == "extra_forbidden":
                problem, fix = f"{where}.{index}.{key}: unknown key", "a delegate takes library and options"
            elif loc[0] == "options":
                problem, fix = f"{where}.{index}.{key}: not a string, number or boolean", "give the option one value"
            else:
                message = str(first["msg"]).removeprefix("Value error, ")
                problem, fix = f"{where}.{index}.{key}: {message}", 'write {library = "lib.so", options = {...}}'
            raise AgentError(problem, fix) from None
        specs.append((spec.library, {k: _option_text(v) for k, v in spec.options.items()}))
    return specs


def _option_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # delegates parse options themselves: lower-case is the common form
    return str(value)


def load_with(
    module: Any,
    runtime: str,
    version: str,
    path: Path,
    threads: int | None,
    delegates: Sequence[str | DelegateSpec | Mapping[str, Any]] | None,
) -> TFLiteModel:
    """Load ``path`` with an interpreter module (LiteRT's or tflite-runtime's: same API)."""
    loaded: list[Any] = []
    for lib, options in delegate_specs(delegates):
        failure = _load_delegate(module, lib, options, loaded)
        if failure is not None:
            raise ModelLoadError(
                f"delegate {lib!r} failed to load: {failure}",
                "install the delegate library, give its full path, check its options, "
                "or leave --delegate / delegates out",
            )
    return TFLiteModel(path, module.Interpreter, runtime, version, threads=threads, delegates=loaded)


def _load_delegate(module: Any, lib: str, options: dict[str, str], loaded: list[Any]) -> str | None:
    """Load one delegate into ``loaded``; on failure return the reason, with the runtime's own noise kept off stderr
    (its half-made Delegate object raises again in ``__del__``, which Python would print as a traceback)."""
    failure: str | None = None
    saved_hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        with quiet_native_stderr():
            try:
                loaded.append(module.load_delegate(lib, options or None))
            except (ValueError, OSError, RuntimeError, AttributeError) as exc:
                failure = " ".join(str(exc).split())[:300] or type(exc).__name__
            gc.collect()
    finally:
        sys.unraisablehook = saved_hook
    return failure


def _explain(path: Path, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "custom op" in lowered or "unresolved" in lowered or "didn't find op" in lowered or "op builtin_code" in lowered:
        return f"{path.name} needs an operator this TFLite runtime does not provide: {text[:300]}"
    return f"{path.name} could not be loaded by TFLite: {text[:300]}"


def _fix_for(exc: BaseException) -> str:
    lowered = str(exc).lower()
    if "custom op" in lowered or "unresolved" in lowered or "didn't find op" in lowered:
        return "re-export the model with builtin ops only, or use a runtime/delegate that provides the op"
    return "re-export or re-download the model"
