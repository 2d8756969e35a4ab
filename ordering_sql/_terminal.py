"""What the ``ordering-sql`` command line prints: the status table (once, or refreshed in
place), the demo's verdict and the bench's results. Rich is imported only when a table is drawn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ordering_sql.admin import ScopeStatus, status
from ordering_sql.store import Store

if TYPE_CHECKING:
    from ordering_sql.tools.bench import BenchReport
    from ordering_sql.tools.demo import DemoReport

__all__ = ["console", "print_bench", "print_demo", "status_table", "watch_status"]


async def watch_status(store: Store, scope: str | None, every: float) -> int:
    """The status table every ``every`` seconds until interrupted (exit code 0)."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    out = console()

    async def table() -> Any:
        scopes = await status(store, now=await store.now(), scope=scope)
        stamp = Text(f"{datetime.now().astimezone():%H:%M:%S}, every {every:g} s (Ctrl-C ends)")
        return Group(status_table(scopes, store.url), stamp)

    try:
        if out.is_terminal:
            with Live(await table(), console=out, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(every)
                    live.update(await table(), refresh=True)
        while True:  # piped: one table after another, for a log
            out.print(await table())
            await asyncio.sleep(every)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0


def print_demo(report: DemoReport) -> None:
    t, c = report.tally, report.check
    verdict = "PASSED" if report.ok else "FAILED"
    lines = [
        f"ordering-sql demo on {report.database}: {report.workers} workers, seed {report.seed}",
        f"  events                 {c.events} ({report.deliveries} deliveries, jumbled)",
        f"  handled                {c.handled}",
        f"  parked, then replayed  {t['parked']} parked, {t['replayed']} replayed by a leader",
        f"  duplicates skipped     {t['duplicates_skipped']}",
        f"  crash                  a worker killed (SIGKILL) after {report.crashed_worker_handled} "
        "events, then restarted",
        f"  recovered by sweep     {t['lost_swept']}",
        f"  handled twice          {c.handled_twice} (allowed: the handler the crash interrupted)",
        f"  order violations       {c.order_violations}",
        f"  events lost            {c.lost}",
        *_effect_lines(report),
        f"  throughput             {report.throughput:,.0f} events/s ({report.seconds:.1f} s)",
        f"  verdict                {verdict}",
    ]
    print("\n".join(lines))
    for example in c.examples + (report.effects.examples if report.effects else []):
        print(f"  ! {example}")


def _effect_lines(report: DemoReport) -> list[str]:
    e = report.effects
    if e is None:
        return []
    return [
        f"  effect rows            {e.rows} for {e.events} events: "
        f"{e.missing} missing, {e.twice} twice, {e.before_leader} before their leader"
    ]


def print_bench(report: BenchReport) -> None:
    from ordering_sql.tools.floors import PARALLEL_FLOOR

    for backend, f in report.floors.items():
        print(
            f"{backend} floors (per s): raw INSERT+COMMIT {f.raw_insert_commit:,.0f} "
            f"({f.raw_insert_commit_parallel:,.0f} over {PARALLEL_FLOOR} connections), "
            f"raw SELECT 1 {f.raw_select_1:,.0f}, "
            f"SQLAlchemy INSERT+COMMIT {f.sqlalchemy_insert_commit:,.0f}, "
            f"SQLAlchemy SELECT 1 {f.sqlalchemy_select_1:,.0f}; two-statement floor "
            f"{f.two_statement:,.0f} events/s"
        )
    header = f"{'workload':8} {'backend':13} {'events/s':>9} {'x floor':>8} {'p50 ms':>7} "
    print(header + f"{'p99 ms':>7} {'stmts/ev':>8}  check")
    for r in report.results:
        p50 = f"{r.p50_s * 1000:.2f}" if r.p50_s is not None else "-"
        p99 = f"{r.p99_s * 1000:.2f}" if r.p99_s is not None else "-"
        stmts = f"{r.statements_per_event:.2f}" if r.statements_per_event is not None else "-"
        verdict = "ok" if r.correct else "FAILED: " + "; ".join(r.problems)
        print(
            f"{r.workload:8} {r.backend:13} {r.events_per_s:9,.0f} {r.ratio_to_floor:8.2f} "
            f"{p50:>7} {p99:>7} {stmts:>8}  {verdict}"
        )


def _age(age: timedelta | None) -> str:
    if age is None:
        return "-"
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped: do not squeeze the table into 80 columns
    return console


def status_table(scopes: Sequence[ScopeStatus], url: str) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    # Scope names and URLs are data: Text() keeps rich from reading "[...]" in them as markup.
    title = Text(f"ordering-sql status: {url}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("scope", no_wrap=True)
    for column in ("seen", "expired", "leases", "expired", "parked", "claimed", "lost", "oldest"):
        table.add_column(column, justify="right", no_wrap=True)
    for s in scopes:
        table.add_row(
            Text(s.scope),
            str(s.seen),
            str(s.seen_expired),
            str(s.processing),
            str(s.processing_expired),
            str(s.parked),
            str(s.claimed),
            str(s.past_lookback),
            _age(s.oldest_parked_age),
        )
    table.caption = (
        "seen: handled events remembered; leases: events being processed; parked: followers "
        "waiting (claimed: being replayed by their leader); lost: parked past the lookback; "
        "oldest: age of the oldest parked follower"
    )
    return table if scopes else Text(f"No ordering state in {url}.")
