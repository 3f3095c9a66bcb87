"""TFLite backends against real models: the samples and small fixtures built by tools/build_sample_models.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.errors import InputError, ModelLoadError, RuntimeUnavailable
from agent.runtime import load_model, runtime_report
from agent.runtime.tflite_runtime import numpy_incompatibility
from tests.conftest import assert_one_line_error, run_cli


def test_int8_classifier_introspection(samples: Path) -> None:
    path = load_bundle(samples / "digits-classifier-tflite").model_path
    with load_model(path, threads=2) as model:
        info = model.info
        assert (info.format, info.runtime, info.threads) == ("tflite", "litert", 2)
        [inp], [out] = model.inputs, model.outputs
        assert inp.shape == (1, 32, 32, 1) and inp.dtype == np.int8 and inp.is_quantized
        assert inp.quant.scales[0] == pytest.approx(1 / 255, rel=1e-3) and inp.quant.zero_points == (-128,)
        assert out.dtype == np.int8 and out.shape == (1, 10)
        # float in, quantized by the model's parameters; int8 out, dequantized to probabilities
        [probs] = model.predict(np.zeros((1, 32, 32, 1), dtype=np.float32))
        assert probs.dtype == np.float32 and probs.shape == (1, 10)
        assert abs(float(probs.sum()) - 1.0) < 0.05


def test_multiple_inputs_and_outputs(fixtures: Path) -> None:
    with load_model(fixtures / "multi_io.tflite") as model:
        names = [t.name for t in model.inputs]
        assert sorted(names) == ["a", "b"]
        a = np.arange(4, dtype=np.float32).reshape(1, 4)
        b = np.ones((1, 2, 3), dtype=np.float32)
        outs = dict(zip([t.name for t in model.outputs], model.predict({"a": a, "b": b}), strict=True))
        assert set(outs) == {"sum", "concat"}
        assert outs["concat"].shape == (1, 10)
        assert np.isfinite(outs["sum"]).all()


def test_dynamic_batch(fixtures: Path) -> None:
    with load_model(fixtures / "dynamic_batch.tflite") as model:
        [inp] = model.inputs
        assert inp.shape == (-1, 4) and inp.is_dynamic
        [y1] = model.predict(np.ones((1, 4), dtype=np.float32))
        [y3] = model.predict(np.ones((3, 4), dtype=np.float32))  # resized on the fly
        assert y1.shape == (1, 3) and y3.shape == (3, 3)
        np.testing.assert_allclose(y3[0], y1[0], rtol=1e-5)
        [y1b] = model.predict(np.ones((1, 4), dtype=np.float32))  # and back
        np.testing.assert_allclose(y1b, y1)


def test_uint8_io(fixtures: Path) -> None:
    with load_model(fixtures / "uint8_io.tflite") as model:
        [inp], [out] = model.inputs, model.outputs
        assert inp.dtype == np.uint8 and inp.quant.zero_points == (0,)
        assert out.dtype == np.uint8
        [y] = model.predict(np.full((1, 4), 0.5, dtype=np.float32))
        assert y.dtype == np.float32 and (y >= 0).all()


def test_custom_op_is_a_clear_error(fixtures: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs an operator") as info:
        load_model(fixtures / "custom_op.tflite")
    assert "BesselI0e" in str(info.value)
    assert_one_line_error(run_cli("infer", fixtures / "custom_op.tflite", "x.npy"), "needs an operator")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header-only"])
def test_corrupt_tflite(tmp_path: Path, samples: Path, damage: str) -> None:
    good = load_bundle(samples / "digits-classifier-tflite").model_path.read_bytes()
    data = {
        "garbage": b"\x00" * 4 + b"XXXX" + b"\x01" * 200,
        "truncated": good[: len(good) // 3],
        "empty": b"",
        "header-only": good[:64],
    }[damage]
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(data)
    with pytest.raises(ModelLoadError):
        load_model(bad)
    assert_one_line_error(run_cli("describe", bad), "bad.tflite")


def test_wrong_input_shape(fixtures: Path) -> None:
    with load_model(fixtures / "multi_io.tflite") as model, pytest.raises(InputError):
        model.predict({"a": np.ones((1, 5), np.float32), "b": np.ones((1, 2, 3), np.float32)})


def test_tflite_runtime_refused_under_numpy2() -> None:
    assert numpy_incompatibility("1.26.4") is None
    reason = numpy_incompatibility("2.1.0")
    assert reason and "NumPy < 2" in reason
    report = {r.name: r for r in runtime_report()}
    if np.__version__.startswith("1."):
        pytest.skip("NumPy 1 here: tflite-runtime may be usable")
    assert not report["tflite-runtime"].available
    with pytest.raises(RuntimeUnavailable):
        load_model(Path(__file__).parent / "fixtures" / "multi_io.tflite", runtime="tflite-runtime")
