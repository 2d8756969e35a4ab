"""``ordering_sql.prefect`` as Prefect loads it, with Prefect's own events, on both backends.

Each ordering here comes from Prefect's loader, ``get_triggers_causal_ordering()``, with
``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=ordering_sql.prefect``; the database is the test's
fresh one, through ``ORDERING_SQL_DATABASE_URL``. Where it helps, the same scenario also runs on
Prefect's in-memory module, and the two must agree.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from prefect.server.events import ordering as prefect_ordering
from prefect.server.events.ordering import get_triggers_causal_ordering
from prefect.server.events.ordering import memory as prefect_memory
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.settings import PREFECT_SERVER_EVENTS_CAUSAL_ORDERING, temporary_settings

import ordering_sql
import ordering_sql.prefect
from tests.prefect.support import Recorder, chain, family, make_event

OUR_LOGGER = "prefect.ordering_sql.prefect"
PREFECTS_LOGGER = "prefect.server.events.ordering.memory"

ORDERS = {
    "proper": ("one", "two", "three_a", "three_b"),
    "jumbled": ("three_a", "one", "three_b", "two"),
    "backwards": ("three_b", "three_a", "two", "one"),
}


@pytest.fixture
async def ordering(
    prefect_settings: dict[Any, Any], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The ordering Prefect's triggers service would build, on this test's database."""
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", database_url)
    built = get_triggers_causal_ordering()
    yield built
    await built.close()
    await ordering_sql.dispose_engines()


@pytest.fixture
def prefects_memory_ordering(prefect_settings: dict[Any, Any]) -> Iterator[Any]:
    """Prefect's own in-memory ordering (a per-scope singleton), emptied before and after."""
    prefect_memory.CausalOrdering.clear_all_scopes()
    updates = {PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: "prefect.server.events.ordering.memory"}
    with temporary_settings(updates=updates):
        yield get_triggers_causal_ordering()
    prefect_memory.CausalOrdering.clear_all_scopes()


def _names(events: dict[str, ReceivedEvent], ids: list[UUID]) -> list[str]:
    by_id = {event.id: name for name, event in events.items()}
    return [by_id[i] for i in ids]


# -- loading ---------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_prefects_loader_builds_our_class_for_the_triggers_scope(
    prefect_settings: dict[Any, Any],
) -> None:
    assert isinstance(ordering_sql.prefect, prefect_ordering.CausalOrderingModule)
    built = get_triggers_causal_ordering()
    assert type(built) is ordering_sql.prefect.CausalOrdering
    assert isinstance(built, prefect_ordering.CausalOrdering)
    assert built.scope == "triggers"
    assert not inspect.isabstract(ordering_sql.prefect.CausalOrdering)


@pytest.mark.sqlite
def test_every_method_of_prefects_memory_module_is_offered() -> None:
    """Same names, and coroutines where Prefect's are (``clear*`` reach the database here)."""
    ours = ordering_sql.prefect.CausalOrdering
    for name, prefects in vars(prefect_memory.CausalOrdering).items():
        if name.startswith("_") or (
            not callable(prefects) and not isinstance(prefects, classmethod)
        ):
            continue
        assert hasattr(ours, name), name
        if inspect.iscoroutinefunction(prefects):
            assert inspect.iscoroutinefunction(getattr(ours, name)), name
    assert inspect.iscoroutinefunction(ours.clear)
    assert inspect.iscoroutinefunction(ours.clear_all_scopes)


@pytest.mark.sqlite
def test_durations_are_prefects_constants(prefect_settings: dict[Any, Any]) -> None:
    durations = get_triggers_causal_ordering().durations
    assert durations.preceding_event_lookback == prefect_ordering.PRECEDING_EVENT_LOOKBACK
    assert durations.processed_event_lookback == prefect_ordering.PROCESSED_EVENT_LOOKBACK
    assert durations.seen_expiration == prefect_ordering.SEEN_EXPIRATION
    assert durations.max_depth_of_preceding_event == prefect_ordering.MAX_DEPTH_OF_PRECEDING_EVENT
    assert durations.in_flight_event_timeout == prefect_memory.IN_FLIGHT_EVENT_TIMEOUT


