"""``fleet.toml``: where the fleet keeps its state and how it reaches the broker (documented in docs/fleet.md)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.errors import FleetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = "fleet.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Strict):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    ca: str | None = None  # CA bundle for mqtts://
    device_url: str | None = None  # what provisioned devices connect to; default: url
    device_prefix: str = "edge/{device_id}/"
    share_group: str = "fleet"  # MQTT 5 shared subscriptions: `fleet serve` instances split device traffic


class RolloutDefaults(_Strict):
    canary: int | None = None
    canary_percent: float | None = None
    wave_factor: float = 2.0
    max_failure_rate: float = Field(default=0.1, ge=0, le=1)
    min_terminal: int = Field(default=3, ge=1)
    device_timeout_s: float = Field(default=3600.0, gt=0)
    bake_s: float = Field(default=0.0, ge=0)
    offline_grace_s: float = Field(default=86_400.0, ge=0)


class ProvisionSettings(_Strict):
    credentials: str = "password"  # "password" (Mosquitto password file + ACL) or "certificate" (fleet CA)
    password_file: str | None = None  # Mosquitto password file to add devices to (default: <data_dir>/mosquitto/passwd)
    acl_file: str | None = None  # Mosquitto ACL file (default: <data_dir>/mosquitto/acl)


class FleetConfig(_Strict):
    """The whole ``fleet.toml``; relative paths are relative to the file."""

    data_dir: str = "fleet-data"
    database: str | None = None  # SQLAlchemy URL; default sqlite:///<data_dir>/fleet.sqlite
    server_id: str = Field(default_factory=lambda: socket.gethostname() or "fleet")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    rollout: RolloutDefaults = Field(default_factory=RolloutDefaults)
    provision: ProvisionSettings = Field(default_factory=ProvisionSettings)
    chunk_rate_limit_bps: float | None = Field(default=None, gt=0)  # cap on target bytes/s sent to devices
    offline_after_s: float = Field(default=120.0, gt=0)  # no message for this long: device shown offline
    telemetry_bucket_s: int = Field(default=60, gt=0)

    @property
    def data(self) -> Path:
        return Path(self.data_dir)

    @property
    def repository_dir(self) -> Path:
        return self.data / "repository"

    @property
    def keys_dir(self) -> Path:
        return self.data / "keys"

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{(self.data / 'fleet.sqlite').resolve()}"

    def broker_password(self) -> str | None:
        if self.broker.password_file:
            try:
                return Path(self.broker.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise FleetError(
                    f"cannot read broker.password_file: {exc.strerror}", "fix [broker].password_file"
                ) from None
        return self.broker.password


def load_fleet_config(path: str | Path | None) -> FleetConfig:
    """Read ``fleet.toml`` (or the defaults when ``path`` is None and ./fleet.toml does not exist)."""
    if path is None:
        env = os.environ.get("FLEET_CONFIG")
        path = Path(env) if env else Path(DEFAULT_CONFIG)
        if not path.exists():
            return FleetConfig(data_dir=str(Path.cwd() / FleetConfig().data_dir))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetError(
            f"config file {path} does not exist", "create it (see docs/fleet.md) or omit --config"
        ) from None
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}", "check its permissions") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path} is not valid TOML: {exc}", "fix the syntax at the position named") from None
    try:
        config = FleetConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise FleetError(
                f"{path}: unknown key {where!r}", "remove it or check its spelling (see docs/fleet.md)"
            ) from None
        raise FleetError(f"{path}: key {where!r}: {err['msg']}", "correct that key (see docs/fleet.md)") from None
    base = path.resolve().parent
    if not Path(config.data_dir).is_absolute():
        config.data_dir = str(base / config.data_dir)
    for section, key in (
        ("broker", "password_file"),
        ("broker", "ca"),
        ("provision", "password_file"),
        ("provision", "acl_file"),
    ):
        sub = getattr(config, section)
        value = getattr(sub, key)
        if value and not Path(value).is_absolute():
            setattr(sub, key, str(base / value))
    return config
