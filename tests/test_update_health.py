"""Post-activation health window: every verdict path, limits exactly at their boundaries."""

from __future__ import annotations

import math

import pytest

from agent.update.health import (
    DEFAULT_LATENCY_FLOOR_MS,
    POLICY_FIELDS,
    HealthPolicy,
    HealthVerdict,
    HealthWindow,
    baseline_p95,
    p95_of,
    resolve_policy,
    window_shortfall,
)

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
    assert p.latency_floor_ms == DEFAULT_LATENCY_FLOOR_MS == 5.0


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
        {"latency_factor": math.inf},
        {"latency_floor_ms": -0.001},
        {"latency_floor_ms": math.nan},
        {"window_s": math.inf},
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


def test_latency_limit_is_the_larger_of_factor_and_floor() -> None:
    p = HealthPolicy(latency_factor=2.0, latency_floor_ms=5.0)
    assert p.latency_limit_ms(0.34) == 5.34  # sub-millisecond model: the floor decides
    assert p.latency_limit_ms(50.0) == 100.0  # slow model: the factor decides
    assert p.latency_limit_ms(5.0) == 10.0  # both equal


def test_latency_exactly_at_factor_passes() -> None:
    w = window(baseline=50.0)
    feed(w, 20, latency=100.0)
    assert w.p95_ms == 100.0 and w.verdict(END).ok is True


