"""The fleet's TUF repository and key store, checked with a real ``tuf.ngclient.Updater``."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from freezegun import freeze_time
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Key, Signature
from tuf.api.exceptions import (
    DownloadHTTPError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    UnsignedMetadataError,
)
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from agent.protocol.update import COMMAND_KEYS_FIELD, TARGET_CUSTOM_FIELD, DeployCommand, canonical_bytes
from fleet.errors import FleetError
from fleet.keys import KeyStore, load_signer
from fleet.repository import Repository

META_URL = "http://fleet.test/metadata/"
TARGETS_URL = "http://fleet.test/targets/"


class RepoFetcher(FetcherInterface):
    """Serves the repository's files the way the fleet server does: metadata through ``read_metadata``."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        data = None
        if url.startswith(META_URL):
            data = self.repo.read_metadata(url.removeprefix(META_URL))
        elif url.startswith(TARGETS_URL):
            path = self.repo.targets_dir / url.removeprefix(TARGETS_URL)
            data = path.read_bytes() if path.is_file() else None
        if data is None:
            raise DownloadHTTPError("not found", 404)
        return iter([data])


def client(repo: Repository, where: Path, bootstrap: bytes | None = None) -> Updater:
    """A fresh Updater (one refresh each) caching in ``where``, trusting root v1 unless told otherwise."""
    (where / "metadata").mkdir(parents=True, exist_ok=True)
    (where / "targets").mkdir(exist_ok=True)
    if bootstrap is None and not (where / "metadata" / "root.json").exists():
        bootstrap = (repo.metadata_dir / "1.root.json").read_bytes()
    return Updater(
        str(where / "metadata"),
        META_URL,
        str(where / "targets"),
        TARGETS_URL,
        RepoFetcher(repo),
        bootstrap=bootstrap,
    )


def trusted_root(where: Path) -> Root:
    """The root the client verified and cached."""
    return Metadata.from_file(str(where / "metadata" / "root.json")).signed


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


@pytest.fixture
def repo(tmp_path: Path, keystore: KeyStore) -> Repository:
    return Repository.init(tmp_path / "repo", keystore)


def add_model(repo: Repository, tmp_path: Path, version: str = "1.0", data: bytes = b"model-1" * 100) -> Path:
    source = write(tmp_path, f"det-{version}.bundle", data)
    repo.add_target(
        source, f"det/{version}/det.bundle", name="det", version=version, hardware=["rpi4", "rpi5"], task="detect"
    )
    return source


# ---- init -----------------------------------------------------------------------------------------


def test_init_writes_consistent_layout_and_client_trusts_it(
    tmp_path: Path, repo: Repository, keystore: KeyStore
) -> None:
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"]
    assert stat.S_IMODE(keystore.path.stat().st_mode) == 0o700
    for key_file in keystore.path.iterdir():
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    assert {p.name.split("-")[0] for p in keystore.path.glob("*.pem")} == {
        "root",
        "targets",
        "snapshot",
        "timestamp",
        "command",
    }

    updater = client(repo, tmp_path / "c")
    updater.refresh()
    root = trusted_root(tmp_path / "c")
    assert root.consistent_snapshot is True
    field = root.unrecognized_fields[COMMAND_KEYS_FIELD]
    assert field["threshold"] == 1
    assert list(field["keys"]) == [k.keyid for k in keystore.public_keys("command")]
    assert updater.get_targetinfo("det/1.0/det.bundle") is None

    now = datetime.now(timezone.utc)
    assert timedelta(days=364) < root.expires - now <= timedelta(days=365)
    assert timedelta(hours=23) < repo.timestamp().signed.expires - now <= timedelta(days=1)
    assert timedelta(days=6) < repo.snapshot().signed.expires - now <= timedelta(days=7)
    assert timedelta(days=89) < repo.targets_metadata().signed.expires - now <= timedelta(days=90)


def test_init_refuses_an_existing_repository_and_bad_thresholds(
    tmp_path: Path, repo: Repository, keystore: KeyStore
) -> None:
    with pytest.raises(FleetError, match="already exists"):
        Repository.init(repo.path, keystore)
    with pytest.raises(FleetError, match="threshold 3 of 2"):
        Repository.init(tmp_path / "other", keystore, root_keys=2, root_threshold=3)
    with pytest.raises(FleetError, match="no TUF repository"):
        Repository(tmp_path / "nowhere", keystore)


