"""One measured consumer process for bench/fleet_bench.py: a ``FleetServer`` (what ``fleet serve`` runs) or a raw
paho subscriber on the same shared subscriptions (the baseline).

    python -m bench.fleet_server_runner server FLEET_TOML --out OUT.json --progress PROGRESS.json
    python -m bench.fleet_server_runner raw BROKER_URL --out OUT.json --progress PROGRESS.json [--share fleet]

SIGUSR1 closes the current measurement segment and opens the next one (PROGRESS then shows the new segment's
index); SIGTERM (or SIGINT) stops, closes the last
segment and writes OUT. Every segment says how many telemetry messages were consumed (server: ingested into the
registry; raw: received and parsed), at what rate (first to last, by the consumer's own clock), the lag (time
stored, or received, minus the message's ``ts``), the process's CPU seconds and peak RSS; the server's also the
database time of each telemetry batch. PROGRESS is rewritten every 0.1 s with the running counters.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

KIND_FILTERS = ("status", "telemetry", "update/status", "events", "ack")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Segment:
    """Counters of one measured stretch, opened by ``start`` (or a SIGUSR1) and closed by the next."""

    def __init__(self, proc: psutil.Process, counts: dict[str, int]) -> None:
        self.proc = proc
        self.started = time.time()
        self.cpu0 = sum(proc.cpu_times()[:2])
        self.counts0 = dict(counts)
        self.first: float | None = None  # start of the first telemetry batch consumed
        self.last: float | None = None  # end of the last one
        self.consumed = 0
        self.lag_ms: list[float] = []
        self.db_ms: list[float] = []
        self.batch_sizes: list[int] = []
        self.rss_max = proc.memory_info().rss

    def note(self, start: float, end: float, n: int, db_ms: float | None = None) -> None:
        if self.first is None:
            self.first = start
        self.last = end
        self.consumed += n
        if db_ms is not None:
            self.db_ms.append(db_ms)
            self.batch_sizes.append(n)

    def close(self, counts: dict[str, int]) -> dict[str, Any]:
        wall = time.time() - self.started
        cpu = sum(self.proc.cpu_times()[:2]) - self.cpu0
        self.rss_max = max(self.rss_max, self.proc.memory_info().rss)
        span = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "telemetry": self.consumed,
            "span_s": round(span, 3),
            "first": self.first,
            "last": self.last,
            "rate_per_s": round(self.consumed / span, 1) if span > 0 else None,
            "lag_ms": {q: _round(percentile(self.lag_ms, n)) for q, n in (("p50", 50), ("p99", 99), ("max", 100))},
            "cpu_s": round(cpu, 3),
            "cpu_percent": round(100 * cpu / wall, 1) if wall > 0 else None,
            "cpu_ms_per_1000": round(1e6 * cpu / self.consumed, 1) if self.consumed else None,
            "rss_max_mb": round(self.rss_max / 2**20, 1),
            "counts": {k: v - self.counts0.get(k, 0) for k, v in counts.items() if v != self.counts0.get(k, 0)},
        }
        if self.db_ms:
            out["db_batch_ms"] = {
                "batches": len(self.db_ms),
                "p50": _round(percentile(self.db_ms, 50)),
                "p99": _round(percentile(self.db_ms, 99)),
                "max": _round(max(self.db_ms)),
                "mean_size": round(sum(self.batch_sizes) / len(self.batch_sizes), 1),
            }
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class Runner:
    """The signal handling, progress file and segments shared by both modes."""

    def __init__(self, out: Path, progress: Path) -> None:
        self.out, self.progress = out, progress
        self.proc = psutil.Process()
        self.lock = threading.Lock()
        self.segments: list[dict[str, Any]] = []
        self.segment: Segment | None = None
        self.stop = threading.Event()
        self.mark = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGUSR1, lambda *_: self.mark.set())

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def run(self, extra: dict[str, Any]) -> None:
        with self.lock:
            self.segment = Segment(self.proc, self.counts())
        written = 0.0
        while not self.stop.is_set():
            if self.mark.wait(0.02):
                self.mark.clear()
                self.next_segment()
                written = 0.0
            if time.monotonic() - written >= 0.1:
                with self.lock:
                    assert self.segment is not None
                    self.segment.rss_max = max(self.segment.rss_max, self.proc.memory_info().rss)
                self.write_progress()
                written = time.monotonic()
        self.finish()
        self.next_segment()
        _write_json(self.out, {"pid": os.getpid(), "segments": self.segments, "counts": self.counts()} | extra)

    def write_progress(self) -> None:
        data = {"ready": True, "pid": os.getpid(), "segment": len(self.segments), "counts": self.counts()}
        _write_json(self.progress, data | {"ts": time.time()})

    def next_segment(self) -> None:
        with self.lock:
            assert self.segment is not None
            self.segments.append(self.segment.close(self.counts()))
            self.segment = Segment(self.proc, self.counts())

    def finish(self) -> None:
        pass


class ServerRunner(Runner):
    def __init__(self, config_path: Path, out: Path, progress: Path) -> None:
        super().__init__(out, progress)
        from fleet.config import load_fleet_config
        from fleet.server import FleetServer

        self.config = load_fleet_config(config_path)
        self.server = FleetServer(self.config)
        registry = self.server.registry
        ingest = registry.ingest_telemetry

        def timed(batch: Any, now: float | None = None) -> Any:  # the database time of each telemetry batch
            items = list(batch)
            start = time.time()
            result = ingest(items, now)
            end = time.time()
            with self.lock:
                if self.segment is not None:
                    self.segment.note(start, end, result.ingested, (end - start) * 1000.0)
            return result

        registry.ingest_telemetry = timed  # type: ignore[method-assign]

    def counts(self) -> dict[str, int]:
        return dict(self.server.stats)

    def next_segment(self) -> None:
        with self.lock:
            assert self.segment is not None
            self.segment.lag_ms = list(self.server.lag_ms)
            self.server.lag_ms.clear()
        super().next_segment()

    def start(self) -> None:
        self.server.start()

    def finish(self) -> None:
        self.server.stop()


class RawRunner(Runner):
    """The baseline: one paho MQTT 5 client on the server's shared subscriptions that parses each message's JSON
    (for its ``ts``) and counts it: what consuming the stream costs before any registry work."""

    def __init__(self, broker: str, share: str, out: Path, progress: Path) -> None:
        super().__init__(out, progress)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from fleet.mqtt import parse_broker

        self.address = parse_broker(broker)
        self.share = share
        self.stats: collections.Counter[str] = collections.Counter()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"raw-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        for suffix in KIND_FILTERS:
            client.subscribe(f"$share/{self.share}/edge/+/{suffix}", qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        received = time.time()
        kind = message.topic.split("/", 2)[2]
        self.stats[f"received_{kind}"] += 1
        try:
            data = json.loads(message.payload)
        except ValueError:
            self.stats["rejected"] += 1
            return
        if kind != "telemetry":
            return
        with self.lock:
            if self.segment is not None:
                self.segment.note(received, received, 1)
                ts = data.get("ts") if isinstance(data, dict) else None
                if isinstance(ts, (int, float)):
                    self.segment.lag_ms.append((received - ts) * 1000.0)

    def counts(self) -> dict[str, int]:
        return dict(self.stats)

    def start(self) -> None:
        self.client.connect(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise SystemExit("raw subscriber: no connection to the broker")
        time.sleep(0.2)  # let the SUBACKs arrive

    def finish(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_server_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["server", "raw"])
    parser.add_argument("target", help="server: the fleet.toml; raw: the broker URL")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--share", default="fleet", help="raw: the shared-subscription group")
    args = parser.parse_args(argv)
    if args.mode == "server":
        from agent import logging as agent_logging

        agent_logging.configure("warning", json=True)
        runner: ServerRunner | RawRunner = ServerRunner(Path(args.target), args.out, args.progress)
        extra: dict[str, Any] = {"mode": "server", "server_id": runner.config.server_id}
    else:
        runner = RawRunner(args.target, args.share, args.out, args.progress)
        extra = {"mode": "raw"}
    runner.start()
    runner.run(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
