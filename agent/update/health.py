"""The post-activation health window (pure: no I/O, no clock; times are passed in).

After a hot swap the new model runs on live input for ``window_s`` seconds. Every prediction or error is
``observe``d; ``verdict(now)`` says: keep watching (``ok=None``), roll back (``ok=False``) or commit (``ok=True``).

* Fails at once (no need to wait for the window end) when the non-finite count is over ``max_nonfinite`` or,
  once at least ``min_results`` predictions/errors arrived, the error rate is over ``max_error_rate``.
* At the window end: fails when fewer than ``min_results`` results arrived (a model that stalls the pipeline must
  not be committed), when the p95 latency is over the bundle's budget, or when it is *slower than the previous
  model*: over ``latency_factor`` times the previous model's p95 **and** more than ``latency_floor_ms`` above it.
  The floor keeps scheduling noise from rolling back a model as fast as the old one on a busy CPU: a sub-millisecond
  model preempted by another process for one time slice (a few ms on Linux) doubles its p95 without being slower.
* A latency failure against the previous model is only *suspected* (``HealthVerdict.retime``): the baseline was
  measured before the swap, maybe under another load. The shell then times both models again, interleaved, on the
  same recent input under the load of the moment (``confirm_latency``), and that paired measurement decides, on the
  medians: a run preempted by another process lands in the tail of either model, the median is the model's own cost.

Limits are inclusive: a value exactly at its limit passes. A failure is final (later observations do not undo it),
and observations at or after the window end are ignored, so the final verdict is stable.

``resolve_policy`` merges the settings (deployment over pipeline over ``[update]``); ``window_shortfall`` says when
a window cannot collect ``min_results`` at a pipeline's result rate (the deployment is refused up front).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

_EPS = 1e-9  # relative float slack: a value exactly at its limit (up to rounding) passes
#: Default absolute floor of the latency rule (ms): a model is "slower" only when its p95 is also this much above the
#: previous model's. Linux's CFS gives a runnable task a slice of about 3-6 ms on a busy core (sched_latency 6 ms,
#: min granularity 0.75-3 ms); an inference preempted once waits that long. Below a few ms a p95 difference on a
#: shared CPU says more about the load than about the model.
DEFAULT_LATENCY_FLOOR_MS = 5.0
#: Paired re-timing (``confirm_latency``): pairs of runs, and at most this long (the new model keeps serving).
RETIME_PAIRS = 100
RETIME_MAX_S = 5.0


def _over(value: float, limit: float) -> bool:
    return value > limit + _EPS * max(1.0, abs(limit))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1.0 else f"{value:.3f}"


def median_of(values: list[float]) -> float | None:
    """The median of ``values`` (None when empty)."""
    return float(np.median(values)) if values else None


def p95_of(values: list[float]) -> float | None:
    """The p95 of ``values`` (None when empty), with linear interpolation, as ``agent.benchmark.percentiles``."""
    return float(np.percentile(values, 95)) if values else None


def baseline_p95(recent_ms: list[float], processed: int, swapped_at: int) -> float | None:
    """The running model's p95 (ms), the baseline of the next health window: over the pipeline's ``recent_ms``
    inference times (oldest first, the last ones of ``processed`` results), only those after the model was swapped
    in at ``swapped_at`` processed results (earlier ones are another model's). ``processed < swapped_at``: the
    pipeline was rebuilt since, all are this model's. None when this model has not run yet."""
    since = processed - swapped_at
    if since == 0 and swapped_at:
        return None
    if 0 < since < len(recent_ms):
        recent_ms = recent_ms[-since:]
    value = p95_of(recent_ms)
    return value if value is not None and math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True)
