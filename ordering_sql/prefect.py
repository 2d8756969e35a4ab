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

import os
from typing import Any, ClassVar

try:
    from prefect.logging import get_logger
    from prefect.server.events import ordering as prefect_ordering
    from prefect.server.events.ordering import memory as prefect_memory
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "ordering_sql.prefect needs Prefect: pip install 'ordering-sql[prefect]'"
    raise ImportError(msg) from exc

from ordering_sql import engine, errors
from ordering_sql.models import EventLike
from ordering_sql.settings import ENV_DATABASE_URL

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


#: Prefect's ordering constants, as the durations of every instance.
_PREFECT_DURATIONS: dict[str, Any] = {
    "preceding_event_lookback": prefect_ordering.PRECEDING_EVENT_LOOKBACK,
    "processed_event_lookback": prefect_ordering.PROCESSED_EVENT_LOOKBACK,
    "seen_expiration": prefect_ordering.SEEN_EXPIRATION,
    "max_depth_of_preceding_event": prefect_ordering.MAX_DEPTH_OF_PRECEDING_EVENT,
    "in_flight_event_timeout": prefect_memory.IN_FLIGHT_EVENT_TIMEOUT,
}


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

    def __init__(self, scope: str) -> None:
        super().__init__(
            scope,
            database_url=database_url(),
            event_type=ReceivedEvent,
            migrate_on_first_use=True,
            **_PREFECT_DURATIONS,
        )

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
