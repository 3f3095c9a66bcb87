"""Every attack and bad artifact of the update issue against one running agent: each is refused with its reason
and the old model keeps serving (results and retained status both say 1.0.0). Real Mosquitto, real fleet
repository and server, a real agent process; attacks are made by serving altered files through the fleet server
(like python-tuf's repository simulator) or by signing with the wrong keys."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Timestamp

from agent.protocol.update import canonical_bytes
from tests.mosquitto import Broker, Subscriber, find_mosquitto
from tests.onnx_models import digits_shaped
from tests.update_helpers import (
    Fleet,
    agent_config,
    build_bundle,
    start,
    states,
    stop,
    versions_served,
    wait_until,
)


class Running:
    """One agent on 1.0.0 with a fleet and a recording subscriber, shared by the tests of this module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = Broker(tmp / "broker", binary=find_mosquitto()).start()
        self.fleet = Fleet(tmp, self.broker)
        self.sub = Subscriber(self.broker, "edge/#")
        config = agent_config(tmp, self.broker, self.fleet, request_timeout_s=1.0, max_retries=2)
        self.results = tmp / "results-dev1.jsonl"
        self.proc = start(config, tmp)
        assert wait_until(lambda: "1.0.0" in versions_served(self.results), 30), self.log()

    def log(self) -> str:
        return (self.proc.output_dir / "stderr.txt").read_text()[-4000:]

    def outcome(self, envelope_or_target: Any, timeout: float = 40.0, **fields: Any) -> dict[str, Any]:
        """Deploy (a target path or a ready envelope), wait for the terminal state; return it."""
        since = len(states(self.sub))
        if isinstance(envelope_or_target, str):
            self.fleet.deploy("dev1", envelope_or_target, **fields)
        else:
            self.fleet.send("dev1", envelope_or_target)
        terminal = {"rejected", "failed", "rolled_back", "committed"}
        found: list[dict[str, Any]] = []

        def done() -> bool:
            found[:] = [s for s in states(self.sub)[since:] if s["state"] in terminal]
            return bool(found)

        assert wait_until(done, timeout), f"no terminal state; states: {states(self.sub)[since:]}\n{self.log()}"
        return found[0]

    def assert_old_model_serving(self) -> None:
        assert self.proc.poll() is None, self.log()
        start_line = len(self.results.read_text().splitlines())
        assert wait_until(lambda: len(versions_served(self.results, start_line)) >= 5, 10)
        assert set(versions_served(self.results, start_line)) == {"1.0.0"}
        status = [json.loads(m.payload) for m in self.sub.messages("edge/dev1/status")][-1]
        assert status["models"]["digits"]["version"] == "1.0.0"

    def close(self) -> None:
        stop(self.proc)
        self.sub.close()
        self.fleet.close()
        self.broker.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(tmp_path_factory.mktemp("attacks"))
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _clean_overrides(running: Running) -> Iterator[None]:
    yield
    running.fleet.overrides.clear()


def _timestamp(fleet: Fleet, *, expires: dt.datetime | None = None, version_bump: int = 1, signer: Any = None) -> bytes:
    """A timestamp.json re-signed by the fleet's timestamp key (or ``signer``) with changed fields."""
    md = Metadata[Timestamp].from_bytes(fleet.repo.read_metadata("timestamp.json"))
    md.signed.version += version_bump
    if expires is not None:
        md.signed.expires = expires
    md.signatures.clear()
    md.sign(signer or fleet.keys.signers("timestamp")[0])
    return md.to_bytes()


def _bundle(running: Running, version: str, **kw: Any) -> str:
    return running.fleet.publish(build_bundle(running.tmp, version, **kw), version)


# ---- trust: metadata ------------------------------------------------------------------------------------


def test_expired_metadata_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.0.1")
    running.fleet.overrides["timestamp.json"] = _timestamp(
        running.fleet, expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    )
    result = running.outcome(target)
    assert result["state"] == "rejected" and "ExpiredMetadataError" in result["reason"]
    running.assert_old_model_serving()


def test_timestamp_signed_by_an_unknown_key_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.0.2")
    running.fleet.overrides["timestamp.json"] = _timestamp(running.fleet, signer=CryptoSigner.generate_ed25519())
    result = running.outcome(target)
    assert result["state"] == "rejected" and "UnsignedMetadataError" in result["reason"]
    running.assert_old_model_serving()


def test_malformed_metadata_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.0.3")
    running.fleet.overrides["timestamp.json"] = b'{"signed": {"_type": "timestamp", "version": "x"'
    result = running.outcome(target)
    assert result["state"] == "rejected" and "untrusted repository metadata" in result["reason"]
    running.assert_old_model_serving()


