"""Real Mosquitto brokers for tests: certificates, a broker process per test, and a recording MQTT client.

Nothing here talks to the system broker on 127.0.0.1:1883: every ``Broker`` runs its own ``mosquitto``
process on free ports, with its config, log, password/ACL files and persistence under its own directory.

Behaviour of Mosquitto 2.0.11 with paho-mqtt 2.2 (asserted in tests/test_mosquitto_fixture.py):

- MQTT 5 PUBACK reason codes below 0x80 are successes: 0x00, or 0x10 No matching subscribers.
- A PUBLISH denied by the ACL is not delivered and the client stays connected. MQTT 5 QoS 1 gets PUBACK
  0x87 Not authorized; MQTT 3.1.1 QoS 1 gets a plain PUBACK (looks like success); QoS 0 gets nothing;
  QoS 2 gets PUBREC 0x87 but paho reports the PUBCOMP (success). The broker logs "Denied PUBLISH".
- A SUBSCRIBE outside the ACL is granted (SUBACK with the QoS); the broker filters at delivery.
- A bad username/password gets CONNACK 0x87 Not authorized (3.1.1: return code 5), not 0x86.
- A payload over ``message_size_limit`` is dropped ("Dropped too large PUBLISH" in the log). QoS 0, and
  MQTT 3.1.1 QoS 1 (plain PUBACK), look like success. MQTT 5 QoS 1/2 get PUBACK/PUBREC 0x95, a code the
  spec does not allow there: paho calls the packet malformed, drops the connection, reconnects and resends
  the message forever. ``max_packet_size`` (any protocol) disconnects the client instead: the same loop.
  So a client must never send more than the broker accepts.
- On ``kill()`` the broker keeps what its last autosave wrote (``autosave_interval 1``); SIGTERM saves.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MISSING_MOSQUITTO = "mosquitto not installed: apt-get install mosquitto (make test installs it when run as root)"
HOST = "127.0.0.1"
TLS_HOST = "localhost"  # the server certificate's CN/SAN; resolves to 127.0.0.1


# Users of ``acl_broker`` (tests/mqtt_fixtures.py) and their passwords.
ACL_PASSWORDS = {"dev1": "dev1-secret", "dev2": "dev2-secret", "fleet": "fleet-secret"}

# Each device user reads/writes its own ``edge/<user>/...`` tree and may publish Home Assistant discovery
# under ``homeassistant/<component>/<user>/...``; ``fleet`` reads/writes every device's tree and reads the
# discovery topics. %u must be a whole topic level; ``#`` also matches the parent (``edge/dev1``).
EDGE_ACL = """\
pattern readwrite edge/%u/#
pattern write homeassistant/+/%u/#

user fleet
topic readwrite edge/#
topic read homeassistant/#
"""


# --------------------------------------------------------------------------------------------- binaries


def find_mosquitto() -> str:
    """Path of the mosquitto binary; fails the test in CI (``CI=true``) and skips it elsewhere when missing."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(MISSING_MOSQUITTO)
    pytest.skip(MISSING_MOSQUITTO)


def find_mosquitto_passwd() -> str | None:
    return shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd") if os.access(p, os.X_OK)), None
    )


