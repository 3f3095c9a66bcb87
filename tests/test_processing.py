"""Pre- and post-processing: pure functions checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from agent.bundle import ClassificationSpec, DetectionSpec, ImageInput, TimeSeriesInput
from agent.errors import BundleError, InputError
from agent.processing import postprocess as post
from agent.processing.image import ImagePreprocessor, infer_layout
from agent.processing.timeseries import Windower, WindowPreprocessor, sliding_windows
from agent.runtime import quant
from agent.runtime.base import QuantParams, TensorInfo


def tensor(shape, dtype=np.float32, q=None) -> TensorInfo:
    return TensorInfo("x", tuple(shape), np.dtype(dtype), q)


# ---- quantization -------------------------------------------------------------------------------


def test_quantize_roundtrip_and_saturation() -> None:
    p = QuantParams((0.1,), (-5,))
    x = np.asarray([-100.0, -0.04, 0.0, 0.26, 100.0], dtype=np.float32)
    q = quant.quantize(x, p, np.dtype(np.int8))
    assert q.tolist() == [-128, -5, -5, -2, 127]
    np.testing.assert_allclose(quant.dequantize(q, p), [-12.3, 0.0, 0.0, 0.3, 13.2], atol=1e-5)


def test_per_channel_quantization_uses_axis() -> None:
    p = QuantParams((1.0, 0.5), (0, 10), axis=1)
    x = np.asarray([[[2.0, 2.0]], [[1.0, 1.0]]], dtype=np.float32).transpose(1, 0, 2)  # shape (1, 2, 2)
    q = quant.quantize(x, p, np.dtype(np.uint8))
    assert q.tolist() == [[[2, 2], [12, 12]]]
    np.testing.assert_allclose(quant.dequantize(q, p), x)


def test_uint8_lut_fuses_normalization_and_quantization() -> None:
    p = QuantParams((1 / 255.0,), (-128,))
    lut = quant.uint8_lut(p, np.dtype(np.int8), np.zeros(1, np.float32), np.full(1, 255.0, np.float32))
    assert lut.shape == (256, 1) and lut.dtype == np.int8
    assert lut[0, 0] == -128 and lut[255, 0] == 127 and lut[128, 0] == 0


# ---- image pre-processing -----------------------------------------------------------------------


def test_layout_inference() -> None:
    assert infer_layout((1, 224, 224, 3)) == "NHWC"
    assert infer_layout((1, 3, 224, 224)) == "NCHW"
    assert infer_layout((1, 1, 28, 28)) == "NCHW"
    assert infer_layout((1, 10)) is None


def test_squash_gray_nhwc_int8() -> None:
    p = QuantParams((1 / 255.0,), (-128,))
    pre = ImagePreprocessor(ImageInput(color="gray"), tensor((1, 4, 4, 1), np.int8, p))
    frame = np.full((8, 8, 3), 255, dtype=np.uint8)
    out, tf = pre(frame)
    assert out.shape == (1, 4, 4, 1) and out.dtype == np.int8
    assert (out == 127).all()
    assert (tf.scale_x, tf.scale_y) == (0.5, 0.5)


def test_rgb_nchw_float_normalization_and_channel_order() -> None:
    pre = ImagePreprocessor(ImageInput(color="rgb", mean=[0, 0, 0], std=[255, 255, 255]), tensor((1, 3, 2, 2)))
    frame = np.zeros((2, 2, 3), dtype=np.uint8)
    frame[..., 0] = 255  # blue in BGR
    out, _ = pre(frame)
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    assert (out[0, 2] == 1.0).all() and (out[0, 0] == 0.0).all()  # RGB: blue is channel 2


def test_letterbox_maps_boxes_back_to_source() -> None:
    pre = ImagePreprocessor(ImageInput(color="rgb", resize="letterbox"), tensor((1, 64, 64, 3)))
    frame = np.zeros((96, 128, 3), dtype=np.uint8)  # 4:3, scaled by 0.5 to 64x48, padded 8 top/bottom
    out, tf = pre(frame)
    assert out.shape == (1, 64, 64, 3)
    assert tf.scale_x == 0.5 and tf.offset_y == 8.0 and tf.offset_x == 0.0
    assert out[0, 0, 0, 0] == pytest.approx(114 / 255.0)  # padding colour
    box = tf.to_source(np.asarray([[10.0, 8.0, 20.0, 56.0]], dtype=np.float32))
    np.testing.assert_allclose(box, [[20.0, 0.0, 40.0, 96.0]])


def test_crop_keeps_aspect_and_cuts_overhang() -> None:
    pre = ImagePreprocessor(ImageInput(color="gray", resize="crop"), tensor((1, 1, 10, 10)))
    frame = np.zeros((10, 20), dtype=np.uint8)
    frame[:, 5:15] = 255  # the centre square is white
    out, tf = pre(frame)
    assert out.shape == (1, 1, 10, 10)
    assert out.min() == 1.0  # only the white centre survives the crop
    np.testing.assert_allclose(tf.to_source(np.asarray([[0.0, 0.0, 10.0, 10.0]])), [[5.0, 0.0, 15.0, 10.0]])


def test_preprocessor_refuses_metadata_mismatch() -> None:
    with pytest.raises(BundleError, match="colour"):
        ImagePreprocessor(ImageInput(color="rgb"), tensor((1, 8, 8, 1)))
    with pytest.raises(BundleError, match="size"):
        ImagePreprocessor(ImageInput(color="gray", size=(16, 16)), tensor((1, 8, 8, 1)))
    with pytest.raises(BundleError, match="mean"):
        ImagePreprocessor(ImageInput(color="rgb", mean=[1, 2]), tensor((1, 8, 8, 3)))
    with pytest.raises(BundleError, match="not an image"):
        ImagePreprocessor(ImageInput(), tensor((1, 10)))


def test_preprocessor_rejects_bad_frames() -> None:
    pre = ImagePreprocessor(ImageInput(color="gray"), tensor((1, 4, 4, 1)))
    with pytest.raises(InputError):
        pre(np.zeros((0, 0), dtype=np.uint8))
    with pytest.raises(InputError):
        pre(np.zeros((4, 4, 5), dtype=np.uint8))


# ---- classification -----------------------------------------------------------------------------


def test_softmax_applied_to_logits_only() -> None:
    spec = ClassificationSpec(top_k=2)
    logits = np.asarray([[1.0, 3.0, 2.0]], dtype=np.float32)
    res = post.classify(logits, spec, ["a", "b", "c"])
    assert res["label"] == "b" and [t["label"] for t in res["top"]] == ["b", "c"]
    assert res["score"] == pytest.approx(float(post.softmax(logits)[0, 1]), abs=1e-6)
    probs = np.asarray([0.2, 0.5, 0.3], dtype=np.float32)
    assert post.classify(probs, spec, None)["score"] == pytest.approx(0.5)
    assert post.classify(probs, ClassificationSpec(softmax="always"), None)["score"] < 0.5


def test_classification_threshold_filters() -> None:
    res = post.classify(np.asarray([0.1, 0.9]), ClassificationSpec(top_k=2), None, threshold=0.5)
    assert [t["index"] for t in res["top"]] == [1]
    none = post.classify(np.asarray([0.5, 0.5]), ClassificationSpec(), None, threshold=0.9)
    assert none["label"] is None and none["top"] == []


# ---- detection ----------------------------------------------------------------------------------


def test_nms_suppresses_overlaps_within_a_class_only() -> None:
    boxes = np.asarray([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.asarray([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    classes = np.asarray([0, 0, 1, 0])
    keep = post.nms(boxes, scores, classes, iou_threshold=0.5, max_out=10)
    assert keep.tolist() == [0, 2, 3]
    assert post.nms(boxes, scores, classes, 0.5, max_out=1).tolist() == [0]
    assert post.nms(boxes[:0], scores[:0], classes[:0], 0.5, 10).size == 0


def test_yolo_decode_threshold_nms_and_transposed_layout() -> None:
    # rows: cx, cy, w, h, objectness, p(class0), p(class1)
    rows = np.asarray(
        [
            [20, 20, 10, 10, 0.9, 0.9, 0.1],
            [21, 21, 10, 10, 0.8, 0.9, 0.1],  # duplicate of the first
            [50, 50, 8, 8, 0.9, 0.2, 0.8],
            [5, 5, 4, 4, 0.1, 0.5, 0.5],  # below threshold
        ],
        dtype=np.float32,
    )
    spec = DetectionSpec(format="yolo", iou_threshold=0.5)
    res = post.detect_yolo(rows[None], spec, ["cat", "dog"], 0.3, (64, 64), None)
    assert res["candidates"] == 3
    dets = res["detections"]
    assert [d["label"] for d in dets] == ["cat", "dog"]
    assert dets[0]["box"] == [15.0, 15.0, 25.0, 25.0]
    assert dets[0]["score"] == pytest.approx(0.81)
    res_t = post.detect_yolo(rows.T[None], spec, ["cat", "dog"], 0.3, (64, 64), None)  # (1, K, N) like YOLOv8
    assert res_t["detections"] == dets


def test_ssd_layout_by_shape_and_normalized_boxes() -> None:
    boxes = np.asarray([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0]]], dtype=np.float32)
    classes = np.asarray([[2.0, 0.0, 0.0]], dtype=np.float32)
    scores = np.asarray([[0.9, 0.3, 0.0]], dtype=np.float32)
    count = np.asarray([2.0], dtype=np.float32)
    spec = DetectionSpec(format="ssd", box_format="yxyx")
    for order in ([boxes, classes, scores, count], [scores, boxes, count, classes]):
        res = post.detect_ssd(order, spec, ["a", "b", "c"], 0.5, (100, 200), None)
        assert res["candidates"] == 2
        [det] = res["detections"]
        assert det["label"] == "c" and det["box"] == [20.0, 20.0, 60.0, 100.0]


# ---- anomaly and raw ----------------------------------------------------------------------------


def test_anomaly_reconstruction_score() -> None:
    from agent.bundle import AnomalySpec

    x = np.zeros((1, 4, 2), dtype=np.float32)
    y = np.full((1, 4, 2), 0.5, dtype=np.float32)
    res = post.anomaly(x, [y], AnomalySpec(score="reconstruction"), threshold=0.2)
    assert res == {"score": 0.25, "threshold": 0.2, "anomaly": True}
    assert post.anomaly(x, [np.asarray([0.1])], AnomalySpec(), 0.2)["anomaly"] is False


def test_raw_outputs_summary() -> None:
    res = post.raw([np.arange(3.0), np.zeros((10, 10))], ["small", "big"])
    assert res["outputs"]["small"]["values"] == [0.0, 1.0, 2.0]
    assert res["outputs"]["big"]["shape"] == [10, 10] and "values" not in res["outputs"]["big"]


# ---- time series --------------------------------------------------------------------------------


def test_sliding_windows() -> None:
    data = np.arange(20, dtype=np.float32).reshape(10, 2)
    wins = sliding_windows(data, window=4, stride=3)
    assert wins.shape == (3, 4, 2)
    np.testing.assert_array_equal(wins[1], data[3:7])
    assert sliding_windows(data[:3], 4, 1).shape[0] == 0


def test_streaming_windower_matches_sliding_windows() -> None:
    data = np.random.default_rng(0).normal(size=(23, 3)).astype(np.float32)
    win = Windower(window=5, stride=2, channels=3)
    streamed = [w for row in data if (w := win.push(row)) is not None]
    np.testing.assert_array_equal(np.stack(streamed), sliding_windows(data, 5, 2))
    with pytest.raises(InputError):
        win.push(np.zeros(2))
    win.reset()
    assert all(win.push(row) is None for row in data[:4])


def test_window_preprocessor_standardizes_and_lays_out() -> None:
    spec = TimeSeriesInput(window=4, stride=2, channels=["a", "b"], mean=[1.0, 2.0], std=[2.0, 4.0], layout="NCW")
    pre = WindowPreprocessor(spec, tensor((1, 2, 4)))
    window = np.tile(np.asarray([3.0, 6.0], dtype=np.float32), (4, 1))
    out = pre(window)
    assert out.shape == (1, 2, 4)
    np.testing.assert_allclose(out[0, 0], 1.0)
    np.testing.assert_allclose(out[0, 1], 1.0)
    with pytest.raises(BundleError):
        WindowPreprocessor(spec, tensor((1, 3, 4)))
    with pytest.raises(InputError):
        pre(np.zeros((3, 2)))
