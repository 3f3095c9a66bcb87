"""The ``fleet`` console: keys, bundles, devices, deployments, commands and the audit log (docs/fleet.md).

Rich tables for people, ``--json`` (one JSON document on stdout) on every listing for scripts. Exit codes: 0 done,
1 the operation failed (a rollout aborted, a command not acknowledged, golden vectors out of tolerance),
2 bad input (an unknown group, device or key file, a bad option): one line ``fleet: error: <problem> (fix: <fix>)``
on stderr, never a traceback. Every operator action lands in the audit log (``fleet audit``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from fleet.errors import FleetError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
PASSPHRASE_ENV = "FLEET_KEY_PASSPHRASE"  # passphrase of offline key files (asked for on a terminal when unset)
ACTOR_ENV = "FLEET_ACTOR"
TUF_ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("snapshot", "timestamp", "command")


# ---- argument parsing ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fleet: error: ... (fix: ...)``, exit 2) instead of usage dumps."""

    def error(self, message: str) -> NoReturn:
        print(f"fleet: error: {message} (fix: see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="fleet.toml (default: $FLEET_CONFIG or ./fleet.toml)"
    )
    common.add_argument("--actor", default=argparse.SUPPRESS, help="who is acting, for the audit log (default: $USER)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON document instead of tables")

    parser = _Parser(prog="fleet", description="Fleet management for edge-agent devices.")
    # Own actions (not the shared ones of ``common``, whose SUPPRESS default lets the subcommands keep these values).
    parser.add_argument("--config", default=None, help="fleet.toml (default: $FLEET_CONFIG or ./fleet.toml)")
    parser.add_argument("--actor", default=None, help="who is acting, for the audit log (default: $USER)")
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, *, listing: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common, as_json] if listing else [common], **kwargs)

    p = add("init", "create the key store, the TUF repository and the database", listing=True)
    p.add_argument("--root-keys", type=_positive_int, default=None, help="number of root keys (default 1)")
    p.add_argument("--root-threshold", type=_positive_int, default=None, help="root signatures needed (default 1)")
    p.add_argument(
        "--offline-targets", type=Path, metavar="PATH", help="move the targets private key to this file (offline)"
    )

    p = add("serve", "run the fleet server (MQTT ingest, rollouts, TUF and chunk serving)")
    p.add_argument("--duration", type=_number, metavar="S", help="stop after this many seconds (default: SIGTERM)")

    # keys
    keys = add("keys", "show and rotate signing keys; sign staged targets with the offline key")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ks.add_parser("show", help="roles, keys, thresholds, versions and expiry", parents=[common, as_json])
    p = ks.add_parser("rotate", help="change a role's keys with a new root version", parents=[common, as_json])
    p.add_argument("role", choices=[*TUF_ROLES, "command"])
    p.add_argument("--add-key", action="append", default=[], type=Path, metavar="PEM", help="add this key (PKCS#8 PEM)")
    p.add_argument("--generate", action="store_true", help="add a newly generated key (kept in the key store)")
    p.add_argument("--remove", action="append", default=[], metavar="KEYID", help="revoke a key (keyid or a prefix)")
    p.add_argument("--threshold", type=_positive_int, help="signatures needed for the role")
    p.add_argument(
        "--sign-with", action="append", default=[], type=Path, metavar="PEM", help="an offline key that must sign"
    )
    p = ks.add_parser("sign", help="sign staged targets with an offline targets key", parents=[common, as_json])
    p.add_argument("staged", nargs="?", type=Path, metavar="STAGED", help="staged targets.json (default: the repo's)")
    p.add_argument("--key", required=True, type=Path, metavar="PEM", help="the offline targets key file")
    p = ks.add_parser("publish", help="publish staged targets once signed", parents=[common, as_json])
    p.add_argument("signed", nargs="?", type=Path, metavar="SIGNED", help="a signed copy of the staged targets.json")

    # bundles
    bundle = add("bundle", "build, inspect and publish model bundles")
    bs = bundle.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    p = bs.add_parser("build", help="build a bundle archive from a model and metadata", parents=[common, as_json])
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("--name")
    p.add_argument("--version", dest="bundle_version", metavar="VERSION", help="semantic version, e.g. 1.2.0")
    p.add_argument("--task", choices=["classification", "detection", "anomaly", "raw"])
    p.add_argument("--labels", type=Path, metavar="FILE", help="labels, one per line")
    p.add_argument("--hardware", nargs="+", default=[], metavar="ID", help="compatible hardware ids")
    p.add_argument("--metadata", type=Path, metavar="BUNDLE_TOML", help="start from this bundle.toml")
    p.add_argument("--description")
    p.add_argument("--no-golden", action="store_true", help="do not run the golden vectors")
    p.add_argument(
        "--input-kind", choices=["image", "tensor"], help="what the model takes (default: inferred from the model)"
    )
    p.add_argument("--layout", choices=["NHWC", "NCHW"], help="image input layout (default: inferred)")
    p.add_argument("--size", metavar="WxH", help="image input size, e.g. 224x224 (default: the model's)")
    p.add_argument("--color", choices=["rgb", "bgr", "gray"], help="image channel order (default: rgb, gray for 1)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.tar.gz")
    p = bs.add_parser("inspect", help="metadata, model I/O, size and sha256 of a bundle", parents=[common, as_json])
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--no-golden", action="store_true")
    p = bs.add_parser("publish", help="sign a bundle into the repository as a TUF target", parents=[common, as_json])
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument(
        "--hardware", nargs="+", default=[], metavar="ID", help="hardware ids (default: the bundle's; none: any)"
    )
    p.add_argument(
        "--skip-validation",
        action="store_true",
        help="sign a bundle this machine cannot validate (no runtime installed for its model)",
    )

    # devices
    device = add("device", "provision a device or show one")
    ds = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    p = ds.add_parser(
        "provision", help="credentials, agent.toml and trust root for a device", parents=[common, as_json]
    )
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--group", required=True)
    p.add_argument("--tags", nargs="+", default=[], metavar="TAG")
    p.add_argument("--hardware", metavar="ID", help="hardware id the device reports (firmware profile id)")
    p.add_argument("--credentials", choices=["password", "certificate"], help="default: [provision].credentials")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write <ID>/ (default: <data_dir>/devices)")
    p.add_argument("--force", action="store_true", help="provision an existing device again (rotates credentials)")
    p = ds.add_parser("show", help="one device: state, telemetry, update history, events", parents=[common, as_json])
    p.add_argument("device_id", metavar="ID")
    p = add("devices", "list devices", listing=True)
    p.add_argument("--group")
    p.add_argument("--online", action="store_true", help="only devices online now")
    add("groups", "list groups", listing=True)

    # rollouts
    p = add("deploy", "roll a target out to a group or devices", listing=True)
    p.add_argument("target", metavar="TARGET", help="target path (see `fleet targets`) or NAME@VERSION")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--group")
    who.add_argument("--devices", metavar="A,B,...", help="comma-separated device ids, canaries first")
    p.add_argument("--pipeline", default="main", help="the pipeline whose model is replaced (default main)")
    canary = p.add_mutually_exclusive_group()
    canary.add_argument("--canary", type=_positive_int, metavar="N", help="devices in the canary wave")
    canary.add_argument("--canary-percent", type=_number, metavar="P", help="percent of the devices in the canary")
    p.add_argument("--wave-factor", type=_number, metavar="F", help="each wave is this many times the last")
    p.add_argument("--max-failure-rate", type=_number, metavar="R", help="abort above this failure rate (0-1)")
    p.add_argument("--min-terminal", type=_positive_int, metavar="N", help="outcomes before the rate is judged")
    p.add_argument("--timeout", type=_number, metavar="S", help="seconds a device may take before it counts failed")
    p.add_argument("--bake", type=_number, metavar="S", help="seconds to wait after a wave before the next")
    p.add_argument("--shadow-frames", type=int, default=0, metavar="N", help="run the new model in shadow first")
    p.add_argument("--shadow-agreement", type=_number, default=0.9, metavar="A", help="shadow agreement needed")
    p.add_argument("--health-window", type=_number, metavar="S", help="seconds of health checks after activation")
    p.add_argument(
        "--health-latency-factor", type=_number, metavar="F", help="roll back when p95 latency > F x the old model's"
    )
    p.add_argument(
        "--health-latency-floor-ms", type=_number, metavar="MS", help="... and more than MS above it (absolute floor)"
    )
    p.add_argument("--health-min-results", type=int, metavar="N", help="results the health window needs (agent: 20)")
    p.add_argument("--rollback", action="store_true", help="an explicit downgrade to an older version")
    p.add_argument("--wait", action="store_true", help="follow the rollout until it finishes")
    p.add_argument("--wait-timeout", type=_number, metavar="S", help="stop following after this long (then exit 3)")

    rollout = add("rollout", "list, follow and control rollouts")
    rs = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    p = rs.add_parser("list", help="rollouts, newest first", parents=[common, as_json])
    p.add_argument("--status", choices=["created", "running", "paused", "aborted", "completed"])
    p = rs.add_parser("status", help="one rollout with its devices", parents=[common, as_json])
    p.add_argument("rollout_id", metavar="ID")
    p.add_argument("--wait", action="store_true", help="follow it until it finishes")
    p.add_argument("--wait-timeout", type=_number, metavar="S", help="stop following after this long (then exit 3)")
    for action in ("pause", "resume", "abort"):
        p = rs.add_parser(action, help=f"{action} a rollout", parents=[common, as_json])
        p.add_argument("rollout_id", metavar="ID")
        p.add_argument("--reason")
    p = add("rollback", "roll the committed devices of a rollout back to their previous version", listing=True)
    p.add_argument("rollout_id", metavar="ROLLOUT_ID")
    p.add_argument(
        "--health-window", type=_number, metavar="S", help="seconds of health checks (default: the rollout's)"
    )
    p.add_argument("--wait", action="store_true", help="follow the rollback until it finishes")
    p.add_argument("--wait-timeout", type=_number, metavar="S", help="stop following after this long (then exit 3)")

    p = add("command", "send a signed command to a device and wait for its acknowledgement", listing=True)
    p.add_argument("device_id", metavar="ID")
    p.add_argument("action", choices=["restart", "reload", "diagnostics", "set"])
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--timeout", type=_number, default=10.0, metavar="S", help="seconds to wait for the ack")

    p = add("audit", "the audit log, newest first", listing=True)
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--action")

    p = add("quarantine", "device messages set aside by ingest (with the reason), newest first", listing=True)
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--device", metavar="ID")

    p = add("targets", "published targets; sign/publish staged ones (offline targets key)", listing=True)
    p.add_argument("targets_command", nargs="?", default="list", choices=["list", "sign", "publish", "discard"])
    p.add_argument("--key", type=Path, metavar="PEM", help="with sign: the offline targets key file")
    return parser


