"""The `fleet` console run as real processes against a scratch fleet.toml (SQLite), with real Mosquitto brokers for
provisioned credentials and device commands, and a real ``tuf.ngclient`` client following the repository."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata

from agent.config import load_config
from agent.protocol.update import COMMAND_KEYS_FIELD, parse_envelope
from fleet.keys import KeyStore
from fleet.provision import mosquitto_verify, read_password_file
from fleet.repository import Repository
from tests.conftest import ROOT, SAMPLES
from tests.mosquitto import Broker, MqttConnectError, Subscriber, find_mosquitto, make_certs
from tests.test_fleet_repository import client as tuf_client
from tests.test_fleet_repository import trusted_root

SAMPLE = SAMPLES / "digits-classifier-tflite"
MODEL = SAMPLE / "digits_cnn_int8.tflite"
NOT_AUTHORIZED = 0x87
PASSPHRASE = "FLEET_KEY_PASSPHRASE"


# ---- running the console -------------------------------------------------------------------------------


class Fleet:
    """Runs ``python -m fleet.console --config <fleet.toml> ...`` as a real process."""

    def __init__(self, home: Path, broker_url: str = "mqtt://127.0.0.1:9", **broker: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.config = home / "fleet.toml"
        self.data = home / "data"
        self.env: dict[str, str] = {}
        self.write_config(broker_url, **broker)

    def write_config(self, broker_url: str, **broker: str) -> None:
        lines = ['data_dir = "data"', "", "[broker]", f"url = {json.dumps(broker_url)}"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in broker.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def __call__(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = os.environ.copy() | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "FLEET_ACTOR": "tester"} | self.env
        env.pop("FLEET_CONFIG", None)
        return subprocess.run(
            [sys.executable, "-m", "fleet.console", "--config", str(self.config), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home.parent,  # not beside fleet.toml: --config must be what is used
            env=env | {"PYTHONPATH": str(ROOT)},
        )

    def ok(self, *args: str | Path) -> str:
        proc = self(*args)
        assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.stdout

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def repository(self) -> Repository:
        return Repository(self.data / "repository", KeyStore(self.data / "keys"))


def assert_fleet_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    """A user error: exit 2, no traceback, one line ``fleet: error: <problem> (fix: <fix>)`` on stderr."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("fleet: error: ") and "(fix: " in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), line
    return line


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "fleet")


def build_sample(fleet: Fleet, version: str = "1.1.0", name: str = "digits", *extra: str) -> Path:
    out = fleet.home / "out" / f"{name}-{version}.tar.gz"
    fleet.ok(
        "bundle", "build", MODEL, "--metadata", SAMPLE / "bundle.toml", "--name", name, "--version", version,
        "--hardware", "x86_64", "rpi5", "-o", out, *extra,
    )  # fmt: skip
    return out


# ---- init and keys ---------------------------------------------------------------------------------------


def test_init_then_key_rotations_are_followed_by_a_tuf_client(fleet: Fleet, tmp_path: Path) -> None:
    report = fleet.json("init")
    assert report["created"] and report["root_version"] == 1
    assert (fleet.data / "fleet.sqlite").is_file()
    assert stat.S_IMODE((fleet.data / "keys").stat().st_mode) == 0o700
    repo = fleet.repository()
    tuf_client(repo, tmp_path / "device").refresh()  # a device trusting root v1

    keys = fleet.json("keys", "show")
    assert keys["root_version"] == 1
    assert set(keys["roles"]) == {"root", "targets", "snapshot", "timestamp", "command"}
    assert all(k["online"] for role in keys["roles"].values() for k in role["keys"])
    [old_timestamp] = keys["roles"]["timestamp"]["keys"]

    rotated = fleet.json("keys", "rotate", "root", "--generate", "--threshold", "2")
    assert (rotated["from_version"], rotated["root_version"]) == (1, 2)
    rotated = fleet.json("keys", "rotate", "timestamp", "--generate", "--remove", old_timestamp["keyid"][:12])
    assert rotated["root_version"] == 3 and rotated["removed"] == [old_timestamp["keyid"]]
    fleet.ok("keys", "rotate", "root")  # no change: a re-signed root with a new version and expiry

    keys = fleet.json("keys", "show")
    assert keys["root_version"] == 4
    assert keys["roles"]["root"]["threshold"] == 2 and len(keys["roles"]["root"]["keys"]) == 2
    assert [k["keyid"] for k in keys["roles"]["timestamp"]["keys"]] == rotated["added"]
    assert "keys (root v4)" in fleet.ok("keys", "show")

    # The device that trusted v1 walks v2..v4; a new device bootstrapped from 1.root.json does the same.
    for where in ("device", "fresh"):
        tuf_client(repo, tmp_path / where).refresh()
        root = trusted_root(tmp_path / where)
        assert root.version == 4 and root.roles["root"].threshold == 2
        assert root.roles["timestamp"].keyids == rotated["added"]

    again = fleet.json("init")  # idempotent: keeps the repository, upgrades the database
    assert not again["created"] and again["root_version"] == 4
    assert_fleet_error(fleet("init", "--root-keys", "3"), "already exists", "keys rotate")
    assert_fleet_error(fleet("keys", "rotate", "root", "--remove", "ffff"), "no root key")
    assert_fleet_error(fleet("keys", "rotate", "snapshot", "--add-key", tmp_path / "nope.pem"), "does not exist")


