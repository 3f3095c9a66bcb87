#!/usr/bin/env python3
"""Train and export the sample models, their bundles and the runtime test fixtures.

Everything is rebuilt from seeded data: scikit-learn's bundled ``load_digits``
images (no download) and synthetic sensor signals. Run from the repository root
in a virtual environment made from ``tools/requirements-build.txt``::

    python tools/build_sample_models.py                  # everything (about 6 minutes on 2 cores)
    python tools/build_sample_models.py --only sensor-anomaly
    python tools/build_sample_models.py --verify         # check outputs; needs no TensorFlow

Outputs:

* ``agent/samples/<bundle>/``: ``bundle.toml``, the model, ``golden.npz``
  (``digits-classifier-tflite``, ``digits-classifier-onnx``, ``sensor-anomaly``, ``digits-detector``)
* ``agent/samples/inputs/``: sample digits, scenes and sensor CSVs
* ``tests/fixtures/``: tiny TFLite models for runtime edge cases

Training is deterministic (fixed seeds, ``TF_DETERMINISTIC_OPS=1``): the same machine and library versions give
byte-identical files, with or without ``--only``; other CPUs or versions may differ in the last bits of the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (--verify on a device)
    import tomli as tomllib

os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "agent" / "samples"
INPUTS = SAMPLES / "inputs"
FIXTURES = ROOT / "tests" / "fixtures"

SEED = 1234
VERSION = "1.0.0"
LATENCY_BUDGET_MS = 50.0
ONNX_OPSET = 17
ONNX_IR_VERSION = 9  # onnxruntime reads IR <= 10; onnx 1.23 writes 14 by default
DIGIT_LABELS = [str(i) for i in range(10)]

# Sensor signal: one machine, two fixed vibration frequencies seen by three axes with fixed gains and phases.
FS_HZ = 100.0
F1_HZ, F2_HZ = 12.5, 31.0
GAIN1 = np.array([0.30, 0.18, 0.12])
GAIN2 = np.array([0.08, 0.14, 0.22])
PHASE1 = np.array([0.0, 0.6, 1.9])
PHASE2 = np.array([0.0, 2.1, 0.9])
BIAS = np.array([0.02, -0.01, 0.98])  # gravity on z
NOISE_G = 0.03
WINDOW, STRIDE = 32, 8
CHANNELS = ["ax", "ay", "az"]
ANOMALY_KINDS = ("spikes", "frequency_shift", "amplitude_surge", "stuck_axis")

# Detector: 64x64 RGB input, 8x8 grid, one anchor per cell, YOLOv5-style decode.
DET_SIZE, DET_STRIDE, DET_GRID, DET_ANCHOR = 64, 8, 8, 16.0
DET_TRAIN_SCENES, DET_EPOCHS = 12000, 4  # fresh scenes rather than many epochs over few
DET_NEIGHBOUR_OBJ = 0.7  # objectness target of the neighbouring cells that also predict an object
DET_LOSS_WEIGHTS = (5.0, 1.0, 2.0)  # objectness (mean over cells), box and class (means over assigned cells)
LETTERBOX_FILL = 114


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rng_for(name: str) -> np.random.Generator:
    """One independent, stable generator per purpose (so --only reproduces the full build)."""
    return np.random.default_rng([SEED, sum((i + 1) * ord(c) for i, c in enumerate(name))])


def sig(x: float, digits: int = 6) -> float:
    """Round to significant digits for readable TOML."""
    return float(f"{float(x):.{digits}g}")


def round_up(x: float, digits: int = 3) -> float:
    """Round up to ``digits`` significant digits (for tolerances)."""
    if x <= 0:
        return 0.0
    exp = int(np.floor(np.log10(x))) - digits + 1
    return float(f"{np.ceil(x / 10.0**exp) * 10.0**exp:.{digits}g}")


def tensor_stats(x: np.ndarray, channel_axis: int) -> dict[str, Any]:
    """TensorStats over a stack of model tensors ``x`` (first axis = examples, batch dim of 1 included or not)."""
    x = np.asarray(x, dtype=np.float64)
    moved = np.moveaxis(x, channel_axis, -1).reshape(-1, x.shape[channel_axis])
    return {
        "mean": [sig(v) for v in moved.mean(axis=0)],
        "std": [sig(v) for v in moved.std(axis=0)],
        "min": sig(x.min()),
        "max": sig(x.max()),
        "count": int(x.shape[0]),
    }


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------------------------------
# runtimes (ai-edge-litert / onnxruntime): used by the build and by --verify, no TensorFlow needed


@dataclass
class IO:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale > 0 and self.dtype.kind in "iu"

    def describe(self) -> str:
        q = f" scale={self.scale:.8g} zero_point={self.zero_point}" if self.quantized else ""
        return f"{self.name} {list(self.shape)} {self.dtype}{q}"


class Runner:
    """Float in, float out (quantizes inputs / dequantizes outputs of integer tensors)."""

    inputs: list[IO]
    outputs: list[IO]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def latency_ms(self, arrays: Sequence[np.ndarray], n: int = 300) -> float:
        for _ in range(30):
            self.run(arrays)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.run(arrays)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)


class TFLiteRunner(Runner):
    def __init__(self, model: Path | bytes, threads: int = 1, resolver: str = "AUTO") -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        kwargs: dict[str, Any] = {"num_threads": threads, "experimental_op_resolver_type": OpResolverType[resolver]}
        if isinstance(model, bytes):
            kwargs["model_content"] = model
        else:
            kwargs["model_path"] = str(model)
        self.interp = Interpreter(**kwargs)
        self.interp.allocate_tensors()

        def info(d: dict[str, Any]) -> IO:
            scale, zp = d["quantization"]
            return IO(d["name"], tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]), float(scale), int(zp))

        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [info(d) for d in self._in]
        self.outputs = [info(d) for d in self._out]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        for d, t, a in zip(self._in, self.inputs, arrays, strict=True):
            self.interp.set_tensor(d["index"], quantize(a, t) if t.quantized else np.asarray(a, dtype=t.dtype))
        self.interp.invoke()
        return [dequantize(self.interp.get_tensor(d["index"]), t) for d, t in zip(self._out, self.outputs, strict=True)]


class OnnxRunner(Runner):
    def __init__(self, model: Path | bytes, threads: int = 1, optimize: str = "ORT_ENABLE_ALL") -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimize)
        so.log_severity_level = 3
        src = model if isinstance(model, bytes) else str(model)
        self.sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
        self.inputs = [IO(i.name, tuple(i.shape), np.dtype(types[i.type])) for i in self.sess.get_inputs()]
        self.outputs = [IO(o.name, tuple(o.shape), np.dtype(types[o.type])) for o in self.sess.get_outputs()]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {t.name: np.asarray(a, dtype=t.dtype) for t, a in zip(self.inputs, arrays, strict=True)}
        return [np.asarray(o, dtype=np.float32) for o in self.sess.run(None, feeds)]


def quantize(x: np.ndarray, t: IO) -> np.ndarray:
    info = np.iinfo(t.dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(t.scale) + t.zero_point)
    return np.clip(q, info.min, info.max).astype(t.dtype)


def dequantize(q: np.ndarray, t: IO) -> np.ndarray:
    if not t.quantized:
        return np.asarray(q, dtype=np.float32).copy()
    return ((q.astype(np.float32) - t.zero_point) * np.float32(t.scale)).astype(np.float32)


def open_model(path: Path | bytes, fmt: str, **kwargs: Any) -> Runner:
    return TFLiteRunner(path, **kwargs) if fmt == "tflite" else OnnxRunner(path, **kwargs)


def run_batch(runner: Runner, xs: np.ndarray) -> list[np.ndarray]:
    """Run examples ``xs`` (N, ...model shape without the batch dim) one at a time; outputs stacked the same way."""
    outs: list[list[np.ndarray]] = [[] for _ in runner.outputs]
    for x in xs:
        for store, o in zip(outs, runner.run([x[None]]), strict=True):
            store.append(o[0])
    return [np.stack(o) for o in outs]


def runtime_variants(fmt: str) -> list[tuple[str, dict[str, Any]]]:
    """Other ways the same model may be run (threads, kernels, graph rewrites): golden tolerance must cover them."""
    if fmt == "tflite":
        return [
            ("2 threads", {"threads": 2}),
            ("no xnnpack", {"resolver": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}),
            ("reference kernels", {"resolver": "BUILTIN_REF"}),
        ]
    return [
        ("2 threads", {"threads": 2}),
        ("basic optimizations", {"optimize": "ORT_ENABLE_BASIC"}),
        ("no optimizations (float QDQ)", {"optimize": "ORT_DISABLE_ALL"}),
    ]


def variant_spread(
    model: Path, fmt: str, xs: Sequence[np.ndarray], expected: list[list[np.ndarray]]
) -> dict[str, float]:
    """Largest |difference| to ``expected`` per runtime variant over the golden inputs."""
    spread = {}
    for label, kwargs in runtime_variants(fmt):
        r = open_model(model, fmt, **kwargs)
        worst = 0.0
        for x, exp in zip(xs, expected, strict=True):
            for got, want in zip(r.run([x]), exp, strict=True):
                worst = max(worst, float(np.max(np.abs(got - want))))
        spread[label] = worst
    return spread


# --------------------------------------------------------------------------------------------------------------------
# TensorFlow / Keras (imported lazily: --verify runs without it)

_TF: Any = None


def tf_module() -> Any:
    global _TF
    if _TF is None:
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(max(1, min(2, os.cpu_count() or 1)))
        tf.config.experimental.enable_op_determinism()
        tf.get_logger().setLevel("ERROR")
        _TF = tf
    return _TF


def seed_everything(name: str) -> None:
    """Fresh Keras state (layer-name counters too: names end up in the model files) and seeds derived from ``name``."""
    tf_module()
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(int(rng_for(name).integers(0, 2**31 - 1)))


WEIGHTS_CACHE: Path | None = None  # --weights-cache: reuse trained weights (development aid)


def train(
    name: str,
    build: Callable[[int | None], Any],
    xy: tuple[np.ndarray, np.ndarray],
    batch: int,
    epochs: int,
    loss: Any,
    lr: float,
    scale: float = 1.0,
) -> tuple[Any, Any]:
    """Seed, build, compile (Adam + cosine decay) and fit; returns (model, the same network rebuilt for batch 1).

    Everything random is seeded from ``name`` here, so a model trains the same with or without --only.
    """
    import keras

    seed_everything(name)
    data = dataset(xy[0], xy[1], batch, name, scale)
    model = build(None)
    steps_per_epoch = int(np.ceil(len(xy[0]) / batch))
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, epochs * steps_per_epoch)),
        loss=loss,
    )
    cached = WEIGHTS_CACHE / f"{name}.weights.h5" if WEIGHTS_CACHE else None
    if cached is not None and cached.is_file():
        log(f"  loading cached weights {cached}")
        model.load_weights(cached)
    else:
        t0 = time.time()
        model.fit(data, epochs=epochs, verbose=0, shuffle=False)  # the dataset shuffles (seeded)
        log(f"  trained {name} in {time.time() - t0:.0f}s")
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            model.save_weights(cached)
    infer = build(1)
    infer.set_weights(model.get_weights())
    return model, infer


def dataset(x: np.ndarray, y: np.ndarray, batch: int, name: str, scale: float = 1.0) -> Any:
    """Seeded, reshuffled-each-epoch tf.data pipeline; ``scale`` converts uint8 images to floats batch by batch."""
    tf = tf_module()
    seed = int(rng_for(f"{name}-shuffle").integers(0, 2**31 - 1))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)
    if scale != 1.0:
        ds = ds.map(lambda a, b: (tf.cast(a, tf.float32) * scale, b))
    return ds.prefetch(2)


def tflite_int8(
    model: Any, representative: np.ndarray, io_type: Any = None, names: tuple[list[str], list[str]] | None = None
) -> bytes:
    """Fully-integer TFLite (int8 kernels, int8 or ``io_type`` input/output) from a Keras model with batch 1."""
    tf = tf_module()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def rep() -> Any:
        for x in representative:
            yield [x[None].astype(np.float32)]

    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = io_type or tf.int8
    conv.inference_output_type = io_type or tf.int8
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected": not needed with a dataset
        data = conv.convert()
    return rename_tflite_io(data, *names) if names else data


def rename_tflite_io(data: bytes, inputs: list[str], outputs: list[str]) -> bytes:
    """Give the model's input/output tensors (and signature keys) plain names instead of serving_default_x:0."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    model = fbu.convert_bytearray_to_object(bytearray(data))
    sg = model.subgraphs[0]
    mapping = dict(zip(list(sg.inputs), inputs, strict=True)) | dict(zip(list(sg.outputs), outputs, strict=True))
    for idx, name in mapping.items():
        sg.tensors[idx].name = name.encode()
    for sd in model.signatureDefs or []:
        for tm in list(sd.inputs or []) + list(sd.outputs or []):
            if tm.tensorIndex in mapping:
                tm.name = mapping[tm.tensorIndex].encode()
    return bytes(fbu.convert_object_to_bytearray(model))


