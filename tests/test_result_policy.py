"""Result publishing policies (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_on_change_with_rate_cap_reports_a_held_back_change_once_the_cap_allows() -> None:
    gate = ResultGate(PublishPolicy(mode="on_change", max_rate=1.0))
    assert gate.decide(cls("a"), 0.0) is True
    assert gate.decide(cls("b"), 0.2) is False  # change held back by the cap ...
    assert gate.decide(cls("b"), 1.5) is True  # ... and published once the cap allows, since it still holds
    assert gate.decide(cls("b"), 3.0) is False  # ... once: it is no longer a change


def test_on_change_with_rate_cap_a_lasting_anomaly_is_reported() -> None:
    """The issue's case: False, True at 0.1 s, True at 5 s, True at 60 s; the problem sensor must turn ON."""
    gate = ResultGate(PublishPolicy(mode="on_change", max_rate=1.0))
    seq = [(anomaly(False), 0.0), (anomaly(True), 0.1), (anomaly(True), 5.0), (anomaly(True), 60.0)]
    assert [gate.decide(r, t) for r, t in seq] == [True, False, True, False]


def test_on_change_with_rate_cap_a_change_undone_inside_the_spacing_is_not_published() -> None:
    gate = ResultGate(PublishPolicy(mode="on_change", max_rate=1.0))
    assert [gate.decide(cls(lab), t) for lab, t in [("a", 0.0), ("b", 0.3), ("a", 0.6), ("a", 2.0)]] == [
        True,
        False,
        False,
        False,  # "a" is what was last published: nothing changed for a consumer
    ]


LABELS = st.sampled_from(["a", "b", "c"])
STEPS = st.lists(st.tuples(LABELS, st.floats(min_value=0.0, max_value=3.0, allow_nan=False)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(steps=STEPS, max_rate=st.sampled_from([None, 0.5, 1.0, 2.0, 10.0]))
def test_on_change_property_the_latest_value_is_always_reported(
    steps: list[tuple[str, float]], max_rate: float | None
) -> None:
    """Random label sequences at random (non-decreasing) times, with and without a rate cap.

    With S the gate's minimum spacing (0 without a cap), after every result r at time t:
    (1) published results are at least S apart, and each differs from the previous published one;
    (2) if t is at least S after the last publication (or nothing was published yet), the last published label
        equals r's label: a change is never lost, it is at most delayed until the spacing has passed and a
        result still shows it;
    (3) the first result is always published.
    """
    gate = ResultGate(PublishPolicy(mode="on_change", max_rate=max_rate))
    spacing = gate.min_interval or 0.0
    now = 0.0
    published: list[tuple[str, float]] = []
    for i, (label, dt) in enumerate(steps):
        now += dt
        last_at = published[-1][1] if published else None
        cap_open = last_at is None or now - last_at >= spacing
        if gate.decide(cls(label), now):
            if published:
                assert now - published[-1][1] >= spacing
                assert label != published[-1][0]
            published.append((label, now))
        if i == 0:
            assert published == [(label, now)]
        if cap_open:
            assert published[-1][0] == label, (steps[: i + 1], published)


def test_signature_defaults() -> None:
    assert signature({"task": "raw", "outputs": {}}) is None
