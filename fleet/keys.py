"""The fleet's signing keys: a directory of PEM private keys (PKCS#8, optionally encrypted) and their public halves.

Layout of a key store (directory mode 0700, files 0600)::

    <role>-<keyid[:12]>.pem        private key (absent for an offline key: it was moved out with export_offline)
    <role>-<keyid[:12]>.pub.json   public key dict {keytype, scheme, keyval} with its keyid

Roles are the TUF top-level roles plus ``command`` (the online key that signs deployment and device commands).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey

from fleet.errors import FleetError

ROLES = ("root", "targets", "snapshot", "timestamp", "command")
_PUB_SUFFIX = ".pub.json"
_NAME = re.compile(r"^(root|targets|snapshot|timestamp|command)-([0-9a-f]{12})\.pub\.json$")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same directory, fsync, rename, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _passphrase_bytes(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None or passphrase == "" or passphrase == b"":
        return None
    return passphrase.encode() if isinstance(passphrase, str) else passphrase


def _pem(signer: CryptoSigner, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM of the signer's private key, encrypted when a passphrase is given."""
    if not passphrase:
        return signer.private_bytes
    private_key = load_pem_private_key(signer.private_bytes, None)
    return private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(passphrase))


def load_signer(pem_path: str | Path, passphrase: str | bytes | None = None, public_key: Key | None = None) -> Signer:
    """Load a private key file (PEM, PKCS#8) as a signer; FleetError when it is missing, locked or not a key.

    The public key (and so the keyid) comes from ``public_key``, else from a ``.pub.json`` next to the file, else it
    is derived from the private key (the same keyid ``generate`` gave it).
    """
    path = Path(pem_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FleetError(f"key file {path} does not exist", "give the path of the private key file") from None
    except IsADirectoryError:
        raise FleetError(f"key file {path} is a directory", "give the path of the private key file") from None
    except OSError as exc:
        raise FleetError(f"cannot read key file {path}: {exc.strerror}", "check the file's permissions") from None
    secret = _passphrase_bytes(passphrase)
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and secret is None:
        raise FleetError(f"key file {path} is encrypted", "give its passphrase")
    try:
        private_key = load_pem_private_key(data, secret if encrypted else None)
    except ValueError:
        if encrypted:
            raise FleetError(
                f"wrong passphrase for key file {path}", "give the passphrase the key was saved with"
            ) from None
        raise FleetError(f"{path} is not a PEM private key", "give the path of a PKCS#8 PEM private key file") from None
    except (TypeError, UnsupportedAlgorithm):
        raise FleetError(f"{path} is not a usable private key", "give an Ed25519, ECDSA or RSA private key") from None
    if public_key is None:
        pub_path = _pub_path_for(path)
        if pub_path.is_file():
            public_key = _read_public(pub_path)
    try:
        if public_key is None:
            public_key = SSlibKey.from_crypto(private_key.public_key())  # type: ignore[arg-type]
        return CryptoSigner(private_key, public_key)  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FleetError(
            f"{path} is not a usable signing key: {exc}", "give an Ed25519, ECDSA or RSA private key"
        ) from None


def _pub_path_for(pem_path: Path) -> Path:
    return pem_path.with_name(pem_path.name.removesuffix(".pem") + _PUB_SUFFIX)


def _read_public(path: Path) -> Key:
    try:
        data = json.loads(path.read_text())
        return Key.from_dict(data["keyid"], dict(data["key"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"public key file {path} is unreadable: {exc}", "restore it from a backup") from None


class KeyStore:
    """A directory of the fleet's keys; ``passphrase`` encrypts the private keys it generates and opens them."""

    def __init__(self, path: str | Path, passphrase: str | bytes | None = None) -> None:
        self.path = Path(path)
        self._passphrase = _passphrase_bytes(passphrase)
        self._cache: dict[Path, tuple[tuple[int, int], Signer]] = {}

    # ---- writing -------------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        if not self.path.is_dir():
            self.path.mkdir(parents=True, mode=0o700)
            os.chmod(self.path, 0o700)

    def _stem(self, role: str, keyid: str) -> str:
        return f"{role}-{keyid[:12]}"

    def generate(self, role: str) -> CryptoSigner:
        """Generate an Ed25519 key for ``role``, save both halves, and return its signer."""
        _check_role(role)
        self._ensure_dir()
        signer = CryptoSigner.generate_ed25519()
        self._save(role, signer)
        return signer

    def add(self, role: str, signer: CryptoSigner) -> None:
        """Save an existing key (generated elsewhere) for ``role``."""
        _check_role(role)
        self._ensure_dir()
        self._save(role, signer)

    def _save(self, role: str, signer: CryptoSigner) -> None:
        key = signer.public_key
        stem = self._stem(role, key.keyid)
        write_atomic(self.path / f"{stem}.pem", _pem(signer, self._passphrase), mode=0o600)
        self._write_public(role, key)

    def _write_public(self, role: str, key: Key) -> None:
        doc = {"role": role, "keyid": key.keyid, "key": key.to_dict()}
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        write_atomic(self.path / f"{self._stem(role, key.keyid)}{_PUB_SUFFIX}", data, mode=0o600)

    def add_public(self, role: str, key: Key) -> None:
        """Record the public half of a key whose private half lives elsewhere (an offline key)."""
        _check_role(role)
        self._ensure_dir()
        self._write_public(role, key)

    # ---- reading -------------------------------------------------------------------------------

    def _entries(self, role: str) -> list[tuple[Path, Key]]:
        _check_role(role)
        if not self.path.is_dir():
            return []
        found = []
        for pub in sorted(self.path.glob(f"{role}-*{_PUB_SUFFIX}")):
            if _NAME.match(pub.name):
                found.append((pub, _read_public(pub)))
        return found

    def public_keys(self, role: str) -> list[Key]:
        """The public keys of ``role`` in this store (online and offline)."""
        return [key for _, key in self._entries(role)]

    def signers(self, role: str) -> list[Signer]:
        """Signers for the keys of ``role`` whose private half is in this store."""
        result = []
        for pub, key in self._entries(role):
            pem = pub.with_name(pub.name.removesuffix(_PUB_SUFFIX) + ".pem")
            try:
                stat = pem.stat()
            except FileNotFoundError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(pem)
            if cached is None or cached[0] != stamp:
                cached = (stamp, load_signer(pem, self._passphrase, key))
                self._cache[pem] = cached
            result.append(cached[1])
        return result

    def signer(self, keyid: str) -> Signer | None:
        """The signer of one key by keyid, whatever its role; None when its private half is not here."""
        for role in ROLES:
            for signer in self.signers(role):
                if signer.public_key.keyid == keyid:
                    return signer
        return None

    def load_signer(self, pem_path: str | Path, passphrase: str | bytes | None = None) -> Signer:
        """Load a key file given on the command line (an offline key); its public half is taken from this store
        when the store knows the key."""
        signer = load_signer(pem_path, passphrase)
        public = signer.public_key.keyval.get("public")
        for role in ROLES:
            for key in self.public_keys(role):
                if key.keyid != signer.public_key.keyid and key.keyval.get("public") == public:
                    return load_signer(pem_path, passphrase, key)
        return signer

    # ---- offline keys -------------------------------------------------------------------------

    def export_offline(
        self, role: str, dest_path: str | Path, *, keyid: str | None = None, passphrase: str | bytes | None = None
    ) -> Key:
        """Move the private key of ``role`` out of the store to ``dest_path`` (mode 0600); the public half stays.

        ``passphrase`` re-encrypts the exported file; without it the file is exported as stored. ``keyid`` picks
        the key when the role has several private keys here.
        """
        dest = Path(dest_path)
        candidates = [(pub, key) for pub, key in self._entries(role) if keyid is None or key.keyid == keyid]
        candidates = [
            (pub, key) for pub, key in candidates if pub.with_name(pub.name.removesuffix(_PUB_SUFFIX) + ".pem").exists()
        ]
        if not candidates:
            raise FleetError(f"no private {role} key in {self.path}", "export a key that the key store holds")
        if len(candidates) > 1:
            raise FleetError(f"{len(candidates)} private {role} keys in {self.path}", "name the key to export by keyid")
        pub, key = candidates[0]
        if dest.exists():
            raise FleetError(f"{dest} already exists", "choose a new file for the offline key")
        pem = pub.with_name(pub.name.removesuffix(_PUB_SUFFIX) + ".pem")
        secret = _passphrase_bytes(passphrase)
        if secret is None:
            data = pem.read_bytes()
        else:
            signer = load_signer(pem, self._passphrase, key)
            data = _pem(signer, secret)  # type: ignore[arg-type]
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, data, mode=0o600)
        pem.unlink()
        self._cache.pop(pem, None)
        fsync_dir(self.path)
        return key

    def delete(self, role: str, keyid: str) -> None:
        """Forget a key of ``role`` (both halves); for keys revoked from the root."""
        for pub, key in self._entries(role):
            if key.keyid == keyid:
                pem = pub.with_name(pub.name.removesuffix(_PUB_SUFFIX) + ".pem")
                with contextlib.suppress(FileNotFoundError):
                    pem.unlink()
                pub.unlink()
                self._cache.pop(pem, None)
                fsync_dir(self.path)
                return
        raise FleetError(f"no {role} key {keyid[:12]} in {self.path}", "list the keys with `fleet keys`")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise FleetError(f"unknown key role {role!r}", f"use one of {', '.join(ROLES)}")
