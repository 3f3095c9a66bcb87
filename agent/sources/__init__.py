"""Input-source plugins, registered in one place.

Each module defines ``TYPE``, ``Config`` (a pydantic model with ``type: Literal[TYPE]``)
and ``create(config, name)``. Optional dependencies (pyserial, ...) are imported by the
source when it opens, so every config class validates even where a library is missing;
a plugin module that fails to import is logged and left out, never fatal.
"""

from __future__ import annotations

import importlib
from typing import Any

import structlog

from agent.sources.base import Backoff, FrameHint, Sample, Source, SourceHealth

__all__ = ["Backoff", "FrameHint", "Sample", "Source", "SourceHealth", "create_source", "source_config_types"]

log = structlog.get_logger(__name__)

SOURCE_MODULES = {
    "camera": "agent.sources.camera",
    "serial": "agent.sources.serial",
    "replay": "agent.sources.replay",
    "synthetic": "agent.sources.synthetic",
}


def _modules() -> dict[str, Any]:
    loaded = {}
    for name, path in SOURCE_MODULES.items():
        try:
            loaded[name] = importlib.import_module(path)
        except ImportError as exc:
            log.warning("source plugin failed to import", source_type=name, error=str(exc))
    return loaded


def source_config_types() -> tuple[type, ...]:
    """The config classes of every importable source plugin (for the config's discriminated union)."""
    return tuple(m.Config for m in _modules().values())


def create_source(config: Any, name: str) -> Source:
    module = _modules()[config.type]
    return module.create(config, name)
