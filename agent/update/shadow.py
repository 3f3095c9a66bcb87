"""Shadow agreement between the running and the candidate model on the same live input (pure, no I/O).

``frame_agreement`` scores one input in [0, 1] from the two ``Prediction.result`` dicts:

* classification: the top-1 ``label`` is the same (1.0) or not (0.0);
* anomaly: the ``anomaly`` verdict is the same;
* detection: ``detections`` boxes matched greedily (highest IoU first) with IoU >= 0.5 and the same ``label``;
  agreement = matched / max(len_a, len_b), 1.0 when both are empty;
* raw: every output in ``outputs`` has the same shape and its ``values`` (or, for large outputs, its
  ``min``/``max``/``mean`` summary) are close: ``|a - b| <= atol + rtol * max(|a|, |b|)`` (symmetric).

``ShadowTally`` averages the per-frame scores over ``frames_needed`` frames and compares with a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IOU_MATCH = 0.5
_EPS = 1e-9  # float accumulation slack when comparing the mean agreement with the threshold


def frame_agreement(
    task: str, a_result: dict[str, Any], b_result: dict[str, Any], *, atol: float = 1e-3, rtol: float = 1e-3
) -> float:
    """Agreement in [0, 1] of two results of ``task`` on the same input (``atol``/``rtol``: raw task only)."""
    if task == "classification":
        return 1.0 if a_result["label"] == b_result["label"] else 0.0
    if task == "anomaly":
        return 1.0 if bool(a_result["anomaly"]) == bool(b_result["anomaly"]) else 0.0
    if task == "detection":
        return detection_agreement(a_result["detections"], b_result["detections"])
    if task == "raw":
        return 1.0 if raw_outputs_close(a_result["outputs"], b_result["outputs"], atol=atol, rtol=rtol) else 0.0
    raise ValueError(f"unknown task {task!r}")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0.0 for empty boxes)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0) + max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0) - inter
    return inter / union if union > 0 else 0.0


def detection_agreement(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], min_iou: float = IOU_MATCH) -> float:
    """Greedy one-to-one matching of same-label boxes by descending IoU (>= ``min_iou``); matched / max(len)."""
    if not a and not b:
        return 1.0
    pairs = []
    for i, da in enumerate(a):
        for j, db in enumerate(b):
            if da["label"] == db["label"]:
                overlap = iou(da["box"], db["box"])
                if overlap >= min_iou:
                    pairs.append((-overlap, i, j))
    pairs.sort()
    used_a: set[int] = set()
    used_b: set[int] = set()
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a) / max(len(a), len(b))


def raw_outputs_close(a: dict[str, Any], b: dict[str, Any], *, atol: float, rtol: float) -> bool:
    """Same output names and shapes, values (or min/max/mean summaries) close; NaN/Inf mismatches never count."""
    if a.keys() != b.keys():
        return False
    for name, ea in a.items():
        eb = b[name]
        if list(ea["shape"]) != list(eb["shape"]):
            return False
        if "values" in ea and "values" in eb:
            va, vb = ea["values"], eb["values"]
        elif "values" not in ea and "values" not in eb:
            va, vb = [ea["min"], ea["max"], ea["mean"]], [eb["min"], eb["max"], eb["mean"]]
        else:
            return False
        xa, xb = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
        if xa.shape != xb.shape:
            return False
        # symmetric (unlike np.allclose): swapping the two models never changes the verdict; NaN compares False
        with np.errstate(invalid="ignore"):  # inf - inf
            close = np.abs(xa - xb) <= atol + rtol * np.maximum(np.abs(xa), np.abs(xb))
        if not np.all(close):
            return False
    return True


@dataclass
class ShadowTally:
    """Mean agreement over the first ``frames_needed`` frames; ``passed`` when it is >= ``threshold``.

    A frame on which the candidate fails should be added as 0.0. Scores added after ``done`` are ignored.
    """

    frames_needed: int
    threshold: float
    frames: int = field(default=0, init=False)
    total: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.frames_needed < 1:
            raise ValueError(f"frames_needed must be >= 1, got {self.frames_needed}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def add(self, score: float) -> None:
        if not 0.0 <= score <= 1.0:  # also refuses NaN
            raise ValueError(f"agreement score must be in [0, 1], got {score}")
        if self.done:
            return
        self.frames += 1
        self.total += score

    @property
    def done(self) -> bool:
        return self.frames >= self.frames_needed

    @property
    def agreement(self) -> float | None:
        """Mean score so far; None before the first frame."""
        return self.total / self.frames if self.frames else None

    @property
    def passed(self) -> bool | None:
        """None until ``done``; then whether the agreement reaches the threshold."""
        if not self.done:
            return None
        agreement = self.agreement
        assert agreement is not None
        return agreement >= self.threshold - _EPS
