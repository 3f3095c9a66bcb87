"""Fleet server ingest at scale: the simulator (fleet/simulator.py) drives many devices through one Mosquitto.

In one run, against one broker on a free port, each consumer below gets the same stream: every device's retained
online status, then telemetry paced at ``rate`` for ``seconds``, then a burst of ``burst`` messages published as fast
as the simulator can (what the consumer drains when it is the bottleneck):

a. raw: a bare paho subscriber on the same shared subscriptions, parsing each message (the baseline);
b. one ``FleetServer`` on SQLite; c. one on PostgreSQL (a temporary database, dropped after);
d. two ``FleetServer`` processes in one share group on one PostgreSQL database: each takes a share, and the
   registry holds every message exactly once (telemetry bucket counts and ingest marks == sent).

Consumers run as subprocesses (bench/fleet_server_runner.py) that report their own rate, lag (time stored minus the
message's ``ts``), CPU and RSS; the broker's CPU is read here. Ratios are against the raw subscriber, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mqtt_bench import BenchBroker  # noqa: E402
from fleet.simulator import Simulator, register_devices  # noqa: E402

PG_ADMIN = os.environ.get("FLEET_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3")
PREFIX = "sim-"
SHARE = "fleet"


class Consumer:
    """One runner subprocess (a fleet server or the raw subscriber)."""

    def __init__(self, name: str, args: list[str], work: Path, done_key: str) -> None:
        self.name = name
        self.out = work / f"{name}.out.json"
        self.progress = work / f"{name}.progress.json"
        self.log = work / f"{name}.log"
        self.done_key = done_key  # "{kind}" -> the counter that says a message of that kind was consumed
        with self.log.open("wb") as log:
            command = [sys.executable, "-m", "bench.fleet_server_runner", *args]
            self.proc = subprocess.Popen(
                [*command, "--out", str(self.out), "--progress", str(self.progress)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.result: dict[str, Any] = {}

    def read_progress(self) -> dict[str, Any]:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return {}

    def counts(self) -> dict[str, int]:
        return self.read_progress().get("counts", {})

    def consumed(self, kind: str) -> int:
        return int(self.counts().get(self.done_key.format(kind=kind), 0))

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.progress.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def mark(self, timeout: float = 10.0) -> None:
        """Close the consumer's current segment, and wait until it did (the next stage must not leak into it)."""
        before = self.read_progress().get("segment", 0)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.read_progress().get("segment", 0) <= before:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not close its segment:\n{self.log_tail()}")
            time.sleep(0.01)

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        try:
            self.result = json.loads(self.out.read_text())
        except (OSError, ValueError):
            raise RuntimeError(f"{self.name} wrote no result:\n{self.log_tail()}") from None
        return self.result

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_consumed(consumers: list[Consumer], kind: str, expected: int, stall_s: float = 30.0) -> int:
    """Wait until the consumers together consumed ``expected`` messages of ``kind``, or nothing moved for ``stall_s``."""
    last, moved = -1, time.monotonic()
    while True:
        total = sum(c.consumed(kind) for c in consumers)
        if total >= expected:
            return total
        if total != last:
            last, moved = total, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            return total
        for c in consumers:
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited:\n{c.log_tail()}")
        time.sleep(0.1)


