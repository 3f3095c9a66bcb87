"""The broker files `fleet init` and `fleet device provision` write, used by a real Mosquitto: readable by the broker's
own user, and an ACL of least privilege (a device reads what the fleet writes to it and writes only its own topics)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import tomllib

from agent.protocol import Topics
from agent.protocol.update import (
    chunk_request_topic,
    chunk_topic,
    deploy_topic,
    fetch_topic,
    file_topic,
    update_state_topic,
    update_status_topic,
)
from fleet.config import FleetConfig
from fleet.db import Registry
from fleet.keys import KeyStore
from fleet.provision import BROKER_USER, _broker_ids, device_topics, ensure_fleet_user, provision_device
from fleet.repository import Repository
from fleet.rollout import RolloutPolicy
from fleet.server import FleetServer
from tests.conftest import ROOT
from tests.mosquitto import Subscriber, find_mosquitto
from tests.test_fleet_console import Fleet, ProvisionedBroker, assert_fleet_error
from tests.update_helpers import build_bundle, start, stop, versions_served, wait_until

NOT_AUTHORIZED = 0x87
FLEET_PASSWORD = "fleet-broker-secret"


def _device_writes(t: Topics) -> list[str]:
    """Every topic the agent publishes on (agent.protocol)."""
    return [
        t.status,
        t.telemetry,
        t.events,
        t.ack,
        t.results("main"),
        t.predict_reply,
        fetch_topic(t),
        chunk_request_topic(t),
        update_status_topic(t),
        update_state_topic(t, "main"),
        "homeassistant/sensor/cam-1/fps/config",
    ]


def _fleet_writes(t: Topics) -> list[str]:
    """Every topic the fleet (or a backend) writes to the device and the agent subscribes to."""
    return [deploy_topic(t), file_topic(t), t.command("restart"), t.predict, chunk_topic("ab" * 32, 1024, 0)]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 temporary tree, so that the broker's own user can reach files in it."""
    path = Path(tempfile.mkdtemp(prefix="fleet-acl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class BrokerAsItsUser(ProvisionedBroker):
    """A broker with the fleet's password and ACL files that drops to the ``mosquitto`` user, as the packaged one does
    (when these tests run as root and that user exists; else it runs as the current user)."""

    def config_text(self) -> str:
        text = super().config_text().replace(f"acl_file {self.workdir / 'acl'}", f"acl_file {self.fleet_acl}")
        if os.geteuid() == 0 and _broker_ids()[0] is not None:
            text = text.replace("user root\n", f"user {BROKER_USER}\n")
        return text


def _provisioned_fleet(home: Path) -> tuple[Fleet, dict[str, Any], str]:
    fleet = Fleet(home)
    fleet.write_config("mqtt://127.0.0.1:1883", username="fleet", password=FLEET_PASSWORD)
    init = fleet.ok("init")
    assert "the fleet's own user 'fleet'" in init, init
    report = fleet.json("device", "provision", "cam-1", "--group", "lab")
    password = (Path(report["directory"]) / "password").read_text().strip()
    return fleet, report, password


def test_broker_files_are_readable_by_the_broker_user_and_used_by_mosquitto_as_that_user(
    shared_dir: Path,
) -> None:
    find_mosquitto()
    _, report, password = _provisioned_fleet(shared_dir / "fleet")
    passwd, acl = Path(report["password_file"]), Path(report["acl_file"])
    uid, gid = _broker_ids()
    for path in (passwd, acl):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)  # hashes and ACL: not for everybody
        if gid is not None and os.geteuid() == 0:
            assert st.st_gid == gid and st.st_mode & stat.S_IRGRP, (path, st.st_gid, oct(st.st_mode))
    if gid is None or os.geteuid() != 0:
        pytest.skip("no mosquitto group here (or not root): the broker cannot run as its own user")
    workdir = shared_dir / "broker"
    workdir.mkdir()
    os.chown(workdir, uid, gid)  # its log and persistence
    broker = BrokerAsItsUser(workdir, passwd, acl)
    broker.start()
    try:
        assert f"user {BROKER_USER}" in broker.conf_path.read_text()
        with Subscriber(broker, "edge/#", username="fleet", password=FLEET_PASSWORD) as server:
            with Subscriber(broker, None, username="cam-1", password=password) as device:
                assert not device.publish("edge/cam-1/status", b"online").is_failure
            server.wait_for("edge/cam-1/status")
    finally:
        broker.stop()
    # The fleet's own user gets into the files with `fleet init`, even before any device is provisioned.
    assert "user fleet" in acl.read_text() and "fleet:" in passwd.read_text()


def test_a_device_reads_what_the_fleet_writes_and_writes_only_its_own_topics(tmp_path: Path) -> None:
    find_mosquitto()
    _, report, password = _provisioned_fleet(tmp_path / "fleet")
    acl_text = Path(report["acl_file"]).read_text()
    assert "readwrite edge/cam-1" not in acl_text
    reads, writes = device_topics("cam-1", "edge/{device_id}/")
    for line in [f"topic read {t}" for t in reads] + [f"topic write {t}" for t in writes]:
        assert line + "\n" in acl_text, line

    broker = ProvisionedBroker(tmp_path / "broker", Path(report["password_file"]), Path(report["acl_file"]))
    broker.start()
    t = Topics.for_device("cam-1")
    deployment = b'{"signed": {"type": "deploy"}, "signatures": []}'
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(Subscriber(broker, "edge/#", username="fleet", password=FLEET_PASSWORD))
            listen = [deploy_topic(t), file_topic(t), t.commands, t.predict, chunk_topic("ab" * 32, 1024)]
            device = stack.enter_context(Subscriber(broker, listen, username="cam-1", password=password))
            # The agent's own publications all arrive.
            for topic in _device_writes(t):
                assert not device.publish(topic, b"{}").is_failure, topic  # MQTT 5: 0x87 when the ACL denies it
                if topic.startswith("edge/"):
                    server.wait_for(topic)
            # What the fleet writes to the device reaches it ...
            assert not server.publish(deploy_topic(t), deployment, retain=True).is_failure
            for topic in _fleet_writes(t):
                if topic != deploy_topic(t):
                    assert not server.publish(topic, b"from the fleet").is_failure, topic
                device.wait_for(topic)
            # ... and the device cannot write any of it: not its deployment, not a command, not a chunk.
            seen = len(server.messages())
            for topic in _fleet_writes(t):
                assert device.publish(topic, b"forged").value == NOT_AUTHORIZED, topic
            assert device.publish(deploy_topic(t), b"", retain=True).value == NOT_AUTHORIZED  # clearing it
            assert device.publish("edge/other/status", b"spoofed").value == NOT_AUTHORIZED
            server.assert_no_message(lambda m: m.payload in (b"forged", b"spoofed") or m.payload == b"", within=0.5)
            assert len(server.messages()) == seen
        # The retained deployment is still there for the device's next connection.
        with Subscriber(broker, deploy_topic(t), username="cam-1", password=password) as again:
            (message,) = again.wait_for(deploy_topic(t))
            assert message.retain and message.payload == deployment
    finally:
        broker.stop()


def test_init_without_fleet_toml_says_so_and_what_it_created(tmp_path: Path) -> None:
    home = tmp_path / "bare"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "FLEET_CONFIG"} | {"PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.console", "init"], cwd=home, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "no fleet.toml" in out and "docs/fleet.md" in out, out
    assert str(home / "fleet-data" / "repository") in out and str(home / "fleet-data" / "keys") in out, out
    assert "database sqlite" in out and ": created" in out, out
    # no broker password known: the output says how the fleet's user gets into the files
    assert "fleet init" in out and "mosquitto_passwd" in out, out
    assert (home / "fleet-data" / "mosquitto" / "acl").read_text().count("user fleet") == 1


