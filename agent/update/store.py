"""Persisted update state (the I/O shell around ``agent.update.state``): atomic JSON files that survive ``kill -9``.

Two files next to each other (one writer process: the agent):

* ``<path>`` (e.g. ``update.json``): ``{"format": 1, "save_counter": N, "state": {...} | null}``. ``clear()`` writes a
  tombstone (``state: null``) that keeps the last ``save_counter``, so a stale writer is refused even after a clear.
* ``<stem>.ran-versions.json``: ``{"format": 1, "versions": [...]}``, the versions committed on this device (for
  rollback decisions); kept apart so that a corrupt state file never loses it.

Every write goes to a temp file in the same directory, is flushed and ``fsync``-ed, ``os.replace``-d over the
target, and then the directory is ``fsync``-ed: a kill at any instant leaves either the old or the new file, never a
torn one. Temp files a killed writer left behind are named ``.<name>.tmp-*`` and removed by ``load()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.update.state import UpdateState, state_from_dict, state_to_dict

FORMAT = 1
log = structlog.get_logger(__name__)


class StaleWrite(Exception):
    """A save whose ``save_counter`` is not greater than the stored one (another, newer writer saved since)."""

    def __init__(self, new_counter: int, stored_counter: int, path: Path) -> None:
        self.new_counter = new_counter
        self.stored_counter = stored_counter
        super().__init__(
            f"refusing stale update state: save_counter {new_counter} is not greater than the stored {stored_counter} in {path}"
        )


class UpdateStore:
    """Load and save the single in-flight ``UpdateState`` and the set of versions committed on this device."""

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.ran_path = self.path.with_name(f"{self.path.stem}.ran-versions.json")
        self._clock = clock

    # -- state -----------------------------------------------------------------------------------------------------

    def load(self) -> UpdateState | None:
        """The stored state, or None (no file, cleared, or corrupt: moved aside and logged). Never raises."""
        self._remove_temp_files()
        document = self._read_document(self.path)
        if document is None:
            return None
        try:
            raw = document.get("state")
            return None if raw is None else state_from_dict(raw)
        except ValueError as error:
            self._quarantine(self.path, f"invalid update state: {error}")
            return None

    def stored_counter(self) -> int:
        """The save_counter on disk (0 when nothing was ever saved or the file is unusable)."""
        document = self._read_document(self.path)
        if document is None:
            return 0
        counter = document.get("save_counter", 0)
        return counter if isinstance(counter, int) and not isinstance(counter, bool) else 0

    def save(self, state: UpdateState) -> None:
        """Persist ``state`` atomically; raises ``StaleWrite`` unless its save_counter is above the stored one."""
        stored = self.stored_counter()
        if state.save_counter <= stored:
            raise StaleWrite(state.save_counter, stored, self.path)
        self._write_json(
            self.path, {"format": FORMAT, "save_counter": state.save_counter, "state": state_to_dict(state)}
        )

    def clear(self) -> None:
        """Forget the current update (a tombstone keeps the counter so that stale writers stay refused)."""
        self._write_json(self.path, {"format": FORMAT, "save_counter": self.stored_counter(), "state": None})

    # -- versions this device committed ----------------------------------------------------------------------------

    def ran_versions(self) -> frozenset[str]:
        """Versions committed on this device (empty when none, or when the file was corrupt: moved aside)."""
        document = self._read_document(self.ran_path)
        if document is None:
            return frozenset()
        versions = document.get("versions")
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            self._quarantine(self.ran_path, "ran versions is not a list of strings")
            return frozenset()
        return frozenset(versions)

    def record_committed(self, version: str) -> None:
        """Add ``version`` to the committed versions (atomic; a no-op if already there)."""
        if not version:
            raise ValueError("version is empty")
        versions = self.ran_versions()
        if version in versions:
            return
        self._write_json(self.ran_path, {"format": FORMAT, "versions": sorted(versions | {version})})

    # -- I/O helpers -----------------------------------------------------------------------------------------------

    def _read_document(self, path: Path) -> dict[str, Any] | None:
        """The JSON object at ``path``; None when missing or corrupt (corrupt files are moved aside)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._quarantine(path, f"unreadable: {error}")
            return None
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._quarantine(path, f"not JSON: {error}")
            return None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            self._quarantine(path, f"not a format-{FORMAT} document")
            return None
        return document

    def _quarantine(self, path: Path, why: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{int(self._clock() * 1000)}")
        try:
            os.replace(path, aside)
        except OSError as error:
            log.error("update_store_corrupt_file_kept", path=str(path), why=why, error=str(error))
            return
        log.warning("update_store_corrupt_file_moved", path=str(path), moved_to=str(aside), why=why)

    def _write_json(self, path: Path, document: dict[str, Any]) -> None:
        write_json_atomic(path, document)

    def _remove_temp_files(self) -> None:
        for name in (self.path.name, self.ran_path.name):
            for temp in self.path.parent.glob(f".{name}.tmp-*"):
                with contextlib.suppress(OSError):
                    temp.unlink()
                    log.info("update_store_temp_file_removed", path=str(temp))


def write_json_atomic(path: Path, document: Any) -> None:
    """Write ``document`` as JSON so that ``path`` is the old file or the new one after any crash or power cut:
    temp file, fsync, rename, fsync of the directory. Leftover ``.<name>.tmp-*`` files are harmless."""
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; an empty dict when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); platforms that cannot open directories skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