def drive(
    broker: BenchBroker, consumers: list[Consumer], devices: int, rate: float, seconds: float, burst: int
) -> dict[str, Any]:
    """Statuses, paced telemetry, a burst: each stage waited for (drained) and closed as a segment in every
    consumer. Returns what the simulator sent and the broker's CPU per stage."""
    for c in consumers:
        c.wait_ready()
    broker_proc = psutil.Process(broker.proc.pid) if broker.proc else None

    def broker_cpu() -> float:
        return sum(broker_proc.cpu_times()[:2]) if broker_proc else 0.0

    sent: dict[str, Any] = {}
    with Simulator(f"mqtt://127.0.0.1:{broker.port}", devices, rate, prefix=PREFIX) as sim:
        t0 = time.monotonic()
        sim.status(rate=max(rate, 5000.0))
        got = wait_consumed(consumers, "status", devices)
        sent["status"] = {"sent": devices, "consumed": got, "seconds": round(time.monotonic() - t0, 2)}
        for c in consumers:
            c.mark()
        cpu0, w0 = broker_cpu(), time.monotonic()
        paced = sim.telemetry(seconds)
        got = wait_consumed(consumers, "telemetry", paced.sent)
        for c in consumers:
            c.mark()
        wall = time.monotonic() - w0
        sent["paced"] = paced.as_dict() | {
            "consumed": got,
            "broker_cpu_percent": round(100 * (broker_cpu() - cpu0) / wall, 1),
        }
        if burst:
            cpu0, w0 = broker_cpu(), time.monotonic()
            flood = sim.telemetry(count=burst, unpaced=True)
            got = wait_consumed(consumers, "telemetry", paced.sent + flood.sent)
            for c in consumers:
                c.mark()
            wall = time.monotonic() - w0
            sent["burst"] = flood.as_dict() | {
                "consumed": got - paced.sent,
                "broker_cpu_percent": round(100 * (broker_cpu() - cpu0) / wall, 1),
            }
        # Mosquitto (2.0) sends retained messages to new shared subscriptions too (MQTT 5 says it must not): the
        # next consumers would start with this run's statuses.
        sim.clear_status()
    return sent


def consumer_result(c: Consumer, burst: bool) -> dict[str, Any]:
    segments = c.result["segments"]
    out = {"status": segments[0], "paced": segments[1]}
    if burst:
        out["burst"] = segments[2]
    out["totals"] = {k: v for k, v in c.result["counts"].items() if not k.startswith("received_")}
    return out


def server_config(work: Path, name: str, broker_port: int, database: str | None) -> Path:
    lines = [
        f"data_dir = {json.dumps(str(work / 'fleet'))}",
        f"server_id = {json.dumps(name)}",
        "offline_after_s = 600",
    ]
    if database:
        lines.append(f"database = {json.dumps(database)}")
    lines += ["", "[broker]", f'url = "mqtt://127.0.0.1:{broker_port}"', f'share_group = "{SHARE}"']
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_fleet(work: Path, database: str | None, devices: int) -> str:
    """A repository and a registry with the simulated devices; returns the database URL."""
    from fleet.config import FleetConfig
    from fleet.db import Registry
    from fleet.keys import KeyStore
    from fleet.repository import Repository

    config = FleetConfig(data_dir=str(work / "fleet"), database=database)
    if not (config.repository_dir / "metadata").exists():
        Repository.init(config.repository_dir, KeyStore(config.keys_dir))
    with Registry(config.database_url) as registry:
        registry.migrate()
        register_devices(registry, devices, PREFIX)
    return config.database_url


def registry_totals(url: str) -> dict[str, int]:
    """What the registry holds: telemetry merged into buckets, ingest marks, devices online, unknown messages."""
    import sqlalchemy as sa

    from fleet.db import Registry, devices_t, marks_t, telemetry_t, unknown_t

    with Registry(url) as registry, registry.engine.connect() as conn:
        return {
            "bucket_count": int(
                conn.execute(sa.select(sa.func.coalesce(sa.func.sum(telemetry_t.c.count), 0))).scalar()
            ),
            "ingest_marks": int(conn.execute(sa.select(sa.func.count()).select_from(marks_t)).scalar()),
            "online": int(conn.execute(sa.select(sa.func.count()).where(devices_t.c.online.is_(True))).scalar()),
            "unknown_messages": int(
                conn.execute(sa.select(sa.func.coalesce(sa.func.sum(unknown_t.c.count), 0))).scalar()
            ),
        }


@contextlib.contextmanager
def temp_pg_database(admin_dsn: str) -> Any:
    import psycopg

    name = f"fleet_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(admin_dsn, autocommit=True)
    params = admin.info.get_parameters()
    host, port, user = params.get("host", "127.0.0.1"), params.get("port", "5432"), params.get("user", "postgres")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pg_available(admin_dsn: str) -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import psycopg

        psycopg.connect(admin_dsn, autocommit=True).close()
        return None
    except Exception as exc:  # any failure means: skip the PostgreSQL parts
        return str(exc).strip().splitlines()[0][:160]


