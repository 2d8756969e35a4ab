"""Every fault a clear error, as the operator meets it on the command line (issue items 3-6).

Each command runs as a user runs it, ``python -m ordering_sql`` in a subprocess, with a clean
environment. What is checked:

* passwords are never printed, whatever form the URL gives them in, on success and on failure,
  with and without ``--debug``, whether the URL comes from ``--database-url`` or from
  ``ORDERING_SQL_DATABASE_URL``; the user and host still show, so the operator knows which
  database it is;
* scope names are data: printed literally (no rich markup), and a scope that is not text is a
  one-line error;
* a database whose schema is newer than this code says to upgrade ordering-sql;
* the read-only commands (``status``, ``lost`` without ``--take``) only read: they create no
  database, and inspect one they may not write;
* ``order ... | head`` ends quietly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import CausalOrdering, dispose_engines
from tests.acceptance.test_cli import Result, _environment
from tests.conftest import BACKENDS
from tests.support import chain, make_event

TIMEOUT_S = 60
ENTRY = [sys.executable, "-m", "ordering_sql"]
SECRET = "S3cr3t"
ERROR_PREFIX = "ordering-sql: error:"
PAST_LOOKBACK = timedelta(minutes=20)  # the lookback is 15 minutes

#: The ways a password reaches the URL; ``{user}``, ``{host}``, ``{port}``, ``{db}`` filled in.
#: The unescaped ``@`` form means the password ``ab@S3cr3t``: the user information ends at the
#: last ``@`` before the host, as in a browser's URL parser.
_PASSWORD_FORMS = {
    "userinfo": "{scheme}://{user}:S3cr3t@{host}:{port}/{db}",
    "query": "{scheme}://{user}@{host}:{port}/{db}?password=S3cr3t",
    "unescaped-at": "{scheme}://{user}:ab@S3cr3t@{host}:{port}/{db}",
    "percent-encoded": "{scheme}://{user}:p%40S3cr3t@{host}:{port}/{db}",
}
#: Every form with the driver named; the driverless scheme (which takes the same masking path
#: once its driver is chosen) with the unescaped "@", the form most likely to go wrong.
PASSWORD_FORMS = [
    *(
        pytest.param("postgresql+asyncpg", form, id=f"postgresql+asyncpg-{name}")
        for name, form in _PASSWORD_FORMS.items()
    ),
    pytest.param("postgresql", _PASSWORD_FORMS["unescaped-at"], id="postgresql-unescaped-at"),
]


# -- running the command line -------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """``python -m ordering_sql`` in ``cwd`` with a clean environment; argv may hold bytes."""

    cwd: Path
    env: dict[str, str]

    async def __call__(
        self,
        *args: str | bytes,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        cwd: Path | None = None,
    ) -> Result:
        proc = await asyncio.create_subprocess_exec(
            *ENTRY,
            *args,
            cwd=cwd or self.cwd,
            env={**self.env, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        return Result(
            proc.returncode,
            out.decode(errors="backslashreplace"),
            err.decode(errors="backslashreplace"),
        )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def run(workdir: Path) -> Runner:
    return Runner(workdir, _environment())


@pytest.fixture(params=BACKENDS)
def any_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database on SQLite, then on Postgres."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def one_error_line(result: Result, what: str) -> str:
    """The single ``ordering-sql: error:`` line of a failed command, with no traceback."""
    assert result.code != 0, f"{what}: must fail, but exited 0: {result}"
    assert "Traceback" not in result.stderr, f"{what}: a traceback without --debug:\n{result}"
    assert result.stderr_lines == result.error_lines, (
        f"{what}: stderr must be exactly one '{ERROR_PREFIX}' line, got:\n{result.stderr}"
    )
    assert len(result.error_lines) == 1, f"{what}: one error line expected:\n{result.stderr}"
    return result.error_lines[0]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def unwrapped(content: str) -> str:
    """``content`` without any whitespace: what a line wrapped by rich said."""
    return "".join(content.split())


def fingerprint(path: Path) -> tuple[str, int, int]:
    """The content, modification time and permission bits of ``path``."""
    info = path.stat()
    return (
        hashlib.sha256(path.read_bytes()).hexdigest(),
        info.st_mtime_ns,
        stat.S_IMODE(info.st_mode),
    )


def secret_leaks(result: Result, what: str) -> list[str]:
    """Where the password shows on stdout or stderr, also where rich wrapped a long line (the
    status table wraps its title, the URL, to the width of the table)."""
    leaks: list[str] = []
    for stream, content in (("stdout", result.stdout), ("stderr", result.stderr)):
        lines = [line for line in content.splitlines() if SECRET in line]
        if lines:
            leaks.append(f"{what}: the password is printed on {stream}: " + " | ".join(lines))
        elif SECRET in unwrapped(content):
            leaks.append(f"{what}: the password is printed on {stream}, wrapped: {content!r}")
    return leaks


async def _sql(url: str, *statements: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _revision(url: str) -> str | None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (
                await conn.execute(text("SELECT version_num FROM ordering_sql_version"))
            ).scalar_one_or_none()
    finally:
        await engine.dispose()


# -- 3. passwords are never printed ---------------------------------------------------------------


def _with_password(postgres_url: str, scheme: str, form: str, *, port: int | None = None) -> str:
    """``postgres_url``'s database, user and host, with the password in ``form``."""
    parsed = make_url(postgres_url)
    return form.format(
        scheme=scheme,
        user=parsed.username,
        host=parsed.host,
        port=port or parsed.port or 5432,
        db=parsed.database,
    )


