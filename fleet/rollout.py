"""Staged rollout engine: a pure state machine (no I/O, no clock reads; time arrives as ``now`` in events).

``step(rollout, event) -> (new_rollout, actions)``; the shell (fleet server) feeds it device update states,
presence and ticks, executes the returned actions and persists ``to_dict(rollout)`` after every step.

Statuses: ``created`` -Start-> ``running`` <-Pause/Resume-> ``paused``; either ends in ``aborted`` (Abort, or
the failure threshold) or ``completed``. Rollouts, records and actions are immutable values (treat the
``records`` mapping as read-only); an event that changes nothing returns the very same rollout.

Decisions (AWS IoT Jobs rollout controls and hawkBit group thresholds are the models):

* Waves are fixed slices of the ordered device list: the canary (``canary`` devices or ``canary_percent`` of
  the fleet, rounded up, at least 1), then each wave ``ceil(previous * wave_factor)`` devices; the last wave
  takes what is left (100 devices, canary 1, factor 2: 1, 2, 4, 8, 16, 32, 37). Operators put their
  canary devices first.
* When a wave starts, its online devices are sent the deployment (``SendDeploy``). Offline ones are
  ``skipped``: they do not hold the wave, stay unsent, and are sent (catch-up, tagged with their own wave)
  as soon as they come online while the rollout runs (not while paused: on resume; never after it
  finished). The device timeout runs from the moment a device was sent the command.
* A device already running the target (``AlreadyRunning``: the version it reports in its status, or its
  ``rejected`` state with the reason ``already running ...``) is done: ``succeeded`` with the reason
  ``already running``, never sent the deployment when known before its wave, never a failure.
* A device's outcome: ``succeeded`` (``committed``), ``failed`` (``rejected``, ``rolled_back``, ``failed``,
  or a failed ``HealthSample`` after commit when ``policy.health_regression``) or ``timed_out`` (no final
  state within ``device_timeout_s`` of being sent). Failures and timeouts both count as failures.
* Failure rate = failures / devices with an outcome, checked on every outcome, once at least
  ``min(min_terminal, canary size)`` devices have one. Above ``max_failure_rate``: abort at once.
* The next wave starts when no sent device (of any wave, catch-ups included) is still in flight, the
  failure rate was evaluated (never widen before ``min_terminal`` results: an all-offline canary waits),
  and ``bake_s`` has passed since that moment. After the last wave the rollout is ``completed`` at once
  when every device was reached; while some are still offline it stays open for them until
  ``offline_grace_s`` more has passed with nothing in flight. ``RolloutFinished`` lists the failed and the
  never-reached devices.
* ``Abort`` (operator or threshold) sends nothing more: devices not yet sent stay untouched, and every
  device sent but not final gets ``CancelDeploy``: the shell withdraws its retained deployment command so a
  device that has not picked it up never will; one already working on it finishes or rolls back under its
  own update state machine (no remote kill mid-activation). Reverting committed devices is an explicit
  operator step: ``rollback_plan``.
* Device states are ranked (offered < downloading < downloaded < validating < shadow < activating < trial
  < final); a state not above the last one seen (duplicate, reordered) is ignored, as is anything after a
  final state and any state from a device outside the rollout or not sent yet. A late report from a timed-out
  device only updates what it is known to run (``device_state``, used by ``rollback_plan``); its outcome
  stays. Device states keep being recorded after an abort (bookkeeping, no actions); everything else is
  ignored once the rollout finished.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from functools import cached_property, lru_cache
from typing import Any

FORMAT_VERSION = 1

#: Progress rank of the device-side update states (``agent.protocol.update.UPDATE_STATES``).
DEVICE_STATE_RANK: dict[str, int] = {
    "offered": 0,
    "downloading": 1,
    "downloaded": 2,
    "validating": 3,
    "shadow": 4,
    "activating": 5,
    "trial": 6,
    "committed": 7,
    "rejected": 7,
    "rolled_back": 7,
    "failed": 7,
}
DEVICE_SUCCESS = frozenset({"committed"})
DEVICE_FAILURE = frozenset({"rejected", "rolled_back", "failed"})
DEVICE_FINAL = DEVICE_SUCCESS | DEVICE_FAILURE

# Per-device record states.
PENDING = "pending"  # its wave has not started
SKIPPED = "skipped"  # its wave started while it was offline; sent when it comes online
SENT = "sent"  # deployment sent, no state reported yet
IN_PROGRESS = "in_progress"  # reported a non-final state
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
RECORD_STATES = (PENDING, SKIPPED, SENT, IN_PROGRESS, SUCCEEDED, FAILED, TIMED_OUT)
IN_FLIGHT = frozenset({SENT, IN_PROGRESS})
OUTCOMES = frozenset({SUCCEEDED, FAILED, TIMED_OUT})
FAILURES = frozenset({FAILED, TIMED_OUT})
UNSENT = frozenset({PENDING, SKIPPED})
ALREADY_RUNNING = "already running"  # reason of a device that runs the target already (done, not a failure)

# Rollout statuses.
CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
ABORTED = "aborted"
COMPLETED = "completed"
STATUSES = (CREATED, RUNNING, PAUSED, ABORTED, COMPLETED)
FINISHED = frozenset({ABORTED, COMPLETED})


def _bad(name: str, got: Any, fix: str) -> ValueError:
    return ValueError(f"RolloutPolicy.{name} {fix} (got {got!r})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _finite_now(now: Any, what: str) -> None:
    if not _is_real(now):
        raise ValueError(f"{what}.now must be a finite number of seconds (got {now!r})")


# ---- policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout widens and when it stops; validated on construction (ValueError naming field and fix)."""

    canary: int | None = None  # canary devices (default 1 when canary_percent is not given either)
    canary_percent: float | None = None  # 0 < p <= 100 of the fleet, rounded up, at least 1 device
    wave_factor: float = 2.0  # each wave is ceil(previous wave size * factor)
    max_failure_rate: float = 0.1  # abort when failures / outcomes exceeds this (0..1)
    min_terminal: int = 3  # outcomes needed before the rate is evaluated (capped at the canary size)
    device_timeout_s: float = 3600.0  # sent device without a final state after this long: timed out
    bake_s: float = 0.0  # wait this long after a wave settled before starting the next (or completing)
    offline_grace_s: float = 86_400.0  # after the last wave: how long to keep waiting for offline devices
    health_regression: bool = True  # HealthSample(ok=False) from a committed device counts as a failure

    def __post_init__(self) -> None:
        if self.canary is not None and self.canary_percent is not None:
            raise _bad("canary", self.canary, "and canary_percent are exclusive: give one of them")
        if self.canary is not None and (not _is_int(self.canary) or self.canary < 1):
            raise _bad("canary", self.canary, "must be a whole number of devices >= 1: use e.g. canary=1")
        if self.canary_percent is not None:
            if not _is_real(self.canary_percent) or not 0 < self.canary_percent <= 100:
                raise _bad("canary_percent", self.canary_percent, "must be > 0 and <= 100: use e.g. 5 for 5%")
            object.__setattr__(self, "canary_percent", float(self.canary_percent))
        if not _is_real(self.wave_factor) or self.wave_factor <= 1:
            raise _bad("wave_factor", self.wave_factor, "must be a number > 1: use e.g. 2.0 to double each wave")
        if not _is_real(self.max_failure_rate) or not 0 <= self.max_failure_rate <= 1:
            raise _bad("max_failure_rate", self.max_failure_rate, "must be between 0 and 1: use e.g. 0.1 for 10%")
        if not _is_int(self.min_terminal) or self.min_terminal < 1:
            raise _bad("min_terminal", self.min_terminal, "must be a whole number >= 1: use e.g. 3")
        if not _is_real(self.device_timeout_s) or self.device_timeout_s <= 0:
            raise _bad("device_timeout_s", self.device_timeout_s, "must be a number of seconds > 0: use e.g. 3600")
        if not _is_real(self.bake_s) or self.bake_s < 0:
            raise _bad("bake_s", self.bake_s, "must be a number of seconds >= 0: use 0 to start waves at once")
        if not _is_real(self.offline_grace_s) or self.offline_grace_s < 0:
            raise _bad("offline_grace_s", self.offline_grace_s, "must be a number of seconds >= 0: use e.g. 86400")
        if not isinstance(self.health_regression, bool):
            raise _bad("health_regression", self.health_regression, "must be true or false")
        for name in ("wave_factor", "max_failure_rate", "device_timeout_s", "bake_s", "offline_grace_s"):
            object.__setattr__(self, name, float(getattr(self, name)))


