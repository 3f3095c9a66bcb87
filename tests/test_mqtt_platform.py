"""Topic prefix validation and the per-platform profiles (``[mqtt] platform``): pure checks, config errors, and an
Azure-profile agent against a real Mosquitto (no subscriptions, nothing retained)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.protocol import (
    AWS_MAX_TOPIC_SLASHES,
    DEVICE_TOPICS,
    PLATFORMS,
    Topics,
    deepest_device_topic,
    topic_prefix_problem,
)
from agent.protocol import update as upd
from tests.daemon_helpers import start_agent, stop
from tests.mosquitto import Broker
from tests.test_mqtt import agent_config

# ---- the topic registry --------------------------------------------------------------------------------------------


def registry_form(topic: str, prefix: str) -> str:
    """``edge/x/results/p`` -> ``results/<pipeline>``: a concrete topic in the registry's notation."""
    suffix = topic.removeprefix(prefix)
    suffix = re.sub(r"^(results|update/state)/P$", r"\1/<pipeline>", suffix)
    return re.sub(r"^cmd/(C|\+)$", "cmd/<name>", suffix)


def test_registry_holds_every_topic_the_agent_builds() -> None:
    topics = Topics.for_device("x")
    built = [
        topics.status,
        topics.telemetry,
        topics.events,
        topics.results("P"),
        topics.ack,
        topics.predict,
        topics.predict_reply,
        topics.command("C"),
        topics.commands,
        upd.deploy_topic(topics),
        upd.fetch_topic(topics),
        upd.file_topic(topics),
        upd.chunk_request_topic(topics),
        upd.update_status_topic(topics),
        upd.update_state_topic(topics, "P"),
    ]
    assert {registry_form(t, topics.prefix) for t in built} == set(DEVICE_TOPICS)
    assert deepest_device_topic("edge/x/") == "edge/x/update/state/<pipeline>"


# ---- prefix validation (pure) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "platform", "needle"),
    [
        ("$aws/things/{device_id}/", "aws", "reserved by AWS IoT Core"),
        ("$aws/things/{device_id}/", "generic", "reserved by AWS IoT Core"),
        ("$SYS/{device_id}/", "generic", "'$' topics"),
        ("edge/+/{device_id}/", "generic", "wildcard"),
        ("edge/#", "generic", "wildcard"),
        ("edge/{device_id}", "generic", "does not end with '/'"),
        ("edge//{device_id}/", "generic", "empty topic level"),
        ("/edge/{device_id}/", "generic", "empty topic level"),
        ("edge/{device}/", "generic", "braces"),
        ("a/b/c/d/e/f/{device_id}/", "aws", "too deep for AWS IoT Core"),
        ("a/b/c/d/e/{device_id}/", "aws", "too deep"),
        ("edge/{device_id}/", "azure", "not an Azure IoT Hub"),
        ("devices/{device_id}/messages/", "azure", "not an Azure IoT Hub"),
    ],
)
def test_bad_prefixes_are_refused_with_a_fix(template: str, platform: str, needle: str) -> None:
    problem = topic_prefix_problem(template, platform)
    assert problem is not None and needle in problem[0] and problem[1]


@pytest.mark.parametrize(
    ("template", "platform"),
    [
        ("edge/{device_id}/", "generic"),
        ("things/{device_id}/", "aws"),
        ("a/b/c/d/{device_id}/", "aws"),  # 5 levels: update/state/<pipeline> has 7 '/' exactly
        ("a/b/c/d/e/f/{device_id}/", "generic"),  # only AWS limits the depth
        ("devices/{device_id}/messages/events/", "azure"),
        ("devices/cam1/messages/events/", "azure"),
    ],
)
def test_good_prefixes_pass(template: str, platform: str) -> None:
    assert topic_prefix_problem(template, platform) is None


def test_aws_depth_limit_is_exact() -> None:
    """The deepest topic under the longest accepted prefix has exactly AWS's limit of '/'; one level more fails."""
    ok = "a/b/c/d/{device_id}/"
    assert deepest_device_topic(ok.format(device_id="x")).count("/") == AWS_MAX_TOPIC_SLASHES
    assert topic_prefix_problem(ok, "aws") is None
    assert topic_prefix_problem("z/" + ok, "aws") is not None


def test_platform_profiles() -> None:
    assert PLATFORMS["generic"].subscriptions and PLATFORMS["generic"].retain and PLATFORMS["generic"].discovery
    assert PLATFORMS["aws"].retain and PLATFORMS["aws"].max_topic_slashes == 7
    azure = PLATFORMS["azure"]
    assert not azure.subscriptions and not azure.retain and not azure.discovery


# ---- config errors: one line naming the key and the fix --------------------------------------------------------------

BASE = {
    "device_id": "cam1",
    "sources": {"s": {"type": "synthetic"}},
    "pipelines": {"p": {"source": "s", "model": "sample:digits-classifier-tflite"}},
}


