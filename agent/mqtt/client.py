"""The broker link: paho-mqtt 2.x (CallbackAPIVersion.VERSION2), fed from the SQLite outbox.

Durable messages (results, events, telemetry) are appended to the outbox first; one
publisher thread sends them in id order at QoS 1 with at most ``inflight`` unacknowledged,
and a row is deleted only when its PUBACK arrives. paho's own queue is capped at the same
window, so the outbox is the only real buffer. After a reconnect paho re-sends what it had
in flight and the publisher continues from the oldest row not yet handed to paho; after an
agent restart everything still in the outbox is sent again (at-least-once: consumers
deduplicate on ``(device_id, run_id, pipeline, seq)``).

The connection is asynchronous: a broker that is down at boot, goes away or refuses the
credentials is retried with backoff and reported; it never blocks inference.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.config import MqttConfig, parse_broker_url
from agent.errors import AgentError
from agent.mqtt.outbox import Outbox
from agent.protocol import PLATFORMS, Topics

log = structlog.get_logger(__name__)

MessageHandler = Callable[[Any], None]  # receives paho's MQTTMessage


class MqttLink:
    """One device's connection to its broker."""

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        topics: Topics,
        outbox: Outbox | None,  # None: a link used only to probe() the broker
        status_online: Callable[[], bytes],
        status_offline: Callable[[str], bytes],
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.topics = topics
        self.outbox = outbox
        self._status_online = status_online
        self._status_offline = status_offline
        self.address = parse_broker_url(config.broker)
        self._retain = PLATFORMS[config.platform].retain  # Azure IoT Hub keeps no retained message: none sent
        self._handlers: dict[str, MessageHandler] = {}
        self._subscriptions: list[str] = []
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Condition()
        self._inflight: dict[int, tuple[int, float]] = {}  # paho mid -> (outbox id, handed-over time)
        self._early_acks: dict[int, Any] = {}  # PUBACKs seen before the mid was recorded
        self._direct_mids: set[int] = set()
        self._acked: list[int] = []  # PUBACKed outbox rows not yet deleted
        self._cursor = 0  # highest outbox id handed to paho since the last (re)connect
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self.connected = False
        self.connects = 0
        self.reconnects = 0
        self.published = 0
        self.rejected_by_broker = 0
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._last_diagnosis = -1e9
        self._diagnosis = "unknown"
        self._client = self._make_client()

    # ---- set-up -------------------------------------------------------------------------------

    @property
    def mqtt5(self) -> bool:
        return self.config.protocol == "5"

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.config
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or self.device_id,
            protocol=mqtt.MQTTv5 if self.mqtt5 else mqtt.MQTTv311,
            clean_session=None if self.mqtt5 else True,
        )
        username = cfg.username or self.address.username
        password = cfg.password or self.address.password
        if cfg.password_file:
            try:
                password = Path(cfg.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise AgentError(
                    f"cannot read mqtt.password_file: {exc.strerror}", "fix [mqtt].password_file"
                ) from None
        if username:
            client.username_pw_set(username, password)
        if self.address.tls or cfg.tls is not None:
            self._configure_tls(client)
        client.will_set(self.topics.status, self._status_offline("connection lost"), qos=1, retain=self._retain)
        client.reconnect_delay_set(min_delay=max(1, int(cfg.reconnect_min)), max_delay=max(1, int(cfg.reconnect_max)))
        client.max_inflight_messages_set(cfg.inflight)
        client.max_queued_messages_set(cfg.inflight * 2 + 50)  # room for status/discovery/replies, never a buffer
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _configure_tls(self, client: Any) -> None:
        tls = self.config.tls
        for key in ("ca", "cert", "key"):
            value = getattr(tls, key, None) if tls else None
            if value and not Path(value).is_file():
                raise AgentError(f"mqtt.tls.{key} file {value} does not exist", f"fix [mqtt.tls].{key}")
        try:
            client.tls_set(
                ca_certs=tls.ca if tls else None,
                certfile=tls.cert if tls else None,
                keyfile=tls.key if tls else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise AgentError(f"TLS set-up failed: {exc}", "check the [mqtt.tls] certificate and key files") from None
        if tls and tls.insecure:
            client.tls_insecure_set(True)

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Route messages on ``topic_filter`` to ``handler`` (subscribed now when connected, and on every reconnect)."""
        with self._lock:
            self._handlers[topic_filter] = handler
            if topic_filter not in self._subscriptions:
                self._subscriptions.append(topic_filter)
        if self.connected:
            self._client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` (and tell the broker when connected)."""
        with self._lock:
            self._handlers.pop(topic_filter, None)
            if topic_filter in self._subscriptions:
                self._subscriptions.remove(topic_filter)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def on_connected(self, hook: Callable[[], None]) -> None:
        self._on_connect_hooks.append(hook)

    def start(self) -> None:
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        kwargs: dict[str, Any] = {}
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry
            kwargs = {"clean_start": MQTT_CLEAN_START_FIRST_ONLY, "properties": props}
        try:
            self._client.connect_async(self.address.host, self.address.port, self.config.keepalive, **kwargs)
        except (ValueError, OSError) as exc:
            raise AgentError(
                f"cannot start MQTT connection to {self.config.broker}: {exc}", "fix [mqtt].broker"
            ) from None
        self._client.loop_start()
        self._publisher = threading.Thread(target=self._publish_loop, name="mqtt-publisher", daemon=True)
        self._publisher.start()
        log.info("mqtt connecting", broker=f"{self.address.host}:{self.address.port}", tls=self.address.tls)

    def stop(self, reason: str = "shutdown", drain_timeout: float = 5.0) -> None:
        """Give queued messages ``drain_timeout`` to go out, publish status offline, disconnect."""
        deadline = time.monotonic() + drain_timeout
        while (
            self.connected
            and time.monotonic() < deadline
            and (self.outbox.stats()["rows"] > len(self._acked) or self._inflight)
        ):
            time.sleep(0.05)
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self.connected:
            info = self._client.publish(self.topics.status, self._status_offline(reason), qos=1, retain=self._retain)
            self._note_direct(info.mid)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()
        if self._publisher is not None:
            self._publisher.join(5)
        self._flush_acks()

    # ---- publishing ---------------------------------------------------------------------------

    def publish_durable(self, topic: str, payload: bytes, priority: str = "bulk") -> int | None:
        """Store in the outbox, then send at QoS 1 when connected. None: dropped by the outbox policy."""
        row = self.outbox.append(topic, payload, qos=1, retain=False, priority=priority)
        with self._lock:
            self._lock.notify_all()
        return row

    def publish_now(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None
    ) -> bool:
        """Send directly (status, discovery, replies): not stored, dropped when offline."""
        if not self.connected:
            return False
        if len(payload) > self.config.max_payload_bytes:
            log.warning("payload over the cap, not sent", topic=topic, size=len(payload))
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain and self._retain, properties=properties)
        if qos and info.rc == 0:
            self._note_direct(info.mid)
        return info.rc == 0

    def _note_direct(self, mid: int) -> None:
        """Remember a direct (non-outbox) QoS 1 publish so its PUBACK is not mistaken for a row's."""
        with self._lock:
            if self._early_acks.pop(mid, None) is None:
                self._direct_mids.add(mid)
                if len(self._direct_mids) > 5000:  # acks lost with a connection: forget old ones
                    self._direct_mids.clear()

    def _publish_loop(self) -> None:
        from paho.mqtt.client import MQTT_ERR_SUCCESS

        while not self._stop.is_set():
            self._flush_acks()
            with self._lock:
                room = self.config.inflight - len(self._inflight)
                if not self.connected or room <= 0:
                    self._lock.wait(0.5)
                    continue
                cursor = self._cursor
                handed = {row for row, _ in self._inflight.values()}
            batch = [m for m in self.outbox.pending(after_id=cursor, limit=room + len(handed)) if m.id not in handed][
                :room
            ]
            if not batch:
                self.outbox.wait_for_pending(after_id=max(cursor, max(handed, default=0)), timeout=0.5)
                self._expire_stale()
                continue
            for message in batch:
                if self._stop.is_set() or not self.connected:
                    break
                # never call into paho holding our lock: its network thread calls _on_publish under its own
                info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
                if info.rc != MQTT_ERR_SUCCESS:
                    # not connected after all, or paho's queue is full: try again after the next connect/ack
                    time.sleep(0.2)
                    break
                with self._lock:
                    self._cursor = max(self._cursor, message.id)
                    if info.mid in self._early_acks:  # the PUBACK beat us to it
                        reason = self._early_acks.pop(info.mid)
                    else:
                        self._inflight[info.mid] = (message.id, time.monotonic())
                        continue
                self._settle(message.id, reason)

    def _expire_stale(self, max_age: float = 120.0) -> None:
        """Forget hand-overs paho never confirmed (e.g. lost in a crash of its session): they are sent again."""
        now = time.monotonic()
        with self._lock:
            stale = [mid for mid, (_, at) in self._inflight.items() if now - at > max_age]
            for mid in stale:
                del self._inflight[mid]
            if stale:
                self._cursor = 0

    # ---- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("mqtt connection refused", reason=str(reason_code), broker=self.config.broker)
            return
        if self.connects:
            self.reconnects += 1
        self.connects += 1
        self.connected = True
        self.connected_since = time.time()
        self.last_error = None
        log.info("mqtt connected", broker=f"{self.address.host}:{self.address.port}", reconnects=self.reconnects)
        # Subscribe before announcing "online": the broker handles one connection's packets in order, so a client
        # that sees the status can send a request (predict, command) at once and it is not lost.
        for topic_filter in list(self._subscriptions):
            client.subscribe(topic_filter, qos=1)
        info = client.publish(self.topics.status, self._status_online(), qos=1, retain=self._retain)
        self._note_direct(info.mid)
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:  # a hook bug must not break the connection
                log.exception("on-connect hook failed")
        with self._lock:
            self._cursor = 0  # replay from the oldest unacknowledged row (paho re-sends its own in-flight ones)
            self._lock.notify_all()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        now = time.monotonic()
        if now - self._last_diagnosis >= 60.0:  # say why, not only that: once a minute at most
            self._last_diagnosis = now
            self._diagnosis = self._diagnose()
        self.last_error = f"cannot connect to {self.address.host}:{self.address.port}: {self._diagnosis}"
        log.warning(
            "mqtt broker unreachable, retrying",
            broker=f"{self.address.host}:{self.address.port}",
            reason=self._diagnosis,
        )

    def _diagnose(self, timeout: float = 3.0) -> str:
        """Why a connection attempt fails: refused, unresolvable, timed out, or a TLS handshake error."""
        import socket

        try:
            sock = socket.create_connection((self.address.host, self.address.port), timeout=timeout)
        except OSError as exc:
            return exc.strerror or str(exc)
        try:
            if self.address.tls or self.config.tls is not None:
                tls = self.config.tls
                context = ssl.create_default_context(cafile=tls.ca if tls and tls.ca else None)
                if tls and tls.cert:
                    context.load_cert_chain(tls.cert, tls.key)
                if tls and tls.insecure:
                    context.check_hostname = False
                with context.wrap_socket(sock, server_hostname=self.address.host) as tls_sock:
                    tls_sock.settimeout(timeout)
            return "TCP and TLS handshake succeed; the broker closed the MQTT connection"
        except (ssl.SSLError, OSError) as exc:
            return f"TLS handshake failed: {getattr(exc, 'verify_message', None) or exc}"
        finally:
            sock.close()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self.connected
        self.connected = False
        if was and not self._stop.is_set():
            self.last_error = f"disconnected: {reason_code}"
            log.warning("mqtt disconnected, reconnecting", reason=str(reason_code))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            if mid in self._direct_mids:  # status, discovery, replies: not outbox rows
                self._direct_mids.discard(mid)
                return
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early_acks[mid] = reason_code
                if len(self._early_acks) > 1000:
                    self._early_acks.clear()
            self._lock.notify_all()
        if entry is not None:
            self._settle(entry[0], reason_code)

    def _settle(self, row: int, reason_code: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # the broker will never take it (not authorised, too large, quota): drop it, loudly
            self.rejected_by_broker += 1
            log.error("broker rejected a message, dropped", reason=str(reason_code), outbox_id=row)
        else:
            self.published += 1
        with self._lock:  # deleted in batches by the publisher thread: one transaction for many PUBACKs
            self._acked.append(row)
            self._lock.notify_all()

    def _flush_acks(self) -> None:
        with self._lock:
            rows, self._acked = self._acked, []
        if rows:
            self.outbox.ack_many(rows)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        import paho.mqtt.client as mqtt

        for topic_filter, handler in list(self._handlers.items()):
            if mqtt.topic_matches_sub(topic_filter, message.topic):
                try:
                    handler(message)
                except Exception:  # inbound data must never take the daemon down
                    log.exception("message handler failed", topic=message.topic)
                return

    def probe(self, timeout: float = 5.0) -> tuple[bool, str]:
        """One synchronous connect with this link's credentials and TLS (for `edge-agent check`); no will."""
        done = threading.Event()
        answer: dict[str, Any] = {}
        client = self._client
        client.will_clear()

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            answer["reason"] = reason
            done.set()

        client.on_connect = on_connect
        client.on_connect_fail = lambda *_: done.set()
        address = f"{self.address.host}:{self.address.port}"
        try:
            client.connect(self.address.host, self.address.port, keepalive=10)
        except (OSError, ValueError):
            return False, f"cannot connect to {address}: {self._diagnose()} (fix: start the broker or fix [mqtt])"
        client.loop_start()
        done.wait(timeout)
        client.disconnect()
        client.loop_stop()
        reason = answer.get("reason")
        if reason is None:
            return (
                False,
                f"no answer from {address} within {timeout:g} s (fix: check the broker, port and TLS settings)",
            )
        if reason.is_failure:
            return (
                False,
                f"{address} refused the connection: {reason} (fix: check username/password or the client certificate)",
            )
        tls = "TLS, " if self.address.tls or self.config.tls else ""
        return True, f"{address} accepts this device ({tls}MQTT {self.config.protocol})"

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "reconnects": self.reconnects,
            "published": self.published,
            "rejected_by_broker": self.rejected_by_broker,
            "inflight": len(self._inflight),
            "last_error": self.last_error,
            "connected_since": self.connected_since,
        }
