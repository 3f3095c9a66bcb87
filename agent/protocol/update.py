"""Wire contract of model updates (documented in docs/protocol.md, section "Updates").

Topics (device prefix ``edge/<device_id>/``, fleet prefix ``fleet/``)::

    <prefix>update/deploy          in, retained: the signed deployment command for this device
    <prefix>cmd/<name>             in: signed device commands (restart, reload, set, diagnostics)
    <prefix>update/fetch           out: TUF metadata requests {id, path, offset}
    <prefix>update/file            in: metadata responses {id, path, status, offset, total, data}
    <prefix>update/chunks          out: target chunk requests {target, chunk_size, chunks}
    fleet/targets/<sha256>/<chunk_size>/<index>
                                   in: raw bytes of one target chunk, published once for every
                                       device downloading it (the broker does the fan-out)
    <prefix>update/status          out: every update state transition (at-least-once, in order)
    <prefix>update/state/<pipeline> out, retained: the latest of them

Signed documents (deployment and device commands) are ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``;
the signature covers ``canonical_bytes(signed)`` and the keys that may sign are listed in the TUF root metadata
under ``COMMAND_KEYS_FIELD`` (rotated with the root, like every other key).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.protocol import (
    AWS_IOT_MAX_PAYLOAD,
    DEVICE_ID,
    PIPELINE_NAME,
    PROTOCOL_VERSION,
    ProtocolError,
    Topics,
    b64decode,
    parse_json_object,
)

#: Field of the TUF root's ``signed`` object listing the fleet's online command keys:
#: ``{"keys": {keyid: {keytype, scheme, keyval}}, "threshold": n}``.
COMMAND_KEYS_FIELD = "x-edge-command-keys"
#: Field of a TUF target's ``custom`` object: ``{"name", "version", "hardware": [...], "task"}``.
TARGET_CUSTOM_FIELD = "edge"
FLEET_PREFIX = "fleet/"
#: Default chunk size: 96 KiB of raw bytes stays under AWS IoT Core's 128 KB payload limit with room to spare.
DEFAULT_CHUNK_SIZE = 96 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
#: Raw bytes of metadata per ``update/file`` response (base64 makes it 4/3 larger on the wire).
METADATA_PIECE = 64 * 1024
MAX_CHUNKS_PER_REQUEST = 256
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# TUF metadata paths the fetcher may ask for (consistent snapshots: "<version>.<role>.json").
METADATA_PATH = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?(?:root|timestamp|snapshot|targets|[A-Za-z0-9_-]{1,64})\.json$")
TARGET_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}){0,3}$")


# ---- topics -------------------------------------------------------------------------------------


def deploy_topic(topics: Topics) -> str:
    return topics.prefix + "update/deploy"


def fetch_topic(topics: Topics) -> str:
    return topics.prefix + "update/fetch"


def file_topic(topics: Topics) -> str:
    return topics.prefix + "update/file"


def chunk_request_topic(topics: Topics) -> str:
    return topics.prefix + "update/chunks"


def update_status_topic(topics: Topics) -> str:
    return topics.prefix + "update/status"


def update_state_topic(topics: Topics, pipeline: str) -> str:
    """Retained: the latest update state of one pipeline (a server that missed messages catches up from it)."""
    return topics.prefix + "update/state/" + pipeline


def chunk_topic(sha256: str, chunk_size: int, index: int | None = None) -> str:
    """Where the fleet publishes chunk ``index`` of a target (``+`` for every chunk when index is None)."""
    if not SHA256_HEX.match(sha256):
        raise ProtocolError(f"target hash {sha256!r} is not 64 lowercase hex digits")
    tail = "+" if index is None else str(int(index))
    return f"{FLEET_PREFIX}targets/{sha256}/{int(chunk_size)}/{tail}"


def parse_chunk_topic(topic: str) -> tuple[str, int, int]:
    """``(sha256, chunk_size, index)`` of a chunk topic; ProtocolError when it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] + "/" != FLEET_PREFIX or parts[1] != "targets" or not SHA256_HEX.match(parts[2]):
        raise ProtocolError(f"{topic!r} is not a chunk topic")
    try:
        chunk_size, index = int(parts[3]), int(parts[4])
    except ValueError:
        raise ProtocolError(f"{topic!r} is not a chunk topic") from None
    if chunk_size < MIN_CHUNK_SIZE or index < 0:
        raise ProtocolError(f"{topic!r} is not a chunk topic")
    return parts[2], chunk_size, index