def canary_size(policy: RolloutPolicy, n: int) -> int:
    """Devices in the canary wave of an ``n``-device rollout."""
    if n <= 0:
        return 0
    if policy.canary_percent is not None:
        size = math.ceil(Decimal(repr(policy.canary_percent)) * n / 100)
    else:
        size = policy.canary if policy.canary is not None else 1
    return max(1, min(n, size))


@lru_cache(maxsize=256)
def wave_sizes(policy: RolloutPolicy, n: int) -> tuple[int, ...]:
    """Sizes of the waves of an ``n``-device rollout (they sum to ``n``)."""
    factor = Decimal(repr(policy.wave_factor))  # decimal, so 10 * 1.1 is 11, not 12
    sizes: list[int] = []
    size, left = canary_size(policy, n), n
    while left > 0:
        sizes.append(min(size, left))
        left -= sizes[-1]
        size = math.ceil(factor * size)
    return tuple(sizes)


def _wave_bounds(policy: RolloutPolicy, n: int, wave: int) -> tuple[int, int]:
    sizes = wave_sizes(policy, n)
    start = sum(sizes[:wave])
    return start, start + sizes[wave]


def min_outcomes(policy: RolloutPolicy, n: int) -> int:
    """Outcomes needed before the failure rate is evaluated: ``min_terminal``, at most the canary size."""
    return min(policy.min_terminal, canary_size(policy, n))


