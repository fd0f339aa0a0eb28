"""The acceptor side of AMST sessions: listens, matches connections to sessions by their HELLO,
and hands out new sessions with :meth:`SessionServer.accept`. The session driver itself is
:mod:`.tcp`; this module only owns the listening socket and the handshakes before a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

from dwcp_migrate.transports.acceptor import SessionTable
from dwcp_migrate.transports.errors import ProtocolError, TransportError
from dwcp_migrate.transports.rawsock import serve as rawsock_serve
from dwcp_migrate.transports.sockopts import apply_before_connect
from dwcp_migrate.transports.tcp import TcpSession, TransportConfig, _Conn
from dwcp_migrate.transports.tls import explain, peer_names

log = logging.getLogger(__name__)


# ---- acceptor -----------------------------------------------------------------------------
class SessionServer:
    """Listens for AMST connections and hands out sessions with :meth:`accept`."""

    def __init__(self, *, name: str, config: TransportConfig,
                 allowed_peers: list[str] | None = None) -> None:
        self.name = name
        self.config = config
        self.table = SessionTable(config.session, name, allowed_peers)
        self._server: asyncio.Server | None = None  # TLS: asyncio's SSL transports
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None  # plaintext: RawTransport
        self._queue: asyncio.Queue[TcpSession] = asyncio.Queue()
        self._sessions: dict[int, TcpSession] = {}
        self._pending: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # TLS handshakes running
        self._ssl = config.security.tls.server_context() if config.security.tls else None
        self.port = 0

    async def start(self, host: str, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        apply_before_connect(sock, self.config.tcp)  # accepted sockets inherit the buffers
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.config.security.warn_if_plaintext(f"agent {self.name} accepting sessions on "
                                               f"{host}:{self.port}")
        if self._ssl is not None:
            self._server = await loop.create_server(self._new_conn, sock=sock)
        else:
            self._listener = sock
            self._accepting = loop.create_task(rawsock_serve(sock, self._new_conn))

    def _new_conn(self) -> _Conn:
        return _Conn(None, -1, "?", server=self)

    def _connection_made(self, conn: _Conn) -> None:
        assert conn.transport is not None
        peer = conn.transport.get_extra_info("peername")
        conn.label = f"{peer[0]}:{peer[1]}" if peer else "?"
        assert conn.pre_reader is not None
        conn.pre_reader.peer = conn.label
        self._pending.add(conn)
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.session.handshake_timeout, self._hello_timeout, conn)
        if self._ssl is not None:
            conn.transport.pause_reading()  # the TLS layer reads the ClientHello
            conn.tls_pending = True
            task = loop.create_task(self._start_tls(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_tls(self, conn: _Conn) -> None:
        assert conn.transport is not None and self._ssl is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(conn.transport, conn, self._ssl, server_side=True,
                                             ssl_handshake_timeout=self.config.connect_timeout)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            err = explain(exc, conn.label, side="server")
            log.warning("refused a connection: %s", err)
            conn.close(abort=True)
            self._pending.discard(conn)
            return
        if transport is None:
            return
        assert isinstance(transport, asyncio.Transport)
        conn._set_transport(transport)
        conn.tls_pending = False
        if conn.deferred:  # the HELLO came with the end of the TLS handshake
            frames, conn.deferred = conn.deferred, []
            self._hello(conn, frames)

    def _hello_timeout(self, conn: _Conn) -> None:
        if conn in self._pending:
            log.warning("closing connection from %s: no HELLO within %g s", conn.label,
                        self.config.session.handshake_timeout)
            self._pending.discard(conn)
            conn.close(abort=True)

    def _refuse(self, conn: _Conn, exc: TransportError, session_id: int = 0) -> None:
        log.warning("refused a connection: %s", exc)
        self._pending.discard(conn)
        if conn.transport is not None and not (isinstance(exc, ProtocolError) and not exc.fatal):
            conn.transport.write(SessionTable.refusal(exc, session_id))
        conn.close()

    def _hello(self, conn: _Conn, frames: list[Any]) -> None:
        assert conn.pre_reader is not None and conn.transport is not None
        if conn.tls_pending:  # conn.transport is still the raw TCP one: answer later
            conn.deferred += frames
            return
        self._pending.discard(conn)
        loop = asyncio.get_running_loop()
        names = None
        if self._ssl is not None:
            names = peer_names(conn.transport.get_extra_info("peercert"))
        try:
            if len(frames) > 1:
                raise ProtocolError("sent frames before its HELLO was answered",
                                    peer=conn.label)
            core, cid, new = self.table.accept(frames[0], conn.pre_reader, loop.time(),
                                               conn.label, names)
        except TransportError as exc:
            self._refuse(conn, exc, frames[0].session_id)
            return
        conn.cid = cid
        conn.server = None
        if new:
            session = TcpSession(core, self.config, target=0)
            session.on_end = self._session_ended
            self._sessions[core.session_id] = session
            self._queue.put_nowait(session)
            log.info("session %#x from %s", core.session_id, core.peer)
        session = self._sessions[core.session_id]
        session._attach(conn)

    def _session_ended(self, session: TcpSession) -> None:
        def forget() -> None:
            self.table.forget(session.core)
            self._sessions.pop(session.session_id, None)
        asyncio.get_running_loop().call_later(self.config.linger, forget)

    async def accept(self) -> TcpSession:
        """The next new session (established: its first connection said HELLO)."""
        return await self._queue.get()

    async def close(self) -> None:
        """Stop listening; connections not yet matched to a session are closed."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._pending):
            conn.close(abort=True)
        self._pending.clear()
