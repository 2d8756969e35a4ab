"""Real servers for the tests that break them: a throwaway Postgres cluster and a pgbouncer.

``ThrowawayPostgres`` is a private cluster (``initdb`` + ``pg_ctl`` on a free port, as
pytest-postgresql's process fixture does) that a test may stop, crash and restart at will;
``PgBouncer`` is a real pgbouncer in front of any Postgres, in transaction or session mode.

Both bind only to 127.0.0.1, keep every file they make in one temporary directory of their own,
and leave neither a process nor a file behind after ``close()``. An instance that is never closed
is cleaned up when it is garbage collected or, at the latest, when the interpreter exits
(``weakref.finalize``). Postgres and pgbouncer refuse to run as root, so when the tests run as
root both run as the ``postgres`` OS user, in directories handed over to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from sqlalchemy.engine import URL

#: The only address the servers listen on and the tests connect to.
HOST = "127.0.0.1"
#: The database superuser of a throwaway cluster, and the OS user servers run as under root.
SERVER_USER = "postgres"
#: Server programs a throwaway cluster needs.
POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres")
#: How many lines of a server's log an error message carries.
LOG_TAIL_LINES = 40

ShutdownMode = Literal["fast", "immediate"]
PoolMode = Literal["transaction", "session"]


class ServerError(RuntimeError):
    """A test server could not be set up, started or stopped; the message ends with its log."""


# -- helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _as_root() -> bool:
    return os.geteuid() == 0


def _server_account() -> pwd.struct_passwd | None:
    """The OS user the servers run as when we are root; None when there is no such user."""
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        return None


def _account_problem() -> str | None:
    if _as_root() and _server_account() is None:
        return (
            f"the tests run as root, which Postgres and pgbouncer refuse, and there is no "
            f"{SERVER_USER!r} OS user to run them as"
        )
    return None


def _process_options() -> dict[str, Any]:
    """``subprocess`` options that run a server program as the server user when we are root."""
    account = _server_account() if _as_root() else None
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _hand_over(path: Path) -> None:
    """Give ``path`` to the server user when we are root, so that the servers can write there."""
    account = _server_account() if _as_root() else None
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _server_environment() -> dict[str, str]:
    """Our environment without the libpq variables (PGPORT, PGDATA...) and in the C locale."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _open_to_everyone(path: Path) -> bool:
    return all(part.stat().st_mode & 0o001 for part in (path, *path.parents))


def _private_directory(prefix: str) -> Path:
    """A new temporary directory, owned by the server user when we are root.

    Under root, the directory is made in the system temporary directory only if the server user
    can reach it; otherwise (a ``TMPDIR`` under /root, say) in /tmp.
    """
    base = Path(tempfile.gettempdir())
    if _as_root() and not _open_to_everyone(base):
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    _hand_over(path)
    return path


def _make_owned_directory(path: Path) -> Path:
    path.mkdir(mode=0o700)
    _hand_over(path)
    return path


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"({path} is empty)"
    return f"last lines of {path}:\n" + "\n".join(tail)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def process_is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie.

    A postmaster that ``pg_ctl`` started is not our child: once it exits, it stays a zombie
    until the init process reaps it, which in some containers takes a second or two.
    """
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] not in {"Z", "X"}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True


def _version_key(bindir: Path) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15/bin`` -> (15,); unparsable versions sort first."""
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


def find_postgres_bindir() -> Path | None:
    """The directory of Postgres's server programs: ``pg_config --bindir`` if it has them, else
    the newest ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu's layout) that has them."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            if result.stdout.strip():
                candidates.append(Path(result.stdout.strip()))
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    for bindir in candidates:
        if all(os.access(bindir / program, os.X_OK) for program in POSTGRES_PROGRAMS):
            return bindir
    return None


def find_pgbouncer() -> Path | None:
    """The pgbouncer program: on PATH, or in /usr/sbin where Debian puts it."""
    found = shutil.which("pgbouncer")
    if found is not None:
        return Path(found)
    for candidate in (Path("/usr/sbin/pgbouncer"), Path("/usr/local/sbin/pgbouncer")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _quote_setting(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- Postgres -----------------------------------------------------------------------------------


@dataclass
class _ClusterFiles:
    """What the safety net needs to stop a cluster and delete it; never refers to the owner."""

    pg_ctl: Path
    root: Path | None = None

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    @property
    def sockets(self) -> Path:
        assert self.root is not None
        return self.root / "run"

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid, if its pid file is there and the process lives."""
        if self.root is None:
            return None
        try:
            first_line = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        return pid if process_is_running(pid) else None

    def pg_ctl_run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        assert self.root is not None
        return subprocess.run(
            [str(self.pg_ctl), "-D", str(self.data), *args],
            cwd=self.root,
            env=_server_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 15,
            check=False,
            **_process_options(),
        )


