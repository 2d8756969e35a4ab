"""The ``ordering-sql`` command line (also ``python -m ordering_sql``).

Thin by design: parse arguments, call the library, print (the tables and reports are drawn in
``_terminal.py``). Data goes to stdout, progress and errors to stderr. A failure is one line on
stderr and a non-zero exit code; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import BinaryIO, Final

from ordering_sql import _terminal, migration
from ordering_sql.admin import peek_lost, purge, status
from ordering_sql.engine import CausalOrdering
from ordering_sql.errors import ConfigurationError, OrderingError
from ordering_sql.models import ReceivedEvent
from ordering_sql.settings import (
    DEFAULT_DATABASE_URL,
    ENV_DATABASE_URL,
    SQLITE_SYNCHRONOUS_MODES,
    Settings,
    mask_url,
    validate_scope,
)
from ordering_sql.store import Store
from ordering_sql.streaming import MalformedLine, order_lines

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_MALFORMED: Final = 3
#: What a shell reports for a filter ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE: Final = 141
#: Lines per batch for `order FILE` (stdin goes one line at a time unless --batch is given).
ORDER_BATCH: Final = 500

Handler = Callable[[argparse.Namespace], Awaitable[int]]


def _database_option(parser: argparse.ArgumentParser, *, prefect: bool = False) -> None:
    where = parser.add_mutually_exclusive_group() if prefect else parser
    where.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help=(
            f"database to use (default: ${ENV_DATABASE_URL}, then {DEFAULT_DATABASE_URL}); "
            "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
        ),
    )
    if prefect:
        where.add_argument(
            "--prefect",
            action="store_true",
            help=(
                "the database ordering_sql.prefect uses: $ORDERING_SQL_DATABASE_URL, else "
                "Prefect's own (its settings and profile); needs the prefect extra"
            ),
        )


def _scope_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scope", default="default", help="the consumer's scope (default)")


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
    _database_option(status_p, prefect=True)
    status_p.add_argument("--scope", default=None, help="only this scope (default: all)")
    status_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status_p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_positive_float,
        metavar="SECONDS",
        help="refresh the table every SECONDS (2) until Ctrl-C: in place on a terminal, one "
        "table after another when piped",
    )
    status_p.set_defaults(func=_status)

    order_p = commands.add_parser(
        "order",
        help="order a stream of events (JSON lines): print each one when it may be handled",
        description=(
            "Read ReceivedEvent JSON lines from FILE (or stdin), in whatever order they come, and "
            "write each event to stdout at the moment it may be handled. Events whose leader "
            "has not arrived stay parked in the database for a later run. A one-line summary "
            "goes to stderr. Exit code 3 if malformed lines were skipped."
        ),
    )
    order_p.add_argument("file", nargs="?", default="-", help="input file, or - for stdin")
    _database_option(order_p)
    _scope_option(order_p)
    order_p.add_argument(
        "--flush-lost",
        action="store_true",
        help="at the end, also emit followers whose leader did not come within the lookback",
    )
    order_p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    order_p.add_argument(
        "--restamp",
        action="store_true",
        help=(
            "treat every event as received now: without it, an event whose `received` is older "
            "than the lookback (15 min) is not held back for its leader, as in the engine; use "
            "it to order an old log"
        ),
    )
    order_p.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        metavar="N",
        help=(
            "take N lines at a time through the batch API (default: 500 for a FILE; 1 for "
            "stdin, so that each event is written out as soon as its line arrives)"
        ),
    )
    order_p.set_defaults(func=_order)

    lost_p = commands.add_parser(
        "lost", help="list the lost followers of a scope as JSON lines (--take removes them)"
    )
    _database_option(lost_p, prefect=True)
    lost_p.add_argument(
        "--scope", default=None, help="the consumer's scope (default; triggers with --prefect)"
    )
    lost_p.add_argument(
        "--take",
        action="store_true",
        help=(
            "take them: hand them over as get_lost_followers() does, print them, then remove "
            "them (default: only look)"
        ),
    )
    lost_p.set_defaults(func=_lost)

    purge_p = commands.add_parser(
        "purge", help="delete expired seen records and expired leases (all scopes)"
    )
    _database_option(purge_p)
    purge_p.add_argument("--dry-run", action="store_true", help="only count what would go")
    purge_p.set_defaults(func=_purge)

    demo_p = commands.add_parser(
        "demo",
        help="simulate workers, a jumbled stream with duplicates, a crash and a restart; verify",
    )
    demo_p.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help="database to run on (default: SQLite in a temporary directory)",
    )
    demo_p.add_argument("--events", type=_positive_int, default=600, help="events (600)")
    demo_p.add_argument("--workers", type=_positive_int, default=4, help="workers, >= 2 (4)")
    demo_p.add_argument("--seed", type=int, default=7, help="random seed of the stream (7)")
    demo_p.add_argument(
        "--exactly-once",
        action="store_true",
        help="handle through exactly_once, writing one effect row per handling in the same "
        "database; the verdict also requires exactly one effect row per event after the crash",
    )
    demo_p.set_defaults(func=_demo)

    bench_p = commands.add_parser(
        "bench", help="measure workloads W1-W5, E0-E1 against the floors of the same database"
    )
    bench_p.add_argument(
        "--database-url",
        metavar="URL",
        action="append",
        default=None,
        help="a database to measure; repeat for several (default: SQLite in a temporary file)",
    )
    bench_p.add_argument("--events", type=_positive_int, default=5000, help="events (5000)")
    bench_p.add_argument("--repeat", type=_positive_int, default=3, help="runs per workload (3)")
    bench_p.add_argument("--seed", type=int, default=1, help="random seed (1)")
    bench_p.add_argument(
        "--workloads",
        default="W1,W2,W3,W4,W5,E0,E1",
        help=(
            "comma-separated subset (W1,W2,W3,W4,W5,E0,E1; E0: W1 writing one effect row per "
            "event in its own transaction, E1: the same through exactly_once)"
        ),
    )
    bench_p.add_argument(
        "--sqlite-synchronous",
        metavar="MODES",
        default="",
        help=(
            "run a SQLite database once per PRAGMA synchronous mode, e.g. FULL,NORMAL, to see "
            "what durability costs (default: once, with $ORDERING_SQL_SQLITE_SYNCHRONOUS or FULL)"
        ),
    )
    bench_p.add_argument(
        "--pooled-database-url",
        metavar="URL",
        action="append",
        default=[],
        help=(
            "a Postgres database reached through a transaction pooler (pgbouncer), measured with "
            "ORDERING_SQL_POOLER=transaction after the others; repeat for several"
        ),
    )
    bench_p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench_p.add_argument(
        "--plot",
        metavar="FILE.png",
        help=(
            "draw events/s per workload on a log scale, with each database's floors "
            "(needs matplotlib: pip install 'ordering-sql[bench]')"
        ),
    )
    bench_p.set_defaults(func=_bench)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"must be a number of seconds, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0:
        msg = f"must be more than 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


async def _migrate(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(migration.sql_script(args.database_url))
        return 0
    settings = Settings.from_env(args.database_url)
    revision = await migration.migrate(args.database_url)
    print(f"Database {mask_url(settings.url)} is at revision {revision}.", file=sys.stderr)
    return 0


@asynccontextmanager
async def _store(database_url: str | None, *, read_only: bool = False) -> AsyncIterator[Store]:
    """A Store of its own for one command; ``read_only`` for the commands that only look,
    which then create nothing (a missing SQLite file is an error, not a new database)."""
    settings = Settings.from_env(database_url)
    if read_only:
        settings = settings.model_copy(update={"read_only": True})
    store = Store.from_settings(settings)
    try:
        yield store
    finally:
        await store.dispose()


def _database_url(args: argparse.Namespace) -> str | None:
    """``--database-url``, or with ``--prefect`` the database Prefect's adapter uses."""
    if not getattr(args, "prefect", False):
        url: str | None = args.database_url
        return url
    try:
        from ordering_sql import prefect
    except ImportError as exc:
        msg = f"--prefect needs Prefect installed: pip install 'ordering-sql[prefect]' ({exc})."
        raise ConfigurationError(msg) from None
    return prefect.database_url()


