"""``tests.faults.LinkProxy`` does what it says, checked with plain asyncpg connections.

Through the proxy, statements and their results pass unchanged; a cut or a refusal fails the
client as a broken network would; a lost reply fails the client while its statement has
committed on the server, which a direct connection (not through the proxy) then sees. These are
the faults the engine's tests rely on, so they are proved here first, without the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import pytest

from tests.conftest import _asyncpg_dsn
from tests.faults import GSSENC_REQUEST, LINK_ERRORS, SSL_REQUEST, LinkProxy, LostReply

pytestmark = pytest.mark.postgres

T = TypeVar("T")

#: The longest any single step here may take; every wait is bounded by it.
STEP_TIMEOUT_S = 10.0
#: True once the server backend ``$1`` has exited: the server's side of its link is closed.
GONE = "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)"


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, timeout=STEP_TIMEOUT_S)


@pytest.fixture
async def proxy() -> AsyncIterator[LinkProxy]:
    async with LinkProxy(upstream_port=5432) as link_proxy:
        yield link_proxy


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the database of ``url`` (a SQLAlchemy URL)."""
    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=STEP_TIMEOUT_S)
    try:
        yield conn
    finally:
        await conn.close(timeout=STEP_TIMEOUT_S)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until ``condition()`` holds: the proxy closes links asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT_S
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def eventually_sql(conn: asyncpg.Connection, query: str, *args: object, what: str) -> None:
    """Wait (bounded) until ``query`` returns true on ``conn``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT_S
    while not await conn.fetchval(query, *args):
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def test_statements_and_their_results_pass_through_unchanged(
    postgres_url: str, proxy: LinkProxy
) -> None:
    """Queries work through the proxy, results of megabytes too (messages that arrive split
    across many reads), and the link is closed when the client closes it."""
    async with connected(proxy.url(postgres_url)) as conn:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT $1::text || $2::text", "ab", "cd") == "abcd"
        rows = await conn.fetch(
            "SELECT i, repeat('x', 1000) AS pad FROM generate_series(1, 3000) i"
        )
        assert [row["i"] for row in rows] == list(range(1, 3001))
        assert all(row["pad"] == "x" * 1000 for row in rows)
        assert proxy.open_links == 1
    await eventually(lambda: proxy.open_links == 0, "the closed connection's link is gone")
    assert (proxy.accepted, proxy.refused, proxy.cuts, proxy.lost_replies) == (1, 0, 0, [])


async def test_encryption_requests_are_answered_no_by_the_proxy(proxy: LinkProxy) -> None:
    """SSLRequest and GSSENCRequest get ``N`` from the proxy itself, so links stay plaintext."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for code in (SSL_REQUEST, GSSENC_REQUEST):
            writer.write((8).to_bytes(4, "big") + code.to_bytes(4, "big"))
            await writer.drain()
            assert await bounded(reader.readexactly(1)) == b"N"
    finally:
        writer.close()
        await writer.wait_closed()


#: Ways to send the same INSERT, and the tag its lost reply ends with ("": PortalSuspended).
INSERTS = [
    pytest.param(
        lambda conn: conn.execute("INSERT INTO probe VALUES ($1)", 7),
        "INSERT 0 1",
        id="extended-protocol",
    ),
    pytest.param(
        lambda conn: conn.execute("INSERT INTO probe VALUES (7)"), "INSERT 0 1", id="simple-query"
    ),
    pytest.param(
        lambda conn: conn.fetchval("INSERT INTO probe VALUES ($1) RETURNING id", 7),
        "",
        id="row-limit-portal-suspended",
    ),
]


@pytest.mark.parametrize(("insert", "ended_by"), INSERTS)
async def test_a_lost_reply_fails_the_client_though_the_statement_committed(
    postgres_url: str,
    proxy: LinkProxy,
    insert: Callable[[asyncpg.Connection], Awaitable[object]],
    ended_by: str,
) -> None:
    """With ``lose_next_reply()`` armed, the client's INSERT fails as a dropped connection,
    yet a direct connection sees its row: the server committed, only the reply was lost.

    Three ways a statement can end: an extended-protocol Execute (CommandComplete, then
    Sync), a simple Query, and asyncpg's ``fetchval``, which executes with a row limit, so that
    even an INSERT ... RETURNING ends in PortalSuspended and never sends CommandComplete.
    """
    async with connected(postgres_url) as direct:
        await direct.execute("CREATE TABLE probe (id int PRIMARY KEY)")
        async with connected(proxy.url(postgres_url)) as conn:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            reply_lost = proxy.lose_next_reply()
            assert proxy.armed
            with pytest.raises(LINK_ERRORS):
                await bounded(insert(conn))
            assert reply_lost.is_set(), "the client failed, but not because its reply was lost"
            assert conn.is_closed()
        assert proxy.lost_replies == [LostReply(ended_by, "I", suspended=not ended_by)]
        await eventually_sql(direct, GONE, backend, what="the server side of the link is closed")
        assert not proxy.armed
        assert await direct.fetch("SELECT id FROM probe") == [(7,)]

        # One shot: the next statement, on a fresh link, gets its reply.
        async with connected(proxy.url(postgres_url)) as conn:
            assert await conn.execute("INSERT INTO probe VALUES ($1)", 8) == "INSERT 0 1"
        assert await direct.fetchval("SELECT count(*) FROM probe") == 2
        assert len(proxy.lost_replies) == 1