def test_configured_expiry_is_kept(tmp_path: Path, keystore: KeyStore) -> None:
    repo = Repository.init(tmp_path / "repo", keystore, expiry={"timestamp": timedelta(hours=2)})
    reopened = Repository(repo.path, keystore)
    reopened.refresh_timestamp()
    left = reopened.timestamp().signed.expires - datetime.now(timezone.utc)
    assert timedelta(hours=1) < left <= timedelta(hours=2)


# ---- targets --------------------------------------------------------------------------------------


def test_added_target_carries_custom_fields_and_downloads_verified(tmp_path: Path, repo: Repository) -> None:
    data = b"\x00model bytes\xff" * 1000
    add_model(repo, tmp_path, data=data)

    updater = client(repo, tmp_path / "c")
    info = updater.get_targetinfo("det/1.0/det.bundle")
    assert info is not None
    assert info.custom[TARGET_CUSTOM_FIELD] == {
        "name": "det",
        "version": "1.0",
        "hardware": ["rpi4", "rpi5"],
        "task": "detect",
    }
    assert info.length == len(data)
    path = updater.download_target(info)
    assert Path(path).read_bytes() == data
    sha = info.hashes["sha256"]
    assert f"{TARGETS_URL}det/1.0/{sha}.det.bundle" in updater._fetcher.urls  # consistent snapshot: hash-prefixed

    [listed] = repo.targets()
    assert (listed.path, listed.name, listed.version, listed.hardware, listed.task) == (
        "det/1.0/det.bundle",
        "det",
        "1.0",
        ("rpi4", "rpi5"),
        "detect",
    )
    assert listed.sha256 == sha and listed.length == len(data)
    assert repo.find_by_sha256(sha) == repo.targets_dir / "det/1.0/det.bundle"
    assert repo.find_by_sha256("0" * 64) is None
    assert repo.find_by_sha256("../../etc/passwd") is None


def test_tampered_target_bytes_are_refused_by_the_client(tmp_path: Path, repo: Repository) -> None:
    add_model(repo, tmp_path, data=b"a" * 4096)
    with open(repo.targets_dir / "det/1.0/det.bundle", "r+b") as f:  # the hash-prefixed name is a hard link
        f.write(b"b")
    updater = client(repo, tmp_path / "c")
    info = updater.get_targetinfo("det/1.0/det.bundle")
    assert info is not None
    with pytest.raises(LengthOrHashMismatchError):
        updater.download_target(info)


def test_new_target_version_is_visible_after_refresh(tmp_path: Path, repo: Repository) -> None:
    add_model(repo, tmp_path, "1.0")
    assert client(repo, tmp_path / "c").get_targetinfo("det/2.0/det.bundle") is None

    add_model(repo, tmp_path, "2.0", data=b"model-2" * 100)
    updater = client(repo, tmp_path / "c")  # same cache, new refresh
    info = updater.get_targetinfo("det/2.0/det.bundle")
    assert info is not None and info.custom[TARGET_CUSTOM_FIELD]["version"] == "2.0"
    assert updater.get_targetinfo("det/1.0/det.bundle") is not None
    assert [t.version for t in repo.targets()] == ["1.0", "2.0"]
    assert repo.targets_metadata().signed.version == 3


def test_duplicate_target_version_with_other_bytes_is_refused(tmp_path: Path, repo: Repository) -> None:
    source = add_model(repo, tmp_path, "1.0", data=b"first")
    version = repo.targets_metadata().signed.version

    again = repo.add_target(
        source, "det/1.0/det.bundle", name="det", version="1.0", hardware=["rpi4", "rpi5"], task="detect"
    )
    assert not again.changed and again.targets_version == version  # same bytes, same description: nothing to do

    other = write(tmp_path, "other.bundle", b"second")
    with pytest.raises(FleetError, match="already exists with different bytes") as exc:
        repo.add_target(other, "det/1.0/det.bundle", name="det", version="1.0", hardware=["rpi4"])
    assert "(fix: " in str(exc.value)
    with pytest.raises(FleetError, match=r"det version 1\.0 already exists"):
        repo.add_target(other, "det/1.0b/det.bundle", name="det", version="1.0", hardware=["rpi4"])
    assert repo.targets_metadata().signed.version == version
    assert (repo.targets_dir / "det/1.0/det.bundle").read_bytes() == b"first"
    assert not list(repo.targets_dir.rglob(".incoming.*"))


