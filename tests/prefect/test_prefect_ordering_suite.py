"""Prefect's own tests of its causal ordering modules, run against ``ordering_sql.prefect``.

Source: https://github.com/PrefectHQ/prefect (Apache License 2.0; these tests are Prefect's,
adapted as listed below), commit ce79dd3d6cfa2b7337265498210dbc4d25bcdc98
(the newest stored snapshot; Prefect 3.9.1's installed build names commit bd4807c3, which that
snapshot does not hold, but its ``src/prefect/server/events/ordering/{__init__,memory,db}.py``
are byte-identical to the installed ones). Three modules are ported:

* ``tests/events/server/test_in_memory_ordering.py`` (Prefect's memory module): every test.
* ``tests/events/server/test_db_ordering.py`` (Prefect's db module): every test, as methods of
  ``TestFromDbOrderingModule``.
* ``src/integrations/prefect-redis/tests/test_ordering.py`` (prefect-redis): every test that
  uses only the ordering protocol, as methods of ``TestFromRedisOrderingModule``. Not ported,
  because they test Redis itself and the adapter has no Redis:
  ``test_causal_ordering_keys_share_cluster_hash_slot`` (``_key`` names and cluster hash slots),
  ``test_causal_ordering_runs_against_real_redis_cluster`` (a Redis cluster; skipped by Prefect
  too without ``PREFECT_REDIS_CLUSTER_TEST_URL``) and ``test_claimed_follower_not_dropped``
  (reads Redis keys through ``causal_ordering.redis`` and ``_key``).

What changed, and nothing else (``ruff format`` reflowed some lines to this project's width, and
a few comments longer than its 100 characters were wrapped):

* ``CausalOrdering`` is ``ordering_sql.prefect.CausalOrdering`` (imported from there instead of
  ``prefect.server.events.ordering.memory``/``.db``; ``typing.Sequence`` became
  ``collections.abc.Sequence``); ``EventBeingProcessed`` is still Prefect's
  (``prefect.server.events.ordering.memory``), and the adapter's subclasses it, so the
  ``pytest.raises`` there checks that Prefect's own ``except`` clauses catch ours.
* Each test runs on SQLite and on Postgres: the autouse ``ordering_database`` fixture points
  ``ORDERING_SQL_DATABASE_URL`` at a fresh migrated database, so every ``CausalOrdering(scope=...)``
  (in the ``causal_ordering`` fixture and in the test bodies) is built on it.
* The memory tests' ``CausalOrdering.clear_all_scopes()`` calls are commented out (marked
  ``ported:``): they empty the memory module's per-scope singletons before building orderings,
  and a fresh database per test does that here. (Only the memory module has that classmethod;
  the adapter's ``clear_all_scopes`` is a coroutine method of an instance, like its ``clear``.)
* The db and redis modules' tests became methods (``self`` added) of one class per module, since
  the three modules' test names collide; their fixtures are the memory module's (identical in
  all three modules), plus ``worst_case`` (db and redis, identical) and ``start_of_test`` (from
  Prefect's ``tests/conftest.py``).
* In ``test_returns_lost_followers_in_occurred_order`` of the db and redis modules, the
  lookback is patched where the adapter takes it from, ``prefect.server.events.ordering``,
  instead of ``prefect.server.events.ordering.db`` / ``prefect_redis.ordering`` (the module
  under test; prefect-redis is not installed here).
* ``xfail`` (strict) only where Prefect's three modules disagree among themselves: each reason
  names the modules. Everything else is a plain test and passes: the tests that freeze
  Prefect's clock by patching ``prefect.types._datetime.now`` (``CLOCK_FROZEN``: the adapter
  follows that clock, on top of the database's), and those that failed for other reasons before
  the adapter was mended (``REAL_DIFFERENCES``).
"""

# Prefect's code, as it is: its test_wait_for_leader_in_flight does not keep its task (RUF006)
# and its redis module uses try-except-pass (SIM105).
# ruff: noqa: RUF006, SIM105

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from unittest.mock import patch
from uuid import uuid4

import pytest
from cachetools import TTLCache
from prefect.server.events.ordering import (
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
    EventArrivedEarly,
    MaxDepthExceeded,
)
from prefect.server.events.ordering.memory import EventBeingProcessed
from prefect.server.events.schemas.events import ReceivedEvent, Resource
from prefect.types._datetime import DateTime, now

from ordering_sql.prefect import CausalOrdering
from tests.conftest import BACKENDS

