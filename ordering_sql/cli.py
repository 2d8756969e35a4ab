"""The ``ordering-sql`` command line (also ``python -m ordering_sql``).

Thin by design: parse arguments, call the library, print. Data goes to stdout, progress and
errors to stderr. A failure is one line on stderr and a non-zero exit code; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Final

from ordering_sql import migration
from ordering_sql.admin import ScopeStatus, status
from ordering_sql.errors import OrderingError
from ordering_sql.settings import DEFAULT_DATABASE_URL, ENV_DATABASE_URL, Settings, mask_url
from ordering_sql.store import Store

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace], Awaitable[int]]


def _database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help=(
            f"database to use (default: ${ENV_DATABASE_URL}, then {DEFAULT_DATABASE_URL}); "
            "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ordering-sql",
        description="Durable causal ordering of events, kept in SQLite or Postgres.",
    )
    parser.add_argument("--debug", action="store_true", help="log verbosely; show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate_p = commands.add_parser(
        "migrate", help="create or upgrade the ordering tables to the newest revision"
    )
    _database_option(migrate_p)
    migrate_p.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL instead of running it (for DBAs who apply migrations by hand)",
    )
    migrate_p.set_defaults(func=_migrate)

    status_p = commands.add_parser("status", help="show seen, processing and parked counts")
    _database_option(status_p)
    status_p.add_argument("--scope", default=None, help="only this scope (default: all)")
    status_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status_p.set_defaults(func=_status)
    return parser


async def _migrate(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(migration.sql_script(args.database_url))
        return 0
    settings = Settings.from_env(args.database_url)
    print(f"Migrating {mask_url(settings.url)} ...", file=sys.stderr)
    revision = await migration.migrate(args.database_url)
    print(f"Database {mask_url(settings.url)} is at revision {revision}.", file=sys.stderr)
    return 0


async def _status(args: argparse.Namespace) -> int:
    store = Store.from_settings(Settings.from_env(args.database_url))
    try:
        scopes = await status(store, scope=args.scope)
    finally:
        await store.dispose()
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in scopes], indent=2))
    else:
        _print_status_table(scopes, store.url)
    return 0


def _age(age: timedelta | None) -> str:
    if age is None:
        return "-"
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _print_status_table(scopes: Sequence[ScopeStatus], url: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ordering-sql status: {url}", title_justify="left")
    for column in ("scope", "seen", "processing", "parked", "claimed", "oldest parked"):
        table.add_column(column, justify="left" if column == "scope" else "right")
    for s in scopes:
        table.add_row(
            s.scope,
            f"{s.seen} (+{s.seen_expired} expired)",
            f"{s.processing} (+{s.processing_expired} expired)",
            str(s.parked),
            str(s.claimed),
            _age(s.oldest_parked_age),
        )
    console = Console()
    if scopes:
        console.print(table)
    else:
        console.print(f"No ordering state in {url}.")


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def cli(argv: Sequence[str]) -> int:
    """Run one command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    func: Handler = args.func
    try:
        return await func(args)
    except Exception as exc:
        if args.debug:
            logger.exception("command failed")
        kind = "" if isinstance(exc, OrderingError) else f"unexpected {type(exc).__name__}: "
        print(f"ordering-sql: error: {kind}{_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = asyncio.run(cli(args))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
