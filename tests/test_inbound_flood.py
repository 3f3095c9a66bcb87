"""A flood of junk and wrongly signed deployments at a real agent through real Mosquitto, a genuine signed deployment
in the middle of it: the genuine one is committed, results keep flowing, memory stays flat, the log stays quiet.

Bounded in the default run (2,000 bad payloads, some of 256 KiB); ``SLOW=1`` sends 100,000. The figures (RSS before
and after, the largest gap between results, log lines per bad payload) are printed; the bounds asserted are generous
(documented in docs/protocol.md, "Inbound queues"): RSS growth under 50 MB, no gap between results of 10 s or more,
under 0.01 log lines about deployments per bad payload.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import psutil

from tests.daemon_helpers import wait_until
from tests.update_helpers import Fleet, agent_config, build_bundle, start, stop, wait_serving, wait_state
from tests.update_helpers import states as states_of

BAD_PAYLOADS = 100_000 if os.environ.get("SLOW") else 2_000
RSS_GROWTH_MB = 50.0
MAX_RESULT_GAP_S = 10.0


def _junk(i: int, fleet: Fleet, template: dict[str, Any]) -> bytes:
    """Bad payload number ``i``: oversize, not JSON, the wrong shape, or well formed but wrongly signed."""
    kind = i % 10
    if kind == 0 and i % 50 == 0:
        return secrets.token_bytes(256 * 1024)
    if kind in (1, 2):
        return secrets.token_bytes(64 + i % 500)
    if kind == 3:
        return b'{"signed": {"seq": "x"}, "signatures": [{"keyid": "a", "sig": "b"}]}'
    signed = dict(template["signed"]) | {"id": f"junk-{i}", "seq": 2**40 + i}  # newer than anything genuine
    sig = dict(template["signatures"][0]) | {"sig": secrets.token_hex(64)}
    if kind == 4:  # an unknown key (a new one? the agent refreshes its TUF metadata to see): coalesced, then refused
        sig["keyid"] = secrets.token_hex(32)
    return json.dumps({"signed": signed, "signatures": [sig]}).encode()


def _log_lines(proc: Any) -> list[str]:
    return (proc.output_dir / "stderr.txt").read_text(errors="replace").splitlines()


def test_deployment_flood_is_bounded_and_the_genuine_deployment_gets_through(
    tmp_path: Path, broker: Any, mqtt_client: Any
) -> None:
    fleet = Fleet(tmp_path, broker)
    sub = mqtt_client(broker, ["edge/dev1/results/#", "edge/dev1/update/status", "edge/dev1/telemetry"])
    flooder = mqtt_client(broker, None)
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path)
    try:
        wait_serving(results, "1.0.0")
        target = fleet.publish(build_bundle(tmp_path, "1.1.0"), "1.1.0")
        template = fleet.command("dev1", target)
        time.sleep(3)  # settle before measuring
        rss_before = psutil.Process(proc.pid).memory_info().rss / 2**20
        log_before = len(_log_lines(proc))
        flood_start = time.monotonic()
        genuine_sent = False
        for i in range(BAD_PAYLOADS):
            flooder.client.publish("edge/dev1/update/deploy", _junk(i, fleet, template), qos=0)
            if i == BAD_PAYLOADS // 2:
                fleet.deploy("dev1", target)  # the genuine one, in the middle of the flood
                genuine_sent = True
            if i % 200 == 0:
                time.sleep(0.05)  # let paho's thread send: a flood, not a memory test of the test's own client
        assert genuine_sent
        committed = wait_state(sub, "committed", timeout=120)
        flood_end = time.monotonic()
        assert committed["version"] == "1.1.0"
        wait_serving(results, "1.1.0")
        time.sleep(3)
        rss_after = psutil.Process(proc.pid).memory_info().rss / 2**20
        assert proc.poll() is None

        arrivals = [m.time for m in sub.messages("edge/dev1/results/#") if flood_start <= m.time <= flood_end]
        assert len(arrivals) > 10, "no results during the flood"
        gaps = [b - a for a, b in zip([flood_start, *arrivals], [*arrivals, flood_end], strict=True)]
        max_gap = max(gaps)
        lines = _log_lines(proc)[log_before:]
        about_deploys = [line for line in lines if "deployment command" in line]
        per_payload = len(about_deploys) / BAD_PAYLOADS
        telemetry = [json.loads(m.payload) for m in sub.messages("edge/dev1/telemetry")]
        assert wait_until(
            lambda: any(json.loads(m.payload).get("inbound") for m in sub.messages("edge/dev1/telemetry")), 15
        )
        telemetry = [json.loads(m.payload) for m in sub.messages("edge/dev1/telemetry")]
        counters = telemetry[-1]["inbound"]["deploy"]
        refusals = [s for s in states_of(sub) if s["state"] == "rejected"]
        print(
            f"\nflood: {BAD_PAYLOADS} bad payloads in {flood_end - flood_start:.1f} s; RSS {rss_before:.1f} -> "
            f"{rss_after:.1f} MB; largest gap between results {max_gap:.2f} s ({len(arrivals)} results); "
            f"{len(about_deploys)} log lines about deployments ({per_payload:.4f} per bad payload, {len(lines)} lines "
            f"in all); {len(refusals)} refusals reported; counters {counters}"
        )
        assert rss_after - rss_before < RSS_GROWTH_MB, (rss_before, rss_after)
        assert max_gap < MAX_RESULT_GAP_S, max_gap
        assert per_payload < 0.01, about_deploys[:20]
        assert counters["received"] > 0 and counters["oversize"] > 0 and counters["malformed"] > 0
        assert counters["bad_signature"] + counters["coalesced"] > 0
        assert not [line for line in lines if "Traceback" in line]
    finally:
        assert stop(proc) == 0
        fleet.close()


def test_refused_device_commands_are_logged_at_a_limited_rate(tmp_path: Path, broker: Any, mqtt_client: Any) -> None:
    """Junk on ``cmd/<name>``: refused (acks are rate-limited by the service), the agent serves on, and the log gets
    a few lines, not one per command."""
    fleet = Fleet(tmp_path, broker)
    sub = mqtt_client(broker, ["edge/dev1/ack", "edge/dev1/results/#"])
    flooder = mqtt_client(broker, None)
    config = agent_config(tmp_path, broker, fleet)
    results = tmp_path / "results-dev1.jsonl"
    proc = start(config, tmp_path)
    count = BAD_PAYLOADS  # enough that the per-minute allowance of each log key is a small share
    try:
        wait_serving(results, "1.0.0")
        log_before = len(_log_lines(proc))
        for i in range(count):
            payload = secrets.token_bytes(32) if i % 2 else b'{"signed": {"id": "c1"}, "signatures": []}'
            flooder.client.publish("edge/dev1/cmd/diagnostics", payload, qos=0)
            if i % 100 == 0:
                time.sleep(0.05)
        acks = lambda: len(sub.messages("edge/dev1/ack"))  # noqa: E731
        assert wait_until(lambda: acks() > 0, 30)
        settled: list[int] = []
        assert wait_until(lambda: settled.append(acks()) or (len(settled) > 3 and settled[-1] == settled[-4]), 60)
        results_before = len(sub.messages("edge/dev1/results/#"))
        assert wait_until(lambda: len(sub.messages("edge/dev1/results/#")) > results_before, 10)  # still serving
        lines = [line for line in _log_lines(proc)[log_before:] if "command" in line and "refused" in line]
        dropped = [line for line in _log_lines(proc)[log_before:] if "command dropped" in line]
        print(f"\ncommands: {count} junk, {acks()} acks, {len(lines) + len(dropped)} log lines about them")
        assert all(not json.loads(m.payload)["ok"] for m in sub.messages("edge/dev1/ack"))
        assert (len(lines) + len(dropped)) / count < 0.01, lines[:20]  # the bound
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        fleet.close()
