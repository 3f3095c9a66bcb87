"""One owner for the TUF trust store: refreshes and reads from many threads never see ``root.json`` missing.

``tuf.ngclient.Updater`` removes ``root.json`` and symlinks it again each time one is made; without the client's
lock a read at that moment fails (issue 17: a deployment dropped with a traceback).
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Any

import pytest
from tuf.ngclient import Updater

from agent.config import MqttConfig
from agent.mqtt.client import MqttLink
from agent.mqtt.outbox import Outbox
from agent.protocol import Topics
from agent.update.fetcher import METADATA_BASE_URL, MqttMetadataFetcher
from agent.update.trust import TrustClient, install_trust_root, root_summary
from tests.daemon_helpers import wait_until
from tests.mosquitto import Broker
from tests.update_helpers import Fleet, build_bundle

THREADS = 8
ROUNDS = 15


@pytest.fixture
def trust(tmp_path: Path, broker: Broker) -> Any:
    fleet = Fleet(tmp_path, broker)
    target = fleet.publish(build_bundle(tmp_path, "1.0.0"), "1.0.0")
    topics = Topics.for_device("dev1")
    link = MqttLink(
        MqttConfig(broker=broker.url, client_id="dev1-trust-test"),
        "dev1",
        topics,
        Outbox(tmp_path / "outbox.db"),
        lambda: b"online",
        lambda reason: b"offline",
    )
    link.start()
    try:
        wait_until(lambda: link.connected, 15)
        install_trust_root(tmp_path / "tuf", fleet.trust_root)
        client = TrustClient(tmp_path / "tuf", MqttMetadataFetcher(link, topics, timeout_s=15))
        yield client, target
    finally:
        link.stop(drain_timeout=0.5)
        fleet.close()


def test_refreshes_and_reads_from_many_threads_never_fail(trust: Any) -> None:
    client, target = trust
    client.refresh()
    errors: list[str] = []
    reads = refreshes = 0
    count_lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def hammer(index: int) -> None:
        nonlocal reads, refreshes
        start.wait()
        for round_ in range(ROUNDS):
            try:
                if (index + round_) % 2 == 0:
                    client.refresh()
                    with count_lock:
                        refreshes += 1
                root = client.root()
                assert root.signed.version >= 1
                client.command_keys()
                assert client.target(target).target.version == "1.0.0"
                with count_lock:
                    reads += 1
            except Exception:
                errors.append(traceback.format_exc())

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [], errors[0]
    assert reads == THREADS * ROUNDS
    assert refreshes == THREADS * ROUNDS // 2
    assert (client.metadata_dir / "root.json").exists()


def test_root_summary_beside_a_refreshing_client_never_misses_the_root(trust: Any) -> None:
    """``edge-agent check`` reads root.json from another process, outside the client's lock: it looks again when
    the daemon's updater has it unlinked for a moment."""
    client, _target = trust
    client.refresh()
    stop = threading.Event()
    errors: list[str] = []

    def refresh() -> None:  # what each refresh starts with, without the network round trips: as often as it can
        while not stop.is_set():
            with client._lock:
                Updater(str(client.metadata_dir), METADATA_BASE_URL, fetcher=client.fetcher, bootstrap=None)

    refresher = threading.Thread(target=refresh)
    refresher.start()
    try:
        for _ in range(3000):
            try:
                summary, _field = root_summary(client.metadata_dir / "root.json")
                assert summary.startswith("root v1")
            except Exception:
                errors.append(traceback.format_exc())
    finally:
        stop.set()
        refresher.join(60)
    assert errors == [], errors[0]
