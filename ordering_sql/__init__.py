"""ordering-sql: a durable causal ordering engine for event consumers.

Events that declare that they ``follow`` another event are held back until their leader has
been handled, and replayed then; the bookkeeping lives in SQLite or Postgres, so it survives
restarts and is shared by every process on the same database.
"""

from ordering_sql._version import __version__ as __version__
from ordering_sql.engine import Batch, CausalOrdering, EventHandler
from ordering_sql.errors import (
    ClosedError,
    ConfigurationError,
    DatabaseUnavailableError,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
    OrderingError,
    SchemaNotReadyError,
    StoreError,
)
from ordering_sql.migration import migrate
from ordering_sql.models import Event, ReceivedEvent, Resource
from ordering_sql.settings import (
    IN_FLIGHT_EVENT_TIMEOUT,
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    PROCESSED_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
    Durations,
)
from ordering_sql.store import dispose_engines

__all__ = [
    "IN_FLIGHT_EVENT_TIMEOUT",
    "MAX_DEPTH_OF_PRECEDING_EVENT",
    "PRECEDING_EVENT_LOOKBACK",
    "PROCESSED_EVENT_LOOKBACK",
    "SEEN_EXPIRATION",
    "Batch",
    "CausalOrdering",
    "ClosedError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "Durations",
    "Event",
    "EventArrivedEarly",
    "EventBeingProcessed",
    "EventHandler",
    "LeaseLostError",
    "MaxDepthExceeded",
    "OrderingError",
    "ReceivedEvent",
    "Resource",
    "SchemaNotReadyError",
    "StoreError",
    "dispose_engines",
    "migrate",
]
