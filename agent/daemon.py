"""The long-running daemon: pipelines, sinks, systemd notify/watchdog, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.config import AgentConfig, PipelineConfig, load_config
from agent.errors import AgentError
from agent.pipeline import Pipeline
from agent.predictor import Predictor
from agent.sinks import JsonlSink, ResultBus, Sink, StdoutSink
from agent.sources import create_source
from agent.systemd import Notifier

log = structlog.get_logger(__name__)
# How much of the normal frame rate each thermal state allows (critical: nearly paused, never stopped).
THERMAL_RATE_FACTORS = {"normal": 1.0, "throttle": 0.5, "critical": 0.1}


RUN_LOCK = "agent.lock"  # under state_dir: a shared flock held while a daemon runs


def hold_run_lock(state_dir: str | Path) -> int | None:
    """Hold a shared flock on ``<state_dir>/agent.lock`` for the life of the process (its fd; None when the state
    directory cannot hold it). `edge-agent check` sees it held and leaves the running agent's connection alone."""
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(state_dir) / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("run lock not held", error=str(exc))
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def agent_running(state_dir: str | Path) -> bool:
    """Whether a daemon holds the run lock of ``state_dir`` now."""
    try:
        fd = os.open(Path(state_dir) / RUN_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing releases the probe's own lock
    return False


def source_outages(pipelines: dict[str, Pipeline]) -> dict[str, str]:
    """Pipelines whose (still running) source is unavailable now, with the source's last error."""
    out: dict[str, str] = {}
    for name, p in pipelines.items():
        health = p.source.health
        if not health.connected and health.last_error and not p.finished:
            out[name] = health.last_error
    return out


def ready_to_serve(pipelines: dict[str, Pipeline], sources_down: dict[str, str]) -> bool:
    """READY=1: a pipeline has made its first inference, or every pipeline has either made one or is waiting for its
    source (the daemon runs and retries; STATUS= names what is failing)."""
    first = {name: p.first_result.is_set() for name, p in pipelines.items()}
    return any(first.values()) or (bool(first) and all(done or name in sources_down for name, done in first.items()))


class Daemon:
    """Runs the configured pipelines until SIGTERM/SIGINT (or ``duration`` / finite sources end)."""

    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        duration: float | None = None,
        reload_config: Callable[[], AgentConfig] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.duration = duration
        self._reload_config = reload_config or (lambda: load_config(config_path) if config_path else config)
        self.pipelines: dict[str, Pipeline] = {}
        self.pipeline_errors: dict[str, str] = {}
        self.sources_down: dict[str, str] = {}  # pipeline -> why its source is unavailable now (it retries)
        self.bus: ResultBus | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._ready_sent = False
        self.started_at = time.monotonic()
        self.rate_factor = 1.0
        self.thermal_state = "normal"
        self.profile: Any = None
        self.temperatures: dict[str, float] = {}
        self.mqtt: Any = None  # MqttService when [mqtt] is configured
        self.updates: Any = None  # UpdateManager when [update] is enabled
        self.exit_code = 0
        self._run_lock: int | None = None  # fd of the shared flock on <state_dir>/agent.lock while running

    # ---- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def request_stop(self, exit_code: int = 0) -> None:
        """Stop the daemon; ``run()`` then returns ``exit_code`` (75: restart requested, systemd starts it again)."""
        self.exit_code = exit_code
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    # ---- board -------------------------------------------------------------------------------

    def resolve_profile(self) -> Any:
        """The firmware profile named in the config, or the detected board's; None when unknown."""
        from agent.board import detect_board
        from agent.profiles import get_profile

        if self.config.profile != "auto":
            return get_profile(self.config.profile)
        board = detect_board(Path(self.config.board_root))
        if board.profile_id is None:
            log.warning("board not recognised: no firmware profile, no thermal throttling", reason=board.reason)
            return None
        log.info("board detected", profile=board.profile_id, model=board.model)
        return get_profile(board.profile_id)

    def _thermal_loop(self) -> None:
        from agent.board import read_temperatures, throttle_decision

        profile = self.profile
        interval = self.config.thermal_interval or profile.thermal.poll_s
        root = Path(self.config.board_root)
        while not self._stop.is_set():
            try:
                temps = read_temperatures(profile, root)
            except OSError as exc:
                log.warning("cannot read temperatures", error=str(exc))
                temps = {}
            self.temperatures = temps
            hottest = max(temps.values()) if temps else None
            state = throttle_decision(hottest, profile.thermal, self.thermal_state != "normal")
            if state != self.thermal_state:
                self.rate_factor = THERMAL_RATE_FACTORS[state]
                (log.info if state == "normal" else log.warning)(
                    "thermal state changed",
                    state=state,
                    temperature_c=hottest,
                    rate_factor=self.rate_factor,
                )
                self.thermal_state = state
                self.notifier.status(self.status_line())
                if self.mqtt is not None:
                    self.mqtt.event(
                        "thermal", "info" if state == "normal" else "warning", state=state, temperature_c=hottest
                    )
            self._stop.wait(interval)

    # ---- building -----------------------------------------------------------------------------

    def _build_sinks(self, config: AgentConfig) -> dict[str, Sink]:
        sinks: dict[str, Sink] = {"stdout": StdoutSink(config.sinks.stdout)}
        if config.sinks.jsonl is not None:
            try:
                sinks["jsonl"] = JsonlSink(config.sinks.jsonl)
            except OSError as exc:
                raise AgentError(
                    f"cannot open {config.sinks.jsonl.path}: {exc.strerror}", "fix [sinks.jsonl].path"
                ) from None
        return sinks

    def open_predictor(self, pipe: PipelineConfig, model: str | None = None) -> Predictor:
        """Open a model with the pipeline's runtime settings (and the firmware profile's defaults)."""
        runtime = None if pipe.runtime == "auto" else pipe.runtime
        threads, providers, delegates = pipe.threads, pipe.providers, pipe.delegates
        provider_options, inter_op, graph = pipe.provider_options, pipe.inter_op_threads, pipe.graph_optimization
        prefs = getattr(self.profile, "runtime", None)
        if prefs is not None:
            threads = threads or prefs.threads
            providers = providers or prefs.providers or None
            delegates = delegates if delegates is not None else (prefs.delegates or None)
            provider_options = provider_options if provider_options is not None else (prefs.provider_options or None)
            inter_op, graph = inter_op or prefs.inter_op_threads, graph or prefs.graph_optimization
        return Predictor.open(
            model or pipe.model,
            runtime=runtime,
            threads=threads,
            providers=providers,
            delegates=delegates,
            provider_options=provider_options,
            inter_op_threads=inter_op,
            graph_optimization=graph,
        )

    def _csi_camera(self, source_config: Any) -> Any:
        """``device = "csi"``: the board camera through the firmware profile's GStreamer pipeline."""
        camera = getattr(self.profile, "camera", None)
        fps = int(source_config.fps) if source_config.fps else None
        pipeline = camera.pipeline(source_config.width, source_config.height, fps) if camera else None
        if not pipeline:
            log.error("device = 'csi' but this board's firmware profile has no CSI camera pipeline")
            return source_config
        return source_config.model_copy(update={"device": pipeline, "backend": "gstreamer"})

    def _build_pipelines(self, config: AgentConfig, bus: ResultBus) -> tuple[dict[str, Pipeline], dict[str, str]]:
        pipelines: dict[str, Pipeline] = {}
        errors: dict[str, str] = {}
        for name, pipe in config.pipelines.items():
            try:
                model = self.updates.model_path(name, pipe.model) if self.updates is not None else pipe.model
                predictor = self.open_predictor(pipe, model)
            except AgentError as exc:
                errors[name] = str(exc)
                log.error("pipeline not started: model failed to load", pipeline=name, error=str(exc))
                continue
            source_config = config.sources[pipe.source]
            if source_config.type == "camera" and source_config.device == "csi":
                source_config = self._csi_camera(source_config)
            source = create_source(source_config, pipe.source)
            want = "row" if predictor.kind == "timeseries" else "image"
            if source.kind != want:
                predictor.close()
                errors[name] = (
                    f"source {pipe.source!r} gives {source.kind}s but model {predictor.bundle.name} takes {predictor.kind} input"
                )
                log.error("pipeline not started", pipeline=name, error=errors[name])
                continue
            pipeline = Pipeline(name, pipe, source, predictor, bus.emitter(pipe.sinks), lambda: self.rate_factor)
            if self.updates is not None:
                pipeline.observer = functools.partial(self.updates.observe, name)
            pipelines[name] = pipeline
        return pipelines, errors

    def _start(self, config: AgentConfig) -> None:
        self.bus = ResultBus(self._build_sinks(config))
        if self.mqtt is not None:
            self.bus.listeners.append(self.mqtt.on_result)
        self.bus.start()
        self.pipelines, self.pipeline_errors = self._build_pipelines(config, self.bus)
        for p in self.pipelines.values():
            p.start()
        log.info(
            "agent started",
            version=__version__,
            device_id=config.device_id,
            pipelines=list(self.pipelines),
            failed=self.pipeline_errors or None,
        )

    def _shutdown(self) -> None:
        for p in self.pipelines.values():
            p.stop()
        if self.bus is not None:
            self.bus.close()
        for p in self.pipelines.values():
            p.predictor.close()
        self.pipelines = {}

    # ---- main loop ----------------------------------------------------------------------------

    def run(self) -> int:
        # Stages hand the GIL back and forth around C calls (decode, resize, invoke); a short switch
        # interval keeps a thread returning from invoke from waiting up to 5 ms behind a busy one.
        sys.setswitchinterval(0.0005)
        from agent.extras import require_extras

        require_extras(self.config)  # a configured feature without its extra: one line naming it, nothing started
        self._run_lock = hold_run_lock(self.config.state_dir)
        try:
            self.profile = self.resolve_profile()
        except AgentError as exc:
            log.error("firmware profile unusable", error=str(exc))
            self.profile = None
        if self.config.mqtt is not None:
            from agent.mqtt.service import MqttService

            self.mqtt = MqttService(self.config, self)
        if self.config.update.enabled:
            from agent.update.manager import UpdateManager

            self.updates = UpdateManager(self.config, self)
            self.updates.prepare()
        self._start(self.config)
        if self.mqtt is not None:
            self.mqtt.start()
            if self.updates is not None:
                self.updates.start(self.mqtt)
            for name, error in self.pipeline_errors.items():
                self.mqtt.event("pipeline_failed", "error", pipeline=name, error=error)
        if not self.pipelines:
            self.notifier.status("no pipeline could start: " + "; ".join(self.pipeline_errors.values()))
            log.error("no pipeline could start", errors=self.pipeline_errors)
            self._shutdown()
            if self.mqtt is not None:
                self.mqtt.stop("no pipeline could start")
            if self._run_lock is not None:
                os.close(self._run_lock)
                self._run_lock = None
            return 1
        last_watchdog = last_status = 0.0
        if self.profile is not None:
            threading.Thread(target=self._thermal_loop, name="thermal", daemon=True).start()
        try:
            while not self._stop.wait(0.1):
                now = time.monotonic()
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload()
                if self._watch_sources():
                    self.notifier.status(self.status_line())
                if not self._ready_sent and ready_to_serve(self.pipelines, self.sources_down):
                    self._ready_sent = True
                    self.notifier.ready(self.status_line())
                    log.info("ready", failing=sorted(self.pipeline_errors) + sorted(self.sources_down) or None)
                interval = self.notifier.watchdog_interval
                if interval and now - last_watchdog >= interval and self.healthy():
                    self.notifier.watchdog()
                    last_watchdog = now
                if now - last_status >= self.config.status_interval:
                    last_status = now
                    self.notifier.status(self.status_line())
                    for p in self.pipelines.values():
                        if p.stalled(now):
                            log.error("pipeline stalled", pipeline=p.name, failed=p.failed)
                if self.duration is not None and now - self.started_at >= self.duration:
                    break
                if all(p.finished for p in self.pipelines.values()):
                    log.info("all sources finished")
                    break
        finally:
            self.notifier.stopping()
            self.notifier.status("stopping: flushing queued results")
            if self.updates is not None:
                self.updates.stop()
            if self.mqtt is not None:
                self.mqtt.final_telemetry()  # while the pipelines still exist: queued before the offline status
            self._shutdown()
            if self.mqtt is not None:
                self.mqtt.stop("shutdown")
            if self._run_lock is not None:
                os.close(self._run_lock)  # releases the flock
                self._run_lock = None
        log.info("agent stopped", exit_code=self.exit_code)
        return self.exit_code

    def _watch_sources(self) -> bool:
        """Note pipelines whose source became unavailable or came back (the source logs it); an event on MQTT for
        each change. True when something changed."""
        down = source_outages(self.pipelines)
        lost = {name: why for name, why in down.items() if name not in self.sources_down}
        back = [name for name in self.sources_down if name not in down]
        self.sources_down = down
        if self.mqtt is not None:
            for name, why in lost.items():
                source = self.pipelines[name].source.name
                self.mqtt.event("source_lost", "error", pipeline=name, source=source, error=why)
            for name in back:
                if name in self.pipelines:
                    self.mqtt.event("source_back", "info", pipeline=name, source=self.pipelines[name].source.name)
        return bool(lost or back)

    def healthy(self) -> bool:
        """Watchdog condition: every running pipeline is alive and no inference is stuck."""
        now = time.monotonic()
        return bool(self.pipelines) and all(
            not p.stalled(now) and (p.alive or p.finished) for p in self.pipelines.values()
        )

    def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            new = self._reload_config()
        except AgentError as exc:
            log.error("reload refused: config invalid, keeping the running one", error=str(exc))
            self.notifier.ready(self.status_line())
            return
        log.info("reloading configuration")
        self._shutdown()
        self.config = new
        if self.mqtt is not None:
            self.mqtt.apply_config(new)  # result policies, Home Assistant settings: before the first new result
        self._start(new)
        if self.mqtt is not None:
            self.mqtt.link.publish_now(self.mqtt.topics.status, self.mqtt.status_online(), qos=1, retain=True)
            self.mqtt.announce()  # discovery for the pipelines now running; removed ones cleared
        self.notifier.ready(self.status_line())
        log.info("reloaded", pipelines=list(self.pipelines), failed=self.pipeline_errors or None)

    def status_line(self) -> str:
        parts = []
        for p in self.pipelines.values():
            fps = p.stats.rates()[1]  # no latency percentiles for a status line
            b = p.predictor.bundle
            parts.append(f"{p.name}: {fps:.1f} fps {b.name} {b.version}")
        for name, why in self.sources_down.items():
            if (pipe := self.pipelines.get(name)) is not None:
                parts.append(f"{name}: WAITING for source {pipe.source.name} ({why})")
        for name, error in self.pipeline_errors.items():
            parts.append(f"{name}: FAILED ({error})")
        if self.thermal_state != "normal":
            parts.append(f"thermal {self.thermal_state} (rate x{self.rate_factor:g})")
        return "; ".join(parts) or "no pipelines"

    def snapshot(self) -> dict[str, Any]:
        return {
            "device_id": self.config.device_id,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "pipelines": {n: p.snapshot() for n, p in self.pipelines.items()},
            "pipeline_errors": self.pipeline_errors,
            "thermal": {
                "state": self.thermal_state,
                "rate_factor": self.rate_factor,
                "temperatures": self.temperatures,
            },
            "profile": getattr(self.profile, "id", None),
        }
