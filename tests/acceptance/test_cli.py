"""The ``ordering-sql`` command line, run as a user runs it: a subprocess in some directory."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from ordering_sql.migration import head_revision
from tests.conftest import OrderingFactory
from tests.support import Clock, make_event

TIMEOUT_S = 60
SECRET = "s3cr3t-pw"
UNREACHABLE_PG = f"postgresql+asyncpg://app:{SECRET}@127.0.0.1:1/x"

ENTRY_POINTS = {
    "module": [sys.executable, "-m", "ordering_sql"],
    "script": [str(Path(sys.executable).parent / "ordering-sql")],
}


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr_lines if line.startswith("ordering-sql: error:")]


@dataclass(frozen=True)
class Cli:
    """Runs the command line in ``cwd`` with a clean environment plus ``env``."""

    entry: list[str]
    cwd: Path
    env: dict[str, str]

    async def __call__(self, *args: str, cwd: Path | None = None) -> Result:
        proc = await asyncio.create_subprocess_exec(
            *self.entry,
            *args,
            cwd=cwd or self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


def _environment() -> dict[str, str]:
    # The autouse fixture in conftest already removed the developer's ORDERING_SQL_* settings.
    env = {k: v for k, v in os.environ.items() if k != "ORDERING_SQL_DATABASE_URL"}
    env["COLUMNS"] = "500"  # keep rich from wrapping long URLs in the status table
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture(params=sorted(ENTRY_POINTS))
def cli(request: pytest.FixtureRequest, workdir: Path) -> Cli:
    """The CLI through ``python -m ordering_sql`` and through the console script."""
    return Cli(ENTRY_POINTS[request.param], workdir, _environment())


@pytest.fixture
def module_cli(workdir: Path) -> Cli:
    return Cli(ENTRY_POINTS["module"], workdir, _environment())


def sqlite_revision(path: Path) -> str | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT version_num FROM ordering_sql_version").fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def assert_one_clean_error_line(result: Result, *, must_name: str) -> str:
    """Exit code 1, one ``ordering-sql: error:`` line, no traceback, no password."""
    assert result.code == 1, result
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    assert result.stderr_lines[-1] == line
    assert must_name in line
    return line


# -- help ---------------------------------------------------------------------------------------


async def test_help(cli: Cli) -> None:
    top = await cli("--help")
    assert top.code == 0
    assert "migrate" in top.stdout
    assert "status" in top.stdout


async def test_subcommand_help(module_cli: Cli) -> None:
    migrate_help, status_help = await asyncio.gather(
        module_cli("migrate", "--help"), module_cli("status", "--help")
    )
    assert migrate_help.code == 0
    assert "--database-url" in migrate_help.stdout
    assert "--sql" in migrate_help.stdout
    assert status_help.code == 0
    for option in ("--database-url", "--scope", "--json"):
        assert option in status_help.stdout


async def test_missing_command_is_a_usage_error(module_cli: Cli) -> None:
    result = await module_cli()
    assert result.code == 2
    assert "usage: ordering-sql" in result.stderr
    assert "Traceback" not in result.stderr


# -- migrate and status ------------------------------------------------------------------------


async def test_migrate_then_status_on_sqlite(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    url = f"sqlite+aiosqlite:///{path}"

    migrated = await cli("migrate", "--database-url", url)

    assert migrated.code == 0, migrated
    assert f"is at revision {head_revision()}" in migrated.stderr
    assert migrated.stdout == ""
    assert sqlite_revision(path) == head_revision()

    status = await cli("status", "--database-url", url)
    assert status.code == 0, status
    assert f"No ordering state in {url}" in status.stdout

    as_json = await cli("status", "--database-url", url, "--json")
    assert as_json.code == 0, as_json
    assert json.loads(as_json.stdout) == []


async def test_migrate_then_status_on_postgres(module_cli: Cli, empty_postgres_url: str) -> None:
    migrated = await module_cli("migrate", "--database-url", empty_postgres_url)
    assert migrated.code == 0, migrated
    assert f"is at revision {head_revision()}" in migrated.stderr

    again = await module_cli("migrate", "--database-url", empty_postgres_url)
    assert again.code == 0, again

    status = await module_cli("status", "--database-url", empty_postgres_url, "--json")
    assert status.code == 0, status
    assert json.loads(status.stdout) == []


async def test_status_on_unmigrated_postgres_says_to_migrate(
    module_cli: Cli, empty_postgres_url: str
) -> None:
    result = await module_cli("status", "--database-url", empty_postgres_url)
    line = assert_one_clean_error_line(result, must_name="ordering-sql migrate")
    assert len(result.stderr_lines) == 1
    assert "unexpected" not in line


async def test_status_shows_state_written_through_the_library(
    module_cli: Cli, make_ordering: OrderingFactory, database_url: str, clock: Clock
) -> None:
    alpha = make_ordering("alpha", lease_timeout=timedelta(hours=1))
    for _ in range(2):
        await alpha.record_event_as_seen(make_event())
    assert await alpha.record_event_as_processing(make_event())
    alpha_past = make_ordering("alpha", clock=Clock(clock.now - timedelta(hours=2)))
    await alpha_past.record_event_as_seen(make_event())  # its seen mark has expired by now

    beta = make_ordering("beta")
    hour_ago = clock.now - timedelta(hours=1)
    await beta.record_follower(make_event(follows=uuid.uuid4(), received=hour_ago))
    await beta.record_follower(make_event(follows=uuid.uuid4()))
    for ordering in (alpha, alpha_past, beta):
        await ordering.close()

    result = await module_cli("status", "--database-url", database_url, "--json")

    assert result.code == 0, result
    scopes: list[dict[str, Any]] = json.loads(result.stdout)
    assert [s["scope"] for s in scopes] == ["alpha", "beta"]
    alpha_s, beta_s = scopes
    assert alpha_s["seen"] == 2
    assert alpha_s["seen_expired"] == 1
    assert alpha_s["processing"] == 1
    assert alpha_s["parked"] == 0
    assert beta_s["parked"] == 2
    assert beta_s["claimed"] == 0
    assert beta_s["past_lookback"] == 1, "the follower received an hour ago is past the lookback"
    assert beta_s["seen"] == 0
    oldest = TypeAdapter(timedelta).validate_python(beta_s["oldest_parked_age"])
    assert oldest >= timedelta(hours=1)

    only_beta = await module_cli(
        "status", "--database-url", database_url, "--json", "--scope", "beta"
    )
    assert only_beta.code == 0, only_beta
    assert [s["scope"] for s in json.loads(only_beta.stdout)] == ["beta"]

    table = await module_cli("status", "--database-url", database_url)
    assert table.code == 0, table
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines() if line.strip()}
    # columns: seen, expired, leases, expired, parked, claimed, lost, oldest
    assert rows["alpha"][:6] == ["2", "1", "1", "0", "0", "0"]
    assert rows["beta"][:7] == ["0", "0", "0", "0", "2", "0", "1"]


async def test_migrate_sql_prints_ddl_without_touching_a_database(
    module_cli: Cli, workdir: Path
) -> None:
    result = await module_cli("migrate", "--sql")

    assert result.code == 0, result
    assert "CREATE TABLE ordering_events" in result.stdout
    assert "CREATE TABLE ordering_followers" in result.stdout
    assert "CREATE TABLE ordering_sql_version" in result.stdout
    assert not (workdir / "ordering.db").exists()


async def test_migrate_sql_for_postgres_needs_no_server(module_cli: Cli) -> None:
    result = await module_cli("migrate", "--sql", "--database-url", UNREACHABLE_PG)

    assert result.code == 0, result
    assert "CREATE TABLE ordering_events" in result.stdout
    assert "TIMESTAMP WITH TIME ZONE" in result.stdout
    assert SECRET not in result.stdout + result.stderr


# -- errors -------------------------------------------------------------------------------------


async def test_status_on_unreachable_database_is_one_masked_line(cli: Cli) -> None:
    result = await cli("status", "--database-url", UNREACHABLE_PG)

    line = assert_one_clean_error_line(result, must_name="app:***@127.0.0.1:1/x")
    assert result.stderr_lines == [line]


async def test_migrate_on_unreachable_database_fails_cleanly(cli: Cli) -> None:
    result = await cli("migrate", "--database-url", UNREACHABLE_PG)
    # A progress line ("Migrating ...") may precede the error; the error itself is one line.
    assert_one_clean_error_line(result, must_name="")


async def test_migrate_on_unreachable_database_names_the_database(module_cli: Cli) -> None:
    result = await module_cli("migrate", "--database-url", UNREACHABLE_PG)
    line = assert_one_clean_error_line(result, must_name="app:***@127.0.0.1:1/x")
    assert "unexpected" not in line


@pytest.mark.parametrize("command", ["migrate", "status"])
async def test_unsupported_scheme_is_one_line(module_cli: Cli, command: str) -> None:
    result = await module_cli(command, "--database-url", f"mysql://app:{SECRET}@127.0.0.1/db")

    line = assert_one_clean_error_line(result, must_name="'mysql'")
    assert result.stderr_lines == [line]


async def test_debug_shows_the_traceback(module_cli: Cli) -> None:
    result = await module_cli("--debug", "status", "--database-url", "mysql://127.0.0.1/db")
    assert result.code == 1
    assert "Traceback" in result.stderr
    assert "ordering-sql: error:" in result.stderr


# -- which database ------------------------------------------------------------------------------


async def test_environment_url_is_used_without_option(module_cli: Cli, tmp_path: Path) -> None:
    env_db = tmp_path / "elsewhere" / "from-env.db"
    env_db.parent.mkdir()
    env = {**module_cli.env, "ORDERING_SQL_DATABASE_URL": f"sqlite:///{env_db}"}
    with_env = Cli(module_cli.entry, module_cli.cwd, env)

    migrated = await with_env("migrate")
    status = await with_env("status")

    assert migrated.code == 0, migrated
    assert sqlite_revision(env_db) == head_revision()
    assert not (module_cli.cwd / "ordering.db").exists()
    assert status.code == 0, status
    assert f"sqlite+aiosqlite:///{env_db}" in status.stdout


async def test_option_wins_over_environment(module_cli: Cli, tmp_path: Path) -> None:
    env_db, option_db = tmp_path / "env.db", tmp_path / "option.db"
    env = {**module_cli.env, "ORDERING_SQL_DATABASE_URL": f"sqlite:///{env_db}"}
    with_env = Cli(module_cli.entry, module_cli.cwd, env)

    result = await with_env("migrate", "--database-url", f"sqlite:///{option_db}")

    assert result.code == 0, result
    assert sqlite_revision(option_db) == head_revision()
    assert not env_db.exists()


async def test_default_is_ordering_db_in_the_working_directory(
    module_cli: Cli, workdir: Path
) -> None:
    migrated = await module_cli("migrate")
    status = await module_cli("status")

    assert migrated.code == 0, migrated
    assert sqlite_revision(workdir / "ordering.db") == head_revision()
    assert status.code == 0, status
    assert "No ordering state in sqlite+aiosqlite:///ordering.db" in status.stdout
