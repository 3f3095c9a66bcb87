"""Firmware profiles: what each board has (runtimes, camera pipeline, thermal sensors and limits).

One TOML file per board in ``firmware-profiles/`` at the top of the source tree; the package ships the same files
as ``agent/firmware_profiles`` (a symlink in the checkout, real files in the wheel). Operators may add or override
profiles in ``/etc/edge-agent/firmware-profiles`` or in the directories named by ``$EDGE_AGENT_PROFILES``.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import AgentError

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[no-redef]

PROFILES_ENV = "EDGE_AGENT_PROFILES"
SYSTEM_PROFILE_DIR = Path("/etc/edge-agent/firmware-profiles")
_PACKAGE_DIR = Path(__file__).resolve().parent
RuntimeName = Literal["litert", "tflite-runtime", "onnxruntime"]
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PIPELINE_FIELDS = {"width", "height", "fps"}


class ProfileError(AgentError):
    """A firmware profile file is unreadable or invalid, or the profile id is unknown."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Detection(_Strict):
    """How a board is recognised; any model or compatible hit counts, the profile with most hits wins."""

    model: list[str] = Field(default_factory=list)  # whole words in /proc/device-tree/model, case-insensitive
    compatible: list[str] = Field(default_factory=list)  # exact entries of /proc/device-tree/compatible
    l4t: list[str] = Field(default_factory=list)  # expected /etc/nv_tegra_release majors ("R32"); else a warning
    machine: list[str] = Field(default_factory=list)  # platform.machine() values: fallback when no board matches

    @field_validator("l4t")
    @classmethod
    def _l4t_form(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not re.fullmatch(r"R\d+", v)]
        if bad:
            raise ValueError(f"L4T releases are written like 'R36', not {bad}")
        return value


class RuntimePrefs(_Strict):
    """Runtime backends in order of preference, and their settings on this board."""

    order: list[RuntimeName] = Field(min_length=1)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])  # ONNX EPs, best first
    provider_options: dict[str, dict[str, str | int | float | bool]] = Field(default_factory=dict)
    threads: int | None = Field(default=None, gt=0)  # None: the runtime's own choice
    inter_op_threads: int | None = Field(default=None, gt=0)  # ONNX Runtime; default 1 when threads is set
    graph_optimization: Literal["disable", "basic", "extended", "all"] | None = None  # ONNX Runtime; default all
    # TFLite external delegates: a library, or {library = "...", options = {...}} (options reach load_delegate)
    delegates: list[str | dict[str, Any]] = Field(default_factory=list)

    @field_validator("order", "providers")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"entries must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _options_for_listed(self) -> RuntimePrefs:
        unknown = sorted(set(self.provider_options) - set(self.providers))
        if unknown:
            raise ValueError(f"provider_options for {unknown}, which are not in providers {self.providers}")
        return self


class CameraDefaults(_Strict):
    """Default capture settings: ``backend``/``device`` for USB cameras, ``csi_pipeline`` for the board camera."""

    backend: Literal["v4l2", "gstreamer", "auto"] = "v4l2"
    device: int | str = 0
    width: int = Field(default=640, gt=0)
    height: int = Field(default=480, gt=0)
    fps: int = Field(default=30, gt=0)
    csi_pipeline: str | None = None  # GStreamer pipeline ending in appsink; {width} {height} {fps} are filled in

    @field_validator("csi_pipeline")
    @classmethod
    def _pipeline_fields(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"bad placeholder in pipeline: {exc}") from None
        if names - _PIPELINE_FIELDS:
            raise ValueError(
                f"unknown placeholders {sorted(names - _PIPELINE_FIELDS)}; use {{width}} {{height}} {{fps}}"
            )
        if "appsink" not in value:
            raise ValueError("a capture pipeline for OpenCV must end in appsink")
        return value

    def pipeline(self, width: int | None = None, height: int | None = None, fps: int | None = None) -> str | None:
        """The CSI pipeline with the size and rate filled in (profile defaults where not given)."""
        if self.csi_pipeline is None:
            return None
        return self.csi_pipeline.format(width=width or self.width, height=height or self.height, fps=fps or self.fps)


