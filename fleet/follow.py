"""What `fleet deploy --wait` (and `rollout status --wait`, `rollback --wait`) says while it follows a rollout.

Pure functions over successive ``Operations.rollout()`` snapshots: one line per device state change, a countdown
for devices in their health window, and whether any fleet server is driving rollouts at all (its heartbeat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINISHED = ("aborted", "completed")
DEFAULT_HEALTH_WINDOW_S = 60.0  # the agent's [update].health_window_s default
SERVER_GRACE_S = 5.0  # a running server ticks every second: this long without a heartbeat means none is running
COUNTDOWN_EVERY_S = 10.0


@dataclass
class FollowState:
    """What the follower has seen so far."""

    started: float
    devices: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)
    status: str | None = None
    wave: int | None = None
    trial_since: dict[str, float] = field(default_factory=dict)
    last_countdown: dict[str, float] = field(default_factory=dict)
    server_warned: bool = False


def _device_text(device: str, record: dict[str, Any]) -> str:
    state = record.get("state") or "?"
    device_state = record.get("device_state")
    text = f"{device}: {state}" + (f" ({device_state})" if device_state and device_state != state else "")
    reason = record.get("reason")
    return text + (f": {reason}" if reason else "")


def changes(seen: FollowState, info: dict[str, Any], now: float, health_window_s: float | None) -> list[str]:
    """Lines for what changed since the last snapshot (updating ``seen``), countdowns included."""
    lines: list[str] = []
    status = info.get("status")
    if status != seen.status:
        reason = info.get("reason")
        lines.append(f"rollout {info.get('id')}: {status}" + (f" ({reason})" if reason else ""))
        seen.status = status
    summary = info.get("summary") or {}
    waves = summary.get("waves") or []
    wave = summary.get("wave")
    if waves and wave is not None and wave >= 0 and wave != seen.wave:
        lines.append(f"wave {wave + 1}/{len(waves)}: {waves[wave]} device(s)")
        seen.wave = wave
    window = health_window_s or DEFAULT_HEALTH_WINDOW_S
    for device, record in (info.get("devices") or {}).items():
        key = (record.get("state"), record.get("device_state"), record.get("reason"))
        in_trial = record.get("device_state") == "trial" and record.get("state") not in ("succeeded", "failed")
        if key != seen.devices.get(device):
            seen.devices[device] = key
            line = _device_text(device, record)
            if in_trial and device not in seen.trial_since:
                seen.trial_since[device] = now
                seen.last_countdown[device] = now
                source = "" if health_window_s else " (the agent's default)"
                line += f"; health window {window:g} s{source}"
            lines.append(line)
        if not in_trial:
            seen.trial_since.pop(device, None)
            seen.last_countdown.pop(device, None)
            continue
        since = seen.trial_since.setdefault(device, now)
        if now - seen.last_countdown.get(device, since) >= COUNTDOWN_EVERY_S:
            seen.last_countdown[device] = now
            left = window - (now - since)
            lines.append(
                f"{device}: trial, health window ends in about {left:.0f} s"
                if left > 0
                else f"{device}: trial, health window over {-left:.0f} s ago; waiting for its verdict"
            )
    return lines


def server_silent(heartbeat: float | None, now: float, grace_s: float = SERVER_GRACE_S) -> bool:
    """True when no fleet server has driven rollouts within ``grace_s`` (or ever)."""
    return heartbeat is None or now - heartbeat > grace_s


def silence_warning(heartbeat: float | None, now: float, config_hint: str) -> str:
    """One line: no fleet server is driving rollouts, since when, and what to run."""
    since = "has never run against this registry" if heartbeat is None else f"last ticked {now - heartbeat:.0f} s ago"
    return (
        f"fleet: warning: no fleet server is driving rollouts (`fleet serve` {since}); nothing will change until one"
        f" runs: start `fleet serve{config_hint}` in another terminal or in the background"
    )