def _shown_url(postgres_url: str, *, port: int | None = None) -> re.Pattern[str]:
    """The database as a message names it: user (password masked, if shown) and host."""
    parsed = make_url(postgres_url)
    where = f"{parsed.host}:{port or parsed.port or 5432}/{parsed.database}"
    return re.compile(rf"\b{re.escape(str(parsed.username))}(:\*\*\*)?@{re.escape(where)}")


@pytest.mark.postgres
@pytest.mark.parametrize(("scheme", "form"), PASSWORD_FORMS)
async def test_password_is_never_printed_by_successful_commands(
    run: Runner, postgres_url: str, scheme: str, form: str
) -> None:
    """On a real migrated database (TRUST auth: any password connects), every command that
    works prints no password, from ``--database-url`` or from the environment."""
    ordering: CausalOrdering[Any] = CausalOrdering("pw", database_url=postgres_url)
    await ordering.record_event_as_seen(make_event())
    await ordering.close()
    await dispose_engines()
    url = _with_password(postgres_url, scheme, form)
    shown = _shown_url(postgres_url)
    commands = {
        "status": ["status"],
        "status --json": ["status", "--json"],
        "migrate": ["migrate"],
        "lost": ["lost", "--scope", "pw"],
        "purge --dry-run": ["purge", "--dry-run"],
        "migrate --sql": ["migrate", "--sql"],
    }
    runs = [
        (name, "--database-url", [*args, "--database-url", url], {})
        for name, args in commands.items()
    ]
    # The environment too, for the two commands that name the database.
    runs += [
        (name, "ORDERING_SQL_DATABASE_URL", commands[name], {"ORDERING_SQL_DATABASE_URL": url})
        for name in ("status", "migrate")
    ]

    results = await asyncio.gather(*(run(*args, env=env) for _, _, args, env in runs))

    problems: list[str] = []
    for (name, way, _, _), result in zip(runs, results, strict=True):
        what = f"`{name}` with the URL in {way}"
        problems += secret_leaks(result, what)
        if result.code != 0 or "Traceback" in result.stderr:
            problems.append(f"{what} must succeed on a migrated database: {result}")
            continue
        if name == "status":
            if not shown.search(unwrapped(result.stdout)):
                problems.append(f"{what}: the title names the database (user, host): {result}")
            if not re.search(r"^\s*pw\s+1\s", result.stdout, re.MULTILINE):
                problems.append(f"{what}: the row of scope pw, 1 seen: {result}")
        if name == "status --json" and [r["scope"] for r in json.loads(result.stdout)] != ["pw"]:
            problems.append(f"{what}: scope pw: {result}")
        if name == "migrate" and not shown.search(result.stderr):
            problems.append(f"{what}: the message names the database (user, host): {result}")
        if name == "migrate --sql" and "CREATE TABLE" not in result.stdout:
            problems.append(f"{what}: prints the DDL: {result}")
    assert not problems, "\n".join(problems)


