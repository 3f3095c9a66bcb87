"""The pure staged-rollout engine: policy validation, wave sizes, every transition and abort path, persistence,
and random event sequences checked against the engine's invariants."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.update import UPDATE_STATES
from fleet.rollout import (
    ABORTED,
    COMPLETED,
    CREATED,
    DEVICE_STATE_RANK,
    FAILED,
    FINISHED,
    IN_FLIGHT,
    IN_PROGRESS,
    OUTCOMES,
    PAUSED,
    PENDING,
    RECORD_STATES,
    RUNNING,
    SENT,
    SKIPPED,
    SUCCEEDED,
    TIMED_OUT,
    Abort,
    Action,
    Audit,
    CancelDeploy,
    DeviceOffline,
    DeviceOnline,
    DeviceState,
    Event,
    HealthSample,
    Notify,
    Pause,
    Resume,
    Rollout,
    RolloutFinished,
    RolloutPolicy,
    SendDeploy,
    Start,
    Tick,
    canary_size,
    from_dict,
    min_outcomes,
    new_rollout,
    rollback_plan,
    step,
    summary,
    to_dict,
    wave_sizes,
)

TARGET = "digits/1.2.0.tar"


def devs(n: int) -> list[str]:
    return [f"d{i:03d}" for i in range(n)]


def make(n: int = 10, online: list[str] | None = None, **policy: Any) -> Rollout:
    return new_rollout("r-1", TARGET, devs(n), RolloutPolicy(**policy), online)


def run(rollout: Rollout, *events: Event) -> tuple[Rollout, list[Action]]:
    """Apply events in order; all actions together."""
    actions: list[Action] = []
    for event in events:
        rollout, more = step(rollout, event)
        actions += more
    return rollout, actions


def sends(actions: list[Action]) -> list[str]:
    return [a.device for a in actions if isinstance(a, SendDeploy)]


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def finish_all(rollout: Rollout, devices: list[str], state: str = "committed", now: float = 1.0) -> tuple:
    return run(rollout, *(DeviceState(d, state, now) for d in devices))


def roundtrip(rollout: Rollout) -> Rollout:
    return from_dict(json.loads(json.dumps(to_dict(rollout), allow_nan=False)))


def unchanged(rollout: Rollout, event: Event) -> None:
    new, actions = step(rollout, event)
    assert new is rollout
    assert actions == []


# ---- policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"canary": 0}, "canary"),
        ({"canary": -1}, "canary"),
        ({"canary": 1.5}, "canary"),
        ({"canary": True}, "canary"),
        ({"canary": 2, "canary_percent": 10}, "canary"),
        ({"canary_percent": 0}, "canary_percent"),
        ({"canary_percent": -5}, "canary_percent"),
        ({"canary_percent": 100.5}, "canary_percent"),
        ({"canary_percent": float("nan")}, "canary_percent"),
        ({"wave_factor": 1}, "wave_factor"),
        ({"wave_factor": 0.5}, "wave_factor"),
        ({"wave_factor": float("inf")}, "wave_factor"),
        ({"wave_factor": "2"}, "wave_factor"),
        ({"max_failure_rate": -0.1}, "max_failure_rate"),
        ({"max_failure_rate": 1.01}, "max_failure_rate"),
        ({"max_failure_rate": float("nan")}, "max_failure_rate"),
        ({"min_terminal": 0}, "min_terminal"),
        ({"min_terminal": 2.0}, "min_terminal"),
        ({"device_timeout_s": 0}, "device_timeout_s"),
        ({"device_timeout_s": -1}, "device_timeout_s"),
        ({"device_timeout_s": None}, "device_timeout_s"),
        ({"bake_s": -1}, "bake_s"),
        ({"offline_grace_s": -1}, "offline_grace_s"),
        ({"offline_grace_s": float("inf")}, "offline_grace_s"),
        ({"health_regression": "yes"}, "health_regression"),
    ],
)
def test_invalid_policy_names_field_and_fix(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        RolloutPolicy(**kwargs)
    message = str(info.value)
    assert message.startswith(f"RolloutPolicy.{field} ")
    assert "\n" not in message
    assert "use" in message or "give" in message or "true or false" in message


def test_policy_defaults_and_normalisation() -> None:
    policy = RolloutPolicy(canary_percent=10, wave_factor=2, max_failure_rate=0, device_timeout_s=5)
    assert policy.canary_percent == 10.0 and isinstance(policy.canary_percent, float)
    assert isinstance(policy.wave_factor, float) and isinstance(policy.device_timeout_s, float)
    assert RolloutPolicy().canary is None and canary_size(RolloutPolicy(), 10) == 1
    RolloutPolicy(max_failure_rate=1, canary_percent=100, bake_s=0)  # the edges are valid


@pytest.mark.parametrize(
    ("policy", "n", "size"),
    [
        ({"canary_percent": 10}, 3, 1),
        ({"canary_percent": 10}, 10, 1),
        ({"canary_percent": 10}, 11, 2),
        ({"canary_percent": 12.5}, 8, 1),
        ({"canary_percent": 12.5}, 16, 2),
        ({"canary_percent": 0.1}, 5, 1),
        ({"canary_percent": 100}, 7, 7),
        ({"canary_percent": 33.3}, 1000, 333),
        ({"canary": 5}, 3, 3),
        ({"canary": 2}, 10, 2),
        ({}, 10, 1),
        ({}, 0, 0),
    ],
)
def test_canary_size(policy: dict[str, Any], n: int, size: int) -> None:
    assert canary_size(RolloutPolicy(**policy), n) == size


@pytest.mark.parametrize(
    ("policy", "n", "sizes"),
    [
        ({"wave_factor": 2}, 100, (1, 2, 4, 8, 16, 32, 37)),
        ({"wave_factor": 2}, 1, (1,)),
        ({"wave_factor": 2}, 3, (1, 2)),
        ({"wave_factor": 2}, 4, (1, 2, 1)),
        ({"canary": 10, "wave_factor": 1.1}, 100, (10, 11, 13, 15, 17, 19, 15)),  # 10 * 1.1 is 11, not 12
        ({"canary": 3, "wave_factor": 1.5}, 30, (3, 5, 8, 12, 2)),
        ({"canary_percent": 10, "wave_factor": 3}, 50, (5, 15, 30)),
        ({"canary": 1, "wave_factor": 1000}, 5, (1, 4)),
    ],
)
def test_wave_sizes(policy: dict[str, Any], n: int, sizes: tuple[int, ...]) -> None:
    assert wave_sizes(RolloutPolicy(**policy), n) == sizes


@given(
    n=st.integers(1, 500),
    canary=st.integers(1, 50),
    factor=st.sampled_from([1.01, 1.1, 1.5, 2.0, 2.5, 3.0, 10.0]),
)
def test_wave_sizes_sum_and_grow(n: int, canary: int, factor: float) -> None:
    sizes = wave_sizes(RolloutPolicy(canary=canary, wave_factor=factor), n)
    assert sum(sizes) == n
    assert sizes[0] == min(canary, n)
    for previous, size in itertools.pairwise(sizes[:-1]):
        assert previous < size <= previous * factor + 1
    if len(sizes) > 1:
        assert sizes[-1] <= sizes[-2] * factor + 1


def test_min_outcomes_is_capped_by_the_canary() -> None:
    assert min_outcomes(RolloutPolicy(canary=1, min_terminal=3), 100) == 1
    assert min_outcomes(RolloutPolicy(canary=2, min_terminal=3), 100) == 2
    assert min_outcomes(RolloutPolicy(canary=10, min_terminal=3), 100) == 3
    assert min_outcomes(RolloutPolicy(canary=10, min_terminal=3), 2) == 2


def test_device_states_cover_the_protocol() -> None:
    assert set(DEVICE_STATE_RANK) == set(UPDATE_STATES)


# ---- construction and events -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", TARGET, ["a"]), "rollout id"),
        (("r", "", ["a"]), "rollout target"),
        (("r", TARGET, []), "must not be empty"),
        (("r", TARGET, ["a", "b", "a"]), "'a' is listed twice"),
        (("r", TARGET, ["a", ""]), "non-empty strings"),
        (("r", TARGET, ["a", 3]), "non-empty strings"),
    ],
)
def test_new_rollout_validates(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        new_rollout(*args, RolloutPolicy())


def test_new_rollout_presence_and_order() -> None:
    rollout = new_rollout("r", TARGET, ["c", "a", "b"], RolloutPolicy(), online=["a", "zz"])
    assert rollout.devices == ("c", "a", "b")
    assert rollout.online == frozenset({"a"})
    assert rollout.status == CREATED and rollout.wave == -1
    assert all(r.state == PENDING for r in rollout.records.values())
    assert make(3).online == frozenset(devs(3))


def test_invalid_events() -> None:
    with pytest.raises(ValueError, match=r"DeviceState\.state must be one of"):
        DeviceState("d000", "installed", 1.0)
    with pytest.raises(ValueError, match=r"Tick\.now must be a finite number"):
        Tick(float("nan"))
    with pytest.raises(ValueError, match=r"Start\.now"):
        Start(float("inf"))
    with pytest.raises(TypeError, match="rollout event"):
        step(make(), "start")  # type: ignore[arg-type]


# ---- the happy path ----------------------------------------------------------------------------------


def test_canary_then_waves_grow_by_factor_until_completed() -> None:
    rollout, actions = step(make(100, wave_factor=2), Start(0.0))
    assert rollout.status == RUNNING and rollout.started_at == 0.0
    assert of(actions, Audit)[0].kind == "started"
    waves: list[list[SendDeploy]] = [of(actions, SendDeploy)]
    now = 0.0
    while rollout.status == RUNNING:
        now += 1
        rollout, actions = finish_all(rollout, [a.device for a in waves[-1]], now=now)
        if rollout.status == RUNNING:
            waves.append(of(actions, SendDeploy))
    assert [len(w) for w in waves] == [1, 2, 4, 8, 16, 32, 37]
    assert [{a.wave for a in w} for w in waves] == [{i} for i in range(7)]
    assert [a.device for w in waves for a in w] == devs(100)  # rollout order, each device once
    assert rollout.status == COMPLETED and rollout.wave == 6
    assert of(actions, RolloutFinished) == [RolloutFinished(COMPLETED, (), ())]
    assert "completed" in of(actions, Notify)[0].message
    assert rollback_plan(rollout) == devs(100)
    assert summary(rollout)["succeeded"] == 100 and summary(rollout)["failure_rate"] == 0.0


def test_next_wave_waits_for_every_device_of_the_current_wave() -> None:
    rollout, _ = run(make(10, canary=3), Start(0))
    rollout, actions = run(rollout, DeviceState("d000", "committed", 1), DeviceState("d001", "trial", 1))
    assert sends(actions) == []
    rollout, actions = step(rollout, DeviceState("d001", "committed", 2))
    assert sends(actions) == []  # d002 still in flight
    rollout, actions = step(rollout, DeviceState("d002", "committed", 3))
    assert sends(actions) == devs(9)[3:9] and rollout.wave == 1


def test_percent_canary_rounds_up_to_one_device() -> None:
    rollout, actions = step(make(3, canary_percent=10), Start(0))
    assert sends(actions) == ["d000"]
    assert rollout.waves == (1, 2)


def test_start_is_idempotent_and_nothing_happens_before_it() -> None:
    rollout = make(5)
    for event in (Tick(5), Pause(), Resume(1), DeviceState("d000", "committed", 1), HealthSample("d000", False, 1)):
        unchanged(rollout, event)
    started, _ = step(rollout, Start(0))
    unchanged(started, Start(1))


def test_presence_is_tracked_before_start() -> None:
    rollout, actions = run(make(3), DeviceOffline("d000", 0), DeviceOnline("d001", 0))
    assert actions == [] and rollout.online == frozenset({"d001", "d002"})
    rollout, actions = step(rollout, Start(1))
    assert sends(actions) == [] and rollout.records["d000"].state == SKIPPED  # canary offline: waits


# ---- failure thresholds --------------------------------------------------------------------------------


def test_canary_failure_aborts_and_leaves_the_rest_untouched() -> None:
    rollout, _ = run(make(10, max_failure_rate=0.1), Start(0))
    rollout, actions = step(rollout, DeviceState("d000", "failed", 5, reason="model does not load"))
    assert rollout.status == ABORTED and "failure rate 1/1" in (rollout.reason or "")
    assert sends(actions) == [] and of(actions, CancelDeploy) == []
    assert of(actions, RolloutFinished) == [RolloutFinished(ABORTED, ("d000",), tuple(devs(10)[1:]))]
    assert of(actions, Audit)[0].kind == "device_failed" and of(actions, Audit)[-1].kind == "aborted"
    assert rollout.records["d000"].reason == "model does not load"
    assert all(rollout.records[d].state == PENDING for d in devs(10)[1:])
    for event in (Tick(10_000), DeviceOnline("d005", 11), Resume(12), Start(13), Abort("again")):
        assert sends(step(rollout, event)[1]) == []
        unchanged(rollout, event)


@pytest.mark.parametrize("state", ["rejected", "rolled_back", "failed"])
def test_every_failure_state_counts(state: str) -> None:
    rollout, _ = run(make(4), Start(0))
    rollout, _ = step(rollout, DeviceState("d000", state, 1))
    assert rollout.records["d000"].state == FAILED and rollout.status == ABORTED


def test_failure_rate_under_threshold_continues() -> None:
    rollout, _ = run(make(20, canary=4, max_failure_rate=0.5), Start(0))
    rollout, actions = run(
        rollout,
        DeviceState("d000", "rolled_back", 1),
        DeviceState("d001", "committed", 1),
        DeviceState("d002", "committed", 1),
        DeviceState("d003", "committed", 1),
    )
    assert rollout.status == RUNNING and rollout.failure_rate == 0.25
    assert sends(actions) == devs(12)[4:12]  # next wave: ceil(4 * 2) = 8
    assert rollback_plan(rollout) == ["d001", "d002", "d003"]


def test_failure_rate_equal_to_threshold_continues_and_above_aborts() -> None:
    rollout, _ = run(make(20, canary=4, max_failure_rate=0.25), Start(0))
    rollout, _ = finish_all(rollout, ["d001", "d002", "d003"])
    rollout, actions = step(rollout, DeviceState("d000", "failed", 2))
    assert rollout.status == RUNNING and len(sends(actions)) == 8  # 1/4 == 0.25
    rollout, actions = step(rollout, DeviceState("d004", "failed", 3))
    assert rollout.status == ABORTED  # 2/5 > 0.25
    assert sorted(c.device for c in of(actions, CancelDeploy)) == devs(12)[5:12]


def test_failure_rate_is_checked_mid_wave() -> None:
    rollout, _ = run(make(30, canary=2, max_failure_rate=0.4, min_terminal=2), Start(0))
    rollout, _ = finish_all(rollout, ["d000", "d001"])  # wave 1: d002..d005
    assert rollout.wave == 1
    rollout, _ = step(rollout, DeviceState("d002", "failed", 2))
    assert rollout.status == RUNNING  # 1/3
    rollout, actions = step(rollout, DeviceState("d003", "failed", 3))
    assert rollout.status == ABORTED  # 2/4 > 0.4, before the wave is done
    assert [c.device for c in of(actions, CancelDeploy)] == ["d004", "d005"]


def test_min_terminal_boundary() -> None:
    rollout, _ = run(make(20, canary=5, min_terminal=3, max_failure_rate=0.2), Start(0))
    rollout, _ = finish_all(rollout, ["d000", "d001"], state="failed")
    assert rollout.status == RUNNING  # 2 outcomes: not evaluated yet
    rollout, _ = step(rollout, DeviceState("d002", "committed", 2))
    assert rollout.status == ABORTED and "2/3" in (rollout.reason or "")


def test_min_terminal_is_capped_by_a_smaller_canary() -> None:
    rollout, _ = run(make(20, canary=2, min_terminal=3, max_failure_rate=0.2), Start(0))
    rollout, _ = step(rollout, DeviceState("d000", "failed", 1))
    assert rollout.status == RUNNING  # 1 outcome of 2 needed
    rollout, _ = step(rollout, DeviceState("d001", "committed", 2))
    assert rollout.status == ABORTED  # 1/2 over the whole canary


def test_never_widens_before_min_terminal_outcomes() -> None:
    online = [d for d in devs(10) if d != "d002"]
    rollout, _ = run(make(10, online=online, canary=3, min_terminal=3, max_failure_rate=1.0), Start(0))
    rollout, actions = finish_all(rollout, ["d000", "d001"])
    assert sends(actions) == [] and rollout.wave == 0  # 2 outcomes < 3: the offline canary d002 is needed
    rollout, actions = step(rollout, DeviceOnline("d002", 5))
    assert actions[0] == SendDeploy("d002", 0)
    rollout, actions = step(rollout, DeviceState("d002", "committed", 6))
    assert sends(actions) == devs(9)[3:9]


# ---- timeouts --------------------------------------------------------------------------------------------


def test_timeout_counts_as_failure() -> None:
    rollout, _ = run(make(5, device_timeout_s=100), Start(0), DeviceState("d000", "downloading", 10))
    unchanged(rollout, Tick(99.9))
    rollout, actions = step(rollout, Tick(100))
    record = rollout.records["d000"]
    assert record.state == TIMED_OUT and record.device_state == "downloading" and "100s" in (record.reason or "")
    assert of(actions, Audit)[0].kind == "device_timed_out"
    assert rollout.status == ABORTED
    assert of(actions, RolloutFinished)[0].failed == ("d000",)


def test_timeout_under_threshold_continues_and_late_commit_is_recorded() -> None:
    rollout, _ = run(make(10, canary=2, min_terminal=2, max_failure_rate=0.5, device_timeout_s=60), Start(0))
    rollout, _ = step(rollout, DeviceState("d000", "committed", 5))
    rollout, actions = step(rollout, Tick(60))
    assert rollout.records["d001"].state == TIMED_OUT
    assert sends(actions) == ["d002", "d003", "d004", "d005"]  # 1/2 <= 0.5
    rollout, actions = step(rollout, DeviceState("d001", "committed", 70))
    assert actions == []
    assert rollout.records["d001"].state == TIMED_OUT and rollout.records["d001"].device_state == "committed"
    assert rollback_plan(rollout) == ["d000", "d001"]  # it runs the target: roll it back too
    assert rollout.failures == 1


def test_timeout_while_paused_still_counts() -> None:
    rollout, _ = run(make(5, device_timeout_s=10), Start(0), Pause("looking"))
    rollout, _ = step(rollout, Tick(10))
    assert rollout.records["d000"].state == TIMED_OUT and rollout.status == ABORTED


# ---- offline devices -------------------------------------------------------------------------------------


def test_offline_device_is_skipped_then_caught_up() -> None:
    online = [d for d in devs(10) if d != "d001"]
    rollout, _ = run(make(10, online=online, device_timeout_s=100), Start(0))
    rollout, actions = step(rollout, DeviceState("d000", "committed", 1))
    assert sends(actions) == ["d002"]
    assert rollout.records["d001"].state == SKIPPED and rollout.records["d001"].wave == 1
    wave_audit = next(a for a in of(actions, Audit) if a.kind == "wave_started")
    assert wave_audit.detail["skipped"] == ["d001"] and wave_audit.detail["sent"] == 1
    rollout, actions = step(rollout, DeviceState("d002", "committed", 2))
    assert sends(actions) == devs(7)[3:7]  # the offline device does not hold its wave
    rollout, actions = step(rollout, DeviceOnline("d001", 50))
    assert actions[0] == SendDeploy("d001", 1) and rollout.records["d001"].sent_at == 50
    unchanged(rollout, DeviceOnline("d001", 51))  # never sent twice
    rollout, _ = finish_all(rollout, devs(7)[3:7], now=60)
    assert rollout.wave == 2  # the caught-up device is in flight: the next wave waits
    rollout, _ = step(rollout, Tick(120))
    assert rollout.records["d001"].state == SENT  # timeout counts from when it was sent
    rollout, _ = step(rollout, Tick(150))
    assert rollout.records["d001"].state == TIMED_OUT


def test_catch_up_device_holds_the_next_wave_while_in_flight() -> None:
    rollout, _ = run(make(10, online=["d000", "d002"], max_failure_rate=1.0, offline_grace_s=100), Start(0))
    rollout, _ = finish_all(rollout, ["d000"])
    rollout, actions = step(rollout, DeviceOnline("d001", 2))
    assert sends(actions) == ["d001"]
    rollout, actions = step(rollout, DeviceState("d002", "committed", 3))
    assert sends(actions) == [] and rollout.wave == 1  # the caught-up d001 holds the next wave
    rollout, actions = step(rollout, DeviceState("d001", "committed", 4))
    # wave 2 (d003..d006) and wave 3 (d007..d009) are all offline: passed through to the grace period
    assert rollout.wave == 3 and rollout.status == RUNNING and sends(actions) == []
    assert rollout.settled_at == 4
    rollout, actions = step(rollout, DeviceOnline("d004", 50))
    assert actions[0] == SendDeploy("d004", 2) and rollout.settled_at is None
    rollout, actions = run(rollout, DeviceState("d004", "committed", 60), Tick(159))
    assert rollout.status == RUNNING  # the grace restarts when nothing is in flight
    rollout, actions = step(rollout, Tick(160))
    assert rollout.status == COMPLETED
    assert of(actions, RolloutFinished) == [
        RolloutFinished(COMPLETED, (), ("d003", "d005", "d006", "d007", "d008", "d009"))
    ]


def test_completes_at_once_when_every_device_was_reached() -> None:
    rollout, _ = run(make(3, offline_grace_s=1e9), Start(0), DeviceState("d000", "committed", 1))
    rollout, actions = finish_all(rollout, ["d001", "d002"], now=2)
    assert rollout.status == COMPLETED and of(actions, RolloutFinished)
    zero, actions = run(make(3, online=["d000"], offline_grace_s=0), Start(0), DeviceState("d000", "committed", 1))
    assert zero.status == COMPLETED and of(actions, RolloutFinished)[0].unreached == ("d001", "d002")


def test_all_offline_canary_waits_for_it() -> None:
    rollout, actions = run(make(5, online=[]), Start(0), Tick(1_000_000))
    assert sends(actions) == [] and rollout.status == RUNNING and rollout.wave == 0
    rollout, actions = step(rollout, DeviceOnline("d003", 10))
    assert sends(actions) == []  # not a canary device: its wave has not started
    rollout, actions = step(rollout, DeviceOnline("d000", 11))
    assert sends(actions) == ["d000"]


def test_no_catch_up_while_paused_then_on_resume() -> None:
    online = [d for d in devs(10) if d not in ("d001", "d002")]
    rollout, _ = run(make(10, online=online), Start(0), DeviceState("d000", "committed", 1), Pause())
    rollout, actions = run(rollout, DeviceOnline("d001", 2), DeviceOnline("d002", 2), DeviceOffline("d002", 3))
    assert sends(actions) == [] and rollout.status == PAUSED
    rollout, actions = step(rollout, Resume(4))
    assert actions[1] == SendDeploy("d001", 1) and sends(actions) == ["d001"]
    assert rollout.records["d002"].state == SKIPPED


def test_no_catch_up_after_abort_or_completion() -> None:
    rollout, _ = run(make(3, online=["d000"]), Start(0), Abort("operator"))
    unchanged(rollout, DeviceOnline("d001", 1))
    done, actions = run(make(3, online=["d000"], offline_grace_s=0), Start(0), DeviceState("d000", "committed", 1))
    assert done.status == COMPLETED
    assert of(actions, RolloutFinished)[0].unreached == ("d001", "d002")
    unchanged(done, DeviceOnline("d001", 2))


def test_offline_sent_device_is_not_resent() -> None:
    rollout, _ = run(make(5), Start(0), DeviceOffline("d000", 1))
    rollout, actions = step(rollout, DeviceOnline("d000", 2))
    assert actions == [] and rollout.records["d000"].state == SENT


# ---- pause, resume, abort -----------------------------------------------------------------------------------


def test_pause_stops_new_waves_and_resume_continues() -> None:
    rollout, _ = run(make(10), Start(0), Pause("weekend"))
    assert rollout.status == PAUSED
    rollout, actions = step(rollout, DeviceState("d000", "committed", 1))
    assert sends(actions) == [] and rollout.records["d000"].state == SUCCEEDED
    assert sends(step(rollout, Tick(1000))[1]) == []
    unchanged(rollout, Pause())
    rollout, actions = step(rollout, Resume(5))
    assert rollout.status == RUNNING and sends(actions) == ["d001", "d002"]
    assert [a.kind for a in of(actions, Audit)][:1] == ["resumed"]
    unchanged(rollout, Resume(6))


def test_threshold_breach_while_paused_aborts() -> None:
    rollout, _ = run(make(10), Start(0), Pause())
    rollout, actions = step(rollout, DeviceState("d000", "failed", 1))
    assert rollout.status == ABORTED and of(actions, RolloutFinished)
    unchanged(rollout, Resume(2))


def test_abort_cancels_in_flight_devices_only_and_is_idempotent() -> None:
    rollout, _ = run(make(20, canary=4, max_failure_rate=1.0), Start(0))
    rollout, _ = run(
        rollout,
        DeviceState("d000", "committed", 1),
        DeviceState("d001", "failed", 1),
        DeviceState("d002", "downloading", 1),
    )
    rollout, actions = step(rollout, Abort("bad accuracy"))
    assert rollout.status == ABORTED and rollout.reason == "bad accuracy"
    assert [a.device for a in of(actions, CancelDeploy)] == ["d002", "d003"]
    assert sends(actions) == []
    assert of(actions, RolloutFinished) == [RolloutFinished(ABORTED, ("d001",), tuple(devs(20)[4:]))]
    assert "bad accuracy" in of(actions, Notify)[0].message
    unchanged(rollout, Abort("again"))
    # in-flight devices keep reporting: recorded, no actions
    rollout2, actions = step(rollout, DeviceState("d002", "committed", 5))
    assert actions == [] and rollout2.records["d002"].state == SUCCEEDED and rollout2.status == ABORTED
    assert rollback_plan(rollout2) == ["d000", "d002"]
    rollout3, actions = step(rollout2, DeviceState("d003", "failed", 6))
    assert actions == [] and rollout3.status == ABORTED and rollout3.reason == "bad accuracy"
    for event in (Tick(10_000), HealthSample("d000", False, 7), Pause(), Resume(8), Start(9), DeviceOffline("d004", 9)):
        unchanged(rollout3, event)


def test_abort_before_start_and_while_paused() -> None:
    rollout, actions = step(make(5), Abort(""))
    assert rollout.status == ABORTED and rollout.reason == "aborted by operator"
    assert of(actions, RolloutFinished) == [RolloutFinished(ABORTED, (), tuple(devs(5)))]
    unchanged(rollout, Start(1))
    paused, _ = run(make(5), Start(0), Pause())
    aborted, actions = step(paused, Abort("stop"))
    assert aborted.status == ABORTED and [c.device for c in of(actions, CancelDeploy)] == ["d000"]


# ---- device states --------------------------------------------------------------------------------------------


def test_progress_states_and_duplicates() -> None:
    rollout, _ = run(make(5), Start(0))
    rollout, actions = step(rollout, DeviceState("d000", "offered", 1))
    assert actions == [] and rollout.records["d000"].state == IN_PROGRESS
    rollout, _ = run(rollout, DeviceState("d000", "downloading", 2), DeviceState("d000", "downloaded", 3))
    unchanged(rollout, DeviceState("d000", "downloaded", 4))  # duplicate
    unchanged(rollout, DeviceState("d000", "downloading", 4))  # progress report arriving late
    unchanged(rollout, DeviceState("d000", "offered", 4))
    rollout, _ = step(rollout, DeviceState("d000", "trial", 5))  # states may be skipped
    assert rollout.records["d000"].device_state == "trial"
    rollout, actions = step(rollout, DeviceState("d000", "committed", 6, reason="health window passed"))
    assert rollout.records["d000"].state == SUCCEEDED and rollout.records["d000"].reason == "health window passed"
    assert sends(actions) == ["d001", "d002"]
    for state in UPDATE_STATES:  # nothing after a final state
        unchanged(rollout, DeviceState("d000", state, 7))


def test_final_state_first_then_earlier_states_ignored() -> None:
    rollout, _ = run(make(5, max_failure_rate=1.0), Start(0), DeviceState("d000", "rolled_back", 1, "crash"))
    assert rollout.records["d000"].state == FAILED
    unchanged(rollout, DeviceState("d000", "committed", 2))
    unchanged(rollout, DeviceState("d000", "trial", 2))


def test_unknown_and_unsent_devices_are_ignored() -> None:
    rollout, _ = run(make(5), Start(0))
    for event in (
        DeviceState("zz", "committed", 1),
        DeviceOnline("zz", 1),
        DeviceOffline("zz", 1),
        HealthSample("zz", False, 1),
        DeviceState("d003", "committed", 1),  # not sent yet
        DeviceState("d003", "failed", 1),
    ):
        unchanged(rollout, event)


def test_health_regression_after_commit_is_a_failure() -> None:
    rollout, _ = run(make(20, canary=4, max_failure_rate=0.3), Start(0))
    rollout, _ = finish_all(rollout, devs(4))
    unchanged(rollout, HealthSample("d000", True, 2))
    unchanged(rollout, HealthSample("d004", False, 2))  # not committed yet
    rollout, actions = step(rollout, HealthSample("d000", False, 3))
    assert rollout.records["d000"].state == FAILED and rollout.status == RUNNING  # 1/4
    assert [a.kind for a in of(actions, Audit)] == ["device_unhealthy"]
    unchanged(rollout, HealthSample("d000", False, 4))
    rollout, actions = step(rollout, HealthSample("d001", False, 5))
    assert rollout.status == ABORTED  # 2/4
    assert rollback_plan(rollout) == devs(4)  # they all still run the target


def test_health_regression_can_be_turned_off() -> None:
    rollout, _ = run(make(5, health_regression=False), Start(0), DeviceState("d000", "committed", 1))
    unchanged(rollout, HealthSample("d000", False, 2))


def test_bake_time_between_waves() -> None:
    rollout, _ = run(make(10, bake_s=60), Start(0))
    rollout, actions = step(rollout, DeviceState("d000", "committed", 10))
    assert sends(actions) == [] and rollout.settled_at == 10
    assert sends(step(rollout, Tick(69.9))[1]) == []
    rollout, actions = step(rollout, HealthSample("d000", False, 50))  # the bake catches the regression
    assert rollout.status == ABORTED
    baked, _ = run(make(10, bake_s=60), Start(0), DeviceState("d000", "committed", 10))
    baked, actions = step(baked, Tick(70))
    assert sends(actions) == ["d001", "d002"] and baked.settled_at is None


def test_bake_restarts_after_a_catch_up() -> None:
    rollout, _ = run(make(10, online=["d000", "d002"], bake_s=10, max_failure_rate=1.0), Start(0))
    rollout, _ = run(rollout, DeviceState("d000", "committed", 1), Tick(11))
    rollout, _ = step(rollout, DeviceState("d002", "committed", 12))
    assert rollout.settled_at == 12 and rollout.wave == 1
    rollout, actions = step(rollout, DeviceOnline("d001", 15))
    assert sends(actions) == ["d001"] and rollout.settled_at is None
    rollout, _ = step(rollout, DeviceState("d001", "committed", 20))
    assert rollout.settled_at == 20
    assert step(rollout, Tick(29))[0].wave == 1
    assert step(rollout, Tick(30))[0].wave == 2


def test_bake_before_completion() -> None:
    rollout, _ = run(make(1, bake_s=5), Start(0), DeviceState("d000", "committed", 1))
    assert rollout.status == RUNNING
    rollout, actions = step(rollout, Tick(6))
    assert rollout.status == COMPLETED and of(actions, RolloutFinished)


def test_events_after_completion_are_ignored() -> None:
    rollout, _ = run(make(3, max_failure_rate=1.0), Start(0), DeviceState("d000", "committed", 1))
    rollout, _ = run(rollout, DeviceState("d001", "committed", 2), DeviceState("d002", "failed", 2))
    assert rollout.status == COMPLETED
    for event in (
        Start(3),
        Tick(10_000),
        Pause(),
        Resume(4),
        Abort("late"),
        DeviceOnline("d001", 5),
        DeviceOffline("d001", 5),
        HealthSample("d000", False, 5),
        DeviceState("d000", "failed", 5),
        DeviceState("d002", "committed", 5),
    ):
        unchanged(rollout, event)


def test_rollback_plan_lists_committed_devices_in_order() -> None:
    rollout, _ = run(make(20, canary=4, max_failure_rate=1.0), Start(0))
    rollout, _ = run(
        rollout,
        DeviceState("d003", "committed", 1),
        DeviceState("d001", "committed", 1),
        DeviceState("d002", "trial", 1),
        DeviceState("d000", "failed", 1),
    )
    assert rollback_plan(rollout) == ["d001", "d003"]
    assert rollback_plan(make(3)) == []


# ---- persistence ----------------------------------------------------------------------------------------------


def test_roundtrip_at_every_stage() -> None:
    rollout = make(10, online=devs(10)[:-2], canary_percent=20, bake_s=1, device_timeout_s=30)
    events = [
        Start(0),
        DeviceState("d000", "downloading", 1),
        DeviceState("d000", "committed", 2, "ok"),
        DeviceState("d001", "committed", 2),
        Tick(3),
        Pause("x"),
        DeviceOnline("d008", 4),
        Resume(5),
        Tick(40),
        Abort("done"),
    ]
    states = [rollout]
    for event in events:
        rollout, _ = step(rollout, event)
        states.append(rollout)
    for state in states:
        restored = roundtrip(state)
        assert restored == state and restored.counts == state.counts
    # a restored rollout carries on exactly like the original
    mid = states[4]
    assert step(roundtrip(mid), Tick(3)) == step(mid, Tick(3))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.update(v=2),
        lambda d: d.pop("records"),
        lambda d: d.update(status="exploded"),
        lambda d: d.update(wave=99),
        lambda d: d.update(wave="1"),
        lambda d: d["policy"].update(wave_factor=1),
        lambda d: d["policy"].update(colour="red"),
        lambda d: d.update(policy=[]),
        lambda d: d["records"].pop("d001"),
        lambda d: d["records"]["d000"].update(state="sideways"),
        lambda d: d["records"]["d000"].update(device_state="installed"),
        lambda d: d["records"]["d000"].update(sent_at=None),
        lambda d: d["records"]["d000"].pop("wave"),
        lambda d: d.update(devices=["d000", "d000", "d001"]),
    ],
)
def test_from_dict_rejects_corrupt_state(corrupt: Any) -> None:
    rollout, _ = run(make(3), Start(0))
    data = json.loads(json.dumps(to_dict(rollout)))
    corrupt(data)
    with pytest.raises(ValueError, match=r"rollout state|RolloutPolicy|rollout devices"):
        from_dict(data)
    with pytest.raises(ValueError, match="format version"):
        from_dict([])  # type: ignore[arg-type]


# ---- random event sequences ------------------------------------------------------------------------------------

POLICIES = st.builds(
    lambda canary, factor, rate, min_terminal, timeout, bake, grace, health: RolloutPolicy(
        canary=canary if isinstance(canary, int) else None,
        canary_percent=canary if isinstance(canary, float) else None,
        wave_factor=factor,
        max_failure_rate=rate,
        min_terminal=min_terminal,
        device_timeout_s=timeout,
        bake_s=bake,
        offline_grace_s=grace,
        health_regression=health,
    ),
    st.one_of(st.integers(1, 4), st.sampled_from([5.0, 10.0, 25.0, 50.0, 100.0])),
    st.sampled_from([1.5, 2.0, 3.0]),
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.integers(1, 4),
    st.sampled_from([10.0, 60.0]),
    st.sampled_from([0.0, 3.0]),
    st.sampled_from([0.0, 10.0]),
    st.booleans(),
)
# Weighted so that sequences get past the canary: mostly states of devices in flight (mostly "committed"),
# presence changes of offline devices, and only the odd pause, abort or stray event.
WEIGHTS = {"flight": 40, "state": 3, "online": 6, "offline": 2, "tick": 6, "health": 2, "pause": 1, "resume": 3}
KINDS = [kind for kind, weight in WEIGHTS.items() for _ in range(weight)] + ["abort", "start"]
STATES = ("committed",) * 12 + tuple(UPDATE_STATES)
STEPS = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 12),  # which device (of the pool the kind draws from)
    st.sampled_from(STATES),
    st.floats(0, 2, allow_nan=False),
)


def build_event(kind: str, index: int, state: str, now: float, rollout: Rollout) -> Event:
    """The event a drawn step stands for; devices are drawn from the pool that makes the event interesting."""
    devices = rollout.devices
    flying = [d for d in devices if rollout.records[d].state in IN_FLIGHT]
    offline = [d for d in devices if d not in rollout.online]
    pool = {"flight": flying, "online": offline}.get(kind) or [*devices, "zz"]  # "zz": outside the rollout
    device = pool[index % len(pool)]
    return {
        "flight": lambda: DeviceState(device, state, now),
        "state": lambda: DeviceState(device, state, now),
        "online": lambda: DeviceOnline(device, now),
        "offline": lambda: DeviceOffline(device, now),
        "tick": lambda: Tick(now),
        "health": lambda: HealthSample(device, state != "failed", now),
        "pause": lambda: Pause(),
        "resume": lambda: Resume(now),
        "abort": lambda: Abort("random"),
        "start": lambda: Start(now),
    }[kind]()


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 20),
    policy=POLICIES,
    offline=st.sets(st.integers(0, 19)),
    steps=st.lists(STEPS, min_size=25, max_size=100),
)
def test_random_sequences_keep_the_invariants(n: int, policy: RolloutPolicy, offline: set[int], steps: list) -> None:
    devices = devs(n)
    rollout = new_rollout("r", TARGET, devices, policy, [d for i, d in enumerate(devices) if i not in offline])
    sizes = wave_sizes(policy, n)
    starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    needed = min_outcomes(policy, n)
    sent: Counter[str] = Counter()
    per_wave: Counter[int] = Counter()
    finished = 0
    now = 0.0
    for kind, index, state, dt in [("start", 0, "offered", 0.0), *steps]:
        now += dt
        event = build_event(kind, index, state, now, rollout)
        old = rollout
        rollout, actions = step(old, event)

        # nothing at all happens once finished; never a send while paused or before start
        if old.status in FINISHED:
            assert actions == []
        if old.status == PAUSED and not isinstance(event, Resume):
            assert sends(actions) == []
        if old.status == CREATED and not isinstance(event, Start):
            assert sends(actions) == []
        # no send after the rollout finished within a step
        kinds = [type(a) for a in actions]
        if RolloutFinished in kinds:
            assert SendDeploy not in kinds[kinds.index(RolloutFinished) :]
            assert rollout.status in FINISHED
            finished += 1
        for action in actions:
            if isinstance(action, SendDeploy):
                sent[action.device] += 1
                per_wave[action.wave] += 1
                assert sent[action.device] == 1, "a device was sent the deployment twice"
                assert action.device in rollout.online, "sent to an offline device"
                assert starts[action.wave] <= devices.index(action.device) < starts[action.wave + 1]
                assert action.wave <= rollout.wave
                assert per_wave[action.wave] <= sizes[action.wave], "a wave exceeded its size"
            if isinstance(action, CancelDeploy):
                assert old.records[action.device].state in IN_FLIGHT
        # the next wave only after the current one settled and the failure rate was evaluated
        if rollout.wave > old.wave and old.wave >= 0:
            assert all(rollout.records[d].state not in IN_FLIGHT for d in devices[: starts[rollout.wave]])
            assert rollout.outcomes >= needed
        if rollout.status in (RUNNING, PAUSED) and rollout.outcomes >= needed:
            assert rollout.failures / rollout.outcomes <= policy.max_failure_rate
        # outcomes are final (a committed device may still turn unhealthy)
        for d in devices:
            before, after = old.records[d].state, rollout.records[d].state
            if before in OUTCOMES:
                assert after == before or (before, after) == (SUCCEEDED, FAILED)
            if before not in (PENDING, SKIPPED):
                assert after not in (PENDING, SKIPPED)
        assert {d for d in devices if rollout.records[d].state not in (PENDING, SKIPPED)} == set(sent)
        assert set(rollback_plan(rollout)) <= set(sent)
        assert all(rollout.counts[s] == sum(r.state == s for r in rollout.records.values()) for s in RECORD_STATES)
        if rollout.status == COMPLETED:
            assert rollout.in_flight == 0 and rollout.wave == len(sizes) - 1
    assert finished <= 1
    assert roundtrip(rollout) == rollout


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 60), policy=POLICIES)
def test_an_all_online_fleet_that_commits_completes_in_policy_waves(n: int, policy: RolloutPolicy) -> None:
    rollout, actions = step(new_rollout("r", TARGET, devs(n), policy), Start(0))
    waves = []
    now = 0.0
    while rollout.status == RUNNING:
        batch = sends(actions)
        if batch:
            waves.append(len(batch))
        now += 4  # sent at most 4 s ago: inside the shortest timeout
        rollout, actions = run(rollout, *(DeviceState(d, "committed", now) for d in batch), Tick(now + 3))
    assert rollout.status == COMPLETED
    assert tuple(waves) == wave_sizes(policy, n)
    assert rollback_plan(rollout) == devs(n)
