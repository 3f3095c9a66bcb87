"""The fleet's TUF repository on disk (python-tuf Metadata API), with consistent snapshots.

Layout::

    <path>/metadata/root.json, <N>.root.json   every root version (root.json is the newest)
    <path>/metadata/timestamp.json
    <path>/metadata/<N>.snapshot.json, <N>.targets.json
    <path>/targets/<target path>                 target files (plus <dir>/<sha256>.<name> hard links, the
                                                 hash-prefixed names a stock ``tuf.ngclient.Updater`` fetches)
    <path>/staged/targets.json                   targets waiting for the offline targets key
    <path>/config.json                           expiry periods

``metadata/`` is exactly what ``tuf.ngclient.Updater`` fetches with ``metadata_base_url`` pointing at it. Every file is
written atomically and versioned files are never rewritten, so readers (the server answering devices) can read while
one writer (serialised by ``<path>/.lock``) publishes: the new ``timestamp.json`` is written last.

The root's ``signed`` object carries the fleet's command keys under ``COMMAND_KEYS_FIELD``; they rotate with the root.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.protocol.update import COMMAND_KEYS_FIELD, SHA256_HEX, TARGET_CUSTOM_FIELD, TARGET_PATH, canonical_bytes
from fleet.errors import FleetError
from fleet.keys import KeyStore, fsync_dir, write_atomic

TUF_ROLES = ("root", "targets", "snapshot", "timestamp")
ROTATABLE_ROLES = (*TUF_ROLES, "command")
DEFAULT_EXPIRY: dict[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
_METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.root|timestamp|root|[1-9][0-9]{0,9}\.(?:snapshot|targets))\.json$")
_SERIALIZER = JSONSerializer(compact=True)
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class TargetInfo:
    """One target (model bundle) as listed in targets metadata."""

    path: str
    name: str
    version: str
    hardware: tuple[str, ...]
    task: str | None
    length: int
    sha256: str
    input_kind: str | None = None  # the bundle's [input] kind (image, tensor, timeseries); None: published before
    model_sha256: str | None = None  # sha256 of the model file in the bundle: what devices report they run

    @classmethod
    def from_target_file(cls, target: TargetFile) -> TargetInfo:
        custom = target.custom if isinstance(target.custom, dict) else {}
        edge = custom.get(TARGET_CUSTOM_FIELD) or {}
        return cls(
            path=target.path,
            name=str(edge.get("name", "")),
            version=str(edge.get("version", "")),
            hardware=tuple(edge.get("hardware") or ()),
            task=edge.get("task"),
            length=target.length,
            sha256=target.hashes.get("sha256", ""),
            input_kind=edge.get("input") if isinstance(edge.get("input"), str) else None,
            model_sha256=edge.get("model_sha256") if isinstance(edge.get("model_sha256"), str) else None,
        )


@dataclass(frozen=True)
class TargetChange:
    """What ``add_target`` / ``remove_target`` did: published at ``targets_version``, or staged for the offline key."""

    target: TargetInfo | None
    targets_version: int
    staged: bool = False
    changed: bool = True

    @property
    def signing_needed(self) -> bool:
        return self.staged


@dataclass(frozen=True)
class StagedTargets:
    """The staged targets metadata: its version, targets, and how many of the needed signatures it carries."""

    version: int
    targets: list[TargetInfo] = field(default_factory=list)
    signed: int = 0
    threshold: int = 1


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _to_bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(_SERIALIZER)


def _clone(md: Metadata[Any]) -> Metadata[Any]:
    return Metadata.from_dict(copy.deepcopy(md.to_dict()))


def _command_field(root: Root) -> dict[str, Any]:
    value = root.unrecognized_fields.get(COMMAND_KEYS_FIELD)
    if not isinstance(value, dict) or not isinstance(value.get("keys"), dict):
        return {"keys": {}, "threshold": 1}
    return value


def _as_key(key: Key | Signer) -> Key:
    return key.public_key if isinstance(key, Signer) else key


class Repository:
    """A TUF repository at ``path`` whose online keys live in ``keystore``."""

    def __init__(self, path: str | Path, keystore: KeyStore) -> None:
        self.path = Path(path)
        self.keystore = keystore
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.staged_dir = self.path / "staged"
        if not (self.metadata_dir / "root.json").is_file():
            raise FleetError(f"no TUF repository at {self.path}", "run `fleet init` first or give the repository path")
        self.expiry = dict(DEFAULT_EXPIRY)
        config = self.path / "config.json"
        if config.is_file():
            stored = json.loads(config.read_text()).get("expiry_s", {})
            self.expiry.update({role: timedelta(seconds=float(s)) for role, s in stored.items() if role in TUF_ROLES})

    # ---- creation ---------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | Path,
        keystore: KeyStore,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        offline_targets: bool = False,
        offline_key_path: str | Path | None = None,
        offline_passphrase: str | bytes | None = None,
        expiry: Mapping[str, timedelta] | None = None,
    ) -> Repository:
        """Create a repository: new keys, root v1 (consistent snapshots, command keys), empty targets/snapshot/timestamp.

        With ``offline_targets`` the targets private key is moved to ``offline_key_path`` (encrypted with
        ``offline_passphrase`` when given) and only its public half stays in the key store.
        """
        path = Path(path)
        if (path / "metadata" / "root.json").exists():
            raise FleetError(f"a TUF repository already exists at {path}", "choose another directory or keep using it")
        if root_keys < 1 or not 1 <= root_threshold <= root_keys:
            raise FleetError(
                f"root threshold {root_threshold} of {root_keys} keys cannot be met",
                "use at least one root key and a threshold between 1 and the number of keys",
            )
        if offline_targets and offline_key_path is None:
            raise FleetError("an offline targets key needs a file to go to", "give the path for the offline key file")
        if offline_key_path is not None and Path(offline_key_path).exists():
            raise FleetError(f"{offline_key_path} already exists", "choose a new file for the offline key")
        periods = dict(DEFAULT_EXPIRY)
        for role, period in (expiry or {}).items():
            if role not in TUF_ROLES:
                raise FleetError(f"unknown role {role!r} in expiry settings", f"use one of {', '.join(TUF_ROLES)}")
            if period <= timedelta(0):
                raise FleetError(f"expiry period of {role} must be positive", "give a positive period")
            periods[role] = period

        for sub in ("metadata", "targets", "staged"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        config = {"expiry_s": {role: period.total_seconds() for role, period in periods.items()}}
        write_atomic(path / "config.json", json.dumps(config, indent=2, sort_keys=True).encode() + b"\n")

        signers = {role: [keystore.generate(role)] for role in ("targets", "snapshot", "timestamp", "command")}
        signers["root"] = [keystore.generate("root") for _ in range(root_keys)]
        now = _now()
        root = Root(expires=now + periods["root"], consistent_snapshot=True)
        for role in TUF_ROLES:
            for signer in signers[role]:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = root_threshold
        command = signers["command"][0].public_key
        root.unrecognized_fields[COMMAND_KEYS_FIELD] = {"keys": {command.keyid: command.to_dict()}, "threshold": 1}
        root_md = Metadata(root)
        for signer in signers["root"]:
            root_md.sign(signer, append=True)

        targets_md = Metadata(Targets(version=1, expires=now + periods["targets"]))
        targets_md.sign(signers["targets"][0])
        snapshot_md = Metadata(
            Snapshot(version=1, expires=now + periods["snapshot"], meta={"targets.json": MetaFile(1)})
        )
        snapshot_md.sign(signers["snapshot"][0])
        snapshot_bytes = _to_bytes(snapshot_md)
        timestamp_md = Metadata(
            Timestamp(
                version=1,
                expires=now + periods["timestamp"],
                snapshot_meta=MetaFile.from_data(1, snapshot_bytes, ["sha256"]),
            )
        )
        timestamp_md.sign(signers["timestamp"][0])

        meta = path / "metadata"
        write_atomic(meta / "1.targets.json", _to_bytes(targets_md))
        write_atomic(meta / "1.snapshot.json", snapshot_bytes)
        write_atomic(meta / "timestamp.json", _to_bytes(timestamp_md))
        root_bytes = _to_bytes(root_md)
        write_atomic(meta / "1.root.json", root_bytes)
        write_atomic(meta / "root.json", root_bytes)

        if offline_targets:
            keystore.export_offline(
                "targets", offline_key_path, keyid=signers["targets"][0].public_key.keyid, passphrase=offline_passphrase
            )
        return cls(path, keystore)

    # ---- reading ----------------------------------------------------------------------------------

    def _read(self, name: str) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise FleetError(f"{path} is missing", "restore the repository from a backup") from None
        except DeserializationError as exc:
            raise FleetError(f"{path} is not valid TUF metadata: {exc}", "restore it from a backup") from None

    def root(self) -> Metadata[Root]:
        """The newest root metadata."""
        return self._read("root.json")

    def timestamp(self) -> Metadata[Timestamp]:
        return self._read("timestamp.json")

    def snapshot(self) -> Metadata[Snapshot]:
        """The snapshot the current timestamp names."""
        return self._read(f"{self.timestamp().signed.snapshot_meta.version}.snapshot.json")

    def targets_metadata(self) -> Metadata[Targets]:
        """The published targets metadata (the version the current snapshot names)."""
        return self._read(f"{self.snapshot().signed.meta['targets.json'].version}.targets.json")

    def targets(self) -> list[TargetInfo]:
        """The published targets, sorted by path."""
        return sorted(
            (TargetInfo.from_target_file(t) for t in self.targets_metadata().signed.targets.values()),
            key=lambda t: t.path,
        )

    def find_by_sha256(self, sha256: str) -> Path | None:
        """The file of the published target with this SHA-256 (to serve its chunks from); None when there is none."""
        if not SHA256_HEX.match(sha256):
            return None
        for target in self.targets_metadata().signed.targets.values():
            if target.hashes.get("sha256") == sha256:
                path = self.targets_dir / target.path
                if path.is_file():
                    return path
        return None

    def read_metadata(self, name: str) -> bytes | None:
        """Bytes of a metadata file as a TUF client asks for it ("timestamp.json", "3.root.json",
        "2.snapshot.json", ...); None when absent or when ``name`` is not a metadata file name (no paths)."""
        if not isinstance(name, str) or not _METADATA_NAME.match(name):
            return None
        try:
            return (self.metadata_dir / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def command_keys(self) -> tuple[dict[str, dict[str, Any]], int]:
        """The command keys ``{keyid: key dict}`` and threshold from the current root."""
        value = _command_field(self.root().signed)
        return dict(value["keys"]), int(value.get("threshold", 1))

    def staged(self) -> StagedTargets | None:
        """The targets metadata waiting for offline signatures, or None."""
        staged = self._read_staged()
        if staged is None:
            return None
        root = self.root().signed
        result = root.get_verification_result("targets", staged.signed_bytes, staged.signatures)
        return StagedTargets(
            version=staged.signed.version,
            targets=sorted(
                (TargetInfo.from_target_file(t) for t in staged.signed.targets.values()), key=lambda t: t.path
            ),
            signed=len(result.signed),
            threshold=result.threshold,
        )

    # ---- locking and signing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _available_signers(self, role: str, keyids: Iterable[str], extra: Sequence[Signer] = ()) -> list[Signer]:
        wanted = set(keyids)
        found: dict[str, Signer] = {}
        for signer in [*extra, *self.keystore.signers(role)]:
            keyid = signer.public_key.keyid
            if keyid in wanted and keyid not in found:
                found[keyid] = signer
        return list(found.values())

    def _can_sign(self, role: str, root: Root, extra: Sequence[Signer] = ()) -> bool:
        return len(self._available_signers(role, root.roles[role].keyids, extra)) >= root.roles[role].threshold

    def _sign(self, md: Metadata[Any], role: str, root: Root, extra: Sequence[Signer] = ()) -> None:
        """Sign ``md`` with every available key of ``role`` (per ``root``); FleetError below the threshold."""
        md.signatures.clear()
        for signer in self._available_signers(role, root.roles[role].keyids, extra):
            md.sign(signer, append=True)
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            have, need = len(md.signatures), root.roles[role].threshold
            raise FleetError(
                f"only {have} of the {need} {role} key(s) needed are available to sign",
                f"put the {role} keys in the key store or give the key files",
            ) from None

    # ---- publishing -------------------------------------------------------------------------------

    def _publish(self, root: Root, targets: Metadata[Targets] | None = None, snapshot: bool = True) -> None:
        """Write ``targets`` (already signed) if given, then a new snapshot (if ``snapshot``) and a new timestamp."""
        now = _now()
        timestamp_md = self.timestamp()
        snapshot_version = timestamp_md.signed.snapshot_meta.version
        snapshot_meta = timestamp_md.signed.snapshot_meta
        if targets is not None:
            write_atomic(self.metadata_dir / f"{targets.signed.version}.targets.json", _to_bytes(targets))
        if snapshot or targets is not None:
            snapshot_md = self.snapshot()
            snapshot_md.signed.version += 1
            snapshot_md.signed.expires = now + self.expiry["snapshot"]
            if targets is not None:
                snapshot_md.signed.meta["targets.json"] = MetaFile(targets.signed.version)
            self._sign(snapshot_md, "snapshot", root)
            data = _to_bytes(snapshot_md)
            snapshot_version = snapshot_md.signed.version
            write_atomic(self.metadata_dir / f"{snapshot_version}.snapshot.json", data)
            snapshot_meta = MetaFile.from_data(snapshot_version, data, ["sha256"])
        timestamp_md.signed.version += 1
        timestamp_md.signed.expires = now + self.expiry["timestamp"]
        timestamp_md.signed.snapshot_meta = snapshot_meta
        self._sign(timestamp_md, "timestamp", root)
        write_atomic(self.metadata_dir / "timestamp.json", _to_bytes(timestamp_md))

    def _write_root(self, root_md: Metadata[Root]) -> None:
        data = _to_bytes(root_md)
        write_atomic(self.metadata_dir / f"{root_md.signed.version}.root.json", data)
        write_atomic(self.metadata_dir / "root.json", data)

    def refresh_timestamp(self) -> int:
        """Re-sign the timestamp with a new version and expiry; returns the new version."""
        with self._locked():
            self._publish(self.root().signed, snapshot=False)
            return self.timestamp().signed.version

    def refresh_snapshot(self) -> int:
        """Re-sign the snapshot (and timestamp) with a new version and expiry; returns the new snapshot version."""
        with self._locked():
            self._publish(self.root().signed)
            return self.timestamp().signed.snapshot_meta.version

    def refresh_targets(self) -> TargetChange:
        """Re-sign the targets with a new version and expiry (staged when the targets key is offline)."""
        with self._locked():
            base = self._targets_base()
            return self._commit_targets(base, None)

    def refresh_expiring(self, within: timedelta) -> list[str]:
        """Refresh each online role that expires within ``within`` (for the server's periodic job); returns the
        roles refreshed (a role whose key is offline is left alone)."""
        limit = _now() + within
        if self.targets_metadata().signed.expires <= limit and self._can_sign("targets", self.root().signed):
            self.refresh_targets()
            return ["targets", "snapshot", "timestamp"]
        if self.snapshot().signed.expires <= limit:
            self.refresh_snapshot()
            return ["snapshot", "timestamp"]
        if self.timestamp().signed.expires <= limit:
            self.refresh_timestamp()
            return ["timestamp"]
        return []

    # ---- targets ----------------------------------------------------------------------------------

    def _read_staged(self) -> Metadata[Targets] | None:
        path = self.staged_dir / "targets.json"
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return None
        except DeserializationError as exc:
            raise FleetError(
                f"{path} is not valid TUF metadata: {exc}", "delete it and add the targets again"
            ) from None

    def _targets_base(self) -> Metadata[Targets]:
        """The targets to change next: the staged ones when there are some, else a copy of the published ones."""
        staged = self._read_staged()
        if staged is not None:
            return staged
        published = self.targets_metadata()
        published.signed.version += 1
        published.signatures.clear()
        return published

    def _commit_targets(self, md: Metadata[Targets], target: TargetInfo | None) -> TargetChange:
        """Publish ``md`` (signed with the online targets key) or stage it unsigned for the offline key."""
        md.signed.expires = _now() + self.expiry["targets"]
        md.signatures.clear()
        root = self.root().signed
        if self._can_sign("targets", root):
            self._sign(md, "targets", root)
            self._publish(root, md)
            self._drop_staged()
            self._collect_target_files()
            return TargetChange(target, md.signed.version)
        self.staged_dir.mkdir(exist_ok=True)
        write_atomic(self.staged_dir / "targets.json", _to_bytes(md))
        return TargetChange(target, md.signed.version, staged=True)

    def add_target(
        self,
        file_path: str | Path,
        target_path: str,
        *,
        name: str,
        version: str,
        hardware: Sequence[str],
        task: str | None = None,
        input_kind: str | None = None,
        model_sha256: str | None = None,
    ) -> TargetChange:
        """Add (or re-describe) a target: copy the file under ``targets/``, list it with its SHA-256, length and
        ``custom["edge"] = {name, version, hardware, task[, input, model_sha256]}`` (``hardware`` empty: any), and
        publish (or stage, when the targets key is offline).

        FleetError when the target path or the name+version is already listed with different bytes.
        """
        if not TARGET_PATH.match(target_path):
            raise FleetError(
                f"target path {target_path!r} is not allowed",
                "use up to 4 '/'-separated parts of letters, digits, '.', '_', '-' (each starting with a letter or digit)",
            )
        if not name or not version:
            raise FleetError("a target needs a name and a version", "give the model name and version")
        hardware = [hardware] if isinstance(hardware, str) else [str(h) for h in hardware]
        if not all(hardware):
            raise FleetError("a hardware id is empty", "give the hardware ids it runs on (none: any hardware)")
        source = Path(file_path)
        if not source.is_file():
            raise FleetError(f"{source} is not a file", "give the path of the bundle file")
        with self._locked():
            staged = self._read_staged()
            base = self._targets_base()
            self.targets_dir.mkdir(exist_ok=True)
            tmp, sha256, length = self._copy_in(source)
            try:
                edge: dict[str, Any] = {"name": name, "version": version, "hardware": hardware, "task": task}
                if input_kind:
                    edge["input"] = input_kind
                if model_sha256:
                    edge["model_sha256"] = model_sha256
                custom = {TARGET_CUSTOM_FIELD: edge}
                new = TargetFile(length, {"sha256": sha256}, target_path, {"custom": custom})
                existing = base.signed.targets.get(target_path)
                if existing is not None and existing.hashes.get("sha256") != sha256:
                    raise FleetError(
                        f"target {target_path} already exists with different bytes",
                        "publish the new bytes under a new version and target path",
                    )
                for other in base.signed.targets.values():
                    info = TargetInfo.from_target_file(other)
                    if info.name == name and info.version == version and info.sha256 != sha256:
                        raise FleetError(
                            f"{name} version {version} already exists ({info.path}) with different bytes",
                            "give the new bytes a new version",
                        )
                info = TargetInfo.from_target_file(new)
                if existing == new:
                    os.unlink(tmp)
                    tmp = None
                    version = base.signed.version if staged else base.signed.version - 1
                    return TargetChange(info, version, staged=staged is not None, changed=False)
                self._place(tmp, target_path, sha256)
                tmp = None
            finally:
                if tmp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            base.signed.targets[target_path] = new
            return self._commit_targets(base, info)

    def remove_target(self, target_path: str) -> TargetChange:
        """Stop listing a target (published, or staged when the targets key is offline)."""
        with self._locked():
            base = self._targets_base()
            target = base.signed.targets.pop(target_path, None)
            if target is None:
                raise FleetError(f"no target {target_path}", "list the targets with `fleet targets`")
            return self._commit_targets(base, TargetInfo.from_target_file(target))

    def _copy_in(self, source: Path) -> tuple[str, str, int]:
        """Copy ``source`` to a temp file under targets/ while hashing it: (temp path, sha256, length)."""
        digest = hashlib.sha256()
        length = 0
        fd, tmp = tempfile.mkstemp(dir=self.targets_dir, prefix=".incoming.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while block := src.read(_COPY_BLOCK):
                    digest.update(block)
                    length += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp, digest.hexdigest(), length

    def _place(self, tmp: str, target_path: str, sha256: str) -> None:
        """Move the copied file to targets/<path> and hard-link targets/<dir>/<sha256>.<name> to it."""
        final = self.targets_dir / target_path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        prefixed = final.with_name(f"{sha256}.{final.name}")
        link_tmp = final.with_name(f".{prefixed.name}.link.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link_tmp)
        try:
            os.link(final, link_tmp)
        except OSError:
            shutil.copyfile(final, link_tmp)
        os.replace(link_tmp, prefixed)
        fsync_dir(final.parent)

    def _collect_target_files(self) -> None:
        """Delete target files that neither the published nor the staged targets list."""
        keep: set[Path] = set()
        listed = list(self.targets_metadata().signed.targets.values())
        staged = self._read_staged()
        if staged is not None:
            listed += staged.signed.targets.values()
        for target in listed:
            final = self.targets_dir / target.path
            keep.add(final)
            keep.update(final.with_name(f"{h}.{final.name}") for h in target.hashes.values())
        for path in sorted(self.targets_dir.rglob("*"), reverse=True):
            if path.is_file() and path not in keep and not path.name.startswith(".incoming."):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    # ---- offline targets signing ------------------------------------------------------------------

    def sign_staged(self, signer: Signer) -> StagedTargets:
        """Add ``signer``'s signature to the staged targets metadata (the signer must hold a targets key)."""
        with self._locked():
            staged = self._read_staged()
            if staged is None:
                raise FleetError("nothing is staged for signing", "add or remove a target first")
            root = self.root().signed
            keyid = signer.public_key.keyid
            if keyid not in root.roles["targets"].keyids:
                raise FleetError(
                    f"key {keyid[:12]} is not a targets key of this repository", "sign with the offline targets key"
                )
            staged.sign(signer, append=True)
            write_atomic(self.staged_dir / "targets.json", _to_bytes(staged))
        status = self.staged()
        assert status is not None
        return status

    def publish_staged(self) -> TargetChange:
        """Publish the staged targets once a threshold of the targets keys (per the current root) signed them."""
        with self._locked():
            staged = self._read_staged()
            if staged is None:
                raise FleetError("nothing is staged for publishing", "add or remove a target first")
            root = self.root().signed
            try:
                root.verify_delegate("targets", staged.signed_bytes, staged.signatures)
            except UnsignedMetadataError as exc:
                raise FleetError(
                    f"the staged targets are not signed by enough targets keys ({exc})",
                    "sign them with `fleet targets sign --key <offline key file>`",
                ) from None
            published = self.targets_metadata().signed.version
            if staged.signed.version <= published:
                raise FleetError(
                    f"the staged targets (version {staged.signed.version}) are older than the published ones "
                    f"(version {published})",
                    "discard the staged targets and make the change again",
                )
            if staged.signed.is_expired(_now()):
                raise FleetError("the staged targets have expired", "sign them again")
            self._publish(root, staged)
            self._drop_staged()
            self._collect_target_files()
            return TargetChange(None, staged.signed.version)

    def discard_staged(self) -> None:
        """Forget the staged targets."""
        with self._locked():
            self._drop_staged()
            self._collect_target_files()

    def _drop_staged(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.staged_dir / "targets.json").unlink()

    # ---- key rotation -----------------------------------------------------------------------------

    def rotate(
        self,
        role: str,
        *,
        add: Sequence[Key | Signer] = (),
        remove: Sequence[str] = (),
        threshold: int | None = None,
        signers: Sequence[Signer] = (),
    ) -> int:
        """Change the keys of ``role`` with a new root version; returns that version.

        The new root is signed by a threshold of the old root keys and of the new root keys (from the key store,
        ``signers`` such as offline keys, and the signers among ``add``). After rotating targets/snapshot/timestamp
        keys those roles are re-signed with the new keys (snapshot and timestamp keys must be in the key store; an
        offline targets key comes in ``signers``). Without changes this re-signs the root with a new version and
        expiry (do that before the root expires).
        """
        if role not in ROTATABLE_ROLES:
            raise FleetError(f"unknown role {role!r}", f"use one of {', '.join(ROTATABLE_ROLES)}")
        signers = [*signers, *(k for k in add if isinstance(k, Signer))]
        with self._locked():
            old_md = self.root()
            new_md: Metadata[Root] = _clone(old_md)
            new = new_md.signed
            new.version += 1
            new.expires = _now() + self.expiry["root"]
            if role == "command":
                self._rotate_command(new, add, remove, threshold)
            else:
                for key in add:
                    new.add_key(_as_key(key), role)
                for keyid in remove:
                    try:
                        new.revoke_key(keyid, role)
                    except ValueError:
                        raise FleetError(
                            f"key {keyid[:12]} is not a {role} key", "give a keyid from the root"
                        ) from None
                if threshold is not None:
                    new.roles[role].threshold = threshold
                count, need = len(new.roles[role].keyids), new.roles[role].threshold
                if count == 0 or not 1 <= need <= count:
                    raise FleetError(
                        f"{role} threshold {need} of {count} keys cannot be met",
                        "keep at least one key and a threshold between 1 and the number of keys",
                    )

            # Prepare re-signed role metadata before anything is written, so a missing key changes nothing.
            resign_targets = None
            if role == "targets":
                resign_targets = self.targets_metadata()
                resign_targets.signed.version += 1
                resign_targets.signed.expires = _now() + self.expiry["targets"]
                self._sign(resign_targets, "targets", new, signers)
            if role in ("targets", "snapshot", "timestamp"):
                for online in ("snapshot", "timestamp"):
                    if not self._can_sign(online, new):
                        raise FleetError(
                            f"not enough {online} keys are available to sign under the new root",
                            f"put the new {online} keys in the key store",
                        )

            new_md.signatures.clear()
            candidates = set(old_md.signed.roles["root"].keyids) | set(new.roles["root"].keyids)
            for signer in self._available_signers("root", candidates, signers):
                new_md.sign(signer, append=True)
            result = new.get_root_verification_result(old_md.signed, new_md.signed_bytes, new_md.signatures)
            if not result.verified:
                raise FleetError(
                    f"root v{new.version} needs {old_md.signed.roles['root'].threshold} signature(s) of the old root "
                    f"keys and {new.roles['root'].threshold} of the new ones; "
                    f"only {len(result.first.signed)} and {len(result.second.signed)} are available",
                    "put the root keys in the key store or give the key files",
                )

            self._write_root(new_md)
            if role == "targets":
                assert resign_targets is not None
                self._publish(new, resign_targets)
                self._rebase_staged()
            elif role in ("snapshot", "timestamp"):
                self._publish(new, snapshot=role == "snapshot")
            return new.version

    def _rotate_command(
        self, root: Root, add: Sequence[Key | Signer], remove: Sequence[str], threshold: int | None
    ) -> None:
        value = copy.deepcopy(_command_field(root))
        keys: dict[str, Any] = value["keys"]
        for key in add:
            public = _as_key(key)
            keys[public.keyid] = public.to_dict()
        for keyid in remove:
            if keys.pop(keyid, None) is None:
                raise FleetError(f"key {keyid[:12]} is not a command key", "give a keyid from the root")
        if threshold is not None:
            value["threshold"] = threshold
        if not keys or not 1 <= int(value.get("threshold", 1)) <= len(keys):
            raise FleetError(
                f"command threshold {value.get('threshold', 1)} of {len(keys)} keys cannot be met",
                "keep at least one key and a threshold between 1 and the number of keys",
            )
        root.unrecognized_fields[COMMAND_KEYS_FIELD] = value

    def _rebase_staged(self) -> None:
        """Keep a staged targets version above the published one (its signatures are dropped if it moves)."""
        staged = self._read_staged()
        if staged is None:
            return
        published = self.targets_metadata().signed.version
        if staged.signed.version <= published:
            staged.signed.version = published + 1
            staged.signatures.clear()
            write_atomic(self.staged_dir / "targets.json", _to_bytes(staged))

    # ---- commands ---------------------------------------------------------------------------------

    def sign_command(self, signed: dict[str, Any]) -> dict[str, Any]:
        """Sign a deployment or device command: ``{"signed": signed, "signatures": [{"keyid", "sig"}]}`` over
        ``canonical_bytes(signed)``, with every available command key listed in the current root."""
        keys, threshold = self.command_keys()
        available = self._available_signers("command", keys)
        if len(available) < threshold:
            raise FleetError(
                f"only {len(available)} of the {threshold} command key(s) needed are available",
                "put the command keys listed in the root in the key store",
            )
        payload = canonical_bytes(signed)
        signatures = []
        for signer in available[:16]:
            sig = signer.sign(payload)
            signatures.append({"keyid": sig.keyid, "sig": sig.signature})
        return {"signed": signed, "signatures": signatures}
