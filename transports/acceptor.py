"""The acceptor's side of the AMST handshake, without I/O: matching connections to sessions.

A server driver reads the first frame of each accepted connection with a reader from
:meth:`SessionTable.new_reader`, then hands frame and reader to :meth:`SessionTable.accept`,
which checks the HELLO (role, capabilities, the agent name against the TLS certificate and
the allowed peers) and either creates the session (first connection, flag NEW_SESSION) or
joins it (session id and the secret token from the first HELLO). A refused connection is
answered with :meth:`SessionTable.refusal`, an ERROR frame that says why, then closed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from dwcp_migrate.transports.errors import (
    AuthenticationError,
    HandshakeError,
    SessionClosedError,
    TransportError,
    UnknownSessionError,
    VersionMismatchError,
)
from dwcp_migrate.transports.frames import (
    TOKEN_SIZE,
    Capability,
    ErrorCode,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    Hello,
    Role,
    encode_error,
    encode_frame,
)
from dwcp_migrate.transports.session import Session, SessionConfig, SessionState


class SessionTable:
    """The acceptor's sessions by id: the server side of the handshake, without I/O.

    A server driver reads the first frame of each accepted connection with its own
    :class:`FrameReader`, then hands frame and reader to :meth:`accept`.
    """

    def __init__(self, config: SessionConfig, local_name: str,
                 allowed_peers: Iterable[str] | None = None) -> None:
        self.config = config
        self.local_name = local_name
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.sessions: dict[int, Session] = {}

    def new_reader(self, label: str | None) -> FrameReader:
        return FrameReader(self.config.max_payload, peer=label)

    def accept(self, frame: Frame, reader: FrameReader, now: float,
               label: str | None = None, verified_names: Iterable[str] | None = None
               ) -> tuple[Session, int, bool]:
        """Match a HELLO to its session: (session, connection id, whether it is new).

        ``verified_names``: the names the peer's TLS certificate proves; the HELLO's agent
        name must be one of them. Raises HandshakeError or AuthenticationError; send
        :meth:`refusal` for it before closing the connection.
        """
        if frame.type != FrameType.HELLO:
            raise HandshakeError(f"opened a connection with frame type {frame.type}, not HELLO",
                                 peer=label)
        hello = Hello.decode(frame.payload, label)
        if hello.role is not Role.INITIATOR:
            raise HandshakeError(f"sent a HELLO as {hello.role.name}", peer=label)
        if not hello.capabilities & Capability.CRC32:
            raise HandshakeError("does not checksum its frames (no CRC32 capability)",
                                 peer=label)
        who = f"{hello.name} ({label})" if label else hello.name
        if verified_names is not None and hello.name not in set(verified_names):
            raise AuthenticationError(f"says it is agent {hello.name!r} but its certificate is "
                                      f"for {sorted(set(verified_names))}", peer=label)
        if self.allowed_peers is not None and hello.name not in self.allowed_peers:
            raise AuthenticationError(f"agent {hello.name!r} is not an allowed peer", peer=who)
        session = self.sessions.get(frame.session_id)
        if session is not None:
            if not hmac.compare_digest(hello.token, session.token):
                raise AuthenticationError(f"tried to join session {frame.session_id:#x} with a "
                                          f"wrong token", peer=who)
            if session.state in (SessionState.CLOSED, SessionState.FAILED):
                raise SessionClosedError(f"tried to join session {frame.session_id:#x}, which "
                                         f"is {session.state.value}", peer=who)
            return session, session.accept_connection(hello, reader, now, label), False
        if not frame.flags & Flag.NEW_SESSION:
            raise UnknownSessionError(f"tried to join session {frame.session_id:#x}, which this "
                                      f"agent does not have (restarted, or the session ended)",
                                      peer=who)
        if len(hello.token) != TOKEN_SIZE or not any(hello.token):
            raise HandshakeError("sent an empty session token", peer=who)
        session = Session(Role.ACCEPTOR, self.config, local_name=self.local_name, now=now,
                          session_id=frame.session_id, token=hello.token, peer=label)
        session.apply_peer_limits(hello)
        cid = session.accept_connection(hello, reader, now, label)
        self.sessions[frame.session_id] = session
        session.note_established()
        return session, cid, True

    def forget(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)

    @staticmethod
    def refusal(exc: TransportError, session_id: int = 0) -> bytes:
        """The ERROR frame that tells a refused peer why."""
        if isinstance(exc, SessionClosedError):
            code = ErrorCode.CLOSED if "closed" in str(exc) else ErrorCode.REFUSED
        elif isinstance(exc, UnknownSessionError):
            code = ErrorCode.UNKNOWN_SESSION
        elif isinstance(exc, AuthenticationError):
            code = ErrorCode.REFUSED
        else:
            code = ErrorCode.VERSION if isinstance(exc, VersionMismatchError) \
                else ErrorCode.PROTOCOL
        return encode_frame(FrameType.ERROR, 0, session_id, 0, encode_error(code, str(exc)))
