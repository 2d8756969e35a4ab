"""Prefect's triggers service, end to end, with ``ordering_sql.prefect`` as its ordering.

Events go through Prefect's own triggers consumer (``prefect.server.events.triggers.consumer``,
the message handler the server runs) and its periodic evaluation; the ordering is not mocked.
What reaches evaluation is observed by wrapping ``find_interested_triggers``, the first thing
``reactive_evaluation`` does once the ordering let an event through.

On SQLite the ordering tables live in Prefect's own database (no ``ORDERING_SQL_DATABASE_URL``);
on Postgres in the test's database, through ``ORDERING_SQL_DATABASE_URL``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.server.events import triggers
from prefect.server.events.ordering import PRECEDING_EVENT_LOOKBACK
from prefect.server.events.schemas.events import ReceivedEvent

import ordering_sql
import ordering_sql.prefect
from tests.conftest import BACKENDS
from tests.prefect.support import chain, make_event, message, triggers_consumer


@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch) -> list[ReceivedEvent]:
    """The events that reached trigger evaluation, in order."""
    reached: list[ReceivedEvent] = []
    original = triggers.find_interested_triggers

    def recording(event: ReceivedEvent) -> Any:
        reached.append(event)
        return original(event)

    monkeypatch.setattr(triggers, "find_interested_triggers", recording)
    return reached


@pytest.fixture(params=BACKENDS)
def ordering_database(
    request: pytest.FixtureRequest, prefect_with_db: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Where the ordering tables are: Prefect's SQLite file, or a Postgres test database."""
    if request.param == "postgres":
        url = str(request.getfixturevalue("postgres_url"))
        monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", url)
        return url
    return f"sqlite+aiosqlite:///{prefect_with_db}"


async def test_follower_parked_before_a_restart_is_evaluated_right_after_its_leader(
    ordering_database: str, evaluated: list[ReceivedEvent]
) -> None:
    leader = make_event(name="order.placed", resource="order.1")
    follower = make_event(follows=leader, name="order.paid", resource="order.1")

    async with triggers_consumer() as handle:
        await handle(message(follower))  # EventArrivedEarly is swallowed: the message is acked
        assert evaluated == []

    # The server restarts: every engine and ordering object of the first run is gone.
    await ordering_sql.dispose_engines()
    stored = ordering_sql.prefect.CausalOrdering(scope="triggers")
    assert ordering_sql.prefect.database_url() == ordering_database
    assert await stored.get_followers(leader) == [follower]
    await stored.close()

    async with triggers_consumer() as handle:
        await handle(message(leader))
        assert [event.id for event in evaluated] == [leader.id, follower.id]
        await handle(message(follower))  # redelivered: already seen, not evaluated again
        await handle(message(leader))
        assert [event.id for event in evaluated] == [leader.id, follower.id]

    assert await triggers.get_lost_followers() == []
    assert await ordering_sql.prefect.CausalOrdering(scope="triggers").get_followers(leader) == []
    await ordering_sql.dispose_engines()


async def test_jumbled_chain_through_the_consumer_is_evaluated_in_order(
    ordering_database: str, evaluated: list[ReceivedEvent]
) -> None:
    events = chain(6, prefix="flow-run")
    jumbled = [events[i] for i in (3, 5, 1, 4, 0, 2)]
    async with triggers_consumer() as handle:
        for event in jumbled:
            await handle(message(event))
    assert [event.id for event in evaluated] == [event.id for event in events]
    assert await triggers.get_lost_followers() == []
    await ordering_sql.dispose_engines()


async def test_lost_follower_is_evaluated_by_prefects_periodic_evaluation(
    ordering_database: str, evaluated: list[ReceivedEvent]
) -> None:
    """A follower whose leader never came goes through once it is past the lookback."""
    now = datetime.now(UTC)
    missing = make_event()
    lost = make_event(follows=missing, received=now - PRECEDING_EVENT_LOOKBACK)
    waiting = make_event(follows=missing, received=now - timedelta(minutes=1))
    parked_by_a_previous_run = ordering_sql.prefect.CausalOrdering(scope="triggers")
    await parked_by_a_previous_run.record_follower(lost)
    await parked_by_a_previous_run.record_follower(waiting)
    await parked_by_a_previous_run.close()

    await triggers.periodic_evaluation(now)
    assert [event.id for event in evaluated] == [lost.id]
    await triggers.periodic_evaluation(now)
    assert [event.id for event in evaluated] == [lost.id], "a lost follower is handed back once"
    stored = ordering_sql.prefect.CausalOrdering(scope="triggers")
    assert await stored.get_followers(missing) == [waiting]
    assert await stored.event_has_been_seen(lost)
    await ordering_sql.dispose_engines()
