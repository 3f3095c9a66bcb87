"""Device provisioning: broker credentials confined to the device's own topics, a pinned trust root, an agent.toml.

Two kinds of credentials:

* ``password``: a random password; its PBKDF2-SHA512 hash (Mosquitto's ``$7$`` format) goes into the Mosquitto
  password file and ACL lines into the ACL file (``user <id>``, then least privilege: ``topic read`` on what only
  the fleet writes to the device (``update/deploy``, ``update/file``, ``cmd/#``, the ``predict`` requests and the
  shared ``fleet/targets/#`` chunks), ``topic write`` on what the device publishes (status, telemetry, results,
  events, ack, update requests and states, prediction replies)). Both files are replaced atomically, mode 0640 with
  the group of the broker's user (``mosquitto``: Mosquitto 2 reads them after dropping privileges); Mosquitto reads
  them again on SIGHUP (``systemctl reload mosquitto``).
* ``certificate``: a client certificate (CN = device id; Mosquitto's ``use_identity_as_username``) from the fleet CA
  under ``<data_dir>/ca/`` (created on first use). The same ACL lines apply to the certificate's identity.

Everything for the device is written to ``<out>/<device_id>/``: agent.toml, root.json, the credentials and INSTALL.md.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.protocol import DEVICE_ID, Topics
from agent.protocol.update import (
    FLEET_PREFIX,
    chunk_request_topic,
    deploy_topic,
    fetch_topic,
    file_topic,
    update_state_topic,
    update_status_topic,
)
from fleet.config import FleetConfig
from fleet.db import Registry
from fleet.errors import FleetError
from fleet.keys import write_atomic
from fleet.repository import Repository

CREDENTIALS = ("password", "certificate")
INSTALL_DIR = "/etc/edge-agent"
DEFAULT_FLEET_USER = "fleet"
BROKER_USER = "mosquitto"  # the user (and group) Mosquitto 2 drops privileges to
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
_ACL_HEADER = (
    "# Mosquitto ACL file managed by `fleet device provision` (one block per user; edit the fleet's own block\n"
    "# freely, device blocks are rewritten when a device is provisioned again).\n"
)


@dataclass
class ProvisionResult:
    """What provisioning did and wrote."""

    device_id: str
    group: str
    credentials: str
    directory: Path
    files: list[Path]
    acl_file: Path
    password_file: Path | None
    rotated: bool  # an existing device got new credentials (--force)
    broker_conf: list[str] = field(default_factory=list)  # mosquitto.conf lines the broker needs
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "group": self.group,
            "credentials": self.credentials,
            "directory": str(self.directory),
            "files": [str(p) for p in self.files],
            "acl_file": str(self.acl_file),
            "password_file": str(self.password_file) if self.password_file else None,
            "rotated": self.rotated,
            "broker_conf": self.broker_conf,
            "notes": self.notes,
        }


# ---- Mosquitto password file -------------------------------------------------------------------------


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<salt b64>$<PBKDF2-HMAC-SHA512 b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` (PBKDF2-SHA512) or ``$6$`` (salted SHA-512) password-file hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            return hmac.compare_digest(hashlib.sha512(password.encode() + salt).digest(), want)
    except (ValueError, TypeError):
        return False
    return False


_BROKER_FILE_FIX = (
    "run as a user who may write it, or point [provision] password_file / acl_file in fleet.toml elsewhere"
)


def _read_broker_file(path: Path) -> str | None:
    """The text of a Mosquitto password or ACL file; None when it does not exist yet."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise FleetError(f"cannot read the broker file {path}: {reason}", _BROKER_FILE_FIX) from None


def read_password_file(path: Path) -> dict[str, str]:
    """``{user: hash}`` of a Mosquitto password file (empty when it does not exist)."""
    entries: dict[str, str] = {}
    for line in (_read_broker_file(path) or "").splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            entries[user] = hashed.strip()
    return entries


