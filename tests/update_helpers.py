"""End-to-end update tests: a real fleet repository served over a real Mosquitto to real agent processes."""

from __future__ import annotations

import json
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from agent.protocol import Topics
from agent.protocol.update import deploy_topic
from fleet.keys import KeyStore
from fleet.mqtt import FleetLink
from fleet.repository import Repository
from fleet.transfer import RepositoryServer
from tests.daemon_helpers import start_agent, stop, wait_until
from tests.mosquitto import Broker, Subscriber

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "agent" / "samples"
DIGITS = SAMPLES / "digits-classifier-tflite"


def build_bundle(
    dest: Path,
    version: str,
    *,
    base: Path = DIGITS,
    edit: Callable[[dict[str, Any], Path], None] | None = None,
    pad_bytes: int = 0,
) -> Path:
    """A .tar.gz bundle of ``base`` with ``version`` (``edit(meta, dir)`` may change bundle.toml and files)."""
    work = dest / f"bundle-{version}-{secrets.token_hex(3)}"
    shutil.copytree(base, work)
    meta = tomllib.loads((work / "bundle.toml").read_text())
    meta["version"] = version
    if edit is not None:
        edit(meta, work)
    (work / "bundle.toml").write_text(tomli_w.dumps(meta))
    if pad_bytes:
        (work / "padding.bin").write_bytes(secrets.token_bytes(pad_bytes))
    archive = dest / f"{meta['name']}-{version}-{secrets.token_hex(3)}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


class Fleet:
    """The fleet side of a test: TUF repository + key store, its MQTT server, signed deployments.

    ``overrides`` replaces metadata files as served (attack simulation: tampered, replayed, expired...)."""

    def __init__(self, tmp: Path, broker: Broker, *, rate_limit_bps: float | None = None) -> None:
        self.keys = KeyStore(tmp / "fleet-keys")
        self.repo = Repository.init(tmp / "fleet-repo", self.keys)
        self.overrides: dict[str, bytes] = {}
        self.seq = int(time.time())  # strictly increasing across tests that share a device state
        self.link = FleetLink(broker.url, f"fleet-test-{secrets.token_hex(3)}")
        self.server = RepositoryServer(self.link, self, rate_limit_bps=rate_limit_bps)
        self.server.start()
        self.link.start()

    # RepositoryFiles for the server
    def read_metadata(self, name: str) -> bytes | None:
        if name in self.overrides:
            return self.overrides[name]
        return self.repo.read_metadata(name)

    def find_by_sha256(self, sha256: str) -> Path | None:
        return self.repo.find_by_sha256(sha256)

    @property
    def trust_root(self) -> Path:
        return self.repo.metadata_dir / "1.root.json"

    def publish(
        self, bundle: Path, version: str, *, name: str = "digits-classifier-tflite", hardware: list[str] | None = None
    ) -> str:
        target = f"{name}/{name}-{version}.tar.gz"
        self.repo.add_target(
            bundle, target, name=name, version=version, hardware=hardware or ["x86_64"], task="classification"
        )
        return target

    def command(self, device: str, target: str, pipeline: str = "digits", **fields: Any) -> dict[str, Any]:
        self.seq += 1
        now = time.time()
        signed = {
            "v": 1,
            "type": "deploy",
            "id": f"rollout-{self.seq}",
            "seq": self.seq,
            "issued": now,
            "expires": now + 3600,
            "device": device,
            "pipeline": pipeline,
            "target": target,
        } | fields
        return self.repo.sign_command({k: v for k, v in signed.items() if v is not None})

    def send(self, device: str, envelope: dict[str, Any] | bytes) -> None:
        payload = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
        info = self.link.publish(deploy_topic(Topics.for_device(device)), payload, qos=1, retain=True)
        assert self.link.wait_published(info, 10)

    def deploy(self, device: str, target: str, **fields: Any) -> dict[str, Any]:
        envelope = self.command(device, target, **fields)
        self.send(device, envelope)
        return envelope

    def close(self) -> None:
        self.server.stop()
        self.link.stop()


