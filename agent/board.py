"""Board detection from the device tree and L4T release file, sysfs temperatures, and the thermal decision.

Everything reads files under a ``root`` directory so tests can point it at copies of real boards' files.
"""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.profiles import FirmwareProfile, ThermalConfig, available_profiles

DT_MODEL = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
DT_COMPATIBLE = ("proc/device-tree/compatible", "sys/firmware/devicetree/base/compatible")
NV_TEGRA_RELEASE = "etc/nv_tegra_release"
_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)")
# L4T release -> JetPack release, for the releases that matter here; others are reported as "<major>.x".
_JETPACK = {
    "32.4.3": "4.4", "32.4.4": "4.4.1", "32.5.0": "4.5", "32.5.1": "4.5.1", "32.5.2": "4.5.1", "32.6.1": "4.6",
    "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4", "32.7.5": "4.6.5", "32.7.6": "4.6.6",
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}  # fmt: skip
_JETPACK_MAJOR = {"32": "4", "34": "5", "35": "5", "36": "6", "38": "7"}
_MACHINE_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
_PLAUSIBLE_C = (-50.0, 200.0)  # outside: a sensor that is off or absent (Orin Nano's cv zones read -256 C)

ThermalState = Literal["normal", "throttle", "critical"]


@dataclass(frozen=True)
class BoardInfo:
    """What :func:`detect_board` found; ``profile_id`` is None when no profile matches (see ``reason``)."""

    profile_id: str | None
    machine: str
    model: str | None = None
    compatible: tuple[str, ...] = ()
    l4t_release: str | None = None  # "32.7.1"
    jetpack: str | None = None  # "4.6.1", or "6.x" for releases not in the table
    evidence: dict[str, str] = field(default_factory=dict)  # file (or "platform.machine()") -> what it said
    matched_by: tuple[str, ...] = ()  # the detection rules that matched
    reason: str = ""
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _first(root: Path, candidates: tuple[str, ...]) -> tuple[str, str] | None:
    for rel in candidates:
        text = _read_text(root / rel)
        if text is not None:
            return "/" + rel, text
    return None


def parse_l4t_release(text: str) -> tuple[str, str] | None:
    """``# R32 (release), REVISION: 7.1, ...`` -> ("32.7.1", "4.6.1"); None when it is not such a line."""
    m = _RELEASE.search(text)
    if m is None:
        return None
    major, minor, patch = m.groups()
    release = f"{major}.{minor}.{patch}"
    jetpack = _JETPACK.get(release) or (f"{_JETPACK_MAJOR[major]}.x" if major in _JETPACK_MAJOR else None)
    return release, jetpack or "unknown"


def _word_in(needle: str, haystack: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack, re.IGNORECASE) is not None


def _hits(profile: FirmwareProfile, model: str | None, compatible: tuple[str, ...]) -> list[str]:
    rules = profile.detection
    hits = [f"model has {s!r}" for s in rules.model if model and _word_in(s, model)]
    entries = {c.lower() for c in compatible}
    hits += [f"compatible has {c!r}" for c in rules.compatible if c.lower() in entries]
    return hits


