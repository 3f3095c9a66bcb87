"""The update shell: signed deployment commands in, verified bytes down, validated models hot-swapped in.

Every decision is made by pure code (``commands.verify_deploy``, ``tuf.ngclient``, ``state.transition`` /
``state.recover`` / ``decide_offer``, ``ChunkPlan``, ``validate``'s checks, ``HealthWindow``); this module does the
I/O around them: MQTT, files, slots, the running pipelines. Each state is persisted before the action it names is
taken, so ``kill -9`` at any instant resumes (``recover``) with a working model active.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.bundle import load_bundle
from agent.errors import AgentError
from agent.pipeline import pipeline_rate
from agent.protocol import ProtocolError, encode
from agent.protocol.ids import echo_id
from agent.protocol.update import (
    TARGET_PATH,
    DeployCommand,
    SignedEnvelope,
    UpdateStatus,
    deploy_topic,
    parse_deploy_command,
    update_state_topic,
    update_status_topic,
)
from agent.ratelog import RateLimiter, RateLog
from agent.update import health as health_rules
from agent.update.commands import CommandKeys, CommandRejected, verify_deploy
from agent.update.fetcher import ChunkDownload, MqttMetadataFetcher, TransferError
from agent.update.inbox import Candidate, DeployInbox, Refusal, precheck
from agent.update.shadow import ShadowTally, frame_agreement
from agent.update.slots import SlotStore
from agent.update.state import (
    Activate,
    Activated,
    ActivationFailed,
    Downloaded,
    Fail,
    HealthVerdict,
    Offer,
    Progress,
    Reject,
    ShadowResult,
    StartDownload,
    StartShadow,
    StartValidation,
    UpdateState,
    ValidationFailed,
    ValidationPassed,
    decide_offer,
    new_update,
    recover,
    transition,
)
from agent.update.store import UpdateStore, read_json_object, write_json_atomic
from agent.update.trust import (
    RepositoryUnavailable,
    TrustClient,
    UntrustedMetadata,
    install_trust_root,
)
from agent.update.validate import validate_bundle

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.daemon import Daemon
    from agent.predictor import Prediction, Predictor
    from agent.sources import Sample

log = structlog.get_logger(__name__)
COMMAND_FILE = "command.json"
STOP = object()
#: Status reports of refused deployments: the first this many per reason and minute (the rest are counted only).
REFUSAL_REPORTS_PER_MIN = 20


@dataclass
class _Trial:
    """A model in its health window; ``previous`` is kept open for an instant rollback (and a paired re-timing on
    ``last_input``, the latest input the new model answered)."""

    window: health_rules.HealthWindow
    previous: Predictor | None
    last_input: Any = None


@dataclass
class _Shadow:
    candidate: Predictor
    tally: ShadowTally
    frames: queue.Queue[tuple[Any, dict[str, Any]]]


class UpdateManager:
    """Per device: one worker thread applying deployments one at a time, per pipeline A/B slots and state."""

    def __init__(self, config: AgentConfig, daemon: Daemon) -> None:
        self.config, self.cfg, self.daemon = config, config.update, daemon
        self.state_dir = Path(config.state_dir)
        self.dir = self.state_dir / "updates"
        self.slots = {name: SlotStore(self.state_dir, name) for name in config.pipelines}
        self.stores = {name: UpdateStore(self.dir / f"{name}.json") for name in config.pipelines}
        self._candidates: dict[str, Predictor] = {}
        self._commands: dict[str, DeployCommand | None] = {}  # pipeline -> deployment of its current update
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trials: dict[str, _Trial] = {}
        self._swapped_at: dict[str, int] = {}  # pipeline -> its processed count at the last hot swap
        self._shadows: dict[str, _Shadow] = {}
        self._lock = threading.Lock()
        self.mqtt: Any = None
        self.trust: TrustClient | None = None
        self.hardware_id = self.cfg.hardware_id or platform.machine()
        self._pending_reports: list[tuple[bytes, str | None]] = []
        self._latest: dict[str, bytes] = {}
        # inbound deployments: cheap checks in the MQTT thread, then at most one pending per pipeline (agent/update/inbox)
        self._inbox = DeployInbox(max_pending=max(1, len(config.pipelines)))
        self._inbox_lock = threading.Lock()
        self._inbox_woken = False
        self._keys: CommandKeys | None = None  # the command keys of the newest verified root (read after refreshes)
        self._last: dict[str, Any] = {}  # the last accepted command's seq and id (kept in memory for the cheap checks)
        self._refusal_log = RateLog(log, "deployment commands refused (held back from the log)")
        self._refusal_reports = RateLimiter(burst=REFUSAL_REPORTS_PER_MIN, period_s=60.0)

    # ---- start-up (before the pipelines are built) ------------------------------------------------

    def prepare(self) -> None:
        """Recover slots and interrupted updates, install the configured models as the initial ones."""
        install_trust_root(self.dir / "tuf", Path(self.cfg.trust_root) if self.cfg.trust_root else None)
        if self.daemon.profile is not None and not self.cfg.hardware_id:
            self.hardware_id = self.daemon.profile.id
        for name, pipe in self.config.pipelines.items():
            slots = self.slots[name]
            slots.recover()
            if slots.active_path() is None:
                try:
                    slots.install_initial(pipe.model)
                except AgentError as exc:
                    log.error("initial model not installed in the update slots", pipeline=name, error=str(exc))
                    continue
                active = slots.active_path()
                if active is not None:
                    self.stores[name].record_committed(load_bundle(active).version)
            self._recover_update(name)

    def model_path(self, name: str, configured: str) -> str:
        """What pipeline ``name`` runs: its active slot (the configured model is only the initial one)."""
        slots = self.slots.get(name)
        active = slots.active_path() if slots is not None else None
        return str(active) if active is not None else configured

    def _recover_update(self, name: str) -> None:
        store = self.stores[name]
        state = store.load()
        if state is None or state.terminal:
            return
        marker = self._graceful_marker(name)
        stopped = read_json_object(marker).get("update_id")
        marker.unlink(missing_ok=True)
        if state.state == "trial" and stopped == state.update_id:
            # Stopped cleanly (SIGTERM) during the trial: no crash, so no attempt counted; the window starts again.
            log.info("update trial resumes after a clean stop", pipeline=name, version=state.target.version)
            return
        now = time.time()
        resumed = recover(state, now, self.cfg.max_attempts)
        if resumed is not state:
            self._save(name, resumed)
        if resumed.state == "activating":  # killed around the symlink switch: look where it points
            if self._active_is_candidate(name, resumed):
                self._save(name, transition(resumed, Activated(), time.time()))
            else:
                self._save(
                    name, transition(resumed, ActivationFailed("agent restarted before the switch"), time.time())
                )
        current = store.load()
        if current is not None and current.state == "rolled_back" and self._active_is_candidate(name, current):
            self.slots[name].rollback()
            log.warning("update rolled back after restart", pipeline=name, reason=current.reason)
        if current is not None and current.terminal:
            self._cleanup(name, current)

    def _graceful_marker(self, name: str) -> Path:
        return self.dir / f"{name}.stopped-in-trial"

    def _active_is_candidate(self, name: str, state: UpdateState) -> bool:
        active = self.slots[name].active_path()
        if active is None:
            return False
        try:
            bundle = load_bundle(active)
        except AgentError:
            return False
        return bundle.name == state.target.name and bundle.version == state.target.version

    # ---- running ----------------------------------------------------------------------------------

    def start(self, mqtt: Any) -> None:
        """Subscribe to deployments and resume what was interrupted."""
        self.mqtt = mqtt
        fetcher = MqttMetadataFetcher(mqtt.link, mqtt.topics, timeout_s=self.cfg.request_timeout_s)
        self.trust = TrustClient(self.dir / "tuf", fetcher)
        mqtt.link.on_connected(self._republish_latest)  # publish_now is dropped while offline: send the latest again
        for report, pipeline in self._pending_reports:
            self._publish(report, pipeline)
        self._pending_reports.clear()
        self._last = self._last_command()
        self._load_keys()
        mqtt.link.subscribe(deploy_topic(mqtt.topics), self._on_deploy)
        self._thread = threading.Thread(target=self._worker, name="updates", daemon=True)
        self._thread.start()
        for name in self.config.pipelines:
            state = self.stores[name].load()
            if state is not None and not state.terminal:
                self._queue.put(("resume", name))

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(STOP)
        if self._thread is not None:
            self._thread.join(10)
        for name in self.stores:  # a clean stop in trial is not a crash (see _recover_update)
            state = self.stores[name].load()
            if state is not None and state.state == "trial":
                write_json_atomic(self._graceful_marker(name), {"update_id": state.update_id, "at": time.time()})
        for shadow in self._shadows.values():
            shadow.candidate.close()
        self._shadows.clear()

    def _on_deploy(self, message: Any) -> None:
        """In paho's network thread: the cheap checks, then the inbox (bounded, coalescing); no crypto, no I/O."""
        payload = message.payload
        if not payload:
            return  # a cleared retained command
        with self._inbox_lock:
            self._inbox.counters["received"] += 1
            last = self._last
        last_seq = last.get("seq")
        verdict = precheck(
            payload,
            self.config.device_id,
            frozenset(self.cfg.groups),
            frozenset(self.config.pipelines),
            last_seq if isinstance(last_seq, int) else 0,
            last.get("id"),
        )
        if verdict is None:
            with self._inbox_lock:
                self._inbox.count("duplicate")  # the retained command we already handled, delivered on reconnect
            return
        if isinstance(verdict, Refusal):
            with self._inbox_lock:
                self._inbox.count(verdict.reason)
            self._refuse(verdict.reason, "rejected", verdict.detail, verdict.signed)
            return
        candidate = Candidate(verdict.pipeline, verdict.seq, verdict.envelope, self._signed_ok(verdict.envelope) > 0)
        with self._inbox_lock:
            dropped = self._inbox.offer(candidate)
            wake, self._inbox_woken = not self._inbox_woken, True
        if dropped is not None:
            self._refusal_log.warning("dropped", "deployment command dropped", time.monotonic(), reason=dropped)
        if wake:
            self._queue.put(("inbox", None))

    def _signed_ok(self, envelope: SignedEnvelope) -> int:
        """How many valid signatures ``envelope`` has under the command keys known (0 when none are known)."""
        keys = self._keys
        if keys is None:
            return 0
        try:
            return len(keys.valid_signers(envelope))
        except Exception:  # a malformed signature is no signature
            return 0

    def _load_keys(self) -> None:
        if self.trust is None:
            return
        try:
            self._keys = self.trust.command_keys()
        except Exception:  # no usable root yet: every deployment goes the slow, refreshing way
            self._keys = None

    def inbound_stats(self) -> dict[str, int]:
        """Counters of the inbound deployment topic (telemetry ``inbound.deploy``)."""
        with self._inbox_lock:
            return dict(self._inbox.counters) | {"pending": len(self._inbox)}

    def _refuse(self, key: str, state: str, reason: str, signed: dict[str, Any] | None) -> None:
        """A refused deployment: logged and reported at a limited rate per ``key`` (counted in the inbox always)."""
        now = time.monotonic()
        self._refusal_log.warning("refused", "deployment command refused", now, state=state, reason=reason[:300])
        if self._refusal_reports.admit(key, now):
            self._queue.put(("report", (state, reason, signed)))  # bounded: REFUSAL_REPORTS_PER_MIN per key

    def _worker(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is STOP:
                return
            kind, value = item
            try:
                if kind == "inbox":
                    self._drain_inbox()
                elif kind == "report":
                    state, reason, signed = value
                    self._report_unbound(state, reason, envelope_id=None, signed=signed, logged=True)
                else:
                    self._resume(value)
            except Exception:  # an update bug must never take the daemon down
                log.exception("update step failed")

    def _drain_inbox(self) -> None:
        while not self._stop.is_set():
            with self._inbox_lock:
                candidate = self._inbox.take()
                if candidate is None:
                    self._inbox_woken = False
                    return
            try:
                self._handle_deploy(candidate)
            except Exception:  # an update bug must never take the daemon down
                log.exception("update step failed")

    # ---- commands ---------------------------------------------------------------------------------

    def _handle_deploy(self, candidate: Candidate) -> None:
        envelope = candidate.envelope
        signed_id = str(envelope.signed.get("id", "unknown"))[:128]
        last = self._last_command()
        if envelope.signed.get("seq") == last.get("seq") and signed_id == last.get("id"):
            return  # the retained command we already handled, delivered again on reconnect
        assert self.trust is not None
        keys = self._keys
        if (
            keys is not None
            and self._signed_ok(envelope) == 0
            and all(sig.keyid in keys.keys for sig in envelope.signatures)
        ):  # only known keys, none valid: no refresh makes these good (a keyid names one key), so forged deployments
            # cost no repository traffic. An unknown keyid may be a new key: refresh first.
            with self._inbox_lock:
                self._inbox.count("bad_signature")
            reason = (
                "command refused: deployment command has 0 valid signatures from command keys, "
                f"{keys.threshold} required"
            )
            self._refuse("bad_signature", "rejected", reason, envelope.signed)
            return
        try:
            self.trust.refresh()
        except RepositoryUnavailable as exc:
            self._report_unbound("failed", str(exc), envelope_id=signed_id, signed=envelope.signed)
            return
        except UntrustedMetadata as exc:
            self._report_unbound("rejected", str(exc), envelope_id=signed_id, signed=envelope.signed)
            return
        self._load_keys()
        try:
            command = verify_deploy(
                envelope,
                self.trust.command_keys(),
                device_id=self.config.device_id,
                groups=set(self.cfg.groups),
                last_seq=int(last.get("seq") or 0),
                now=time.time(),
                max_clock_skew_s=self.cfg.max_clock_skew_s,
            )
        except CommandRejected as exc:
            with self._inbox_lock:
                self._inbox.count("bad_signature" if "signature" in str(exc) else "refused")
            self._report_unbound("rejected", f"command refused: {exc}", envelope_id=signed_id, signed=envelope.signed)
            return
        self._remember_command(command)
        if command.pipeline not in self.config.pipelines:
            self._report_unbound(
                "rejected",
                f"no pipeline named {command.pipeline!r} on this device",
                envelope_id=signed_id,
                signed=envelope.signed,
            )
            return
        current = self.stores[command.pipeline].load()
        if current is not None and not current.terminal:
            self._report_unbound(
                "rejected",
                f"update {current.update_id} is still {current.state} on pipeline {command.pipeline}",
                envelope_id=signed_id,
                signed=envelope.signed,
            )
            return
        try:
            trusted = self.trust.target(command.target)
        except (UntrustedMetadata, RepositoryUnavailable) as exc:
            self._report_unbound("rejected", str(exc), envelope_id=signed_id, signed=envelope.signed)
            return
        name = command.pipeline
        running = self._running_version(name)
        offer = Offer(f"{command.id}/{command.seq}", trusted.target, running, rollback_allowed=command.rollback)
        state = new_update(offer, time.time(), current)
        self._write_command(name, envelope, command)
        self._save(name, state)
        accepted, reason = decide_offer(
            running,
            self.hardware_id,
            trusted.target.version,
            list(trusted.target.hardware),
            command.rollback,
            set(self.stores[name].ran_versions()),
        )
        if not accepted:
            self._step(name, state, Reject(reason or "refused"))
            return
        try:
            shortfall = health_rules.window_shortfall(self._policy(name, command), self._result_rate(name))
        except ValueError as exc:
            shortfall = f"health settings: {exc}"
        if shortfall is not None:
            self._step(name, state, Reject(shortfall))
            return
        self._run(name, command)

    def _policy(self, name: str, command: DeployCommand | None) -> health_rules.HealthPolicy:
        """The health window's policy: the deployment's settings over the pipeline's over ``[update]``."""
        cfg = self.cfg
        defaults = {
            "window_s": cfg.health_window_s,
            "min_results": cfg.health_min_results,
            "max_error_rate": cfg.health_max_error_rate,
            "latency_factor": cfg.health_latency_factor,
            "latency_floor_ms": cfg.health_latency_floor_ms,
        }
        deployment = {}
        if command is not None:
            deployment = {
                "window_s": command.health_window_s,
                "min_results": command.health_min_results,
                "latency_factor": command.health_latency_factor,
                "latency_floor_ms": command.health_latency_floor_ms,
            }
        return health_rules.resolve_policy(defaults, self.config.pipelines[name].health.model_dump(), deployment)

    def _result_rate(self, name: str) -> float | None:
        """Results a second the pipeline can give: what it gave over up to the last minute, capped by its source's
        nominal rate (after max_fps and the model's stride; a backlog caught up in a burst must not count as a
        faster source); either alone when the other is unknown; None when neither is known."""
        pipeline = self.daemon.pipelines.get(name)
        if pipeline is None:
            return None
        observed = pipeline.stats.rates()[1]
        nominal = pipeline_rate(pipeline.config, pipeline.predictor, pipeline.source.nominal_rate)
        if observed > 0 and nominal is not None and nominal > 0:
            return min(observed, nominal)
        return observed if observed > 0 else nominal

    def _running_version(self, name: str) -> str:
        pipeline = self.daemon.pipelines.get(name)
        if pipeline is not None:
            return pipeline.predictor.bundle.version
        active = self.slots[name].active_path()
        try:
            return load_bundle(active).version if active is not None else ""
        except AgentError:
            return ""

    def _last_command(self) -> dict[str, Any]:
        return read_json_object(self.dir / "last-command.json")

    def _remember_command(self, command: DeployCommand) -> None:
        write_json_atomic(self.dir / "last-command.json", {"seq": command.seq, "id": command.id})
        with self._inbox_lock:
            self._last = {"seq": command.seq, "id": command.id}

    def _write_command(self, name: str, envelope: SignedEnvelope, command: DeployCommand) -> None:
        write_json_atomic(self.dir / f"{name}.{COMMAND_FILE}", envelope.model_dump())
        self._commands[name] = command

    def _read_command(self, name: str) -> DeployCommand | None:
        """The deployment of the pipeline's current update (read from disk once after a restart, then kept)."""
        if name not in self._commands:
            signed = read_json_object(self.dir / f"{name}.{COMMAND_FILE}").get("signed")
            try:
                self._commands[name] = parse_deploy_command(signed) if isinstance(signed, dict) else None
            except ProtocolError:
                self._commands[name] = None
        return self._commands[name]

    # ---- the update, step by step -------------------------------------------------------------------

    def _resume(self, name: str) -> None:
        state = self.stores[name].load()
        if state is None or state.terminal:
            return
        hold = _fault_hold(state.state)
        if hold:
            log.warning("fault injection: holding in resumed state", state=state.state, seconds=hold)
            if self._stop.wait(hold):
                return
        self._run(name, None)

    def _run(self, name: str, command: DeployCommand | None) -> None:
        state = self.stores[name].load()
        if state is None or state.terminal:
            return
        command = command or self._read_command(name)
        try:
            if state.state == "offered":
                state = self._step(name, state, StartDownload())
            if state.state == "downloading":
                state = self._download(name, state)
            if state.state == "downloaded":
                state = self._validate(name, state, command)
            if state.state in ("validating", "shadow"):
                state = self._activate(name, state)
            if state.state == "trial":
                self._begin_trial(name, state, command)
                return
        except _Interrupted:
            return
        if state.terminal:
            self._cleanup(name, state)

    def _download(self, name: str, state: UpdateState) -> UpdateState:
        slots, target = self.slots[name], state.target
        try:
            slots.ensure_free_space(2 * target.length, int(self.cfg.free_space_margin_mb * 2**20))
        except AgentError as exc:
            return self._step(name, state, Fail(str(exc)))
        download = ChunkDownload(
            self.mqtt.link,
            self.mqtt.topics,
            slots.download_path(target.sha256),
            target.sha256,
            target.length,
            self.cfg.chunk_size,
            window=self.cfg.window,
            timeout_s=self.cfg.request_timeout_s,
            max_retries=self.cfg.max_retries,
        )
        box = [state]
        last_report = [0.0]

        def progress(received: int) -> None:
            now = time.monotonic()
            if now - last_report[0] >= 2.0:
                last_report[0] = now
                box[0] = self._step(name, box[0], Progress(received))

        try:
            path = download.run(self._stop, progress)
        except TransferError as exc:
            if self._stop.is_set():
                raise _Interrupted() from None
            return self._step(name, box[0], Fail(f"download failed: {exc.problem}"))
        state = box[0]
        if not slots.verify_download(target.sha256, target.length):
            download.discard()
            return self._step(name, state, Downloaded(sha_ok=False))
        log.info("target downloaded", pipeline=name, target=target.name, version=target.version, path=str(path))
        return self._step(name, state, Downloaded(sha_ok=True))

    def _validate(self, name: str, state: UpdateState, command: DeployCommand | None) -> UpdateState:
        state = self._step(name, state, StartValidation())
        slots, target = self.slots[name], state.target
        try:
            slot_path = slots.stage(slots.download_path(target.sha256))
        except AgentError as exc:
            return self._step(name, state, ValidationFailed(f"bundle unusable: {exc.problem}"))
        bundle = load_bundle(slot_path)
        if bundle.name != target.name or bundle.version != target.version:
            return self._step(
                name,
                state,
                ValidationFailed(
                    f"bundle is {bundle.name} {bundle.version} but the signed target is {target.name} {target.version}"
                ),
            )
        pipeline = self.daemon.pipelines.get(name)
        current = pipeline.predictor if pipeline is not None else None
        pipe = self.config.pipelines[name]
        report = validate_bundle(
            slot_path,
            current=current,
            threads=pipe.threads or 1,
            latency_runs=self.cfg.latency_runs,
            providers=pipe.providers,
        )
        if not report.ok:
            return self._step(name, state, ValidationFailed(report.reason or "validation failed"))
        state = self._step(name, state, ValidationPassed())
        self._candidates[name] = report.predictor
        if command is not None and command.shadow_frames > 0 and pipeline is not None:
            state = self._step(name, state, StartShadow())
            pipeline.watch_frames(report.predictor)  # frames fit the candidate too (e.g. its size when decoded small)
            try:
                agreement = self._shadow(name, report.predictor, command)
            finally:
                pipeline.watch_frames(None)
            if agreement is None:
                raise _Interrupted()
            state = self._step(name, state, ShadowResult(agreement, command.shadow_agreement))
            if state.terminal:
                self._candidates.pop(name).close()
        return state

    def _shadow(self, name: str, candidate: Predictor, command: DeployCommand) -> float | None:
        tally = ShadowTally(command.shadow_frames, command.shadow_agreement)
        shadow = _Shadow(candidate, tally, queue.Queue(maxsize=2))
        self._shadows[name] = shadow
        task = candidate.bundle.metadata.task
        try:
            while not tally.done:
                if self._stop.is_set():
                    return None
                try:
                    data, main_result = shadow.frames.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    result = _predict(candidate, data).result
                except AgentError:
                    tally.add(0.0)
                    continue
                tally.add(frame_agreement(task, main_result, result))
        finally:
            self._shadows.pop(name, None)
        return tally.agreement

    def _activate(self, name: str, state: UpdateState) -> UpdateState:
        candidate = self._candidates.pop(name, None)
        if candidate is None:  # resumed after a restart between validation and activation
            return self._step(name, state, Fail("validated model lost in a restart"))
        pipeline = self.daemon.pipelines.get(name)
        try:
            policy = self._policy(name, self._read_command(name))
        except ValueError as exc:
            candidate.close()
            return self._step(name, state, Fail(f"health settings: {exc}"))
        # measured before the swap and persisted with the state: a restart in trial must not judge the new model
        # against its own first runs
        baseline = _fault_baseline(_running_p95(pipeline, self._swapped_at.get(name, 0)))
        state = self._step(name, state, Activate(baseline_p95_ms=baseline, health=policy))
        slots = self.slots[name]
        old_slot = slots.active_slot()
        try:
            slots.activate(slots.inactive_slot())
        except AgentError as exc:
            candidate.close()
            return self._step(name, state, ActivationFailed(exc.problem))
        previous = pipeline.swap_predictor(candidate) if pipeline is not None else None
        self._mark_swap(name, pipeline)
        log.info("model activated", pipeline=name, version=state.target.version, previous_slot=old_slot)
        state = self._step(name, state, Activated())
        self._announce_models()
        self._trials[name] = _Trial(self._health_window(name, state, pipeline), previous)
        return state

    def _health_window(self, name: str, state: UpdateState, pipeline: Any) -> health_rules.HealthWindow:
        """The window of ``state``'s trial, with the baseline and policy persisted at activation (an update
        activated by an older agent has none: its policy comes from the settings, and no baseline is guessed)."""
        policy = state.health
        if policy is None:
            try:
                policy = self._policy(name, self._read_command(name))
            except ValueError:
                policy = health_rules.HealthPolicy()
        budget = pipeline.predictor.bundle.metadata.budget.latency_ms if pipeline is not None else None
        log.info(
            "health window",
            pipeline=name,
            window_s=policy.window_s,
            min_results=policy.min_results,
            baseline_p95_ms=state.baseline_p95_ms,
            latency_factor=policy.latency_factor,
            latency_floor_ms=policy.latency_floor_ms,
        )
        return health_rules.HealthWindow(policy, time.monotonic(), state.baseline_p95_ms, budget)

    def _begin_trial(self, name: str, state: UpdateState, command: DeployCommand | None) -> None:
        if name not in self._trials:  # resumed after a restart: the health window starts again
            pipeline = self.daemon.pipelines.get(name)
            self._trials[name] = _Trial(self._health_window(name, state, pipeline), None)
        threading.Thread(target=self._watch_trial, args=(name,), name=f"trial-{name}", daemon=True).start()

    def _watch_trial(self, name: str) -> None:
        while not self._stop.wait(0.25):
            trial = self._trials.get(name)
            if trial is None:
                return
            with self._lock:
                verdict = trial.window.verdict(time.monotonic())
            if verdict.ok is None:
                continue
            if verdict.retime:  # slower than the baseline measured before the swap: time both again, side by side
                verdict = self._retime(name, trial)
                if self._stop.is_set():
                    return  # stopping: the trial resumes on the next start
            self._finish_trial(name, trial, bool(verdict.ok), verdict.reason)
            return

    def _retime(self, name: str, trial: _Trial) -> health_rules.HealthVerdict:
        """Paired re-timing: the previous model (still open, else loaded from its slot) and a second instance of the
        new one run alternately on the latest input, under the load of this moment, for at most
        ``RETIME_PAIRS`` pairs or ``RETIME_MAX_S`` seconds; the window judges from that. Anything that fails here
        leaves the suspected verdict standing."""
        opened: list[Predictor] = []
        new_ms: list[float] = []
        previous_ms: list[float] = []
        try:
            data = trial.last_input
            pipe = self.config.pipelines[name]
            slots = self.slots[name]
            active, before = slots.active_path(), slots.previous_path()
            previous = trial.previous
            if data is None or active is None or (previous is None and before is None):
                raise AgentError("no input seen or no previous slot to time")
            if previous is None:
                previous = self.daemon.open_predictor(pipe, str(before))
                opened.append(previous)
            second = self.daemon.open_predictor(pipe, str(active))
            opened.append(second)
            for model in (second, previous):  # warm-up runs, not timed
                _predict(model, data)
            deadline = time.monotonic() + health_rules.RETIME_MAX_S
            for i in range(health_rules.RETIME_PAIRS):
                order = ((second, new_ms), (previous, previous_ms))
                for model, out in order if i % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    _predict(model, data)
                    out.append((time.perf_counter() - started) * 1000.0)
                if time.monotonic() > deadline or self._stop.is_set():
                    break
        except (AgentError, OSError, ValueError) as exc:
            log.warning("paired re-timing not possible", pipeline=name, error=str(exc))
            new_ms, previous_ms = [], []
        finally:
            for model in opened:
                with contextlib.suppress(Exception):
                    model.close()
        with self._lock:
            verdict = trial.window.confirm_latency(new_ms, previous_ms)
        log.info(
            "health window latency re-timed",
            pipeline=name,
            pairs=min(len(new_ms), len(previous_ms)),
            new_median_ms=_rounded_median(new_ms),
            previous_median_ms=_rounded_median(previous_ms),
            ok=verdict.ok,
        )
        return verdict

    def _finish_trial(self, name: str, trial: _Trial, ok: bool, reason: str | None) -> None:
        self._trials.pop(name, None)
        state = self.stores[name].load()
        if state is None or state.state != "trial":
            return
        state = self._step(name, state, HealthVerdict(ok, reason))
        pipeline = self.daemon.pipelines.get(name)
        if state.state == "committed":
            self.stores[name].record_committed(state.target.version)
            if trial.previous is not None:
                trial.previous.close()
            log.info("update committed", pipeline=name, version=state.target.version)
        else:
            self._roll_back(name, pipeline, trial.previous)
            log.warning("update rolled back", pipeline=name, reason=state.reason)
        self._cleanup(name, state)
        self._announce_models()

    def _roll_back(self, name: str, pipeline: Any, previous: Predictor | None) -> None:
        try:
            path = self.slots[name].rollback()
        except AgentError as exc:
            log.error("rollback impossible", pipeline=name, error=str(exc))
            return
        if pipeline is None:
            return
        if previous is None:
            try:
                previous = self.daemon.open_predictor(self.config.pipelines[name], str(path))
            except AgentError as exc:
                log.error("previous model does not load", pipeline=name, error=str(exc))
                return
        pipeline.swap_predictor(previous).close()
        self._mark_swap(name, pipeline)

    def _mark_swap(self, name: str, pipeline: Any) -> None:
        """Remember where the model changed: the next baseline is taken from the inferences after this point."""
        if pipeline is not None:
            self._swapped_at[name] = pipeline.stats.processed

    def diagnostics(self) -> dict[str, Any]:
        """Update state per pipeline for the ``diagnostics`` command."""
        out: dict[str, Any] = {"hardware_id": self.hardware_id}
        for name, slots in self.slots.items():
            state = self.stores[name].load()
            out[name] = {
                "active_slot": slots.active_slot(),
                "previous": str(slots.previous_path()) if slots.previous_path() else None,
                "update": None
                if state is None
                else {"id": state.update_id, "state": state.state, "reason": state.reason},
                "ran_versions": sorted(self.stores[name].ran_versions()),
            }
        return out

    # ---- the pipelines' observer (post stage thread) ------------------------------------------------------

    def observe(
        self, name: str, sample: Sample, prediction: Prediction | None, infer_ms: float | None, error: str | None
    ) -> None:
        trial = self._trials.get(name)
        if trial is not None:
            finite = prediction is None or _all_finite(prediction.result)
            with self._lock:
                trial.window.observe(time.monotonic(), error is None, infer_ms, finite)
            if prediction is not None:
                trial.last_input = sample.data
        shadow = self._shadows.get(name)
        if shadow is not None and prediction is not None:
            with contextlib.suppress(queue.Full):
                shadow.frames.put_nowait((sample.data, prediction.result))

    # ---- persistence and reporting ----------------------------------------------------------------

    def _step(self, name: str, state: UpdateState, event: Any) -> UpdateState:
        new = transition(state, event, time.time())
        self._save(name, new)
        return new

    def _save(self, name: str, state: UpdateState) -> None:
        self.stores[name].save(state)
        self._report(name, state)
        hold = _fault_hold(state.state) if self.mqtt is not None else 0.0  # at start-up: held in resume
        if hold:
            log.warning("fault injection: holding in state", state=state.state, seconds=hold)
            self._stop.wait(hold)

    def _report(self, name: str, state: UpdateState) -> None:
        command = self._read_command(name)
        status = UpdateStatus(
            device_id=self.config.device_id,
            ts=round(time.time(), 3),
            update_id=state.update_id,
            step=state.save_counter,
            command_id=command.id if command else None,
            seq=command.seq if command else None,
            pipeline=name,
            state=state.state,  # type: ignore[arg-type]
            reason=state.reason,
            target=command.target if command else None,
            name=state.target.name,
            version=state.target.version,
            from_version=state.from_version or None,
            progress=state.progress,
            total=state.target.length,
            agreement=state.agreement,
            running=self._running_version(name) or None,
        )
        log.info("update state", pipeline=name, state=state.state, reason=state.reason, version=state.target.version)
        self._publish(encode(status), name)

    def _report_unbound(
        self,
        state: str,
        reason: str,
        envelope_id: str | None,
        signed: dict[str, Any] | None = None,
        logged: bool = False,
    ) -> None:
        """A command refused before it became an update of a pipeline (no persisted state to attach it to);
        ``logged``: already logged by ``_refuse``."""
        if not logged:
            now = time.monotonic()
            self._refusal_log.warning("refused", "deployment command refused", now, state=state, reason=reason[:300])
        signed = signed or {}
        pipeline = signed.get("pipeline") if isinstance(signed.get("pipeline"), str) else None
        # the command is unverified here: echo its id, seq and target only when they have the protocol's shape
        envelope_id = echo_id(signed.get("id", envelope_id))  # as sent, not cut to length: cut, it would pass
        seq = signed.get("seq")
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else 0
        target = signed.get("target")
        status = {
            "v": 1,
            "device_id": self.config.device_id,
            "ts": round(time.time(), 3),
            "update_id": f"{envelope_id or 'unknown'}/{seq}",
            "command_id": envelope_id,
            "pipeline": pipeline if pipeline in self.config.pipelines else next(iter(self.config.pipelines)),
            "state": state,
            "reason": reason[:500],
            "target": target if isinstance(target, str) and TARGET_PATH.fullmatch(target) else None,
        }
        self._publish(encode({k: v for k, v in status.items() if v is not None}))

    def _publish(self, payload: bytes, pipeline: str | None = None) -> None:
        if self.mqtt is None:
            self._pending_reports.append((payload, pipeline))
            return
        self.mqtt.link.publish_durable(update_status_topic(self.mqtt.topics), payload, priority="critical")
        if pipeline is not None:  # the latest state, retained, for a fleet server that missed the stream
            self._latest[pipeline] = payload
            self.mqtt.link.publish_now(update_state_topic(self.mqtt.topics, pipeline), payload, qos=1, retain=True)

    def _republish_latest(self) -> None:
        for pipeline, payload in list(self._latest.items()):
            self.mqtt.link.publish_now(update_state_topic(self.mqtt.topics, pipeline), payload, qos=1, retain=True)

    def _announce_models(self) -> None:
        if self.mqtt is not None:
            self.mqtt.link.publish_now(self.mqtt.topics.status, self.mqtt.status_online(), qos=1, retain=True)

    def _cleanup(self, name: str, state: UpdateState) -> None:
        """A finished update leaves no download behind (the slots keep the previous model for rollback)."""
        try:
            path = self.slots[name].download_path(state.target.sha256)
        except AgentError:
            return
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".chunks").unlink(missing_ok=True)