# ---- context ----------------------------------------------------------------------------------------------


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


class Ctx:
    """Configuration plus lazily opened registry, key store, repository and operations."""

    def __init__(self, args: argparse.Namespace) -> None:
        from fleet.config import load_fleet_config

        self.args = args
        self.config = load_fleet_config(args.config)
        self.actor = args.actor or os.environ.get(ACTOR_ENV) or _user()
        self.json = bool(getattr(args, "json", False))
        self._registry: Any = None
        self._keystore: Any = None
        self._repository: Any = None
        self._ops: Any = None

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from fleet.db import Registry

            if self.config.database is None and not (self.config.data / "fleet.sqlite").exists():
                raise FleetError(f"no fleet database in {self.config.data}", "run `fleet init` first")
            registry = Registry(self.config.database_url, bucket_s=self.config.telemetry_bucket_s)
            if registry.schema_revision() is None:
                registry.close()
                raise FleetError(f"the fleet database at {registry.url} has no tables", "run `fleet init` first")
            self._registry = registry
        return self._registry

    @property
    def keystore(self) -> Any:
        if self._keystore is None:
            from fleet.keys import KeyStore

            self._keystore = KeyStore(self.config.keys_dir)
        return self._keystore

    @property
    def repository(self) -> Any:
        if self._repository is None:
            from fleet.repository import Repository

            self._repository = Repository(self.config.repository_dir, self.keystore)
        return self._repository

    @property
    def ops(self) -> Any:
        if self._ops is None:
            from fleet.ops import Operations

            self._ops = Operations(self.config, actor=self.actor, registry=self.registry, repository=self.repository)
        return self._ops

    def audit(self, action: str, detail: dict[str, Any], ok: bool = True, error: str | None = None) -> None:
        self.registry.record_audit(self.actor, action, detail, ok=ok, error=error)

    def close(self) -> None:
        if self._ops is not None:
            with contextlib.suppress(Exception):
                self._ops.close()
        if self._registry is not None:
            with contextlib.suppress(Exception):
                self._registry.close()


# ---- output helpers --------------------------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, sort_keys=False))


def _esc(value: Any) -> str:
    from rich.markup import escape

    return escape("" if value is None else str(value))


