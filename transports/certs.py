"""A lab certificate authority and agent certificates for mutual TLS (``dwcp certs``).

For test beds and labs: production clusters should use their own PKI. Keys are ECDSA P-256
(fast handshakes, small certificates). Each agent certificate names the agent in its DNS
subjectAltName (what TLS checks, see :mod:`.tls`) and in its common name, and may be used
both as a TLS server and a TLS client, since every agent is both initiator and acceptor.

Files written (PEM): ``ca.pem`` and ``ca.key`` (the CA; keep the key off the hosts), and for
each agent ``<name>.pem`` and ``<name>.key``. An existing CA in the directory is reused, so
agents can be added later.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dwcp_migrate.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*$")


@dataclass(frozen=True)
class Issued:
    name: str
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never world-readable
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - also on older Pythons


def load_or_make_ca(out: Path, *, common_name: str = "dwcp lab CA",
                    days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in ``out`` (``ca.pem`` + ``ca.key``), made first if it is not there."""
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if cert_path.exists() != key_path.exists():
        raise ConfigError(f"{out} has only one of ca.pem and ca.key: remove it or restore the "
                          f"other")
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise ConfigError(f"cannot read the CA in {out}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an EC key as `dwcp certs` makes them")
        return cert, key
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue(out: Path, name: str, *, addresses: list[str] | None = None, days: int = 825,
          ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None) -> Issued:
    """An agent certificate for ``name`` (its DNS subjectAltName), signed by the CA in ``out``.

    ``addresses`` adds IP subjectAltNames (agents are still checked by name).
    """
    if not _NAME.match(name):
        raise ConfigError(f"agent name {name!r} cannot be a certificate name: use letters, "
                          f"digits, '-' and '.' (a host name)")
    ca_cert, ca_key = ca or load_or_make_ca(out)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    for addr in addresses or []:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(addr)))
        except ValueError as exc:
            raise ConfigError(f"{addr!r} is not an IP address") from exc
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(name, cert_path, key_path)
