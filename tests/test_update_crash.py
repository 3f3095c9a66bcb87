"""``kill -9`` of the agent in every update state, during a download, and a broker restart mid-transfer.

Mender-style: the agent is held right after it persisted a state (``EDGE_AGENT_FAULT_HOLD``), killed there with
SIGKILL, then started again; the chain of states it reports and the model it serves afterwards are asserted, and
at every instant the ``active`` slot on disk is a complete bundle."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.update_helpers import (
    Fleet,
    agent_config,
    build_bundle,
    chain,
    start,
    states,
    stop,
    versions_served,
    wait_serving,
    wait_state,
    wait_until,
)


@pytest.fixture
def fleet(tmp_path: Path, broker: Any) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker)
    yield f
    f.close()


def _active_bundle(tmp: Path) -> str:
    """The version the ``active`` slot holds; it must always be a complete bundle."""
    import tomllib

    active = tmp / "state-dev1" / "models" / "digits" / "active"
    assert active.is_symlink()
    meta = tomllib.loads((active / "bundle.toml").read_text())
    assert (active / meta["model"]).is_file()
    return meta["version"]


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.parametrize(
    ("state", "after_restart", "serving"),
    [
        (
            "offered",
            ["offered", "downloading", "downloaded", "validating", "activating", "trial", "committed"],
            "1.1.0",
        ),
        ("downloading", ["downloading", "downloaded", "validating", "activating", "trial", "committed"], "1.1.0"),
        ("downloaded", ["downloaded", "validating", "activating", "trial", "committed"], "1.1.0"),
        ("validating", ["downloaded", "validating", "activating", "trial", "committed"], "1.1.0"),
        ("activating", ["activating", "rolled_back"], "1.0.0"),
        ("trial", ["trial", "committed"], "1.1.0"),
    ],
)
def test_kill_9_in_each_state(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any, state: str, after_restart: list[str], serving: str
) -> None:
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path, env={"EDGE_AGENT_FAULT_HOLD": f"{state}:60"})
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0", pad_bytes=200_000), "1.1.0"))
        wait_state(sub, state)
        _kill(proc)
        assert _active_bundle(tmp_path) in ("1.0.0", "1.1.0")
        before = len(states(sub))
        proc = start(config, tmp_path)
        terminal = "rolled_back" if after_restart[-1] == "rolled_back" else "committed"
        wait_state(sub, terminal, since=before)
        assert chain(sub, since=before) == after_restart, (
            before,
            [(s["state"], s.get("reason"), s.get("ts")) for s in states(sub)],
        )
        wait_serving(results, serving)
        assert _active_bundle(tmp_path) == serving
    finally:
        stop(proc)


def test_kill_9_in_trial_keeps_the_previous_models_latency_baseline(
    tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any
) -> None:
    """A model tens of times slower than the old one (no budget of its own), killed in trial before its window ran:
    the restarted agent judges it against the previous model's p95 persisted at activation (not against the slow
    model's own first runs, nor against nothing), confirms by timing both side by side, and rolls it back."""
    from tests.test_update_attacks import _onnx_digits

    def slow_no_budget(meta: dict[str, Any], work: Path) -> None:
        _onnx_digits("slow")(meta, work)
        meta.pop("budget", None)

    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path, env={"EDGE_AGENT_FAULT_HOLD": "trial:60"})
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0", edit=slow_no_budget), "1.1.0"))
        wait_state(sub, "trial")
        _kill(proc)
        stored = json.loads((tmp_path / "state-dev1" / "updates" / "digits.json").read_text())["state"]
        assert stored["state"] == "trial" and stored["baseline_p95_ms"] > 0
        assert stored["health"]["window_s"] == 3.0 and stored["health"]["min_results"] == 10
        before = len(states(sub))
        proc = start(config, tmp_path)
        rolled = wait_state(sub, "rolled_back", since=before)
        assert chain(sub, since=before) == ["trial", "rolled_back"]
        reason = rolled["reason"]
        assert reason.startswith("unhealthy in trial: median latency ") and "the previous model's median" in reason
        assert "timed side by side on the same input" in reason
        wait_serving(results, "1.0.0")
        assert _active_bundle(tmp_path) == "1.0.0"
    finally:
        stop(proc)


def test_crash_loop_in_trial_rolls_back(tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any) -> None:
    """Killed in trial on three starts in a row (e.g. the new model crashes the process): rolled back."""
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    hold = {"EDGE_AGENT_FAULT_HOLD": "trial:60"}
    proc = start(config, tmp_path, env=hold)
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0"))

        def trials() -> int:
            return sum(s["state"] == "trial" for s in states(sub))

        for entered in (1, 2, 3):  # the trial is entered on three starts, and killed there each time
            assert wait_until(lambda n=entered: trials() >= n, 60), chain(sub)
            _kill(proc)
            assert _active_bundle(tmp_path) == "1.1.0"
            if entered < 3:
                proc = start(config, tmp_path, env=hold)
        since = len(states(sub))
        proc = start(config, tmp_path)
        rolled = wait_state(sub, "rolled_back", since=since)
        assert rolled["reason"] == "crash loop in trial"
        wait_serving(results, "1.0.0")
        assert _active_bundle(tmp_path) == "1.0.0"
    finally:
        stop(proc)


