"""MQTT integration of the daemon: status, telemetry, results, events, Home Assistant discovery, predictions on request."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import structlog

from agent import __version__
from agent.config import AgentConfig, MqttConfig
from agent.mqtt import discovery
from agent.mqtt.client import MqttLink
from agent.mqtt.commands import CommandHandler
from agent.mqtt.outbox import Outbox
from agent.mqtt.outbox_policy import OutboxLimits
from agent.mqtt.predict import PredictHandler, TokenBucket
from agent.mqtt.result_policy import ResultGate
from agent.protocol import PLATFORMS, EventPayload, ModelRef, StatusPayload, Topics, encode
from agent.protocol.ids import echo_id

if TYPE_CHECKING:
    from agent.daemon import Daemon

log = structlog.get_logger(__name__)


def cpu_share(busy_before: float, total_before: float, busy_now: float, total_now: float) -> float:
    """Percent of ``total`` time spent busy between two readings (0 when no time passed)."""
    total = total_now - total_before
    return round(max(0.0, min(100.0, 100.0 * (busy_now - busy_before) / total)), 1) if total > 0 else 0.0


class CpuMeter:
    """System and own-process CPU use since the previous reading (the first: since the meter was made).

    The system figure is busy/total over all CPUs (as ``psutil.cpu_percent``); the process figure is this
    process's CPU time per wall second (100 = one core busy; as ``top``), capped at 100 x CPUs.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        times = psutil.cpu_times()
        total = sum(times)
        idle = times.idle + getattr(times, "iowait", 0.0)
        own = self._proc.cpu_times()
        return total - idle, total, own.user + own.system, time.monotonic()

    def read(self, reset: bool = True) -> dict[str, float]:
        now = self._sample()
        busy0, total0, own0, wall0 = self._last
        if reset:
            self._last = now
        wall = now[3] - wall0
        process = 100.0 * (now[2] - own0) / wall if wall > 0 else 0.0
        return {
            "system": cpu_share(busy0, total0, now[0], now[1]),
            "process": round(max(0.0, min(100.0 * self._cpus, process)), 1),
        }


