"""Brokers for the FastStream tests: RabbitMQ, NATS with JetStream and Redis, on this machine.

Each is found at its default address (``support.DEFAULT_URLS``) unless an
``ORDERING_SQL_TEST_*_URL`` variable names another (``support.URL_ENV``). As for Postgres
(``tests/conftest.py``): a broker that cannot be reached skips its tests with the reason, and
under ``CI=true`` fails them instead (``.ci/run`` starts the three brokers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.brokers.support import BROKERS, BrokerName, Kit, Settings, channel_name, make_kit
from tests.conftest import IN_CI

_unreachable: dict[BrokerName, str | None] = {}


def masked(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _check(name: BrokerName) -> str | None:
    """Why broker ``name`` cannot be used, or None; asked once per session."""
    if name not in _unreachable:
        kit = make_kit(name)
        try:
            asyncio.run(asyncio.wait_for(kit.reachable(), 15))
        except Exception as exc:
            _unreachable[name] = f"{name} at {masked(kit.url)} is unreachable: {exc!r}"
        else:
            _unreachable[name] = None
    return _unreachable[name]


def require(name: BrokerName) -> None:
    """Skip (outside CI) or fail (CI=true) the current test if broker ``name`` is down."""
    reason = _check(name)
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(params=BROKERS)
def broker_name(request: pytest.FixtureRequest) -> BrokerName:
    name: BrokerName = request.param
    require(name)
    return name


@pytest.fixture
def settings() -> Settings:
    """A Redis entry pending this long is claimed again: long enough that a handling under
    load is not claimed while it runs, short enough for the tests that wait for it."""
    return Settings(claim_idle_ms=600)


@pytest.fixture
def kit(broker_name: BrokerName, settings: Settings) -> Kit:
    return make_kit(broker_name, settings=settings)


@pytest.fixture
async def channel(kit: Kit) -> AsyncIterator[str]:
    """A channel of the test's own, declared on the broker, deleted afterwards."""
    name = channel_name()
    await kit.declare(name)
    try:
        yield name
    finally:
        await kit.remove(name)
