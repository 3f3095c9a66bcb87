"""Fleet registry storage: devices, groups, telemetry history, update history, events, audit, rollouts, commands.

SQLAlchemy 2.0 on SQLite (the default, WAL mode) or PostgreSQL (several ``fleet serve`` instances may share one).
The schema is created and upgraded by alembic (``Registry.migrate()``; scripts in ``fleet/migrations``).

Rules the ingest API keeps, whatever the delivery order and however many servers ingest at once:

* devices are created only by provisioning (``add_device``); messages from unknown ids are counted in
  ``unknown_devices`` (and audited on first sight), never turned into devices;
* every ingest is idempotent: MQTT delivers at least once, so re-deliveries are recognised (``ingest_marks`` for
  telemetry, unique keys for update states and events, timestamps for status) and change nothing;
* counters and telemetry buckets are merged with ``INSERT ... ON CONFLICT DO UPDATE`` (sums and counts, so merging is
  exact and needs no read-modify-write), rows are touched in a fixed order (no deadlocks), and transactions that
  lose a race (deadlock, serialization failure, SQLite busy) are retried;
* the device row holds what the device *reports* (models, versions, update state), never what the server intended.

Times are UNIX epoch seconds (floats) throughout: device times (``ts``) come from the payloads, server times
(``now``: ``last_seen``, ``created_at``) from the caller or ``time.time()``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from agent.protocol import DEVICE_ID, EventPayload, StatusPayload
from agent.protocol.update import UpdateStatus
from fleet.errors import FleetError
from fleet.ingest import safe_text

T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
UNASSIGNED = "unassigned"
COMMAND_SEQ = "command_seq"
SERVER_HEARTBEAT = "server_heartbeat"  # counters row: epoch ms of the latest rollout tick of any server
NO_PROGRESS = -1  # update_history.progress when a state carries none (NULLs never conflict in unique keys)
_PG_MIGRATION_LOCK = 0x666C656574  # pg_advisory_xact_lock key: "fleet"

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A BIGINT id that still auto-increments on SQLite (only "INTEGER PRIMARY KEY" does there).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


def _device_fk() -> sa.ForeignKey:
    return sa.ForeignKey("devices.id", ondelete="CASCADE")


class Group(Base):
    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[float] = mapped_column(sa.Double)


class Device(Base):
    """One provisioned device and the latest state it reported."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    group: Mapped[str] = mapped_column(sa.String(128), sa.ForeignKey("groups.name"), index=True)
    tags: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    hardware: Mapped[str | None] = mapped_column(sa.String(128))
    credentials_kind: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[float] = mapped_column(sa.Double)
    # reported by the device (status)
    agent_version: Mapped[str | None] = mapped_column(sa.String(64))
    profile: Mapped[str | None] = mapped_column(sa.String(128))
    models: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)  # pipeline -> {name, version, sha256}
    status: Mapped[str | None] = mapped_column(sa.String(16))  # last status in force: online | offline
    status_reason: Mapped[str | None] = mapped_column(sa.String(256))
    status_ts: Mapped[float | None] = mapped_column(sa.Double)  # device time of the status in force
    prev_status_ts: Mapped[float | None] = mapped_column(sa.Double)  # ... and of the one before it (LWT ordering)
    online: Mapped[bool] = mapped_column(sa.Boolean, default=False)  # status online and heard from recently
    last_seen: Mapped[float | None] = mapped_column(sa.Double)  # server time of the last new message
    # reported by the device (telemetry)
    fps: Mapped[float | None] = mapped_column(sa.Double)
    latency_ms: Mapped[float | None] = mapped_column(sa.Double)
    temperature_c: Mapped[float | None] = mapped_column(sa.Double)
    cpu_percent: Mapped[float | None] = mapped_column(sa.Double)
    telemetry_ts: Mapped[float | None] = mapped_column(sa.Double)
    results: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)  # per pipeline: results summary of the last period
    # reported by the device (update/status)
    update_state: Mapped[str | None] = mapped_column(sa.String(32))
    update_reason: Mapped[str | None] = mapped_column(sa.Text)
    update_id: Mapped[str | None] = mapped_column(sa.String(128))
    update_ts: Mapped[float | None] = mapped_column(sa.Double)


class Telemetry(Base):
    """Downsampled telemetry: one row per device and bucket; sums and counts so merging is exact."""

    __tablename__ = "telemetry"

    device_id: Mapped[str] = mapped_column(sa.String(128), _device_fk(), primary_key=True)
    bucket: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, index=True)  # bucket start, epoch s
    count: Mapped[int] = mapped_column(sa.Integer)  # messages merged
    fps_sum: Mapped[float] = mapped_column(sa.Double, default=0.0)
    fps_n: Mapped[int] = mapped_column(sa.Integer, default=0)
    latency_sum: Mapped[float] = mapped_column(sa.Double, default=0.0)
    latency_n: Mapped[int] = mapped_column(sa.Integer, default=0)
    temperature_sum: Mapped[float] = mapped_column(sa.Double, default=0.0)
    temperature_n: Mapped[int] = mapped_column(sa.Integer, default=0)
    temperature_max: Mapped[float | None] = mapped_column(sa.Double)
    cpu_sum: Mapped[float] = mapped_column(sa.Double, default=0.0)
    cpu_n: Mapped[int] = mapped_column(sa.Integer, default=0)


