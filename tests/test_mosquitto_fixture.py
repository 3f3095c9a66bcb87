"""The Mosquitto test fixtures work, and pin down what Mosquitto 2.0 + paho-mqtt 2.x do at the edges.

The agent relies on these facts (see tests/mosquitto.py's docstring): ACL-denied and oversize publishes are
never delivered; how the publisher learns of it depends on the protocol version.
"""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as mqtt
import pytest

from tests import mosquitto
from tests.mosquitto import (
    ACL_PASSWORDS,
    Broker,
    BrokerError,
    MqttConnectError,
    make_certs,
    mosquitto_password_hash,
)

V5, V311 = mqtt.MQTTv5, mqtt.MQTTv311
NOT_AUTHORIZED = 0x87
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK when nobody subscribes: a success code (< 0x80)


def accepted(reason_code) -> bool:
    return not reason_code.is_failure


def creds(user: str) -> dict[str, str]:
    return {"username": user, "password": ACL_PASSWORDS[user]}


# ----------------------------------------------------------------------------------------------- plain


def test_plain_round_trip(broker, mqtt_client):
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.port != 1883 and broker.running
    sub = mqtt_client(broker, "edge/+/results")
    pub = mqtt_client(broker, None, protocol=V311)
    assert accepted(pub.publish("edge/dev1/results", b'{"n": 1}'))
    assert accepted(pub.publish("edge/dev1/other", b"x"))
    [msg] = sub.wait_for("edge/dev1/results")
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("edge/dev1/results", b'{"n": 1}', 1, False)
    sub.assert_no_message("edge/dev1/other", within=0.2)
    assert [m.topic for m in sub.messages()] == ["edge/dev1/results"]
    sub.clear()
    assert sub.messages() == []


def test_start_failure_raises_with_log(tmp_path, mosquitto_bin):
    broker = Broker(tmp_path / "bad", binary=mosquitto_bin, extra_conf="no_such_option 1")
    with pytest.raises(BrokerError, match="no_such_option"):
        broker.start()
    assert not broker.running


def test_qos0_publish_while_disconnected_is_dropped_by_paho(broker, mqtt_client):
    client = mqtt_client(broker, None)
    broker.stop()
    deadline = time.monotonic() + 5
    while client.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(ConnectionError, match="QoS 0"):
        client.publish("edge/dev1/x", b"lost", qos=0)


# ----------------------------------------------------------------------------------------------- TLS


def test_tls_with_ca_verification(tls_broker, tls_certs, mqtt_client):
    assert tls_broker.tls_url == f"mqtts://localhost:{tls_broker.tls_port}"
    sub = mqtt_client(tls_broker, "edge/#")  # plain listener still there
    pub = mqtt_client(tls_broker, None, tls=True, ca_certs=tls_certs.ca)
    assert accepted(pub.publish("edge/dev1/tls", b"secret"))
    sub.wait_for("edge/dev1/tls")