def agent_config(
    tmp: Path, broker: Broker, fleet: Fleet, device: str = "dev1", pipeline: dict[str, Any] | None = None, **update: Any
) -> Path:
    """agent.toml: sample digits at 30 fps into a JSONL file, MQTT to ``broker``, updates from ``fleet``;
    ``pipeline``: more settings of the pipeline, ``update``: of [update]."""
    config = {
        "device_id": device,
        "state_dir": str(tmp / f"state-{device}"),
        "profile": "x86_64",
        "sources": {"digits": {"type": "replay", "path": str(SAMPLES / "inputs" / "digit_*.png"), "rate": 30.0}},
        "pipelines": {
            "digits": {"source": "digits", "model": "sample:digits-classifier-tflite", "sinks": ["jsonl"]}
            | (pipeline or {})
        },
        "sinks": {"jsonl": {"path": str(tmp / f"results-{device}.jsonl")}, "stdout": {"every": 1000}},
        "mqtt": {"broker": broker.url, "telemetry_interval": 5.0, "reconnect_max": 2.0},
        "update": {
            "enabled": True,
            "trust_root": str(fleet.trust_root),
            "request_timeout_s": 2.0,
            "health_window_s": 3.0,
            "health_min_results": 10,
            "latency_runs": 5,
        }
        | update,
    }
    path = tmp / f"agent-{device}.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def start(config: Path, tmp: Path, name: str = "agent", env: dict[str, str] | None = None) -> Any:
    out = tmp / f"{name}-{secrets.token_hex(2)}"
    out.mkdir()
    proc = start_agent(["run", "--config", str(config)], output_dir=out, extra_env=env)
    proc.output_dir = out  # type: ignore[attr-defined]
    return proc


def states(sub: Subscriber, device: str = "dev1") -> list[dict[str, Any]]:
    """Update states in arrival order, at-least-once re-deliveries (same update_id and step) removed."""
    seen: set[tuple[Any, Any]] = set()
    out = []
    for m in sub.messages(f"edge/{device}/update/status"):
        state = json.loads(m.payload)
        key = (state["update_id"], state.get("step"))
        if state.get("step") is not None and key in seen:
            continue
        seen.add(key)
        out.append(state)
    return out


def wait_state(
    sub: Subscriber, state: str, device: str = "dev1", timeout: float = 60.0, since: int = 0
) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [s for s in states(sub, device)[since:] if s["state"] == state]
        return bool(found)

    if not wait_until(check, timeout):
        raise AssertionError(f"no update state {state!r} within {timeout} s; got {chain(sub, device)}")
    return found[0]


def chain(sub: Subscriber, device: str = "dev1", since: int = 0) -> list[str]:
    """State names in order, progress repeats collapsed."""
    out: list[str] = []
    for s in states(sub, device)[since:]:
        if not out or out[-1] != s["state"]:
            out.append(s["state"])
    return out


def versions_served(results: Path, since_line: int = 0) -> list[str]:
    lines = results.read_text().splitlines()[since_line:] if results.exists() else []
    return [json.loads(line)["version"] for line in lines if line.strip()]


def result_count(results: Path) -> int:
    return len(results.read_text().splitlines()) if results.exists() else 0


def wait_serving(results: Path, version: str, timeout: float = 30.0) -> None:
    """Wait until new results (after now) come from ``version``."""
    start_line = result_count(results)
    assert wait_until(lambda: version in versions_served(results, start_line)[-3:], timeout), (
        f"not serving {version}: {versions_served(results, start_line)[-5:]}"
    )


__all__ = [
    "Fleet",
    "agent_config",
    "build_bundle",
    "chain",
    "start",
    "states",
    "stop",
    "versions_served",
    "wait_serving",
    "wait_state",
    "wait_until",
]