def test_commands_before_init_say_to_run_init(fleet: Fleet) -> None:
    assert_fleet_error(fleet("devices"), "fleet init")
    assert_fleet_error(fleet("keys", "show"), "fleet init")


# ---- bundles and the offline targets key ---------------------------------------------------------------


def test_bundle_build_is_reproducible_and_inspect_reports_it(fleet: Fleet) -> None:
    first = build_sample(fleet)
    built = fleet.json(
        "bundle", "build", MODEL, "--metadata", SAMPLE / "bundle.toml", "--name", "digits", "--version", "1.1.0",
        "--hardware", "x86_64", "rpi5", "-o", fleet.home / "again.tar.gz",
    )  # fmt: skip
    assert (fleet.home / "again.tar.gz").read_bytes() == first.read_bytes()  # same inputs, same bytes
    with tarfile.open(first) as tar:
        assert sorted(tar.getnames()) == ["bundle.toml", "digits_cnn_int8.tflite", "golden.npz"]
        assert {m.mtime for m in tar.getmembers()} == {0}

    info = fleet.json("bundle", "inspect", first)
    assert (info["name"], info["version"], info["task"]) == ("digits", "1.1.0", "classification")
    assert info["sha256"] == built["sha256"] and info["size"] == first.stat().st_size
    assert info["hardware"] == ["rpi5", "x86_64"] and info["labels"] == [str(i) for i in range(10)]
    if info["model"] is not None:  # a TFLite runtime is installed here
        assert info["model"]["inputs"][0]["shape"] == [1, 32, 32, 1]
        assert info["model"]["outputs"][0]["shape"] == [1, 10]
        assert info["golden"] == {"passed": True, "problems": []}
    assert "digits" in fleet.ok("bundle", "inspect", first)

    # From a model alone, with labels from a file.
    labels = fleet.home / "labels.txt"
    labels.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    bare = fleet.json(
        "bundle", "build", MODEL, "--name", "bare", "--version", "0.1.0", "--task", "raw", "--labels", labels,
        "-o", fleet.home / "bare.tar.gz",
    )  # fmt: skip
    assert bare["files"] == ["bundle.toml", "digits_cnn_int8.tflite", "labels.txt"]
    assert fleet.json("bundle", "inspect", fleet.home / "bare.tar.gz")["labels"][0] == "digit 0"

    out = fleet.home / "x.tar.gz"
    assert_fleet_error(fleet("bundle", "build", fleet.home / "nope.tflite", "--name", "x", "-o", out), "does not exist")
    assert_fleet_error(
        fleet("bundle", "build", MODEL, "--name", "x", "--version", "1.0", "--task", "raw", "-o", out), "version"
    )
    assert_fleet_error(fleet("bundle", "build", MODEL, "--version", "1.0.0", "--task", "raw", "-o", out), "--name")
    assert not out.exists()


