"""A fleet simulator: one process, one (or a few) MQTT 5 connections publishing on behalf of many device ids.

Each simulated device first publishes its retained ``status`` (online, shaped like ``StatusPayload``), then
telemetry shaped like ``agent.mqtt.service.MqttService.telemetry()`` with ``ts`` = send time and its
``device_id``. Telemetry is spread evenly over the devices (round robin) at the total ``rate``, paced by a token
bucket of at most 50 ms of tokens (no bursts), QoS 1 with a large in-flight window. ``fault_every`` mixes in the
messages a server must refuse or set aside: bad JSON, a JSON array, a payload claiming another device's id, and
telemetry from an id that was never provisioned.

    python -m fleet.simulator --broker mqtt://127.0.0.1:1883 --devices 10000 --rate 1000 --seconds 60 \\
        [--register postgresql+psycopg://postgres@127.0.0.1:5432/fleet]

The broker must accept the bursts: Mosquitto drops messages beyond ``max_queued_messages`` (default 1000) queued
for one client, so raise it (or 0: no limit) for a fleet server draining 10,000 retained statuses at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.protocol import ModelRef, StatusPayload, encode
from fleet.errors import FleetError
from fleet.mqtt import parse_broker

FAULTS = ("bad_json", "not_object", "impersonate", "unknown_device")
SIM_VERSION = "0.0.0-sim"
MODEL = ModelRef(name="digits-classifier", version="1.0.0", sha256="0" * 64)


@dataclass
class SimReport:
    """What one ``Simulator.telemetry()`` run did: ``sent`` valid telemetry messages in ``seconds`` (achieved
    ``rate``), ``acked`` of them and of the faults acknowledged by the broker, ``failed`` refused by it."""

    devices: int
    target_rate: float | None  # None: unpaced
    seconds: float = 0.0
    sent: int = 0
    rate: float = 0.0
    acked: int = 0
    failed: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Simulator:
    """Many simulated devices behind ``clients`` MQTT 5 connections (device ``i`` uses connection ``i % clients``)."""

    def __init__(
        self,
        broker: str,
        devices: int,
        rate: float,
        *,
        prefix: str = "sim-",
        clients: int = 1,
        inflight: int = 1000,
        device_prefix: str = "edge/{device_id}/",
        username: str | None = None,
        password: str | None = None,
        seed: int = 0,
        burst_s: float = 0.05,
    ) -> None:
        if devices < 1 or rate <= 0 or clients < 1:
            raise FleetError("the simulator needs devices >= 1, rate > 0 and clients >= 1", "fix the arguments")
        self.address = parse_broker(broker)
        self.n = devices
        self.rate = float(rate)
        self.prefix = prefix
        self.ids = [f"{prefix}{i}" for i in range(devices)]
        self.bases = [device_prefix.format(device_id=d) for d in self.ids]
        self.inflight = inflight
        self.burst_s = burst_s
        self._rng = random.Random(seed)
        self._profiles = [self._profile(i) for i in range(devices)]
        self._boot = time.time()
        self._cond = threading.Condition()
        self._next = 0  # the device the next telemetry message comes from
        self._published = 0  # QoS 1 publishes handed to paho
        self._acked = 0
        self._failed = 0
        self._username = username or self.address.username
        self._password = password or self.address.password
        self._clients = [self._make_client(k) for k in range(clients)]
        self._connected = [threading.Event() for _ in range(clients)]

    # ---- connections ------------------------------------------------------------------------------

    def _make_client(self, k: int) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{self.prefix}simulator-{secrets.token_hex(3)}-{k}",
            protocol=mqtt.MQTTv5,
        )
        if self._username:
            client.username_pw_set(self._username, self._password)
        if self.address.tls:
            client.tls_set()
        client.max_inflight_messages_set(self.inflight)
        client.max_queued_messages_set(0)
        client.on_connect = lambda c, u, f, rc, p, k=k: self._on_connect(k, rc)
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, k: int, reason_code: Any) -> None:
        if not reason_code.is_failure:
            self._connected[k].set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._failed += 1
            else:
                self._acked += 1
            self._cond.notify_all()

    def connect(self, timeout: float = 10.0) -> Simulator:
        for client in self._clients:
            try:
                client.connect(self.address.host, self.address.port, keepalive=60)
            except OSError as exc:
                raise FleetError(
                    f"cannot connect to the broker {self.address.host}:{self.address.port}: {exc}",
                    "start the broker or fix --broker",
                ) from None
            client.loop_start()
        for k, event in enumerate(self._connected):
            if not event.wait(timeout):
                self.close()
                raise FleetError(f"simulator connection {k} got no CONNACK in {timeout:g} s", "check the broker")
        return self

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> Simulator:
        return self.connect()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _publish(self, i: int, suffix: str, payload: bytes, retain: bool = False, topic: str | None = None) -> None:
        client = self._clients[i % len(self._clients)]
        info = client.publish(topic or self.bases[i] + suffix, payload, qos=1, retain=retain)
        if info.rc not in (0, 4):  # MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN (queued by paho until reconnected)
            raise FleetError(f"paho refused a publish: rc {info.rc}", "check the broker connection")
        with self._cond:
            self._published += 1

    def wait_acked(self, timeout: float = 60.0) -> bool:
        """Wait until the broker acknowledged (or refused) everything published so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._acked + self._failed < self._published:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # ---- payloads ---------------------------------------------------------------------------------

    def _profile(self, i: int) -> dict[str, float]:
        r = self._rng
        return {
            "fps": r.uniform(8.0, 30.0),
            "latency": r.uniform(4.0, 40.0),
            "temperature": r.uniform(42.0, 68.0),
            "cpu": r.uniform(15.0, 85.0),
            "rss": r.uniform(120.0, 260.0),
        }

    def status_payload(self, i: int, state: str = "online") -> bytes:
        now = round(time.time(), 3)
        if state == "online":
            payload = StatusPayload(
                state="online",
                device_id=self.ids[i],
                ts=now,
                agent_version=SIM_VERSION,
                models={"main": MODEL},
                profile="x86_64",
            )
        else:
            payload = StatusPayload(state="offline", device_id=self.ids[i], ts=now, reason="shutdown")
        return encode(payload)

    def telemetry_payload(self, i: int, now: float | None = None) -> dict[str, Any]:
        """One device's telemetry, shaped like the agent's (``MqttService.telemetry()``)."""
        now = time.time() if now is None else now
        p, r = self._profiles[i], self._rng
        uptime = now - self._boot
        fps = max(0.0, p["fps"] + r.gauss(0.0, 0.5))
        latency = max(0.1, p["latency"] + r.gauss(0.0, 1.0))
        temperature = p["temperature"] + r.gauss(0.0, 0.3)
        processed = int(uptime * p["fps"])
        return {
            "v": 1,
            "device_id": self.ids[i],
            "run_id": f"sim{i:08x}",
            "ts": round(now, 3),
            "uptime_s": round(uptime, 1),
            "pipelines": {
                "main": {
                    "inferences": processed,
                    "fps_in": round(fps, 2),
                    "fps_processed": round(fps, 2),
                    "dropped": 0,
                    "skipped": 0,
                    "errors": 0,
                    "latency_ms": {
                        "p50": round(latency, 3),
                        "p95": round(latency * 1.3, 3),
                        "p99": round(latency * 1.6, 3),
                    },
                    "inference_ms": {
                        "p50": round(latency * 0.6, 3),
                        "p95": round(latency * 0.8, 3),
                        "p99": round(latency, 3),
                    },
                    "model": MODEL.model_dump(),
                    "runtime": "onnxruntime",
                    "inference": "thread",
                    "source": {
                        "connected": True,
                        "samples": processed,
                        "reconnects": 0,
                        "stalls": 0,
                        "errors": 0,
                        "last_error": None,
                    },
                    "stalled": False,
                }
            },
            "pipeline_errors": {},
            "system": {
                "cpu_percent": round(min(100.0, max(0.0, p["cpu"] + r.gauss(0.0, 3.0))), 1),
                "rss_mb": round(p["rss"], 1),
                "load_1m": round(p["cpu"] / 50.0, 2),
                "temperature_c": round(temperature, 1),
                "temperatures": {"cpu": round(temperature, 1)},
                "thermal_state": "normal",
                "throttled": False,
                "disk_free_mb": 2048.0,
            },
            "outbox": {
                "rows": 0,
                "bytes": 0,
                "oldest_age_s": None,
                "appended": processed,
                "acked": processed,
                "dropped": {},
            },
            "mqtt": {
                "connected": True,
                "reconnects": 0,
                "published": processed,
                "rejected_by_broker": 0,
                "inflight": 0,
                "last_error": None,
                "connected_since": self._boot,
                "oversize_results": 0,
            },
            "predict": {"requests": 0},
        }

    def _fault(self, kind: str, k: int) -> None:
        """Publish one message a server must refuse (or count as from an unknown device)."""
        i = k % self.n
        if kind == "bad_json":
            self._publish(i, "telemetry", b'{"device_id": "' + self.ids[i].encode() + b'", "ts": ')
        elif kind == "not_object":
            self._publish(i, "telemetry", b"[1, 2, 3]")
        elif kind == "impersonate":  # on device i's topic, claiming to be another (real) device
            data = self.telemetry_payload((i + 1) % self.n)
            self._publish(i, "telemetry", json.dumps(data, separators=(",", ":")).encode())
        elif kind == "unknown_device":  # a well-formed message from an id that was never provisioned
            intruder = f"intruder-{k % 7}"
            data = self.telemetry_payload(i) | {"device_id": intruder}
            topic = self.bases[i].replace(self.ids[i], intruder, 1) + "telemetry"
            self._publish(i, "telemetry", json.dumps(data, separators=(",", ":")).encode(), topic=topic)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    # ---- runs -------------------------------------------------------------------------------------

    def status(self, state: str = "online", rate: float | None = None, timeout: float = 120.0) -> float:
        """Publish every device's retained status (paced at ``rate``, default unpaced) and wait for the broker's
        acknowledgements; returns the seconds it took."""
        start = time.monotonic()
        self._paced(self.n, rate, lambda k: self._publish(k, "status", self.status_payload(k, state), retain=True))
        if not self.wait_acked(timeout):
            raise FleetError(f"the broker did not acknowledge {self.n} statuses in {timeout:g} s", "check the broker")
        return time.monotonic() - start

    def clear_status(self, timeout: float = 120.0) -> None:
        """Remove every device's retained status from the broker (an empty retained message; servers ignore it)."""
        self._paced(self.n, None, lambda k: self._publish(k, "status", b"", retain=True))
        if not self.wait_acked(timeout):
            raise FleetError(f"the broker did not acknowledge {self.n} cleared statuses", "check the broker")

    def telemetry(
        self,
        seconds: float | None = None,
        *,
        count: int | None = None,
        unpaced: bool = False,
        fault_every: int = 0,
        ack_timeout: float = 60.0,
    ) -> SimReport:
        """Publish telemetry for ``seconds`` (or ``count`` messages) at the total rate, round robin over the devices
        (carrying on where the previous run stopped); ``unpaced``: as fast as paho takes them (needs ``count``).
        With ``fault_every`` every n-th message slot carries a fault instead (``FAULTS``, in turn)."""
        if seconds is None and count is None:
            raise ValueError("telemetry() needs seconds or count")
        report = SimReport(devices=self.n, target_rate=None if unpaced else self.rate)
        faults: collections.Counter[str] = collections.Counter()
        sent = 0
        with self._cond:
            acked0, failed0 = self._acked, self._failed

        def send(slot: int) -> None:
            nonlocal sent
            if fault_every and slot % fault_every == fault_every - 1:
                kind = FAULTS[(slot // fault_every) % len(FAULTS)]
                self._fault(kind, slot)
                faults[kind] += 1
                return
            i = self._next % self.n
            self._next += 1
            data = self.telemetry_payload(i)
            self._publish(i, "telemetry", json.dumps(data, separators=(",", ":")).encode())
            sent += 1

        start = time.monotonic()
        until = None if seconds is None else start + seconds
        self._paced(count, None if unpaced else self.rate, send, until=until)
        elapsed = time.monotonic() - start
        report.seconds = round(elapsed, 3)
        report.sent = sent
        report.rate = round(sent / elapsed, 1) if elapsed > 0 else 0.0
        report.faults = dict(faults)
        self.wait_acked(ack_timeout)
        with self._cond:
            report.acked, report.failed = self._acked - acked0, self._failed - failed0
        return report

    def _paced(
        self, count: int | None, rate: float | None, send: Callable[[int], None], until: float | None = None
    ) -> None:
        """Call ``send(k)`` for k = 0, 1, ... (``count`` times or until ``until``) at ``rate`` per second: a token
        bucket holding at most ``burst_s`` worth of tokens, so a late wake-up catches up a little, never in bursts."""
        k = 0
        if rate is None:
            if count is None:
                raise ValueError("an unpaced run needs a count")
            for k in range(count):
                send(k)
            return
        capacity = max(2.0, rate * self.burst_s)
        tokens, last = 1.0, time.monotonic()
        while count is None or k < count:
            now = time.monotonic()
            if until is not None and now >= until:
                return
            tokens = min(capacity, tokens + (now - last) * rate)
            last = now
            while tokens >= 1.0 and (count is None or k < count):
                send(k)
                k += 1
                tokens -= 1.0
            time.sleep(max((1.0 - tokens) / rate, 0.0002))


def register_devices(registry: Any, n: int, prefix: str = "sim-", group: str = "sim") -> int:
    """Provision ``prefix0`` .. ``prefix<n-1>`` in ``registry`` (a ``fleet.db.Registry``) in bulk; ids that exist are
    left alone. Returns how many were added."""
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql, sqlite

    from fleet.db import devices_t, unknown_t

    insert = postgresql.insert if registry.dialect == "postgresql" else sqlite.insert
    registry.add_group(group)
    now = time.time()
    added = 0
    ids = [f"{prefix}{i}" for i in range(n)]
    with registry.engine.connect() as conn:
        conn.execution_options(fleet_write=True)
        with conn.begin():
            for start in range(0, n, 1000):
                chunk = ids[start : start + 1000]
                rows = [
                    {
                        "id": d,
                        "group": group,
                        "tags": ["simulated"],
                        "hardware": "x86_64",
                        "credentials_kind": None,
                        "created_at": now,
                        "models": {},
                        "online": False,
                    }
                    for d in chunk
                ]
                stmt = insert(devices_t).on_conflict_do_nothing(index_elements=["id"])
                added += len(conn.execute(stmt.returning(devices_t.c.id), rows).all())
                conn.execute(sa.delete(unknown_t).where(unknown_t.c.device_id.in_(chunk)))
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.simulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt[s]://[user:password@]host[:port]")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="telemetry messages per second, all devices")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--prefix", default="sim-", help="device ids are PREFIX0 .. PREFIX<devices-1>")
    parser.add_argument("--clients", type=int, default=1, help="MQTT connections the devices are spread over")
    parser.add_argument("--inflight", type=int, default=1000, help="QoS 1 messages in flight per connection")
    parser.add_argument("--status-rate", type=float, default=5000.0, help="retained statuses per second at start")
    parser.add_argument("--faults", type=int, default=0, metavar="N", help="every N-th message is a fault")
    parser.add_argument("--register", metavar="DATABASE_URL", help="first add the device ids to this registry")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        if args.register:
            from fleet.db import Registry

            with Registry(args.register) as registry:
                registry.migrate()
                added = register_devices(registry, args.devices, args.prefix)
            print(f"registered {added} new devices ({args.devices} wanted) in {registry.url}", file=sys.stderr)
        with Simulator(
            args.broker, args.devices, args.rate, prefix=args.prefix, clients=args.clients, inflight=args.inflight
        ) as sim:
            took = sim.status(rate=args.status_rate)
            print(f"{args.devices} retained statuses published in {took:.1f} s", file=sys.stderr)
            report = sim.telemetry(args.seconds, fault_every=args.faults)
    except FleetError as exc:
        print(f"simulator: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(
            f"sent {report.sent} telemetry messages from {report.devices} devices in {report.seconds:.1f} s: "
            f"{report.rate:.0f}/s (target {report.target_rate:.0f}/s); acked {report.acked}, refused {report.failed}"
            + (f"; faults {report.faults}" if report.faults else "")
        )
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
