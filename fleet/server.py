"""``fleet serve``: ingest every device's messages into the registry, serve the TUF repository and target chunks,
drive the rollouts, keep the timestamp metadata fresh.

Several instances may share one broker and one PostgreSQL: device traffic arrives through MQTT 5 shared
subscriptions (each message to one instance), ingest is idempotent (upserts keyed by what the device sent), and
rollouts are saved with optimistic concurrency (only the instance whose save wins carries out the actions).
"""

from __future__ import annotations

import collections
import queue
import secrets
import signal
import threading
import time
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import exc as sa_errors

from agent.protocol import ProtocolError, parse_json_object
from fleet.config import FleetConfig
from fleet.db import Registry
from fleet.errors import FleetError
from fleet.ingest import quarantine_text, safe_text, screen
from fleet.keys import KeyStore
from fleet.mqtt import FleetLink
from fleet.ops import ACTIVE, Operations
from fleet.repository import Repository
from fleet.transfer import RepositoryServer

log = structlog.get_logger(__name__)
MAX_MESSAGE = 256 * 1024
KINDS = {
    "status": "status",
    "telemetry": "telemetry",
    "update/status": "update",
    "update/state/+": "update",  # retained latest state per pipeline: catch-up after a server restart
    "events": "event",
    "ack": "ack",
}