def test_kill_9_at_many_points_of_a_download_resumes_it(tmp_path: Path, broker: Any, mqtt_client: Any) -> None:
    """A 3 MB bundle served at 500 kB/s; the agent is killed three times mid-transfer and each restart asks only for
    the chunks it does not have (the durable chunk bitmap)."""
    fleet = Fleet(tmp_path, broker, rate_limit_bps=500_000)
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet, chunk_size=16384)
    results = tmp_path / "results-dev1.jsonl"
    part_dir = tmp_path / "state-dev1" / "models" / "digits" / "downloads"
    proc = start(config, tmp_path)
    try:
        wait_serving(results, "1.0.0")
        bundle = build_bundle(tmp_path, "1.1.0", pad_bytes=3_000_000)
        fleet.deploy("dev1", fleet.publish(bundle, "1.1.0"))
        wait_state(sub, "downloading")
        chunks = -(-bundle.stat().st_size // 16384)
        for _ in range(3):
            published = fleet.server.stats["chunks_published"]
            for bitmap in part_dir.glob("*.part.chunks"):
                bitmap.unlink()  # so that the next one seen was written by this run
            assert wait_until(lambda p=published: fleet.server.stats["chunks_published"] - p >= chunks * 0.15, 30)
            assert wait_until(lambda: any(part_dir.glob("*.part.chunks")), 10), "no chunk bitmap persisted"
            _kill(proc)
            assert _active_bundle(tmp_path) == "1.0.0"
            requests_before = len(sub.messages("edge/dev1/update/chunks"))
            proc = start(config, tmp_path)
            assert wait_until(lambda n=requests_before: len(sub.messages("edge/dev1/update/chunks")) > n, 30)
            first = json.loads(sub.messages("edge/dev1/update/chunks")[requests_before].payload)
            assert min(first["chunks"]) > 0, "the restarted agent asked for the whole target again"
        wait_state(sub, "committed", timeout=60)
        wait_serving(results, "1.1.0")
        assert not list(part_dir.glob("*.part*"))  # the finished update leaves no download behind
    finally:
        stop(proc)
        fleet.close()


def test_broker_restart_in_the_middle_of_a_transfer(tmp_path: Path, broker: Any, mqtt_client: Any) -> None:
    fleet = Fleet(tmp_path, broker, rate_limit_bps=1_000_000)
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet, chunk_size=16384)
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path)
    try:
        wait_serving(results, "1.0.0")
        bundle = build_bundle(tmp_path, "1.1.0", pad_bytes=1_500_000)
        fleet.deploy("dev1", fleet.publish(bundle, "1.1.0"))
        wait_state(sub, "downloading")
        chunks = -(-bundle.stat().st_size // 16384)
        assert wait_until(lambda: fleet.server.stats["chunks_published"] >= chunks * 0.3, 30)
        broker.restart(graceful=False)
        wait_state(sub, "committed", timeout=90)
        assert chain(sub) == ["offered", "downloading", "downloaded", "validating", "activating", "trial", "committed"]
        wait_serving(results, "1.1.0")
        assert proc.poll() is None
        assert versions_served(results)[0] == "1.0.0"
    finally:
        stop(proc)
        fleet.close()


def test_clean_stops_in_trial_are_not_a_crash_loop(tmp_path: Path, broker: Any, fleet: Fleet, mqtt_client: Any) -> None:
    """SIGTERM in trial three times (e.g. `systemctl restart`): the trial resumes each time and commits; only crashes
    count against the loop guard."""
    sub = mqtt_client(broker, "edge/#")
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    hold = {"EDGE_AGENT_FAULT_HOLD": "trial:60"}
    proc = start(config, tmp_path, env=hold)
    try:
        wait_serving(results, "1.0.0")
        fleet.deploy("dev1", fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0"))
        wait_state(sub, "trial")
        for _ in range(3):
            assert stop(proc) == 0
            assert _active_bundle(tmp_path) == "1.1.0"
            proc = start(config, tmp_path, env=hold)
            wait_serving(results, "1.1.0")
        assert stop(proc) == 0
        proc = start(config, tmp_path)
        wait_state(sub, "committed")
        assert "rolled_back" not in chain(sub)
        wait_serving(results, "1.1.0")
    finally:
        stop(proc)
