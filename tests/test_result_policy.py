"""Result publishing policies (pure)."""

from __future__ import annotations

import pytest

from agent.mqtt.result_policy import PublishPolicy, ResultGate, above, signature


def cls(label: str, score: float = 0.9) -> dict:
    return {"task": "classification", "label": label, "score": score}


def anomaly(flag: bool, score: float = 0.5) -> dict:
    return {"task": "anomaly", "anomaly": flag, "score": score}


def det(*labels_scores: tuple[str, float]) -> dict:
    return {"task": "detection", "detections": [{"label": lab, "score": s} for lab, s in labels_scores]}


def run(policy: PublishPolicy, records: list[dict], dt: float = 0.01) -> list[bool]:
    gate = ResultGate(policy)
    return [gate.decide(r, i * dt) for i, r in enumerate(records)]


def test_every() -> None:
    assert run(PublishPolicy(), [cls("a")] * 5) == [True] * 5


def test_on_change_per_task() -> None:
    p = PublishPolicy(mode="on_change")
    assert run(p, [cls("a"), cls("a"), cls("b"), cls("b"), cls("a")]) == [True, False, True, False, True]
    assert run(p, [anomaly(False), anomaly(False), anomaly(True), anomaly(True)]) == [True, False, True, False]
    assert run(p, [det(("x", 0.9)), det(("x", 0.5)), det(("x", 0.5), ("y", 0.6)), det()]) == [True, False, True, True]
    raw = {"task": "raw", "outputs": {"y": {"argmax": 2}}}
    assert run(p, [raw, raw, {"task": "raw", "outputs": {"y": {"argmax": 3}}}]) == [True, False, True]


@pytest.mark.parametrize(
    ("record", "threshold", "expected"),
    [
        (cls("a", 0.8), 0.7, True),
        (cls("a", 0.6), 0.7, False),
        (cls("a", 0.7), 0.7, True),
        (anomaly(True, 0.1), None, True),
        (anomaly(False, 0.9), None, False),
        (anomaly(False, 0.9), 0.5, True),
        (det(("x", 0.3)), 0.5, False),
        (det(("x", 0.3), ("y", 0.6)), 0.5, True),
        (det(), 0.5, False),
        ({"task": "raw"}, 0.5, True),
    ],
)
def test_above_threshold(record: dict, threshold: float | None, expected: bool) -> None:
    assert above(record, threshold) is expected
    assert run(PublishPolicy(mode="above_threshold", threshold=threshold), [record]) == [expected]


def test_max_rate_caps_and_counts() -> None:
    gate = ResultGate(PublishPolicy(max_rate=2.0))
    times = [0.0, 0.1, 0.4, 0.5, 0.9, 1.0, 1.6]
    assert [gate.decide(cls("a"), t) for t in times] == [True, False, False, True, False, True, True]
    assert gate.suppressed == 3


def test_on_change_with_rate_cap_reports_the_change_once() -> None:
    gate = ResultGate(PublishPolicy(mode="on_change", max_rate=1.0))
    assert gate.decide(cls("a"), 0.0) is True
    assert gate.decide(cls("b"), 0.2) is False  # change held back by the cap ...
    assert gate.decide(cls("b"), 1.5) is False  # ... and not repeated later: it is no longer a change


def test_signature_defaults() -> None:
    assert signature({"task": "raw", "outputs": {}}) is None
