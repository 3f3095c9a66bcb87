"""Result sinks and the bus: batches handed to the OS, rotation by size, a full disk reported, nothing lost."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from agent.config import JsonlSinkConfig, StdoutSinkConfig
from agent.sinks import JsonlSink, ResultBus, StdoutSink
from tests.daemon_helpers import wait_until


def record(i: int) -> dict:
    return {"pipeline": "p", "seq": i, "task": "classification", "label": str(i % 10), "score": 0.5}


def test_bus_delivers_every_result_in_order_and_makes_it_visible(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.jsonl"
    stream = io.StringIO()
    bus = ResultBus(
        {
            "jsonl": JsonlSink(JsonlSinkConfig(path=str(path))),
            "stdout": StdoutSink(StdoutSinkConfig(format="json"), stream),
        }
    )
    heard: list[int] = []
    bus.listeners.append(lambda r: heard.append(r["seq"]))
    bus.start()
    emit = bus.emitter(["jsonl", "stdout", "unknown"])
    for i in range(1, 2001):
        emit(record(i))
    # visible to a reader while the daemon runs: each batch is handed to the OS
    assert wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 2000, timeout=10)
    bus.close()
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == list(range(1, 2001))
    assert [json.loads(line)["seq"] for line in stream.getvalue().splitlines()] == list(range(1, 2001))
    assert heard == list(range(1, 2001)) and bus.delivered == 2000 and bus.overflowed == 0


def test_jsonl_rotates_by_size_and_continues_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"old":1}\n')
    line_len = len(json.dumps(record(1), separators=(",", ":"))) + 1
    sink = JsonlSink(JsonlSinkConfig(path=str(path), max_bytes=10 + 5 * line_len))
    for i in range(1, 8):
        sink.write(record(i))
    sink.close()
    rotated = path.with_name("results.jsonl.1").read_text().splitlines()
    assert rotated[0] == '{"old":1}' and [json.loads(x)["seq"] for x in rotated[1:]] == [1, 2, 3, 4, 5]
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [6, 7]
    assert all(os.path.getsize(p) <= 10 + 5 * line_len for p in (path, path.with_name("results.jsonl.1")))


def test_jsonl_on_a_full_disk_reports_once_and_keeps_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    path.symlink_to("/dev/full")
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    for i in range(3):
        for _ in range(2000):  # more than the write buffer holds
            sink.write(record(i))
        sink.publish()
    sink.close()
    out = capsys.readouterr()
    assert (out.out + out.err).count("jsonl sink cannot write") == 1


def test_result_lines_parse_to_the_record_whatever_it_holds() -> None:
    """The fast encoder (orjson) and the standard library give lines that parse to the same values; what orjson does not
    take falls back to the standard library; NaN becomes null (valid JSON) with orjson."""
    import math

    import numpy as np

    from agent import jsonlines

    plain = record(3) | {"label": "café ✓", "top": [{"index": 1, "score": 0.25}], "ok": True, "none": None}
    assert json.loads(jsonlines.encode(plain)) == plain
    assert json.loads(jsonlines.dumps(plain)) == plain and "\n" not in jsonlines.dumps(plain)
    assert json.loads(jsonlines.encode({"big": 2**70, 1: "int key"})) == {"big": 2**70, "1": "int key"}
    if jsonlines.orjson is not None:
        assert json.loads(jsonlines.encode({"v": np.float32(0.5), "a": np.arange(3)})) == {"v": 0.5, "a": [0, 1, 2]}
        assert json.loads(jsonlines.encode({"nan": math.nan})) == {"nan": None}
    with pytest.raises(TypeError):
        jsonlines.encode({"x": object()})


@pytest.mark.parametrize("fast", [True, False], ids=["orjson", "stdlib"])
def test_jsonl_rotation_counts_bytes_of_non_ascii_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    from agent import jsonlines

    if not fast:
        monkeypatch.setattr(jsonlines, "orjson", None)
    path = tmp_path / "results.jsonl"
    rec = record(1) | {"label": "число"}  # 2 bytes a letter in UTF-8
    line_bytes = len(json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()) + 1
    sink = JsonlSink(JsonlSinkConfig(path=str(path), max_bytes=3 * line_bytes))
    for _ in range(7):
        sink.write(rec)
    sink.close()
    sizes = [os.path.getsize(p) for p in (path, path.with_name("results.jsonl.1"))]
    assert all(size <= 3 * line_bytes for size in sizes) and sum(sizes) == 4 * line_bytes  # 3 + 1 after 2 rotations
    assert all(json.loads(x) == rec for x in path.read_text(encoding="utf-8").splitlines())
