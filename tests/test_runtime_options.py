"""Typed runtime options: every provider/session option reaches ONNX Runtime or is refused with one line."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from agent.errors import AgentError
from agent.profiles import ProfileError, builtin_dir, load_profile, load_profiles
from agent.runtime import load_model
from agent.runtime import onnxruntime as backend
from tests import onnx_models

ROOT = Path(__file__).resolve().parent.parent
TRT_JETSON = {
    "trt_fp16_enable": "True",
    "trt_engine_cache_enable": "True",
    "trt_engine_cache_path": "/var/lib/edge-agent/trt-cache",
}


@pytest.mark.parametrize("directory", [ROOT / "firmware-profiles", ROOT / "agent" / "firmware_profiles"])
@pytest.mark.parametrize("board", ["jetson-nano", "jetson-orin-nano"])
def test_jetson_tensorrt_settings_come_out_of_the_builder_exactly(directory: Path, board: str) -> None:
    prefs = load_profiles(directory)[board].runtime
    typed = backend.check_provider_options(prefs.provider_options)
    providers, options = backend.session_providers(prefs.providers, typed)
    assert providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options == [TRT_JETSON, {}, {}]


def test_builder_keeps_the_chosen_order_and_drops_options_of_providers_not_running() -> None:
    typed = backend.check_provider_options(
        {
            "CUDAExecutionProvider": {"device_id": 1, "arena_extend_strategy": "kSameAsRequested"},
            "OpenVINOExecutionProvider": {"device_type": "GPU", "precision": "FP16", "num_of_threads": 2},
            "TensorrtExecutionProvider": {"trt_max_workspace_size": 1 << 30, "trt_fp16_enable": False},
        }
    )
    providers, options = backend.session_providers(
        ["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], typed
    )
    assert providers == ["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options == [
        {"device_type": "GPU", "precision": "FP16", "num_of_threads": "2"},
        {"device_id": "1", "arena_extend_strategy": "kSameAsRequested"},
        {},
    ]
    assert typed["TensorrtExecutionProvider"] == {"trt_max_workspace_size": str(1 << 30), "trt_fp16_enable": "False"}


@pytest.mark.parametrize(
    ("options", "names", "fix"),
    [
        ({"TensorrtExecutionProvider": {"trt_fp16": True}}, "TensorrtExecutionProvider.trt_fp16", "trt_fp16_enable"),
        ({"CUDAExecutionProvider": {"device": 0}}, "CUDAExecutionProvider.device", "device_id"),
        ({"CPUExecutionProvider": {"arena_extend_strategy": "x"}}, "takes no options", "remove"),
        (
            {"TensorRTExecutionProvider": {}},
            "TensorRTExecutionProvider: unknown execution",
            "TensorrtExecutionProvider",
        ),
        ({"TensorrtExecutionProvider": {"trt_max_workspace_size": "big"}}, "trt_max_workspace_size", "correct"),
        ({"CUDAExecutionProvider": {"cudnn_conv_algo_search": "FAST"}}, "cudnn_conv_algo_search", "correct"),
    ],
)
def test_bad_provider_option_is_refused_in_one_line(options: dict, names: str, fix: str) -> None:
    with pytest.raises(AgentError) as info:
        backend.check_provider_options(options)
    assert names in info.value.problem
    assert fix in (info.value.fix or "")
    assert "\n" not in str(info.value)


def test_profile_with_unknown_provider_option_is_refused_at_load(tmp_path: Path) -> None:
    text = (builtin_dir() / "jetson-nano.toml").read_text()
    bad = tmp_path / "jetson-nano.toml"
    bad.write_text(text.replace("trt_fp16_enable = true", "trt_fp16 = true"))
    with pytest.raises(ProfileError) as info:
        load_profile(bad)
    message = str(info.value)
    assert str(bad) in message and "runtime.provider_options.TensorrtExecutionProvider.trt_fp16" in message
    assert "did you mean 'trt_fp16_enable'?" in message and "\n" not in message


def test_session_settings_are_pure() -> None:
    assert backend.session_settings(None, None, None) == {}
    assert backend.session_settings(4, None, "basic") == {
        "intra_op_num_threads": 4,
        "inter_op_num_threads": 1,
        "graph_optimization_level": "basic",
    }
    assert backend.session_settings(None, 2, None) == {"inter_op_num_threads": 2}
    with pytest.raises(AgentError, match="graph_optimization 'fast'"):
        backend.session_settings(None, None, "fast")


def test_options_arrive_in_a_real_session(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "clf.onnx")
    with load_model(
        path,
        runtime="onnxruntime",
        threads=2,
        providers=["CPUExecutionProvider"],
        provider_options={"CPUExecutionProvider": {}},
        inter_op_threads=3,
        graph_optimization="extended",
        warm_up=False,
    ) as model:
        session = model._session  # type: ignore[attr-defined]
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert session.get_provider_options() == {"CPUExecutionProvider": {}}
        settings = session.get_session_options()
        assert settings.intra_op_num_threads == 2 and settings.inter_op_num_threads == 3
        assert settings.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def test_jetson_profile_options_load_here_and_fall_back_to_cpu(tmp_path: Path) -> None:
    """TensorRT is absent here: the session runs on CPU (the missing provider is warned about elsewhere)."""
    path = onnx_models.float_image_classifier(tmp_path / "clf.onnx")
    prefs = load_profiles(builtin_dir())["jetson-orin-nano"].runtime
    with load_model(
        path, runtime="onnxruntime", providers=prefs.providers, provider_options=prefs.provider_options, warm_up=False
    ) as model:
        assert model.info.providers[-1] == "CPUExecutionProvider"


def test_unknown_option_is_refused_before_the_session_is_made(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "clf.onnx")
    with pytest.raises(AgentError, match=r"CPUExecutionProvider\.bogus: CPUExecutionProvider takes no options"):
        load_model(path, runtime="onnxruntime", provider_options={"CPUExecutionProvider": {"bogus": 1}})


def test_runtime_config_models_validate_options() -> None:
    config = backend.OnnxRuntimeConfig(provider_options={"TensorrtExecutionProvider": {"trt_fp16_enable": True}})
    assert config.provider_options == {"TensorrtExecutionProvider": {"trt_fp16_enable": True}}
    with pytest.raises(ValueError, match="trt_fp16_enable"):
        backend.OnnxRuntimeConfig(provider_options={"TensorrtExecutionProvider": {"trt_fp16": True}})


def test_profile_and_pipeline_session_options_reach_the_session(tmp_path: Path) -> None:
    """agent.toml's [pipelines.NAME] settings win over the firmware profile's; both reach ONNX Runtime."""
    from agent.config import parse_config
    from agent.daemon import Daemon

    profile_text = (builtin_dir() / "x86_64.toml").read_text()
    profile_text = profile_text.replace(
        "[runtime]\n", '[runtime]\ngraph_optimization = "basic"\ninter_op_threads = 2\n'
    )
    (tmp_path / "x86_64.toml").write_text(profile_text)
    profile = load_profile(tmp_path / "x86_64.toml")
    model = onnx_models.float_image_classifier(tmp_path / "clf.onnx")
    pipe = {"source": "s", "model": str(model), "runtime": "onnxruntime", "threads": 2}
    config = parse_config(
        {
            "sources": {"s": {"type": "synthetic", "kind": "image"}},
            "pipelines": {"a": pipe, "b": pipe | {"inter_op_threads": 3, "graph_optimization": "disable"}},
        }
    )
    daemon = Daemon(config)
    daemon.profile = profile
    expected = {
        "a": (2, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "b": (3, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    }
    for name, (inter_op, level) in expected.items():
        predictor = daemon.open_predictor(config.pipelines[name])
        try:
            settings = predictor.model._session.get_session_options()  # type: ignore[attr-defined]
            assert settings.intra_op_num_threads == 2
            assert (settings.inter_op_num_threads, settings.graph_optimization_level) == (inter_op, level)
            assert predictor.load_args["inter_op_threads"] == inter_op
        finally:
            predictor.close()


def test_pipeline_provider_options_are_typed_in_agent_toml() -> None:
    from agent.config import ConfigError, parse_config

    pipe = {"source": "s", "model": "m.onnx", "providers": ["TensorrtExecutionProvider"]}
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "sources": {"s": {"type": "synthetic", "kind": "image"}},
                "pipelines": {"p": pipe | {"provider_options": {"TensorrtExecutionProvider": {"trt_fp16": True}}}},
            }
        )
    assert "pipelines.p.provider_options.TensorrtExecutionProvider.trt_fp16" in info.value.problem
    assert info.value.fix == "did you mean 'trt_fp16_enable'?"


def test_delegate_specs_carry_library_and_options() -> None:
    from agent.runtime.tflite_common import DelegateSpec, delegate_specs

    specs = delegate_specs(
        [
            "libedgetpu.so.1",
            {"library": "libedgetpu.so.1", "options": {"device": "usb:0"}},
            DelegateSpec(library="libgpu.so", options={"enable_quantized_inference": True, "priority": 2}),
        ]
    )
    assert specs == [
        ("libedgetpu.so.1", {}),
        ("libedgetpu.so.1", {"device": "usb:0"}),
        ("libgpu.so", {"enable_quantized_inference": "true", "priority": "2"}),
    ]


@pytest.mark.parametrize(
    ("entry", "names"),
    [
        ({"lib": "x.so"}, "delegates.0.lib: unknown key"),
        ({"options": {}}, "delegates.0.library"),
        ({"library": "x.so", "options": {"a": [1]}}, "delegates.0.options.a: not a string"),
    ],
)
def test_bad_delegate_entry_is_refused_in_one_line(entry: dict, names: str) -> None:
    from agent.runtime.tflite_common import delegate_specs

    with pytest.raises(AgentError) as info:
        delegate_specs([entry])
    assert names in info.value.problem and "\n" not in str(info.value)


def test_delegate_with_options_goes_to_load_delegate(samples: Path, tmp_path: Path) -> None:
    """A real LiteRT load: the library named with its options is what load_delegate tries (and fails, one line)."""
    pytest.importorskip("ai_edge_litert")
    model = samples / "digits-classifier-tflite" / "digits_cnn_int8.tflite"
    missing = tmp_path / "libnot-there.so"
    with pytest.raises(AgentError) as info:
        load_model(model, runtime="litert", delegates=[{"library": str(missing), "options": {"device": "usb"}}])
    assert f"delegate {str(missing)!r} failed to load" in info.value.problem and "\n" not in str(info.value)
    with pytest.raises(AgentError, match=r"delegates\.0\.lib: unknown key"):
        load_model(model, runtime="litert", delegates=[{"lib": str(missing)}])


def test_profile_with_bad_delegate_is_refused_at_load(tmp_path: Path) -> None:
    text = (builtin_dir() / "rpi5.toml").read_text()
    bad = tmp_path / "rpi5.toml"
    bad.write_text(text.replace("delegates = []", 'delegates = [{ library = "libedgetpu.so.1", option = {} }]'))
    with pytest.raises(ProfileError) as info:
        load_profile(bad)
    assert "runtime.delegates.0.option: unknown key" in str(info.value) and "\n" not in str(info.value)
    bad.write_text(
        text.replace("delegates = []", 'delegates = [{ library = "libedgetpu.so.1", options = { device = "usb" } }]')
    )
    assert load_profile(bad).runtime.delegates == [{"library": "libedgetpu.so.1", "options": {"device": "usb"}}]
