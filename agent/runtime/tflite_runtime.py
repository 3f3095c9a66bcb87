"""``tflite-runtime`` backend: fallback for .tflite when LiteRT is not installed.

tflite-runtime 2.14 (its last release) crashes under NumPy 2, so it is refused
there with an explanation instead of failing deep inside the interpreter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.errors import RuntimeUnavailable
from agent.runtime.tflite_common import DelegateEntry, TFLiteModel, load_with

NAME = "tflite-runtime"


class TFLiteRuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = NAME
    threads: int | None = Field(default=None, gt=0)  # num_threads of the interpreter
    delegates: list[DelegateEntry] = []


def numpy_incompatibility(numpy_version: str) -> str | None:
    """Why tflite-runtime cannot run beside this NumPy, or None when it can."""
    major = int(numpy_version.split(".")[0])
    if major >= 2:
        return (
            f"tflite-runtime needs NumPy < 2 but NumPy {numpy_version} is installed "
            "(it fails with 'SystemError ... returned a result with an exception set')"
        )
    return None


def probe() -> str:
    problem = numpy_incompatibility(np.__version__)
    try:
        from tflite_runtime import interpreter  # noqa: F401
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"tflite-runtime is not importable: {exc}", "pip install 'edge-inference-agent[tflite]' (needs NumPy < 2)"
        ) from None
    if problem:
        raise RuntimeUnavailable(
            problem, "use ai-edge-litert (pip install 'edge-inference-agent[litert]') or pip install 'numpy<2'"
        )
    try:
        return metadata.version("tflite-runtime")
    except metadata.PackageNotFoundError:
        return "unknown"


def load(
    path: Path,
    threads: int | None = None,
    delegates: Sequence[str | Mapping[str, Any]] | None = None,  # library, or {library, options}
    providers: list[str] | None = None,  # ONNX Runtime's: shared settings (profile, CLI) that do not apply to TFLite
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> TFLiteModel:
    """Open ``path`` with ``threads`` and the external ``delegates`` (a library, or {library, options}), each loaded or refused."""
    version = probe()
    from tflite_runtime import interpreter

    return load_with(interpreter, NAME, version, path, threads, delegates)
