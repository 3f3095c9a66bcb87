"""`edge-agent check`: everything a daemon start needs, verified up front."""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.extras import commands_unavailable, missing_extras, pip_install
from agent.pipeline import choose_inference, pipeline_rate
from agent.predictor import Predictor
from agent.runtime import runtime_report
from agent.sources import create_source


def run_checks(config: AgentConfig) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []

    def add(what: str, ok: bool, detail: str, **extra: Any) -> None:
        checks.append({"what": what, "ok": ok, "detail": detail} | extra)

    add("config", True, f"valid; device_id={config.device_id}, {len(config.pipelines)} pipeline(s)")
    add_board(config, add)
    usable = [r for r in runtime_report() if r.available]
    for r in runtime_report():
        detail = (
            f"{r.version}" + (f" providers={','.join(r.providers)}" if r.providers else "")
            if r.available
            else str(r.reason)
        )
        add(f"runtime {r.name}", True, ("usable " if r.available else "not usable: ") + detail, available=r.available)
    if not usable:
        add("runtimes", False, f"no runtime usable (fix: {pip_install('litert,onnx')})")
    # The modules `run` imports for each configured feature, imported here too: a check that passes means run starts.
    missing = {m.extra: m for m in missing_extras(config)}
    for m in missing.values():
        add(m.check, False, str(m))
    if config.mqtt is not None and "mqtt" not in missing:
        ok, detail = probe_broker(config)
        add("mqtt broker", ok, detail)
        if (off := commands_unavailable()) is not None:
            add("device commands", True, f"off: {off}")
    if config.update.enabled and "update" not in missing:
        add_update(config, add)
    rates: dict[str, float | None] = {}  # samples a second each source delivers at most
    for name, src_cfg in config.sources.items():
        if src_cfg.type == "serial" and "serial" in missing:
            continue
        source = create_source(src_cfg, name)
        try:
            problem = source.probe()
            rates[name] = source.nominal_rate
        finally:
            source.close()
        add(f"source {name}", problem is None, problem or f"{src_cfg.type} source opens")
    for name, pipe in config.pipelines.items():
        try:
            predictor = Predictor.open(
                pipe.model, runtime=None if pipe.runtime == "auto" else pipe.runtime, threads=pipe.threads
            )
        except AgentError as exc:
            add(f"pipeline {name}", False, str(exc))
            continue
        try:
            golden = predictor.verify_golden()
            kind = config.sources[pipe.source].type
            info = predictor.model.info
            detail = f"{predictor.bundle.name} {predictor.bundle.version} on {info.runtime} {info.runtime_version}"
            if predictor.bundle.metadata.golden is not None:
                detail += ", golden vectors " + ("pass" if not golden else "FAIL: " + "; ".join(golden))
            detail += provider_note(getattr(pipe, "providers", None), info.format)
            rate = pipeline_rate(pipe, predictor, rates.get(pipe.source))
            in_process, cpus, took_ms = choose_inference(pipe.inference, predictor, rate)
            where = "process" if in_process else "thread"
            why = ""
            if pipe.inference == "auto":
                timed = f"{took_ms:.2f} ms an inference, " if took_ms is not None else ""
                pace = (
                    "source rate unknown"
                    if rate is None
                    else "at most as fast as processed"
                    if rate == math.inf
                    else f"at most {rate:g}/s"
                )
                why = f" (auto: {timed}{pace}, {cpus} CPU{'s' if cpus > 1 else ''})"
            add(
                f"pipeline {name}",
                not golden,
                f"{detail}, inference in a {where}{why} (source {pipe.source}: {kind})",
                inference=where,
            )
        finally:
            predictor.close()
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def add_update(config: AgentConfig, add: Any) -> None:
    """The pinned trust root (or the newer verified one), its command keys, and what each pipeline's slots hold."""
    from agent.update.commands import CommandKeys, CommandRejected
    from agent.update.slots import SlotStore
    from agent.update.store import UpdateStore
    from agent.update.trust import root_summary

    state_dir = Path(config.state_dir)
    current = state_dir / "updates" / "tuf" / "root.json"
    source = current if current.exists() else (Path(config.update.trust_root) if config.update.trust_root else None)
    if source is None:
        add(
            "update trust root",
            False,
            "no trust root (fix: set [update].trust_root to the root.json from `fleet device provision`)",
        )
    else:
        try:
            summary, field = root_summary(source)
            CommandKeys.from_root_field(field)
            add("update trust root", True, f"{source}: {summary}")
        except (AgentError, CommandRejected) as exc:
            add("update trust root", False, f"{source}: {exc}")
    for name in config.pipelines:
        slots = SlotStore(state_dir, name)
        state = UpdateStore(state_dir / "updates" / f"{name}.json").load()
        active = slots.active_slot()
        detail = f"active slot {active}" if active else "no slot yet (the configured model is installed at first start)"
        if state is not None:
            detail += f"; last update {state.target.name} {state.target.version}: {state.state}" + (
                f" ({state.reason})" if state.reason else ""
            )
        add(f"update slots {name}", True, detail)


def add_board(config: AgentConfig, add: Any) -> None:
    try:
        from agent.board import detect_board
        from agent.profiles import get_profile
    except ImportError:
        add("board", True, "board detection not available")
        return
    try:
        from pathlib import Path

        board = detect_board(Path(config.board_root))
        profile_id = board.profile_id if config.profile == "auto" else config.profile
        if profile_id is None:
            add(
                "board",
                False,
                f"unknown board ({board.model or 'no model string'}) (fix: set profile = '<id>' in agent.toml)",
            )
            return
        profile = get_profile(profile_id)
        add("board", True, f"{board.model or profile.name}: profile {profile.id}")
    except AgentError as exc:
        add("board", False, str(exc))


def provider_note(wanted: list[str] | None, model_format: str) -> str:
    """``; warning: ...`` naming configured ONNX execution providers missing here and what runs instead, or ''."""
    if not wanted or model_format != "onnx":
        return ""
    from agent.runtime.onnxruntime import available_providers, choose_providers, missing_providers, provider_warning

    chosen = choose_providers(wanted, available_providers())
    missing = missing_providers(wanted, chosen)
    return f"; warning: {provider_warning(missing, chosen)}" if missing else ""


def check_client_id(device_id: str) -> str:
    """The MQTT client id of `edge-agent check`'s probe: never the agent's own."""
    return f"{device_id}-check-{secrets.token_hex(3)}"


def probe_broker(config: AgentConfig, timeout: float = 5.0) -> tuple[bool, str]:
    """Connect once with the configured credentials and TLS: the same CONNACK the daemon would get."""
    from agent.mqtt.client import MqttLink
    from agent.protocol import Topics

    assert config.mqtt is not None
    from agent.daemon import agent_running

    if agent_running(config.state_dir):
        # A broker that binds client ids to usernames (use_username_as_clientid, as `fleet device provision`
        # configures it) would give the probe the agent's id: connecting would take over the running agent's session.
        return True, (
            f"not probed: the agent running on {config.state_dir} holds the device's broker connection (a second "
            "connection with its credentials would take over its session); its telemetry reports the link"
        )
    # Its own client id: a broker drops the older of two connections with one id, and that would be the running
    # agent's (its will would even announce it offline).
    probe_config = config.mqtt.model_copy(update={"client_id": check_client_id(config.device_id)})
    try:
        topics = Topics.for_device(config.device_id, config.mqtt.topic_prefix)
        link = MqttLink(probe_config, config.device_id, topics, None, lambda: b"", lambda reason: b"")
    except AgentError as exc:
        return False, str(exc)
    return link.probe(timeout)