#: The tests that patch ``prefect.types._datetime.now`` (Prefect's clock), which the adapter did
#: not follow up to commit 3275889. Listed only for the record; they are plain tests.
#: (``test_wait_for_leader_old_event`` also needed the first difference below.)
CLOCK_FROZEN = (
    "TestLostFollowers::test_get_lost_followers",
    "TestCausalOrderingFlow::test_wait_for_leader_old_event",
    "TestErrorConditions::test_returns_lost_followers_in_occurred_order",
)
#: Where the adapter differed from all of Prefect's modules that have the API, until mended
#: (plain tests too): ``wait_for_leader`` as the first call of a new instance failed (it read the
#: clock before opening the database); and the db and redis tests' negative
#: ``PRECEDING_EVENT_LOOKBACK`` was not seen (the adapter copied Prefect's constants at import).
REAL_DIFFERENCES = (
    "TestCausalOrderingFlow::test_wait_for_leader_arrives_early",
    "TestCausalOrderingFlow::test_wait_for_leader_old_event",
    "TestFromDbOrderingModule::test_returns_lost_followers_in_occurred_order",
    "TestFromRedisOrderingModule::test_returns_lost_followers_in_occurred_order",
)

# -- what builds the ordering here ----------------------------------------------------------------


@pytest.fixture(autouse=True, params=BACKENDS)
def ordering_database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh migrated database on each backend, where every ``CausalOrdering`` is built."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", url)
    return url


@pytest.fixture
def start_of_test() -> DateTime:
    # From Prefect's tests/conftest.py.
    return now("UTC")


# -- tests/events/server/test_in_memory_ordering.py -----------------------------------------------


@pytest.fixture
def resource() -> Resource:
    return Resource({"prefect.resource.id": "any.thing"})


@pytest.fixture
def event_one(
    start_of_test: DateTime,
    resource: Resource,
) -> ReceivedEvent:
    return ReceivedEvent(
        resource=resource,
        event="event.one",
        occurred=start_of_test + timedelta(seconds=1),
        received=start_of_test + timedelta(seconds=1),
        id=uuid4(),
        follows=None,
    )


@pytest.fixture
def event_two(event_one: ReceivedEvent) -> ReceivedEvent:
    return ReceivedEvent(
        event="event.two",
        id=uuid4(),
        follows=event_one.id,
        resource=event_one.resource,
        occurred=event_one.occurred + timedelta(seconds=1),
        received=event_one.received + timedelta(seconds=1, milliseconds=1),
    )


@pytest.fixture
def event_three_a(event_two: ReceivedEvent) -> ReceivedEvent:
    return ReceivedEvent(
        event="event.three.a",
        id=uuid4(),
        follows=event_two.id,
        resource=event_two.resource,
        occurred=event_two.occurred + timedelta(seconds=1),
        received=event_two.received + timedelta(seconds=1, milliseconds=1),
    )


@pytest.fixture
def event_three_b(event_two: ReceivedEvent) -> ReceivedEvent:
    return ReceivedEvent(
        event="event.three.b",
        id=uuid4(),
        follows=event_two.id,
        resource=event_two.resource,
        occurred=event_two.occurred + timedelta(seconds=2),
        received=event_two.received + timedelta(seconds=2, milliseconds=1),
    )


@pytest.fixture
def in_proper_order(
    event_one: ReceivedEvent,
    event_two: ReceivedEvent,
    event_three_a: ReceivedEvent,
    event_three_b: ReceivedEvent,
) -> Sequence[ReceivedEvent]:
    return [event_one, event_two, event_three_a, event_three_b]


@pytest.fixture
def in_jumbled_order(
    event_one: ReceivedEvent,
    event_two: ReceivedEvent,
    event_three_a: ReceivedEvent,
    event_three_b: ReceivedEvent,
) -> Sequence[ReceivedEvent]:
    return [event_two, event_three_a, event_one, event_three_b]


@pytest.fixture
def backwards(
    event_one: ReceivedEvent,
    event_two: ReceivedEvent,
    event_three_a: ReceivedEvent,
    event_three_b: ReceivedEvent,
) -> Sequence[ReceivedEvent]:
    return [event_three_b, event_three_a, event_two, event_one]


@pytest.fixture(params=["in_proper_order", "in_jumbled_order", "backwards"])
def example(request: pytest.FixtureRequest) -> Sequence[ReceivedEvent]:
    return request.getfixturevalue(request.param)