def _destroy_cluster(files: _ClusterFiles) -> None:
    """Stop the cluster at once if it still runs (pg_ctl, then signals), then delete its files."""
    if files.root is None:
        return
    try:
        if files.postmaster_pid() is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                files.pg_ctl_run("stop", "-w", "-t", "20", "-m", "immediate", timeout=20)
        pid = files.postmaster_pid()
        if pid is not None:  # pg_ctl could not stop it: the postmaster's own immediate shutdown
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while process_is_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        shutil.rmtree(files.root, ignore_errors=True)
        files.root = None


class ThrowawayPostgres:
    """A private Postgres cluster for a test run, which a test may stop, crash and restart.

    The first ``start()`` runs ``initdb`` into a new temporary directory (superuser
    ``postgres``, ``trust`` authentication for local and 127.0.0.1 connections, UTF8 in the C
    locale) and starts the cluster with ``pg_ctl`` on a free port on 127.0.0.1, its Unix socket
    in that same directory. The port stays the same across ``stop()``/``start()`` and
    ``restart()``, so URLs taken before a restart stay valid. ``close()`` stops the cluster and
    deletes the directory; the instance is a context manager that starts on entry and closes on
    exit.

    Settings (``SETTINGS``, which the ``settings`` argument extends or overrides), chosen so that
    a cluster starts in about a second and behaves like a real server where tests look:

    - ``fsync = off``: no flush to disk, so ``CREATE DATABASE ... TEMPLATE`` and commits are
      fast. Killing the server (``stop("immediate")``, SIGKILL) still loses nothing committed,
      because WAL writes reach the OS page cache before a commit returns; only an OS crash could
      corrupt the cluster, and it is thrown away. ``synchronous_commit`` stays on for the same
      reason: with it off, an immediate stop could lose the last commits, which tests of
      durability must not see.
    - ``shared_buffers = 16MB``: small, since the tests share a small machine.
    - ``max_connections = 200``: room for the concurrency tests' connections (and a pgbouncer's).
    - ``listen_addresses = '127.0.0.1'`` and a socket directory of its own: never the system's
      ``/var/run/postgresql``.

    ``initdb`` runs with ``--no-sync`` for the same reason as ``fsync = off``.
    """

    SETTINGS: ClassVar[Mapping[str, str]] = {
        "listen_addresses": HOST,
        "fsync": "off",
        "shared_buffers": "16MB",
        "max_connections": "200",
    }

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        found = bindir or find_postgres_bindir()
        problem = _account_problem()
        if found is None or problem is not None:
            raise ServerError(problem or self.unavailable_reason() or "no Postgres binaries")
        self.bindir = found
        self.timeout = timeout
        self._settings = {**self.SETTINGS, **(settings or {})}
        self._port: int | None = None
        self._started_once = False
        self._files = _ClusterFiles(pg_ctl=found / "pg_ctl")
        self._finalizer = weakref.finalize(self, _destroy_cluster, self._files)

    # -- availability

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why no throwaway cluster can run here, or None if one can."""
        if find_postgres_bindir() is None:
            return (
                "no Postgres server binaries (initdb, pg_ctl, postgres) in `pg_config --bindir` "
                "or /usr/lib/postgresql/*/bin"
            )
        return _account_problem()

    @classmethod
    def available(cls) -> bool:
        """Whether the server binaries exist (and, under root, a ``postgres`` user to run them)."""
        return cls.unavailable_reason() is None

    # -- where it is

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1; chosen by the first ``start()``."""
        if self._port is None:
            msg = "the throwaway cluster has not been started yet, so it has no port"
            raise ServerError(msg)
        return self._port

    @property
    def directory(self) -> Path:
        """The temporary directory holding the data directory, the socket and the log."""
        if self._files.root is None:
            msg = "the throwaway cluster has no directory (not started yet, or closed)"
            raise ServerError(msg)
        return self._files.root

    @property
    def log_path(self) -> Path:
        """The server's log, kept for the error messages (and for tests to read)."""
        return self.directory / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._files.postmaster_pid()

    @property
    def running(self) -> bool:
        """Whether the postmaster runs."""
        return self.pid is not None

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """A SQLAlchemy URL of ``database`` as the superuser; ``driver="postgresql"`` gives a
        DSN that asyncpg and libpq take."""
        return URL.create(
            driver, username=SERVER_USER, host=HOST, port=self.port, database=database
        ).render_as_string(hide_password=False)

    # -- life cycle

    def start(self) -> None:
        """Start the cluster (creating it on first use) and wait until it accepts connections."""
        if not self._finalizer.alive:
            msg = "the throwaway cluster was closed; make a new one"
            raise ServerError(msg)
        if self.running:
            return
        if self._files.root is None:
            self._initdb()
        for attempt in range(3):
            if self._port is None:
                self._port = free_port()
            offset = _log_size(self._files.log)
            result = self._files.pg_ctl_run(
                "start",
                "-w",
                "-t",
                str(int(self.timeout)),
                "-l",
                str(self._files.log),
                "-o",
                f"-p {self._port}",
                timeout=self.timeout,
            )
            if result.returncode == 0:
                break
            new_log = _log_since(self._files.log, offset)
            port_taken = "could not bind" in new_log or "already in use" in new_log
            if port_taken and not self._started_once and attempt < 2:
                self._port = None  # someone took the port since we looked: try another
                continue
            msg = self._failure("pg_ctl start", result)
            raise ServerError(msg)
        self._started_once = True
        if not port_is_open(self.port, timeout=5):
            msg = self._failure(f"port {self.port} after pg_ctl start", None)
            raise ServerError(msg)

    def stop(self, mode: ShutdownMode = "fast") -> None:
        """Stop the cluster: ``fast`` rolls back and disconnects every session and shuts down
        cleanly; ``immediate`` kills every process, as a crash would, so the next start
        recovers from the WAL. Does nothing if it is not running."""
        if not self.running:
            return
        result = self._files.pg_ctl_run(
            "stop", "-w", "-t", str(int(self.timeout)), "-m", mode, timeout=self.timeout
        )
        if result.returncode != 0:
            msg = self._failure(f"pg_ctl stop -m {mode}", result)
            raise ServerError(msg)

    def restart(self, mode: ShutdownMode = "fast") -> None:
        """``stop(mode)`` then ``start()``, on the same port; every connection is cut."""
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop the cluster (fast; immediate if that fails) and delete all its files."""
        try:
            if self.running:
                self.stop("fast")
        finally:
            self._finalizer()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"port {self._port}" if self._port is not None else "not started"
        return f"<ThrowawayPostgres {where}, {'running' if self.running else 'stopped'}>"

    # -- internals

    def _initdb(self) -> None:
        root = _private_directory("ordering-sql-pg-")
        self._files.root = root
        _make_owned_directory(self._files.sockets)
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self._files.data),
                "-U",
                SERVER_USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=root,
            env=_server_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
            **_process_options(),
        )
        if result.returncode != 0:
            msg = self._failure("initdb", result)
            raise ServerError(msg)
        settings = {**self._settings, "unix_socket_directories": str(self._files.sockets)}
        with (self._files.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# ThrowawayPostgres (tests/pg_servers.py)\n")
            for name, value in settings.items():
                conf.write(f"{name} = {_quote_setting(value)}\n")

    def _failure(self, what: str, result: subprocess.CompletedProcess[str] | None) -> str:
        parts = [f"{what} failed for the throwaway cluster in {self._files.root}"]
        if result is not None:
            parts.append(f"exit status {result.returncode}")
            output = (result.stdout + result.stderr).strip()
            if output:
                parts.append(output)
        if self._files.root is not None:
            parts.append(_log_tail(self._files.log))
        return "\n".join(parts)


# -- pgbouncer ----------------------------------------------------------------------------------


def pgbouncer_version(program: Path | None = None) -> tuple[int, ...] | None:
    """The version of pgbouncer, e.g. (1, 18, 0); None if it is missing or does not say."""
    program = program or find_pgbouncer()
    if program is None:
        return None
    try:
        result = subprocess.run(
            [str(program), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"PgBouncer (\d+(?:\.\d+)+)", result.stdout + result.stderr)
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


@dataclass
class _BouncerProcess:
    """What the safety net needs to kill a pgbouncer and delete its files."""

    stop_signal: signal.Signals
    root: Path | None = None
    process: subprocess.Popen[bytes] | None = None


def _end_process(process: subprocess.Popen[bytes], stop_signal: signal.Signals) -> None:
    """``stop_signal``, then SIGKILL if the process still runs 5 s later; reaps it either way."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(stop_signal)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _destroy_bouncer(state: _BouncerProcess) -> None:
    """End the pgbouncer if it still runs (its immediate shutdown, then SIGKILL); delete files."""
    try:
        if state.process is not None:
            _end_process(state.process, state.stop_signal)
            state.process = None
    finally:
        if state.root is not None:
            shutil.rmtree(state.root, ignore_errors=True)
            state.root = None