def test_offline_targets_key_flow_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    usb = fleet.home / "usb"
    fleet.env[PASSPHRASE] = "usb secret"
    fleet.ok("init", "--offline-targets", usb / "targets.pem")
    assert b"ENCRYPTED PRIVATE KEY" in (usb / "targets.pem").read_bytes()
    keys = fleet.json("keys", "show")
    assert [k["online"] for k in keys["roles"]["targets"]["keys"]] == [False]

    bundle = build_sample(fleet)
    published = fleet.json("bundle", "publish", bundle)
    assert published["staged"] and published["target"]["path"] == "digits/digits-1.1.0.tar.gz"
    assert fleet.json("targets") == []  # nothing published before the offline key signs
    assert fleet.json("keys", "show")["staged"] == {
        "version": 2,
        "signed": 0,
        "threshold": 1,
        "targets": ["digits/digits-1.1.0.tar.gz"],
    }
    assert_fleet_error(fleet("keys", "publish"), "not signed by enough")

    # The staged file goes to the offline machine, is signed there and comes back.
    carried = usb / "targets.json"
    shutil.copyfile(fleet.data / "repository" / "staged" / "targets.json", carried)
    assert_fleet_error(fleet("keys", "sign", carried, "--key", usb / "missing.pem"), "missing.pem", "does not exist")
    fleet.env[PASSPHRASE] = "guess"
    assert_fleet_error(fleet("keys", "sign", carried, "--key", usb / "targets.pem"), "wrong passphrase")
    fleet.env[PASSPHRASE] = "usb secret"
    signed = fleet.json("keys", "sign", carried, "--key", usb / "targets.pem")
    assert signed["signatures"] == 1 and signed["targets"] == ["digits/digits-1.1.0.tar.gz"]
    assert len(Metadata.from_bytes(carried.read_bytes()).signatures) == 1
    result = fleet.json("keys", "publish", carried)
    assert result["targets_version"] == 2 and len(result["imported_signatures"]) == 1

    [target] = fleet.json("targets")
    assert target["path"] == "digits/digits-1.1.0.tar.gz" and target["hardware"] == ["rpi5", "x86_64"]
    assert target["length"] == bundle.stat().st_size
    updater = tuf_client(fleet.repository(), tmp_path / "device")
    info = updater.get_targetinfo(target["path"])
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == bundle.read_bytes()

    # The in-place flow (keys sign on the fleet machine, plugged-in key) for the next version.
    second = build_sample(fleet, "1.2.0")
    assert fleet.json("bundle", "publish", second)["staged"]
    assert fleet.json("keys", "sign", "--key", usb / "targets.pem")["signed"] == 1
    fleet.ok("keys", "publish")
    assert [t["version"] for t in fleet.json("targets")] == ["1.1.0", "1.2.0"]
    assert_fleet_error(fleet("keys", "sign", "--key", usb / "targets.pem"), "nothing is staged")

    actions = [e["action"] for e in fleet.json("audit", "--limit", "100")]
    for action in ("init", "bundle.publish", "keys.sign", "keys.publish"):
        assert action in actions


def test_bundle_publish_online_and_its_errors(fleet: Fleet) -> None:
    fleet.ok("init")
    bundle = build_sample(fleet)
    published = fleet.json("bundle", "publish", bundle)
    assert not published["staged"] and published["changed"]
    assert fleet.json("bundle", "publish", bundle)["changed"] is False  # publishing again changes nothing
    assert [t["path"] for t in fleet.json("targets")] == ["digits/digits-1.1.0.tar.gz"]
    assert "digits/digits-1.1.0.tar.gz" in fleet.ok("targets")

    no_hw = fleet.home / "nohw.tar.gz"
    fleet.ok("bundle", "build", MODEL, "--name", "nohw", "--version", "1.0.0", "--task", "raw", "-o", no_hw)
    assert fleet.json("bundle", "publish", no_hw)["target"]["hardware"] == []  # none given: any hardware
    assert fleet.json("bundle", "publish", no_hw, "--hardware", "rpi4")["target"]["hardware"] == ["rpi4"]
    assert_fleet_error(fleet("bundle", "publish", fleet.home / "nope.tar.gz"), "does not exist")
    # Other bytes under a name and version already published are refused.
    build_sample(fleet, "1.1.0", "digits", "--description", "changed")
    assert_fleet_error(fleet("bundle", "publish", bundle), "already exists")


# ---- provisioning ------------------------------------------------------------------------------------------