# How each listing column behaves at a narrow width (agent.tables.Col): ids and states stay whole; free text folds;
# the higher ``drop``, the sooner a column is left out when the terminal is too narrow for all of them.
_COLUMNS: dict[str, dict[str, Any]] = {
    "id": {"whole": True},
    "device": {"whole": True},
    "path": {"whole": True},
    "name": {"min_width": 12},
    "version": {"whole": True},
    "group": {"whole": True},
    "state": {"whole": True},
    "status": {"whole": True},
    "action": {"whole": True},
    "role": {"whole": True},
    "result": {"whole": True},
    "time": {"whole": True},
    "field": {"whole": True},
    "level": {"whole": True, "drop": 1},
    "kind": {"whole": True},
    "target": {"min_width": 16},
    "model": {"min_width": 12},
    "update": {"min_width": 10, "drop": 1},
    "last seen": {"whole": True, "drop": 2},
    "fps": {"whole": True, "drop": 4, "justify": "right"},
    "latency ms": {"whole": True, "drop": 3, "justify": "right"},
    "temp °C": {"whole": True, "drop": 5, "justify": "right"},
    "hardware": {"min_width": 8, "drop": 2},
    "task": {"whole": True, "drop": 3},
    "bytes": {"whole": True, "drop": 4, "justify": "right"},
    "sha256": {"min_width": 12, "drop": 5},
    "actor": {"whole": True, "drop": 2},
    "detail": {"min_width": 16, "drop": 1},
    "error": {"min_width": 12},
    "reason": {"min_width": 12},
    "wave": {"whole": True, "drop": 2},
    "device state": {"whole": True, "drop": 1},
    "pipeline": {"whole": True, "drop": 1},
    "description": {"min_width": 12, "drop": 1},
    "devices": {"whole": True, "justify": "right"},
    "online": {"whole": True, "justify": "right"},
    "ok": {"whole": True, "justify": "right"},
    "failed": {"whole": True, "justify": "right"},
    "progress": {"min_width": 16, "drop": 1},
    "threshold": {"whole": True},
    "keys": {"min_width": 12},
    "expires": {"whole": True, "drop": 1},
    "shape": {"whole": True},
    "dtype": {"whole": True},
    "quantization": {"min_width": 12, "drop": 1},
    "value": {"min_width": 20},
}


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A listing fitted to the terminal (see agent.tables): plain aligned lines off a terminal."""
    from rich.text import Text

    from agent.tables import Col, Listing

    cols = [Col(name, **_COLUMNS.get(name, {})) for name in columns]
    cells = [[v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in row] for row in rows]
    return Listing(title, cols, cells)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    age = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age / size:.0f}{unit} ago"
    return f"{age:.0f}s ago"


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _iso(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, dt.datetime) else str(value)


def _passphrase(path: Path) -> str | None:
    """Passphrase of an offline key file: $FLEET_KEY_PASSPHRASE, else asked on a terminal when the file is
    encrypted."""
    if PASSPHRASE_ENV in os.environ:
        return os.environ[PASSPHRASE_ENV]
    try:
        encrypted = b"ENCRYPTED PRIVATE KEY" in path.read_bytes()[:200]
    except OSError:
        return None  # load_signer names the problem
    if not encrypted:
        return None
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase of {path}: ")
    raise FleetError(f"key file {path} is encrypted", f"set {PASSPHRASE_ENV} or run the command in a terminal")


# ---- init / serve ----------------------------------------------------------------------------------------


def _config_source(args: argparse.Namespace) -> Path | None:
    """The fleet.toml in use (None: none, the defaults apply)."""
    from fleet.config import DEFAULT_CONFIG

    if args.config:
        return Path(args.config)
    env = os.environ.get("FLEET_CONFIG")
    path = Path(env) if env else Path(DEFAULT_CONFIG)
    return path if path.exists() else None


def cmd_init(ctx: Ctx) -> int:
    from fleet.db import Registry, ensure_database
    from fleet.provision import ensure_fleet_user
    from fleet.repository import Repository

    args, config = ctx.args, ctx.config
    source = _config_source(args)
    exists = (config.repository_dir / "metadata" / "root.json").is_file()
    options = args.root_keys is not None or args.root_threshold is not None or args.offline_targets is not None
    if exists and options:
        raise FleetError(
            f"a TUF repository already exists at {config.repository_dir}",
            "change keys with `fleet keys rotate` instead of init options",
        )
    if not exists and args.offline_targets is not None and args.offline_targets.exists():
        raise FleetError(f"{args.offline_targets} already exists", "choose a new file for the offline targets key")
    data_created = not config.data.is_dir()
    config.data.mkdir(parents=True, exist_ok=True)
    database_created = ensure_database(config.database_url)
    sqlite_new = config.database is None and not (config.data / "fleet.sqlite").exists()
    registry = Registry(config.database_url, bucket_s=config.telemetry_bucket_s)
    ctx._registry = registry
    schema_before = registry.schema_revision()
    registry.migrate()
    created = not exists
    if created:
        Repository.init(
            config.repository_dir,
            ctx.keystore,
            root_keys=args.root_keys or 1,
            root_threshold=args.root_threshold or 1,
            offline_targets=args.offline_targets is not None,
            offline_key_path=args.offline_targets,
            offline_passphrase=os.environ.get(PASSPHRASE_ENV),
        )
    broker = ensure_fleet_user(config)
    repo = ctx.repository
    root = repo.root().signed
    report = {
        "config": str(source) if source else None,
        "data_dir": str(config.data),
        "data_dir_created": data_created,
        "database": registry.url,
        "database_created": database_created or sqlite_new,
        "schema_created": schema_before is None,
        "repository": str(config.repository_dir),
        "keys": str(config.keys_dir),
        "created": created,
        "root_version": root.version,
        "root_keys": len(root.roles["root"].keyids),
        "root_threshold": root.roles["root"].threshold,
        "offline_targets_key": str(args.offline_targets) if args.offline_targets else None,
        "broker": broker.to_dict(),
    }
    ctx.audit("init", report)
    if ctx.json:
        _print_json(report)
        return EXIT_OK
    out = _console()
    if source is None:
        out.print(
            f"no fleet.toml here (nor --config or $FLEET_CONFIG): using the defaults (data in {_esc(config.data)}, "
            f"SQLite, broker {_esc(config.broker.url)}); write a fleet.toml to change them (docs/fleet.md)"
        )
    else:
        out.print(f"config {_esc(source)}")
    verb = "created" if data_created else "kept"
    if created:
        out.print(f"[bold]fleet initialised[/bold] in {_esc(config.data)} ({verb})")
        out.print(
            f"  created the TUF repository in {_esc(config.repository_dir)}: root v{root.version}, "
            f"{report['root_keys']} root key(s), threshold {report['root_threshold']}"
        )
        out.print(f"  created the signing keys in {_esc(config.keys_dir)} (private: keep this directory safe)")
        if args.offline_targets:
            out.print(
                f"  targets key moved offline to {_esc(args.offline_targets)}: keep it off this machine; "
                "`fleet keys sign` signs what `fleet bundle publish` stages"
            )
    else:
        out.print(f"fleet already initialised in {_esc(config.data)}: repository and keys kept")
    what = "created" if report["database_created"] else ("tables created" if report["schema_created"] else "up to date")
    out.print(f"  database {_esc(registry.url)}: {what}")
    files = [
        str(f)
        for f, done in ((broker.acl_file, broker.acl_written), (broker.password_file, broker.password_added))
        if done
    ]
    if files:
        out.print(f"  broker: the fleet's own user {_esc(broker.user)!r} is in {_esc(' and '.join(files))}")
    out.print("  mosquitto.conf needs: " + "; ".join(_esc(line) for line in broker.broker_conf))
    for note in broker.notes:
        out.print(f"  [yellow]note[/yellow]: {_esc(note)}")
    out.print(
        "next: `fleet bundle build`, `fleet bundle publish`, `fleet device provision ID --group G`, `fleet serve`"
    )
    return EXIT_OK


def cmd_serve(ctx: Ctx) -> int:
    try:
        from fleet.server import serve
    except ImportError as exc:
        raise FleetError(
            f"the fleet server is not available: {exc}", "reinstall with `pip install 'edge-inference-agent[fleet]'`"
        ) from None
    if ctx.args.duration is not None:
        return int(serve(ctx.config, duration=ctx.args.duration) or 0)
    return int(serve(ctx.config) or 0)


# ---- keys ------------------------------------------------------------------------------------------------


def _keys_report(ctx: Ctx) -> dict[str, Any]:
    repo, keystore = ctx.repository, ctx.keystore
    root = repo.root().signed
    metadata = {
        "root": root,
        "targets": repo.targets_metadata().signed,
        "snapshot": repo.snapshot().signed,
        "timestamp": repo.timestamp().signed,
    }
    roles: dict[str, Any] = {}
    for role in TUF_ROLES:
        private = {s.public_key.keyid for s in keystore.signers(role)}
        md = metadata[role]
        roles[role] = {
            "threshold": root.roles[role].threshold,
            "version": md.version,
            "expires": _iso(md.expires),
            "keys": [{"keyid": k, "online": k in private} for k in root.roles[role].keyids],
        }
    command_keys, threshold = repo.command_keys()
    private = {s.public_key.keyid for s in keystore.signers("command")}
    roles["command"] = {
        "threshold": threshold,
        "version": root.version,
        "expires": _iso(root.expires),
        "keys": [{"keyid": k, "online": k in private} for k in sorted(command_keys)],
    }
    staged = repo.staged()
    return {
        "root_version": root.version,
        "roles": roles,
        "staged": None
        if staged is None
        else {
            "version": staged.version,
            "signed": staged.signed,
            "threshold": staged.threshold,
            "targets": [t.path for t in staged.targets],
        },
    }


def cmd_keys_show(ctx: Ctx) -> int:
    report = _keys_report(ctx)
    if ctx.json:
        _print_json(report)
        return EXIT_OK
    rows = []
    for role, info in report["roles"].items():
        keys = ", ".join(f"{k['keyid'][:12]}{'' if k['online'] else ' (offline)'}" for k in info["keys"])
        rows.append([role, f"{info['threshold']}/{len(info['keys'])}", keys, info["version"], info["expires"]])
    out = _console()
    out.print(
        _table(f"keys (root v{report['root_version']})", ["role", "threshold", "keys", "version", "expires"], rows)
    )
    if report["staged"]:
        s = report["staged"]
        out.print(
            f"staged targets v{s['version']}: {s['signed']}/{s['threshold']} signature(s) "
            f"({', '.join(s['targets']) or 'no targets'}); sign with `fleet keys sign --key PEM`, then `fleet keys publish`"
        )
    return EXIT_OK


def _resolve_keyid(ctx: Ctx, role: str, prefix: str) -> str:
    if role == "command":
        known = list(ctx.repository.command_keys()[0])
    else:
        known = list(ctx.repository.root().signed.roles[role].keyids)
    matches = [k for k in known if k.startswith(prefix.lower())]
    if len(matches) != 1:
        listed = ", ".join(k[:12] for k in known) or "none"
        problem = f"no {role} key {prefix!r}" if not matches else f"{prefix!r} matches {len(matches)} {role} keys"
        raise FleetError(problem, f"give a keyid or a unique prefix of one ({listed}; see `fleet keys show`)")
    return matches[0]


def cmd_keys_rotate(ctx: Ctx) -> int:
    args, keystore, repo = ctx.args, ctx.keystore, ctx.repository
    role = args.role
    before = repo.root().signed.version
    remove = [_resolve_keyid(ctx, role, k) for k in args.remove]
    signers = [keystore.load_signer(p, _passphrase(p)) for p in args.sign_with]
    add: list[Any] = []
    written: list[str] = []  # keyids put in the key store here, removed again when the rotation fails
    try:
        for pem in args.add_key:
            signer = keystore.load_signer(pem, _passphrase(pem))
            if role in ONLINE_ROLES:
                keystore.add(role, signer)
                written.append(signer.public_key.keyid)
            add.append(signer)
        if args.generate:
            signer = keystore.generate(role)
            written.append(signer.public_key.keyid)
            add.append(signer)
        version = repo.rotate(role, add=add, remove=remove, threshold=args.threshold, signers=signers)
    except BaseException:
        for keyid in written:
            with contextlib.suppress(FleetError):
                keystore.delete(role, keyid)
        raise
    if role not in ONLINE_ROLES:  # keys added from files stay where they are: record their public half
        for signer in add[: len(args.add_key)]:
            keystore.add_public(role, signer.public_key)
    for keyid in remove:
        with contextlib.suppress(FleetError):
            keystore.delete(role, keyid)
    added = [getattr(k, "public_key", k).keyid for k in add]
    detail = {"role": role, "root_version": version, "from_version": before, "added": added, "removed": remove}
    if args.threshold is not None:
        detail["threshold"] = args.threshold
    ctx.audit("keys.rotate", detail)
    if ctx.json:
        _print_json(detail)
        return EXIT_OK
    out = _console()
    out.print(f"root v{before} -> [bold]v{version}[/bold]: {role} keys rotated")
    for keyid in added:
        out.print(f"  + {keyid[:12]}")
    for keyid in remove:
        out.print(f"  - {keyid[:12]}")
    out.print("devices verify the new root from the one they trust, at their next update check")
    return EXIT_OK


def _recorded_signer(key: Any, signature: Any, payload: bytes) -> Any:
    """A signer handing out a signature made elsewhere (on the offline machine), for exactly the bytes it covers."""
    from securesystemslib.signer import Signer

    class Recorded(Signer):
        @property
        def public_key(self) -> Any:
            return key

        def sign(self, data: bytes) -> Any:
            if data != payload:
                raise FleetError("the signed copy is not of the staged targets", "sign the current staged file")
            return signature

        @classmethod
        def from_priv_key_uri(cls, priv_key_uri: str, public_key: Any, secrets_handler: Any = None) -> Any:
            raise NotImplementedError

    return Recorded()


def _staged_path(ctx: Ctx) -> Path:
    return ctx.config.repository_dir / "staged" / "targets.json"


def _staged_report(staged: Any) -> dict[str, Any]:
    return {
        "version": staged.version,
        "signed": staged.signed,
        "threshold": staged.threshold,
        "targets": [t.path for t in staged.targets],
    }


def cmd_keys_sign(ctx: Ctx) -> int:
    """Sign the repository's staged targets, or a copy of them carried to an offline machine."""
    from tuf.api.metadata import Metadata, Targets
    from tuf.api.serialization import DeserializationError

    from fleet.keys import load_signer, write_atomic

    args = ctx.args
    key_path: Path = args.key
    own = _staged_path(ctx)
    staged_file: Path = args.staged or own
    in_repo = staged_file.resolve() == own.resolve() and (ctx.config.repository_dir / "metadata").is_dir()
    if in_repo:
        repo = ctx.repository
        if repo.staged() is None:
            raise FleetError("nothing is staged for signing", "publish a bundle first (`fleet bundle publish`)")
        signer = ctx.keystore.load_signer(key_path, _passphrase(key_path))
        status = repo.sign_staged(signer)
        report = _staged_report(status) | {"file": str(own), "keyid": signer.public_key.keyid}
        ctx.audit("keys.sign", report)
    else:
        try:
            md = Metadata.from_bytes(staged_file.read_bytes())
        except FileNotFoundError:
            raise FleetError(
                f"staged targets file {staged_file} does not exist", "give the staged targets.json"
            ) from None
        except (OSError, DeserializationError) as exc:
            raise FleetError(f"{staged_file} is not TUF metadata: {exc}", "give the staged targets.json") from None
        if not isinstance(md.signed, Targets):
            raise FleetError(f"{staged_file} is {md.signed.type} metadata, not targets", "give the staged targets.json")
        signer = load_signer(key_path, _passphrase(key_path))
        md.sign(signer, append=True)
        write_atomic(staged_file, md.to_bytes())
        report = {
            "file": str(staged_file),
            "version": md.signed.version,
            "signatures": len(md.signatures),
            "keyid": signer.public_key.keyid,
            "targets": sorted(md.signed.targets),
        }
    if ctx.json:
        _print_json(report)
        return EXIT_OK
    out = _console()
    out.print(f"signed targets v{report['version']} in {_esc(report['file'])} with key {report['keyid'][:12]}")
    if in_repo:
        out.print(f"  {report['signed']}/{report['threshold']} signature(s); publish with `fleet keys publish`")
    else:
        out.print("  bring the file back and publish it with `fleet keys publish FILE`")
    return EXIT_OK


