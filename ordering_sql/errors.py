"""Every exception ordering-sql raises.

The tree, grouped by what the caller can do about it::

    OrderingError
    ├── EventArrivedEarly        the event is parked until its leader is handled: acknowledge it
    ├── EventBeingProcessed      another handler holds the event right now, or it was already seen
    ├── MaxDepthExceeded         follower replay went deeper than the configured maximum
    ├── LeaseLostError           this worker's processing lease was taken over; do not commit work
    ├── ConfigurationError       a bad URL, duration, clock or argument: fix the call
    ├── ClosedError              the CausalOrdering instance was closed
    ├── SchemaNotReadyError      tables missing or older than the code: `ordering-sql migrate`
    └── StoreError               the database failed (after bounded retries for transient faults)
        └── DatabaseUnavailableError   the database could not be reached at all

The first three keep the names and meaning of the reference in-memory engine, so code written
against it catches the same exceptions.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

__all__ = [
    "ClosedError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "EventArrivedEarly",
    "EventBeingProcessed",
    "LeaseLostError",
    "MaxDepthExceeded",
    "OrderingError",
    "SchemaNotReadyError",
    "StoreError",
]


class OrderingError(Exception):
    """Root of every exception raised by ordering-sql."""


class _EventError(OrderingError):
    """An error about one event; the event is kept as ``.event``."""

    def __init__(self, event: Any) -> None:
        super().__init__(event)
        self.event = event

    @property
    def event_id(self) -> UUID | None:
        """The id of the event the error is about, or None if it has none."""
        return getattr(self.event, "id", None)

    def __str__(self) -> str:
        return f"{type(self).__name__}: event {self.event_id}"


class EventArrivedEarly(_EventError):
    """The event's leader has not been handled yet; the event was parked and will be replayed."""


class EventBeingProcessed(_EventError):
    """The event is being handled elsewhere right now (or has already been handled).

    ``seen`` says which, as the step that refused the lease found it: True if the event was
    already handled (a duplicate: acknowledge it), False if another worker holds it (redeliver
    it later).
    """

    def __init__(self, event: Any, *, seen: bool = False) -> None:
        super().__init__(event)
        self.seen = seen


class MaxDepthExceeded(_EventError):
    """Replaying followers went deeper than ``max_depth_of_preceding_event``."""


class LeaseLostError(OrderingError):
    """This worker's processing lease expired and was taken over, or the event is already done.

    Raised when completing or releasing with an owner token that no longer holds the lease, so a
    slow worker cannot overwrite the work of the worker that took over.
    """

    def __init__(self, message: str, *, scope: str, event_id: UUID) -> None:
        super().__init__(message)
        self.scope = scope
        self.event_id = event_id


class ConfigurationError(OrderingError, ValueError):
    """An argument, URL, duration or environment variable is invalid."""


class ClosedError(OrderingError):
    """The instance was closed and cannot be used any more."""


class StoreError(OrderingError):
    """The database failed; ``.url`` names it with the password masked."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class DatabaseUnavailableError(StoreError):
    """The database could not be reached (wrong host, server down, bad credentials, bad path)."""


class SchemaNotReadyError(OrderingError):
    """The ordering tables are missing or at an older revision than this version of the code."""

    def __init__(
        self, message: str, *, url: str | None = None, current: str | None, expected: str
    ) -> None:
        super().__init__(message)
        self.url = url
        self.current = current
        self.expected = expected
