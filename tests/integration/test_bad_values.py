"""Every fault a clear error, in the library (issue items 3-5): bad values given to the engine
are ``OrderingError``s, raised before anything is stored, and no password is ever shown.

The CLI side of the same items is in ``tests/acceptance/test_operator_errors.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel, ConfigDict, Field, field_serializer
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import (
    CausalOrdering,
    ConfigurationError,
    DatabaseUnavailableError,
    ReceivedEvent,
    SchemaNotReadyError,
    StoreError,
    dispose_engines,
    migrate,
)
from ordering_sql.migration import head_revision
from ordering_sql.schema import events, followers
from tests.conftest import OrderingFactory
from tests.support import child_env, make_event

SECRET = "S3cr3t"

#: The ways a password reaches the URL (as in the CLI tests); the unescaped ``@`` form means the
#: password ``ab@S3cr3t``.
_PASSWORD_FORMS = {
    "userinfo": "{scheme}://{user}:S3cr3t@{host}:{port}/{db}",
    "query": "{scheme}://{user}@{host}:{port}/{db}?password=S3cr3t",
    "unescaped-at": "{scheme}://{user}:ab@S3cr3t@{host}:{port}/{db}",
    "percent-encoded": "{scheme}://{user}:p%40S3cr3t@{host}:{port}/{db}",
}
PASSWORD_FORMS = [
    pytest.param(scheme, form, id=f"{scheme}-{name}")
    for scheme in ("postgresql+asyncpg", "postgresql")
    for name, form in _PASSWORD_FORMS.items()
]
#: How a message names the database: the user (password masked, if shown) and the host.
SHOWN = r"\bpostgres(:\*\*\*)?@127\.0\.0\.1:{port}/{db}"


@pytest.fixture
async def cleanup() -> AsyncIterator[list[CausalOrdering[Any]]]:
    """Orderings a test builds by hand; closed, and the shared engines disposed, afterwards."""
    made: list[CausalOrdering[Any]] = []
    yield made
    for ordering in made:
        await ordering.close()
    await dispose_engines()


async def stored(url: str, scope: str, event_id: UUID) -> dict[str, int]:
    """How many rows of ``event_id`` the two tables hold in ``scope``."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            counts = {}
            for table, key in ((events, events.c.event_id), (followers, followers.c.follower_id)):
                query = (
                    select(func.count())
                    .select_from(table)
                    .where(table.c.scope == scope, key == event_id)
                )
                counts[table.name] = (await conn.execute(query)).scalar_one()
            return counts
    finally:
        await engine.dispose()


NOTHING_STORED = {"ordering_events": 0, "ordering_followers": 0}


async def handler(event: Any, depth: int) -> None:
    pytest.fail(f"no follower may be replayed here, got {event!r}")


# -- 3. passwords are never shown ----------------------------------------------------------------


def _leaks(where: str, content: str) -> list[str]:
    """``where`` and the lines of ``content`` that show the password, if any do."""
    lines = [line.strip() for line in content.splitlines() if SECRET in line]
    return [f"{where} shows the password: " + " | ".join(lines)] if lines else []


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or during."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