def test_tls_without_the_ca_fails(tls_broker, mqtt_client):
    with pytest.raises(MqttConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        mqtt_client(tls_broker, None, tls=True)  # system CAs only


def test_mtls_accepts_client_cert_and_uses_cn_as_username(mtls_broker, tls_certs, mqtt_client):
    cert, key = tls_certs.clients["dev1"]
    client = mqtt_client(mtls_broker, "edge/dev1/#", tls=True, ca_certs=tls_certs.ca, certfile=cert, keyfile=key)
    assert accepted(client.publish("edge/dev1/hello", b"hi"))
    client.wait_for("edge/dev1/hello")
    mtls_broker.wait_for_log(f"as {client.client_id} (p5, c1, k10, u'dev1')")


def test_mtls_refuses_missing_or_foreign_cert(mtls_broker, tls_certs, tmp_path, mqtt_client):
    with pytest.raises(MqttConnectError):
        mqtt_client(mtls_broker, None, tls=True, ca_certs=tls_certs.ca)
    foreign = make_certs(tmp_path / "other-ca", ["dev1"])
    cert, key = foreign.clients["dev1"]
    with pytest.raises(MqttConnectError):
        mqtt_client(mtls_broker, None, tls=True, ca_certs=tls_certs.ca, certfile=cert, keyfile=key)


# ----------------------------------------------------------------------------------------------- auth + ACL


@pytest.mark.parametrize("protocol", [V5, V311])
def test_wrong_password_refused(acl_broker, mqtt_client, protocol):
    for username, password in [("dev1", "wrong"), ("nobody", "x"), (None, None)]:
        with pytest.raises(MqttConnectError) as err:
            mqtt_client(acl_broker, None, username=username, password=password, protocol=protocol)
        # Mosquitto 2.0 answers 0x87 Not authorized (3.1.1: return code 5), not 0x86 Bad user name or password
        assert err.value.reason_code == NOT_AUTHORIZED, err.value.reason_code
    mqtt_client(acl_broker, None, **creds("dev1"), protocol=protocol)


@pytest.mark.parametrize("protocol", [V5, V311])
def test_acl_confines_devices(acl_broker, mqtt_client, protocol):
    fleet = mqtt_client(acl_broker, ["edge/#", "homeassistant/#"], **creds("fleet"))
    # Subscribing outside the ACL is granted (no 0x87 in the SUBACK); messages are filtered at delivery.
    dev1 = mqtt_client(acl_broker, ["edge/#", "homeassistant/#"], **creds("dev1"), protocol=protocol)
    assert [int(rc.value) for rc in dev1.suback_codes] == [1, 1]
    dev2 = mqtt_client(acl_broker, None, **creds("dev2"), protocol=protocol)

    assert accepted(dev1.publish("edge/dev1/x", b"mine"))
    assert accepted(dev1.publish("homeassistant/sensor/dev1/fps/config", b"{}"))
    denied = dev1.publish("edge/dev2/x", b"not mine")
    denied_ha = dev1.publish("homeassistant/sensor/dev2/fps/config", b"{}")
    if protocol == V5:  # PUBACK carries the refusal
        assert denied == NOT_AUTHORIZED and denied_ha == NOT_AUTHORIZED
    else:  # a plain PUBACK: looks like success
        assert denied == 0 and denied_ha == 0
    assert accepted(dev1.publish("edge/dev2/q0", b"not mine", qos=0))  # QoS 0: nothing comes back
    assert accepted(dev2.publish("edge/dev2/y", b"dev2's"))
    acl_broker.wait_for_log("Denied PUBLISH from " + dev1.client_id)

    fleet.wait_for("edge/dev2/y")
    seen = {m.topic for m in fleet.messages()}
    assert seen == {"edge/dev1/x", "homeassistant/sensor/dev1/fps/config", "edge/dev2/y"}
    assert dev1.connected  # a denied publish does not cost the connection
    # dev1 only reads its own tree, and discovery is write-only for devices
    assert {m.topic for m in dev1.messages()} == {"edge/dev1/x"}


def test_password_file_fallback_hash(tmp_path, mosquitto_bin, monkeypatch, mqtt_client):
    monkeypatch.setattr(mosquitto, "find_mosquitto_passwd", lambda: None)
    broker = Broker(tmp_path / "b", binary=mosquitto_bin, passwords={"dev1": "pw"})
    with broker:
        assert (tmp_path / "b" / "passwd").read_text().startswith("dev1:$7$101$")
        mqtt_client(broker, None, username="dev1", password="pw")
        with pytest.raises(MqttConnectError):
            mqtt_client(broker, None, username="dev1", password="pw2")
    assert mosquitto_password_hash("x", salt=b"\0" * 12).startswith("$7$101$AAAAAAAAAAAAAAAA$")


# ----------------------------------------------------------------------------------------------- persistence


def test_kill_then_restart_same_port_keeps_persistent_session(broker, mqtt_client):
    sub = mqtt_client(broker, "edge/dev1/#", client_id="fleet-persist", clean_start=False, session_expiry=300)
    assert sub.session_present is False
    broker.wait_for_save()  # what a crash keeps is what was saved (autosave_interval 1)
    port, pid = broker.port, broker.pid

    broker.kill()
    broker.restart()
    assert (broker.port, broker.running) == (port, True) and broker.pid != pid
    pub = mqtt_client(broker, None)
    assert accepted(pub.publish("edge/dev1/after", b"1"))  # queued for the session if sub is not back yet
    [msg] = sub.wait_for("edge/dev1/after", timeout=10)
    assert msg.payload == b"1"
    assert len(sub.connects) >= 2 and sub.session_present is True  # resumed, not re-subscribed


def test_retained_survives_graceful_restart(broker, mqtt_client):
    pub = mqtt_client(broker, None)
    assert accepted(pub.publish("edge/dev1/status", b"online", retain=True))
    broker.stop()
    assert not broker.running
    with socket.socket() as s:  # the port is free while the broker is down
        assert s.connect_ex((broker.host, broker.port)) != 0
    broker.restart()
    late = mqtt_client(broker, "edge/+/status")
    [msg] = late.wait_for("edge/dev1/status")
    assert (msg.payload, msg.retain) == (b"online", True)


def test_restart_without_persistence_forgets(broker_factory, mqtt_client):
    broker = broker_factory(persistence=False)
    assert mqtt_client(broker, None).publish("edge/dev1/status", b"online", retain=True) == NO_MATCHING_SUBSCRIBERS
    broker.restart()
    mqtt_client(broker, "edge/#").assert_no_message(within=0.3)


# ----------------------------------------------------------------------------------------------- size limits


def test_message_size_limit(broker_factory, mqtt_client):
    broker = broker_factory(message_size_limit=1024)
    sub = mqtt_client(broker, "edge/#")
    big = b"x" * 2048

    # MQTT 3.1.1, QoS 1: a plain PUBACK; QoS 0: nothing. Both look like success to the publisher.
    v3 = mqtt_client(broker, None, protocol=V311)
    assert accepted(v3.publish("edge/dev1/big-v3", big))
    assert accepted(v3.publish("edge/dev1/big-v3-q0", big, qos=0))
    # MQTT 5, QoS 0: silently dropped too.
    v5 = mqtt_client(broker, None)
    assert accepted(v5.publish("edge/dev1/big-v5-q0", big, qos=0))
    assert accepted(v5.publish("edge/dev1/small", b"x" * 1024))  # the limit is inclusive

    # MQTT 5, QoS 1: Mosquitto answers PUBACK 0x95 (Packet too large), a code the spec does not allow in a
    # PUBACK; paho 2.x calls the packet malformed, drops the connection, reconnects and resends the message
    # forever. A client must never send a message over the broker's limit.
    poison = mqtt_client(broker, None)
    with pytest.raises(TimeoutError):
        poison.publish("edge/dev1/big-v5", big, timeout=1.0)
    assert len(poison.connects) >= 2, poison.connects
    assert "(m1, rc149)" in broker.wait_for_log("Sending PUBACK to " + poison.client_id)
    poison.close()

    sub.wait_for("edge/dev1/small")
    sub.assert_no_message(lambda m: "big" in m.topic, within=0.2)
    assert broker.log_text().count("Dropped too large PUBLISH") >= 4


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_mosquitto_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setattr(mosquitto.shutil, "which", lambda name: None)
    monkeypatch.setattr(mosquitto.os, "access", lambda path, mode: False)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install mosquitto"):
        mosquitto.find_mosquitto()


def test_max_queued_messages_drops_beyond_the_limit_for_offline_sessions(broker_factory, mqtt_client):
    broker = broker_factory(max_queued_messages=5)
    session = {"client_id": "fleet-offline", "clean_start": False, "session_expiry": 300}
    mqtt_client(broker, "edge/dev1/#", **session).close()  # subscribed, then offline; the session stays
    pub = mqtt_client(broker, None)
    codes = [pub.publish(f"edge/dev1/n{i}", str(i).encode()) for i in range(10)]
    assert all(rc == 0 for rc in codes), codes  # the publisher is not told about the overflow
    back = mqtt_client(broker, "edge/dev1/#", **session)
    assert back.session_present is True
    back.wait_for("edge/dev1/#", count=5)
    back.assert_no_message("edge/dev1/n5", within=0.3)
    assert [m.payload for m in back.messages()] == [b"0", b"1", b"2", b"3", b"4"]
    broker.wait_for_log("Outgoing messages are being dropped for client fleet-offline")
