"""A/B model slots on disk, per pipeline, crash-safe under ``kill -9`` at any instant.

Layout under the agent's state directory::

    <state_dir>/models/<pipeline>/
        slot-a/                 a complete bundle directory
        slot-b/                 a complete bundle directory (or absent)
        active -> slot-a        relative symlink; replacing it is the activation
        staging/                bundles being unpacked before they become a slot
        downloads/<sha256>.part downloads in progress (resumable by offset)
        .lock                   single-writer lock (flock)

Crash-safety argument (why ``active`` always names a complete bundle):

* A slot directory only ever appears under its name ``slot-x`` by one ``rename(2)`` of a
  staged directory whose files and directories were all fsynced first, and the parent
  directory is fsynced after the rename. So ``slot-x`` is, at every instant and after a
  power cut, either absent, the old complete bundle, or the new complete bundle.
* The slot being replaced is never the active one: it is first renamed aside
  (``slot-x.<token>.aside``), then the staged one is renamed in, then the aside copy is
  deleted. A kill during the deletion leaves only an ``.aside`` leftover for ``recover()``.
* Activation writes a new symlink ``active.tmp``, fsyncs the directory, then
  ``os.replace(active.tmp, active)`` (atomic rename over the old link) and fsyncs the
  directory again. ``active`` is therefore the old link or the new one, never missing,
  and it only ever points at a slot that was complete and durable before the switch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from agent.bundle import ARCHIVE_SUFFIXES, _extract, load_bundle
from agent.errors import AgentError, BundleError

Slot = Literal["a", "b"]
SLOTS: tuple[Slot, Slot] = ("a", "b")
PIPELINE_NAME = re.compile(r"[A-Za-z0-9_-]+")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DEFAULT_MARGIN = 32 * 1024 * 1024  # bytes kept free beyond what an operation needs
ACTIVE = "active"
ACTIVE_TMP = "active.tmp"
ASIDE_SUFFIX = ".aside"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def ensure_free_space(path: Path, needed_bytes: int, margin: int = DEFAULT_MARGIN) -> int:
    """Raise AgentError unless the file system holding ``path`` has ``needed_bytes + margin`` free.

    Returns the free byte count. ``path`` may not exist yet; its nearest existing parent is used.
    """
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = needed_bytes + margin
    if free < want:
        raise AgentError(
            f"not enough disk space under {path}: need {want} bytes ({_human(want)}: {needed_bytes} for the update "
            f"+ {margin} margin), only {free} bytes ({_human(free)}) free",
            f"free at least {_human(want - free)} on that file system (old recordings, logs) or move the state directory",
        )
    return free


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: makes their entries durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, then ``root`` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _bundle_ok(path: Path) -> bool:
    """True when ``path`` is a directory that loads as a bundle (metadata valid, model file present)."""
    if not path.is_dir():
        return False
    try:
        load_bundle(path).close()
    except AgentError:
        return False
    return True


class SlotStore:
    """The A/B slot store of one pipeline under ``<root>/models/<pipeline>``. One writer at a time."""

    def __init__(self, root: Path | str, pipeline: str) -> None:
        if not isinstance(pipeline, str) or not PIPELINE_NAME.fullmatch(pipeline):
            raise AgentError(
                f"pipeline name {pipeline!r} is not allowed for the model store",
                "use only letters, digits, '_' and '-' in pipeline names",
            )
        self.root = Path(root).absolute()
        self.pipeline = pipeline
        self.dir = self.root / "models" / pipeline
        self.staging = self.dir / "staging"
        self.downloads = self.dir / "downloads"
        self._lock_fd: int | None = None
        self._lock_depth = 0

    # ---- paths and state -------------------------------------------------------------------

    def slot_path(self, slot: Slot) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"slot must be 'a' or 'b', not {slot!r}")
        return self.dir / f"slot-{slot}"

    def active_slot(self) -> Slot | None:
        """The slot ``active`` points at; None when no model was ever activated."""
        try:
            target = os.readlink(self.dir / ACTIVE)
        except OSError:
            return None
        for slot in SLOTS:
            if target == f"slot-{slot}":
                return slot
        return None

    def active_path(self) -> Path | None:
        """The active slot directory; None when no model was ever installed (or it vanished)."""
        slot = self.active_slot()
        if slot is None:
            return None
        path = self.slot_path(slot)
        return path if path.is_dir() else None

    def inactive_slot(self) -> Slot:
        """The slot that the next ``stage()`` writes: the one ``active`` does not point at."""
        return "b" if self.active_slot() == "a" else "a"

    def previous_path(self) -> Path | None:
        """The other slot when it holds a complete bundle (the rollback target), else None."""
        if self.active_slot() is None:
            return None
        path = self.slot_path(self.inactive_slot())
        return path if _bundle_ok(path) else None

    # ---- downloads -------------------------------------------------------------------------

    def download_path(self, sha256: str) -> Path:
        """Where the download of the archive with this SHA-256 is written (appended to when resuming)."""
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise AgentError(f"{sha256!r} is not a SHA-256 digest", "give 64 lowercase hexadecimal digits")
        self.downloads.mkdir(parents=True, exist_ok=True)
        return self.downloads / f"{sha256}.part"

    def partial_size(self, sha256: str) -> int:
        """Bytes already downloaded (the offset to resume from); 0 when nothing is there."""
        try:
            return self.download_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def verify_download(self, sha256: str, length: int) -> bool:
        """True when the download is exactly ``length`` bytes and hashes to ``sha256``."""
        path = self.download_path(sha256)
        try:
            if path.stat().st_size != length:
                return False
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            return False
        return digest.hexdigest() == sha256

    def discard_download(self, sha256: str) -> None:
        """Delete a (partial or finished) download."""
        self.download_path(sha256).unlink(missing_ok=True)

    def ensure_free_space(self, needed_bytes: int, margin: int = DEFAULT_MARGIN) -> int:
        """Raise AgentError unless the store's file system has ``needed_bytes + margin`` free."""
        return ensure_free_space(self.dir, needed_bytes, margin)

    # ---- writes ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive, re-entrant (within this object) writer lock; released by the kernel on kill -9."""
        if self._lock_depth == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise AgentError(
                        f"another process is changing the models of pipeline {self.pipeline!r}",
                        "wait for it to finish (only one agent may run per state directory)",
                    ) from None
                raise
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None

    def install_initial(self, source: Path | str) -> Path:
        """First install (e.g. from the config): the bundle goes to slot a and becomes active."""
        with self._locked():
            if self.active_slot() is not None:
                raise AgentError(
                    f"pipeline {self.pipeline!r} already has an active model in {self.dir}",
                    "install new versions with an update (stage + activate), not install_initial",
                )
            path = self.stage(source)
            self.activate(self.inactive_slot())
            return path

    def stage(self, source: Path | str) -> Path:
        """Unpack/copy a bundle (directory or archive) into the inactive slot, durably. Returns the slot path.

        The bundle is validated with ``load_bundle`` before it replaces anything; the active slot is
        never touched.
        """
        source = Path(source)
        if not source.exists():
            raise BundleError(f"{source} does not exist", "give the path of a bundle directory or archive")
        with self._locked():
            active = self.active_slot()
            target = self.inactive_slot()
            assert target != active
            self.staging.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="stage-", dir=self.staging))
            try:
                content = work / "bundle"
                if source.is_dir():
                    shutil.copytree(source, content, symlinks=False)
                else:
                    content.mkdir()
                    _extract(self._archive_link(source, work), content)
                load_bundle(content).close()  # refuse a broken bundle before it replaces the old one
                _fsync_tree(content)
                _fsync_path(work)
                slot_dir = self.slot_path(target)
                aside: Path | None = None
                if slot_dir.exists() or slot_dir.is_symlink():
                    aside = self.dir / f"{slot_dir.name}.{secrets.token_hex(4)}{ASIDE_SUFFIX}"
                    os.rename(slot_dir, aside)
                    _fsync_path(self.dir)
                os.rename(content, slot_dir)  # the commit point of the staged bundle
                _fsync_path(self.dir)
                if aside is not None:
                    _rmtree(aside)
            finally:
                _rmtree(work)
            return slot_dir

    @staticmethod
    def _archive_link(source: Path, work: Path) -> Path:
        """``source`` itself when its name says what it is, else a link named by its content (``.part`` files)."""
        if source.name.lower().endswith(ARCHIVE_SUFFIXES):
            return source
        if zipfile.is_zipfile(source):
            name = "archive.zip"
        elif tarfile.is_tarfile(source):
            name = "archive.tar"  # tarfile detects the compression itself
        else:
            raise BundleError(
                f"{source.name} is neither a bundle directory nor a tar/zip archive",
                "re-download or rebuild the bundle",
            )
        link = work / name
        try:
            os.link(source, link)
        except OSError:
            shutil.copyfile(source, link)
        return link

    def activate(self, slot: Slot) -> None:
        """Point ``active`` at ``slot`` atomically (new symlink, fsync, rename over, fsync)."""
        with self._locked():
            path = self.slot_path(slot)
            if not _bundle_ok(path):
                raise BundleError(
                    f"slot {slot} of pipeline {self.pipeline!r} does not hold a complete bundle",
                    "stage a bundle into it before activating",
                )
            tmp = self.dir / ACTIVE_TMP
            tmp.unlink(missing_ok=True)
            os.symlink(path.name, tmp)  # relative: the state directory may be moved as a whole
            _fsync_path(self.dir)
            os.replace(tmp, self.dir / ACTIVE)
            _fsync_path(self.dir)

    def rollback(self) -> Path:
        """Point ``active`` back at the other slot (which must hold a complete bundle). Returns it."""
        with self._locked():
            previous = self.previous_path()
            if previous is None:
                raise AgentError(
                    f"pipeline {self.pipeline!r} has no previous model to roll back to",
                    "install a known good bundle as an update instead",
                )
            self.activate(self.inactive_slot())
            return previous

    def recover(self) -> dict[str, Any]:
        """After a restart: remove leftovers and make sure ``active`` names a loadable bundle.

        Never deletes the active slot or a download. Returns ``{"removed": [...], "active": slot,
        "switched": bool, "active_ok": bool}``.
        """
        with self._locked():
            removed: list[str] = []
            tmp = self.dir / ACTIVE_TMP
            if tmp.is_symlink() or tmp.exists():
                _rmtree(tmp)
                removed.append(ACTIVE_TMP)
            if self.staging.is_dir():
                for child in sorted(self.staging.iterdir()):
                    _rmtree(child)
                    removed.append(f"staging/{child.name}")
            if self.dir.is_dir():
                for child in sorted(self.dir.glob(f"*{ASIDE_SUFFIX}")):
                    _rmtree(child)
                    removed.append(child.name)
            if removed:
                _fsync_path(self.dir)
            switched = False
            active = self.active_slot()
            link_exists = (self.dir / ACTIVE).is_symlink()
            active_ok = active is not None and _bundle_ok(self.slot_path(active))
            if link_exists and not active_ok:
                # Should never happen: try the other slot rather than leave no model at all.
                for slot in SLOTS:
                    if slot != active and _bundle_ok(self.slot_path(slot)):
                        self.activate(slot)
                        active, active_ok, switched = slot, True, True
                        break
            return {"removed": removed, "active": active, "switched": switched, "active_ok": active_ok}