# -- the reference behaviours, with Prefect's events ------------------------------------------


@pytest.mark.parametrize("order", list(ORDERS))
async def test_delivery_orders_agree_with_prefects_memory_module(
    ordering: Any, prefects_memory_ordering: Any, order: str
) -> None:
    events = family()
    ours, prefects = Recorder(ordering), Recorder(prefects_memory_ordering)
    for name in ORDERS[order]:
        await ours.deliver(events[name])
        await prefects.deliver(events[name])
    assert _names(events, ours.handled) == ["one", "two", "three_a", "three_b"]
    assert ours.handled == prefects.handled
    for event in events.values():
        assert await ordering.event_has_been_seen(event)
        assert await ordering.get_followers(event) == []
    # A redelivery after the fact is recognised as seen and not handled again.
    await ours.deliver(events["two"])
    assert len(ours.handled) == 4


async def test_parked_follower_is_kept_as_prefects_received_event(ordering: Any) -> None:
    events = family()
    recorder = Recorder(ordering)
    with pytest.raises(prefect_ordering.EventArrivedEarly) as info:
        await recorder.handler(events["two"])
    assert info.value.event is events["two"]
    stored = await ordering.get_followers(events["one"])
    assert stored == [events["two"]]
    assert type(stored[0]) is ReceivedEvent
    by_id = await ordering.followers_by_id([events["two"].id, events["three_a"].id])
    assert by_id == [events["two"]]
    assert type(by_id[0]) is ReceivedEvent


async def test_lost_followers_come_back_in_occurred_order(ordering: Any) -> None:
    """A follower waiting since before the 15-minute lookback is lost; a younger one is not."""
    now = datetime.now(UTC)
    old = now - prefect_ordering.PRECEDING_EVENT_LOOKBACK - timedelta(seconds=1)
    missing = make_event()
    later = make_event(follows=missing, occurred=now - timedelta(minutes=20), received=old)
    earlier = make_event(follows=missing, occurred=now - timedelta(minutes=21), received=old)
    young = make_event(follows=missing, received=now - timedelta(minutes=14))
    for follower in (later, earlier, young):
        await ordering.record_follower(follower)

    lost = await ordering.get_lost_followers()
    assert lost == [earlier, later]
    assert all(type(event) is ReceivedEvent for event in lost)
    assert await ordering.get_lost_followers() == [], "handed out once: claimed while handled"
    for follower in lost:
        async with ordering.event_is_processing(follower):
            pass  # handled as if their leader had come
    assert await ordering.get_followers(missing) == [young]


async def test_event_older_than_the_lookback_goes_straight_through(ordering: Any) -> None:
    now = datetime.now(UTC)
    lookback = prefect_ordering.PRECEDING_EVENT_LOOKBACK
    old = make_event(follows=make_event(), received=now - lookback - timedelta(seconds=1))
    recorder = Recorder(ordering)
    await recorder.deliver(old)
    assert recorder.handled == [old.id]

    young = make_event(follows=make_event(), received=now - lookback + timedelta(seconds=30))
    with pytest.raises(prefect_ordering.EventArrivedEarly):
        await recorder.handler(young)
    assert recorder.handled == [old.id]