def cmd_keys_publish(ctx: Ctx) -> int:
    from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
    from securesystemslib.signer import Key
    from tuf.api.metadata import Metadata
    from tuf.api.serialization import DeserializationError

    repo = ctx.repository
    signed_file: Path | None = ctx.args.signed
    imported: list[str] = []
    if signed_file is not None:
        try:
            copy = Metadata.from_bytes(signed_file.read_bytes())
        except FileNotFoundError:
            raise FleetError(f"signed targets file {signed_file} does not exist", "give the signed copy") from None
        except (OSError, DeserializationError) as exc:
            raise FleetError(f"{signed_file} is not TUF metadata: {exc}", "give the signed copy") from None
        staged_path = _staged_path(ctx)
        if repo.staged() is None:
            raise FleetError("nothing is staged for publishing", "publish a bundle first (`fleet bundle publish`)")
        staged = Metadata.from_bytes(staged_path.read_bytes())
        if copy.signed_bytes != staged.signed_bytes:
            raise FleetError(
                f"{signed_file} is not a copy of the staged targets (v{copy.signed.version})",
                "sign a fresh copy of the repository's staged/targets.json",
            )
        root = repo.root().signed
        for keyid, signature in copy.signatures.items():
            if keyid in staged.signatures or keyid not in root.roles["targets"].keyids:
                continue
            key: Key = root.get_key(keyid)
            try:
                key.verify_signature(signature, copy.signed_bytes)
            except (UnverifiedSignatureError, VerificationError):
                raise FleetError(
                    f"the signature of key {keyid[:12]} in {signed_file} is invalid", "sign again"
                ) from None
            repo.sign_staged(_recorded_signer(key, signature, copy.signed_bytes))
            imported.append(keyid)
    change = repo.publish_staged()
    report = {"targets_version": change.targets_version, "imported_signatures": imported}
    ctx.audit("keys.publish", report)
    if ctx.json:
        _print_json(report)
    else:
        _console().print(f"published targets v{change.targets_version}")
    return EXIT_OK


# ---- bundles ----------------------------------------------------------------------------------------------


def cmd_bundle_build(ctx: Ctx) -> int:
    from fleet.bundles import build_bundle, parse_size

    args = ctx.args
    result = build_bundle(
        args.model,
        args.output,
        name=args.name,
        version=args.bundle_version,
        task=args.task,
        labels=args.labels,
        hardware=args.hardware,
        metadata=args.metadata,
        description=args.description,
        golden=not args.no_golden,
        input_kind=args.input_kind,
        layout=args.layout,
        size=parse_size(args.size) if args.size else None,
        color=args.color,
    )
    report = result.to_dict()
    if ctx.json:
        _print_json(report)
        return EXIT_OK
    out = _console()
    out.print(f"built [bold]{_esc(result.name)}[/bold] {result.version} ({result.task}) -> {_esc(result.path)}")
    out.print(f"  {result.size} bytes, sha256 {result.sha256}")
    out.print(f"  files: {', '.join(result.files)}; hardware: {', '.join(result.hardware) or 'any'}")
    out.print(f"  input: {_esc(_input_text(result.input))}")
    if report["golden"] is not None:
        out.print("  golden vectors: passed")
    if result.validation.skipped:
        out.print(f"  [yellow]model not opened here[/yellow]: {_esc(result.validation.skipped)}")
    return EXIT_OK


