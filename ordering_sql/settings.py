"""Configuration: the ordering constants, per-instance durations, and the database URL.

Environment variables are read here and nowhere else (``ORDERING_SQL_*``).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Any, Final, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ordering_sql._backends import BACKENDS, backend_for_scheme
from ordering_sql.errors import ConfigurationError
from ordering_sql.schema import SCOPE_LENGTH

__all__ = [
    "DEFAULT_DATABASE_URL",
    "IN_FLIGHT_EVENT_TIMEOUT",
    "MAX_DEPTH_OF_PRECEDING_EVENT",
    "PRECEDING_EVENT_LOOKBACK",
    "PROCESSED_EVENT_LOOKBACK",
    "SEEN_EXPIRATION",
    "SQLITE_SYNCHRONOUS_MODES",
    "Durations",
    "Settings",
    "mask_url",
    "normalize_url",
    "shortened",
    "validate_scope",
]

#: How long a follower may wait for its leader; also the age past which an event goes through.
PRECEDING_EVENT_LOOKBACK: Final = timedelta(minutes=15)
#: How long the record that an event was handled is kept.
PROCESSED_EVENT_LOOKBACK: Final = timedelta(minutes=30)
#: Expiry of a seen record: the larger of the two lookbacks.
SEEN_EXPIRATION: Final = max(PRECEDING_EVENT_LOOKBACK, PROCESSED_EVENT_LOOKBACK)
#: Deepest recursion when replaying followers.
MAX_DEPTH_OF_PRECEDING_EVENT: Final = 20
#: How long a follower waits for a leader that is being processed right now.
IN_FLIGHT_EVENT_TIMEOUT: Final = timedelta(seconds=8)

#: The embedded default, relative to the working directory.
DEFAULT_DATABASE_URL: Final = "sqlite+aiosqlite:///ordering.db"
ENV_DATABASE_URL: Final = "ORDERING_SQL_DATABASE_URL"
ENV_POOL_SIZE: Final = "ORDERING_SQL_POOL_SIZE"
ENV_BUSY_TIMEOUT: Final = "ORDERING_SQL_BUSY_TIMEOUT"
ENV_ECHO: Final = "ORDERING_SQL_ECHO"
ENV_DIRECT_DRIVER: Final = "ORDERING_SQL_DIRECT_DRIVER"
ENV_SQLITE_SYNCHRONOUS: Final = "ORDERING_SQL_SQLITE_SYNCHRONOUS"
ENV_POOLER: Final = "ORDERING_SQL_POOLER"


PositiveDuration = Annotated[timedelta, Field(gt=timedelta(0))]
SqliteSynchronous = Literal["FULL", "EXTRA", "NORMAL"]
#: The ``PRAGMA synchronous`` modes ordering-sql runs SQLite with; OFF is not offered.
SQLITE_SYNCHRONOUS_MODES: Final = get_args(SqliteSynchronous)
Pooler = Literal["none", "session", "transaction"]


class Durations(BaseModel):
    """The time limits of one CausalOrdering instance.

    Numbers are read as seconds. ``seen_expiration`` defaults to the larger of the two lookbacks,
    ``lease_timeout`` to twice the in-flight wait, ``claim_timeout`` to one minute.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preceding_event_lookback: PositiveDuration = PRECEDING_EVENT_LOOKBACK
    processed_event_lookback: PositiveDuration = PROCESSED_EVENT_LOOKBACK
    seen_expiration: PositiveDuration | None = None
    max_depth_of_preceding_event: Annotated[int, Field(ge=0)] = MAX_DEPTH_OF_PRECEDING_EVENT
    in_flight_event_timeout: Annotated[timedelta, Field(ge=timedelta(0))] = IN_FLIGHT_EVENT_TIMEOUT
    #: How long a processing lease lives; a crashed worker blocks its event at most this long.
    lease_timeout: PositiveDuration | None = None
    #: How long a leader's claim on its parked followers lives before the lost sweep returns them.
    claim_timeout: PositiveDuration = timedelta(minutes=1)
    #: The longest pause between two looks at an in-flight leader (the first is after 10 ms).
    poll_interval: PositiveDuration = timedelta(milliseconds=250)

    @model_validator(mode="after")
    def _derive(self) -> Self:
        if self.seen_expiration is None:
            seen = max(self.preceding_event_lookback, self.processed_event_lookback)
            object.__setattr__(self, "seen_expiration", seen)
        if self.lease_timeout is None:
            lease = max(2 * self.in_flight_event_timeout, timedelta(seconds=1))
            object.__setattr__(self, "lease_timeout", lease)
        return self

    @property
    def seen(self) -> timedelta:
        """How long a seen mark lives: ``seen_expiration``, once defaults are resolved."""
        assert self.seen_expiration is not None  # set by _derive
        return self.seen_expiration

    @property
    def lease(self) -> timedelta:
        """How long a processing lease lives unless renewed: ``lease_timeout``, resolved."""
        assert self.lease_timeout is not None  # set by _derive
        return self.lease_timeout

    @classmethod
    def build(cls, **overrides: Any) -> Durations:
        """Returns the durations with ``overrides`` applied (names as the constructor's).

        Raises ``ConfigurationError`` naming the first invalid value, instead of pydantic's
        ``ValidationError``.
        """
        try:
            return cls(**overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "durations"
            msg = f"Invalid duration {where}={first.get('input')!r}: {first['msg']}."
            raise ConfigurationError(msg) from None


@lru_cache(maxsize=64)
def normalize_url(url: str | URL) -> URL:
    """Parse a database URL and select the async driver this project uses for its backend.

    Cached: URLs are immutable, and a service that builds an instance per event (Prefect does)
    would otherwise parse the same URL twice per event (at construction and when sharing the
    engine).
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        msg = f"Cannot parse database URL {mask_url(str(url))!r}."
        raise ConfigurationError(msg) from None
    backend = backend_for_scheme(parsed.drivername)
    if backend is None:
        expected = " or ".join(repr(b.scheme) for b in BACKENDS)
        msg = (
            f"Unsupported database URL scheme {parsed.drivername!r} in {mask_url(parsed)!r}; "
            f"expected {expected}."
        )
        raise ConfigurationError(msg)
    if parsed.host and "@" in parsed.host:
        # A password with an unescaped "@": SQLAlchemy ends the password at the first "@" and
        # takes the rest for the host. The host comes after the last "@", as browsers read it.
        extra, _, host = parsed.host.rpartition("@")
        parsed = parsed.set(password=f"{parsed.password or ''}@{extra}", host=host)
    return parsed.set(drivername=backend.scheme)


def mask_url(url: str | URL) -> str:
    """Render a URL for messages and logs, with every password in it replaced by ``***``.

    Both places a password can stand are masked: after the user name (everything up to the
    last ``@`` before the host, so a password holding an unescaped ``@`` goes too), and query
    parameters such as ``?password=``. User, host and database still show.
    """
    if isinstance(url, URL):
        url = url.render_as_string(hide_password=False)
    scheme, separator, rest = str(url).partition("://")
    if not separator:  # not a URL SQLAlchemy reads: the user name starts after the last "/"
        head, at, tail = str(url).rpartition("@")
        if not at:
            return _PASSWORD_PARAMETER.sub(r"\1***", str(url))
        prefix, slash, credentials = head.rpartition("/")
        user, colon, _ = credentials.partition(":")
        tail = _PASSWORD_PARAMETER.sub(r"\1***", tail)
        return f"{prefix}{slash}{user}{':***' if colon else ''}@{tail}"
    query_at = rest.find("?")
    authority_end = len(rest) if query_at < 0 else query_at
    last_at = rest.rfind("@", 0, authority_end)
    if last_at >= 0:
        user, colon, _ = rest[:last_at].partition(":")
        rest = f"{user}{':***' if colon else ''}{rest[last_at:]}"
    rest = _PASSWORD_PARAMETER.sub(r"\1***", rest)
    return f"{scheme}://{rest}"


#: A query parameter that carries a password (libpq's and asyncpg's names).
_PASSWORD_PARAMETER: Final = re.compile(
    r"([?&](?:password|passwd|pass|pwd|sslpassword)=)[^&#]*", re.IGNORECASE
)


def validate_scope(scope: object) -> str:
    """``scope`` if it is a valid scope name; ``ConfigurationError`` (quoting it shortened) if
    not: a non-empty string of at most ``SCOPE_LENGTH`` characters, storable on every backend
    (no NUL, no lone surrogate: it must encode as UTF-8)."""
    problem = None
    if not isinstance(scope, str) or not scope:
        problem = "a non-empty string"
    elif len(scope) > SCOPE_LENGTH:
        problem = f"at most {SCOPE_LENGTH} characters long (it has {len(scope):,})"
    elif "\x00" in scope:
        problem = "free of NUL characters"
    else:
        try:
            scope.encode("utf-8")
        except UnicodeEncodeError:
            problem = "valid Unicode text (it holds a lone surrogate, as undecodable bytes give)"
    if problem is not None:
        msg = f"A scope must be {problem}; got {shortened(scope)}."
        raise ConfigurationError(msg)
    assert isinstance(scope, str)
    return scope


def shortened(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters for messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 3]}...{size}"


class Settings(BaseModel):
    """How to reach the database."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    database_url: str = DEFAULT_DATABASE_URL
    pool_size: Annotated[int, Field(ge=1)] = 10
    busy_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    echo: bool = False
    #: Send the engine's autocommit statements to asyncpg directly (``store/_driver.py``);
    #: off, every statement goes through SQLAlchemy (and its events, for instrumentation).
    direct_driver: bool = True
    #: SQLite's ``PRAGMA synchronous``. FULL (the default) makes every commit durable against
    #: power loss and OS crashes: a parked follower, once acknowledged, is on disk. NORMAL is
    #: faster (with WAL, a commit then survives a crash of the process, not of the machine).
    sqlite_synchronous: SqliteSynchronous = "FULL"
    #: The connection pooler between ordering-sql and Postgres, by its pooling mode (pgbouncer's
    #: ``pool_mode``). ``transaction``: a server connection serves one transaction, so nothing
    #: may outlive one; ordering-sql then uses no named prepared statements (asyncpg's and
    #: SQLAlchemy's statement caches are off) and keeps no other session state. ``session`` and
    #: ``none`` need nothing special.
    pooler: Pooler = "none"
    #: Open the database for reading only (the operator commands that only look): nothing is
    #: created or migrated, a missing SQLite file is an error, and a read-only one can be read.
    read_only: bool = False

    @field_validator("sqlite_synchronous", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("pooler", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def from_env(cls, database_url: str | None = None) -> Settings:
        """Settings from ``ORDERING_SQL_*``; an explicit ``database_url`` wins over the env."""
        values: dict[str, Any] = {}
        url = database_url or os.environ.get(ENV_DATABASE_URL)
        if url:
            values["database_url"] = url
        for key, env in (
            ("pool_size", ENV_POOL_SIZE),
            ("busy_timeout_s", ENV_BUSY_TIMEOUT),
            ("echo", ENV_ECHO),
            ("direct_driver", ENV_DIRECT_DRIVER),
            ("sqlite_synchronous", ENV_SQLITE_SYNCHRONOUS),
            ("pooler", ENV_POOLER),
        ):
            if os.environ.get(env):
                values[key] = os.environ[env]
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            msg = f"Invalid setting {first['loc'][0]}={first.get('input')!r}: {first['msg']}."
            raise ConfigurationError(msg) from None

    @classmethod
    def for_host_engine(cls) -> Settings:
        """The settings from ``ORDERING_SQL_*`` that apply to an engine the application passes
        in, whose URL and pool are its own (``direct_driver``, ``sqlite_synchronous``)."""
        return cls.from_env(DEFAULT_DATABASE_URL)

    @property
    def url(self) -> URL:
        return normalize_url(self.database_url)


def direct_driver_enabled() -> bool:
    """``ORDERING_SQL_DIRECT_DRIVER`` alone: for an engine the application passes in, whose URL
    and pool are its own."""
    return Settings.for_host_engine().direct_driver
