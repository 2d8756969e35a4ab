"""Durable causal ordering for a Prefect server.

Set ``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=ordering_sql.prefect`` and Prefect's triggers
service builds this module's ``CausalOrdering(scope="triggers")`` for every event, in place of
its in-memory module. Parked followers and seen marks then live in database tables, so they
survive a restart, and several Prefect servers on one database share them.

The database is ``ORDERING_SQL_DATABASE_URL`` if set, else Prefect's own database
(``PREFECT_SERVER_DATABASE_CONNECTION_URL``, or Prefect's default SQLite file). The ordering
tables and their Alembic version table (``ordering_sql_version``) sit beside Prefect's and never
touch them. The first use migrates the ordering schema if it is missing; servers starting
together take turns (a Postgres advisory lock, or SQLite's write lock).

Needs the extra: ``pip install 'ordering-sql[prefect]'``.
"""

from __future__ import annotations

import functools
import os
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

try:
    from prefect.logging import get_logger
    from prefect.server.events import ordering as prefect_ordering
    from prefect.server.events.ordering import memory as prefect_memory
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
    from prefect.types import _datetime as prefect_datetime
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "ordering_sql.prefect needs Prefect: pip install 'ordering-sql[prefect]'"
    raise ImportError(msg) from exc

from ordering_sql import engine, errors
from ordering_sql.models import EventLike
from ordering_sql.settings import ENV_DATABASE_URL, Durations

__all__ = [
    "CausalOrdering",
    "EventArrivedEarly",
    "EventBeingProcessed",
    "MaxDepthExceeded",
    "database_url",
]

logger = get_logger(__name__)


class EventArrivedEarly(errors.EventArrivedEarly, prefect_ordering.EventArrivedEarly):
    """Both ordering-sql's and Prefect's ``EventArrivedEarly``: either ``except`` catches it."""


class MaxDepthExceeded(errors.MaxDepthExceeded, prefect_ordering.MaxDepthExceeded):
    """Both ordering-sql's and Prefect's ``MaxDepthExceeded``."""


class EventBeingProcessed(errors.EventBeingProcessed, prefect_memory.EventBeingProcessed):
    """Both ordering-sql's and Prefect's (in-memory module's) ``EventBeingProcessed``."""


def database_url() -> str:
    """``ORDERING_SQL_DATABASE_URL`` if set, else the URL of Prefect's own database."""
    return os.environ.get(ENV_DATABASE_URL) or str(PREFECT_API_DATABASE_CONNECTION_URL.value())


def _prefect_durations() -> Durations:
    """Prefect's ordering constants as durations, read where and when Prefect's modules read
    them (``prefect.server.events.ordering``, at each use), so a patched constant counts."""
    return _durations_of(
        prefect_ordering.PRECEDING_EVENT_LOOKBACK,
        prefect_ordering.PROCESSED_EVENT_LOOKBACK,
        prefect_ordering.SEEN_EXPIRATION,
        prefect_ordering.MAX_DEPTH_OF_PRECEDING_EVENT,
        prefect_memory.IN_FLIGHT_EVENT_TIMEOUT,
    )


@functools.lru_cache(maxsize=8)
def _durations_of(
    lookback: timedelta,
    processed: timedelta,
    seen: timedelta,
    max_depth: int,
    in_flight: timedelta,
) -> Durations:
    values: dict[str, Any] = {
        "preceding_event_lookback": lookback,
        "processed_event_lookback": processed,
        "seen_expiration": seen,
        "max_depth_of_preceding_event": max_depth,
        "in_flight_event_timeout": in_flight,
    }
    if lookback > timedelta(0):
        return Durations.build(**values)
    # Prefect's own tests make every parked follower lost at once with a lookback below zero;
    # its modules take it as it is (the horizon is then in the future), and so does this one.
    usual = Durations.build(**{**values, "preceding_event_lookback": timedelta(seconds=1)})
    return usual.model_copy(update={"preceding_event_lookback": lookback})


class CausalOrdering(engine.CausalOrdering[ReceivedEvent], prefect_ordering.CausalOrdering):
    """Prefect's ``CausalOrdering``, kept in database tables.

    Built with ``scope`` alone, as Prefect builds it. Stores and returns Prefect's own
    ``ReceivedEvent``; raises exceptions that are Prefect's as well as ordering-sql's; logs
    Prefect's messages through Prefect's logging. Every method of Prefect's in-memory module is
    here (``clear`` and ``clear_all_scopes`` are coroutines, since they reach the database).

    Building one does no I/O and is cheap; all instances on one URL share one engine per event
    loop, so building one per event (as Prefect's triggers service does) costs no connection.
    """

    arrived_early_error: ClassVar[type[errors.EventArrivedEarly]] = EventArrivedEarly
    being_processed_error: ClassVar[type[errors.EventBeingProcessed]] = EventBeingProcessed
    max_depth_error: ClassVar[type[errors.MaxDepthExceeded]] = MaxDepthExceeded
    #: Prefect's consumer acknowledges a message only when ``EventArrivedEarly`` is raised and
    #: treats every other exception as a failure (an ERROR, retries, a dead letter). An event
    #: that another server holds right now is therefore waited for, then acknowledged, instead
    #: of raising ``EventBeingProcessed`` (see ``engine.CausalOrdering.wait_for_holder``).
    wait_for_holder: ClassVar[bool] = True

    def __init__(self, scope: str) -> None:
        super().__init__(
            scope,
            database_url=database_url(),
            event_type=ReceivedEvent,
            migrate_on_first_use=True,
        )

    @property
    def durations(self) -> Durations:
        """Prefect's ordering constants (its lookbacks, depth and in-flight wait)."""
        return _prefect_durations()

    @durations.setter
    def durations(self, _value: Durations) -> None:
        pass  # the base class sets its defaults; Prefect's constants are read at each use

    def _now(self) -> datetime:
        """The database's clock, moved as far as Prefect's own clock stands from the real one.

        Prefect's tests move time by patching ``prefect.types._datetime.now``; this follows
        them, and stays on the clock every server shares (the database's) when nothing is
        patched (the two readings then differ by microseconds).
        """
        moved = prefect_datetime.now("UTC") - datetime.now(UTC)
        return super()._now() + moved

    def _log(self, level: int, event: EventLike, message: str, *args: Any, action: str) -> None:
        # Prefect's wording and fields, so its log filters and dashboards keep working.
        event_name = getattr(event, "event", None)
        resource = getattr(event, "resource", None)
        resource_id = getattr(resource, "id", None)
        logger.log(
            level,
            "Event %r (%s) for %r " + message,
            event_name,
            event.id,
            resource_id,
            *args,
            extra={
                "event_id": event.id,
                "follows": event.follows,
                "resource_id": resource_id,
                "action": action,
                "scope": self.scope,
            },
        )
