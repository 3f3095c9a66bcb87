"""Small ONNX models built in tests with onnx.helper (real models, run by real onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 18)]


def _save(model: onnx.ModelProto, path: Path, ir_version: int = 9) -> Path:
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path


def float_image_classifier(path: Path, channels: int = 3, size: int = 8, classes: int = 4, nchw: bool = True) -> Path:
    """Image (N,C,H,W) or (N,H,W,C) float -> mean per channel -> MatMul -> (N, classes) logits."""
    shape = [1, channels, size, size] if nchw else [1, size, size, channels]
    axes = [2, 3] if nchw else [1, 2]
    weight = np.arange(channels * classes, dtype=np.float32).reshape(channels, classes) / 10.0
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ],
        "clf",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(np.asarray(axes, dtype=np.int64), "axes"), numpy_helper.from_array(weight, "w")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def multi_io(path: Path) -> Path:
    """Two inputs (one with a symbolic batch dim), two outputs."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "a"], ["doubled"]),
            helper.make_node("ReduceSum", ["b"], ["total"], keepdims=1),
        ],
        "multi",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2, 3]),
        ],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1, 1]),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def int8_io(path: Path, per_channel: bool = False) -> Path:
    """int8 input -> DequantizeLinear -> Relu -> QuantizeLinear -> int8 output (quantized I/O)."""
    scale = np.asarray([0.05, 0.1, 0.2], dtype=np.float32) if per_channel else np.asarray(0.05, dtype=np.float32)
    zero = np.asarray([3, -2, 0], dtype=np.int8) if per_channel else np.asarray(3, dtype=np.int8)
    out_scale, out_zero = np.asarray(0.1, dtype=np.float32), np.asarray(-128, dtype=np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"], axis=1),
            helper.make_node("Relu", ["xf"], ["yf"]),
            helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["y"]),
        ],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [1, 3, 4])],
        [
            numpy_helper.from_array(scale, "x_scale"),
            numpy_helper.from_array(zero, "x_zero"),
            numpy_helper.from_array(out_scale, "y_scale"),
            numpy_helper.from_array(out_zero, "y_zero"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def custom_op(path: Path) -> Path:
    """Needs an operator no runtime provides."""
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example.missing")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[*OPSET, helper.make_opsetid("com.example.missing", 1)])
    return _save(model, path)


def yolo_like(path: Path, rows: np.ndarray) -> Path:
    """A 'detector' whose output is the constant YOLO rows given (input is ignored but required)."""
    rows = rows.astype(np.float32)[np.newaxis]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["image"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["z"]),
            helper.make_node("Add", ["rows", "z"], ["output"]),
        ],
        "yolo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(rows.shape))],
        [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(np.asarray(0, dtype=np.float32), "zero")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def slow_on_demand(path: Path, width: int = 4, base_trips: int = 0) -> Path:
    """(1, width) float -> (1, 1): runs a Loop whose trip count is the input's max value plus ``base_trips``.

    Normal inputs (1.0) are instant; a large value makes one inference take seconds: a real stall. ``base_trips``
    makes every inference slow (each trip is a few microseconds, run one after the other on any machine).
    """
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.asarray([1.0], dtype=np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
            helper.make_node("Add", ["mx", "base"], ["mx_base"]),
            helper.make_node("Cast", ["mx_base"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "cond", "acc0"], ["acc"], body=body),
            helper.make_node("Reshape", ["acc", "shape"], ["y"]),
        ],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [
            numpy_helper.from_array(np.asarray(True), "cond"),
            numpy_helper.from_array(np.asarray([0.0], dtype=np.float32), "acc0"),
            numpy_helper.from_array(np.asarray([1, 1], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.asarray(float(base_trips), dtype=np.float32), "base"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def digits_shaped(path: Path, mode: str) -> Path:
    """Float (1, 32, 32, 1) image -> (1, 10) scores, like the sample digit classifier; ``mode`` makes it bad:
    ``nan`` returns NaN for every input, ``slow`` spends tens of milliseconds in MatMuls per inference."""
    inits = [numpy_helper.from_array(np.asarray([1, 1024], dtype=np.int64), "flat")]
    nodes = [helper.make_node("Reshape", ["image", "flat"], ["x"])]
    if mode == "nan":
        inits.append(numpy_helper.from_array(np.zeros((1024, 10), dtype=np.float32), "w"))
        inits.append(numpy_helper.from_array(np.ones((1, 10), dtype=np.float32), "one"))
        nodes += [
            helper.make_node("MatMul", ["x", "w"], ["zeros"]),
            helper.make_node("Sub", ["zeros", "one"], ["minus_one"]),
            helper.make_node("Log", ["minus_one"], ["probabilities"]),
        ]
    elif mode == "slow":
        rng = np.random.default_rng(0)
        inits += [
            numpy_helper.from_array(np.asarray([384, 1024], dtype=np.int64), "rows"),
            numpy_helper.from_array((rng.standard_normal((1024, 1024)) / 32).astype(np.float32), "big"),
            numpy_helper.from_array((rng.standard_normal((1024, 10)) / 32).astype(np.float32), "head"),
            numpy_helper.from_array(np.asarray([0], dtype=np.int64), "axis0"),
        ]
        nodes += [
            helper.make_node("Expand", ["x", "rows"], ["wide"]),
            helper.make_node("MatMul", ["wide", "big"], ["h1"]),
            helper.make_node("MatMul", ["h1", "big"], ["h2"]),
            helper.make_node("MatMul", ["h2", "big"], ["h3"]),
            helper.make_node("ReduceMean", ["h3", "axis0"], ["pooled"], keepdims=1),
            helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ]
    else:
        raise ValueError(mode)
    graph = helper.make_graph(
        nodes,
        f"digits_{mode}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 32, 32, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)
