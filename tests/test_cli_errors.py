"""Bad input through the real CLI: one clear line naming the problem and the fix, no traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import onnx_models
from tests.conftest import assert_one_line_error, run_cli
from tests.test_bundle import GOOD, make_bundle


@pytest.fixture()
def clf(tmp_path: Path) -> Path:
    return onnx_models.float_image_classifier(tmp_path / "clf.onnx", channels=3, size=8, classes=4)


def test_corrupt_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert_one_line_error(run_cli("infer", bad, tmp_path / "x.npy"), "bad.onnx")


def test_truncated_model(tmp_path: Path, clf: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(clf.read_bytes()[:100])
    assert_one_line_error(run_cli("describe", cut), "cut.onnx")


def test_unknown_extension(tmp_path: Path) -> None:
    weird = tmp_path / "model.caffemodel"
    weird.write_bytes(b"1234")
    assert_one_line_error(run_cli("infer", weird, weird), "unknown file type")


def test_model_needing_missing_operator(tmp_path: Path) -> None:
    path = onnx_models.custom_op(tmp_path / "custom.onnx")
    assert_one_line_error(run_cli("bench", path, "--seconds", "0.1"), "operator")


def test_unreadable_image(tmp_path: Path, clf: Path) -> None:
    img = tmp_path / "broken.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli("infer", clf, img)
    assert_one_line_error(proc, "broken.png", "not a readable image")


def test_wrong_sized_npy(tmp_path: Path, clf: Path) -> None:
    arr = tmp_path / "wrong.npy"
    np.save(arr, np.zeros((1, 3, 5, 5), dtype=np.float32))
    assert_one_line_error(run_cli("infer", clf, arr), "shape [1, 3, 5, 5]", "expects [1, 3, 8, 8]")


def test_bundle_disagreeing_with_model(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", GOOD.replace('["a", "b", "c", "d"]', '["a", "b"]'))
    assert_one_line_error(run_cli("infer", root, tmp_path / "x.png"), "2 labels but the model outputs 4")


def test_bad_bundle_metadata(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", GOOD.replace('version = "1.2.3"', 'version = "one"'))
    assert_one_line_error(run_cli("describe", root), "version")


def test_missing_model_path(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("infer", tmp_path / "nope.tflite", "x.png"), "does not exist")


def test_missing_input_file_is_reported_and_others_still_run(tmp_path: Path, clf: Path) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((1, 3, 8, 8), dtype=np.float32))
    proc = run_cli("infer", clf, tmp_path / "missing.png", good, "--json")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("edge-agent: error:") == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "error" in lines[0] and '"task": "raw"' in lines[1]


def test_unknown_runtime_choice(clf: Path) -> None:
    proc = run_cli("infer", clf, "x.png", "--runtime", "tensorflow")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_runtime_for_format(clf: Path) -> None:
    assert_one_line_error(run_cli("describe", clf, "--runtime", "litert"), "cannot run onnx")