def test_bad_target_paths_are_refused(tmp_path: Path, repo: Repository) -> None:
    source = write(tmp_path, "m.bin", b"x")
    for bad in ("../escape.bin", "/abs.bin", "a/../b.bin", "a//b", ""):
        with pytest.raises(FleetError, match="not allowed"):
            repo.add_target(source, bad, name="m", version="1", hardware=["rpi4"])
    with pytest.raises(FleetError, match="not a file"):
        repo.add_target(tmp_path / "missing.bin", "m/1/m.bin", name="m", version="1", hardware=["rpi4"])


def test_removed_target_disappears_with_its_files(tmp_path: Path, repo: Repository) -> None:
    add_model(repo, tmp_path, "1.0")
    add_model(repo, tmp_path, "2.0", data=b"two")
    repo.remove_target("det/1.0/det.bundle")
    assert [t.version for t in repo.targets()] == ["2.0"]
    assert not (repo.targets_dir / "det/1.0").exists()
    assert client(repo, tmp_path / "c").get_targetinfo("det/1.0/det.bundle") is None
    with pytest.raises(FleetError, match="no target"):
        repo.remove_target("det/1.0/det.bundle")


def test_read_metadata_serves_only_metadata_names(repo: Repository) -> None:
    assert repo.read_metadata("timestamp.json") == (repo.metadata_dir / "timestamp.json").read_bytes()
    assert repo.read_metadata("1.root.json") is not None
    assert repo.read_metadata("1.snapshot.json") is not None
    assert repo.read_metadata("2.root.json") is None  # absent
    for bad in ("../config.json", "metadata/../root.json", "/etc/passwd", "..", "config.json", "0.root.json", "root"):
        assert repo.read_metadata(bad) is None, bad


# ---- expiry ---------------------------------------------------------------------------------------


def test_timestamp_refresh_bumps_version_and_expiry(tmp_path: Path, repo: Repository) -> None:
    before = repo.timestamp().signed
    with freeze_time(datetime.now(timezone.utc) + timedelta(hours=5)):
        assert repo.refresh_timestamp() == before.version + 1
    after = repo.timestamp().signed
    assert after.expires - before.expires >= timedelta(hours=4)
    assert after.snapshot_meta.version == before.snapshot_meta.version
    client(repo, tmp_path / "c").refresh()

    snapshot_version = repo.refresh_snapshot()
    assert snapshot_version == before.snapshot_meta.version + 1
    assert repo.timestamp().signed.snapshot_meta.version == snapshot_version
    client(repo, tmp_path / "c").refresh()


def test_client_refuses_an_expired_timestamp_until_it_is_refreshed(tmp_path: Path, repo: Repository) -> None:
    client(repo, tmp_path / "c").refresh()
    later = datetime.now(timezone.utc) + timedelta(days=2)
    with freeze_time(later):
        with pytest.raises(ExpiredMetadataError):
            client(repo, tmp_path / "c").refresh()
        assert repo.refresh_expiring(timedelta(hours=1)) == ["timestamp"]
        client(repo, tmp_path / "c").refresh()
    with freeze_time(later + timedelta(days=6)):  # the snapshot (7 days) runs out next
        assert repo.refresh_expiring(timedelta(days=1)) == ["snapshot", "timestamp"]
        client(repo, tmp_path / "c").refresh()


# ---- key rotation ---------------------------------------------------------------------------------


def test_root_rotation_from_1_of_1_to_2_of_3_is_followed_from_v1(
    tmp_path: Path, repo: Repository, keystore: KeyStore
) -> None:
    [first] = keystore.public_keys("root")
    client(repo, tmp_path / "old").refresh()  # a device that trusts v1 only

    second, third = keystore.generate("root"), keystore.generate("root")
    assert repo.rotate("root", add=[second.public_key, third.public_key], threshold=2) == 2
    assert repo.rotate("root", remove=[first.keyid]) == 3  # 2-of-3 old keys and 2-of-2 new keys sign v3
    assert sorted(p.name for p in repo.metadata_dir.glob("*.root.json")) == [
        "1.root.json",
        "2.root.json",
        "3.root.json",
    ]

    client(repo, tmp_path / "old").refresh()
    client(repo, tmp_path / "new").refresh()  # bootstrapped from v1, walks 2 and 3
    for where in ("old", "new"):
        root = trusted_root(tmp_path / where)
        assert root.version == 3
        assert root.roles["root"].threshold == 2
        assert set(root.roles["root"].keyids) == {second.public_key.keyid, third.public_key.keyid}


