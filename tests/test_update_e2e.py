"""Signed model updates end to end: real Mosquitto, real fleet repository and server, real agent processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_helpers import wait_until
from tests.update_helpers import (
    Fleet,
    agent_config,
    build_bundle,
    chain,
    start,
    stop,
    wait_serving,
    wait_state,
)
from tests.update_helpers import states as states_of

HAPPY_CHAIN = ["offered", "downloading", "downloaded", "validating", "activating", "trial", "committed"]


@pytest.fixture
def fleet(tmp_path: Path, broker: Any) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker)
    yield f
    f.close()


@pytest.mark.parametrize("inference", ["thread", "process"])
def test_update_is_downloaded_validated_hot_swapped_and_committed(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any, inference: str
) -> None:
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet, pipeline={"inference": inference})
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path)
    try:
        wait_serving(results, "1.0.0")
        target = fleet.publish(build_bundle(tmp_path, "1.1.0", pad_bytes=300_000), "1.1.0")
        fleet.deploy("dev1", target)
        wait_state(sub, "committed", timeout=60)
        assert chain(sub) == HAPPY_CHAIN
        wait_serving(results, "1.1.0")
        assert proc.poll() is None  # hot swap: same process
        status = [json.loads(m.payload) for m in sub.messages("edge/dev1/status")][-1]
        assert status["models"]["digits"]["version"] == "1.1.0"
        assert _inference_place(sub, "1.1.0") == inference  # the new model runs where the old one did
        seqs = [json.loads(line)["seq"] for line in results.read_text().splitlines()]
        assert seqs == list(range(1, len(seqs) + 1))  # the pipeline kept numbering: never restarted
        latest = mqtt_client(broker, "edge/dev1/update/state/+")  # retained: what a server that missed it reads
        assert json.loads(latest.wait_for(lambda m: True)[0].payload)["state"] == "committed"
    finally:
        stop(proc)
    print((proc.output_dir / "stderr.txt").read_text()[-3000:])


def _inference_place(sub: Any, version: str) -> str:
    """Where the pipeline's model runs, from the first telemetry of the agent serving ``version``."""

    def serving() -> list[dict[str, Any]]:
        reports = (json.loads(m.payload)["pipelines"]["digits"] for m in sub.messages("edge/dev1/telemetry"))
        return [p for p in reports if p["model"]["version"] == version]

    assert wait_until(lambda: bool(serving()), timeout=20)
    return serving()[0]["inference"]


def _labels_reversed(meta: dict[str, Any], work: Path) -> None:
    meta["labels"] = list(reversed(meta["labels"]))


def test_shadow_mode_activates_on_agreement_and_rejects_on_disagreement(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    try:
        wait_serving(results, "1.0.0")
        bad = fleet.publish(build_bundle(tmp_path, "1.1.0", edit=_labels_reversed), "1.1.0")
        fleet.deploy("dev1", bad, shadow_frames=20, shadow_agreement=0.9)
        rejected = wait_state(sub, "rejected")
        assert "shadow agreement" in rejected["reason"] and rejected["agreement"] < 0.5
        assert chain(sub) == ["offered", "downloading", "downloaded", "validating", "shadow", "rejected"]
        wait_serving(results, "1.0.0")
        since = len(chain(sub))
        good = fleet.publish(build_bundle(tmp_path, "1.2.0"), "1.2.0")
        fleet.deploy("dev1", good, shadow_frames=20, shadow_agreement=0.9)
        committed = wait_state(sub, "committed")
        assert committed["version"] == "1.2.0"
        assert chain(sub)[since:] == [
            "offered",
            "downloading",
            "downloaded",
            "validating",
            "shadow",
            "activating",
            "trial",
            "committed",
        ]
        shadow = [
            s
            for s in (json.loads(m.payload) for m in sub.messages("edge/dev1/update/status"))
            if s["state"] == "shadow"
        ]
        assert shadow[-1]["agreement"] == 1.0 or committed.get("agreement") == 1.0
        wait_serving(results, "1.2.0")
    finally:
        stop(proc)


@pytest.mark.parametrize("inference", ["thread", "process"])
def test_unhealthy_model_is_rolled_back_automatically(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any, inference: str
) -> None:
    """Passes validation (no latency budget) but runs 40x slower than the model it replaced: the health window
    rolls it back by itself, hot, to the previous slot (with inference in a process too: two hot swaps, each
    starting the next model's worker)."""
    from tests.test_update_attacks import _onnx_digits

    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet, pipeline={"inference": inference}), tmp_path)
    try:
        wait_serving(results, "1.0.0")

        def slow_no_budget(meta: dict[str, Any], work: Path) -> None:
            _onnx_digits("slow")(meta, work)
            meta.pop("budget", None)

        target = fleet.publish(build_bundle(tmp_path, "1.1.0", edit=slow_no_budget), "1.1.0")
        fleet.deploy("dev1", target)
        rolled = wait_state(sub, "rolled_back")
        assert "unhealthy in trial" in rolled["reason"] and "latency" in rolled["reason"]
        assert chain(sub) == [
            "offered",
            "downloading",
            "downloaded",
            "validating",
            "activating",
            "trial",
            "rolled_back",
        ]
        wait_serving(results, "1.0.0")
        assert proc.poll() is None
        status = [json.loads(m.payload) for m in sub.messages("edge/dev1/status")][-1]
        assert status["models"]["digits"]["version"] == "1.0.0"
    finally:
        stop(proc)


