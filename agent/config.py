"""Daemon configuration (``agent.toml``): validated at start, errors name the key and the fix."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import AgentError
from agent.mqtt.result_policy import PublishPolicy
from agent.protocol import AWS_MAX_TOPIC_SLASHES, AZURE_PREFIX_TEMPLATE, topic_prefix_problem
from agent.sources import source_config_types

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[no-redef]

SAMPLES = Path(__file__).resolve().parent / "samples"


class ConfigError(AgentError):
    """agent.toml is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SourceConfig = Annotated[Union[source_config_types()], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007


class PipelineHealthConfig(_Strict):
    """``[pipelines.NAME.health]``: this pipeline's health-window settings; unset keys come from ``[update]``."""

    window_s: float | None = Field(default=None, gt=0, le=86_400)
    min_results: int | None = Field(default=None, ge=0, le=1_000_000)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    latency_factor: float | None = Field(default=None, gt=0, le=100)
    latency_floor_ms: float | None = Field(default=None, ge=0, le=600_000)


class PipelineConfig(_Strict):
    """One source -> one model -> sinks."""

    source: str
    model: str  # bundle directory, bundle archive or bare model file
    runtime: Literal["auto", "litert", "tflite-runtime", "onnxruntime"] = "auto"
    threads: int | None = Field(default=None, gt=0)
    providers: list[str] | None = None  # ONNX execution providers in order; default from the firmware profile
    delegates: list[str | dict[str, Any]] | None = None  # TFLite: a library, or {library = ..., options = {...}}
    # ONNX Runtime: options per execution provider (typed, see docs/config.md), session threads and graph level;
    # unset: the firmware profile's
    provider_options: dict[str, dict[str, str | int | float | bool]] | None = None
    inter_op_threads: int | None = Field(default=None, gt=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] | None = None
    max_fps: float | None = Field(default=None, gt=0)  # cap on inferences per second
    queue_size: int = Field(default=1, ge=1, le=64)  # frames waiting per stage; newest wins when full
    # where frames are pre-processed: a thread of its own, or the capture thread right after capture; auto: own
    # thread when the process may use 3 CPUs or more (capture, pre-processing and inference each get one)
    preprocess_thread: Literal["auto", "own", "capture"] = "auto"
    # where the model runs: a thread of the agent, or a process of its own (a GIL of its own: for fast models, whose
    # inference thread would otherwise wait for the GIL behind capture and publishing; the model is loaded twice);
    # auto: a process for a fast model that its source keeps busy, given 2 CPUs (pipeline.inference_in_process)
    inference: Literal["auto", "thread", "process"] = "auto"
    sinks: list[str] = Field(default_factory=lambda: ["stdout"])
    stall_timeout: float = Field(default=30.0, gt=0)  # an inference running longer than this is a stall
    window_stride: int | None = Field(default=None, gt=0)  # time series: override the bundle's stride
    publish: PublishPolicy | None = None  # MQTT result policy for this pipeline; default: [mqtt.results]
    health: PipelineHealthConfig = Field(default_factory=PipelineHealthConfig)  # update health window overrides

    @field_validator("provider_options")
    @classmethod
    def _typed_provider_options(
        cls, value: dict[str, dict[str, str | int | float | bool]] | None
    ) -> dict[str, dict[str, str | int | float | bool]] | None:
        from agent.runtime.onnxruntime import check_provider_options

        try:
            check_provider_options(value, where="")
        except AgentError as exc:
            raise ValueError(f"{exc.problem.lstrip('.')} (fix: {exc.fix})") from None
        return value

    @field_validator("delegates")
    @classmethod
    def _typed_delegates(cls, value: list[str | dict[str, Any]] | None) -> list[str | dict[str, Any]] | None:
        from agent.runtime.tflite_common import delegate_specs

        try:
            delegate_specs(value, where="")
        except AgentError as exc:
            raise ValueError(f"{exc.problem.lstrip('.')} (fix: {exc.fix})") from None
        return value

    @model_validator(mode="after")
    def _options_for_listed_providers(self) -> PipelineConfig:
        unlisted = sorted(set(self.provider_options or {}) - set(self.providers or self.provider_options or {}))
        if unlisted:
            raise ValueError(
                f"provider_options: options for {', '.join(unlisted)}, which providers does not list "
                f"(fix: add it to providers or remove its options)"
            )
        return self


class StdoutSinkConfig(_Strict):
    format: Literal["text", "json"] = "text"
    every: int = Field(default=1, ge=1)  # print every Nth result per pipeline


class JsonlSinkConfig(_Strict):
    path: str
    max_bytes: int = Field(default=50_000_000, gt=0)  # rotate to PATH.1 beyond this size


class SinksConfig(_Strict):
    stdout: StdoutSinkConfig = Field(default_factory=StdoutSinkConfig)
    jsonl: JsonlSinkConfig | None = None


class TlsConfig(_Strict):
    ca: str | None = None  # CA bundle to verify the broker; default: the system's
    cert: str | None = None  # client certificate (mutual TLS)
    key: str | None = None
    insecure: bool = False  # skip host name verification (testing only)


class OutboxConfig(_Strict):
    path: str | None = None  # default: <state_dir>/outbox.sqlite
    max_rows: int = Field(default=100_000, gt=0)
    max_bytes: int = Field(default=64 * 2**20, gt=0)
    max_age_s: float | None = Field(default=7 * 86400, gt=0)
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"  # FULL survives power loss too, at a cost per write


class HomeAssistantConfig(_Strict):
    enabled: bool = False
    discovery_prefix: str = "homeassistant"
    name: str | None = None  # device name shown in Home Assistant; default: device_id


class PredictConfig(_Strict):
    enabled: bool = True
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    rate: float = Field(default=5.0, gt=0)  # requests per second (token bucket)
    burst: int = Field(default=10, gt=0)
    reply_prefixes: list[str] = Field(default_factory=list)  # allowed reply topics besides the device's own prefix


class MqttConfig(_Strict):
    """``[mqtt]``: the broker connection and what goes over it."""

    broker: str = "mqtt://127.0.0.1:1883"  # mqtt://[user:pass@]host[:port] or mqtts://... (TLS)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None  # default: device_id
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls: TlsConfig | None = None
    keepalive: int = Field(default=30, ge=5, le=65535)
    # what the platform can carry (docs/protocol.md): "aws" checks topic depth and $aws/; "azure" turns off
    # subscriptions (predict, commands, updates), retained messages and Home Assistant discovery
    platform: Literal["generic", "aws", "azure"] = "generic"
    topic_prefix: str = "edge/{device_id}/"  # under platform = "azure": devices/{device_id}/messages/events/
    qos: Literal[1] = 1  # results and events are QoS 1 (AWS IoT Core has no QoS 2)
    telemetry_interval: float = Field(default=30.0, gt=0)
    max_payload_bytes: int = Field(default=128 * 1024, gt=0)  # AWS IoT Core's limit
    inflight: int = Field(default=20, ge=1, le=1000)
    reconnect_min: float = Field(default=1.0, gt=0)
    reconnect_max: float = Field(default=60.0, gt=0)
    session_expiry: int = Field(default=0, ge=0)  # MQTT 5; 0: no broker-side session (the outbox is the buffer)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    results: PublishPolicy = Field(default_factory=PublishPolicy)
    home_assistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @field_validator("broker")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @model_validator(mode="after")
    def _platform(self) -> MqttConfig:
        if self.platform == "azure" and "topic_prefix" not in self.model_fields_set:
            self.topic_prefix = AZURE_PREFIX_TEMPLATE
        if self.platform != "azure" and self.topic_prefix and not self.topic_prefix.endswith("/"):
            self.topic_prefix += "/"  # as earlier versions did: 'edge/{device_id}' means the levels below it
        # messages "KEY: problem (fix: ...)" are turned into one line naming mqtt.KEY by format_validation_error
        problem = topic_prefix_problem(self.topic_prefix, self.platform)
        if problem:
            where = f" (platform = {self.platform!r})" if self.platform != "generic" else ""
            raise ValueError(f"topic_prefix: {problem[0]}{where} (fix: {problem[1]})")
        if self.platform == "aws" and self.home_assistant.enabled:
            deepest = f"{self.home_assistant.discovery_prefix}/binary_sensor/node/object/config"
            if deepest.count("/") > AWS_MAX_TOPIC_SLASHES or self.home_assistant.discovery_prefix.startswith("$"):
                raise ValueError(
                    f"home_assistant.discovery_prefix: {self.home_assistant.discovery_prefix!r} does not fit AWS IoT "
                    f"Core (discovery topics may have {AWS_MAX_TOPIC_SLASHES} '/', no '$') "
                    f"(fix: at most {AWS_MAX_TOPIC_SLASHES - 4} '/' and no '$' in it, e.g. 'homeassistant')"
                )
        if self.platform == "azure":
            if self.home_assistant.enabled:
                raise ValueError(
                    "home_assistant.enabled: Azure IoT Hub carries no Home Assistant discovery (no retained "
                    "messages, no topics outside devices/<id>/messages/events/) (fix: set enabled = false)"
                )
            if self.predict.enabled and "enabled" in self.predict.model_fields_set:
                raise ValueError(
                    "predict.enabled: Azure IoT Hub allows no subscription to the predict topic "
                    "(fix: set enabled = false; predictions on request need a generic broker or AWS IoT Core)"
                )
        return self


class UpdateConfig(_Strict):
    """``[update]``: signed model updates from the fleet (needs ``[mqtt]``)."""

    enabled: bool = False
    trust_root: str | None = None  # the fleet's root.json, pinned at provisioning (used until rotated by TUF)
    hardware_id: str | None = None  # default: the firmware profile id, else the machine type (e.g. x86_64)
    groups: list[str] = Field(default_factory=list)  # deployment commands for these groups apply to this device
    chunk_size: int = Field(default=96 * 1024, ge=1024, le=16 * 2**20)  # under the broker's payload limit
    window: int = Field(default=32, ge=1, le=256)  # chunks in flight
    request_timeout_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=8, ge=1)
    free_space_margin_mb: float = Field(default=64.0, ge=0)
    latency_runs: int = Field(default=20, ge=1)
    # the post-activation health window (docs/updates.md); a pipeline's [pipelines.NAME.health] and the deployment
    # override these
    health_window_s: float = Field(default=60.0, gt=0, le=86_400)
    health_min_results: int = Field(default=20, ge=0, le=1_000_000)
    health_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    health_latency_factor: float = Field(default=2.0, gt=0, le=100)  # rolled back when p95 > factor x previous ...
    health_latency_floor_ms: float = Field(default=5.0, ge=0, le=600_000)  # ... and more than this above it
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    retry_after_s: float = Field(default=30.0, gt=0)  # a failed download/refresh is retried after this
    max_attempts: int = Field(default=3, ge=1)  # per state, across restarts (crash-loop guard)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://user:pass@host:1883`` / ``mqtts://host:8883`` (or a bare ``host[:port]``)."""
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL scheme {parts.scheme!r} is not mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return BrokerAddress(parts.hostname, port, tls, user, password)


