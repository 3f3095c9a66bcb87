"""Which results get published: every one, on change, above a threshold, at most N per second (pure)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PublishPolicy(BaseModel):
    """``[mqtt.results]`` (default for all pipelines) or ``[pipelines.NAME.publish]``."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["every", "on_change", "above_threshold"] = "every"
    threshold: float | None = None  # above_threshold: score (classification/detection) or anomaly score
    max_rate: float | None = Field(default=None, gt=0)  # at most this many results per second
    include_top: bool = True  # classification: send the top-k list, not only the best label


def signature(record: dict[str, Any]) -> Any:
    """What 'changed' means per task: the label, the anomaly verdict, the set of detected labels, the argmax."""
    task = record.get("task")
    if task == "classification":
        return record.get("label")
    if task == "anomaly":
        return bool(record.get("anomaly"))
    if task == "detection":
        return tuple(sorted({d.get("label") for d in record.get("detections", [])}))
    outputs = record.get("outputs") or {}
    first = next(iter(outputs.values()), {})
    return first.get("argmax", first.get("values"))


def above(record: dict[str, Any], threshold: float | None) -> bool:
    task = record.get("task")
    if task == "anomaly":
        if threshold is None:
            return bool(record.get("anomaly"))
        return float(record.get("score") or 0.0) >= threshold
    if task == "detection":
        dets = record.get("detections", [])
        return any(d.get("score", 0.0) >= (threshold or 0.0) for d in dets)
    if task == "classification":
        return float(record.get("score") or 0.0) >= (threshold or 0.0)
    return True


class ResultGate:
    """Per-pipeline state for a ``PublishPolicy``; ``decide`` is called once per result, in order.

    ``max_rate = N`` is a minimum spacing of ``1/N`` s between published results (a result inside it is dropped,
    not queued). With ``on_change`` a result counts as a change when it differs from the last *published* one,
    so a change the spacing held back is published with the first result after the spacing that still shows it
    (a change that was undone inside the spacing is not). Invariant: whenever a result arrives at least ``1/N``
    s after the last publication, the last published signature equals that result's.
    """

    def __init__(self, policy: PublishPolicy) -> None:
        self.policy = policy
        self._sent_signature: Any = object()  # of the last published result (on_change)
        self._last_sent_at: float | None = None
        self.suppressed = 0

    @property
    def min_interval(self) -> float | None:
        """Seconds between published results under ``max_rate`` (a hair under 1/N against float rounding)."""
        return 0.999 / self.policy.max_rate if self.policy.max_rate is not None else None

    def decide(self, record: dict[str, Any], now: float) -> bool:
        policy = self.policy
        passes = True
        sig: Any = None
        if policy.mode == "on_change":
            sig = signature(record)
            passes = sig != self._sent_signature
        elif policy.mode == "above_threshold":
            passes = above(record, policy.threshold)
        spacing = self.min_interval
        if passes and spacing is not None and self._last_sent_at is not None:
            passes = (now - self._last_sent_at) >= spacing
        if passes:
            self._last_sent_at = now
            if policy.mode == "on_change":
                self._sent_signature = sig
        else:
            self.suppressed += 1
        return passes