class UpdateHistory(Base):
    """Every update state a device reported; re-deliveries hit the unique key and are dropped."""

    __tablename__ = "update_history"
    __table_args__ = (sa.UniqueConstraint("device_id", "update_id", "state", "progress"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(sa.String(128), _device_fk(), index=True)
    update_id: Mapped[str] = mapped_column(sa.String(128), index=True)
    command_id: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    seq: Mapped[int | None] = mapped_column(sa.BigInteger)
    pipeline: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    target: Mapped[str | None] = mapped_column(sa.String(512))
    version: Mapped[str | None] = mapped_column(sa.String(64))
    progress: Mapped[int] = mapped_column(sa.BigInteger, default=NO_PROGRESS)
    detail: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)  # name, from_version, total, running, ...
    ts: Mapped[float] = mapped_column(sa.Double, index=True)
    received_at: Mapped[float] = mapped_column(sa.Double)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (sa.UniqueConstraint("device_id", "ts", "kind", "digest"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(sa.String(128), _device_fk(), index=True)
    ts: Mapped[float] = mapped_column(sa.Double, index=True)
    kind: Mapped[str] = mapped_column(sa.String(64))
    level: Mapped[str] = mapped_column(sa.String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    digest: Mapped[str] = mapped_column(sa.String(16))  # of the detail, so distinct events in one ms both count


class IngestMark(Base):
    """Messages already ingested (telemetry), kept as long as the history they were merged into."""

    __tablename__ = "ingest_marks"

    device_id: Mapped[str] = mapped_column(sa.String(128), _device_fk(), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    ts: Mapped[float] = mapped_column(sa.Double, index=True)


class UnknownDevice(Base):
    """Ids that sent messages without being provisioned."""

    __tablename__ = "unknown_devices"

    device_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    first_seen: Mapped[float] = mapped_column(sa.Double)
    last_seen: Mapped[float] = mapped_column(sa.Double)
    count: Mapped[int] = mapped_column(sa.BigInteger)
    last_kind: Mapped[str] = mapped_column(sa.String(16))


class Audit(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(sa.Double, index=True)
    actor: Mapped[str] = mapped_column(sa.String(128))
    action: Mapped[str] = mapped_column(sa.String(64), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    ok: Mapped[bool] = mapped_column(sa.Boolean)
    error: Mapped[str | None] = mapped_column(sa.Text)


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    target: Mapped[str] = mapped_column(sa.String(512))
    policy: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    state: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    status: Mapped[str] = mapped_column(sa.String(32), index=True)
    version: Mapped[int] = mapped_column(sa.Integer)  # bumped on every save: optimistic concurrency
    created_at: Mapped[float] = mapped_column(sa.Double)
    updated_at: Mapped[float] = mapped_column(sa.Double)


class Command(Base):
    """Commands issued to devices; ``seq`` comes from ``next_command_seq()`` and is signed into the command."""

    __tablename__ = "commands"

    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(sa.String(128), index=True)
    device_id: Mapped[str | None] = mapped_column(sa.String(128), index=True)  # no FK: history outlives devices
    type: Mapped[str] = mapped_column(sa.String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    issued: Mapped[float] = mapped_column(sa.Double)
    expires: Mapped[float | None] = mapped_column(sa.Double)
    acked: Mapped[float | None] = mapped_column(sa.Double)
    ack_result: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)


class Counter(Base):
    """Single-row counters (the global command sequence), bumped with ``UPDATE ... RETURNING``."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    value: Mapped[int] = mapped_column(sa.BigInteger)


class Quarantine(Base):
    """Device messages that could not be stored faithfully (see fleet/ingest.py), kept with the reason."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[float] = mapped_column(sa.Double, index=True)
    device_id: Mapped[str] = mapped_column(sa.String(128), index=True)  # no FK: unknown ids are quarantined too
    kind: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[str] = mapped_column(sa.Text)  # ASCII-only JSON, cut to fleet.ingest.MAX_QUARANTINED


def _t(model: type[Base]) -> sa.Table:
    return cast(sa.Table, model.__table__)


devices_t, groups_t, telemetry_t = _t(Device), _t(Group), _t(Telemetry)
updates_t, events_t, marks_t, unknown_t = _t(UpdateHistory), _t(Event), _t(IngestMark), _t(UnknownDevice)
audit_t, rollouts_t, commands_t, counters_t = _t(Audit), _t(Rollout), _t(Command), _t(Counter)
quarantine_t = _t(Quarantine)
QUARANTINE_KEEP = 10_000  # newest quarantined messages kept (and events_retention_s at most)


# ---- results -------------------------------------------------------------------------------------


@dataclass
class IngestStats:
    """What one ingest batch did.

    ingested: new messages applied; duplicates: re-deliveries recognised and dropped; unknown: messages from devices
    not provisioned; stale: new messages superseded by newer ones already stored (or older than the retained history);
    invalid: items that are not a message of this kind.
    """

    ingested: int = 0
    duplicates: int = 0
    unknown: int = 0
    stale: int = 0
    invalid: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RolloutConflict(FleetError):
    """``save_rollout(expect_version=...)`` found the rollout changed by someone else since it was loaded."""


# ---- payload helpers ------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number from wire data, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(item: Any) -> dict[str, Any] | None:
    if hasattr(item, "model_dump"):
        return cast(dict[str, Any], item.model_dump())
    return dict(item) if isinstance(item, Mapping) else None


def _results(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The telemetry's per-pipeline results summary (counts, top labels, anomalies, detections), size-capped."""
    value = payload.get("results")
    if not isinstance(value, Mapping) or not value:
        return None
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return json.loads(text) if len(text) <= 8192 else None


def telemetry_metrics(payload: Mapping[str, Any]) -> dict[str, float | None]:
    """Device-level metrics of one telemetry payload (as ``agent.mqtt.service`` publishes it).

    fps: sum of ``pipelines.*.fps_processed``; latency_ms: the worst pipeline's ``latency_ms.p50``;
    temperature_c, cpu_percent: from ``system``. Top-level ``fps``/``latency_ms``/``temperature_c``/``cpu_percent``
    numbers, where present, take precedence (producers other than the agent).
    """
    fps_values: list[float] = []
    latencies: list[float] = []
    pipelines = payload.get("pipelines")
    if isinstance(pipelines, Mapping):
        for p in pipelines.values():
            if not isinstance(p, Mapping):
                continue
            if (f := _num(p.get("fps_processed"))) is not None:
                fps_values.append(f)
            lat = p.get("latency_ms")
            if (v := _num(lat.get("p50") if isinstance(lat, Mapping) else lat)) is not None:
                latencies.append(v)
    system = payload.get("system")
    system = system if isinstance(system, Mapping) else {}
    metrics = {
        "fps": sum(fps_values) if fps_values else None,
        "latency_ms": max(latencies) if latencies else None,
        "temperature_c": _num(system.get("temperature_c")),
        "cpu_percent": _num(system.get("cpu_percent")),
    }
    for key in metrics:
        if (v := _num(payload.get(key))) is not None:
            metrics[key] = v
    return metrics


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


def _digest(detail: Any) -> str:
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _greatest(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[Any]:
    """max(column, value) treating NULL as smaller, portable between SQLite and PostgreSQL."""
    return sa.case((sa.or_(column.is_(None), column < value), value), else_=column)


# ---- errors ----------------------------------------------------------------------------------------

_URL_HINT = "use sqlite:///path/to/fleet.db or postgresql+psycopg://user:password@host:5432/dbname"


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _missing_schema(error: exc.DBAPIError) -> bool:
    text = str(error.orig).lower()
    return "no such table" in text or getattr(error.orig, "sqlstate", None) == "42P01"


def _transient(error: exc.DBAPIError) -> bool:
    """A lost race that a retry of the whole transaction resolves."""
    # PostgreSQL: serialization failure, deadlock, foreign key (the device was removed meanwhile). SQLite needs
    # none: write transactions begin IMMEDIATE, so they queue (busy_timeout) instead of racing.
    return getattr(error.orig, "sqlstate", None) in {"40001", "40P01", "23503"}


# ---- the registry ----------------------------------------------------------------------------------


class Registry:
    """The fleet's database. Thread-safe; several processes may share one database."""

    def __init__(
        self,
        url: str,
        *,
        bucket_s: int = 60,
        telemetry_retention_s: float = 7 * 86400,
        events_retention_s: float = 30 * 86400,
        events_per_device: int = 1000,
        history_retention_s: float = 365 * 86400,
        connect_timeout_s: int = 5,
    ) -> None:
        self.bucket_s = int(bucket_s)
        self.telemetry_retention_s = telemetry_retention_s
        self.events_retention_s = events_retention_s
        self.events_per_device = events_per_device
        self.history_retention_s = history_retention_s
        self.engine = _make_engine(url, connect_timeout_s)
        self.url = self.engine.url.render_as_string(hide_password=True)
        self.dialect = self.engine.dialect.name
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except exc.DBAPIError as error:
            self.engine.dispose()
            raise _unreachable(self.engine.url, error) from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- schema ----------------------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        return config

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema (alembic upgrade); safe to run from several servers at once."""
        from alembic import command

        config = self._alembic_config()
        try:
            with self.engine.connect() as conn:
                conn.execution_options(fleet_write=True)
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                    config.attributes["connection"] = conn
                    command.upgrade(config, revision)
        except exc.DBAPIError as error:
            raise FleetError(
                f"cannot migrate the fleet database at {self.url}: {_first_line(error)}",
                "check that the database user may create tables, then run the migration again",
            ) from None

    def schema_revision(self) -> str | None:
        """The alembic revision the database is at (None: no schema yet)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    # ---- transactions ----------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except exc.DBAPIError as error:
            self._raise(error)

    def _write(self, work: Callable[[Connection], T], attempts: int = 8) -> T:
        """Run ``work`` in one write transaction, retrying the whole transaction when it loses a race."""
        for attempt in range(attempts):
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(fleet_write=True)
                    with conn.begin():
                        return work(conn)
            except exc.DBAPIError as error:
                if attempt + 1 < attempts and _transient(error):
                    time.sleep(min(0.01 * 2**attempt, 0.5))
                    continue
                self._raise(error)
        raise AssertionError("unreachable")

    def _raise(self, error: exc.DBAPIError) -> NoReturn:
        """Raise a FleetError for what a user can fix (no schema, database gone), else the error itself."""
        if _missing_schema(error):
            raise FleetError(
                f"the fleet database at {self.url} has no schema or an old one ({_first_line(error)})",
                "run the migrations (`Registry.migrate()`, done by `fleet serve` at start)",
            ) from error
        if isinstance(error, exc.OperationalError) and error.connection_invalidated:
            raise _unreachable(self.engine.url, error) from error
        raise error

    # ---- devices and groups -----------------------------------------------------------------------

    def add_group(self, name: str, description: str = "", now: float | None = None) -> None:
        """Create a group (nothing happens when it exists)."""
        _check_name(name, "group")
        self._write(lambda conn: self._ensure_group(conn, name, description, now))

    def _ensure_group(self, conn: Connection, name: str, description: str = "", now: float | None = None) -> None:
        row = {"name": name, "description": description, "created_at": time.time() if now is None else now}
        conn.execute(self._insert(groups_t).values(row).on_conflict_do_nothing(index_elements=["name"]))

    def add_device(
        self,
        id: str,
        group: str = UNASSIGNED,
        tags: Iterable[str] = (),
        hardware: str | None = None,
        credentials_kind: str | None = None,
        *,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Provision a device (its group is created when missing); FleetError when the id is taken or invalid."""
        if not isinstance(id, str) or not DEVICE_ID.match(id):
            raise FleetError(
                f"device id {id!r} is not valid", "use 1-128 letters, digits and _ . : - (the id the agent uses)"
            )
        _check_name(group, "group")
        tag_list = sorted({str(t) for t in tags})
        created = time.time() if now is None else now

        def work(conn: Connection) -> bool:
            self._ensure_group(conn, group, now=created)
            row = {
                "id": id,
                "group": group,
                "tags": tag_list,
                "hardware": hardware,
                "credentials_kind": credentials_kind,
                "created_at": created,
                "models": {},
                "online": False,
            }
            stmt = self._insert(devices_t).values(row).on_conflict_do_nothing(index_elements=["id"])
            inserted = conn.execute(stmt.returning(devices_t.c.id)).first() is not None
            if inserted:
                conn.execute(sa.delete(unknown_t).where(unknown_t.c.device_id == id))
            return inserted

        if not self._write(work):
            raise FleetError(f"device {id!r} already exists", "remove it first or choose another id")
        device = self.device(id)
        assert device is not None
        return device

    def update_device(
        self,
        id: str,
        *,
        group: str | None = None,
        tags: Iterable[str] | None = None,
        hardware: str | None = None,
        credentials_kind: str | None = None,
    ) -> bool:
        """Change a device's group, tags, hardware or credentials kind; False when there is no such device."""
        values: dict[str, Any] = {}
        if credentials_kind is not None:
            values["credentials_kind"] = credentials_kind
        if group is not None:
            _check_name(group, "group")
            values["group"] = group
        if tags is not None:
            values["tags"] = sorted({str(t) for t in tags})
        if hardware is not None:
            values["hardware"] = hardware
        if not values:
            return self.device(id) is not None

        def work(conn: Connection) -> bool:
            if group is not None:
                self._ensure_group(conn, group)
            return conn.execute(sa.update(devices_t).where(devices_t.c.id == id).values(values)).rowcount > 0

        return self._write(work)

    def remove_device(self, id: str) -> bool:
        """Delete a device with its telemetry, update history and events; False when there was none."""
        return self._write(lambda conn: conn.execute(sa.delete(devices_t).where(devices_t.c.id == id)).rowcount > 0)

    def devices(
        self, group: str | None = None, tag: str | None = None, online: bool | None = None
    ) -> list[dict[str, Any]]:
        """Devices ordered by id, optionally of one group, carrying one tag, or (not) online."""
        stmt = sa.select(devices_t).order_by(devices_t.c.id)
        if group is not None:
            stmt = stmt.where(devices_t.c.group == group)
        if online is not None:
            stmt = stmt.where(devices_t.c.online.is_(online))
        with self._read() as conn:
            rows = [_device_dict(r) for r in conn.execute(stmt).mappings()]
        return [d for d in rows if tag is None or tag in d["tags"]]

    def device(self, id: str, *, updates: int = 50, telemetry: int = 60, events: int = 20) -> dict[str, Any] | None:
        """One device with its most recent update states, telemetry buckets (oldest first) and events."""
        with self._read() as conn:
            row = conn.execute(sa.select(devices_t).where(devices_t.c.id == id)).mappings().first()
            if row is None:
                return None
            result = _device_dict(row)
            u = updates_t
            result["updates"] = [
                _update_dict(r)
                for r in conn.execute(
                    sa.select(u).where(u.c.device_id == id).order_by(u.c.ts.desc(), u.c.id.desc()).limit(updates)
                ).mappings()
            ]
            t = telemetry_t
            buckets = conn.execute(
                sa.select(t).where(t.c.device_id == id).order_by(t.c.bucket.desc()).limit(telemetry)
            ).mappings()
            result["telemetry"] = [_bucket_dict(r) for r in reversed(list(buckets))]
            e = events_t
            result["events"] = [
                _event_dict(r)
                for r in conn.execute(
                    sa.select(e).where(e.c.device_id == id).order_by(e.c.ts.desc(), e.c.id.desc()).limit(events)
                ).mappings()
            ]
        return result

    def telemetry_history(
        self, id: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Telemetry buckets of one device between two times (bucket starts), oldest first."""
        t = telemetry_t
        stmt = sa.select(t).where(t.c.device_id == id).order_by(t.c.bucket)
        if since is not None:
            stmt = stmt.where(t.c.bucket >= math.floor(since / self.bucket_s) * self.bucket_s)
        if until is not None:
            stmt = stmt.where(t.c.bucket <= until)
        with self._read() as conn:
            return [_bucket_dict(r) for r in conn.execute(stmt).mappings()]

    def groups(self) -> list[dict[str, Any]]:
        """Groups with their device counts (total and online), ordered by name."""
        d = devices_t
        stmt = (
            sa.select(
                groups_t,
                sa.func.count(d.c.id).label("devices"),
                sa.func.coalesce(sa.func.sum(sa.case((d.c.online.is_(True), 1), else_=0)), 0).label("online"),
            )
            .select_from(groups_t.outerjoin(d, d.c.group == groups_t.c.name))
            .group_by(groups_t.c.name, groups_t.c.description, groups_t.c.created_at)
            .order_by(groups_t.c.name)
        )
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def unknown_devices(self) -> list[dict[str, Any]]:
        """Ids that sent messages without being provisioned, most recent first."""
        with self._read() as conn:
            stmt = sa.select(unknown_t).order_by(unknown_t.c.last_seen.desc(), unknown_t.c.device_id)
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def mark_stale(self, now: float | None = None, max_age_s: float = 120.0) -> list[str]:
        """Mark online devices not heard from for ``max_age_s`` offline; returns their ids.

        They come back online with their next telemetry, update state or event, as long as their last status says
        online (a device whose broker connection broke is set offline by its last will instead).
        """
        now = time.time() if now is None else now
        d = devices_t
        stmt = (
            sa.update(d)
            .where(d.c.online.is_(True), sa.or_(d.c.last_seen.is_(None), d.c.last_seen < now - max_age_s))
            .values(online=False)
            .returning(d.c.id)
        )
        return sorted(self._write(lambda conn: [r[0] for r in conn.execute(stmt)]))

    # ---- ingest ---------------------------------------------------------------------------------

    def _known(self, conn: Connection, ids: Iterable[str]) -> set[str]:
        wanted = sorted(set(ids))
        known: set[str] = set()
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            known.update(r[0] for r in conn.execute(sa.select(devices_t.c.id).where(devices_t.c.id.in_(chunk))))
        return known

    def _split_known(
        self, conn: Connection, rows: Mapping[tuple[Any, ...], dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Rows keyed by (device id, ...): those of provisioned devices in key order, and counts per unknown id."""
        known = self._known(conn, (k[0] for k in rows))
        good: list[dict[str, Any]] = []
        unknown: dict[str, int] = {}
        for key in sorted(rows):
            if key[0] in known:
                good.append(rows[key])
            else:
                unknown[key[0]] = unknown.get(key[0], 0) + 1
        return good, unknown

    def _count_unknown(self, conn: Connection, counts: Mapping[str, int], kind: str, now: float) -> None:
        """Count messages from unprovisioned ids; the first sighting of an id is audited."""
        if not counts:
            return
        rows = [
            {"device_id": i, "first_seen": now, "last_seen": now, "count": n, "last_kind": kind}
            for i, n in sorted(counts.items())
        ]
        stmt = self._insert(unknown_t).on_conflict_do_nothing(index_elements=["device_id"])
        new = {r[0] for r in conn.execute(stmt.returning(unknown_t.c.device_id), rows)}
        old = [r for r in rows if r["device_id"] not in new]
        if old:
            u = unknown_t
            conn.execute(
                sa.update(u)
                .where(u.c.device_id == sa.bindparam("b_id"))
                .values(count=u.c.count + sa.bindparam("b_n"), last_seen=now, last_kind=kind),
                [{"b_id": r["device_id"], "b_n": r["count"]} for r in old],
            )
        if new:
            conn.execute(
                sa.insert(audit_t),
                [
                    {
                        "ts": now,
                        "actor": "ingest",
                        "action": "unknown_device",
                        "detail": {"device": i, "kind": kind},
                        "ok": False,
                        "error": "messages from a device that is not provisioned",
                    }
                    for i in sorted(new)
                ],
            )

    def _seen(self, conn: Connection, device_ids: Iterable[str], now: float) -> None:
        """Devices that sent new messages: last_seen = now, online again if their last status says online."""
        d = devices_t
        ids = sorted(set(device_ids))
        if ids:
            conn.execute(
                sa.update(d)
                .where(d.c.id.in_(ids))
                .values(
                    last_seen=_greatest(d.c.last_seen, now), online=sa.case((d.c.status == "online", True), else_=False)
                )
            )

    def ingest_status(self, batch: Iterable[Any], now: float | None = None) -> IngestStats:
        """Apply status messages (``StatusPayload`` or its dict), ordered by device time.

        A status older than the one in force is stale, the same one again a duplicate; the exception is the last
        will ("offline", reason "connection lost"), whose ``ts`` is when the agent connected: it applies when newer
        than the status before the one in force.
        """
        now = time.time() if now is None else now
        stats = IngestStats()
        items: list[StatusPayload] = []
        for raw in batch:
            try:
                items.append(raw if isinstance(raw, StatusPayload) else StatusPayload.model_validate(_plain(raw)))
            except ValidationError:
                stats.invalid += 1
        items.sort(key=lambda s: (s.device_id, s.ts))

        def work(conn: Connection) -> IngestStats:
            out = IngestStats(invalid=stats.invalid)
            known = self._known(conn, (s.device_id for s in items))
            unknown: dict[str, int] = {}
            d = devices_t
            for s in items:
                if s.device_id not in known:
                    unknown[s.device_id] = unknown.get(s.device_id, 0) + 1
                    continue
                newer = sa.or_(d.c.status_ts.is_(None), d.c.status_ts < s.ts)
                condition = newer
                if s.state == "offline" and s.reason == "connection lost":
                    late_will = sa.and_(
                        d.c.status == "online", sa.or_(d.c.prev_status_ts.is_(None), d.c.prev_status_ts < s.ts)
                    )
                    condition = sa.or_(newer, late_will)
                values: dict[str, Any] = {
                    "status": s.state,
                    "status_reason": s.reason,
                    "online": s.state == "online",
                    "status_ts": sa.case((newer, s.ts), else_=d.c.status_ts),
                    "prev_status_ts": sa.case((newer, d.c.status_ts), else_=d.c.prev_status_ts),
                }
                if s.state == "online":
                    values["last_seen"] = _greatest(d.c.last_seen, now)
                    values["models"] = {k: m.model_dump() for k, m in s.models.items()}
                    if s.agent_version is not None:
                        values["agent_version"] = s.agent_version
                    if s.profile is not None:
                        values["profile"] = s.profile
                stmt = sa.update(d).where(d.c.id == s.device_id, condition).values(values).returning(d.c.id)
                if conn.execute(stmt).first() is not None:
                    out.ingested += 1
                    continue
                current = conn.execute(sa.select(d.c.status_ts, d.c.status).where(d.c.id == s.device_id)).first()
                if current is not None and current.status_ts == s.ts and current.status == s.state:
                    out.duplicates += 1
                else:
                    out.stale += 1
            out.unknown = sum(unknown.values())
            self._count_unknown(conn, unknown, "status", now)
            return out

        return self._write(work)

    def ingest_telemetry(self, batch: Iterable[Mapping[str, Any]], now: float | None = None) -> IngestStats:
        """Telemetry payloads (dicts as the agent publishes them; see ``telemetry_metrics``).

        Each new message updates the device's latest metrics (when newer than the ones stored) and is merged into
        its ``bucket_s`` bucket; re-deliveries are recognised by (device, ts). Messages older than the telemetry
        retention are stale (their bucket would already be pruned).
        """
        now = time.time() if now is None else now
        horizon = now - self.telemetry_retention_s
        stats = IngestStats()
        parsed: dict[tuple[str, str], dict[str, Any]] = {}
        for raw in batch:
            item = _plain(raw)
            device_id = item.get("device_id") if item else None
            ts = _num(item.get("ts")) if item else None
            if item is None or not isinstance(device_id, str) or ts is None or ts < 0:
                stats.invalid += 1
                continue
            if ts < horizon:
                stats.stale += 1
                continue
            key = (device_id, f"{ts:.3f}")
            if key in parsed:
                stats.duplicates += 1
                continue
            parsed[key] = {"device_id": device_id, "ts": ts, **telemetry_metrics(item), "results": _results(item)}

        def work(conn: Connection) -> IngestStats:
            out = IngestStats(invalid=stats.invalid, stale=stats.stale, duplicates=stats.duplicates)
            known = self._known(conn, (k[0] for k in parsed))
            unknown: dict[str, int] = {}
            marks = []
            for device_id, key in sorted(parsed):
                if device_id in known:
                    marks.append(
                        {"device_id": device_id, "kind": "telemetry", "key": key, "ts": parsed[device_id, key]["ts"]}
                    )
                else:
                    unknown[device_id] = unknown.get(device_id, 0) + 1
            fresh: list[dict[str, Any]] = []
            if marks:
                stmt = self._insert(marks_t).on_conflict_do_nothing().returning(marks_t.c.device_id, marks_t.c.key)
                new = {(r[0], r[1]) for r in conn.execute(stmt, marks)}
                fresh = [parsed[k] for k in sorted(new)]
                out.duplicates += len(marks) - len(new)
            out.ingested = len(fresh)
            out.unknown = sum(unknown.values())
            self._merge_buckets(conn, fresh)
            self._latest_metrics(conn, fresh, now)
            self._count_unknown(conn, unknown, "telemetry", now)
            return out

        return self._write(work)

    def _merge_buckets(self, conn: Connection, messages: list[dict[str, Any]]) -> None:
        buckets: dict[tuple[str, int], dict[str, Any]] = {}
        for m in messages:
            start = int(math.floor(m["ts"] / self.bucket_s) * self.bucket_s)
            b = buckets.setdefault(
                (m["device_id"], start),
                {"device_id": m["device_id"], "bucket": start, "count": 0, "temperature_max": None}
                | {f"{name}_{part}": 0 for name in ("fps", "latency", "temperature", "cpu") for part in ("sum", "n")},
            )
            b["count"] += 1
            for name, metric in (
                ("fps", "fps"),
                ("latency", "latency_ms"),
                ("temperature", "temperature_c"),
                ("cpu", "cpu_percent"),
            ):
                if (v := m[metric]) is not None:
                    b[f"{name}_sum"] += v
                    b[f"{name}_n"] += 1
            if m["temperature_c"] is not None:
                b["temperature_max"] = max(b["temperature_max"] or -math.inf, m["temperature_c"])
        if not buckets:
            return
        t = telemetry_t
        stmt = self._insert(t)
        added = {c: t.c[c] + stmt.excluded[c] for c in buckets[next(iter(buckets))] if c.endswith(("_sum", "_n"))}
        added["count"] = t.c.count + stmt.excluded.count
        added["temperature_max"] = sa.case(
            (t.c.temperature_max.is_(None), stmt.excluded.temperature_max),
            (stmt.excluded.temperature_max > t.c.temperature_max, stmt.excluded.temperature_max),
            else_=t.c.temperature_max,
        )
        stmt = stmt.on_conflict_do_update(index_elements=["device_id", "bucket"], set_=added)
        conn.execute(stmt, [buckets[k] for k in sorted(buckets)])

    def _latest_metrics(self, conn: Connection, messages: list[dict[str, Any]], now: float) -> None:
        latest: dict[str, dict[str, Any]] = {}
        for m in messages:
            if m["device_id"] not in latest or m["ts"] > latest[m["device_id"]]["ts"]:
                latest[m["device_id"]] = m
        if not latest:
            return
        d = devices_t
        summaries = [
            {"b_id": k, "b_ts": m["ts"], "b_results": m["results"]}
            for k, m in sorted(latest.items())
            if m.get("results")
        ]
        if summaries:  # before telemetry_ts moves on: only a newer message replaces the summary
            conn.execute(
                sa.update(d)
                .where(
                    d.c.id == sa.bindparam("b_id"),
                    sa.or_(d.c.telemetry_ts.is_(None), d.c.telemetry_ts < sa.bindparam("b_ts")),
                )
                .values(results=sa.bindparam("b_results", type_=sa.JSON)),
                summaries,
            )
        newer = sa.or_(d.c.telemetry_ts.is_(None), d.c.telemetry_ts < sa.bindparam("b_ts"))
        stmt = (
            sa.update(d)
            .where(d.c.id == sa.bindparam("b_id"))
            .values(
                {
                    c: sa.case((newer, sa.bindparam(f"b_{c}", type_=sa.Double)), else_=d.c[c])
                    for c in ("fps", "latency_ms", "temperature_c", "cpu_percent")
                }
                | {"telemetry_ts": sa.case((newer, sa.bindparam("b_ts", type_=sa.Double)), else_=d.c.telemetry_ts)}
            )
        )
        params = [
            {"b_id": k, "b_ts": m["ts"]}
            | {f"b_{c}": m[c] for c in ("fps", "latency_ms", "temperature_c", "cpu_percent")}
            for k, m in sorted(latest.items())
        ]
        conn.execute(stmt, params)
        self._seen(conn, latest, now)

    def ingest_update_states(self, batch: Iterable[Any], now: float | None = None) -> IngestStats:
        """Update states (``UpdateStatus`` or its dict): appended to ``update_history`` once per
        (device, update_id, state, progress); the device's ``update_state`` follows the newest by device time."""
        now = time.time() if now is None else now
        stats = IngestStats()
        items: list[UpdateStatus] = []
        for raw in batch:
            try:
                items.append(raw if isinstance(raw, UpdateStatus) else UpdateStatus.model_validate(_plain(raw)))
            except ValidationError:
                stats.invalid += 1
        columns = {"update_id", "command_id", "seq", "pipeline", "state", "reason", "target", "version", "ts"}
        rows: dict[tuple[str, str, str, int], dict[str, Any]] = {}
        for s in items:
            progress = NO_PROGRESS if s.progress is None else s.progress
            key = (s.device_id, s.update_id, s.state, progress)
            if key in rows:
                stats.duplicates += 1
                continue
            data = s.model_dump(exclude={"v", "device_id", "progress"})
            rows[key] = {c: data.pop(c) for c in columns} | {
                "device_id": s.device_id,
                "progress": progress,
                "detail": {k: v for k, v in data.items() if v is not None},
                "received_at": now,
            }

        def work(conn: Connection) -> IngestStats:
            out = IngestStats(invalid=stats.invalid, duplicates=stats.duplicates)
            good, unknown = self._split_known(conn, rows)
            new: list[dict[str, Any]] = []
            if good:
                u = updates_t
                stmt = self._insert(u).on_conflict_do_nothing(
                    index_elements=["device_id", "update_id", "state", "progress"]
                )
                ids = conn.execute(stmt.returning(u.c.device_id, u.c.update_id, u.c.state, u.c.progress), good)
                inserted = {tuple(r) for r in ids}
                new = [r for r in good if (r["device_id"], r["update_id"], r["state"], r["progress"]) in inserted]
                out.duplicates += len(good) - len(new)
            out.ingested = len(new)
            out.unknown = sum(unknown.values())
            self._latest_update_state(conn, new, now)
            self._count_unknown(conn, unknown, "update", now)
            return out

        return self._write(work)

    def _latest_update_state(self, conn: Connection, rows: list[dict[str, Any]], now: float) -> None:
        latest: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["device_id"] not in latest or r["ts"] >= latest[r["device_id"]]["ts"]:
                latest[r["device_id"]] = r
        if not latest:
            return
        d = devices_t
        newer = sa.or_(d.c.update_ts.is_(None), d.c.update_ts <= sa.bindparam("b_ts"))
        stmt = (
            sa.update(d)
            .where(d.c.id == sa.bindparam("b_id"))
            .values(
                update_state=sa.case((newer, sa.bindparam("b_state", type_=sa.String)), else_=d.c.update_state),
                update_reason=sa.case((newer, sa.bindparam("b_reason", type_=sa.Text)), else_=d.c.update_reason),
                update_id=sa.case((newer, sa.bindparam("b_update", type_=sa.String)), else_=d.c.update_id),
                update_ts=sa.case((newer, sa.bindparam("b_ts", type_=sa.Double)), else_=d.c.update_ts),
            )
        )
        params = [
            {"b_id": k, "b_ts": r["ts"], "b_state": r["state"], "b_reason": r["reason"], "b_update": r["update_id"]}
            for k, r in sorted(latest.items())
        ]
        conn.execute(stmt, params)
        self._seen(conn, latest, now)

    def ingest_events(self, batch: Iterable[Any], now: float | None = None) -> IngestStats:
        """Events (``EventPayload`` or its dict); re-deliveries are recognised by (device, ts, kind, detail)."""
        now = time.time() if now is None else now
        stats = IngestStats()
        rows: dict[tuple[str, float, str, str], dict[str, Any]] = {}
        for raw in batch:
            try:
                e = raw if isinstance(raw, EventPayload) else EventPayload.model_validate(_plain(raw))
            except ValidationError:
                stats.invalid += 1
                continue
            if not math.isfinite(e.ts):
                stats.invalid += 1
                continue
            digest = _digest(e.detail)
            key = (e.device_id, e.ts, e.kind[:64], digest)
            if key in rows:
                stats.duplicates += 1
                continue
            detail = json.loads(json.dumps(e.detail, default=str))
            rows[key] = {"device_id": e.device_id, "ts": e.ts, "kind": e.kind[:64], "level": e.level}
            rows[key] |= {"detail": detail, "digest": digest}

        def work(conn: Connection) -> IngestStats:
            out = IngestStats(invalid=stats.invalid, duplicates=stats.duplicates)
            good, unknown = self._split_known(conn, rows)
            seen: set[str] = set()
            if good:
                e = events_t
                stmt = self._insert(e).on_conflict_do_nothing(index_elements=["device_id", "ts", "kind", "digest"])
                new = list(conn.execute(stmt.returning(e.c.device_id), good))
                out.ingested = len(new)
                out.duplicates += len(good) - len(new)
                seen = {r[0] for r in new}
            out.unknown = sum(unknown.values())
            self._seen(conn, seen, now)
            self._count_unknown(conn, unknown, "event", now)
            return out

        return self._write(work)

    def prune(self, now: float | None = None) -> dict[str, int]:
        """Apply retention: telemetry buckets and ingest marks, events (age and per-device cap), update history,
        quarantined messages (age and ``QUARANTINE_KEEP``)."""
        now = time.time() if now is None else now

        def work(conn: Connection) -> dict[str, int]:
            horizon = now - self.telemetry_retention_s
            removed = {
                "telemetry": conn.execute(sa.delete(telemetry_t).where(telemetry_t.c.bucket < horizon)).rowcount,
                "marks": conn.execute(sa.delete(marks_t).where(marks_t.c.ts < horizon)).rowcount,
                "events": conn.execute(
                    sa.delete(events_t).where(events_t.c.ts < now - self.events_retention_s)
                ).rowcount,
                "updates": conn.execute(
                    sa.delete(updates_t).where(updates_t.c.ts < now - self.history_retention_s)
                ).rowcount,
            }
            q = quarantine_t
            removed["quarantine"] = conn.execute(
                sa.delete(q).where(q.c.received_at < now - self.events_retention_s)
            ).rowcount
            newest = sa.select(q.c.id).order_by(q.c.id.desc()).offset(QUARANTINE_KEEP).limit(1).scalar_subquery()
            removed["quarantine"] += conn.execute(sa.delete(q).where(q.c.id <= newest)).rowcount
            e = events_t
            ranked = sa.select(
                e.c.id,
                sa.func.row_number()
                .over(partition_by=e.c.device_id, order_by=(e.c.ts.desc(), e.c.id.desc()))
                .label("rank"),
            ).subquery()
            over = sa.select(ranked.c.id).where(ranked.c.rank > self.events_per_device)
            removed["events"] += conn.execute(sa.delete(e).where(e.c.id.in_(over))).rowcount
            return removed

        return self._write(work)

    # ---- quarantine -------------------------------------------------------------------------------

    def quarantine(self, messages: Iterable[Mapping[str, Any]], now: float | None = None) -> int:
        """Keep device messages that cannot be ingested: each a mapping of ``device_id``, ``kind``, ``reason``,
        ``payload`` (ASCII text, see ``fleet.ingest.quarantine_text``) and optionally ``received_at``. One audit entry
        per device and call names how many and the first reason. Returns how many were kept."""
        now = time.time() if now is None else now
        rows = [
            {
                "received_at": float(m.get("received_at") or now),
                "device_id": safe_text(str(m["device_id"]))[:128],
                "kind": safe_text(str(m["kind"]))[:16],
                "reason": safe_text(str(m["reason"]))[:1000],
                "payload": safe_text(str(m["payload"])),
            }
            for m in messages
        ]
        if not rows:
            return 0
        per_device: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            per_device.setdefault(row["device_id"], []).append(row)

        def work(conn: Connection) -> int:
            conn.execute(sa.insert(quarantine_t), rows)
            conn.execute(
                sa.insert(audit_t),
                [
                    {
                        "ts": now,
                        "actor": f"device:{device}"[:128],
                        "action": "device.message_quarantined",
                        "detail": {"count": len(kept), "kinds": sorted({r["kind"] for r in kept})},
                        "ok": False,
                        "error": kept[0]["reason"],
                    }
                    for device, kept in sorted(per_device.items())
                ],
            )
            return len(rows)

        return self._write(work)

    def quarantined(self, limit: int = 100, device_id: str | None = None) -> list[dict[str, Any]]:
        """Quarantined messages, newest first."""
        q = quarantine_t
        stmt = sa.select(q).order_by(q.c.id.desc()).limit(limit)
        if device_id is not None:
            stmt = stmt.where(q.c.device_id == device_id)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    # ---- audit ------------------------------------------------------------------------------------

    def record_audit(
        self,
        actor: str,
        action: str,
        detail: Mapping[str, Any] | None = None,
        ok: bool = True,
        error: str | None = None,
        *,
        now: float | None = None,
    ) -> int:
        """Append an audit entry; returns its id."""
        row = {
            "ts": time.time() if now is None else now,
            "actor": actor[:128],
            "action": action[:64],
            "detail": json.loads(json.dumps(dict(detail or {}), default=str)),
            "ok": bool(ok),
            "error": error,
        }
        return self._write(
            lambda conn: int(conn.execute(sa.insert(audit_t).values(row).returning(audit_t.c.id)).scalar_one())
        )

    def audit_log(self, limit: int = 100, action: str | None = None, actor: str | None = None) -> list[dict[str, Any]]:
        """Newest audit entries first."""
        a = audit_t
        stmt = sa.select(a).order_by(a.c.ts.desc(), a.c.id.desc()).limit(limit)
        if action is not None:
            stmt = stmt.where(a.c.action == action)
        if actor is not None:
            stmt = stmt.where(a.c.actor == actor)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    # ---- server heartbeat -----------------------------------------------------------------------

    def server_heartbeat(self, now: float | None = None) -> None:
        """Note that a fleet server is driving rollouts (called on every rollout tick by `fleet serve`)."""
        value = int((time.time() if now is None else now) * 1000)
        c = counters_t

        def work(conn: Connection) -> None:
            stmt = self._insert(c).values(name=SERVER_HEARTBEAT, value=value)
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}))

        self._write(work)

    def last_server_heartbeat(self) -> float | None:
        """When a fleet server last drove rollouts (epoch seconds), or None when none ever has."""
        c = counters_t
        with self._read() as conn:
            value = conn.execute(sa.select(c.c.value).where(c.c.name == SERVER_HEARTBEAT)).scalar_one_or_none()
        return None if value is None else value / 1000.0

    # ---- commands -------------------------------------------------------------------------------

    def next_command_seq(self, now: float | None = None) -> int:
        """Allocate the next command sequence number: atomic across threads and processes, strictly increasing.

        The number is ``max(last + 1, now in milliseconds)``, so a database restored from a backup or recreated
        never hands out a number devices have already seen (they refuse ``seq <= last accepted``).
        """
        floor = int((time.time() if now is None else now) * 1000)
        c = counters_t
        bumped = sa.case((c.c.value + 1 > floor, c.c.value + 1), else_=floor)
        stmt = sa.update(c).where(c.c.name == COMMAND_SEQ).values(value=bumped).returning(c.c.value)

        def work(conn: Connection) -> int:
            value = conn.execute(stmt).scalar_one_or_none()
            if value is None:  # counter row lost (hand-made database): recreate it, then bump
                conn.execute(self._insert(c).values(name=COMMAND_SEQ, value=0).on_conflict_do_nothing())
                value = conn.execute(stmt).scalar_one()
            return int(value)

        return self._write(work)

    def record_command(
        self,
        seq: int,
        id: str,
        device_id: str | None,
        type: str,
        payload: Mapping[str, Any],
        issued: float,
        expires: float | None = None,
    ) -> None:
        """Store an issued command under its sequence number."""
        row = {
            "seq": seq,
            "id": id,
            "device_id": device_id,
            "type": type,
            "payload": dict(payload),
            "issued": issued,
            "expires": expires,
        }
        self._write(lambda conn: conn.execute(sa.insert(commands_t).values(row)))

    def ack_command(
        self,
        device_id: str,
        command_id: str,
        result: Mapping[str, Any],
        *,
        seq: int | None = None,
        now: float | None = None,
    ) -> bool:
        """Record a device's acknowledgement of a command (by seq, else its newest unacknowledged one of that id);
        the first ack wins. False when no such command is waiting."""
        c = commands_t
        where = [c.c.device_id == device_id, c.c.id == command_id, c.c.acked.is_(None)]
        if seq is not None:
            where.append(c.c.seq == seq)
        target = sa.select(sa.func.max(c.c.seq)).where(*where).scalar_subquery()
        values = {"acked": time.time() if now is None else now, "ack_result": dict(result)}
        stmt = sa.update(c).where(c.c.seq == target, c.c.acked.is_(None)).values(values)
        return self._write(lambda conn: conn.execute(stmt).rowcount > 0)

    def commands(self, device_id: str | None = None, id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Recorded commands, newest first."""
        c = commands_t
        stmt = sa.select(c).order_by(c.c.seq.desc()).limit(limit)
        if device_id is not None:
            stmt = stmt.where(c.c.device_id == device_id)
        if id is not None:
            stmt = stmt.where(c.c.id == id)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    # ---- rollouts ---------------------------------------------------------------------------------

    def save_rollout(
        self,
        id: str,
        target: str,
        policy: Mapping[str, Any],
        state: Mapping[str, Any],
        status: str,
        *,
        expect_version: int | None = None,
        now: float | None = None,
    ) -> int:
        """Create or replace a rollout; returns its new version.

        With ``expect_version`` (the version loaded) the save only succeeds if nobody saved in between
        (0: only if it does not exist yet); otherwise ``RolloutConflict``.
        """
        now = time.time() if now is None else now
        r = rollouts_t
        values = {"target": target, "policy": dict(policy), "state": dict(state), "status": status, "updated_at": now}

        def work(conn: Connection) -> int:
            if expect_version is None or expect_version == 0:
                stmt = self._insert(r).values(id=id, version=1, created_at=now, **values)
                if expect_version is None:
                    excluded = stmt.excluded
                    stmt = stmt.on_conflict_do_update(
                        index_elements=["id"],
                        set_={k: excluded[k] for k in values} | {"version": r.c.version + 1},
                    )
                else:
                    stmt = stmt.on_conflict_do_nothing(index_elements=["id"])
                version = conn.execute(stmt.returning(r.c.version)).scalar_one_or_none()
            else:
                stmt = (
                    sa.update(r)
                    .where(r.c.id == id, r.c.version == expect_version)
                    .values(values | {"version": r.c.version + 1})
                    .returning(r.c.version)
                )
                version = conn.execute(stmt).scalar_one_or_none()
            if version is None:
                raise RolloutConflict(
                    f"rollout {id!r} was changed by another server since version {expect_version}",
                    "load it again and reapply the change",
                )
            return int(version)

        return self._write(work)

    def load_rollout(self, id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(rollouts_t).where(rollouts_t.c.id == id)).mappings().first()
        return dict(row) if row is not None else None

    def latest_update_states(self, command_id: str) -> dict[str, dict[str, Any]]:
        """Per device, the newest update state (by device time) reported for deployments with this command id."""
        u = updates_t
        stmt = (
            sa.select(u.c.device_id, u.c.state, u.c.reason, u.c.ts, u.c.version)
            .where(u.c.command_id == command_id)
            .order_by(u.c.device_id, u.c.ts, u.c.id)
        )
        latest: dict[str, dict[str, Any]] = {}
        with self._read() as conn:
            for row in conn.execute(stmt).mappings():
                latest[row["device_id"]] = dict(row)
        return latest

    def list_rollouts(self, status: str | None = None) -> list[dict[str, Any]]:
        """Rollouts, newest first, optionally only those with one status."""
        r = rollouts_t
        stmt = sa.select(r).order_by(r.c.created_at.desc(), r.c.id)
        if status is not None:
            stmt = stmt.where(r.c.status == status)
        with self._read() as conn:
            return [dict(row) for row in conn.execute(stmt).mappings()]


# ---- rows to dicts --------------------------------------------------------------------------------


def _device_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(row)
    d.pop("prev_status_ts", None)
    d["tags"] = list(d["tags"] or [])
    d["models"] = dict(d["models"] or {})
    return d


def _update_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(row)
    if d["progress"] == NO_PROGRESS:
        d["progress"] = None
    return d


def _event_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(row)
    d.pop("digest", None)
    return d


def _bucket_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "bucket": int(row["bucket"]),
        "count": row["count"],
        "fps": _mean(row["fps_sum"], row["fps_n"]),
        "latency_ms": _mean(row["latency_sum"], row["latency_n"]),
        "temperature_c": _mean(row["temperature_sum"], row["temperature_n"]),
        "temperature_max": row["temperature_max"],
        "cpu_percent": _mean(row["cpu_sum"], row["cpu_n"]),
    }


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        raise FleetError(f"{what} name {name!r} is not valid", f"give the {what} a name of 1-128 characters")


# ---- engines ---------------------------------------------------------------------------------------


def _unreachable(url: sa.URL, error: BaseException) -> FleetError:
    shown = url.render_as_string(hide_password=True)
    reason = _first_line(error)
    if url.get_backend_name() == "sqlite":
        return FleetError(
            f"cannot open the SQLite database {url.database!r}: {reason}",
            "check that its directory exists and is writable",
        )
    return FleetError(
        f"cannot connect to the fleet database {shown}: {reason}",
        "check that PostgreSQL runs and the URL's host, port, user, password and database name are right",
    )


def ensure_database(url: str, connect_timeout_s: int = 5) -> bool:
    """Create the PostgreSQL database ``url`` names when it does not exist yet (True: created here); nothing for
    SQLite (the file is created on first use). FleetError naming the database and the command that creates it when
    the server does not let this user create it."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        return False  # _make_engine names the problem
    if parsed.get_backend_name() not in ("postgresql", "postgres") or not parsed.database:
        return False
    import psycopg
    from psycopg import sql

    params: dict[str, Any] = {
        k: v
        for k, v in {
            "host": parsed.host,
            "port": parsed.port,
            "user": parsed.username,
            "password": parsed.password,
        }.items()
        if v is not None
    }
    params |= {k: v for k, v in parsed.query.items() if isinstance(v, str)}
    params["connect_timeout"] = connect_timeout_s
    name = parsed.database
    try:
        psycopg.connect(dbname=name, **params).close()
        return False
    except psycopg.OperationalError as error:
        if "does not exist" not in str(error) or f'"{name}"' not in str(error):
            return False  # unreachable server, bad password...: Registry names it
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    command = "createdb" + "".join(
        f" {flag} {value}"
        for flag, value in (("-h", parsed.host), ("-p", parsed.port), ("-U", parsed.username))
        if value
    )
    try:
        with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.DuplicateDatabase:
        return False  # another `fleet init` made it meanwhile
    except psycopg.Error as error:
        raise FleetError(
            f"the PostgreSQL database {name!r} does not exist on {where} and cannot be created here "
            f"({_first_line(error)})",
            f"create it as a user who may: `{command} {name}`, then run `fleet init` again",
        ) from None
    return True


def _enable_wal(cursor: Any, deadline: float) -> None:
    """Switch a database file to WAL mode (persistent); the switch may meet SQLITE_BUSY without the busy handler
    when another connection opens the new file at the same moment, so it is retried."""
    import sqlite3

    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _make_engine(url: str, connect_timeout_s: int) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...``; FleetError for anything else."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise FleetError(f"database URL {url!r} is not valid", _URL_HINT) from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if "+" in parsed.drivername and parsed.get_driver_name() != "psycopg":
            raise FleetError(f"database driver {parsed.drivername!r} is not supported (psycopg 3 is)", _URL_HINT)
        parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(
            parsed, pool_pre_ping=True, connect_args={"connect_timeout": connect_timeout_s}, future=True
        )
    if backend != "sqlite" or parsed.get_driver_name() not in ("pysqlite", "sqlite"):
        raise FleetError(f"database URL {parsed.render_as_string(hide_password=True)!r} is not supported", _URL_HINT)
    memory = parsed.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {}
    if memory:  # one shared connection, or every connection would see its own empty database
        kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = sa.create_engine(parsed, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below, not by the driver
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(connect_timeout_s * 6000)}")
            if not memory:
                _enable_wal(cursor, deadline=time.monotonic() + connect_timeout_s * 6)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Write transactions take the write lock up front: a deferred one that read first could not upgrade
        # (SQLITE_BUSY without waiting) when another connection wrote meanwhile.
        immediate = conn.get_execution_options().get("fleet_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
