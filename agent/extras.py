"""Optional features and the pip extras that bring their packages.

MQTT, signed updates and serial sources need packages that only their extra installs. Nothing imports them at
module load: ``missing_extras`` imports, for each feature the config turns on, exactly the modules the daemon will
load for it, and names the extra to install for each one that fails. ``edge-agent check`` reports what it returns
as failed checks and ``edge-agent run`` refuses to start on it, so a check that passes means run starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.config import AgentConfig

#: The distribution name on the package index (the commands stay ``edge-agent`` and ``fleet``).
DISTRIBUTION = "edge-inference-agent"

#: What the daemon imports for each feature (the ``agent.*`` modules import the third-party ones, some lazily).
FEATURE_MODULES: dict[str, tuple[str, ...]] = {
    "mqtt": (
        "paho.mqtt.client",
        "paho.mqtt.enums",
        "paho.mqtt.properties",
        "paho.mqtt.packettypes",
        "agent.mqtt.service",
    ),
    "update": ("tuf.ngclient", "securesystemslib.signer", "agent.update.manager"),
    "serial": ("serial", "agent.sources.serial"),
    # Signed device commands on cmd/...: their signatures are checked with the update extra's crypto.
    "commands": ("securesystemslib.signer", "agent.update.commands", "agent.update.trust"),
}


def pip_install(extras: str) -> str:
    """The pip line that installs this project with ``extras`` (comma-separated)."""
    return f"pip install '{DISTRIBUTION}[{extras}]'"


@dataclass(frozen=True)
class MissingExtra:
    """A configured feature whose packages cannot be imported."""

    check: str  # the name ``edge-agent check`` reports it under
    extra: str
    setting: str  # what turned it on, as the user wrote it
    reason: str  # the ImportError's message
    instead: str  # the other way out: turn the feature off

    @property
    def problem(self) -> str:
        return f"{self.setting} but its packages are not installed: {self.reason}"

    @property
    def fix(self) -> str:
        return f"{pip_install(self.extra)} or {self.instead}"

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})"


def import_problem(feature: str) -> str | None:
    """Import everything ``feature`` needs; the first ImportError's message, or None when all import."""
    for module in FEATURE_MODULES[feature]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return str(exc) or f"{module} cannot be imported"
    return None


def missing_extras(config: AgentConfig) -> list[MissingExtra]:
    """Each feature ``config`` turns on whose extra is not installed (empty when all are)."""
    missing: list[MissingExtra] = []
    if config.mqtt is not None and (reason := import_problem("mqtt")):
        missing.append(
            MissingExtra("mqtt", "mqtt", "[mqtt] is configured", reason, "remove [mqtt] and --broker to run offline")
        )
    if config.update.enabled and (reason := import_problem("update")):
        missing.append(MissingExtra("update", "update", "[update] is enabled", reason, "set [update].enabled = false"))
    serial_sources = [name for name, src in config.sources.items() if src.type == "serial"]
    if serial_sources and (reason := import_problem("serial")):
        names = ", ".join(serial_sources)
        missing.append(
            MissingExtra(
                f"source {serial_sources[0]}",
                "serial",
                f"source {names} {'is a serial source' if len(serial_sources) == 1 else 'are serial sources'}",
                reason,
                "use another source type",
            )
        )
    return missing


def require_extras(config: AgentConfig) -> None:
    """Raise one AgentError naming every configured feature whose extra is missing (the daemon's start check)."""
    missing = missing_extras(config)
    if len(missing) == 1:
        raise AgentError(missing[0].problem, missing[0].fix)
    if missing:
        raise AgentError("; ".join(m.problem for m in missing), pip_install(",".join(m.extra for m in missing)))


def commands_unavailable() -> str | None:
    """Why signed device commands cannot be verified here (the update extra is missing), or None."""
    reason = import_problem("commands")
    if reason is None:
        return None
    return f"their signatures need the update extra's packages: {reason} (fix: {pip_install('update')})"
