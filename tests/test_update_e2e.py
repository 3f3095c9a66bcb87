"""Signed model updates end to end: real Mosquitto, real fleet repository and server, real agent processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.update_helpers import (
    Fleet,
    agent_config,
    build_bundle,
    chain,
    start,
    stop,
    wait_serving,
    wait_state,
)

HAPPY_CHAIN = ["offered", "downloading", "downloaded", "validating", "activating", "trial", "committed"]


@pytest.fixture
def fleet(tmp_path: Path, broker: Any) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker)
    yield f
    f.close()


def test_update_is_downloaded_validated_hot_swapped_and_committed(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path)
    try:
        wait_serving(results, "1.0.0")
        target = fleet.publish(build_bundle(tmp_path, "1.1.0", pad_bytes=300_000), "1.1.0")
        fleet.deploy("dev1", target)
        wait_state(sub, "committed", timeout=60)
        assert chain(sub) == HAPPY_CHAIN
        wait_serving(results, "1.1.0")
        assert proc.poll() is None  # hot swap: same process
        status = [json.loads(m.payload) for m in sub.messages("edge/dev1/status")][-1]
        assert status["models"]["digits"]["version"] == "1.1.0"
        seqs = [json.loads(line)["seq"] for line in results.read_text().splitlines()]
        assert seqs == list(range(1, len(seqs) + 1))  # the pipeline kept numbering: never restarted
    finally:
        stop(proc)
    print((proc.output_dir / "stderr.txt").read_text()[-3000:])


def _labels_reversed(meta: dict[str, Any], work: Path) -> None:
    meta["labels"] = list(reversed(meta["labels"]))


def test_shadow_mode_activates_on_agreement_and_rejects_on_disagreement(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    try:
        wait_serving(results, "1.0.0")
        bad = fleet.publish(build_bundle(tmp_path, "1.1.0", edit=_labels_reversed), "1.1.0")
        fleet.deploy("dev1", bad, shadow_frames=20, shadow_agreement=0.9)
        rejected = wait_state(sub, "rejected")
        assert "shadow agreement" in rejected["reason"] and rejected["agreement"] < 0.5
        assert chain(sub) == ["offered", "downloading", "downloaded", "validating", "shadow", "rejected"]
        wait_serving(results, "1.0.0")
        since = len(chain(sub))
        good = fleet.publish(build_bundle(tmp_path, "1.2.0"), "1.2.0")
        fleet.deploy("dev1", good, shadow_frames=20, shadow_agreement=0.9)
        committed = wait_state(sub, "committed")
        assert committed["version"] == "1.2.0"
        assert chain(sub)[since:] == [
            "offered",
            "downloading",
            "downloaded",
            "validating",
            "shadow",
            "activating",
            "trial",
            "committed",
        ]
        shadow = [
            s
            for s in (json.loads(m.payload) for m in sub.messages("edge/dev1/update/status"))
            if s["state"] == "shadow"
        ]
        assert shadow[-1]["agreement"] == 1.0 or committed.get("agreement") == 1.0
        wait_serving(results, "1.2.0")
    finally:
        stop(proc)


def test_unhealthy_model_is_rolled_back_automatically(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    """Passes validation (no latency budget) but runs 40x slower than the model it replaced: the health window
    rolls it back by itself, hot, to the previous slot."""
    from tests.test_update_attacks import _onnx_digits

    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    try:
        wait_serving(results, "1.0.0")

        def slow_no_budget(meta: dict[str, Any], work: Path) -> None:
            _onnx_digits("slow")(meta, work)
            meta.pop("budget", None)

        target = fleet.publish(build_bundle(tmp_path, "1.1.0", edit=slow_no_budget), "1.1.0")
        fleet.deploy("dev1", target)
        rolled = wait_state(sub, "rolled_back")
        assert "unhealthy in trial" in rolled["reason"] and "latency" in rolled["reason"]
        assert chain(sub) == [
            "offered",
            "downloading",
            "downloaded",
            "validating",
            "activating",
            "trial",
            "rolled_back",
        ]
        wait_serving(results, "1.0.0")
        assert proc.poll() is None
        status = [json.loads(m.payload) for m in sub.messages("edge/dev1/status")][-1]
        assert status["models"]["digits"]["version"] == "1.0.0"
    finally:
        stop(proc)


def test_explicit_signed_rollback_to_a_version_that_ran_before(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0"))
        wait_state(sub, "committed")
        wait_serving(results, "1.1.0")
        since = (
            len(json.loads(m.payload) for m in sub.messages("edge/dev1/update/status"))
            if False
            else len(sub.messages("edge/dev1/update/status"))
        )
        old = fleet.publish(build_bundle(tmp_path, "1.0.0"), "1.0.0", name="digits-classifier-tflite")
        fleet.deploy("dev1", old)  # a plain downgrade is refused ...
        assert "downgrade" in wait_state(sub, "rejected", since=since)["reason"]
        fleet.deploy("dev1", old, rollback=True)  # ... a signed rollback to a version it ran is not
        assert wait_state(sub, "committed", since=since)["version"] == "1.0.0"
        wait_serving(results, "1.0.0")
    finally:
        stop(proc)