def _fault_hold(state: str) -> float:
    """Test hook (Mender-style kill-in-every-state tests): ``EDGE_AGENT_FAULT_HOLD="validating,trial:5"`` makes the
    agent wait 5 s right after persisting each named state, so a test can ``kill -9`` it exactly there."""
    spec = os.environ.get("EDGE_AGENT_FAULT_HOLD", "")
    if not spec or ":" not in spec:
        return 0.0
    states, _, seconds = spec.rpartition(":")
    try:
        return float(seconds) if state in states.split(",") else 0.0
    except ValueError:
        return 0.0


def _fault_baseline(measured: float | None) -> float | None:
    """Test hook: ``EDGE_AGENT_FAULT_BASELINE_MS=0.001`` replaces the previous model's measured p95 (as if it had
    been measured on a far less busy CPU), so that a test can make the latency rule trip on a model as fast as the
    old one and see the paired re-timing decide."""
    try:
        return float(os.environ["EDGE_AGENT_FAULT_BASELINE_MS"])
    except (KeyError, ValueError):
        return measured


class _Interrupted(Exception):
    """The agent is stopping: leave the persisted state as it is (it resumes on the next start)."""


def _predict(predictor: Predictor, data: Any) -> Prediction:
    """One prediction on a pipeline's sample data, whatever the model's input kind."""
    if predictor.kind == "timeseries":
        return predictor.predict_window(data)
    if predictor.kind == "image":
        return predictor.predict_image(data)
    return predictor.predict_tensors([data])


def _running_p95(pipeline: Any, swapped_at: int) -> float | None:
    """The running model's p95 inference time (ms) before a swap (``health.baseline_p95``); None when unknown."""
    if pipeline is None:
        return None
    return health_rules.baseline_p95(list(pipeline.stats.infer_ms), pipeline.stats.processed, swapped_at)


def _rounded_median(values: list[float]) -> float | None:
    median = health_rules.median_of(values)
    return None if median is None else round(median, 3)


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True