class FleetServer:
    """One ``fleet serve`` instance."""

    def __init__(
        self, config: FleetConfig, *, batch_size: int = 1000, flush_s: float = 0.1, tick_s: float = 1.0
    ) -> None:
        self.config = config
        self.registry = Registry(config.database_url, bucket_s=config.telemetry_bucket_s)
        self.registry.migrate()
        self.repository = Repository(config.repository_dir, KeyStore(config.keys_dir))
        b = config.broker
        self.link = FleetLink(
            b.url,
            f"fleet-{config.server_id}-{secrets.token_hex(3)}",
            share=b.share_group or None,
            username=b.username,
            password=config.broker_password(),
            ca=b.ca,
        )
        self.ops = Operations(
            config,
            actor=f"server:{config.server_id}",
            registry=self.registry,
            repository=self.repository,
            link=self.link,
        )
        self.repo_server = RepositoryServer(
            self.link, self.repository, b.device_prefix, rate_limit_bps=config.chunk_rate_limit_bps
        )
        self.batch_size, self.flush_s, self.tick_s = batch_size, flush_s, tick_s
        self._inbox: queue.Queue[tuple[str, str, dict[str, Any], float]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats: dict[str, int] = collections.Counter()
        self.lag_ms: collections.deque[float] = collections.deque(maxlen=100_000)
        self._last_warning = 0.0
        base = b.device_prefix.format(device_id="+")
        self._prefix_parts = b.device_prefix.format(device_id="\0").split("/")
        self._filters = {base + suffix: kind for suffix, kind in KINDS.items()}

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for topic_filter in self._filters:
            self.link.subscribe(topic_filter, self._on_message)
        self.repo_server.start()
        self.link.start()
        for target, name in (
            (self._ingest_loop, "ingest"),
            (self._rollout_loop, "rollouts"),
            (self._maintenance_loop, "maintenance"),
        ):
            thread = threading.Thread(target=self._guard(target, name), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "fleet server started",
            server=self.config.server_id,
            broker=self.config.broker.url,
            database=_safe_url(self.config.database_url),
        )

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.repo_server.stop()
        self.link.stop()
        self._flush_all()
        self.registry.close()

    def _guard(self, target: Any, name: str) -> Any:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    target()
                    return
                except Exception:  # a bug or a database outage must not end the server: log, wait, go on
                    log.exception("fleet server loop failed; restarting it", loop=name)
                    self._stop.wait(2.0)

        return run

    # ---- ingest ------------------------------------------------------------------------------------

    def _device_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        template = self._prefix_parts
        try:
            index = template.index("\0")
        except ValueError:
            return None
        return parts[index] if len(parts) > index else None

    def _on_message(self, message: Any) -> None:
        import paho.mqtt.client as mqtt

        received = time.time()
        kind = next((k for f, k in self._filters.items() if mqtt.topic_matches_sub(f, message.topic)), None)
        device = self._device_of(message.topic)
        if kind is None or device is None:
            return
        if not message.payload:
            return  # a cleared retained message
        try:
            data = parse_json_object(message.payload, kind, MAX_MESSAGE)
        except ProtocolError as exc:
            self._reject(device, kind, str(exc))
            return
        claimed = data.get("device_id")
        if claimed is not None and claimed != device:
            self._reject(device, kind, f"message on {device}'s topic claims to be from {claimed!r}", audit=True)
            return
        data.setdefault("device_id", device)
        self.stats[f"received_{kind}"] += 1
        screened = screen(kind, data) if len(device) <= 128 else None
        if screened is None or screened.data is None:
            reason = "the device id in the topic is longer than 128 characters" if screened is None else screened.reason
            self._quarantine(kind, device, data, reason or "refused", received)
            return
        if screened.cut:
            self.stats["normalised"] += 1
        data = screened.data
        if kind == "ack":
            self.ops.note_ack(data)
        self._inbox.put((kind, device, data, received))

    def _reject(self, device: str, kind: str, error: str, audit: bool = False) -> None:
        self.stats["rejected"] += 1
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning("device message refused", device=device, kind=kind, error=error)
        if audit:
            self.registry.record_audit(
                f"device:{device}", "device.message_refused", {"kind": kind}, ok=False, error=error
            )

    def _quarantine(self, kind: str, device: str, data: Any, reason: str, received: float) -> None:
        """Set one message aside (stored with its reason by the ingest thread); its batch goes on without it."""
        self._inbox.put(("quarantine", device, self._set_aside(kind, device, data, reason, received), received))

    def _set_aside(self, kind: str, device: str, data: Any, reason: str, received: float) -> dict[str, Any]:
        """Count and log (at most a line a second) a quarantined message; its row for ``Registry.quarantine``."""
        self.stats["quarantined"] += 1
        self.stats[f"quarantined_{kind}"] += 1
        reason = safe_text(reason)
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning("device message quarantined", device=safe_text(device)[:128], kind=kind, reason=reason)
        return {
            "device_id": device,
            "kind": kind,
            "reason": reason,
            "payload": quarantine_text(data),
            "received_at": received,
        }

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            batch = self._drain(self.flush_s)
            if batch:
                self._ingest(batch)

    def _drain(self, wait_s: float) -> list[tuple[str, str, dict[str, Any], float]]:
        batch = []
        try:
            batch.append(self._inbox.get(timeout=wait_s))
        except queue.Empty:
            return batch
        while len(batch) < self.batch_size:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _flush_all(self) -> None:
        while True:
            batch = self._drain(0.0)
            if not batch:
                return
            self._ingest(batch)

    def _ingest(self, batch: list[tuple[str, str, dict[str, Any], float]]) -> None:
        by_kind: dict[str, list[tuple[str, str, dict[str, Any], float]]] = collections.defaultdict(list)
        for item in batch:
            by_kind[item[0]].append(item)
        quarantined = [item[2] for item in by_kind.pop("quarantine", [])]
        for kind, items in by_kind.items():
            self._apply(kind, items, quarantined)
        if quarantined:
            self.registry.quarantine(quarantined)
        done = time.time()
        for kind, _device, data, _received in batch:
            ts = data.get("ts")
            if kind != "quarantine" and isinstance(ts, (int, float)):
                self.lag_ms.append((done - ts) * 1000.0)
        self.stats["ingested"] += sum(1 for item in batch if item[0] != "quarantine")

    def _apply(
        self, kind: str, items: list[tuple[str, str, dict[str, Any], float]], quarantined: list[dict[str, Any]]
    ) -> None:
        """Write ``items`` (one kind) in one transaction; when the database refuses the batch for what is in it
        (not an outage), split it until the message it refuses is alone, and quarantine that one."""
        try:
            if kind == "ack":
                for _kind, _device, ack, _received in items:
                    if isinstance(ack.get("id"), str):
                        self.registry.ack_command(ack["device_id"], ack["id"], ack)
                return
            ingest = {
                "status": self.registry.ingest_status,
                "telemetry": self.registry.ingest_telemetry,
                "update": self.registry.ingest_update_states,
                "event": self.registry.ingest_events,
            }[kind]
            result = ingest([data for _kind, _device, data, _received in items])
        except Exception as error:
            if _outage(error):
                raise
            if len(items) > 1:
                half = len(items) // 2
                self._apply(kind, items[:half], quarantined)
                self._apply(kind, items[half:], quarantined)
                return
            (_kind, device, data, received) = items[0]
            reason = f"could not be stored: {type(error).__name__}: {_first_line(error)}"
            quarantined.append(self._set_aside(kind, device, data, reason, received))
            return
        for key, value in result.as_dict().items():
            self.stats[f"{kind}_{key}"] += value

    # ---- rollouts and upkeep -------------------------------------------------------------------------

    def _rollout_loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:  # what `fleet deploy --wait` looks at to tell whether any server is driving rollouts
                self.registry.server_heartbeat()
            except Exception:
                log.exception("server heartbeat not recorded")
            for row in self.registry.list_rollouts():
                if row["status"] in ACTIVE:
                    try:
                        self.ops.drive(row["id"])
                    except Exception:
                        log.exception("rollout step failed", rollout=row["id"])

    def _maintenance_loop(self) -> None:
        while not self._stop.is_set():
            try:
                refreshed = self.repository.refresh_expiring(timedelta(hours=12))
                if refreshed:
                    log.info("repository metadata re-signed", roles=refreshed)
            except Exception as exc:  # an offline key cannot re-sign: say so, keep serving
                log.warning("cannot refresh repository metadata", error=str(exc))
            stale = self.registry.mark_stale(max_age_s=self.config.offline_after_s)
            if stale:
                log.info("devices offline (silent)", devices=len(stale))
            self.registry.prune()
            self._stop.wait(30.0)


def _outage(error: BaseException) -> bool:
    """Whether a failed write is the database's trouble (retry later) rather than the messages'."""
    if isinstance(error, FleetError | sa_errors.OperationalError | sa_errors.InterfaceError):
        return True
    return isinstance(error, sa_errors.DBAPIError) and bool(error.connection_invalidated)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def serve(config: FleetConfig, duration: float | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``duration`` seconds)."""
    server = FleetServer(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    try:
        stop.wait(duration)
    finally:
        server.stop()
        log.info("fleet server stopped", **{k: v for k, v in server.stats.items() if not k.startswith("received")})
    return 0