def test_init_creates_a_missing_postgresql_database_or_names_the_command(tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    name = f"fleet_init_{secrets.token_hex(4)}"
    role = f"fleet_nocreate_{secrets.token_hex(3)}"
    admin = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres", "autocommit": True}
    fleet = Fleet(tmp_path / "pg")
    try:
        fleet.config.write_text(
            f'data_dir = "data"\ndatabase = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"\n'
        )
        out = fleet.ok("init")
        assert f"/{name}: created" in out, out
        assert "up to date" in fleet.ok("init")
        with psycopg.connect(**admin) as conn:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')  # may log in, may not create databases
        other = f"{name}_x"
        fleet.config.write_text(
            f'data_dir = "data2"\ndatabase = "postgresql+psycopg://{role}@127.0.0.1:5432/{other}"\n'
        )
        line = assert_fleet_error(fleet("init"), other, "does not exist", f"createdb -h 127.0.0.1 -p 5432 -U {role}")
        assert "permission denied" in line, line
    finally:
        with psycopg.connect(**admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_a_provisioned_agent_takes_a_signed_update_through_the_generated_acl(tmp_path: Path) -> None:
    """Everything the agent needs (status, telemetry, results, the deployment, TUF metadata, the chunks, update
    states) passes the least-privilege ACL: a real agent with the provisioned credentials commits an update."""
    find_mosquitto()
    password_file = tmp_path / "fleet-password"
    password_file.write_text(FLEET_PASSWORD + "\n")
    config = FleetConfig(
        data_dir=str(tmp_path / "fleet"),
        broker={"url": "mqtt://127.0.0.1:1", "username": "fleet", "password_file": str(password_file)},
    )
    repository = Repository.init(config.repository_dir, KeyStore(config.keys_dir))
    with Registry(config.database_url) as registry:
        registry.migrate()
        ensure_fleet_user(config)
        result = provision_device(config, registry, repository, "cam-1", "lab", hardware="x86_64")
    broker = ProvisionedBroker(tmp_path / "broker", result.password_file, result.acl_file)
    broker.start()
    config.broker.url = broker.url
    server = FleetServer(config, tick_s=0.3)
    server.start()
    agent: Any = None
    try:
        agent_toml = tomllib.loads((result.directory / "agent.toml").read_text())
        results = tmp_path / "results.jsonl"
        agent_toml["state_dir"] = str(tmp_path / "state")
        agent_toml["mqtt"] |= {
            "broker": broker.url,
            "password_file": str(result.directory / "password"),
            "telemetry_interval": 1.0,
        }
        agent_toml["update"] |= {
            "trust_root": str(result.directory / "root.json"),
            "request_timeout_s": 2.0,
            "health_window_s": 2.0,
            "health_min_results": 5,
            "latency_runs": 5,
        }
        agent_toml["sources"]["camera"]["rate"] = 20.0
        agent_toml["pipelines"]["main"]["sinks"] = ["jsonl"]
        agent_toml["sinks"] = {"jsonl": {"path": str(results)}}
        path = tmp_path / "agent.toml"
        path.write_text(tomli_w.dumps(agent_toml))
        agent = start(path, tmp_path, name="cam-1")
        assert wait_until(lambda: any(d["online"] for d in server.registry.devices()), 30), server.registry.devices()
        assert wait_until(lambda: server.registry.device("cam-1")["fps"] is not None, 30)  # telemetry came through

        archive = build_bundle(tmp_path, "1.1.0")
        target = "digits-classifier-tflite/digits-classifier-tflite-1.1.0.tar.gz"
        repository.add_target(archive, target, name="digits-classifier-tflite", version="1.1.0", hardware=["x86_64"])
        policy = RolloutPolicy(canary=1, max_failure_rate=0.0, min_terminal=1, device_timeout_s=120)
        created = server.ops.create_rollout(target, devices=["cam-1"], policy=policy)
        assert wait_until(lambda: server.ops.rollout(created["id"])["status"] in ("completed", "aborted"), 90)
        done = server.ops.rollout(created["id"])
        assert done["status"] == "completed", done
        assert wait_until(lambda: "1.1.0" in versions_served(results)[-3:], 30)
        assert "Denied PUBLISH" not in broker.log_text()  # nothing the agent sent was refused
    finally:
        if agent is not None:
            stop(agent)
        server.stop()
        broker.stop()


def test_init_names_broker_files_it_cannot_write_and_still_initialises(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    (fleet.home / "a-directory").mkdir()
    fleet.config.write_text('data_dir = "data"\n\n[provision]\nacl_file = "a-directory"\n')
    out = fleet.ok("init")
    assert "the broker file" in out and "a-directory" in out and "then run `fleet init` again" in out, out
    assert (fleet.data / "repository" / "metadata" / "root.json").is_file()