async def _status(args: argparse.Namespace) -> int:
    if args.scope is not None:
        validate_scope(args.scope)
    if args.watch is not None and args.json:
        msg = "--watch refreshes the table; for JSON, run status --json as often as needed."
        raise ConfigurationError(msg)
    async with _store(_database_url(args), read_only=True) as store:
        if args.watch is not None:
            return await _terminal.watch_status(store, args.scope, args.watch)
        scopes = await status(store, now=await store.now(), scope=args.scope)
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in scopes], indent=2))
    else:
        _terminal.console().print(_terminal.status_table(scopes, store.url))
    return 0


async def _order(args: argparse.Namespace) -> int:
    out = sys.stdout
    interactive = out.isatty()

    def emit(line: str) -> None:
        out.write(line + "\n")
        if interactive:
            out.flush()

    def malformed(number: int, reason: str) -> None:
        print(f"ordering-sql: line {number}: skipped, not a valid event: {reason}", file=sys.stderr)

    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        args.scope, database_url=args.database_url
    )
    try:
        await ordering.check()  # a bad database fails now, even for an empty input
        with _open_input(args.file) as lines:
            summary = await order_lines(
                ordering,
                lines,
                emit,
                on_malformed=malformed,
                strict=args.strict,
                flush_lost=args.flush_lost,
                restamp=args.restamp,
                batch_size=args.batch or (1 if args.file == "-" else ORDER_BATCH),
            )
    except MalformedLine as exc:
        out.flush()
        print(f"ordering-sql: error: {exc} (stopped: --strict)", file=sys.stderr)
        return EXIT_MALFORMED
    finally:
        await ordering.close()
    out.flush()
    print(f"ordering-sql: {summary.line()}", file=sys.stderr)
    return EXIT_MALFORMED if summary.malformed else 0