class HealthPolicy:
    """The limits of one health window (persisted with the update: a restart in ``trial`` keeps them)."""

    window_s: float = 60.0
    min_results: int = 20
    max_error_rate: float = 0.05
    max_nonfinite: int = 0
    latency_factor: float = 2.0  # p95 may grow to this times the previous model's p95 ...
    latency_floor_ms: float = DEFAULT_LATENCY_FLOOR_MS  # ... or to this many ms above it, whichever is more

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.min_results < 0 or self.max_nonfinite < 0:
            raise ValueError("min_results and max_nonfinite must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not (self.latency_factor > 0 and math.isfinite(self.latency_factor)):
            raise ValueError(f"latency_factor must be > 0, got {self.latency_factor}")
        if not (self.latency_floor_ms >= 0 and math.isfinite(self.latency_floor_ms)):
            raise ValueError(f"latency_floor_ms must be >= 0, got {self.latency_floor_ms}")

    def latency_limit_ms(self, baseline_ms: float) -> float:
        """The p95 a model may reach given the previous model's: the larger of factor x and floor above."""
        return max(self.latency_factor * baseline_ms, baseline_ms + self.latency_floor_ms)


POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(HealthPolicy))


def resolve_policy(*layers: Mapping[str, Any]) -> HealthPolicy:
    """The policy from settings layers, later ones winning (``[update]``, then the pipeline's, then the
    deployment's); a ``None`` value means "not set here". Raises ``ValueError`` on an unknown key or a bad value."""
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in POLICY_FIELDS:
                raise ValueError(f"unknown health setting {key!r} (known: {', '.join(POLICY_FIELDS)})")
            if value is not None:
                values[key] = value
    return HealthPolicy(**values)


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 1.0 else f"{value:.2g}"


def _rounded_rate(value: float) -> float:
    """A measured rate as it is shown (1.96/s is 2.0/s): the arithmetic in the message adds up."""
    return float(_rate(value))


def window_shortfall(policy: HealthPolicy, rate: float | None) -> str | None:
    """Why a health window of ``policy.window_s`` at ``rate`` results a second cannot collect ``min_results``
    (a deployment that would always be rolled back), with the arithmetic and the fix; None when it can, or when the
    rate is unknown (None or 0: nothing to reason from)."""
    if rate is None or not rate > 0 or not math.isfinite(rate) or policy.min_results == 0:
        return None
    rate = _rounded_rate(rate)
    expected = math.floor(policy.window_s * rate + 1e-6)  # whole results; 8 s x 2.5/s = 20 despite float rounding
    if expected >= policy.min_results:
        return None
    needed_s = math.ceil(policy.min_results / rate * 10 - 1e-6) / 10  # to 0.1 s, rounded up
    return (
        f"health window {policy.window_s:g} s x {_rate(rate)} results/s = {_count(expected, 'result')}, fewer than the "
        f"{policy.min_results} needed (fix: a health window of at least {needed_s:g} s, "
        f"or health_min_results <= {expected})"
    )


@dataclass(frozen=True)
class HealthVerdict:
    """``ok``: None = keep watching, False = roll back (``reason`` says why), True = commit.

    ``retime``: the failure is only the latency against the previous model's baseline; a paired re-timing
    (``HealthWindow.confirm_latency``) may overturn it."""

    ok: bool | None
    reason: str | None = None
    retime: bool = False


WATCHING = HealthVerdict(None)


def _slower(policy: HealthPolicy, p95: float, baseline: float) -> bool:
    return _over(p95, policy.latency_factor * baseline) and _over(p95, baseline + policy.latency_floor_ms)


def _slower_reason(policy: HealthPolicy, value: float, baseline: float, what: str, measure: str = "p95 latency") -> str:
    return (
        f"{measure} {_ms(value)} ms is over {policy.latency_factor:g}x {what} of {_ms(baseline)} ms "
        f"({_ms(policy.latency_factor * baseline)} ms) and more than {policy.latency_floor_ms:g} ms above it"
    )


