"""`fleet bundle build` infers the input of image models (and asks only for what it cannot); `fleet bundle publish`
refuses bundles no provisioned device could run, and unvalidated bundles unless told `--skip-validation`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import load_bundle
from fleet.bundles import fleet_fit, infer_input, sample_models
from fleet.db import Registry
from fleet.errors import FleetError
from tests.conftest import ROOT, SAMPLES
from tests.test_fleet_console import Fleet, assert_fleet_error

DIGITS_TFLITE = SAMPLES / "digits-classifier-tflite" / "digits_cnn_int8.tflite"
DIGITS_ONNX = SAMPLES / "digits-classifier-onnx" / "digits_cnn_int8.onnx"
SENSOR_TFLITE = SAMPLES / "sensor-anomaly" / "sensor_ae_int8.tflite"
NO_RUNTIME = "import sys; sys.modules.update(dict.fromkeys(['ai_edge_litert', 'tflite_runtime', 'onnxruntime']))"


# ---- pure: inference and fit -----------------------------------------------------------------------------


def test_image_inputs_are_inferred_from_the_shape() -> None:
    assert infer_input([(1, 224, 224, 3)]) == {"kind": "image", "layout": "NHWC", "size": [224, 224], "color": "rgb"}
    assert infer_input([(1, 1, 32, 48)]) == {"kind": "image", "layout": "NCHW", "size": [48, 32], "color": "gray"}
    assert infer_input([(1, 3, 64, 64)], color="bgr")["color"] == "bgr"
    # not images: small sides, other ranks, several inputs, no 1- or 3-channel axis
    for shapes in ([(1, 4, 4, 3)], [(1, 10)], [(1, 50, 3)], [(1, 32, 32, 3), (1, 4)], [(1, 32, 32, 4)]):
        assert infer_input(shapes) == {"kind": "tensor"}, shapes
    assert infer_input([(1, 224, 224, 3)], kind="tensor") == {"kind": "tensor"}


def test_what_cannot_be_inferred_is_asked_for_with_the_flag() -> None:
    asks = [
        ({"shapes": [(1, 3, -1, -1)]}, "--size"),
        ({"shapes": [(1, 32, 32, 4)], "kind": "image"}, "--layout"),
        ({"shapes": [(1, 10)], "kind": "image"}, "--input-kind tensor"),
        ({"shapes": [(1, 64, 64, "c")], "kind": "image", "layout": "NHWC"}, "--color"),
        ({"shapes": [(1, 32, 32, 3)], "size": (64, 64)}, "drop --size"),
        ({"shapes": [(1, 10)], "kind": "timeseries"}, "--metadata"),
    ]
    for kwargs, flag in asks:
        shapes = kwargs.pop("shapes")
        with pytest.raises(FleetError) as caught:
            infer_input(shapes, **kwargs)
        assert flag in caught.value.fix, (shapes, kwargs, str(caught.value))
    assert infer_input([(1, 3, -1, -1)], size=(320, 240))["size"] == [320, 240]


def _device(id: str, hardware: str | None, *models: tuple[str, str]) -> dict[str, Any]:
    return {"id": id, "hardware": hardware, "profile": None, "models": {f"p{i}": {"name": n, "version": v} for i, (n, v) in enumerate(models)}}  # fmt: skip


def test_fit_compares_hardware_and_input_kind_with_what_devices_report() -> None:
    kinds = {("digits", "1.0.0"): "image", ("sensor", "1.0.0"): "tensor"}
    cams = [_device("cam-1", "rpi5", ("digits", "1.0.0")), _device("cam-2", "rpi5", ("digits", "1.0.0"))]
    assert fleet_fit("image", [], [], kinds) is None  # no devices yet: nothing to compare with
    assert fleet_fit("image", [], cams, kinds) is None
    assert fleet_fit("image", ["rpi5", "x86_64"], cams, kinds) is None
    problem, fix = fleet_fit("image", ["rpi4"], cams, kinds) or ("", "")
    assert "rpi4" in problem and "rpi5 (2)" in problem and "--hardware rpi5" in fix
    problem, fix = fleet_fit("tensor", [], cams, kinds) or ("", "")
    assert "'tensor'" in problem and "cam-1 runs digits 1.0.0" in problem and "--input-kind" in fix
    # one device that could: fine; unknown models or hardware are not held against a device
    assert fleet_fit("tensor", [], [*cams, _device("vib-1", "rpi5", ("sensor", "1.0.0"))], kinds) is None
    assert fleet_fit("tensor", [], [_device("new", "rpi5")], kinds) is None
    assert fleet_fit("tensor", [], [_device("odd", "rpi5", ("custom", "3.0.0"))], kinds) is None
    assert fleet_fit("image", ["rpi4"], [_device("unknown-hw", None, ("digits", "1.0.0"))], kinds) is None


def test_samples_are_known_by_their_model_hash() -> None:
    samples = {s.name: s for s in sample_models()}
    digits = samples["digits-classifier-tflite"]
    assert digits.input_kind == "image"
    assert digits.model_sha256 == load_bundle(DIGITS_TFLITE).sha256


# ---- the console -------------------------------------------------------------------------------------------


def _no_runtime(fleet: Fleet, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The console in a process where no runtime can be imported (a fleet installed with `[fleet]` only)."""
    code = f"{NO_RUNTIME}; from fleet.console import main; sys.exit(main())"
    env = os.environ.copy() | {"PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("FLEET_CONFIG", None)
    argv = [sys.executable, "-c", code, "--config", str(fleet.config), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=fleet.home, env=env)


def test_build_infers_image_input_and_publish_checks_the_fleet(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    fleet.ok("init")
    out = tmp_path / "out"
    built = fleet.json(
        "bundle", "build", DIGITS_TFLITE, "--name", "digits", "--version", "1.1.0", "--task", "classification",
        "-o", out / "digits.tar.gz",
    )  # fmt: skip
    assert built["input"] == {
        "kind": "image", "layout": "NHWC", "size": [32, 32], "color": "gray", "resize": "squash",
        "letterbox_fill": 114, "mean": [0.0], "std": [255.0],
    }  # fmt: skip
    onnx = fleet.json("bundle", "build", DIGITS_ONNX, "--name", "d", "--version", "1.0.0", "--task", "raw", "-o", out / "o.tar.gz")  # fmt: skip
    assert (onnx["input"]["layout"], onnx["input"]["size"]) == ("NCHW", [32, 32])
    sensor = fleet.json(
        "bundle", "build", SENSOR_TFLITE, "--name", "vib", "--version", "1.0.0", "--task", "raw", "-o", out / "s.tar.gz"
    )  # fmt: skip
    assert sensor["input"] == {"kind": "tensor"}
    text = fleet.ok("bundle", "build", DIGITS_TFLITE, "--name", "x", "--version", "1.0.0", "--task", "raw", "-o", out / "x.tar.gz")  # fmt: skip
    assert "input: image NHWC 32x32 gray" in text

    # No hardware given: any hardware, shown as such (docs/bundles.md: hardware = [] means any).
    published = fleet.json("bundle", "publish", out / "digits.tar.gz")
    assert published["target"]["hardware"] == [] and published["validated"]
    assert "any" in fleet.ok("targets")

    # Devices provisioned and reporting: a bundle none of them could run is refused, with the reason.
    fleet.ok("device", "provision", "cam-1", "--group", "lab", "--hardware", "rpi5")
    fleet.ok("device", "provision", "cam-2", "--group", "lab", "--hardware", "rpi5")
    with Registry(f"sqlite:///{fleet.data / 'fleet.sqlite'}") as registry:
        model = {"name": "digits-classifier-tflite", "version": "1.0.0", "sha256": load_bundle(DIGITS_TFLITE).sha256}
        registry.ingest_status(
            [
                {"state": "online", "device_id": d, "ts": time.time(), "models": {"main": model}}
                for d in ("cam-1", "cam-2")
            ]
        )
    assert_fleet_error(fleet("bundle", "publish", out / "s.tar.gz"), "'tensor'", "cam-1 runs digits-classifier-tflite", "--input-kind")  # fmt: skip
    assert_fleet_error(fleet("bundle", "publish", out / "o.tar.gz", "--hardware", "jetson-nano"), "jetson-nano", "rpi5 (2)", "--hardware rpi5")  # fmt: skip
    assert fleet.json("bundle", "publish", out / "o.tar.gz", "--hardware", "rpi5")["target"]["hardware"] == ["rpi5"]


def test_without_a_runtime_build_asks_for_the_kind_and_publish_for_skip_validation(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    fleet.ok("init")
    out = tmp_path / "out"
    common = ["--name", "digits", "--version", "1.1.0", "--task", "classification"]
    assert_fleet_error(_no_runtime(fleet, "bundle", "build", DIGITS_TFLITE, *common, "-o", out / "a.tar.gz"), "cannot open", "--input-kind image")  # fmt: skip
    proc = _no_runtime(fleet, "bundle", "build", DIGITS_TFLITE, *common, "--input-kind", "image", "--json", "-o", out / "a.tar.gz")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    built = json.loads(proc.stdout)
    assert built["input"]["kind"] == "image" and built["runtime_check_skipped"]
    line = assert_fleet_error(_no_runtime(fleet, "bundle", "publish", out / "a.tar.gz"), "cannot be validated", "--skip-validation")  # fmt: skip
    assert "edge-inference-agent[litert]" in line
    assert fleet.json("targets") == []  # nothing signed
    proc = _no_runtime(fleet, "bundle", "publish", out / "a.tar.gz", "--skip-validation")
    assert proc.returncode == 0, proc.stderr
    assert "signed without validation" in proc.stdout
    assert [t["name"] for t in fleet.json("targets")] == ["digits"]


def test_golden_vectors_out_of_tolerance_exit_1(tmp_path: Path) -> None:
    import numpy as np

    fleet = Fleet(tmp_path / "fleet")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "bundle.toml").write_text((SAMPLES / "digits-classifier-tflite" / "bundle.toml").read_text())
    with np.load(SAMPLES / "digits-classifier-tflite" / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    for key in arrays:
        if key.startswith("output_"):
            arrays[key] = 1.0 - arrays[key]  # wrong answers
    np.savez(meta_dir / "golden.npz", **arrays)
    proc = fleet("bundle", "build", DIGITS_TFLITE, "--metadata", meta_dir / "bundle.toml", "-o", tmp_path / "g.tar.gz")
    assert_fleet_error(proc, "golden vectors fail", code=1)  # the operation failed (docs/fleet.md: exit 1)
    assert not (tmp_path / "g.tar.gz").exists()
