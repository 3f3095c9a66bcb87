"""Pure update lifecycle state machine for model updates: no I/O, no clocks (time is passed in).

Lifecycle (state names are the strings reported to the fleet)::

    offered -> rejected(reason)
            | downloading(progress) -> downloaded -> validating [-> shadow(agreement)]
              -> activating -> trial -> committed | rolled_back(reason)
    failed(reason) from any non-terminal step before activation.

Terminal states (absorbing: every event raises ``InvalidTransition``): rejected, committed, rolled_back, failed.

Design rules (see DESIGN.md "Update lifecycle on the device"):

* ``transition(state, event, now)`` is table-driven: ``TABLE[(state name, event type)] -> handler``. A pair not in
  the table raises ``InvalidTransition``; a handler may also raise it when a guard fails (e.g. ``Activate`` before
  ``ValidationPassed``). The input is never mutated; each successful transition returns a new ``UpdateState`` whose
  ``save_counter`` is one higher (every transition is meant to be persisted).
* Invariant for the shell: ``failed`` and ``rejected`` never leave the candidate model active (nothing to undo);
  ``rolled_back`` means "restore the previous slot" (idempotent); ``committed`` means the candidate stays. Therefore
  ``Fail``/``Cancel`` in ``activating`` or ``trial`` (where the candidate may already be active) end in
  ``rolled_back``, not ``failed``.
* A shadow agreement below threshold ends in ``rejected`` (not ``failed``): ``failed`` is a fault worth retrying
  (network, disk, crash loop), ``rejected`` is the device's verdict on this artifact, and retrying the same model
  will not change it.
* Restarts (``kill -9`` at any instant): see ``recover``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import TypeAdapter

from agent.protocol.update import UPDATE_STATES
from agent.update.health import HealthPolicy

STATES: tuple[str, ...] = UPDATE_STATES  # the wire contract's names, in lifecycle order
TERMINAL: frozenset[str] = frozenset({"rejected", "committed", "rolled_back", "failed"})
NON_TERMINAL: tuple[str, ...] = tuple(s for s in STATES if s not in TERMINAL)
#: States whose ``reason`` must be set (and only these).
REASON_STATES: frozenset[str] = frozenset({"rejected", "rolled_back", "failed"})
#: States in which the candidate model may already be active: every way out except ``committed`` is ``rolled_back``.
ACTIVE_STATES: frozenset[str] = frozenset({"activating", "trial"})
#: States in which all bytes are on disk and hashed (``progress == target.length``).
POST_DOWNLOAD: frozenset[str] = frozenset({"downloaded", "validating", "shadow", "activating", "trial", "committed"})
#: States that require ``validated`` (validation passed).
POST_VALIDATION: frozenset[str] = frozenset({"shadow", "activating", "trial", "committed"})
HISTORY_LIMIT = 50
DEFAULT_MAX_ATTEMPTS = 3
RECOVERED = "recovered after restart"

_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Target:
    """What is offered: model name, semver version, content hash and length, compatible hardware (empty = any)."""

    name: str
    version: str
    sha256: str
    length: int
    hardware: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("target name is empty")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"target sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.length < 0:
            raise ValueError(f"target length must be >= 0, got {self.length}")
        if not isinstance(self.hardware, tuple):
            object.__setattr__(self, "hardware", tuple(self.hardware))


@dataclass(frozen=True)
class HistoryEntry:
    """One state entry: the state, when it was entered, and why (reason of the terminal state or of a recovery)."""

    state: str
    at: float
    reason: str | None = None


@dataclass(frozen=True)
class UpdateState:
    """The persisted state of one update. Immutable; build new ones with ``transition``/``recover``.

    ``attempts`` holds per-state entry counts as sorted ``(state, count)`` pairs (loop protection);
    ``needs_slot_check`` is only ever true in ``activating`` after a restart (see ``recover``).
    """

    update_id: str
    target: Target
    from_version: str
    state: str = "offered"
    reason: str | None = None
    progress: int = 0
    agreement: float | None = None
    save_counter: int = 0
    attempts: tuple[tuple[str, int], ...] = ()
    entered_at: float = 0.0
    history: tuple[HistoryEntry, ...] = ()
    rollback_allowed: bool = False
    validated: bool = False
    needs_slot_check: bool = False
    progress_mark: int = 0  # progress when downloading was last (re)entered: a resume that made progress is no loop
    # set at Activate, before the swap, and kept across restarts: the health window of a resumed trial judges the new
    # model against the previous model's p95 (not against its own early runs) under the policy it started with
    baseline_p95_ms: float | None = None
    health: HealthPolicy | None = None

    def __post_init__(self) -> None:
        for error in invariant_errors(self):
            raise ValueError(f"invalid update state: {error}")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def fraction(self) -> float:
        """Download progress in [0, 1] (bytes received / length)."""
        return 1.0 if self.target.length == 0 else self.progress / self.target.length

    def attempts_in(self, state: str) -> int:
        """How many times ``state`` has been entered in this update."""
        return dict(self.attempts).get(state, 0)


def invariant_errors(s: UpdateState) -> list[str]:
    """Every broken invariant of ``s`` as a one-line string (empty list: valid)."""
    errors: list[str] = []
    if not s.update_id:
        errors.append("update_id is empty")
    if s.state not in STATES:
        errors.append(f"unknown state {s.state!r}")
    if s.state in REASON_STATES and not s.reason:
        errors.append(f"state {s.state} needs a reason")
    if s.state not in REASON_STATES and s.reason is not None:
        errors.append(f"state {s.state} carries a reason {s.reason!r}")
    if not 0 <= s.progress <= s.target.length:
        errors.append(f"progress {s.progress} outside [0, {s.target.length}]")
    if s.state in POST_DOWNLOAD and s.progress != s.target.length:
        errors.append(f"state {s.state} with progress {s.progress} != length {s.target.length}")
    if s.agreement is not None and not 0.0 <= s.agreement <= 1.0:
        errors.append(f"agreement {s.agreement} outside [0, 1]")
    if s.save_counter < 0:
        errors.append(f"save_counter {s.save_counter} < 0")
    names = [name for name, _ in s.attempts]
    if len(set(names)) != len(names) or any(n not in STATES for n in names) or any(c < 1 for _, c in s.attempts):
        errors.append(f"bad attempts {s.attempts!r}")
    if len(s.history) > HISTORY_LIMIT:
        errors.append(f"history longer than {HISTORY_LIMIT}")
    if s.history and s.history[-1].state != s.state:
        errors.append(f"history ends in {s.history[-1].state}, state is {s.state}")
    if s.needs_slot_check and s.state != "activating":
        errors.append("needs_slot_check outside activating")
    if s.state in POST_VALIDATION and not s.validated:
        errors.append(f"state {s.state} without a passed validation")
    if s.state in {"offered", "downloading", "downloaded"} and s.validated:
        errors.append(f"state {s.state} marked validated")
    if s.baseline_p95_ms is not None and not (0.0 <= s.baseline_p95_ms < float("inf")):
        errors.append(f"baseline_p95_ms {s.baseline_p95_ms} is not a finite value >= 0")
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# Events


def _need_reason(reason: str | None, event: str) -> None:
    if not reason or not reason.strip():
        raise ValueError(f"{event} needs a non-empty reason")


@dataclass(frozen=True)
class Offer:
    """A new update offered by the fleet: start it with ``new_update`` (no existing state accepts it)."""

    update_id: str
    target: Target
    from_version: str
    rollback_allowed: bool = False


@dataclass(frozen=True)
class Reject:
    reason: str

    def __post_init__(self) -> None:
        _need_reason(self.reason, "Reject")


@dataclass(frozen=True)
class StartDownload:
    pass


@dataclass(frozen=True)
class Progress:
    received: int

    def __post_init__(self) -> None:
        if self.received < 0:
            raise ValueError(f"Progress.received must be >= 0, got {self.received}")


@dataclass(frozen=True)
class Downloaded:
    sha_ok: bool


@dataclass(frozen=True)
class StartValidation:
    pass


@dataclass(frozen=True)
class ValidationPassed:
    pass


@dataclass(frozen=True)
class ValidationFailed:
    reason: str

    def __post_init__(self) -> None:
        _need_reason(self.reason, "ValidationFailed")


@dataclass(frozen=True)
class StartShadow:
    pass


@dataclass(frozen=True)
class ShadowResult:
    agreement: float
    threshold: float

    def __post_init__(self) -> None:
        for name, value in (("agreement", self.agreement), ("threshold", self.threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ShadowResult.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Activate:
    """Switch to the candidate; ``baseline_p95_ms`` (the running model's p95, measured before the swap) and
    ``health`` (the window's policy) are persisted with the state so that a restart in ``trial`` keeps them."""

    baseline_p95_ms: float | None = None
    health: HealthPolicy | None = None

    def __post_init__(self) -> None:
        if self.baseline_p95_ms is not None and not (0.0 <= self.baseline_p95_ms < float("inf")):
            raise ValueError(f"Activate.baseline_p95_ms must be a finite value >= 0, got {self.baseline_p95_ms}")


@dataclass(frozen=True)
class Activated:
    pass


@dataclass(frozen=True)
class ActivationFailed:
    reason: str

    def __post_init__(self) -> None:
        _need_reason(self.reason, "ActivationFailed")


@dataclass(frozen=True)
class HealthVerdict:
    ok: bool
    reason: str | None = None

    def __post_init__(self) -> None:
        if not self.ok:
            _need_reason(self.reason, "HealthVerdict(ok=False)")


@dataclass(frozen=True)
class Crash:
    """The agent restarted while the persisted state was ``during_state``; applies the ``recover`` rules."""

    during_state: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


@dataclass(frozen=True)
class Fail:
    reason: str

    def __post_init__(self) -> None:
        _need_reason(self.reason, "Fail")


@dataclass(frozen=True)
class Cancel:
    reason: str

    def __post_init__(self) -> None:
        _need_reason(self.reason, "Cancel")


Event = (
    Offer
    | Reject
    | StartDownload
    | Progress
    | Downloaded
    | StartValidation
    | ValidationPassed
    | ValidationFailed
    | StartShadow
    | ShadowResult
    | Activate
    | Activated
    | ActivationFailed
    | HealthVerdict
    | Crash
    | Fail
    | Cancel
)
EVENT_TYPES: tuple[type, ...] = Event.__args__  # type: ignore[attr-defined]


class InvalidTransition(Exception):
    """An event that is not allowed in the current state (or whose guard fails there)."""

    def __init__(self, from_state: str, event: object, why: str | None = None) -> None:
        self.from_state = from_state
        self.event = event
        self.why = why
        message = f"{type(event).__name__} not allowed in state {from_state}"
        super().__init__(f"{message}: {why}" if why else message)


# ---------------------------------------------------------------------------------------------------------------------
# Transitions


def new_update(offer: Offer, now: float, previous: UpdateState | None = None) -> UpdateState:
    """The ``offered`` state for a new offer. ``previous`` (the last stored update, if any) continues its
    ``save_counter`` so that the store's counter only ever grows."""
    counter = (previous.save_counter if previous is not None else 0) + 1
    return UpdateState(
        update_id=offer.update_id,
        target=offer.target,
        from_version=offer.from_version,
        state="offered",
        save_counter=counter,
        attempts=(("offered", 1),),
        entered_at=now,
        history=(HistoryEntry("offered", now, None),),
        rollback_allowed=offer.rollback_allowed,
    )


def _enter(
    s: UpdateState, new: str, now: float, reason: str | None = None, history_reason: str | None = None, **changes: Any
) -> UpdateState:
    """Enter state ``new``: counts the entry, appends history, resets the per-state flags, bumps save_counter."""
    counts = dict(s.attempts)
    counts[new] = counts.get(new, 0) + 1
    entry = HistoryEntry(new, now, reason if reason is not None else history_reason)
    fields: dict[str, Any] = {
        "state": new,
        "reason": reason,
        "attempts": tuple(sorted(counts.items())),
        "entered_at": now,
        "history": (*s.history, entry)[-HISTORY_LIMIT:],
        "save_counter": s.save_counter + 1,
        "needs_slot_check": False,
    }
    fields.update(changes)
    return replace(s, **fields)


def _update(s: UpdateState, **changes: Any) -> UpdateState:
    """Stay in the same state with new data (no new entry, no history line); still a persisted change."""
    return replace(s, save_counter=s.save_counter + 1, **changes)


def _end(s: UpdateState, reason: str, now: float) -> UpdateState:
    """Abort: ``rolled_back`` where the candidate may be active, ``failed`` before that."""
    return _enter(s, "rolled_back" if s.state in ACTIVE_STATES else "failed", now, reason)


Handler = Callable[[UpdateState, Any, float], UpdateState]
TABLE: dict[tuple[str, type], Handler] = {}


def _on(states: Iterable[str], event_type: type) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for state in states:
            TABLE[(state, event_type)] = handler
        return handler

    return register


@_on(["offered"], Reject)
def _reject(s: UpdateState, e: Reject, now: float) -> UpdateState:
    return _enter(s, "rejected", now, e.reason)


@_on(["offered"], StartDownload)
def _start_download(s: UpdateState, e: StartDownload, now: float) -> UpdateState:
    return _enter(s, "downloading", now, progress=0)


@_on(["downloading"], Progress)
def _progress(s: UpdateState, e: Progress, now: float) -> UpdateState:
    if e.received > s.target.length:
        return _enter(s, "failed", now, f"received {e.received} bytes, more than the announced {s.target.length}")
    return _update(s, progress=e.received)


@_on(["downloading"], Downloaded)
def _downloaded(s: UpdateState, e: Downloaded, now: float) -> UpdateState:
    if not e.sha_ok:
        return _enter(s, "failed", now, f"sha256 mismatch for {s.target.name} {s.target.version}")
    return _enter(s, "downloaded", now, progress=s.target.length)


@_on(["downloaded"], StartValidation)
def _start_validation(s: UpdateState, e: StartValidation, now: float) -> UpdateState:
    return _enter(s, "validating", now, validated=False, agreement=None)


@_on(["validating"], ValidationPassed)
def _validation_passed(s: UpdateState, e: ValidationPassed, now: float) -> UpdateState:
    return _update(s, validated=True)


@_on(["validating"], ValidationFailed)
def _validation_failed(s: UpdateState, e: ValidationFailed, now: float) -> UpdateState:
    return _enter(s, "failed", now, f"validation failed: {e.reason}")


@_on(["validating"], StartShadow)
def _start_shadow(s: UpdateState, e: StartShadow, now: float) -> UpdateState:
    if not s.validated:
        raise InvalidTransition(s.state, e, "validation has not passed")
    return _enter(s, "shadow", now, agreement=None)


@_on(["shadow"], ShadowResult)
def _shadow_result(s: UpdateState, e: ShadowResult, now: float) -> UpdateState:
    if e.agreement < e.threshold:
        reason = f"shadow agreement {e.agreement:.3f} below threshold {e.threshold:.3f}"
        return _enter(s, "rejected", now, reason, agreement=e.agreement)
    return _update(s, agreement=e.agreement)


@_on(["validating", "shadow"], Activate)
def _activate(s: UpdateState, e: Activate, now: float) -> UpdateState:
    if not s.validated:
        raise InvalidTransition(s.state, e, "validation has not passed")
    if s.state == "shadow" and s.agreement is None:
        raise InvalidTransition(s.state, e, "no shadow result yet")
    return _enter(s, "activating", now, baseline_p95_ms=e.baseline_p95_ms, health=e.health)


@_on(["activating"], Activated)
def _activated(s: UpdateState, e: Activated, now: float) -> UpdateState:
    return _enter(s, "trial", now)


@_on(["activating"], ActivationFailed)
def _activation_failed(s: UpdateState, e: ActivationFailed, now: float) -> UpdateState:
    return _enter(s, "rolled_back", now, f"activation failed: {e.reason}")


@_on(["trial"], HealthVerdict)
def _health(s: UpdateState, e: HealthVerdict, now: float) -> UpdateState:
    if e.ok:
        return _enter(s, "committed", now)
    return _enter(s, "rolled_back", now, f"unhealthy in trial: {e.reason}")


@_on(NON_TERMINAL, Fail)
def _fail(s: UpdateState, e: Fail, now: float) -> UpdateState:
    return _end(s, e.reason, now)


@_on(NON_TERMINAL, Cancel)
def _cancel(s: UpdateState, e: Cancel, now: float) -> UpdateState:
    return _end(s, f"canceled: {e.reason}", now)


@_on(NON_TERMINAL, Crash)
def _crash(s: UpdateState, e: Crash, now: float) -> UpdateState:
    if e.during_state != s.state:
        raise InvalidTransition(s.state, e, f"crash reported during {e.during_state}")
    return recover(s, now, e.max_attempts)


def transition(state: UpdateState, event: Event, now: float) -> UpdateState:
    """The state after ``event`` at time ``now``; raises ``InvalidTransition`` where the event is not allowed."""
    handler = TABLE.get((state.state, type(event)))
    if handler is None:
        raise InvalidTransition(state.state, event)
    return handler(state, event, now)


def allowed_events(state: str) -> frozenset[type]:
    """The event types the table accepts in ``state`` (guards may still refuse some)."""
    return frozenset(event_type for (name, event_type) in TABLE if name == state)


# ---------------------------------------------------------------------------------------------------------------------
# Restart recovery

#: Where an interrupted state resumes. validating/shadow go back to downloaded: the bytes are on disk and the
#: shell re-hashes them, then validation (and shadow) run again from scratch.
RECOVERY_TARGET: dict[str, str] = {
    "offered": "offered",
    "downloading": "downloading",
    "downloaded": "downloaded",
    "validating": "downloaded",
    "shadow": "downloaded",
    "activating": "activating",
    "trial": "trial",
}


def recover(state: UpdateState, now: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> UpdateState:
    """The state to continue from after an agent restart (``kill -9`` at any instant), given the persisted one.

    * terminal states: returned unchanged (same object, nothing to save).
    * offered -> offered (decide again); downloading -> downloading (resumable, progress kept).
    * downloaded / validating / shadow -> downloaded (``validated`` and ``agreement`` cleared: re-validate).
    * activating -> activating with ``needs_slot_check=True``: the shell must look at which slot is active and then
      send ``Activated`` (the candidate's slot is active: go on to trial) or ``ActivationFailed`` (the old slot is
      still active: rolled_back). ``Activate`` is not accepted again in activating.
    * trial -> trial (the health window restarts at ``now``); a crash in trial counts against health.
    * loop guard (Mender's save-counter guard, per state): the resumed state is re-entered, and entering the same
      state more than ``max_attempts`` times ends the update (a download that made progress since it was last
      entered starts counting again: resuming it is progress, not a loop): ``failed("state loop in X")`` before activation,
      ``rolled_back("state loop in activating")`` / ``rolled_back("crash loop in trial")`` once the candidate may be
      active. With the default 3: the third crash-restart in trial rolls back.
    """
    if state.terminal:
        return state
    target = RECOVERY_TARGET[state.state]
    if target == "downloading" and state.progress > state.progress_mark:
        # Bytes arrived since the last start: a resumable download interrupted by restarts is not a crash loop.
        counts = dict(state.attempts)
        counts.pop("downloading", None)
        state = replace(state, attempts=tuple(sorted(counts.items())), progress_mark=state.progress)
    if state.attempts_in(target) >= max_attempts:
        if target == "trial":
            return _enter(state, "rolled_back", now, "crash loop in trial")
        outcome = "rolled_back" if target in ACTIVE_STATES else "failed"
        return _enter(state, outcome, now, f"state loop in {target}")
    changes: dict[str, Any] = {}
    if target == "downloaded":
        changes = {"validated": False, "agreement": None}
    elif target == "activating":
        changes = {"needs_slot_check": True}
    return _enter(state, target, now, history_reason=RECOVERED, **changes)


def chain(history: Iterable[HistoryEntry | tuple[str, float, str | None]] | UpdateState) -> list[str]:
    """The reported state names in order, e.g. ``["offered", "downloading", "downloaded", ...]``."""
    entries = history.history if isinstance(history, UpdateState) else history
    return [entry.state if isinstance(entry, HistoryEntry) else entry[0] for entry in entries]


# ---------------------------------------------------------------------------------------------------------------------
# Offer decision and semver


class InvalidVersion(ValueError):
    """Not a semantic version (https://semver.org)."""


_IDENT = r"(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    rf"(?:-({_IDENT}(?:\.{_IDENT})*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    def key(self) -> tuple[Any, ...]:
        """Precedence key per semver.org section 11 (build metadata ignored)."""
        if not self.prerelease:
            pre: tuple[Any, ...] = (1,)  # a release ranks above any of its pre-releases
        else:
            pre = (0, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease))
        return (self.major, self.minor, self.patch, pre)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text


def parse_version(text: str) -> Version:
    match = _SEMVER.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidVersion(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])")
    major, minor, patch, pre, build = match.groups()
    return Version(
        int(major),
        int(minor),
        int(patch),
        tuple(pre.split(".")) if pre else (),
        tuple(build.split(".")) if build else (),
    )


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` has lower, equal or higher semver precedence than ``b``."""
    ka, kb = parse_version(a).key(), parse_version(b).key()
    return (ka > kb) - (ka < kb)


def decide_offer(
    current_version: str,
    current_hardware: str,
    target_version: str,
    target_hardware: list[str],
    rollback_allowed: bool,
    previously_ran: set[str],
) -> tuple[bool, str | None]:
    """Accept an offer or give a one-line reason. ``current_version == ""`` means no model installed yet.

    Accepts when the hardware matches (an empty list matches any) and the target is newer than what runs, or when it
    is an explicit signed rollback (``rollback_allowed``) to a version this device ran before.
    """
    if target_hardware and current_hardware not in target_hardware:
        return False, f"hardware {current_hardware} not in [{', '.join(target_hardware)}]"
    try:
        target = parse_version(target_version)
    except InvalidVersion:
        return False, f"target version {target_version!r} is not a semantic version"
    if not current_version:
        return True, None
    try:
        current = parse_version(current_version)
    except InvalidVersion:
        return False, f"current version {current_version!r} is not a semantic version"
    if target.key() == current.key():
        return False, f"already running {current_version}"
    if target.key() > current.key():
        return True, None
    if not rollback_allowed:
        return False, f"downgrade from {current_version} to {target_version} refused"
    if any(_same_version(v, target) for v in previously_ran):
        return True, None
    return False, f"rollback to {target_version} refused: never ran on this device"


def _same_version(text: str, version: Version) -> bool:
    try:
        return parse_version(text).key() == version.key()
    except InvalidVersion:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Serialization (pure: dict <-> state; the store does the I/O)

_ADAPTER: TypeAdapter[UpdateState] = TypeAdapter(UpdateState)


def state_to_dict(state: UpdateState) -> dict[str, Any]:
    return _ADAPTER.dump_python(state, mode="json")


def state_from_dict(data: Any) -> UpdateState:
    """Rebuild a state from ``state_to_dict`` output; raises ``ValueError`` (pydantic's) on anything invalid."""
    return _ADAPTER.validate_python(data, strict=False)