def request_wildcards(device_prefix_template: str = "edge/{device_id}/") -> dict[str, str]:
    """Subscriptions the fleet needs to serve every device: fetch and chunk requests, update states."""
    base = device_prefix_template.format(device_id="+")
    return {
        "fetch": base + "update/fetch",
        "chunks": base + "update/chunks",
        "status": base + "update/status",
        "state": base + "update/state/+",
    }


# ---- canonical form and signed envelopes --------------------------------------------------------


def canonical_bytes(data: Any) -> bytes:
    """The bytes a signature covers: UTF-8 JSON, keys sorted, no whitespace, no NaN/Infinity."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keyid: str = Field(min_length=1, max_length=128)
    sig: str = Field(min_length=1, max_length=1024)  # hex


class SignedEnvelope(BaseModel):
    """``{"signed": {...}, "signatures": [...]}``; what is inside ``signed`` is parsed by the verifier."""

    model_config = ConfigDict(extra="forbid")
    signed: dict[str, Any]
    signatures: list[Signature] = Field(min_length=1, max_length=16)


class DeployCommand(BaseModel):
    """The ``signed`` part of a deployment: which target a device (or a group) should run."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    type: Literal["deploy"] = "deploy"
    id: str = Field(min_length=1, max_length=128)  # rollout/command id, echoed in update states
    seq: int = Field(ge=1)  # strictly increasing per fleet; a device refuses seq <= the last it accepted
    issued: float = Field(ge=0)
    expires: float = Field(gt=0)
    device: str | None = Field(default=None, pattern=DEVICE_ID.pattern)
    group: str | None = Field(default=None, min_length=1, max_length=128)
    pipeline: str = Field(pattern=PIPELINE_NAME.pattern)
    target: str = Field(pattern=TARGET_PATH.pattern)  # TUF target path
    rollback: bool = False  # explicit signed rollback to a version the device ran before
    shadow_frames: int = Field(default=0, ge=0, le=100_000)
    shadow_agreement: float = Field(default=0.9, ge=0, le=1)
    # the health window after activation; unset: the pipeline's [pipelines.NAME.health], then the device's [update]
    health_window_s: float | None = Field(default=None, gt=0, le=86_400)
    health_latency_factor: float | None = Field(default=None, gt=0, le=100)
    health_latency_floor_ms: float | None = Field(default=None, ge=0, le=600_000)
    health_min_results: int | None = Field(default=None, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _addressed(self) -> DeployCommand:
        if (self.device is None) == (self.group is None):
            raise ValueError("name exactly one of 'device' or 'group'")
        if self.expires <= self.issued:
            raise ValueError("'expires' must be later than 'issued'")
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.v} is not supported (this agent speaks {PROTOCOL_VERSION})")
        return self


