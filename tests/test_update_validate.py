"""Pre-activation validation with real models and real runtimes: every check passes and fails for real."""

from __future__ import annotations

import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.predictor import Predictor
from agent.update.validate import ValidationReport, validate_bundle
from tests import onnx_models
from tests.conftest import INPUTS, SAMPLES

SAMPLE_NAMES = ["digits-classifier-onnx", "digits-classifier-tflite", "digits-detector", "sensor-anomaly"]
ALL_CHECKS = ["load", "metadata", "compatible", "golden", "finite", "latency"]
DIGIT_LABELS = "labels = [" + ", ".join(f'"{i}"' for i in range(10)) + "]"


@pytest.fixture(scope="module")
def running() -> Iterator[Predictor]:
    """The model the pipeline runs now: the ONNX digits classifier (1, 1, 32, 32)."""
    p = Predictor.open(SAMPLES / "digits-classifier-onnx")
    yield p
    p.close()


def copy_sample(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(SAMPLES / name, tmp_path / name))


def edit_toml(root: Path, old: str, new: str) -> None:
    path = root / "bundle.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def drop_section(root: Path, section: str) -> None:
    """Remove a ``[section]`` table (up to the next table header) from bundle.toml."""
    path = root / "bundle.toml"
    text = path.read_text()
    pattern = re.compile(rf"^\[{re.escape(section)}\]\n(?:(?!\[).*\n?)*", re.MULTILINE)
    new, count = pattern.subn("", text)
    assert count == 1, section
    path.write_text(new)


def failed(report: ValidationReport, check: str) -> str:
    """Assert a failure at ``check`` (the last check run), no predictor handed out; return the reason."""
    assert not report.ok and report.predictor is None
    assert report.reason is not None and "\n" not in report.reason
    names = [c[0] for c in report.checks]
    assert names == ALL_CHECKS[: ALL_CHECKS.index(check) + 1], report.checks
    assert all(ok for _, ok, _ in report.checks[:-1])
    assert report.checks[-1] == (check, False, report.reason)
    return report.reason


def passed(report: ValidationReport) -> Predictor:
    assert report.ok, report.reason
    assert report.reason is None
    assert [c[0] for c in report.checks] == ALL_CHECKS and all(ok for _, ok, _ in report.checks)
    assert report.p95_ms is not None and report.p95_ms > 0
    assert report.predictor is not None
    return report.predictor


def tensor_bundle(root: Path, model: onnx.ModelProto, extra: str = "") -> Path:
    """A raw-task bundle taking tensors, around an ONNX model built here."""
    root.mkdir(parents=True, exist_ok=True)
    model.ir_version = 9
    onnx.save(model, str(root / "model.onnx"))
    (root / "bundle.toml").write_text(
        f'name = "raw-model"\nversion = "2.0.0"\ntask = "raw"\nmodel = "model.onnx"\n[input]\nkind = "tensor"\n{extra}'
    )
    return root


