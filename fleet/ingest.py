"""Screening of device messages before they reach the registry: one bad message never takes its batch down.

Pure code (no I/O). Each message is checked on its own, against what the database can store faithfully:

* a string (value or key) with a lone surrogate or a NUL character cannot be stored as text (UTF-8 encoding fails;
  PostgreSQL refuses NUL): the message is quarantined;
* an integer outside the signed 64-bit range of the database's BIGINT: quarantined;
* nesting deeper than ``MAX_DEPTH``: quarantined;
* a string longer than its column (``COLUMN_LIMITS``) or than ``MAX_STRING`` anywhere else is cut to fit, ending in
  ``CUT_MARKER``, and the message goes on (counted as normalised).

An honest agent never sends the first three; a quarantined message is kept (as ASCII-escaped JSON, cut to
``MAX_QUARANTINED``) with its reason so an operator can look at it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32
MAX_STRING = 4096
MAX_QUARANTINED = 16 * 1024
CUT_MARKER = "...[cut]"
# Top-level fields stored in bounded columns (fleet/db.py), per message kind.
COLUMN_LIMITS: dict[str, dict[str, int]] = {
    "status": {"reason": 256, "agent_version": 64, "profile": 128},
    "update": {"update_id": 128, "command_id": 128, "pipeline": 64, "state": 32, "target": 512, "version": 64},
    "event": {"kind": 64, "level": 16},
    "ack": {"id": 128},
    "telemetry": {},
}
_BAD_CHAR = re.compile("[\ud800-\udfff\x00]")


class Poison(Exception):
    """The message cannot be stored faithfully; ``str()`` is the reason."""


@dataclass(frozen=True)
class Screened:
    """The outcome for one message: ``data`` to ingest (possibly with fields cut), or a quarantine ``reason``."""

    data: dict[str, Any] | None
    reason: str | None = None
    cut: int = 0  # strings cut to fit


def screen(kind: str, data: dict[str, Any]) -> Screened:
    """Check and normalise one decoded message of ``kind`` (a key of ``COLUMN_LIMITS``)."""
    limits = COLUMN_LIMITS.get(kind, {})
    cuts = [0]
    try:
        clean = {_key(k, "$"): _value(v, f"$.{_label(k)}", 1, limits.get(k, MAX_STRING), cuts) for k, v in data.items()}
    except Poison as exc:
        return Screened(None, str(exc))
    return Screened(clean, None, cuts[0])


def quarantine_text(data: Any) -> str:
    """The message as ASCII-only JSON (lone surrogates escaped, huge integers as digits), cut to fit the table."""
    try:
        text = json.dumps(data, ensure_ascii=True, default=repr)
    except (ValueError, RecursionError):
        text = ascii(data)
    return cut(text, MAX_QUARANTINED)


def cut(text: str, limit: int) -> str:
    """``text`` when it fits in ``limit`` characters, else its start followed by ``CUT_MARKER`` (``limit`` in all)."""
    return text if len(text) <= limit else text[: max(0, limit - len(CUT_MARKER))] + CUT_MARKER


def _label(key: Any) -> str:
    """A key as it may appear in a reason: printable ASCII, short."""
    text = str(key)
    return text if text.isascii() and text.isprintable() and len(text) <= 40 else ascii(text[:40])


def _key(key: str, where: str) -> str:
    if _BAD_CHAR.search(key):
        raise Poison(f"a key in {where} {_what(key)}")
    return cut(key, MAX_STRING) if len(key) > MAX_STRING else key


def _what(text: str) -> str:
    return "contains a NUL character" if "\x00" in text else "contains a lone surrogate (not valid Unicode)"


def _value(value: Any, where: str, depth: int, limit: int, cuts: list[int]) -> Any:
    if isinstance(value, str):
        if _BAD_CHAR.search(value):
            raise Poison(f"{where} {_what(value)}")
        if len(value) > limit:
            cuts[0] += 1
            return cut(value, limit)
        return value
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value  # non-finite floats never get here: the JSON decoder refuses them
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise Poison(f"{where} is an integer outside the database's 64-bit range")
        return value
    if depth >= MAX_DEPTH:
        raise Poison(f"{where} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {
            _key(k, where): _value(v, f"{where}.{_label(k)}", depth + 1, MAX_STRING, cuts) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_value(v, f"{where}[{i}]", depth + 1, MAX_STRING, cuts) for i, v in enumerate(value)]
    raise Poison(f"{where} is not a JSON value ({type(value).__name__})")


def safe_text(text: str) -> str:
    """``text`` with lone surrogates and NUL characters written as escapes (storable as text anywhere)."""
    return _BAD_CHAR.sub(lambda m: ascii(m.group())[1:-1], text)