async def test_a_lost_reply_hits_whichever_link_completes_a_statement_first(
    postgres_url: str, proxy: LinkProxy
) -> None:
    """The fault is the proxy's, not one link's: armed while two links are open, it takes the
    first statement to complete on either, and leaves the other link alone."""
    async with (
        connected(proxy.url(postgres_url)) as first,
        connected(proxy.url(postgres_url)) as second,
    ):
        reply_lost = proxy.lose_next_reply()
        with pytest.raises(LINK_ERRORS):
            await bounded(second.execute("SELECT 2"))
        await bounded(reply_lost.wait())
        assert proxy.lost_replies == [LostReply("SELECT 1", "I")]
        assert await first.fetchval("SELECT 1") == 1
        assert not first.is_closed()
        assert second.is_closed()


async def test_cut_all_breaks_live_links_idle_or_mid_statement(
    postgres_url: str, proxy: LinkProxy
) -> None:
    """``cut_all()`` breaks an idle link (its next statement fails) and one whose statement is
    running on the server (the client fails at once, without waiting for the reply); new
    links work afterwards."""
    async with (
        connected(postgres_url) as direct,
        connected(proxy.url(postgres_url)) as idle,
        connected(proxy.url(postgres_url)) as busy,
    ):
        idle_pid = await idle.fetchval("SELECT pg_backend_pid()")
        busy_pid = await busy.fetchval("SELECT pg_backend_pid()")
        sleeping = asyncio.create_task(busy.fetchval("SELECT pg_sleep(60)"))
        await eventually_sql(
            direct,
            "SELECT state = 'active' FROM pg_stat_activity WHERE pid = $1",
            busy_pid,
            what="the sleep runs on the server",
        )
        assert proxy.cut_all() == 2
        with pytest.raises(LINK_ERRORS):
            await bounded(sleeping)
        with pytest.raises(LINK_ERRORS):
            await bounded(idle.fetchval("SELECT 1"))
        assert proxy.cuts == 2
        await eventually_sql(direct, GONE, idle_pid, what="the idle link's server side is closed")
        # Ends the server's sleep, which would not notice the closed socket until it is done.
        await direct.execute("SELECT pg_cancel_backend($1)", busy_pid)
        await eventually_sql(direct, GONE, busy_pid, what="the busy link's server side is closed")
    async with connected(proxy.url(postgres_url)) as again:
        assert await again.fetchval("SELECT 1") == 1


async def test_refusing_fails_new_connections_until_it_is_lifted(
    postgres_url: str, proxy: LinkProxy
) -> None:
    """While ``refuse(True)`` holds, connecting fails (the link is closed on accept); after
    ``refuse(False)`` it works again. Links opened before refusing are not touched."""
    async with connected(proxy.url(postgres_url)) as before:
        proxy.refuse(True)
        with pytest.raises(LINK_ERRORS):
            await bounded(asyncpg.connect(_asyncpg_dsn(proxy.url(postgres_url))))
        assert proxy.refused == 1
        assert await before.fetchval("SELECT 1") == 1
        proxy.refuse(False)
        async with connected(proxy.url(postgres_url)) as after:
            assert await after.fetchval("SELECT 1") == 1
    assert proxy.refused == 1


async def test_closing_the_proxy_breaks_its_links_and_leaves_nothing_behind(
    postgres_url: str,
) -> None:
    """Closing the proxy breaks the links still open, stops listening, and ends every task
    of its own, whether a link was idle or still negotiating its start-up."""
    proxy = LinkProxy(upstream_port=5432)
    await proxy.start()
    port = proxy.port
    conn = await asyncpg.connect(_asyncpg_dsn(proxy.url(postgres_url)), timeout=STEP_TIMEOUT_S)
    try:
        _, half_open = await asyncio.open_connection("127.0.0.1", port)  # no start-up yet
        await eventually(lambda: proxy.accepted == 2, "the proxy accepted both links")
        await bounded(proxy.close())
        assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []
        with pytest.raises(LINK_ERRORS):
            await bounded(conn.fetchval("SELECT 1"))
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        half_open.close()
        await half_open.wait_closed()
    finally:
        await conn.close(timeout=STEP_TIMEOUT_S)
    await proxy.close()  # closing twice is harmless
