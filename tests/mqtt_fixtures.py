"""Pytest fixtures for real Mosquitto brokers (see tests/mosquitto.py).

Register once in tests/conftest.py with ``pytest_plugins = ["tests.mqtt_fixtures"]``: that brings the
fixtures and the report hook that appends each broker's log tail to a failing test's report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import ACL_PASSWORDS, EDGE_ACL, Broker, Certs, Subscriber, find_mosquitto, make_certs

CLIENT_NAMES = ["dev1", "dev2", "fleet"]
BROKER_LOG_LINES = 40  # of each broker's log, in a failing test's report

_BROKERS = pytest.StashKey[list[Broker]]()


def _track(request: pytest.FixtureRequest, broker: Broker) -> Broker:
    request.node.stash.setdefault(_BROKERS, []).append(broker)
    return broker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:  # a passing test shows nothing: the broker's output stays in its files
        for broker in item.stash.get(_BROKERS, []):
            title = f"mosquitto log ({broker.log_path}, last {BROKER_LOG_LINES} lines, keepalive pings left out)"
            report.sections.append((title, broker.log_tail(BROKER_LOG_LINES, quiet=True)))


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """The mosquitto binary; skips (fails under CI=true) when it is not installed."""
    return find_mosquitto()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """CA, server cert for localhost/127.0.0.1, client certs for dev1, dev2 and fleet (session-wide)."""
    return make_certs(tmp_path_factory.mktemp("mqtt-certs"), CLIENT_NAMES)


@pytest.fixture
def broker_factory(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto_bin: str
) -> Iterator[Callable[..., Broker]]:
    """``make(**Broker options) -> Broker``, started; every broker made is stopped (killed if stuck) at teardown."""
    made: list[Broker] = []

    def make(**options: Any) -> Broker:
        broker = Broker(tmp_path / f"broker{len(made)}", binary=mosquitto_bin, **options)
        made.append(_track(request, broker))
        return broker.start()

    yield make
    for broker in reversed(made):
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """Plain anonymous listener on 127.0.0.1, persistence on."""
    return broker_factory()


@pytest.fixture
def tls_broker(broker_factory: Callable[..., Broker], tls_certs: Certs) -> Broker:
    """Plain listener on ``port`` plus TLS (server auth only) on ``tls_port``; both anonymous."""
    return broker_factory(tls=tls_certs)


@pytest.fixture
def mtls_broker(broker_factory: Callable[..., Broker], tls_certs: Certs) -> Broker:
    """TLS listener requiring a client certificate from ``tls_certs.ca`` (username = cert CN); plain stays anonymous."""
    return broker_factory(tls=tls_certs, require_client_cert=True)


@pytest.fixture
def acl_broker(broker_factory: Callable[..., Broker]) -> Broker:
    """Password auth (``ACL_PASSWORDS``) with ``EDGE_ACL`` on the plain listener; no anonymous access."""
    return broker_factory(passwords=ACL_PASSWORDS, acl=EDGE_ACL)


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., Subscriber]]:
    """``connect(broker, topic_filter="#", **Subscriber options) -> Subscriber``; all closed at teardown."""
    clients: list[Subscriber] = []

    def connect(broker: Broker, topic_filter: str | list[str] | None = "#", **options: Any) -> Subscriber:
        client = Subscriber(broker, topic_filter, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
