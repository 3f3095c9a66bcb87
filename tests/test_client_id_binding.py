"""No client-id takeover: the broker lines `fleet init` / `fleet device provision` print bind each device's credentials
to its own client id (``use_username_as_clientid`` on the devices' listener), on a real Mosquitto started with them."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from fleet.provision import broker_conf_lines
from tests.conftest import run_cli
from tests.daemon_helpers import start_agent, stop
from tests.mosquitto import HOST, Broker, Subscriber, find_mosquitto, free_port, make_certs
from tests.test_fleet_console import Fleet

FLEET_PASSWORD = "fleet-broker-secret"


def test_lines_bind_devices_on_their_own_listener_and_leave_the_fleets_unbound() -> None:
    lines, note = broker_conf_lines(
        "password", Path("/p"), Path("/a"), Path("/ca"), "mqtt://127.0.0.1:1884", "mqtt://broker.lan:1883"
    )
    assert note is None
    assert lines == [
        "allow_anonymous false",
        "acl_file /a",
        "password_file /p",
        "listener 1883",
        "use_username_as_clientid true",
        "listener 1884",
    ]
    lines, _ = broker_conf_lines("certificate", Path("/p"), Path("/a"), Path("/ca"), "mqtt://h", "mqtts://h")
    assert lines[lines.index("listener 8883") :] == [
        "listener 8883",
        "cafile /ca",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "listener 1883",
    ]


def test_one_listener_for_devices_and_fleet_says_the_ids_are_not_bound() -> None:
    lines, note = broker_conf_lines("password", Path("/p"), Path("/a"), Path("/ca"), "mqtt://h:1884", None)
    assert "use_username_as_clientid true" not in lines and not any(line.startswith("listener") for line in lines)
    assert note is not None and "[broker].device_url" in note and "take over" in note


class GeneratedBroker(Broker):
    """Mosquitto running exactly the lines the fleet printed (plus logging), devices' and fleet's listeners."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, persistence=False)
        self.fleet_port = free_port()
        self.generated: list[str] = []

    def _ports(self) -> list[int]:
        return [self.port, self.fleet_port]

    def config_text(self) -> str:
        head = [f"log_dest file {self.log_path}", "log_type all", "connection_messages true", "persistence false"]
        if os.geteuid() == 0:
            head.append("user root")
        return "\n".join(head + self.generated) + "\n"

    @property
    def fleet_side(self) -> Any:
        """What a Subscriber needs to connect to the fleet's own listener."""
        return types.SimpleNamespace(host=HOST, port=self.fleet_port, tls_port=None)


def _setup(tmp_path: Path) -> tuple[GeneratedBroker, Fleet, dict[str, dict[str, Any]]]:
    find_mosquitto()
    broker = GeneratedBroker(tmp_path / "broker")
    fleet = Fleet(tmp_path / "fleet")
    fleet.write_config(
        f"mqtt://{HOST}:{broker.fleet_port}",
        device_url=f"mqtt://{HOST}:{broker.port}",
        username="fleet",
        password=FLEET_PASSWORD,
    )
    fleet.ok("init")
    reports = {d: fleet.json("device", "provision", d, "--group", "lab") for d in ("devA", "devB")}
    broker.generated = reports["devB"]["broker_conf"]
    assert "use_username_as_clientid true" in broker.generated, reports["devB"]
    broker.start()
    return broker, fleet, reports


def _password(report: dict[str, Any]) -> str:
    return (Path(report["directory"]) / "password").read_text().strip()


def test_device_credentials_cannot_take_over_another_devices_session(tmp_path: Path) -> None:
    broker, _, reports = _setup(tmp_path)
    subs: list[Subscriber] = []
    try:
        b = Subscriber(
            broker, "edge/devB/cmd/#", client_id="devB", username="devB", password=_password(reports["devB"])
        )
        subs.append(b)
        b.wait_connected()
        # Several connections under the fleet's one user, on its own listener: none knocks another off.
        fleet_subs = [
            Subscriber(broker.fleet_side, "edge/#", client_id=f"fleet-{i}", username="fleet", password=FLEET_PASSWORD)
            for i in range(2)
        ]
        subs += fleet_subs
        for f in fleet_subs:
            f.wait_connected()
        # Device A's credentials, asking for device B's client id.
        a = Subscriber(
            broker, "edge/devA/cmd/#", client_id="devB", username="devA", password=_password(reports["devA"])
        )
        subs.append(a)
        a.wait_connected()
        assert "as devA (" in broker.log_text()  # the broker ran it under A's own id
        fleet_subs[0].publish("edge/devB/cmd/restart", b"{}", qos=1)
        [got] = b.wait_for("edge/devB/cmd/restart", timeout=10)  # B's connection is still the one delivered to
        assert got.payload == b"{}"
        a.assert_no_message("edge/devB/cmd/#")
        assert b.disconnects == [] and len(b.connects) == 1, (b.disconnects, b.connects)
        assert all(f.disconnects == [] for f in fleet_subs)
    finally:
        for s in subs:
            s.close()
        broker.stop()