class PgBouncer:
    """A real pgbouncer on a free port on 127.0.0.1, in front of the Postgres at ``host:port``.

    Every database name is forwarded to the upstream (``* = host=... port=...``), so
    ``url("test")`` reaches the upstream's database ``test``. Clients log in with
    ``auth_type = trust``; pgbouncer still looks the user name up in its ``auth_file``, which lists
    ``users`` (with no password: the upstream trusts 127.0.0.1 too). ``postgres`` is also an
    admin user, so ``psql`` on ``url("pgbouncer", driver="postgresql")`` reaches the admin
    console (``SHOW POOLS``...); asyncpg cannot, as the console speaks only the simple query
    protocol.

    In ``transaction`` mode a client has a server connection only for the length of a
    transaction, so a named prepared statement made in one transaction is missing when the next
    lands on another server connection: ``max_prepared_statements = 0`` keeps it that way on
    pgbouncer 1.21 and later, which could track them (1.24 turns that on by default); older
    versions neither know the setting (they refuse to start with it) nor track statements.
    ``session`` mode keeps one server connection per client connection.

    ``server_login_retry = 1`` (the default is 15 s): after the upstream restarts, pgbouncer tries
    it again within a second instead of failing logins for 15 seconds.

    It runs in the foreground as a child process (as the ``postgres`` user under root), logging
    to ``log_path``, with no Unix socket; ``close()`` ends it (SIGTERM, SIGQUIT from 1.23 on,
    where SIGTERM waits for clients; SIGKILL after 5 s) and deletes its files.
    """

    def __init__(
        self,
        port: int,
        *,
        host: str = HOST,
        pool_mode: PoolMode = "transaction",
        users: Sequence[str] = (SERVER_USER,),
        settings: Mapping[str, str] | None = None,
        timeout: float = 15,
    ) -> None:
        program = find_pgbouncer()
        problem = _account_problem()
        if program is None or problem is not None:
            raise ServerError(problem or self.unavailable_reason() or "no pgbouncer")
        if pool_mode not in ("transaction", "session"):
            msg = f"pool_mode must be 'transaction' or 'session', not {pool_mode!r}"
            raise ValueError(msg)
        self.program = program
        self.version = pgbouncer_version(program) or (0,)
        self.upstream_host = host
        self.upstream_port = port
        self.pool_mode = pool_mode
        self.users = tuple(users)
        self.timeout = timeout
        self._settings = dict(settings or {})
        self._port: int | None = None
        stop_signal = signal.SIGQUIT if self.version >= (1, 23) else signal.SIGTERM
        self._state = _BouncerProcess(stop_signal=stop_signal)
        self._finalizer = weakref.finalize(self, _destroy_bouncer, self._state)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why no pgbouncer can run here, or None if one can."""
        if find_pgbouncer() is None:
            return "no pgbouncer program on PATH or in /usr/sbin"
        return _account_problem()

    @classmethod
    def available(cls) -> bool:
        """Whether pgbouncer exists (and, under root, a ``postgres`` user to run it as)."""
        return cls.unavailable_reason() is None

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1; chosen by ``start()``."""
        if self._port is None:
            msg = "pgbouncer has not been started yet, so it has no port"
            raise ServerError(msg)
        return self._port

    @property
    def directory(self) -> Path:
        """The temporary directory with the configuration, the auth file and the log."""
        if self._state.root is None:
            msg = "pgbouncer has no directory (not started yet, or closed)"
            raise ServerError(msg)
        return self._state.root

    @property
    def log_path(self) -> Path:
        return self.directory / "pgbouncer.log"

    @property
    def pid(self) -> int | None:
        """The pgbouncer process id while it runs."""
        process = self._state.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """A SQLAlchemy URL of the upstream's ``database`` through pgbouncer, as ``postgres``."""
        return URL.create(
            driver, username=SERVER_USER, host=HOST, port=self.port, database=database
        ).render_as_string(hide_password=False)

    def config(self) -> str:
        """The ``pgbouncer.ini`` that ``start()`` writes (it needs the directory and port)."""
        settings: dict[str, str] = {
            "listen_addr": HOST,
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # none: a killed pgbouncer would leave its socket in /tmp
            "pool_mode": self.pool_mode,
            "auth_type": "trust",
            "auth_file": str(self.directory / "userlist.txt"),
            "admin_users": SERVER_USER,
            "max_client_conn": "1000",
            "default_pool_size": "100",
            "server_login_retry": "1",
            "ignore_startup_parameters": "extra_float_digits",  # psycopg and JDBC send it
        }
        if self.version >= (1, 21):
            settings["max_prepared_statements"] = "0"
        settings.update(self._settings)
        lines = [
            "[databases]",
            f"* = host={self.upstream_host} port={self.upstream_port}",
            "",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start pgbouncer and wait until it accepts connections."""
        if not self._finalizer.alive:
            msg = "this pgbouncer was closed; make a new one"
            raise ServerError(msg)
        if self.running:
            return
        if self._state.root is None:
            self._state.root = _private_directory("ordering-sql-pgbouncer-")
            users = "".join(f'"{user}" ""\n' for user in self.users)
            self._write(self.directory / "userlist.txt", users)
        for attempt in range(3):
            self._port = free_port()
            self._write(self.directory / "pgbouncer.ini", self.config())
            offset = _log_size(self.log_path)
            self._launch()
            if self._wait_until_listening():
                return
            new_log = _log_since(self.log_path, offset)
            if "already in use" in new_log and attempt < 2:
                continue  # someone took the port since we looked: try another
            msg = self._failure()
            if self._state.process is not None:
                _end_process(self._state.process, self._state.stop_signal)
                self._state.process = None
            raise ServerError(msg)

    def close(self) -> None:
        """End pgbouncer and delete its files."""
        self._finalizer()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"port {self._port}" if self._port is not None else "not started"
        return (
            f"<PgBouncer {self.pool_mode} mode, {where} -> {self.upstream_host}:"
            f"{self.upstream_port}, {'running' if self.running else 'stopped'}>"
        )

    # -- internals

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        _hand_over(path)

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            _hand_over(self.log_path)
            self._state.process = subprocess.Popen(
                [str(self.program), str(self.directory / "pgbouncer.ini")],
                cwd=self.directory,
                env=_server_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is for pytest, which closes it
                **_process_options(),
            )

    def _wait_until_listening(self) -> bool:
        """True once the port accepts connections; False if pgbouncer exited or timed out."""
        process = self._state.process
        assert process is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._state.process = None
                return False
            if port_is_open(self.port, timeout=0.5):
                return True
            time.sleep(0.05)
        return False

    def _failure(self) -> str:
        process = self._state.process
        status = "did not listen in time" if process is not None else "exited"
        return (
            f"pgbouncer {status} (port {self._port}, in {self._state.root})\n"
            f"{_log_tail(self.log_path)}"
        )