class ThermalConfig(_Strict):
    """Temperature sensors and the agent's limits; decisions use the hottest sensor read."""

    zone_dir: str = "/sys/class/thermal"  # searched for thermal_zone*/type in zone_types
    zone_types: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)  # explicit millidegree files (absolute paths)
    poll_s: float = Field(default=5.0, gt=0)
    throttle_c: float  # at or above: lower the frame rate
    critical_c: float  # at or above: pause inference
    resume_c: float  # when throttled: back to normal only below this (hysteresis)
    firmware_throttle_c: float | None = None  # where the board's firmware/kernel cuts clocks (informative)

    @field_validator("paths")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if not p.startswith("/")]
        if bad:
            raise ValueError(f"paths must be absolute, got {bad}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> ThermalConfig:
        if not self.resume_c < self.throttle_c < self.critical_c:
            raise ValueError(
                f"need resume_c < throttle_c < critical_c, got {self.resume_c:g} / {self.throttle_c:g} / {self.critical_c:g}"
            )
        if self.firmware_throttle_c is not None and self.critical_c >= self.firmware_throttle_c:
            raise ValueError(
                f"critical_c ({self.critical_c:g}) must be below firmware_throttle_c ({self.firmware_throttle_c:g})"
            )
        return self


class FirmwareProfile(_Strict):
    """One board: ``id`` is the hardware id model bundles are matched against."""

    id: str
    name: str
    arch: Literal["aarch64", "armv7l", "x86_64"]
    os: str | None = None
    python: str | None = None  # the system Python of the board's OS
    memory_budget_mb: int = Field(gt=0)
    notes: str = ""
    detection: Detection = Field(default_factory=Detection)
    runtime: RuntimePrefs
    camera: CameraDefaults = Field(default_factory=CameraDefaults)
    thermal: ThermalConfig

    @field_validator("id")
    @classmethod
    def _id_form(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("use lower-case letters, digits, '.', '_' and '-' (like 'rpi4' or 'jetson-orin-nano')")
        return value


def _loc(loc: Iterable[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _known_keys(loc: Sequence[int | str]) -> list[str]:
    """The keys allowed next to ``loc`` (for a "did you mean" hint)."""
    model: Any = FirmwareProfile
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _validation_error(path: Path, exc: ValidationError) -> ProfileError:
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key explains the rest
    first = errors[0]
    key = _loc(first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    kind = first["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), _known_keys(first["loc"]), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problem = f"{path}: unknown key {key!r}{more}"
        fix = f"remove {key!r} from {path.name} or correct its spelling{hint}"
    elif kind == "missing":
        problem, fix = f"{path}: missing key {key!r}{more}", f"add {key!r} to {path.name}"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
        problem, fix = f"{path}: {key}: {message}{more}", f"correct {key!r} in {path.name}"
    return ProfileError(problem, fix)


def load_profile(path: Path | str) -> FirmwareProfile:
    """Read and validate one profile file; errors name the file, the key and the fix."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError:
        raise ProfileError(f"firmware profile {path} does not exist", "check the path") from None
    except OSError as exc:
        raise ProfileError(f"cannot read firmware profile {path}: {exc.strerror}", "check its permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}", f"fix the syntax of {path.name} at that place") from None
    try:
        profile = FirmwareProfile.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(path, exc) from None
    _check_runtime_options(path, profile.runtime)
    return profile


def _check_runtime_options(path: Path, prefs: RuntimePrefs) -> None:
    """Refuse provider options and delegates the runtimes would not take (typed), naming the key and the fix."""
    from agent.runtime.onnxruntime import check_provider_options
    from agent.runtime.tflite_common import delegate_specs

    try:
        check_provider_options(prefs.provider_options, where="runtime.provider_options")
        delegate_specs(prefs.delegates, where="runtime.delegates")
    except AgentError as exc:
        raise ProfileError(f"{path}: {exc.problem}", f"{exc.fix} (in {path.name})") from None


def _find_builtin_dir() -> Path | None:
    for candidate in (_PACKAGE_DIR / "firmware_profiles", _PACKAGE_DIR.parent / "firmware-profiles"):
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    return None


def builtin_dir() -> Path:
    """The profiles shipped with the package (falls back to the source tree if the symlink is missing)."""
    found = _find_builtin_dir()
    if found is not None:
        return found
    raise ProfileError(
        f"no firmware profiles found in {_PACKAGE_DIR / 'firmware_profiles'}",
        "reinstall edge-agent, or set EDGE_AGENT_PROFILES to a directory of profiles",
    )


def profile_dirs() -> list[Path]:
    """Directories searched for profiles, highest precedence first: $EDGE_AGENT_PROFILES, /etc, built-in."""
    dirs = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return [*dirs, SYSTEM_PROFILE_DIR, builtin_dir()]


def load_profiles(directory: Path) -> dict[str, FirmwareProfile]:
    """All ``*.toml`` profiles of one directory; each id must equal its file name."""
    profiles: dict[str, FirmwareProfile] = {}
    for path in sorted(directory.glob("*.toml")):
        profile = load_profile(path)
        if profile.id != path.stem:
            raise ProfileError(f"{path}: id {profile.id!r} differs from the file name", f"set id = {path.stem!r}")
        profiles[profile.id] = profile
    return profiles


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, FirmwareProfile]:
    return load_profiles(builtin_dir())


def builtin_profiles() -> dict[str, FirmwareProfile]:
    """The profiles shipped with edge-agent, by id."""
    return dict(_builtin())


def available_profiles(dirs: Sequence[Path] | None = None) -> dict[str, FirmwareProfile]:
    """Profiles from ``dirs`` (default: :func:`profile_dirs`); an earlier directory overrides a later one by id."""
    builtin = _find_builtin_dir()
    merged: dict[str, FirmwareProfile] = {}
    for directory in reversed(list(profile_dirs() if dirs is None else dirs)):
        if directory.is_dir():
            merged.update(_builtin() if directory == builtin else load_profiles(directory))
    return merged


def get_profile(profile_id: str, dirs: Sequence[Path] | None = None) -> FirmwareProfile:
    """The profile with this id; unknown ids raise an error listing the known ones."""
    profiles = available_profiles(dirs)
    try:
        return profiles[profile_id]
    except KeyError:
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileError(
            f"unknown firmware profile {profile_id!r} (known: {known})",
            f"use one of the known ids, or add {SYSTEM_PROFILE_DIR}/{profile_id}.toml",
        ) from None
