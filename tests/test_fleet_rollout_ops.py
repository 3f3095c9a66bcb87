"""Rollouts on the fleet side: a device already running the target is done, a health window too short for a device's
result rate is refused at deploy with the arithmetic, and `fleet rollback` names itself in the audit log, takes the
rollout's health window (or its own) and goes back to a device's first model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import load_bundle
from agent.protocol.update import parse_deploy_command, parse_envelope
from fleet.config import FleetConfig
from fleet.db import Registry
from fleet.errors import FleetError
from fleet.keys import KeyStore
from fleet.ops import Operations
from fleet.repository import Repository
from fleet.rollout import (
    AlreadyRunning,
    DeviceState,
    RolloutPolicy,
    SendDeploy,
    Start,
    from_dict,
    health_window_shortfall,
    new_rollout,
    rollback_plan,
    step,
    to_dict,
)
from tests.conftest import SAMPLES
from tests.mosquitto import Broker, Subscriber
from tests.update_helpers import build_bundle

SAMPLE = SAMPLES / "digits-classifier-tflite"
SAMPLE_SHA = load_bundle(SAMPLE).sha256
STRICT = RolloutPolicy(canary=1, wave_factor=2.0, max_failure_rate=0.0, min_terminal=1, device_timeout_s=600)


# ---- the pure parts --------------------------------------------------------------------------------------


def test_a_device_reported_running_the_target_is_done_and_never_sent_it() -> None:
    rollout = new_rollout("r-1", "t", ["a", "b", "c"], STRICT)
    rollout, actions = step(rollout, AlreadyRunning("a", 0.0))
    assert rollout.records["a"].state == "succeeded" and rollout.records["a"].reason == "already running"
    assert from_dict(json.loads(json.dumps(to_dict(rollout)))) == rollout  # persists like any other record
    rollout, actions = step(rollout, Start(1.0))
    sent = [x.device for x in actions if isinstance(x, SendDeploy)]
    assert sent == ["b", "c"]  # the canary wave (a) had nothing to send; the next wave starts at once
    rollout, _ = step(rollout, DeviceState("b", "committed", 2.0))
    rollout, _ = step(rollout, DeviceState("c", "committed", 2.0))
    assert rollout.status == "completed" and rollout.failures == 0
    assert rollback_plan(rollout) == ["b", "c"]  # a was not changed by this rollout


def test_a_device_refusing_the_version_it_runs_already_is_done_not_a_failure() -> None:
    rollout, _ = step(new_rollout("r-1", "t", ["a", "b"], STRICT), Start(0.0))
    rollout, _ = step(rollout, DeviceState("a", "rejected", 1.0, "already running 1.1.0"))
    assert rollout.status == "running" and rollout.records["a"].state == "succeeded"
    rollout, _ = step(rollout, DeviceState("b", "rejected", 2.0, "downgrade from 2.0.0 to 1.1.0 refused"))
    assert rollout.status == "aborted"  # any other refusal is still a failure


def test_health_window_shortfall_shows_the_arithmetic() -> None:
    rates = {"cam-1": 2.0, "cam-2": 30.0, "new": None}
    assert health_window_shortfall(8, 20, rates) == (
        "health window 8 s x 2.0 results/s on cam-1 = 16 results, fewer than the 20 needed",
        "--health-window 10 or more",
    )
    assert health_window_shortfall(10, 20, rates) is None
    assert health_window_shortfall(8, 16, rates) is None
    assert health_window_shortfall(8, 0, {"slow": 0.5}) is None  # no minimum: nothing to judge
    assert health_window_shortfall(8, 20, {"starting": 0.0}) is None  # first telemetry, before any result
    problem, _ = health_window_shortfall(5, 20, {"a": 3.0, "b": 1.5}) or ("", "")
    assert "on b = 8 results" in problem and "and 1 more device" in problem
    assert health_window_shortfall(5, 20, {"a": 1.5})[1] == "--health-window 14 or more"  # type: ignore[index]


# ---- Operations against a real broker and registry -----------------------------------------------------------


class Setup:
    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.config = FleetConfig(data_dir=str(tmp / "fleet"), broker={"url": broker.url})
        self.repository = Repository.init(self.config.repository_dir, KeyStore(self.config.keys_dir))
        self.registry = Registry(self.config.database_url)
        self.registry.migrate()
        self.registry.add_group("lab")
        for device in ("cam-1", "cam-2", "cam-3"):
            self.registry.add_device(device, group="lab", hardware="x86_64")
        self.ops = Operations(self.config, actor="tester", registry=self.registry, repository=self.repository)
        self.tmp = tmp

    def publish(self, version: str) -> str:
        archive = build_bundle(self.tmp, version)
        target = f"digits-classifier-tflite/digits-classifier-tflite-{version}.tar.gz"
        self.repository.add_target(
            archive, target, name="digits-classifier-tflite", version=version, hardware=[], model_sha256=SAMPLE_SHA
        )
        return target

    def report(self, device: str, version: str, fps: float | None = None, sha: str = SAMPLE_SHA) -> None:
        model = {"name": "digits-classifier-tflite", "version": version, "sha256": sha}
        now = time.time()
        self.registry.ingest_status([{"state": "online", "device_id": device, "ts": now, "models": {"main": model}}])
        if fps is not None:
            self.registry.ingest_telemetry(
                [{"v": 1, "device_id": device, "ts": now, "pipelines": {"main": {"fps_processed": fps}}}]
            )

    def commit(self, rollout_id: str, device: str, version: str, from_version: str) -> None:
        state = {
            "v": 1, "device_id": device, "ts": time.time(), "update_id": f"{rollout_id}/1", "step": 9,
            "command_id": rollout_id, "pipeline": "main", "state": "committed", "version": version,
            "name": "digits-classifier-tflite", "from_version": from_version,
        }  # fmt: skip
        self.registry.ingest_update_states([state])
        self.report(device, version)

    def close(self) -> None:
        self.ops.close()


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Any:
    setup = Setup(tmp_path, broker)
    yield setup
    setup.close()


def _signed(message: Any) -> dict[str, Any]:
    return json.loads(message.payload)["signed"] if message.payload else {"id": None, "rollback": False}


def _deployments(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    out = []
    for m in sub.messages(f"edge/{device}/update/deploy"):
        if m.payload:
            out.append(parse_deploy_command(parse_envelope(m.payload, "deploy").signed).model_dump())
    return out


def test_deploy_refuses_a_short_health_window_and_signs_the_health_settings(fleet: Setup, broker: Broker) -> None:
    target = fleet.publish("1.1.0")
    fleet.report("cam-1", "1.0.0", fps=2.0)
    fleet.report("cam-2", "1.1.0", fps=30.0)  # runs the target already
    # cam-3 has sent no telemetry: not judged
    with pytest.raises(FleetError) as caught:
        fleet.ops.create_rollout(target, group="lab", policy=STRICT, health_window_s=8)
    assert str(caught.value) == (
        "health window 8 s x 2.0 results/s on cam-1 = 16 results, fewer than the 20 needed "
        "(fix: --health-window 10 or more)"
    )
    assert fleet.registry.list_rollouts() == []
    with pytest.raises(FleetError, match="fewer than the 30 needed"):
        fleet.ops.create_rollout(target, group="lab", policy=STRICT, health_window_s=10, health_min_results=30)

    with Subscriber(broker, "edge/+/update/deploy") as sub:
        info = fleet.ops.create_rollout(
            target,
            devices=["cam-2", "cam-1", "cam-3"],
            policy=STRICT,
            health_window_s=8,
            health_min_results=10,
            health_latency_factor=3.0,
            health_latency_floor_ms=12.5,
        )
        assert info["devices"]["cam-2"]["state"] == "succeeded"
        assert info["devices"]["cam-2"]["reason"] == "already running"
        sub.wait_for("edge/cam-1/update/deploy")
        sub.assert_no_message("edge/cam-2/update/deploy", within=0.3)  # never sent what it runs
        (deploy,) = _deployments(sub, "cam-1")
    assert (deploy["health_window_s"], deploy["health_min_results"]) == (8.0, 10)
    assert (deploy["health_latency_factor"], deploy["health_latency_floor_ms"]) == (3.0, 12.5)
    assert info["status"] == "running"  # the canary was done already: the next wave went out
    audit = fleet.registry.audit_log(20, action="rollout.create")[0]
    assert audit["detail"]["already_running"] == ["cam-2"]


def test_rollback_is_audited_as_such_takes_the_window_and_returns_to_the_first_model(
    fleet: Setup, broker: Broker
) -> None:
    target = fleet.publish("1.1.0")
    for device in ("cam-1", "cam-2"):
        fleet.report(device, "1.0.0", fps=30.0)  # the agent's sample, never published
    with Subscriber(broker, "edge/+/update/deploy") as sub:
        info = fleet.ops.create_rollout(target, devices=["cam-1", "cam-2"], policy=STRICT, health_window_s=12)
        rid = info["id"]
        for device in ("cam-1", "cam-2"):
            fleet.commit(rid, device, "1.1.0", "1.0.0")
        fleet.ops.drive(rid)
        assert fleet.ops.rollout(rid)["status"] == "completed"

        back = fleet.ops.rollback(rid)
        assert back["target"] == "digits-classifier-tflite/digits-classifier-tflite-1.0.0.tar.gz"
        published = {t.path: t for t in fleet.repository.targets()}[back["target"]]
        assert published.model_sha256 == SAMPLE_SHA and published.version == "1.0.0"
        sub.wait_for(lambda m: m.topic == "edge/cam-1/update/deploy" and _signed(m)["rollback"])
        rollbacks = [d for d in _deployments(sub, "cam-1") if d["rollback"]]
        assert rollbacks[-1]["target"] == back["target"] and rollbacks[-1]["health_window_s"] == 12.0
    entry = fleet.registry.audit_log(50, action="rollout.rollback")[0]
    assert entry["ok"] and entry["detail"]["rollback_of"] == rid and entry["detail"]["id"] == back["id"]
    assert not [e for e in fleet.registry.audit_log(50, action="rollout.create") if e["detail"]["id"] == back["id"]]
    publish = fleet.registry.audit_log(50, action="bundle.publish")[0]
    assert publish["detail"]["reason"] == f"rollback of {rid}"

    # The rollback of the rollback: its own window when given.
    for device in ("cam-1", "cam-2"):
        fleet.commit(back["id"], device, "1.0.0", "1.1.0")
    fleet.ops.drive(back["id"])
    with Subscriber(broker, "edge/cam-1/update/deploy") as sub:
        again = fleet.ops.rollback(back["id"], health_window_s=30)
        assert again["target"] == target
        sub.wait_for(lambda m: _signed(m)["id"] == again["id"])
        assert _deployments(sub, "cam-1")[-1]["health_window_s"] == 30.0


def test_rollback_to_an_unpublished_model_says_what_to_publish_and_is_audited(fleet: Setup) -> None:
    target = fleet.publish("1.1.0")
    fleet.report("cam-1", "0.9.0", sha="ab" * 32)  # a model the fleet never saw
    info = fleet.ops.create_rollout(target, devices=["cam-1"], policy=STRICT)
    fleet.commit(info["id"], "cam-1", "1.1.0", "0.9.0")
    fleet.ops.drive(info["id"])
    with pytest.raises(FleetError) as caught:
        fleet.ops.rollback(info["id"])
    text = str(caught.value)
    assert "digits-classifier-tflite 0.9.0" in text and "abababab" in text and "never published" in text
    assert "fleet bundle publish digits-classifier-tflite-0.9.0.tar.gz" in text
    assert f"fleet rollback {info['id']}" in text
    entry = fleet.registry.audit_log(10, action="rollout.rollback")[0]
    assert not entry["ok"] and entry["detail"] == {"rollback_of": info["id"]} and "never published" in entry["error"]
    assert json.dumps(entry)  # JSON-safe


def test_console_deploy_health_options(tmp_path: Path) -> None:
    from tests.test_fleet_console import Fleet, assert_fleet_error, build_sample

    fleet = Fleet(tmp_path / "console")
    fleet.ok("init")
    fleet.ok("device", "provision", "cam-1", "--group", "lab")
    fleet.ok("bundle", "publish", build_sample(fleet))
    with Registry(f"sqlite:///{fleet.data / 'fleet.sqlite'}") as registry:
        registry.ingest_telemetry(
            [{"v": 1, "device_id": "cam-1", "ts": time.time(), "pipelines": {"main": {"fps_processed": 2.0}}}]
        )
    line = assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lab", "--health-window", "8"))
    assert line == (
        "fleet: error: health window 8 s x 2.0 results/s on cam-1 = 16 results, fewer than the 20 needed "
        "(fix: --health-window 10 or more)"
    )
    for option, value in (
        ("--health-latency-factor", "0"),
        ("--health-latency-floor-ms", "-1"),
        ("--health-min-results", "-5"),
        ("--health-window", "0"),
    ):
        assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lab", option, value), option, "out of range")
    created = fleet.json(
        "deploy", "digits@1.1.0", "--group", "lab", "--health-window", "10", "--health-latency-floor-ms", "20",
        "--health-latency-factor", "3", "--health-min-results", "15",
    )  # fmt: skip
    assert created["status"] == "running"
    assert_fleet_error(fleet("rollback", created["id"], "--health-window", "-3"), "--health-window", "out of range")
    assert "--health-window" in fleet.ok("rollback", "--help")
    assert_fleet_error(fleet("rollback", created["id"]), "no committed devices")
    entries = fleet.json("audit", "--action", "rollout.rollback")
    assert [(e["ok"], e["detail"]["rollback_of"]) for e in entries] == [(False, created["id"])] * 2
