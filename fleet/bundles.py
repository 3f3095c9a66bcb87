"""Model bundles on the fleet side: build one from a model and metadata, pack it reproducibly, inspect it.

The bundle format is the agent's (``agent.bundle``, docs/bundles.md); everything built here is validated by loading it
the way a device will (``load_bundle``, then ``Predictor.open`` with its golden vectors when a runtime is installed).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bundle import ARCHIVE_SUFFIXES, METADATA_FILE, MODEL_SUFFIXES, Bundle, load_bundle, parse_metadata
from agent.errors import AgentError, RuntimeUnavailable
from fleet.errors import FleetError, OperationFailed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TASKS = ("classification", "detection", "anomaly", "raw")
_BLOCK = 1 << 20


def fleet_error(exc: AgentError) -> FleetError:
    """The agent's one-line error as the fleet's."""
    return FleetError(exc.problem, exc.fix or "see docs/bundles.md")


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


@dataclass
class Validation:
    """What opening the bundle with a runtime showed: model I/O and golden-vector problems (None: not run)."""

    model: dict[str, Any] | None = None
    golden_problems: list[str] | None = None
    skipped: str | None = None  # why the model was not opened (no runtime installed here)


@dataclass
class BuildResult:
    path: Path
    name: str
    version: str
    task: str
    hardware: list[str]
    sha256: str
    size: int
    files: list[str]
    validation: Validation = field(default_factory=Validation)
    input: dict[str, Any] = field(default_factory=dict)  # bundle.toml's [input]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "hardware": self.hardware,
            "sha256": self.sha256,
            "size": self.size,
            "files": self.files,
            "input": self.input,
            "model": self.validation.model,
            "golden": None
            if self.validation.golden_problems is None
            else {"passed": not self.validation.golden_problems, "problems": self.validation.golden_problems},
            "runtime_check_skipped": self.validation.skipped,
        }


# ---- validation ------------------------------------------------------------------------------------


def validate_bundle(path: Path, *, golden: bool = True) -> Validation:
    """Open the bundle with a runtime (when one for its format is installed) and run its golden vectors.

    FleetError when the metadata disagrees with the model or a golden output is out of tolerance.
    """
    from agent.predictor import Predictor

    try:
        predictor = Predictor.open(path)
    except RuntimeUnavailable as exc:
        return Validation(skipped=exc.problem)
    except AgentError as exc:
        raise fleet_error(exc) from None
    try:
        problems = predictor.verify_golden() if golden and predictor.bundle.metadata.golden is not None else None
        result = Validation(model=predictor.model.info.to_dict(), golden_problems=problems)
    except AgentError as exc:
        raise fleet_error(exc) from None
    finally:
        predictor.close()
    if result.golden_problems:
        raise OperationFailed(
            f"golden vectors fail: {result.golden_problems[0]}",
            "rebuild the golden vectors for this model or fix the metadata",
        )
    return result


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Bundle]:
    """``load_bundle`` with agent errors as FleetErrors; the bundle is closed on exit."""
    try:
        bundle = load_bundle(path)
    except AgentError as exc:
        raise fleet_error(exc) from None
    try:
        yield bundle
    finally:
        bundle.close()


# ---- packing ---------------------------------------------------------------------------------------


def pack(source_dir: Path, out: Path) -> tuple[str, int]:
    """Pack the files of ``source_dir`` (flat, sorted) into ``out`` (.tar.gz) reproducibly: no timestamps, owners
    or modes of the build machine, so the same inputs give the same bytes (and the same TUF target hash).

    Written atomically; returns (sha256, size).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for item in sorted(source_dir.iterdir()):
                    if not item.is_file():
                        continue
                    info = tarfile.TarInfo(item.name)
                    info.size = item.stat().st_size
                    info.mode = 0o644
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with item.open("rb") as fh:
                        tar.addfile(info, fh)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return file_digest(out)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


# ---- input inference --------------------------------------------------------------------------------

INPUT_KINDS = ("image", "tensor", "timeseries")
IMAGE_MIN_SIDE = 8  # a rank-4 input with 1 or 3 channels and both sides at least this is taken for an image


