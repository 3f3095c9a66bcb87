"""The agent never echoes an unverified field as it came: a command id (acks, update states), a sequence number or a
target taken from an unverified message goes out only when it has the protocol's shape, else null / left out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.ids import ECHO_ID, echo_id
from tests.daemon_helpers import stop, wait_until
from tests.mosquitto import Broker, Subscriber
from tests.update_helpers import Fleet, agent_config, start, states

POISON_IDS = {"surrogate": "\ud800", "huge": "h" * 200, "10kb": "k" * 10_240}


@pytest.mark.parametrize(
    "value", ["c1", "c-0a1b2c3d4e5f", "r-20261203-151500-ab12", "rollout-17", "a" * 128, "x/y:z@w+v=u.t_s-r"]
)
def test_ids_of_the_protocols_shape_are_echoed(value: str) -> None:
    assert echo_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        5,
        2**70,
        True,
        ["c1"],
        {"id": "c1"},
        "",
        "\ud800",
        "c\udfff1",
        "a" * 129,
        "k" * 10_240,
        "a b",
        "c1\n",
        "-c1",
        "ünï",
        "c1\x00",
        "../../etc",
    ],
)
def test_anything_else_is_not(value: Any) -> None:
    assert echo_id(value) is None


def test_pattern_is_ascii_and_bounded() -> None:
    assert ECHO_ID.pattern.isascii() and "{0,127}" in ECHO_ID.pattern


def _strict(raw: bytes) -> dict[str, Any]:
    """Decode as a strict peer would: UTF-8, JSON, and no lone surrogate escapes anywhere."""
    text = raw.decode("utf-8")
    data = json.loads(text)
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return data


def test_acks_and_update_states_carry_no_poisoned_id(tmp_path: Path, broker: Broker) -> None:
    fleet = Fleet(tmp_path, broker)
    sub = Subscriber(broker, "edge/#")
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    try:
        assert wait_until(
            lambda: any(json.loads(m.payload).get("state") == "online" for m in sub.messages("edge/dev1/status")), 60
        ), (proc.output_dir / "stderr.txt").read_text()[-3000:]
        bad_signature = [{"keyid": "0" * 64, "sig": "00" * 64}]
        for label, poison in POISON_IDS.items():
            signed = {"v": 1, "type": "command", "id": poison, "seq": 10**6, "issued": 1.0, "expires": 2e9}
            signed |= {"device": "dev1", "name": "diagnostics"}
            body = json.dumps({"signed": signed, "signatures": bad_signature}).encode()  # \\ud800 escapes
            assert fleet.link.wait_published(fleet.link.publish("edge/dev1/cmd/diagnostics", body, qos=1), 10), label
        good = {"v": 1, "type": "command", "id": "c-fine1", "seq": 10**6, "issued": 1.0, "expires": 2e9}
        body = json.dumps({"signed": good | {"device": "dev1", "name": "diagnostics"}, "signatures": bad_signature})
        fleet.link.publish("edge/dev1/cmd/diagnostics", body.encode(), qos=1)
        long_level = "edge/dev1/cmd/" + "n" * 5000
        fleet.link.publish(long_level, json.dumps({"id": "\ud800"}).encode(), qos=1)
        assert wait_until(lambda: len(sub.messages("edge/dev1/ack")) >= len(POISON_IDS) + 2, 60), sub.messages()
        acks = [_strict(m.payload) for m in sub.messages("edge/dev1/ack")]
        poisoned, fine, topic = acks[: len(POISON_IDS)], acks[len(POISON_IDS)], acks[-1]
        for ack in poisoned:
            assert "id" in ack and ack["id"] is None, ack
            assert ack["ok"] is False and ack["command"] == "diagnostics" and "signature" in ack["error"]
        assert fine["id"] == "c-fine1" and fine["ok"] is False  # an id of the right shape is echoed, still refused
        assert topic["id"] is None and topic["command"] == "invalid" and len(json.dumps(topic)) < 1000

        # deployments refused before they are verified: no poisoned id, seq or target in the update state
        since = len(states(sub))
        for label, poison in POISON_IDS.items():
            signed = {"v": 1, "type": "deploy", "id": poison, "seq": 2**70, "issued": 1.0, "expires": 2e9}
            signed |= {"device": "dev1", "pipeline": "digits", "target": "t/" + "x" * 10_000}
            fleet.send("dev1", json.dumps({"signed": signed, "signatures": bad_signature}).encode())
            assert wait_until(lambda before=since: len(states(sub)) > before, 60), label
            since = len(states(sub))
        reports = [_strict(m.payload) for m in sub.messages("edge/dev1/update/status")][-len(POISON_IDS) :]
        for report in reports:
            assert report["state"] == "rejected", report
            assert "command_id" not in report and report["update_id"] == "unknown/0", report
            assert "target" not in report
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        sub.close()
        fleet.close()
