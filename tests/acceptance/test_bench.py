"""``ordering-sql bench``: small runs that check the report, not the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


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
    result, report = _bench(tmp_path, "--events", "60", "--workloads", "W1,W2,W3")
    assert result.returncode == 0, result.stderr
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