class AgentConfig(_Strict):
    device_id: str = Field(
        default_factory=lambda: socket.gethostname() or "edge-device", pattern=r"^[A-Za-z0-9_.:-]{1,128}$"
    )
    profile: str = "auto"  # firmware profile id, or auto-detect from the board
    state_dir: str = Field(
        default_factory=lambda: os.environ.get("STATE_DIRECTORY", "").split(":")[0] or str(_default_state())
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    status_interval: float = Field(default=5.0, gt=0)  # seconds between STATUS= updates and stats logs
    thermal_interval: float | None = Field(default=None, gt=0)  # default: the firmware profile's poll interval
    board_root: str = "/"  # where /proc and /sys are read (board detection, temperatures); for containers and tests
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    mqtt: MqttConfig | None = None  # no [mqtt] table and no --broker: results stay local
    update: UpdateConfig = Field(default_factory=UpdateConfig)

    @field_validator("sources", "pipelines")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"name {name!r} may only hold letters, digits, '-' and '_'")
        return value

    @model_validator(mode="after")
    def _references(self) -> AgentConfig:
        if not self.pipelines:
            raise ValueError("no [pipelines.NAME] defined: add at least one pipeline")
        for name, pipe in self.pipelines.items():
            if pipe.source not in self.sources:
                known = ", ".join(self.sources) or "none defined"
                raise ValueError(f"pipelines.{name}.source: no source named {pipe.source!r} (known: {known})")
            for sink in pipe.sinks:
                if sink not in ("stdout", "jsonl"):
                    raise ValueError(f"pipelines.{name}.sinks: unknown sink {sink!r} (known: stdout, jsonl)")
                if sink == "jsonl" and self.sinks.jsonl is None:
                    raise ValueError(f"pipelines.{name}.sinks uses 'jsonl' but [sinks.jsonl] has no path")
        if self.update.enabled and self.mqtt is None:
            raise ValueError("[update] is enabled but there is no [mqtt] table: updates come over MQTT")
        if self.update.enabled and self.mqtt is not None and self.mqtt.platform == "azure":
            raise ValueError(
                "update.enabled: [mqtt] platform = 'azure' and IoT Hub allows no subscription to the update topics "
                "(fix: set [update] enabled = false; updates need a generic broker or AWS IoT Core)"
            )
        if self.mqtt is not None and self.mqtt.platform == "azure":
            prefix = self.mqtt.topic_prefix.format(device_id=self.device_id)
            if prefix != AZURE_PREFIX_TEMPLATE.format(device_id=self.device_id):
                raise ValueError(
                    f"mqtt.topic_prefix: {self.mqtt.topic_prefix!r} names another device than device_id "
                    f"{self.device_id!r} (fix: set {AZURE_PREFIX_TEMPLATE!r})"
                )
        return self


