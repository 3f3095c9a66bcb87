"""The pure update state machine: every transition in the table, every pair outside it, chains, recovery, semver."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.update.health import HealthPolicy
from agent.update.state import (
    ACTIVE_STATES,
    EVENT_TYPES,
    HISTORY_LIMIT,
    NON_TERMINAL,
    RECOVERED,
    STATES,
    TABLE,
    TERMINAL,
    Activate,
    Activated,
    ActivationFailed,
    Cancel,
    Crash,
    Downloaded,
    Fail,
    HealthVerdict,
    HistoryEntry,
    InvalidTransition,
    InvalidVersion,
    Offer,
    Progress,
    Reject,
    ShadowResult,
    StartDownload,
    StartShadow,
    StartValidation,
    Target,
    UpdateState,
    ValidationFailed,
    ValidationPassed,
    allowed_events,
    chain,
    compare_versions,
    decide_offer,
    invariant_errors,
    new_update,
    parse_version,
    recover,
    state_from_dict,
    state_to_dict,
    transition,
)

LENGTH = 1000
TARGET = Target("digits", "1.2.0", "ab" * 32, LENGTH, ("rpi4",))


def offered(now: float = 0.0) -> UpdateState:
    return new_update(Offer("u-1", TARGET, "1.1.0"), now)


def run(state: UpdateState, *events: object, start: float = 1.0) -> UpdateState:
    for i, event in enumerate(events):
        state = transition(state, event, start + i)  # type: ignore[arg-type]
    return state


TO_VALIDATING = (StartDownload(), Progress(500), Downloaded(sha_ok=True), StartValidation())
TO_SHADOW = (*TO_VALIDATING, ValidationPassed(), StartShadow())
TO_ACTIVATING = (*TO_VALIDATING, ValidationPassed(), Activate())
TO_TRIAL = (*TO_ACTIVATING, Activated())

#: A state in each state name, with its guards satisfied (validated, shadow result in).
READY: dict[str, UpdateState] = {
    "offered": offered(),
    "rejected": run(offered(), Reject("no")),
    "downloading": run(offered(), StartDownload(), Progress(10)),
    "downloaded": run(offered(), *TO_VALIDATING[:3]),
    "validating": run(offered(), *TO_VALIDATING, ValidationPassed()),
    "shadow": run(offered(), *TO_SHADOW, ShadowResult(0.99, 0.95)),
    "activating": run(offered(), *TO_ACTIVATING),
    "trial": run(offered(), *TO_TRIAL),
    "committed": run(offered(), *TO_TRIAL, HealthVerdict(ok=True)),
    "rolled_back": run(offered(), *TO_TRIAL, HealthVerdict(ok=False, reason="latency")),
    "failed": run(offered(), StartDownload(), Downloaded(sha_ok=False)),
}


def example(event_type: type, state_name: str) -> object:
    """A representative event of ``event_type`` for a state named ``state_name``."""
    samples = {
        Offer: Offer("u-2", TARGET, "1.1.0"),
        Reject: Reject("hardware rpi4 not in [jetson-nano]"),
        StartDownload: StartDownload(),
        Progress: Progress(LENGTH // 2),
        Downloaded: Downloaded(sha_ok=True),
        StartValidation: StartValidation(),
        ValidationPassed: ValidationPassed(),
        ValidationFailed: ValidationFailed("golden outputs differ"),
        StartShadow: StartShadow(),
        ShadowResult: ShadowResult(0.98, 0.95),
        Activate: Activate(),
        Activated: Activated(),
        ActivationFailed: ActivationFailed("rename failed"),
        HealthVerdict: HealthVerdict(ok=True),
        Crash: Crash(state_name),
        Fail: Fail("disk full"),
        Cancel: Cancel("operator"),
    }
    return samples[event_type]


#: The state table as the tests expect it: (state, event type) -> resulting state for the example event.
EXPECTED: dict[tuple[str, type], str] = {
    ("offered", Reject): "rejected",
    ("offered", StartDownload): "downloading",
    ("downloading", Progress): "downloading",
    ("downloading", Downloaded): "downloaded",
    ("downloaded", StartValidation): "validating",
    ("validating", ValidationPassed): "validating",
    ("validating", ValidationFailed): "failed",
    ("validating", StartShadow): "shadow",
    ("validating", Activate): "activating",
    ("shadow", ShadowResult): "shadow",
    ("shadow", Activate): "activating",
    ("activating", Activated): "trial",
    ("activating", ActivationFailed): "rolled_back",
    ("trial", HealthVerdict): "committed",
    **{(s, Fail): ("rolled_back" if s in ACTIVE_STATES else "failed") for s in NON_TERMINAL},
    **{(s, Cancel): ("rolled_back" if s in ACTIVE_STATES else "failed") for s in NON_TERMINAL},
    ("offered", Crash): "offered",
    ("downloading", Crash): "downloading",
    ("downloaded", Crash): "downloaded",
    ("validating", Crash): "downloaded",
    ("shadow", Crash): "downloaded",
    ("activating", Crash): "activating",
    ("trial", Crash): "trial",
}

ALL_PAIRS = list(itertools.product(STATES, EVENT_TYPES))
DISALLOWED = [(s, e) for s, e in ALL_PAIRS if (s, e) not in TABLE]


def test_states_and_table_are_what_the_tests_expect() -> None:
    assert set(STATES) == {
        "offered",
        "rejected",
        "downloading",
        "downloaded",
        "validating",
        "shadow",
        "activating",
        "trial",
        "committed",
        "rolled_back",
        "failed",
    }
    assert {"rejected", "committed", "rolled_back", "failed"} == TERMINAL
    assert set(TABLE) == set(EXPECTED)
    assert all(READY[name].state == name for name in STATES)
    assert len(DISALLOWED) == len(ALL_PAIRS) - len(TABLE)


@pytest.mark.parametrize(("state_name", "event_type"), sorted(EXPECTED, key=lambda k: (k[0], k[1].__name__)))
def test_every_allowed_transition(state_name: str, event_type: type) -> None:
    before = READY[state_name]
    snapshot = state_to_dict(before)
    after = transition(before, example(event_type, state_name), 100.0)  # type: ignore[arg-type]
    assert after.state == EXPECTED[(state_name, event_type)]
    assert after.save_counter == before.save_counter + 1
    assert state_to_dict(before) == snapshot  # never mutates the input
    assert invariant_errors(after) == []
    assert event_type in allowed_events(state_name)


@pytest.mark.parametrize(("state_name", "event_type"), DISALLOWED, ids=[f"{s}-{e.__name__}" for s, e in DISALLOWED])
def test_every_disallowed_pair_raises(state_name: str, event_type: type) -> None:
    event = example(event_type, state_name)
    with pytest.raises(InvalidTransition) as info:
        transition(READY[state_name], event, 100.0)  # type: ignore[arg-type]
    assert info.value.from_state == state_name
    assert info.value.event is event
    assert f"{event_type.__name__} not allowed in state {state_name}" in str(info.value)


@pytest.mark.parametrize("state_name", sorted(TERMINAL))
def test_terminal_states_accept_no_event(state_name: str) -> None:
    assert allowed_events(state_name) == frozenset()


def test_guards_refuse_activation_and_shadow_before_validation_passed() -> None:
    validating = run(offered(), *TO_VALIDATING)
    for event in (Activate(), StartShadow()):
        with pytest.raises(InvalidTransition, match="validation has not passed"):
            transition(validating, event, 9.0)
    shadow_without_result = run(offered(), *TO_SHADOW)
    with pytest.raises(InvalidTransition, match="no shadow result yet"):
        transition(shadow_without_result, Activate(), 9.0)
    with pytest.raises(InvalidTransition, match="crash reported during trial"):
        transition(READY["activating"], Crash("trial"), 9.0)


def test_offer_is_never_a_transition_but_starts_a_new_update() -> None:
    state = new_update(Offer("u-9", TARGET, "1.1.0", rollback_allowed=True), 5.0, previous=READY["committed"])
    assert state.state == "offered"
    assert state.rollback_allowed
    assert state.save_counter == READY["committed"].save_counter + 1
    assert state.attempts_in("offered") == 1
    assert state.entered_at == 5.0
    assert chain(state) == ["offered"]


# -- chains ------------------------------------------------------------------------------------------------------------


def test_happy_chain_without_shadow() -> None:
    state = run(offered(), *TO_TRIAL, HealthVerdict(ok=True))
    assert chain(state.history) == [
        "offered",
        "downloading",
        "downloaded",
        "validating",
        "activating",
        "trial",
        "committed",
    ]
    assert state.state == "committed"
    assert state.reason is None
    assert state.progress == LENGTH
    assert state.fraction == 1.0
    # one save per transition: 9 events after the initial offered save
    assert state.save_counter == 1 + len(TO_TRIAL) + 1


def test_happy_chain_with_shadow() -> None:
    state = run(offered(), *TO_SHADOW, ShadowResult(0.97, 0.95), Activate(), Activated(), HealthVerdict(ok=True))
    assert chain(state) == [
        "offered",
        "downloading",
        "downloaded",
        "validating",
        "shadow",
        "activating",
        "trial",
        "committed",
    ]
    assert state.agreement == 0.97


def test_progress_is_recorded_and_entered_at_follows_the_clock() -> None:
    state = run(offered(), StartDownload(), start=10.0)
    assert state.entered_at == 10.0
    state = transition(state, Progress(250), 11.0)
    assert (state.state, state.progress, state.fraction, state.entered_at) == ("downloading", 250, 0.25, 10.0)
    assert chain(state) == ["offered", "downloading"]  # progress adds no history line
    assert state.history[-1] == HistoryEntry("downloading", 10.0, None)


# -- failure paths -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason", ["downgrade from 1.2.0 to 1.1.0 refused", "hardware rpi4 not in [jetson-nano]", "already running 1.2.0"]
)
def test_rejected_at_offer_for_each_reason(reason: str) -> None:
    state = transition(offered(), Reject(reason), 1.0)
    assert (state.state, state.reason) == ("rejected", reason)
    assert chain(state) == ["offered", "rejected"]
    assert state.history[-1].reason == reason


def test_hash_mismatch_fails_the_download() -> None:
    state = run(offered(), StartDownload(), Progress(LENGTH), Downloaded(sha_ok=False))
    assert state.state == "failed"
    assert state.reason == "sha256 mismatch for digits 1.2.0"
    assert chain(state) == ["offered", "downloading", "failed"]


def test_endless_data_fails_the_download() -> None:
    state = run(offered(), StartDownload(), Progress(LENGTH + 1))
    assert state.state == "failed"
    assert state.reason == f"received {LENGTH + 1} bytes, more than the announced {LENGTH}"


def test_validation_failure() -> None:
    state = run(offered(), *TO_VALIDATING, ValidationFailed("golden outputs differ"))
    assert (state.state, state.reason) == ("failed", "validation failed: golden outputs differ")
    assert chain(state) == ["offered", "downloading", "downloaded", "validating", "failed"]


def test_shadow_disagreement_below_threshold_is_rejected() -> None:
    state = run(offered(), *TO_SHADOW, ShadowResult(0.80, 0.95))
    assert state.state == "rejected"
    assert state.reason == "shadow agreement 0.800 below threshold 0.950"
    assert state.agreement == 0.80
    assert chain(state)[-2:] == ["shadow", "rejected"]


def test_shadow_agreement_equal_to_threshold_passes() -> None:
    assert run(offered(), *TO_SHADOW, ShadowResult(0.95, 0.95)).state == "shadow"


def test_activation_failure_rolls_back() -> None:
    state = run(offered(), *TO_ACTIVATING, ActivationFailed("rename failed"))
    assert (state.state, state.reason) == ("rolled_back", "activation failed: rename failed")


def test_bad_health_rolls_back_and_good_health_commits() -> None:
    bad = run(offered(), *TO_TRIAL, HealthVerdict(ok=False, reason="p99 latency 3x baseline"))
    assert (bad.state, bad.reason) == ("rolled_back", "unhealthy in trial: p99 latency 3x baseline")
    good = run(offered(), *TO_TRIAL, HealthVerdict(ok=True))
    assert (good.state, good.reason) == ("committed", None)


@pytest.mark.parametrize("state_name", NON_TERMINAL)
def test_fail_and_cancel_from_every_non_terminal_state(state_name: str) -> None:
    expected = "rolled_back" if state_name in ACTIVE_STATES else "failed"
    failed = transition(READY[state_name], Fail("disk full"), 50.0)
    assert (failed.state, failed.reason) == (expected, "disk full")
    canceled = transition(READY[state_name], Cancel("operator"), 50.0)
    assert (canceled.state, canceled.reason) == (expected, "canceled: operator")


def test_events_refuse_bad_payloads() -> None:
    for make in (
        lambda: Reject(""),
        lambda: Fail(" "),
        lambda: Cancel(""),
        lambda: ValidationFailed(""),
        lambda: ActivationFailed(""),
        lambda: HealthVerdict(ok=False),
        lambda: Progress(-1),
        lambda: ShadowResult(1.5, 0.9),
        lambda: ShadowResult(0.5, -0.1),
    ):
        with pytest.raises(ValueError):
            make()


# -- recovery ----------------------------------------------------------------------------------------------------------

RECOVERY = {
    "offered": "offered",
    "downloading": "downloading",
    "downloaded": "downloaded",
    "validating": "downloaded",
    "shadow": "downloaded",
    "activating": "activating",
    "trial": "trial",
    "rejected": "rejected",
    "committed": "committed",
    "rolled_back": "rolled_back",
    "failed": "failed",
}


@pytest.mark.parametrize("state_name", STATES)
def test_recover_from_every_state(state_name: str) -> None:
    before = READY[state_name]
    after = recover(before, 500.0)
    assert after.state == RECOVERY[state_name]
    assert invariant_errors(after) == []
    if state_name in TERMINAL:
        assert after is before
        return
    assert after.save_counter == before.save_counter + 1
    assert after.history[-1] == HistoryEntry(after.state, 500.0, RECOVERED)
    assert after.reason is None
    assert after.entered_at == 500.0
    assert after.needs_slot_check == (state_name == "activating")
    if after.state == "downloaded":
        assert not after.validated
        assert after.agreement is None
    if state_name == "downloading":
        assert after.progress == before.progress  # resumable


def test_recover_equals_crash_event() -> None:
    for name in NON_TERMINAL:
        assert transition(READY[name], Crash(name), 7.0) == recover(READY[name], 7.0)


def test_activating_after_restart_waits_for_the_slot_check() -> None:
    state = recover(READY["activating"], 10.0)
    assert state.needs_slot_check
    with pytest.raises(InvalidTransition):
        transition(state, Activate(), 11.0)
    new_slot_active = transition(state, Activated(), 11.0)
    assert (new_slot_active.state, new_slot_active.needs_slot_check) == ("trial", False)
    old_slot_active = transition(state, ActivationFailed("old slot still active after restart"), 11.0)
    assert old_slot_active.state == "rolled_back"


def test_killed_in_validation_chain_revalidates() -> None:
    state = recover(run(offered(), *TO_VALIDATING), 20.0)
    state = run(state, StartValidation(), ValidationPassed(), Activate(), Activated(), HealthVerdict(ok=True), start=21)
    assert chain(state) == [
        "offered",
        "downloading",
        "downloaded",
        "validating",
        "downloaded",
        "validating",
        "activating",
        "trial",
        "committed",
    ]


def test_crash_loop_in_trial_rolls_back_after_max_attempts() -> None:
    state = READY["trial"]
    for i in range(2):
        state = recover(state, 30.0 + i)
        assert state.state == "trial"
    state = recover(state, 40.0)
    assert (state.state, state.reason) == ("rolled_back", "crash loop in trial")
    assert chain(state)[-4:] == ["trial", "trial", "trial", "rolled_back"]
    assert state.attempts_in("trial") == 3


def test_activation_baseline_and_policy_survive_restarts_in_trial() -> None:
    """The previous model's p95 and the window's policy are persisted at Activate (before the swap): a restart in
    trial resumes with them, not with whatever the new model measures after the restart."""
    policy = HealthPolicy(window_s=8.0, min_results=10, latency_factor=3.0, latency_floor_ms=7.5)
    state = run(offered(), *TO_VALIDATING, ValidationPassed(), Activate(baseline_p95_ms=0.34, health=policy))
    assert (state.state, state.baseline_p95_ms, state.health) == ("activating", 0.34, policy)
    state = recover(state, 20.0)  # killed around the switch
    state = transition(state, Activated(), 21.0)
    for i in range(2):  # killed twice in trial
        state = recover(state, 30.0 + i)
        assert state.state == "trial"
        state = state_from_dict(state_to_dict(state))  # what the store writes and reads back
        assert (state.baseline_p95_ms, state.health) == (0.34, policy)
    assert transition(state, HealthVerdict(ok=True), 40.0).baseline_p95_ms == 0.34


def test_state_written_before_baselines_existed_still_loads() -> None:
    data = state_to_dict(READY["trial"])
    del data["baseline_p95_ms"], data["health"]
    state = state_from_dict(data)
    assert (state.baseline_p95_ms, state.health) == (None, None)


def test_activate_refuses_a_bad_baseline_and_the_store_a_bad_policy() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            Activate(baseline_p95_ms=bad)
    data = state_to_dict(run(offered(), *TO_VALIDATING, ValidationPassed(), Activate(1.0, HealthPolicy())))
    for key, value in [("health", {**data["health"], "latency_floor_ms": -1}), ("baseline_p95_ms", -2.0)]:
        with pytest.raises(ValueError):
            state_from_dict({**data, key: value})


def test_trial_crash_limit_follows_max_attempts() -> None:
    state = READY["trial"]
    for _ in range(4):
        state = recover(state, 1.0, max_attempts=5)
    assert state.state == "trial"
    assert recover(state, 2.0, max_attempts=5).state == "rolled_back"


@pytest.mark.parametrize(
    ("start", "again", "looping"),
    [
        ("offered", (), "offered"),
        ("downloading", (), "downloading"),
        ("downloaded", (), "downloaded"),
        ("validating", (StartValidation(),), "downloaded"),
        ("shadow", (StartValidation(), ValidationPassed(), StartShadow()), "downloaded"),
    ],
)
def test_state_loop_guard_fails_the_update(start: str, again: tuple[object, ...], looping: str) -> None:
    state = READY[start]
    for _ in range(5):
        state = recover(state, 60.0)
        if state.terminal:
            break
        state = run(state, *again, start=61.0)
    assert (state.state, state.reason) == ("failed", f"state loop in {looping}")
    assert state.attempts_in(looping) == 3


def test_state_loop_in_activating_rolls_back() -> None:
    state = READY["activating"]
    state = recover(recover(state, 1.0), 2.0)
    assert state.state == "activating"
    state = recover(state, 3.0)
    assert (state.state, state.reason) == ("rolled_back", "state loop in activating")


def test_history_is_bounded() -> None:
    state = recover(READY["downloading"], 1.0, max_attempts=10_000)
    for i in range(200):
        state = recover(state, float(i), max_attempts=10_000)
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[-1].at == 199.0
    assert state.attempts_in("downloading") == 201  # the first recovery saw progress (10 bytes): counting restarted


def test_chain_accepts_tuples() -> None:
    assert chain([("offered", 0.0, None), ("rejected", 1.0, "no")]) == ["offered", "rejected"]


def test_state_dict_round_trip_and_invalid_dicts() -> None:
    for state in READY.values():
        assert state_from_dict(state_to_dict(state)) == state
    data = state_to_dict(READY["committed"])
    for key, bad in [("state", "exploded"), ("progress", 3), ("save_counter", -1), ("reason", "x")]:
        with pytest.raises(ValueError):
            state_from_dict({**data, key: bad})


# -- offer decision and semver -----------------------------------------------------------------------------------------

ORDERED = [
    "0.9.9",
    "1.0.0-0.3.7",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.1.0",
    "1.2.0",
    "1.10.0",
    "2.0.0",
    "10.0.0",
]


@pytest.mark.parametrize(("i", "j"), list(itertools.combinations(range(len(ORDERED)), 2)))
def test_semver_ordering_table(i: int, j: int) -> None:
    assert compare_versions(ORDERED[i], ORDERED[j]) == -1
    assert compare_versions(ORDERED[j], ORDERED[i]) == 1


def test_semver_equality_ignores_build_metadata() -> None:
    assert compare_versions("1.0.0+build.1", "1.0.0+build.2") == 0
    assert compare_versions("1.0.0-alpha+x", "1.0.0-alpha") == 0
    assert str(parse_version("1.2.3-rc.1+git.abc")) == "1.2.3-rc.1+git.abc"


@pytest.mark.parametrize(
    "text", ["1", "1.2", "01.2.3", "1.02.3", "1.2.3-", "1.2.3-01", "v1.2.3", "1.2.3\n", "", "a.b.c"]
)
def test_invalid_semver(text: str) -> None:
    with pytest.raises(InvalidVersion):
        parse_version(text)


@pytest.mark.parametrize(
    ("current", "hardware", "target", "target_hw", "rollback", "ran", "expected"),
    [
        ("1.1.0", "rpi4", "1.2.0", ["rpi4"], False, set(), (True, None)),
        ("1.1.0", "rpi4", "1.2.0", [], False, set(), (True, None)),
        ("", "rpi4", "0.1.0", [], False, set(), (True, None)),
        ("1.0.0-rc.1", "rpi4", "1.0.0", [], False, set(), (True, None)),
        ("1.2.0", "rpi4", "1.1.0", [], False, {"1.1.0"}, (False, "downgrade from 1.2.0 to 1.1.0 refused")),
        ("1.1.0", "rpi4", "1.2.0", ["jetson-nano"], False, set(), (False, "hardware rpi4 not in [jetson-nano]")),
        (
            "1.1.0",
            "rpi4",
            "1.2.0",
            ["jetson-nano", "x86"],
            False,
            set(),
            (False, "hardware rpi4 not in [jetson-nano, x86]"),
        ),
        ("1.2.0", "rpi4", "1.2.0", [], False, set(), (False, "already running 1.2.0")),
        ("1.2.0", "rpi4", "1.2.0+b2", [], True, {"1.2.0"}, (False, "already running 1.2.0")),
        ("1.2.0", "rpi4", "1.1.0", [], True, {"1.1.0"}, (True, None)),
        ("1.2.0", "rpi4", "1.1.0", [], True, {"1.1.0+build.7"}, (True, None)),
        ("1.2.0", "rpi4", "1.0.0", [], True, {"1.1.0"}, (False, "rollback to 1.0.0 refused: never ran on this device")),
        ("1.2.0", "rpi4", "1.0.0", [], False, {"1.0.0"}, (False, "downgrade from 1.2.0 to 1.0.0 refused")),
        ("1.2.0", "rpi4", "latest", [], False, set(), (False, "target version 'latest' is not a semantic version")),
        ("dev", "rpi4", "1.0.0", [], False, set(), (False, "current version 'dev' is not a semantic version")),
    ],
)
def test_decide_offer(current, hardware, target, target_hw, rollback, ran, expected) -> None:
    assert decide_offer(current, hardware, target, target_hw, rollback, ran) == expected


# -- properties --------------------------------------------------------------------------------------------------------

EVENTS = st.one_of(
    st.builds(Reject, st.just("no")),
    st.just(StartDownload()),
    st.builds(Progress, st.integers(0, LENGTH + 5)),
    st.builds(Downloaded, st.booleans()),
    st.just(StartValidation()),
    st.just(ValidationPassed()),
    st.just(ValidationFailed("bad")),
    st.just(StartShadow()),
    st.builds(ShadowResult, st.floats(0, 1), st.floats(0, 1)),
    st.just(Activate()),
    st.just(Activated()),
    st.just(ActivationFailed("boom")),
    st.one_of(st.just(HealthVerdict(ok=True)), st.just(HealthVerdict(ok=False, reason="sick"))),
    st.just("crash"),  # replaced by Crash(current state)
    st.just(Fail("x")),
    st.just(Cancel("y")),
    st.just(Offer("u-3", TARGET, "1.0.0")),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(EVENTS, max_size=40))
def test_random_event_sequences_stay_valid_and_terminal_states_absorb(events: list[object]) -> None:
    state = offered()
    for step, event in enumerate(events):
        now = float(step + 1)
        if event == "crash":
            event = Crash(state.state)
        before = state
        try:
            state = transition(state, event, now)  # type: ignore[arg-type]
        except InvalidTransition:
            assert state is before
            # either outside the table, or a guard refused it (validation/shadow result not in yet)
            assert (before.state, type(event)) not in TABLE or type(event) in (Activate, StartShadow)
            continue
        assert not before.terminal, "a terminal state accepted an event"
        assert invariant_errors(state) == []
        assert state.save_counter == before.save_counter + 1
        assert chain(state)[-1] == state.state
        assert state_from_dict(state_to_dict(state)) == state
    if state.terminal:
        for event_type in EVENT_TYPES:
            with pytest.raises(InvalidTransition):
                transition(state, example(event_type, state.state), 999.0)  # type: ignore[arg-type]
        assert recover(state, 999.0) is state


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["crash", "step"]), max_size=60))
def test_crashes_anywhere_always_end_or_continue_validly(moves: list[str]) -> None:
    """Kill at random points along the happy path: recovery never breaks invariants and loops always end."""
    plan = {
        "offered": StartDownload(),
        "downloading": Downloaded(sha_ok=True),
        "downloaded": StartValidation(),
        "validating": ValidationPassed(),
        "shadow": ShadowResult(1.0, 0.9),
        "activating": Activated(),
        "trial": HealthVerdict(ok=True),
    }
    state = offered()
    for step, move in enumerate(moves):
        if state.terminal:
            break
        if move == "crash":
            state = recover(state, float(step))
        elif state.state == "validating" and state.validated:
            state = transition(state, StartShadow(), float(step))
        elif state.state == "shadow" and state.agreement is not None:
            state = transition(state, Activate(), float(step))
        else:
            state = transition(state, plan[state.state], float(step))
        assert invariant_errors(state) == []
        assert all(count <= 3 for _, count in state.attempts), state.attempts


def test_download_resumed_with_progress_is_never_a_loop() -> None:
    state = READY["downloading"]
    for i in range(1, 10):
        state = transition(state, Progress(min(i * 10, state.target.length)), float(i))
        state = recover(state, float(i))
        assert state.state == "downloading", state.reason
        assert state.attempts_in("downloading") == 1
    # without progress the guard applies again
    for i in range(3):
        state = recover(state, 100.0 + i)
    assert (state.state, state.reason) == ("failed", "state loop in downloading")
    assert not invariant_errors(state)