def test_explicit_signed_rollback_to_a_version_that_ran_before(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0"))
        wait_state(sub, "committed")
        wait_serving(results, "1.1.0")
        since = (
            len(json.loads(m.payload) for m in sub.messages("edge/dev1/update/status"))
            if False
            else len(sub.messages("edge/dev1/update/status"))
        )
        old = fleet.publish(build_bundle(tmp_path, "1.0.0"), "1.0.0", name="digits-classifier-tflite")
        fleet.deploy("dev1", old)  # a plain downgrade is refused ...
        assert "downgrade" in wait_state(sub, "rejected", since=since)["reason"]
        fleet.deploy("dev1", old, rollback=True)  # ... a signed rollback to a version it ran is not
        assert wait_state(sub, "committed", since=since)["version"] == "1.0.0"
        wait_serving(results, "1.0.0")
    finally:
        stop(proc)


def _config(tmp_path: Path, update: str, mqtt: bool = True) -> Path:
    from tests.update_helpers import SAMPLES

    text = (
        f"""device_id = "d1"
state_dir = "{tmp_path / "state"}"
[sources.s]
type = "replay"
path = "{SAMPLES / "inputs" / "digit_*.png"}"
[pipelines.p]
source = "s"
model = "sample:digits-classifier-tflite"
"""
        + ('[mqtt]\nbroker = "mqtt://127.0.0.1:9"\n' if mqtt else "")
        + update
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_update_settings_errors_are_one_line(tmp_path: Path) -> None:
    from tests.conftest import assert_one_line_error, run_cli

    no_mqtt = _config(tmp_path, "[update]\nenabled = true\n", mqtt=False)
    assert_one_line_error(run_cli("check", "--config", no_mqtt), "[update] is enabled but there is no [mqtt] table")
    typo = _config(tmp_path, "[update]\nenabled = true\ntrust_rot = 'x'\n")
    assert_one_line_error(run_cli("check", "--config", typo), "unknown key 'update.trust_rot'")
    floor = _config(tmp_path, "[update]\nenabled = true\nhealth_latency_floor_ms = -1\n")
    assert_one_line_error(run_cli("check", "--config", floor), "key 'update.health_latency_floor_ms'")
    health_typo = _config(tmp_path, "[pipelines.p.health]\nwindow = 8\n")
    assert_one_line_error(run_cli("check", "--config", health_typo), "unknown key 'pipelines.p.health.window'")
    factor = _config(tmp_path, "[pipelines.p.health]\nlatency_factor = 0\n")
    assert_one_line_error(run_cli("check", "--config", factor), "key 'pipelines.p.health.latency_factor'")
    missing = _config(tmp_path, "[update]\nenabled = true\ntrust_root = 'nowhere/root.json'\n")
    proc = run_cli("run", "--config", missing, "--duration", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edge-agent: error: trust root ")
    assert "does not exist (fix: fix [update].trust_root)" in proc.stderr
    not_root = tmp_path / "root.json"
    not_root.write_text('{"signed": {"_type": "targets"}}')
    wrong = _config(tmp_path, f"[update]\nenabled = true\ntrust_root = '{not_root}'\n")
    check = run_cli("check", "--config", wrong)
    assert check.returncode != 0 and "is not TUF root metadata" in check.stdout


def test_check_reports_the_trust_root_and_slots(tmp_path: Path, broker: Any, fleet: Fleet) -> None:
    from tests.conftest import run_cli

    config = _config(tmp_path, f"[update]\nenabled = true\ntrust_root = '{fleet.trust_root}'\n")
    proc = run_cli("check", "--config", config)
    assert "update trust root" in proc.stdout and "root v1" in proc.stdout and "1 command key(s)" in proc.stdout
    assert "update slots p: no slot yet" in proc.stdout


def test_not_enough_disk_space_fails_cleanly(tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any) -> None:
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet, free_space_margin_mb=10**9), tmp_path)
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0"))
        failed = wait_state(sub, "failed")
        assert "free" in failed["reason"] and "(fix: " in failed["reason"]
        assert chain(sub) == ["offered", "downloading", "failed"]
        wait_serving(results, "1.0.0")
    finally:
        stop(proc)


def test_many_devices_taking_one_target_share_the_chunks(tmp_path: Path, broker: Any, mqtt_client: Any) -> None:
    """Three agents download the same 3 MB target at once: the fleet publishes about one copy, not three."""
    fleet = Fleet(tmp_path, broker, rate_limit_bps=2_000_000)
    sub = mqtt_client(broker, "edge/#")
    procs = {}
    try:
        for device in ("dev1", "dev2", "dev3"):
            procs[device] = start(agent_config(tmp_path, broker, fleet, device=device), tmp_path, name=device)
        for device in procs:
            wait_serving(tmp_path / f"results-{device}.jsonl", "1.0.0")
        bundle = build_bundle(tmp_path, "1.1.0", pad_bytes=3_000_000)
        target = fleet.publish(bundle, "1.1.0")
        for device in procs:
            fleet.deploy(device, target)
        for device in procs:
            wait_state(sub, "committed", device=device, timeout=90)
        chunks = -(-bundle.stat().st_size // (96 * 1024))
        published = fleet.server.stats["chunks_published"]
        print(
            f"{chunks} chunks, {published} published for 3 devices ({fleet.server.stats['chunks_merged']} requests merged)"
        )
        assert published < 2 * chunks  # three separate downloads would be 3 x chunks
    finally:
        for proc in procs.values():
            stop(proc)
        fleet.close()


def _cpu_hogs(n: int = 2) -> list[subprocess.Popen[bytes]]:
    """Busy-loop processes beside the agent: a board whose CPUs are taken by something else."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait(10)


def test_identical_model_is_committed_while_the_cpu_is_busy(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    """The old model's p95 was measured on an idle CPU; the new one (the same model) runs its health window beside
    two busy-loop processes. Being as fast as the old one, it must be committed, whether the latency floor
    (default) or the paired re-timing of both models under the same load (floor 0: the bare factor trips on noise)
    decides."""
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path)
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        wait_serving(results, "1.0.0")
        hogs = _cpu_hogs(2)
        floor_0 = {"health_latency_floor_ms": 0.0}
        for version, fields in (("1.1.0", {}), ("1.2.0", floor_0), ("1.3.0", {}), ("1.4.0", floor_0)):
            since = len(chain(sub))
            fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, version), version), **fields)
            done = wait_state(sub, "committed", timeout=120, since=len(states_of(sub)))
            assert done["version"] == version, [(s["state"], s.get("reason")) for s in states_of(sub)]
            assert chain(sub)[since:] == HAPPY_CHAIN
        wait_serving(results, "1.4.0", timeout=60)
        assert proc.poll() is None
    finally:
        _stop_hogs(hogs)
        stop(proc)


def test_window_too_short_for_the_result_rate_is_refused_with_the_arithmetic(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    """30 results/s, the pipeline's [pipelines.digits.health] asks for 50 results in 1 s: refused at the offer,
    before any download; a deployment's own window (over the pipeline's) that fits is accepted and committed."""
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    config = agent_config(tmp_path, broker, fleet, pipeline={"health": {"window_s": 1.0, "min_results": 50}})
    proc = start(config, tmp_path)
    try:
        wait_serving(results, "1.0.0")
        target = fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0")
        fleet.deploy("dev1", target)
        rejected = wait_state(sub, "rejected")
        assert rejected["reason"].startswith("health window 1 s x "), rejected["reason"]
        assert "fewer than the 50 needed (fix: a health window of at least " in rejected["reason"]
        assert "or health_min_results <= " in rejected["reason"]
        assert chain(sub) == ["offered", "rejected"]
        since = len(chain(sub))
        fleet.deploy("dev1", target, health_window_s=6.0)
        assert wait_state(sub, "committed", since=len(states_of(sub)))["version"] == "1.1.0"
        assert chain(sub)[since:] == HAPPY_CHAIN
        wait_serving(results, "1.1.0")
    finally:
        stop(proc)


def test_paired_retiming_keeps_a_model_as_fast_as_the_old_one(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    """The previous model's p95 is made to look 1 us (``EDGE_AGENT_FAULT_BASELINE_MS``: as if measured on an idle
    CPU) and the floor is 0, so the latency rule trips on an identical model run beside two CPU hogs: the agent
    times both models side by side on the same input, finds them equal, and commits."""
    sub = mqtt_client(broker, "edge/#")
    results = tmp_path / "results-dev1.jsonl"
    proc = start(agent_config(tmp_path, broker, fleet), tmp_path, env={"EDGE_AGENT_FAULT_BASELINE_MS": "0.001"})
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        wait_serving(results, "1.0.0")
        hogs = _cpu_hogs(2)
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0"), health_latency_floor_ms=0.0)
        done = wait_state(sub, "committed", timeout=120)
        assert done["version"] == "1.1.0" and chain(sub) == HAPPY_CHAIN
        wait_serving(results, "1.1.0", timeout=60)
    finally:
        _stop_hogs(hogs)
        stop(proc)
    retimed = [
        json.loads(line)
        for line in (proc.output_dir / "stderr.txt").read_text().splitlines()
        if "health window latency re-timed" in line
    ]
    assert len(retimed) == 1 and retimed[0]["ok"] is True and retimed[0]["pairs"] >= 1, retimed
