"""Model bundle: a model file plus metadata, in one directory or one archive.

Layout of a bundle directory (or of a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive)::

    bundle.toml        metadata (see ``BundleMetadata``)
    model.tflite|onnx  the model
    labels.txt         optional, one label per line (or ``labels = [...]`` inline)
    golden.npz         optional golden vectors: input_<i>_<name>, output_<i>_<name>

A bare ``.tflite``/``.onnx`` file also loads: metadata is inferred from the
model and the task is ``raw``.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
import tempfile

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[no-redef]
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import BundleError

METADATA_FILE = "bundle.toml"
MODEL_SUFFIXES = (".tflite", ".onnx")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(_Strict):
    """How a camera frame or image file becomes the model's input tensor."""

    kind: Literal["image"] = "image"
    layout: Literal["NHWC", "NCHW"] | None = None  # inferred from the model when omitted
    size: tuple[int, int] | None = None  # (width, height); inferred from the model when omitted
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    resize: Literal["letterbox", "squash", "crop"] = "squash"
    letterbox_fill: int = 114
    mean: list[float] = Field(default_factory=lambda: [0.0])  # per channel or one value, pixel units
    std: list[float] = Field(default_factory=lambda: [255.0])  # value = (pixel - mean) / std


class TensorInput(_Strict):
    """The input is a tensor given as is (``.npy`` files, request payloads)."""

    kind: Literal["tensor"] = "tensor"


class TimeSeriesInput(_Strict):
    """Sensor samples cut into windows of ``window`` rows every ``stride`` rows."""

    kind: Literal["timeseries"] = "timeseries"
    window: int = Field(gt=0)
    stride: int = Field(gt=0)
    channels: list[str] = Field(min_length=1)
    mean: list[float] | None = None  # per channel standardization before the model
    std: list[float] | None = None
    layout: Literal["NWC", "NCW", "flat"] = "NWC"  # (1, window, channels), (1, channels, window), (1, window*channels)


InputSpec = Annotated[ImageInput | TensorInput | TimeSeriesInput, Field(discriminator="kind")]


class ClassificationSpec(_Strict):
    top_k: int = Field(default=3, gt=0)
    softmax: Literal["auto", "always", "never"] = "auto"  # auto: when outputs are not already probabilities
    output: int = 0  # which model output holds the scores


class DetectionSpec(_Strict):
    """``ssd``: post-processed boxes/classes/scores/count outputs (TFLite SSD layout).

    ``yolo``: one raw output (1, N, 4 + [objectness] + classes) or its transpose,
    decoded and then filtered with non-maximum suppression.
    """

    format: Literal["ssd", "yolo"]
    iou_threshold: float = Field(default=0.45, ge=0, le=1)
    max_detections: int = Field(default=100, gt=0)
    objectness: bool = True  # yolo: is there an objectness column after the box
    box_format: Literal["cxcywh", "xyxy", "yxyx"] = "cxcywh"  # ssd outputs are yxyx by convention
    normalized_boxes: bool = False  # box coordinates relative (0..1) to the model input
    class_offset: int = 0  # ssd: added to class ids before looking up labels
    ssd_outputs: tuple[int, int, int, int] | None = None  # order of boxes, classes, scores, count


class AnomalySpec(_Strict):
    """``output``: the model outputs the score; ``reconstruction``: score = MSE(input, output)."""

    score: Literal["output", "reconstruction"] = "output"
    output: int = 0


class GoldenSpec(_Strict):
    file: str = "golden.npz"
    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=0.0, ge=0)


class TensorStats(_Strict):
    """Summary statistics of one tensor over a reference data set (for drift monitoring)."""

    mean: list[float]
    std: list[float]
    min: float
    max: float
    count: int


class Baseline(_Strict):
    inputs: dict[str, TensorStats] = Field(default_factory=dict)
    outputs: dict[str, TensorStats] = Field(default_factory=dict)
    class_frequencies: list[float] | None = None


class Budget(_Strict):
    latency_ms: float | None = Field(default=None, gt=0)  # p95 latency allowed on the target device


class BundleMetadata(_Strict):
    """The contents of ``bundle.toml``."""

    schema_version: int = 1
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str
    task: Literal["classification", "detection", "anomaly", "raw"]
    model: str
    description: str = ""
    hardware: list[str] = Field(default_factory=list)  # compatible hardware ids; empty: any
    input: InputSpec = Field(default_factory=TensorInput)
    labels: list[str] | None = None
    labels_file: str | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)  # score, anomaly, ...
    classification: ClassificationSpec | None = None
    detection: DetectionSpec | None = None
    anomaly: AnomalySpec | None = None
    golden: GoldenSpec | None = None
    baseline: Baseline | None = None
    budget: Budget = Field(default_factory=Budget)
    accuracy: dict[str, float] = Field(default_factory=dict)  # measured figures, informative

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"{value!r} is not a semantic version like 1.2.3")
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not value.endswith(MODEL_SUFFIXES) or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"{value!r} must be a file name in the bundle ending in .tflite or .onnx")
        return value

    @model_validator(mode="after")
    def _task_sections(self) -> BundleMetadata:
        if self.task == "detection" and self.detection is None:
            raise ValueError("task 'detection' needs a [detection] section with format = 'ssd' or 'yolo'")
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give labels or labels_file, not both")
        return self

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        major, minor, patch = SEMVER.match(self.version).groups()[:3]  # type: ignore[union-attr]
        return int(major), int(minor), int(patch)