# ---- state -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecord:
    """What the rollout knows of one device."""

    state: str = PENDING  # one of RECORD_STATES
    device_state: str | None = None  # last accepted device-side update state
    reason: str | None = None
    sent_at: float | None = None
    wave: int | None = None  # set when its wave starts


@dataclass(frozen=True)
class Rollout:
    """One rollout of ``target`` to ``devices`` (in rollout order). Build with ``new_rollout``; change with ``step``."""

    id: str
    target: str
    policy: RolloutPolicy
    devices: tuple[str, ...]
    records: Mapping[str, DeviceRecord]
    online: frozenset[str]
    status: str = CREATED
    reason: str | None = None  # why it was aborted
    wave: int = -1  # current wave index (-1 before Start)
    started_at: float | None = None
    settled_at: float | None = None  # when the current wave settled (bake_s counts from here)

    @cached_property
    def counts(self) -> Mapping[str, int]:
        """Devices per record state (every state present)."""
        counts = dict.fromkeys(RECORD_STATES, 0)
        for record in self.records.values():
            counts[record.state] += 1
        return counts

    @property
    def waves(self) -> tuple[int, ...]:
        return wave_sizes(self.policy, len(self.devices))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def outcomes(self) -> int:
        """Devices with an outcome (succeeded, failed or timed out)."""
        return sum(self.counts[s] for s in OUTCOMES)

    @property
    def failures(self) -> int:
        return sum(self.counts[s] for s in FAILURES)

    @property
    def in_flight(self) -> int:
        return sum(self.counts[s] for s in IN_FLIGHT)

    @property
    def failure_rate(self) -> float | None:
        """Failures / outcomes; None before any outcome."""
        return self.failures / self.outcomes if self.outcomes else None

    def devices_in(self, *states: str) -> list[str]:
        """Devices whose record is in one of ``states``, in rollout order."""
        return [d for d in self.devices if self.records[d].state in states]


