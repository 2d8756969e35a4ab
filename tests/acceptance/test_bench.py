"""``ordering-sql bench``: small runs that check the report, not the speed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from ordering_sql.migration import migrate
from ordering_sql.tools.bench import (
    EFFECTS_TABLE,
    BenchReport,
    WorkloadResult,
    _Effects,
    chains,
    run_workload,
)
from ordering_sql.tools.floors import Floors
from ordering_sql.tools.plot import figure

#: Floors for runs that skip measuring them (a second each): only the ratios depend on them.
SOME_FLOORS = Floors(
    raw_insert_commit=1000.0,
    raw_insert_commit_parallel=1000.0,
    raw_select_1=1000.0,
    sqlalchemy_insert_commit=1000.0,
    sqlalchemy_select_1=1000.0,
)


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "ordering_sql", "bench", "--repeat", "1", "--json", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result, json.loads(out.read_text()) if out.exists() else {}


def test_bench_on_sqlite_reports_floors_and_correct_workloads(tmp_path: Path) -> None:
    chart = tmp_path / "bench.png"
    result, report = _bench(
        tmp_path, "--events", "60", "--workloads", "W1,W2,W3", "--plot", str(chart)
    )
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes().startswith(b"\x89PNG")
    floors = report["floors"]["sqlite"]
    measured = ("raw_insert_commit", "raw_insert_commit_parallel", "sqlalchemy_insert_commit")
    assert all(floors[k] > 0 for k in measured)
    rows = {r["workload"]: r for r in report["results"]}
    assert set(rows) == {"W1", "W2", "W3"}
    for row in rows.values():
        assert row["correct"], row["problems"]
        assert row["events_per_s"] > 0
        assert row["statements_per_event"] is not None
    assert "W1" in result.stdout
    assert "two-statement floor" in result.stdout


def test_bench_rejects_an_unknown_workload(tmp_path: Path) -> None:
    result, _ = _bench(tmp_path, "--workloads", "W9")
    assert result.returncode != 0
    assert "Unknown workloads" in result.stderr
    assert "Traceback" not in result.stderr


async def test_e0_and_e1_write_one_effect_row_per_event_on_sqlite(tmp_path: Path) -> None:
    """E0 (``preceding_event_confirmed`` + an effect transaction of its own) and E1
    (``exactly_once``) pass the workloads' check and the effects check, and leave no table."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bench.db'}"
    await migrate(url)
    for name in ("E0", "E1"):
        row = await run_workload(
            name, url, events=40, repeat=2, seed=1, floors=SOME_FLOORS, folder=tmp_path
        )
        assert row.correct, row.problems
        assert row.events_per_s > 0
        assert row.p99_s is not None
        assert row.statements_per_event is not None
    with sqlite3.connect(tmp_path / "bench.db") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert EFFECTS_TABLE not in tables


async def test_the_effects_check_finds_missing_duplicated_and_stray_rows(tmp_path: Path) -> None:
    """The check E0 and E1 add bites: one event without its row, one with two, one stray row."""
    stream = chains(10, shuffled=False, seed=1)
    stray = stream.events[0].model_copy(update={"id": uuid4()})
    effects = _Effects(f"sqlite+aiosqlite:///{tmp_path / 'effects.db'}")
    try:
        await effects.create()
        async with effects.engine.begin() as conn:
            for event in [*stream.events[1:], stream.events[1], stray]:
                await effects.write(conn, event)
        wrong = await effects.problems(stream)
        assert wrong is not None
        assert "missing 1," in wrong
        assert "more than once 1," in wrong
        assert "of no event of the run 1" in wrong
        # The table was emptied for the next run: now every row is missing.
        assert f"missing {len(stream.events)}," in (await effects.problems(stream) or "")
    finally:
        await effects.drop()


@pytest.mark.postgres
@pytest.mark.slow
def test_bench_w5_processes_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    result, report = _bench(
        tmp_path, "--events", "100", "--workloads", "W1,W5", "--database-url", postgres_url
    )
    assert result.returncode == 0, result.stderr
    rows = {r["workload"]: r for r in report["results"]}
    assert rows["W5"]["correct"], rows["W5"]["problems"]
    assert rows["W1"]["backend"] == "postgresql"


def test_the_plot_is_on_a_log_scale_with_each_backends_floors_drawn() -> None:
    """W4's bar is 10-50x W1's: on a linear axis W1-W3 flatten; the floors give the scale."""
    floors = {
        "sqlite": Floors(
            raw_insert_commit=1300.0,
            raw_insert_commit_parallel=1500.0,
            raw_select_1=9000.0,
            sqlalchemy_insert_commit=900.0,
            sqlalchemy_select_1=5000.0,
        ),
        "postgresql": Floors(
            raw_insert_commit=2400.0,
            raw_insert_commit_parallel=4000.0,
            raw_select_1=5600.0,
            sqlalchemy_insert_commit=1400.0,
            sqlalchemy_select_1=2200.0,
        ),
    }
    results = [
        WorkloadResult(
            workload=workload,
            backend=backend,
            events=5000,
            runs=[rate],
            events_per_s=rate,
            p50_s=None,
            p99_s=None,
            statements_per_event=None,
            ratio_to_floor=rate / floors[backend].two_statement,
            correct=True,
            problems=[],
        )
        for backend in floors
        for workload, rate in (("W1", 500.0), ("W3", 600.0), ("W4", 11000.0))
    ]
    fig = figure(BenchReport(floors=floors, results=results))
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    drawn = sorted(line.get_ydata()[0] for line in ax.get_lines())
    expected = [f.two_statement for f in floors.values()] + [
        f.raw_insert_commit for f in floors.values()
    ]
    assert drawn == sorted(expected)
    heights = sorted(round(bar.get_height()) for bar in ax.patches)
    assert heights == sorted([500, 600, 11000] * 2)
