"""Signed device commands on ``cmd/<name>``: restart, reload, set KEY=VALUE, diagnostics.

A command runs only when it is signed by a threshold of the fleet's command keys (listed in the verified TUF root),
addressed to this device, newer than the last one accepted and not expired (``agent.update.commands``). Every
command gets one acknowledgement on ``ack``: ``{"id", "command", "ok", "error" | "result"}``.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.extras import commands_unavailable
from agent.protocol import PIPELINE_NAME, ProtocolError, parse_json_object
from agent.protocol.ids import echo_id
from agent.protocol.update import parse_envelope
from agent.ratelog import RateLog
from agent.update.store import read_json_object, write_json_atomic

if TYPE_CHECKING:
    from agent.mqtt.service import MqttService

log = structlog.get_logger(__name__)
RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: systemd (Restart=on-failure) starts the agent again
#: What ``set`` may change at run time (not persisted: the config file stays the source of truth after a restart).
SETTABLE = ("log_level", "telemetry_interval", "pipelines.<name>.max_fps")


class CommandHandler:
    def __init__(self, service: MqttService) -> None:
        self.service = service
        self.state_file = Path(service.config.state_dir) / "updates" / "last-device-command.json"
        # Verifying a command needs the update extra's crypto: without it, results and telemetry still flow and
        # each command is refused with the reason (said once here in the log).
        off = commands_unavailable()
        self.unavailable = None if off is None else f"device commands are off: {off}"
        if self.unavailable is not None:
            log.warning(self.unavailable)
        # Verification may refresh TUF metadata over MQTT: never in paho's network thread, which must deliver it.
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=64)
        # refusals: the first few per kind and minute in the log, then one line a minute with the counts held back
        self._refused = RateLog(log, "commands refused (held back from the log)")
        threading.Thread(target=self._worker, name="commands", daemon=True).start()

    def on_message(self, message: Any) -> None:
        try:
            self._queue.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            self._refused.warning("dropped", "command dropped: too many waiting", time.monotonic(), topic=message.topic)

    def _worker(self) -> None:
        while True:
            topic, payload = self._queue.get()
            try:
                self._handle(topic, payload)
            except Exception:  # a command must never take the agent down
                log.exception("command handling failed", topic=topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        level = topic.rsplit("/", 1)[-1]
        name = level if PIPELINE_NAME.fullmatch(level) else "invalid"  # the topic level is echoed in the ack
        command_id: str | None = None
        try:
            body = parse_json_object(payload, "command", 64 * 1024)
            signed = body.get("signed") if isinstance(body.get("signed"), dict) else body
            command_id = echo_id(signed.get("id"))  # unverified: echoed only when it has an id's shape, else null
        except ProtocolError as exc:
            self._refused.warning("refused", "command refused", time.monotonic(), command=name, error=str(exc))
            self.service.ack(name, command_id, ok=False, error=str(exc))
            return
        if self.unavailable is not None:
            self._refused.warning(
                "unavailable", "command refused", time.monotonic(), command=name, error=self.unavailable
            )
            self.service.ack(name, command_id, ok=False, error=self.unavailable)
            return
        from agent.update.commands import CommandRejected
        from agent.update.trust import RepositoryUnavailable, UntrustedMetadata

        try:
            command = self._verify(payload)
            if command.name != name:
                raise CommandRejected(f"command {command.name!r} arrived on the topic of {name!r}")
            self._remember(command.seq)
            result = self._run(command.name, command.args)
        except (ProtocolError, CommandRejected, UntrustedMetadata, RepositoryUnavailable, ValueError) as exc:
            self._refused.warning("refused", "command refused", time.monotonic(), command=name, error=str(exc))
            self.service.ack(name, command_id, ok=False, error=str(exc))
            return
        log.info("command accepted", command=name, id=command_id)
        self.service.ack(name, command_id, ok=True, result=result)
        if name == "restart":
            self.service.daemon.request_stop(exit_code=RESTART_EXIT_CODE)

    def _verify(self, payload: bytes) -> Any:
        from agent.update.commands import CommandRejected, verify_device_command

        updates = self.service.daemon.updates
        if updates is None or updates.trust is None:
            raise CommandRejected(
                "commands are not accepted: no fleet trust root is configured on this device ([update])"
            )
        trust = updates.trust
        envelope = parse_envelope(payload, "command", 64 * 1024)

        def check() -> Any:
            return verify_device_command(
                envelope,
                trust.command_keys(),
                device_id=self.service.device_id,
                last_seq=self._last_seq(),
                now=time.time(),
                max_clock_skew_s=updates.cfg.max_clock_skew_s,
            )

        try:
            return check()
        except CommandRejected as exc:
            if "signature" not in str(exc):
                raise
            trust.refresh()  # the command keys may have been rotated by a newer root
            return check()

    def _last_seq(self) -> int:
        value = read_json_object(self.state_file).get("seq", 0)
        return value if isinstance(value, int) else 0

    def _remember(self, seq: int) -> None:
        write_json_atomic(self.state_file, {"seq": seq})  # durable: a replay after a power cut is still refused

    def _run(self, name: str, args: dict[str, str]) -> dict[str, Any]:
        daemon = self.service.daemon
        if name == "restart":
            return {"restarting": True}
        if name == "reload":
            daemon.request_reload()
            return {"reloading": True}
        if name == "diagnostics":
            from agent.runtime import runtime_report

            telemetry = self.service.telemetry(reset=False)
            return {
                "telemetry": telemetry,
                "runtimes": [r.to_dict() for r in runtime_report()],
                "update": daemon.updates.diagnostics() if daemon.updates else None,
            }
        return {"set": self._set(args)}

    def _set(self, args: dict[str, str]) -> dict[str, Any]:
        applied: dict[str, Any] = {}
        for key, value in args.items():
            if key == "log_level":
                from agent.logging import configure

                level = value.lower()
                if level not in ("debug", "info", "warning", "error"):
                    raise ValueError(f"log_level {value!r} is not debug, info, warning or error")
                configure(level)
                applied[key] = level
            elif key == "telemetry_interval":
                seconds = _positive(key, value)
                self.service.mqtt.telemetry_interval = seconds
                applied[key] = seconds
            elif key.startswith("pipelines.") and key.endswith(".max_fps"):
                name = key.removeprefix("pipelines.").removesuffix(".max_fps")
                pipeline = self.service.daemon.pipelines.get(name)
                if pipeline is None:
                    raise ValueError(f"no pipeline named {name!r}")
                fps = _positive(key, value)
                pipeline.config.max_fps = fps
                applied[key] = fps
            else:
                raise ValueError(f"{key!r} cannot be set at run time (settable: {', '.join(SETTABLE)})")
        return applied


def _positive(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
    return number