def new_rollout(
    rollout_id: str, target: str, devices: Iterable[str], policy: RolloutPolicy, online: Iterable[str] | None = None
) -> Rollout:
    """A rollout that has not started; ``online`` (default: every device) is the presence the shell knows."""
    ids = tuple(devices)
    if not isinstance(rollout_id, str) or not rollout_id:
        raise ValueError(f"rollout id must be a non-empty string (got {rollout_id!r})")
    if not isinstance(target, str) or not target:
        raise ValueError(f"rollout target must be a non-empty string (got {target!r})")
    if not isinstance(policy, RolloutPolicy):
        raise ValueError(f"rollout policy must be a RolloutPolicy (got {type(policy).__name__})")
    if not ids:
        raise ValueError("rollout devices must not be empty: name at least one device")
    bad = next((d for d in ids if not isinstance(d, str) or not d), None)
    if bad is not None:
        raise ValueError(f"rollout devices must be non-empty strings (got {bad!r})")
    if len(set(ids)) != len(ids):
        dup = next(d for i, d in enumerate(ids) if d in ids[:i])
        raise ValueError(f"rollout devices must be unique: {dup!r} is listed twice")
    members = set(ids)
    present = members if online is None else members & set(online)
    return Rollout(rollout_id, target, policy, ids, dict.fromkeys(ids, DeviceRecord()), frozenset(present))


# ---- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "Start")


@dataclass(frozen=True)
class DeviceState:
    """A device-side update state for this rollout's deployment (from ``update/status``)."""

    device: str
    state: str
    now: float
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.state not in DEVICE_STATE_RANK:
            raise ValueError(f"DeviceState.state must be one of {', '.join(DEVICE_STATE_RANK)} (got {self.state!r})")
        _finite_now(self.now, "DeviceState")


@dataclass(frozen=True)
class AlreadyRunning:
    """The device reports (status ``models``) that it runs the rollout's target already: it is done."""

    device: str
    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "AlreadyRunning")


@dataclass(frozen=True)
class HealthSample:
    """A health verdict for a device (``ok=False`` after commit is a failure when ``policy.health_regression``)."""

    device: str
    ok: bool
    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "HealthSample")


@dataclass(frozen=True)
class DeviceOnline:
    device: str
    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "DeviceOnline")


@dataclass(frozen=True)
class DeviceOffline:
    device: str
    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "DeviceOffline")


@dataclass(frozen=True)
class Tick:
    """Time passes: timeouts, bake time, next wave."""

    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "Tick")


@dataclass(frozen=True)
class Pause:
    reason: str = ""


@dataclass(frozen=True)
class Resume:
    now: float

    def __post_init__(self) -> None:
        _finite_now(self.now, "Resume")


@dataclass(frozen=True)
class Abort:
    reason: str = "aborted by operator"


Event = (
    Start | DeviceState | AlreadyRunning | HealthSample | DeviceOnline | DeviceOffline | Tick | Pause | Resume | Abort
)


# ---- actions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendDeploy:
    """Sign and publish (retained) the deployment command for ``device``."""

    device: str
    wave: int


@dataclass(frozen=True)
class CancelDeploy:
    """Withdraw ``device``'s retained deployment command (it was sent, has no final state, the rollout aborted)."""

    device: str


@dataclass(frozen=True)
class Notify:
    """Tell the operator (console, dashboard, webhook)."""

    message: str


@dataclass(frozen=True)
class Audit:
    """Append to the audit log; ``detail`` is JSON-safe."""

    kind: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutFinished:
    """The rollout ended: ``status`` is ``completed`` or ``aborted``."""

    status: str
    failed: tuple[str, ...] = ()  # failed or timed out
    unreached: tuple[str, ...] = ()  # never sent (offline, or untouched by an abort)


