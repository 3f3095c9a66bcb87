"""structlog set-up: JSON lines under systemd or when piped, readable output in a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for this process; logs go to stderr."""
    if json is None:
        json = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID")) or not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def configure_cli(level: str = "warning") -> None:
    """Logging for one-shot commands: ``edge-agent: <level>: <event> [key=value ...]`` lines on stderr, no colour."""

    def render(_: object, method: str, event: structlog.typing.EventDict) -> str:
        message = event.pop("event", "")
        event.pop("timestamp", None)
        lvl = event.pop("level", method)
        extra = " ".join(f"{k}={v}" for k, v in event.items() if not k.startswith("_"))
        return f"edge-agent: {lvl}: {message}" + (f" ({extra})" if extra else "")

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, render],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
