"""Telemetry timing and `edge-agent check` beside a running agent, against a real Mosquitto and real processes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli
from tests.daemon_helpers import start_agent, stop
from tests.mosquitto import Broker, Message
from tests.test_mqtt import agent_config, payload


def _state(m: Message) -> str | None:
    return payload(m).get("state") if m.topic.endswith("/status") else None


def test_first_telemetry_at_connect_with_cpu_figures_and_last_at_shutdown(
    tmp_path: Path, broker: Broker, mqtt_client
) -> None:
    # An interval far beyond the test: every telemetry seen comes from the connect or the shutdown.
    config = (
        agent_config(tmp_path, broker.url, rate=50.0)
        .read_text()
        .replace("telemetry_interval = 1.0", "telemetry_interval = 3600")
    )
    (tmp_path / "agent.toml").write_text(config)
    sub = mqtt_client(broker, "edge/dev1/#")
    proc = start_agent(["run", "--config", str(tmp_path / "agent.toml")], output_dir=tmp_path)
    try:
        sub.wait_for(lambda m: _state(m) == "online", timeout=30)
        [first] = sub.wait_for("edge/dev1/telemetry", timeout=30)
        system = payload(first)["system"]
        # start-up loaded and warmed a model: the first figures cover that work
        assert system["cpu_percent"] > 0 and system["process_cpu_percent"] > 0, system
        sub.wait_for("edge/dev1/results/digits", count=20, timeout=30)
    finally:
        assert stop(proc) == 0
    sub.wait_for(lambda m: _state(m) == "offline", timeout=15)
    order = [
        ("telemetry", payload(m)) if m.topic.endswith("/telemetry") else ("status", payload(m))
        for m in sub.messages()
        if m.topic.endswith(("/telemetry", "/status"))
    ]
    offline_at = next(i for i, (kind, p) in enumerate(order) if kind == "status" and p["state"] == "offline")
    telemetry = [i for i, (kind, _) in enumerate(order) if kind == "telemetry"]
    assert len(telemetry) == 2, order  # one at connect, one at shutdown, none from the (hour-long) interval
    last = order[telemetry[-1]][1]
    assert telemetry[-1] < offline_at and order[offline_at][1]["reason"] == "shutdown"
    assert last["pipelines"]["digits"]["inferences"] >= 20  # taken while the pipeline still existed


def test_check_beside_a_running_agent_leaves_its_connection_alone(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    config = agent_config(tmp_path, broker.url)
    sub = mqtt_client(broker, "edge/dev1/#")
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        sub.wait_for(lambda m: _state(m) == "online", timeout=30)
        check = run_cli("check", "--config", config, "--json")
        report = json.loads(check.stdout)
        [probe] = [c for c in report["checks"] if c["what"] == "mqtt broker"]
        assert probe["ok"] and probe["detail"].startswith("not probed: the agent running"), probe
        sub.clear()
        # the next telemetry comes from the same connection: never dropped, never reconnected
        [tele] = sub.wait_for("edge/dev1/telemetry", timeout=30)
        assert payload(tele)["mqtt"]["connected"] is True and payload(tele)["mqtt"]["reconnects"] == 0
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    states = [_state(m) for m in sub.messages() if m.topic.endswith("/status")]
    assert states.count("offline") == 1 and states[-1] == "offline", states  # only the shutdown's
    # the probe left the broker alone: a broker binding client ids to usernames would have given it the agent's id
    assert "dev1-check-" not in broker.log_text()


def test_telemetry_again_right_after_a_reconnect(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    config = (
        agent_config(tmp_path, broker.url).read_text().replace("telemetry_interval = 1.0", "telemetry_interval = 3600")
    )
    (tmp_path / "agent.toml").write_text(config)
    sub = mqtt_client(broker, "edge/dev1/telemetry", client_id="watcher", clean_start=False, session_expiry=600)
    proc = start_agent(["run", "--config", str(tmp_path / "agent.toml")], output_dir=tmp_path)
    try:
        sub.wait_for("edge/dev1/telemetry", timeout=30)
        broker.wait_for_save()  # the watcher's session survives the crash
        broker.kill()
        broker.restart()
        sub.wait_connected(timeout=20, connects=2)
        telemetry = sub.wait_for("edge/dev1/telemetry", count=2, timeout=30)
        assert payload(telemetry[-1])["mqtt"]["reconnects"] >= 1  # sent because of the reconnect, not the interval
    finally:
        assert stop(proc) == 0