def test_running_agent_survives_edge_agent_check_with_the_generated_broker_config(tmp_path: Path) -> None:
    broker, _, reports = _setup(tmp_path)
    directory = Path(reports["devA"]["directory"])
    agent_toml = tomllib.loads((directory / "agent.toml").read_text())
    agent_toml["state_dir"] = str(tmp_path / "state")
    agent_toml["mqtt"] |= {"password_file": str(directory / "password"), "telemetry_interval": 1.0}
    agent_toml["update"] |= {"trust_root": str(directory / "root.json")}
    config = tmp_path / "agent.toml"
    config.write_text(tomli_w.dumps(agent_toml))
    assert agent_toml["mqtt"]["broker"].endswith(f":{broker.port}")  # the devices' listener
    watch = Subscriber(broker.fleet_side, "edge/devA/#", username="fleet", password=FLEET_PASSWORD)
    try:
        proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
        try:
            watch.wait_for("edge/devA/telemetry", timeout=60)
            check = run_cli("check", "--config", config, "--json")
            [probe] = [c for c in json.loads(check.stdout)["checks"] if c["what"] == "mqtt broker"]
            assert probe["ok"] and probe["detail"].startswith("not probed: the agent running"), probe
            watch.clear()
            [tele] = watch.wait_for("edge/devA/telemetry", timeout=30)
            body = json.loads(tele.payload)
            assert body["mqtt"]["connected"] is True and body["mqtt"]["reconnects"] == 0, body["mqtt"]
            assert proc.poll() is None
        finally:
            assert stop(proc) == 0
        assert broker.log_text().count("as devA (") == 1  # the agent's one connection, never a second one
        # With the agent stopped, check probes the broker again (under A's id: nothing else holds it now).
        check = run_cli("check", "--config", config, "--json")
        [probe] = [c for c in json.loads(check.stdout)["checks"] if c["what"] == "mqtt broker"]
        assert probe["ok"] and not probe["detail"].startswith("not probed"), probe
    finally:
        watch.close()
        broker.stop()


def test_certificate_cn_is_the_client_id_on_the_tls_listener(tmp_path: Path) -> None:
    find_mosquitto()
    certs = make_certs(tmp_path / "certs", ("devA", "devB"))
    lines, _ = broker_conf_lines("certificate", Path("/p"), Path("/a"), certs.ca, "mqtt://h:1884", "mqtts://h:8883")
    device_listener = lines[lines.index("listener 8883") + 1 : lines.index("listener 1884")]
    assert device_listener[:3] == [f"cafile {certs.ca}", "require_certificate true", "use_identity_as_username true"]
    broker = Broker(
        tmp_path / "broker",
        tls=certs,
        require_client_cert=True,
        acl="pattern readwrite edge/%u/#\n",
        persistence=False,
        extra_conf="\n".join(device_listener[3:]),  # the TLS listener's binding, as generated
    )
    broker.start()
    subs: list[Subscriber] = []

    def device(cn: str, client_id: str) -> Subscriber:
        cert, key = certs.clients[cn]
        sub = Subscriber(
            broker, f"edge/{cn}/#", client_id=client_id, tls=True, ca_certs=certs.ca, certfile=cert, keyfile=key
        )
        subs.append(sub)
        sub.wait_connected()
        return sub

    try:
        b = device("devB", "devB")
        a = device("devA", "devB")  # A's certificate, B's client id
        assert "as devA (" in broker.log_text()
        a.publish("edge/devA/x", b"a", qos=1)
        b.publish("edge/devB/x", b"b", qos=1)
        [got] = b.wait_for("edge/devB/x", timeout=10)  # B's session still delivers
        assert got.payload == b"b" and b.disconnects == [] and len(b.connects) == 1, (b.disconnects, b.connects)
    finally:
        for s in subs:
            s.close()
        broker.stop()