class MqttService:
    """Connects a running ``Daemon`` to its broker."""

    def __init__(self, config: AgentConfig, daemon: Daemon) -> None:
        assert config.mqtt is not None
        self.config, self.mqtt, self.daemon = config, config.mqtt, daemon
        self.device_id = config.device_id
        self.topics = Topics.for_device(config.device_id, self.mqtt.topic_prefix)
        self.run_id = uuid.uuid4().hex[:12]  # with seq: (device_id, run_id, pipeline, seq) is unique across restarts
        self.outbox = self._open_outbox(self.mqtt, config)
        self.link = MqttLink(
            self.mqtt, config.device_id, self.topics, self.outbox, self.status_online, self.status_offline
        )
        self._gates: dict[str, ResultGate] = {}
        self._pub_seq: dict[str, int] = {}
        self._stop = threading.Event()
        self._telemetry: threading.Thread | None = None
        self.started_at = time.time()
        self.predict = PredictHandler(self)
        self.oversize_results = 0
        self._summary: dict[str, dict[str, Any]] = {}
        self.platform = PLATFORMS[self.mqtt.platform]
        self.commands = CommandHandler(self)
        if self.platform.subscriptions:  # Azure IoT Hub: no subscriptions outside its own topics
            self.link.subscribe(self.topics.predict, self.predict.on_message)
            self.link.subscribe(self.topics.commands, self.commands.on_message)
        self._ack_bucket = TokenBucket(10.0, 20, time.monotonic())
        self._announce_lock = threading.Lock()
        self._announced: set[str] = set()  # discovery config topics published in this run
        if self.mqtt.home_assistant.enabled and self.platform.discovery:
            self.link.subscribe(f"{self.mqtt.home_assistant.discovery_prefix}/status", self._on_ha_status)
        self.link.on_connected(self.announce)  # nothing to announce while discovery is off
        self.cpu = CpuMeter()  # from now: the first telemetry's CPU figures cover start-up (model loads, warm-up)
        self._wake = threading.Event()  # set on every (re)connect: telemetry goes out at once
        self._final_sent = False
        self.link.on_connected(self._wake.set)

    @staticmethod
    def _open_outbox(mqtt: MqttConfig, config: AgentConfig) -> Outbox:
        path = Path(mqtt.outbox.path) if mqtt.outbox.path else Path(config.state_dir) / "outbox.sqlite"
        limits = OutboxLimits(
            max_rows=mqtt.outbox.max_rows,
            max_bytes=mqtt.outbox.max_bytes,
            max_age_s=mqtt.outbox.max_age_s,
            max_payload_bytes=mqtt.max_payload_bytes,
        )
        return Outbox(path, limits, synchronous=mqtt.outbox.synchronous)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.link.start()
        self._telemetry = threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True)
        self._telemetry.start()

    def stop(self, reason: str = "shutdown") -> None:
        if reason == "shutdown":
            self.final_telemetry()
        self._stop.set()
        self._wake.set()
        self.predict.close()
        self.link.stop(reason)
        self.outbox.close()

    # ---- payloads -----------------------------------------------------------------------------

    def models(self) -> dict[str, ModelRef]:
        refs = {}
        for name, p in list(self.daemon.pipelines.items()):
            b = p.predictor.bundle
            refs[name] = ModelRef(name=b.name, version=b.version, sha256=b.sha256)
        return refs

    def status_online(self) -> bytes:
        return encode(
            StatusPayload(
                state="online",
                device_id=self.device_id,
                ts=round(time.time(), 3),
                agent_version=__version__,
                models=self.models(),
                profile=getattr(self.daemon.profile, "id", None),
                run_id=self.run_id,
            )
        )

    def status_offline(self, reason: str) -> bytes:
        return encode(StatusPayload(state="offline", device_id=self.device_id, ts=round(time.time(), 3), reason=reason))

    # ---- results and events -------------------------------------------------------------------

    def on_result(self, record: dict[str, Any]) -> None:
        """Result bus listener: apply the pipeline's publish policy, then store-and-forward."""
        name = record.get("pipeline", "")
        self._summarize(name, record)
        gate = self._gates.get(name)
        if gate is None:
            pipe_cfg = self.config.pipelines.get(name)
            policy = pipe_cfg.publish if pipe_cfg and pipe_cfg.publish else self.mqtt.results
            gate = self._gates[name] = ResultGate(policy)
        if not gate.decide(record, time.monotonic()):
            return
        self._pub_seq[name] = self._pub_seq.get(name, 0) + 1
        payload = {"v": 1, "device_id": self.device_id, "run_id": self.run_id, "pub_seq": self._pub_seq[name]} | record
        if not gate.policy.include_top:
            payload.pop("top", None)
        data = encode(payload)
        if len(data) > self.mqtt.max_payload_bytes:
            data = self._shrink(payload)
            if data is None:
                self.oversize_results += 1
                log.warning("result over the payload cap, dropped", pipeline=name, cap=self.mqtt.max_payload_bytes)
                return
        self.link.publish_durable(self.topics.results(name), data)

    def _summarize(self, pipeline: str, record: dict[str, Any]) -> None:
        """Per pipeline since the last telemetry: results, top-1 label counts, anomalies, detections."""
        s = self._summary.setdefault(pipeline, {"results": 0, "labels": {}, "anomalies": 0, "detections": 0})
        s["results"] += 1
        label = record.get("label")
        if isinstance(label, str) and (label in s["labels"] or len(s["labels"]) < 20):
            s["labels"][label] = s["labels"].get(label, 0) + 1
        if record.get("anomaly") is True:
            s["anomalies"] += 1
        if isinstance(record.get("detections"), list):
            s["detections"] += len(record["detections"])

    def results_summary(self) -> dict[str, Any]:
        """The summary since the last call (and start a new period)."""
        summary, self._summary = self._summary, {}
        return summary

    def _shrink(self, payload: dict[str, Any]) -> bytes | None:
        """Keep a result under the cap by trimming its longest lists (detections, raw values)."""
        slim = dict(payload)
        for key in ("detections", "top", "outputs"):
            if key in slim:
                slim[key] = slim[key][:10] if isinstance(slim[key], list) else {}
                slim["truncated"] = True
        data = encode(slim)
        return data if len(data) <= self.mqtt.max_payload_bytes else None

    def event(self, kind: str, level: str = "info", **detail: Any) -> None:
        payload = EventPayload(
            device_id=self.device_id, ts=round(time.time(), 3), kind=kind, level=level, detail=detail
        )
        self.link.publish_durable(self.topics.events, encode(payload), priority="critical")

    # ---- telemetry ----------------------------------------------------------------------------

    def telemetry(self, reset: bool = True) -> dict[str, Any]:
        """One telemetry payload; ``reset=False`` leaves the results-summary period running (diagnostics)."""
        snap = self.daemon.snapshot()
        proc = psutil.Process()
        state_dir = Path(self.config.state_dir)
        try:
            disk_free = psutil.disk_usage(str(state_dir if state_dir.exists() else state_dir.parent)).free / 2**20
        except OSError:
            disk_free = None
        temps = snap["thermal"]["temperatures"]
        pipelines = {}
        for name, p in snap["pipelines"].items():
            pipelines[name] = {
                "inferences": p["processed"],
                "fps_in": p["fps_in"],
                "fps_processed": p["fps_processed"],
                "dropped": p["dropped"],
                "skipped": p["skipped"],
                "errors": p["errors"],
                "latency_ms": {k: p["latency_ms"][k] for k in ("p50", "p95", "p99")},
                "inference_ms": {k: p["inference_ms"][k] for k in ("p50", "p95", "p99")},
                "model": {"name": p["model"], "version": p["version"], "sha256": p["sha256"]},
                "runtime": p["runtime"],
                "inference": p["inference"],
                "source": {
                    k: p["source_health"][k]
                    for k in ("connected", "samples", "reconnects", "stalls", "errors", "last_error")
                },
                "stalled": p["stalled"],
            }
        outbox = self.outbox.stats()
        cpu = self.cpu.read(reset=reset)
        return {
            "v": 1,
            "device_id": self.device_id,
            "run_id": self.run_id,
            "ts": round(time.time(), 3),
            "uptime_s": snap["uptime_s"],
            "pipelines": pipelines,
            "pipeline_errors": snap["pipeline_errors"],
            "system": {
                "cpu_percent": cpu["system"],
                "process_cpu_percent": cpu["process"],
                "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                "load_1m": round(os.getloadavg()[0], 2),
                "temperature_c": max(temps.values()) if temps else None,
                "temperatures": temps,
                "thermal_state": snap["thermal"]["state"],
                "throttled": snap["thermal"]["state"] != "normal",
                "disk_free_mb": round(disk_free, 1) if disk_free is not None else None,
            },
            "outbox": outbox,
            "mqtt": self.link.stats() | {"oversize_results": self.oversize_results},
            "predict": self.predict.stats(),
            "results": self.results_summary() if reset else dict(self._summary),
            "inbound": self._inbound(),
        }

    def _inbound(self) -> dict[str, Any]:
        """Counters of the inbound topics with a bounded queue (see docs/protocol.md, telemetry ``inbound``)."""
        updates = self.daemon.updates
        return {"deploy": updates.inbound_stats()} if updates is not None else {}

    def _telemetry_loop(self) -> None:
        """Telemetry right after each (re)connect, then every ``telemetry_interval`` seconds."""
        while True:
            self._wake.wait(self.mqtt.telemetry_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._send_telemetry()

    def _send_telemetry(self) -> None:
        try:
            self.link.publish_durable(self.topics.telemetry, encode(self.telemetry()))
        except Exception:  # telemetry must never take the agent down
            log.exception("telemetry failed")

    def final_telemetry(self) -> None:
        """The last telemetry, at clean shutdown: queued before the offline status (``stop`` drains it first).

        The daemon calls this while its pipelines still exist, so the figures describe them; ``stop`` calls it
        otherwise. Sent once.
        """
        if self._final_sent or self._stop.is_set():
            return
        self._final_sent = True
        self._send_telemetry()

    # ---- commands -------------------------------------------------------------------------------

    def ack(self, command: str, command_id: str | None, ok: bool, error: str | None = None, result: Any = None) -> None:
        """One acknowledgement per command on ``ack`` (refusals rate-limited: a flood of bad commands is no flood of acks)."""
        if not ok and not self._ack_bucket.allow(time.monotonic()):
            return
        # the id is null unless it has an id's shape: never echo an unverified field as it came (docs/protocol.md)
        ack: dict[str, Any] = {"v": 1, "device_id": self.device_id, "command": command, "id": echo_id(command_id)}
        ack["ok"] = ok
        if error is not None:
            ack["error"] = error[:500]
        if result is not None:
            ack["result"] = result
        try:
            data = encode({k: v for k, v in ack.items() if v is not None or k == "id"})
        except (TypeError, ValueError) as exc:  # a result that is not JSON: say so rather than stay silent
            ack.pop("result", None)
            ack["ok"], ack["error"] = False, f"result not serialisable: {exc}"
            data = encode({k: v for k, v in ack.items() if v is not None or k == "id"})
        if len(data) > self.mqtt.max_payload_bytes:
            ack["result"] = {"truncated": True, "keys": sorted(result) if isinstance(result, dict) else None}
            data = encode({k: v for k, v in ack.items() if v is not None or k == "id"})
        self.link.publish_now(self.topics.ack, data)

    # ---- Home Assistant -----------------------------------------------------------------------

    def announce(self) -> None:
        """Publish every discovery config (retained); clear, with an empty retained payload, those announced
        earlier in this run that the current configuration no longer has (a pipeline removed by a reload)."""
        with self._announce_lock:
            enabled = self.mqtt.home_assistant.enabled and self.platform.discovery
            current = discovery.configs(self) if enabled else []
            pending = set()  # not cleared (offline): tried again at the next announce (each reconnect)
            for topic in discovery.stale(self._announced, [t for t, _ in current]):
                if self.link.publish_now(topic, b"", qos=1, retain=True):
                    log.info("home assistant entity removed", topic=topic)
                else:
                    pending.add(topic)
            for topic, payload in current:
                self.link.publish_now(topic, payload, qos=1, retain=True)
            self._announced = {t for t, _ in current} | pending
        if current:
            log.info("home assistant discovery announced", entities=len(current))

    def apply_config(self, config: AgentConfig) -> None:
        """A reloaded configuration, applied before the new pipelines start: result policies and Home Assistant
        settings follow it (``announce`` once the pipelines run). The connection itself (broker, credentials,
        topic prefix, platform) keeps its settings until a restart.
        """
        if config.mqtt is None:  # [mqtt] removed: the connection stays up until a restart, as it was
            log.warning("reload: [mqtt] removed from the config; the MQTT connection keeps running until a restart")
            return
        old_ha = self.mqtt.home_assistant
        self.config = config
        self.mqtt = self.mqtt.model_copy(
            update={"results": config.mqtt.results, "home_assistant": config.mqtt.home_assistant}
        )
        self._gates = {}  # a changed policy applies to the next result
        new_ha = self.mqtt.home_assistant
        if old_ha.enabled and (not new_ha.enabled or new_ha.discovery_prefix != old_ha.discovery_prefix):
            self.link.unsubscribe(f"{old_ha.discovery_prefix}/status")
        if new_ha.enabled and self.platform.discovery:
            self.link.subscribe(f"{new_ha.discovery_prefix}/status", self._on_ha_status)

    def _on_ha_status(self, message: Any) -> None:
        if message.payload.strip() == b"online":
            self.announce()