@pytest.mark.postgres
@pytest.mark.parametrize(("scheme", "form"), PASSWORD_FORMS)
async def test_password_is_never_printed_by_a_connection_error(
    run: Runner, postgres_url: str, scheme: str, form: str
) -> None:
    """A database that refuses the connection (port 1): one line naming user and host, and no
    password, also with ``--debug`` (traceback and debug logs)."""
    url = _with_password(postgres_url, scheme, form, port=1)
    shown = _shown_url(postgres_url, port=1)
    runs = [
        ("status --database-url", [], ["status", "--database-url", url], {}),
        ("status, URL in the environment", [], ["status"], {"ORDERING_SQL_DATABASE_URL": url}),
        ("--debug status --database-url", ["--debug"], ["status", "--database-url", url], {}),
        (
            "--debug status, URL in the environment",
            ["--debug"],
            ["status"],
            {"ORDERING_SQL_DATABASE_URL": url},
        ),
    ]

    results = await asyncio.gather(*(run(*pre, *args, env=env) for _, pre, args, env in runs))

    problems: list[str] = []
    for (what, debug, _, _), result in zip(runs, results, strict=True):
        problems += secret_leaks(result, what)
        lines = result.stderr_lines
        if result.code == 0 or result.stdout or not lines or not lines[-1].startswith(ERROR_PREFIX):
            problems.append(f"{what}: must fail, ending with one error line: {result}")
            continue
        if debug and "Traceback" not in result.stderr:
            problems.append(f"{what}: --debug shows the traceback: {result}")
        if not debug and len(lines) != 1:
            problems.append(f"{what}: one error line, no traceback: {result}")
        if "unexpected" in lines[-1]:
            problems.append(f"{what}: a refused connection is not unexpected: {lines[-1]}")
        if not shown.search(lines[-1]):
            problems.append(f"{what}: the error names the database (user, host): {lines[-1]}")
    assert not problems, "\n".join(problems)


# -- 4. scope names are data ----------------------------------------------------------------------


async def test_status_prints_scope_names_literally(run: Runner, any_url: str) -> None:
    """Scope names that look like rich markup are printed as they are, not interpreted."""
    for scope, seen in (("orders[/bold]", 1), ("tenant[eu]", 2)):
        ordering: CausalOrdering[Any] = CausalOrdering(scope, database_url=any_url)
        for _ in range(seen):
            await ordering.record_event_as_seen(make_event())
        await ordering.close()
    await dispose_engines()

    table, as_json = await asyncio.gather(
        run("status", "--database-url", any_url), run("status", "--json", "--database-url", any_url)
    )

    assert table.code == 0, f"status on scopes named like markup must work: {table}"
    assert "Traceback" not in table.stderr
    assert re.search(r"^\s*orders\[/bold\]\s+1\s", table.stdout, re.MULTILINE), (
        f"the row of scope 'orders[/bold]' (1 seen), literally:\n{table.stdout}"
    )
    assert re.search(r"^\s*tenant\[eu\]\s+2\s", table.stdout, re.MULTILINE), (
        f"the row of scope 'tenant[eu]' (2 seen), literally:\n{table.stdout}"
    )
    assert as_json.code == 0, as_json
    rows = {row["scope"]: row["seen"] for row in json.loads(as_json.stdout)}
    assert rows == {"orders[/bold]": 1, "tenant[eu]": 2}


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["status"], id="status"),
        pytest.param(["lost"], id="lost"),
        pytest.param(["lost", "--take"], id="lost-take"),
        pytest.param(["order"], id="order"),
    ],
)
async def test_scope_that_is_not_utf8_is_a_one_line_error(
    run: Runner, any_url: str, command: list[str]
) -> None:
    """``--scope`` given the byte 0xff (Python decodes it to a lone surrogate)."""
    stdin = (make_event().model_dump_json() + "\n").encode() if command == ["order"] else None

    result = await run(*command, "--scope", b"\xff", "--database-url", any_url, stdin=stdin)

    line = one_error_line(result, f"{' '.join(command)} --scope b'\\xff'")
    assert "unexpected" not in line, f"a bad scope is a clear error, not a crash: {line}"
    assert "scope" in line, f"the error says it is the scope that is wrong: {line}"
    assert result.stdout == "", result