def _broker_ids() -> tuple[int | None, int | None]:
    """(uid, gid) of the broker's user and group (``mosquitto``); None where this system has none."""
    uid = gid = None
    with contextlib.suppress(ImportError, KeyError):
        import pwd

        uid = pwd.getpwnam(BROKER_USER).pw_uid
    with contextlib.suppress(ImportError, KeyError):
        import grp

        gid = grp.getgrnam(BROKER_USER).gr_gid
    return uid, gid


def _broker_reads(st: os.stat_result, uid: int | None, gid: int | None, bit: int) -> bool:
    """Whether the broker's user has permission ``bit`` (4 read, 1 search) on a file with status ``st``."""
    if uid is not None and st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if gid is not None and st.st_gid == gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def broker_access_note(path: Path) -> str | None:
    """None when the broker's user can read ``path``, else one line saying what to run so that it can."""
    uid, gid = _broker_ids()
    try:
        st = path.stat()
    except OSError:
        return None
    if not _broker_reads(st, uid, gid, 4):
        return (
            f"Mosquitto (user {BROKER_USER}) cannot read {path}: run `sudo chown root:{BROKER_USER} {path}` "
            f"(or the group the broker runs as) and `sudo chmod 0640 {path}`"
        )
    for parent in path.resolve().parents:
        try:
            pst = parent.stat()
        except OSError:
            break
        if not _broker_reads(pst, uid, gid, 1):
            return f"Mosquitto (user {BROKER_USER}) cannot enter {parent}: run `sudo chmod o+x {parent}`"
    return None


def _write_broker_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, readable by the broker's user: mode 0640 (group read kept or added) and the group
    ``mosquitto`` when the file is new or owned by root's or our own group (an administrator's group is kept).
    Whether the broker can read the result is checked with ``broker_access_note``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
        mode, gid = (st.st_mode & 0o777) | 0o040, st.st_gid
    except FileNotFoundError:
        mode, gid = 0o640, None
    broker_gid = _broker_ids()[1]
    if broker_gid is not None and (gid is None or gid in (0, os.getegid())):
        gid = broker_gid
    try:
        write_atomic(path, data, mode=mode)
    except OSError as exc:
        raise FleetError(f"cannot write the broker file {path}: {exc.strerror}", _BROKER_FILE_FIX) from None
    if gid is not None:
        with contextlib.suppress(OSError):  # not ours to give: broker_access_note says what to run
            os.chown(path, -1, gid)


def set_password(path: Path, user: str, hashed: str) -> None:
    """Add or replace ``user``'s line in a Mosquitto password file (atomically; other lines kept in order)."""
    lines: list[str] = []
    replaced = False
    for line in (_read_broker_file(path) or "").splitlines():
        if line.split(":", 1)[0] == user and ":" in line:
            if not replaced:
                lines.append(f"{user}:{hashed}")
                replaced = True
            continue
        lines.append(line)
    if not replaced:
        lines.append(f"{user}:{hashed}")
    _write_broker_file(path, ("\n".join(lines) + "\n").encode())


# ---- Mosquitto ACL file ----------------------------------------------------------------------------------


def topic_root(device_prefix: str) -> str:
    """The part of the device topic template before the device id (``edge/{device_id}/`` -> ``edge/``)."""
    head = device_prefix.split("{device_id}", 1)[0]
    return head if not head or head.endswith("/") else head.rsplit("/", 1)[0] + "/"