def unary_model(op: str, width: int = 4, pre: str | None = None) -> onnx.ModelProto:
    """x (1, width) -> [pre(x, c)] -> op -> 'scores' (1, width)."""
    nodes, inits = [], []
    src = "x"
    if pre is not None:
        const = {"Sub": 2.0, "Mul": 0.0}[pre]
        inits.append(numpy_helper.from_array(np.asarray(const, dtype=np.float32), "c"))
        nodes.append(helper.make_node(pre, ["x", "c"], ["t"]))
        src = "t"
    nodes.append(helper.make_node(op, [src], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "unary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=onnx_models.OPSET)


# ---- passing bundles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_bundles_pass(name: str) -> None:
    report = validate_bundle(SAMPLES / name, current=None, latency_runs=5)
    p = passed(report)
    try:
        assert p.bundle.name == name
        details = {n: d for n, _, d in report.checks}
        assert "4 golden vector(s) match" in details["golden"]
        assert "golden" in details["finite"]
        assert "within the budget of 50 ms" in details["latency"]
        assert report.to_dict()["ok"] is True and len(report.to_dict()["checks"]) == len(ALL_CHECKS)
    finally:
        p.close()


def test_same_model_for_other_runtime_is_compatible_and_usable(running: Predictor) -> None:
    """The TFLite NHWC twin takes the same 32x32 gray frames as the running ONNX NCHW model."""
    p = passed(validate_bundle(SAMPLES / "digits-classifier-tflite", current=running, latency_runs=5))
    try:
        frame = cv2.imread(str(INPUTS / "digit_3.png"), cv2.IMREAD_UNCHANGED)
        assert p.predict_image(frame).result["label"] == running.predict_image(frame).result["label"]
    finally:
        p.close()


def test_archive_bundle_passes(tmp_path: Path, running: Predictor) -> None:
    archive = tmp_path / "update.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(SAMPLES / "digits-classifier-onnx", arcname="digits-classifier-onnx")
    p = passed(validate_bundle(archive, current=running, latency_runs=3))
    p.close()


@pytest.mark.parametrize("name", ["digits-classifier-onnx", "digits-detector", "sensor-anomaly"])
def test_without_golden_vectors_random_inputs_are_checked(tmp_path: Path, name: str) -> None:
    root = copy_sample(tmp_path, name)
    drop_section(root, "golden")
    (root / "golden.npz").unlink()
    report = validate_bundle(root, current=None, latency_runs=3)
    p = passed(report)
    p.close()
    details = {n: d for n, _, d in report.checks}
    assert "no golden vectors" in details["golden"]
    assert "3 random input(s)" in details["finite"]


def test_no_budget_passes_and_reports_p95(tmp_path: Path) -> None:
    root = copy_sample(tmp_path, "sensor-anomaly")
    drop_section(root, "budget")
    report = validate_bundle(root, current=None, latency_runs=3)
    passed(report).close()
    assert "no budget set" in report.checks[-1][2]


def test_latency_runs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="latency_runs"):
        validate_bundle(SAMPLES / "sensor-anomaly", current=None, latency_runs=0)


# ---- 1. load ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model"),
    [("digits-classifier-onnx", "digits_cnn_int8.onnx"), ("sensor-anomaly", "sensor_ae_int8.tflite")],
)
def test_truncated_model_fails_at_load(tmp_path: Path, name: str, model: str) -> None:
    root = copy_sample(tmp_path, name)
    data = (root / model).read_bytes()
    (root / model).write_bytes(data[: len(data) // 2])
    reason = failed(validate_bundle(root, current=None), "load")
    assert reason.startswith("model does not load: ")


def test_model_with_unknown_operator_fails_at_load(tmp_path: Path) -> None:
    root = tensor_bundle(tmp_path / "custom", onnx.load(str(onnx_models.custom_op(tmp_path / "custom.onnx"))))
    reason = failed(validate_bundle(root, current=None), "load")
    assert reason.startswith("model does not load: ")


def test_invalid_bundle_toml_fails_at_load(tmp_path: Path) -> None:
    root = copy_sample(tmp_path, "digits-classifier-onnx")
    edit_toml(root, 'version = "1.0.0"', 'version = "one"')
    reason = failed(validate_bundle(root, current=None), "load")
    assert reason.startswith("bundle does not load: ") and "version" in reason


def test_missing_model_file_fails_at_load(tmp_path: Path) -> None:
    root = copy_sample(tmp_path, "digits-classifier-onnx")
    (root / "digits_cnn_int8.onnx").unlink()
    reason = failed(validate_bundle(root, current=None), "load")
    assert reason.startswith("bundle does not load: ") and "missing" in reason


# ---- 2. metadata and compatibility with the running model ----------------------------------------------


def test_labels_not_matching_model_outputs_fail_metadata(tmp_path: Path) -> None:
    root = copy_sample(tmp_path, "digits-classifier-onnx")
    edit_toml(root, '    "9",\n]', '    "9",\n    "10",\n]')
    reason = failed(validate_bundle(root, current=None), "metadata")
    assert reason.startswith("model does not match its bundle.toml: ")
    assert "11 labels but the model outputs 10 classes" in reason


def test_golden_shape_not_matching_model_fails_metadata(tmp_path: Path) -> None:
    root = copy_sample(tmp_path, "sensor-anomaly")
    with np.load(root / "golden.npz") as data:
        arrays = dict(data)
    arrays["input_0_window"] = arrays["input_0_window"][..., :2]
    np.savez(root / "golden.npz", **arrays)
    reason = failed(validate_bundle(root, current=None), "metadata")
    assert "golden input 'window'" in reason


def test_wrong_input_size_vs_running_model_fails(tmp_path: Path, running: Predictor) -> None:
    root = tmp_path / "digits28"
    root.mkdir()
    onnx_models.float_image_classifier(root / "model.onnx", channels=1, size=28, classes=10, nchw=True)
    (root / "bundle.toml").write_text(
        'name = "digits28"\nversion = "1.1.0"\ntask = "classification"\nmodel = "model.onnx"\n'
        f'{DIGIT_LABELS}\n[input]\nkind = "image"\ncolor = "gray"\n'
    )
    reason = failed(validate_bundle(root, current=running), "compatible")
    assert reason == "input shape (1, 1, 28, 28) does not match the running model's (1, 1, 32, 32)"
    # the bundle itself is fine (random image inputs are finite): only the running pipeline rules it out
    passed(validate_bundle(root, current=None, latency_runs=3)).close()


def test_other_channel_count_vs_running_model_fails(tmp_path: Path, running: Predictor) -> None:
    root = tmp_path / "digits-rgb"
    root.mkdir()
    onnx_models.float_image_classifier(root / "model.onnx", channels=3, size=32, classes=10, nchw=False)
    (root / "bundle.toml").write_text(
        'name = "digits-rgb"\nversion = "1.1.0"\ntask = "classification"\nmodel = "model.onnx"\n'
        f'{DIGIT_LABELS}\n[input]\nkind = "image"\ncolor = "rgb"\n'
    )
    reason = failed(validate_bundle(root, current=running), "compatible")
    assert reason == "input shape (1, 32, 32, 3) does not match the running model's (1, 1, 32, 32)"


def test_other_task_vs_running_model_fails(running: Predictor) -> None:
    reason = failed(validate_bundle(SAMPLES / "digits-detector", current=running), "compatible")
    assert reason == "task 'detection' does not match the running model's 'classification'"


def test_other_input_kind_vs_running_model_fails(tmp_path: Path, running: Predictor) -> None:
    root = copy_sample(tmp_path, "digits-classifier-onnx")
    drop_section(root, "input")
    (root / "bundle.toml").write_text((root / "bundle.toml").read_text() + '\n[input]\nkind = "tensor"\n')
    reason = failed(validate_bundle(root, current=running), "compatible")
    assert reason == "input kind 'tensor' does not match the running model's 'image'"


def test_other_sensor_window_vs_running_model_fails(tmp_path: Path) -> None:
    """Same model (32 x 3 = 96 values) cut as 48 rows of 2 channels: the pipeline's windows no longer fit."""
    root = copy_sample(tmp_path, "sensor-anomaly")
    edit_toml(root, "window = 32", "window = 48")
    edit_toml(root, '    "az",\n', "")
    edit_toml(root, "    0.979955,\n", "")
    edit_toml(root, "    0.180615,\n", "")
    current = Predictor.open(SAMPLES / "sensor-anomaly")
    try:
        reason = failed(validate_bundle(root, current=current), "compatible")
        assert reason == "input window 48 x ['ax', 'ay'] does not match the running model's 32 x ['ax', 'ay', 'az']"
        passed(validate_bundle(SAMPLES / "sensor-anomaly", current=current, latency_runs=3)).close()
    finally:
        current.close()


def test_tensor_inputs_vs_running_model(tmp_path: Path) -> None:
    current = Predictor.open(tensor_bundle(tmp_path / "cur", unary_model("Relu", width=4)))
    try:
        same = tensor_bundle(tmp_path / "same", unary_model("Sigmoid", width=4))
        passed(validate_bundle(same, current=current, latency_runs=3)).close()
        wider = tensor_bundle(tmp_path / "wide", unary_model("Relu", width=8))
        reason = failed(validate_bundle(wider, current=current), "compatible")
        assert reason == "input 'x' shape (1, 8) float32 does not match the running model's (1, 4) float32"
    finally:
        current.close()


# ---- 3. golden vectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits-classifier-onnx", "sensor-anomaly"])
def test_golden_mismatch_fails(tmp_path: Path, name: str) -> None:
    root = copy_sample(tmp_path, name)
    with np.load(root / "golden.npz") as data:
        arrays = {k: (v + 10.0 if k.startswith("output_") else v) for k, v in data.items()}
    np.savez(root / "golden.npz", **arrays)
    reason = failed(validate_bundle(root, current=None), "golden")
    assert re.fullmatch(
        r"golden vectors do not match: vector 0: output '\w+' differs by [\d.]+ \(atol [\d.]+\) \(and 3 more\)", reason
    ), reason


def test_golden_tolerance_is_the_bundles(tmp_path: Path) -> None:
    """Outputs off by 0.3 pass under the sample's atol 0.4048 and fail under a tighter one."""
    root = copy_sample(tmp_path, "digits-classifier-onnx")
    with np.load(root / "golden.npz") as data:
        arrays = {k: (v + 0.3 if k.startswith("output_") else v) for k, v in data.items()}
    np.savez(root / "golden.npz", **arrays)
    passed(validate_bundle(root, current=None, latency_runs=3)).close()
    edit_toml(root, "atol = 0.4048", "atol = 0.25")
    reason = failed(validate_bundle(root, current=None), "golden")
    assert "differs by 0.3 (atol 0.25)" in reason


# ---- 4. finite outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("pre", "op", "kind"), [("Sub", "Log", "NaN"), ("Mul", "Reciprocal", "Inf")])
def test_non_finite_outputs_fail(tmp_path: Path, pre: str, op: str, kind: str) -> None:
    """log(x - 2) is NaN and 1 / (0 * x) is Inf for the random inputs in [0, 1)."""
    root = tensor_bundle(tmp_path / "bad", unary_model(op, pre=pre))
    reason = failed(validate_bundle(root, current=None), "finite")
    assert reason == f"non-finite outputs ({kind}) in output 'scores'"


def test_nan_on_golden_inputs_never_matches(tmp_path: Path) -> None:
    """A golden file that records the NaN cannot vouch for it: NaN is never within tolerance."""
    root = tensor_bundle(tmp_path / "bad", unary_model("Log"), '[golden]\nfile = "golden.npz"\n')
    x = np.asarray([[[1.0, 1.0, 1.0, 2.0]], [[-1.0, 1.0, 1.0, 1.0]]], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        y = np.log(x)
    np.savez(root / "golden.npz", input_0_x=x, output_0_scores=y)
    reason = failed(validate_bundle(root, current=None), "golden")
    assert reason.startswith("golden vectors do not match: vector 1: output 'scores' differs by nan")
    np.savez(root / "golden.npz", input_0_x=x[:1], output_0_scores=y[:1])  # the finite case alone passes
    report = validate_bundle(root, current=None, latency_runs=3)
    passed(report).close()
    assert report.checks[4] == ("finite", True, "outputs finite on 1 golden input(s)")


@pytest.mark.parametrize("build", [onnx_models.multi_io, onnx_models.int8_io])
def test_random_tensor_inputs_for_multi_input_and_int8_models(tmp_path: Path, build: Callable[[Path], Path]) -> None:
    root = tmp_path / "t"
    root.mkdir()
    build(root / "model.onnx")
    (root / "bundle.toml").write_text(
        'name = "t"\nversion = "1.0.0"\ntask = "raw"\nmodel = "model.onnx"\n[input]\nkind = "tensor"\n'
    )
    report = validate_bundle(root, current=None, latency_runs=3)
    passed(report).close()
    assert report.checks[4] == ("finite", True, "outputs finite on 3 random input(s)")


# ---- 5. latency -------------------------------------------------------------------------------------------


def test_tiny_budget_fails_latency(tmp_path: Path) -> None:
    root = copy_sample(tmp_path, "digits-classifier-onnx")
    edit_toml(root, "latency_ms = 50.0", "latency_ms = 0.001")
    report = validate_bundle(root, current=None, latency_runs=5)
    reason = failed(report, "latency")
    assert re.fullmatch(r"p95 latency [\d.]+ ms is over the bundle's budget of 0.001 ms", reason), reason
    assert report.p95_ms is not None and report.p95_ms > 0.001


def test_slow_model_fails_latency(tmp_path: Path) -> None:
    """A Loop of 10,000 iterations per inference (~15 ms here) against a 2 ms budget."""
    root = tmp_path / "slow"
    root.mkdir()
    onnx_models.slow_on_demand(root / "model.onnx")
    (root / "bundle.toml").write_text(
        'name = "slow"\nversion = "1.0.0"\ntask = "raw"\nmodel = "model.onnx"\n[input]\nkind = "tensor"\n'
        '[golden]\nfile = "golden.npz"\n[budget]\nlatency_ms = 2\n'
    )
    np.savez(
        root / "golden.npz",
        input_0_x=np.full((1, 1, 4), 10_000, dtype=np.float32),
        output_0_y=np.full((1, 1, 1), 10_000, dtype=np.float32),
    )
    report = validate_bundle(root, current=None, latency_runs=3)
    reason = failed(report, "latency")
    assert reason == f"p95 latency {report.p95_ms:.1f} ms is over the bundle's budget of 2 ms"
    assert report.p95_ms is not None and report.p95_ms > 2
