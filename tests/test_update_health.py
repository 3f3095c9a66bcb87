"""Post-activation health window: every verdict path, limits exactly at their boundaries."""

from __future__ import annotations

import pytest

from agent.update.health import HealthPolicy, HealthVerdict, HealthWindow

T0 = 1000.0
END = T0 + 60.0


def window(
    policy: HealthPolicy | None = None, baseline: float | None = None, budget: float | None = None
) -> HealthWindow:
    return HealthWindow(policy or HealthPolicy(), started_at=T0, baseline_p95_ms=baseline, budget_ms=budget)


def feed(w: HealthWindow, n: int, *, ok: bool = True, latency: float | None = 10.0, finite: bool = True) -> None:
    for i in range(n):
        w.observe(T0 + 1 + i * 0.01, ok, latency if ok else None, finite)


# ---- policy -----------------------------------------------------------------------------------------


def test_policy_defaults() -> None:
    p = HealthPolicy()
    assert (p.window_s, p.min_results, p.max_error_rate, p.max_nonfinite, p.latency_factor) == (60, 20, 0.05, 0, 2.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0},
        {"window_s": -1},
        {"min_results": -1},
        {"max_nonfinite": -1},
        {"max_error_rate": -0.01},
        {"max_error_rate": 1.01},
        {"latency_factor": 0},
    ],
)
def test_policy_refuses_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


# ---- keep watching and pass -----------------------------------------------------------------------------


def test_watching_until_window_end() -> None:
    w = window()
    assert w.verdict(T0) == HealthVerdict(None, None)
    feed(w, 100)
    assert w.verdict(END - 0.001) == HealthVerdict(None, None)  # healthy but not over yet: no early commit
    assert w.verdict(END) == HealthVerdict(True, None)


def test_before_start_is_watching() -> None:
    assert window().verdict(T0 - 5).ok is None


def test_exactly_min_results_passes() -> None:
    w = window()
    feed(w, 20)
    assert w.results == 20 and w.verdict(END).ok is True


def test_min_results_zero_passes_an_idle_window() -> None:
    w = window(HealthPolicy(min_results=0))
    assert w.verdict(END) == HealthVerdict(True, None)


def test_final_verdict_is_stable() -> None:
    w = window()
    feed(w, 20)
    assert w.verdict(END).ok is True
    w.observe(END + 1, False, None, False)  # after the window: ignored
    assert (w.errors, w.nonfinite) == (0, 0)
    assert w.verdict(END + 100).ok is True


# ---- too few results -------------------------------------------------------------------------------------


def test_one_short_of_min_results_fails_at_end() -> None:
    w = window()
    feed(w, 19)
    assert w.verdict(END - 0.001).ok is None
    assert w.verdict(END) == HealthVerdict(False, "only 19 results in the 60 s health window (need 20)")


def test_stalled_pipeline_fails() -> None:
    w = window()
    assert w.verdict(END) == HealthVerdict(False, "only 0 results in the 60 s health window (need 20)")


def test_too_few_results_names_the_errors() -> None:
    w = window()
    feed(w, 19)
    feed(w, 1, ok=False)  # 20 observations, 5% errors: within the rate, but only 19 results
    assert w.verdict(END - 1).ok is None
    assert w.verdict(END).reason == "only 19 results in the 60 s health window (need 20, 1 error)"
    w2 = window()
    feed(w2, 3, ok=False)  # fewer than min_results observations: the rate is not judged yet
    assert w2.verdict(END - 1).ok is None
    assert w2.verdict(END).reason == "only 0 results in the 60 s health window (need 20, 3 errors)"


def test_window_length_in_reason() -> None:
    w = window(HealthPolicy(window_s=30.5))
    assert w.verdict(T0 + 30.5).reason == "only 0 results in the 30.5 s health window (need 20)"


def test_observation_exactly_at_window_end_does_not_count() -> None:
    w = window()
    feed(w, 19)
    w.observe(END - 1e-6, True, 10.0, True)  # just inside
    w.observe(END, True, 10.0, True)  # at the end: outside
    assert w.results == 20
    assert w.verdict(END).ok is True


# ---- error rate ------------------------------------------------------------------------------------------


def test_error_rate_exactly_at_limit_passes() -> None:
    w = window()
    feed(w, 19)
    feed(w, 1, ok=False)
    feed(w, 1)  # 1 of 21 errors
    assert w.verdict(T0 + 2).ok is None
    assert w.verdict(END).ok is True
    w = window()
    feed(w, 38)
    feed(w, 2, ok=False)  # 2 of 40 = 5.0% exactly
    assert w.error_rate == 0.05 and w.verdict(END).ok is True


def test_error_rate_over_limit_fails_before_window_end() -> None:
    w = window()
    feed(w, 18)
    feed(w, 2, ok=False)  # 2 of 20 = 10%
    v = w.verdict(T0 + 2)
    assert v == HealthVerdict(False, "error rate 10.0% (2 errors in 20 predictions) is over the limit of 5.0%")


def test_error_rate_not_judged_below_min_results() -> None:
    w = window()
    feed(w, 5)
    feed(w, 5, ok=False)  # 50% but only 10 observations
    assert w.verdict(T0 + 2).ok is None
    feed(w, 10)  # 20 observations, 25%
    assert w.verdict(T0 + 3).reason == "error rate 25.0% (5 errors in 20 predictions) is over the limit of 5.0%"


def test_error_rate_failure_is_not_diluted_by_later_successes() -> None:
    w = window()
    feed(w, 19)
    feed(w, 2, ok=False)  # 2 of 21 = 9.5%: fails at this observation
    feed(w, 1000)  # would bring the rate to 0.2%
    v = w.verdict(END)
    assert v.ok is False and v.reason is not None and "2 errors in 21 predictions" in v.reason