def device_topics(device_id: str, device_prefix: str) -> tuple[list[str], list[str]]:
    """(topic filters the device may read, topics it may write) under least privilege.

    Read only: what the fleet (or an IoT backend) writes to the device: its deployment, metadata responses, signed
    commands, prediction requests and the shared target chunks. Write only: what the device publishes (the agent's
    topics in ``agent.protocol``). Prediction replies under the device's prefix go to ``predict/reply`` (or below).
    """
    prefix = device_prefix.format(device_id=device_id)
    topics = Topics(prefix if prefix.endswith("/") else prefix + "/")
    reads = [
        deploy_topic(topics),
        file_topic(topics),
        topics.prefix + "cmd/#",
        topics.predict,
        f"{FLEET_PREFIX}targets/#",
        "homeassistant/status",  # Home Assistant's birth message: discovery is sent again
    ]
    node = re.sub(r"[^A-Za-z0-9_-]", "_", device_id)  # agent.protocol.discovery_topic's node id
    writes = [
        topics.status,
        topics.telemetry,
        topics.events,
        topics.ack,
        topics.prefix + "results/#",
        fetch_topic(topics),
        chunk_request_topic(topics),
        update_status_topic(topics),
        update_state_topic(topics, "#"),
        topics.predict_reply + "/#",
        f"homeassistant/+/{node}/#",
    ]
    return reads, writes


def device_acl(device_id: str, device_prefix: str, comment: str = "") -> list[str]:
    """ACL lines confining a device to its own topics: it reads what the fleet writes to it and writes its own."""
    lines = [f"user {device_id}"]
    if comment:
        lines.append(f"# {comment}")
    reads, writes = device_topics(device_id, device_prefix)
    lines += [f"topic read {t}" for t in reads]
    lines += [f"topic write {t}" for t in writes]
    return lines


def fleet_acl_lines(device_prefix: str) -> list[str]:
    """Topic lines the fleet's own user needs: every device's tree, and publishing under ``fleet/``."""
    return [f"topic readwrite {topic_root(device_prefix)}#", f"topic write {FLEET_PREFIX}#"]


