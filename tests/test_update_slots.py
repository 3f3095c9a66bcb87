"""A/B slot store: install, stage, activate, rollback, recover, downloads, and real kill -9 atomicity."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.errors import AgentError, BundleError
from agent.predictor import Predictor
from agent.update.slots import SlotStore, ensure_free_space
from tests import onnx_models

REPO = Path(__file__).resolve().parents[1]

BUNDLE_TOML = """
name = "clf"
version = "{version}"
task = "classification"
model = "model.onnx"
labels = ["a", "b", "c", "d"]
[input]
kind = "image"
"""


def make_bundle(root: Path, version: str, size: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    onnx_models.float_image_classifier(root / "model.onnx", size=size)
    (root / "bundle.toml").write_text(BUNDLE_TOML.format(version=version))
    (root / "notes" / "deep").mkdir(parents=True, exist_ok=True)
    (root / "notes" / "deep" / "readme.txt").write_text(f"version {version}\n")
    return root


def make_archive(bundle_dir: Path, archive: Path, wrapped: bool = True) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(bundle_dir, arcname=bundle_dir.name if wrapped else ".")
    return archive


@pytest.fixture
def bundles(tmp_path: Path) -> tuple[Path, Path]:
    v1 = make_bundle(tmp_path / "src" / "clf-1.0.0", "1.0.0")
    v2 = make_archive(make_bundle(tmp_path / "src" / "clf-2.0.0", "2.0.0", size=16), tmp_path / "src" / "clf-2.tgz")
    return v1, v2


def version_of(path: Path | None) -> str:
    assert path is not None
    return load_bundle(path).version


def leftovers(store: SlotStore) -> list[str]:
    found = [p.name for p in store.dir.glob("*.aside")]
    if (store.dir / "active.tmp").is_symlink():
        found.append("active.tmp")
    if store.staging.is_dir():
        found += [f"staging/{p.name}" for p in store.staging.iterdir()]
    return found


def test_install_stage_activate_rollback(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    store = SlotStore(tmp_path / "state", "cam-1")
    assert (store.active_path(), store.active_slot(), store.previous_path()) == (None, None, None)
    assert store.inactive_slot() == "a"

    path = store.install_initial(v1)
    assert path == store.dir / "slot-a" == store.active_path()
    assert os.readlink(store.dir / "active") == "slot-a"  # relative link
    assert (store.active_slot(), store.inactive_slot(), version_of(store.active_path())) == ("a", "b", "1.0.0")
    assert store.previous_path() is None
    assert (path / "notes" / "deep" / "readme.txt").read_text() == "version 1.0.0\n"
    with pytest.raises(AgentError, match="already has an active model"):
        store.install_initial(v1)

    staged = store.stage(v2)  # archive with a wrapping folder
    assert staged == store.dir / "slot-b"
    assert store.active_slot() == "a" and version_of(staged) == "2.0.0"  # staging never touches the active slot
    assert store.previous_path() == staged  # the staged slot is complete, so it is the "other" slot now
    store.activate("b")
    assert (store.active_slot(), version_of(store.active_path())) == ("b", "2.0.0")
    assert store.previous_path() == store.dir / "slot-a"

    assert store.rollback() == store.dir / "slot-a"
    assert (store.active_slot(), version_of(store.active_path())) == ("a", "1.0.0")

    # a new update replaces the inactive slot (b), the active one (a) stays as it is
    v3 = make_bundle(tmp_path / "src" / "clf-3.0.0", "3.0.0")
    assert store.stage(v3) == store.dir / "slot-b"
    assert version_of(store.dir / "slot-a") == "1.0.0" and version_of(store.dir / "slot-b") == "3.0.0"
    store.activate("b")
    predictor = Predictor.open(store.active_path())
    try:
        assert predictor.predict_image(np.zeros((8, 8, 3), np.uint8)).result
    finally:
        predictor.close()
    assert leftovers(store) == []


def test_stage_refuses_broken_bundle_and_keeps_slots(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    store = SlotStore(tmp_path / "state", "p")
    store.install_initial(v1)
    store.stage(v2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.toml").write_text(BUNDLE_TOML.format(version="9.0.0"))  # model file missing
    with pytest.raises(BundleError, match="missing"):
        store.stage(broken)
    assert version_of(store.dir / "slot-b") == "2.0.0"  # old inactive content kept on failure
    assert leftovers(store) == []
    assert store.active_slot() == "a" and version_of(store.active_path()) == "1.0.0"


def test_activate_refuses_incomplete_slot(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, _ = bundles
    store = SlotStore(tmp_path / "state", "p")
    store.install_initial(v1)
    (store.dir / "slot-b").mkdir()
    with pytest.raises(BundleError, match="does not hold a complete bundle"):
        store.activate("b")
    assert store.active_slot() == "a" and store.previous_path() is None
    with pytest.raises(AgentError, match="no previous model"):
        store.rollback()


def test_stage_download_part_file(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    store = SlotStore(tmp_path / "state", "p")
    store.install_initial(v1)
    data = v2.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    part = store.download_path(sha)
    assert part == store.dir / "downloads" / f"{sha}.part" and store.partial_size(sha) == 0
    with part.open("ab") as fh:
        fh.write(data[:100])
    assert store.partial_size(sha) == 100
    assert not store.verify_download(sha, len(data))  # incomplete
    with part.open("ab") as fh:  # resume at the offset
        fh.write(data[store.partial_size(sha) :])
    assert store.verify_download(sha, len(data))
    assert not store.verify_download(sha, len(data) + 1)  # wrong length
    assert not store.verify_download("0" * 64, len(data))  # nothing downloaded under that hash
    wrong = store.download_path("f" * 64)
    wrong.write_bytes(data)
    assert not store.verify_download("f" * 64, len(data))  # right length, wrong hash
    assert version_of(store.stage(part)) == "2.0.0"  # .part named archive is recognised by content
    for bad in ("abc", "A" * 64, "../" + "a" * 61):
        with pytest.raises(AgentError, match="SHA-256"):
            store.download_path(bad)
    store.discard_download("f" * 64)
    assert not wrong.exists()


def test_recover_cleans_leftovers(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    store = SlotStore(tmp_path / "state", "p")
    store.install_initial(v1)
    store.stage(v2)
    store.activate("b")
    sha = "1" * 64
    store.download_path(sha).write_bytes(b"partial")
    os.symlink("slot-a", store.dir / "active.tmp")
    (store.staging / "stage-xyz" / "bundle").mkdir(parents=True)
    (store.staging / "stage-xyz" / "bundle" / "model.onnx").write_bytes(b"half")
    (store.dir / "slot-a.1234abcd.aside" / "sub").mkdir(parents=True)

    report = store.recover()
    assert sorted(report["removed"]) == ["active.tmp", "slot-a.1234abcd.aside", "staging/stage-xyz"]
    assert report["active"] == "b" and report["active_ok"] and not report["switched"]
    assert leftovers(store) == []
    assert store.partial_size(sha) == 7  # downloads are kept
    assert version_of(store.active_path()) == "2.0.0" and version_of(store.previous_path()) == "1.0.0"
    assert store.recover()["removed"] == []


def test_recover_switches_away_from_broken_active(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    store = SlotStore(tmp_path / "state", "p")
    store.install_initial(v1)
    store.stage(v2)
    store.activate("b")
    (store.dir / "slot-b" / "model.onnx").unlink()  # "should never happen"
    report = store.recover()
    assert report["switched"] and report["active"] == "a" and report["active_ok"]
    assert version_of(store.active_path()) == "1.0.0"


def test_recover_on_empty_store(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "state", "p")
    assert store.recover() == {"removed": [], "active": None, "switched": False, "active_ok": False}
    assert store.active_path() is None


def test_single_writer_lock(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, _ = bundles
    first = SlotStore(tmp_path / "state", "p")
    second = SlotStore(tmp_path / "state", "p")
    with first._locked(), pytest.raises(AgentError, match="another process"):
        second.install_initial(v1)
    second.install_initial(v1)  # the lock is released


def test_ensure_free_space(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "state", "p")
    assert store.ensure_free_space(1, margin=0) > 0  # the store directory does not exist yet: parent used
    with pytest.raises(AgentError) as info:
        store.ensure_free_space(10**18)
    message = str(info.value)
    assert "not enough disk space" in message and str(10**18) in message and "free" in message
    assert "fix:" in message and "\n" not in message
    with pytest.raises(AgentError, match="not enough disk space"):
        ensure_free_space(tmp_path, 10**18, margin=0)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".", "..", "x y", "name\n", "ünïcode", "/abs"])
def test_pipeline_name_traversal_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(AgentError, match="pipeline name"):
        SlotStore(tmp_path, name)
    assert not (tmp_path / "models").exists()


CHILD = """
import os, sys
from pathlib import Path
from agent.update.slots import SlotStore
store = SlotStore(Path(sys.argv[1]), "p")
sources = [Path(sys.argv[2]), Path(sys.argv[3])]
progress = os.open(sys.argv[4], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
print("ready", flush=True)
i = 0
while True:
    store.stage(sources[i % 2])
    store.activate(store.inactive_slot())
    os.write(progress, b".")
    i += 1
"""


def test_kill_9_at_any_instant_leaves_a_working_model(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    state = tmp_path / "state"
    progress = tmp_path / "progress"
    SlotStore(state, "p").install_initial(v1)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(1234)
    seen: set[str] = set()
    rounds = 15
    for _ in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(v1), str(v2), str(progress)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line == b"ready\n", child.stderr.read().decode() if child.stderr else ""
            time.sleep(rng.uniform(0.02, 0.3))
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
        assert child.returncode == -signal.SIGKILL

        store = SlotStore(state, "p")
        report = store.recover()
        assert report["active_ok"] and not report["switched"], report
        assert leftovers(store) == []
        bundle = load_bundle(store.active_path())
        assert bundle.version in {"1.0.0", "2.0.0"}
        seen.add(bundle.version)
        predictor = Predictor.open(store.active_path())  # the model loads and runs
        try:
            size = 8 if bundle.version == "1.0.0" else 16
            assert predictor.predict_image(np.zeros((size, size, 3), np.uint8)).result
        finally:
            predictor.close()
        previous = store.previous_path()
        if previous is not None:
            assert load_bundle(previous).version in {"1.0.0", "2.0.0"}
    assert progress.stat().st_size >= rounds  # the child really looped between kills
    assert seen == {"1.0.0", "2.0.0"}