@dataclass
class Bundle:
    """A loaded bundle: metadata, resolved paths and labels. Not yet bound to a runtime."""

    root: Path
    metadata: BundleMetadata
    model_path: Path
    labels: list[str] | None
    inferred: bool = False  # True for a bare model file
    sha256: str = ""
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def task(self) -> str:
        return self.metadata.task

    def golden_vectors(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """(inputs, expected outputs) from the golden file, in model order; None when absent."""
        if self.metadata.golden is None:
            return None
        path = self.root / self.metadata.golden.file
        if not path.is_file():
            raise BundleError(
                f"golden vectors file {path.name!r} named in bundle.toml is missing", "add it or drop [golden]"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                inputs = _ordered(data, "input_")
                outputs = _ordered(data, "output_")
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            # truncated or corrupt: numpy/zipfile raise any of these depending on where the damage lies
            raise BundleError(
                f"golden vectors file {path.name!r} is corrupt or truncated ({type(exc).__name__}: {exc})",
                "copy the bundle again or rebuild it",
            ) from None
        return inputs, outputs

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _ordered(data: Any, prefix: str) -> list[np.ndarray]:
    keys = sorted((k for k in data.files if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :].split("_")[0]))
    return [data[k] for k in keys]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_metadata(text: str, source: str = METADATA_FILE) -> BundleMetadata:
    """Parse and validate bundle.toml text; errors name the key and the fix."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{source} is not valid TOML: {exc}", "fix the syntax at the position named") from None
    try:
        return BundleMetadata.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise BundleError(
            f"{source}: key {where!r}: {err['msg']}",
            "correct that key (see docs/bundles.md)",
        ) from None


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle from a directory, an archive or a bare model file."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path} does not exist", "give the path of a model file, bundle directory or bundle archive")
    if path.is_dir():
        return _load_dir(path)
    name = path.name.lower()
    if name.endswith(MODEL_SUFFIXES):
        return _bare_model(path)
    if name.endswith(ARCHIVE_SUFFIXES):
        tmp = tempfile.TemporaryDirectory(prefix="edge-bundle-")
        try:
            _extract(path, Path(tmp.name))
            bundle = _load_dir(Path(tmp.name))
        except BaseException:
            tmp.cleanup()
            raise
        bundle._tmp = tmp
        return bundle
    raise BundleError(
        f"{path.name}: unknown file type",
        f"give a .tflite or .onnx model, a bundle directory, or a bundle archive ({', '.join(ARCHIVE_SUFFIXES)})",
    )


def _bare_model(path: Path) -> Bundle:
    meta = BundleMetadata(name=_safe_name(path.stem), version="0.0.0", task="raw", model=path.name)
    return Bundle(
        root=path.parent, metadata=meta, model_path=path, labels=None, inferred=True, sha256=file_sha256(path)
    )


def _safe_name(stem: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip(".-_") or "model"
    return cleaned


def _load_dir(root: Path) -> Bundle:
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        models = sorted(p for p in root.iterdir() if p.suffix in MODEL_SUFFIXES)
        if len(models) == 1:
            return _bare_model(models[0])
        raise BundleError(f"{root} has no {METADATA_FILE}", f"add {METADATA_FILE} (see docs/bundles.md)")
    try:
        text = meta_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {meta_path}: {exc}", "check the file's permissions and encoding") from None
    meta = parse_metadata(text, str(meta_path))
    model_path = root / meta.model
    if not model_path.is_file():
        raise BundleError(
            f"bundle {meta.name}: model file {meta.model!r} is missing", "put the model file beside bundle.toml"
        )
    labels = meta.labels
    if meta.labels_file is not None:
        labels_path = root / meta.labels_file
        try:
            labels = [ln.strip() for ln in labels_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"bundle {meta.name}: cannot read labels file: {exc}", "add the labels file") from None
    return Bundle(root=root, metadata=meta, model_path=model_path, labels=labels, sha256=file_sha256(model_path))


def _extract(archive: Path, dest: Path) -> None:
    """Extract safely: no absolute paths, no '..', no links, no devices."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = _safe_target(dest, info.filename)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    target = _safe_target(dest, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tf.extractfile(member)
                        assert src is not None
                        with src, target.open("wb") as out:
                            shutil.copyfileobj(src, out)
                    else:
                        raise BundleError(
                            f"{archive.name}: member {member.name!r} is a link or device",
                            "rebuild the archive with plain files",
                        )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, io.UnsupportedOperation) as exc:
        raise BundleError(
            f"{archive.name} is not a readable archive: {exc}", "re-download or rebuild the bundle"
        ) from None
    # Archives often wrap everything in one top-level folder.
    entries = list(dest.iterdir())
    if not (dest / METADATA_FILE).exists() and len(entries) == 1 and entries[0].is_dir():
        for child in entries[0].iterdir():
            child.rename(dest / child.name)
        entries[0].rmdir()


def _safe_target(dest: Path, name: str) -> Path:
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise BundleError(
            f"archive member {name!r} points outside the bundle", "rebuild the archive with relative paths"
        )
    return dest.joinpath(*parts)
