"""Runtime backends, registered in one place.

Each backend is one module with ``NAME``, a config model,
``probe()`` (version or ``RuntimeUnavailable``) and ``load(path, **options)``.
A backend whose import fails is logged and skipped, never fatal.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

from agent.errors import AgentError, ModelLoadError, RuntimeUnavailable
from agent.runtime.base import Model, ModelInfo, QuantParams, TensorInfo

__all__ = ["Model", "ModelInfo", "QuantParams", "TensorInfo", "load_model", "model_format", "runtime_report"]

log = structlog.get_logger(__name__)

# Order is preference: for .tflite LiteRT first, tflite-runtime as fallback.
BACKEND_MODULES = {
    "litert": "agent.runtime.litert",
    "tflite-runtime": "agent.runtime.tflite_runtime",
    "onnxruntime": "agent.runtime.onnxruntime",
}
# What each backend runs, known without importing it (its import may be what fails).
BACKEND_FORMATS = {"litert": ("tflite",), "tflite-runtime": ("tflite",), "onnxruntime": ("onnx",)}
FORMAT_SUFFIXES = {".tflite": "tflite", ".onnx": "onnx"}


def backend(name: str) -> ModuleType:
    """The backend module called ``name`` (raises AgentError for an unknown name)."""
    if name not in BACKEND_MODULES:
        raise AgentError(f"unknown runtime {name!r}", f"use one of {', '.join(BACKEND_MODULES)}")
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except ImportError as exc:  # a broken optional dependency must not take the agent down
        log.warning("runtime backend failed to import", runtime=name, error=str(exc))
        raise RuntimeUnavailable(f"runtime {name} failed to import: {exc}", "reinstall its package") from None


def model_format(path: Path) -> str:
    fmt = FORMAT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelLoadError(f"{path.name}: unknown model type {path.suffix!r}", "give a .tflite or .onnx model")
    return fmt


@dataclass
class RuntimeStatus:
    name: str
    formats: tuple[str, ...]
    available: bool
    version: str | None = None
    reason: str | None = None
    providers: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"formats": list(self.formats)}


def runtime_report() -> list[RuntimeStatus]:
    """Which runtimes are usable here, their versions, and why the others are not."""
    report = []
    for name in BACKEND_MODULES:
        try:
            mod = backend(name)
            version = mod.probe()
            providers = mod.available_providers() if hasattr(mod, "available_providers") else None
            report.append(RuntimeStatus(name, BACKEND_FORMATS[name], True, version, providers=providers))
        except AgentError as exc:
            report.append(RuntimeStatus(name, BACKEND_FORMATS[name], False, reason=str(exc)))
    return report


def load_model(
    path: str | Path,
    runtime: str | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    delegates: list[Any] | None = None,
    warm_up: bool = True,
    provider_options: dict[str, dict[str, Any]] | None = None,
    inter_op_threads: int | None = None,
    graph_optimization: str | None = None,
) -> Model:
    """Load ``path`` with ``runtime`` or the first usable backend for its format.

    ``providers``, ``provider_options``, ``inter_op_threads`` and ``graph_optimization`` are ONNX Runtime's,
    ``delegates`` TFLite's; each backend takes every option it can use or refuses it with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist", "check the path")
    fmt = model_format(path)
    if runtime is not None:
        if runtime not in BACKEND_MODULES:
            raise AgentError(f"unknown runtime {runtime!r}", f"use one of {', '.join(BACKEND_MODULES)}")
        candidates = [runtime]
        if fmt not in BACKEND_FORMATS[runtime]:
            raise ModelLoadError(f"runtime {runtime} cannot run {fmt} models", f"pick a runtime for .{fmt} files")
    else:
        candidates = [n for n in BACKEND_MODULES if fmt in BACKEND_FORMATS[n]]
    reasons = []
    for name in candidates:
        try:
            mod = backend(name)
            mod.probe()
        except RuntimeUnavailable as exc:
            reasons.append(str(exc))
            continue
        session = {"inter_op_threads": inter_op_threads, "graph_optimization": graph_optimization}
        model = mod.load(
            path,
            threads=threads,
            providers=providers,
            delegates=delegates,
            provider_options=provider_options,
            **(session if name == "onnxruntime" else {}),
        )
        if warm_up:
            model.warm_up()
        return model
    raise RuntimeUnavailable(
        f"no usable runtime for {path.name}: " + "; ".join(reasons),
        "pip install 'edge-inference-agent[litert]'" if fmt == "tflite" else "pip install 'edge-inference-agent[onnx]'",
    )