def test_latency_over_factor_fails_at_end_only() -> None:
    w = window(baseline=50.0)
    feed(w, 20, latency=100.5)
    assert w.verdict(END - 1).ok is None
    assert w.verdict(END) == HealthVerdict(
        False,
        "p95 latency 100.5 ms is over 2x the previous model's p95 of 50.0 ms (100.0 ms) and more than 5 ms above it",
        retime=True,
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
    assert w.verdict(END).reason == (
        "p95 latency 20.0 ms is over 2x the previous model's p95 of 5.0 ms (10.0 ms) and more than 5 ms above it"
    )


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
    w = window(HealthPolicy(latency_floor_ms=0.1), baseline=0.1)
    feed(w, 20, latency=0.25)
    assert w.verdict(END).reason == (
        "p95 latency 0.250 ms is over 2x the previous model's p95 of 0.100 ms (0.200 ms) and more than 0.1 ms above it"
    )


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


# ---- latency floor: a busy CPU does not roll back a model as fast as the old one --------------------------------


def test_the_failing_e2e_case_passes_the_floor() -> None:
    """Seen in test_many_devices_taking_one_target_share_the_chunks on a busy machine: 0.70 ms vs 0.34 ms (2.06x)."""
    for p95 in (0.70, 0.88):
        w = window(HealthPolicy(window_s=3, min_results=10), baseline=0.34)
        feed(w, 90, latency=p95)
        assert w.verdict(END) == HealthVerdict(True, None)


def test_over_factor_but_within_floor_passes() -> None:
    w = window(baseline=1.0)
    feed(w, 20, latency=6.0)  # 6x, but exactly 5 ms above: at the floor, inclusive
    assert w.verdict(END).ok is True
    w = window(baseline=1.0)
    feed(w, 20, latency=6.01)  # 6.01x and 5.01 ms above: both limits crossed
    assert w.verdict(END).ok is False


def test_over_floor_but_within_factor_passes() -> None:
    w = window(baseline=40.0)
    feed(w, 20, latency=80.0)  # 40 ms above, but exactly 2x
    assert w.verdict(END).ok is True


def test_floor_zero_is_the_pure_factor_rule() -> None:
    w = window(HealthPolicy(latency_floor_ms=0.0), baseline=0.34)
    feed(w, 20, latency=0.70)
    verdict = w.verdict(END)
    assert verdict.ok is False and verdict.retime is True
    assert verdict.reason == (
        "p95 latency 0.700 ms is over 2x the previous model's p95 of 0.340 ms (0.680 ms) and more than 0 ms above it"
    )


def test_floor_float_boundary() -> None:
    """0.1 + 0.2 is 0.30000000000000004: a p95 of 0.3 ms over a 0.1 ms baseline with a 0.2 ms floor is at it."""
    w = window(HealthPolicy(latency_factor=1.0, latency_floor_ms=0.2), baseline=0.1)
    feed(w, 20, latency=0.3)
    assert w.verdict(END).ok is True


def test_huge_floor_disables_the_latency_rule_but_not_the_budget() -> None:
    w = window(HealthPolicy(latency_floor_ms=600_000), baseline=1.0, budget=100.0)
    feed(w, 20, latency=99.0)
    assert w.verdict(END).ok is True
    w = window(HealthPolicy(latency_floor_ms=600_000), baseline=1.0, budget=100.0)
    feed(w, 20, latency=101.0)
    verdict = w.verdict(END)
    assert verdict.reason == "p95 latency 101.0 ms is over the bundle's budget of 100 ms" and not verdict.retime


def test_budget_failure_is_not_retimed() -> None:
    w = window(baseline=1.0, budget=10.0)
    feed(w, 20, latency=50.0)
    verdict = w.verdict(END)
    assert verdict.ok is False and verdict.retime is False
    assert w.confirm_latency([1.0] * 10, [1.0] * 10) == verdict  # re-timing cannot overturn a budget failure


def test_only_a_latency_failure_against_the_baseline_asks_for_retiming() -> None:
    for w in (window(), window(baseline=10.0)):
        feed(w, 5)
        assert w.verdict(END).retime is False  # too few results
    w = window()
    feed(w, 20, finite=False)
    assert w.verdict(END).retime is False


# ---- paired re-timing ------------------------------------------------------------------------------------


def slow_window(baseline: float = 1.0, latency: float = 20.0, policy: HealthPolicy | None = None) -> HealthWindow:
    w = window(policy, baseline=baseline)
    feed(w, 20, latency=latency)
    assert w.verdict(END).retime
    return w


def test_retiming_as_fast_as_the_previous_model_commits() -> None:
    """The baseline was taken on an idle CPU (1 ms), the window ran on a busy one (20 ms): side by side under the
    same load both take 15 ms, so the new model is not slower."""
    w = slow_window()
    assert w.confirm_latency([15.0] * 30, [15.0] * 30) == HealthVerdict(True, None)
    assert w.verdict(END) == HealthVerdict(True, None)  # and that is the verdict from now on
    assert w.verdict(END + 100).ok is True


def test_retiming_confirms_a_slower_model() -> None:
    w = slow_window()
    verdict = w.confirm_latency([40.0] * 30, [10.0] * 30)
    assert verdict == HealthVerdict(
        False,
        "median latency 40.0 ms is over 2x the previous model's median of 10.0 ms (20.0 ms) and more than 5 ms "
        "above it, timed side by side on the same input (30 runs each; p95 in the health window 20.0 ms)",
    )
    assert w.verdict(END) == verdict


def test_retiming_uses_the_same_factor_and_floor() -> None:
    w = slow_window()
    assert w.confirm_latency([20.0] * 10, [10.0] * 10).ok is True  # exactly 2x: inclusive
    w = slow_window()
    assert w.confirm_latency([5.9] * 10, [0.9] * 10).ok is True  # 6.6x but only 5 ms above: the floor
    w = slow_window()
    assert w.confirm_latency([6.0] * 10, [0.9] * 10).ok is False
    w = slow_window(policy=HealthPolicy(latency_factor=3.0, latency_floor_ms=0.0))
    assert w.confirm_latency([2.1] * 10, [0.7] * 10).ok is True  # 3 * 0.7 = 2.0999999999999996
    assert w.confirm_latency([1.0] * 10, [1.0] * 10).ok is True  # the first confirmation stands


def test_retiming_judges_medians_not_preempted_runs() -> None:
    """Runs preempted by the CPU hog land in the tails (here 20% of the new model's): the medians decide."""
    w = slow_window()
    new = [10.0] * 80 + [500.0] * 20
    assert p95_of(new) == 500.0
    assert w.confirm_latency(new, [10.0] * 100).ok is True
    w = slow_window()
    assert w.confirm_latency([10.0] * 49 + [31.0] * 51, [10.0] * 100).ok is False  # most runs slower: slower


def test_retiming_without_timings_keeps_the_suspected_failure() -> None:
    for new, previous in (([], []), ([1.0], []), ([], [1.0])):
        w = slow_window()
        suspected = w.verdict(END)
        final = HealthVerdict(False, suspected.reason)  # the same failure, no longer asking for a re-timing
        assert w.confirm_latency(new, previous) == final
        assert w.verdict(END) == final


def test_confirm_without_a_suspected_failure_changes_nothing() -> None:
    w = window(baseline=10.0)
    feed(w, 20, latency=10.0)
    assert w.confirm_latency([100.0] * 10, [1.0] * 10) == HealthVerdict(True, None)
    w = window()
    feed(w, 3)
    assert w.confirm_latency([1.0], [1.0]).reason == "only 3 results in the 60 s health window (need 20)"


def test_early_failure_is_not_overturned_by_confirmation() -> None:
    w = window(baseline=1.0)
    feed(w, 1, finite=False)
    feed(w, 20, latency=20.0)
    assert w.confirm_latency([1.0] * 10, [1.0] * 10).reason == "non-finite outputs in 1 prediction, over the limit of 0"
    assert w.verdict(END).ok is False


# ---- settings: deployment over pipeline over [update] --------------------------------------------------------


def test_resolve_policy_precedence() -> None:
    defaults = {"window_s": 60.0, "min_results": 20, "max_error_rate": 0.05, "latency_factor": 2.0}
    pipeline = {"window_s": 30.0, "latency_floor_ms": 8.0, "min_results": None}
    deployment = {"window_s": 10.0, "latency_factor": None}
    p = resolve_policy(defaults, pipeline, deployment)
    assert p == HealthPolicy(
        window_s=10.0, min_results=20, max_error_rate=0.05, latency_factor=2.0, latency_floor_ms=8.0
    )
    assert resolve_policy() == HealthPolicy()
    assert resolve_policy({"min_results": 5}, {"min_results": 0}).min_results == 0  # 0 is a value, None is not


def test_resolve_policy_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown health setting 'window'"):
        resolve_policy({"window": 3.0})
    with pytest.raises(ValueError, match="latency_floor_ms must be >= 0"):
        resolve_policy({"latency_floor_ms": -1.0})
    assert set(POLICY_FIELDS) == {
        "window_s",
        "min_results",
        "max_error_rate",
        "max_nonfinite",
        "latency_factor",
        "latency_floor_ms",
    }


# ---- a window too short for the result rate -------------------------------------------------------------------


def test_window_too_short_for_a_provisioned_2_fps_device() -> None:
    assert window_shortfall(HealthPolicy(window_s=8, min_results=20), 2.0) == (
        "health window 8 s x 2.0 results/s = 16 results, fewer than the 20 needed "
        "(fix: a health window of at least 10 s, or health_min_results <= 16)"
    )


def test_window_shortfall_uses_the_rate_as_shown() -> None:
    """A measured 1.96 results/s is shown as 2.0, and the arithmetic is done with what is shown."""
    assert window_shortfall(HealthPolicy(window_s=8, min_results=20), 1.96) == window_shortfall(
        HealthPolicy(window_s=8, min_results=20), 2.0
    )
    assert window_shortfall(HealthPolicy(window_s=10, min_results=20), 1.96) is None
    reason = window_shortfall(HealthPolicy(window_s=100, min_results=20), 0.0123)
    assert reason is not None and "100 s x 0.012 results/s = 1 result, fewer than the 20 needed" in reason


def test_window_exactly_long_enough_passes() -> None:
    assert window_shortfall(HealthPolicy(window_s=10, min_results=20), 2.0) is None
    assert window_shortfall(HealthPolicy(window_s=8, min_results=20), 2.5) is None  # 8 x 2.5 = 20
    assert window_shortfall(HealthPolicy(window_s=0.1, min_results=3), 30.0) is None  # 0.1 x 30 = 3.0000000000000004
    assert window_shortfall(HealthPolicy(window_s=3, min_results=10), 30.0) is None


def test_window_one_result_short_is_refused() -> None:
    reason = window_shortfall(HealthPolicy(window_s=9.9, min_results=20), 2.0)
    assert reason is not None and "= 19 results" in reason and "at least 10 s" in reason


def test_window_shortfall_rounds_the_fix_up() -> None:
    reason = window_shortfall(HealthPolicy(window_s=5, min_results=20), 3.0)  # 20 / 3 = 6.67 s
    assert reason == (
        "health window 5 s x 3.0 results/s = 15 results, fewer than the 20 needed "
        "(fix: a health window of at least 6.7 s, or health_min_results <= 15)"
    )
    slow = window_shortfall(HealthPolicy(window_s=60, min_results=20), 0.25)
    assert slow == (
        "health window 60 s x 0.25 results/s = 15 results, fewer than the 20 needed "
        "(fix: a health window of at least 80 s, or health_min_results <= 15)"
    )


def test_window_shortfall_unknown_rate_or_no_minimum() -> None:
    policy = HealthPolicy(window_s=1, min_results=1000)
    for rate in (None, 0.0, -1.0, math.nan, math.inf):
        assert window_shortfall(policy, rate) is None
    assert window_shortfall(HealthPolicy(window_s=1, min_results=0), 0.001) is None


# ---- the deployment's fields (the fleet sends them; the device resolves them over its own settings) -----------


def _deploy(**fields: object) -> dict[str, object]:
    return {
        "id": "r1",
        "seq": 1,
        "issued": 1.0,
        "expires": 2.0,
        "device": "d1",
        "pipeline": "digits",
        "target": "m/m-1.0.0.tar.gz",
    } | fields


def test_deploy_command_health_fields() -> None:
    from agent.protocol.update import parse_deploy_command

    command = parse_deploy_command(_deploy())
    assert (command.health_latency_factor, command.health_latency_floor_ms, command.health_min_results) == (
        None,
        None,
        None,
    )
    command = parse_deploy_command(
        _deploy(health_window_s=8, health_latency_factor=3.5, health_latency_floor_ms=0, health_min_results=16)
    )
    deployment = {
        "window_s": command.health_window_s,
        "latency_factor": command.health_latency_factor,
        "latency_floor_ms": command.health_latency_floor_ms,
        "min_results": command.health_min_results,
    }
    policy = resolve_policy({"window_s": 60, "min_results": 20, "latency_floor_ms": 5.0}, {"window_s": 30}, deployment)
    assert policy == HealthPolicy(window_s=8, min_results=16, latency_factor=3.5, latency_floor_ms=0.0)
    assert window_shortfall(policy, 2.0) is None  # 8 s x 2/s = 16 = min_results


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("health_latency_factor", 0),
        ("health_latency_factor", 100.5),
        ("health_latency_floor_ms", -1),
        ("health_latency_floor_ms", 600_001),
        ("health_min_results", -1),
        ("health_min_results", 1_000_001),
        ("health_window_s", 0),
    ],
)
def test_deploy_command_refuses_out_of_range_health_fields(field: str, value: float) -> None:
    from agent.protocol import ProtocolError
    from agent.protocol.update import parse_deploy_command

    with pytest.raises(ProtocolError, match=field):
        parse_deploy_command(_deploy(**{field: value}))


# ---- the baseline: the running model's own recent inferences --------------------------------------------------


def test_baseline_is_the_p95_of_the_running_models_inferences_only() -> None:
    older_model = [50.0] * 100  # a model that ran before the last swap
    running = [1.0] * 40
    assert baseline_p95(older_model + running, processed=140, swapped_at=100) == 1.0
    assert baseline_p95(running, processed=40, swapped_at=0) == 1.0  # never swapped: all of them
    # only the last 2048 are kept: the swap point fell out of the buffer, all kept ones are the running model's
    assert baseline_p95([1.0] * 2048, processed=5000, swapped_at=100) == 1.0


def test_baseline_unknown_before_the_running_model_ran() -> None:
    assert baseline_p95([50.0] * 10, processed=10, swapped_at=10) is None
    assert baseline_p95([], processed=0, swapped_at=0) is None


def test_baseline_after_a_pipeline_rebuild_uses_all() -> None:
    """SIGHUP rebuilt the pipeline (fresh counts) after the swap: every time recorded is the running model's."""
    assert baseline_p95([2.0] * 30, processed=30, swapped_at=500) == 2.0