@pytest.mark.parametrize(("scheme", "form"), PASSWORD_FORMS)
async def test_unreachable_database_never_shows_the_password(
    scheme: str,
    form: str,
    cleanup: list[CausalOrdering[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database that refuses connections (port 1): the repr, the errors (message, ``.url``,
    the whole traceback with its causes) and the log records of the failing connect. And the
    host the message names is the host connected to (an ``@`` in the password is not a host)."""
    url = form.format(scheme=scheme, user="postgres", host="127.0.0.1", port=1, db="DB")
    shown = SHOWN.format(port=1, db="DB")
    caplog.set_level(logging.DEBUG)
    ordering: CausalOrdering[Any] = CausalOrdering("pw", database_url=url)
    cleanup.append(ordering)
    before = repr(ordering)

    async def seen() -> Any:
        return await ordering.event_has_been_seen(uuid4())

    async def migrated() -> Any:
        return await migrate(url)

    outcomes = await asyncio.gather(seen(), migrated(), return_exceptions=True)

    problems = _leaks("repr before use", before) + _leaks("repr after use", repr(ordering))
    if not re.search(shown, before):
        problems.append(f"the repr names the database by user and host: {before}")
    for name, error in zip(("event_has_been_seen", "migrate"), outcomes, strict=True):
        if not isinstance(error, DatabaseUnavailableError):
            problems.append(f"{name}: DatabaseUnavailableError expected, got {error!r}")
            continue
        problems += _leaks(f"{name}: str(error)", str(error))
        problems += _leaks(f"{name}: error.url", str(error.url))
        chain = "".join(traceback.format_exception(error))
        problems += _leaks(f"{name}: the traceback with its causes", chain)
        if not re.search(shown, str(error)):
            problems.append(f"{name}: the error names the database by user and host: {error}")
        if not any(isinstance(e, ConnectionRefusedError) for e in _causes(error)):
            problems.append(
                f"{name}: the URL reaches the host it names (127.0.0.1 refuses on port 1), "
                f"but the connection failed otherwise: {error}"
            )
    for record in caplog.records:
        problems += _leaks(f"log record {record.name}", repr(vars(record)))
    problems += _leaks("the formatted log", caplog.text)
    assert not problems, "\n".join(problems)


@pytest.mark.postgres
@pytest.mark.parametrize(("scheme", "form"), PASSWORD_FORMS)
async def test_store_error_on_a_reachable_database_never_shows_the_password(
    scheme: str, form: str, postgres_url: str, cleanup: list[CausalOrdering[Any]]
) -> None:
    """A database that is reached (TRUST auth: any password connects) but fails the statement
    (its followers table is gone): a ``StoreError`` that names the database without the
    password."""
    parsed = make_url(postgres_url)
    url = form.format(
        scheme=scheme,
        user=parsed.username,
        host=parsed.host,
        port=parsed.port or 5432,
        db=parsed.database,
    )
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE ordering_followers"))
    finally:
        await engine.dispose()
    ordering: CausalOrdering[Any] = CausalOrdering("pw", database_url=url)
    cleanup.append(ordering)

    with pytest.raises(StoreError) as info:
        await ordering.get_followers(uuid4())

    error = info.value
    problems = _leaks("str(error)", str(error)) + _leaks("error.url", str(error.url))
    problems += _leaks("the traceback", "".join(traceback.format_exception(error)))
    problems += _leaks("repr", repr(ordering))
    where = rf"{re.escape(str(parsed.host))}:{parsed.port or 5432}/{parsed.database}"
    if not re.search(rf"\b{re.escape(str(parsed.username))}(:\*\*\*)?@{where}", str(error)):
        problems.append(f"the error names the database by user and host: {error}")
    assert not problems, "\n".join(problems)
    assert not isinstance(error, DatabaseUnavailableError), f"the database was reached: {error}"


# -- 4. scope names are data ---------------------------------------------------------------------

#: A URL on each backend that no call can reach: the checks come before any I/O.
UNREACHABLE = [
    pytest.param("sqlite+aiosqlite:////nonexistent/dir/ordering.db", id="sqlite"),
    pytest.param(f"postgresql+asyncpg://app:{SECRET}@127.0.0.1:1/db", id="postgres"),
]


@pytest.mark.parametrize("url", UNREACHABLE)
@pytest.mark.parametrize(
    "scope",
    [pytest.param("a\x00b", id="nul"), pytest.param("a\udcffb", id="lone-surrogate")],
)
def test_scope_that_is_not_storable_text_is_rejected_at_construction(url: str, scope: str) -> None:
    with pytest.raises(ConfigurationError, match="scope") as info:
        CausalOrdering(scope, database_url=url)
    assert SECRET not in str(info.value)
    assert len(str(info.value)) < 300, str(info.value)


@pytest.mark.parametrize("url", UNREACHABLE)
def test_overlong_scope_is_quoted_shortened(url: str) -> None:
    scope = "tenant-" + "x" * 9993
    assert len(scope) == 10_000

    with pytest.raises(ConfigurationError, match="scope") as info:
        CausalOrdering(scope, database_url=url)

    message = str(info.value)
    assert len(message) < 300, f"the message quotes a shortened name, got {len(message)} chars"
    assert "tenant-" in message, f"the message quotes the start of the name: {message}"


@pytest.mark.parametrize("scope", ["orders[/bold]", "tenant[eu]", "café/ü·東京", "with spaces"])
async def test_scopes_that_are_text_are_kept_as_they_are(
    make_ordering: OrderingFactory, scope: str
) -> None:
    ordering = make_ordering(scope)
    event = make_event()
    await ordering.record_event_as_seen(event)
    assert await ordering.event_has_been_seen(event)
    assert not await make_ordering("other").event_has_been_seen(event)


# -- 5. bad values are OrderingErrors --------------------------------------------------------------

Call = Callable[[CausalOrdering[Any], ReceivedEvent], Awaitable[Any]]


async def _confirm(ordering: CausalOrdering[Any], event: ReceivedEvent) -> None:
    async with ordering.preceding_event_confirmed(handler, event):
        pytest.fail("the body must not run")


TIME_CALLS: dict[str, Call] = {
    "record_event_as_seen": lambda o, e: o.record_event_as_seen(e),
    "record_event_as_processing": lambda o, e: o.record_event_as_processing(e),
    "event_has_been_seen": lambda o, e: o.event_has_been_seen(e),
    "preceding_event_confirmed": _confirm,
    "now": lambda o, e: o.now(),
}


@pytest.mark.parametrize("call", sorted(TIME_CALLS))
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(1.5, id="float"),
        pytest.param("2026-01-01T00:00:00+00:00", id="iso-string"),
        pytest.param(None, id="none"),
    ],
)
async def test_clock_returning_a_non_datetime_is_a_configuration_error(
    make_ordering: OrderingFactory, call: str, value: Any
) -> None:
    bad = make_ordering(clock=lambda: value)
    event = make_event(follows=uuid4())

    with pytest.raises(ConfigurationError, match="clock"):
        await TIME_CALLS[call](bad, event)

    good = make_ordering()
    assert not await good.event_has_been_seen(event)
    assert not await good.event_has_started_processing(event)
    assert await good.followers_by_id([event.id]) == []


ID_CALLS: dict[str, Callable[[CausalOrdering[Any], Any], Awaitable[Any]]] = {
    "event_has_been_seen": lambda o, i: o.event_has_been_seen(i),
    "event_has_started_processing": lambda o, i: o.event_has_started_processing(i),
    "get_followers": lambda o, i: o.get_followers(i),
    "followers_by_id": lambda o, i: o.followers_by_id([i]),
}


@pytest.mark.parametrize("call", sorted(ID_CALLS))
@pytest.mark.parametrize("value", [424242, None], ids=["int", "none"])
async def test_event_id_of_a_wrong_type_is_a_configuration_error(
    make_ordering: OrderingFactory, call: str, value: Any
) -> None:
    ordering = make_ordering()

    with pytest.raises(ConfigurationError) as info:
        await ID_CALLS[call](ordering, value)

    assert str(value) in str(info.value), f"the message quotes the value: {info.value}"


#: The two calls that store an event: parking it (if its leader was not handled), or directly.
STORE_CALLS: dict[str, Callable[[CausalOrdering[Any], Any], Awaitable[Any]]] = {
    "preceding_event_confirmed": lambda o, e: _confirm(o, e),
    "record_follower": lambda o, e: o.record_follower(e),
}


class NaiveEvent(BaseModel):
    """An event type of the application's own with the EventLike fields, but plain datetimes."""

    model_config = ConfigDict(frozen=True)

    occurred: datetime
    received: datetime
    event: str = "naive.event"
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID = Field(default_factory=uuid4)
    follows: UUID | None = None


def _naive_event(naive: str) -> NaiveEvent:
    aware = datetime.now(UTC)
    plain = aware.replace(tzinfo=None)
    return NaiveEvent(
        occurred=plain if naive in ("occurred", "both") else aware,
        received=plain if naive in ("received", "both") else aware,
        follows=uuid4(),
    )


@pytest.mark.parametrize("naive", ["occurred", "received", "both"])
@pytest.mark.parametrize("call", ["preceding_event_confirmed", "record_follower"])
async def test_event_with_naive_datetimes_is_a_configuration_error(
    make_ordering: OrderingFactory, database_url: str, naive: str, call: str
) -> None:
    ordering = make_ordering(event_type=NaiveEvent)
    event = _naive_event(naive)

    with pytest.raises(ConfigurationError) as info:
        await STORE_CALLS[call](ordering, event)

    message = str(info.value)
    assert "naive" in message.lower(), f"the message says what is wrong: {message}"
    field = "occurred" if naive == "occurred" else "received"
    assert field in message, f"the message names the field: {message}"
    assert not await ordering.event_has_started_processing(event)
    assert await stored(database_url, "test", event.id) == NOTHING_STORED


#: Run with TZ=America/New_York: store a follower whose datetimes are naive, then print what
#: happened as JSON: refused, or the stored columns (in UTC) and the event read back.
TZ_CHILD = r"""
import asyncio, json, sys
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import CausalOrdering, ConfigurationError, dispose_engines
from ordering_sql.schema import followers


class NaiveEvent(BaseModel):
    occurred: datetime
    received: datetime
    event: str = "naive.event"
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID = Field(default_factory=uuid4)
    follows: UUID | None = None


async def main(url: str) -> None:
    naive = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    event = NaiveEvent(occurred=naive, received=naive, follows=uuid4())
    ordering = CausalOrdering("tz", database_url=url, event_type=NaiveEvent)
    try:
        await ordering.record_follower(event)
    except ConfigurationError as exc:
        result: dict[str, Any] = {"refused": str(exc)}
    else:
        back = await ordering.followers_by_id([event.id])
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            query = select(followers.c.occurred, followers.c.received).where(
                followers.c.scope == "tz", followers.c.follower_id == event.id
            )
            row = (await conn.execute(query)).one()
        await engine.dispose()
        result = {
            "given_utc": naive.replace(tzinfo=UTC).isoformat(),
            "occurred": row.occurred.astimezone(UTC).isoformat(),
            "received": row.received.astimezone(UTC).isoformat(),
            "read_back": [e.model_dump(mode="json") for e in back],
            "given": event.model_dump(mode="json"),
        }
    finally:
        await ordering.close()
        await dispose_engines()
    print(json.dumps(result))


asyncio.run(main(sys.argv[1]))
"""


async def test_naive_datetimes_are_never_stored_shifted_by_the_local_timezone(
    database_url: str,
) -> None:
    env = {**child_env(), "TZ": "America/New_York"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TZ_CHILD,
        database_url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"the child failed ({proc.returncode}):\n{err.decode()}"
    result = json.loads(out)

    if "refused" in result:
        assert "naive" in result["refused"].lower(), result
        return
    assert result["occurred"] == result["given_utc"], f"occurred stored shifted: {result}"
    assert result["received"] == result["given_utc"], f"received stored shifted: {result}"
    assert result["read_back"] == [result["given"]], f"read back changed: {result}"


class UnwritableEvent(ReceivedEvent):
    """An event type whose ``model_dump_json`` raises (its payload refuses to be written)."""

    @field_serializer("payload")
    def _refuse(self, payload: dict[str, Any]) -> dict[str, Any]:
        msg = "this payload cannot be written"
        raise ValueError(msg)


def _unwritable(kind: str, leader: ReceivedEvent) -> ReceivedEvent:
    if kind == "object-payload":
        return make_event(follows=leader, payload={"x": object()})
    base = make_event(follows=leader)
    return UnwritableEvent(**dict(base))


@pytest.mark.parametrize("kind", ["object-payload", "serializer-raises"])
@pytest.mark.parametrize(
    "situation", ["leader-not-seen", "leader-seen", "record_follower"], ids=str
)
async def test_event_that_cannot_be_serialised_is_refused_before_anything_is_stored(
    make_ordering: OrderingFactory, database_url: str, kind: str, situation: str
) -> None:
    ordering = make_ordering(
        event_type=UnwritableEvent if kind != "object-payload" else ReceivedEvent
    )
    leader = make_event(name="leader")
    if situation == "leader-seen":
        await ordering.record_event_as_seen(leader)
    event = _unwritable(kind, leader)

    call = "record_follower" if situation == "record_follower" else "preceding_event_confirmed"
    with pytest.raises(ConfigurationError) as info:
        await STORE_CALLS[call](ordering, event)

    assert str(event.id) in str(info.value), f"the message names the event: {info.value}"
    assert not await ordering.event_has_started_processing(event), "no lease is left behind"
    assert not await ordering.event_has_been_seen(event)
    assert await stored(database_url, "test", event.id) == NOTHING_STORED, (
        "refused before any lease was taken: no row of the event in either table"
    )


#: Advice to run the migration: the command, or the function (not "a newer ordering-sql
#: migrated it", which is the diagnosis).
ADVISES_MIGRATE = re.compile(r"ordering-sql migrate\b|ordering_sql\.migrate\(|\bmigrate\(")


async def _set_revision(url: str, revision: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE ordering_sql_version SET version_num = :v"), {"v": revision}
            )
    finally:
        await engine.dispose()


async def _revision(url: str) -> str | None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = text("SELECT version_num FROM ordering_sql_version")
            return (await conn.execute(query)).scalar_one_or_none()
    finally:
        await engine.dispose()


def _assert_says_upgrade(error: BaseException) -> None:
    message = str(error)
    assert "upgrade" in message.lower(), f"says to upgrade ordering-sql: {message}"
    assert "ordering-sql" in message, message
    assert not ADVISES_MIGRATE.search(message), (
        f"migrating cannot help a schema newer than the code: {message}"
    )
    assert "9999" in message, f"names the database's revision: {message}"


async def test_schema_newer_than_the_code_says_to_upgrade_ordering_sql(
    make_ordering: OrderingFactory, database_url: str
) -> None:
    await _set_revision(database_url, "9999")
    ordering = make_ordering()

    with pytest.raises(SchemaNotReadyError) as info:
        await ordering.event_has_been_seen(uuid4())

    _assert_says_upgrade(info.value)
    assert info.value.current == "9999"
    assert info.value.expected == head_revision()

    with pytest.raises(SchemaNotReadyError) as from_migrate:
        await migrate(database_url)

    _assert_says_upgrade(from_migrate.value)
    assert await _revision(database_url) == "9999", "the newer schema is left as it is"
