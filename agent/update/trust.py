"""The device's TUF client: the pinned trust root, metadata refresh through the MQTT fetcher, trusted target info.

``tuf.ngclient`` makes every trust decision (signatures and thresholds, versions, expiry, hashes and lengths of
metadata, key rotation through root versions); this wrapper only turns its errors into one-line reasons.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater

from agent.errors import AgentError
from agent.protocol.update import COMMAND_KEYS_FIELD, TARGET_CUSTOM_FIELD
from agent.update.commands import CommandKeys
from agent.update.fetcher import METADATA_BASE_URL
from agent.update.state import Target


class UntrustedMetadata(Exception):
    """The fleet's repository metadata failed a TUF check (the update is rejected)."""


class RepositoryUnavailable(Exception):
    """The fleet's repository could not be reached or did not answer (the update fails, a retry may work)."""


@dataclass(frozen=True)
class TrustedTarget:
    """A target whose length and hashes come from verified TUF metadata."""

    info: TargetFile
    target: Target
    task: str | None

    @property
    def path(self) -> str:
        return self.info.path


def install_trust_root(metadata_dir: Path, trust_root: Path | None) -> None:
    """Put the pinned root in place on first use (later roots replace it through verified rotation only)."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    current = metadata_dir / "root.json"
    if current.exists():
        return
    if trust_root is None:
        raise AgentError(
            "updates are enabled but no trust root is installed",
            "set [update].trust_root to the root.json from `fleet device provision`",
        )
    try:
        Metadata[Root].from_bytes(Path(trust_root).read_bytes())
    except FileNotFoundError:
        raise AgentError(f"trust root {trust_root} does not exist", "fix [update].trust_root") from None
    except Exception as exc:
        raise AgentError(
            f"trust root {trust_root} is not TUF root metadata: {str(exc)[:160]}",
            "use the root.json from `fleet device provision`",
        ) from None
    tmp = metadata_dir / "root.json.tmp"
    shutil.copyfile(trust_root, tmp)
    tmp.replace(current)


def root_summary(path: Path) -> tuple[str, Any]:
    """``("root v3, expires ..., 2 command key(s)", command keys field)``; AgentError when it is not TUF root metadata.

    Read from another process (``edge-agent check`` beside a running daemon), ``root.json`` may be missing for a
    moment while the daemon's updater re-links it: a missing file is looked for again a few times first."""
    try:
        root = Metadata[Root].from_bytes(_read_settled(Path(path))).signed
    except FileNotFoundError:
        raise AgentError(f"trust root {path} does not exist", "fix [update].trust_root") from None
    except Exception as exc:
        raise AgentError(
            f"{path} is not TUF root metadata: {str(exc)[:160]}", "use the root.json from `fleet device provision`"
        ) from None
    field = root.unrecognized_fields.get(COMMAND_KEYS_FIELD)
    keys = len(field.get("keys", {})) if isinstance(field, dict) else 0
    expires = root.expires.strftime("%Y-%m-%d")
    return f"root v{root.version}, expires {expires}, {keys} command key(s)", field


def _read_settled(path: Path, attempts: int = 5, pause_s: float = 0.02) -> bytes:
    for _ in range(attempts - 1):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            time.sleep(pause_s)
    return path.read_bytes()


class TrustClient:
    """One refresh per update: a new ``Updater`` each time (``refresh()`` runs once per Updater by design).

    The single owner of the local metadata directory: every refresh and read holds one lock, because the updater
    writes there (it removes and re-links ``root.json`` each time one is made) while the deployment worker and the
    device-command worker both use this client.
    """

    def __init__(self, metadata_dir: Path, fetcher: FetcherInterface) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.fetcher = fetcher
        self._updater: Updater | None = None
        self._lock = threading.RLock()

    def refresh(self) -> None:
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        try:
            updater = Updater(str(self.metadata_dir), METADATA_BASE_URL, fetcher=self.fetcher, bootstrap=None)
            updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadLengthMismatchError) as exc:
            raise UntrustedMetadata(f"untrusted repository metadata: {type(exc).__name__}: {_short(exc)}") from None
        except tuf_errors.DownloadError as exc:
            raise RepositoryUnavailable(f"fleet repository unavailable: {_short(exc)}") from None
        except (OSError, ValueError) as exc:
            raise UntrustedMetadata(f"repository metadata unusable: {_short(exc)}") from None
        self._updater = updater

    def root(self) -> Metadata[Root]:
        """The newest verified root (the updater writes it only after verification)."""
        with self._lock:
            return Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())

    def command_keys(self) -> CommandKeys:
        return CommandKeys.from_root_field(self.root().signed.unrecognized_fields.get(COMMAND_KEYS_FIELD))

    def target(self, path: str) -> TrustedTarget:
        """Verified info of ``path``; UntrustedMetadata when it is not a well-formed target of the repository."""
        with self._lock:  # get_targetinfo may fetch and persist delegated metadata
            updater = self._updater
            if updater is None:
                raise RuntimeError("refresh() first")
            try:
                info = updater.get_targetinfo(path)
            except tuf_errors.RepositoryError as exc:
                raise UntrustedMetadata(f"untrusted repository metadata: {type(exc).__name__}: {_short(exc)}") from None
            except tuf_errors.DownloadError as exc:
                raise RepositoryUnavailable(f"fleet repository unavailable: {_short(exc)}") from None
        if info is None:
            raise UntrustedMetadata(f"target {path} is not in the signed repository")
        sha256 = info.hashes.get("sha256")
        if not sha256:
            raise UntrustedMetadata(f"target {path} has no sha256 hash in its signed metadata")
        custom: Any = (info.custom or {}).get(TARGET_CUSTOM_FIELD)
        if (
            not isinstance(custom, dict)
            or not isinstance(custom.get("name"), str)
            or not isinstance(custom.get("version"), str)
        ):
            raise UntrustedMetadata(f"target {path} lacks the signed name/version fields")
        hardware = custom.get("hardware") or []
        if not isinstance(hardware, list) or not all(isinstance(h, str) for h in hardware):
            raise UntrustedMetadata(f"target {path} has malformed hardware ids")
        try:
            target = Target(custom["name"], custom["version"], sha256, info.length, tuple(hardware))
        except ValueError as exc:
            raise UntrustedMetadata(f"target {path}: {exc}") from None
        task = custom.get("task") if isinstance(custom.get("task"), str) else None
        return TrustedTarget(info, target, task)


def verify_file(target: TrustedTarget, path: Path) -> str | None:
    """None when ``path`` has exactly the signed length and hashes, else a one-line reason."""
    try:
        with open(path, "rb") as fh:
            target.info.verify_length_and_hashes(fh)
    except tuf_errors.LengthOrHashMismatchError as exc:
        return f"downloaded bytes do not match the signed target: {_short(exc)}"
    except OSError as exc:
        return f"cannot read the download: {exc.strerror}"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text.replace("\n", " ")[:300]
