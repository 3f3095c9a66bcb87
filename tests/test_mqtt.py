"""MQTT integration against real Mosquitto brokers started by the fixtures, with the agent as a real process."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import INPUTS
from tests.daemon_helpers import start_agent, stop, wait_until
from tests.mosquitto import ACL_PASSWORDS, Broker, Message

DIGITS_SOURCE = f'[sources.digits]\ntype = "replay"\npath = "{INPUTS}/digit_*.png"\nrate = {{rate}}\n'


def agent_config(
    tmp_path: Path,
    broker_url: str,
    device_id: str = "dev1",
    *,
    rate: float = 20.0,
    mqtt_extra: str = "",
    extra: str = "",
    name: str = "agent.toml",
) -> Path:
    state = tmp_path / "state"
    config = tmp_path / name
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{state}"\nstatus_interval = 0.5\n'
        + DIGITS_SOURCE.format(rate=rate)
        + '[pipelines.digits]\nsource = "digits"\nmodel = "sample:digits-classifier-tflite"\nsinks = []\n'
        + f'[mqtt]\nbroker = "{broker_url}"\ntelemetry_interval = 1.0\nkeepalive = 5\nreconnect_min = 0.2\nreconnect_max = 1.0\n'
        + mqtt_extra
        + "\n"
        + extra
    )
    return config


def payload(m: Message) -> dict[str, Any]:
    return json.loads(m.payload)


def results_of(messages: list[Message]) -> list[dict[str, Any]]:
    return [payload(m) for m in messages if "/results/" in m.topic]


def assert_contiguous(results: list[dict[str, Any]]) -> dict[str, int]:
    """Per run: the published sequence numbers, deduplicated, have no gap. Returns run_id -> count."""
    by_run: dict[str, set[int]] = {}
    for r in results:
        by_run.setdefault(r["run_id"], set()).add(r["pub_seq"])
    for run, seqs in by_run.items():
        assert seqs == set(range(1, max(seqs) + 1)), (
            f"run {run}: missing {sorted(set(range(1, max(seqs) + 1)) - seqs)[:20]}"
        )
    return {run: len(seqs) for run, seqs in by_run.items()}


def test_status_results_and_telemetry(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    sub = mqtt_client(broker, "edge/dev1/#")
    proc = start_agent(["run", "--config", str(agent_config(tmp_path, broker.url))], output_dir=tmp_path)
    try:
        [status] = sub.wait_for("edge/dev1/status", timeout=30)
        assert status.retain or payload(status)["state"] == "online"
        s = payload(status)
        assert s["state"] == "online" and s["device_id"] == "dev1" and s["v"] == 1
        assert (
            s["models"]["digits"]["name"] == "digits-classifier-tflite" and len(s["models"]["digits"]["sha256"]) == 64
        )
        sub.wait_for("edge/dev1/results/digits", count=10, timeout=30)
        [tele, *_] = sub.wait_for("edge/dev1/telemetry", timeout=30)
        t = payload(tele)
        pipe = t["pipelines"]["digits"]
        assert pipe["inferences"] > 0 and set(pipe["latency_ms"]) == {"p50", "p95", "p99"}
        assert {"fps_in", "fps_processed", "dropped", "model", "source"} <= set(pipe)
        assert pipe["model"]["version"] == "1.0.0" and pipe["source"]["connected"] is True
        system = t["system"]
        assert system["rss_mb"] > 10 and system["disk_free_mb"] > 0 and "cpu_percent" in system
        assert "temperature_c" in system and "throttled" in system
        assert t["outbox"]["rows"] >= 0 and t["mqtt"]["connected"] is True and t["mqtt"]["reconnects"] == 0
        assert t["uptime_s"] > 0
        results = results_of(sub.messages())
        labels = [r["label"] for r in results]
        assert set(labels) <= {str(i) for i in range(10)} and len(set(labels)) > 3
        assert all(r["device_id"] == "dev1" and r["task"] == "classification" for r in results)
        assert_contiguous(results)
    finally:
        assert stop(proc) == 0
    last = sub.wait_for(lambda m: m.topic == "edge/dev1/status" and payload(m)["state"] == "offline", timeout=10)
    assert payload(last[-1])["reason"] == "shutdown"


def test_last_will_after_kill9(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    sub = mqtt_client(broker, "edge/dev1/status")
    proc = start_agent(["run", "--config", str(agent_config(tmp_path, broker.url))], output_dir=tmp_path)
    try:
        sub.wait_for(lambda m: payload(m)["state"] == "online", timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        [will] = sub.wait_for(lambda m: payload(m)["state"] == "offline", timeout=15)
        assert payload(will)["reason"] == "connection lost"
    finally:
        stop(proc)
    # retained: a newcomer sees the device offline
    late = mqtt_client(broker, "edge/dev1/status")
    [seen] = late.wait_for(timeout=5)
    assert seen.retain and payload(seen)["state"] == "offline"


def test_no_result_lost_across_kill9_of_broker_and_agent(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    sub = mqtt_client(broker, "edge/dev1/results/#", client_id="consumer", clean_start=False, session_expiry=600)
    config = agent_config(tmp_path, broker.url, rate=25.0)
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        sub.wait_for("edge/dev1/results/digits", count=20, timeout=30)
        # The consumer's persistent session must be on disk before each crash, or the restarted broker has no
        # subscriber to queue the agent's replayed results for until the consumer re-subscribes (a race).
        broker.wait_for_save()
        broker.kill()  # the broker crashes: results pile up in the outbox
        time.sleep(2.0)
        broker.restart()
        sub.wait_connected(timeout=20, connects=2)
        before = len(sub.messages())
        assert wait_until(lambda: len(sub.messages()) > before + 40, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)  # the agent crashes: what is in its outbox must still arrive
        proc.wait()
        broker.wait_for_save()
        broker.kill()
        proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
        time.sleep(2.0)
        broker.restart()
        sub.wait_connected(timeout=20, connects=3)
        assert wait_until(lambda: len({r["run_id"] for r in results_of(sub.messages())}) == 2, timeout=30)
        time.sleep(2.0)
    finally:
        assert stop(proc) == 0
    time.sleep(1.0)
    counts = assert_contiguous(results_of(sub.messages()))
    assert len(counts) == 2 and min(counts.values()) >= 20, counts


def test_broker_down_at_boot_then_up(tmp_path: Path, broker_factory, mqtt_client) -> None:
    broker = broker_factory()
    url = broker.url
    broker.stop()
    proc = start_agent(["run", "--config", str(agent_config(tmp_path, url)), "--results", "json"], output_dir=tmp_path)
    try:
        # inference runs although the broker is down; results wait in the outbox
        stdout = tmp_path / "stdout.txt"
        assert wait_until(lambda: stdout.exists() and stdout.read_text().count('"pipeline"') >= 0, timeout=5)
        time.sleep(3.0)
        assert proc.poll() is None
        broker.restart()
        sub = mqtt_client(broker, "edge/dev1/results/#")
        results = sub.wait_for(count=40, timeout=30)
        counts = assert_contiguous(results_of(results))
        assert len(counts) == 1
    finally:
        assert stop(proc) == 0
    assert "unreachable" in (tmp_path / "stderr.txt").read_text()


def test_wrong_credentials_keep_inference_running(tmp_path: Path, acl_broker: Broker) -> None:
    url = f"mqtt://dev1:wrong@127.0.0.1:{acl_broker.port}"
    config = agent_config(tmp_path, url, extra='[sinks.jsonl]\npath = "' + str(tmp_path / "r.jsonl") + '"\n')
    config.write_text(config.read_text().replace("sinks = []", 'sinks = ["jsonl"]'))
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        results = tmp_path / "r.jsonl"
        assert wait_until(lambda: results.exists() and len(results.read_text().splitlines()) > 20, timeout=30)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert "mqtt connection refused" in (tmp_path / "stderr.txt").read_text()


def test_acl_confines_a_device_to_its_own_topics(tmp_path: Path, acl_broker: Broker, mqtt_client) -> None:
    fleet = mqtt_client(acl_broker, "edge/#", username="fleet", password=ACL_PASSWORDS["fleet"])
    # dev1's credentials, but configured to speak for dev2: the broker must refuse every publish
    rogue = agent_config(tmp_path, f"mqtt://dev1:{ACL_PASSWORDS['dev1']}@127.0.0.1:{acl_broker.port}", "dev2")
    honest_dir = tmp_path / "honest"
    honest_dir.mkdir()
    honest = agent_config(honest_dir, f"mqtt://dev1:{ACL_PASSWORDS['dev1']}@127.0.0.1:{acl_broker.port}", "dev1")
    p1 = start_agent(["run", "--config", str(rogue)], output_dir=tmp_path)
    p2 = start_agent(["run", "--config", str(honest)], output_dir=honest_dir)
    try:
        fleet.wait_for("edge/dev1/results/digits", count=10, timeout=30)
        time.sleep(2.0)
        assert [m.topic for m in fleet.messages() if m.topic.startswith("edge/dev2/")] == []
    finally:
        assert stop(p1) == 0
        assert stop(p2) == 0
    assert "broker rejected a message" in (tmp_path / "stderr.txt").read_text()


def test_tls_and_mutual_tls(tmp_path: Path, mtls_broker: Broker, tls_certs, mqtt_client) -> None:
    cert, key = tls_certs.clients["dev1"]
    extra = f'[mqtt.tls]\nca = "{tls_certs.ca}"\ncert = "{cert}"\nkey = "{key}"\n'
    config = agent_config(tmp_path, f"mqtts://localhost:{mtls_broker.tls_port}", mqtt_extra=extra)
    sub = mqtt_client(mtls_broker, "edge/#", tls=True, ca_certs=tls_certs.ca, certfile=cert, keyfile=key)
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        sub.wait_for("edge/dev1/results/digits", count=5, timeout=30)
    finally:
        assert stop(proc) == 0


def test_home_assistant_discovery(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    config = agent_config(
        tmp_path, broker.url, mqtt_extra='[mqtt.home_assistant]\nenabled = true\nname = "Front door"\n'
    )
    sub = mqtt_client(broker, "homeassistant/#")
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        configs = sub.wait_for(lambda m: m.topic.endswith("/config"), count=7, timeout=30)
        time.sleep(0.5)
        first = {m.topic: payload(m) for m in sub.messages() if m.topic.endswith("/config")}
        assert len(configs) >= 7
        # retained: Home Assistant starting later still finds every config
        late = mqtt_client(broker, "homeassistant/#")
        kept = late.wait_for(count=len(first), timeout=10)
        assert all(m.retain for m in kept) and {m.topic for m in kept} == set(first)
        for topic, cfg in first.items():
            assert topic.startswith("homeassistant/") and "/dev1/" in topic
            for key in ("name", "unique_id", "state_topic", "device", "availability_topic", "value_template"):
                assert key in cfg, (topic, key)
            assert cfg["availability_topic"] == "edge/dev1/status"
            assert cfg["payload_available"] == "online" and cfg["device"]["identifiers"] == ["edge-agent-dev1"]
            assert cfg["device"]["name"] == "Front door"
        unique = [c["unique_id"] for c in first.values()]
        assert len(unique) == len(set(unique))
        assert any(c.get("device_class") == "temperature" for c in first.values())
        assert any(c["state_topic"] == "edge/dev1/results/digits" for c in first.values())
        n = len(sub.messages())
        sub.publish("homeassistant/status", b"online")  # Home Assistant restarted: announce again
        sub.wait_for(lambda m: m.topic.endswith("/config"), count=n + len(first), timeout=10)
    finally:
        assert stop(proc) == 0


def image_b64(name: str = "digit_7.png") -> str:
    return base64.b64encode((INPUTS / name).read_bytes()).decode()


def test_predictions_on_request_mqtt5(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    config = agent_config(tmp_path, broker.url, rate=1.0, mqtt_extra="[mqtt.predict]\nrate = 2\nburst = 3\n")
    client = mqtt_client(broker, "edge/dev1/answers/#")
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        watcher = mqtt_client(broker, "edge/dev1/status")
        watcher.wait_for(lambda m: payload(m)["state"] == "online", timeout=30)

        def ask(body: dict | bytes, corr: bytes) -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "edge/dev1/answers/me"
            props.CorrelationData = corr
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            client.publish("edge/dev1/predict", data, properties=props)

        ask({"id": "q1", "image": image_b64("digit_7.png")}, b"c-1")
        [reply] = client.wait_for("edge/dev1/answers/me", timeout=15)
        body = payload(reply)
        assert body["ok"] and body["id"] == "q1" and body["result"]["label"] == "7"
        assert reply.properties.CorrelationData == b"c-1"
        ask(b"{not json", b"c-2")
        ask({"image": "%%%"}, b"c-3")
        replies = client.wait_for("edge/dev1/answers/me", count=3, timeout=15)
        errors = {r.properties.CorrelationData: payload(r) for r in replies[1:]}
        assert not errors[b"c-2"]["ok"] and "not valid JSON" in errors[b"c-2"]["error"]
        assert not errors[b"c-3"]["ok"] and "base64" in errors[b"c-3"]["error"]
        # a burst over the rate limit gets error replies, not silence and not a crash
        for i in range(8):
            ask({"image": image_b64()}, f"b-{i}".encode())
        burst = client.wait_for(lambda m: m.properties.CorrelationData.startswith(b"b-"), count=8, timeout=20)
        assert any("rate limited" in (payload(m).get("error") or "") for m in burst)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


def test_predictions_on_request_mqtt311(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    import paho.mqtt.client as mqtt

    config = agent_config(tmp_path, broker.url, rate=1.0, mqtt_extra='protocol = "3.1.1"\n')
    client = mqtt_client(broker, "edge/dev1/#", protocol=mqtt.MQTTv311)
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        client.wait_for(lambda m: m.topic == "edge/dev1/status" and payload(m)["state"] == "online", timeout=30)
        request = {"image": image_b64("digit_3.png"), "reply_to": "edge/dev1/predict/mine", "correlation": "x9"}
        client.publish("edge/dev1/predict", json.dumps(request).encode())
        [reply] = client.wait_for("edge/dev1/predict/mine", timeout=15)
        body = payload(reply)
        assert body["ok"] and body["result"]["label"] == "3" and body["correlation"] == "x9"
        # a reply topic outside the device's prefix is refused; the error goes to the default reply topic
        client.publish("edge/dev1/predict", json.dumps(request | {"reply_to": "edge/dev2/steal"}).encode())
        [err] = client.wait_for("edge/dev1/predict/reply", timeout=15)
        assert not payload(err)["ok"] and "not allowed" in payload(err)["error"]
    finally:
        assert stop(proc) == 0


FUZZ_TOPICS = ["edge/dev1/predict", "edge/dev1/cmd/restart", "homeassistant/status", "edge/dev1/predict/x"]


def fuzz_payloads(rng: random.Random, n: int) -> list[bytes]:
    image = image_b64()
    samples: list[bytes] = [
        b"",
        b"\x00" * 10,
        b"\xff\xfe\xfd",
        b"null",
        b"[]",
        b'"string"',
        b"1e999",
        b'{"image": null}',
        b'{"tensor": {"dtype": "float32", "shape": [1, 32, 32, 1], "data": "AAAA"}}',
        b'{"tensor": {"dtype": "float32", "shape": [1048576, 1048576], "data": ""}}',
        b'{"tensors": {"a": {"dtype": "int8", "shape": [-1], "data": ""}}}',
        b'{"image": "' + image.encode() + b'", "pipeline": "nope"}',
        b'{"image": "' + image[:50].encode() + b'"}',
        b'{"v": 99, "image": "AAAA"}',
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"image": image, "extra": "x" * 70000}).encode(),
        b"online",
        b"x" * 2_000_000,
    ]
    out = list(samples)
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(1, 2000)))
        elif kind == 1:
            out.append(json.dumps({rng.choice(["image", "tensor", "id", "reply_to", "v"]): rng.random()}).encode())
        elif kind == 2:
            base = bytearray(rng.choice(samples[:14]))
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
            out.append(bytes(base))
        else:
            out.append(json.dumps({"image": base64.b64encode(rng.randbytes(rng.randrange(1, 500))).decode()}).encode())
    return out


def test_fuzzed_inbound_payloads_leave_the_daemon_running(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    n = 3000 if os.environ.get("SLOW") else 300
    config = agent_config(tmp_path, broker.url, rate=5.0, mqtt_extra="[mqtt.predict]\nrate = 1000\nburst = 1000\n")
    client = mqtt_client(broker, "edge/dev1/#")
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        client.wait_for(lambda m: m.topic == "edge/dev1/status" and payload(m)["state"] == "online", timeout=30)
        rng = random.Random(1234)
        payloads = fuzz_payloads(rng, n)
        agent = psutil.Process(proc.pid)
        for p in payloads[: n // 5]:
            client.client.publish(rng.choice(FUZZ_TOPICS), p, qos=0)
        time.sleep(2.0)
        rss_warm = agent.memory_info().rss
        for p in payloads[n // 5 :]:
            client.client.publish(rng.choice(FUZZ_TOPICS), p, qos=0)
        time.sleep(3.0)
        rss_end = agent.memory_info().rss
        assert proc.poll() is None
        before = len([m for m in client.messages() if "/results/" in m.topic])
        assert wait_until(
            lambda: len([m for m in client.messages() if "/results/" in m.topic]) > before + 3, timeout=15
        )
        growth_mb = (rss_end - rss_warm) / 2**20
        assert growth_mb < 40, f"RSS grew {growth_mb:.1f} MB over {n} fuzzed messages"
    finally:
        assert stop(proc) == 0
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def test_check_probes_the_broker_with_the_device_credentials(tmp_path: Path, acl_broker: Broker) -> None:
    from tests.conftest import run_cli

    good = f"mqtt://dev1:{ACL_PASSWORDS['dev1']}@127.0.0.1:{acl_broker.port}"
    proc = run_cli("check", "--broker", good, "--device-id", "dev1", "--json")
    report = json.loads(proc.stdout)
    [probe] = [c for c in report["checks"] if c["what"] == "mqtt broker"]
    assert probe["ok"] and "accepts this device" in probe["detail"]
    proc = run_cli("check", "--broker", f"mqtt://dev1:nope@127.0.0.1:{acl_broker.port}", "--json")
    assert proc.returncode == 1
    [probe] = [c for c in json.loads(proc.stdout)["checks"] if c["what"] == "mqtt broker"]
    assert not probe["ok"] and "refused" in probe["detail"] and "Not authorized" in probe["detail"]


def test_unsigned_commands_are_refused_with_an_ack(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    config = agent_config(tmp_path, broker.url, rate=2.0)
    client = mqtt_client(broker, "edge/dev1/#")
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        client.wait_for(lambda m: m.topic == "edge/dev1/status" and payload(m)["state"] == "online", timeout=30)
        client.publish("edge/dev1/cmd/restart", json.dumps({"id": "c1"}).encode())
        client.publish("edge/dev1/cmd/set", b"\xff not json")
        acks = client.wait_for("edge/dev1/ack", count=2, timeout=10)
        first, second = (payload(a) for a in acks)
        assert (
            first["command"] == "restart" and first["id"] == "c1" and not first["ok"] and "trust root" in first["error"]
        )
        assert second["command"] == "set" and not second["ok"] and "UTF-8" in second["error"]
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


def test_tls_with_ca_only_and_wrong_ca_refused(tmp_path: Path, tls_broker: Broker, tls_certs, mqtt_client) -> None:
    sub = mqtt_client(tls_broker, "edge/#")
    good = agent_config(
        tmp_path, f"mqtts://localhost:{tls_broker.tls_port}", mqtt_extra=f'[mqtt.tls]\nca = "{tls_certs.ca}"\n'
    )
    proc = start_agent(["run", "--config", str(good)], output_dir=tmp_path)
    try:
        sub.wait_for("edge/dev1/results/digits", count=5, timeout=30)
    finally:
        assert stop(proc) == 0
    # the system CAs do not know the test CA: the connection must fail, inference must go on
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = agent_config(bad_dir, f"mqtts://localhost:{tls_broker.tls_port}", "dev9")
    proc = start_agent(["run", "--config", str(bad), "--results", "json"], output_dir=bad_dir)
    try:
        time.sleep(4.0)
        assert proc.poll() is None
        assert not [m for m in sub.messages() if m.topic.startswith("edge/dev9/")]
    finally:
        assert stop(proc) == 0
    log = (bad_dir / "stderr.txt").read_text()
    assert "TLS handshake failed: self-signed certificate" in log  # the reason, not only "unreachable"
    assert "Client is not connected" not in log  # no unstructured library chatter