def test_rotation_without_enough_root_keys_changes_nothing(
    tmp_path: Path, repo: Repository, keystore: KeyStore
) -> None:
    second, third = keystore.generate("root"), keystore.generate("root")
    repo.rotate("root", add=[second.public_key, third.public_key], threshold=2)
    keystore.delete("root", third.public_key.keyid)
    [first] = [s for s in keystore.signers("root") if s.public_key.keyid not in (second.public_key.keyid,)]
    keystore.delete("root", first.public_key.keyid)  # only one of the 2 needed root keys is left
    before = (repo.metadata_dir / "root.json").read_bytes()
    with pytest.raises(FleetError, match="needs 2 signature"):
        repo.rotate("timestamp", add=[keystore.generate("timestamp").public_key])
    assert (repo.metadata_dir / "root.json").read_bytes() == before
    assert not (repo.metadata_dir / "3.root.json").exists()

    # The missing key given as an offline signer completes the threshold.
    assert repo.rotate("root", signers=[third]) == 3
    client(repo, tmp_path / "c").refresh()


def test_client_refuses_a_root_signed_below_threshold(tmp_path: Path, repo: Repository, keystore: KeyStore) -> None:
    second, third = keystore.generate("root"), keystore.generate("root")
    repo.rotate("root", add=[second.public_key, third.public_key], threshold=2)
    # A forged v3 (say, from one stolen root key) that gives the timestamp role to the attacker.
    forged = Metadata.from_bytes((repo.metadata_dir / "2.root.json").read_bytes())
    forged.signed.version = 3
    attacker = CryptoSigner.generate_ed25519()
    for keyid in list(forged.signed.roles["timestamp"].keyids):
        forged.signed.revoke_key(keyid, "timestamp")
    forged.signed.add_key(attacker.public_key, "timestamp")
    forged.sign(second)  # 1 of the 2 needed
    (repo.metadata_dir / "3.root.json").write_bytes(forged.to_bytes())

    with pytest.raises(UnsignedMetadataError):
        client(repo, tmp_path / "c").refresh()


def test_timestamp_key_rotation_resigns_the_timestamp(tmp_path: Path, repo: Repository, keystore: KeyStore) -> None:
    client(repo, tmp_path / "c").refresh()
    [old] = keystore.public_keys("timestamp")
    new = keystore.generate("timestamp")
    repo.rotate("timestamp", add=[new.public_key], remove=[old.keyid])
    assert list(repo.timestamp().signatures) == [new.public_key.keyid]
    client(repo, tmp_path / "c").refresh()
    assert trusted_root(tmp_path / "c").roles["timestamp"].keyids == [new.public_key.keyid]


def test_snapshot_key_rotation_resigns_snapshot_and_timestamp(
    tmp_path: Path, repo: Repository, keystore: KeyStore
) -> None:
    add_model(repo, tmp_path)
    [old] = keystore.public_keys("snapshot")
    new = keystore.generate("snapshot")
    repo.rotate("snapshot", add=[new.public_key], remove=[old.keyid])
    assert list(repo.snapshot().signatures) == [new.public_key.keyid]
    assert client(repo, tmp_path / "c").get_targetinfo("det/1.0/det.bundle") is not None


# ---- offline targets key --------------------------------------------------------------------------