class DeviceCommand(BaseModel):
    """The ``signed`` part of a device command (``cmd/<name>``): restart, reload, set KEY=VALUE, diagnostics."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    type: Literal["command"] = "command"
    id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=1)
    issued: float = Field(ge=0)
    expires: float = Field(gt=0)
    device: str = Field(pattern=DEVICE_ID.pattern)
    name: Literal["restart", "reload", "set", "diagnostics"]
    args: dict[str, str] = Field(default_factory=dict, max_length=32)


def parse_envelope(payload: bytes, what: str, max_bytes: int = AWS_IOT_MAX_PAYLOAD) -> SignedEnvelope:
    data = parse_json_object(payload, what, max_bytes)
    try:
        return SignedEnvelope.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"{what}: {_first_error(exc)}") from None


def parse_deploy_command(signed: dict[str, Any]) -> DeployCommand:
    try:
        return DeployCommand.model_validate(signed)
    except ValidationError as exc:
        raise ProtocolError(f"deployment command: {_first_error(exc)}") from None


def parse_device_command(signed: dict[str, Any]) -> DeviceCommand:
    try:
        return DeviceCommand.model_validate(signed)
    except ValidationError as exc:
        raise ProtocolError(f"device command: {_first_error(exc)}") from None


# ---- metadata fetch (request / response) ----------------------------------------------------------


class FetchRequest(BaseModel):
    """Device -> fleet on ``update/fetch``: a piece of one TUF metadata file."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    id: str = Field(min_length=1, max_length=64)
    path: str = Field(pattern=METADATA_PATH.pattern)
    offset: int = Field(default=0, ge=0, le=1 << 30)


class FileResponse(BaseModel):
    """Fleet -> device on ``update/file``: ``data`` holds bytes ``[offset, offset + len)`` of ``total``."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    id: str = Field(min_length=1, max_length=64)
    path: str
    status: Literal["ok", "not_found", "error"]
    offset: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    data: str = ""  # base64
    error: str | None = Field(default=None, max_length=512)

    def decoded(self) -> bytes:
        return b64decode(self.data, "metadata data")


class ChunkRequest(BaseModel):
    """Device -> fleet on ``update/chunks``: publish these chunks of a target on its chunk topic."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    target: str = Field(pattern=SHA256_HEX.pattern)  # sha256 of the target file
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[int] = Field(min_length=1, max_length=MAX_CHUNKS_PER_REQUEST)

    @field_validator("chunks")
    @classmethod
    def _indexes(cls, value: list[int]) -> list[int]:
        if any(i < 0 or i > 1 << 24 for i in value):
            raise ValueError("chunk indexes must be between 0 and 16777216")
        return value


def parse_fetch_request(payload: bytes) -> FetchRequest:
    return _parse(FetchRequest, payload, "metadata request")


def parse_file_response(payload: bytes) -> FileResponse:
    return _parse(FileResponse, payload, "metadata response", max_bytes=2 * METADATA_PIECE + 4096)


def parse_chunk_request(payload: bytes) -> ChunkRequest:
    return _parse(ChunkRequest, payload, "chunk request")


# ---- update states (device -> fleet) ---------------------------------------------------------------


UpdateStateName = Literal[
    "offered",
    "rejected",
    "downloading",
    "downloaded",
    "validating",
    "shadow",
    "activating",
    "trial",
    "committed",
    "rolled_back",
    "failed",
]
#: The update lifecycle's state names, in lifecycle order (``agent.update.state`` uses the same tuple).
UPDATE_STATES: tuple[str, ...] = get_args(UpdateStateName)


class UpdateStatus(BaseModel):
    """Device -> fleet on ``update/status`` for every state entered (and for download progress)."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    device_id: str
    ts: float
    update_id: str
    step: int | None = None  # the state's save counter: (update_id, step) is unique; re-deliveries repeat it
    command_id: str | None = None
    seq: int | None = None
    pipeline: str
    state: UpdateStateName
    reason: str | None = None
    target: str | None = None  # TUF target path
    name: str | None = None
    version: str | None = None
    from_version: str | None = None
    progress: int | None = None  # bytes on disk
    total: int | None = None
    agreement: float | None = None
    running: str | None = None  # the version the pipeline actually runs after this state

    @field_validator("agreement")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("agreement must be finite")
        return value


def parse_update_status(payload: bytes) -> UpdateStatus:
    return _parse(UpdateStatus, payload, "update status")


# ---- helpers -------------------------------------------------------------------------------------


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _parse(model: type[BaseModel], payload: bytes, what: str, max_bytes: int = AWS_IOT_MAX_PAYLOAD) -> Any:
    data = parse_json_object(payload, what, max_bytes)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"{what}: {_first_error(exc)}") from None
