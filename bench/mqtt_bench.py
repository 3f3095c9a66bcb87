"""MQTT throughput: results through the SQLite outbox and MqttLink vs a bare paho QoS 1 publish loop.

Both publish the same payloads to the same Mosquitto (started here on a free port) with the
same in-flight window, and a subscriber counts arrivals; rates are messages fully delivered per
second. Then the outbox replay rate after an outage: the broker is down while a 10-minute
backlog (at ``backlog_rate`` results/s) accumulates, then comes back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig
from agent.mqtt.client import MqttLink
from agent.mqtt.outbox import Outbox
from agent.protocol import Topics

PAYLOAD = (
    b'{"v":1,"device_id":"bench","pipeline":"p","seq":0,"task":"classification","label":"7","score":0.99,'
    b'"top":[{"index":7,"label":"7","score":0.99}],"latency_ms":0.9}' + b" " * 100
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchBroker:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
            f"max_inflight_messages 0\nuser root\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Counter:
    def __init__(self, port: int, topic: str) -> None:
        self.count = 0
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"counter-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, *_: Any) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def bare_paho(port: int, n: int, inflight: int) -> float:
    counter = Counter(port, "bare/#")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.perf_counter()
    for _ in range(n):
        client.publish("bare/results/p", PAYLOAD, qos=1)
    assert counter.wait(n)
    elapsed = time.perf_counter() - start
    client.loop_stop()
    client.disconnect()
    counter.close()
    return n / elapsed


def make_link(port: int, workdir: Path, inflight: int) -> tuple[MqttLink, Outbox]:
    config = MqttConfig(broker=f"mqtt://127.0.0.1:{port}", inflight=inflight, reconnect_min=0.2, reconnect_max=1.0)
    outbox = Outbox(workdir / "outbox.sqlite")
    topics = Topics.for_device("bench")
    link = MqttLink(config, "bench", topics, outbox, lambda: b'{"state":"online"}', lambda r: b'{"state":"offline"}')
    return link, outbox


def agent_outbox(port: int, n: int, inflight: int, workdir: Path) -> float:
    counter = Counter(port, "edge/bench/results/#")
    link, outbox = make_link(port, workdir, inflight)
    link.start()
    while not link.connected:
        time.sleep(0.01)
    topic = link.topics.results("p")
    start = time.perf_counter()
    for _ in range(n):
        link.publish_durable(topic, PAYLOAD)
    assert counter.wait(n)
    elapsed = time.perf_counter() - start
    link.stop()
    outbox.close()
    counter.close()
    return n / elapsed


def replay_after_outage(broker: BenchBroker, workdir: Path, backlog: int, inflight: int) -> dict[str, float]:
    broker.stop()
    link, outbox = make_link(broker.port, workdir, inflight)
    link.start()
    topic = link.topics.results("p")
    t0 = time.perf_counter()
    for _ in range(backlog):
        link.publish_durable(topic, PAYLOAD)
    append_rate = backlog / (time.perf_counter() - t0)
    broker.start()
    counter = Counter(broker.port, "edge/bench/results/#")
    start = time.perf_counter()
    assert counter.wait(backlog, timeout=600)
    elapsed = time.perf_counter() - start
    link.stop()
    outbox.close()
    counter.close()
    return {
        "backlog": backlog,
        "append_per_s": round(append_rate),
        "replay_per_s": round(backlog / elapsed),
        "replay_s": round(elapsed, 2),
    }


def run(n: int = 20000, inflight: int = 20, backlog_rate: float = 20.0, outage_s: float = 600.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = BenchBroker(work)
        broker.start()
        try:
            bare = [bare_paho(broker.port, n, inflight) for _ in range(2)]
            agent = [agent_outbox(broker.port, n, inflight, work / f"a{i}") for i in range(2)]
            (work / "replay").mkdir()
            replay = replay_after_outage(broker, work / "replay", int(backlog_rate * outage_s), inflight)
        finally:
            broker.stop()
    return {
        "messages": n,
        "inflight": inflight,
        "payload_bytes": len(PAYLOAD),
        "bare_paho_per_s": round(max(bare)),
        "agent_outbox_per_s": round(max(agent)),
        "ratio": round(max(agent) / max(bare), 3),
        "replay": replay | {"outage_s": outage_s, "results_per_s_during_outage": backlog_rate},
    }
