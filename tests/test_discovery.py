"""Home Assistant MQTT discovery: every config the agent publishes is checked against the discovery schema of the
current Home Assistant documentation, collected from a real Mosquitto while a real agent process runs; after a
SIGHUP reload discovery is re-announced and the entities of removed pipelines are cleared."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from agent.mqtt.discovery import entity_slug, stale
from tests.conftest import INPUTS
from tests.daemon_helpers import start_agent, stop, wait_until
from tests.mosquitto import Broker

# ---- the schema (https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery, sensor, binary_sensor) -------------
#
# Per component: required keys and every key the agent may send, with the type Home Assistant accepts. Abbreviations
# are allowed by HA; the agent sends full names, so both are listed where it matters (a config using either passes).
# `default_entity_id` (HA 2025.10+) is `<component>.<object id>`; `object_id` is deprecated (ignored from 2026.4)
# and kept for older HA; the `origin` block (`o`) needs `name` (`sw_version`/`sw`, `support_url`/`url` optional).

STR, NUM, LIST, DICT = (str,), (int, float), (list,), (dict,)
COMMON: dict[str, tuple[type, ...]] = {
    "name": STR,
    "unique_id": STR,
    "uniq_id": STR,
    "default_entity_id": STR,
    "object_id": STR,
    "obj_id": STR,
    "state_topic": STR,
    "stat_t": STR,
    "value_template": STR,
    "val_tpl": STR,
    "device": DICT,
    "dev": DICT,
    "origin": DICT,
    "o": DICT,
    "availability_topic": STR,
    "avty_t": STR,
    "availability_template": STR,
    "avty_tpl": STR,
    "payload_available": STR,
    "pl_avail": STR,
    "payload_not_available": STR,
    "pl_not_avail": STR,
    "device_class": STR,
    "dev_cla": STR,
    "entity_category": STR,
    "ent_cat": STR,
    "json_attributes_topic": STR,
    "json_attr_t": STR,
    "icon": STR,
    "qos": (int,),
    "enabled_by_default": (bool,),
    "expire_after": (int,),
    "force_update": (bool,),
}
COMPONENTS: dict[str, dict[str, Any]] = {
    "sensor": {
        "keys": COMMON
        | {
            "unit_of_measurement": STR,
            "unit_of_meas": STR,
            "state_class": STR,
            "stat_cla": STR,
            "suggested_display_precision": (int,),
        },
        "device_classes": {"temperature", "duration", None},  # the ones the agent uses, of HA's list
        "state_classes": {"measurement", "total", "total_increasing", None},
    },
    "binary_sensor": {
        "keys": COMMON | {"payload_on": STR, "pl_on": STR, "payload_off": STR, "pl_off": STR, "off_delay": NUM},
        "device_classes": {"problem", None},
        "state_classes": {None},
    },
}
DEVICE_KEYS = {
    "identifiers": (list, str),
    "ids": (list, str),
    "name": STR,
    "manufacturer": STR,
    "mf": STR,
    "model": STR,
    "mdl": STR,
    "sw_version": STR,
    "sw": STR,
    "hw_version": STR,
    "hw": STR,
}
ORIGIN_KEYS = {"name": STR, "sw_version": STR, "sw": STR, "support_url": STR, "url": STR}
CONFIG_TOPIC = re.compile(
    r"^(?P<prefix>[^+#]+)/(?P<component>[a-z_]+)/(?P<node>[A-Za-z0-9_-]+)/(?P<object>[A-Za-z0-9_-]+)/config$"
)


def full(cfg: dict[str, Any], key: str, abbr: str) -> Any:
    return cfg.get(key, cfg.get(abbr))


def check_config(topic: str, cfg: Any, *, status_topic: str, agent_topics: set[str]) -> list[str]:
    """Every way ``cfg`` on ``topic`` breaks the discovery schema (empty: valid)."""
    m = CONFIG_TOPIC.match(topic)
    if not m:
        return [f"{topic}: not a discovery config topic <prefix>/<component>/<node>/<object>/config"]
    component = m["component"]
    if component not in COMPONENTS:
        return [f"{topic}: component {component!r} is not one the schema knows"]
    if not isinstance(cfg, dict):
        return [f"{topic}: payload is not a JSON object"]
    spec = COMPONENTS[component]
    problems = []
    for key, value in cfg.items():
        if key not in spec["keys"]:
            problems.append(f"{topic}: unknown key {key!r} for {component}")
        elif not isinstance(value, spec["keys"][key]) or isinstance(value, bool) != (bool in spec["keys"][key]):
            problems.append(f"{topic}: {key} has type {type(value).__name__}")
    for key, abbr in (("unique_id", "uniq_id"), ("state_topic", "stat_t"), ("device", "dev"), ("origin", "o")):
        if full(cfg, key, abbr) is None:
            problems.append(f"{topic}: {key} is required")
    entity = full(cfg, "default_entity_id", "default_entity_id")
    if not isinstance(entity, str) or not re.fullmatch(rf"{component}\.[a-z0-9_]+", entity):
        problems.append(f"{topic}: default_entity_id {entity!r} is not '{component}.<lower-case object id>'")
    object_id = full(cfg, "object_id", "obj_id")
    if object_id is not None and entity is not None and f"{component}.{object_id}" != entity:
        problems.append(f"{topic}: object_id {object_id!r} and default_entity_id {entity!r} name different entities")
    device = full(cfg, "device", "dev") or {}
    ids = full(device, "identifiers", "ids")
    if not ids or (isinstance(ids, list) and not all(isinstance(i, str) and i for i in ids)):
        problems.append(f"{topic}: device.identifiers must be a non-empty string or list of strings")
    for key, value in device.items():
        if key not in DEVICE_KEYS or not isinstance(value, DEVICE_KEYS[key]):
            problems.append(f"{topic}: device.{key} is not a device key of the right type")
    origin = full(cfg, "origin", "o") or {}
    if not isinstance(origin.get("name"), str) or not origin["name"]:
        problems.append(f"{topic}: origin.name is required")
    for key, value in origin.items():
        if key not in ORIGIN_KEYS or not isinstance(value, ORIGIN_KEYS[key]):
            problems.append(f"{topic}: origin.{key} is not an origin key of the right type")
    if full(cfg, "device_class", "dev_cla") not in spec["device_classes"]:
        problems.append(f"{topic}: device_class {full(cfg, 'device_class', 'dev_cla')!r}")
    if full(cfg, "state_class", "stat_cla") not in spec["state_classes"]:
        problems.append(f"{topic}: state_class {full(cfg, 'state_class', 'stat_cla')!r}")
    if full(cfg, "entity_category", "ent_cat") not in ("diagnostic", "config", None):
        problems.append(f"{topic}: entity_category must be diagnostic or config")
    # availability: the device's retained status topic and the payloads the agent writes there
    if full(cfg, "availability_topic", "avty_t") != status_topic:
        problems.append(f"{topic}: availability_topic is not {status_topic}")
    if (full(cfg, "payload_available", "pl_avail"), full(cfg, "payload_not_available", "pl_not_avail")) != (
        "online",
        "offline",
    ):
        problems.append(f"{topic}: availability payloads are not online/offline")
    # topics the entity reads are ones the agent publishes on
    for key, abbr in (("state_topic", "stat_t"), ("json_attributes_topic", "json_attr_t")):
        value = full(cfg, key, abbr)
        if value is not None and value not in agent_topics:
            problems.append(f"{topic}: {key} {value!r} is not a topic the agent publishes on")
    return problems


def check_all(
    messages: dict[str, Any], *, device: str, status_topic: str, agent_topics: set[str], pipelines: set[str]
) -> None:
    problems = [
        p
        for topic, cfg in messages.items()
        for p in check_config(topic, cfg, status_topic=status_topic, agent_topics=agent_topics)
    ]
    assert not problems, "\n".join(problems)
    unique = [full(c, "unique_id", "uniq_id") for c in messages.values()]
    assert len(unique) == len(set(unique)), "unique_id repeats"
    entities = [c["default_entity_id"] for c in messages.values()]
    assert len(entities) == len(set(entities)), "default_entity_id repeats"
    assert all(f"/{device}/" in t for t in messages)
    # every pipeline has its entities, and the availability/status payloads really are what the agent sends
    for name in pipelines:
        assert any(f"/{device}/{name}_fps/" in t for t in messages), name


# ---- the schema itself ---------------------------------------------------------------------------------------------


def test_schema_refuses_what_home_assistant_refuses() -> None:
    good = {
        "name": "CPU",
        "unique_id": "cam1_cpu",
        "default_entity_id": "sensor.cam1_cpu",
        "object_id": "cam1_cpu",
        "state_topic": "edge/cam1/telemetry",
        "device": {"identifiers": ["edge-agent-cam1"], "name": "cam1"},
        "origin": {"name": "edge-agent", "sw_version": "0.1.0"},
        "availability_topic": "edge/cam1/status",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    ctx = {"status_topic": "edge/cam1/status", "agent_topics": {"edge/cam1/telemetry"}}
    topic = "homeassistant/sensor/cam1/cpu/config"
    assert check_config(topic, good, **ctx) == []
    broken = [
        {k: v for k, v in good.items() if k != "origin"},
        {k: v for k, v in good.items() if k != "default_entity_id"},
        good | {"default_entity_id": "binary_sensor.cam1_cpu"},
        good | {"default_entity_id": "sensor.Cam1-CPU"},
        good | {"object_id": "other"},
        good | {"origin": {"sw_version": "1"}},
        good | {"state_topic": "edge/cam1/elsewhere"},
        good | {"availability_topic": "edge/cam2/status"},
        good | {"payload_available": "up"},
        good | {"qos": "1"},
        good | {"made_up": 1},
        good | {"device": {"name": "x"}},
    ]
    for cfg in broken:
        assert check_config(topic, cfg, **ctx), cfg
    assert check_config("homeassistant/light/cam1/cpu/config", good, **ctx)


def test_entity_slug_and_stale() -> None:
    assert entity_slug("cam-1.lab_digits-b_fps") == "cam_1_lab_digits_b_fps"
    assert entity_slug("A__b") == "a_b"
    assert stale({"a", "b", "c"}, ["b", "d"]) == ["a", "c"]


# ---- against a real agent and Mosquitto ------------------------------------------------------------------------------

SOURCES = (
    f'[sources.digits]\ntype = "replay"\npath = "{INPUTS}/digit_*.png"\nrate = 5.0\n'
    f'[sources.vibration]\ntype = "replay"\npath = "{INPUTS}/sensor_anomalous.csv"\nrate = 50.0\n'
    f'[sources.scenes]\ntype = "replay"\npath = "{INPUTS}/scene_*.png"\nrate = 2.0\n'
)
DEFAULT_PIPELINES = {  # the embedded default's pipelines (agent.config.default_config)
    "digits": ("digits", "digits-classifier-tflite"),
    "vibration": ("vibration", "sensor-anomaly"),
}
MORE_PIPELINES = DEFAULT_PIPELINES | {
    "scenes": ("scenes", "digits-detector"),
    "digits-b": ("digits", "digits-classifier-tflite"),
}


def write_config(
    path: Path, broker: Broker, pipelines: dict[str, tuple[str, str]], *, device: str = "cam1", publish: str = ""
) -> Path:
    text = f'device_id = "{device}"\nstate_dir = "{path.parent / "state"}"\nstatus_interval = 0.5\n' + SOURCES
    for name, (source, model) in pipelines.items():
        text += f'[pipelines.{name}]\nsource = "{source}"\nmodel = "sample:{model}"\nsinks = []\n'
    text += f'[mqtt]\nbroker = "{broker.url}"\ntelemetry_interval = 1.0\nkeepalive = 5\n'
    text += '[mqtt.home_assistant]\nenabled = true\nname = "Lab camera"\n' + publish
    path.write_text(text)
    return path


def configs_now(broker: Broker, mqtt_client, expected: int, device: str = "cam1") -> dict[str, Any]:
    """What a subscriber arriving now gets for ``device``: its retained discovery configs (cleared ones, with an
    empty payload, are no longer retained), plus any the agent is still announcing; waits for ``expected``."""
    late = mqtt_client(broker, f"homeassistant/+/{device}/+/config")
    late.wait_for(lambda m: bool(m.payload), count=expected, timeout=30)
    time.sleep(0.3)  # anything beyond the expected ones arrives with the same burst
    return {m.topic: json.loads(m.payload) for m in late.messages() if m.payload}


def agent_topics(device: str, pipelines: dict[str, Any]) -> set[str]:
    prefix = f"edge/{device}/"
    return {prefix + "telemetry", prefix + "status"} | {prefix + f"results/{name}" for name in pipelines}


def expected_count(pipelines: dict[str, tuple[str, str]]) -> int:
    """3 device sensors; per pipeline fps, latency, model + 2 for anomaly (binary + score), else 1."""
    return 3 + sum(3 + (2 if model == "sensor-anomaly" else 1) for _, model in pipelines.values())


def test_discovery_payloads_follow_the_schema(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    for i, pipelines in enumerate((DEFAULT_PIPELINES, MORE_PIPELINES)):
        device = f"cam{i}"
        config = write_config(tmp_path / f"agent{i}.toml", broker, pipelines, device=device)
        status = mqtt_client(broker, f"edge/{device}/status")
        proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
        try:
            status.wait_for(lambda m: json.loads(m.payload).get("state") == "online", timeout=30)
            n = expected_count(pipelines)
            found = configs_now(broker, mqtt_client, n, device)
            assert len(found) == n, sorted(found)
            check_all(
                found,
                device=device,
                status_topic=f"edge/{device}/status",
                agent_topics=agent_topics(device, pipelines),
                pipelines=set(pipelines),
            )
            # anomaly pipelines have a problem binary sensor, detectors a detections count
            assert f"homeassistant/binary_sensor/{device}/vibration_anomaly/config" in found
            if "scenes" in pipelines:
                assert f"homeassistant/sensor/{device}/scenes_detections/config" in found
            # the state topics named are ones the agent really publishes on
            results = mqtt_client(broker, f"edge/{device}/results/#")
            for name in pipelines:
                results.wait_for(f"edge/{device}/results/{name}", timeout=30)
        finally:
            assert stop(proc) == 0
        # and the availability payloads are the ones on the status topic: the agent's own, online then offline
        states = [json.loads(m.payload)["state"] for m in status.messages() if m.payload]
        assert "online" in states and states[-1] == "offline"


def test_reload_reannounces_and_clears_removed_pipelines(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    config = write_config(tmp_path / "agent.toml", broker, MORE_PIPELINES)
    watch = mqtt_client(broker, ["homeassistant/#", "edge/cam1/status"])
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        before = configs_now(broker, mqtt_client, expected_count(MORE_PIPELINES))
        assert any("/scenes_" in t for t in before) and any("/digits-b_" in t for t in before)
        mark = len(watch.messages())
        remaining = {k: v for k, v in MORE_PIPELINES.items() if k not in ("scenes", "digits-b")}
        remaining["digits2"] = ("digits", "digits-classifier-tflite")  # and one new pipeline
        write_config(config, broker, remaining)
        os.kill(proc.pid, signal.SIGHUP)
        removed = {t for t in before if "/scenes_" in t or "/digits-b_" in t}
        assert wait_until(
            lambda: removed <= {m.topic for m in watch.messages()[mark:] if m.payload == b""}, timeout=30
        ), "the removed pipelines' entities were not cleared"
        # re-announced after the reload: every entity of the new configuration, including the new pipeline's
        assert wait_until(
            lambda: any("/digits2_fps/" in m.topic and m.payload for m in watch.messages()[mark:]), timeout=30
        )
        after = configs_now(broker, mqtt_client, expected_count(remaining))
        assert not removed & set(after), "a cleared entity is still retained"
        assert len(after) == expected_count(remaining), sorted(after)
        check_all(
            after,
            device="cam1",
            status_topic="edge/cam1/status",
            agent_topics=agent_topics("cam1", remaining),
            pipelines=set(remaining),
        )
    finally:
        assert stop(proc) == 0


def test_reload_applies_a_changed_result_policy(tmp_path: Path, broker: Broker, mqtt_client) -> None:
    """Every result at first; after SIGHUP with ``mode = "on_change"`` only label changes are published.

    The reloaded pipeline has a new name, so every result on its topic comes from after the reload.
    """
    config = write_config(tmp_path / "agent.toml", broker, {"digits": ("digits", "digits-classifier-tflite")})
    sub = mqtt_client(broker, "edge/cam1/#")
    proc = start_agent(["run", "--config", str(config)], output_dir=tmp_path)
    try:
        first = sub.wait_for("edge/cam1/results/digits", count=4, timeout=30)
        assert len({json.loads(m.payload)["label"] for m in first}) > 1  # policy "every": each digit published
        same = tmp_path / "same"  # one digit, over and over: its label never changes
        same.mkdir()
        for i in range(3):
            (same / f"d{i}.png").write_bytes((INPUTS / "digit_7.png").read_bytes())
        text = config.read_text().replace(f"{INPUTS}/digit_*.png", f"{same}/d*.png")
        config.write_text(
            text.replace("[pipelines.digits]", "[pipelines.sevens]") + '[mqtt.results]\nmode = "on_change"\n'
        )
        os.kill(proc.pid, signal.SIGHUP)

        def inferred() -> int:  # results the new pipeline made, published or not (telemetry's summary)
            return sum(
                json.loads(m.payload)["results"].get("sevens", {}).get("results", 0)
                for m in sub.messages("edge/cam1/telemetry")
            )

        assert wait_until(lambda: inferred() >= 6, timeout=30)
        new = [json.loads(m.payload) for m in sub.messages("edge/cam1/results/sevens")]
        assert [r["label"] for r in new] == ["7"], new  # the first "7" only: the new policy holds
    finally:
        assert stop(proc) == 0