def _default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-agent"


def format_validation_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # drop the discriminator tags pydantic inserts (e.g. sources.cam.camera.device -> sources.cam.device)
    if len(loc) >= 3 and loc[0] == "sources" and loc[2] in ("camera", "serial", "replay", "synthetic"):
        del loc[2]
    where = ".".join(loc)
    msg = err["msg"].removeprefix("Value error, ")
    keyed = re.fullmatch(r"([A-Za-z0-9_][A-Za-z0-9_.]*): (.*) \(fix: (.*)\)", msg, re.DOTALL)
    if err["type"] == "value_error" and keyed:  # a validator's "KEY: problem (fix: ...)" below the location
        return ConfigError(f"{source}: key {'.'.join([*loc, keyed[1]])!r}: {keyed[2]}", keyed[3])
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{source}: unknown key {where!r}", "remove it or check its spelling (see docs/config.md)")
    if err["type"] == "union_tag_invalid":
        return ConfigError(f"{source}: {where}: {msg}", "set type to camera, serial, replay or synthetic")
    if where:
        return ConfigError(f"{source}: key {where!r}: {msg}", "correct that key (see docs/config.md)")
    return ConfigError(f"{source}: {msg}", "see docs/config.md")


def parse_config(data: dict[str, Any], source: str = "agent.toml", base_dir: Path | None = None) -> AgentConfig:
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source) from None
    if base_dir is not None:  # relative model/file paths are relative to the config file
        for pipe in config.pipelines.values():
            if not Path(pipe.model).is_absolute() and not pipe.model.startswith("sample:"):
                pipe.model = str((base_dir / pipe.model).resolve())
        if config.update.trust_root and not Path(config.update.trust_root).is_absolute():
            config.update.trust_root = str((base_dir / config.update.trust_root).resolve())
        if config.mqtt is not None:  # credentials beside the config (a provisioned device's files) stay found
            mqtt = config.mqtt
            if mqtt.password_file and not Path(mqtt.password_file).is_absolute():
                mqtt.password_file = str((base_dir / mqtt.password_file).resolve())
            if mqtt.tls is not None:
                for key in ("ca", "cert", "key"):
                    value = getattr(mqtt.tls, key)
                    if value and not Path(value).is_absolute():
                        setattr(mqtt.tls, key, str((base_dir / value).resolve()))
    for pipe in config.pipelines.values():
        if pipe.model.startswith("sample:"):
            pipe.model = str(SAMPLES / pipe.model.removeprefix("sample:"))
    return config


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist", "create it (see docs/config.md) or omit --config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}", "check permissions and encoding") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the syntax at the position named") from None
    return parse_config(data, str(path), base_dir=path.resolve().parent)


def default_config(device_id: str | None = None) -> AgentConfig:
    """The embedded default: the sample classifier over the sample digits and the anomaly model over sensor data."""
    inputs = SAMPLES / "inputs"
    data: dict[str, Any] = {
        "sources": {
            "digits": {"type": "replay", "path": str(inputs / "digit_*.png"), "rate": 2.0},
            "vibration": {"type": "replay", "path": str(inputs / "sensor_anomalous.csv"), "rate": 50.0},
        },
        "pipelines": {
            "digits": {"source": "digits", "model": "sample:digits-classifier-tflite"},
            "vibration": {"source": "vibration", "model": "sample:sensor-anomaly"},
        },
    }
    if device_id:
        data["device_id"] = device_id
    return parse_config(data, "embedded default config")
