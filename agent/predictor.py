"""The predict path: bundle + loaded model -> pre-process -> infer -> post-process.

``Predictor`` checks the bundle's metadata against the model when it is built
and refuses a mismatch; after that each call is one vectorized pass.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import (
    AnomalySpec,
    Bundle,
    ClassificationSpec,
    ImageInput,
    TensorInput,
    TimeSeriesInput,
    load_bundle,
)
from agent.errors import AgentError, BundleError, InputError
from agent.processing import postprocess
from agent.processing.image import ImagePreprocessor, Transform, infer_layout
from agent.processing.timeseries import WindowPreprocessor
from agent.runtime import Model, load_model
from agent.sources.base import FrameHint


@dataclass(slots=True)
class Prediction:
    """One result: task-specific fields plus timing."""

    task: str
    result: dict[str, Any]
    latency_ms: float
    model: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model,
            "version": self.version,
            "latency_ms": round(self.latency_ms, 3),
        } | (self.result | self.extra)


@dataclass
class Prepared:
    """Model input tensors plus what post-processing needs (box transform, start time)."""

    tensors: list[np.ndarray]
    transform: Transform | None
    started: float


class Predictor:
    """Runs one bundle's model with its pre- and post-processing."""

    def __init__(self, bundle: Bundle, model: Model) -> None:
        self.bundle, self.model = bundle, model
        self._lock = threading.Lock()  # runtimes' interpreters are not safe to call from two threads
        meta = bundle.metadata
        spec = meta.input
        if bundle.inferred:
            spec = _inferred_input(model)
        self.input_spec = spec
        self._image: ImagePreprocessor | None = None
        self._window: WindowPreprocessor | None = None
        if isinstance(spec, ImageInput | TimeSeriesInput) and len(model.inputs) != 1:
            raise BundleError(
                f"bundle input kind {spec.kind!r} needs a model with 1 input, {model.info.path.name} has {len(model.inputs)}",
                "set [input] kind = 'tensor' for multi-input models",
            )
        if isinstance(spec, ImageInput):
            self._image = ImagePreprocessor(spec, model.inputs[0])
        elif isinstance(spec, TimeSeriesInput):
            self._window = WindowPreprocessor(spec, model.inputs[0])
        self._check_outputs()
        self._check_golden_shapes()
        self._threshold = meta.thresholds.get("score", 0.0)
        self._softmax: bool | None = None  # whether scores are logits: a property of the model, decided once
        self._out_names = [t.name for t in model.outputs]
        self._classify_raw = self._raw_classifier()
        # the image pre-processing gives exactly the model's input tensor: nothing for prepare_input to do
        self._image_exact = self._image is not None and self._image.exact
        # exact image tensors can be written into the runtime's input buffer (anomaly models keep their input)
        self._fill_input = self._image_exact and meta.task != "anomaly"
        # how to load the same model again (an inference process does): the runtime in use, its settings
        self.load_args: dict[str, Any] = {"runtime": model.info.runtime, "threads": model.info.threads}

    @classmethod
    def open(
        cls,
        path: str | Path,
        runtime: str | None = None,
        threads: int | None = None,
        providers: list[str] | None = None,
        delegates: list[str] | None = None,
        provider_options: dict[str, dict[str, Any]] | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str | None = None,
    ) -> Predictor:
        """Load a bundle (directory, archive or bare model) and its model."""
        bundle = load_bundle(path)
        try:
            model = load_model(
                bundle.model_path,
                runtime=runtime,
                threads=threads,
                providers=providers,
                delegates=delegates,
                provider_options=provider_options,
                inter_op_threads=inter_op_threads,
                graph_optimization=graph_optimization,
            )
        except BaseException:
            bundle.close()
            raise
        try:
            predictor = cls(bundle, model)
        except BaseException:
            model.close()
            bundle.close()
            raise
        predictor.load_args |= {
            "providers": providers,
            "delegates": delegates,
            "provider_options": provider_options,
            "inter_op_threads": inter_op_threads,
            "graph_optimization": graph_optimization,
        }
        return predictor

    def close(self) -> None:
        self.model.close()
        self.bundle.close()

    # ---- checks at load -------------------------------------------------------------------------

    def _check_outputs(self) -> None:
        meta, outs = self.bundle.metadata, self.model.outputs
        labels = self.bundle.labels
        name = self.bundle.name
        if meta.task == "classification":
            spec = meta.classification or ClassificationSpec()
            if spec.output >= len(outs):
                raise BundleError(
                    f"bundle {name}: classification output {spec.output} does not exist", "fix [classification].output"
                )
            size = outs[spec.output].shape[-1] if outs[spec.output].shape else 1
            if labels is not None and isinstance(size, int) and size > 0 and size != len(labels):
                raise BundleError(
                    f"bundle {name} has {len(labels)} labels but the model outputs {size} classes",
                    "make labels match the model's output size",
                )
        elif meta.task == "detection":
            det = meta.detection
            assert det is not None
            if det.format == "ssd" and len(outs) != 4:
                raise BundleError(
                    f"bundle {name}: ssd detection needs 4 model outputs, the model has {len(outs)}",
                    "fix [detection].format",
                )
            if det.format == "yolo":
                shape = outs[0].shape
                if len(shape) != 3:
                    raise BundleError(
                        f"bundle {name}: yolo output must be rank 3, got {list(shape)}", "fix [detection].format"
                    )
                if labels:
                    k = 4 + (1 if det.objectness else 0) + len(labels)
                    if k not in shape[1:]:
                        raise BundleError(
                            f"bundle {name}: {len(labels)} labels need {k} values per yolo row, model output is {list(shape)}",
                            "fix labels or [detection].objectness",
                        )
        elif meta.task == "anomaly":
            spec_a = meta.anomaly or AnomalySpec()
            if spec_a.output >= len(outs):
                raise BundleError(
                    f"bundle {name}: anomaly output {spec_a.output} does not exist", "fix [anomaly].output"
                )
            if spec_a.score == "reconstruction":
                in_size = int(np.prod(self.model.inputs[0].concrete_shape()))
                out_size = int(np.prod(outs[spec_a.output].concrete_shape()))
                if in_size != out_size:
                    raise BundleError(
                        f"bundle {name}: reconstruction score needs output size = input size ({out_size} != {in_size})",
                        "use [anomaly] score = 'output' or fix the model",
                    )

    def golden_cases(self) -> list[tuple[list[np.ndarray], list[np.ndarray]]] | None:
        """Golden vectors as (inputs, expected outputs) per case, each array in the model's own shape.

        golden.npz stacks cases along a leading axis: either replacing the batch axis
        (N, ...) or in front of it (N, 1, ...).
        """
        golden = self.bundle.golden_vectors()
        if golden is None:
            return None
        inputs, outputs = golden
        name = self.bundle.name
        if len(inputs) != len(self.model.inputs) or len(outputs) != len(self.model.outputs):
            raise BundleError(
                f"bundle {name}: golden vectors have {len(inputs)} inputs/{len(outputs)} outputs, "
                f"the model has {len(self.model.inputs)}/{len(self.model.outputs)}",
                "rebuild golden.npz for this model",
            )
        split: list[list[np.ndarray]] = []
        for tensors, arrays, kind in ((self.model.inputs, inputs, "input"), (self.model.outputs, outputs, "output")):
            for t, a in zip(tensors, arrays, strict=True):
                if a.ndim == len(t.shape) + 1:
                    cases, shape = [a[i] for i in range(a.shape[0])], a.shape[1:]
                else:
                    cases, shape = [a[i : i + 1] for i in range(a.shape[0] if a.ndim else 0)], (1, *a.shape[1:])
                if len(shape) != len(t.shape) or any(
                    isinstance(d, int) and d >= 0 and d != s for d, s in zip(t.shape[1:], shape[1:], strict=False)
                ):
                    raise BundleError(
                        f"bundle {name}: golden {kind} {t.name!r} has shape {list(a.shape)}, the model's is {list(t.shape)}",
                        "rebuild golden.npz for this model",
                    )
                split.append(cases)
        counts = {len(c) for c in split}
        if len(counts) != 1:
            raise BundleError(f"bundle {name}: golden arrays hold different numbers of cases", "rebuild golden.npz")
        n_in = len(self.model.inputs)
        return [([c[i] for c in split[:n_in]], [c[i] for c in split[n_in:]]) for i in range(counts.pop())]

    def _check_golden_shapes(self) -> None:
        self.golden_cases()

    def verify_golden(self) -> list[str]:
        """Run the golden vectors; return one line per mismatch (empty: all pass)."""
        cases = self.golden_cases()
        if cases is None:
            return []
        spec = self.bundle.metadata.golden
        assert spec is not None
        problems = []
        for i, (inputs, expected) in enumerate(cases):
            outs = self.model.predict(inputs)
            for t, got, want in zip(self.model.outputs, outs, expected, strict=True):
                if got.shape != want.shape:
                    problems.append(f"vector {i}: output {t.name!r} shape {list(got.shape)} != {list(want.shape)}")
                elif not np.allclose(got, want, atol=spec.atol, rtol=spec.rtol):
                    err = float(np.max(np.abs(got.astype(np.float64) - want)))
                    problems.append(f"vector {i}: output {t.name!r} differs by {err:.4g} (atol {spec.atol})")
        return problems

    # ---- prediction -------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.input_spec.kind

    @property
    def frame_hint(self) -> FrameHint | None:
        """The least this model needs of camera frames (its input size, gray for gray models), for sources that
        can decode less; None (full frames) for non-image models and detectors (boxes are in frame pixels)."""
        image = self._image
        if image is None or self.bundle.metadata.task not in ("classification", "anomaly"):
            return None
        return FrameHint(image.width, image.height, image.spec.color == "gray")

    def prepare(self, data: np.ndarray) -> Prepared:
        """Pre-process one image frame or (window, channels) block into model input tensors."""
        if self._image is not None:
            tensor, transform = self._image(data)
            return Prepared([tensor], transform, time.perf_counter())
        if self._window is not None:
            return Prepared([self._window(data)], None, time.perf_counter())
        raise InputError(
            f"model {self.bundle.name} takes {self.kind} input, not images or sensor windows", "give tensors"
        )

    def run(self, prepared: Prepared) -> Prediction:
        """Inference and post-processing of a prepared input (thread-safe: one inference at a time)."""
        return self.finish(self.infer(prepared), prepared)

    def infer(self, prepared: Prepared) -> list[np.ndarray]:
        """The inference alone: the runtime's raw outputs for ``finish`` (thread-safe: one at a time)."""
        tensors = prepared.tensors
        with self._lock:
            return self.model.run_raw(tensors) if self._image_exact else self.model.predict_raw(tensors)

    def inference_ms(self, runs: int = 5, budget_ms: float = 20.0) -> float | None:
        """How long one inference of the model takes here: the fastest of up to ``runs`` runs on zeros, fewer once
        they have taken ``budget_ms`` (a slow model is timed once). None when the model fails to run on zeros."""
        inputs = [np.zeros(t.concrete_shape(), dtype=t.dtype) for t in self.model.inputs]
        fastest, spent = math.inf, 0.0
        with self._lock:
            for _ in range(runs):
                start = time.perf_counter()
                try:
                    self.model.run_raw(inputs)
                except AgentError:
                    return None
                took = (time.perf_counter() - start) * 1000.0
                fastest, spent = min(fastest, took), spent + took
                if spent >= budget_ms:
                    break
        return fastest

    def model_inputs(self, prepared: Prepared) -> list[np.ndarray]:
        """The arrays ``infer`` hands the runtime for ``prepared``: cast or quantized to the model's inputs."""
        tensors = prepared.tensors
        return tensors if self._image_exact else self.model.model_inputs(tensors)

    def finish(self, raw: list[np.ndarray], prepared: Prepared) -> Prediction:
        """Post-processing of ``infer``'s outputs; may run in another thread, beside the next inference."""
        return self._result(raw, prepared.transform, prepared.started, prepared.tensors[0])

    def _run(
        self, tensors: list[np.ndarray], transform: Transform | None, started: float, exact: bool = False
    ) -> Prediction:
        """``exact``: ``tensors`` already have the model inputs' dtypes and shapes (no ``prepare_input``)."""
        with self._lock:
            model = self.model
            raw = model.run_raw(tensors) if exact else model.predict_raw(tensors)
            return self._result(raw, transform, started, tensors[0])

    def _result(
        self, raw: list[np.ndarray], transform: Transform | None, started: float, model_input: np.ndarray | None = None
    ) -> Prediction:
        """Post-process raw outputs (``model_input``: needed by anomaly models only)."""
        result = None
        if self._classify_raw is not None and self._softmax is not None:
            result = self._classify_raw(raw, self._softmax)
        if result is None:
            result = self._post(model_input, self.model.dequantize_outputs(raw), transform)
        latency = (time.perf_counter() - started) * 1000.0
        return Prediction(self.bundle.task, result, latency, self.bundle.name, self.bundle.version)

    def predict_image(self, frame: np.ndarray) -> Prediction:
        """Predict on one decoded image (BGR or grayscale uint8, OpenCV conventions)."""
        if self._image is None:
            raise InputError(f"model {self.bundle.name} does not take images", f"give {self.kind} input")
        start = time.perf_counter()
        if self._fill_input:  # pre-process straight into the runtime's input buffer
            with self._lock:
                transform, raw = self.model.run_into(functools.partial(self._image.fill, frame))
                if raw is not None:
                    return self._result(raw, transform, start)
        tensor, transform = self._image(frame)
        return self._run([tensor], transform, start, self._image_exact)

    def predict_window(self, window: np.ndarray) -> Prediction:
        """Predict on one (window, channels) block of raw sensor values."""
        if self._window is None:
            raise InputError(f"model {self.bundle.name} does not take sensor windows", f"give {self.kind} input")
        start = time.perf_counter()
        return self._run([self._window(window)], None, start)

    def predict_tensors(self, arrays: list[np.ndarray] | dict[str, np.ndarray]) -> Prediction:
        """Predict on arrays given as is (one per model input)."""
        start = time.perf_counter()
        with self._lock:
            outputs = self.model.predict(arrays)
            first = next(iter(arrays.values())) if isinstance(arrays, dict) else arrays[0]
            result = self._post(first, outputs, None)
        return self._prediction(result, start)

    def _prediction(self, result: dict[str, Any], start: float) -> Prediction:
        latency = (time.perf_counter() - start) * 1000.0
        return Prediction(self.bundle.task, result, latency, self.bundle.name, self.bundle.version)

    def _raw_classifier(self) -> Callable[[list[np.ndarray], bool], dict[str, Any] | None] | None:
        """Classification straight from the runtime's outputs, for a small score output that is float32 or
        per-tensor int8/uint8: scores read through a 256-entry table holding exactly what ``quant.dequantize``
        gives for each code, so results equal the generic path's (``_post`` on dequantized outputs).

        None when the model does not fit; the returned function gives None for an output of another dtype.
        """
        meta = self.bundle.metadata
        if meta.task != "classification":
            return None
        spec = meta.classification or ClassificationSpec()
        out = self.model.outputs[spec.output]
        if out.is_dynamic or not 0 < int(np.prod(out.shape)) <= postprocess.SMALL:
            return None
        index, top_k, labels, threshold = spec.output, spec.top_k, self.bundle.labels, self._threshold
        classify_values = postprocess.classify_values
        dtype = out.dtype
        if out.is_quantized:
            assert out.quant is not None
            if out.quant.per_channel or dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
                return None
            from agent.runtime import quant

            # table[byte]: the dequantized value of the code whose byte is ``byte`` (so int8 codes index it too)
            table = quant.dequantize(np.arange(256, dtype=np.uint8).view(dtype), out.quant).tolist()
            if not all(map(math.isfinite, table)):
                return None
            rounded = [round(v, 6) for v in table]  # the reported score of each code (no softmax)
            # rank[byte]: the order of the code's value among all 256 (equal values, equal ranks), so sorting the
            # translated bytes sorts the scores; keep[byte]: the score clears the threshold
            ordered = sorted(set(table))
            rank = bytes(map({v: i for i, v in enumerate(ordered)}.__getitem__, table))
            keep = [v >= threshold for v in table]
            value_of = table.__getitem__
            size = int(np.prod(out.shape))
            names = [labels[i] if labels and i < len(labels) else str(i) for i in range(size)]
            indices = range(size)

            def classify_codes(raw: list[np.ndarray], softmax: bool) -> dict[str, Any] | None:
                scores = raw[index]
                if scores.dtype != dtype:
                    return None
                codes = scores.tobytes()
                if softmax or len(codes) != size:
                    return classify_values(list(map(value_of, codes)), top_k, labels, threshold, softmax)
                # classify_values without softmax: codes sorted by rank, each score's rounding looked up
                top = sorted(indices, key=codes.translate(rank).__getitem__, reverse=True)[:top_k]
                classes = [{"index": i, "label": names[i], "score": rounded[codes[i]]} for i in top if keep[codes[i]]]
                if not classes:
                    return {"top": classes, "label": None, "score": None}
                best = classes[0]
                return {"top": classes, "label": best["label"], "score": best["score"]}

            return classify_codes
        if dtype != np.float32:
            return None

        def classify_floats(raw: list[np.ndarray], softmax: bool) -> dict[str, Any] | None:
            scores = raw[index]
            if scores.dtype != dtype:
                return None
            return classify_values(scores.ravel().tolist(), top_k, labels, threshold, softmax)

        return classify_floats

    def _post(
        self, model_input: np.ndarray | None, outputs: list[np.ndarray], transform: Transform | None
    ) -> dict[str, Any]:
        meta, labels = self.bundle.metadata, self.bundle.labels
        if meta.task == "classification":
            spec = meta.classification or ClassificationSpec()
            scores = outputs[spec.output]
            if self._softmax is None:
                self._softmax = postprocess.needs_softmax(np.asarray(scores, dtype=np.float32).reshape(-1), spec)
            return postprocess.classify(scores, spec, labels, self._threshold, self._softmax)
        if meta.task == "detection":
            det = meta.detection
            assert det is not None
            size = (self._image.width, self._image.height) if self._image else (1, 1)
            if det.format == "yolo":
                return postprocess.detect_yolo(outputs[0], det, labels, self._threshold, size, transform)
            return postprocess.detect_ssd(outputs, det, labels, self._threshold, size, transform)
        if meta.task == "anomaly":
            assert model_input is not None, "anomaly models compare outputs with their input"
            model_input = self._dequantized_input(model_input)
            return postprocess.anomaly(
                model_input, outputs, meta.anomaly or AnomalySpec(), meta.thresholds.get("anomaly")
            )
        return postprocess.raw(outputs, self._out_names)

    def _dequantized_input(self, tensor: np.ndarray) -> np.ndarray:
        info = self.model.inputs[0]
        if tensor.dtype.kind in "iu" and info.is_quantized and info.quant is not None:
            from agent.runtime import quant

            return quant.dequantize(tensor, info.quant)
        if info.is_quantized and info.quant is not None and tensor.dtype.kind == "f":
            # Compare against what the model actually saw: the input after quantization.
            from agent.runtime import quant

            return quant.dequantize(quant.quantize(tensor, info.quant, info.dtype), info.quant)
        return tensor


def _inferred_input(model: Model) -> ImageInput | TensorInput:
    """For a bare model: a 1-input rank-4 tensor with 1 or 3 channels is an image, else a tensor."""
    if len(model.inputs) == 1:
        tensor = model.inputs[0]
        layout = infer_layout(tensor.shape)
        if layout is not None:
            channels = tensor.shape[3] if layout == "NHWC" else tensor.shape[1]
            return ImageInput(layout=layout, color="gray" if channels == 1 else "rgb", resize="squash")
    return TensorInput()