def run_servers(
    work: Path,
    broker: BenchBroker,
    names: list[str],
    database: str | None,
    devices: int,
    rate: float,
    seconds: float,
    burst: int,
) -> dict[str, Any]:
    url = prepare_fleet(work, database, devices)
    consumers = [
        Consumer(n, ["server", str(server_config(work, n, broker.port, database))], work, "{kind}_ingested")
        for n in names
    ]
    try:
        sent = drive(broker, consumers, devices, rate, seconds, burst)
    finally:
        for c in consumers:
            c.finish()
    expected = sent["paced"]["sent"] + sent.get("burst", {}).get("sent", 0)
    servers = {c.name: consumer_result(c, bool(burst)) for c in consumers}
    out = {"sent": sent, "servers": servers, "registry": registry_totals(url) | {"expected": expected}}
    if len(servers) > 1:
        out["combined"] = {stage: combined([s[stage] for s in servers.values()]) for stage in ("paced", "burst")}
    return out


def combined(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Several servers' segments as one consumer: messages over the span from the first start to the last end."""
    firsts = [s["first"] for s in segments if s.get("first") is not None]
    lasts = [s["last"] for s in segments if s.get("last") is not None]
    total = sum(s["telemetry"] for s in segments)
    span = max(lasts) - min(firsts) if firsts and lasts else 0.0
    return {
        "telemetry": total,
        "span_s": round(span, 3),
        "rate_per_s": round(total / span, 1) if span > 0 else None,
        "cpu_s": round(sum(s["cpu_s"] for s in segments), 3),
        "cpu_ms_per_1000": round(1e6 * sum(s["cpu_s"] for s in segments) / total, 1) if total else None,
    }


def run(
    devices: int = 10_000,
    rate: float = 1000.0,
    seconds: float = 30.0,
    burst: int = 20_000,
    pg_admin: str = PG_ADMIN,
    log: Any = print,
) -> dict[str, Any]:
    report: dict[str, Any] = {"devices": devices, "rate": rate, "seconds": seconds, "burst": burst}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        broker = BenchBroker(work)
        broker.start()
        try:
            log(f"fleet (a) raw subscriber: {devices} devices, {rate:g} msg/s for {seconds:g} s, burst {burst} ...")
            (work / "raw").mkdir()
            raw = Consumer(
                "raw", ["raw", f"mqtt://127.0.0.1:{broker.port}", "--share", SHARE], work / "raw", "received_{kind}"
            )
            try:
                sent = drive(broker, [raw], devices, rate, seconds, burst)
            finally:
                raw.finish()
            report["raw"] = {"sent": sent} | consumer_result(raw, bool(burst))
            log("fleet (b) FleetServer on SQLite ...")
            (work / "sqlite").mkdir()
            report["sqlite"] = run_servers(work / "sqlite", broker, ["sqlite"], None, devices, rate, seconds, burst)
            why = pg_available(pg_admin)
            if why:
                report["postgresql_skipped"] = why
                log(f"fleet: PostgreSQL parts skipped: {why}")
            else:
                log("fleet (c) FleetServer on PostgreSQL ...")
                (work / "pg").mkdir()
                with temp_pg_database(pg_admin) as url:
                    report["postgresql"] = run_servers(work / "pg", broker, ["pg"], url, devices, rate, seconds, burst)
                log("fleet (d) two FleetServers, one share group, one PostgreSQL ...")
                (work / "pg2").mkdir()
                with temp_pg_database(pg_admin) as url:
                    report["two_postgresql"] = run_servers(
                        work / "pg2", broker, ["pg-a", "pg-b"], url, devices, rate, seconds, burst
                    )
        finally:
            broker.stop()
    return report


# ---- report ---------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(console: Any, r: dict[str, Any]) -> None:
    from rich.table import Table

    raw = r["raw"]
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("raw", raw, raw["sent"])]
    for key, label in (("sqlite", "sqlite"), ("postgresql", "pg")):
        if key in r:
            rows.append((label, next(iter(r[key]["servers"].values())), r[key]["sent"]))
    if "two_postgresql" in r:
        rows += [(f"{n} of 2", c, r["two_postgresql"]["sent"]) for n, c in r["two_postgresql"]["servers"].items()]

    def ratio(value: float | None, base: float | None) -> str:
        return _fmt(value / base if value and base else None, ".3f")

    paced = Table(
        title=f"fleet ingest, {r['devices']} devices at {r['rate']:g} msg/s for {r['seconds']:g} s (vs raw subscriber)",
        title_justify="left",
    )
    for col in ("consumer", "msg/s", "vs raw", "lag p50 ms", "lag p99 ms", "CPU %", "RSS MB", "DB batch p50/p99 ms"):
        paced.add_column(col)
    burst = Table(
        title=f"drain of a {r['burst']}-message burst, {len(rows)} consumers, and the status storm",
        title_justify="left",
    )
    for col in ("consumer", "msg/s", "vs raw", "lag p99 s", "CPU ms/1k msg", "mean batch", "statuses/s"):
        burst.add_column(col)
    for name, c, sent in rows:
        p, b = c["paced"], c.get("burst", {})
        db = p.get("db_batch_ms")
        paced.add_row(
            name,
            _fmt(p["rate_per_s"]),
            ratio(p["rate_per_s"], raw["paced"]["rate_per_s"]),
            _fmt(p["lag_ms"]["p50"], ".1f"),
            _fmt(p["lag_ms"]["p99"], ".1f"),
            _fmt(p["cpu_percent"], ".1f"),
            _fmt(max(p["rss_max_mb"], b.get("rss_max_mb", 0)), ".0f"),
            f"{_fmt(db['p50'], '.1f')}/{_fmt(db['p99'], '.1f')}" if db else "-",
        )
        bdb = b.get("db_batch_ms")
        status = sent["status"]
        burst.add_row(
            name,
            _fmt(b.get("rate_per_s")),
            ratio(b.get("rate_per_s"), raw.get("burst", {}).get("rate_per_s")),
            _fmt((b.get("lag_ms", {}).get("p99") or 0) / 1000 or None, ".2f"),
            _fmt(b.get("cpu_ms_per_1000")),
            _fmt(bdb["mean_size"] if bdb else None),
            _fmt(status["consumed"] / status["seconds"] if status["seconds"] else None),
        )
    both = r.get("two_postgresql", {}).get("combined")
    if both and both.get("burst"):
        b = both["burst"]
        burst.add_row(
            "pg-a + pg-b",
            _fmt(b["rate_per_s"]),
            ratio(b["rate_per_s"], raw.get("burst", {}).get("rate_per_s")),
            "",
            _fmt(b["cpu_ms_per_1000"]),
            "",
            "",
        )
    console.print(paced)
    if r["burst"]:
        console.print(burst)
    sim = raw["sent"]["paced"]
    console.print(
        f"simulator: {sim['sent']} telemetry in {sim['seconds']:.1f} s = {sim['rate']:.0f}/s (target "
        f"{sim['target_rate']:.0f}), burst published at {raw['sent'].get('burst', {}).get('rate', 0):.0f}/s; "
        f"broker CPU {sim['broker_cpu_percent']}% while paced"
    )
    for key in ("sqlite", "postgresql", "two_postgresql"):
        if key not in r:
            continue
        reg = r[key]["registry"]
        ok = reg["bucket_count"] == reg["expected"] == reg["ingest_marks"]
        dups = sum(s["totals"].get("telemetry_duplicates", 0) for s in r[key]["servers"].values())
        line = (
            f"{key}: registry holds {reg['bucket_count']} telemetry messages (bucket counts), {reg['ingest_marks']} "
            f"ingest marks, {reg['expected']} sent: {'exactly once' if ok else 'MISMATCH'}; {dups} duplicates; "
            f"{reg['online']} devices online"
        )
        if key == "two_postgresql":
            shares = {n: s["totals"].get("telemetry_ingested", 0) for n, s in r[key]["servers"].items()}
            total = sum(shares.values()) or 1
            line += "; split " + ", ".join(f"{n} {v} ({100 * v / total:.1f}%)" for n, v in shares.items())
        console.print(line)
    if "postgresql_skipped" in r:
        console.print(f"PostgreSQL parts skipped: {r['postgresql_skipped']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=20_000, help="messages published unpaced after the paced run")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    args = parser.parse_args()
    from rich.console import Console

    console = Console()
    report = run(args.devices, args.rate, args.seconds, args.burst, log=console.print)
    print_report(console, report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    console.print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