Action = SendDeploy | CancelDeploy | Notify | Audit | RolloutFinished


# ---- the machine -----------------------------------------------------------------------------------


class _Run:
    """Working copy of a rollout for one step (copy-on-write records and presence)."""

    def __init__(self, rollout: Rollout) -> None:
        self.old = rollout
        self.policy = rollout.policy
        self.n = len(rollout.devices)
        self.records: dict[str, DeviceRecord] | None = None
        self.online: set[str] | None = None
        self.counts = dict(rollout.counts)
        self.status = rollout.status
        self.reason = rollout.reason
        self.wave = rollout.wave
        self.started_at = rollout.started_at
        self.settled_at = rollout.settled_at
        self.actions: list[Action] = []

    # -- bookkeeping

    def rec(self, device: str) -> DeviceRecord | None:
        return (self.old.records if self.records is None else self.records).get(device)

    def set_rec(self, device: str, **changes: Any) -> None:
        if self.records is None:
            self.records = dict(self.old.records)
        old = self.records[device]
        new = replace(old, **changes)
        self.records[device] = new
        self.counts[old.state] -= 1
        self.counts[new.state] += 1

    def is_online(self, device: str) -> bool:
        return device in (self.old.online if self.online is None else self.online)

    def set_online(self, device: str, online: bool) -> None:
        if self.is_online(device) == online:
            return
        if self.online is None:
            self.online = set(self.old.online)
        (self.online.add if online else self.online.discard)(device)

    def count(self, states: frozenset[str]) -> int:
        return sum(self.counts[s] for s in states)

    def audit(self, kind: str, **detail: Any) -> None:
        self.actions.append(Audit(kind, {"rollout": self.old.id, **detail}))

    def result(self) -> Rollout:
        changes = {
            name: value
            for name, value in (
                ("status", self.status),
                ("reason", self.reason),
                ("wave", self.wave),
                ("started_at", self.started_at),
                ("settled_at", self.settled_at),
            )
            if getattr(self.old, name) != value
        }
        if self.records is not None:
            changes["records"] = self.records
        if self.online is not None:
            changes["online"] = frozenset(self.online)
        if not changes:
            return self.old
        new = replace(self.old, **changes)
        new.__dict__["counts"] = self.counts  # kept up to date by set_rec: no recount
        return new

    def devices(self, states: frozenset[str]) -> tuple[str, ...]:
        return tuple(d for d in self.old.devices if self.rec(d).state in states)  # type: ignore[union-attr]

    # -- transitions

    def send(self, device: str, wave: int, now: float) -> None:
        self.set_rec(device, state=SENT, sent_at=now, wave=wave)
        self.actions.append(SendDeploy(device, wave))

    def start_wave(self, wave: int, now: float) -> None:
        self.wave, self.settled_at = wave, None
        start, end = _wave_bounds(self.policy, self.n, wave)
        members = self.old.devices[start:end]
        done = [d for d in members if self.rec(d).state in OUTCOMES]  # type: ignore[union-attr]
        skipped = [d for d in members if not self.is_online(d) and d not in done]
        sent = len(members) - len(skipped) - len(done)
        self.audit("wave_started", wave=wave, size=len(members), sent=sent, skipped=skipped)
        for device in members:
            if device in done:
                self.set_rec(device, wave=wave)
            elif self.is_online(device):
                self.send(device, wave, now)
            else:
                self.set_rec(device, state=SKIPPED, wave=wave)

    def catch_up(self, device: str, now: float) -> None:
        record = self.rec(device)
        if self.status == RUNNING and record is not None and record.state == SKIPPED and self.is_online(device):
            assert record.wave is not None
            self.send(device, record.wave, now)
            self.settled_at = None
            self.audit("catch_up", device=device, wave=record.wave)

    def check_threshold(self) -> None:
        if self.status not in (RUNNING, PAUSED):
            return
        outcomes, failures = self.count(OUTCOMES), self.count(FAILURES)
        if outcomes >= min_outcomes(self.policy, self.n) and failures / outcomes > self.policy.max_failure_rate:
            self.abort(
                f"failure rate {failures}/{outcomes} ({failures / outcomes:.0%}) exceeds "
                f"max_failure_rate {self.policy.max_failure_rate:g}"
            )

    def advance(self, now: float) -> None:
        """Start waves (or complete) while the current one is settled, evaluated and baked."""
        while self.status == RUNNING:
            if self.wave < 0:
                self.start_wave(0, now)
                continue
            if self.count(IN_FLIGHT) or self.count(OUTCOMES) < min_outcomes(self.policy, self.n):
                self.settled_at = None
                return
            if self.settled_at is None:
                self.settled_at = now
            if now - self.settled_at < self.policy.bake_s:
                return
            if self.wave + 1 >= len(wave_sizes(self.policy, self.n)):
                if self.counts[SKIPPED] and now - self.settled_at < self.policy.bake_s + self.policy.offline_grace_s:
                    return  # keep catching up offline devices a while
                self.finish(COMPLETED)
                return
            self.start_wave(self.wave + 1, now)

    def abort(self, reason: str) -> None:
        cancelled = self.devices(IN_FLIGHT)
        self.actions.extend(CancelDeploy(d) for d in cancelled)
        self.reason = reason
        self.finish(ABORTED, cancelled=list(cancelled))

    def finish(self, status: str, **detail: Any) -> None:
        self.status, self.settled_at = status, None
        failed, unreached = self.devices(FAILURES), self.devices(UNSENT)
        succeeded = self.counts[SUCCEEDED]
        self.audit(
            status,
            reason=self.reason,
            succeeded=succeeded,
            failed=list(failed),
            unreached=list(unreached),
            **detail,
        )
        what = f"rollout {self.old.id} of {self.old.target} {status}"
        if status == ABORTED:
            what += f": {self.reason}"
        self.actions.append(
            Notify(f"{what} ({succeeded} succeeded, {len(failed)} failed, {len(unreached)} not reached)")
        )
        self.actions.append(RolloutFinished(status, failed, unreached))