def test_error_rate_zero_limit() -> None:
    w = window(HealthPolicy(max_error_rate=0.0, min_results=1))
    feed(w, 1)
    assert w.verdict(T0 + 2).ok is None
    feed(w, 1, ok=False)
    assert w.verdict(T0 + 2).reason == "error rate 50.0% (1 error in 2 predictions) is over the limit of 0.0%"


def test_error_rate_float_boundary() -> None:
    w = window(HealthPolicy(max_error_rate=0.07, min_results=93))
    feed(w, 93)
    feed(w, 7, ok=False)  # 7 of 100
    assert w.verdict(END - 1).ok is None
    assert w.verdict(END).ok is True
    feed(w, 1, ok=False)  # 8 of 101
    assert w.verdict(END).ok is False


# ---- non-finite outputs ------------------------------------------------------------------------------------


def test_one_non_finite_output_fails_at_once() -> None:
    w = window()
    feed(w, 1, finite=False)
    assert w.verdict(T0 + 1.5) == HealthVerdict(False, "non-finite outputs in 1 prediction, over the limit of 0")


def test_non_finite_limit_is_inclusive() -> None:
    w = window(HealthPolicy(max_nonfinite=2))
    feed(w, 2, finite=False)
    feed(w, 18)
    assert w.verdict(T0 + 2).ok is None
    feed(w, 1, finite=False)
    assert w.verdict(T0 + 2) == HealthVerdict(False, "non-finite outputs in 3 predictions, over the limit of 2")


def test_non_finite_checked_before_error_rate() -> None:
    """One observation trips both limits (2 errors in 21, 1 non-finite): the non-finite one is named."""
    w = window()
    feed(w, 19)
    feed(w, 1, ok=False)
    assert w.verdict(T0 + 2).ok is None
    feed(w, 1, ok=False, finite=False)
    assert w.verdict(T0 + 2).reason == "non-finite outputs in 1 prediction, over the limit of 0"


# ---- latency ---------------------------------------------------------------------------------------------


def test_latency_exactly_at_factor_passes() -> None:
    w = window(baseline=50.0)
    feed(w, 20, latency=100.0)
    assert w.p95_ms == 100.0 and w.verdict(END).ok is True


def test_latency_over_factor_fails_at_end_only() -> None:
    w = window(baseline=50.0)
    feed(w, 20, latency=100.5)
    assert w.verdict(END - 1).ok is None
    assert w.verdict(END) == HealthVerdict(
        False, "p95 latency 100.5 ms is over 2x the previous model's p95 of 50.0 ms (100.0 ms)"
    )


def test_latency_factor_float_boundary() -> None:
    """3 * 0.7 is 2.0999999999999996 in floats: a p95 of exactly 2.1 is at the limit, not over it."""
    w = window(HealthPolicy(latency_factor=3.0), baseline=0.7)
    feed(w, 20, latency=2.1)
    assert w.verdict(END).ok is True


def test_latency_exactly_at_budget_passes() -> None:
    w = window(budget=50.0)
    feed(w, 20, latency=50.0)
    assert w.verdict(END).ok is True


def test_latency_over_budget_fails() -> None:
    w = window(budget=50.0)
    feed(w, 20, latency=50.1)
    assert w.verdict(END) == HealthVerdict(False, "p95 latency 50.1 ms is over the bundle's budget of 50 ms")


def test_budget_checked_even_within_factor() -> None:
    """The previous model was slow (p95 40 ms, 2x = 80 ms) but the bundle allows only 60 ms."""
    w = window(baseline=40.0, budget=60.0)
    feed(w, 20, latency=70.0)
    assert w.verdict(END).reason == "p95 latency 70.0 ms is over the bundle's budget of 60 ms"


def test_factor_checked_even_within_budget() -> None:
    w = window(baseline=5.0, budget=50.0)
    feed(w, 20, latency=20.0)
    assert w.verdict(END).reason == "p95 latency 20.0 ms is over 2x the previous model's p95 of 5.0 ms (10.0 ms)"


def test_p95_ignores_a_few_outliers() -> None:
    w = window(baseline=10.0)
    feed(w, 99, latency=10.0)
    feed(w, 1, latency=1000.0)
    assert w.p95_ms == 10.0 and w.verdict(END).ok is True
    w2 = window(baseline=10.0)
    feed(w2, 90, latency=10.0)
    feed(w2, 10, latency=1000.0)  # 10% slow: p95 is slow
    assert w2.p95_ms is not None and w2.p95_ms > 20 and w2.verdict(END).ok is False


def test_sub_millisecond_latency_in_reason() -> None:
    w = window(baseline=0.1)
    feed(w, 20, latency=0.25)
    assert w.verdict(END).reason == "p95 latency 0.250 ms is over 2x the previous model's p95 of 0.100 ms (0.200 ms)"


def test_no_baseline_no_budget_means_no_latency_check() -> None:
    w = window()
    feed(w, 20, latency=10_000.0)
    assert w.verdict(END).ok is True


def test_no_latencies_recorded_means_no_latency_check() -> None:
    w = window(baseline=1.0, budget=1.0)
    feed(w, 20, latency=None)
    assert w.p95_ms is None and w.verdict(END).ok is True


def test_errors_latency_is_ignored() -> None:
    w = window(budget=50.0)
    feed(w, 20, latency=10.0)
    w.observe(T0 + 5, False, 5000.0, True)
    assert w.errors == 1 and w.p95_ms == 10.0 and w.verdict(END).ok is True


def test_too_few_results_checked_before_latency() -> None:
    w = window(budget=1.0)
    feed(w, 5, latency=100.0)
    reason = w.verdict(END).reason
    assert reason is not None and reason.startswith("only 5 results")
