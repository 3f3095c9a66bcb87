"""ONNX Runtime backend against real models built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import InputError, ModelLoadError
from agent.runtime import load_model
from agent.runtime import onnxruntime as ort_backend
from tests import onnx_models


def test_introspection_and_predict_float(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "clf.onnx", channels=3, size=8, classes=4)
    with load_model(path, threads=1) as model:
        info = model.info
        assert info.format == "onnx" and info.runtime == "onnxruntime"
        assert info.threads == 1
        assert "CPUExecutionProvider" in info.providers
        [inp] = model.inputs
        assert (inp.name, inp.shape, inp.dtype) == ("image", (1, 3, 8, 8), np.dtype(np.float32))
        assert inp.quant is None
        x = np.full((1, 3, 8, 8), 1.0, dtype=np.float32)
        [logits] = model.predict(x)
        weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0
        np.testing.assert_allclose(logits, np.ones((1, 3)) @ weight, rtol=1e-6)


def test_multiple_inputs_outputs_and_dynamic_dims(tmp_path: Path) -> None:
    path = onnx_models.multi_io(tmp_path / "multi.onnx")
    with load_model(path) as model:
        assert [t.name for t in model.inputs] == ["a", "b"]
        assert model.inputs[0].shape == ("batch", 4) and model.inputs[0].is_dynamic
        assert model.inputs[0].concrete_shape(batch=1) == (1, 4)
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        b = np.ones((1, 2, 3), dtype=np.float32)
        doubled, total = model.predict({"b": b, "a": a})
        np.testing.assert_array_equal(doubled, a * 2)
        assert total.reshape(-1)[0] == 6.0
        # list order works too, and a missing batch axis is added for fixed-batch inputs
        _, total2 = model.predict([a, b[0]])
        assert total2.reshape(-1)[0] == 6.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_io_quantization_reported_and_applied(tmp_path: Path, per_channel: bool) -> None:
    path = onnx_models.int8_io(tmp_path / "q.onnx", per_channel=per_channel)
    with load_model(path) as model:
        [inp], [out] = model.inputs, model.outputs
        assert inp.dtype == np.int8 and inp.is_quantized
        assert inp.quant.per_channel is per_channel
        if per_channel:
            assert inp.quant.scales == pytest.approx((0.05, 0.1, 0.2)) and inp.quant.zero_points == (3, -2, 0)
            assert inp.quant.axis == 1
        else:
            assert inp.quant.scales == pytest.approx((0.05,)) and inp.quant.zero_points == (3,)
        assert out.quant.scales == pytest.approx((0.1,)) and out.quant.zero_points == (-128,)
        # float in: quantized with the model's own parameters; int8 out: dequantized
        x = np.asarray([[[-1.0, 0.0, 1.0, 2.0]] * 3], dtype=np.float32)
        [y] = model.predict(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, np.maximum(x, 0), atol=0.1 + 1e-6)
        # already-quantized input passes through untouched
        raw = model.prepare_input(inp, np.zeros((1, 3, 4), dtype=np.int8))
        assert raw.dtype == np.int8 and not raw.any()


def test_qdq_float_io_reports_in_graph_quantization(samples: Path) -> None:
    from agent.bundle import load_bundle

    with load_model(load_bundle(samples / "digits-classifier-onnx").model_path) as model:
        [inp] = model.inputs
        assert inp.dtype == np.float32
        assert inp.quant is not None and inp.quant.in_graph
        assert not inp.is_quantized  # float in, float out: nothing to do for the caller


def test_provider_order_keeps_available_ones_and_cpu() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_backend.choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert ort_backend.choose_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert ort_backend.choose_providers(["OpenVINOExecutionProvider"], []) == ["CPUExecutionProvider"]


def test_unknown_provider_falls_back_to_cpu(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "clf.onnx")
    with load_model(path, providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"]) as model:
        assert model.info.providers == ["CPUExecutionProvider"]


def test_missing_operator_is_a_clear_error(tmp_path: Path) -> None:
    path = onnx_models.custom_op(tmp_path / "custom.onnx")
    with pytest.raises(ModelLoadError, match="needs an operator onnxruntime does not provide") as info:
        load_model(path)
    assert info.value.fix


def test_ir_version_too_new_is_explained(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "new.onnx")
    import onnx

    model = onnx.load(str(path))
    model.ir_version = 99
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="IR version") as info:
        load_model(path)
    assert "ir_version" in info.value.fix


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_model_files(tmp_path: Path, damage: str) -> None:
    good = onnx_models.float_image_classifier(tmp_path / "good.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"garbage": b"\x00not a model" * 50, "truncated": good[: len(good) // 2], "empty": b""}[damage])
    with pytest.raises(ModelLoadError):
        load_model(bad)


def test_wrong_input_shape_is_input_error(tmp_path: Path) -> None:
    path = onnx_models.float_image_classifier(tmp_path / "clf.onnx")
    with load_model(path) as model, pytest.raises(InputError, match="expects"):
        model.predict(np.zeros((1, 3, 9, 9), dtype=np.float32))
