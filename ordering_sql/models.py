"""The event value objects that cross the API boundary.

Field names and JSON shape follow the reference engine's events, so a JSON line written by a
producer of those events validates here unchanged. Datetimes must carry a timezone: a naive
datetime is ambiguous across machines, and ordering decisions compare times across machines.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, RootModel, model_validator

__all__ = ["Event", "EventLike", "HasId", "ReceivedEvent", "Resource"]

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
        return self.root[RESOURCE_ID_LABEL]

    def __getitem__(self, label: str) -> str:
        return self.root[label]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def get(self, label: str, default: str | None = None) -> str | None:
        return self.root.get(label, default)

    def items(self) -> Any:
        return self.root.items()

    def as_dict(self) -> Mapping[str, str]:
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