@contextmanager
def _open_input(name: str) -> Iterator[BinaryIO]:
    # Binary: each line is checked as UTF-8 on its own, so one bad line is one malformed line.
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        handle = open(name, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        msg = f"Cannot read {name!r}: {exc.strerror}."
        raise ConfigurationError(msg) from None
    with handle:
        yield handle


async def _lost(args: argparse.Namespace) -> int:
    scope = validate_scope(args.scope or ("triggers" if args.prefect else "default"))
    database_url = _database_url(args)
    if args.take:
        ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(scope, database_url=database_url)
        try:
            # Handed over as the engine's sweep does (claimed), printed, and only then removed:
            # if this command dies before the end, the followers come back after the claim.
            taken = await ordering.get_lost_followers()
            lines = [event.model_dump_json() for event in taken]
            for line in lines:
                print(line)
            sys.stdout.flush()
            for event in taken:
                await ordering.forget_follower(event)
        finally:
            await ordering.close()
    else:
        async with _store(database_url, read_only=True) as store:
            lines = await peek_lost(store, scope=scope, now=await store.now())
        for line in lines:
            print(line)
    verb = "removed" if args.take else "found (nothing removed; --take removes them)"
    print(f"ordering-sql: {len(lines)} lost followers {verb}", file=sys.stderr)
    return 0


async def _purge(args: argparse.Namespace) -> int:
    async with _store(args.database_url, read_only=args.dry_run) as store:
        result = await purge(store, now=await store.now(), dry_run=args.dry_run)
    verb = "deleted" if result.deleted else "would delete (dry run)"
    print(
        f"{verb} {result.total} expired rows: {result.seen} seen records, "
        f"{result.leases} expired leases"
    )
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from ordering_sql.tools.demo import run_demo

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("handling events", total=args.events)
        report = await run_demo(
            database_url=args.database_url,
            events=args.events,
            workers=args.workers,
            seed=args.seed,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            exactly_once=args.exactly_once,
        )
    _terminal.print_demo(report)
    return 0 if report.ok else EXIT_FAILURE


async def _bench(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from ordering_sql.tools.bench import WORKLOADS, run_bench
    from ordering_sql.tools.plot import plot

    workloads = tuple(w.strip().upper() for w in args.workloads.split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        msg = f"Unknown workloads {unknown!r}; choose from {', '.join(WORKLOADS)}."
        raise ConfigurationError(msg)
    modes = tuple(m.strip().upper() for m in args.sqlite_synchronous.split(",") if m.strip())
    unknown_modes = [mode for mode in modes if mode not in SQLITE_SYNCHRONOUS_MODES]
    if unknown_modes:
        msg = (
            f"Unknown SQLite synchronous modes {unknown_modes!r}; "
            f"choose from {', '.join(SQLITE_SYNCHRONOUS_MODES)}."
        )
        raise ConfigurationError(msg)
    with tempfile.TemporaryDirectory(prefix="ordering-sql-bench-db-") as tmp:
        urls = args.database_url or [f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"]
        report = await run_bench(
            urls,
            events=args.events,
            repeat=args.repeat,
            seed=args.seed,
            workloads=workloads,
            sqlite_synchronous=modes,
            pooled_urls=tuple(args.pooled_database_url),
            on_step=lambda step: print(f"bench: {step}", file=sys.stderr),
        )
    _terminal.print_bench(report)
    if args.json:
        Path(args.json).write_text(report.model_dump_json(indent=2))  # noqa: ASYNC240 - once
    if args.plot:
        plot(report, Path(args.plot))
    return 0 if all(r.correct for r in report.results) else EXIT_FAILURE


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
    except BrokenPipeError:
        # The reader went away (`ordering-sql order FILE | head`): stop quietly, as a filter
        # does. Python would flush stdout again at exit and fail on the broken pipe: point it
        # at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
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
