"""Bundle metadata and loading from directories, archives and bare model files."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from agent.bundle import load_bundle, parse_metadata
from agent.errors import BundleError
from tests import onnx_models

GOOD = """
name = "clf"
version = "1.2.3"
task = "classification"
model = "model.onnx"
labels = ["a", "b", "c", "d"]
[input]
kind = "image"
color = "rgb"
resize = "letterbox"
"""


def make_bundle(root: Path, text: str = GOOD) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    onnx_models.float_image_classifier(root / "model.onnx")
    (root / "bundle.toml").write_text(text)
    return root


def test_directory_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    assert (bundle.name, bundle.version, bundle.task) == ("clf", "1.2.3", "classification")
    assert bundle.metadata.version_tuple == (1, 2, 3)
    assert bundle.labels == ["a", "b", "c", "d"]
    assert bundle.model_path.name == "model.onnx" and len(bundle.sha256) == 64
    assert bundle.metadata.input.kind == "image" and bundle.metadata.input.resize == "letterbox"


def test_labels_file(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", GOOD.replace('labels = ["a", "b", "c", "d"]', 'labels_file = "labels.txt"'))
    (root / "labels.txt").write_text("w\nx\n\ny\nz\n")
    assert load_bundle(root).labels == ["w", "x", "y", "z"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar", ".zip"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_archive_bundles(tmp_path: Path, suffix: str, wrapped: bool) -> None:
    root = make_bundle(tmp_path / "clf-1.2.3")
    archive = tmp_path / f"clf{suffix}"
    prefix = "clf-1.2.3/" if wrapped else ""
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in root.iterdir():
                zf.write(f, prefix + f.name)
    else:
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tf:
            for f in root.iterdir():
                tf.add(f, prefix + f.name)
    bundle = load_bundle(archive)
    extracted = bundle.root
    assert bundle.name == "clf" and bundle.model_path.is_file()
    bundle.close()
    assert not extracted.exists()


def test_archive_path_traversal_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"pwned"
        info = tarfile.TarInfo("../outside.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(archive)
    assert not (tmp_path / "outside.txt").exists()


def test_archive_links_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("model.onnx")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(BundleError, match="link"):
        load_bundle(archive)


def test_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(BundleError, match="not a readable archive"):
        load_bundle(archive)


def test_bare_model_infers_raw_task(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "My Model!.onnx")
    bundle = load_bundle(path)
    assert bundle.inferred and bundle.task == "raw" and bundle.name == "My-Model-"
    # a directory holding only a model file is treated the same way
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(path, only / "m.onnx")
    assert load_bundle(only).inferred


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (('version = "1.2.3"', 'version = "1.2"'), "version"),
        (('task = "classification"', 'task = "segmentation"'), "task"),
        (('model = "model.onnx"', 'model = "../model.onnx"'), "model"),
        (('resize = "letterbox"', 'resize = "stretch"'), "input.image.resize"),
        (('name = "clf"', 'name = "clf"\nsurprise = 1'), "surprise"),
        (("[input]", "[input"), "not valid TOML"),
        (('task = "classification"', 'task = "detection"'), "detection"),
    ],
)
def test_metadata_errors_name_the_key(change: tuple[str, str], needle: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_metadata(GOOD.replace(*change))
    assert needle in str(info.value)
    assert info.value.fix


def test_missing_things(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    root = make_bundle(tmp_path / "b")
    (root / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match=r"no bundle\.toml"):
        load_bundle(empty)
    weird = tmp_path / "model.pt"
    weird.write_bytes(b"x")
    with pytest.raises(BundleError, match="unknown file type"):
        load_bundle(weird)