def _acl_blocks(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(lines before the first ``user`` line, {user: lines of its block}) in file order."""
    preamble: list[str] = []
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "user":
            current = blocks.setdefault(words[1], [line])
            continue
        if current is None:
            preamble.append(line)
        else:
            current.append(line)
    return preamble, blocks


def update_acl(path: Path, device_block: Sequence[str] | None, fleet_user: str, fleet_lines: Sequence[str]) -> None:
    """Write the device's block (replacing an older one; None: no device) and make sure the fleet user's block has
    ``fleet_lines``; other blocks and the preamble are kept. Atomic."""
    text = _read_broker_file(path)
    if text is None:
        text = _ACL_HEADER
    preamble, blocks = _acl_blocks(text)
    fleet = [ln for ln in blocks.get(fleet_user, [f"user {fleet_user}"]) if ln.strip()]
    fleet += [ln for ln in fleet_lines if ln not in fleet]
    blocks[fleet_user] = fleet
    if device_block is not None:
        blocks[device_block[0].split()[1]] = list(device_block)
    order = [fleet_user] + [u for u in blocks if u != fleet_user]
    out = list(preamble)
    while out and not out[-1].strip():
        out.pop()
    for user in order:
        lines = list(blocks[user])
        while lines and not lines[-1].strip():
            lines.pop()
        out += ["", *lines]
    _write_broker_file(path, ("\n".join(out).lstrip("\n") + "\n").encode())


# ---- fleet CA ----------------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)


def ensure_ca(ca_dir: Path) -> tuple[Any, Any]:
    """The fleet CA (certificate, private key) under ``ca_dir``, created on first use (key mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleet import pki

    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise FleetError(f"the fleet CA in {ca_dir} is unreadable: {exc}", "restore it from a backup") from None
        return cert, key
    if cert_path.exists() or key_path.exists():
        raise FleetError(f"the fleet CA in {ca_dir} is incomplete", "restore ca.crt and ca.key from a backup")
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ca_dir, 0o700)
    key = pki.new_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = pki.ca_certificate(
        key, pki.name("edge fleet CA", "edge fleet"), now - dt.timedelta(hours=1), now + dt.timedelta(days=3650)
    )
    _write_private(key_path, pki.key_pem(key))
    write_atomic(cert_path, pki.cert_pem(cert))
    return cert, key


def issue_client_cert(ca_dir: Path, device_id: str, days: int = 1825) -> tuple[bytes, bytes, bytes]:
    """(certificate PEM, private key PEM, CA certificate PEM) for a device: CN = device id, client auth only."""
    from fleet import pki

    ca_cert, ca_key = ensure_ca(ca_dir)
    key = pki.new_key()
    now = dt.datetime.now(dt.timezone.utc)
    subject = pki.name(device_id, "edge fleet")
    cert = pki.leaf_certificate(
        ca_cert, ca_key, key, subject, now - dt.timedelta(hours=1), now + dt.timedelta(days=days)
    )
    return pki.cert_pem(cert), pki.key_pem(key), pki.cert_pem(ca_cert)


# ---- agent.toml and INSTALL.md -----------------------------------------------------------------------------


def _q(value: str) -> str:
    """A TOML basic string."""
    return json.dumps(value, ensure_ascii=False)


def agent_toml(
    *,
    device_id: str,
    group: str,
    broker_url: str,
    device_prefix: str,
    credentials: str,
    tls_ca: bool,
    hardware: str | None,
    install_dir: str = INSTALL_DIR,
) -> str:
    """The device's agent.toml (docs/config.md): broker and credentials, updates from the fleet, a sample pipeline."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# agent.toml for device {device_id} (group {group}), written by `fleet device provision` on {stamp}.",
        f"# Goes to {install_dir}/agent.toml with the files beside it (see INSTALL.md); keys: docs/config.md.",
        f"device_id = {_q(device_id)}",
        "",
        "[mqtt]",
        f"broker = {_q(broker_url)}",
    ]
    if device_prefix != "edge/{device_id}/":
        lines.append(f"topic_prefix = {_q(device_prefix)}")
    if credentials == "password":
        lines += [f"username = {_q(device_id)}", 'password_file = "password"  # beside this file']
    if credentials == "certificate" or tls_ca:
        lines += ["", "[mqtt.tls]", 'ca = "ca.crt"  # beside this file; verifies the broker']
        if credentials == "certificate":
            lines += [
                f'cert = "client.crt"  # CN = {device_id}: the broker\'s username for this device',
                'key = "client.key"',
            ]
    lines += [
        "",
        "[update]",
        "enabled = true",
        'trust_root = "root.json"  # the fleet\'s TUF root, pinned at provisioning; later roots are verified from it',
    ]
    if hardware:
        lines.append(f"hardware_id = {_q(hardware)}")
    else:
        lines.append('# hardware_id = "rpi5"  # default: the detected firmware profile id, else the machine type')
    lines += [
        f"groups = [{_q(group)}]",
        "",
        "# A sample pipeline so the agent runs (and can be deployed to) out of the box: `fleet deploy` updates the",
        '# model of the pipeline named "main". Replace the synthetic source with the real input, for example:',
        "#   [sources.camera]",
        '#   type = "camera"',
        '#   device = "/dev/video0"',
        "[sources.camera]",
        'type = "synthetic"',
        'kind = "image"',
        "rate = 2.0",
        "",
        "[pipelines.main]",
        'source = "camera"',
        'model = "sample:digits-classifier-tflite"',
        'sinks = ["stdout"]',
        "",
    ]
    return "\n".join(lines)


def install_md(device_id: str, credentials: str, files: Iterable[str], install_dir: str = INSTALL_DIR) -> str:
    names = " ".join(sorted(files))
    secret = "client.key" if credentials == "certificate" else "password"
    return f"""# Installing device {device_id}

These files configure the edge agent on `{device_id}`: `agent.toml` (broker, credentials, updates, a sample
pipeline), `root.json` (the fleet's pinned trust root) and the broker credentials. `{secret}` is a secret: copy
it over a trusted channel and delete this directory once the device is installed.

On the device, from a checkout (or release archive) of edge-agent:

1. Install the agent and its systemd service without starting it (creates the `edge-agent` user). Its default
   extras include `update`, which this agent.toml needs (signed updates and device commands); with `--extras`,
   keep `mqtt,update` in the list:

       sudo systemd/install.sh --no-start

2. Copy the files into `{install_dir}` (readable by the service, not by other users):

       sudo install -d -m 0750 -o root -g edge-agent {install_dir}
       sudo install -m 0640 -o root -g edge-agent {names} {install_dir}/

3. Check the configuration, the broker connection and the runtimes, then start the service:

       sudo -u edge-agent /opt/edge-agent/venv/bin/edge-agent check --config {install_dir}/agent.toml
       sudo systemctl start edge-agent
       journalctl -u edge-agent -f

The device shows up in `fleet devices` once it connects. Provisioning it again with `--force` rotates its
credentials: the old ones stop working when the broker is reloaded.
"""


# ---- provisioning ------------------------------------------------------------------------------------------


def provision_device(
    config: FleetConfig,
    registry: Registry,
    repository: Repository,
    device_id: str,
    group: str,
    tags: Sequence[str] = (),
    hardware: str | None = None,
    credentials: str | None = None,
    *,
    out: Path | None = None,
    force: bool = False,
) -> ProvisionResult:
    """Register ``device_id`` in ``group`` and write its credentials, agent.toml, root.json and INSTALL.md into
    ``<out>/<device_id>/`` (``out`` defaults to ``<data_dir>/devices``).

    FleetError for an invalid id, unknown credentials kind, or an existing device without ``force`` (``force``
    rotates its credentials and updates its group, tags and hardware).
    """
    kind = credentials or config.provision.credentials
    if kind not in CREDENTIALS:
        raise FleetError(f"unknown credentials kind {kind!r}", f"use one of {', '.join(CREDENTIALS)}")
    if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
        raise FleetError(
            f"device id {device_id!r} is not valid", "use 1-128 letters, digits and _ . : - (the id the agent uses)"
        )
    if kind == "password" and ":" in device_id:
        raise FleetError(
            f"device id {device_id!r} holds ':', which a Mosquitto password file cannot store",
            "choose an id without ':' or use --credentials certificate",
        )
    broker_url = config.broker.device_url or config.broker.url
    tls = broker_url.startswith(("mqtts://", "ssl://"))
    if kind == "certificate" and not tls:
        raise FleetError(
            f"certificate credentials need a TLS broker URL, and devices are told {broker_url!r}",
            'set [broker].device_url = "mqtts://HOST:8883" in fleet.toml',
        )
    data = config.data
    password_file = Path(config.provision.password_file or data / "mosquitto" / "passwd")
    acl_file = Path(config.provision.acl_file or data / "mosquitto" / "acl")
    directory = Path(out or data / "devices") / device_id

    existing = registry.device(device_id, updates=0, telemetry=0, events=0)
    if existing is not None and not force:
        raise FleetError(
            f"device {device_id!r} is already provisioned (group {existing['group']})",
            "give --force to rotate its credentials, or choose another id",
        )
    if existing is None:
        registry.add_device(device_id, group, tags, hardware, kind)
    try:
        result = _write_device(config, repository, device_id, group, hardware, kind, broker_url, tls, directory)
        result.password_file = password_file if kind == "password" else None
        result.acl_file = acl_file
        fleet_user = config.broker.username or DEFAULT_FLEET_USER
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        block = device_acl(device_id, config.broker.device_prefix, f"group {group}, provisioned {stamp}")
        if kind == "password":
            secret = (directory / "password").read_text(encoding="utf-8").strip()
            set_password(password_file, device_id, mosquitto_hash(secret))
            _ensure_fleet_password(config, password_file, fleet_user, result.notes)
        update_acl(acl_file, block, fleet_user, fleet_acl_lines(config.broker.device_prefix))
        for path in (password_file, acl_file) if kind == "password" else (acl_file,):
            note = broker_access_note(path)
            if note:
                result.notes.append(note)
    except BaseException:
        if existing is None:
            registry.remove_device(device_id)
        raise
    if existing is not None:
        registry.update_device(device_id, group=group, tags=tags, hardware=hardware, credentials_kind=kind)
    result.rotated = existing is not None
    result.broker_conf, note = broker_conf_lines(
        kind, password_file, acl_file, data / "ca" / "ca.crt", config.broker.url, config.broker.device_url
    )
    if note:
        result.notes.append(note)
    return result


def _ensure_fleet_password(config: FleetConfig, password_file: Path, user: str, notes: list[str]) -> bool:
    """Put the fleet's own broker user in the password file when fleet.toml knows its password (True when it is
    there now); otherwise a note says what to do."""
    try:
        password = config.broker_password()
    except FleetError as exc:
        notes.append(f"the fleet's broker password is unreadable ({exc.problem}); add user {user} yourself")
        return False
    if not config.broker.username or not password:
        notes.append(
            f"fleet.toml names no broker username/password for the fleet itself: set [broker].username and "
            f"password_file in fleet.toml and run `fleet init` again (it adds user {user!r} to {password_file}), "
            f"or add it yourself with `mosquitto_passwd {password_file} {user}`"
        )
        return False
    current = read_password_file(password_file).get(user)
    if current is None or not mosquitto_verify(password, current):
        set_password(password_file, user, mosquitto_hash(password))
    return True


@dataclass
class BrokerSetup:
    """The fleet's own broker user in the Mosquitto password and ACL files (``fleet init``)."""

    user: str
    password_file: Path
    acl_file: Path
    password_added: bool  # the user's password is in the password file
    acl_written: bool  # the user's block is in the ACL file
    broker_conf: list[str]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "password_file": str(self.password_file),
            "acl_file": str(self.acl_file),
            "password_added": self.password_added,
            "acl_written": self.acl_written,
            "broker_conf": self.broker_conf,
            "notes": self.notes,
        }


