"""Operator actions shared by the console and the server: rollouts (created, driven, controlled), signed deployment
and device commands. The rollout decisions are ``fleet.rollout``'s (pure); this module persists its state in the
registry (optimistic concurrency: several servers may drive the same rollout) and carries out its actions."""

from __future__ import annotations

import getpass
import json
import secrets
import threading
import time
from dataclasses import asdict
from typing import Any

import structlog

from agent.protocol import Topics, parse_json_object
from agent.protocol.update import deploy_topic
from fleet import rollout as engine
from fleet.config import FleetConfig
from fleet.db import Registry, RolloutConflict
from fleet.errors import FleetError
from fleet.keys import KeyStore
from fleet.mqtt import FleetLink
from fleet.repository import Repository

log = structlog.get_logger(__name__)
ACTIVE = ("created", "running", "paused")
DEVICE_COMMANDS = ("restart", "reload", "set", "diagnostics")
AGENT_HEALTH_MIN_RESULTS = 20  # the agent's [update].health_min_results default (agent/config.py)


class Operations:
    """One operator (console) or server's handle on registry, repository and broker."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        actor: str | None = None,
        registry: Registry | None = None,
        repository: Repository | None = None,
        link: FleetLink | None = None,
    ) -> None:
        self.config = config
        self.actor = actor or _user()
        self.registry = registry or Registry(config.database_url)
        self.repository = repository or Repository(config.repository_dir, KeyStore(config.keys_dir))
        self._link = link
        self._own_link = link is None
        self._acks: dict[str, dict[str, Any]] = {}
        self._ack_cond = threading.Condition()

    # ---- broker ------------------------------------------------------------------------------------

    @property
    def link(self) -> FleetLink:
        if self._link is None:
            b = self.config.broker
            self._link = FleetLink(
                b.url,
                f"fleet-ops-{secrets.token_hex(4)}",
                username=b.username,
                password=self.config.broker_password(),
                ca=b.ca,
            )
            self._link.start()
        return self._link

    def topics(self, device_id: str) -> Topics:
        return Topics.for_device(device_id, self.config.broker.device_prefix)

    def close(self) -> None:
        if self._link is not None and self._own_link:
            self._link.stop()
        self.registry.close()

    # ---- rollouts ----------------------------------------------------------------------------------

    def create_rollout(
        self,
        target: str,
        *,
        group: str | None = None,
        devices: list[str] | None = None,
        pipeline: str = "main",
        policy: engine.RolloutPolicy,
        shadow_frames: int = 0,
        shadow_agreement: float = 0.9,
        health_window_s: float | None = None,
        health_latency_factor: float | None = None,
        health_latency_floor_ms: float | None = None,
        health_min_results: int | None = None,
        rollback: bool = False,
        rollout_id: str | None = None,
        rollback_of: str | None = None,
    ) -> dict[str, Any]:
        """Start a rollout of ``target`` to a group or a device list; returns its summary.

        Refused (FleetError, with the arithmetic) when ``health_window_s`` is too short for a device's result rate
        (its latest telemetry) to give ``health_min_results`` results (default: the agent's). Devices that report
        running the target already count as done at once. ``rollback_of``: this is ``fleet rollback`` of that
        rollout (audited as ``rollout.rollback``)."""
        known = {t.path: t for t in self.repository.targets()}
        if target not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise FleetError(
                f"target {target!r} is not in the repository (published: {listed})",
                "publish it with `fleet bundle publish`",
            )
        if (group is None) == (devices is None):
            raise FleetError("name either --group or --devices", "e.g. --group lab or --devices cam-1,cam-2")
        if group is not None:
            if group not in {g["name"] for g in self.registry.groups()}:
                raise FleetError(f"unknown group {group!r}", "see `fleet groups` for the groups that exist")
            ids = [d["id"] for d in self.registry.devices(group=group)]
            if not ids:
                raise FleetError(f"group {group!r} has no devices", "provision devices into it first")
        else:
            ids = list(dict.fromkeys(devices or []))
            missing = [d for d in ids if self.registry.device(d, updates=0, telemetry=0, events=0) is None]
            if missing:
                raise FleetError(
                    f"unknown device(s): {', '.join(missing)}", "see `fleet devices` for the devices that exist"
                )
        registered = {d["id"]: d for d in self.registry.devices()}
        info = known[target]
        before = {d: (registered.get(d) or {}).get("models", {}).get(pipeline) for d in ids}
        running = [d for d in ids if runs_target(before[d], info)]
        if health_window_s is not None:  # judged on the devices that will run the window
            min_results = health_min_results if health_min_results is not None else AGENT_HEALTH_MIN_RESULTS
            rates = {d: (registered.get(d) or {}).get("fps") for d in ids if d not in running}
            shortfall = engine.health_window_shortfall(health_window_s, min_results, rates)
            if shortfall is not None:
                raise FleetError(*shortfall)
        online = {d["id"] for d in self.registry.devices(online=True)}
        now = time.time()
        rollout_id = rollout_id or f"r-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        state = engine.new_rollout(rollout_id, target, ids, policy, online=online)
        for device in running:
            state, _ = engine.step(state, engine.AlreadyRunning(device, now))
        deploy = {
            "pipeline": pipeline,
            "shadow_frames": shadow_frames,
            "shadow_agreement": shadow_agreement,
            "health_window_s": health_window_s,
            "health_latency_factor": health_latency_factor,
            "health_latency_floor_ms": health_latency_floor_ms,
            "health_min_results": health_min_results,
            "rollback": rollback,
            "rollback_of": rollback_of,
            "group": group,
            # what each device reported running before (the rollback of this rollout goes back to it)
            "before": {d: m for d, m in before.items() if isinstance(m, dict)},
        }
        version = self.registry.save_rollout(
            rollout_id, target, {"policy": asdict(policy), "deploy": deploy}, engine.to_dict(state), state.status
        )
        detail: dict[str, Any] = {"id": rollout_id, "target": target, "devices": len(ids), "group": group}
        if running:
            detail["already_running"] = running
        if rollback_of is not None:
            self.registry.record_audit(self.actor, "rollout.rollback", detail | {"rollback_of": rollback_of})
        else:
            self.registry.record_audit(self.actor, "rollout.create", detail)
        self.apply(rollout_id, engine.Start(now), expect_version=version)
        return self.rollout(rollout_id)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        row = self.registry.load_rollout(rollout_id)
        if row is None:
            raise FleetError(f"unknown rollout {rollout_id!r}", "see `fleet rollout list`")
        state = engine.from_dict(row["state"])
        return {"id": rollout_id, "target": row["target"], "status": state.status, "reason": state.reason} | {
            "summary": engine.summary(state),
            "devices": {d: asdict(r) for d, r in state.records.items()},
        }

    def rollouts(self, status: str | None = None) -> list[dict[str, Any]]:
        out = []
        for row in self.registry.list_rollouts(status):
            state = engine.from_dict(row["state"])
            out.append({"id": row["id"], "target": row["target"], "status": state.status} | engine.summary(state))
        return out

    def control_rollout(self, rollout_id: str, action: str, reason: str | None = None) -> dict[str, Any]:
        if action not in ("pause", "resume", "abort"):
            raise FleetError(f"unknown rollout action {action!r}", "use pause, resume or abort")
        if action == "abort":
            event: Any = engine.Abort(reason or f"aborted by {self.actor}")
        elif action == "resume":
            event = engine.Resume(time.time())
        else:
            event = engine.Pause(reason or "")
        if self.registry.load_rollout(rollout_id) is None:
            raise FleetError(f"unknown rollout {rollout_id!r}", "see `fleet rollout list`")
        self.registry.record_audit(self.actor, f"rollout.{action}", {"id": rollout_id, "reason": reason})
        self.apply(rollout_id, event)
        return self.rollout(rollout_id)

    def rollback(self, rollout_id: str, *, health_window_s: float | None = None) -> dict[str, Any]:
        """A new rollout, marked as an explicit signed rollback, of the version the committed devices ran before
        (audited as ``rollout.rollback`` naming ``rollout_id``, success and failure alike). The health window is
        ``health_window_s``, else the original rollout's (with its other health settings)."""
        try:
            return self._rollback(rollout_id, health_window_s)
        except FleetError as exc:
            self.registry.record_audit(
                self.actor, "rollout.rollback", {"rollback_of": rollout_id}, ok=False, error=str(exc)
            )
            raise

    def _rollback(self, rollout_id: str, health_window_s: float | None) -> dict[str, Any]:
        row = self.registry.load_rollout(rollout_id)
        if row is None:
            raise FleetError(f"unknown rollout {rollout_id!r}", "see `fleet rollout list`")
        state = engine.from_dict(row["state"])
        devices = engine.rollback_plan(state)
        if not devices:
            raise FleetError(f"rollout {rollout_id} has no committed devices to roll back", "nothing to do")
        deploy = row["policy"].get("deploy", {})
        pipeline = deploy.get("pipeline", "main")
        previous = self._previous_target(rollout_id, devices, deploy)
        policy = engine.RolloutPolicy(**row["policy"]["policy"])
        return self.create_rollout(
            previous,
            devices=devices,
            pipeline=pipeline,
            policy=policy,
            rollback=True,
            rollback_of=rollout_id,
            health_window_s=health_window_s if health_window_s is not None else deploy.get("health_window_s"),
            health_latency_factor=deploy.get("health_latency_factor"),
            health_latency_floor_ms=deploy.get("health_latency_floor_ms"),
            health_min_results=deploy.get("health_min_results"),
        )

    def _previous_target(self, rollout_id: str, devices: list[str], deploy: dict[str, Any]) -> str:
        """The target path of what ``devices`` ran before rollout ``rollout_id``: what they reported running when it
        was created (name, version, model sha256), else the ``from_version`` of their committed update. A model
        never published is found among the agent's built-in samples by its hash and published; otherwise the
        FleetError says exactly what to publish."""
        before: dict[str, Any] = deploy.get("before") or {}
        ran: dict[tuple[str | None, str, str | None], list[str]] = {}
        unknown: list[str] = []
        for device in devices:
            model = before.get(device)
            if isinstance(model, dict) and model.get("version"):
                key = (model.get("name"), str(model["version"]), model.get("sha256") or None)
            else:
                key = self._from_history(device, rollout_id)
            if key is None:
                unknown.append(device)
            else:
                ran.setdefault(key, []).append(device)
        if unknown or not ran:
            raise FleetError(
                f"cannot tell which version {', '.join(unknown or devices)} ran before {rollout_id}: the devices "
                "reported no model before it and no update of it names the version it replaced",
                "deploy the wanted target explicitly with `fleet deploy TARGET --devices ... --rollback`",
            )
        if len(ran) > 1:
            listed = "; ".join(f"{n or '?'} {v}: {', '.join(ds)}" for (n, v, _), ds in ran.items())
            raise FleetError(
                f"the devices of {rollout_id} ran different versions before it ({listed})",
                "roll each set back with `fleet deploy NAME@VERSION --devices ... --rollback`",
            )
        ((name, version, sha256),) = ran
        for target in self.repository.targets():
            if target.version == version and (name is None or target.name == name):
                return target.path
            if sha256 and target.model_sha256 == sha256 and target.version == version:
                return target.path
        return self._publish_sample(name, version, sha256, rollout_id)

    def _from_history(self, device: str, rollout_id: str) -> tuple[str | None, str, str | None] | None:
        info = self.registry.device(device, updates=200, telemetry=0, events=0) or {}
        for update in info.get("updates", []):
            if update.get("command_id") == rollout_id and update.get("state") == "committed":
                from_version = (update.get("detail") or {}).get("from_version")
                if from_version:
                    return None, str(from_version), None
        return None

    def _publish_sample(self, name: str | None, version: str, sha256: str | None, rollout_id: str) -> str:
        """Publish the agent's built-in sample the devices ran first (found by model hash); FleetError naming what
        to publish when it is not one."""
        from fleet.bundles import archive_for_publish, sample_models

        what = f"{name or 'the model'} {version}" + (f" (model sha256 {sha256[:16]}...)" if sha256 else "")
        sample = next((s for s in sample_models() if sha256 and s.model_sha256 == sha256), None)
        if sample is None or sample.version != version:
            raise FleetError(
                f"the devices ran {what} before {rollout_id}, and it was never published",
                f"publish that bundle (`fleet bundle publish {name or 'NAME'}-{version}.tar.gz`, built from the same "
                f"model file), then run `fleet rollback {rollout_id}` again",
            )
        import tempfile
        from pathlib import Path

        target_path = f"{sample.name}/{sample.name}-{sample.version}.tar.gz"
        with tempfile.TemporaryDirectory(prefix="fleet-rollback-") as tmp:
            archive = archive_for_publish(sample.path, Path(tmp))
            change = self.repository.add_target(
                archive,
                target_path,
                name=sample.name,
                version=sample.version,
                hardware=[],
                task=None,
                input_kind=sample.input_kind,
                model_sha256=sample.model_sha256,
            )
        self.registry.record_audit(
            self.actor,
            "bundle.publish",
            {"target": target_path, "sample": str(sample.path), "reason": f"rollback of {rollout_id}"},
        )
        if change.staged:
            raise FleetError(
                f"{target_path} (the agent's sample the devices ran first) is staged: the targets key is offline",
                f"sign it (`fleet keys sign --key PEM`, `fleet keys publish`), then run `fleet rollback {rollout_id}` again",
            )
        return target_path

    def apply(self, rollout_id: str, event: Any, *, expect_version: int | None = None, attempts: int = 5) -> bool:
        """Step a rollout with ``event``, save it (retrying on concurrent changes), then carry out its actions."""
        for _ in range(attempts):
            row = self.registry.load_rollout(rollout_id)
            if row is None:
                raise FleetError(f"unknown rollout {rollout_id!r}", "see `fleet rollout list`")
            version = row["version"] if expect_version is None else expect_version
            expect_version = None
            state = engine.from_dict(row["state"])
            new, actions = engine.step(state, event)
            if new == state and not actions:
                return False
            try:
                self.registry.save_rollout(
                    rollout_id, row["target"], row["policy"], engine.to_dict(new), new.status, expect_version=version
                )
            except RolloutConflict:
                continue
            self.execute(row, new, actions)
            return True
        return False

    def drive(self, rollout_id: str, now: float | None = None) -> bool:
        """Feed a rollout what the registry knows (device states, presence) and a tick; True when it changed."""
        now = time.time() if now is None else now
        row = self.registry.load_rollout(rollout_id)
        if row is None:
            return False
        state = engine.from_dict(row["state"])
        if state.finished:
            return False
        events: list[Any] = []
        for device, latest in self.registry.latest_update_states(rollout_id).items():
            record = state.records.get(device)
            if record is not None and latest["state"] != record.device_state:
                events.append(engine.DeviceState(device, latest["state"], now, latest.get("reason")))
        online = {d["id"] for d in self.registry.devices(online=True)}
        for device in state.devices:
            if device in online and device not in state.online:
                events.append(engine.DeviceOnline(device, now))
            elif device not in online and device in state.online:
                events.append(engine.DeviceOffline(device, now))
        events.append(engine.Tick(now))
        new, actions = state, []
        for event in events:
            new, more = engine.step(new, event)
            actions.extend(more)
        if new == state and not actions:
            return False
        try:
            self.registry.save_rollout(
                rollout_id, row["target"], row["policy"], engine.to_dict(new), new.status, expect_version=row["version"]
            )
        except RolloutConflict:
            return False  # another server drove it in between: its actions, not ours
        self.execute(row, new, actions)
        return True

    def execute(self, row: dict[str, Any], rollout: engine.Rollout, actions: list[Any]) -> None:
        deploy = row["policy"].get("deploy", {})
        for action in actions:
            if isinstance(action, engine.SendDeploy):
                self.send_deploy(action.device, rollout, deploy)
            elif isinstance(action, engine.CancelDeploy):
                self.link.publish(deploy_topic(self.topics(action.device)), b"", qos=1, retain=True)
            elif isinstance(action, engine.Audit):
                self.registry.record_audit(
                    self.actor, f"rollout.{action.kind}", {"id": rollout.id} | dict(action.detail)
                )
            elif isinstance(action, engine.Notify):
                log.info("rollout", id=rollout.id, message=action.message)
            elif isinstance(action, engine.RolloutFinished):
                self.registry.record_audit(
                    self.actor,
                    "rollout.finished",
                    {
                        "id": rollout.id,
                        "status": action.status,
                        "failed": list(action.failed),
                        "unreached": list(action.unreached),
                    },
                )

    def send_deploy(self, device: str, rollout: engine.Rollout, deploy: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        seq = self.registry.next_command_seq()
        lifetime = rollout.policy.device_timeout_s + rollout.policy.offline_grace_s
        signed = {
            "v": 1,
            "type": "deploy",
            "id": rollout.id,
            "seq": seq,
            "issued": round(now, 3),
            "expires": round(now + lifetime, 3),
            "device": device,
            "pipeline": deploy.get("pipeline", "main"),
            "target": rollout.target,
            "rollback": bool(deploy.get("rollback", False)),
            "shadow_frames": int(deploy.get("shadow_frames") or 0),
            "shadow_agreement": float(deploy.get("shadow_agreement", 0.9)),
        }
        if deploy.get("health_window_s"):
            signed["health_window_s"] = float(deploy["health_window_s"])
        for key in ("health_latency_factor", "health_latency_floor_ms"):
            if deploy.get(key) is not None:
                signed[key] = float(deploy[key])
        if deploy.get("health_min_results") is not None:
            signed["health_min_results"] = int(deploy["health_min_results"])
        envelope = self.repository.sign_command(signed)
        self.registry.record_command(seq, rollout.id, device, "deploy", envelope, now, signed["expires"])
        info = self.link.publish(deploy_topic(self.topics(device)), json.dumps(envelope).encode(), qos=1, retain=True)
        self.link.wait_published(info, 10.0)
        return envelope

    # ---- device commands ---------------------------------------------------------------------------

    def send_command(self, device_id: str, name: str, args: dict[str, str], wait_ack_s: float = 10.0) -> dict[str, Any]:
        """Sign and send a device command; wait for its acknowledgement (recorded, audited)."""
        if name not in DEVICE_COMMANDS:
            raise FleetError(f"unknown command {name!r}", f"use one of {', '.join(DEVICE_COMMANDS)}")
        if self.registry.device(device_id, updates=0, telemetry=0, events=0) is None:
            raise FleetError(f"unknown device {device_id!r}", "see `fleet devices`")
        if name == "set" and not args:
            raise FleetError("`set` needs KEY=VALUE arguments", "e.g. fleet command cam-1 set log_level=debug")
        now = time.time()
        seq = self.registry.next_command_seq()
        command_id = f"c-{secrets.token_hex(6)}"
        signed = {
            "v": 1,
            "type": "command",
            "id": command_id,
            "seq": seq,
            "issued": round(now, 3),
            "expires": round(now + max(60.0, wait_ack_s * 3), 3),
            "device": device_id,
            "name": name,
            "args": dict(args),
        }
        envelope = self.repository.sign_command(signed)
        self.registry.record_command(seq, command_id, device_id, name, envelope, now, signed["expires"])
        topics = self.topics(device_id)
        self.link.subscribe(topics.ack, self._on_ack, shared=False, wait_s=5.0)  # subscribed before it can answer
        self.link.publish(topics.command(name), json.dumps(envelope).encode(), qos=1)
        ack = self._wait_ack(command_id, wait_ack_s)
        ok = bool(ack and ack.get("ok"))
        if ack is not None:
            self.registry.ack_command(device_id, command_id, ack, seq=seq)
        self.registry.record_audit(
            self.actor,
            f"command.{name}",
            {"device": device_id, "id": command_id, "seq": seq, "args": dict(args), "ack": ack},
            ok=ok,
            error=None if ok else (ack or {}).get("error", "no acknowledgement"),
        )
        return {"ok": ok, "ack": ack, "seq": seq, "id": command_id}

    def _on_ack(self, message: Any) -> None:
        try:
            ack = parse_json_object(message.payload, "ack", 256 * 1024)
        except ValueError:
            return
        self.note_ack(ack)

    def note_ack(self, ack: dict[str, Any]) -> None:
        """A command acknowledgement seen on the broker (by this handle or by the server it shares a link with)."""
        command_id = ack.get("id")
        if isinstance(command_id, str):
            with self._ack_cond:
                self._acks[command_id] = ack
                self._ack_cond.notify_all()

    def _wait_ack(self, command_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._ack_cond:
            while command_id not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._ack_cond.wait(left)
            return self._acks.pop(command_id)


def runs_target(model: Any, target: Any) -> bool:
    """Whether a device's reported model (status ``models[pipeline]``: name, version, sha256) is ``target`` (a
    ``TargetInfo``): same version, and the same name or model hash."""
    if not isinstance(model, dict) or str(model.get("version")) != target.version:
        return False
    same_hash = bool(target.model_sha256) and model.get("sha256") == target.model_sha256
    return model.get("name") == target.name or same_hash


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"
