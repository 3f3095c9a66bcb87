"""Staged rollouts end to end: a fleet server (registry, repository, rollout driver), a real Mosquitto and three real
agent processes. Canary then waves; a failing canary aborts with the rest untouched; an offline device catches up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fleet.config import FleetConfig
from fleet.keys import KeyStore
from fleet.repository import Repository
from fleet.rollout import RolloutPolicy
from fleet.server import FleetServer
from tests.update_helpers import SAMPLES, build_bundle, start, stop, versions_served, wait_until

DEVICES = ("dev1", "dev2", "dev3")


class FleetUnderTest:
    def __init__(self, tmp: Path, broker: Any) -> None:
        self.tmp = tmp
        self.config = FleetConfig(
            data_dir=str(tmp / "fleet"),
            broker={"url": broker.url},
            offline_after_s=30,
        )
        self.repository = Repository.init(self.config.repository_dir, KeyStore(self.config.keys_dir))
        self.server = FleetServer(self.config, tick_s=0.3)
        self.server.start()
        self.ops = self.server.ops  # the console's Operations would have its own broker connection
        self.server.registry.add_group("lab")
        for device in DEVICES:
            self.server.registry.add_device(device, group="lab", hardware="x86_64")
        self.procs: dict[str, Any] = {}
        self.broker = broker

    def agent_config(self, device: str, *, sensor: bool = False) -> Path:
        if sensor:  # a device whose "main" pipeline runs another kind of model: a digits bundle fails validation there
            source = {"type": "replay", "path": str(SAMPLES / "inputs" / "sensor_normal.csv"), "rate": 100.0}
            model = "sample:sensor-anomaly"
        else:
            source = {"type": "replay", "path": str(SAMPLES / "inputs" / "digit_*.png"), "rate": 30.0}
            model = "sample:digits-classifier-tflite"
        config = {
            "device_id": device,
            "state_dir": str(self.tmp / f"state-{device}"),
            "profile": "x86_64",
            "sources": {"in": source},
            "pipelines": {"main": {"source": "in", "model": model, "sinks": ["jsonl"]}},
            "sinks": {"jsonl": {"path": str(self.tmp / f"results-{device}.jsonl")}, "stdout": {"every": 1000}},
            "mqtt": {"broker": self.broker.url, "telemetry_interval": 1.0, "reconnect_max": 2.0},
            "update": {
                "enabled": True,
                "trust_root": str(self.repository.metadata_dir / "1.root.json"),
                "request_timeout_s": 2.0,
                "health_window_s": 2.0,
                "health_min_results": 5,
                "latency_runs": 5,
            },
        }
        path = self.tmp / f"agent-{device}.toml"
        path.write_text(tomli_w.dumps(config))
        return path

    def start_agent(self, device: str, **kw: Any) -> None:
        self.procs[device] = start(self.agent_config(device, **kw), self.tmp, name=device)
        assert wait_until(lambda: bool(versions_served(self.tmp / f"results-{device}.jsonl")), 30)

    def wait_online(self, *devices: str) -> None:
        def online() -> bool:
            states = {d["id"]: d["online"] for d in self.server.registry.devices()}
            return all(states.get(d) for d in devices)

        assert wait_until(online, 30), self.server.registry.devices()

    def publish(self, version: str) -> str:
        bundle = build_bundle(self.tmp, version)
        target = f"digits-classifier-tflite/digits-classifier-tflite-{version}.tar.gz"
        self.repository.add_target(
            bundle, target, name="digits-classifier-tflite", version=version, hardware=["x86_64"], task="classification"
        )
        return target

    def wait_rollout(self, rollout_id: str, statuses: tuple[str, ...], timeout: float = 90.0) -> dict[str, Any]:
        assert wait_until(lambda: self.ops.rollout(rollout_id)["status"] in statuses, timeout), self.ops.rollout(
            rollout_id
        )
        return self.ops.rollout(rollout_id)

    def serving(self, device: str) -> str:
        start_line = len((self.tmp / f"results-{device}.jsonl").read_text().splitlines())
        assert wait_until(lambda: len(versions_served(self.tmp / f"results-{device}.jsonl", start_line)) >= 3, 20)
        return versions_served(self.tmp / f"results-{device}.jsonl", start_line)[-1]

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.server.stop()


@pytest.fixture
def fleet(tmp_path: Path, broker: Any) -> Iterator[FleetUnderTest]:
    f = FleetUnderTest(tmp_path, broker)
    yield f
    f.close()


POLICY = RolloutPolicy(canary=1, wave_factor=2.0, max_failure_rate=0.3, min_terminal=1, device_timeout_s=120)


def test_canary_then_waves_all_commit(fleet: FleetUnderTest) -> None:
    for device in DEVICES:
        fleet.start_agent(device)
    fleet.wait_online(*DEVICES)
    target = fleet.publish("1.1.0")
    created = fleet.ops.create_rollout(target, group="lab", pipeline="main", policy=POLICY)
    assert created["summary"]["waves"] == [1, 2]
    done = fleet.wait_rollout(created["id"], ("completed", "aborted"))
    assert done["status"] == "completed", done
    assert {d: r["state"] for d, r in done["devices"].items()} == dict.fromkeys(DEVICES, "succeeded")
    waves = {d: r["wave"] for d, r in done["devices"].items()}
    assert waves == {"dev1": 0, "dev2": 1, "dev3": 1}
    for device in DEVICES:
        assert fleet.serving(device) == "1.1.0"
    # the registry shows what the devices report they run, not what the server sent
    assert wait_until(
        lambda: all(d["models"].get("main", {}).get("version") == "1.1.0" for d in fleet.server.registry.devices()), 20
    )
    # results summaries arrive with the telemetry: counts and top-1 labels per pipeline
    assert wait_until(
        lambda: (fleet.server.registry.device("dev1")["results"] or {}).get("main", {}).get("results", 0) > 0, 20
    )
    assert set(fleet.server.registry.device("dev1")["results"]["main"]["labels"]) <= set("0123456789")
    actions = [a["action"] for a in fleet.server.registry.audit_log(200)]
    assert "rollout.create" in actions and "rollout.finished" in actions


def test_failing_canary_aborts_with_the_rest_untouched(fleet: FleetUnderTest, mqtt_client: Any) -> None:
    fleet.start_agent("dev1", sensor=True)  # validation of a digits model fails here
    fleet.start_agent("dev2")
    fleet.start_agent("dev3")
    fleet.wait_online(*DEVICES)
    target = fleet.publish("1.1.0")
    created = fleet.ops.create_rollout(target, group="lab", pipeline="main", policy=POLICY)
    done = fleet.wait_rollout(created["id"], ("completed", "aborted"))
    assert done["status"] == "aborted", done
    assert done["devices"]["dev1"]["state"] == "failed"
    assert "validation failed" in (done["devices"]["dev1"]["reason"] or "")
    assert done["devices"]["dev2"]["state"] == "pending" and done["devices"]["dev3"]["state"] == "pending"
    retained = mqtt_client(fleet.broker, ["edge/dev2/update/deploy", "edge/dev3/update/deploy"])
    retained.assert_no_message(within=1.0)  # never sent a deployment
    assert fleet.serving("dev2") == "1.0.0" and fleet.serving("dev3") == "1.0.0"


def test_offline_device_catches_up_when_it_returns(fleet: FleetUnderTest) -> None:
    for device in DEVICES:
        fleet.start_agent(device)
    fleet.wait_online(*DEVICES)
    stop(fleet.procs.pop("dev3"))  # clean shutdown: retained status "offline"
    assert wait_until(lambda: not fleet.server.registry.device("dev3")["online"], 20)
    target = fleet.publish("1.1.0")
    policy = RolloutPolicy(
        canary=1, wave_factor=2.0, max_failure_rate=0.3, min_terminal=1, device_timeout_s=120, offline_grace_s=600
    )
    created = fleet.ops.create_rollout(target, group="lab", pipeline="main", policy=policy)
    assert wait_until(lambda: fleet.ops.rollout(created["id"])["devices"]["dev2"]["state"] == "succeeded", 90), (
        fleet.ops.rollout(created["id"])
    )
    assert fleet.ops.rollout(created["id"])["devices"]["dev3"]["state"] == "skipped"
    assert fleet.ops.rollout(created["id"])["status"] == "running"  # waiting for dev3 within the grace period
    fleet.start_agent("dev3")
    done = fleet.wait_rollout(created["id"], ("completed", "aborted"))
    assert done["status"] == "completed" and done["devices"]["dev3"]["state"] == "succeeded", done
    assert fleet.serving("dev3") == "1.1.0"


def test_signed_device_commands_are_acknowledged_and_audited(
    fleet: FleetUnderTest, broker: Any, mqtt_client: Any
) -> None:
    fleet.start_agent("dev1")
    fleet.wait_online("dev1")
    result = fleet.ops.send_command("dev1", "set", {"pipelines.main.max_fps": "5"})
    assert result["ok"], result
    assert result["ack"]["result"]["set"] == {"pipelines.main.max_fps": 5.0}
    diagnostics = fleet.ops.send_command("dev1", "diagnostics", {})
    assert diagnostics["ok"] and diagnostics["ack"]["result"]["update"]["main"]["active_slot"] == "a", diagnostics
    bad = fleet.ops.send_command("dev1", "set", {"no_such_key": "1"})
    assert not bad["ok"] and "cannot be set" in bad["ack"]["error"]
    # a forged command (signed by a key the device does not trust) is refused with an ack
    sub = mqtt_client(broker, "edge/dev1/ack")
    forged = {
        "signed": {
            "v": 1,
            "type": "command",
            "id": "forged",
            "seq": 10**15,
            "issued": time.time(),
            "expires": time.time() + 60,
            "device": "dev1",
            "name": "restart",
            "args": {},
        },
        "signatures": [{"keyid": "ab" * 32, "sig": "cd" * 64}],
    }
    sub.publish("edge/dev1/cmd/restart", json.dumps(forged).encode())
    ack = json.loads(sub.wait_for(lambda m: b'"forged"' in m.payload)[0].payload)
    assert not ack["ok"] and "valid signature" in ack["error"]
    assert fleet.procs["dev1"].poll() is None
    restart = fleet.ops.send_command("dev1", "restart", {})
    assert restart["ok"]
    assert fleet.procs["dev1"].wait(20) == 75  # exits for systemd to start it again
    audit = [(a["action"], a["ok"]) for a in fleet.server.registry.audit_log(50)]
    assert ("command.set", True) in audit and ("command.set", False) in audit and ("command.restart", True) in audit
