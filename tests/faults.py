"""Real network faults for tests: a loopback TCP proxy in front of Postgres that cuts links.

``LinkProxy`` listens on 127.0.0.1 and relays every connection to the server byte for byte,
until a test tells it to fail:

* ``cut_all()`` closes every open link, both sides, as a network failure would;
* ``refuse(True)`` accepts new connections and closes them at once, until ``refuse(False)``;
* ``lose_next_reply()`` lets the next statement that completes on any link run (and, in
  autocommit, commit) on the server, and never delivers its reply: the link is closed instead.
  The client sees a dropped connection and cannot tell whether its statement took effect.

To find "the next statement that completes", the proxy reads the server's side of the Postgres
v3 protocol (https://www.postgresql.org/docs/current/protocol-message-formats.html): every
message the server sends is one type byte and an int32 length (big-endian, counting itself)
followed by the body, from the first authentication request on. A statement ends with
CommandComplete (``C``, its body the command tag such as ``DELETE 2``), or with PortalSuspended
(``s``) when it was executed with a row limit, and the server is done with the client's request
at the ReadyForQuery (``Z``) that follows, whose one-byte body is the transaction status (``I``:
idle, nothing left open). In autocommit, where each statement is its own transaction, the
server commits before it sends that ``Z`` (at the extended protocol's Sync, or at the end of a
simple Query). So dropping everything from the statement's end up to and including ``Z`` loses
exactly the reply of a committed statement.

The client's side needs no parsing except at the very start: a client may first ask for TLS
(SSLRequest) or GSS encryption (GSSENCRequest), two 8-byte packets without a type byte. The
proxy answers both itself with ``N`` (not supported), so the client carries on in plaintext and
the server's stream stays readable; the StartupMessage and everything after it are relayed.

Only loopback addresses are used. Closing the proxy closes every link and the listener and
leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import asyncpg
from sqlalchemy.engine import make_url

__all__ = ["GSSENC_REQUEST", "LINK_ERRORS", "SSL_REQUEST", "LinkProxy", "LostReply"]

LOOPBACK: Final = "127.0.0.1"
#: Request codes of the 8-byte packets a client may send before its StartupMessage.
SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
#: What the proxy answers to both: "not supported here", so the link stays plaintext.
NOT_SUPPORTED: Final = b"N"

COMMAND_COMPLETE: Final = ord("C")
PORTAL_SUSPENDED: Final = ord("s")
READY_FOR_QUERY: Final = ord("Z")
#: The messages that end a statement's execution: its reply starts there.
STATEMENT_END: Final = frozenset({COMMAND_COMPLETE, PORTAL_SUSPENDED})
_HEADER: Final = struct.Struct("!cI")  # type byte, length (counting itself, not the type)
_READ_SIZE: Final = 65536

#: What asyncpg raises on a link the proxy broke: ``ConnectionDoesNotExistError`` ("connection
#: was closed in the middle of operation", a ``PostgresConnectionError``) on an open connection,
#: ``ConnectionResetError`` (an ``OSError``) while connecting.
LINK_ERRORS: Final = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class LostReply:
    """A reply the proxy swallowed: the statement's command tag and the server's state after.

    ``command`` is the CommandComplete's tag (``"DELETE 2"``, ``"SELECT 1"``); it is empty if
    the statement ended in a PortalSuspended instead (``suspended``): asyncpg's ``fetchrow``
    and ``fetchval`` execute with a row limit of 1, and the server then ends even an INSERT
    ... RETURNING that way, with no CommandComplete. ``status`` is the ReadyForQuery's
    transaction status: ``"I"`` (idle: the statement's transaction ended, so in autocommit it
    committed), ``"T"`` (inside a transaction block) or ``"E"`` (inside a failed one).
    """

    command: str
    status: str
    suspended: bool = False

    @property
    def committed_in_autocommit(self) -> bool:
        """Whether no transaction was left open: an autocommit statement has committed."""
        return self.status == "I"


@dataclass(eq=False)
class _Link:
    """One client's connection and the proxy's connection to the server on its behalf."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    cut: bool = False

    def abort(self) -> None:
        """Close both sides now, discarding whatever is still buffered: a broken link."""
        self.cut = True
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()

    async def closed(self) -> None:
        """Close both sides (gracefully unless aborted) and wait until they are closed."""
        for writer in (self.client, self.server):
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


class ProtocolViolationError(Exception):
    """The server's stream does not parse as Postgres v3 messages."""


@dataclass(eq=False)
class _ServerStream:
    """The server-to-client side of one link, split into protocol messages as it passes.

    ``feed`` returns the bytes to pass on to the client: whole messages only (a message split
    across reads is held until it is complete). A lost reply starts at the end of a statement
    (CommandComplete or PortalSuspended) if the proxy's one-shot fault is armed
    (``LinkProxy._claim_fault``); from there nothing is passed on, and ``lost`` is set once
    the following ReadyForQuery is in.
    """

    proxy: LinkProxy
    buffer: bytearray = field(default_factory=bytearray)
    dropping: bool = False
    command: str = ""
    suspended: bool = False
    lost: LostReply | None = None

    def feed(self, chunk: bytes) -> bytes:
        self.buffer += chunk
        out = bytearray()
        start = 0  # where the next message begins in the buffer
        while self.lost is None and len(self.buffer) - start >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self.buffer, start)
            if length < 4:
                msg = f"not a Postgres v3 message: type {kind!r}, length {length}"
                raise ProtocolViolationError(msg)
            end = start + 1 + length
            if len(self.buffer) < end:
                break  # the rest of this message is still on its way
            code, body = kind[0], self.buffer[start + _HEADER.size : end]
            if not self.dropping and code in STATEMENT_END and self.proxy._claim_fault():
                self.dropping = True
                self.command = bytes(body).rstrip(b"\0").decode("utf-8", "replace")
                self.suspended = code == PORTAL_SUSPENDED
            if not self.dropping:
                out += self.buffer[start:end]
            elif code == READY_FOR_QUERY:
                status = bytes(body).decode("ascii", "replace")
                self.lost = LostReply(self.command, status, suspended=self.suspended)
            start = end
        del self.buffer[:start]
        return bytes(out)


