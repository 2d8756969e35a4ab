"""The event value objects: validation and JSON shape (no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from ordering_sql import Event, ReceivedEvent, Resource

RESOURCE = {"prefect.resource.id": "order.1", "prefect.resource.name": "first order"}


def event_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "occurred": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "event": "order.placed",
        "resource": RESOURCE,
    }
    fields.update(overrides)
    return fields


# -- datetimes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [Event, ReceivedEvent])
def test_naive_occurred_is_rejected(model: type[Event]) -> None:
    with pytest.raises(ValidationError) as info:
        model(**event_fields(occurred=datetime(2024, 5, 1, 12, 0)))
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("occurred",)]
    assert "timezone" in errors[0]["msg"]


def test_naive_received_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        ReceivedEvent(**event_fields(received=datetime(2024, 5, 1, 12, 0)))
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("received",)]
    assert "timezone" in errors[0]["msg"]


def test_naive_datetime_in_json_is_rejected() -> None:
    raw = json.dumps(
        {"occurred": "2024-05-01T12:00:00", "event": "order.placed", "resource": RESOURCE}
    )
    with pytest.raises(ValidationError, match="timezone"):
        ReceivedEvent.model_validate_json(raw)


def test_aware_datetimes_in_other_zones_are_accepted() -> None:
    plus_two = timezone(timedelta(hours=2))
    occurred = datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)
    event = ReceivedEvent(**event_fields(occurred=occurred, received=occurred))
    assert event.occurred == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert event.occurred.utcoffset() == timedelta(hours=2)


def test_received_defaults_to_aware_utc_now() -> None:
    before = datetime.now(UTC)
    event = ReceivedEvent(**event_fields())
    after = datetime.now(UTC)
    assert event.received.utcoffset() == timedelta(0)
    assert before <= event.received <= after


def test_plain_event_has_no_received() -> None:
    assert "received" not in Event(**event_fields()).model_dump()


# -- other fields ------------------------------------------------------------------------------


def test_defaults() -> None:
    event = ReceivedEvent(**event_fields())
    assert isinstance(event.id, UUID)
    assert event.follows is None
    assert event.related == []
    assert event.payload == {}


def test_each_event_gets_its_own_id() -> None:
    assert ReceivedEvent(**event_fields()).id != ReceivedEvent(**event_fields()).id


def test_empty_event_name_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ReceivedEvent(**event_fields(event=""))


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="flows"):
        ReceivedEvent(**event_fields(flows=uuid4()))


def test_events_are_immutable() -> None:
    event = ReceivedEvent(**event_fields())
    with pytest.raises(ValidationError):
        event.follows = uuid4()  # type: ignore[misc]


# -- resources ---------------------------------------------------------------------------------


def test_resource_id() -> None:
    resource = Resource(RESOURCE)
    assert resource.id == "order.1"
    assert resource["prefect.resource.name"] == "first order"
    assert resource.get("missing") is None
    assert dict(resource.items()) == RESOURCE
    assert len(resource) == 2


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({}, id="empty"),
        pytest.param({"prefect.resource.name": "x"}, id="without-id"),
        pytest.param({"prefect.resource.id": ""}, id="empty-id"),
    ],
)
def test_resource_without_id_is_rejected(labels: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match=r"prefect\.resource\.id"):
        Resource(labels)


def test_event_with_resource_without_id_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"prefect\.resource\.id"):
        ReceivedEvent(**event_fields(resource={"prefect.resource.name": "x"}))


def test_related_resource_without_id_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"prefect\.resource\.id"):
        ReceivedEvent(**event_fields(related=[{"prefect.resource.role": "flow"}]))


def test_event_resource_is_a_resource() -> None:
    event = ReceivedEvent(**event_fields())
    assert isinstance(event.resource, Resource)
    assert event.resource.id == "order.1"


# -- JSON ------------------------------------------------------------------------------------------


def full_event() -> ReceivedEvent:
    return ReceivedEvent(
        occurred=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        event="order.paid",
        resource=RESOURCE,
        related=[{"prefect.resource.id": "customer.7", "prefect.resource.role": "customer"}],
        payload={"amount": 12.5, "items": [1, 2], "note": None},
        id=UUID("0b3c2a57-6f1e-4a8f-9f7d-2c6b1f0e5d4a"),
        follows=UUID("9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"),
        received=datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC),
    )


def test_json_round_trip_is_lossless() -> None:
    event = full_event()
    assert ReceivedEvent.model_validate_json(event.model_dump_json()) == event


def test_json_shape_matches_the_reference_events() -> None:
    data = json.loads(full_event().model_dump_json())
    assert list(data) == [
        "occurred",
        "event",
        "resource",
        "related",
        "payload",
        "id",
        "follows",
        "received",
    ]
    assert data["resource"] == RESOURCE  # a flat label mapping, not {"root": ...}
    assert data["related"] == [
        {"prefect.resource.id": "customer.7", "prefect.resource.role": "customer"}
    ]
    assert data["id"] == "0b3c2a57-6f1e-4a8f-9f7d-2c6b1f0e5d4a"
    assert data["follows"] == "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"
    assert datetime.fromisoformat(data["occurred"]) == full_event().occurred
    assert datetime.fromisoformat(data["received"]) == full_event().received


def test_producer_json_validates_unchanged() -> None:
    # A JSON line as a producer of the reference events writes it.
    raw = (
        '{"occurred": "2024-05-01T12:00:00+00:00", "event": "order.placed",'
        ' "resource": {"prefect.resource.id": "order.1"}, "related": [], "payload": {"a": 1},'
        ' "id": "0b3c2a57-6f1e-4a8f-9f7d-2c6b1f0e5d4a", "follows": null,'
        ' "received": "2024-05-01T12:00:02Z"}'
    )
    event = ReceivedEvent.model_validate_json(raw)
    assert event.id == UUID("0b3c2a57-6f1e-4a8f-9f7d-2c6b1f0e5d4a")
    assert event.received == datetime(2024, 5, 1, 12, 0, 2, tzinfo=UTC)
    assert event.payload == {"a": 1}


def test_received_event_round_trips_through_plain_event_json() -> None:
    # An Event's JSON is a valid ReceivedEvent (received is filled in).
    plain = Event(**event_fields())
    received = ReceivedEvent.model_validate_json(plain.model_dump_json())
    assert received.id == plain.id
    assert received.received.utcoffset() == timedelta(0)