@pytest.mark.parametrize(
    ("extra", "key", "fix"),
    [
        ({"mqtt": {"platform": "aws", "topic_prefix": "$aws/things/{device_id}/"}}, "mqtt.topic_prefix", "things/"),
        ({"mqtt": {"platform": "aws", "topic_prefix": "a/b/c/d/e/f/{device_id}/"}}, "mqtt.topic_prefix", "shorten"),
        ({"mqtt": {"topic_prefix": "edge/#/"}}, "mqtt.topic_prefix", "remove"),
        ({"mqtt": {"platform": "azure", "topic_prefix": "edge/{device_id}/"}}, "mqtt.topic_prefix", "devices/"),
        ({"mqtt": {"platform": "azure", "topic_prefix": "devices/cam2/messages/events/"}}, "", "devices/{device_id}"),
        ({"mqtt": {"platform": "azure", "home_assistant": {"enabled": True}}}, "mqtt.home_assistant.enabled", "false"),
        ({"mqtt": {"platform": "azure", "predict": {"enabled": True}}}, "mqtt.predict.enabled", "false"),
        (
            {"mqtt": {"platform": "aws", "home_assistant": {"enabled": True, "discovery_prefix": "a/b/c/d/e"}}},
            "mqtt.home_assistant.discovery_prefix",
            "at most 3 '/'",
        ),
        (
            {"mqtt": {"platform": "azure"}, "update": {"enabled": True, "trust_root": "r.json"}},
            "update.enabled",
            "false",
        ),
        ({"mqtt": {"platform": "gcp"}}, "mqtt.platform", "docs/config.md"),
    ],
)
def test_config_errors_name_key_and_fix(extra: dict, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(BASE | extra)
    text = str(exc.value)
    assert "\n" not in text and "(fix: " in text
    assert not key or f"key {key!r}" in text or text.startswith(f"agent.toml: {key}"), text
    assert fix in text.split("(fix: ", 1)[1], text


def test_a_prefix_without_its_last_slash_gets_one_as_before() -> None:
    config = parse_config(BASE | {"mqtt": {"topic_prefix": "edge/{device_id}"}})
    assert config.mqtt is not None and config.mqtt.topic_prefix == "edge/{device_id}/"


def test_azure_profile_defaults_its_prefix_and_turns_predict_off_quietly() -> None:
    config = parse_config(BASE | {"mqtt": {"platform": "azure"}})
    assert config.mqtt is not None
    assert config.mqtt.topic_prefix == "devices/{device_id}/messages/events/"
    assert parse_config(BASE | {"mqtt": {}}).mqtt.platform == "generic"  # type: ignore[union-attr]


# ---- an Azure-profile agent against a real broker ------------------------------------------------------------------


def subscriptions_of(broker: Broker, client_id: str) -> list[str]:
    """Topic filters ``client_id`` subscribed to, from Mosquitto's log (``log_type all``)."""
    filters, current = [], None
    for line in broker.log_text().splitlines():
        m = re.search(r"Received SUBSCRIBE from (\S+)", line)
        if m:
            current = m[1]
            continue
        m = re.search(r":\s+(\S+) \(QoS \d\)$", line)
        if m and current == client_id:
            filters.append(m[1])
        elif "SUBSCRIBE" not in line and not m:
            current = None
    return filters


def test_azure_agent_subscribes_to_nothing_and_retains_nothing(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    prefix = "devices/dev1/messages/events/"
    sub = mqtt_client(broker, "#")
    # the generic profile for contrast: subscriptions are logged, status is retained
    (tmp_path / "g").mkdir()
    generic = agent_config(tmp_path / "g", broker.url, device_id="dev2")
    proc = start_agent(["run", "--config", str(generic)], output_dir=tmp_path / "g")
    try:
        sub.wait_for("edge/dev2/results/digits", count=2, timeout=30)
    finally:
        assert stop(proc) == 0
    assert {"edge/dev2/predict", "edge/dev2/cmd/+"} <= set(subscriptions_of(broker, "dev2"))

    (tmp_path / "a").mkdir()
    config = agent_config(tmp_path / "a", broker.url, mqtt_extra='platform = "azure"\n')
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path / "a")
    try:
        sub.wait_for(prefix + "results/digits", count=3, timeout=30)
        statuses = sub.wait_for(prefix + "status", timeout=30)
        assert json.loads(statuses[0].payload)["state"] == "online" and not statuses[0].retain
        # a subscriber arriving now finds no retained status of the Azure device (the generic one's is there)
        late = mqtt_client(broker, ["devices/#", "edge/dev2/status"])
        late.wait_for("edge/dev2/status", timeout=10)
        time.sleep(0.5)
        assert not [m for m in late.messages() if m.retain and m.topic.startswith("devices/")]
    finally:
        assert stop(proc) == 0
    assert subscriptions_of(broker, "dev1") == [], broker.log_tail(60)
    assert "dev1" in broker.log_text()  # it did connect (the log names it)