@dataclass
class HealthWindow:
    """Counts of one health window; ``baseline_p95_ms`` is the previous model's p95, ``budget_ms`` the bundle's."""

    policy: HealthPolicy
    started_at: float
    baseline_p95_ms: float | None = None
    budget_ms: float | None = None
    results: int = field(default=0, init=False)  # successful predictions
    errors: int = field(default=0, init=False)
    nonfinite: int = field(default=0, init=False)  # predictions with NaN/Inf outputs
    latencies_ms: list[float] = field(default_factory=list, init=False, repr=False)
    _failure: HealthVerdict | None = field(default=None, init=False, repr=False)
    _confirmed: HealthVerdict | None = field(default=None, init=False, repr=False)

    @property
    def ends_at(self) -> float:
        return self.started_at + self.policy.window_s

    @property
    def total(self) -> int:
        return self.results + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.total if self.total else 0.0

    @property
    def p95_ms(self) -> float | None:
        """p95 of the observed latencies (linear interpolation, as ``agent.benchmark.percentiles``)."""
        return p95_of(self.latencies_ms)

    def observe(self, now: float, ok: bool, latency_ms: float | None = None, finite: bool = True) -> None:
        """One prediction (``ok``) or error (not ``ok``); ignored at or after the window end."""
        if now >= self.ends_at:
            return
        if ok:
            self.results += 1
            if latency_ms is not None:
                self.latencies_ms.append(float(latency_ms))
        else:
            self.errors += 1
        if not finite:
            self.nonfinite += 1
        if self._failure is None:  # checked per observation: later successes cannot dilute a failure
            self._failure = self._early_failure()

    def verdict(self, now: float) -> HealthVerdict:
        """None = keep watching; False = roll back now; True = commit (only at the window end)."""
        if self._failure is not None:
            return self._failure
        if now < self.ends_at:
            return WATCHING
        if self._confirmed is not None:
            return self._confirmed
        return self._final()

    def confirm_latency(self, new_ms: list[float], previous_ms: list[float]) -> HealthVerdict:
        """The final verdict after a paired re-timing: ``new_ms`` and ``previous_ms`` timed interleaved, on the same
        input, under the same load. Only meaningful when ``verdict`` asked for it (``retime``); the new model is
        rolled back when its median is over the previous one's by the same rule (factor and floor).
        Without usable timings the suspected failure stands. The result is what ``verdict`` says from now on."""
        p = self.policy
        suspected = self._failure or self._final()
        if not suspected.retime:
            return suspected
        new, previous = median_of(new_ms), median_of(previous_ms)
        if new is None or previous is None:
            self._confirmed = HealthVerdict(False, suspected.reason)  # final: no re-timing to ask for any more
        elif _slower(p, new, previous):
            reason = _slower_reason(p, new, previous, "the previous model's median", "median latency")
            self._confirmed = HealthVerdict(
                False,
                f"{reason}, timed side by side on the same input ({len(new_ms)} runs each; "
                f"p95 in the health window {_ms(self.p95_ms or 0.0)} ms)",
            )
        else:
            self._confirmed = HealthVerdict(True)
        return self._confirmed

    def _early_failure(self) -> HealthVerdict | None:
        p = self.policy
        if self.nonfinite > p.max_nonfinite:
            return HealthVerdict(
                False,
                f"non-finite outputs in {_count(self.nonfinite, 'prediction')}, over the limit of {p.max_nonfinite}",
            )
        if self.total and self.total >= p.min_results and _over(self.error_rate, p.max_error_rate):
            return HealthVerdict(
                False,
                f"error rate {self.error_rate:.1%} ({_count(self.errors, 'error')} in {self.total} predictions) "
                f"is over the limit of {p.max_error_rate:.1%}",
            )
        return None

    def _final(self) -> HealthVerdict:
        p = self.policy
        if self.results < p.min_results:
            errors = f", {_count(self.errors, 'error')}" if self.errors else ""
            return HealthVerdict(
                False,
                f"only {self.results} results in the {p.window_s:g} s health window (need {p.min_results}{errors})",
            )
        p95 = self.p95_ms
        if p95 is not None:
            if self.budget_ms is not None and _over(p95, self.budget_ms):
                return HealthVerdict(
                    False, f"p95 latency {_ms(p95)} ms is over the bundle's budget of {self.budget_ms:g} ms"
                )
            if self.baseline_p95_ms is not None and _slower(p, p95, self.baseline_p95_ms):
                reason = _slower_reason(p, p95, self.baseline_p95_ms, "the previous model's p95")
                return HealthVerdict(False, reason, retime=True)
        return HealthVerdict(True)
