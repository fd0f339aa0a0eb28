"""Errors of the transport (AMST): one branch of dwcp-migrate's hierarchy.

Every error names the peer it concerns (agent name if known, else its address) and says what
happened and what to do. Errors caused by another exception wrap it (``raise ... from exc``).

::

    DwcpError                          (dwcp_migrate.errors)
     └── TransportError                anything that stops a transport session
          ├── ProtocolError            the peer sent something this agent cannot accept
          │    ├── BadMagicError        not an AMST frame (wrong port? TLS on one side only?)
          │    ├── VersionMismatchError the peer speaks another protocol version
          │    ├── FrameTooLargeError   a length beyond the announced limit
          │    ├── ChecksumError        header or payload corrupted in transit (never delivered)
          │    ├── SequenceError        data out of the receive window, overlapping, after FIN
          │    └── HandshakeError       a HELLO/WELCOME that is malformed or does not fit
          ├── AuthenticationError      wrong token, name not allowed, certificate refused
          │    ├── UnknownSessionError  a join for a session the acceptor does not have
          │    └── TlsError             the TLS handshake failed (wrong CA, wrong name, ...)
          ├── PeerError                the peer reported an error (ERROR frame) and hung up
          ├── ConnectError             connecting failed and retries are exhausted
          └── SessionClosedError       the session is closed or failed; no more I/O on it

A :class:`ProtocolError` is *fatal* (ends the session) unless it says otherwise: a checksum
error or a garbled header (bad magic) only costs the connection it arrived on, whose frames are
resent on the others; on a connection's first frame either one refuses that connection.
"""

from __future__ import annotations

from dwcp_migrate.errors import DwcpError


class TransportError(DwcpError):
    """A transport session could not do what was asked; the message names the peer."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        self.peer = peer
        super().__init__(f"peer {peer}: {message}" if peer else message)


class ProtocolError(TransportError):
    """The peer sent bytes that break the AMST protocol; nothing of them was delivered."""

    fatal = True  # True: the whole session ends; False: only the connection is dropped


class BadMagicError(ProtocolError):
    """The bytes do not start with the AMST magic (and the header CRC does not match)."""

    fatal = False


class VersionMismatchError(ProtocolError):
    """The peer speaks a protocol version this agent does not."""


class FrameTooLargeError(ProtocolError):
    """A frame header announces a payload longer than allowed."""


class ChecksumError(ProtocolError):
    """A frame's CRC32 does not match: it was corrupted between the two agents."""

    fatal = False


class SequenceError(ProtocolError):
    """A data frame outside the receive window, overlapping another, or past the FIN."""


class HandshakeError(ProtocolError):
    """A HELLO or WELCOME frame is malformed or does not fit the session."""


class AuthenticationError(TransportError):
    """The peer could not prove it belongs to the session (or to the cluster)."""


class UnknownSessionError(AuthenticationError):
    """A connection tried to join a session the acceptor does not have (restarted, or ended)."""


class TlsError(AuthenticationError):
    """Mutual TLS failed: wrong CA, wrong name, expired certificate, or no TLS on one side."""


class PeerError(TransportError):
    """The peer sent an ERROR frame explaining why it refused or ended the session."""


class ConnectError(TransportError):
    """No connection to the peer could be made (or re-made) in the time allowed."""


class SessionClosedError(TransportError):
    """The session has been closed (or has failed): no more data can be sent or received."""