@pytest.fixture
def causal_ordering() -> CausalOrdering:
    # Clear all scopes before each test to ensure isolation
    # ported: CausalOrdering.clear_all_scopes()  (each test has a fresh database)
    ordering = CausalOrdering(scope="unit-tests")
    return ordering


@pytest.mark.xfail(
    strict=True,
    reason="Prefect's modules disagree: memory's CausalOrdering is a singleton per scope "
    "(CausalOrdering(scope) returns the same object); db's and redis's build a new instance "
    "each time.",
)
def test_causal_ordering_uses_scope_correctly():
    # ported: CausalOrdering.clear_all_scopes()  (each test has a fresh database)
    ordering_one = CausalOrdering(scope="one")
    ordering_two = CausalOrdering(scope="two")
    ordering_one_again = CausalOrdering(scope="one")

    # Same scope should return same instance
    assert ordering_one is ordering_one_again
    # Different scopes should return different instances
    assert ordering_one is not ordering_two
    assert ordering_one.scope == "one"
    assert ordering_two.scope == "two"


@pytest.mark.xfail(
    strict=True,
    reason="Prefect's modules disagree: memory's CausalOrdering is a singleton per scope "
    "(the `is` check); db's and redis's build a new instance each time (the seen mark itself "
    "is shared by scope in all three).",
)
async def test_attributes_persist_within_same_scope(event_one: ReceivedEvent):
    # ported: CausalOrdering.clear_all_scopes()  (each test has a fresh database)
    ordering_one = CausalOrdering(scope="test-scope")
    await ordering_one.record_event_as_seen(event_one)

    ordering_same_scope = CausalOrdering(scope="test-scope")
    assert ordering_one is ordering_same_scope
    assert await ordering_same_scope.event_has_been_seen(event_one)