def _on_start(run: _Run, event: Start) -> None:
    if run.status != CREATED:
        return
    run.status, run.started_at = RUNNING, event.now
    run.audit("started", target=run.old.target, devices=run.n, waves=list(wave_sizes(run.policy, run.n)))
    run.advance(event.now)


def _on_device_state(run: _Run, event: DeviceState) -> None:
    record = run.rec(event.device)
    if record is None or record.state in UNSENT:
        return
    last = record.device_state
    if last is not None and (last in DEVICE_FINAL or DEVICE_STATE_RANK[event.state] <= DEVICE_STATE_RANK[last]):
        return  # duplicate, reordered, or after a final state
    if record.state not in IN_FLIGHT:  # late report after the outcome was settled (timed out)
        run.set_rec(event.device, device_state=event.state)
        return
    if event.state in DEVICE_SUCCESS or already_running(event.state, event.reason):
        outcome = SUCCEEDED
    elif event.state in DEVICE_FAILURE:
        outcome = FAILED
    else:
        outcome = IN_PROGRESS
    run.set_rec(event.device, state=outcome, device_state=event.state, reason=event.reason)
    if run.status in FINISHED or outcome == IN_PROGRESS:
        return
    if outcome == FAILED:
        run.audit("device_failed", device=event.device, state=event.state, reason=event.reason)
    run.check_threshold()
    run.advance(event.now)


def already_running(state: str, reason: str | None) -> bool:
    """Whether a device state says the device runs the offered version already (the agent's refusal reason)."""
    return state == "rejected" and (reason or "").startswith(ALREADY_RUNNING)


