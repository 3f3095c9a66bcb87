"""The wire contract between devices, the fleet server and IoT backends (documented in docs/protocol.md).

Everything for one device lives under a prefix (default ``edge/<device_id>/``):

    status                 retained; online/offline (the LWT sets offline)
    telemetry              every N seconds
    results/<pipeline>     one message per published result, with a sequence id
    events                 things that happened (errors, thermal changes, update states)
    cmd/<name>             commands in (fleet)
    ack                    command acknowledgements out
    predict                prediction requests in (MQTT 5 response topic + correlation data,
                           or ``reply_to``/``correlation`` fields for MQTT 3.1.1)

Inbound payloads are validated strictly here; nothing else in the agent parses wire data.
The fleet imports this module; this module imports nothing from the agent beyond the standard library and pydantic.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROTOCOL_VERSION = 1
DEFAULT_PREFIX_TEMPLATE = "edge/{device_id}/"
DEVICE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
AWS_IOT_MAX_PAYLOAD = 128 * 1024


class ProtocolError(ValueError):
    """An inbound payload that does not follow the contract; the message says what is wrong."""


# ---- topics -------------------------------------------------------------------------------------


def validate_topic_level(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+#\0"):
        raise ProtocolError(f"{what} {value!r} must be non-empty and free of '/', '+', '#'")
    return value


@dataclass(frozen=True)
class Topics:
    """The topic names of one device."""

    prefix: str  # always ends with '/'

    @classmethod
    def for_device(cls, device_id: str, template: str = DEFAULT_PREFIX_TEMPLATE) -> Topics:
        if not DEVICE_ID.match(device_id):
            raise ProtocolError(f"device id {device_id!r} may only hold letters, digits and _ . : -")
        prefix = template.format(device_id=device_id)
        if not prefix.endswith("/"):
            prefix += "/"
        if any(c in prefix for c in "+#\0") or prefix.startswith("/"):
            raise ProtocolError(f"topic prefix {prefix!r} must not start with '/' or contain '+', '#'")
        return cls(prefix)

    @property
    def status(self) -> str:
        return self.prefix + "status"

    @property
    def telemetry(self) -> str:
        return self.prefix + "telemetry"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    def results(self, pipeline: str) -> str:
        return self.prefix + "results/" + validate_topic_level(pipeline, "pipeline name")

    @property
    def results_wildcard(self) -> str:
        return self.prefix + "results/+"

    @property
    def commands(self) -> str:
        return self.prefix + "cmd/+"

    def command(self, name: str) -> str:
        return self.prefix + "cmd/" + validate_topic_level(name, "command name")

    @property
    def ack(self) -> str:
        return self.prefix + "ack"

    @property
    def predict(self) -> str:
        return self.prefix + "predict"

    @property
    def predict_reply(self) -> str:
        """Default reply topic for prediction requests that name none."""
        return self.prefix + "predict/reply"

    def owns(self, topic: str) -> bool:
        return topic.startswith(self.prefix)


# The topic registry: every topic the agent uses under its device prefix (``<x>``: one level filled in at run time),
# with its direction. Outside the prefix it uses ``fleet/targets/<sha256>/<chunk_size>/<index>`` (updates, in) and,
# with Home Assistant discovery, ``<discovery_prefix>/<component>/<node>/<object>/config`` (out) and
# ``<discovery_prefix>/status`` (in).
DEVICE_TOPICS: dict[str, Literal["in", "out"]] = {
    "status": "out",
    "telemetry": "out",
    "events": "out",
    "results/<pipeline>": "out",
    "ack": "out",
    "predict": "in",
    "predict/reply": "out",
    "cmd/<name>": "in",
    "update/deploy": "in",
    "update/fetch": "out",
    "update/file": "in",
    "update/chunks": "out",
    "update/status": "out",
    "update/state/<pipeline>": "out",
}
FLEET_TOPICS = ("fleet/targets/<sha256>/<chunk_size>/<index>",)
AZURE_PREFIX_TEMPLATE = "devices/{device_id}/messages/events/"
AWS_MAX_TOPIC_SLASHES = 7  # AWS IoT Core: at most 7 forward slashes in a topic name or filter


@dataclass(frozen=True)
class PlatformProfile:
    """What an MQTT platform can carry (``[mqtt] platform``); the agent turns off what it cannot."""

    name: Literal["generic", "aws", "azure"]
    subscriptions: bool = True  # predict, cmd/+, update topics, <discovery_prefix>/status
    retain: bool = True  # retained status (and LWT), discovery configs, update states
    discovery: bool = True  # Home Assistant discovery
    max_topic_slashes: int | None = None


PLATFORMS: dict[str, PlatformProfile] = {
    "generic": PlatformProfile("generic"),
    "aws": PlatformProfile("aws", max_topic_slashes=AWS_MAX_TOPIC_SLASHES),
    # IoT Hub: device-to-cloud only on devices/<id>/messages/events/, subscriptions only to its own topics,
    # nothing retained
    "azure": PlatformProfile("azure", subscriptions=False, retain=False, discovery=False),
}


def topic_prefix_problem(template: str, platform: str = "generic") -> tuple[str, str] | None:
    """Why ``[mqtt] topic_prefix`` cannot be used on ``platform`` and the fix, or None when it can.

    ``template`` may hold ``{device_id}`` (a device id has no '/', '+', '#' or '$'), so the checks hold for
    every device.
    """
    try:
        prefix = template.format(device_id="DEVICE")
    except (KeyError, IndexError, ValueError):
        return f"{template!r} holds braces other than {{device_id}}", "use only the placeholder {device_id}"
    if platform == "azure":
        if not re.fullmatch(r"devices/(\{device_id\}|[A-Za-z0-9_.:-]{1,128})/messages/events/", template):
            return (
                f"{template!r} is not an Azure IoT Hub device-to-cloud topic",
                f"set it to {AZURE_PREFIX_TEMPLATE!r} or leave it unset",
            )
        return None
    if prefix.startswith("$"):
        what = (
            "$aws/ topics are reserved by AWS IoT Core" if prefix.startswith("$aws/") else "'$' topics are the broker's"
        )
        return f"{template!r}: {what}", "use a prefix without '$', e.g. 'things/{device_id}/'"
    if any(c in prefix for c in "+#\0"):
        return f"{template!r} holds a wildcard '+' or '#'", "remove it, e.g. 'edge/{device_id}/'"
    if not prefix.endswith("/"):
        return f"{template!r} does not end with '/'", f"write {template + '/'!r}"
    if "" in prefix[:-1].split("/"):
        return f"{template!r} has an empty topic level (a leading '/' or '//')", "remove the extra '/'"
    profile = PLATFORMS.get(platform)
    if profile is not None and profile.max_topic_slashes is not None:
        deepest = deepest_device_topic(prefix)
        if deepest.count("/") > profile.max_topic_slashes:
            room = profile.max_topic_slashes - (deepest.count("/") - prefix.count("/"))
            return (
                f"{template!r} is too deep for AWS IoT Core: {deepest!r} has {deepest.count('/')} '/' "
                f"(at most {profile.max_topic_slashes})",
                f"shorten the prefix to at most {room} levels, e.g. 'things/{{device_id}}/'",
            )
    return None


def deepest_device_topic(prefix: str) -> str:
    """The registry topic under ``prefix`` with the most levels (the one a platform's depth limit bites first)."""
    return max((prefix + suffix for suffix in DEVICE_TOPICS), key=lambda t: t.count("/"))


def discovery_topic(discovery_prefix: str, component: str, node_id: str, object_id: str) -> str:
    """Home Assistant MQTT discovery config topic."""
    node = re.sub(r"[^A-Za-z0-9_-]", "_", node_id)
    return f"{discovery_prefix}/{component}/{node}/{object_id}/config"


# ---- outbound payloads ----------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")
    v: int = PROTOCOL_VERSION


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = ""


class StatusPayload(_Out):
    """Retained on ``status``. ``state`` is ``offline`` in the LWT and on a clean shutdown."""

    state: Literal["online", "offline"]
    device_id: str
    ts: float
    agent_version: str | None = None
    models: dict[str, ModelRef] = Field(default_factory=dict)  # pipeline -> model it runs (what it actually runs)
    profile: str | None = None
    reason: str | None = None  # offline: "shutdown" | "connection lost" (LWT)


class ResultPayload(_Out):
    """One result on ``results/<pipeline>``; ``(device_id, pipeline, seq)`` identifies it (consumers deduplicate)."""

    device_id: str
    pipeline: str
    seq: int
    ts: float
    capture_ts: float | None = None
    task: str
    model: str
    version: str
    latency_ms: float


class EventPayload(_Out):
    device_id: str
    ts: float
    kind: str  # e.g. "pipeline_failed", "thermal", "source_lost", "update"
    level: Literal["info", "warning", "error"] = "info"
    detail: dict[str, Any] = Field(default_factory=dict)


class PredictResponse(_Out):
    ok: bool
    id: str | None = None
    correlation: str | None = None  # MQTT 3.1.1 only: echoed from the request
    pipeline: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


def encode(payload: BaseModel | dict[str, Any]) -> bytes:
    """Compact JSON bytes for the wire."""
    data = payload.model_dump(exclude_none=True) if isinstance(payload, BaseModel) else payload
    return json.dumps(data, separators=(",", ":"), allow_nan=False, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---- inbound payloads -----------------------------------------------------------------------------


class TensorData(BaseModel):
    """A tensor on the wire: raw little-endian bytes, base64, with dtype and shape."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "float16", "int8", "uint8", "int32", "int64"]
    shape: list[int] = Field(min_length=1, max_length=8)
    data: str  # base64

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d <= 0 or d > 1 << 20 for d in value):
            raise ValueError("dimensions must be between 1 and 1048576")
        return value

    def decoded(self) -> bytes:
        return b64decode(self.data, "tensor data")


class PredictRequest(BaseModel):
    """A prediction request on ``predict``: exactly one of ``image`` (base64 PNG/JPEG) or ``tensor``/``tensors``."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    id: str | None = Field(default=None, max_length=128)
    pipeline: str | None = Field(default=None, pattern=PIPELINE_NAME.pattern)  # whose model; default: the first one
    image: str | None = None
    tensor: TensorData | None = None
    tensors: dict[str, TensorData] | None = Field(default=None, max_length=16)
    reply_to: str | None = Field(default=None, max_length=512)  # MQTT 3.1.1: where to answer
    correlation: str | None = Field(default=None, max_length=256)  # MQTT 3.1.1: echoed back

    @model_validator(mode="after")
    def _one_input(self) -> PredictRequest:
        given = [k for k in ("image", "tensor", "tensors") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'image', 'tensor' or 'tensors'")
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.v} is not supported (this agent speaks {PROTOCOL_VERSION})")
        if self.reply_to is not None and (not self.reply_to or any(c in self.reply_to for c in "+#\0")):
            raise ValueError("reply_to must be a topic name without wildcards")
        return self


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not valid base64") from None


def parse_json_object(payload: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    """Decode a JSON object payload, refusing oversize, non-UTF-8, non-object or non-finite input."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} is {len(payload)} bytes, over the {max_bytes}-byte limit")
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_predict_request(payload: bytes, max_bytes: int) -> PredictRequest:
    data = parse_json_object(payload, "prediction request", max_bytes)
    try:
        return PredictRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        raise ProtocolError(f"prediction request: {where}: {err['msg'].removeprefix('Value error, ')}") from None


def parse_status(payload: bytes) -> StatusPayload:
    data = parse_json_object(payload, "status", AWS_IOT_MAX_PAYLOAD)
    try:
        return StatusPayload.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"status: {exc.errors()[0]['msg']}") from None