#: Advice to run the migration: the command, or the function (not "a newer ordering-sql
#: migrated it", which is the diagnosis).
ADVISES_MIGRATE = re.compile(r"ordering-sql migrate\b|ordering_sql\.migrate\(|\bmigrate\(")

# -- 5. a schema newer than the code -------------------------------------------------------------


async def test_migrate_on_a_newer_schema_says_to_upgrade_ordering_sql(
    run: Runner, any_url: str
) -> None:
    await _sql(any_url, "UPDATE ordering_sql_version SET version_num = '9999'")

    migrate, status = await asyncio.gather(
        run("migrate", "--database-url", any_url), run("status", "--database-url", any_url)
    )

    for what, result in (("migrate", migrate), ("status", status)):
        line = one_error_line(result, f"{what} on a database at revision 9999")
        assert "unexpected" not in line, f"{what}: {line}"
        assert "CommandError" not in result.stderr, f"{what}: Alembic's error leaks: {line}"
        assert re.search(r"upgrad", line, re.IGNORECASE), f"{what}: says to upgrade: {line}"
        assert "ordering-sql" in line.removeprefix(ERROR_PREFIX), f"{what}: {line}"
        assert not ADVISES_MIGRATE.search(line), (
            f"{what}: migrating cannot help a schema newer than the code: {line}"
        )
        assert "9999" in line, f"{what}: the message names the database's revision: {line}"
    assert await _revision(any_url) == "9999", "the newer schema is left as it is"


# -- 6. read-only commands read ------------------------------------------------------------------

DOES_NOT_EXIST = re.compile(r"(does not|doesn't|did not) exist|not found|no such", re.IGNORECASE)


@pytest.mark.parametrize(
    "command",
    [pytest.param(["status"], id="status"), pytest.param(["lost", "--scope", "s"], id="lost")],
)
@pytest.mark.parametrize("explicit", [True, False], ids=["missing-db-url", "default-url"])
async def test_read_only_command_does_not_create_a_missing_database(
    run: Runner, workdir: Path, command: list[str], explicit: bool
) -> None:
    """``--database-url sqlite+aiosqlite:///<dir>/missing.db``, or no URL at all (the default,
    ``./ordering.db``) in an empty working directory."""
    name = "missing.db" if explicit else "ordering.db"
    url = ["--database-url", f"sqlite+aiosqlite:///{workdir / name}"] if explicit else []
    assert listing(workdir) == []

    result = await run(*command, *url)

    created = listing(workdir)
    assert created == [], (
        f"a read-only command created {created} (no .db, -wal, -shm or -clock may appear): {result}"
    )
    line = one_error_line(result, f"{' '.join(command)} on a missing {name}")
    assert DOES_NOT_EXIST.search(line), f"the error says the database does not exist: {line}"
    assert name in line, f"the error names the file: {line}"
    assert "unexpected" not in line, line


