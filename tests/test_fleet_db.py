"""Fleet registry storage (fleet/db.py) on SQLite and on a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from agent.protocol import EventPayload, ModelRef, StatusPayload
from agent.protocol.update import UpdateStatus
from fleet.db import Base, Registry, RolloutConflict, telemetry_metrics
from fleet.errors import FleetError

ROOT = Path(__file__).resolve().parent.parent
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres connect_timeout=3"
NOW = 1_800_000_000.0


# ---- fixtures ---------------------------------------------------------------------------------------


def _pg_admin() -> Any:
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as error:
        reason = f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user postgres: {str(error).strip()[:200]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards)."""
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def reg(url: str) -> Iterator[Registry]:
    registry = Registry(url)
    registry.migrate()
    yield registry
    registry.close()


def status(device: str, ts: float, state: str = "online", **extra: Any) -> dict[str, Any]:
    return {"v": 1, "device_id": device, "ts": ts, "state": state, **extra}


def telemetry(
    device: str,
    ts: float,
    fps: float | None = 10.0,
    latency: float | None = 20.0,
    temp: float | None = 50.0,
    cpu: float | None = 30.0,
) -> dict[str, Any]:
    """A telemetry payload shaped like agent.mqtt.service.MqttService.telemetry() publishes it."""
    pipelines = {}
    if fps is not None or latency is not None:
        pipelines["cam"] = {
            "fps_in": 30.0,
            "fps_processed": fps,
            "latency_ms": {"p50": latency, "p95": None, "p99": None},
            "model": {"name": "det", "version": "1", "sha256": "ab"},
        }
    return {
        "v": 1,
        "device_id": device,
        "run_id": "r1",
        "ts": ts,
        "uptime_s": 5.0,
        "pipelines": pipelines,
        "system": {"cpu_percent": cpu, "temperature_c": temp, "rss_mb": 100.0},
    }


def update(device: str, ts: float, state: str, update_id: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"v": 1, "device_id": device, "ts": ts, "update_id": update_id, "pipeline": "cam", "state": state, **extra}


def event(device: str, ts: float, kind: str = "thermal", **detail: Any) -> dict[str, Any]:
    return {"v": 1, "device_id": device, "ts": ts, "kind": kind, "level": "warning", "detail": detail}


def stats(result: Any) -> dict[str, int]:
    return {k: v for k, v in result.as_dict().items() if v}


# ---- schema ---------------------------------------------------------------------------------------


def test_migrated_schema_equals_models(reg: Registry) -> None:
    with reg.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diffs == []
    assert reg.schema_revision() == reg.head_revision() == "0002"
    reg.migrate()  # again: nothing to do
    assert reg.schema_revision() == "0002"


def test_downgrade_to_base_and_up_again(reg: Registry) -> None:
    reg.add_device("d1")
    config = reg._alembic_config()
    with reg.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    names = set(sa.inspect(reg.engine).get_table_names())
    assert names <= {"alembic_version"}
    reg.migrate()
    assert reg.devices() == []
    assert reg.next_command_seq() > 0


def test_concurrent_migrations_from_two_servers(url: str) -> None:
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with Registry(url) as registry:
                registry.migrate()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Registry(url) as registry:
        assert registry.schema_revision() == "0002"
        assert registry.devices() == []


def test_unmigrated_database_says_what_to_do(url: str) -> None:
    with Registry(url) as registry:
        assert registry.schema_revision() is None
        with pytest.raises(FleetError) as caught:
            registry.devices()
        with pytest.raises(FleetError):
            registry.ingest_status([status("d1", 1.0)])
    text = str(caught.value)
    assert "no schema" in text and "(fix: " in text and "migrat" in caught.value.fix
    assert "\n" not in text


# ---- bad URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("not a url", "is not valid"),
        ("mysql://root@localhost/fleet", "not supported"),
        ("postgresql+psycopg2://u@localhost/fleet", "not supported"),
        ("sqlite:////nonexistent-dir-for-fleet/sub/fleet.db", "cannot open the SQLite database"),
        ("postgresql+psycopg://fleet:s3cret@127.0.0.1:1/fleet", "cannot connect to the fleet database"),
    ],
)
def test_bad_database_url_is_one_line_fleet_error(url: str, needle: str) -> None:
    with pytest.raises(FleetError) as caught:
        Registry(url, connect_timeout_s=2)
    text = str(caught.value)
    assert needle in text
    assert "\n" not in text and text.endswith(")") and "(fix: " in text
    assert caught.value.problem and caught.value.fix
    assert "s3cret" not in text