class ProvisionedBroker(Broker):
    """A broker using the password file and ACL file the fleet wrote (no anonymous clients)."""

    def __init__(self, workdir: Path, passwd: Path | None, acl: Path, **options: Any) -> None:
        super().__init__(workdir, acl=acl.read_text(), **options)
        self.fleet_passwd = passwd
        self.fleet_acl = acl

    def config_text(self) -> str:
        self.acl = self.fleet_acl.read_text()
        text = super().config_text()
        if self.fleet_passwd is not None:
            text = text.replace("allow_anonymous true", f"allow_anonymous false\npassword_file {self.fleet_passwd}", 1)
        return text


@pytest.fixture
def started() -> Iterator[Callable[[Broker], Broker]]:
    brokers: list[Broker] = []

    def start(broker: Broker) -> Broker:
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.stop()


def connect(broker: Broker, user: str, password: str, topics: str | None = None, **kw: Any) -> Subscriber:
    return Subscriber(broker, topics, username=user, password=password, **kw)


def test_provision_password_credentials_work_on_a_real_mosquitto(
    fleet: Fleet, tmp_path: Path, started: Callable[[Broker], Broker]
) -> None:
    find_mosquitto()
    fleet.write_config("mqtt://broker.lan:1883", username="fleet", password="fleet-secret")
    fleet.ok("init")
    report = fleet.json("device", "provision", "dev-1", "--group", "lab", "--tags", "east", "--hardware", "rpi5")
    fleet.ok("device", "provision", "dev-2", "--group", "lab")
    home = Path(report["directory"])
    assert home == fleet.data / "devices" / "dev-1"
    assert sorted(p.name for p in home.iterdir()) == ["INSTALL.md", "agent.toml", "password", "root.json"]
    assert stat.S_IMODE((home / "password").stat().st_mode) == 0o600
    assert (home / "root.json").read_bytes() == (fleet.data / "repository" / "metadata" / "root.json").read_bytes()
    assert "systemd/install.sh" in (home / "INSTALL.md").read_text()

    config = load_config(home / "agent.toml")
    assert config.device_id == "dev-1"
    assert config.mqtt is not None and config.mqtt.broker == "mqtt://broker.lan:1883"
    assert (config.mqtt.username, config.mqtt.password_file) == ("dev-1", str(home / "password"))  # beside it
    assert config.update.enabled and config.update.groups == ["lab"] and config.update.hardware_id == "rpi5"
    assert config.update.trust_root == str(home / "root.json")
    assert config.pipelines["main"].model.endswith("digits-classifier-tflite")

    passwd, acl = Path(report["password_file"]), Path(report["acl_file"])
    entries = read_password_file(passwd)
    assert set(entries) == {"dev-1", "dev-2", "fleet"}
    password = (home / "password").read_text().strip()
    assert mosquitto_verify(password, entries["dev-1"]) and not mosquitto_verify(password, entries["dev-2"])
    acl_text = acl.read_text()
    assert "user dev-1\n" in acl_text and "topic write edge/dev-1/status" in acl_text
    assert "topic read edge/dev-1/update/deploy" in acl_text and "readwrite edge/dev-1/" not in acl_text
    assert "topic read fleet/targets/#" in acl_text and "topic write fleet/#" in acl_text

    assert_fleet_error(fleet("device", "provision", "dev-1", "--group", "lab"), "already provisioned", "--force")
    assert_fleet_error(fleet("device", "provision", "bad id", "--group", "lab"), "not valid")

    broker = started(ProvisionedBroker(tmp_path / "broker", passwd, acl))
    fleet_password = "fleet-secret"
    with (
        connect(broker, "dev-1", password, "edge/dev-1/#") as dev1,
        connect(broker, "fleet", fleet_password, "edge/#") as server,
    ):
        assert not dev1.publish("edge/dev-1/status", b"online").is_failure
        server.wait_for("edge/dev-1/status")
        assert dev1.publish("edge/dev-2/status", b"spoofed").value == NOT_AUTHORIZED
        assert dev1.publish("fleet/targets/aa/1024/0", b"forged chunk").value == NOT_AUTHORIZED
        server.assert_no_message("edge/dev-2/status", within=0.3)
        with connect(broker, "dev-1", password, "fleet/targets/#") as chunks:
            assert not server.publish("fleet/targets/aa/1024/0", b"chunk").is_failure
            chunks.wait_for("fleet/targets/#")
        assert not server.publish("edge/dev-1/cmd/restart", b"{}").is_failure
        dev1.wait_for("edge/dev-1/cmd/restart")
    with pytest.raises(MqttConnectError):
        connect(broker, "dev-1", "wrong password")
    with pytest.raises(MqttConnectError):
        connect(broker, "dev-1", (fleet.data / "devices" / "dev-2" / "password").read_text().strip())

    # --force rotates the credentials: after a reload the old password is refused, the new one accepted.
    rotated = fleet.json("device", "provision", "dev-1", "--group", "lab", "--force")
    assert rotated["rotated"]
    new_password = (home / "password").read_text().strip()
    assert new_password != password
    os.kill(broker.pid, signal.SIGHUP)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while True:
        try:
            connect(broker, "dev-1", password).close()
        except MqttConnectError:
            break
        assert time.monotonic() < deadline, "the old password still works after the reload"
        time.sleep(0.1)
    connect(broker, "dev-1", new_password).close()


