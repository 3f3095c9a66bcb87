"""Update transfer and hot swap, measured in one run against baselines from the same run.

1. Transfer: a 20 MB bundle from the fleet's repository to a real agent process over MQTT (chunks requested and
   fanned out, written at their offsets, hash verified): device time from ``downloading`` to ``downloaded``,
   against ``mosquitto_pub -f`` of the same bytes (one message) to a subscriber on the same broker.
2. Hot swap: the agent runs the sample classifier at a steady frame rate while the update is activated; the gap
   between the last result of the old model and the first of the new one (and the longest gap within a second of
   the swap) against the median interval between results.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from agent.protocol.update import deploy_topic
from bench.mqtt_bench import BenchBroker
from fleet.keys import KeyStore
from fleet.mqtt import FleetLink
from fleet.repository import Repository
from fleet.transfer import RepositoryServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "agent" / "samples" / "digits-classifier-tflite"


def _bundle(work: Path, version: str, pad_bytes: int) -> Path:
    import tomllib

    src = work / f"b-{version}"
    shutil.copytree(SAMPLE, src)
    meta = tomllib.loads((src / "bundle.toml").read_text())
    meta["version"] = version
    (src / "bundle.toml").write_text(tomli_w.dumps(meta))
    (src / "padding.bin").write_bytes(os.urandom(pad_bytes))  # incompressible: the archive stays ~pad_bytes
    archive = work / f"digits-{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(src.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def _mosquitto_pub(port: int, path: Path) -> float:
    """Seconds from starting ``mosquitto_pub -f`` until a subscriber has the whole message."""
    got = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda *_: got.set()
    client.connect("127.0.0.1", port)
    client.subscribe("bench/blob", qos=1)
    client.loop_start()
    time.sleep(0.3)
    binary = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    t0 = time.perf_counter()
    subprocess.run([binary, "-p", str(port), "-t", "bench/blob", "-q", "1", "-f", str(path)], check=True)
    got.wait(60)
    elapsed = time.perf_counter() - t0
    client.loop_stop()
    client.disconnect()
    return elapsed


class _Statuses:
    def __init__(self, port: int) -> None:
        self.items: list[dict[str, Any]] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.items.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge/bench/update/status", qos=1)
        self.client.loop_start()

    def wait(self, state: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.items:
                if item["state"] == state:
                    return item
                if item["state"] in ("failed", "rejected", "rolled_back"):
                    raise RuntimeError(f"update {item['state']}: {item.get('reason')}")
            time.sleep(0.05)
        raise TimeoutError(f"no {state} state in {timeout} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(bundle_mb: float = 20.0, rate: float = 200.0, chunk_size: int = 96 * 1024) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="update-bench-"))
    broker = BenchBroker(work)
    broker.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        bundle = _bundle(work, "1.1.0", int(bundle_mb * 1e6))
        size = bundle.stat().st_size
        baseline_s = _mosquitto_pub(broker.port, bundle)

        repo = Repository.init(work / "repo", KeyStore(work / "keys"))
        target = "digits/digits-1.1.0.tar.gz"
        repo.add_target(bundle, target, name="digits-classifier-tflite", version="1.1.0", hardware=["x86_64"])
        link = FleetLink(f"mqtt://127.0.0.1:{broker.port}", "bench-fleet")
        server = RepositoryServer(link, repo)
        server.start()
        link.start()

        results = work / "results.jsonl"
        config = {
            "device_id": "bench",
            "state_dir": str(work / "state"),
            "profile": "x86_64",
            "sources": {"d": {"type": "replay", "path": str(SAMPLE.parent / "inputs" / "digit_*.png"), "rate": rate}},
            "pipelines": {"p": {"source": "d", "model": "sample:digits-classifier-tflite", "sinks": ["jsonl"]}},
            "sinks": {"jsonl": {"path": str(results)}, "stdout": {"every": 100000}},
            "mqtt": {"broker": f"mqtt://127.0.0.1:{broker.port}", "telemetry_interval": 60.0},
            "update": {
                "enabled": True,
                "trust_root": str(repo.metadata_dir / "1.root.json"),
                "chunk_size": chunk_size,
                "health_window_s": 2.0,
                "health_min_results": 10,
            },
        }
        config_path = work / "agent.toml"
        config_path.write_text(tomli_w.dumps(config))
        statuses = _Statuses(broker.port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=(work / "agent.log").open("w"),
        )
        deadline = time.monotonic() + 60
        while not (results.exists() and results.stat().st_size > 0):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"agent did not start: {(work / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(2.0)  # steady state before the update
        now = time.time()
        signed = {
            "v": 1, "type": "deploy", "id": "bench", "seq": 1, "issued": now, "expires": now + 3600,
            "device": "bench", "pipeline": "p", "target": target,
        }  # fmt: skip
        link.publish(
            deploy_topic(Topics.for_device("bench")), json.dumps(repo.sign_command(signed)).encode(), qos=1, retain=True
        )
        downloading = statuses.wait("downloading")
        downloaded = statuses.wait("downloaded")
        statuses.wait("committed")
        time.sleep(1.0)
        transfer_s = downloaded["ts"] - downloading["ts"]
        swap = _swap_gap([json.loads(line) for line in results.read_text().splitlines() if line.strip()])
        statuses.close()
        server.stop()
        link.stop()
        return {
            "bundle_bytes": size,
            "chunk_size": chunk_size,
            "chunks_published": server.stats["chunks_published"],
            "agent_transfer_s": round(transfer_s, 3),
            "agent_mb_per_s": round(size / transfer_s / 1e6, 1),
            "mosquitto_pub_s": round(baseline_s, 3),
            "mosquitto_pub_mb_per_s": round(size / baseline_s / 1e6, 1),
            "ratio": round(baseline_s / transfer_s, 2),
            "swap": swap,
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _swap_gap(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Gap across the swap and the longest gap within one second of it, against the median interval."""
    first_new = next(i for i, r in enumerate(records) if r["version"] == "1.1.0")
    ts = [r["ts"] for r in records]
    intervals = [b - a for a, b in itertools.pairwise(ts)]
    steady = statistics.median(intervals[: max(1, first_new - 1)])
    swap_ts = ts[first_new]
    near = [ts[i + 1] - ts[i] for i in range(len(ts) - 1) if abs(ts[i] - swap_ts) <= 1.0]
    across = ts[first_new] - ts[first_new - 1]
    seqs = [r["seq"] for r in records]
    return {
        "steady_interval_ms": round(steady * 1000, 2),
        "gap_across_swap_ms": round(across * 1000, 2),
        "max_gap_within_1s_ms": round(max(near) * 1000, 2),
        "ratio_across": round(across / steady, 2) if steady else None,
        "ratio_max_within_1s": round(max(near) / steady, 2) if steady else None,
        "results_lost": seqs != list(range(seqs[0], seqs[0] + len(seqs))),
    }


def main() -> int:
    report = run()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
