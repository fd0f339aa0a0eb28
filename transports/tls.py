"""Mutual TLS between agents: contexts from configured paths, and errors that say what to fix.

Every agent has a certificate for its agent name (``dwcp certs`` makes a lab CA and one per
host) signed by the cluster's CA. Both sides present their certificate and check the other's:

- the initiator checks the acceptor's certificate against the CA and the agent name it meant
  to reach (``server_hostname``; the name is the certificate's DNS subjectAltName);
- the acceptor checks the initiator's certificate against the CA, then checks that the agent
  name in its HELLO is one the certificate names (:class:`SessionTable` does that with the
  names from :func:`peer_names`), so an agent cannot claim another's name.

Plaintext is possible only when configured explicitly (``TransportSecurity.plaintext``), and it
is logged as a WARNING every time a session starts without TLS.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwcp_migrate.errors import ConfigError
from dwcp_migrate.transports.errors import TlsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """Where this agent's certificate, key and the cluster CA are (PEM files)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Path | None = None) -> TlsConfig:
        """From a config section ``{cert: ..., key: ..., ca: ...}``; relative to ``base``."""
        missing = [k for k in ("cert", "key", "ca") if not values.get(k)]
        if missing:
            raise ConfigError(f"tls: missing {', '.join(missing)} (paths to PEM files; "
                              f"`dwcp certs` makes a lab CA and host certificates)")
        root = base or Path(".")
        return cls(*(root / Path(str(values[k])) for k in ("cert", "key", "ca")))

    def _load(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not path.is_file():
                raise ConfigError(f"tls: the {what} file {path} does not exist (run `dwcp certs` "
                                  f"or fix the path in the configuration)")
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls: cannot load certificate {self.cert}, key {self.key} or CA "
                              f"{self.ca}: {exc}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the initiator must show a certificate
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        ctx.check_hostname = True  # the acceptor's certificate must name the agent we meant
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class TransportSecurity:
    """TLS settings of a transport: ``tls`` or, only if set explicitly, ``plaintext``."""

    tls: TlsConfig | None = None
    plaintext: bool = False

    def __post_init__(self) -> None:
        if self.tls is None and not self.plaintext:
            raise ConfigError("transport: no TLS certificate configured; configure tls (cert, "
                              "key, ca; `dwcp certs` makes lab ones) or set plaintext: true to "
                              "send migrations unencrypted and unauthenticated")
        if self.tls is not None and self.plaintext:
            raise ConfigError("transport: both tls and plaintext are configured; choose one")

    def warn_if_plaintext(self, what: str) -> None:
        if self.plaintext:
            log.warning("PLAINTEXT: %s without TLS: migration data is neither encrypted nor "
                        "authenticated (plaintext was configured explicitly)", what)


def peer_names(peercert: Mapping[str, Any] | None) -> list[str]:
    """The DNS names a verified peer certificate is valid for (its agent names)."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]


def cut_short(exc: BaseException) -> bool:
    """A TLS handshake that the network ended (an EOF or a socket error in its middle: a
    reset, a middlebox, a listener with too many handshakes at once), not a refusal: a
    refused certificate is a TLS alert or a verification error. Worth another connection."""
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLSyscallError)


def explain(exc: BaseException, peer: str, *, side: str) -> TlsError:
    """A TlsError that names the peer and says what is wrong and what to check.

    ``side``: "client" when we connected (we checked the peer's certificate, or the peer
    refused ours), "server" when the peer connected to us.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if "Hostname mismatch" in reason or "IP address mismatch" in reason:
            hint = ("its certificate is not for the agent name we connected to: check the peer's "
                    "name in the configuration, or reissue its certificate with `dwcp certs`")
        elif "unable to get local issuer" in reason or "self-signed" in reason or \
                "self signed" in reason:
            hint = ("its certificate is not signed by our CA: both agents need certificates "
                    "from the same CA (tls.ca)")
        elif "expired" in reason:
            hint = "its certificate has expired: reissue it with `dwcp certs`"
        else:
            hint = "its certificate was refused"
        whose = "the certificate it presented" if side == "client" else "its client certificate"
        return TlsError(f"TLS refused {whose} ({reason}): {hint}", peer=peer)
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).upper()
        if "ALERT_UNKNOWN_CA" in reason or "ALERT_BAD_CERTIFICATE" in reason or \
                "ALERT_CERTIFICATE" in reason:
            return TlsError(f"refused our certificate ({exc.reason}): it does not trust the CA "
                            f"that signed it; both agents need certificates from the same CA",
                            peer=peer)
        if "CERTIFICATE_REQUIRED" in reason or "PEER DID NOT RETURN A CERTIFICATE" in reason:
            return TlsError(f"presented no certificate ({exc.reason}): mutual TLS needs one on "
                            f"both sides", peer=peer)
        if "WRONG_VERSION_NUMBER" in reason or "HTTP_REQUEST" in reason or \
                "PACKET_LENGTH_TOO_LONG" in reason or "RECORD_LAYER_FAILURE" in reason:
            return TlsError(f"does not speak TLS ({exc.reason}): is it configured for plaintext?",
                            peer=peer)
        return TlsError(f"TLS failed: {exc}", peer=peer)
    if isinstance(exc, ConnectionError | EOFError):
        return TlsError(f"closed the connection during the TLS handshake ({exc!r}): it probably "
                        f"refused our certificate (see its log)", peer=peer)
    return TlsError(f"TLS failed: {exc!r}", peer=peer)
