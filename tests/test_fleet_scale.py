"""The fleet server under a simulated fleet (fleet/simulator.py: one process publishing for many device ids) on a real
Mosquitto: every message ingested exactly once on SQLite and on PostgreSQL, two servers in one share group splitting
the stream, malformed and impersonating messages set aside while ingest goes on.

Correctness only: speed (rates, lag, CPU, RSS) is measured by bench/fleet_bench.py, never asserted here; the lag is
printed. The full-size run (10,000 devices at 1,000 msg/s for 60 s) is marked slow and runs with SLOW=1.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from fleet.config import FleetConfig
from fleet.db import Registry, marks_t, telemetry_t
from fleet.keys import KeyStore
from fleet.repository import Repository
from fleet.server import FleetServer
from fleet.simulator import FAULTS, SimReport, Simulator, register_devices
from tests.mosquitto import Broker

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres connect_timeout=3"


# ---- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def scale_broker(broker_factory: Callable[..., Broker]) -> Broker:
    """No per-client queue limit: Mosquitto drops QoS 1 messages beyond ``max_queued_messages`` (default 1000)
    queued for one client, and a server may fall that far behind while it drains a status storm."""
    return broker_factory(persistence=False, max_queued_messages=0, extra_conf="max_inflight_messages 0")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); skipped when PostgreSQL is unreachable, except in CI."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as error:
        reason = f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user postgres: {str(error).strip()[:200]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"fleet_scale_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def wait_until(predicate: Callable[[], bool], timeout: float, settle: float = 0.3) -> bool:
    """True once ``predicate`` holds (then wait ``settle`` more, so that anything extra would show)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    time.sleep(settle)
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def registry_counts(url: str) -> dict[str, int]:
    with Registry(url) as registry, registry.engine.connect() as conn:
        buckets = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(telemetry_t.c.count), 0))).scalar()
        marks = conn.execute(sa.select(sa.func.count()).select_from(marks_t)).scalar()
        devices = conn.execute(sa.select(sa.func.count(sa.distinct(telemetry_t.c.device_id)))).scalar()
        online = len(registry.devices(online=True))
    return {"buckets": int(buckets or 0), "marks": int(marks or 0), "devices": int(devices or 0), "online": online}


@dataclass
class Run:
    servers: list[FleetServer]
    report: SimReport
    url: str
    lag_ms: list[float] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(s.stats[key] for s in self.servers)


def simulate(
    tmp: Path,
    broker: Broker,
    *,
    devices: int,
    rate: float,
    seconds: float,
    database: str | None = None,
    servers: int = 1,
    fault_every: int = 0,
) -> Run:
    """Provision ``devices`` simulated devices, start ``servers`` FleetServers in one share group, publish every
    device's status and then telemetry for ``seconds``; returns once every message was handled (or timed out)."""
    configs = [
        FleetConfig(
            data_dir=str(tmp / "fleet"),
            database=database,
            server_id=f"scale-{k}",
            broker={"url": broker.url},
            offline_after_s=600,
        )
        for k in range(servers)
    ]
    Repository.init(configs[0].repository_dir, KeyStore(configs[0].keys_dir))
    fleet = [FleetServer(c) for c in configs]
    register_devices(fleet[0].registry, devices)
    for server in fleet:
        server.start()
    try:
        with Simulator(broker.url, devices, rate) as sim:
            sim.status(rate=5000)
            assert wait_until(lambda: sum(s.stats["status_ingested"] for s in fleet) >= devices, 60, settle=0)
            for server in fleet:
                server.lag_ms.clear()  # from here on: telemetry only
            report = sim.telemetry(seconds, fault_every=fault_every)
        assert report.failed == 0
        faults = report.faults
        handled_wanted = report.sent + faults.get("unknown_device", 0)
        refused_wanted = sum(faults.get(k, 0) for k in ("bad_json", "not_object", "impersonate"))

        def handled() -> bool:
            done = sum(s.stats["telemetry_ingested"] + s.stats["telemetry_unknown"] for s in fleet)
            return done >= handled_wanted and sum(s.stats["rejected"] for s in fleet) >= refused_wanted

        assert wait_until(handled, 60), [dict(s.stats) for s in fleet]
    finally:
        for server in fleet:
            server.stop()
    lag = [x for s in fleet for x in s.lag_ms]
    print(
        f"\n{devices} devices, {servers} server(s) on {fleet[0].registry.dialect}: sent {report.sent} telemetry at "
        f"{report.rate:.0f}/s; ingest lag p50 {percentile(lag, 50):.1f} ms, p99 {percentile(lag, 99):.1f} ms, "
        f"max {max(lag, default=float('nan')):.1f} ms; per server {[s.stats['telemetry_ingested'] for s in fleet]}"
    )
    return Run(fleet, report, configs[0].database_url, lag)