@pytest.fixture
async def inspected_db(sqlite_template: Path, tmp_path: Path) -> Path:
    """A migrated SQLite file in a directory of its own, with 3 seen events and 2 parked
    followers (1 past the lookback) in scope ``ro``; closed, with no -wal/-shm/-clock beside it."""
    directory = tmp_path / "inspected"
    directory.mkdir()
    path = directory / "ro.db"
    shutil.copyfile(sqlite_template, path)
    ordering: CausalOrdering[Any] = CausalOrdering("ro", database_url=f"sqlite+aiosqlite:///{path}")
    for _ in range(3):
        await ordering.record_event_as_seen(make_event())
    await ordering.record_follower(make_event(follows=uuid4(), name="fresh"))
    old = datetime.now(UTC) - PAST_LOOKBACK
    await ordering.record_follower(make_event(follows=uuid4(), received=old, name="lost"))
    await ordering.close()
    await dispose_engines()
    for suffix in ("-wal", "-shm", "-clock"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    assert sorted(p.name for p in directory.iterdir()) == ["ro.db"]
    return path


@pytest.fixture
def restore_permissions(inspected_db: Path) -> Iterator[None]:
    yield
    inspected_db.parent.chmod(0o755)
    inspected_db.chmod(0o644)


async def _assert_inspects(run: Runner, path: Path) -> None:
    url = ["--database-url", f"sqlite+aiosqlite:///{path}"]
    status, table, lost = await asyncio.gather(
        run("status", "--json", *url), run("status", *url), run("lost", "--scope", "ro", *url)
    )
    assert status.code == 0, f"status on a database it may not write must work: {status}"
    rows = {row["scope"]: row for row in json.loads(status.stdout)}
    assert set(rows) == {"ro"}, status.stdout
    counts = {k: rows["ro"][k] for k in ("seen", "parked", "past_lookback")}
    assert counts == {"seen": 3, "parked": 2, "past_lookback": 1}, "its counts are shown"
    assert table.code == 0, table
    assert re.search(r"^\s*ro\s+3\s", table.stdout, re.MULTILINE), table.stdout
    assert lost.code == 0, f"lost (a peek) on a database it may not write must work: {lost}"
    assert [json.loads(line)["event"] for line in lost.stdout.splitlines()] == ["lost"], lost


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="running as root: file permissions do not stop root from writing, so a read-only "
    "file cannot be made here (test_status_opens_sqlite_read_only checks the same as root)",
)
async def test_status_inspects_a_read_only_sqlite_file(
    run: Runner, inspected_db: Path, restore_permissions: None
) -> None:
    os.chmod(inspected_db, 0o444)
    os.chmod(inspected_db.parent, 0o555)

    await _assert_inspects(run, inspected_db)


async def test_status_opens_sqlite_read_only(
    run: Runner, inspected_db: Path, restore_permissions: None
) -> None:
    """The file is 0o444 but its directory writable: a command that only reads opens it
    read-only, so it writes nothing to it, nor ordering-sql's -clock file beside it. Works as
    root too, whom chmod does not stop. (SQLite itself may leave the -wal and -shm files that
    reading a WAL database needs where it can create them: they hold no data of the file.)"""
    os.chmod(inspected_db, 0o444)
    before = fingerprint(inspected_db)

    await _assert_inspects(run, inspected_db)

    assert fingerprint(inspected_db) == before, "the database file was written"
    beside = listing(inspected_db.parent)
    assert "ro.db-clock" not in beside, f"a -clock file was written beside it: {beside}"
    unexpected = sorted(set(beside) - {"ro.db", "ro.db-wal", "ro.db-shm"})
    assert not unexpected, f"files appeared beside a database opened to read: {unexpected}"
    wal = inspected_db.with_name("ro.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the reader wrote to the WAL"


def test_order_into_head_ends_quietly(sqlite_url: str, tmp_path: Path) -> None:
    """``ordering-sql order FILE | head -3``: the reader goes away after 3 lines of ~2,000."""
    events = [event for _ in range(400) for event in chain(5)]
    path = tmp_path / "in-order.jsonl"
    path.write_text("".join(event.model_dump_json() + "\n" for event in events))
    env = _environment()

    with (
        tempfile.TemporaryFile() as stderr,
        subprocess.Popen(
            [*ENTRY, "order", str(path), "--database-url", sqlite_url],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        ) as proc,
    ):
        assert proc.stdout is not None
        head = [proc.stdout.readline() for _ in range(3)]
        proc.stdout.close()  # as `head -3` exits
        try:
            code = proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        stderr.seek(0)
        err = stderr.read().decode(errors="backslashreplace")

    assert [json.loads(line)["id"] for line in head] == [str(e.id) for e in events[:3]]
    assert code in (0, 141, -signal.SIGPIPE), (
        f"exit status {code}: 0, or 141 / killed by SIGPIPE as a shell pipeline expects\n{err}"
    )
    assert "Traceback" not in err, err
    assert "BrokenPipeError" not in err, err
    assert "unexpected" not in err, err
    assert "Exception ignored" not in err, err
