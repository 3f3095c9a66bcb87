"""ONNX Runtime backend, with a configurable execution-provider order."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import AgentError, InputError, ModelLoadError, RuntimeUnavailable
from agent.runtime.base import Model, ModelInfo, QuantParams, TensorInfo

NAME = "onnxruntime"
DEFAULT_PROVIDERS = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
]
log = structlog.get_logger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorrtOptions(_Options):
    """``TensorrtExecutionProvider`` options (names as ONNX Runtime spells them)."""

    device_id: int | None = Field(default=None, ge=0)
    trt_fp16_enable: bool | None = None
    trt_int8_enable: bool | None = None
    trt_int8_calibration_table_name: str | None = None
    trt_int8_use_native_calibration_table: bool | None = None
    trt_max_workspace_size: int | None = Field(default=None, gt=0)  # bytes
    trt_max_partition_iterations: int | None = Field(default=None, gt=0)
    trt_min_subgraph_size: int | None = Field(default=None, gt=0)
    trt_dla_enable: bool | None = None
    trt_dla_core: int | None = Field(default=None, ge=0)
    trt_engine_cache_enable: bool | None = None
    trt_engine_cache_path: str | None = None
    trt_timing_cache_enable: bool | None = None
    trt_timing_cache_path: str | None = None
    trt_force_sequential_engine_build: bool | None = None
    trt_context_memory_sharing_enable: bool | None = None
    trt_layer_norm_fp32_fallback: bool | None = None
    trt_builder_optimization_level: int | None = Field(default=None, ge=0, le=5)
    trt_auxiliary_streams: int | None = Field(default=None, ge=-1)
    trt_cuda_graph_enable: bool | None = None
    trt_dump_subgraphs: bool | None = None


class CudaOptions(_Options):
    """``CUDAExecutionProvider`` options."""

    device_id: int | None = Field(default=None, ge=0)
    gpu_mem_limit: int | None = Field(default=None, gt=0)  # bytes
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] | None = None
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] | None = None
    do_copy_in_default_stream: bool | None = None
    cudnn_conv_use_max_workspace: bool | None = None
    enable_cuda_graph: bool | None = None
    tunable_op_enable: bool | None = None
    use_tf32: bool | None = None
    prefer_nhwc: bool | None = None


class OpenVINOOptions(_Options):
    """``OpenVINOExecutionProvider`` options."""

    device_type: str | None = None  # CPU, GPU, NPU, GPU.0, HETERO:GPU,CPU, AUTO:GPU,CPU ...
    precision: Literal["FP32", "FP16", "ACCURACY"] | None = None
    num_of_threads: int | None = Field(default=None, gt=0)
    num_streams: int | None = Field(default=None, gt=0)
    cache_dir: str | None = None
    enable_opencl_throttling: bool | None = None
    disable_dynamic_shapes: bool | None = None
    enable_qdq_optimizer: bool | None = None


class CpuOptions(_Options):
    """``CPUExecutionProvider`` takes no options (use ``threads`` for its thread count)."""


# The providers whose options are typed; any other provider takes no options here.
PROVIDER_OPTIONS: dict[str, type[_Options]] = {
    "TensorrtExecutionProvider": TensorrtOptions,
    "CUDAExecutionProvider": CudaOptions,
    "OpenVINOExecutionProvider": OpenVINOOptions,
    "CPUExecutionProvider": CpuOptions,
}
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class OnnxRuntimeConfig(BaseModel):
    """``[runtime] type = "onnxruntime"``: threads, execution providers in order of preference and their options."""

    model_config = ConfigDict(extra="forbid")
    type: str = NAME
    threads: int | None = Field(default=None, gt=0)  # intra-op threads
    inter_op_threads: int | None = Field(default=None, gt=0)  # default 1 when threads is set
    graph_optimization: Literal["disable", "basic", "extended", "all"] | None = None  # default: all
    providers: list[str] = DEFAULT_PROVIDERS
    provider_options: dict[str, dict[str, Any]] = {}

    @field_validator("provider_options")
    @classmethod
    def _typed(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        try:
            check_provider_options(value)
        except AgentError as exc:
            raise ValueError(str(exc)) from None
        return value


def _option_text(value: object) -> str:
    return str(value)  # bools as True/False, which ONNX Runtime's option parsers accept


def check_provider_options(
    options: Mapping[str, Mapping[str, Any]] | None, where: str = "provider_options"
) -> dict[str, dict[str, str]]:
    """Validate per-provider options against their typed models; return them as ONNX Runtime takes them (strings).

    A bad entry raises AgentError with one line naming ``where.PROVIDER.KEY`` and the fix.
    """
    result: dict[str, dict[str, str]] = {}
    for provider, values in (options or {}).items():
        model = PROVIDER_OPTIONS.get(provider)
        if model is None:
            close = difflib.get_close_matches(provider, PROVIDER_OPTIONS, n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"options can be given for {', '.join(PROVIDER_OPTIONS)}"
            raise AgentError(f"{where}.{provider}: unknown execution provider", fix)
        if not isinstance(values, Mapping):
            raise AgentError(f"{where}.{provider}: not a table of options", f"write [{where}.{provider}] key = value")
        try:
            parsed = model.model_validate(dict(values))
        except ValidationError as exc:
            raise _option_error(where, provider, model, exc) from None
        result[provider] = {k: _option_text(v) for k, v in parsed.model_dump(exclude_none=True).items()}
    return result


def _option_error(where: str, provider: str, model: type[_Options], exc: ValidationError) -> AgentError:
    first = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    key = ".".join(str(p) for p in first["loc"])
    known = list(model.model_fields)
    if first["type"] == "extra_forbidden":
        if not known:
            return AgentError(f"{where}.{provider}.{key}: {provider} takes no options", f"remove [{where}.{provider}]")
        close = difflib.get_close_matches(key, known, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)} (see docs/config.md)"
        return AgentError(f"{where}.{provider}.{key}: unknown {provider} option", fix)
    message = str(first["msg"]).removeprefix("Value error, ")
    return AgentError(f"{where}.{provider}.{key}: {message}", f"correct {key!r}")


def session_providers(
    chosen: list[str], provider_options: Mapping[str, Mapping[str, str]] | None
) -> tuple[list[str], list[dict[str, str]]]:
    """The ``providers`` and ``provider_options`` lists for ``InferenceSession``, in the order of ``chosen``."""
    options = provider_options or {}
    return list(chosen), [dict(options.get(p, {})) for p in chosen]


def session_settings(
    threads: int | None, inter_op_threads: int | None, graph_optimization: str | None
) -> dict[str, int | str]:
    """The SessionOptions attributes to set (pure): thread counts and graph optimization level by name."""
    settings: dict[str, int | str] = {}
    if threads:
        settings["intra_op_num_threads"] = threads
        settings["inter_op_num_threads"] = inter_op_threads or 1
    elif inter_op_threads:
        settings["inter_op_num_threads"] = inter_op_threads
    if graph_optimization is not None:
        if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise AgentError(
                f"graph_optimization {graph_optimization!r} is not a level",
                f"use one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}",
            )
        settings["graph_optimization_level"] = graph_optimization
    return settings


_ORT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def probe() -> str:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"onnxruntime is not importable: {exc}", "pip install 'edge-inference-agent[onnx]'"
        ) from None
    return onnxruntime.__version__


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def choose_providers(wanted: list[str] | None, available: list[str]) -> list[str]:
    """Keep the wanted providers that exist here, in order; CPU is always last resort."""
    chosen = [p for p in (wanted or DEFAULT_PROVIDERS) if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def missing_providers(wanted: list[str] | None, chosen: list[str]) -> list[str]:
    """Providers asked for by name (not the built-in default order) that will not run here."""
    return [p for p in (wanted or []) if p not in chosen]


def provider_warning(missing: list[str], chosen: list[str]) -> str:
    """One line naming the requested providers that are missing and what runs instead."""
    names = ", ".join(missing)
    return (
        f"execution provider{'s' if len(missing) > 1 else ''} {names} not available here: "
        f"running on {', '.join(chosen)} instead (see `edge-agent runtimes`)"
    )


_quiet = False


def quiet_logger(ort: Any) -> None:
    """Silence ONNX Runtime's own logger (coloured lines on stderr, even into a pipe): errors reach the user once,
    through our exceptions."""
    global _quiet
    if not _quiet:
        ort.set_default_logger_severity(4)  # fatal only: errors come back as exceptions
        _quiet = True


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's exception text, without its status prefix and source-file locations, on one line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (\S+\([^)]*\)(?: \[with [^]]*\])? )?", "", text)
    return text[:300]


def check_onnx_file(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {path}: {exc.strerror}", "check the path and permissions") from None
    # An ONNX ModelProto starts with field 1 (ir_version, varint: 0x08) in every exporter we know of.
    if not head or head[0] != 0x08:
        raise ModelLoadError(
            f"{path.name} is not an ONNX model (no ModelProto header; corrupt, truncated or another format)",
            "re-export or re-download the model",
        )


def load(
    path: Path,
    threads: int | None = None,
    providers: list[str] | None = None,
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    inter_op_threads: int | None = None,
    graph_optimization: str | None = None,
    delegates: list[str] | None = None,  # TFLite's: a shared setting (profile, CLI) that does not apply to ONNX
) -> OnnxRuntimeModel:
    """Open ``path``; every option reaches the session or is refused here with one line."""
    return OnnxRuntimeModel(
        path,
        threads=threads,
        providers=providers,
        provider_options=provider_options,
        inter_op_threads=inter_op_threads,
        graph_optimization=graph_optimization,
    )


class OnnxRuntimeModel(Model):
    def __init__(
        self,
        path: Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str | None = None,
    ) -> None:
        version = probe()
        import onnxruntime as ort

        typed = check_provider_options(provider_options)
        settings = session_settings(threads, inter_op_threads, graph_optimization)
        check_onnx_file(path)
        quiet_logger(ort)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors reach the user through our exceptions, not ORT's coloured log
        for name, value in settings.items():
            if name == "graph_optimization_level":
                value = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[str(value)])
            setattr(options, name, value)
        chosen = choose_providers(providers, available_providers())
        missing = missing_providers(providers, chosen)
        if missing:
            log.warning(provider_warning(missing, chosen))
        names, per_provider = session_providers(chosen, typed)
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=names, provider_options=per_provider
            )
        except Exception as exc:  # onnxruntime raises its own exception types for every model problem
            raise ModelLoadError(_explain(path, exc), _fix_for(exc)) from None
        quant = _io_quantization(path)
        self.info = ModelInfo(
            path=path,
            format="onnx",
            runtime=NAME,
            runtime_version=version,
            inputs=[_tensor_info(n, i, quant) for i, n in enumerate(self._session.get_inputs())],
            outputs=[_tensor_info(n, i, quant) for i, n in enumerate(self._session.get_outputs())],
            threads=threads,
            providers=list(self._session.get_providers()),
        )
        self._output_names = [t.name for t in self.info.outputs]
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def run_raw(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = {t.name: a for t, a in zip(self.info.inputs, inputs, strict=True)}
        try:
            return list(self._session.run(self._output_names, feed, self._run_options))
        except Exception as exc:  # invalid shapes/types surface as onnxruntime exceptions
            raise InputError(f"inference failed: {ort_message(exc)}", "check the input shapes and dtypes") from None

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _tensor_info(node: Any, index: int, quant: dict[str, QuantParams]) -> TensorInfo:
    dtype = _ORT_DTYPES.get(node.type)
    if dtype is None:
        raise ModelLoadError(f"tensor {node.name!r} has unsupported type {node.type}", "use float or integer tensors")
    shape = tuple(d if isinstance(d, int) else (d or -1) for d in node.shape)
    return TensorInfo(name=node.name, shape=shape, dtype=np.dtype(dtype), quant=quant.get(node.name), index=index)


def _io_quantization(path: Path) -> dict[str, QuantParams]:
    """Scale/zero-point of graph inputs and outputs from the adjacent (De)QuantizeLinear nodes.

    Needs the ``onnx`` package; without it quantization is simply not reported.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        log.debug("onnx not installed: ONNX I/O quantization parameters not reported")
        return {}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    graph = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name}
    for node in graph.node:  # Constant nodes also carry scales in some exporters
        if node.op_type == "Constant" and node.attribute:
            for attr in node.attribute:
                if attr.name == "value":
                    inits[node.output[0]] = numpy_helper.to_array(attr.t)
    input_names = {i.name for i in graph.input} - set(inits)
    output_names = {o.name for o in graph.output}
    result: dict[str, QuantParams] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in input_names:
            params = _params(node, inits)
            if params:
                result.setdefault(node.input[0], params)
        elif node.op_type == "QuantizeLinear" and node.output[0] in output_names:
            params = _params(node, inits)
            if params:
                result.setdefault(node.output[0], params)
        elif node.op_type == "QuantizeLinear" and node.input[0] in input_names:
            params = _params(node, inits, in_graph=True)
            if params:
                result.setdefault(node.input[0], params)
        elif node.op_type == "DequantizeLinear" and node.output[0] in output_names:
            params = _params(node, inits, in_graph=True)
            if params:
                result.setdefault(node.output[0], params)
    return result


