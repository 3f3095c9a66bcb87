"""The predict path's fast paths give exactly what the generic path gives.

Pre-processing (planned geometry, one LUT pass into the model layout), classification read
straight from the runtime's int8/float outputs, vectorized small-n NMS, array box mapping.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import ImageInput
from agent.inputs import read_image
from agent.predictor import Predictor
from agent.processing import postprocess as post
from agent.processing.image import ImagePreprocessor, Transform
from agent.runtime.base import QuantParams, TensorInfo

SAMPLES = Path(__file__).resolve().parent.parent / "agent" / "samples"
IMAGE_SAMPLES = ["digits-classifier-tflite", "digits-classifier-onnx", "digits-detector"]


def _frames(rng: np.random.Generator) -> list[np.ndarray]:
    frames = [read_image(p) for p in sorted((SAMPLES / "inputs").glob("*.png"))]
    scene = read_image(SAMPLES / "inputs" / "scene_1.png")
    for shape in [
        (32, 32, 3),
        (64, 64, 3),
        (96, 128, 3),
        (31, 47, 3),
        (200, 100, 3),
        (5, 300, 3),
        (48, 64),
        (40, 30, 4),
    ]:
        frames.append(rng.integers(0, 256, size=shape, dtype=np.uint8))
    frames.append(scene[2:-3, 1:-2])  # a non-contiguous view
    frames.append(scene[::-1, ::2])  # negative and doubled strides
    frames.append(np.ascontiguousarray(scene[::-1]))
    frames.append(np.zeros((64, 64, 3), np.uint8))
    frames.append(np.full((32, 32, 3), 255, np.uint8))
    frames.append(rng.random((32, 32, 3)).astype(np.float32) * 255)  # not uint8: the generic path
    return frames


def _same_tensor(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.flags.c_contiguous and a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("color", "resize", "layout", "dtype", "per_channel"),
    [
        combo
        for combo in itertools.product(
            ["gray", "rgb", "bgr"],
            ["squash", "letterbox", "crop"],
            ["NHWC", "NCHW"],
            ["int8", "uint8", "float32"],
            [0, 1],
        )
        if not (combo[0] == "gray" and combo[4])
    ],
)
def test_image_fast_path_equals_generic(color: str, resize: str, layout: str, dtype: str, per_channel: int) -> None:
    c = 1 if color == "gray" else 3
    shape = (1, 24, 20, c) if layout == "NHWC" else (1, c, 24, 20)
    q = QuantParams((1 / 255.0,), (-128 if dtype == "int8" else 0,)) if dtype != "float32" else None
    mean, std = ([10.0, 120.0, 200.0], [50.0, 60.0, 70.0]) if per_channel else ([0.0], [255.0])
    spec = ImageInput(layout=layout, color=color, resize=resize, mean=mean, std=std, letterbox_fill=37)
    pre = ImagePreprocessor(spec, TensorInfo("x", shape, np.dtype(dtype), q))
    rng = np.random.default_rng(7)
    for frame in _frames(rng):
        for _ in range(2):  # the second call uses the cached plan
            fast, fast_tf = pre(frame)
            generic, generic_tf = pre._generic(frame)
            assert _same_tensor(fast, generic), (frame.shape, frame.dtype)
            assert fast_tf == generic_tf
            assert fast.shape == shape and pre.exact == (fast.dtype == np.dtype(dtype))
            # written in place (into a runtime's input buffer): the same tensor, or None and nothing written
            out = np.full(shape, 7, dtype=np.dtype(dtype))
            filled_tf = pre.fill(frame, out)
            if filled_tf is None:
                assert not pre.exact or frame.dtype != np.uint8 or pre._plans[frame.shape] is False
                assert (out == 7).all()
            else:
                assert pre.exact and filled_tf == generic_tf and _same_tensor(out, generic)


def _generic_result(p: Predictor, frame: np.ndarray) -> dict:
    """The predict path before the fast paths: generic pre-processing, Model.predict, _post."""
    assert p._image is not None
    tensor, transform = p._image._generic(frame)
    return p._post(tensor, p.model.predict([tensor]), transform)


@pytest.mark.parametrize("bundle", IMAGE_SAMPLES)
def test_sample_predictions_equal_generic_path(bundle: str) -> None:
    p = Predictor.open(SAMPLES / bundle, threads=1)
    try:
        rng = np.random.default_rng(3)
        for frame in _frames(rng):
            pred = p.predict_image(frame)
            assert pred.result == _generic_result(p, frame)
            assert p.run(p.prepare(frame)).result == pred.result
            assert pred.latency_ms > 0 and pred.task == p.bundle.task
        if bundle != "digits-detector":
            assert p._classify_raw is not None and p._softmax is not None  # the raw classifier was used
    finally:
        p.close()


def test_detector_sample_finds_digits() -> None:
    p = Predictor.open(SAMPLES / "digits-detector", threads=1)
    try:
        frame = read_image(SAMPLES / "inputs" / "scene_0.png")
        result = p.predict_image(frame).result
        assert result == _generic_result(p, frame) and result["detections"]
    finally:
        p.close()


def test_sensor_sample_equals_generic_path() -> None:
    p = Predictor.open(SAMPLES / "sensor-anomaly", threads=1)
    try:
        rng = np.random.default_rng(5)
        for i in range(20):
            window = (rng.normal(size=(32, 3)) * (1 + i / 5)).astype(np.float32)
            tensor = p.prepare(window).tensors[0]
            assert p.predict_window(window).result == p._post(tensor, p.model.predict([tensor]), None)
    finally:
        p.close()


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_raw_classifier_codes_equal_generic_classify(dtype: str) -> None:
    """Scores sorted through the byte-rank table give what classify gives on the dequantized outputs, for any
    quantization, threshold and top-k (ties included: equal codes keep index order)."""
    from agent.bundle import ClassificationSpec

    p = Predictor.open(SAMPLES / "digits-classifier-tflite", threads=1)
    rng = np.random.default_rng(11)
    try:
        out, metadata = p.model.outputs[0], p.bundle.metadata
        for trial in range(300):
            quant = QuantParams((float(rng.choice([1 / 256, 0.1, 3.7e-3, 2.0])),), (int(rng.integers(-20, 20)),))
            threshold = float(rng.choice([0.0, 0.05, 0.3, 1.0]))
            top_k = int(rng.integers(1, 12))
            p.model.info.outputs[0] = TensorInfo(out.name, out.shape, np.dtype(dtype), quant, out.index)
            p.bundle.metadata = metadata.model_copy(update={"classification": ClassificationSpec(top_k=top_k)})
            p._threshold = threshold
            classify = p._raw_classifier()
            assert classify is not None
            low, high = (-128, 128) if dtype == "int8" else (0, 256)
            codes = rng.integers(low, high, size=(1, 10)).astype(dtype)
            if trial % 3 == 0:
                codes[0, rng.integers(0, 10, 4)] = codes[0, 0]  # ties
            spec = ClassificationSpec(top_k=top_k)
            expected = post.classify(p.model.dequantize_outputs([codes])[0], spec, p.bundle.labels, threshold, False)
            assert classify([codes], False) == expected
    finally:
        p.model.info.outputs[0] = out
        p.close()


@pytest.mark.parametrize("bundle", ["digits-classifier-tflite", "digits-classifier-onnx"])
def test_run_into_equals_run_raw(bundle: str) -> None:
    """The input written in place (TFLite: into the interpreter's own buffer) gives the outputs run_raw gives; a
    fill that gives up runs nothing; the interpreter stays usable (no view of its memory left alive)."""
    p = Predictor.open(SAMPLES / bundle, threads=1)
    try:
        assert p._image is not None
        for frame in _frames(np.random.default_rng(4))[:12]:
            tensor, transform = p._image(frame)
            done, raw = p.model.run_into(lambda buf, f=frame: p._image.fill(f, buf))  # type: ignore[union-attr]
            if done is None:
                assert raw is None
                continue
            assert done == transform
            assert [a.tobytes() for a in raw] == [a.tobytes() for a in p.model.run_raw([tensor])]
        assert p.model.run_into(lambda buf: None) == (None, None)
        assert p.predict_image(read_image(SAMPLES / "inputs" / "digit_3.png")).result["label"] == "3"
    finally:
        p.close()


def test_raw_classifier_falls_back_on_an_unexpected_dtype() -> None:
    p = Predictor.open(SAMPLES / "digits-classifier-tflite", threads=1)
    try:
        assert p._classify_raw is not None
        assert p._classify_raw([np.zeros((1, 10), np.float32)], False) is None
    finally:
        p.close()


def test_small_nms_equals_loop() -> None:
    rng = np.random.default_rng(0)
    for trial in range(3000):
        n = int(rng.integers(2, 30))
        xy = rng.random((n, 2)) * 50
        wh = rng.random((n, 2)) * 30 - (5 if trial % 3 == 0 else 0)  # some empty/inverted boxes
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        if trial % 4 == 0:
            boxes = np.round(boxes / 4) * 4  # exact duplicates and ties
        if trial % 50 == 0:
            boxes[rng.integers(0, n)] = np.nan
        scores = rng.random(n).astype(np.float32)
        if trial % 5 == 0:
            scores = np.round(scores * 4) / 4
        classes = rng.integers(0, 3, n)
        threshold = float(rng.choice([0.0, 1 / 3, 0.45, 0.5, 1.0]))
        max_out = int(rng.integers(0, 10))
        span = float(boxes.max() - boxes.min()) + 1.0
        shifted = boxes + (classes.astype(np.float32) * span)[:, None]
        order = np.argsort(-scores, kind="stable")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            loop = post._nms_loop(shifted, order, threshold, max_out)
            matrix = post._nms_matrix(shifted, order, threshold, max_out)
        assert matrix.tolist() == loop.tolist()
    one = np.asarray([[0, 0, 1, 1]], np.float32)
    assert post.nms(one, np.ones(1, np.float32), np.zeros(1, int), 0.5, 5).tolist() == [0]
    assert post.nms(one, np.ones(1, np.float32), np.zeros(1, int), 0.5, 0).tolist() == []


def test_box_mapping_equals_per_column_arithmetic() -> None:
    rng = np.random.default_rng(1)
    for i in range(500):
        t = Transform(
            float(rng.random() * 3 + 0.01),
            float(rng.random() * 3 + 0.01),
            float(rng.normal() * 20),
            float(rng.normal() * 20),
            int(rng.integers(1, 2000)),
            int(rng.integers(1, 2000)),
        )
        boxes = (rng.normal(size=(int(rng.integers(1, 20)), 4)) * 300).astype(np.float32)
        if i % 7 == 0:
            boxes[0] = np.nan
        if i % 5 == 0:
            boxes[-1, 0] = -0.0
        want = np.empty_like(boxes)
        want[:, 0::2] = np.clip((boxes[:, 0::2] - np.float32(t.offset_x)) / np.float32(t.scale_x), 0, t.src_width)
        want[:, 1::2] = np.clip((boxes[:, 1::2] - np.float32(t.offset_y)) / np.float32(t.scale_y), 0, t.src_height)
        assert t.to_source(boxes).tobytes() == want.tobytes()
