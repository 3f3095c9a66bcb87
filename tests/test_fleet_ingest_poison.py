"""Poisoned device messages (lone surrogates, integers past 64 bits, NUL, oversize fields) never take their batch
down: each is screened on its own (fleet/ingest.py), the bad ones are quarantined with their reason, the genuine ones
of the same batch are all stored. Real Mosquitto, a real FleetServer, SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fleet.config import FleetConfig
from fleet.db import QUARANTINE_KEEP, Registry, quarantine_t, updates_t
from fleet.ingest import CUT_MARKER, INT64_MAX, INT64_MIN, MAX_DEPTH, MAX_STRING, quarantine_text, safe_text, screen
from fleet.keys import KeyStore
from fleet.repository import Repository
from fleet.server import FleetServer
from tests.daemon_helpers import wait_until
from tests.mosquitto import Broker
from tests.test_fleet_db import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL database)

ROOT = Path(__file__).resolve().parents[1]
GENUINE = 1000
DEVICES = 10

# ---- screening (pure) -----------------------------------------------------------------------------------


def test_clean_message_passes_unchanged() -> None:
    data = {"device_id": "d1", "ts": 1.5, "update_id": "u/1", "seq": INT64_MAX, "n": INT64_MIN, "x": [1, {"a": None}]}
    assert screen("update", data) == type(screen("update", data))(data, None, 0)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"reason": "ok \ud800"}, "$.reason contains a lone surrogate"),
        ({"detail": {"k": ["\udfff"]}}, "$.detail.k[0] contains a lone surrogate"),
        ({"detail": {"\ud800": 1}}, "a key in $.detail contains a lone surrogate"),
        ({"reason": "a\x00b"}, "$.reason contains a NUL character"),
        ({"seq": 2**63}, "$.seq is an integer outside the database's 64-bit range"),
        ({"progress": -(2**63) - 1}, "$.progress is an integer outside"),
        ({"detail": {"n": 10**40}}, "$.detail.n is an integer outside"),
    ],
)
def test_poison_is_refused_with_the_place_named(data: dict[str, Any], needle: str) -> None:
    screened = screen("update", {"device_id": "d1"} | data)
    assert screened.data is None
    assert screened.reason is not None and needle in screened.reason
    assert screened.reason.isascii()


def test_nesting_past_the_limit_is_refused() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 1):
        deep = {"a": deep}
    screened = screen("event", {"detail": deep})
    assert screened.data is None and "nested deeper" in (screened.reason or "")


def test_oversize_fields_are_cut_with_a_marker() -> None:
    screened = screen("update", {"update_id": "u" * 10_000, "reason": "r" * 10_000, "extra": {"t": "x" * 9000}})
    assert screened.data is not None and screened.cut == 3
    assert len(screened.data["update_id"]) == 128 and screened.data["update_id"].endswith(CUT_MARKER)
    assert len(screened.data["reason"]) == MAX_STRING and screened.data["reason"].endswith(CUT_MARKER)
    assert len(screened.data["extra"]["t"]) == MAX_STRING


def test_quarantine_text_is_ascii_and_bounded() -> None:
    text = quarantine_text({"a": "\ud800\x00", "n": 2**70, "long": "é" * 100_000})
    assert text.isascii() and len(text) <= 16 * 1024
    assert str(2**70) in text and "\\ud800" in text
    assert safe_text("a\ud800\x00b") == "a\\ud800\\x00b"


# ---- a real server ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.sqlite'}"
    return request.getfixturevalue("pg_url")


def _poison(now: float) -> list[tuple[str, str, Any, str]]:
    """(topic suffix, device, payload, expected reason fragment): one of each kind of poison."""
    state = {"v": 1, "ts": now, "pipeline": "digits", "state": "downloading"}
    return [
        ("update/status", "dev0", state | {"update_id": "p-sur", "reason": "\ud800"}, "lone surrogate"),
        ("update/status", "dev1", state | {"update_id": "p-seq", "seq": 2**63}, "64-bit range"),
        ("update/status", "dev2", state | {"update_id": "p-prog", "progress": 2**64}, "64-bit range"),
        ("update/status", "dev3", state | {"update_id": "p-nul", "reason": "a\x00b"}, "NUL character"),
        ("update/state/digits", "dev4", state | {"update_id": "\udfff"}, "lone surrogate"),
        ("telemetry", "dev5", {"v": 1, "ts": now, "fps": 2**70}, "64-bit range"),
        ("telemetry", "dev6", {"v": 1, "ts": 1e300, "fps": 1.0}, "could not be stored"),  # bucket past BIGINT
        ("events", "dev7", {"v": 1, "ts": now, "kind": "x", "level": "info", "detail": {"\ud800": 1}}, "surrogate"),
        ("ack", "dev8", {"v": 1, "id": "\ud800" * 3, "ok": True}, "lone surrogate"),
        ("status", "dev9", {"v": 1, "ts": now, "state": "online", "reason": "\udfff"}, "lone surrogate"),
    ]


def test_poisoned_messages_are_quarantined_and_every_genuine_one_is_stored(
    tmp_path: Path, broker_factory: Callable[..., Broker], database: str
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = broker_factory(persistence=False, max_queued_messages=0, extra_conf="max_inflight_messages 0")
    config = FleetConfig(
        data_dir=str(tmp_path / "fleet"), database=database, server_id="poison", broker={"url": broker.url}
    )
    Repository.init(config.repository_dir, KeyStore(config.keys_dir))
    server = FleetServer(config)
    for k in range(DEVICES):
        server.registry.add_device(f"dev{k}")
    server.start()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="poisoner", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    now = time.time()
    poison = _poison(now)
    infos = []
    try:
        assert wait_until(lambda: server.link.connected, 15)

        def send(suffix: str, device: str, payload: Any) -> None:
            body = json.dumps(payload).encode()  # ensure_ascii: lone surrogates go out as \\udXXX escapes
            infos.append(client.publish(f"edge/{device}/{suffix}", body, qos=1))

        rounds = 0
        for i in range(GENUINE):
            device = f"dev{i % DEVICES}"
            state = {"v": 1, "device_id": device, "ts": now + i / 1000, "update_id": f"u-{device}"}
            send("update/status", device, state | {"pipeline": "digits", "state": "downloading", "progress": i})
            if i % 20 == 19:  # genuine telemetry too: its batch holds the poison the database refuses
                send("telemetry", device, {"v": 1, "ts": now + i / 1000, "fps": 10.0, "latency_ms": 5.0})
            if i % 50 == 25:  # poison between genuine messages, every kind of it twice over the run
                suffix, bad_device, payload, _ = poison[rounds % len(poison)]
                rounds += 1
                send(suffix, bad_device, payload)
        long_id = "L" * 10_000
        send(
            "update/status",
            "dev0",
            {"v": 1, "ts": now, "update_id": long_id, "pipeline": "digits", "state": "downloading"},
        )
        for info in infos:
            info.wait_for_publish(30)
        poisoned = rounds
        wanted_updates = GENUINE + 1

        def done() -> bool:
            s = server.stats
            return s["update_ingested"] >= wanted_updates and s["quarantined"] >= poisoned

        assert wait_until(done, 120), dict(server.stats)
        assert wait_until(lambda: len(server.registry.quarantined(limit=1000)) >= poisoned, 30)
    finally:
        client.loop_stop()
        client.disconnect()
        server.stop()

    stats = server.stats
    assert stats["update_ingested"] == wanted_updates, dict(stats)
    assert stats["update_invalid"] == 0 and stats["update_duplicates"] == 0
    assert stats["telemetry_ingested"] == GENUINE // 20
    assert stats["quarantined"] == poisoned == 2 * len(poison)
    assert stats["normalised"] == 1
    with Registry(config.database_url) as registry:
        with registry.engine.connect() as conn:
            rows = conn.execute(sa.select(updates_t.c.device_id, updates_t.c.progress, updates_t.c.update_id)).all()
            quarantined = conn.execute(sa.select(quarantine_t)).mappings().all()
        genuine = {(r.device_id, r.progress) for r in rows if r.update_id.startswith("u-")}
        assert genuine == {(f"dev{i % DEVICES}", i) for i in range(GENUINE)}
        cut = [r.update_id for r in rows if r.update_id.startswith("L")]
        assert cut == ["L" * (128 - len(CUT_MARKER)) + CUT_MARKER]
        assert not any(r.update_id.startswith("p-") for r in rows)
        assert len(quarantined) == poisoned
        by_device = Counter((q["device_id"], q["kind"]) for q in quarantined)
        assert all(n == 2 for n in by_device.values()) and len(by_device) == len(poison)
        for suffix, device, _payload, needle in poison:
            mine = [q for q in quarantined if q["device_id"] == device]
            assert mine and all(needle in q["reason"] for q in mine), (suffix, mine[0]["reason"])
            assert all(q["payload"].isascii() for q in mine)
        assert any("\\ud800" in q["payload"] for q in quarantined)  # kept as written, escaped
        audit = registry.audit_log(limit=1000, action="device.message_quarantined")
        assert {a["actor"] for a in audit} == {f"device:dev{k}" for k in range(DEVICES)}
        assert sum(a["detail"]["count"] for a in audit) == poisoned
        assert registry.devices(), "the registry still answers"
    # inspectable from the console too
    toml = tmp_path / "fleet.toml"
    toml.write_text(f'data_dir = "{tmp_path / "fleet"}"\ndatabase = "{database}"\n[broker]\nurl = "{broker.url}"\n')
    command = [sys.executable, "-m", "fleet.console", "--config", str(toml), "quarantine", "--device", "dev0"]
    listing = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listing.returncode == 0, listing.stderr
    shown = json.loads(listing.stdout)
    assert len(shown) == 2 and all("lone surrogate" in q["reason"] for q in shown)
    table = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=ROOT, env=os.environ | {"COLUMNS": "200"}
    )
    assert table.returncode == 0 and "dev0" in table.stdout and "lone surrogate" in table.stdout, table.stdout
    with Registry(config.database_url) as registry:
        # retention keeps the newest QUARANTINE_KEEP and the recent ones
        assert registry.prune()["quarantine"] == 0 and poisoned <= QUARANTINE_KEEP