def test_plain_postgresql_url_uses_psycopg(pg_url: str) -> None:
    with Registry(pg_url.replace("postgresql+psycopg://", "postgresql://")) as registry:
        assert registry.engine.dialect.driver == "psycopg"


# ---- devices, groups, queries -----------------------------------------------------------------------


def test_devices_groups_and_queries(reg: Registry) -> None:
    d = reg.add_device("cam-1", "lobby", ["rgb", "door"], "rpi5", "x509", now=NOW)
    assert d["group"] == "lobby" and d["tags"] == ["door", "rgb"] and d["hardware"] == "rpi5"
    assert d["credentials_kind"] == "x509" and d["created_at"] == NOW and d["online"] is False
    assert d["models"] == {} and d["updates"] == [] and d["telemetry"] == [] and d["events"] == []
    reg.add_device("cam-2", "lobby", ["rgb"], now=NOW)
    reg.add_device("sensor-1", now=NOW)
    reg.add_group("empty", "no devices yet")

    assert [x["id"] for x in reg.devices()] == ["cam-1", "cam-2", "sensor-1"]
    assert [x["id"] for x in reg.devices(group="lobby")] == ["cam-1", "cam-2"]
    assert [x["id"] for x in reg.devices(tag="door")] == ["cam-1"]
    assert [x["id"] for x in reg.devices(group="lobby", tag="rgb")] == ["cam-1", "cam-2"]
    assert reg.devices(group="nope") == []
    assert reg.device("nope") is None

    groups = {g["name"]: g for g in reg.groups()}
    assert {n: (g["devices"], g["online"]) for n, g in groups.items()} == {
        "empty": (0, 0),
        "lobby": (2, 0),
        "unassigned": (1, 0),
    }
    assert groups["empty"]["description"] == "no devices yet"

    reg.ingest_status([status("cam-2", NOW)], now=NOW)
    assert [x["id"] for x in reg.devices(online=True)] == ["cam-2"]
    assert {g["name"]: g["online"] for g in reg.groups()}["lobby"] == 1

    assert reg.update_device("sensor-1", group="yard", tags=["temp"])
    assert reg.device("sensor-1")["group"] == "yard"  # type: ignore[index]
    assert [x["id"] for x in reg.devices(tag="temp")] == ["sensor-1"]
    assert not reg.update_device("nope", group="yard")

    with pytest.raises(FleetError, match="already exists"):
        reg.add_device("cam-1")
    with pytest.raises(FleetError, match="not valid"):
        reg.add_device("bad/id")
    with pytest.raises(FleetError, match="not valid"):
        reg.add_device("ok", group="")


