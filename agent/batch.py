"""Batch prediction over a directory or a video into JSONL, resumable."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from agent.errors import AgentError, InputError
from agent.inputs import INPUT_SUFFIXES, VIDEO_SUFFIXES, predict_file
from agent.jsonlines import dumps
from agent.predictor import Predictor


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    errors: int = 0
    failed: list[str] = field(default_factory=list)  # inputs that failed in this run, in order

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"failed": list(self.failed)}


def model_identity(record: dict[str, Any]) -> tuple[str, str] | None:
    """What identifies the model that wrote a record: its sha256, else (older files) its name and version."""
    if isinstance(record.get("model_sha256"), str):
        return ("sha256", record["model_sha256"])
    if isinstance(record.get("model"), str):
        return ("name", f"{record['model']} {record.get('version', '')}".strip())
    return None


def foreign_model(output: Path, predictor: Predictor) -> str | None:
    """Describe the other model whose results ``output`` holds, or None when every record is this model's."""
    if not output.exists():
        return None
    bundle = predictor.bundle
    mine = {("sha256", bundle.sha256), ("name", f"{bundle.name} {bundle.version}")}
    with output.open("rb") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            ident = model_identity(record)
            if ident is None or ident in mine:
                continue
            name = f"{record.get('model', '')} {record.get('version', '')}".strip()
            sha = record.get("model_sha256")
            sha_text = f"sha256 {sha[:12]}" if isinstance(sha, str) else ""
            return f"{name} ({sha_text})" if name and sha_text else name or sha_text
    return None


def completed_keys(output: Path) -> set[str]:
    """Keys already in ``output``; a torn last line (crash mid-write) is cut off so appends stay valid."""
    if not output.exists():
        return set()
    keys: set[str] = set()
    good_end = 0
    with output.open("rb+") as fh:
        offset = 0
        for line in fh:
            end = offset + len(line)
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if isinstance(record, dict) and isinstance(record.get("input"), str):
                keys.add(record["input"])
            good_end = end
            offset = end
        if good_end != output.stat().st_size:
            fh.truncate(good_end)
    return keys


def list_inputs(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
    return [source]


def video_frames(path: Path) -> Iterator[tuple[int, Any]]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InputError(f"{path.name} is not a readable video", "give a video OpenCV can decode (mp4, avi, mkv)")
    try:
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield index, frame
            index += 1
    finally:
        cap.release()


def video_frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))) if cap.isOpened() else 0
    finally:
        cap.release()


def run_batch(
    predictor: Predictor,
    source: Path,
    output: Path,
    progress: Any = None,
    on_error: Callable[[str, str], None] | None = None,
) -> BatchSummary:
    """Predict every input under ``source`` into ``output``; inputs already there are skipped.

    ``progress`` is an optional callable ``(advance: int, total: int | None)`` for a progress bar; ``on_error`` is
    called with ``(input, message)`` for each input that fails. Every record names the model's sha256, and an
    ``output`` holding another model's results is refused rather than resumed.
    """
    if not source.exists():
        raise InputError(f"input {source} does not exist", "give a directory of inputs or a video file")
    other = foreign_model(output, predictor)
    if other is not None:
        bundle = predictor.bundle
        raise AgentError(
            f"{output} holds results of another model, {other}, not {bundle.name} {bundle.version}"
            f" (sha256 {bundle.sha256[:12]}): resuming would mix them",
            "give another --output, or delete that file to start over",
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    done_keys = completed_keys(output)
    stamp = {"model_sha256": predictor.bundle.sha256}
    named = {"model": predictor.bundle.name, "version": predictor.bundle.version}
    summary = BatchSummary()
    is_video = source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES
    try:
        fh = output.open("a", encoding="utf-8")
    except OSError as exc:
        raise AgentError(f"cannot write {output}: {exc.strerror}", "check the directory and free space") from None
    with fh:

        def emit(record: dict[str, Any]) -> None:
            try:
                fh.write(dumps(record | stamp) + "\n")
                fh.flush()
            except OSError as exc:
                raise AgentError(
                    f"cannot write {output}: {exc.strerror}", "free disk space, then run again to resume"
                ) from None

        def failed(key: str, message: str) -> None:
            summary.errors += 1
            summary.failed.append(key)
            if on_error is not None:
                on_error(key, message)

        if is_video:
            summary.total = video_frame_count(source)
            if progress:
                progress(0, summary.total)
            for index, frame in video_frames(source):
                key = f"{source}#frame={index}"
                if key in done_keys:
                    summary.skipped += 1
                else:
                    try:
                        emit({"input": key} | predictor.predict_image(frame).to_dict())
                        summary.done += 1
                    except InputError as exc:
                        emit({"input": key, "error": str(exc)} | named)
                        failed(key, str(exc))
                if progress:
                    progress(1, None)
        else:
            files = list_inputs(source)
            summary.total = len(files)
            if progress:
                progress(0, summary.total)
            for path in files:
                if str(path) in done_keys or f"{path}#window=0" in done_keys:
                    summary.skipped += 1
                else:
                    try:
                        for key, pred in predict_file(predictor, path):
                            if key not in done_keys:
                                emit({"input": key} | pred.to_dict())
                        summary.done += 1
                    except InputError as exc:
                        emit({"input": str(path), "error": str(exc)} | named)
                        failed(str(path), str(exc))
                if progress:
                    progress(1, None)
        fh.flush()
        os.fsync(fh.fileno())
    return summary
