"""Durations, database URLs, environment settings and building a CausalOrdering (no database)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import (
    IN_FLIGHT_EVENT_TIMEOUT,
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    PROCESSED_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
    CausalOrdering,
    ConfigurationError,
    Durations,
    ReceivedEvent,
)
from ordering_sql.settings import (
    DEFAULT_DATABASE_URL,
    Settings,
    direct_driver_enabled,
    mask_url,
    normalize_url,
)

UNREACHABLE_PG = "postgresql+asyncpg://user:s3cr3t-pw@127.0.0.1:1/nowhere"

# -- durations ---------------------------------------------------------------------------------


def test_duration_defaults_are_the_reference_constants() -> None:
    d = Durations.build()
    assert d.preceding_event_lookback == PRECEDING_EVENT_LOOKBACK
    assert d.processed_event_lookback == PROCESSED_EVENT_LOOKBACK
    assert d.seen == SEEN_EXPIRATION
    assert d.max_depth_of_preceding_event == MAX_DEPTH_OF_PRECEDING_EVENT
    assert d.in_flight_event_timeout == IN_FLIGHT_EVENT_TIMEOUT
    assert d.lease == 2 * IN_FLIGHT_EVENT_TIMEOUT
    assert d.claim_timeout == timedelta(minutes=1)


def test_durations_accept_timedeltas_and_seconds() -> None:
    d = Durations.build(
        preceding_event_lookback=timedelta(minutes=2),
        processed_event_lookback=90,
        in_flight_event_timeout=1.5,
        claim_timeout=30,
        max_depth_of_preceding_event=3,
    )
    assert d.preceding_event_lookback == timedelta(minutes=2)
    assert d.processed_event_lookback == timedelta(seconds=90)
    assert d.in_flight_event_timeout == timedelta(seconds=1.5)
    assert d.claim_timeout == timedelta(seconds=30)
    assert d.max_depth_of_preceding_event == 3


@pytest.mark.parametrize(
    ("preceding", "processed", "seen"),
    [
        pytest.param(60, 120, timedelta(seconds=120), id="processed-larger"),
        pytest.param(3600, 120, timedelta(seconds=3600), id="preceding-larger"),
        pytest.param(timedelta(hours=1), None, timedelta(hours=1), id="preceding-over-default"),
    ],
)
def test_seen_expiration_is_derived_from_the_larger_lookback(
    preceding: Any, processed: Any, seen: timedelta
) -> None:
    overrides: dict[str, Any] = {"preceding_event_lookback": preceding}
    if processed is not None:
        overrides["processed_event_lookback"] = processed
    d = Durations.build(**overrides)
    assert d.seen_expiration == seen
    assert d.seen == seen


def test_explicit_seen_expiration_wins() -> None:
    assert Durations.build(seen_expiration=5).seen == timedelta(seconds=5)


def test_lease_timeout_follows_in_flight_timeout_unless_given() -> None:
    assert Durations.build(in_flight_event_timeout=3).lease == timedelta(seconds=6)
    assert Durations.build(in_flight_event_timeout=0).lease == timedelta(seconds=1)
    assert Durations.build(lease_timeout=42).lease == timedelta(seconds=42)


def test_zero_in_flight_timeout_means_do_not_wait() -> None:
    assert Durations.build(in_flight_event_timeout=0).in_flight_event_timeout == timedelta(0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("preceding_event_lookback", -1),
        ("preceding_event_lookback", 0),
        ("processed_event_lookback", timedelta(seconds=-5)),
        ("processed_event_lookback", 0),
        ("seen_expiration", 0),
        ("lease_timeout", -1),
        ("claim_timeout", 0),
        ("poll_interval", 0),
        ("in_flight_event_timeout", -1),
        ("max_depth_of_preceding_event", -1),
        ("preceding_event_lookback", "soon"),
    ],
)
def test_invalid_durations_raise_configuration_error(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Durations.build(**{name: value})


def test_unknown_duration_is_rejected_by_name() -> None:
    with pytest.raises(ConfigurationError, match="preceeding_event_lookback"):
        Durations.build(preceeding_event_lookback=60)


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite://", "sqlite+aiosqlite://"),
        ("sqlite:///ordering.db", "sqlite+aiosqlite:///ordering.db"),
        ("sqlite:////var/lib/app/ordering.db", "sqlite+aiosqlite:////var/lib/app/ordering.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:pw@127.0.0.1:5432/db", "postgresql+asyncpg://u:pw@127.0.0.1:5432/db"),
        ("postgres://u@127.0.0.1/db", "postgresql+asyncpg://u@127.0.0.1/db"),
        ("postgresql+asyncpg://u@127.0.0.1/db", "postgresql+asyncpg://u@127.0.0.1/db"),
    ],
)
def test_urls_are_normalised_to_the_async_drivers(given: str, expected: str) -> None:
    assert normalize_url(given).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("mysql://u:s3cr3t-pw@127.0.0.1/db", "mysql"),
        ("postgresql+psycopg2://u@127.0.0.1/db", "postgresql+psycopg2"),
        ("sqlite+pysqlite:///x.db", "sqlite+pysqlite"),
    ],
)
def test_unsupported_scheme_is_named(url: str, scheme: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"'{scheme}'")) as info:
        normalize_url(url)
    assert "s3cr3t-pw" not in str(info.value)


def test_unparseable_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="Cannot parse"):
        normalize_url("definitely not a url")


def test_unparseable_url_does_not_leak_its_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        normalize_url("postgresql+asyncpg:/app:s3cr3t-pw@127.0.0.1/db")
    assert "s3cr3t-pw" not in str(info.value)


def test_url_with_bad_port_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        normalize_url("postgresql+asyncpg://app:s3cr3t-pw@127.0.0.1:pgport/db")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+asyncpg://app:s3cr3t-pw@127.0.0.1:5432/db", "app:***@127.0.0.1"),
        ("postgresql://app:p%40ss%3Aword@127.0.0.1/db", "app:***@127.0.0.1"),
        ("unknown+driver://app:s3cr3t-pw@127.0.0.1/db", "app:***@127.0.0.1"),
    ],
)
def test_mask_url_hides_passwords(url: str, masked: str) -> None:
    shown = mask_url(url)
    assert masked in shown
    assert "s3cr3t-pw" not in shown
    assert "p%40ss" not in shown
    assert "p@ss" not in shown


def test_mask_url_keeps_urls_without_password() -> None:
    assert (
        mask_url("postgresql+asyncpg://app@127.0.0.1/db") == "postgresql+asyncpg://app@127.0.0.1/db"
    )
    assert mask_url("sqlite+aiosqlite:///ordering.db") == "sqlite+aiosqlite:///ordering.db"


def test_mask_url_accepts_parsed_urls() -> None:
    assert "s3cr3t-pw" not in mask_url(normalize_url(UNREACHABLE_PG))


# -- settings from the environment --------------------------------------------------------------


def test_default_database_is_sqlite_in_the_working_directory() -> None:
    settings = Settings.from_env()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.url.get_backend_name() == "sqlite"
    assert settings.url.database == "ordering.db"


def test_environment_url_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", "postgresql://env@127.0.0.1/envdb")
    settings = Settings.from_env()
    assert settings.url.render_as_string() == "postgresql+asyncpg://env@127.0.0.1/envdb"


def test_explicit_url_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", "postgresql://env@127.0.0.1/envdb")
    settings = Settings.from_env("sqlite:///explicit.db")
    assert settings.url.render_as_string() == "sqlite+aiosqlite:///explicit.db"


def test_pool_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERING_SQL_POOL_SIZE", "3")
    assert Settings.from_env().pool_size == 3


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("0", False), ("false", False)])
def test_direct_driver_from_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool
) -> None:
    if value is not None:
        monkeypatch.setenv("ORDERING_SQL_DIRECT_DRIVER", value)
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", "not a url")  # not needed to read it
    assert direct_driver_enabled() is enabled


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ORDERING_SQL_POOL_SIZE", "0"),
        ("ORDERING_SQL_POOL_SIZE", "many"),
        ("ORDERING_SQL_BUSY_TIMEOUT", "-1"),
        ("ORDERING_SQL_DIRECT_DRIVER", "sometimes"),
    ],
)
def test_invalid_environment_setting_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=repr(value)):
        Settings.from_env()


# -- building a CausalOrdering ------------------------------------------------------------------


async def test_construction_does_no_io_on_an_unreachable_database() -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering("scope", database_url=UNREACHABLE_PG)
    try:
        assert ordering.scope == "scope"
        assert "127.0.0.1:1/nowhere" in repr(ordering)
    finally:
        await ordering.close()


async def test_repr_does_not_show_the_password() -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering("scope", database_url=UNREACHABLE_PG)
    try:
        assert "s3cr3t-pw" not in repr(ordering)
    finally:
        await ordering.close()


async def test_construction_does_not_create_the_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    explicit = tmp_path / "explicit.db"
    orderings: list[CausalOrdering[ReceivedEvent]] = [
        CausalOrdering("scope", database_url=f"sqlite+aiosqlite:///{explicit}"),
        CausalOrdering("scope"),  # the default, ordering.db in the working directory
    ]
    for ordering in orderings:
        await ordering.close()
    assert not explicit.exists()
    assert not (tmp_path / "ordering.db").exists()


async def test_construction_reads_the_environment_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", UNREACHABLE_PG)
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering("scope")
    try:
        assert "127.0.0.1:1/nowhere" in repr(ordering)
    finally:
        await ordering.close()


async def test_construction_keeps_durations() -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        "scope", database_url=UNREACHABLE_PG, preceding_event_lookback=60, lease_timeout=5
    )
    try:
        assert ordering.durations.preceding_event_lookback == timedelta(seconds=60)
        assert ordering.lease_timeout == timedelta(seconds=5)
    finally:
        await ordering.close()


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 201, id="too-long"),
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
    ],
)
def test_bad_scope_is_rejected(scope: Any) -> None:
    with pytest.raises(ConfigurationError, match="scope"):
        CausalOrdering(scope, database_url=UNREACHABLE_PG)


def test_longest_scope_is_accepted() -> None:
    assert CausalOrdering("x" * 200, database_url=UNREACHABLE_PG).scope == "x" * 200


class NotAModel:
    pass


@pytest.mark.parametrize(
    "event_type",
    [
        pytest.param(NotAModel, id="plain-class"),
        pytest.param(dict, id="dict"),
        pytest.param(
            ReceivedEvent(
                occurred="2024-01-01T00:00:00Z", event="x", resource={"prefect.resource.id": "r"}
            ),
            id="instance",
        ),
        pytest.param("ReceivedEvent", id="string"),
    ],
)
def test_bad_event_type_is_rejected(event_type: Any) -> None:
    with pytest.raises(ConfigurationError, match="event_type"):
        CausalOrdering("scope", database_url=UNREACHABLE_PG, event_type=event_type)


def test_custom_event_model_is_accepted() -> None:
    class MyEvent(BaseModel):
        pass

    ordering = CausalOrdering("scope", database_url=UNREACHABLE_PG, event_type=MyEvent)
    assert ordering.event_type is MyEvent


async def test_database_url_and_engine_together_are_rejected() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        with pytest.raises(ConfigurationError, match="either database_url or engine"):
            CausalOrdering("scope", database_url="sqlite+aiosqlite://", engine=engine)
    finally:
        await engine.dispose()


def test_unsupported_url_is_rejected_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="'mysql'"):
        CausalOrdering("scope", database_url="mysql://u:pw@127.0.0.1/db")


def test_invalid_duration_is_rejected_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="preceding_event_lookback"):
        CausalOrdering("scope", database_url=UNREACHABLE_PG, preceding_event_lookback=-1)
