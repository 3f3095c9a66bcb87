"""Pre-activation validation of a candidate model bundle (imperative: loads and runs the model).

``validate_bundle`` runs the checks in order and stops at the first failure:

1. ``load``: the bundle and its model load;
2. ``metadata``: the model's inputs and outputs match bundle.toml (``Predictor`` checks this when built);
   ``compatible``: the candidate takes what the pipeline feeds the running model now (task, input kind, geometry);
3. ``golden``: the golden vectors reproduce within the bundle's tolerance (no golden vectors: passes with a note);
4. ``finite``: no NaN/Inf in any output, on the golden inputs or, without them, on deterministic random inputs;
5. ``latency``: p95 of the predict path after 2 warm-ups is within ``[budget].latency_ms`` when the bundle sets one.

A bad bundle never raises: every failure is ``ok=False`` with a one-line ``reason``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.benchmark import sample_input
from agent.bundle import ImageInput, TimeSeriesInput, load_bundle
from agent.errors import AgentError
from agent.predictor import Predictor
from agent.processing.image import infer_layout
from agent.runtime import TensorInfo, load_model

WARMUP_RUNS = 2
RANDOM_CASES = 3  # random inputs for the finite check when the bundle has no golden vectors


@dataclass
class ValidationReport:
    """The outcome: ``predictor`` is the opened candidate when ``ok`` (the caller owns it), else None."""

    ok: bool
    reason: str | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, ok, detail), in the order run
    p95_ms: float | None = None
    predictor: Predictor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
            "p95_ms": None if self.p95_ms is None else round(self.p95_ms, 3),
        }


class _Failed(Exception):
    """A check failed; the message is the report's reason."""


def validate_bundle(
    path: str | Path,
    *,
    current: Predictor | None,
    threads: int = 1,
    latency_runs: int = 20,
    providers: list[str] | None = None,
    runtime: str | None = None,
    delegates: list[str] | None = None,
    provider_options: dict[str, dict[str, Any]] | None = None,
) -> ValidationReport:
    """Validate the bundle at ``path`` before activation; ``current`` is the running model's predictor, if any."""
    if latency_runs < 1:
        raise ValueError(f"latency_runs must be >= 1, got {latency_runs}")
    report = ValidationReport(ok=False)
    predictor: Predictor | None = None
    try:
        predictor = _open(report, path, runtime, threads, providers, delegates, provider_options)
        _check_compatible(report, predictor, current)
        _check_golden(report, predictor)
        _check_finite(report, predictor)
        _check_latency(report, predictor, latency_runs)
    except _Failed as exc:
        if predictor is not None:
            predictor.close()
        report.reason = str(exc)
        return report
    except BaseException:
        if predictor is not None:
            predictor.close()
        raise
    report.ok, report.predictor = True, predictor
    return report


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _passed(report: ValidationReport, name: str, detail: str) -> None:
    report.checks.append((name, True, _one_line(detail)))


def _fail(report: ValidationReport, name: str, reason: str) -> _Failed:
    reason = _one_line(reason)
    report.checks.append((name, False, reason))
    return _Failed(reason)


# ---- 1 and 2: load, metadata ---------------------------------------------------------------------


def _open(
    report: ValidationReport,
    path: str | Path,
    runtime: str | None,
    threads: int | None,
    providers: list[str] | None,
    delegates: list[str] | None,
    provider_options: dict[str, dict[str, Any]] | None,
) -> Predictor:
    """``Predictor.open`` in its three steps, so that each failure gets its own reason."""
    try:
        bundle = load_bundle(path)
    except AgentError as exc:
        raise _fail(report, "load", f"bundle does not load: {exc}") from None
    try:
        model = load_model(
            bundle.model_path,
            runtime=runtime,
            threads=threads,
            providers=providers,
            delegates=delegates,
            provider_options=provider_options,
        )
    except AgentError as exc:
        bundle.close()
        raise _fail(report, "load", f"model does not load: {exc}") from None
    except BaseException:
        bundle.close()
        raise
    _passed(report, "load", f"{bundle.name} {bundle.version} on {model.info.runtime} {model.info.runtime_version}")
    try:
        predictor = Predictor(bundle, model)
    except AgentError as exc:
        model.close()
        bundle.close()
        raise _fail(report, "metadata", f"model does not match its bundle.toml: {exc}") from None
    except BaseException:
        model.close()
        bundle.close()
        raise
    _passed(report, "metadata", "inputs and outputs match bundle.toml")
    return predictor


def _check_compatible(report: ValidationReport, cand: Predictor, current: Predictor | None) -> None:
    if current is None:
        _passed(report, "compatible", "no running model to compare with")
        return
    problem = incompatibility(cand, current)
    if problem is not None:
        raise _fail(report, "compatible", problem)
    _passed(report, "compatible", f"takes the same {cand.kind} input as the running model")