def test_offline_targets_key_flow(tmp_path: Path, keystore: KeyStore) -> None:
    offline = tmp_path / "usb" / "targets.pem"
    repo = Repository.init(
        tmp_path / "repo", keystore, offline_targets=True, offline_key_path=offline, offline_passphrase="usb secret"
    )
    assert keystore.signers("targets") == []
    assert [k.keyid for k in keystore.public_keys("targets")] == repo.root().signed.roles["targets"].keyids
    assert stat.S_IMODE(offline.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in offline.read_bytes()

    source = write(tmp_path, "m.bundle", b"offline model")
    change = repo.add_target(source, "det/1.0/det.bundle", name="det", version="1.0", hardware=["rpi4"])
    assert change.staged and change.signing_needed and change.targets_version == 2
    assert (repo.staged_dir / "targets.json").is_file()
    assert repo.targets() == []  # nothing published yet
    assert client(repo, tmp_path / "c").get_targetinfo("det/1.0/det.bundle") is None
    staged = repo.staged()
    assert staged is not None and (staged.version, staged.signed, staged.threshold) == (2, 0, 1)
    assert [t.path for t in staged.targets] == ["det/1.0/det.bundle"]

    with pytest.raises(FleetError, match="not signed by enough targets keys"):
        repo.publish_staged()
    with pytest.raises(FleetError, match="not a targets key"):
        repo.sign_staged(keystore.signers("snapshot")[0])

    with pytest.raises(FleetError, match="wrong passphrase"):
        keystore.load_signer(offline, "guess")
    signer = keystore.load_signer(offline, "usb secret")
    assert repo.sign_staged(signer).signed == 1
    published = repo.publish_staged()
    assert published.targets_version == 2 and not published.staged
    assert repo.staged() is None

    updater = client(repo, tmp_path / "c")
    info = updater.get_targetinfo("det/1.0/det.bundle")
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == b"offline model"
    with pytest.raises(FleetError, match="nothing is staged"):
        repo.publish_staged()


def test_offline_targets_threshold_of_two(tmp_path: Path, keystore: KeyStore) -> None:
    offline = tmp_path / "usb" / "targets.pem"
    repo = Repository.init(tmp_path / "repo", keystore, offline_targets=True, offline_key_path=offline)
    first = load_signer(offline)
    second = CryptoSigner.generate_ed25519()  # a second offline key, never in the store
    repo.rotate("targets", add=[second.public_key], threshold=2, signers=[first, second])
    assert set(repo.targets_metadata().signatures) == {first.public_key.keyid, second.public_key.keyid}
    client(repo, tmp_path / "c").refresh()

    add_model(repo, tmp_path)
    repo.sign_staged(first)
    with pytest.raises(FleetError, match="signed by 1/2 keys"):
        repo.publish_staged()
    assert repo.sign_staged(second).signed == 2
    repo.publish_staged()
    assert client(repo, tmp_path / "c").get_targetinfo("det/1.0/det.bundle") is not None


def test_staged_targets_signed_then_changed_need_signing_again(tmp_path: Path, keystore: KeyStore) -> None:
    offline = tmp_path / "targets.pem"
    repo = Repository.init(tmp_path / "repo", keystore, offline_targets=True, offline_key_path=offline)
    signer = load_signer(offline)
    add_model(repo, tmp_path, "1.0")
    repo.sign_staged(signer)
    add_model(repo, tmp_path, "2.0", data=b"two")  # builds on the staged targets, drops the signature
    staged = repo.staged()
    assert staged is not None and staged.signed == 0 and len(staged.targets) == 2
    with pytest.raises(FleetError):
        repo.publish_staged()
    repo.sign_staged(signer)
    repo.publish_staged()
    assert [t.version for t in repo.targets()] == ["1.0", "2.0"]


# ---- command keys ---------------------------------------------------------------------------------


def deploy_command(seq: int = 1) -> dict:
    now = datetime.now(timezone.utc).timestamp()
    command = DeployCommand(
        id=f"rollout-{seq}",
        seq=seq,
        issued=now,
        expires=now + 3600,
        device="cam-01",
        pipeline="main",
        target="det/1.0/det.bundle",
    )
    return command.model_dump()


def verify_with_root(envelope: dict, root: Root) -> list[str]:
    """Keyids of the command keys (from the root's custom field) whose signatures verify."""
    field = root.unrecognized_fields[COMMAND_KEYS_FIELD]
    payload = canonical_bytes(envelope["signed"])
    good = []
    for sig in envelope["signatures"]:
        key_dict = field["keys"].get(sig["keyid"])
        if key_dict is None:
            continue
        key = Key.from_dict(sig["keyid"], dict(key_dict))
        key.verify_signature(Signature(sig["keyid"], sig["sig"]), payload)
        good.append(sig["keyid"])
    return good


def test_signed_command_verifies_with_the_key_in_root(tmp_path: Path, repo: Repository, keystore: KeyStore) -> None:
    client(repo, tmp_path / "c").refresh()
    root = trusted_root(tmp_path / "c")  # the root as the device verified it
    signed = deploy_command()
    envelope = repo.sign_command(signed)
    assert envelope["signed"] == signed
    assert verify_with_root(envelope, root) == [keystore.public_keys("command")[0].keyid]
    assert json.loads(json.dumps(envelope)) == envelope

    tampered = {"signed": {**signed, "target": "det/9.9/det.bundle"}, "signatures": envelope["signatures"]}
    with pytest.raises(UnverifiedSignatureError):
        verify_with_root(tampered, root)


def test_command_key_rotation(tmp_path: Path, repo: Repository, keystore: KeyStore) -> None:
    [old] = keystore.public_keys("command")
    new = keystore.generate("command")
    assert repo.rotate("command", add=[new.public_key], remove=[old.keyid]) == 2
    assert repo.command_keys() == ({new.public_key.keyid: new.public_key.to_dict()}, 1)

    client(repo, tmp_path / "c").refresh()
    root = trusted_root(tmp_path / "c")
    envelope = repo.sign_command(deploy_command(2))
    assert [s["keyid"] for s in envelope["signatures"]] == [new.public_key.keyid]  # the old key is not used any more
    assert verify_with_root(envelope, root) == [new.public_key.keyid]

    with pytest.raises(FleetError, match="not a command key"):
        repo.rotate("command", remove=[old.keyid])
    with pytest.raises(FleetError, match="cannot be met"):
        repo.rotate("command", threshold=2)
    keystore.delete("command", new.public_key.keyid)
    with pytest.raises(FleetError, match="command key"):
        repo.sign_command(deploy_command(3))


# ---- key store ------------------------------------------------------------------------------------


def test_encrypted_key_store_round_trip(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys", passphrase="s3cret")
    signer = store.generate("command")
    [pem] = store.path.glob("command-*.pem")
    assert pem.name == f"command-{signer.public_key.keyid[:12]}.pem"
    assert b"ENCRYPTED PRIVATE KEY" in pem.read_bytes()

    [again] = KeyStore(store.path, passphrase="s3cret").signers("command")
    assert again.public_key == signer.public_key
    with pytest.raises(FleetError, match="wrong passphrase"):
        KeyStore(store.path, passphrase="nope").signers("command")
    with pytest.raises(FleetError, match="is encrypted"):
        KeyStore(store.path).signers("command")


def test_key_file_errors_are_one_line_fleet_errors(tmp_path: Path, keystore: KeyStore) -> None:
    with pytest.raises(FleetError, match="does not exist") as exc:
        load_signer(tmp_path / "missing.pem")
    assert "\n" not in str(exc.value) and "(fix: " in str(exc.value)

    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(FleetError, match="not a PEM private key"):
        load_signer(junk)

    keystore.generate("targets")
    exported = tmp_path / "offline.pem"
    key = keystore.export_offline("targets", exported, passphrase="pw")
    with pytest.raises(FleetError, match="wrong passphrase"):
        load_signer(exported, "wrong")
    with pytest.raises(FleetError, match="is encrypted"):
        load_signer(exported)
    assert load_signer(exported, "pw").public_key.keyid == key.keyid
    with pytest.raises(FleetError, match="no private targets key"):
        keystore.export_offline("targets", tmp_path / "again.pem")
    with pytest.raises(FleetError, match="unknown key role"):
        keystore.generate("admin")
    assert str(FleetError("it broke", "mend it")) == "it broke (fix: mend it)"


# ---- concurrency ----------------------------------------------------------------------------------


def test_writers_are_serialised_and_readers_see_whole_files(
    tmp_path: Path, repo: Repository, keystore: KeyStore
) -> None:
    other = Repository(repo.path, KeyStore(keystore.path))  # as a second process would open it
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                Metadata.from_bytes(other.read_metadata("timestamp.json") or b"")
                other.targets()
            except BaseException as exc:
                errors.append(exc)
                return

    def add(writer: Repository, prefix: str) -> None:
        for i in range(3):
            source = write(tmp_path, f"{prefix}{i}.bin", f"{prefix}{i}".encode())
            writer.add_target(source, f"{prefix}/{i}/m.bin", name=prefix, version=str(i), hardware=["rpi4"])

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=add, args=(r, p)) for r, p in ((repo, "a"), (other, "b"))]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    repo.refresh_timestamp()
    stop.set()
    reader.join()
    assert errors == []
    assert len(repo.targets()) == 6
    assert repo.targets_metadata().signed.version == 7
    client(repo, tmp_path / "c").refresh()