def ensure_fleet_user(config: FleetConfig) -> BrokerSetup:
    """Put the fleet's own broker user (``[broker].username``, default ``fleet``) in the Mosquitto ACL file (read and
    write on every device's tree, write on ``fleet/``) and, when fleet.toml gives its password, in the password
    file. Notes say what is left to do (no password known, files the broker cannot read)."""
    data = config.data
    password_file = Path(config.provision.password_file or data / "mosquitto" / "passwd")
    acl_file = Path(config.provision.acl_file or data / "mosquitto" / "acl")
    user = config.broker.username or DEFAULT_FLEET_USER
    notes: list[str] = []
    added = written = False
    try:
        if config.provision.credentials == "password" or config.broker.username:
            added = _ensure_fleet_password(config, password_file, user, notes)
        update_acl(acl_file, None, user, fleet_acl_lines(config.broker.device_prefix))
        written = True
    except FleetError as exc:  # the rest of `fleet init` stands; say what to do about the broker files
        notes.append(f"{exc.problem} ({exc.fix}); then run `fleet init` again")
    for path in [p for p, done in ((password_file, added), (acl_file, written)) if done]:
        note = broker_access_note(path)
        if note:
            notes.append(note)
    kind = config.provision.credentials if config.provision.credentials in CREDENTIALS else "password"
    broker_conf, note = broker_conf_lines(
        kind, password_file, acl_file, data / "ca" / "ca.crt", config.broker.url, config.broker.device_url
    )
    if note:
        notes.append(note)
    return BrokerSetup(
        user=user,
        password_file=password_file,
        acl_file=acl_file,
        password_added=added,
        acl_written=written,
        broker_conf=broker_conf,
        notes=notes,
    )


