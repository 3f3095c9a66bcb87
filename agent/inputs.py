"""Reading inputs from files: images, .npy/.npz tensors, sensor CSV; dispatch to the predictor."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import TimeSeriesInput
from agent.errors import InputError
from agent.predictor import Prediction, Predictor
from agent.processing.timeseries import sliding_windows

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm"})
TENSOR_SUFFIXES = frozenset({".npy", ".npz"})
SERIES_SUFFIXES = frozenset({".csv", ".jsonl"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpeg", ".mjpg"})
INPUT_SUFFIXES = IMAGE_SUFFIXES | TENSOR_SUFFIXES | SERIES_SUFFIXES


def quiet_opencv() -> None:
    """Silence OpenCV's own stderr chatter: decode failures are reported by us, in one line."""
    try:
        from cv2.utils import logging as cv_logging

        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # older OpenCV builds without the logging module
        pass


quiet_opencv()


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to BGR uint8; InputError when it is missing or undecodable."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror}", "check the path") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(
            f"{path.name} is not a readable image (corrupt or unsupported format)", "give a PNG/JPEG/BMP file"
        )
    return image


def read_tensors(path: Path) -> list[np.ndarray] | dict[str, np.ndarray]:
    """A .npy file is one input; a .npz file maps input names (or arr_0, arr_1, ...) to arrays."""
    try:
        with path.open("rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    names = list(loaded.files)
                    arrays = {k: loaded[k] for k in names}
                if all(k.startswith("arr_") for k in names):
                    return [arrays[k] for k in sorted(names, key=lambda k: int(k[4:]))]
                return arrays
            return [loaded]
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"{path.name} is not a readable NumPy file: {exc}", "save it with numpy.save / numpy.savez"
        ) from None


def read_series(path: Path, channels: list[str]) -> np.ndarray:
    """Sensor rows from CSV: columns picked by header names, or the first N numeric columns."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}", "give a UTF-8 CSV file") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path.name} has no rows", "give a CSV with one sample per line")
    header = [c.strip() for c in rows[0]]
    columns = list(range(len(channels)))
    if all(ch in header for ch in channels):
        columns = [header.index(ch) for ch in channels]
        rows = rows[1:]
    elif not _is_number(header[0]):
        rows = rows[1:]
    try:
        data = np.asarray([[float(r[c]) for c in columns] for r in rows], dtype=np.float32)
    except (ValueError, IndexError):
        raise InputError(
            f"{path.name}: rows must hold {len(channels)} numbers ({', '.join(channels)})", "fix the CSV columns"
        ) from None
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path.name} contains non-finite values", "remove NaN/inf rows")
    return data


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def predict_file(predictor: Predictor, path: Path) -> Iterator[tuple[str, Prediction]]:
    """Predict on one input file; yields (key, prediction) (several for a sensor CSV: one per window)."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"input {path} does not exist", "check the path")
    if suffix in TENSOR_SUFFIXES:
        arrays = read_tensors(path)
        if predictor.kind == "timeseries" and isinstance(arrays, list) and len(arrays) == 1 and arrays[0].ndim == 2:
            yield str(path), predictor.predict_window(arrays[0])
            return
        yield str(path), predictor.predict_tensors(arrays)
    elif suffix in IMAGE_SUFFIXES:
        yield str(path), predictor.predict_image(read_image(path))
    elif suffix == ".csv":
        spec = predictor.input_spec
        if not isinstance(spec, TimeSeriesInput):
            raise InputError(f"{path.name}: CSV input needs a time-series model", "give an image or .npy file")
        series = read_series(path, spec.channels)
        windows = sliding_windows(series, spec.window, spec.stride)
        if len(windows) == 0:
            raise InputError(
                f"{path.name} has {len(series)} rows, fewer than one window ({spec.window})", "give more rows"
            )
        for i, window in enumerate(windows):
            yield f"{path}#window={i}", predictor.predict_window(window)
    else:
        raise InputError(
            f"{path.name}: unknown input type {suffix!r}",
            f"give {', '.join(sorted(IMAGE_SUFFIXES | TENSOR_SUFFIXES | {'.csv'}))} files",
        )