async def test_replay_depth_is_prefects_twenty(
    ordering: Any, prefects_memory_ordering: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain of 23 delivered backwards: the leader and 20 replayed followers are handled."""
    events = chain(23)
    ours, prefects = Recorder(ordering), Recorder(prefects_memory_ordering)
    for event in reversed(events[1:]):
        await ours.deliver(event)
        await prefects.deliver(event)
    assert ours.handled == []
    with caplog.at_level(logging.INFO, logger=OUR_LOGGER):
        await ours.deliver(events[0])
    await prefects.deliver(events[0])
    assert ours.handled == [event.id for event in events[:21]]
    assert ours.handled == prefects.handled
    assert "reached its max depth of 20 followers processed." in caplog.text

    with pytest.raises(prefect_ordering.MaxDepthExceeded) as info:
        async with ordering.preceding_event_confirmed(ours.handler, events[22], 21):
            pytest.fail("the body must not run past the max depth")
    assert info.value.event is events[22]


async def test_scopes_are_independent(ordering: Any) -> None:
    events = family()
    other = ordering_sql.prefect.CausalOrdering(scope="another-consumer")
    try:
        await Recorder(ordering).deliver(events["one"])
        await Recorder(ordering).deliver(events["three_a"])
        assert await ordering.event_has_been_seen(events["one"])
        assert not await other.event_has_been_seen(events["one"])
        assert await other.get_followers(events["two"]) == []

        # The other scope has not seen "one", so its "two" waits there.
        with pytest.raises(prefect_ordering.EventArrivedEarly):
            await Recorder(other).handler(events["two"])
        assert await other.get_followers(events["one"]) == [events["two"]]
        assert await ordering.get_followers(events["one"]) == []

        await other.clear()
        assert await ordering.event_has_been_seen(events["one"])
        assert await ordering.get_followers(events["two"]) == [events["three_a"]]
    finally:
        await other.close()


# -- Prefect's exceptions and log lines --------------------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def test_a_duplicate_in_flight_raises_prefects_event_being_processed(ordering: Any) -> None:
    event = make_event()
    async with ordering.event_is_processing(event):
        assert await ordering.event_has_started_processing(event)
        with pytest.raises(prefect_memory.EventBeingProcessed) as info:
            async with ordering.event_is_processing(event):
                pytest.fail("a second holder must not run")
        assert info.value.event is event
    assert not await ordering.event_has_started_processing(event)
    assert await ordering.event_has_been_seen(event)


@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def test_processing_marks_and_wait_for_leader(ordering: Any) -> None:
    leader = make_event()
    follower = make_event(follows=leader)
    assert await ordering.record_event_as_processing(leader)
    assert not await ordering.record_event_as_processing(leader)
    assert await ordering.event_has_started_processing(leader.id)
    await ordering.forget_event_is_processing(leader)
    assert not await ordering.event_has_started_processing(leader)

    with pytest.raises(prefect_ordering.EventArrivedEarly):
        await ordering.wait_for_leader(follower)
    assert await ordering.get_followers(leader) == [follower]
    await ordering.forget_follower(follower)
    assert await ordering.get_followers(leader) == []

    await ordering.record_event_as_seen(leader)
    await ordering.wait_for_leader(follower)  # returns: the leader was seen


@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def test_early_follower_is_logged_exactly_as_prefect_logs_it(
    ordering: Any, prefects_memory_ordering: Any, caplog: pytest.LogCaptureFixture
) -> None:
    leader = make_event(name="order.placed", resource="order.7")
    follower = make_event(follows=leader, name="order.paid", resource="order.7")
    with caplog.at_level(logging.INFO, logger=OUR_LOGGER):
        await Recorder(ordering).deliver(follower)
    with caplog.at_level(logging.INFO, logger=PREFECTS_LOGGER):
        await Recorder(prefects_memory_ordering).deliver(follower)

    ours = [r for r in caplog.records if r.name == OUR_LOGGER]
    prefects = [r for r in caplog.records if r.name == PREFECTS_LOGGER]
    assert len(ours) == len(prefects) == 1
    expected = (
        f"Event 'order.paid' ({follower.id}) for 'order.7' arrived before the event it "
        f"follows {leader.id}"
    )
    assert ours[0].getMessage() == prefects[0].getMessage() == expected
    assert ours[0].msg == prefects[0].msg  # the same format string: log filters keep matching
    for field in ("event_id", "follows", "resource_id"):
        assert getattr(ours[0], field) == getattr(prefects[0], field), field
