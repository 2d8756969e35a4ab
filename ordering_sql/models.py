"""The event value objects that cross the API boundary.

Field names and JSON shape follow the reference engine's events, so a JSON line written by a
producer of those events validates here unchanged. Datetimes must carry a timezone: a naive
datetime is ambiguous across machines, and ordering decisions compare times across machines.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, cast, runtime_checkable
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, RootModel, model_validator

from ordering_sql.errors import ConfigurationError
from ordering_sql.settings import shortened

__all__ = [
    "Event",
    "EventLike",
    "HasId",
    "ReceivedEvent",
    "Resource",
    "check_event",
    "follows_something",
    "stored_form",
]

RESOURCE_ID_LABEL = "prefect.resource.id"


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class Resource(RootModel[dict[str, str]]):
    """A set of string labels naming a resource; ``prefect.resource.id`` must be present."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _requires_id(self) -> Resource:
        if not self.root.get(RESOURCE_ID_LABEL):
            msg = f"A resource needs a non-empty {RESOURCE_ID_LABEL!r} label; got {self.root!r}."
            raise ValueError(msg)
        return self

    @property
    def id(self) -> str:
        """The resource's ``prefect.resource.id`` label (always present and non-empty)."""
        return self.root[RESOURCE_ID_LABEL]

    def __getitem__(self, label: str) -> str:
        return self.root[label]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def get(self, label: str, default: str | None = None) -> str | None:
        """Returns the value of ``label``, or ``default`` if the resource has no such label."""
        return self.root.get(label, default)

    def items(self) -> Any:
        """Returns the ``(label, value)`` pairs, as ``dict.items()`` does."""
        return self.root.items()

    def as_dict(self) -> Mapping[str, str]:
        """Returns a new ``dict`` of the labels (a copy: changing it changes nothing here)."""
        return dict(self.root)


class Event(BaseModel):
    """Something that happened to a resource; may declare the event it ``follows``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    occurred: AwareDatetime
    event: str = Field(min_length=1)
    resource: Resource
    related: list[Resource] = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID = Field(default_factory=uuid4)
    follows: UUID | None = None


class ReceivedEvent(Event):
    """An event as a consumer received it; ``received`` defaults to now (UTC)."""

    received: AwareDatetime = Field(default_factory=utc_now)


@runtime_checkable
class HasId(Protocol):
    """Anything with an event ``id``: enough to look up an event's marks."""

    @property
    def id(self) -> UUID: ...


def check_event(event: Any) -> EventLike:
    """``event`` if the engine can order it; ``ConfigurationError`` (raised before any I/O) if
    not: its ``id`` must be a UUID, ``follows`` a UUID or None, and ``occurred`` and
    ``received`` timezone-aware datetimes (a naive time means a different instant on each
    machine, so it cannot be ordered or stored unambiguously)."""
    problems = []
    if not isinstance(getattr(event, "id", None), UUID):
        problems.append(f"its id is {shortened(getattr(event, 'id', None))}, not a UUID")
    follows = getattr(event, "follows", None)
    if follows is not None and not isinstance(follows, UUID):
        problems.append(f"it follows {shortened(follows)}, not a UUID")
    for name in ("occurred", "received"):
        value = getattr(event, name, None)
        if not isinstance(value, datetime):
            problems.append(f"its {name} is {shortened(value)}, not a datetime")
        elif value.tzinfo is None or value.utcoffset() is None:
            problems.append(f"its {name} {value.isoformat()} has no timezone")
    if problems:
        msg = f"Cannot order {type(event).__name__} {shortened(getattr(event, 'id', event))}: "
        msg += "; ".join(problems) + "."
        raise ConfigurationError(msg)
    return cast("EventLike", event)


def stored_form(event: EventLike) -> str:
    """The JSON an event is kept as while it waits for its leader (``event_type`` reads it
    back); ``ConfigurationError`` if the event cannot be serialised (a payload value JSON has no
    form for, say), raised before the event is taken, so its message is never acknowledged."""
    try:
        return event.model_dump_json()
    except (ValueError, TypeError) as exc:  # pydantic's PydanticSerializationError is one
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"Event {event.id} cannot be stored to wait for its leader: {first}"
        raise ConfigurationError(msg) from exc


class EventLike(Protocol):
    """What the engine reads from an event; any pydantic model with these fields will do."""

    @property
    def id(self) -> UUID: ...

    @property
    def follows(self) -> UUID | None: ...

    @property
    def occurred(self) -> datetime: ...

    @property
    def received(self) -> datetime: ...

    def model_dump_json(self) -> str: ...


def follows_something(event: EventLike) -> bool:
    """Whether ``event`` waits for a leader: it follows an event other than itself (an event
    that follows itself follows nothing, as in the reference)."""
    return event.follows is not None and event.follows != event.id
