"""Post-processing: classification top-k, detection (SSD layout and YOLO grids + NMS), anomaly scores.

Pure functions over NumPy arrays; results are plain JSON-ready dicts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.bundle import AnomalySpec, ClassificationSpec, DetectionSpec
from agent.errors import BundleError
from agent.processing.image import Transform

SMALL = 256  # outputs up to this size are post-processed in plain Python
NMS_MATRIX = 256  # up to this many candidates NMS computes all pairwise IoUs at once


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def looks_like_probabilities(x: np.ndarray, tol: float = 0.02) -> bool:
    """True when every value is in [0, 1] and they sum to ~1 (allowing int8 rounding)."""
    return bool(np.all(x >= -tol) and np.all(x <= 1 + tol) and abs(float(np.sum(x)) - 1.0) <= max(tol, 0.01 * x.size))


def _label(labels: list[str] | None, index: int) -> str:
    return labels[index] if labels and 0 <= index < len(labels) else str(index)


def classify(
    scores: np.ndarray,
    spec: ClassificationSpec,
    labels: list[str] | None,
    threshold: float = 0.0,
    apply_softmax: bool | None = None,
) -> dict[str, Any]:
    """Top-k classes with probabilities; softmax applied when the outputs are logits.

    ``apply_softmax`` lets a caller pass the (per-model) decision it already made.
    """
    flat = np.asarray(scores, dtype=np.float32).reshape(-1)
    if apply_softmax is None:
        apply_softmax = needs_softmax(flat, spec)
    if flat.size <= SMALL:
        # a few hundred classes: plain Python on one list is several times faster than a chain of NumPy calls
        return classify_values(flat.tolist(), spec.top_k, labels, threshold, apply_softmax)
    k = min(spec.top_k, flat.size)
    if apply_softmax:
        flat = softmax(flat)
    idx = _top_k_large(flat, k)
    scored = zip(idx.tolist(), flat[idx].tolist(), strict=True)
    return _classes([(i, v) for i, v in scored if v >= threshold], labels)


def classify_values(
    values: list[float], top_k: int, labels: list[str] | None, threshold: float, apply_softmax: bool
) -> dict[str, Any]:
    """``classify`` on scores already read into a list of floats (float32 values, as ``tolist`` gives)."""
    if apply_softmax:
        peak = max(values)
        exps = [math.exp(v - peak) for v in values]
        total = sum(exps)
        values = [e / total for e in exps]
    top = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:top_k]
    names = labels or []
    classes = [
        {"index": i, "label": names[i] if i < len(names) else str(i), "score": round(v, 6)}
        for i in top
        if (v := values[i]) >= threshold
    ]
    if not classes:
        return {"top": classes, "label": None, "score": None}
    best = classes[0]
    return {"top": classes, "label": best["label"], "score": best["score"]}


def _classes(scored: list[tuple[int, float]], labels: list[str] | None) -> dict[str, Any]:
    classes = [{"index": i, "label": _label(labels, i), "score": round(v, 6)} for i, v in scored]
    best = classes[0] if classes else None
    return {"top": classes, "label": best["label"] if best else None, "score": best["score"] if best else None}


def needs_softmax(flat: np.ndarray, spec: ClassificationSpec) -> bool:
    return spec.softmax == "always" or (spec.softmax == "auto" and not looks_like_probabilities(flat))


def _top_k_large(flat: np.ndarray, k: int) -> np.ndarray:
    top = np.argpartition(-flat, k - 1)[:k]
    return top[np.argsort(-flat[top], kind="stable")]


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if box_format == "xyxy":
        return boxes
    if box_format == "yxyx":
        return boxes[:, [1, 0, 3, 2]]
    centre, half = boxes[:, :2], boxes[:, 2:4] / 2
    return np.concatenate((centre - half, centre + half), axis=1)


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_out: int) -> np.ndarray:
    """Class-aware greedy non-maximum suppression; returns kept indices by descending score."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    if len(boxes) == 1:  # nothing to suppress
        return np.zeros(1 if max_out > 0 else 0, dtype=np.int64)
    # Offsetting boxes per class keeps classes from suppressing each other in one pass.
    span = float(boxes.max() - boxes.min()) + 1.0
    shifted = boxes + (classes.astype(np.float32) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    if len(boxes) <= NMS_MATRIX:
        return _nms_matrix(shifted, order, iou_threshold, max_out)
    return _nms_loop(shifted, order, iou_threshold, max_out)


def _nms_loop(shifted: np.ndarray, order: np.ndarray, iou_threshold: float, max_out: int) -> np.ndarray:
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = iou_one_to_many(shifted[i], shifted[order[1:]])
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _nms_matrix(shifted: np.ndarray, order: np.ndarray, iou_threshold: float, max_out: int) -> np.ndarray:
    """``_nms_loop`` for a few candidates: every pairwise IoU in one vectorized pass, then the greedy walk
    in plain Python. The same float32 arithmetic per pair as ``iou_one_to_many``, so the same decisions."""
    top_left = np.maximum(shifted[:, None, :2], shifted[None, :, :2])  # [i, j]: x1, y1 of the intersection
    bottom_right = np.minimum(shifted[:, None, 2:], shifted[None, :, 2:])
    # maximum(., 0) where iou_one_to_many clips at 0: they can differ only in the sign of a zero (NaN stays
    # NaN in both), which changes no comparison below
    sides = np.maximum(bottom_right - top_left, 0)
    inter = sides[..., 0] * sides[..., 1]
    extent = shifted[:, 2:] - shifted[:, :2]
    areas = extent[:, 0] * extent[:, 1]
    union = areas[:, None] + areas[None, :] - inter
    ious = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    kept_by = (ious <= iou_threshold).tolist()  # kept_by[i][j]: j survives i
    rest = order.tolist()
    keep: list[int] = []
    while rest and len(keep) < max_out:
        i = rest[0]
        keep.append(i)
        row = kept_by[i]
        rest = [j for j in rest[1:] if row[j]]
    return np.asarray(keep, dtype=np.int64)


def _detections(
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    labels: list[str] | None,
    transform: Transform | None,
) -> list[dict[str, Any]]:
    if transform is not None and len(boxes_xyxy):
        boxes_xyxy = transform.to_source(boxes_xyxy)
    # tolist: the same Python floats/ints as float()/int() of each element, without per-element NumPy scalars
    return [
        {
            "label": _label(labels, c),
            "class": c,
            "score": round(s, 5),
            "box": [round(v, 1) for v in b],
        }
        for b, s, c in zip(
            _floats(boxes_xyxy),
            _floats(scores),
            np.asarray(classes).astype(np.int64, copy=False).tolist(),
            strict=True,
        )
    ]


def _floats(values: np.ndarray) -> list[Any]:
    """``tolist`` with Python floats (as ``float()`` of each element gives) whatever the dtype."""
    values = np.asarray(values)
    return (values if values.dtype.kind == "f" else values.astype(np.float64)).tolist()


def detect_yolo(
    output: np.ndarray,
    spec: DetectionSpec,
    labels: list[str] | None,
    threshold: float,
    input_size: tuple[int, int],
    transform: Transform | None,
) -> dict[str, Any]:
    """Decode a raw (1, N, 4+[1]+C) or (1, 4+[1]+C, N) grid output, then NMS."""
    pred = np.asarray(output, dtype=np.float32)
    pred = pred.reshape(pred.shape[-2:]) if pred.ndim == 3 else pred
    if pred.ndim != 2:
        raise BundleError(
            f"yolo output must be (1, N, K) or (1, K, N), got {list(np.shape(output))}", "fix [detection]"
        )
    expected_k = 4 + (1 if spec.objectness else 0) + len(labels) if labels else None
    if (expected_k is not None and pred.shape[1] != expected_k and pred.shape[0] == expected_k) or (
        expected_k is None and pred.shape[0] < pred.shape[1]
    ):
        pred = pred.T
    if pred.shape[1] < 5 + (1 if spec.objectness else 0):
        raise BundleError(f"yolo output rows have {pred.shape[1]} values, too few for box + scores", "fix [detection]")
    class_scores = pred[:, 5:] if spec.objectness else pred[:, 4:]
    classes = np.argmax(class_scores, axis=1)
    scores = class_scores[np.arange(len(pred)), classes]
    if spec.objectness:
        scores = scores * pred[:, 4]
    picked = np.flatnonzero(scores >= threshold)
    if not picked.size:  # nothing above the threshold: what the steps below give for no candidates
        return {"detections": [], "candidates": 0}
    boxes = to_xyxy(pred[picked, :4], spec.box_format)
    if spec.normalized_boxes:
        boxes = boxes * np.asarray([input_size[0], input_size[1]] * 2, dtype=np.float32)
    scores, classes = scores[picked], classes[picked]
    keep = nms(boxes, scores, classes, spec.iou_threshold, spec.max_detections)
    return {
        "detections": _detections(boxes[keep], scores[keep], classes[keep], labels, transform),
        "candidates": int(picked.size),
    }


def _ssd_order(outputs: list[np.ndarray], spec: DetectionSpec) -> tuple[int, int, int, int]:
    if spec.ssd_outputs is not None:
        return spec.ssd_outputs
    if len(outputs) != 4:
        raise BundleError(
            f"ssd detection needs 4 outputs (boxes, classes, scores, count), model has {len(outputs)}",
            "fix [detection]",
        )
    boxes = [i for i, o in enumerate(outputs) if o.ndim >= 2 and o.shape[-1] == 4]
    count = [i for i, o in enumerate(outputs) if o.size == 1]
    rest = [i for i in range(4) if i not in boxes[:1] + count[:1]]
    if len(boxes) < 1 or len(count) < 1 or len(rest) != 2:
        raise BundleError(
            "cannot tell the SSD outputs apart by shape",
            "set [detection].ssd_outputs = [boxes, classes, scores, count]",
        )
    a, b = rest
    integral_a = bool(np.all(np.equal(np.mod(outputs[a], 1), 0)))
    integral_b = bool(np.all(np.equal(np.mod(outputs[b], 1), 0)))
    classes, scores = (a, b) if integral_a and not integral_b else (b, a) if integral_b and not integral_a else (a, b)
    return boxes[0], classes, scores, count[0]


def detect_ssd(
    outputs: list[np.ndarray],
    spec: DetectionSpec,
    labels: list[str] | None,
    threshold: float,
    input_size: tuple[int, int],
    transform: Transform | None,
) -> dict[str, Any]:
    """Read TFLite SSD post-processed outputs: boxes (ymin,xmin,ymax,xmax normalized), classes, scores, count."""
    bi, ci, si, ni = _ssd_order(outputs, spec)
    boxes = np.asarray(outputs[bi], dtype=np.float32).reshape(-1, 4)
    classes = np.asarray(outputs[ci]).reshape(-1).astype(np.int64) + spec.class_offset
    scores = np.asarray(outputs[si], dtype=np.float32).reshape(-1)
    count = min(int(np.asarray(outputs[ni]).reshape(-1)[0]), len(scores))
    boxes, classes, scores = boxes[:count], classes[:count], scores[:count]
    mask = scores >= threshold
    xyxy = to_xyxy(boxes[mask], spec.box_format if spec.box_format != "cxcywh" else "yxyx")
    if spec.normalized_boxes or (len(xyxy) and float(np.max(np.abs(xyxy))) <= 1.5):
        xyxy = xyxy * np.asarray([input_size[0], input_size[1]] * 2, dtype=np.float32)
    order = np.argsort(-scores[mask], kind="stable")[: spec.max_detections]
    return {
        "detections": _detections(xyxy[order], scores[mask][order], classes[mask][order], labels, transform),
        "candidates": count,
    }


def anomaly(
    model_input: np.ndarray, outputs: list[np.ndarray], spec: AnomalySpec, threshold: float | None
) -> dict[str, Any]:
    """Anomaly score (model output, or reconstruction MSE against the input) and its verdict."""
    out = np.asarray(outputs[spec.output], dtype=np.float32)
    if spec.score == "reconstruction":
        score = float(np.mean((out.reshape(-1) - np.asarray(model_input, dtype=np.float32).reshape(-1)) ** 2))
    else:
        score = float(np.mean(out))
    return {
        "score": round(score, 6),
        "threshold": threshold,
        "anomaly": bool(threshold is not None and score > threshold),
    }


def raw(outputs: list[np.ndarray], names: list[str], max_values: int = 64) -> dict[str, Any]:
    """Raw outputs: shape, summary, and the values when small."""
    result = {}
    for name, out in zip(names, outputs, strict=True):
        arr = np.asarray(out)
        entry: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        if arr.size <= max_values:
            entry["values"] = np.round(arr.astype(np.float64), 6).reshape(-1).tolist()
        else:
            entry.update(min=float(arr.min()), max=float(arr.max()), mean=float(arr.mean()))
        if arr.size > 1:
            entry["argmax"] = int(np.argmax(arr))
        result[name] = entry
    return {"outputs": result}