def test_remove_device_takes_its_history(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    reg.ingest_telemetry([telemetry("d1", NOW)], now=NOW)
    reg.ingest_update_states([update("d1", NOW, "offered")], now=NOW)
    reg.ingest_events([event("d1", NOW)], now=NOW)
    assert reg.remove_device("d1")
    assert not reg.remove_device("d1")
    assert reg.device("d1") is None
    with reg.engine.connect() as conn:
        for table in ("telemetry", "update_history", "events", "ingest_marks"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table
    # provisioned again: a clean slate, and the old telemetry counts as new again
    reg.add_device("d1", now=NOW)
    assert stats(reg.ingest_telemetry([telemetry("d1", NOW)], now=NOW)) == {"ingested": 1}


# ---- status ---------------------------------------------------------------------------------------


def test_status_reports_what_the_device_runs(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    models = {"cam": ModelRef(name="det", version="2", sha256="cd")}
    online = StatusPayload(state="online", device_id="d1", ts=NOW, agent_version="0.9", models=models, profile="rpi5")
    assert stats(reg.ingest_status([online], now=NOW + 1)) == {"ingested": 1}
    d = reg.device("d1")
    assert d is not None
    assert d["online"] is True and d["status"] == "online" and d["last_seen"] == NOW + 1
    assert d["models"] == {"cam": {"name": "det", "version": "2", "sha256": "cd"}}
    assert d["agent_version"] == "0.9" and d["profile"] == "rpi5"

    # re-delivery (retained status on resubscribe) changes nothing; an older one is stale
    assert stats(reg.ingest_status([online.model_dump()], now=NOW + 50)) == {"duplicates": 1}
    assert stats(reg.ingest_status([status("d1", NOW - 10, models={})], now=NOW + 50)) == {"stale": 1}
    assert reg.device("d1")["last_seen"] == NOW + 1  # type: ignore[index]

    # clean shutdown: offline, the models it last reported stay
    assert stats(reg.ingest_status([status("d1", NOW + 60, "offline", reason="shutdown")], now=NOW + 60)) == {
        "ingested": 1
    }
    d = reg.device("d1")
    assert d is not None and d["online"] is False and d["status_reason"] == "shutdown"
    assert d["models"]["cam"]["version"] == "2"

    # online again with nothing loaded: reported as such
    reg.ingest_status([status("d1", NOW + 70, models={})], now=NOW + 70)
    assert reg.device("d1")["models"] == {}  # type: ignore[index]


def test_status_batch_is_applied_in_device_time_order(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    batch = [status("d1", NOW + 2, "offline", reason="shutdown"), status("d1", NOW + 1), status("d1", NOW + 1)]
    assert stats(reg.ingest_status(batch, now=NOW + 3)) == {"ingested": 2, "duplicates": 1}
    assert reg.device("d1")["online"] is False  # type: ignore[index]


def test_last_will_is_ordered_by_connection(reg: Registry) -> None:
    """The LWT carries the time the agent connected, which is before its own online status."""
    reg.add_device("d1", now=NOW)
    lost = {"state": "offline", "reason": "connection lost"}
    will_1, online_1 = NOW + 0.0, NOW + 0.5  # connection 1: will set, then online published
    will_2, online_2 = NOW + 100.0, NOW + 100.5  # connection 2
    reg.ingest_status([status("d1", online_1)], now=NOW + 1)
    # connection 1 breaks: the broker publishes will 1 (older than the online status in force): applied
    assert stats(reg.ingest_status([status("d1", will_1, **lost)], now=NOW + 50)) == {"ingested": 1}
    assert reg.device("d1")["online"] is False  # type: ignore[index]
    assert stats(reg.ingest_status([status("d1", will_1, **lost)], now=NOW + 51)) == {"stale": 1}
    reg.ingest_status([status("d1", online_2)], now=NOW + 101)
    assert reg.device("d1")["online"] is True  # type: ignore[index]
    # will 1 delivered again late (another server, re-delivery): it belongs to the old connection
    assert stats(reg.ingest_status([status("d1", will_1, **lost)], now=NOW + 102)) == {"stale": 1}
    assert reg.device("d1")["online"] is True  # type: ignore[index]
    # a late clean-shutdown status of an older run is stale too
    assert stats(reg.ingest_status([status("d1", will_2 - 5, "offline", reason="shutdown")], now=NOW + 103)) == {
        "stale": 1
    }
    # connection 2 breaks
    assert stats(reg.ingest_status([status("d1", will_2, **lost)], now=NOW + 200)) == {"ingested": 1}
    assert reg.device("d1")["online"] is False  # type: ignore[index]

    # out of order: will 1 processed only after connection 2 came online
    reg.add_device("d2", now=NOW)
    reg.ingest_status([status("d2", online_1), status("d2", online_2)], now=NOW + 101)
    assert stats(reg.ingest_status([status("d2", will_1, **lost)], now=NOW + 102)) == {"stale": 1}
    assert reg.device("d2")["online"] is True  # type: ignore[index]


def test_unknown_devices_are_counted_not_created(reg: Registry) -> None:
    reg.add_device("known", now=NOW)
    result = reg.ingest_status([status("ghost", NOW), status("known", NOW), status("ghost", NOW + 1)], now=NOW)
    assert stats(result) == {"ingested": 1, "unknown": 2}
    assert stats(reg.ingest_telemetry([telemetry("ghost", NOW)], now=NOW + 5)) == {"unknown": 1}
    assert stats(reg.ingest_update_states([update("ghost", NOW, "offered")], now=NOW + 6)) == {"unknown": 1}
    assert stats(reg.ingest_events([event("ghost", NOW), event("other", NOW)], now=NOW + 7)) == {"unknown": 2}
    assert reg.device("ghost") is None
    assert [d["id"] for d in reg.devices()] == ["known"]
    unknown = {u["device_id"]: u for u in reg.unknown_devices()}
    assert unknown["ghost"]["count"] == 5 and unknown["ghost"]["last_kind"] == "event"
    assert unknown["ghost"]["first_seen"] == NOW and unknown["ghost"]["last_seen"] == NOW + 7
    assert unknown["other"]["count"] == 1
    # audited once per id, at first sight
    audits = reg.audit_log(action="unknown_device")
    assert sorted(a["detail"]["device"] for a in audits) == ["ghost", "other"]
    assert all(a["ok"] is False and a["actor"] == "ingest" for a in audits)
    # provisioning it: no longer unknown, and its messages count
    reg.add_device("ghost", now=NOW)
    assert "ghost" not in {u["device_id"] for u in reg.unknown_devices()}
    assert stats(reg.ingest_telemetry([telemetry("ghost", NOW)], now=NOW + 8)) == {"ingested": 1}


# ---- telemetry --------------------------------------------------------------------------------------


def test_telemetry_metrics_from_agent_payload() -> None:
    payload = telemetry("d1", NOW, fps=7.5, latency=12.0, temp=61.0, cpu=40.0)
    payload["pipelines"]["mic"] = {"fps_processed": 2.5, "latency_ms": {"p50": 30.0}}
    assert telemetry_metrics(payload) == {"fps": 10.0, "latency_ms": 30.0, "temperature_c": 61.0, "cpu_percent": 40.0}
    assert telemetry_metrics({"pipelines": "junk", "system": {"temperature_c": "hot", "cpu_percent": True}}) == {
        "fps": None,
        "latency_ms": None,
        "temperature_c": None,
        "cpu_percent": None,
    }
    assert telemetry_metrics({"fps": 3, "latency_ms": float("nan")})["fps"] == 3.0


def test_telemetry_bucket_merge_math(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    b0 = int(NOW)  # a multiple of 60: the bucket [NOW, NOW + 60)
    assert b0 % 60 == 0
    first = [
        telemetry("d1", NOW + 1, fps=10, latency=100, temp=40, cpu=10),
        telemetry("d1", NOW + 10, fps=20, latency=None, temp=None, cpu=20),
    ]
    assert stats(reg.ingest_telemetry(first, now=NOW + 11)) == {"ingested": 2}
    second = [
        telemetry("d1", NOW + 59.999, fps=30, latency=200, temp=60, cpu=None),
        telemetry("d1", NOW + 60, fps=1, latency=1, temp=70, cpu=1),  # next bucket
    ]
    assert stats(reg.ingest_telemetry(second, now=NOW + 61)) == {"ingested": 2}
    buckets = reg.device("d1")["telemetry"]  # type: ignore[index]
    assert buckets == [
        {
            "bucket": b0,
            "count": 3,
            "fps": pytest.approx(20.0),
            "latency_ms": pytest.approx(150.0),
            "temperature_c": pytest.approx(50.0),
            "temperature_max": 60.0,
            "cpu_percent": pytest.approx(15.0),
        },
        {
            "bucket": b0 + 60,
            "count": 1,
            "fps": 1.0,
            "latency_ms": 1.0,
            "temperature_c": 70.0,
            "temperature_max": 70.0,
            "cpu_percent": 1.0,
        },
    ]
    assert reg.telemetry_history("d1", since=b0 + 60) == buckets[1:]
    assert reg.telemetry_history("d1", until=b0) == buckets[:1]
    # a bucket with no temperature at all has no max
    reg.ingest_telemetry([telemetry("d1", NOW + 200, temp=None)], now=NOW + 200)
    assert reg.telemetry_history("d1", since=NOW + 180)[0]["temperature_max"] is None


def test_telemetry_redelivery_is_not_double_counted(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    batch = [telemetry("d1", NOW + i) for i in range(5)]
    assert stats(reg.ingest_telemetry(batch + batch[:2], now=NOW + 5)) == {"ingested": 5, "duplicates": 2}
    assert stats(reg.ingest_telemetry(batch, now=NOW + 6)) == {"duplicates": 5}
    (bucket,) = reg.device("d1")["telemetry"]  # type: ignore[index]
    assert bucket["count"] == 5
    assert reg.device("d1")["last_seen"] == NOW + 5  # type: ignore[index]  # re-deliveries are not "seen"


def test_telemetry_latest_metrics_follow_device_time(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    reg.ingest_telemetry([telemetry("d1", NOW + 10, fps=5, temp=55)], now=NOW + 10)
    # an older message arriving later (outbox replay) goes into history but not into the latest values
    assert stats(reg.ingest_telemetry([telemetry("d1", NOW + 1, fps=99, temp=99)], now=NOW + 11)) == {"ingested": 1}
    d = reg.device("d1")
    assert d is not None
    assert (d["fps"], d["temperature_c"], d["telemetry_ts"], d["last_seen"]) == (5.0, 55.0, NOW + 10, NOW + 11)
    assert d["latency_ms"] == 20.0 and d["cpu_percent"] == 30.0


def test_telemetry_invalid_and_expired_items(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    batch: list[Any] = [
        {"device_id": "d1"},  # no ts
        {"device_id": 7, "ts": NOW},
        {"device_id": "d1", "ts": "soon"},
        "not a mapping",
        telemetry("d1", NOW - reg.telemetry_retention_s - 1),  # older than the history kept
        telemetry("d1", NOW),
    ]
    assert stats(reg.ingest_telemetry(batch, now=NOW)) == {"ingested": 1, "invalid": 4, "stale": 1}


def test_prune_keeps_history_and_marks_consistent(url: str) -> None:
    with Registry(url, telemetry_retention_s=3600, events_retention_s=1200, events_per_device=3) as reg:
        reg.migrate()
        reg.add_device("d1", now=NOW)
        reg.ingest_telemetry([telemetry("d1", NOW - 3000), telemetry("d1", NOW)], now=NOW)
        reg.ingest_events([event("d1", NOW - 900)] + [event("d1", NOW + i, n=i) for i in range(5)], now=NOW)
        removed = reg.prune(now=NOW + 1000)
        assert removed["telemetry"] == 1 and removed["marks"] == 1
        assert removed["events"] == 1 + 2  # one too old, two over the per-device cap
        assert [e["detail"]["n"] for e in reg.device("d1")["events"]] == [4, 3, 2]  # type: ignore[index]
        assert len(reg.device("d1")["telemetry"]) == 1  # type: ignore[index]
        # the pruned message is now older than the retention: refused, not merged again
        assert stats(reg.ingest_telemetry([telemetry("d1", NOW - 3000)], now=NOW + 1000)) == {"stale": 1}
        assert stats(reg.ingest_telemetry([telemetry("d1", NOW)], now=NOW + 1000)) == {"duplicates": 1}


# ---- update states -----------------------------------------------------------------------------------


def test_update_states_are_idempotent(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    chain = [
        update("d1", NOW + 1, "offered", command_id="c1", seq=7, target="det/2.bundle", version="2"),
        update("d1", NOW + 2, "downloading", progress=0, total=1000),
        update("d1", NOW + 3, "downloading", progress=500, total=1000),
        update("d1", NOW + 4, "downloaded"),
        update("d1", NOW + 5, "trial", running="2"),
    ]
    assert stats(reg.ingest_update_states(chain, now=NOW + 6)) == {"ingested": 5}
    # at-least-once: the whole chain again, plus one in-batch repeat (progress None must also collide)
    again = [UpdateStatus.model_validate(u) for u in chain] + [chain[3]]
    assert stats(reg.ingest_update_states(again, now=NOW + 7)) == {"duplicates": 6}
    d = reg.device("d1")
    assert d is not None
    assert d["update_state"] == "trial" and d["update_id"] == "u1" and d["update_ts"] == NOW + 5
    assert [u["state"] for u in d["updates"]] == ["trial", "downloaded", "downloading", "downloading", "offered"]
    offered = d["updates"][-1]
    assert (offered["command_id"], offered["seq"], offered["target"], offered["version"]) == (
        "c1",
        7,
        "det/2.bundle",
        "2",
    )
    assert offered["progress"] is None and d["updates"][2]["progress"] == 500
    assert d["updates"][2]["detail"] == {"total": 1000}
    assert d["updates"][0]["detail"] == {"running": "2"}


def test_update_state_follows_device_time_not_arrival(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    reg.ingest_update_states([update("d1", NOW + 9, "rolled_back", reason="health check failed")], now=NOW + 10)
    reg.ingest_update_states([update("d1", NOW + 8, "trial")], now=NOW + 11)  # late, older
    d = reg.device("d1")
    assert d is not None and d["update_state"] == "rolled_back" and d["update_reason"] == "health check failed"
    assert len(d["updates"]) == 2 and d["last_seen"] == NOW + 11


def test_update_states_invalid_items(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    bad = [update("d1", NOW, "exploded"), {"device_id": "d1"}, update("d1", NOW, "offered", surprise=1)]
    assert stats(reg.ingest_update_states([*bad, update("d1", NOW, "offered")], now=NOW)) == {
        "ingested": 1,
        "invalid": 3,
    }


# ---- events -------------------------------------------------------------------------------------------


def test_events_are_idempotent(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    batch = [
        event("d1", NOW, "pipeline_failed", pipeline="a"),
        event("d1", NOW, "pipeline_failed", pipeline="b"),  # same time and kind, different event
        EventPayload(device_id="d1", ts=NOW + 1, kind="thermal", level="error", detail={"temp": 90}),
    ]
    assert stats(reg.ingest_events(batch, now=NOW + 2)) == {"ingested": 3}
    assert stats(reg.ingest_events([*batch, batch[0]], now=NOW + 3)) == {"duplicates": 4}
    d = reg.device("d1")
    assert d is not None and d["last_seen"] == NOW + 2
    newest = d["events"][0]
    assert (newest["kind"], newest["level"], newest["detail"]) == ("thermal", "error", {"temp": 90})
    assert sorted(e["detail"]["pipeline"] for e in d["events"][1:]) == ["a", "b"]
    assert stats(reg.ingest_events([{"device_id": "d1", "ts": NOW, "kind": "x", "level": "fatal"}], now=NOW)) == {
        "invalid": 1
    }


# ---- online / offline -----------------------------------------------------------------------------


def test_mark_stale_and_back(reg: Registry) -> None:
    reg.add_device("quiet", now=NOW)
    reg.add_device("chatty", now=NOW)
    reg.add_device("gone", now=NOW)
    reg.ingest_status([status("quiet", NOW), status("chatty", NOW), status("gone", NOW)], now=NOW)
    reg.ingest_status([status("gone", NOW + 5, "offline", reason="shutdown")], now=NOW + 5)
    reg.ingest_telemetry([telemetry("chatty", NOW + 100)], now=NOW + 100)
    assert reg.mark_stale(now=NOW + 150, max_age_s=120) == ["quiet"]
    assert reg.mark_stale(now=NOW + 150, max_age_s=120) == []
    online = {d["id"]: d["online"] for d in reg.devices()}
    assert online == {"chatty": True, "gone": False, "quiet": False}
    # it speaks again: online (its last status says online); a device that said offline stays offline
    reg.ingest_events([event("quiet", NOW + 160)], now=NOW + 160)
    reg.ingest_telemetry([telemetry("gone", NOW + 160)], now=NOW + 160)
    online = {d["id"]: d["online"] for d in reg.devices()}
    assert online == {"chatty": True, "gone": False, "quiet": True}


# ---- concurrency --------------------------------------------------------------------------------------


def test_command_seq_from_two_threads(url: str) -> None:
    with Registry(url) as setup:
        setup.migrate()
    results: dict[int, list[int]] = {}

    def allocate(n: int) -> None:
        with Registry(url) as registry:
            results[n] = [registry.next_command_seq() for _ in range(40)]

    threads = [threading.Thread(target=allocate, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = results[0] + results[1]
    assert len(set(every)) == 80
    for seqs in results.values():
        assert seqs == sorted(seqs)


_ALLOCATE = """
import json, sys
from fleet.db import Registry
with Registry(sys.argv[1]) as r:
    print(json.dumps([r.next_command_seq() for _ in range(30)]))
"""


def test_command_seq_from_two_processes(url: str) -> None:
    with Registry(url) as setup:
        setup.migrate()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _ALLOCATE, url], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs[0]) | set(outputs[1])) == 60
    assert all(seqs == sorted(seqs) for seqs in outputs)


def test_command_seq_survives_a_reset_counter(reg: Registry) -> None:
    first = reg.next_command_seq(now=NOW)
    assert first == int(NOW * 1000)
    assert reg.next_command_seq(now=NOW - 3600) == first + 1  # clock went back: still increasing
    with reg.engine.begin() as conn:  # database restored from an old backup
        conn.execute(sa.text("UPDATE counters SET value = 5"))
    assert reg.next_command_seq(now=NOW + 1) == int((NOW + 1) * 1000)
    with reg.engine.begin() as conn:  # counter row lost
        conn.execute(sa.text("DELETE FROM counters"))
    assert reg.next_command_seq(now=NOW + 2) == int((NOW + 2) * 1000)


def test_two_concurrent_ingesters_do_not_double_count(url: str) -> None:
    """Two servers (separate Registry instances) ingest overlapping re-deliveries of the same messages at once."""
    with Registry(url) as setup:
        setup.migrate()
        for i in range(6):
            setup.add_device(f"d{i}", now=NOW)
        setup.ingest_status([status(f"d{i}", NOW) for i in range(6)], now=NOW)
    tele = [telemetry(f"d{i % 6}", NOW + 10 * (i // 6), fps=float(i)) for i in range(120)]
    updates = [update(f"d{i}", NOW + j, s) for i in range(6) for j, s in enumerate(["offered", "downloaded", "trial"])]
    events = [event(f"d{i % 6}", NOW + i, n=i) for i in range(30)]
    totals: list[dict[str, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def server(n: int) -> None:
        rnd = random.Random(n)
        try:
            with Registry(url) as registry:
                barrier.wait()
                sums = {"telemetry": 0, "updates": 0, "events": 0, "duplicates": 0}
                for _ in range(2):  # every message twice per server: four deliveries in all
                    for kind, items in (("telemetry", tele), ("updates", updates), ("events", events)):
                        items = items[:]
                        rnd.shuffle(items)
                        ingest = {
                            "telemetry": registry.ingest_telemetry,
                            "updates": registry.ingest_update_states,
                            "events": registry.ingest_events,
                        }[kind]
                        for start in range(0, len(items), 15):
                            result = ingest(items[start : start + 15], now=NOW + 1000)
                            sums[kind] += result.ingested
                            sums["duplicates"] += result.duplicates
                totals.append(sums)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=server, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(t["telemetry"] for t in totals) == len(tele)
    assert sum(t["updates"] for t in totals) == len(updates)
    assert sum(t["events"] for t in totals) == len(events)
    assert sum(t["duplicates"] for t in totals) == 3 * (len(tele) + len(updates) + len(events))
    with Registry(url) as check:
        for i in range(6):
            d = check.device(f"d{i}", telemetry=1000)
            assert d is not None
            assert sum(b["count"] for b in d["telemetry"]) == 20
            assert [u["state"] for u in d["updates"]] == ["trial", "downloaded", "offered"]
            assert d["update_state"] == "trial"
            assert len(d["events"]) == 5
            assert d["fps"] == float(114 + i)  # the newest message's value, whichever server applied it
            mine = [m for m in tele if m["device_id"] == f"d{i}"]
            mean = sum(m["pipelines"]["cam"]["fps_processed"] for m in mine) / len(mine)
            weighted = sum(b["fps"] * b["count"] for b in d["telemetry"]) / 20
            assert weighted == pytest.approx(mean)


# ---- audit, rollouts, commands ----------------------------------------------------------------------


def test_audit(reg: Registry) -> None:
    first = reg.record_audit("alice", "device.add", {"device": "d1", "tags": ["a"]}, now=NOW)
    second = reg.record_audit("bob", "rollout.start", {"rollout": "r1"}, ok=False, error="no such target", now=NOW + 1)
    assert second > first
    log = reg.audit_log()
    assert [(a["actor"], a["action"], a["ok"], a["error"]) for a in log] == [
        ("bob", "rollout.start", False, "no such target"),
        ("alice", "device.add", True, None),
    ]
    assert log[1]["detail"] == {"device": "d1", "tags": ["a"]} and log[1]["ts"] == NOW
    assert len(reg.audit_log(limit=1)) == 1
    assert [a["actor"] for a in reg.audit_log(actor="alice")] == ["alice"]
    assert [a["action"] for a in reg.audit_log(action="rollout.start")] == ["rollout.start"]


def test_rollouts_persist(url: str) -> None:
    policy = {"waves": [1, 10, 100], "abort_failure_rate": 0.2}
    with Registry(url) as reg:
        reg.migrate()
        assert reg.save_rollout("r1", "det/2.bundle", policy, {"wave": 0}, "running", now=NOW) == 1
        assert reg.save_rollout("r0", "det/1.bundle", policy, {}, "done", now=NOW - 10) == 1
        assert reg.save_rollout("r1", "det/2.bundle", policy, {"wave": 1}, "running", now=NOW + 5) == 2
    with Registry(url) as reg:  # another process, later
        r1 = reg.load_rollout("r1")
        assert r1 is not None
        assert (r1["target"], r1["policy"], r1["state"], r1["status"], r1["version"]) == (
            "det/2.bundle",
            policy,
            {"wave": 1},
            "running",
            2,
        )
        assert (r1["created_at"], r1["updated_at"]) == (NOW, NOW + 5)
        assert reg.load_rollout("nope") is None
        assert [r["id"] for r in reg.list_rollouts()] == ["r1", "r0"]
        assert [r["id"] for r in reg.list_rollouts(status="done")] == ["r0"]
        # optimistic concurrency between two servers driving the same rollout
        assert reg.save_rollout("r1", "det/2.bundle", policy, {"wave": 2}, "running", expect_version=2) == 3
        with pytest.raises(RolloutConflict) as caught:
            reg.save_rollout("r1", "det/2.bundle", policy, {"wave": 9}, "aborted", expect_version=2)
        assert "(fix: " in str(caught.value)
        with pytest.raises(RolloutConflict):
            reg.save_rollout("r1", "det/2.bundle", policy, {}, "running", expect_version=0)
        assert reg.save_rollout("r2", "det/3.bundle", policy, {}, "pending", expect_version=0) == 1
        assert reg.load_rollout("r1")["state"] == {"wave": 2}  # type: ignore[index]


def test_commands(reg: Registry) -> None:
    reg.add_device("d1", now=NOW)
    seqs = [reg.next_command_seq() for _ in range(3)]
    payload = {"signed": {"type": "deploy", "seq": seqs[0]}, "signatures": [{"keyid": "k", "sig": "00"}]}
    reg.record_command(seqs[0], "r1", "d1", "deploy", payload, issued=NOW, expires=NOW + 3600)
    reg.record_command(seqs[1], "r1", "d2", "deploy", payload, issued=NOW, expires=NOW + 3600)
    reg.record_command(seqs[2], "c9", "d1", "restart", {}, issued=NOW + 1)
    assert [c["seq"] for c in reg.commands(device_id="d1")] == [seqs[2], seqs[0]]
    assert [c["device_id"] for c in reg.commands(id="r1")] == ["d2", "d1"]
    assert reg.commands(id="c9")[0]["expires"] is None

    assert reg.ack_command("d1", "r1", {"ok": True}, now=NOW + 2)
    assert not reg.ack_command("d1", "r1", {"ok": False, "error": "late duplicate"})  # first ack wins
    assert not reg.ack_command("d1", "nope", {"ok": True})
    assert not reg.ack_command("d2", "r1", {"ok": True}, seq=seqs[0])  # seq of another device's command
    assert reg.ack_command("d2", "r1", {"ok": False, "error": "refused"}, seq=seqs[1], now=NOW + 3)
    acked = {c["seq"]: (c["acked"], c["ack_result"]) for c in reg.commands()}
    assert acked[seqs[0]] == (NOW + 2, {"ok": True})
    assert acked[seqs[1]] == (NOW + 3, {"ok": False, "error": "refused"})
    assert acked[seqs[2]] == (None, None)
    with pytest.raises(sa.exc.IntegrityError):
        reg.record_command(seqs[0], "dup", "d1", "deploy", {}, issued=NOW)
