"""Home Assistant MQTT discovery: retained configs so each device appears with its sensors.

Follows the current Home Assistant MQTT discovery documentation: each config names its entity with
``default_entity_id`` (``<component>.<slug>``, HA 2025.10 and later; ``object_id`` is still sent for older HA,
which HA 2026.4 and later ignore), carries an ``origin`` block (the software that sent it) and a ``device`` block.
Availability follows the device's retained ``status`` topic (``online``/``offline``, the LWT). An entity is
removed by an empty retained payload on its config topic (``stale``: what a reload no longer announces).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.protocol import discovery_topic

ORIGIN_NAME = "edge-agent"

if TYPE_CHECKING:
    from agent.mqtt.service import MqttService


def _device(service: MqttService) -> dict[str, Any]:
    ha = service.mqtt.home_assistant
    return {
        "identifiers": [f"edge-agent-{service.device_id}"],
        "name": ha.name or service.device_id,
        "manufacturer": "edge-agent",
        "model": getattr(service.daemon.profile, "name", None) or "edge-agent device",
        "sw_version": __version__,
    }


def _origin() -> dict[str, Any]:
    """``origin``: ``name`` is required by HA; ``support_url`` is optional and left out (no public project URL)."""
    return {"name": ORIGIN_NAME, "sw_version": __version__}


def entity_slug(text: str) -> str:
    """Home Assistant's object-id form: lower case letters, digits and single underscores."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", text.lower())).strip("_") or "unnamed"


def stale(previous: set[str] | list[str], current: set[str] | list[str]) -> list[str]:
    """Config topics announced before and not now: each gets an empty retained payload (HA removes the entity)."""
    return sorted(set(previous) - set(current))


def _availability(service: MqttService) -> dict[str, Any]:
    return {
        "availability_topic": service.topics.status,
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }


def configs(service: MqttService) -> list[tuple[str, bytes]]:
    """(topic, payload) for every discovery config of this device."""
    prefix = service.mqtt.home_assistant.discovery_prefix
    node = service.device_id
    device = _device(service)
    origin = _origin()
    avail = _availability(service)
    telemetry = service.topics.telemetry
    out: list[tuple[str, dict[str, Any], str]] = []

    def sensor(object_id: str, name: str, state_topic: str, template: str, **extra: Any) -> None:
        out.append(
            (
                "sensor",
                {
                    "name": name,
                    "unique_id": f"{node}_{object_id}",
                    "default_entity_id": f"sensor.{entity_slug(f'{node}_{object_id}')}",
                    "object_id": entity_slug(f"{node}_{object_id}"),  # HA before 2025.10
                    "state_topic": state_topic,
                    "value_template": template,
                    "device": device,
                    "origin": origin,
                    **avail,
                    **extra,
                },
                object_id,
            )
        )

    sensor(
        "temperature",
        "Temperature",
        telemetry,
        "{{ value_json.system.temperature_c }}",
        device_class="temperature",
        unit_of_measurement="°C",
        state_class="measurement",
    )
    sensor(
        "cpu",
        "CPU",
        telemetry,
        "{{ value_json.system.cpu_percent }}",
        unit_of_measurement="%",
        state_class="measurement",
    )
    sensor(
        "outbox",
        "Outbox depth",
        telemetry,
        "{{ value_json.outbox.rows }}",
        state_class="measurement",
        entity_category="diagnostic",
    )
    for name, pipe in service.config.pipelines.items():
        key = f'value_json.pipelines["{name}"]'
        sensor(
            f"{name}_fps",
            f"{name} fps",
            telemetry,
            f"{{{{ {key}.fps_processed }}}}",
            unit_of_measurement="fps",
            state_class="measurement",
        )
        sensor(
            f"{name}_latency",
            f"{name} latency p95",
            telemetry,
            f"{{{{ {key}.latency_ms.p95 }}}}",
            unit_of_measurement="ms",
            device_class="duration",
            state_class="measurement",
        )
        sensor(
            f"{name}_model",
            f"{name} model version",
            telemetry,
            f"{{{{ {key}.model.version }}}}",
            entity_category="diagnostic",
        )
        results = service.topics.results(name)
        pipeline = service.daemon.pipelines.get(name)
        task = pipeline.predictor.bundle.task if pipeline else None
        if task == "anomaly":
            out.append(
                (
                    "binary_sensor",
                    {
                        "name": f"{name} anomaly",
                        "unique_id": f"{node}_{name}_anomaly",
                        "default_entity_id": f"binary_sensor.{entity_slug(f'{node}_{name}_anomaly')}",
                        "object_id": entity_slug(f"{node}_{name}_anomaly"),  # HA before 2025.10
                        "state_topic": results,
                        "value_template": "{{ 'ON' if value_json.anomaly else 'OFF' }}",
                        "payload_on": "ON",
                        "payload_off": "OFF",
                        "device_class": "problem",
                        "device": device,
                        "origin": origin,
                        **avail,
                    },
                    f"{name}_anomaly",
                )
            )
            sensor(
                f"{name}_score", f"{name} anomaly score", results, "{{ value_json.score }}", state_class="measurement"
            )
        elif task == "detection":
            sensor(
                f"{name}_detections",
                f"{name} detections",
                results,
                "{{ value_json.detections | count }}",
                state_class="measurement",
            )
        else:
            sensor(
                f"{name}_result",
                f"{name} last result",
                results,
                "{{ value_json.label if value_json.label is defined else value_json.task }}",
                json_attributes_topic=results,
            )
        del pipe
    return [
        (discovery_topic(prefix, comp, node, obj), json.dumps(cfg, separators=(",", ":")).encode())
        for comp, cfg, obj in out
    ]