# --------------------------------------------------------------------------------------------------------------------
# ONNX export by hand from a sequential Keras model


class OnnxGraph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"{hint}_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self.count += 1
        name = f"{op_type.lower()}_{self.count}"
        out = output or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def model(self, inp: tuple[str, list[int]], out: tuple[str, list[int]], doc: str) -> Any:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes,
            "main",
            [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, inp[1])],
            [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])],
            self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
            producer_name="build_sample_models",
            doc_string=doc,
        )
        model.ir_version = ONNX_IR_VERSION
        onnx.checker.check_model(model)
        return model


def keras_to_onnx_body(g: OnnxGraph, model: Any, x: str, hwc: tuple[int, int, int], final_activation: bool) -> str:
    """Append the layers of a sequential Keras CNN (NHWC) as NCHW ONNX nodes; returns the last tensor name.

    Supported: Conv2D (stride 1, 'same'/'valid') optionally followed by BatchNormalization (folded into the
    convolution), MaxPooling2D (2x2), Flatten, Dense, Dropout, ReLU/Activation layers and relu/linear/softmax
    activations. The final softmax is left out unless ``final_activation``.
    """
    h, w, c = hwc
    flat_from: tuple[int, int, int] | None = None
    layers = [ly for ly in model.layers if ly.__class__.__name__ not in ("InputLayer", "Dropout")]
    for i, layer in enumerate(layers):
        kind = layer.__class__.__name__
        cfg = layer.get_config()
        last = i == len(layers) - 1
        act = cfg.get("activation", "linear")
        if kind == "Conv2D":
            weights = [np.asarray(v, dtype=np.float32) for v in layer.get_weights()]
            kernel = weights[0]
            kh, kw, _, cout = kernel.shape
            bias = weights[1] if cfg["use_bias"] else np.zeros(cout, np.float32)
            if i + 1 < len(layers) and layers[i + 1].__class__.__name__ == "BatchNormalization":
                kernel, bias = fold_batchnorm(kernel, bias, layers[i + 1])
            assert tuple(cfg["strides"]) == (1, 1) and tuple(cfg["dilation_rate"]) == (1, 1), layer.name
            pad = [(kh - 1) // 2, (kw - 1) // 2, kh // 2, kw // 2] if cfg["padding"] == "same" else [0, 0, 0, 0]
            wname = g.const(f"{layer.name}_w", kernel.transpose(3, 2, 0, 1))
            bname = g.const(f"{layer.name}_b", bias)
            x = g.op("Conv", [x, wname, bname], kernel_shape=[kh, kw], pads=pad, strides=[1, 1])
            if cfg["padding"] != "same":
                h, w = h - kh + 1, w - kw + 1
            c = cout
        elif kind == "BatchNormalization":
            assert layers[i - 1].__class__.__name__ == "Conv2D", f"{layer.name} must follow a Conv2D"
            act = "linear"  # folded above
        elif kind in ("ReLU", "Activation"):
            act = "relu" if kind == "ReLU" else act
            assert kind == "Activation" or not any(cfg.get(k) for k in ("max_value", "negative_slope", "threshold"))
        elif kind == "MaxPooling2D":
            assert tuple(cfg["pool_size"]) == (2, 2) and tuple(cfg["strides"]) == (2, 2), layer.name
            x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            h, w = h // 2, w // 2
            act = "linear"
        elif kind == "Flatten":
            flat_from = (h, w, c)
            x = g.op("Flatten", [x], axis=1)
            act = "linear"
        elif kind == "Dense":
            kernel, bias = (np.asarray(v, dtype=np.float32) for v in layer.get_weights())
            if flat_from is not None:  # Keras flattens (h, w, c); ONNX NCHW flattens (c, h, w)
                fh, fw, fc = flat_from
                kernel = kernel.reshape(fh, fw, fc, -1).transpose(2, 0, 1, 3).reshape(fh * fw * fc, -1)
                flat_from = None
            x = g.op("Gemm", [x, g.const(f"{layer.name}_w", kernel), g.const(f"{layer.name}_b", bias)])
            c = kernel.shape[1]
        else:
            raise ValueError(f"cannot export layer {layer.name} ({kind})")
        if act == "relu":
            x = g.op("Relu", [x])
        elif act == "softmax" and (final_activation or not last):
            x = g.op("Softmax", [x], axis=-1)
        elif act not in ("linear", "softmax"):
            raise ValueError(f"cannot export activation {act} of {layer.name}")
    return x


def fold_batchnorm(kernel: np.ndarray, bias: np.ndarray, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference-mode BatchNormalization into the preceding convolution's kernel (HWIO) and bias."""
    cfg = bn.get_config()
    assert cfg["axis"] in (-1, [-1], 3, [3]), bn.name
    params = {v.path.rsplit("/", 1)[-1]: np.asarray(v, dtype=np.float64) for v in bn.weights}
    gamma = params.get("gamma", np.ones_like(params["moving_mean"]))
    beta = params.get("beta", np.zeros_like(params["moving_mean"]))
    scale = gamma / np.sqrt(params["moving_variance"] + cfg["epsilon"])
    return (kernel * scale).astype(np.float32), ((bias - params["moving_mean"]) * scale + beta).astype(np.float32)


class ArrayReader:
    """onnxruntime calibration data reader over a list of inputs."""

    def __init__(self, name: str, arrays: np.ndarray) -> None:
        self.name = name
        self.arrays = arrays
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.arrays):
            return None
        self.pos += 1
        return {self.name: self.arrays[self.pos - 1][None].astype(np.float32)}

    def rewind(self) -> None:
        self.pos = 0


def quantize_onnx_qdq(float_model: Any, calib: np.ndarray, exclude: Sequence[str] = ()) -> bytes:
    """Static QDQ int8 quantization (per-channel weights) with onnxruntime; keeps the IR version readable."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(ArrayReader, CalibrationDataReader):
        pass

    root_logger = logging.getLogger()
    level = root_logger.level
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        root_logger.setLevel(logging.ERROR)  # "Please consider pre-processing before quantization": not needed here
        onnx.save(float_model, str(src))
        quantize_static(
            str(src),
            str(dst),
            Reader(float_model.graph.input[0].name, calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI multiply u8 x s8 pairs into saturating int16 (VPMADDUBSW), so
            # full-range int8 weights make onnxruntime's fused kernels disagree with the QDQ arithmetic (and with
            # ARM/VNNI machines) by many output steps; with 7 bits all agree within one step.
            reduce_range=True,
            nodes_to_exclude=list(exclude) or None,
        )
        model = onnx.load(str(dst))
        root_logger.setLevel(level)
    if model.ir_version > 10:
        model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_output_scale(model_bytes: bytes) -> float | None:
    """Scale of the DequantizeLinear producing the (first) graph output, if any."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    out = model.graph.output[0].name
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if out in node.output and node.op_type == "DequantizeLinear":
            return float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
    return None


# --------------------------------------------------------------------------------------------------------------------
# bundles


@dataclass
class Report:
    name: str
    files: list[Path] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    io: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_bundle(
    name: str,
    model_file: str,
    model_bytes: bytes,
    fmt: str,
    meta: dict[str, Any],
    golden_inputs: list[np.ndarray],
    output_scale: float | None,
    report: Report,
) -> dict[str, Any]:
    """Write model + golden.npz + bundle.toml, then validate with agent.bundle.load_bundle."""
    import tomli_w

    root = SAMPLES / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model_path = root / model_file
    model_path.write_bytes(model_bytes)

    runner = open_model(model_path, fmt)
    expected = [runner.run([x]) for x in golden_inputs]
    # one npz holds all vectors: axis 0 of each array indexes the vector, the rest is the exact model shape
    golden: dict[str, np.ndarray] = {}
    for i, t in enumerate(runner.inputs):
        golden[f"input_{i}_{t.name}"] = np.stack(golden_inputs).astype(np.float32)
    for i, t in enumerate(runner.outputs):
        golden[f"output_{i}_{t.name}"] = np.stack([e[i] for e in expected]).astype(np.float32)
    np.savez_compressed(root / "golden.npz", **golden)

    spread = variant_spread(model_path, fmt, golden_inputs, expected)
    worst = max(spread.values())
    if output_scale is not None:  # integer (or DequantizeLinear) output: count in quantization steps
        steps = max(2, int(np.ceil(worst / output_scale - 1e-6)) + 1)
        atol = round_up(steps * output_scale * 1.0001, 4)
    else:  # float output of a QDQ model: 1e-3 of the output's range, or twice what other kernels differ by
        magnitude = max(float(np.max(np.abs(v))) for k, v in golden.items() if k.startswith("output_"))
        atol = round_up(max(1e-3 * magnitude, 2 * worst), 3)
    meta = dict(meta)
    meta["golden"] = {"file": "golden.npz", "atol": atol}
    spread_txt = ", ".join(f"{k}: {v:.3g}" for k, v in spread.items())
    report.notes.append(f"golden atol {atol:g}; max |diff| vs other runtime settings: {spread_txt}")

    (root / "bundle.toml").write_text(tomli_w.dumps(clean_toml(meta)), encoding="utf-8")

    sys.path.insert(0, str(ROOT))
    from agent.bundle import load_bundle

    bundle = load_bundle(root)
    vectors = bundle.golden_vectors()
    assert vectors is not None and len(vectors[0]) == len(runner.inputs), "golden vectors do not load"
    report.files += [model_path, root / "golden.npz", root / "bundle.toml"]
    report.io = [f"in  {t.describe()}" for t in runner.inputs] + [f"out {t.describe()}" for t in runner.outputs]
    report.latency_ms[model_file] = runner.latency_ms([golden_inputs[0]])
    return meta


def clean_toml(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: clean_toml(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [clean_toml(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------------------------
# digits data


@dataclass
class Digits:
    img8: np.ndarray  # (N, 8, 8) uint8 0..255
    img32: np.ndarray  # (N, 32, 32) uint8
    labels: np.ndarray
    train: np.ndarray  # indices
    test: np.ndarray


_DIGITS: Digits | None = None


def digits() -> Digits:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        img8 = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
        img32 = np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_LINEAR) for im in img8])
        labels = d.target.astype(np.int64)
        train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=SEED)
        _DIGITS = Digits(img8, img32, labels, np.sort(train), np.sort(test))
    return _DIGITS


def augment_digits(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small random shifts, scaling and rotation (32x32 uint8)."""
    out = np.empty_like(images)
    for i, im in enumerate(images):
        angle = rng.uniform(-10, 10)
        scale = rng.uniform(0.85, 1.1)
        m = cv2.getRotationMatrix2D((15.5, 15.5), angle, scale)
        m[:, 2] += rng.uniform(-3, 3, size=2)
        out[i] = cv2.warpAffine(im, m, (32, 32), flags=cv2.INTER_LINEAR, borderValue=0)
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1 + 2: digits classifier (TFLite int8 and ONNX QDQ from the same Keras weights)

CLASSIFIER_STAGES = ((24, 24), (48, 48), (96, 96))


def classifier_model(batch_size: int | None) -> Any:
    import keras
    from keras import layers

    inp = keras.Input((32, 32, 1), batch_size=batch_size, name="image")
    x = inp
    for stage in CLASSIFIER_STAGES:
        for ch in stage:
            x = layers.Conv2D(ch, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inp, out, name="digits_cnn")


_CLASSIFIER: Any = None


def train_classifier() -> Any:
    """Keras model (batch 1) trained on the digits train split with light augmentation; cached per process."""
    global _CLASSIFIER
    if _CLASSIFIER is not None:
        return _CLASSIFIER
    d = digits()
    rng = rng_for("classifier-augment")
    base = d.img32[d.train]
    x = np.concatenate([base, augment_digits(base, rng), augment_digits(base, rng)])
    y = np.tile(d.labels[d.train], 3)
    log(f"training digits CNN on {len(x)} images")
    _, infer = train(
        "classifier", classifier_model, (x[..., None], y), 64, 6, "sparse_categorical_crossentropy", 2e-3, 1 / 255
    )
    _CLASSIFIER = infer
    return infer


def digit_inputs(idx: np.ndarray, layout: str) -> np.ndarray:
    x = digits().img32[idx].astype(np.float32) / 255.0
    return x[:, None, :, :] if layout == "NCHW" else x[..., None]


def golden_digit_indices() -> np.ndarray:
    """Test images written as sample PNGs: the first test image of each label; the golden vectors use 4 of them."""
    d = digits()
    return np.array([d.test[np.flatnonzero(d.labels[d.test] == k)[0]] for k in range(10)])


def write_digit_pngs() -> list[Path]:
    INPUTS.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, i in enumerate(golden_digit_indices()):
        p = INPUTS / f"digit_{k}.png"
        cv2.imwrite(str(p), digits().img32[i])
        paths.append(p)
    return paths


def classifier_meta(model_file: str, layout: str, description: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": "",
        "version": VERSION,
        "task": "classification",
        "model": model_file,
        "description": description,
        "hardware": [],
        "labels": DIGIT_LABELS,
        "input": {
            "kind": "image",
            "layout": layout,
            "size": [32, 32],
            "color": "gray",
            "resize": "squash",
            "mean": [0.0],
            "std": [255.0],
        },
        "classification": {"top_k": 3, "softmax": "auto"},
        "budget": {"latency_ms": LATENCY_BUDGET_MS},
    }


def classifier_baseline(xs: np.ndarray, outs: np.ndarray, in_name: str, out_name: str, layout: str) -> dict[str, Any]:
    preds = outs.reshape(len(outs), -1).argmax(axis=1)
    freq = np.bincount(preds, minlength=10) / len(preds)
    return {
        "inputs": {in_name: tensor_stats(xs, 1 if layout == "NCHW" else -1)},
        "outputs": {out_name: tensor_stats(outs, -1)},
        "class_frequencies": [sig(f) for f in freq],
    }


def build_classifier_tflite() -> Report:
    report = Report("digits-classifier-tflite")
    model = train_classifier()
    d = digits()
    x_test, y_test = digit_inputs(d.test, "NHWC"), d.labels[d.test]
    float_acc = float((model.predict(x_test, batch_size=1, verbose=0).argmax(1) == y_test).mean())
    rep = digit_inputs(d.train[rng_for("classifier-rep").permutation(len(d.train))[:300]], "NHWC")
    data = tflite_int8(model, rep, names=(["image"], ["probabilities"]))
    runner = TFLiteRunner(data)
    probs = run_batch(runner, x_test)[0]
    int8_acc = float((probs.argmax(1) == y_test).mean())
    report.accuracy = {"float": round(float_acc, 4), "int8": round(int8_acc, 4)}
    meta = classifier_meta(
        "digits_cnn_int8.tflite",
        "NHWC",
        "Handwritten digit classifier (scikit-learn digits upscaled to 32x32), full-integer int8 TFLite.",
    )
    meta["name"] = report.name
    meta["accuracy"] = {**report.accuracy, "test_images": float(len(y_test))}
    meta["baseline"] = classifier_baseline(x_test, probs, "image", "probabilities", "NHWC")
    golden = [x[None] for x in digit_inputs(golden_digit_indices()[:4], "NHWC")]
    write_bundle(report.name, meta["model"], data, "tflite", meta, golden, runner.outputs[0].scale, report)
    report.files += write_digit_pngs()
    return report


def build_classifier_onnx() -> Report:
    import onnx

    report = Report("digits-classifier-onnx")
    model = train_classifier()
    d = digits()
    g = OnnxGraph()
    logits = keras_to_onnx_body(g, model, "image", (32, 32, 1), final_activation=False)
    g.nodes[-1].output[0] = "logits"
    float_model = g.model(("image", [1, 1, 32, 32]), ("logits", [1, 10]), "digits CNN, logits")
    assert logits
    x_test, y_test = digit_inputs(d.test, "NCHW"), d.labels[d.test]
    keras_probs = model.predict(digit_inputs(d.test, "NHWC"), batch_size=1, verbose=0)
    float_logits = run_batch(OnnxRunner(float_model.SerializeToString()), x_test)[0]
    diff = float(np.abs(softmax(float_logits) - keras_probs).max())
    assert diff < 1e-4, f"float ONNX export disagrees with Keras by {diff}"
    report.notes.append(f"float ONNX vs Keras: max |softmax diff| {diff:.2g}")
    float_acc = float((float_logits.argmax(1) == y_test).mean())

    calib = digit_inputs(d.train[rng_for("classifier-rep").permutation(len(d.train))[:300]], "NCHW")
    data = quantize_onnx_qdq(float_model, calib)
    runner = OnnxRunner(data)
    logits_q = run_batch(runner, x_test)[0]
    int8_acc = float((logits_q.argmax(1) == y_test).mean())
    report.accuracy = {"float": round(float_acc, 4), "int8": round(int8_acc, 4)}
    meta = classifier_meta(
        "digits_cnn_int8.onnx",
        "NCHW",
        "Handwritten digit classifier (same weights as digits-classifier-tflite), ONNX int8 QDQ, outputs logits.",
    )
    meta["name"] = report.name
    meta["accuracy"] = {**report.accuracy, "test_images": float(len(y_test))}
    meta["baseline"] = classifier_baseline(x_test, logits_q, "image", "logits", "NCHW")
    golden = [x[None] for x in digit_inputs(golden_digit_indices()[:4], "NCHW")]
    write_bundle(report.name, meta["model"], data, "onnx", meta, golden, onnx_output_scale(data), report)
    report.latency_ms["float .onnx (not shipped)"] = OnnxRunner(float_model.SerializeToString()).latency_ms(golden[:1])
    report.notes.append(f"onnx ir_version {onnx.load_from_string(data).ir_version}")
    return report


# --------------------------------------------------------------------------------------------------------------------
# 3: sensor anomaly autoencoder


def sensor_stream(
    rng: np.random.Generator, n: int, f1: float = F1_HZ, f2: float = F2_HZ, amp: float = 1.0
) -> np.ndarray:
    """(n, 3) accelerometer samples in g of the healthy machine (or with changed frequency/amplitude)."""
    t = np.arange(n)[:, None] / FS_HZ
    p1, p2, pm = rng.uniform(0, 2 * np.pi, 3)
    level = rng.uniform(0.9, 1.1) * amp
    envelope = level * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + pm))
    s1 = GAIN1 * np.sin(2 * np.pi * f1 * t + p1 + PHASE1)
    s2 = GAIN2 * np.sin(2 * np.pi * f2 * t + p2 + PHASE2)
    return envelope * (s1 + s2) + BIAS + rng.normal(0, NOISE_G, (n, 3))


def windows_of(stream: np.ndarray) -> np.ndarray:
    starts = range(0, len(stream) - WINDOW + 1, STRIDE)
    return np.stack([stream[s : s + WINDOW] for s in starts])


def normal_windows(rng: np.random.Generator, streams: int, length: int = 1024) -> np.ndarray:
    return np.concatenate([windows_of(sensor_stream(rng, length)) for _ in range(streams)])


def anomalous_window(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "frequency_shift":
        factor = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 1.45)
        return sensor_stream(rng, WINDOW, f1=F1_HZ * factor, f2=F2_HZ * factor)
    if kind == "amplitude_surge":
        return sensor_stream(rng, WINDOW, amp=rng.uniform(2.0, 3.0))
    w = sensor_stream(rng, WINDOW)
    if kind == "spikes":
        for _ in range(rng.integers(1, 4)):
            w[rng.integers(0, WINDOW), rng.integers(0, 3)] += rng.choice([-1, 1]) * rng.uniform(0.8, 2.0)
    elif kind == "stuck_axis":
        axis, start = rng.integers(0, 3), rng.integers(0, WINDOW // 2)
        w[start:, axis] = w[start, axis]
    else:
        raise ValueError(kind)
    return w


def anomaly_model(batch_size: int | None) -> Any:
    import keras
    from keras import layers

    inp = keras.Input((WINDOW, 3), batch_size=batch_size, name="window")
    x = layers.Flatten()(inp)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dense(8, activation="tanh")(x)  # bounded code: out-of-range amplitudes do not reconstruct
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dense(WINDOW * 3)(x)
    return keras.Model(inp, layers.Reshape((WINDOW, 3))(x), name="sensor_autoencoder")


def recon_scores(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    return ((x - recon) ** 2).reshape(len(x), -1).mean(axis=1)


def build_sensor_anomaly() -> Report:
    report = Report("sensor-anomaly")
    normal_train = normal_windows(rng_for("sensor-train"), 160)
    mean, std = normal_train.reshape(-1, 3).mean(axis=0), normal_train.reshape(-1, 3).std(axis=0)
    mean, std = np.array([sig(v) for v in mean]), np.array([sig(v) for v in std])

    def standardize(w: np.ndarray) -> np.ndarray:
        return ((w - mean) / std).astype(np.float32)

    xtr = standardize(normal_train)
    val = standardize(normal_windows(rng_for("sensor-val"), 40))
    test = standardize(normal_windows(rng_for("sensor-test"), 40))
    arng = rng_for("sensor-anomalies")
    anomalies = {k: standardize(np.stack([anomalous_window(arng, k) for _ in range(1000)])) for k in ANOMALY_KINDS}

    log(f"training sensor autoencoder on {len(xtr)} windows")
    model, infer = train("sensor", anomaly_model, (xtr, xtr), 128, 30, "mse", 2e-3)

    rep = xtr[rng_for("sensor-rep").permutation(len(xtr))[:500]]
    data = tflite_int8(infer, rep, names=(["window"], ["reconstruction"]))
    runner = TFLiteRunner(data)

    def scores_float(x: np.ndarray) -> np.ndarray:
        return recon_scores(x, model.predict(x, batch_size=256, verbose=0))

    def scores_int8(x: np.ndarray) -> np.ndarray:
        return recon_scores(x, run_batch(runner, x)[0])

    accuracy: dict[str, float] = {}
    threshold = 0.0
    for tag, score in (("float", scores_float), ("int8", scores_int8)):
        thr = sig(float(np.percentile(score(val), 99.5)), 4)
        accuracy[f"false_positive_rate_{tag}"] = round(float((score(test) > thr).mean()), 4)
        for k, x in anomalies.items():
            accuracy[f"detection_{k}_{tag}"] = round(float((score(x) > thr).mean()), 4)
        accuracy[f"threshold_{tag}"] = thr
        if tag == "int8":
            threshold = thr
    report.accuracy = accuracy
    report.notes.append(
        f"normal test windows: {len(test)}, anomalous windows per kind: 1000; threshold (int8, 99.5th pct of "
        f"{len(val)} normal validation windows) = {threshold}"
    )

    recon_test = run_batch(runner, test)[0]
    meta: dict[str, Any] = {
        "schema_version": 1,
        "name": report.name,
        "version": VERSION,
        "task": "anomaly",
        "model": "sensor_ae_int8.tflite",
        "description": (
            "Vibration anomaly detector: dense autoencoder over 32-sample windows of a 3-axis accelerometer "
            f"({FS_HZ:g} Hz), full-integer int8 TFLite. Score = MSE(standardized window, reconstruction)."
        ),
        "hardware": [],
        "input": {
            "kind": "timeseries",
            "window": WINDOW,
            "stride": STRIDE,
            "channels": CHANNELS,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "layout": "NWC",
        },
        "thresholds": {"anomaly": threshold},
        "anomaly": {"score": "reconstruction", "output": 0},
        "baseline": {
            "inputs": {"window": tensor_stats(test, -1)},
            "outputs": {"reconstruction": tensor_stats(recon_test, -1)},
        },
        "budget": {"latency_ms": LATENCY_BUDGET_MS},
        "accuracy": accuracy,
    }
    golden_windows = [test[0], test[len(test) // 2], anomalies["spikes"][0], anomalies["amplitude_surge"][0]]
    golden = [w[None].astype(np.float32) for w in golden_windows]
    write_bundle(report.name, meta["model"], data, "tflite", meta, golden, runner.outputs[0].scale, report)
    report.files += write_sensor_csvs(standardize, scores_int8, threshold, report)
    return report


def write_sensor_csvs(
    standardize: Callable[[np.ndarray], np.ndarray],
    score: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    report: Report,
) -> list[Path]:
    INPUTS.mkdir(parents=True, exist_ok=True)
    rng = rng_for("sensor-csv")
    normal = sensor_stream(rng, 400)
    faulty = sensor_stream(rng, 400)
    # rows 160..239: bearing-like fault, vibration amplitude surges and impacts appear
    lo, hi = 160, 240
    faulty[lo:hi] = (faulty[lo:hi] - BIAS) * 2.5 + BIAS
    for row in rng.choice(np.arange(lo, hi), 8, replace=False):
        faulty[row, rng.integers(0, 3)] += rng.choice([-1, 1]) * rng.uniform(1.0, 2.0)
    paths = []
    for name, data in (("sensor_normal.csv", normal), ("sensor_anomalous.csv", faulty)):
        p = INPUTS / name
        lines = ["ax,ay,az"] + [",".join(f"{v:.5f}" for v in row) for row in data]
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(p)
        s = score(standardize(windows_of(data)))
        flagged = np.flatnonzero(s > threshold)
        report.notes.append(
            f"{name}: {len(s)} windows, {len(flagged)} above threshold"
            + (f" (window starts {flagged.min() * STRIDE}..{flagged.max() * STRIDE})" if len(flagged) else "")
            + f", max score {s.max():.3g}"
        )
    return paths


# --------------------------------------------------------------------------------------------------------------------
# 4: digits detector


@dataclass
class Scene:
    image: np.ndarray  # (64, 64, 3) uint8 RGB
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 in pixels
    labels: np.ndarray  # (n,)


def paste_digits(
    canvas: np.ndarray,
    region: tuple[int, int, int, int],
    count: int,
    sizes: tuple[int, int],
    pool: np.ndarray,
    rng: np.random.Generator,
) -> tuple[list[list[float]], list[int]]:
    """Paste ``count`` digits from ``pool`` (indices into digits()) at non-overlapping places inside ``region``."""
    d = digits()
    rx, ry, rw, rh = region
    placed: list[tuple[int, int, int]] = []
    boxes, labels = [], []
    for _ in range(count):
        for _attempt in range(50):
            s = int(rng.integers(sizes[0], sizes[1] + 1))
            if s > min(rw, rh):
                continue
            x0, y0 = int(rng.integers(rx, rx + rw - s + 1)), int(rng.integers(ry, ry + rh - s + 1))
            if all(
                x0 + s + 1 <= px or px + ps + 1 <= x0 or y0 + s + 1 <= py or py + ps + 1 <= y0 for px, py, ps in placed
            ):
                break
        else:
            continue
        idx = int(rng.choice(pool))
        src = d.img8[idx]
        patch = cv2.resize(src, (s, s), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        color = rng.uniform(0.35, 1.0, 3)
        color /= color.max()
        ink = patch[..., None] * color * rng.uniform(170, 255)
        view = canvas[y0 : y0 + s, x0 : x0 + s]
        np.maximum(view, ink, out=view)
        rows, cols = np.flatnonzero(src.max(axis=1) >= 48), np.flatnonzero(src.max(axis=0) >= 48)
        f = s / 8.0
        boxes.append([x0 + cols[0] * f, y0 + rows[0] * f, x0 + (cols[-1] + 1) * f, y0 + (rows[-1] + 1) * f])
        labels.append(int(d.labels[idx]))
        placed.append((x0, y0, s))
    return boxes, labels


def make_scene(rng: np.random.Generator, pool: np.ndarray) -> Scene:
    """64x64 dark scene with 1-3 digits of 12-24 px; a third are letterboxed (grey bands, as the agent pads)."""
    img = np.full((DET_SIZE, DET_SIZE, 3), float(LETTERBOX_FILL), dtype=np.float32)
    if rng.random() < 0.35:
        short = int(rng.integers(32, 57))
        pad = (DET_SIZE - short) // 2
        region = (0, pad, DET_SIZE, short) if rng.random() < 0.6 else (pad, 0, short, DET_SIZE)
    else:
        region = (0, 0, DET_SIZE, DET_SIZE)
    rx, ry, rw, rh = region
    bg = rng.uniform(0, 45, 3) + rng.normal(0, rng.uniform(0, 6), (rh, rw, 3))
    img[ry : ry + rh, rx : rx + rw] = bg
    content = img[ry : ry + rh, rx : rx + rw]
    boxes, labels = paste_digits(content, (0, 0, rw, rh), int(rng.integers(1, 4)), (12, 24), pool, rng)
    boxes_arr = np.array(boxes, dtype=np.float32).reshape(-1, 4) + np.array([rx, ry, rx, ry], dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image, boxes_arr, np.array(labels, dtype=np.int64))


def detector_targets(scene: Scene) -> np.ndarray:
    """(8, 8, 16): objectness target, box mask, cx, cy, w, h (px), one-hot class (10)."""
    t = np.zeros((DET_GRID, DET_GRID, 16), dtype=np.float32)
    cells: list[tuple[int, int, int]] = []
    for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        gx, gy = min(int(cx // DET_STRIDE), DET_GRID - 1), min(int(cy // DET_STRIDE), DET_GRID - 1)
        cells.append((k, gx, gy))
    neighbours = []
    for k, gx, gy in cells:
        x0, y0, x1, y1 = scene.boxes[k]
        fx, fy = (x0 + x1) / 2 / DET_STRIDE - gx, (y0 + y1) / 2 / DET_STRIDE - gy
        neighbours += [(k, gx + (1 if fx >= 0.5 else -1), gy), (k, gx, gy + (1 if fy >= 0.5 else -1))]
    for (k, gx, gy), obj in [(c, 1.0) for c in cells] + [(c, DET_NEIGHBOUR_OBJ) for c in neighbours]:
        if not (0 <= gx < DET_GRID and 0 <= gy < DET_GRID) or t[gy, gx, 1] > 0:
            continue
        x0, y0, x1, y1 = scene.boxes[k]
        t[gy, gx, 0] = obj
        t[gy, gx, 1] = 1.0
        t[gy, gx, 2:6] = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
        t[gy, gx, 6 + scene.labels[k]] = 1.0
    return t


def detector_model(batch_size: int | None) -> Any:
    import keras
    from keras import layers

    def block(x: Any, ch: int) -> Any:
        x = layers.Conv2D(ch, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x)

    inp = keras.Input((DET_SIZE, DET_SIZE, 3), batch_size=batch_size, name="image")
    x = inp
    for ch in (16, 32, 48):
        x = layers.MaxPooling2D()(block(x, ch))
    x = block(block(x, 64), 64)
    out = layers.Conv2D(15, 1, name="head")(x)
    return keras.Model(inp, out, name="digits_detector")


def grid_xy() -> np.ndarray:
    gy, gx = np.meshgrid(np.arange(DET_GRID), np.arange(DET_GRID), indexing="ij")
    return np.stack([gx, gy], axis=-1).astype(np.float32)  # (8, 8, 2): x, y of each cell


def detector_loss(y_true: Any, y_pred: Any) -> Any:
    tf = tf_module()
    grid = tf.constant(grid_xy())
    xy = (tf.sigmoid(y_pred[..., 0:2]) * 2.0 - 0.5 + grid) * DET_STRIDE
    wh = tf.square(tf.sigmoid(y_pred[..., 2:4]) * 2.0) * DET_ANCHOR
    obj_t, mask = y_true[..., 0], y_true[..., 1]
    bxy, bwh, cls_t = y_true[..., 2:4], y_true[..., 4:6], y_true[..., 6:16]
    npos = tf.maximum(tf.reduce_sum(mask, axis=[1, 2]), 1.0)
    l_obj = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=obj_t, logits=y_pred[..., 4]), axis=[1, 2])
    l1 = tf.reduce_sum(tf.abs(xy - bxy) + tf.abs(wh - bwh), axis=-1) / DET_STRIDE
    p0, p1 = xy - wh / 2, xy + wh / 2
    t0, t1 = bxy - bwh / 2, bxy + bwh / 2
    inter = tf.reduce_prod(tf.maximum(tf.minimum(p1, t1) - tf.maximum(p0, t0), 0.0), axis=-1)
    union = tf.reduce_prod(wh, axis=-1) + tf.reduce_prod(bwh, axis=-1) - inter
    iou = inter / tf.maximum(union, 1e-6)
    l_box = tf.reduce_sum(mask * (l1 + (1.0 - iou)), axis=[1, 2]) / npos
    ce = tf.nn.softmax_cross_entropy_with_logits(labels=cls_t, logits=y_pred[..., 5:15])
    l_cls = tf.reduce_sum(mask * ce, axis=[1, 2]) / npos
    return DET_LOSS_WEIGHTS[0] * l_obj + DET_LOSS_WEIGHTS[1] * l_box + DET_LOSS_WEIGHTS[2] * l_cls


def detector_to_onnx(model: Any) -> tuple[Any, list[str]]:
    """Float ONNX: NCHW image -> (1, 64, 15) decoded rows cx, cy, w, h (px), objectness, 10 class probabilities.

    Also returns the names of the decode nodes (after the last convolution).
    """
    g = OnnxGraph()
    raw = keras_to_onnx_body(g, model, "image", (DET_SIZE, DET_SIZE, 3), final_activation=True)
    first_head = len(g.nodes)
    cells = DET_GRID * DET_GRID
    r = g.op("Reshape", [raw, g.const("shape", np.array([1, 15, cells], dtype=np.int64))])
    t = g.op("Transpose", [r], perm=[0, 2, 1])

    def part(lo: int, hi: int) -> str:
        return g.op(
            "Slice",
            [
                t,
                g.const("starts", np.array([lo], np.int64)),
                g.const("ends", np.array([hi], np.int64)),
                g.const("axes", np.array([2], np.int64)),
            ],
        )

    offset = ((grid_xy().reshape(1, cells, 2) - 0.5) * DET_STRIDE).astype(np.float32)
    xy = g.op(
        "Add",
        [
            g.op("Mul", [g.op("Sigmoid", [part(0, 2)]), g.const("xy_gain", np.float32(2 * DET_STRIDE))]),
            g.const("grid_offset", offset),
        ],
    )
    s_wh = g.op("Sigmoid", [part(2, 4)])
    wh = g.op("Mul", [g.op("Mul", [s_wh, s_wh]), g.const("wh_gain", np.float32(4 * DET_ANCHOR))])
    obj = g.op("Sigmoid", [part(4, 5)])
    cls = g.op("Softmax", [part(5, 15)], axis=-1)
    g.op("Concat", [xy, wh, obj, cls], output="detections", axis=-1)
    model = g.model(("image", [1, 3, DET_SIZE, DET_SIZE]), ("detections", [1, cells, 15]), "digits detector, YOLO rows")
    return model, [n.name for n in g.nodes[first_head:]]


def decode_numpy(raw: np.ndarray) -> np.ndarray:
    """Keras raw head (N, 8, 8, 15) -> (N, 64, 15), the same decode as the ONNX graph."""
    sigm = 1 / (1 + np.exp(-raw))
    xy = (sigm[..., 0:2] * 2 - 0.5 + grid_xy()) * DET_STRIDE
    wh = (sigm[..., 2:4] * 2) ** 2 * DET_ANCHOR
    out = np.concatenate([xy, wh, sigm[..., 4:5], softmax(raw[..., 5:15])], axis=-1)
    return out.reshape(len(raw), -1, 15)


def iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda z: np.prod(z[:, 2:] - z[:, :2], axis=-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def postprocess(rows: np.ndarray, conf: float, iou_thr: float = 0.45, max_det: int = 20) -> np.ndarray:
    """YOLO rows (64, 15) -> (k, 6) x0, y0, x1, y1, score, class after class-aware NMS."""
    scores = rows[:, 4] * rows[:, 5:].max(axis=1)
    cls = rows[:, 5:].argmax(axis=1)
    keep = np.flatnonzero(scores > conf)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], axis=1)
    chosen: list[int] = []
    for i in keep:
        same = [j for j in chosen if cls[j] == cls[i]]
        if same and iou_xyxy(boxes[i : i + 1], boxes[same]).max() > iou_thr:
            continue
        chosen.append(i)
        if len(chosen) == max_det:
            break
    return np.array([[*boxes[i], scores[i], cls[i]] for i in chosen], dtype=np.float64).reshape(-1, 6)


def detection_metrics(outputs: np.ndarray, scenes: list[Scene], score_thr: float = 0.4) -> dict[str, float]:
    """mAP@0.5 (all-point interpolated, class-aware NMS), precision/recall at ``score_thr``, raw duplicates."""
    dets = [postprocess(o, 0.001) for o in outputs]
    aps = []
    for c in range(10):
        records = []
        n_gt = sum(int((s.labels == c).sum()) for s in scenes)
        for img, det in enumerate(dets):
            for row in det[det[:, 5] == c]:
                records.append((row[4], img, row[:4]))
        records.sort(key=lambda r: -r[0])
        used: set[tuple[int, int]] = set()
        tp = np.zeros(len(records))
        for i, (_, img, box) in enumerate(records):
            gt_idx = np.flatnonzero(scenes[img].labels == c)
            if len(gt_idx):
                ious = iou_xyxy(box[None], scenes[img].boxes[gt_idx])[0]
                best = int(ious.argmax())
                if ious[best] >= 0.5 and (img, gt_idx[best]) not in used:
                    used.add((img, gt_idx[best]))
                    tp[i] = 1
        if n_gt == 0:
            continue
        ctp = np.cumsum(tp)
        recall = ctp / n_gt
        precision = ctp / np.arange(1, len(records) + 1)
        mrec = np.concatenate([[0], recall, [1]])
        mpre = np.concatenate([[0], precision, [0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.flatnonzero(mrec[1:] != mrec[:-1])
        aps.append(float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])))
    tp = fp = n_gt = 0
    raw_per_object = []
    for o, s in zip(outputs, scenes, strict=True):
        det = postprocess(o, score_thr)
        n_gt += len(s.labels)
        matched: set[int] = set()
        for row in det:
            ious = iou_xyxy(row[None, :4], s.boxes)[0] if len(s.boxes) else np.zeros(0)
            j = int(ious.argmax()) if len(ious) else -1
            if j >= 0 and ious[j] >= 0.5 and s.labels[j] == int(row[5]) and j not in matched:
                matched.add(j)
                tp += 1
            else:
                fp += 1
        scores = o[:, 4] * o[:, 5:].max(axis=1)
        boxes = np.concatenate([o[:, :2] - o[:, 2:4] / 2, o[:, :2] + o[:, 2:4] / 2], axis=1)
        if len(s.boxes):
            ious = iou_xyxy(boxes[scores > 0.3], s.boxes)
            raw_per_object += list((ious >= 0.5).sum(axis=0))
    return {
        "map50": round(float(np.mean(aps)), 4),
        "precision": round(tp / max(tp + fp, 1), 4),
        "recall": round(tp / max(n_gt, 1), 4),
        "raw_candidates_per_object": round(float(np.mean(raw_per_object)), 3),
    }


def scene_batch(name: str, n: int, pool: np.ndarray) -> list[Scene]:
    rng = rng_for(name)
    return [make_scene(rng, pool) for _ in range(n)]


def det_input(image: np.ndarray) -> np.ndarray:
    """(64, 64, 3) uint8 RGB -> (1, 3, 64, 64) float pixel/255."""
    return (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def letterbox(image: np.ndarray, size: int = DET_SIZE) -> np.ndarray:
    h, w = image.shape[:2]
    scale = min(size / w, size / h)
    nw, nh = round(w * scale), round(h * scale)
    interp = cv2.INTER_AREA if w > nw and h > nh else cv2.INTER_LINEAR  # as agent/processing/image.py
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.full((size, size, 3), LETTERBOX_FILL, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def write_scene_pngs() -> tuple[list[Path], list[np.ndarray], list[list[int]]]:
    """Three 128x96 RGB scenes (digits 28-44 px, test split); returns paths, letterboxed model inputs, labels."""
    INPUTS.mkdir(parents=True, exist_ok=True)
    rng = rng_for("detector-sample-scenes")
    d = digits()
    paths, inputs, truth = [], [], []
    for i in range(3):
        canvas = rng.uniform(0, 40, 3) + rng.normal(0, 3, (96, 128, 3))
        canvas = canvas.astype(np.float32)
        truth.append(paste_digits(canvas, (4, 4, 120, 88), 2 + i % 2, (28, 44), d.test, rng)[1])
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        p = INPUTS / f"scene_{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        paths.append(p)
        inputs.append(det_input(letterbox(image)))
    return paths, inputs, truth


def build_detector() -> Report:
    report = Report("digits-detector")
    d = digits()
    train_scenes = scene_batch("detector-train", DET_TRAIN_SCENES, d.train)
    test_scenes = scene_batch("detector-test", 500, d.test)
    x = np.stack([s.image for s in train_scenes])
    y = np.stack([detector_targets(s) for s in train_scenes])
    log(f"training digits detector on {len(x)} scenes")
    model, infer = train("detector", detector_model, (x, y), 64, DET_EPOCHS, detector_loss, 2e-3, 1 / 255)

    x_test = np.stack([det_input(s.image)[0] for s in test_scenes])
    float_model, head = detector_to_onnx(infer)
    float_bytes = float_model.SerializeToString()
    float_out = run_batch(OnnxRunner(float_bytes), x_test)[0]
    keras_out = decode_numpy(model.predict(x_test.transpose(0, 2, 3, 1), batch_size=50, verbose=0))
    diff = float(np.abs(float_out - keras_out).max())
    assert diff < 1e-3, f"float ONNX detector disagrees with Keras by {diff}"
    report.notes.append(f"float ONNX vs Keras+numpy decode: max |diff| {diff:.2g}")

    calib = np.stack([det_input(s.image)[0] for s in train_scenes[:300]])
    data = quantize_onnx_qdq(float_model, calib, exclude=head)  # the decode stays float
    runner = OnnxRunner(data)
    int8_out = run_batch(runner, x_test)[0]
    m_float = detection_metrics(float_out, test_scenes)
    m_int8 = detection_metrics(int8_out, test_scenes)
    report.accuracy = {f"{k}_float": v for k, v in m_float.items()} | {f"{k}_int8": v for k, v in m_int8.items()}
    report.notes.append(f"held-out scenes: {len(test_scenes)} ({sum(len(s.labels) for s in test_scenes)} digits)")

    meta: dict[str, Any] = {
        "schema_version": 1,
        "name": report.name,
        "version": VERSION,
        "task": "detection",
        "model": "digits_det_int8.onnx",
        "description": (
            "Finds handwritten digits in 64x64 RGB scenes: fully-convolutional, 8x8 grid, decoded in the graph to "
            "YOLO rows (cx, cy, w, h in input pixels, objectness, 10 class probabilities); ONNX int8 QDQ."
        ),
        "hardware": [],
        "labels": DIGIT_LABELS,
        "input": {
            "kind": "image",
            "layout": "NCHW",
            "size": [DET_SIZE, DET_SIZE],
            "color": "rgb",
            "resize": "letterbox",
            "letterbox_fill": LETTERBOX_FILL,
            "mean": [0.0],
            "std": [255.0],
        },
        "thresholds": {"score": 0.4},
        "detection": {
            "format": "yolo",
            "objectness": True,
            "box_format": "cxcywh",
            "normalized_boxes": False,
            "iou_threshold": 0.45,
            "max_detections": 20,
        },
        "baseline": {
            "inputs": {"image": tensor_stats(x_test, 1)},
            "outputs": {"detections": tensor_stats(int8_out, -1)},
        },
        "budget": {"latency_ms": LATENCY_BUDGET_MS},
        "accuracy": {
            "map50_float": m_float["map50"],
            "map50_int8": m_int8["map50"],
            "precision_float": m_float["precision"],
            "recall_float": m_float["recall"],
            "precision_int8": m_int8["precision"],
            "recall_int8": m_int8["recall"],
            "raw_candidates_per_object_int8": m_int8["raw_candidates_per_object"],
            "test_scenes": float(len(test_scenes)),
        },
    }
    scene_paths, scene_inputs, scene_truth = write_scene_pngs()
    golden = [*scene_inputs, det_input(test_scenes[0].image)]
    write_bundle(report.name, meta["model"], data, "onnx", meta, golden, None, report)
    report.latency_ms["float .onnx (not shipped)"] = OnnxRunner(float_bytes).latency_ms(golden[:1])
    report.files += scene_paths
    for i, x_in in enumerate(scene_inputs):
        det = postprocess(runner.run([x_in])[0][0], 0.4)
        found = ", ".join(f"{int(r[5])}@({r[0]:.0f},{r[1]:.0f},{r[2]:.0f},{r[3]:.0f}) {r[4]:.2f}" for r in det)
        report.notes.append(f"scene_{i}.png (digits {scene_truth[i]}) int8 detections: {found or 'none'}")
    return report


# --------------------------------------------------------------------------------------------------------------------
# 6: runtime test fixtures


def build_fixtures() -> Report:
    tf = tf_module()
    report = Report("fixtures")
    FIXTURES.mkdir(parents=True, exist_ok=True)

    def convert(fn: Any, custom: bool = False, quant_io: Any = None, rep: Any = None) -> bytes:
        module = tf.Module()
        module.fn = fn
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], module)
        conv.allow_custom_ops = custom
        if quant_io is not None:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = rep
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = quant_io
            conv.inference_output_type = quant_io
        return conv.convert()

    @tf.function(
        input_signature=[tf.TensorSpec((1, 4), tf.float32, name="a"), tf.TensorSpec((1, 2, 3), tf.float32, name="b")]
    )
    def multi_io(a: Any, b: Any) -> Any:
        total = a * 2.0 + tf.reduce_sum(b, axis=[1, 2])[:, None]
        return {"sum": total, "concat": tf.concat([a, tf.reshape(b, (1, 6))], axis=1)}

    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
    def dynamic(x: Any) -> Any:
        return {"y": tf.tanh(tf.matmul(x, w) + 0.5)}

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32, name="x")])
    def custom(x: Any) -> Any:
        return {"y": tf.math.bessel_i0e(x) * 2.0}  # BesselI0e: no TFLite builtin -> custom op

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32, name="x")])
    def small_dense(x: Any) -> Any:
        return {"y": tf.nn.relu(tf.matmul(x, w) + 0.1)}

    rng = rng_for("fixtures")
    reps = [rng.uniform(0, 1, (1, 4)).astype(np.float32) for _ in range(64)]

    def rep() -> Any:
        for r in reps:
            yield [r]

    files: dict[str, bytes] = {}
    data = convert(multi_io)
    probe = TFLiteRunner(data)
    outs = [o.name for o in probe.outputs]
    shapes = [o.shape for o in probe.outputs]
    out_names = ["sum" if s == (1, 4) else "concat" for s in shapes]
    in_names = ["a" if i.shape == (1, 4) else "b" for i in probe.inputs]
    files["multi_io.tflite"] = rename_tflite_io(data, in_names, out_names)
    report.notes.append(
        f"multi_io: converter names in {[i.name for i in probe.inputs]} out {outs}, renamed {in_names} {out_names}"
    )
    files["dynamic_batch.tflite"] = rename_tflite_io(convert(dynamic), ["x"], ["y"])
    files["custom_op.tflite"] = convert(custom, custom=True)
    try:
        files["uint8_io.tflite"] = rename_tflite_io(convert(small_dense, quant_io=tf.uint8, rep=rep), ["x"], ["y"])
    except Exception as exc:  # report and skip: newer converters may refuse uint8 I/O
        report.notes.append(f"uint8_io.tflite skipped: converter says {exc}")
    for name, blob in files.items():
        path = FIXTURES / name
        path.write_bytes(blob)
        report.files.append(path)
        assert len(blob) < 50_000, f"{name} is {len(blob)} bytes"
    report.notes += check_fixtures()
    return report


def check_fixtures() -> list[str]:
    """Load each fixture with ai-edge-litert; custom_op.tflite must fail."""
    notes = []
    for path in sorted(FIXTURES.glob("*.tflite")):
        try:
            r = TFLiteRunner(path)
        except (RuntimeError, ValueError) as exc:
            msg = " ".join(str(exc).split())
            assert path.name == "custom_op.tflite", f"{path.name} does not load: {msg}"
            notes.append(f"{path.name}: fails as intended: {msg}")
            continue
        assert path.name != "custom_op.tflite", "custom_op.tflite unexpectedly loads"
        sigs = r.interp.get_signature_list()
        dyn = [[int(v) for v in d["shape_signature"]] for d in r._in]
        outs = r.run([np.full(t.shape, 0.5, dtype=np.float32) for t in r.inputs])
        notes.append(
            f"{path.name}: in {[t.describe() for t in r.inputs]} (signature {dyn}), "
            f"out {[t.describe() for t in r.outputs]}, run ok {[o.shape for o in outs]}; signatures {sigs}"
        )
    return notes


# --------------------------------------------------------------------------------------------------------------------
# --verify: reload everything with the runtimes only


def verify() -> int:
    failures = 0
    for root in sorted(p for p in SAMPLES.iterdir() if (p / "bundle.toml").is_file()):
        meta = tomllib.loads((root / "bundle.toml").read_text(encoding="utf-8"))
        try:
            sys.path.insert(0, str(ROOT))
            from agent.bundle import load_bundle

            load_bundle(root)
            schema = "schema ok"
        except ImportError:
            schema = "schema not checked (pydantic missing)"
        fmt = "tflite" if meta["model"].endswith(".tflite") else "onnx"
        model_path = root / meta["model"]
        atol, rtol = meta["golden"]["atol"], meta["golden"].get("rtol", 0.0)
        with np.load(root / meta["golden"]["file"]) as g:
            ins = [g[k] for k in sorted(g.files) if k.startswith("input_")]
            outs = [g[k] for k in sorted(g.files) if k.startswith("output_")]
        for label, kwargs in [("default", {}), *runtime_variants(fmt)]:
            r = open_model(model_path, fmt, **kwargs)
            worst = 0.0
            for v in range(len(ins[0])):
                got = r.run([a[v] for a in ins])
                for o, want in zip(got, outs, strict=True):
                    worst = max(worst, float(np.max(np.abs(o - want[v]) - rtol * np.abs(want[v]))))
            ok = worst <= atol
            failures += not ok
            print(f"{root.name:26s} {label:30s} max|diff| {worst:.3g} (atol {atol:g}) {'ok' if ok else 'FAIL'}")
        r = open_model(model_path, fmt)
        print(f"{root.name:26s} {schema}; latency 1 thread {r.latency_ms([a[0] for a in ins]):.3f} ms")
        for t in r.inputs:
            print(f"{'':26s} in  {t.describe()}")
        for t in r.outputs:
            print(f"{'':26s} out {t.describe()}")
    if FIXTURES.is_dir():
        for note in check_fixtures():
            print(note)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------------------------


BUILDERS: dict[str, Callable[[], Report]] = {
    "digits-classifier-tflite": build_classifier_tflite,
    "digits-classifier-onnx": build_classifier_onnx,
    "sensor-anomaly": build_sensor_anomaly,
    "digits-detector": build_detector,
    "fixtures": build_fixtures,
}


def print_summary(reports: list[Report], elapsed: float) -> None:
    print("\n" + "=" * 100)
    print(f"{'bundle':26s} {'metric':34s} {'float':>10s} {'int8':>10s}")
    print("-" * 100)
    for rep in reports:
        keys = sorted({k.rsplit("_", 1)[0] if k.endswith(("_float", "_int8")) else k for k in rep.accuracy})
        for key in keys:
            if key in ("float", "int8"):
                continue
            f = rep.accuracy.get(f"{key}_float", rep.accuracy.get(key))
            q = rep.accuracy.get(f"{key}_int8")
            print(f"{rep.name:26s} {key:34s} {_fmt(f):>10s} {_fmt(q):>10s}")
        if "float" in rep.accuracy or "int8" in rep.accuracy:
            print(
                f"{rep.name:26s} {'accuracy':34s} {_fmt(rep.accuracy.get('float')):>10s} "
                f"{_fmt(rep.accuracy.get('int8')):>10s}"
            )
    print("-" * 100)
    for rep in reports:
        for model, ms in rep.latency_ms.items():
            print(f"{rep.name:26s} latency 1 thread {model:34s} {ms:8.3f} ms")
    print("-" * 100)
    for rep in reports:
        for line in rep.io:
            print(f"{rep.name:26s} {line}")
        for f in rep.files:
            print(f"{rep.name:26s} {f.relative_to(ROOT)} ({f.stat().st_size:,} bytes)")
        for note in rep.notes:
            print(f"{rep.name:26s} note: {note}")
    print(f"\nbuilt in {elapsed:.0f}s")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append", help="rebuild only this (repeatable)")
    parser.add_argument("--verify", action="store_true", help="check the built files with the runtimes and exit")
    parser.add_argument(
        "--weights-cache", type=Path, help="development aid: save trained weights here and reuse them on later runs"
    )
    args = parser.parse_args(argv)
    global WEIGHTS_CACHE
    WEIGHTS_CACHE = args.weights_cache
    if args.verify:
        return verify()
    t0 = time.time()
    reports = []
    for name in args.only or list(BUILDERS):
        log(f"building {name}")
        reports.append(BUILDERS[name]())
    print_summary(reports, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