def _input_text(spec: dict[str, Any]) -> str:
    """``image NHWC 32x32 gray`` / ``tensor``."""
    if spec.get("kind") != "image":
        return str(spec.get("kind", "tensor"))
    size = spec.get("size")
    parts = [
        "image",
        spec.get("layout") or "layout from the model",
        f"{size[0]}x{size[1]}" if size else "",
        spec.get("color") or "",
    ]
    return " ".join(p for p in parts if p)


def _tensor_rows(tensors: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for t in tensors:
        q = t.get("quantization")
        quant = (
            "-" if not q else (f"scale {q['scale']} zp {q['zero_point']}" if not q["per_channel"] else "per-channel")
        )
        rows.append([t["name"], t["shape"], t["dtype"], quant])
    return rows


def cmd_bundle_inspect(ctx: Ctx) -> int:
    from fleet.bundles import inspect_bundle

    info = inspect_bundle(ctx.args.path, golden=not ctx.args.no_golden)
    if ctx.json:
        _print_json(info)
        return EXIT_OK
    out = _console()
    out.print(f"[bold]{_esc(info['name'])}[/bold] {info['version']}  task={info['task']}")
    if info["description"]:
        out.print(f"  {_esc(info['description'])}")
    out.print(f"  size {info['size']} bytes" + (f", sha256 {info['sha256']}" if info["sha256"] else ""))
    out.print(f"  model {_esc(info['model_file'])} sha256 {info['model_sha256']}")
    out.print(f"  hardware: {', '.join(info['hardware']) or 'any'}; input: {info['input'].get('kind')}")
    if info["labels"]:
        labels = info["labels"]
        out.print(f"  labels ({len(labels)}): {_esc(', '.join(labels[:20]))}" + (" ..." if len(labels) > 20 else ""))
    model = info["model"]
    if model:
        out.print(f"  runtime {model.get('runtime')} {model.get('runtime_version')}")
        out.print(_table("inputs", ["name", "shape", "dtype", "quantization"], _tensor_rows(model["inputs"])))
        out.print(_table("outputs", ["name", "shape", "dtype", "quantization"], _tensor_rows(model["outputs"])))
    else:
        out.print(f"  [yellow]model not opened here[/yellow]: {_esc(info['runtime_check_skipped'])}")
    if info["golden"] is not None:
        out.print("  golden vectors: " + ("passed" if info["golden"]["passed"] else "FAILED"))
    return EXIT_OK


def _target_dict(target: Any) -> dict[str, Any]:
    return {
        "path": target.path,
        "name": target.name,
        "version": target.version,
        "hardware": list(target.hardware),
        "task": target.task,
        "length": target.length,
        "sha256": target.sha256,
    }


def cmd_bundle_publish(ctx: Ctx) -> int:
    from fleet.bundles import archive_for_publish, fleet_fit, opened, validate_bundle

    args = ctx.args
    repo = ctx.repository
    with tempfile.TemporaryDirectory(prefix="fleet-publish-") as tmp:
        archive = archive_for_publish(args.path, Path(tmp))
        with opened(archive) as bundle:
            meta = bundle.metadata
            model_sha256 = bundle.sha256
        if bundle.inferred:
            raise FleetError(f"{args.path} has no bundle.toml", "build a bundle with `fleet bundle build` first")
        validation = validate_bundle(archive)
        if validation.skipped and not args.skip_validation:
            raise FleetError(
                f"{meta.model} cannot be validated here ({validation.skipped}): publishing would sign a bundle that "
                "no runtime has opened and whose golden vectors never ran",
                "install the runtime for it (pip install 'edge-inference-agent[litert]' or '[onnx]'), or give "
                "--skip-validation to sign it unvalidated",
            )
        hardware = list(dict.fromkeys(args.hardware or meta.hardware))
        problem = fleet_fit(meta.input.kind, hardware, ctx.registry.devices(), _input_kinds(ctx))
        if problem is not None:
            raise FleetError(f"no provisioned device could run {meta.name} {meta.version}: {problem[0]}", problem[1])
        target_path = f"{meta.name}/{meta.name}-{meta.version}.tar.gz"
        change = repo.add_target(
            archive,
            target_path,
            name=meta.name,
            version=meta.version,
            hardware=hardware,
            task=meta.task,
            input_kind=meta.input.kind,
            model_sha256=model_sha256,
        )
    report = {
        "target": _target_dict(change.target),
        "targets_version": change.targets_version,
        "staged": change.staged,
        "changed": change.changed,
        "validated": validation.skipped is None,
        "runtime_check_skipped": validation.skipped,
    }
    ctx.audit("bundle.publish", report)
    if ctx.json:
        _print_json(report)
        return EXIT_OK
    out = _console()
    t = report["target"]
    rows = [[t["path"], t["name"], t["version"], ", ".join(t["hardware"]) or "any", t["length"], t["sha256"][:16]]]
    out.print(_table("TUF target", ["path", "name", "version", "hardware", "bytes", "sha256"], rows))
    if validation.skipped:
        out.print(f"[yellow]signed without validation[/yellow] (--skip-validation): {_esc(validation.skipped)}")
    if change.staged:
        out.print(
            f"staged in targets v{change.targets_version}: the targets key is offline. Sign with "
            "`fleet keys sign --key PEM`, then `fleet keys publish`."
        )
    elif not change.changed:
        out.print(f"already published (targets v{change.targets_version})")
    else:
        out.print(f"published in targets v{change.targets_version}; deploy with `fleet deploy {target_path} --group G`")
    return EXIT_OK


def _input_kinds(ctx: Ctx) -> dict[tuple[str, str], str]:
    """Input kind of each model the fleet knows by (name, version): published targets and the agent's samples."""
    from fleet.bundles import sample_models

    kinds = {(s.name, s.version): s.input_kind for s in sample_models()}
    for target in ctx.repository.targets():
        if target.input_kind:
            kinds[(target.name, target.version)] = target.input_kind
    return kinds


# ---- targets ----------------------------------------------------------------------------------------------


def cmd_targets(ctx: Ctx) -> int:
    action = ctx.args.targets_command
    if action == "sign":
        if ctx.args.key is None:
            raise FleetError("`fleet targets sign` needs the offline key", "give --key PEM")
        ctx.args.staged = None
        return cmd_keys_sign(ctx)
    if ctx.args.key is not None:
        raise FleetError("--key only goes with `fleet targets sign`", "drop --key")
    if action == "publish":
        ctx.args.signed = None
        return cmd_keys_publish(ctx)
    if action == "discard":
        ctx.repository.discard_staged()
        ctx.audit("targets.discard", {})
        if not ctx.json:
            _console().print("staged targets discarded")
        return EXIT_OK
    targets = [_target_dict(t) for t in ctx.repository.targets()]
    if ctx.json:
        _print_json(targets)
        return EXIT_OK
    out = _console()
    rows = [
        [t["path"], t["name"], t["version"], t["task"], ", ".join(t["hardware"]) or "any", t["length"]] for t in targets
    ]
    out.print(_table("targets", ["path", "name", "version", "task", "hardware", "bytes"], rows))
    staged = ctx.repository.staged()
    if staged is not None:
        out.print(
            f"staged targets v{staged.version} wait for the offline key ({staged.signed}/{staged.threshold} "
            "signatures): `fleet keys sign --key PEM`, `fleet keys publish`"
        )
    return EXIT_OK


# ---- devices ----------------------------------------------------------------------------------------------


def cmd_device_provision(ctx: Ctx) -> int:
    from fleet.provision import provision_device

    args = ctx.args
    result = provision_device(
        ctx.config,
        ctx.registry,
        ctx.repository,
        args.device_id,
        args.group,
        args.tags,
        args.hardware,
        args.credentials,
        out=args.out,
        force=args.force,
    )
    report = result.to_dict()
    ctx.audit(
        "device.provision",
        {
            "device": result.device_id,
            "group": result.group,
            "credentials": result.credentials,
            "rotated": result.rotated,
            "tags": list(args.tags),
            "hardware": args.hardware,
        },
    )
    if ctx.json:
        _print_json(report)
        return EXIT_OK
    out = _console()
    verb = "re-provisioned (credentials rotated)" if result.rotated else "provisioned"
    out.print(f"device [bold]{_esc(result.device_id)}[/bold] {verb} in group {_esc(result.group)}")
    out.print(f"files in {_esc(result.directory)}: {', '.join(p.name for p in result.files)}")
    out.print(
        f"broker: ACL lines in {_esc(result.acl_file)}"
        + (f", password in {_esc(result.password_file)}" if result.password_file else "")
    )
    out.print("  mosquitto.conf needs: " + "; ".join(_esc(line) for line in result.broker_conf))
    out.print("  then reload the broker: `systemctl reload mosquitto` (or `kill -HUP <mosquitto pid>`)")
    for note in result.notes:
        out.print(f"  [yellow]note[/yellow]: {_esc(note)}")
    out.print(f"install on the device: see {_esc(result.directory / 'INSTALL.md')}")
    return EXIT_OK


def _model_text(models: dict[str, Any]) -> str:
    parts = []
    for pipeline, model in sorted(models.items()):
        if isinstance(model, dict):
            parts.append(f"{pipeline}: {model.get('name', '?')} {model.get('version', '')}".strip())
    return ", ".join(parts) or "-"


def _check_group(ctx: Ctx, group: str) -> None:
    names = [g["name"] for g in ctx.registry.groups()]
    if group not in names:
        raise FleetError(
            f"unknown group {group!r}", f"use one of: {', '.join(names) or 'none yet (provision devices)'}"
        )


def cmd_devices(ctx: Ctx) -> int:
    args = ctx.args
    if args.group is not None:
        _check_group(ctx, args.group)
    devices = ctx.registry.devices(group=args.group, online=True if args.online else None)
    if ctx.json:
        _print_json(devices)
        return EXIT_OK
    now = time.time()
    rows = []
    for d in devices:
        online = "[green]online[/green]" if d["online"] else "[dim]offline[/dim]"
        update = d["update_state"] or "-"
        if d.get("update_reason") and d["update_state"] in ("failed", "rejected", "rolled_back"):
            update += f" ({d['update_reason']})"
        rows.append(
            [
                d["id"],
                d["group"],
                _markup(online),
                _model_text(d["models"]),
                _num(d["fps"]),
                _num(d["latency_ms"]),
                _num(d["temperature_c"]),
                _ago(d["last_seen"], now),
                update,
            ]
        )
    columns = ["id", "group", "state", "model", "fps", "latency ms", "temp °C", "last seen", "update"]
    _console().print(_table(f"devices ({len(devices)})", columns, rows))
    return EXIT_OK


def _markup(text: str) -> Any:
    """A table cell given as rich markup (not escaped)."""
    from rich.text import Text

    return Text.from_markup(text)


def _unknown_device(device_id: str) -> FleetError:
    return FleetError(f"unknown device {device_id!r}", "see `fleet devices` for the devices that exist")


def cmd_device_show(ctx: Ctx) -> int:
    device = ctx.registry.device(ctx.args.device_id, updates=20, telemetry=10, events=10)
    if device is None:
        raise _unknown_device(ctx.args.device_id)
    if ctx.json:
        _print_json(device)
        return EXIT_OK
    out = _console()
    now = time.time()
    state = "[green]online[/green]" if device["online"] else "[dim]offline[/dim]"
    out.print(f"[bold]{_esc(device['id'])}[/bold]  {state}  group {_esc(device['group'])}")
    fields = [
        ("tags", ", ".join(device["tags"]) or "-"),
        ("hardware", device["hardware"] or "-"),
        ("credentials", device["credentials_kind"] or "-"),
        ("agent", device["agent_version"] or "-"),
        ("profile", device["profile"] or "-"),
        ("models", _model_text(device["models"])),
        ("fps", _num(device["fps"])),
        ("latency ms", _num(device["latency_ms"])),
        ("temperature °C", _num(device["temperature_c"])),
        ("cpu %", _num(device["cpu_percent"])),
        ("last seen", f"{_ago(device['last_seen'], now)} ({_when(device['last_seen'])})"),
        ("status", f"{device['status'] or '-'}" + (f" ({device['status_reason']})" if device["status_reason"] else "")),
        (
            "update",
            f"{device['update_state'] or '-'}" + (f" ({device['update_reason']})" if device["update_reason"] else ""),
        ),
        ("provisioned", _when(device["created_at"])),
    ]
    out.print(_table(None, ["field", "value"], fields))
    if device["updates"]:
        rows = [
            [_when(u["ts"]), u["update_id"], u["pipeline"], u["state"], u.get("version") or "-", u.get("reason") or ""]
            for u in device["updates"]
        ]
        out.print(_table("updates", ["time", "update", "pipeline", "state", "version", "reason"], rows))
    if device["events"]:
        rows = [
            [_when(e["ts"]), e["level"], e["kind"], json.dumps(e["detail"], default=str)[:100]]
            for e in device["events"]
        ]
        out.print(_table("events", ["time", "level", "kind", "detail"], rows))
    return EXIT_OK


def cmd_groups(ctx: Ctx) -> int:
    groups = ctx.registry.groups()
    if ctx.json:
        _print_json(groups)
        return EXIT_OK
    rows = [[g["name"], g["devices"], g["online"], g.get("description") or ""] for g in groups]
    _console().print(_table(f"groups ({len(groups)})", ["group", "devices", "online", "description"], rows))
    return EXIT_OK


# ---- rollouts ---------------------------------------------------------------------------------------------


def _resolve_target(ctx: Ctx, target: str) -> str:
    """A target path, or NAME@VERSION resolved to one."""
    if "@" not in target:
        return target
    name, _, version = target.partition("@")
    for t in ctx.repository.targets():
        if t.name == name and t.version == version:
            return t.path
    listed = ", ".join(f"{t.name}@{t.version}" for t in ctx.repository.targets()) or "none"
    raise FleetError(f"no published target {target!r}", f"use one of: {listed} (publish with `fleet bundle publish`)")


def _policy(ctx: Ctx) -> Any:
    from fleet.rollout import RolloutPolicy

    args, defaults = ctx.args, ctx.config.rollout
    if args.canary_percent is not None and not 0 < args.canary_percent <= 100:
        raise FleetError(
            f"--canary-percent {args.canary_percent:g} is out of range", "give a percentage above 0, at most 100"
        )
    if args.wave_factor is not None and args.wave_factor <= 1:
        raise FleetError(f"--wave-factor {args.wave_factor:g} does not grow the waves", "give a factor above 1, e.g. 2")
    if args.max_failure_rate is not None and not 0 <= args.max_failure_rate <= 1:
        raise FleetError(
            f"--max-failure-rate {args.max_failure_rate:g} is not a rate", "give a fraction between 0 and 1, e.g. 0.1"
        )
    for option, value, low in (("--timeout", args.timeout, 0.0), ("--bake", args.bake, -1e-9)):
        if value is not None and value <= low:
            raise FleetError(f"{option} {value:g} is out of range", f"give a positive number of seconds for {option}")
    if args.shadow_frames < 0:
        raise FleetError(f"--shadow-frames {args.shadow_frames} is negative", "give 0 (no shadow) or more frames")
    if not 0 <= args.shadow_agreement <= 1:
        raise FleetError(
            f"--shadow-agreement {args.shadow_agreement:g} is not a fraction", "give a value between 0 and 1"
        )
    canary, percent = args.canary, args.canary_percent
    if canary is None and percent is None:
        canary, percent = defaults.canary, defaults.canary_percent
    try:
        return RolloutPolicy(
            canary=canary,
            canary_percent=percent,
            wave_factor=args.wave_factor if args.wave_factor is not None else defaults.wave_factor,
            max_failure_rate=args.max_failure_rate if args.max_failure_rate is not None else defaults.max_failure_rate,
            min_terminal=args.min_terminal or defaults.min_terminal,
            device_timeout_s=args.timeout if args.timeout is not None else defaults.device_timeout_s,
            bake_s=args.bake if args.bake is not None else defaults.bake_s,
            offline_grace_s=defaults.offline_grace_s,
        )
    except ValueError as exc:
        raise FleetError(
            str(exc), "check the rollout options (see `fleet deploy --help`) and [rollout] in fleet.toml"
        ) from None


def _summary_line(summary: dict[str, Any]) -> str:
    parts = [
        f"{k} {summary[k]}"
        for k in ("succeeded", "failed", "timed_out", "in_progress", "sent", "skipped", "pending")
        if summary.get(k)
    ]
    rate = summary.get("failure_rate")
    waves = summary.get("waves") or []
    wave = summary.get("wave", -1)
    text = f"wave {wave + 1}/{len(waves)} {list(waves)}; " if waves else ""
    text += ", ".join(parts) or "no devices"
    if rate is not None:
        text += f"; failure rate {rate:.0%}"
    return text


def _print_rollout(info: dict[str, Any], devices: bool = True) -> None:
    out = _console()
    color = {"aborted": "red", "completed": "green", "paused": "yellow"}.get(info["status"], "cyan")
    out.print(
        f"rollout [bold]{_esc(info['id'])}[/bold] of {_esc(info['target'])}: [{color}]{info['status']}[/{color}]"
        + (f" ({_esc(info['reason'])})" if info.get("reason") else "")
    )
    out.print(f"  {_esc(_summary_line(info['summary']))}")
    if devices and info.get("devices"):
        rows = [
            [
                d,
                r["wave"] + 1 if r.get("wave") is not None else "-",
                r["state"],
                r.get("device_state") or "-",
                r.get("reason") or "",
            ]
            for d, r in info["devices"].items()
        ]
        out.print(_table(None, ["device", "wave", "state", "device state", "reason"], rows))


def _follow(ctx: Ctx, rollout_id: str, timeout: float | None, poll_s: float = 0.5) -> dict[str, Any]:
    """Follow a rollout until it finishes (or ``timeout``): one line on stderr per device state change, the health
    window's countdown for devices in trial, and a warning when no fleet server is driving rollouts. The server
    drives the rollout; this only reads the registry. ``info["wait"]`` says whether it finished or timed out."""
    from fleet import follow

    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    seen = follow.FollowState(started=time.time())
    row = ctx.registry.load_rollout(rollout_id) or {}
    window = ((row.get("policy") or {}).get("deploy") or {}).get("health_window_s")
    source = _config_source(ctx.args)
    hint = f" --config {source}" if source is not None else ""
    silent_since: float | None = None

    def say(line: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[{elapsed:5.0f}s] {line}", file=sys.stderr, flush=True)

    while True:
        info = ctx.ops.rollout(rollout_id)
        for line in follow.changes(seen, info, time.time(), window):
            say(line)
        if info["status"] in follow.FINISHED:
            return info | {"wait": {"finished": True, "timed_out": False}}
        if deadline is not None and time.monotonic() >= deadline:
            return info | {"wait": {"finished": False, "timed_out": True, "timeout_s": timeout}}
        now = time.time()
        heartbeat = ctx.registry.last_server_heartbeat()
        if follow.server_silent(heartbeat, now):
            silent_since = silent_since if silent_since is not None else time.monotonic()
            if not seen.server_warned and time.monotonic() - silent_since >= follow.SERVER_GRACE_S:
                print(follow.silence_warning(heartbeat, now, hint), file=sys.stderr, flush=True)
                seen.server_warned = True
        else:
            if seen.server_warned:
                say("a fleet server is driving rollouts again")
            silent_since, seen.server_warned = None, False
        time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


def _warn_if_no_server(ctx: Ctx) -> None:
    """One line on stderr when no fleet server has driven rollouts lately: a new rollout would sit still."""
    from fleet import follow

    now, heartbeat = time.time(), ctx.registry.last_server_heartbeat()
    if follow.server_silent(heartbeat, now):
        source = _config_source(ctx.args)
        print(follow.silence_warning(heartbeat, now, f" --config {source}" if source else ""), file=sys.stderr)


EXIT_TIMEOUT = 3  # --wait gave up (--wait-timeout) while the rollout still runs


def _rollout_exit(info: dict[str, Any]) -> int:
    """0: completed or (not waited for) still running; 1: aborted; 3: waited for and still running at the timeout."""
    if info["status"] == "aborted":
        return EXIT_FAIL
    wait = info.get("wait") or {}
    if wait.get("timed_out"):
        print(
            f"fleet: rollout {info['id']} is still {info['status']} after --wait-timeout {wait.get('timeout_s'):g} s"
            f" (follow it with `fleet rollout status {info['id']} --wait`)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    return EXIT_OK


def _check_health_options(args: argparse.Namespace) -> None:
    """The health settings of a deployment, in the ranges the agent accepts (agent.protocol.update.DeployCommand)."""
    checks = (
        ("--health-window", getattr(args, "health_window", None), 0.0, 86_400.0, False, "seconds above 0, at most 86400"),
        ("--health-latency-factor", getattr(args, "health_latency_factor", None), 0.0, 100.0, False, "a factor above 0, at most 100, e.g. 2"),
        ("--health-latency-floor-ms", getattr(args, "health_latency_floor_ms", None), 0.0, 600_000.0, True, "milliseconds from 0 to 600000, e.g. 5"),
        ("--health-min-results", getattr(args, "health_min_results", None), 0, 1_000_000, True, "a count from 0 to 1000000, e.g. 20"),
    )  # fmt: skip
    for option, value, low, high, low_ok, fix in checks:
        if value is not None and not ((value >= low if low_ok else value > low) and value <= high):
            raise FleetError(f"{option} {value:g} is out of range", f"give {fix}")


def cmd_deploy(ctx: Ctx) -> int:
    args = ctx.args
    policy = _policy(ctx)
    devices = None
    if args.devices is not None:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if not devices:
            raise FleetError("--devices names no device", "give comma-separated device ids, e.g. --devices cam-1,cam-2")
    if args.group is not None:
        _check_group(ctx, args.group)
    _check_health_options(args)
    target = _resolve_target(ctx, args.target)
    info = ctx.ops.create_rollout(
        target,
        group=args.group,
        devices=devices,
        pipeline=args.pipeline,
        policy=policy,
        shadow_frames=args.shadow_frames,
        shadow_agreement=args.shadow_agreement,
        health_window_s=args.health_window,
        health_latency_factor=args.health_latency_factor,
        health_latency_floor_ms=args.health_latency_floor_ms,
        health_min_results=args.health_min_results,
        rollback=args.rollback,
    )
    if args.wait:
        info = _follow(ctx, info["id"], args.wait_timeout)
    if ctx.json:
        _print_json(info)
    else:
        _print_rollout(info)
        if not args.wait and info["status"] not in ("aborted", "completed"):
            _console().print(f"`fleet serve` drives it; follow with `fleet rollout status {info['id']} --wait`")
    if not args.wait and info["status"] not in ("aborted", "completed"):
        _warn_if_no_server(ctx)
    return _rollout_exit(info)


def cmd_rollout(ctx: Ctx) -> int:
    args = ctx.args
    action = args.rollout_command
    if action == "list":
        rollouts = ctx.ops.rollouts(args.status)
        if ctx.json:
            _print_json(rollouts)
            return EXIT_OK
        rows = [
            [
                r["id"],
                r["target"],
                r["status"],
                r["devices"],
                r["succeeded"],
                r["failed"] + r["timed_out"],
                _summary_line(r),
            ]
            for r in rollouts
        ]
        _console().print(
            _table(
                f"rollouts ({len(rollouts)})", ["id", "target", "status", "devices", "ok", "failed", "progress"], rows
            )
        )
        return EXIT_OK
    if action == "status":
        info = _follow(ctx, args.rollout_id, args.wait_timeout) if args.wait else ctx.ops.rollout(args.rollout_id)
        if ctx.json:
            _print_json(info)
        else:
            _print_rollout(info)
        return _rollout_exit(info)
    info = ctx.ops.control_rollout(args.rollout_id, action, args.reason)
    if ctx.json:
        _print_json(info)
    else:
        _print_rollout(info, devices=False)
    return EXIT_OK


def cmd_rollback(ctx: Ctx) -> int:
    try:
        _check_health_options(ctx.args)
    except FleetError as exc:  # audited like every rollback (Operations.rollback audits the rest)
        with contextlib.suppress(Exception):
            ctx.audit("rollout.rollback", {"rollback_of": ctx.args.rollout_id}, ok=False, error=str(exc))
        raise
    info = ctx.ops.rollback(ctx.args.rollout_id, health_window_s=ctx.args.health_window)
    if not ctx.json:
        _console().print(f"rollback of {_esc(ctx.args.rollout_id)} started as rollout {_esc(info['id'])}")
    if getattr(ctx.args, "wait", False):
        info = _follow(ctx, info["id"], ctx.args.wait_timeout)
    if ctx.json:
        _print_json(info)
    else:
        _print_rollout(info)
    return _rollout_exit(info)


# ---- commands and audit ------------------------------------------------------------------------------------


def cmd_command(ctx: Ctx) -> int:
    args = ctx.args
    settings: dict[str, str] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FleetError(f"{item!r} is not KEY=VALUE", "give settings as KEY=VALUE, e.g. log_level=debug")
        settings[key.strip()] = value
    if settings and args.action != "set":
        raise FleetError(f"`{args.action}` takes no KEY=VALUE settings", "drop them, or use `set`")
    if args.action == "set" and not settings:
        raise FleetError("`set` needs KEY=VALUE settings", "e.g. fleet command cam-1 set log_level=debug")
    if args.timeout <= 0:
        raise FleetError(f"--timeout {args.timeout:g} is not positive", "give the seconds to wait for the ack")
    if ctx.registry.device(args.device_id, updates=0, telemetry=0, events=0) is None:
        raise _unknown_device(args.device_id)
    if ctx.json or not sys.stderr.isatty():
        result = ctx.ops.send_command(args.device_id, args.action, settings, wait_ack_s=args.timeout)
    else:
        with _console(stderr=True).status(f"{args.action} -> {args.device_id}: waiting for the acknowledgement"):
            result = ctx.ops.send_command(args.device_id, args.action, settings, wait_ack_s=args.timeout)
    if ctx.json:
        _print_json(result)
    else:
        out = _console()
        ack = result.get("ack")
        if ack is None:
            out.print(
                f"[red]no acknowledgement[/red] from {_esc(args.device_id)} within {args.timeout:g} s (seq {result['seq']})"
            )
        elif result["ok"]:
            out.print(f"{_esc(args.device_id)} acknowledged {args.action} (seq {result['seq']})")
            extra = {k: v for k, v in ack.items() if k not in ("v", "device_id", "command", "id", "ok")}
            if extra:
                out.print(_esc(json.dumps(extra, indent=2, default=str)))
        else:
            out.print(f"[red]{_esc(args.device_id)} refused {args.action}[/red]: {_esc(ack.get('error'))}")
    return EXIT_OK if result["ok"] else EXIT_FAIL


def _detail_text(detail: Any, limit: int = 100) -> str:
    """An audit entry's detail as ``key=value`` words (lists space-separated), cut at ``limit`` characters."""
    if not detail:
        return ""
    if not isinstance(detail, dict):
        text = str(detail)
    else:
        parts = []
        for key, value in detail.items():
            if isinstance(value, list | tuple):
                value = " ".join(map(str, value)) or "-"
            elif not isinstance(value, str):
                value = json.dumps(value, default=str, separators=(",", ":"))
            parts.append(f"{key}={value}")
        text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cmd_audit(ctx: Ctx) -> int:
    entries = ctx.registry.audit_log(limit=ctx.args.limit, action=ctx.args.action)
    if ctx.json:
        _print_json(entries)
        return EXIT_OK
    rows = [
        [
            _when(e["ts"]),
            e["actor"],
            e["action"],
            _markup("[green]ok[/green]" if e["ok"] else "[red]failed[/red]"),
            e["error"] if not e["ok"] and e["error"] else _detail_text(e["detail"]),
        ]
        for e in entries
    ]
    _console().print(_table(f"audit (newest {len(entries)})", ["time", "actor", "action", "result", "detail"], rows))
    return EXIT_OK


def cmd_quarantine(ctx: Ctx) -> int:
    entries = ctx.registry.quarantined(limit=ctx.args.limit, device_id=ctx.args.device)
    if ctx.json:
        _print_json(entries)
        return EXIT_OK
    shown = [[e["device_id"], e["kind"], e["reason"], e["payload"][:120]] for e in entries]
    printable = [["".join(c if c.isprintable() else ascii(c)[1:-1] for c in cell) for cell in row] for row in shown]
    rows = [[_when(e["received_at"]), *row] for e, row in zip(entries, printable, strict=True)]
    title = f"quarantine (newest {len(entries)})"
    _console().print(_table(title, ["received", "device", "kind", "reason", "payload"], rows))
    return EXIT_OK


# ---- main -------------------------------------------------------------------------------------------------

Handler = Callable[[Ctx], int]


def _handler(args: argparse.Namespace) -> tuple[Handler, str | None]:
    """The function for the command line and the audit action recorded when it fails (None: not audited)."""
    command = args.command
    if command == "keys":
        sub = args.keys_command
        return {"show": cmd_keys_show, "rotate": cmd_keys_rotate, "sign": cmd_keys_sign, "publish": cmd_keys_publish}[
            sub
        ], (None if sub == "show" else f"keys.{sub}")
    if command == "bundle":
        sub = args.bundle_command
        return {"build": cmd_bundle_build, "inspect": cmd_bundle_inspect, "publish": cmd_bundle_publish}[sub], (
            "bundle.publish" if sub == "publish" else None
        )
    if command == "device":
        sub = args.device_command
        return {"provision": cmd_device_provision, "show": cmd_device_show}[sub], (
            "device.provision" if sub == "provision" else None
        )
    if command == "rollout":
        sub = args.rollout_command
        return cmd_rollout, (f"rollout.{sub}" if sub in ("pause", "resume", "abort") else None)
    table: dict[str, tuple[Handler, str | None]] = {
        "init": (cmd_init, None),
        "serve": (cmd_serve, None),
        "devices": (cmd_devices, None),
        "groups": (cmd_groups, None),
        "deploy": (cmd_deploy, "rollout.create"),
        "rollback": (cmd_rollback, None),  # Operations.rollback audits it (naming the rollout it undoes)
        "command": (cmd_command, f"command.{getattr(args, 'action', '')}"),
        "audit": (cmd_audit, None),
        "quarantine": (cmd_quarantine, None),
        "targets": (cmd_targets, None if getattr(args, "targets_command", "list") == "list" else "targets.publish"),
    }
    return table[command]


def _audit_failure(ctx: Ctx | None, action: str | None, argv: Sequence[str], error: str) -> None:
    """Record a failed operator action (best effort: the database may be what failed)."""
    if ctx is None or action is None:
        return
    with contextlib.suppress(Exception):
        ctx.audit(action, {"argv": list(argv)}, ok=False, error=error)


def main(argv: list[str] | None = None) -> int:
    from agent import logging as agent_logging
    from agent.hints import error_line

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    serving = args.command == "serve"
    level = os.environ.get("FLEET_LOG_LEVEL", "info" if serving else "error")
    agent_logging.configure(level, json=None if serving else False)
    handler, action = _handler(args)
    ctx: Ctx | None = None
    try:
        ctx = Ctx(args)
        return handler(ctx)
    except FleetError as exc:
        _audit_failure(ctx, action, argv, str(exc))
        print(f"fleet: error: {error_line(exc)}", file=sys.stderr)  # one (fix: ...), however errors nest
        return exc.exit_code
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