def _params(node: Any, inits: dict[str, np.ndarray], in_graph: bool = False) -> QuantParams | None:
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return None
    zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    scale = np.atleast_1d(scale).astype(np.float64)
    zero = np.zeros(scale.shape, dtype=np.int64) if zero is None else np.atleast_1d(zero).astype(np.int64)
    axis = None
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return QuantParams(tuple(float(s) for s in scale), tuple(int(z) for z in zero), axis, in_graph=in_graph)


def _explain(path: Path, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "ir version" in lowered:
        return f"{path.name} uses an ONNX IR version this onnxruntime cannot read: {text[:300]}"
    if (
        "not a registered function/op" in lowered
        or "could not find an implementation" in lowered
        or "no opset import" in lowered
    ):
        return f"{path.name} needs an operator onnxruntime does not provide: {text[:300]}"
    if "protobuf" in lowered:
        return f"{path.name} is not a valid ONNX model (corrupt or truncated): {text[:200]}"
    return f"{path.name} could not be loaded by onnxruntime: {text[:300]}"


def _fix_for(exc: BaseException) -> str:
    lowered = str(exc).lower()
    if "ir version" in lowered:
        return "re-export with a lower ir_version (e.g. model.ir_version = 10) or upgrade onnxruntime"
    if "not a registered function/op" in lowered or "could not find an implementation" in lowered:
        return "re-export the model with standard ONNX ops at an opset this onnxruntime supports"
    return "re-export or re-download the model"
