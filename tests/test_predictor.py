"""Predictor: bundle metadata checked against the real model, full predict path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import BundleError, InputError
from agent.predictor import Predictor
from tests import onnx_models
from tests.test_bundle import GOOD, make_bundle


def open_bundle(root: Path) -> Predictor:
    return Predictor.open(root)


def test_image_classification_end_to_end(tmp_path: Path) -> None:
    p = open_bundle(make_bundle(tmp_path / "b"))
    try:
        frame = np.full((30, 40, 3), 255, dtype=np.uint8)  # any size: letterboxed to 8x8
        pred = p.predict_image(frame)
        assert pred.task == "classification" and pred.latency_ms > 0
        # all-white frame -> pooled channel means ~1 (minus padding) -> class 3 has the largest weight
        assert pred.result["label"] == "d"
        scores = [t["score"] for t in pred.result["top"]]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert pred.to_dict()["model"] == "clf"
    finally:
        p.close()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (('labels = ["a", "b", "c", "d"]', 'labels = ["a", "b", "c", "d", "e"]'), "5 labels but the model outputs 4"),
        (('color = "rgb"', 'color = "gray"'), "colour"),
        (('resize = "letterbox"', 'resize = "letterbox"\nsize = [16, 16]'), "size"),
        (('resize = "letterbox"', 'resize = "letterbox"\nlayout = "NHWC"'), "channel"),
        (
            (
                '[input]\nkind = "image"\ncolor = "rgb"\nresize = "letterbox"',
                '[input]\nkind = "timeseries"\nwindow = 5\nstride = 1\nchannels = ["a"]',
            ),
            "window",
        ),
    ],
)
def test_metadata_mismatch_with_model_is_refused(tmp_path: Path, change: tuple[str, str], needle: str) -> None:
    root = make_bundle(tmp_path / "b", GOOD.replace(*change))
    with pytest.raises(BundleError) as info:
        Predictor.open(root)
    assert needle in str(info.value)


def test_golden_vectors_verified(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", GOOD + '\n[golden]\nfile = "golden.npz"\natol = 1e-4\n')
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0
    y = x.mean(axis=(2, 3)) @ weight
    np.savez(root / "golden.npz", input_0_image=x, output_0_logits=y)
    p = Predictor.open(root)
    assert p.verify_golden() == []
    p.close()
    np.savez(root / "golden.npz", input_0_image=x, output_0_logits=y + 0.01)
    p = Predictor.open(root)
    problems = p.verify_golden()
    p.close()
    assert len(problems) == 2 and "differs by 0.01" in problems[0]
    np.savez(root / "golden.npz", input_0_image=x[:, :2], output_0_logits=y)
    with pytest.raises(BundleError, match="golden input"):
        Predictor.open(root)


def test_yolo_bundle_maps_boxes_through_letterbox(tmp_path: Path) -> None:
    root = tmp_path / "det"
    root.mkdir()
    rows = np.asarray([[16, 16, 8, 8, 0.9, 0.1, 0.9], [17, 16, 8, 8, 0.8, 0.1, 0.9]], dtype=np.float32)
    onnx_models.yolo_like(root / "model.onnx", rows)
    (root / "bundle.toml").write_text(
        'name = "det"\nversion = "0.1.0"\ntask = "detection"\nmodel = "model.onnx"\nlabels = ["x", "y"]\n'
        'thresholds = { score = 0.5 }\n[input]\nkind = "image"\ncolor = "rgb"\nresize = "letterbox"\n'
        '[detection]\nformat = "yolo"\n'
    )
    p = Predictor.open(root)
    try:
        pred = p.predict_image(np.zeros((64, 128, 3), dtype=np.uint8))  # scale 0.25, 8 px bars top and bottom
        [det] = pred.result["detections"]
        assert det["label"] == "y" and det["score"] == pytest.approx(0.81)
        assert det["box"] == [48.0, 16.0, 80.0, 48.0]
        assert pred.result["candidates"] == 2
    finally:
        p.close()


def test_bare_model_runs_with_inferred_metadata(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "m.onnx", channels=1, size=8, classes=3)
    p = Predictor.open(path)
    try:
        assert p.bundle.inferred and p.kind == "image" and p.input_spec.color == "gray"
        pred = p.predict_image(np.zeros((8, 8), dtype=np.uint8))
        assert pred.task == "raw" and pred.result["outputs"]["logits"]["shape"] == [1, 3]
        with pytest.raises(InputError):
            p.predict_window(np.zeros((4, 1)))
    finally:
        p.close()


def test_multi_input_model_takes_tensors(tmp_path: Path) -> None:
    p = Predictor.open(onnx_models.multi_io(tmp_path / "multi.onnx"))
    try:
        assert p.kind == "tensor"
        pred = p.predict_tensors({"a": np.ones((1, 4), np.float32), "b": np.ones((1, 2, 3), np.float32)})
        assert pred.result["outputs"]["total"]["values"] == [6.0]
        with pytest.raises(InputError, match="missing model inputs"):
            p.predict_tensors({"a": np.ones((1, 4), np.float32)})
        with pytest.raises(InputError, match="2 inputs but 1"):
            p.predict_tensors([np.ones((1, 4), np.float32)])
    finally:
        p.close()