def test_provision_certificate_credentials_work_on_a_real_mosquitto(
    fleet: Fleet, tmp_path: Path, started: Callable[[Broker], Broker]
) -> None:
    find_mosquitto()
    certs = make_certs(tmp_path / "certs", ())  # the broker's own server certificate, from another CA
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(certs.ca.read_bytes())
    acl = fleet.data / "mosquitto" / "acl"
    broker = Broker(tmp_path / "broker", tls=dataclasses.replace(certs, ca=bundle), require_client_cert=True)
    fleet.write_config("mqtt://127.0.0.1:1", device_url=broker.tls_url, ca=str(certs.ca))
    fleet.ok("init")
    assert_fleet_error(fleet("device", "provision", "cam:1", "--group", "yard"), "':'")
    report = fleet.json("device", "provision", "cam:1", "--group", "yard", "--credentials", "certificate")
    home = Path(report["directory"])
    assert sorted(p.name for p in home.iterdir()) == [
        "INSTALL.md",
        "agent.toml",
        "ca.crt",
        "client.crt",
        "client.key",
        "root.json",
    ]
    assert stat.S_IMODE((home / "client.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((fleet.data / "ca" / "ca.key").stat().st_mode) == 0o600
    assert (home / "ca.crt").read_bytes() == certs.ca.read_bytes()  # verifies the broker
    config = load_config(home / "agent.toml")
    assert config.mqtt is not None and config.mqtt.tls is not None
    assert config.mqtt.broker == broker.tls_url and config.mqtt.username is None
    assert config.mqtt.tls.cert == str(home / "client.crt")  # beside agent.toml, wherever it is installed
    fleet.ok("device", "provision", "other", "--group", "yard", "--credentials", "certificate")

    # The broker trusts the fleet CA for client certificates; the ACL confines the identity (CN) to its topics.
    bundle.write_bytes(certs.ca.read_bytes() + (fleet.data / "ca" / "ca.crt").read_bytes())
    broker.acl = acl.read_text()
    started(broker)
    tls = {"tls": True, "ca_certs": home / "ca.crt", "certfile": home / "client.crt", "keyfile": home / "client.key"}
    with Subscriber(broker, None, **tls) as device:
        assert not device.publish("edge/cam:1/status", b"online").is_failure
        assert device.publish("edge/other/status", b"spoofed").value == NOT_AUTHORIZED
    with pytest.raises(MqttConnectError):
        Subscriber(broker, None, tls=True, ca_certs=certs.ca)  # no client certificate

    assert_fleet_error(
        Fleet(tmp_path / "plain")("device", "provision", "x", "--group", "g", "--credentials", "certificate"),
        "fleet init",
    )


# ---- devices, groups, audit ------------------------------------------------------------------------------


def test_devices_groups_and_audit_listings(fleet: Fleet) -> None:
    fleet.ok("init")
    fleet.ok("device", "provision", "cam-1", "--group", "lab", "--tags", "east", "west", "--hardware", "rpi5")
    fleet.ok("device", "provision", "cam-2", "--group", "lab")
    fleet.ok("device", "provision", "gate-1", "--group", "yard")

    devices = fleet.json("devices")
    assert [d["id"] for d in devices] == ["cam-1", "cam-2", "gate-1"]
    assert {d["online"] for d in devices} == {False}
    assert [d["id"] for d in fleet.json("devices", "--group", "yard")] == ["gate-1"]
    table = fleet.ok("devices")
    assert "cam-1" in table and "offline" in table and "last seen" in table

    shown = fleet.json("device", "show", "cam-1")
    assert (shown["group"], shown["tags"], shown["hardware"]) == ("lab", ["east", "west"], "rpi5")
    assert shown["credentials_kind"] == "password" and shown["updates"] == []
    assert "cam-1" in fleet.ok("device", "show", "cam-1")

    groups = {g["name"]: g for g in fleet.json("groups")}
    assert (groups["lab"]["devices"], groups["yard"]["devices"]) == (2, 1)

    assert_fleet_error(fleet("device", "show", "cam-9"), "unknown device 'cam-9'")
    assert_fleet_error(fleet("devices", "--group", "lob"), "unknown group 'lob'", "lab")

    audit = fleet.json("audit", "--limit", "50")
    provisions = [e for e in audit if e["action"] == "device.provision"]
    assert [e["detail"]["device"] for e in provisions if e["ok"]] == ["gate-1", "cam-2", "cam-1"]
    assert {e["actor"] for e in audit} == {"tester"}
    assert audit[-1]["action"] == "init"
    assert len(fleet.json("audit", "--limit", "2")) == 2
    assert "device.provision" in fleet.ok("audit")


def test_operator_typos_are_one_line_errors(fleet: Fleet) -> None:
    fleet.ok("init")
    fleet.ok("device", "provision", "cam-1", "--group", "lab")
    fleet.ok("bundle", "publish", build_sample(fleet))
    assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lob"), "unknown group 'lob'")
    assert_fleet_error(fleet("device", "show", "cam-2"), "unknown device")
    assert_fleet_error(fleet("keys", "sign", "--key", fleet.home / "targets.pem"), "nothing is staged")
    assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lab", "--canary-percent", "0"), "canary-percent")
    assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lab", "--canary-percent", "150"), "canary-percent")
    assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lab", "--canary-percent", "ten"), "not a number")
    assert_fleet_error(fleet("deploy", "digits@1.1.0", "--group", "lab", "--wave-factor", "1"), "wave-factor")
    assert_fleet_error(fleet("deploy", "digits@9.9.9", "--group", "lab"), "no published target", "digits@1.1.0")
    assert_fleet_error(fleet("deploy", "digits/nope.tar.gz", "--group", "lab"), "not in the repository")
    assert_fleet_error(fleet("deploy", "digits@1.1.0"), "--group")
    assert_fleet_error(fleet("devcies"), "invalid choice")
    assert_fleet_error(fleet("command", "cam-1", "set", "log_level"), "KEY=VALUE")
    assert_fleet_error(fleet("command", "cam-7", "restart"), "unknown device 'cam-7'")
    missing = Fleet(fleet.home / "elsewhere")
    missing.config.unlink()
    assert_fleet_error(missing("devices"), "does not exist")
    audit = fleet.json("audit", "--limit", "100")
    failed = [e for e in audit if not e["ok"]]
    assert any(e["action"] == "rollout.create" and "lob" in e["error"] for e in failed)
    assert any(e["action"] == "command.restart" and "cam-7" in e["error"] for e in failed)


# ---- deployments and commands (fleet.ops) ------------------------------------------------------------------


def test_deploy_and_rollout_controls(fleet: Fleet) -> None:
    fleet.ok("init")
    for device in ("cam-1", "cam-2", "cam-3", "cam-4"):
        fleet.ok("device", "provision", device, "--group", "lab")
    fleet.ok("bundle", "publish", build_sample(fleet))

    created = fleet.json("deploy", "digits@1.1.0", "--group", "lab", "--canary", "1", "--wave-factor", "3")
    rid = created["id"]
    assert created["target"] == "digits/digits-1.1.0.tar.gz" and created["status"] == "running"
    assert created["summary"]["waves"] == [1, 3] and created["summary"]["devices"] == 4
    assert created["devices"]["cam-1"]["state"] == "skipped"  # offline devices are sent when they come online
    assert "running" in fleet.ok("rollout", "status", rid)

    [listed] = fleet.json("rollout", "list")
    assert listed["id"] == rid and listed["status"] == "running"
    assert fleet.json("rollout", "pause", rid, "--reason", "lunch")["status"] == "paused"
    assert fleet.json("rollout", "list", "--status", "paused")[0]["id"] == rid
    assert fleet.json("rollout", "resume", rid)["status"] == "running"
    aborted = fleet.json("rollout", "abort", rid, "--reason", "wrong model")
    assert (aborted["status"], aborted["reason"]) == ("aborted", "wrong model")
    proc = fleet("rollout", "status", rid, "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["status"] == "aborted"  # scripts see the failure

    other = fleet.json("deploy", "digits/digits-1.1.0.tar.gz", "--devices", "cam-3,cam-1", "--canary-percent", "50")
    assert list(other["devices"]) == ["cam-3", "cam-1"] and other["summary"]["waves"] == [1, 1]
    assert_fleet_error(fleet("rollout", "status", "r-nope"), "unknown rollout")
    assert_fleet_error(fleet("rollback", rid), "no committed devices")
    assert_fleet_error(fleet("deploy", "digits@1.1.0", "--devices", "cam-1,cam-9"), "cam-9")

    actions = [e["action"] for e in fleet.json("audit", "--limit", "100")]
    for action in ("rollout.create", "rollout.pause", "rollout.resume", "rollout.abort"):
        assert action in actions


class FakeDevice:
    """Answers signed device commands the way the agent does, after verifying them against its pinned root."""

    def __init__(self, broker: Broker, device_id: str, root_json: Path) -> None:
        from agent.update.commands import CommandKeys

        root = Metadata.from_bytes(root_json.read_bytes()).signed
        self.keys = CommandKeys.from_root_field(root.unrecognized_fields[COMMAND_KEYS_FIELD])
        self.device_id = device_id
        self.sub = Subscriber(broker, f"edge/{device_id}/cmd/+")
        self.commands: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from agent.update.commands import verify_device_command

        seen = 0
        while not self._stop.is_set():
            messages = self.sub.messages()
            for message in messages[seen:]:
                envelope = parse_envelope(message.payload, "command")
                command = verify_device_command(
                    envelope, self.keys, device_id=self.device_id, last_seq=0, now=time.time()
                )
                self.commands.append(command)
                ack = {"v": 1, "device_id": self.device_id, "command": command.name, "id": command.id, "ok": True}
                self.sub.publish(f"edge/{self.device_id}/ack", json.dumps(ack | {"result": {"done": True}}))
            seen = len(messages)
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sub.close()


def test_signed_commands_are_acknowledged_and_audited(
    fleet: Fleet, tmp_path: Path, started: Callable[[Broker], Broker]
) -> None:
    find_mosquitto()
    broker = started(Broker(tmp_path / "broker"))
    fleet.write_config(broker.url)
    fleet.ok("init")
    fleet.ok("device", "provision", "cam-1", "--group", "lab")
    fleet.ok("device", "provision", "cam-2", "--group", "lab")
    device = FakeDevice(broker, "cam-1", fleet.data / "devices" / "cam-1" / "root.json")
    try:
        result = fleet.json("command", "cam-1", "set", "log_level=debug", "telemetry_interval=5")
        assert result["ok"] and result["ack"]["result"] == {"done": True}
        assert "acknowledged restart" in fleet.ok("command", "cam-1", "restart")
    finally:
        device.close()
    assert [c.name for c in device.commands] == ["set", "restart"]
    assert device.commands[0].args == {"log_level": "debug", "telemetry_interval": "5"}

    silent = fleet("command", "cam-2", "diagnostics", "--timeout", "1")  # nobody answers
    assert silent.returncode == 1 and "no acknowledgement" in silent.stdout, silent.stdout + silent.stderr
    audit = [e for e in fleet.json("audit") if e["action"].startswith("command.")]
    assert [(e["action"], e["ok"]) for e in audit] == [
        ("command.diagnostics", False),
        ("command.restart", True),
        ("command.set", True),
    ]

    # `fleet serve` is wired to fleet.server.serve (it connects to the same broker, then stops).
    served = fleet("serve", "--duration", "0.5")
    assert served.returncode == 0 and "Traceback" not in served.stderr, served.stderr
