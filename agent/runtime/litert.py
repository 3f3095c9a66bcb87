"""LiteRT backend (``ai-edge-litert``): the preferred runtime for .tflite models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.errors import RuntimeUnavailable
from agent.runtime.tflite_common import DelegateEntry, TFLiteModel, load_with

NAME = "litert"


class LiteRTConfig(BaseModel):
    """``[runtime] type = "litert"``: threads and optional external delegate libraries."""

    model_config = ConfigDict(extra="forbid")
    type: str = NAME
    threads: int | None = Field(default=None, gt=0)  # num_threads of the interpreter
    delegates: list[DelegateEntry] = []  # shared libraries loaded with load_delegate (e.g. Coral, GPU)


def probe() -> str:
    """Return the runtime version, or raise RuntimeUnavailable saying why it cannot be used."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"ai-edge-litert is not importable: {exc}", "pip install 'edge-inference-agent[litert]'"
        ) from None
    try:
        return metadata.version("ai-edge-litert")
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
    from ai_edge_litert import interpreter

    return load_with(interpreter, NAME, version, path, threads, delegates)