def mosquitto_password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<salt b64>$<PBKDF2-HMAC-SHA512 b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, passwords: dict[str, str], *, use_tool: bool = True) -> None:
    """Write a Mosquitto password file, with ``mosquitto_passwd -b`` when available (else hashed here)."""
    path.unlink(missing_ok=True)
    tool = find_mosquitto_passwd() if use_tool else None
    if tool:
        for i, (user, password) in enumerate(passwords.items()):
            args = [tool, "-b", *(["-c"] if i == 0 else []), str(path), user, password]
            subprocess.run(args, check=True, capture_output=True, timeout=10)
    else:
        path.write_text("".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in passwords.items()))
    path.chmod(0o600)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range.

    Outside that range no client socket (ours or another process's) is given the port as its local port
    while the broker is down for a restart, and a reconnecting client cannot TCP-self-connect to it.
    """
    low, high = _ephemeral_range()
    lo, hi = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    for _ in range(200):
        port = secrets.randbelow(hi - lo + 1) + lo
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded: let the kernel choose
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1, and client certificates (CN = name)."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)


def make_certs(directory: Path, client_names: Iterable[str] = ("dev1",)) -> Certs:
    """Generate a CA, a server cert (CN=localhost, SAN DNS:localhost + IP:127.0.0.1) and one client cert per name.

    EC P-256 keys, valid from now-1 day to now+30 days, written as PEM (keys unencrypted, mode 0600).
    """
    from cryptography import x509

    from fleet import pki

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=30)

    def write_key(key: Any, path: Path) -> Path:
        path.write_bytes(pki.key_pem(key))
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(pki.cert_pem(cert))
        return path

    def leaf(cn: str, server: bool, sans: list[x509.GeneralName]) -> tuple[x509.Certificate, Any]:
        key = pki.new_key()
        subject = pki.name(cn, "edge-agent tests")
        return pki.leaf_certificate(ca_cert, ca_key, key, subject, not_before, not_after, server=server, sans=sans), key

    ca_key = pki.new_key()
    ca_cert = pki.ca_certificate(ca_key, pki.name("edge-agent test CA", "edge-agent tests"), not_before, not_after)
    server_cert, server_key = leaf(
        "localhost", True, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    clients: dict[str, tuple[Path, Path]] = {}
    for client in client_names:
        cert, key = leaf(client, False, [])
        clients[client] = (write_cert(cert, directory / f"{client}.crt"), write_key(key, directory / f"{client}.key"))
    return Certs(
        directory=directory,
        ca=write_cert(ca_cert, directory / "ca.crt"),
        ca_key=write_key(ca_key, directory / "ca.key"),
        server_cert=write_cert(server_cert, directory / "server.crt"),
        server_key=write_key(server_key, directory / "server.key"),
        clients=clients,
    )


# --------------------------------------------------------------------------------------------- broker


class BrokerError(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the broker when the test process dies, so an aborted run leaves no stray brokers."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_LIVE_BROKERS: weakref.WeakSet[Broker] = weakref.WeakSet()


@atexit.register
def _kill_stray_brokers() -> None:
    for broker in list(_LIVE_BROKERS):
        with contextlib.suppress(Exception):
            broker.kill()


class Broker:
    """One ``mosquitto`` process with a generated config, on free ports, in ``workdir``.

    Listeners (``per_listener_settings true``):

    - plain on ``host:port``: anonymous unless ``passwords`` (then username/password required);
    - with ``tls``: ``localhost:tls_port`` with the CA/server cert; ``require_client_cert`` makes it mTLS
      (``require_certificate true`` + ``use_identity_as_username true``: the username is the cert CN).

    ``acl`` is ACL-file text (``pattern readwrite edge/%u/#``, ``user fleet`` / ``topic readwrite edge/#``),
    applied to both listeners. ``extra_conf`` is appended at the end: listener-level options there apply to
    the last listener (the TLS one when ``tls`` is given). Persistence lives in ``workdir/data`` and survives
    ``restart()``; with ``autosave_interval 1`` a ``kill()`` loses at most the last second of changes.
    """

    host = HOST

    def __init__(
        self,
        workdir: Path,
        *,
        tls: Certs | None = None,
        require_client_cert: bool = False,
        passwords: dict[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = True,
        message_size_limit: int | None = None,
        max_queued_messages: int | None = None,
        extra_conf: str = "",
        binary: str | None = None,
    ) -> None:
        if require_client_cert and tls is None:
            raise ValueError("require_client_cert needs tls=Certs(...)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or find_mosquitto()
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.passwords = dict(passwords) if passwords else None
        self.acl = acl
        self.persistence = persistence
        self.message_size_limit = message_size_limit
        self.max_queued_messages = max_queued_messages
        self.extra_conf = extra_conf
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.stderr_path = self.workdir / "mosquitto.stderr"
        self.data_dir = self.workdir / "data"
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    # ----------------------------------------------------------------- config

    def config_text(self) -> str:
        lines = [
            "# generated by tests/mosquitto.py",
            "per_listener_settings true",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp true",
            "log_timestamp_format %H:%M:%S",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to 'mosquitto', which cannot write workdir
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "persistence_file mosquitto.db",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self.message_size_limit is not None:
            lines.append(f"message_size_limit {self.message_size_limit}")
        if self.max_queued_messages is not None:
            lines.append(f"max_queued_messages {self.max_queued_messages}")

        auth: list[str] = []
        if self.passwords:
            pwfile = self.workdir / "passwd"
            write_password_file(pwfile, self.passwords)
            auth.append(f"password_file {pwfile}")
        if self.acl is not None:
            aclfile = self.workdir / "acl"
            aclfile.write_text(self.acl if self.acl.endswith("\n") else self.acl + "\n")
            aclfile.chmod(0o600)
            auth.append(f"acl_file {aclfile}")

        lines += ["", f"listener {self.port} {HOST}", f"allow_anonymous {'false' if self.passwords else 'true'}", *auth]
        if self.tls:
            anonymous = not (self.passwords or self.require_client_cert)
            lines += [
                "",
                f"listener {self.tls_port} {HOST}",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"allow_anonymous {'true' if anonymous else 'false'}",
                *auth,
            ]
            if self.require_client_cert:
                lines += ["require_certificate true", "use_identity_as_username true"]
        if self.extra_conf:
            lines += ["", self.extra_conf]
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------------- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise BrokerError("this broker has no TLS listener (pass tls=Certs)")
        return f"mqtts://{TLS_HOST}:{self.tls_port}"

    def _ports(self) -> list[int]:
        return [self.port] + ([self.tls_port] if self.tls_port is not None else [])

    def start(self, timeout: float = 10.0) -> Broker:
        """Start mosquitto and wait until every listener accepts TCP connections.

        The first start picks new ports if one was taken meanwhile; ``restart()`` keeps the ports and retries
        for a few seconds while the old sockets are released. Raises ``BrokerError`` with the log tail.
        """
        if self.running:
            raise BrokerError(f"mosquitto already running (pid {self.pid})")
        deadline = time.monotonic() + timeout
        while True:
            self.conf_path.write_text(self.config_text())
            self._spawn()
            error = self._wait_listening(deadline)
            if error is None:
                self._started_once = True
                _LIVE_BROKERS.add(self)
                return self
            if "Address already in use" in error and time.monotonic() < deadline:
                if not self._started_once:  # nobody relies on these ports yet: take fresh ones
                    self.port = free_port()
                    self.tls_port = free_port() if self.tls else None
                else:
                    time.sleep(0.2)
                continue
            self._reap()
            raise BrokerError(f"{error}\n--- mosquitto log ({self.workdir}) ---\n{self.log_tail()}")

    def _spawn(self) -> None:
        with self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_die_with_parent if os.name == "posix" else None,
            )

    def _wait_listening(self, deadline: float) -> str | None:
        assert self._proc is not None
        pending = self._ports()
        while pending:
            if self._proc.poll() is not None:
                return f"mosquitto exited with status {self._proc.returncode} at start"
            try:
                with socket.create_connection((HOST, pending[0]), timeout=0.5):
                    pending.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
                return f"mosquitto did not listen on {HOST}:{pending[0]} in time"
            time.sleep(0.02)
        return None

    def _signal(self, sig: int) -> None:
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _reap(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: mosquitto saves its persistence file), SIGKILL after ``timeout``."""
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        self._reap(timeout)

    def kill(self) -> None:
        """A crash: SIGKILL, no final persistence save."""
        self._signal(signal.SIGKILL)
        self._reap()

    def restart(self, *, graceful: bool = True, timeout: float = 10.0) -> Broker:
        """Stop (or kill when ``graceful=False``) if running, then start on the same ports and data dir."""
        if self.running:
            self.stop() if graceful else self.kill()
        return self.start(timeout)

    def wait_for_save(self, timeout: float = 5.0) -> None:
        """Wait for the next persistence save (autosave every second), so a ``kill()`` keeps what came before."""
        needle = "Saving in-memory database"
        before = self.log_text().count(needle)
        deadline = time.monotonic() + timeout
        while self.log_text().count(needle) <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"no persistence save within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        # The line is logged when the (synchronous, single-threaded) save starts; a CONNECT answered after it
        # proves the main loop got past the save, i.e. the database file has been written and renamed.
        self.ping(timeout)

    def ping(self, timeout: float = 5.0) -> None:
        """One MQTT 3.1.1 CONNECT/CONNACK round trip on the plain port (any CONNACK code counts)."""
        client_id = f"ping-{secrets.token_hex(4)}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
        with socket.create_connection((HOST, self.port), timeout=timeout) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            connack = b""
            while len(connack) < 4:
                chunk = s.recv(4 - len(connack))
                if not chunk:
                    raise BrokerError(f"no CONNACK from the broker:\n{self.log_tail()}")
                connack += chunk
            if connack[0] != 0x20:
                raise BrokerError(f"unexpected answer to CONNECT: {connack!r}")
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")  # DISCONNECT

    def pause(self) -> None:
        """SIGSTOP: the broker hangs with its sockets open (clients only notice through keepalive)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def __enter__(self) -> Broker:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- logs

    def log_text(self) -> str:
        parts = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(errors="replace")
                if text:
                    parts.append(text)
        return "".join(parts)

    def log_tail(self, n: int = 50, *, quiet: bool = False) -> str:
        """The last ``n`` log lines; ``quiet`` leaves out keepalive traffic (PINGREQ/PINGRESP)."""
        lines = self.log_text().splitlines()
        if quiet:
            lines = [ln for ln in lines if "PINGREQ" not in ln and "PINGRESP" not in ln]
        return "\n".join(lines[-n:])

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> str:
        """Wait until ``needle`` appears in the log; returns the first line containing it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the mosquitto log after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def __repr__(self) -> str:
        tls = f" tls_port={self.tls_port}" if self.tls_port else ""
        return f"<Broker pid={self.pid} port={self.port}{tls} workdir={self.workdir}>"


# --------------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any  # paho Properties (MQTT 5) or None
    time: float  # time.monotonic() at arrival


class MqttConnectError(ConnectionError):
    """The first connection failed: TLS/socket error, refused CONNACK, or no CONNACK in time."""

    def __init__(self, message: str, reason_code: Any = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code  # paho ReasonCode for a refused CONNACK, else None


MessagePredicate = Callable[[Message], bool] | str


class Subscriber:
    """A paho-mqtt 2.x client (MQTT 5 by default) that records every message it receives, thread-safely.

    Connects at construction (raises ``MqttConnectError``), subscribes ``topic_filter`` (one filter, a list,
    or None for a publish-only client) at QoS 1, then runs paho's network loop in a thread and reconnects
    by itself (0.1-1 s). With ``clean_start=False`` and a ``session_expiry`` (seconds) and a fixed
    ``client_id``, the broker keeps the session; on reconnect it re-subscribes only when the broker says the
    session is gone, so ``session_present`` shows whether the broker (e.g. after a restart) kept it.
    ``tls=True`` connects to ``localhost:broker.tls_port`` with ``ca_certs`` (None: the system CAs) and an
    optional client ``certfile``/``keyfile``.
    """

    def __init__(
        self,
        broker: Broker,
        topic_filter: str | list[str] | None = "#",
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_certs: Path | str | None = None,
        certfile: Path | str | None = None,
        keyfile: Path | str | None = None,
        protocol: int | None = None,
        clean_start: bool = True,
        session_expiry: int | None = None,
        qos: int = 1,
        keepalive: int = 10,
        timeout: float = 5.0,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._mqtt = mqtt
        self.broker = broker
        self.filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter or [])
        self.qos = qos
        self.protocol = protocol if protocol is not None else mqtt.MQTTv5
        self.client_id = client_id or f"test-{secrets.token_hex(4)}"
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._acks: dict[int, Any] = {}  # mid -> PUBACK reason code
        self.suback_codes: list[Any] = []  # reason codes of the last SUBACK
        self.connects: list[Any] = []  # (reason_code, session_present) per CONNACK
        self.disconnects: list[Any] = []  # reason codes per disconnection
        self._connack = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._closed = False

        v5 = self.protocol == mqtt.MQTTv5
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            clean_session=None if v5 else clean_start,
        )
        self.client = client
        if username is not None:
            client.username_pw_set(username, password)
        if tls:
            if broker.tls_port is None:
                raise BrokerError("tls=True but the broker has no TLS listener")
            client.tls_set(
                ca_certs=str(ca_certs) if ca_certs else None,
                certfile=str(certfile) if certfile else None,
                keyfile=str(keyfile) if keyfile else None,
            )
            host, port = TLS_HOST, broker.tls_port
        else:
            host, port = broker.host, broker.port
        client.reconnect_delay_set(0.1, 1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish

        connect_kwargs: dict[str, Any] = {}
        if v5:
            connect_kwargs["clean_start"] = clean_start
            if session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = session_expiry
                connect_kwargs["properties"] = props
        try:
            client.connect(host, port, keepalive=keepalive, **connect_kwargs)
        except (OSError, ssl.SSLError) as exc:
            raise MqttConnectError(f"connect to {host}:{port} failed: {exc!r}") from exc
        client.loop_start()
        ok = self._connack.wait(timeout)
        first = self.connects[0] if self.connects else None
        if not ok or first is None or first[0].is_failure:
            self.close()
            reason = first[0] if first else (self.disconnects[0] if self.disconnects else None)
            raise MqttConnectError(f"no successful CONNACK from {host}:{port}: {reason}", reason)
        if self.filters and not self._subscribed.wait(timeout):
            self.close()
            raise MqttConnectError(f"no SUBACK for {self.filters} within {timeout}s")

    # ----------------------------------------------------------------- paho callbacks (network thread)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        session_present = bool(getattr(flags, "session_present", False))
        with self._cond:
            self.connects.append((reason_code, session_present))
            self._cond.notify_all()
        if not reason_code.is_failure and self.filters and not session_present:
            _, self._sub_mid = client.subscribe([(f, self.qos) for f in self.filters])
        elif not reason_code.is_failure and self.filters:
            self._subscribed.set()
        self._connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self.disconnects.append(reason_code)
            self._cond.notify_all()
        self._connack.set()  # wake a constructor waiting for the first CONNACK

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._cond:
            self.suback_codes = list(reason_codes)
            self._cond.notify_all()
        self._subscribed.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            properties=getattr(msg, "properties", None),
            time=time.monotonic(),
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # ----------------------------------------------------------------- queries

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    @property
    def session_present(self) -> bool | None:
        """Whether the latest CONNACK said the broker kept this client's session."""
        with self._cond:
            return self.connects[-1][1] if self.connects else None

    def _matcher(self, predicate: MessagePredicate | None) -> Callable[[Message], bool]:
        if predicate is None:
            return lambda m: True
        if isinstance(predicate, str):
            return lambda m: self._mqtt.topic_matches_sub(predicate, m.topic)
        return predicate

    def messages(self, topic_filter: str | None = None) -> list[Message]:
        match = self._matcher(topic_filter)
        with self._cond:
            return [m for m in self._messages if match(m)]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(
        self, predicate: MessagePredicate | None = None, timeout: float = 5.0, *, count: int = 1
    ) -> list[Message]:
        """Wait until ``count`` received messages match ``predicate`` (a callable or a topic filter string).

        Returns all matching messages so far; raises ``AssertionError`` listing what arrived on timeout.
        """
        match = self._matcher(predicate)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self._messages if match(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:60]) for m in self._messages[-20:]]
                    raise AssertionError(
                        f"{len(found)}/{count} matching messages after {timeout}s; received (last 20): {seen}"
                    )
                self._cond.wait(left)

    def assert_no_message(self, predicate: MessagePredicate | None = None, within: float = 0.5) -> None:
        """Assert nothing matching arrives for ``within`` seconds (or arrived already)."""
        match = self._matcher(predicate)
        deadline = time.monotonic() + within
        with self._cond:
            while True:
                found = [m for m in self._messages if match(m)]
                assert not found, f"unexpected messages: {[(m.topic, m.payload[:60]) for m in found]}"
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def wait_connected(self, timeout: float = 10.0, *, connects: int | None = None) -> None:
        """Wait until connected (and, with ``connects``, until that many CONNACKs arrived in total)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self.client.is_connected() and (connects is None or len(self.connects) >= connects)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not (re)connected after {timeout}s; connects={self.connects}")
                self._cond.wait(min(left, 0.05))

    # ----------------------------------------------------------------- publishing

    def publish(
        self,
        topic: str,
        payload: bytes | str | None,
        qos: int = 1,
        retain: bool = False,
        properties: Any = None,
        timeout: float = 5.0,
    ) -> Any:
        """Publish and wait (at most ``timeout``) for the PUBACK (QoS 1/2) or the send (QoS 0).

        Returns the paho ``ReasonCode`` of the acknowledgement: MQTT 5 brokers put refusals there
        (0x87 Not authorized, 0x97 Quota exceeded, ...); MQTT 3.1.1 acknowledgements always read Success.
        Raises ``TimeoutError`` when nothing comes back in time, ``RuntimeError`` when paho refuses to queue.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == self._mqtt.MQTT_ERR_NO_CONN and qos == 0:
            raise ConnectionError(f"not connected: paho dropped the QoS 0 publish to {topic!r}")
        if info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):  # QoS>0 waits in paho's queue
            raise RuntimeError(f"paho refused the publish: {self._mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while info.mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no acknowledgement for publish to {topic!r} (mid {info.mid}) in {timeout}s")
                self._cond.wait(left)
            return self._acks.pop(info.mid)

    # ----------------------------------------------------------------- teardown

    def close(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