class LinkProxy:
    """A loopback TCP proxy to a Postgres server that cuts links when a test asks it to.

    ::

        async with LinkProxy(upstream_port=5432) as proxy:
            url = proxy.url(database_url)  # the same database, through the proxy
            reply_lost = proxy.lose_next_reply()
            ...  # the next statement commits, its client sees a dropped connection
            await asyncio.wait_for(reply_lost.wait(), 10)

    ``accepted`` counts the connections accepted (refused ones included), ``refused`` those
    closed because of ``refuse(True)``, ``cuts`` the links broken by ``cut_all()``, and
    ``lost_replies`` lists every reply ``lose_next_reply()`` swallowed, oldest first.
    """

    def __init__(self, upstream_port: int = 5432, *, upstream_host: str = LOOPBACK) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.lost_replies: list[LostReply] = []
        #: Set when the reply armed by the latest ``lose_next_reply()`` has been lost.
        self.reply_lost = asyncio.Event()
        self._armed = False
        self._refusing = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []  # a link's task failed: a bug of the proxy

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._server is not None:
            msg = "this LinkProxy is already listening"
            raise RuntimeError(msg)
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)

    async def close(self) -> None:
        """Stop listening, break every link, and wait until every task of the proxy is done."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._armed = False
        for link in list(self._links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        if self._errors:
            msg = f"the LinkProxy failed while relaying ({len(self._errors)} links)"
            raise RuntimeError(msg) from self._errors[0]

    # -- where it listens ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            msg = "the LinkProxy is not listening: use `async with LinkProxy() as proxy`"
            raise RuntimeError(msg)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, database_url: str) -> str:
        """``database_url`` (a SQLAlchemy URL) rewritten to reach its server through the proxy."""
        return (
            make_url(database_url)
            .set(host=LOOPBACK, port=self.port)
            .render_as_string(hide_password=False)
        )

    @property
    def open_links(self) -> int:
        """How many client connections are open through the proxy right now."""
        return sum(1 for link in self._links if not link.cut)

    # -- faults --------------------------------------------------------------------------------

    def cut_all(self) -> int:
        """Break every open link now, both sides; returns how many were broken."""
        links = [link for link in self._links if not link.cut]
        for link in links:
            link.abort()
        self.cuts += len(links)
        return len(links)

    def refuse(self, refusing: bool = True) -> None:
        """While refusing, every new connection is accepted and closed at once."""
        self._refusing = refusing

    def lose_next_reply(self) -> asyncio.Event:
        """Arm the one-shot fault; returns the event set once it fired (also ``reply_lost``).

        The next statement that completes on any link keeps its effect on the server, but its
        reply (from its CommandComplete or PortalSuspended to the ReadyForQuery after it) is
        dropped and that link is broken. Arming again before it fired changes nothing. A link
        broken otherwise (``cut_all()``, the server) between a statement's end and its
        ReadyForQuery spends the fault without firing it.
        """
        if not self._armed:
            self._armed = True
            self.reply_lost = asyncio.Event()
        return self.reply_lost

    @property
    def armed(self) -> bool:
        """Whether ``lose_next_reply()`` is armed and has not fired yet."""
        return self._armed

    def _claim_fault(self) -> bool:
        """The fault for the statement that just completed on some link, if armed (once)."""
        if not self._armed:
            return False
        self._armed = False
        return True

    # -- relaying ------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        task = asyncio.get_running_loop().create_task(self._serve(link, reader))
        self._tasks.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._errors.append(error)

    async def _serve(self, link: _Link, client: asyncio.StreamReader) -> None:
        try:
            if self._refusing:
                self.refused += 1
                link.abort()
                return
            startup = await _negotiate(client, link.client)
            if startup is None or link.cut:
                return
            server, link.server = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            if link.cut:  # cut while connecting
                link.abort()
                return
            link.server.write(startup)
            await asyncio.gather(
                self._relay(link, client, link.server, None),
                self._relay(link, server, link.client, _ServerStream(self)),
            )
        except OSError:  # the server is away, or the client left during the negotiation
            link.abort()
        finally:
            self._links.discard(link)
            await link.closed()

    async def _relay(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        stream: _ServerStream | None,
    ) -> None:
        """Copy ``source`` to ``sink`` until either side closes; through ``stream`` if given."""
        try:
            while chunk := await source.read(_READ_SIZE):
                data = chunk if stream is None else stream.feed(chunk)
                if data:
                    sink.write(data)
                    await sink.drain()
                if stream is not None and stream.lost is not None:
                    link.abort()
                    self.lost_replies.append(stream.lost)
                    self.reply_lost.set()
                    return
        except (OSError, ProtocolViolationError):
            link.abort()
            return
        # The source ended its side: end ours towards the sink too, after what is buffered.
        sink.close()


async def _negotiate(client: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    """Answer the client's SSL and GSS encryption requests with ``N``; the first other packet's
    first 8 bytes (the StartupMessage's, or a CancelRequest's), or None if the client left."""
    while True:
        try:
            header = await client.readexactly(8)
        except asyncio.IncompleteReadError:
            return None
        length, code = struct.unpack("!ii", header)
        if length == 8 and code in (SSL_REQUEST, GSSENC_REQUEST):
            writer.write(NOT_SUPPORTED)
            await writer.drain()
            continue
        return header
