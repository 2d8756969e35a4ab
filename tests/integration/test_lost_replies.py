"""Replies lost after the server committed: the retry must return what the first attempt did.

On Postgres each step of the protocol is one statement in autocommit. When the link breaks
after the server committed such a statement but before its reply arrived, the engine sees a
dropped connection, a transient fault, and runs the step again (``Store._run``). The first
attempt's effect is already in the database, so the second attempt must still give the caller
what the first one took; otherwise whatever it took is lost for good.

``tests.faults.LinkProxy`` sits between the engine and the server and swallows exactly one
such reply (``lose_next_reply()``): from the statement's CommandComplete up to the
ReadyForQuery after it, which the server sends only once the statement has committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import UUID

import pytest

from ordering_sql import CausalOrdering, EventArrivedEarly, ReceivedEvent
from tests.faults import LinkProxy, LostReply
from tests.support import Clock, make_event

pytestmark = pytest.mark.postgres

#: Past the 15-minute lookback: a follower still parked then is lost.
LATER = timedelta(minutes=20)
#: Long enough that no lease renewal runs during a test: its statement could take the fault.
LEASE = timedelta(minutes=10)


@pytest.fixture
async def proxy() -> AsyncIterator[LinkProxy]:
    async with LinkProxy(upstream_port=5432) as link_proxy:
        yield link_proxy


@pytest.fixture
async def ordering(
    postgres_url: str, proxy: LinkProxy, clock: Clock
) -> AsyncIterator[CausalOrdering[ReceivedEvent]]:
    """An engine whose every connection goes through ``proxy``, warmed up (connected, schema
    checked) so that a test's statements are the protocol's own. Replaces the suite's
    ``ordering`` fixture, which runs on every backend: these tests are Postgres only."""
    engine: CausalOrdering[ReceivedEvent] = CausalOrdering(
        "lost-replies", database_url=proxy.url(postgres_url), clock=clock, lease_timeout=LEASE
    )
    try:
        await engine.event_has_been_seen(make_event())
        yield engine
    finally:
        await engine.close()  # the last user of its engine: its connections close here


class Handled:
    """A recursive handler, as a consumer writes it, that records the events it handled."""

    def __init__(self, ordering: CausalOrdering[ReceivedEvent]) -> None:
        self.ordering = ordering
        self.ids: list[UUID] = []

    async def __call__(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self, event, depth):
            self.ids.append(event.id)


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The actions of the retries the Store logged."""
    return [
        str(getattr(record, "action", "?"))
        for record in caplog.records
        if record.name == "ordering_sql.store" and "transient database fault" in record.message
    ]


def fired(reply_lost: asyncio.Event, proxy: LinkProxy, what: str) -> LostReply:
    """The reply the proxy swallowed; fails the test loudly if the fault did not fire."""
    assert reply_lost.is_set(), (
        f"the fault did not fire: the reply of {what} was delivered, so this test proved "
        "nothing about a lost reply"
    )
    assert len(proxy.lost_replies) == 1, f"more than one reply was lost: {proxy.lost_replies}"
    return proxy.lost_replies[0]


async def test_a_sweep_whose_reply_was_lost_still_hands_its_followers_over(
    ordering: CausalOrdering[ReceivedEvent],
    proxy: LinkProxy,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sweep takes the lost followers and returns them in one statement. If that
    statement commits and its reply is lost, the retried sweep finds nothing lost any more: it
    must still return the followers the first attempt took, or they are gone (when the sweep
    deleted them, as it once did) or hidden until their claim expires."""
    leader = make_event(name="never.comes")
    followers = [make_event(follows=leader, name=f"follower.{i}") for i in range(2)]
    handler = Handled(ordering)
    for follower in followers:
        with pytest.raises(EventArrivedEarly):
            await handler(follower)
    assert await ordering.get_lost_followers() == []  # within the lookback: none lost yet
    clock.advance(LATER)

    reply_lost = proxy.lose_next_reply()
    with caplog.at_level(logging.WARNING, logger="ordering_sql.store"):
        lost = await ordering.get_lost_followers()

    lost_reply = fired(reply_lost, proxy, "the sweep")
    assert lost_reply.committed_in_autocommit, f"the lost statement did not commit: {lost_reply}"
    assert retries(caplog) == ["get_lost_followers"], "the lost reply was not the sweep's"
    assert sorted(f.id for f in lost) == sorted(f.id for f in followers), (
        "the retried sweep returned "
        f"{[f.id for f in lost]}, not the {len(followers)} followers its first attempt took "
        "(and committed) before the reply was lost"
    )
    assert await ordering.get_lost_followers() == []  # handed over once, not twice
    assert handler.ids == []


async def test_a_completion_whose_reply_was_lost_replays_the_followers_it_claimed_at_once(
    ordering: CausalOrdering[ReceivedEvent],
    proxy: LinkProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leader's completion marks it seen and claims its parked followers in one statement.
    If that statement commits and its reply is lost, the retried completion must return the
    followers the first attempt claimed, so that they are handled right away, in the same
    call, once; not left claimed until the claim expires and the sweep hands them back."""
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    handler = Handled(ordering)
    with pytest.raises(EventArrivedEarly):
        await handler(follower)
    assert [f.id for f in await ordering.get_followers(leader)] == [follower.id]

    armed: list[asyncio.Event] = []
    with caplog.at_level(logging.WARNING, logger="ordering_sql.store"):
        async with ordering.preceding_event_confirmed(handler, leader):
            handler.ids.append(leader.id)
            # The last thing the body does: the next statement is the completion's.
            armed.append(proxy.lose_next_reply())
        handled_on_return = list(handler.ids)

    lost_reply = fired(armed[0], proxy, "the completion")
    assert lost_reply.committed_in_autocommit, f"the lost statement did not commit: {lost_reply}"
    assert retries(caplog) == ["complete_event"], "the lost reply was not the completion's"
    assert handled_on_return == [leader.id, follower.id], (
        "the retried completion did not replay the follower the first attempt claimed before "
        f"preceding_event_confirmed returned: handled {handled_on_return}"
    )
    assert await ordering.get_followers(leader) == []  # handled, so no longer stored
    assert await ordering.event_has_been_seen(follower)
    assert await ordering.get_lost_followers() == []
    assert handler.ids == [leader.id, follower.id]  # and not again
