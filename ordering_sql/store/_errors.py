"""How the Store explains a failure: one line per cause, and the advice that goes with it."""

from __future__ import annotations

from typing import Final

from sqlalchemy.exc import DBAPIError, InterfaceError

from ordering_sql.errors import SchemaNotReadyError

__all__ = [
    "could_not_connect",
    "describe",
    "is_connect_error",
    "not_ready",
    "refuse_a_newer_schema",
]


def not_ready(url: str, current: str | None, expected: str) -> SchemaNotReadyError:
    state = "has no ordering-sql tables" if current is None else f"is at revision {current!r}"
    msg = (
        f"Database {url!r} {state}, but this version of ordering-sql needs revision "
        f"{expected!r}. Run `ordering-sql migrate --database-url {url}` "
        "or `await ordering_sql.migrate(url)`."
    )
    return SchemaNotReadyError(msg, url=url, current=current, expected=expected)


def refuse_a_newer_schema(url: str, current: str | None, expected: str) -> None:
    """``SchemaNotReadyError`` if the database is at a revision this code does not know: a newer
    ordering-sql migrated it, and only upgrading ordering-sql can help."""
    from ordering_sql.store import _migrations  # imported late: it pulls in Alembic

    if current is None or _migrations.is_known_revision(current):
        return
    msg = (
        f"Database {url!r} is at revision {current!r}, which this version of ordering-sql "
        f"does not know (its newest is {expected!r}): a newer ordering-sql migrated it. "
        "Upgrade ordering-sql (`pip install --upgrade ordering-sql`) on this machine."
    )
    raise SchemaNotReadyError(msg, url=url, current=current, expected=expected)


def is_connect_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError | TimeoutError | InterfaceError)


#: SQLSTATE of a server that refuses new sessions for now (starting up, shutting down).
_CANNOT_CONNECT_NOW: Final = "57P03"


def could_not_connect(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) means no session could be opened:
    a refused or timed-out connect, or a server that accepts no connections right now."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError | TimeoutError):
            return True
        if getattr(cause, "sqlstate", None) == _CANNOT_CONNECT_NOW:
            return True
        cause = cause.__cause__ or (cause.orig if isinstance(cause, DBAPIError) else None)
    return False


def describe(exc: BaseException | None) -> str:
    """One line naming the root cause, without SQL text or parameters."""
    if exc is None:
        return "unknown error"
    root = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text_ = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {text_}" if text_ else type(root).__name__