def test_replayed_older_metadata_is_rejected(running: Running) -> None:
    old_timestamp = running.fleet.repo.read_metadata("timestamp.json")
    target = _bundle(running, "2.0.4")  # a newer timestamp is published ...
    first = running.outcome(running.fleet.command("dev1", "nonexistent/target.tar.gz"))  # ... and seen by the device
    assert first["state"] == "rejected" and "not in the signed repository" in first["reason"]
    running.fleet.overrides["timestamp.json"] = old_timestamp  # then an attacker replays the old one
    result = running.outcome(target)
    assert result["state"] == "rejected" and "BadVersionNumberError" in result["reason"]
    running.assert_old_model_serving()


def test_snapshot_that_does_not_match_the_timestamp_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.0.5")
    snapshot_name = f"{running.fleet.repo.snapshot().signed.version}.snapshot.json"
    tampered = running.fleet.repo.read_metadata(snapshot_name).replace(b'"version"', b'"version" ', 1)
    running.fleet.overrides[snapshot_name] = tampered
    result = running.outcome(target)
    assert result["state"] == "rejected" and "untrusted repository metadata" in result["reason"]
    running.assert_old_model_serving()


# ---- trust: deployment commands -----------------------------------------------------------------------------


def test_command_with_a_bad_signature_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.1.0")
    envelope = running.fleet.command("dev1", target)
    sig = envelope["signatures"][0]["sig"]
    envelope["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    result = running.outcome(envelope)
    assert result["state"] == "rejected" and "0 valid signatures" in result["reason"]
    running.assert_old_model_serving()


def test_command_altered_after_signing_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.1.1")
    envelope = running.fleet.command("dev1", target)
    envelope["signed"]["rollback"] = True
    result = running.outcome(envelope)
    assert result["state"] == "rejected" and "valid signature" in result["reason"]
    running.assert_old_model_serving()


def test_command_signed_by_an_unknown_key_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.1.2")
    envelope = running.fleet.command("dev1", target)
    rogue = CryptoSigner.generate_ed25519()
    sig = rogue.sign(canonical_bytes(envelope["signed"]))
    envelope["signatures"] = [{"keyid": sig.keyid, "sig": sig.signature}]
    result = running.outcome(envelope)
    assert result["state"] == "rejected" and "0 valid signatures" in result["reason"]
    running.assert_old_model_serving()


def test_replayed_command_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.1.3")
    old = running.fleet.command("dev1", target)
    running.outcome(running.fleet.command("dev1", "nonexistent/target.tar.gz"))  # a newer command is accepted
    result = running.outcome(old)
    assert result["state"] == "rejected" and "is not newer than" in result["reason"]
    running.assert_old_model_serving()


def test_expired_command_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.1.4")
    now = running.fleet.seq  # any past time works: issued and expires an hour ago
    import time

    result = running.outcome(target, issued=time.time() - 7200, expires=time.time() - 3600)
    assert now and result["state"] == "rejected" and "expired" in result["reason"]
    running.assert_old_model_serving()


def test_command_for_another_device_is_rejected(running: Running) -> None:
    target = _bundle(running, "2.1.5")
    envelope = running.fleet.command("dev2", target)
    result = running.outcome(envelope)
    assert result["state"] == "rejected" and "addressed to device 'dev2'" in result["reason"]
    running.assert_old_model_serving()


def test_fewer_command_signatures_than_the_threshold_are_rejected(running: Running) -> None:
    """Command keys rotated (new root version) to 2-of-2: one valid signature no longer suffices."""
    second = running.fleet.keys.generate("command")
    running.fleet.repo.rotate("command", add=[second.public_key], threshold=2)
    try:
        target = _bundle(running, "2.1.6")
        envelope = running.fleet.command("dev1", target)
        assert len(envelope["signatures"]) == 2
        envelope["signatures"] = envelope["signatures"][:1]
        result = running.outcome(envelope)
        assert (
            result["state"] == "rejected"
            and "1 valid signature" in result["reason"]
            and "2 required" in result["reason"]
        )
        running.assert_old_model_serving()
    finally:
        running.fleet.repo.rotate("command", remove=[second.public_key.keyid], threshold=1)


def test_garbage_deployment_payload_is_rejected_and_the_agent_lives(running: Running) -> None:
    for payload in (b"\xff\xfe", b"[]", b'{"signed": 1}', b"{" * 5000):
        running.fleet.send("dev1", payload)
    result = running.outcome(b'{"signed": {}, "signatures": []}')
    assert result["state"] == "rejected"
    running.assert_old_model_serving()


# ---- offer policy -------------------------------------------------------------------------------------------


def test_downgrade_is_rejected(running: Running) -> None:
    target = _bundle(running, "0.9.0")
    result = running.outcome(target)
    assert result["state"] == "rejected" and "downgrade from 1.0.0 to 0.9.0 refused" in result["reason"]
    running.assert_old_model_serving()


def test_signed_rollback_to_a_version_never_run_is_rejected(running: Running) -> None:
    target = _bundle(running, "0.8.0")
    result = running.outcome(target, rollback=True)
    assert result["state"] == "rejected" and "never ran on this device" in result["reason"]
    running.assert_old_model_serving()


def test_wrong_hardware_id_is_rejected(running: Running) -> None:
    bundle = build_bundle(running.tmp, "2.2.0")
    target = running.fleet.publish(bundle, "2.2.0", hardware=["jetson-orin-nano"])
    result = running.outcome(target)
    assert result["state"] == "rejected" and "hardware x86_64 not in [jetson-orin-nano]" in result["reason"]
    running.assert_old_model_serving()


# ---- transfer -----------------------------------------------------------------------------------------------


def test_tampered_bytes_fail_the_hash_check(running: Running) -> None:
    target = _bundle(running, "2.3.0")
    sha = running.fleet.repo.targets_metadata().signed.targets[target].hashes["sha256"]
    path = running.fleet.repo.find_by_sha256(sha)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    result = running.outcome(target)
    assert result["state"] == "failed" and "sha256 mismatch" in result["reason"]
    running.assert_old_model_serving()


def test_target_larger_than_declared_is_never_accepted(running: Running) -> None:
    """Endless data: the server has more bytes than the signed length; the device takes none beyond it."""
    target = _bundle(running, "2.3.1")
    sha = running.fleet.repo.targets_metadata().signed.targets[target].hashes["sha256"]
    path = running.fleet.repo.find_by_sha256(sha)
    os.chmod(path, 0o644)
    with open(path, "ab") as fh:
        fh.write(os.urandom(300_000))
    result = running.outcome(target)
    assert result["state"] == "failed" and "download failed" in result["reason"]
    download = running.tmp / "state-dev1" / "models" / "digits" / "downloads" / f"{sha}.part"
    assert (
        not download.exists()
        or download.stat().st_size <= running.fleet.repo.targets_metadata().signed.targets[target].length
    )
    running.assert_old_model_serving()


# ---- validation ---------------------------------------------------------------------------------------------


def _onnx_digits(mode: str) -> Any:
    def edit(meta: dict[str, Any], work: Path) -> None:
        (work / meta["model"]).unlink()
        (work / "golden.npz").unlink()
        meta.pop("golden", None)
        meta["model"] = f"digits_{mode}.onnx"
        digits_shaped(work / meta["model"], mode)

    return edit


def test_model_that_fails_to_load_is_refused(running: Running) -> None:
    def truncate(meta: dict[str, Any], work: Path) -> None:
        model = work / meta["model"]
        model.write_bytes(model.read_bytes()[:2000])

    result = running.outcome(_bundle(running, "2.4.0", edit=truncate))
    assert result["state"] == "failed" and "validation failed" in result["reason"]
    running.assert_old_model_serving()


def test_wrong_input_shape_is_refused(running: Running) -> None:
    base = Path(__file__).resolve().parents[1] / "agent" / "samples" / "sensor-anomaly"

    def rename(meta: dict[str, Any], work: Path) -> None:
        meta["name"] = "digits-classifier-tflite"

    result = running.outcome(_bundle(running, "2.4.1", base=base, edit=rename))
    assert result["state"] == "failed" and "validation failed" in result["reason"]
    running.assert_old_model_serving()


def test_golden_vector_mismatch_is_refused(running: Running) -> None:
    def break_tolerance(meta: dict[str, Any], work: Path) -> None:
        import numpy as np

        golden = dict(np.load(work / "golden.npz"))
        for key in golden:
            if key.startswith("output"):
                golden[key] = golden[key][..., ::-1].copy()
        np.savez(work / "golden.npz", **golden)

    result = running.outcome(_bundle(running, "2.4.2", edit=break_tolerance))
    assert result["state"] == "failed" and "golden" in result["reason"]
    running.assert_old_model_serving()


def test_non_finite_outputs_are_refused(running: Running) -> None:
    result = running.outcome(_bundle(running, "2.4.3", edit=_onnx_digits("nan")))
    assert result["state"] == "failed" and "non-finite" in result["reason"]
    running.assert_old_model_serving()


def test_model_too_slow_for_the_budget_is_refused(running: Running) -> None:
    def tight_budget(meta: dict[str, Any], work: Path) -> None:
        meta["budget"] = {"latency_ms": 0.001}

    result = running.outcome(_bundle(running, "2.4.4", edit=tight_budget))
    assert result["state"] == "failed" and "budget" in result["reason"]
    running.assert_old_model_serving()


def test_bundle_that_is_not_the_signed_name_is_refused(running: Running) -> None:
    def other_name(meta: dict[str, Any], work: Path) -> None:
        meta["name"] = "something-else"

    result = running.outcome(_bundle(running, "2.4.5", edit=other_name))
    assert result["state"] == "failed" and "something-else" in result["reason"]
    running.assert_old_model_serving()


def test_states_are_reported_in_order_for_a_refused_update(running: Running) -> None:
    since = len(states(running.sub))
    running.outcome(_bundle(running, "2.4.6", edit=_onnx_digits("nan")))
    names = [s["state"] for s in states(running.sub)[since:]]
    collapsed = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert collapsed == ["offered", "downloading", "downloaded", "validating", "failed"]
