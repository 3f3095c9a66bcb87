"""The least code that does the agent's job for an image classifier, written straight on the runtime's own API.

A reference for the inference benchmark: the agent's predict path against what a developer who minds speed would
write by hand for the same result (colour conversion, resize, normalisation and quantization of the frame into the
runtime's input, inference, top-k labels with their scores), with the same model file, runtime and threads. The
gap between the two is the agent's own overhead; the gap between this loop and the bare runtime loop is the work
the task itself needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np

from agent.bundle import Bundle, ImageInput

Step = Callable[[], list[tuple[str, float]]]


class Job(NamedTuple):
    """What either runtime's loop needs: the model, its threads, the frame's pixels at the model's size, the top-k
    of a score vector, and the bundle's normalisation ``(pixel - mean) / std``."""

    bundle: Bundle
    threads: int
    pixels: Callable[[], np.ndarray]
    top: Callable[[np.ndarray], list[tuple[str, float]]]
    mean: float
    std: float


def classifier_loop(bundle: Bundle, runtime: str, threads: int, frame: np.ndarray) -> Step | None:
    """One hand-written prediction on ``frame`` per call, or None when the bundle is not a gray image classifier
    (squash resize, one normalisation) with one input and one output: the case written here."""
    meta = bundle.metadata
    spec = meta.input
    if meta.task != "classification" or not isinstance(spec, ImageInput) or spec.resize != "squash":
        return None
    if spec.color != "gray" or len(set(spec.mean)) != 1 or len(set(spec.std)) != 1:
        return None
    labels = bundle.labels or []
    top_k = (meta.classification.top_k if meta.classification else None) or 3
    width, height = spec.size
    gray = np.empty(frame.shape[:2], np.uint8)
    small = np.empty((height, width), np.uint8)
    resize = frame.shape[:2] != (height, width)

    def pixels() -> np.ndarray:
        img = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY, gray) if frame.ndim == 3 else frame
        return cv2.resize(img, (width, height), small, 0, 0, cv2.INTER_AREA) if resize else img

    def top(scores: np.ndarray) -> list[tuple[str, float]]:
        best = np.argsort(-scores, kind="stable")[:top_k]  # ties in index order, as the agent ranks them
        return [(labels[i] if i < len(labels) else str(i), float(scores[i])) for i in best]

    job = Job(bundle, threads, pixels, top, spec.mean[0], spec.std[0])
    if runtime in ("litert", "tflite-runtime"):
        return _tflite(job, runtime)
    if runtime == "onnxruntime":
        return _onnx(job)
    return None


def _tflite(job: Job, runtime: str) -> Step | None:
    if runtime == "litert":
        from ai_edge_litert.interpreter import Interpreter
    else:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

    interp = Interpreter(model_path=str(job.bundle.model_path), num_threads=job.threads)
    interp.allocate_tensors()
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    (inp,), (out,) = inputs, outputs
    if inp["dtype"] not in (np.int8, np.uint8) or len(inp["quantization_parameters"]["scales"]) != 1:
        return None  # written here: a per-tensor int8/uint8 input
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    info = np.iinfo(inp["dtype"])
    # every pixel value's quantized code, normalised as the bundle says: one table lookup a pixel
    table = np.clip(np.round((np.arange(256) - job.mean) / job.std / in_scale + in_zero), info.min, info.max)
    table = table.astype(inp["dtype"])
    height, width = int(inp["shape"][1]), int(inp["shape"][2])
    tensor, out_index, pixels, top = interp.tensor(inp["index"]), out["index"], job.pixels, job.top

    def step() -> list[tuple[str, float]]:
        view = tensor()  # the interpreter's own input buffer: written in place, no set_tensor copy
        cv2.LUT(pixels(), table, view.reshape(height, width))
        del view  # the interpreter refuses to run while a view of its memory is alive
        interp.invoke()
        codes = interp.get_tensor(out_index)[0]
        return top((codes.astype(np.float32) - out_zero) * out_scale if out_scale else codes)

    return step


def _onnx(job: Job) -> Step | None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = job.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(job.bundle.model_path), options, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    (inp,), (out,) = inputs, outputs
    if inp.type != "tensor(float)" or len(inp.shape) != 4:
        return None
    x = np.empty([1 if not isinstance(d, int) else d for d in inp.shape], np.float32)
    plane = x.reshape(x.shape[2], x.shape[3]) if x.shape[1] == 1 else x.reshape(x.shape[1], x.shape[2])
    name, out_name, pixels, top, mean, scale = inp.name, out.name, job.pixels, job.top, job.mean, 1.0 / job.std

    def step() -> list[tuple[str, float]]:
        np.subtract(pixels(), mean, out=plane, casting="unsafe")
        np.multiply(plane, scale, out=plane)
        logits = session.run([out_name], {name: x})[0][0]
        exp = np.exp(logits - logits.max())  # the agent's softmax for logits
        return top(exp / exp.sum())

    return step