def assert_exactly_once(run: Run, devices: int) -> None:
    sent = run.report.sent
    assert sent > 0
    assert run.total("telemetry_ingested") == sent
    assert run.total("telemetry_duplicates") == 0
    assert run.total("telemetry_invalid") == 0
    assert run.total("telemetry_stale") == 0
    assert run.total("status_ingested") == devices
    counts = registry_counts(run.url)
    assert counts["buckets"] == sent  # every message merged into its bucket once
    assert counts["marks"] == sent
    assert counts["devices"] == min(devices, sent)  # round robin: every device sent once its turn came
    assert counts["online"] == devices


# ---- tests ----------------------------------------------------------------------------------------------


def test_simulated_fleet_is_ingested_exactly_once_on_sqlite(tmp_path: Path, scale_broker: Broker) -> None:
    run = simulate(tmp_path, scale_broker, devices=2000, rate=500, seconds=5)
    assert_exactly_once(run, 2000)
    assert run.total("telemetry_unknown") == 0
    assert run.total("rejected") == 0
    assert len(run.lag_ms) == run.report.sent


def test_two_servers_in_one_share_group_split_the_stream(tmp_path: Path, scale_broker: Broker, pg_url: str) -> None:
    """Two servers, one broker, one PostgreSQL: each takes a share, nothing is processed twice, nothing is lost."""
    run = simulate(tmp_path, scale_broker, devices=1000, rate=400, seconds=4, database=pg_url, servers=2)
    assert_exactly_once(run, 1000)
    shares = [s.stats["telemetry_ingested"] for s in run.servers]
    assert all(share > 0 for share in shares), shares
    assert all(s.stats["received_telemetry"] == s.stats["telemetry_ingested"] for s in run.servers)
    assert all(s.stats["status_ingested"] > 0 for s in run.servers)


def test_malformed_and_impersonating_messages_are_set_aside_while_ingest_goes_on(
    tmp_path: Path, scale_broker: Broker
) -> None:
    run = simulate(tmp_path, scale_broker, devices=500, rate=300, seconds=3, fault_every=10)
    faults = run.report.faults
    assert set(faults) == set(FAULTS) and all(n > 0 for n in faults.values()), faults
    assert_exactly_once(run, 500)
    (server,) = run.servers
    assert server.stats["rejected"] == faults["bad_json"] + faults["not_object"] + faults["impersonate"]
    assert server.stats["telemetry_unknown"] == faults["unknown_device"]
    with Registry(run.url) as registry:
        unknown = {u["device_id"]: u["count"] for u in registry.unknown_devices()}
        assert all(d.startswith("intruder-") for d in unknown), unknown
        assert sum(unknown.values()) == faults["unknown_device"]
        refused = registry.audit_log(limit=10_000, action="device.message_refused")
        assert len(refused) == faults["impersonate"]  # the impersonations are audited, one by one
        assert all(a["actor"].startswith("device:sim-") and not a["ok"] for a in refused)
        first_sightings = registry.audit_log(limit=10_000, action="unknown_device")
        assert sorted(a["detail"]["device"] for a in first_sightings) == sorted(unknown)
        assert not any(d["id"].startswith("intruder-") for d in registry.devices())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SLOW"), reason="full-size run: SLOW=1 (make test-all)")
def test_ten_thousand_devices_at_a_thousand_messages_per_second(tmp_path: Path, scale_broker: Broker) -> None:
    run = simulate(tmp_path, scale_broker, devices=10_000, rate=1000, seconds=60)
    assert_exactly_once(run, 10_000)
    assert run.total("rejected") == 0