def detect_board(
    root: Path = Path("/"),
    machine: str | None = None,
    profiles: Mapping[str, FirmwareProfile] | None = None,
) -> BoardInfo:
    """Match the board under ``root`` against the profiles' detection rules (default: all available profiles).

    The profile with the most model/compatible hits wins; failing any, a profile listing ``machine`` (default
    ``platform.machine()``) in its ``detection.machine``; failing that, ``profile_id`` is None and ``reason`` says why.
    """
    root = Path(root)
    profiles = available_profiles() if profiles is None else profiles
    raw_machine = machine if machine is not None else platform.machine()
    machine = _MACHINE_ALIASES.get(raw_machine.lower(), raw_machine.lower())
    board = BoardInfo(profile_id=None, machine=raw_machine, evidence={"platform.machine()": raw_machine})
    if (found := _first(root, DT_MODEL)) is not None:
        model = found[1].split("\0")[0].strip() or None
        board = replace(board, model=model, evidence={**board.evidence, found[0]: model or ""})
    if (found := _first(root, DT_COMPATIBLE)) is not None:
        compatible = tuple(c.strip() for c in found[1].split("\0") if c.strip())
        board = replace(board, compatible=compatible, evidence={**board.evidence, found[0]: ", ".join(compatible)})
    if (text := _read_text(root / NV_TEGRA_RELEASE)) is not None:
        first_line = text.strip().splitlines()[0].strip() if text.strip() else ""
        l4t, jetpack = parse_l4t_release(text) or (None, None)
        board = replace(
            board, l4t_release=l4t, jetpack=jetpack, evidence={**board.evidence, "/" + NV_TEGRA_RELEASE: first_line}
        )

    scored = [(len(h), pid, h) for pid, p in profiles.items() if (h := _hits(p, board.model, board.compatible))]
    scored.sort(key=lambda t: (-t[0], t[1]))
    warnings: list[str] = []
    if scored:
        _, pid, hits = scored[0]
        ties = [other for n, other, _ in scored[1:] if n == len(hits)]
        if ties:
            warnings.append(f"board also matches profile(s) {', '.join(ties)} equally well; chose {pid}")
        reason = f"{pid}: " + "; ".join(hits)
    else:
        by_machine = sorted(pid for pid, p in profiles.items() if machine in {m.lower() for m in p.detection.machine})
        if not by_machine:
            described = f"model {board.model!r}" if board.model else "no device-tree model"
            if board.compatible:
                described += f", compatible {', '.join(board.compatible)}"
            known = ", ".join(sorted(profiles)) or "none"
            reason = f"no firmware profile matches this board ({described}, machine {raw_machine}); known: {known}"
            return replace(board, reason=reason)
        pid, hits = by_machine[0], [f"machine is {raw_machine!r}"]
        reason = f"{pid}: no board profile matched; fallback by machine {raw_machine!r}"

    profile = profiles[pid]
    if profile.arch != machine:
        warnings.append(f"profile {pid} is for {profile.arch} but this machine is {raw_machine}: wheels may be missing")
    l4t = board.l4t_release
    if profile.detection.l4t and l4t is not None and f"R{l4t.split('.')[0]}" not in profile.detection.l4t:
        expected = "/".join(profile.detection.l4t)
        warnings.append(
            f"profile {pid} is written for L4T {expected} but this board runs R{l4t} (JetPack {board.jetpack})"
        )
    return replace(board, profile_id=pid, matched_by=tuple(hits), reason=reason, warnings=tuple(warnings))


def _read_millidegrees(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = int(text.strip()) / 1000.0
    except ValueError:
        return None
    return value if _PLAUSIBLE_C[0] <= value <= _PLAUSIBLE_C[1] else None


def _zone_key(zone: Path) -> tuple[int, str]:
    digits = re.sub(r"\D", "", zone.name)
    return (int(digits) if digits else -1, zone.name)


def read_temperatures(profile: FirmwareProfile | ThermalConfig, root: Path = Path("/")) -> dict[str, float]:
    """Degrees C by sensor: thermal zones whose ``type`` is in ``zone_types``, then the explicit ``paths``.

    Zones are keyed by type (``type/thermal_zoneN`` for a repeated type), explicit files by their zone's type or
    their path. Unreadable sensors and implausible readings are left out, so the result may be empty.
    """
    thermal = profile.thermal if isinstance(profile, FirmwareProfile) else profile
    root = Path(root)
    temps: dict[str, float] = {}
    seen: set[Path] = set()
    wanted = set(thermal.zone_types)
    zone_dir = root / thermal.zone_dir.lstrip("/")
    if wanted and zone_dir.is_dir():
        for zone in sorted(zone_dir.glob("thermal_zone*"), key=_zone_key):
            kind = (_read_text(zone / "type") or "").strip()
            if kind not in wanted:
                continue
            seen.add((zone / "temp").resolve())
            value = _read_millidegrees(zone / "temp")
            if value is not None:
                temps[f"{kind}/{zone.name}" if kind in temps else kind] = value
    for rel in thermal.paths:
        path = root / rel.lstrip("/")
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        value = _read_millidegrees(path)
        if value is None:
            continue
        kind = (_read_text(path.parent / "type") or "").strip()
        temps[kind if kind and kind not in temps else rel] = value
    return temps


class Thresholds(Protocol):
    throttle_c: float
    critical_c: float
    resume_c: float


def throttle_decision(temp_c: float | None, thresholds: Thresholds, currently_throttled: bool) -> ThermalState:
    """``critical`` at or above critical_c; ``throttle`` at or above throttle_c, or while throttled until the
    temperature falls below resume_c; else ``normal``. No reading (None or NaN) keeps the current state."""
    if temp_c is None or math.isnan(temp_c):
        return "throttle" if currently_throttled else "normal"
    if temp_c >= thresholds.critical_c:
        return "critical"
    if temp_c >= thresholds.throttle_c or (currently_throttled and temp_c >= thresholds.resume_c):
        return "throttle"
    return "normal"
