"""The fleet server's MQTT connection (paho-mqtt 2, MQTT 5): handlers per topic filter, shared subscriptions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from fleet.errors import FleetError

log = structlog.get_logger(__name__)
Handler = Callable[[Any], None]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_broker(url: str) -> BrokerAddress:
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise FleetError(f"broker URL {url!r} is not mqtt://host[:port] or mqtts://host[:port]", "fix the broker URL")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise FleetError(f"broker URL {url!r} has a bad port", "fix the broker URL") from None
    return BrokerAddress(parts.hostname, port, tls, parts.username, parts.password)


class FleetLink:
    """A paho client that re-subscribes on reconnect. ``share`` turns subscriptions into ``$share/<share>/...``
    so that several ``fleet serve`` instances split the device traffic between them."""

    def __init__(
        self,
        broker: str,
        client_id: str,
        *,
        share: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        inflight: int = 64,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.address = parse_broker(broker)
        self.share = share
        self._handlers: dict[str, Handler] = {}
        self._shared: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        user = username or self.address.username
        if user:
            self.client.username_pw_set(user, password or self.address.password)
        if self.address.tls or ca:
            self.client.tls_set(ca_certs=ca)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._suback = threading.Condition()
        self._subacked: set[int] = set()
        self.last_error: str | None = None

    def subscribe(self, topic_filter: str, handler: Handler, *, shared: bool = True, wait_s: float = 0.0) -> None:
        """Route ``topic_filter`` to ``handler``; with ``wait_s``, return only once the broker granted it (SUBACK)."""
        with self._lock:
            known = self._handlers.get(topic_filter) == handler
            self._handlers[topic_filter] = handler
            self._shared[topic_filter] = shared
        if known or not self.connected.is_set():
            return
        _rc, mid = self.client.subscribe(self._wire_filter(topic_filter), qos=1)
        if wait_s > 0:
            deadline = time.monotonic() + wait_s
            with self._suback:
                while mid not in self._subacked and time.monotonic() < deadline:
                    self._suback.wait(deadline - time.monotonic())
                self._subacked.discard(mid)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._suback:
            self._subacked.add(mid)
            if len(self._subacked) > 1000:
                self._subacked.clear()
            self._suback.notify_all()

    def _wire_filter(self, topic_filter: str) -> str:
        if self.share and self._shared.get(topic_filter, True):
            return f"$share/{self.share}/{topic_filter}"
        return topic_filter

    def start(self, timeout: float = 10.0) -> None:
        try:
            self.client.connect_async(self.address.host, self.address.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise FleetError(
                f"cannot connect to the broker {self.address.host}:{self.address.port}: {exc}", "check the broker URL"
            ) from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.client.loop_stop()
            raise FleetError(
                f"no connection to the broker {self.address.host}:{self.address.port} within {timeout:g} s"
                + (f": {self.last_error}" if self.last_error else ""),
                "start the broker or fix the broker URL and credentials",
            )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def wait_published(self, info: Any, timeout: float = 10.0) -> bool:
        """True once the broker acknowledged ``info``; False on timeout or when the publish failed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if info.is_published():
                    return True
            except (RuntimeError, ValueError):  # not connected: paho gave up on it
                return False
            if time.monotonic() >= deadline or not self.connected.is_set():
                return False
            time.sleep(0.005)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("fleet mqtt connection refused", reason=str(reason_code))
            return
        with self._lock:
            filters = list(self._handlers)
        for topic_filter in filters:
            client.subscribe(self._wire_filter(topic_filter), qos=1)
        self.connected.set()
        log.info("fleet mqtt connected", broker=f"{self.address.host}:{self.address.port}", share=self.share)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        log.warning("fleet mqtt disconnected", reason=str(reason_code))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        import paho.mqtt.client as mqtt

        with self._lock:
            handlers = list(self._handlers.items())
        for topic_filter, handler in handlers:
            if mqtt.topic_matches_sub(topic_filter, message.topic):
                try:
                    handler(message)
                except Exception:  # one bad message must never stop the server
                    log.exception("fleet message handler failed", topic=message.topic)
                return