def _on_already_running(run: _Run, event: AlreadyRunning) -> None:
    record = run.rec(event.device)
    if record is None or record.state in OUTCOMES or run.status in FINISHED:
        return
    run.set_rec(event.device, state=SUCCEEDED, reason=ALREADY_RUNNING, sent_at=event.now)  # settled, nothing sent
    run.audit("device_already_running", device=event.device)
    if run.status in (RUNNING, PAUSED):
        run.check_threshold()
        run.advance(event.now)


def _on_health(run: _Run, event: HealthSample) -> None:
    record = run.rec(event.device)
    if (
        event.ok
        or not run.policy.health_regression
        or run.status not in (RUNNING, PAUSED)
        or record is None
        or record.state != SUCCEEDED
    ):
        return
    run.set_rec(event.device, state=FAILED, reason="health check failed after commit")
    run.audit("device_unhealthy", device=event.device)
    run.check_threshold()


def _on_online(run: _Run, event: DeviceOnline) -> None:
    if run.rec(event.device) is None or run.status in FINISHED:
        return
    run.set_online(event.device, True)
    run.catch_up(event.device, event.now)


def _on_offline(run: _Run, event: DeviceOffline) -> None:
    if run.rec(event.device) is not None and run.status not in FINISHED:
        run.set_online(event.device, False)


def _on_tick(run: _Run, event: Tick) -> None:
    if run.status not in (RUNNING, PAUSED):
        return
    timeout = run.policy.device_timeout_s
    for device in run.devices(IN_FLIGHT):
        record = run.rec(device)
        assert record is not None and record.sent_at is not None
        if event.now - record.sent_at >= timeout:
            run.set_rec(device, state=TIMED_OUT, reason=f"no final state within {timeout:g}s of being sent")
            run.audit("device_timed_out", device=device, last_state=record.device_state)
    run.check_threshold()
    run.advance(event.now)


def _on_pause(run: _Run, event: Pause) -> None:
    if run.status == RUNNING:
        run.status = PAUSED
        run.audit("paused", reason=event.reason)


def _on_resume(run: _Run, event: Resume) -> None:
    if run.status != PAUSED:
        return
    run.status = RUNNING
    run.audit("resumed")
    for device in run.devices(frozenset({SKIPPED})):
        run.catch_up(device, event.now)
    run.advance(event.now)


def _on_abort(run: _Run, event: Abort) -> None:
    if run.status not in FINISHED:
        run.abort(event.reason or "aborted by operator")


_HANDLERS: dict[type, Any] = {
    Start: _on_start,
    DeviceState: _on_device_state,
    AlreadyRunning: _on_already_running,
    HealthSample: _on_health,
    DeviceOnline: _on_online,
    DeviceOffline: _on_offline,
    Tick: _on_tick,
    Pause: _on_pause,
    Resume: _on_resume,
    Abort: _on_abort,
}


def step(rollout: Rollout, event: Event) -> tuple[Rollout, list[Action]]:
    """Apply one event; returns the new rollout (the same object when nothing changed) and the actions to run."""
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"step() takes a rollout event, not {type(event).__name__}")
    run = _Run(rollout)
    handler(run, event)
    return run.result(), run.actions


def health_window_shortfall(
    window_s: float, min_results: int, rates: Mapping[str, float | None]
) -> tuple[str, str] | None:
    """(problem, fix) when a health window of ``window_s`` seconds gives some device fewer than ``min_results``
    results at the result rate it reports (results/s), else None. A device without a rate (no telemetry yet) or with
    none above 0 (its first telemetry comes before its first results) is not judged. The problem shows the arithmetic
    for the slowest such device; the fix is the window that is long enough for every device."""
    if min_results <= 0:
        return None
    short = sorted(
        (fps, device) for device, fps in rates.items() if fps is not None and fps > 0 and window_s * fps < min_results
    )
    if not short:
        return None
    fps, device = short[0]
    more = f" (and {len(short) - 1} more device(s))" if len(short) > 1 else ""
    needed = math.ceil(min_results / fps - 1e-9)
    return (
        f"health window {window_s:g} s x {fps:.1f} results/s on {device} = {window_s * fps:.0f} results, fewer than "
        f"the {min_results} needed{more}",
        f"--health-window {needed} or more",
    )