def _write_device(
    config: FleetConfig,
    repository: Repository,
    device_id: str,
    group: str,
    hardware: str | None,
    kind: str,
    broker_url: str,
    tls: bool,
    directory: Path,
) -> ProvisionResult:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    files: list[Path] = []
    notes: list[str] = []

    def put(name: str, data: bytes, mode: int = 0o644) -> None:
        write_atomic(directory / name, data, mode=mode)
        files.append(directory / name)

    root = repository.read_metadata("root.json")
    if root is None:
        raise FleetError(f"the repository at {repository.path} has no root.json", "run `fleet init` first")
    put("root.json", root)
    stale = ["password"] if kind == "certificate" else ["client.crt", "client.key"]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    tls_ca = False
    if kind == "password":
        put("password", (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    else:
        cert, key, ca = issue_client_cert(config.data / "ca", device_id)
        put("client.crt", cert)
        put("client.key", key, 0o600)
        broker_ca = _broker_ca(config)
        put("ca.crt", broker_ca or ca)
        tls_ca = True
        if broker_ca is None:
            notes.append(
                "devices verify the broker with the fleet CA: give the broker a server certificate from it, "
                "or set [broker].ca to the CA of the broker's certificate"
            )
    if kind == "password" and tls and config.broker.ca:
        ca_bytes = _broker_ca(config)
        if ca_bytes:
            put("ca.crt", ca_bytes)
            tls_ca = True
    toml = agent_toml(
        device_id=device_id,
        group=group,
        broker_url=broker_url,
        device_prefix=config.broker.device_prefix,
        credentials=kind,
        tls_ca=tls_ca,
        hardware=hardware,
    )
    put("agent.toml", toml.encode(), 0o600 if kind == "password" else 0o644)
    put("INSTALL.md", install_md(device_id, kind, [p.name for p in files if p.name != "INSTALL.md"]).encode())
    return ProvisionResult(
        device_id=device_id,
        group=group,
        credentials=kind,
        directory=directory,
        files=files,
        acl_file=Path(),
        password_file=None,
        rotated=False,
        notes=notes,
    )


def _broker_ca(config: FleetConfig) -> bytes | None:
    if not config.broker.ca:
        return None
    try:
        return Path(config.broker.ca).read_bytes()
    except OSError as exc:
        raise FleetError(f"cannot read [broker].ca {config.broker.ca}: {exc.strerror}", "fix [broker].ca") from None


def _url_port(url: str) -> int:
    parts = urlsplit(url if "://" in url else "mqtt://" + url)
    try:
        return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
    except ValueError:
        return 8883 if parts.scheme in ("mqtts", "ssl") else 1883


def broker_conf_lines(
    kind: str, password_file: Path, acl_file: Path, ca: Path, fleet_url: str, device_url: str | None
) -> tuple[list[str], str | None]:
    """The mosquitto.conf lines for the fleet's files, and a note when devices cannot be bound to their client ids.

    On the devices' own listener ``use_username_as_clientid true``: a client's id is its username (the certificate
    CN with ``use_identity_as_username``), so device A's credentials can never connect as ``devB`` and take over
    B's session. The option is per listener and applies to every client on it, so the fleet's own connections
    (``fleet serve`` and each `fleet` command, several at once under one user) need a listener of their own.
    """
    lines = ["allow_anonymous false", f"acl_file {acl_file}"]
    if kind == "password":
        lines.append(f"password_file {password_file}")
    device_port, fleet_port = _url_port(device_url or fleet_url), _url_port(fleet_url)
    tls_lines = [f"cafile {ca}", "require_certificate true", "use_identity_as_username true"]
    if device_port == fleet_port:
        if kind != "password":  # on the TLS listener: client certificates are verified with the fleet CA
            lines += tls_lines
        return lines, (
            f"devices and the fleet share the broker listener on port {fleet_port}, so a device's client id cannot "
            "be bound to its credentials (one device's credentials could take over another's session): set "
            '[broker].device_url = "mqtt://HOST:PORT" in fleet.toml to a listener of their own and run this again '
            "for lines that bind them (use_username_as_clientid)"
        )
    lines.append(f"listener {device_port}")  # the devices' listener: client id = username, no takeover
    if kind != "password":
        lines += tls_lines
    lines += ["use_username_as_clientid true", f"listener {fleet_port}"]  # the fleet's own connections
    return lines, None