class TestEventProcessingState:
    async def test_record_and_check_processing(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Initially not processing
        assert not await causal_ordering.event_has_started_processing(event_one)

        # Can record as processing
        assert await causal_ordering.record_event_as_processing(event_one)
        assert await causal_ordering.event_has_started_processing(event_one)

        # Cannot record again while processing
        assert not await causal_ordering.record_event_as_processing(event_one)

        # Can forget processing
        await causal_ordering.forget_event_is_processing(event_one)
        assert not await causal_ordering.event_has_started_processing(event_one)

        # Can record again after forgetting
        assert await causal_ordering.record_event_as_processing(event_one)

    async def test_event_is_processing_context_manager(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Test successful processing
        assert not await causal_ordering.event_has_been_seen(event_one)

        async with causal_ordering.event_is_processing(event_one):
            assert await causal_ordering.event_has_started_processing(event_one)

        # After context exits, event should be marked as seen and not processing
        assert await causal_ordering.event_has_been_seen(event_one)
        assert not await causal_ordering.event_has_started_processing(event_one)

    async def test_event_being_processed_exception(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Start processing an event
        await causal_ordering.record_event_as_processing(event_one)

        # Trying to process again should raise exception
        with pytest.raises(EventBeingProcessed) as exc_info:
            async with causal_ordering.event_is_processing(event_one):
                pass

        assert exc_info.value.event == event_one


class TestEventSeenTracking:
    async def test_event_seen_tracking(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Initially not seen
        assert not await causal_ordering.event_has_been_seen(event_one)
        assert not await causal_ordering.event_has_been_seen(event_one.id)

        # Record as seen
        await causal_ordering.record_event_as_seen(event_one)
        assert await causal_ordering.event_has_been_seen(event_one)
        assert await causal_ordering.event_has_been_seen(event_one.id)

    @pytest.mark.xfail(
        strict=True,
        reason="Prefect's modules disagree: memory keeps seen marks in a per-instance "
        "TTLCache `_seen_events` (maxsize 10000); db in a class-level defaultdict of TTLCaches "
        "per scope (not a TTLCache); redis has no `_seen_events` (keys with a TTL).",
    )
    async def test_seen_events_cleanup(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Record event as seen
        await causal_ordering.record_event_as_seen(event_one)
        assert await causal_ordering.event_has_been_seen(event_one)

        assert isinstance(causal_ordering._seen_events, TTLCache)
        assert causal_ordering._seen_events.ttl == SEEN_EXPIRATION.total_seconds()

        # Verify maxsize is reasonable (prevents unbounded growth)
        assert causal_ordering._seen_events.maxsize == 10000

        # Replace the cache temporarily with one that has a very short TTL
        original_cache = causal_ordering._seen_events
        try:
            # Create a TTLCache with 0.1 second TTL for testing
            causal_ordering._seen_events = TTLCache(maxsize=10000, ttl=0.1)

            # Add event to the short-lived cache
            await causal_ordering.record_event_as_seen(event_one)
            assert await causal_ordering.event_has_been_seen(event_one)

            # Wait for expiration
            await asyncio.sleep(0.15)

            # Should not be seen anymore due to expiration
            assert not await causal_ordering.event_has_been_seen(event_one)
        finally:
            # Restore original cache
            causal_ordering._seen_events = original_cache


class TestFollowerLeaderTracking:
    async def test_record_and_forget_follower(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # Initially no followers
        assert await causal_ordering.get_followers(event_one) == []

        # Record follower
        await causal_ordering.record_follower(event_two)
        followers = await causal_ordering.get_followers(event_one)
        assert followers == [event_two]

        # Forget follower
        await causal_ordering.forget_follower(event_two)
        assert await causal_ordering.get_followers(event_one) == []

    async def test_multiple_followers_sorted_by_occurred(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_three_a: ReceivedEvent,
        event_three_b: ReceivedEvent,
    ):
        # Record followers (event_three_b occurs after event_three_a)
        await causal_ordering.record_follower(event_three_b)
        await causal_ordering.record_follower(event_three_a)

        assert event_three_a.follows is not None

        # Should return in occurred order (event_three_a.follows is event_two.id, so we need
        # event_two)
        leader_event = ReceivedEvent(
            resource=event_three_a.resource,
            event="leader",
            occurred=event_three_a.occurred,
            received=event_three_a.received,
            id=event_three_a.follows,
            follows=None,
        )
        followers = await causal_ordering.get_followers(leader_event)
        assert followers == [event_three_a, event_three_b]

    async def test_followers_by_id(
        self,
        causal_ordering: CausalOrdering,
        event_two: ReceivedEvent,
        event_three_a: ReceivedEvent,
        event_three_b: ReceivedEvent,
    ):
        # Record followers
        await causal_ordering.record_follower(event_two)
        await causal_ordering.record_follower(event_three_a)
        await causal_ordering.record_follower(event_three_b)

        # Get specific followers by ID
        follower_ids = [event_three_b.id, event_two.id]  # Out of order
        followers = await causal_ordering.followers_by_id(follower_ids)

        # Should return in occurred order
        assert followers == [event_two, event_three_b]


class TestLostFollowers:
    async def test_get_lost_followers(
        self,
        causal_ordering: CausalOrdering,
        event_two: ReceivedEvent,
        event_three_a: ReceivedEvent,
        event_three_b: ReceivedEvent,
    ):
        # Record followers - only event_two follows event_one, but the three_x events follow
        # event_two
        await causal_ordering.record_follower(event_two)
        await causal_ordering.record_follower(event_three_a)
        await causal_ordering.record_follower(event_three_b)

        # Mock time to simulate events being old
        with patch("prefect.types._datetime.now") as mock_now:
            # We need to make the earliest received time old enough
            earliest_received = min(
                event_two.received, event_three_a.received, event_three_b.received
            )
            future_time = earliest_received + PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1)
            mock_now.return_value = future_time

            lost_followers = await causal_ordering.get_lost_followers()

            # Only event_two should be returned as lost because:
            # - event_two is waiting for event_one (which never arrived and is now past cutoff)
            # - event_three_a and event_three_b are waiting for event_two, but event_two is
            #   still in the system
            # However, since event_two gets cleaned up, event_three_a and event_three_b become
            # orphaned
            assert lost_followers == [event_two]

            # Lost followers should be cleaned up - check that waitlist is smaller
            assert len(getattr(causal_ordering, "_waitlist", [])) < 3


class TestCausalOrderingFlow:
    async def test_ordering_is_correct(
        self,
        causal_ordering: CausalOrdering,
        in_proper_order: Sequence[ReceivedEvent],
        example: Sequence[ReceivedEvent],
    ):
        processed: list[ReceivedEvent] = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        example = list(example)
        while example:
            try:
                await evaluate(example.pop(0))
            except EventArrivedEarly:
                continue

        assert processed == list(in_proper_order)

    async def test_wait_for_leader_no_follows(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Event without follows should not wait
        await causal_ordering.wait_for_leader(event_one)  # Should not raise

    async def test_wait_for_leader_self_follows(
        self, causal_ordering: CausalOrdering, event_one: ReceivedEvent
    ):
        # Event that follows itself should not wait
        event_one.follows = event_one.id
        await causal_ordering.wait_for_leader(event_one)  # Should not raise

    async def test_wait_for_leader_old_event(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # Old events should not wait - patch datetime.now to make event appear old
        with patch("prefect.types._datetime.now") as mock_now:
            future_time = event_two.received + PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1)
            mock_now.return_value = future_time
            await causal_ordering.wait_for_leader(event_two)  # Should not raise

    async def test_wait_for_leader_seen(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # Mark leader as seen
        await causal_ordering.record_event_as_seen(event_one)

        # Should not wait
        await causal_ordering.wait_for_leader(event_two)  # Should not raise

    async def test_wait_for_leader_in_flight(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # Mark leader as processing
        await causal_ordering.record_event_as_processing(event_one)

        # Start a task that will mark the leader as seen after a short delay
        async def mark_seen_later():
            await asyncio.sleep(0.1)
            await causal_ordering.record_event_as_seen(event_one)

        asyncio.create_task(mark_seen_later())

        # Should wait and then proceed
        await causal_ordering.wait_for_leader(event_two)  # Should not raise

    async def test_wait_for_leader_arrives_early(
        self, causal_ordering: CausalOrdering, event_two: ReceivedEvent
    ):
        # Leader not seen or processing - should raise EventArrivedEarly
        with pytest.raises(EventArrivedEarly) as exc_info:
            await causal_ordering.wait_for_leader(event_two)

        assert exc_info.value.event == event_two


class TestErrorConditions:
    async def test_max_depth_exceeded(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
    ):
        # Create a chain longer than MAX_DEPTH_OF_PRECEDING_EVENT
        worst_case: list[ReceivedEvent] = []
        previous = event_one

        for i in range(MAX_DEPTH_OF_PRECEDING_EVENT + 1):
            this_one = ReceivedEvent(
                event=f"event.{i}",
                resource=previous.resource,
                occurred=previous.occurred + timedelta(seconds=1),
                received=previous.received + timedelta(seconds=1),
                id=uuid4(),
                follows=previous.id,
            )
            worst_case.append(this_one)
            previous = this_one

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                pass

        # Process events in reverse order
        worst_case.reverse()
        while worst_case:
            try:
                await evaluate(worst_case.pop(0))
            except EventArrivedEarly:
                continue

        # In our implementation, the max depth is reached during follower processing
        # which causes the recursion to stop but doesn't raise an exception at the root level
        # This is different from the expected behavior, so let's verify it processes without
        # exception but logs the max depth message
        await evaluate(event_one)  # Should complete without raising MaxDepthExceeded

    async def test_only_looks_to_a_certain_horizon(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # Backdate the events so they happened before the lookback period
        event_one.received -= timedelta(days=1)
        event_two.received -= timedelta(days=1)

        processed: list[ReceivedEvent] = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        # Will not raise EventArrivedEarly because we're outside the range we can look back
        await evaluate(event_two)
        await evaluate(event_one)

        assert processed == [event_two, event_one]

    async def test_returns_lost_followers_in_occurred_order(
        self,
        causal_ordering: CausalOrdering,
        event_two: ReceivedEvent,
        event_three_a: ReceivedEvent,
        event_three_b: ReceivedEvent,
    ):
        processed: list[ReceivedEvent] = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        example = [event_three_a, event_three_b, event_two]
        while example:
            try:
                await evaluate(example.pop(0))
            except EventArrivedEarly:
                continue

        assert processed == []

        # Mock time to simulate events being lost
        with patch("prefect.types._datetime.now") as mock_now:
            future_time = event_two.received + PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1)
            mock_now.return_value = future_time

            # Because event_one never arrived, only event_two should be lost
            # (event_three_a and event_three_b are waiting for event_two, not event_one)
            lost_followers = await causal_ordering.get_lost_followers()
            assert lost_followers == [event_two]


class TestScopeIsolation:
    async def test_two_scopes_do_not_interfere(
        self,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # Clear all scopes to start fresh
        # ported: CausalOrdering.clear_all_scopes()  (each test has a fresh database)

        # A test that two instances of the same class with different scopes do not interfere
        # with each other
        ordering_one = CausalOrdering(scope="scope-one")
        ordering_two = CausalOrdering(scope="scope-two")

        # Verify they are different instances
        assert ordering_one is not ordering_two
        assert ordering_one.scope == "scope-one"
        assert ordering_two.scope == "scope-two"

        # Test seen events don't cross scopes
        await ordering_one.record_event_as_seen(event_one)
        assert await ordering_one.event_has_been_seen(event_one)
        assert not await ordering_two.event_has_been_seen(event_one)

        await ordering_two.record_event_as_seen(event_one)
        assert await ordering_one.event_has_been_seen(event_one)
        assert await ordering_two.event_has_been_seen(event_one)

        # Test followers don't cross scopes
        await ordering_one.record_follower(event_two)
        assert await ordering_one.get_followers(event_one) == [event_two]
        assert await ordering_two.get_followers(event_one) == []

        await ordering_two.record_follower(event_two)
        assert await ordering_one.get_followers(event_one) == [event_two]
        assert await ordering_two.get_followers(event_one) == [event_two]

        await ordering_one.forget_follower(event_two)
        assert await ordering_one.get_followers(event_one) == []
        assert await ordering_two.get_followers(event_one) == [event_two]

        await ordering_two.forget_follower(event_two)
        assert await ordering_one.get_followers(event_one) == []
        assert await ordering_two.get_followers(event_one) == []

    async def test_processing_events_isolated_by_scope(
        self,
        event_one: ReceivedEvent,
    ):
        # ported: CausalOrdering.clear_all_scopes()  (each test has a fresh database)

        ordering_a = CausalOrdering(scope="scope-a")
        ordering_b = CausalOrdering(scope="scope-b")

        # Start processing in scope A
        assert await ordering_a.record_event_as_processing(event_one)
        assert await ordering_a.event_has_started_processing(event_one)

        # Should not be processing in scope B
        assert not await ordering_b.event_has_started_processing(event_one)

        # Should be able to start processing same event in scope B
        assert await ordering_b.record_event_as_processing(event_one)
        assert await ordering_b.event_has_started_processing(event_one)

        # Stop processing in scope A
        await ordering_a.forget_event_is_processing(event_one)
        assert not await ordering_a.event_has_started_processing(event_one)

        # Should still be processing in scope B
        assert await ordering_b.event_has_started_processing(event_one)


# -- tests/events/server/test_db_ordering.py and prefect-redis's tests/test_ordering.py -----------


@pytest.fixture
def worst_case(event_one: ReceivedEvent) -> list[ReceivedEvent]:
    causal_order: list[ReceivedEvent] = []

    # The worst case scenario for exceeding the depth of the preceding event is to have
    # a long chain of events that are all linked to the same preceding event and then
    # for that sequence to arrive in reverse order.  The depth of resolving followers
    # will be the length of that chain.  It's +1 here so that we go over the limit.

    previous = event_one

    for i in range(MAX_DEPTH_OF_PRECEDING_EVENT + 1):
        this_one = ReceivedEvent(
            event=f"event.{i}",
            resource=previous.resource,
            occurred=previous.occurred + timedelta(seconds=1),
            id=uuid4(),
            follows=previous.id,
        )

        causal_order.append(this_one)
        previous = this_one

    return list(reversed(causal_order))


class TestFromDbOrderingModule:
    """tests/events/server/test_db_ordering.py (its ``cleared_automations`` and ``clear_db``
    marks are for Prefect's own database, which these tests do not use here)."""

    async def test_ordering_is_correct(
        self,
        causal_ordering: CausalOrdering,
        in_proper_order: Sequence[ReceivedEvent],
        example: Sequence[ReceivedEvent],
    ):
        processed: list[ReceivedEvent] = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        example = list(example)
        while example:
            try:
                await evaluate(example.pop(0))
            except EventArrivedEarly:
                continue

        assert processed == in_proper_order

    @pytest.mark.xfail(
        strict=True,
        reason="Prefect's modules disagree: db lets MaxDepthExceeded out of the leader's "
        "preceding_event_confirmed (this test); memory and redis catch it while replaying "
        "followers and log 'reached its max depth' (their test_max_depth_exceeded and "
        "test_recursion_is_contained), as the adapter does.",
    )
    async def test_recursion_is_contained(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        worst_case: list[ReceivedEvent],
    ):
        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                pass

        while worst_case:
            try:
                await evaluate(worst_case.pop(0))
            except EventArrivedEarly:
                continue

        with pytest.raises(MaxDepthExceeded):
            await evaluate(event_one)

    async def test_only_looks_to_a_certain_horizon(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # backdate the events so they happened before the lookback period
        event_one.received -= timedelta(days=1)
        event_two.received -= timedelta(days=1)

        processed: list[ReceivedEvent] = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        # will not raise EventArrivedEarly because we're outside the range we can look back
        await evaluate(event_two)
        await evaluate(event_one)

        assert processed == [event_two, event_one]

    async def test_returns_lost_followers_in_occurred_order(
        self,
        causal_ordering: CausalOrdering,
        event_two: ReceivedEvent,
        event_three_a: ReceivedEvent,
        event_three_b: ReceivedEvent,
        monkeypatch: pytest.MonkeyPatch,
    ):
        processed: list[ReceivedEvent] = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        example = [event_three_a, event_three_b, event_two]
        while example:
            try:
                await evaluate(example.pop(0))
            except EventArrivedEarly:
                continue

        assert processed == []

        # setting to a negative duration here simulates moving into the future
        monkeypatch.setattr(
            # ported: was "prefect.server.events.ordering.db.PRECEDING_EVENT_LOOKBACK"
            "prefect.server.events.ordering.PRECEDING_EVENT_LOOKBACK",
            timedelta(minutes=-1),
        )

        # because event one never arrived, these are all lost followers
        lost_followers = await causal_ordering.get_lost_followers()
        assert lost_followers == [event_two, event_three_a, event_three_b]

    async def test_two_instances_do_not_interfere(
        self,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # A partial test that two instances of the same class do not interfere with each
        # other. This does not test every piece of functionality, but illustrates that
        # prefixes are used.

        ordering_one = CausalOrdering(scope="one")
        ordering_two = CausalOrdering(scope="two")

        await ordering_one.record_event_as_seen(event_one)
        assert await ordering_one.event_has_been_seen(event_one)
        assert not await ordering_two.event_has_been_seen(event_one)

        await ordering_two.record_event_as_seen(event_one)
        assert await ordering_one.event_has_been_seen(event_one)
        assert await ordering_two.event_has_been_seen(event_one)

        await ordering_one.record_follower(event_two)
        assert await ordering_one.get_followers(event_one) == [event_two]
        assert await ordering_two.get_followers(event_one) == []

        await ordering_two.record_follower(event_two)
        assert await ordering_one.get_followers(event_one) == [event_two]
        assert await ordering_two.get_followers(event_one) == [event_two]

        await ordering_one.forget_follower(event_two)
        assert await ordering_one.get_followers(event_one) == []
        assert await ordering_two.get_followers(event_one) == [event_two]

        await ordering_two.forget_follower(event_two)
        assert await ordering_one.get_followers(event_one) == []
        assert await ordering_two.get_followers(event_one) == []


class TestFromRedisOrderingModule:
    """src/integrations/prefect-redis/tests/test_ordering.py, the protocol-only tests."""

    async def test_ordering_is_correct(
        self,
        causal_ordering: CausalOrdering,
        in_proper_order: Sequence[ReceivedEvent],
        example: Sequence[ReceivedEvent],
    ):
        processed = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        example = list(example)
        while example:
            try:
                await evaluate(example.pop(0))
            except EventArrivedEarly:
                continue

        assert processed == in_proper_order

    async def test_recursion_is_contained(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        worst_case: list[ReceivedEvent],
        caplog: pytest.LogCaptureFixture,
    ):
        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                pass

        while worst_case:
            try:
                await evaluate(worst_case.pop(0))
            except EventArrivedEarly:
                continue

        # TODO - should this raise instead?
        with caplog.at_level("INFO"):
            await evaluate(event_one)

        assert (
            f"reached its max depth of {MAX_DEPTH_OF_PRECEDING_EVENT} followers processed"
            in caplog.text
        )

    async def test_only_looks_to_a_certain_horizon(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # backdate the events so they happened before the lookback period
        event_one.received -= timedelta(days=1)
        event_two.received -= timedelta(days=1)

        processed = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        # will not raise EventArrivedEarly because we're outside the range we can look back
        await evaluate(event_two)
        await evaluate(event_one)

        assert processed == [event_two, event_one]

    async def test_returns_lost_followers_in_occurred_order(
        self,
        causal_ordering: CausalOrdering,
        event_two: ReceivedEvent,
        event_three_a: ReceivedEvent,
        event_three_b: ReceivedEvent,
        monkeypatch: pytest.MonkeyPatch,
    ):
        processed = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        example = [event_three_a, event_three_b, event_two]
        while example:
            try:
                await evaluate(example.pop(0))
            except EventArrivedEarly:
                continue

        assert processed == []

        # setting to a negative duration here simulates moving into the future
        monkeypatch.setattr(
            # ported: was "prefect_redis.ordering.PRECEDING_EVENT_LOOKBACK"
            "prefect.server.events.ordering.PRECEDING_EVENT_LOOKBACK",
            timedelta(minutes=-1),
        )

        # because event one never arrived, these are all lost followers
        lost_followers = await causal_ordering.get_lost_followers()
        assert lost_followers == [event_two, event_three_a, event_three_b]

    async def test_two_instances_do_not_interfere(
        self,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        # A partial test that two instances of the same class do not interfere with each
        # other.  This does not test every piece of functionality, but illustrates that
        # prefixes are used.

        ordering_one = CausalOrdering(scope="one")
        ordering_two = CausalOrdering(scope="two")

        await ordering_one.record_event_as_seen(event_one)
        assert await ordering_one.event_has_been_seen(event_one)
        assert not await ordering_two.event_has_been_seen(event_one)

        await ordering_two.record_event_as_seen(event_one)
        assert await ordering_one.event_has_been_seen(event_one)
        assert await ordering_two.event_has_been_seen(event_one)

        await ordering_one.record_follower(event_two)
        assert await ordering_one.get_followers(event_one) == [event_two]
        assert await ordering_two.get_followers(event_one) == []

        await ordering_two.record_follower(event_two)
        assert await ordering_one.get_followers(event_one) == [event_two]
        assert await ordering_two.get_followers(event_one) == [event_two]

        await ordering_one.forget_follower(event_two)
        assert await ordering_one.get_followers(event_one) == []
        assert await ordering_two.get_followers(event_one) == [event_two]

        await ordering_two.forget_follower(event_two)
        assert await ordering_one.get_followers(event_one) == []
        assert await ordering_two.get_followers(event_one) == []

    @pytest.mark.xfail(
        strict=True,
        reason="Prefect's modules disagree: redis's event_is_processing yields an "
        "EventProcessingCompletion whose .followers it fills on exit; memory's yields None (as "
        "the adapter's does); db has no event_is_processing.",
    )
    async def test_atomic_completion_finds_parked_followers(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
    ):
        """Test that the atomic completion finds followers that parked before completion.

        This tests the fix for the race condition where followers could be orphaned
        if they parked between the leader's DEL processing and SMEMBERS followers.
        With the Lua script fix, SET seen + SMEMBERS followers + DEL processing
        happen atomically, preventing this race.
        """
        # First, have the follower park itself (simulating it arriving before leader finished)
        await causal_ordering.record_follower(event_two)

        # Verify the follower is parked
        followers = await causal_ordering.get_followers(event_one)
        assert event_two in followers

        # Now have the leader complete using the atomic completion
        # This uses complete_event_and_get_followers internally via the context manager
        async with causal_ordering.event_is_processing(event_one) as completion:
            # The completion object will be populated with followers after the context exits
            pass

        # The completion should have found the parked follower
        assert len(completion.followers) == 1
        assert completion.followers[0].id == event_two.id

    async def test_followers_processed_by_leader_are_marked_as_seen(
        self,
        causal_ordering: CausalOrdering,
        event_one: ReceivedEvent,
        event_two: ReceivedEvent,
        event_three_a: ReceivedEvent,
    ):
        """Test that when a leader processes parked followers, those followers are
        marked as seen so that downstream events can find them.

        This is a regression test for a bug where followers processed by leaders via
        handler(waiter) were never marked as seen because they bypassed
        event_is_processing. Downstream events following those followers would park
        and become orphaned until PRECEDING_EVENT_LOOKBACK expiration.
        """
        processed = []

        async def evaluate(event: ReceivedEvent, depth: int = 0) -> None:
            async with causal_ordering.preceding_event_confirmed(evaluate, event, depth=depth):
                processed.append(event)

        # Send events out of order: event_two and event_three_a arrive before event_one
        # event_two follows event_one, event_three_a follows event_two
        for event in [event_two, event_three_a]:
            try:
                await evaluate(event)
            except EventArrivedEarly:
                pass

        # Nothing processed yet — both are parked
        assert processed == []

        # Now event_one arrives — it should process event_one, then event_two as a
        # follower, then event_three_a as event_two's follower
        await evaluate(event_one)

        assert event_one in processed
        assert event_two in processed
        assert event_three_a in processed

        # The key assertion: event_two should be marked as seen so that event_three_a
        # (which follows event_two) could find it
        assert await causal_ordering.event_has_been_seen(event_two) is True
        # event_one is also seen (set by the Lua script in event_is_processing)
        assert await causal_ordering.event_has_been_seen(event_one) is True