def rollback_plan(rollout: Rollout) -> list[str]:
    """Devices that reported ``committed`` (what they actually run), in rollout order: the ``fleet rollback`` set."""
    return [d for d in rollout.devices if rollout.records[d].device_state in DEVICE_SUCCESS]


def summary(rollout: Rollout) -> dict[str, Any]:
    """Counts and progress for the console (JSON-safe)."""
    return {
        "id": rollout.id,
        "target": rollout.target,
        "status": rollout.status,
        "reason": rollout.reason,
        "wave": rollout.wave,
        "waves": list(rollout.waves),
        "devices": len(rollout.devices),
        **{state: rollout.counts[state] for state in RECORD_STATES},
        "failure_rate": rollout.failure_rate,
    }


# ---- persistence -----------------------------------------------------------------------------------


def to_dict(rollout: Rollout) -> dict[str, Any]:
    """JSON-safe state; ``from_dict(to_dict(r)) == r``."""
    return {
        "v": FORMAT_VERSION,
        "id": rollout.id,
        "target": rollout.target,
        "policy": {f.name: getattr(rollout.policy, f.name) for f in fields(RolloutPolicy)},
        "devices": list(rollout.devices),
        "records": {
            d: {f.name: getattr(rollout.records[d], f.name) for f in fields(DeviceRecord)} for d in rollout.devices
        },
        "online": [d for d in rollout.devices if d in rollout.online],
        "status": rollout.status,
        "reason": rollout.reason,
        "wave": rollout.wave,
        "started_at": rollout.started_at,
        "settled_at": rollout.settled_at,
    }


def _record_from(device: str, data: Any) -> DeviceRecord:
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(DeviceRecord)}:
        raise ValueError(f"rollout state: record of {device!r} is not a device record")
    record = DeviceRecord(**data)
    if record.state not in RECORD_STATES:
        raise ValueError(f"rollout state: record of {device!r} has unknown state {record.state!r}")
    if record.device_state is not None and record.device_state not in DEVICE_STATE_RANK:
        raise ValueError(f"rollout state: record of {device!r} has unknown device state {record.device_state!r}")
    if record.state not in UNSENT and record.sent_at is None:
        raise ValueError(f"rollout state: record of {device!r} is {record.state} but has no sent_at")
    return record


def from_dict(data: Mapping[str, Any]) -> Rollout:
    """Rebuild a rollout saved by ``to_dict`` (ValueError when it is not one)."""
    if not isinstance(data, Mapping) or data.get("v") != FORMAT_VERSION:
        raise ValueError(f"rollout state: expected format version {FORMAT_VERSION}")
    try:
        policy_data = data["policy"]
        if not isinstance(policy_data, Mapping):
            raise ValueError("rollout state: policy is not an object")
        rollout = new_rollout(data["id"], data["target"], data["devices"], RolloutPolicy(**policy_data), data["online"])
        records_data = data["records"]
        if not isinstance(records_data, Mapping) or set(records_data) != set(rollout.devices):
            raise ValueError("rollout state: records do not match the devices")
        records = {d: _record_from(d, records_data[d]) for d in rollout.devices}
        status, wave = data["status"], data["wave"]
        if status not in STATUSES:
            raise ValueError(f"rollout state: unknown status {status!r}")
        if not _is_int(wave) or not -1 <= wave < len(rollout.waves):
            raise ValueError(f"rollout state: wave {wave!r} is out of range")
        return replace(
            rollout,
            records=records,
            status=status,
            reason=data["reason"],
            wave=wave,
            started_at=data["started_at"],
            settled_at=data["settled_at"],
        )
    except KeyError as exc:
        raise ValueError(f"rollout state: missing field {exc.args[0]!r}") from None
    except TypeError as exc:
        raise ValueError(f"rollout state: {exc}") from None