def _side(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def infer_input(
    shapes: Sequence[Sequence[int | str]],
    *,
    kind: str | None = None,
    layout: str | None = None,
    size: tuple[int, int] | None = None,
    color: str | None = None,
) -> dict[str, Any]:
    """The ``[input]`` table of bundle.toml for a model with these input shapes, given what the user said (pure).

    One input of rank 4 with 1 or 3 channels (NHWC or NCHW) and sides of an image (both at least
    ``IMAGE_MIN_SIDE``, or dynamic) is an ``image`` (layout, size as (width, height), colour gray for 1 channel, rgb
    for 3); anything else is a ``tensor``. What the user gives wins; FleetError asks (with the flag) for what cannot
    be inferred: the size of an image with dynamic sides, the layout of a rank-4 input without a 1- or 3-channel axis.
    """
    from agent.processing.image import infer_layout

    shape = tuple(shapes[0]) if len(shapes) == 1 else ()
    guessed = infer_layout(shape) if len(shape) == 4 else None
    if kind is None:
        if guessed is not None:
            h, w = (shape[1], shape[2]) if guessed == "NHWC" else (shape[2], shape[3])
            sides = [_side(h), _side(w)]
            looks_like_image = all(v is None or v >= IMAGE_MIN_SIDE for v in sides)
            kind = "image" if looks_like_image else "tensor"
        else:
            kind = "tensor"
    if kind == "tensor":
        return {"kind": "tensor"}
    if kind == "timeseries":
        raise FleetError(
            "a timeseries input needs its window, stride and channel names",
            "give them in the [input] table of a --metadata bundle.toml (see docs/bundles.md)",
        )
    if kind != "image":
        raise FleetError(f"unknown input kind {kind!r}", f"give --input-kind {' or '.join(INPUT_KINDS)}")
    if len(shapes) != 1:
        raise FleetError(
            f"an image input needs a model with 1 input, this one has {len(shapes)}", "give --input-kind tensor"
        )
    if len(shape) != 4:
        raise FleetError(
            f"the model's input has shape {list(shape)}, not an image tensor (NHWC or NCHW)", "give --input-kind tensor"
        )
    layout = layout or guessed
    if layout is None:
        raise FleetError(
            f"cannot tell the layout of input shape {list(shape)}: no axis of 1 or 3 channels",
            "give --layout NHWC or --layout NCHW (or --input-kind tensor)",
        )
    h, w, c = (shape[1], shape[2], shape[3]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
    table: dict[str, Any] = {"kind": "image", "layout": layout}
    model_size = (_side(w), _side(h))
    if size is not None:
        if None not in model_size and tuple(size) != model_size:
            raise FleetError(
                f"--size {size[0]}x{size[1]} does not match the model's input {model_size[0]}x{model_size[1]}",
                "drop --size (the model's is used)",
            )
        table["size"] = [int(size[0]), int(size[1])]
    elif None not in model_size:
        table["size"] = [model_size[0], model_size[1]]
    else:
        raise FleetError(
            f"the model's image input {list(shape)} has no fixed size",
            "give --size WIDTHxHEIGHT, the size frames are resized to",
        )
    channels = _side(c)
    if color is None:
        if channels is None:
            raise FleetError(
                f"the model's image input {list(shape)} has no fixed channel count", "give --color rgb, bgr or gray"
            )
        color = "gray" if channels == 1 else "rgb"
    table["color"] = color
    return table


def model_input_shapes(model: Path) -> list[tuple[int | str, ...]] | str:
    """The input shapes of a model file, opened with an installed runtime; a string saying why when none can."""
    from agent.runtime import load_model

    try:
        loaded = load_model(model)
    except RuntimeUnavailable as exc:
        return exc.problem
    except AgentError as exc:
        raise fleet_error(exc) from None
    try:
        return [tuple(t.shape) for t in loaded.inputs]
    finally:
        loaded.close()


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (e.g. 224x224) as (width, height)."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1 or max(size) > 16384:
        raise FleetError(f"--size {text!r} is not WIDTHxHEIGHT", "give the size like 224x224")
    return size


# ---- building --------------------------------------------------------------------------------------


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FleetError(f"metadata file {path} does not exist", "give the path of a bundle.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetError(f"cannot read metadata file {path}: {exc}", "check the file's permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path} is not valid TOML: {exc}", "fix the syntax at the position named") from None


def _copy_in(source: Path, dest: Path, what: str) -> None:
    if not source.is_file():
        raise FleetError(f"{what} {source} does not exist", f"give the path of the {what}")
    shutil.copyfile(source, dest)


def build_bundle(
    model: Path,
    out: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    task: str | None = None,
    labels: Path | None = None,
    hardware: Sequence[str] | None = None,
    metadata: Path | None = None,
    description: str | None = None,
    golden: bool = True,
    input_kind: str | None = None,
    layout: str | None = None,
    size: tuple[int, int] | None = None,
    color: str | None = None,
) -> BuildResult:
    """Build ``out`` (.tar.gz) from ``model`` plus metadata (``metadata`` bundle.toml, overridden by the other
    arguments); files the metadata names (labels file, golden vectors) come from beside the metadata file.

    Without an ``[input]`` table in the metadata, the input kind, layout, size and colour are inferred from the model
    (``infer_input``); ``input_kind``, ``layout``, ``size`` and ``color`` override what is inferred or given."""
    import tomli_w

    model = Path(model)
    if not model.is_file():
        raise FleetError(f"model file {model} does not exist", "give the path of a .tflite or .onnx model")
    if not model.name.lower().endswith(MODEL_SUFFIXES):
        raise FleetError(f"{model.name} is not a .tflite or .onnx model", "give the model file itself")
    if not str(out).endswith((".tar.gz", ".tgz")):
        raise FleetError(f"output {out} must end in .tar.gz", "name the output like NAME-VERSION.tar.gz")
    data: dict[str, Any] = _read_metadata(metadata) if metadata is not None else {"schema_version": 1}
    for key, value in (("name", name), ("version", version), ("task", task), ("description", description)):
        if value is not None:
            data[key] = value
    if hardware:
        data["hardware"] = sorted(dict.fromkeys(hardware))
    for key, option in (("name", "--name"), ("version", "--version"), ("task", "--task")):
        if not data.get(key):
            raise FleetError(f"the bundle has no {key}", f"give {option} or set {key} in the --metadata file")
    if data["task"] not in TASKS:
        raise FleetError(f"unknown task {data['task']!r}", f"use one of {', '.join(TASKS)}")
    data["model"] = model.name
    given = {"kind": input_kind, "layout": layout, "size": size, "color": color}
    if "input" not in data or any(v is not None for v in given.values()):
        data["input"] = _input_table(model, data.get("input"), given)

    with tempfile.TemporaryDirectory(prefix="fleet-bundle-") as tmp:
        root = Path(tmp)
        shutil.copyfile(model, root / model.name)
        base = metadata.parent if metadata is not None else Path.cwd()
        if labels is not None:
            data.pop("labels", None)
            data["labels_file"] = "labels.txt"
            _copy_in(labels, root / "labels.txt", "labels file")
        elif data.get("labels_file"):
            _copy_in(base / data["labels_file"], root / Path(data["labels_file"]).name, "labels file")
            data["labels_file"] = Path(data["labels_file"]).name
        golden_spec = data.get("golden")
        if isinstance(golden_spec, dict):
            file_name = str(golden_spec.get("file", "golden.npz"))
            _copy_in(base / file_name, root / Path(file_name).name, "golden vectors file")
            golden_spec["file"] = Path(file_name).name
        text = tomli_w.dumps(data)
        try:
            parse_metadata(text, METADATA_FILE)
        except AgentError as exc:
            raise fleet_error(exc) from None
        (root / METADATA_FILE).write_text(text, encoding="utf-8")
        with opened(root) as bundle:
            meta = bundle.metadata
        validation = validate_bundle(root, golden=golden)
        files = sorted(p.name for p in root.iterdir())
        sha256, size = pack(root, out)
    return BuildResult(
        path=out,
        name=meta.name,
        version=meta.version,
        task=meta.task,
        hardware=list(meta.hardware),
        sha256=sha256,
        size=size,
        files=files,
        validation=validation,
        input=meta.input.model_dump(mode="json", exclude_none=True),
    )


def _input_table(model: Path, current: Any, given: dict[str, Any]) -> dict[str, Any]:
    """bundle.toml's ``[input]``: the metadata's table with what the user gave, or inferred from the model."""
    current = dict(current) if isinstance(current, dict) else {}
    if current and given["kind"] in (None, current.get("kind", "tensor")):
        for key in ("layout", "color"):
            if given[key] is not None:
                current[key] = given[key]
        if given["size"] is not None:
            current["size"] = list(given["size"])
        return current
    shapes = model_input_shapes(model)
    if isinstance(shapes, str):
        if given["kind"] == "tensor":
            return {"kind": "tensor"}
        if given["kind"] == "image":
            table: dict[str, Any] = {"kind": "image"}
            for key in ("layout", "color"):
                if given[key] is not None:
                    table[key] = given[key]
            if given["size"] is not None:
                table["size"] = list(given["size"])
            return table  # layout and size: inferred by the device from the model when left out
        raise FleetError(
            f"cannot open {model.name} here to infer its input kind ({shapes})",
            "give --input-kind image (a camera or image model) or --input-kind tensor, or install the runtime",
        )
    return infer_input(shapes, kind=given["kind"], layout=given["layout"], size=given["size"], color=given["color"])


# ---- what the fleet can run ------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleModel:
    """A bundle shipped with the agent (``model = "sample:NAME"``): devices may run it without it being published."""

    path: Path
    name: str
    version: str
    input_kind: str
    model_sha256: str


def sample_models() -> list[SampleModel]:
    """The agent's built-in sample bundles (what a provisioned device runs first)."""
    from agent.config import SAMPLES

    out = []
    for directory in sorted(p for p in Path(SAMPLES).iterdir() if (p / METADATA_FILE).is_file()):
        with contextlib.suppress(AgentError):
            bundle = load_bundle(directory)
            out.append(SampleModel(directory, bundle.name, bundle.version, bundle.metadata.input.kind, bundle.sha256))
            bundle.close()
    return out


def fleet_fit(
    input_kind: str,
    hardware: Sequence[str],
    devices: Sequence[dict[str, Any]],
    known_kinds: dict[tuple[str, str], str],
) -> tuple[str, str] | None:
    """None when some provisioned device could run a bundle (pure), else (problem, fix).

    A device could run it when its hardware id (provisioned, else the profile it reports) is in ``hardware`` (empty:
    any) or unknown, and one of the models it reports running takes the same input kind (looked up by name and
    version in ``known_kinds``; a model of unknown kind, or a device that reported none yet, is not held against it).
    No devices yet: nothing to compare with.
    """
    if not devices:
        return None
    wanted = set(hardware)

    def hw(d: dict[str, Any]) -> str | None:
        return d.get("hardware") or d.get("profile")

    fitting = [d for d in devices if not wanted or hw(d) is None or hw(d) in wanted]
    if not fitting:
        have: dict[str, int] = {}
        for d in devices:
            have[str(hw(d))] = have.get(str(hw(d)), 0) + 1
        listed = ", ".join(f"{h} ({n})" for h, n in sorted(have.items()))
        return (
            f"it is for hardware {', '.join(sorted(wanted))} and the devices are {listed}",
            f"give --hardware with the devices' ids (e.g. --hardware {sorted(have)[0]}), or none for any hardware",
        )
    seen: dict[str, list[str]] = {}
    for d in fitting:
        models = [m for m in (d.get("models") or {}).values() if isinstance(m, dict)]
        kinds = [known_kinds.get((str(m.get("name")), str(m.get("version")))) for m in models]
        if not models or None in kinds or input_kind in kinds:
            return None
        for m, kind in zip(models, kinds, strict=True):
            seen.setdefault(str(kind), []).append(f"{d['id']} runs {m.get('name')} {m.get('version')}")
    listed = "; ".join(f"{kind} input: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for kind, v in seen.items())
    return (
        f"its input kind is {input_kind!r} and every device's pipelines take another ({listed})",
        "build the bundle for the devices' input (`fleet bundle build ... --input-kind KIND`, see docs/bundles.md)",
    )


# ---- inspecting ------------------------------------------------------------------------------------


def inspect_bundle(path: Path, *, golden: bool = True) -> dict[str, Any]:
    """Metadata, model I/O (when a runtime is installed), size and sha256 of a bundle (archive, directory, model)."""
    path = Path(path)
    with opened(path) as bundle:
        meta = bundle.metadata
        info: dict[str, Any] = {
            "path": str(path),
            "name": meta.name,
            "version": meta.version,
            "task": meta.task,
            "description": meta.description,
            "hardware": list(meta.hardware),
            "inferred": bundle.inferred,
            "model_file": meta.model,
            "model_sha256": bundle.sha256,
            "labels": bundle.labels,
            "input": meta.input.model_dump(),
            "budget": meta.budget.model_dump(),
            "accuracy": dict(meta.accuracy),
            "metadata": meta.model_dump(mode="json", exclude_none=True),
        }
    if path.is_file():
        info["sha256"], info["size"] = file_digest(path)
    else:
        info["sha256"] = None
        info["size"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    validation = validate_bundle(path, golden=golden)
    info["model"] = validation.model
    info["golden"] = (
        None
        if validation.golden_problems is None
        else {"passed": not validation.golden_problems, "problems": validation.golden_problems}
    )
    info["runtime_check_skipped"] = validation.skipped
    return info


def archive_for_publish(path: Path, workdir: Path) -> Path:
    """The archive to publish for ``path``: the file itself when it is an archive, else a reproducible .tar.gz of
    the bundle directory written to ``workdir``."""
    path = Path(path)
    if path.is_file() and is_archive(path):
        return path
    if path.is_dir():
        out = workdir / f"{path.name}.tar.gz"
        pack(path, out)
        return out
    if not path.exists():
        raise FleetError(f"{path} does not exist", "give the path of a bundle archive built by `fleet bundle build`")
    raise FleetError(
        f"{path.name} is not a bundle archive", "build one with `fleet bundle build MODEL ... -o NAME.tar.gz`"
    )
