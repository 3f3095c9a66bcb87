"""Device provisioning: broker credentials confined to the device's own topics, a pinned trust root, an agent.toml.

Two kinds of credentials:

* ``password``: a random password; its PBKDF2-SHA512 hash (Mosquitto's ``$7$`` format) goes into the Mosquitto
  password file and ACL lines into the ACL file (``user <id>``, ``topic readwrite edge/<id>/#``,
  ``topic read fleet/targets/#`` for the chunk fan-out). Both files are replaced atomically; Mosquitto reads them
  again on SIGHUP (``systemctl reload mosquitto``).
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
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol import DEVICE_ID
from agent.protocol.update import FLEET_PREFIX
from fleet.config import FleetConfig
from fleet.db import Registry
from fleet.errors import FleetError
from fleet.keys import write_atomic
from fleet.repository import Repository

CREDENTIALS = ("password", "certificate")
INSTALL_DIR = "/etc/edge-agent"
DEFAULT_FLEET_USER = "fleet"
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


def read_password_file(path: Path) -> dict[str, str]:
    """``{user: hash}`` of a Mosquitto password file (empty when it does not exist)."""
    entries: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#") and ":" in line:
                user, hashed = line.split(":", 1)
                entries[user] = hashed.strip()
    return entries


def _write_keeping_owner(path: Path, data: bytes, default_mode: int) -> None:
    """Replace ``path`` atomically, keeping the mode and group of the file it replaces (Mosquitto, which reads it
    after dropping privileges, is usually given read access through the group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
        mode, gid = st.st_mode & 0o777, st.st_gid
    except FileNotFoundError:
        mode, gid = default_mode, None
    write_atomic(path, data, mode=mode)
    if gid is not None:
        with contextlib.suppress(OSError):
            os.chown(path, -1, gid)


def set_password(path: Path, user: str, hashed: str) -> None:
    """Add or replace ``user``'s line in a Mosquitto password file (atomically; other lines kept in order)."""
    lines: list[str] = []
    replaced = False
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.split(":", 1)[0] == user and ":" in line:
                if not replaced:
                    lines.append(f"{user}:{hashed}")
                    replaced = True
                continue
            lines.append(line)
    if not replaced:
        lines.append(f"{user}:{hashed}")
    _write_keeping_owner(path, ("\n".join(lines) + "\n").encode(), 0o640)


# ---- Mosquitto ACL file ----------------------------------------------------------------------------------


def topic_root(device_prefix: str) -> str:
    """The part of the device topic template before the device id (``edge/{device_id}/`` -> ``edge/``)."""
    head = device_prefix.split("{device_id}", 1)[0]
    return head if not head or head.endswith("/") else head.rsplit("/", 1)[0] + "/"


def device_acl(device_id: str, device_prefix: str, comment: str = "") -> list[str]:
    """ACL lines confining a device to its own topics (and read access to the shared target chunks)."""
    prefix = device_prefix.format(device_id=device_id)
    if not prefix.endswith("/"):
        prefix += "/"
    lines = [f"user {device_id}"]
    if comment:
        lines.append(f"# {comment}")
    lines += [
        f"topic readwrite {prefix}#",
        f"topic read {FLEET_PREFIX}targets/#",
        f"topic write homeassistant/+/{device_id}/#",
    ]
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


def update_acl(path: Path, device_block: Sequence[str], fleet_user: str, fleet_lines: Sequence[str]) -> None:
    """Write the device's block (replacing an older one) and make sure the fleet user's block has
    ``fleet_lines``; other blocks and the preamble are kept. Atomic."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = _ACL_HEADER
    preamble, blocks = _acl_blocks(text)
    fleet = [ln for ln in blocks.get(fleet_user, [f"user {fleet_user}"]) if ln.strip()]
    fleet += [ln for ln in fleet_lines if ln not in fleet]
    blocks[fleet_user] = fleet
    device_user = device_block[0].split()[1]
    blocks[device_user] = list(device_block)
    order = [fleet_user] + [u for u in blocks if u != fleet_user]
    out = list(preamble)
    while out and not out[-1].strip():
        out.pop()
    for user in order:
        lines = list(blocks[user])
        while lines and not lines[-1].strip():
            lines.pop()
        out += ["", *lines]
    _write_keeping_owner(path, ("\n".join(out).lstrip("\n") + "\n").encode(), 0o640)


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
        lines += [f"username = {_q(device_id)}", f"password_file = {_q(install_dir + '/password')}"]
    if credentials == "certificate" or tls_ca:
        lines += ["", "[mqtt.tls]", f"ca = {_q(install_dir + '/ca.crt')}  # verifies the broker"]
        if credentials == "certificate":
            lines += [
                f"cert = {_q(install_dir + '/client.crt')}  # CN = {device_id}: the broker's username for this device",
                f"key = {_q(install_dir + '/client.key')}",
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

1. Install the agent and its systemd service without starting it (creates the `edge-agent` user):

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
            _ensure_fleet_password(config, password_file, fleet_user, result)
        update_acl(acl_file, block, fleet_user, fleet_acl_lines(config.broker.device_prefix))
    except BaseException:
        if existing is None:
            registry.remove_device(device_id)
        raise
    if existing is not None:
        registry.update_device(device_id, group=group, tags=tags, hardware=hardware, credentials_kind=kind)
    result.rotated = existing is not None
    result.broker_conf = _broker_conf(kind, password_file, acl_file, data / "ca" / "ca.crt")
    return result


def _ensure_fleet_password(config: FleetConfig, password_file: Path, user: str, result: ProvisionResult) -> None:
    """Put the fleet's own broker user in the password file when fleet.toml knows its password."""
    try:
        password = config.broker_password()
    except FleetError as exc:
        result.notes.append(f"the fleet's broker password is unreadable ({exc.problem}); add user {user} yourself")
        return
    if not config.broker.username or not password:
        result.notes.append(
            f"fleet.toml names no broker username/password for the fleet itself: add user {user!r} to {password_file} "
            "(mosquitto_passwd) and set [broker].username and password_file"
        )
        return
    current = read_password_file(password_file).get(user)
    if current is None or not mosquitto_verify(password, current):
        set_password(password_file, user, mosquitto_hash(password))


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


def _broker_conf(kind: str, password_file: Path, acl_file: Path, ca: Path) -> list[str]:
    lines = ["allow_anonymous false", f"acl_file {acl_file}"]
    if kind == "password":
        lines.append(f"password_file {password_file}")
    else:  # on the TLS listener: client certificates are verified with the fleet CA
        lines += [f"cafile {ca}", "require_certificate true", "use_identity_as_username true"]
    return lines
