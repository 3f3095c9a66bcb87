"""Shadow agreement: per-task frame scores on Prediction.result dicts, and the tally over frames."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from agent.bundle import AnomalySpec, ClassificationSpec
from agent.processing import postprocess
from agent.update.shadow import ShadowTally, detection_agreement, frame_agreement, iou, raw_outputs_close


def det(label: str, box: list[float], score: float = 0.9) -> dict[str, Any]:
    return {"label": label, "class": int(label) if label.isdigit() else 0, "score": score, "box": box}


# ---- classification ----------------------------------------------------------------------------------


def test_classification_top1_label() -> None:
    spec = ClassificationSpec()
    a = postprocess.classify(np.asarray([0.1, 2.0, 0.3]), spec, ["a", "b", "c"])
    b = postprocess.classify(np.asarray([0.0, 5.0, 4.9]), spec, ["a", "b", "c"])  # other scores, same top-1
    c = postprocess.classify(np.asarray([0.0, 4.9, 5.0]), spec, ["a", "b", "c"])
    assert frame_agreement("classification", a, b) == 1.0
    assert frame_agreement("classification", a, c) == 0.0
    assert frame_agreement("classification", c, a) == 0.0


def test_classification_below_threshold_on_both_sides_agrees() -> None:
    spec = ClassificationSpec()
    a = postprocess.classify(np.asarray([0.5, 0.5]), spec, None, threshold=0.9)
    assert a["label"] is None
    b = postprocess.classify(np.asarray([0.4, 0.6]), spec, None, threshold=0.9)
    assert frame_agreement("classification", a, b) == 1.0
    sure = postprocess.classify(np.asarray([0.01, 0.99]), spec, None, threshold=0.9)
    assert frame_agreement("classification", a, sure) == 0.0


# ---- anomaly ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("va", "vb", "want"), [(True, True, 1.0), (False, False, 1.0), (True, False, 0.0)])
def test_anomaly_verdict(va: bool, vb: bool, want: float) -> None:
    a = {"score": 0.5, "threshold": 0.1, "anomaly": va}
    b = {"score": 0.01, "threshold": 0.2, "anomaly": vb}  # scores may differ: only the verdict counts
    assert frame_agreement("anomaly", a, b) == want
    assert frame_agreement("anomaly", b, a) == want


def test_anomaly_from_postprocess() -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    spec = AnomalySpec()
    high = postprocess.anomaly(x, [np.asarray([0.9])], spec, 0.5)
    low = postprocess.anomaly(x, [np.asarray([0.1])], spec, 0.5)
    at = postprocess.anomaly(x, [np.asarray([0.5])], spec, 0.5)  # score == threshold is not an anomaly
    assert frame_agreement("anomaly", high, low) == 0.0
    assert frame_agreement("anomaly", low, at) == 1.0


# ---- detection --------------------------------------------------------------------------------------


def test_iou() -> None:
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty boxes never match


def test_detection_both_empty_agree() -> None:
    assert frame_agreement("detection", {"detections": []}, {"detections": []}) == 1.0


def test_detection_one_side_empty() -> None:
    boxes = {"detections": [det("1", [0, 0, 10, 10])]}
    assert frame_agreement("detection", boxes, {"detections": []}) == 0.0
    assert frame_agreement("detection", {"detections": []}, boxes) == 0.0


def test_detection_iou_exactly_half_matches() -> None:
    # [0,0,30,10] vs [10,0,40,10]: intersection 200, union 400 -> IoU exactly 0.5
    a = [det("3", [0, 0, 30, 10])]
    assert iou([0, 0, 30, 10], [10, 0, 40, 10]) == 0.5
    assert detection_agreement(a, [det("3", [10, 0, 40, 10])]) == 1.0
    # a hair less overlap: no match
    assert iou([0, 0, 30, 10], [10.01, 0, 40.01, 10]) < 0.5
    assert detection_agreement(a, [det("3", [10.01, 0, 40.01, 10])]) == 0.0


def test_detection_needs_same_label() -> None:
    a = [det("3", [0, 0, 10, 10])]
    assert detection_agreement(a, [det("8", [0, 0, 10, 10])]) == 0.0


def test_detection_partial_agreement_over_the_longer_list() -> None:
    a = [det("1", [0, 0, 10, 10]), det("2", [20, 20, 30, 30])]
    b = [det("1", [1, 0, 11, 10]), det("2", [20, 20, 30, 30]), det("5", [50, 50, 60, 60])]
    assert frame_agreement("detection", {"detections": a}, {"detections": b}) == pytest.approx(2 / 3)
    assert frame_agreement("detection", {"detections": b}, {"detections": a}) == pytest.approx(2 / 3)


def test_detection_each_box_matches_once() -> None:
    """Two candidate boxes over one running box: one match, the duplicate counts against."""
    a = [det("1", [0, 0, 10, 10])]
    b = [det("1", [0, 0, 10, 10]), det("1", [0, 0, 10, 9])]
    assert detection_agreement(a, b) == 0.5
    assert detection_agreement(b, a) == 0.5


def test_detection_greedy_takes_highest_iou_first() -> None:
    """a0 overlaps b0 best; a1 overlaps only b0 weaker. Greedy by IoU: a0-b0, then a1 has nothing left."""
    a = [det("1", [0, 0, 10, 10]), det("1", [2, 0, 12, 10])]
    b = [det("1", [0, 0, 10, 10])]
    assert iou(a[1]["box"], b[0]["box"]) > 0.5
    assert detection_agreement(a, b) == 0.5
    # and greedy picks the 1.0 pair even when the weaker candidate comes first
    assert detection_agreement(list(reversed(a)), b) == 0.5
    c = [det("1", [0, 0, 10, 10]), det("1", [2, 0, 12, 10])]
    assert detection_agreement(a, c) == 1.0


def test_detection_from_yolo_postprocess() -> None:
    from agent.bundle import DetectionSpec

    spec = DetectionSpec(format="yolo", objectness=True)
    labels = ["a", "b"]
    rows = np.asarray([[16, 16, 8, 8, 0.9, 0.1, 0.9], [48, 48, 8, 8, 0.8, 0.9, 0.1]], dtype=np.float32)
    a = postprocess.detect_yolo(rows[None], spec, labels, 0.3, (64, 64), None)
    shifted = rows.copy()
    shifted[0, 0] += 1  # one box moved by 1 px: still the same object
    shifted[1, 5:] = [0.1, 0.9]  # the other one relabelled
    b = postprocess.detect_yolo(shifted[None], spec, labels, 0.3, (64, 64), None)
    assert len(a["detections"]) == len(b["detections"]) == 2
    assert frame_agreement("detection", a, b) == 0.5
    assert frame_agreement("detection", a, a) == 1.0


# ---- raw --------------------------------------------------------------------------------------------


def raw(*arrays: np.ndarray) -> dict[str, Any]:
    return postprocess.raw(list(arrays), [f"out{i}" for i in range(len(arrays))])


def test_raw_identical_and_within_tolerance() -> None:
    x = np.linspace(0, 1, 10, dtype=np.float32)
    assert frame_agreement("raw", raw(x), raw(x)) == 1.0
    assert frame_agreement("raw", raw(x), raw(x + 0.0009)) == 1.0
    assert frame_agreement("raw", raw(x), raw(x + 0.01)) == 0.0


def test_raw_tolerance_is_configurable() -> None:
    x = np.ones(4, dtype=np.float32)
    assert frame_agreement("raw", raw(x), raw(x + 0.05), atol=0.1) == 1.0
    # relative to the larger magnitude, so the order of the two models does not matter
    assert frame_agreement("raw", raw(x), raw(x * 2), atol=0.0, rtol=0.5) == 1.0
    assert frame_agreement("raw", raw(x * 2), raw(x), atol=0.0, rtol=0.5) == 1.0
    assert frame_agreement("raw", raw(x), raw(x * 2.1), atol=0.0, rtol=0.5) == 0.0
    assert frame_agreement("raw", raw(x * 2.1), raw(x), atol=0.0, rtol=0.5) == 0.0


def test_raw_tolerance_boundary_is_inclusive() -> None:
    a = {"outputs": {"y": {"shape": [1], "dtype": "float32", "values": [1.0]}}}
    b = {"outputs": {"y": {"shape": [1], "dtype": "float32", "values": [1.5]}}}
    assert raw_outputs_close(a["outputs"], b["outputs"], atol=0.5, rtol=0.0)
    assert not raw_outputs_close(a["outputs"], b["outputs"], atol=0.49, rtol=0.0)


def test_raw_all_outputs_must_agree() -> None:
    x, y = np.zeros(3, dtype=np.float32), np.ones(2, dtype=np.float32)
    assert frame_agreement("raw", raw(x, y), raw(x, y)) == 1.0
    assert frame_agreement("raw", raw(x, y), raw(x, y + 1)) == 0.0


def test_raw_shape_or_names_differ() -> None:
    x = np.zeros(4, dtype=np.float32)
    assert frame_agreement("raw", raw(x), raw(x.reshape(2, 2))) == 0.0
    assert frame_agreement("raw", raw(x), raw(x, x)) == 0.0
    other = postprocess.raw([x], ["renamed"])
    assert frame_agreement("raw", raw(x), other) == 0.0


def test_raw_large_outputs_compare_summaries() -> None:
    x = np.linspace(0, 1, 100, dtype=np.float32)
    big = raw(x)
    assert "values" not in big["outputs"]["out0"]
    assert frame_agreement("raw", big, raw(x + 0.0005)) == 1.0
    assert frame_agreement("raw", big, raw(x + 0.1)) == 0.0
    small = {"outputs": {"out0": {"shape": [100], "dtype": "float32", "values": x.tolist()}}}
    assert frame_agreement("raw", big, small) == 0.0  # one summarized, one not: cannot be compared


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_raw_non_finite_never_agrees(bad: float) -> None:
    x = np.asarray([1.0, bad], dtype=np.float32)
    assert frame_agreement("raw", raw(x), raw(x)) == 0.0


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        frame_agreement("segmentation", {}, {})


# ---- tally ------------------------------------------------------------------------------------------


def test_tally_not_done_until_frames_needed() -> None:
    t = ShadowTally(frames_needed=3, threshold=0.5)
    assert not t.done and t.agreement is None and t.passed is None
    t.add(1.0)
    t.add(0.0)
    assert not t.done and t.agreement == 0.5 and t.passed is None
    t.add(1.0)
    assert t.done and t.agreement == pytest.approx(2 / 3) and t.passed is True


def test_tally_threshold_boundary_inclusive() -> None:
    t = ShadowTally(frames_needed=10, threshold=0.9)
    for score in [1.0] * 9 + [0.0]:
        t.add(score)
    assert t.agreement == 0.9 and t.passed is True
    t = ShadowTally(frames_needed=10, threshold=0.9)
    for score in [1.0] * 8 + [0.0, 0.99]:
        t.add(score)
    assert t.agreement < 0.9 and t.passed is False


def test_tally_boundary_survives_float_accumulation() -> None:
    """Ten frames of 0.1 sum to 0.9999999999999999, not 1.0: still exactly at a threshold of 0.1 mean."""
    t = ShadowTally(frames_needed=10, threshold=0.1)
    for _ in range(10):
        t.add(0.1)
    assert t.passed is True


def test_tally_fails_below_threshold() -> None:
    t = ShadowTally(frames_needed=2, threshold=0.95)
    t.add(1.0)
    t.add(0.5)
    assert t.done and t.agreement == 0.75 and t.passed is False


def test_tally_ignores_scores_after_done() -> None:
    t = ShadowTally(frames_needed=2, threshold=1.0)
    t.add(1.0)
    t.add(1.0)
    t.add(0.0)
    assert t.frames == 2 and t.agreement == 1.0 and t.passed is True


def test_tally_partial_scores_from_detection() -> None:
    t = ShadowTally(frames_needed=2, threshold=0.75)
    t.add(0.5)
    t.add(1.0)
    assert t.passed is True


@pytest.mark.parametrize("score", [-0.1, 1.1, math.nan])
def test_tally_refuses_bad_scores(score: float) -> None:
    t = ShadowTally(frames_needed=2, threshold=0.5)
    with pytest.raises(ValueError, match="agreement score"):
        t.add(score)
    assert t.frames == 0


@pytest.mark.parametrize(("frames", "threshold"), [(0, 0.5), (-1, 0.5), (5, -0.01), (5, 1.01)])
def test_tally_refuses_bad_settings(frames: int, threshold: float) -> None:
    with pytest.raises(ValueError):
        ShadowTally(frames_needed=frames, threshold=threshold)


def test_tally_edge_thresholds() -> None:
    zero = ShadowTally(frames_needed=1, threshold=0.0)
    zero.add(0.0)
    assert zero.passed is True
    one = ShadowTally(frames_needed=1, threshold=1.0)
    one.add(1.0)
    assert one.passed is True