def incompatibility(cand: Predictor, current: Predictor) -> str | None:
    """Why ``cand`` cannot replace ``current`` in the running pipeline (None: it can)."""
    if cand.bundle.task != current.bundle.task:
        return f"task {cand.bundle.task!r} does not match the running model's {current.bundle.task!r}"
    if cand.kind != current.kind:
        return f"input kind {cand.kind!r} does not match the running model's {current.kind!r}"
    c_spec, r_spec = cand.input_spec, current.input_spec
    if isinstance(c_spec, ImageInput) and isinstance(r_spec, ImageInput):
        c_geo, r_geo = _image_geometry(cand), _image_geometry(current)
        if c_geo != r_geo:
            c_shape, r_shape = tuple(cand.model.inputs[0].shape), tuple(current.model.inputs[0].shape)
            if str(c_shape) != str(r_shape):
                return f"input shape {c_shape} does not match the running model's {r_shape}"
            return f"input size {_geo(c_geo)} does not match the running model's {_geo(r_geo)}"
        return None
    if isinstance(c_spec, TimeSeriesInput) and isinstance(r_spec, TimeSeriesInput):
        if (c_spec.window, c_spec.channels) != (r_spec.window, r_spec.channels):
            return (
                f"input window {c_spec.window} x {c_spec.channels} does not match "
                f"the running model's {r_spec.window} x {r_spec.channels}"
            )
        return None
    c_in, r_in = cand.model.inputs, current.model.inputs
    if len(c_in) != len(r_in):
        return f"the model takes {len(c_in)} input tensors, the running model {len(r_in)}"
    for c, r in zip(c_in, r_in, strict=True):
        if not _same_tensor(c, r):
            return (
                f"input {c.name!r} shape {tuple(c.shape)} {c.dtype} does not match "
                f"the running model's {tuple(r.shape)} {r.dtype}"
            )
    return None


def _image_geometry(p: Predictor) -> tuple[int | str, int | str, int | str]:
    """(width, height, channels) of the model's image input (size from bundle.toml when dynamic)."""
    spec = p.input_spec
    assert isinstance(spec, ImageInput)
    shape = p.model.inputs[0].shape
    layout = spec.layout or infer_layout(shape) or "NHWC"
    h, w, c = (shape[1], shape[2], shape[3]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
    if not (isinstance(w, int) and w > 0 and isinstance(h, int) and h > 0) and spec.size is not None:
        w, h = spec.size
    return w, h, c


def _geo(geo: tuple[int | str, int | str, int | str]) -> str:
    return f"{geo[0]}x{geo[1]} with {geo[2]} channel(s)"


def _same_tensor(a: TensorInfo, b: TensorInfo) -> bool:
    if a.dtype != b.dtype or len(a.shape) != len(b.shape):
        return False
    fixed = lambda d: isinstance(d, int) and d >= 0  # noqa: E731
    return all(x == y for x, y in zip(a.shape, b.shape, strict=True) if fixed(x) and fixed(y))


# ---- 3 to 5: golden, finite, latency ----------------------------------------------------------------


def _check_golden(report: ValidationReport, p: Predictor) -> None:
    try:
        cases = p.golden_cases()
        problems = p.verify_golden() if cases is not None else []
    except AgentError as exc:
        raise _fail(report, "golden", f"golden vectors cannot run: {exc}") from None
    if cases is None:
        _passed(report, "golden", "no golden vectors in the bundle: skipped")
        return
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _fail(report, "golden", f"golden vectors do not match: {problems[0]}{more}")
    _passed(report, "golden", f"{len(cases)} golden vector(s) match")


def _check_finite(report: ValidationReport, p: Predictor) -> None:
    try:
        golden = p.golden_cases()
        if golden:
            cases, source = [inputs for inputs, _ in golden], "golden"
        else:
            rng = np.random.default_rng(0)
            cases, source = [_random_inputs(p, rng) for _ in range(RANDOM_CASES)], "random"
        for inputs in cases:
            outputs = p.model.predict(inputs)
            for tensor, out in zip(p.model.outputs, outputs, strict=True):
                arr = np.asarray(out)
                if arr.dtype.kind not in "fc":
                    continue
                kinds = [k for k, bad in (("NaN", np.isnan(arr).any()), ("Inf", np.isinf(arr).any())) if bad]
                if kinds:
                    raise _fail(report, "finite", f"non-finite outputs ({', '.join(kinds)}) in output {tensor.name!r}")
    except AgentError as exc:
        raise _fail(report, "finite", f"inference fails: {exc}") from None
    _passed(report, "finite", f"outputs finite on {len(cases)} {source} input(s)")


def _random_inputs(p: Predictor, rng: np.random.Generator) -> list[np.ndarray]:
    """Deterministic random model inputs: through the pre-processing for images and sensor windows."""
    spec = p.input_spec
    if isinstance(spec, ImageInput):
        w, h, _ = _image_geometry(p)
        frame = rng.integers(0, 256, size=(int(h), int(w), 3), dtype=np.uint8)
        return p.prepare(frame).tensors
    if isinstance(spec, TimeSeriesInput):
        window = rng.normal(size=(spec.window, len(spec.channels))).astype(np.float32)
        return p.prepare(window).tensors
    return [_random_tensor(t, rng) for t in p.model.inputs]


def _random_tensor(t: TensorInfo, rng: np.random.Generator) -> np.ndarray:
    shape = t.concrete_shape()
    if t.dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if t.dtype.kind in "iu":
        info = np.iinfo(t.dtype)
        low, high = (max(info.min, -128), min(info.max, 127)) if t.is_quantized else (0, min(info.max, 9))
        return rng.integers(low, high + 1, size=shape).astype(t.dtype)
    return rng.random(size=shape).astype(t.dtype)


def _check_latency(report: ValidationReport, p: Predictor, runs: int) -> None:
    budget = p.bundle.metadata.budget.latency_ms
    try:
        step = sample_input(p)
        for _ in range(WARMUP_RUNS):
            step()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000.0)
    except AgentError as exc:
        raise _fail(report, "latency", f"inference fails: {exc}") from None
    p95 = float(np.percentile(times, 95))
    report.p95_ms = p95
    if budget is not None and p95 > budget:
        raise _fail(report, "latency", f"p95 latency {_ms(p95)} ms is over the bundle's budget of {budget:g} ms")
    within = f"within the budget of {budget:g} ms" if budget is not None else "no budget set"
    _passed(report, "latency", f"p95 latency {_ms(p95)} ms over {runs} runs, {within}")


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1.0 else f"{value:.3f}"
