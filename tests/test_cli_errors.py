"""Bad input through the real CLI: one clear line naming the problem and the fix, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import onnx_models
from tests.conftest import assert_one_line_error, run_cli
from tests.test_bundle import GOOD, make_bundle


@pytest.fixture()
def clf(tmp_path: Path) -> Path:
    return onnx_models.float_image_classifier(tmp_path / "clf.onnx", channels=3, size=8, classes=4)


def test_corrupt_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert_one_line_error(run_cli("infer", bad, tmp_path / "x.npy"), "bad.onnx")


def test_truncated_model(tmp_path: Path, clf: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(clf.read_bytes()[:100])
    assert_one_line_error(run_cli("describe", cut), "cut.onnx")


def test_unknown_extension(tmp_path: Path) -> None:
    weird = tmp_path / "model.caffemodel"
    weird.write_bytes(b"1234")
    assert_one_line_error(run_cli("infer", weird, weird), "unknown file type")


def test_model_needing_missing_operator(tmp_path: Path) -> None:
    path = onnx_models.custom_op(tmp_path / "custom.onnx")
    assert_one_line_error(run_cli("bench", path, "--seconds", "0.1"), "operator")


def test_unreadable_image(tmp_path: Path, clf: Path) -> None:
    img = tmp_path / "broken.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli("infer", clf, img)
    assert_one_line_error(proc, "broken.png", "not a readable image")


def test_wrong_sized_npy(tmp_path: Path, clf: Path) -> None:
    arr = tmp_path / "wrong.npy"
    np.save(arr, np.zeros((1, 3, 5, 5), dtype=np.float32))
    assert_one_line_error(run_cli("infer", clf, arr), "shape [1, 3, 5, 5]", "expects [1, 3, 8, 8]")


def test_bundle_disagreeing_with_model(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", GOOD.replace('["a", "b", "c", "d"]', '["a", "b"]'))
    assert_one_line_error(run_cli("infer", root, tmp_path / "x.png"), "2 labels but the model outputs 4")


def test_bad_bundle_metadata(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", GOOD.replace('version = "1.2.3"', 'version = "one"'))
    assert_one_line_error(run_cli("describe", root), "version")


def test_missing_model_path(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("infer", tmp_path / "nope.tflite", "x.png"), "does not exist")


def test_missing_input_file_is_reported_and_others_still_run(tmp_path: Path, clf: Path) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((1, 3, 8, 8), dtype=np.float32))
    proc = run_cli("infer", clf, tmp_path / "missing.png", good, "--json")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("edge-agent: error:") == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "error" in lines[0] and '"task": "raw"' in lines[1]


def test_unknown_runtime_choice(clf: Path) -> None:
    proc = run_cli("infer", clf, "x.png", "--runtime", "tensorflow")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_runtime_for_format(clf: Path) -> None:
    assert_one_line_error(run_cli("describe", clf, "--runtime", "litert"), "cannot run onnx")


# ---- one line, one hint, no third-party noise -------------------------------------------------------------

ONNX_SAMPLE = Path(__file__).resolve().parent.parent / "agent" / "samples" / "digits-classifier-onnx"
TFLITE_SAMPLE = ONNX_SAMPLE.parent / "digits-classifier-tflite"
DIGIT = ONNX_SAMPLE.parent / "inputs" / "digit_4.png"


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_thread_count_names_the_flag_not_the_model(value: str) -> None:
    line = assert_one_line_error(run_cli("infer", TFLITE_SAMPLE, DIGIT, "--threads", value), "--threads", "default")
    assert "re-export" not in line


def test_threads_default_means_the_runtimes_choice() -> None:
    proc = run_cli("infer", TFLITE_SAMPLE, DIGIT, "--threads", "default")
    assert proc.returncode == 0 and ": 4 " in proc.stdout, proc.stderr


@pytest.mark.parametrize("library", ["/nonexistent/libedgetpu.so.1", "/etc/hostname"])
def test_bad_delegate_is_one_line_naming_it(library: str) -> None:
    line = assert_one_line_error(run_cli("infer", TFLITE_SAMPLE, DIGIT, "--delegate", library), library)
    assert "delegate" in line


def test_missing_execution_provider_is_named_with_what_runs_instead() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    proc = run_cli("infer", ONNX_SAMPLE, DIGIT, "--provider", "CUDAExecutionProvider")
    assert proc.returncode == 0 and ": 4 " in proc.stdout, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("edge-agent: warning: ") and "CUDAExecutionProvider" in line
    assert "running on CPUExecutionProvider" in line


def test_check_warns_about_configured_providers_missing_here(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "d1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[sources.digits]\ntype = "replay"\npath = "{DIGIT}"\n'
        '[pipelines.digits]\nsource = "digits"\nmodel = "sample:digits-classifier-onnx"\n'
        'providers = ["CUDAExecutionProvider"]\nsinks = []\n'
    )
    proc = run_cli("check", "--config", config, "--json")
    report = json.loads(proc.stdout)
    [pipe] = [c for c in report["checks"] if c["what"] == "pipeline digits"]
    assert "warning: execution provider CUDAExecutionProvider not available here" in pipe["detail"], pipe
    assert "running on CPUExecutionProvider" in pipe["detail"]


def test_failed_onnx_run_is_one_plain_line_without_runtime_log(tmp_path: Path) -> None:
    """ONNX Runtime logs a failed run itself, in colour, even into a pipe: only our line may reach stderr."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray([3, -1], dtype=np.int64), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "reshape.onnx")
    np.save(tmp_path / "x.npy", np.zeros((1, 4), dtype=np.float32))
    proc = run_cli("infer", tmp_path / "reshape.onnx", tmp_path / "x.npy")
    line = assert_one_line_error(proc, "inference failed", "reshape")
    assert "\x1b[" not in proc.stderr and "onnxruntime_src" not in line and "[ONNXRuntimeError]" not in line


def test_an_unreadable_video_leaves_no_ffmpeg_lines(tmp_path: Path) -> None:
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"not a video" * 100)
    proc = run_cli("batch", "--model", ONNX_SAMPLE, "--input", video, "--output", tmp_path / "out.jsonl")
    assert_one_line_error(proc, "broken.mp4", "not a readable video")


def test_wrapped_errors_keep_one_fix_hint() -> None:
    from agent.errors import AgentError, RuntimeUnavailable
    from agent.hints import error_line, one_fix_hint, strip_fix_hints
    from fleet.errors import FleetError

    inner = RuntimeUnavailable("tflite-runtime is not importable", "pip install 'x[tflite]' (needs NumPy < 2)")
    outer = AgentError(f"no usable runtime for m.tflite: {inner}", "pip install 'x[litert]'")
    assert (
        error_line(outer)
        == "no usable runtime for m.tflite: tflite-runtime is not importable (fix: pip install 'x[litert]')"
    )
    assert error_line(FleetError(f"bundle refused: {inner}", "rebuild it")).count("(fix: ") == 1
    text = "a (fix: b (c)) then d (fix: e)"
    assert one_fix_hint(text) == "a then d (fix: e)" and strip_fix_hints(text) == "a then d"
    assert one_fix_hint("plain") == "plain" and error_line(ValueError("x (fix: y)")) == "x (fix: y)"


def test_no_usable_runtime_line_has_one_hint(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tflite_runtime") is not None:
        pytest.skip("tflite-runtime is installed here")
    line = assert_one_line_error(run_cli("describe", TFLITE_SAMPLE, "--runtime", "tflite-runtime"), "tflite")
    assert line.count("(fix: ") == 1
