"""The post-activation health window (pure: no I/O, no clock; times are passed in).

After a hot swap the new model runs on live input for ``window_s`` seconds. Every prediction or error is
``observe``d; ``verdict(now)`` says: keep watching (``ok=None``), roll back (``ok=False``) or commit (``ok=True``).

* Fails at once (no need to wait for the window end) when the non-finite count is over ``max_nonfinite`` or,
  once at least ``min_results`` predictions/errors arrived, the error rate is over ``max_error_rate``.
* At the window end: fails when fewer than ``min_results`` results arrived (a model that stalls the pipeline must
  not be committed), or when the p95 latency is over the bundle's budget or over ``latency_factor`` times the
  previous model's p95; else passes.

Limits are inclusive: a value exactly at its limit passes. A failure is final (later observations do not undo it),
and observations at or after the window end are ignored, so the final verdict is stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-9  # relative float slack: a value exactly at its limit (up to rounding) passes


def _over(value: float, limit: float) -> bool:
    return value > limit + _EPS * max(1.0, abs(limit))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1.0 else f"{value:.3f}"


@dataclass(frozen=True)
class HealthPolicy:
    window_s: float = 60.0
    min_results: int = 20
    max_error_rate: float = 0.05
    max_nonfinite: int = 0
    latency_factor: float = 2.0  # p95 may grow to this times the previous model's p95

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.min_results < 0 or self.max_nonfinite < 0:
            raise ValueError("min_results and max_nonfinite must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not self.latency_factor > 0:
            raise ValueError(f"latency_factor must be > 0, got {self.latency_factor}")


@dataclass(frozen=True)
class HealthVerdict:
    """``ok``: None = keep watching, False = roll back (``reason`` says why), True = commit."""

    ok: bool | None
    reason: str | None = None


WATCHING = HealthVerdict(None)


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
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

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
        return self._final()

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
            if self.baseline_p95_ms is not None and _over(p95, p.latency_factor * self.baseline_p95_ms):
                return HealthVerdict(
                    False,
                    f"p95 latency {_ms(p95)} ms is over {p.latency_factor:g}x the previous model's p95 "
                    f"of {_ms(self.baseline_p95_ms)} ms ({_ms(p.latency_factor * self.baseline_p95_ms)} ms)",
                )
        return HealthVerdict(True)
