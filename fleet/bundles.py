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
from fleet.errors import FleetError

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
        raise FleetError(
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
) -> BuildResult:
    """Build ``out`` (.tar.gz) from ``model`` plus metadata (``metadata`` bundle.toml, overridden by the other
    arguments); files the metadata names (labels file, golden vectors) come from beside the metadata file."""
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
