"""Which transport carries a session: RDMA where both agents can, TCP otherwise. No I/O.

The agents agree in three steps:

1. each agent scans its devices once (:func:`.pyverbs_verbs.scan_devices`, or a provider's
   ``scan``) and builds its :class:`Capabilities` with :func:`local_capabilities`;
2. the initiator sends its capabilities over the (TLS) TCP session and calls
   :func:`choose_transport` with the acceptor's; the acceptor calls it with the initiator's;
3. RDMA is used only if *both* choose it (each side's reason is logged either way), so one
   side's configuration or missing device is enough to stay on TCP.

RDMA traffic is not encrypted (there is no TLS over verbs here); when the agents use TLS,
RDMA is chosen only if ``allow_plaintext`` says a trusted fabric may carry plaintext.

The RDMA data path is tested only against a fake verbs layer: the development machine has no
RDMA hardware (see :mod:`.rdma`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dwcp_migrate.errors import ConfigError
from dwcp_migrate.transports.rdma_wire import VERSION as PROTOCOL
from dwcp_migrate.transports.verbs import DeviceScan

TransportKind = Literal["rdma", "tcp"]


@dataclass(frozen=True)
class RdmaSettings:
    """The agent's RDMA configuration."""

    mode: Literal["auto", "off"] = "auto"  # auto: RDMA when both ends can
    device: str | None = None  # only this device (None: any usable one)
    address: str | None = None  # this agent's rdmacm address (on the RDMA device's netdev)
    port: int = 7481
    allow_plaintext: bool = False  # RDMA even though the agents use TLS (trusted fabric)
    tls: bool = False  # the agents' TCP sessions use mutual TLS (from the security config)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "off"):
            raise ConfigError(f"transport.rdma.mode must be auto or off, not {self.mode!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"transport.rdma.port {self.port} is not a TCP/IP port")


@dataclass(frozen=True)
class Capabilities:
    """What an agent tells its peer about RDMA (JSON in the session's opening message)."""

    rdma_devices: tuple[str, ...] = ()  # empty: this agent will not use RDMA
    rdma_address: str | None = None
    rdma_port: int = 0
    rdma_protocol: int = PROTOCOL
    rdma_reason: str | None = None  # why not, when rdma_devices is empty

    def to_json(self) -> dict[str, Any]:
        if not self.rdma_devices:
            return {"rdma": None, "rdma_reason": self.rdma_reason}
        return {"rdma": {"devices": list(self.rdma_devices), "address": self.rdma_address,
                         "port": self.rdma_port, "protocol": self.rdma_protocol}}

    @classmethod
    def from_json(cls, value: Any) -> Capabilities:
        """Tolerant: anything unexpected means "no RDMA" (an older or odd peer), with why."""
        if not isinstance(value, dict):
            return cls(rdma_reason="peer sent no capabilities (an older agent?)")
        rdma = value.get("rdma")
        if not isinstance(rdma, dict):
            reason = value.get("rdma_reason")
            return cls(rdma_reason=reason if isinstance(reason, str) else None)
        devices, address = rdma.get("devices"), rdma.get("address")
        port, protocol = rdma.get("port"), rdma.get("protocol")
        if (not isinstance(devices, list) or not devices
                or not all(isinstance(d, str) for d in devices)
                or not isinstance(address, str) or not isinstance(port, int)
                or not isinstance(protocol, int)):
            return cls(rdma_reason=f"peer sent malformed RDMA capabilities: {rdma!r}")
        return cls(tuple(devices), address, port, protocol)


def _local_refusal(scan: DeviceScan, config: RdmaSettings) -> tuple[tuple[str, ...], str | None]:
    """(devices this agent would use, or why none)."""
    if config.mode == "off":
        return (), "RDMA is off in the configuration (transport.rdma.mode: off)"
    if config.tls and not config.allow_plaintext:
        return (), ("the agents use TLS and RDMA traffic cannot be encrypted (set "
                    "transport.rdma.allow_plaintext on a trusted fabric to use it)")
    if not scan.devices:
        return (), scan.reason or "no RDMA device on this host"
    usable = scan.usable
    if config.device is not None:
        usable = tuple(d for d in usable if d.name == config.device)
        if not usable:
            found = ", ".join(d.name for d in scan.devices)
            return (), (f"RDMA device {config.device} is not on this host or its port is "
                        f"down (found: {found})")
    if not usable:
        return (), ("no RDMA device with an active port on this host (found: "
                    f"{', '.join(d.name for d in scan.devices)})")
    if config.address is None:
        return (), "no RDMA address configured (transport.rdma.address)"
    return tuple(d.name for d in usable), None


def local_capabilities(scan: DeviceScan, config: RdmaSettings) -> Capabilities:
    """This agent's :class:`Capabilities`, from its device scan and configuration."""
    devices, reason = _local_refusal(scan, config)
    if not devices:
        return Capabilities(rdma_reason=reason)
    return Capabilities(devices, config.address, config.port)


def choose_transport(local_devices: DeviceScan, peer_capabilities: Capabilities | None,
                     config: RdmaSettings) -> tuple[TransportKind, str]:
    """``("rdma", why)`` when this end and the peer can both use RDMA, else ``("tcp", why)``.

    Pure: the device scan and the peer's capabilities are passed in. The reason is meant for
    the log and the migration record.
    """
    devices, reason = _local_refusal(local_devices, config)
    if not devices:
        return "tcp", reason or "RDMA not usable here"
    peer = peer_capabilities
    if peer is None:
        return "tcp", "peer sent no capabilities (an older agent?)"
    if not peer.rdma_devices:
        why = f" ({peer.rdma_reason})" if peer.rdma_reason else ""
        return "tcp", f"peer has no RDMA device{why}"
    if peer.rdma_protocol != PROTOCOL:
        return "tcp", (f"peer speaks RDMA protocol {peer.rdma_protocol}, this agent "
                       f"{PROTOCOL}")
    return "rdma", (f"both ends have RDMA (here: {', '.join(devices)}; peer: "
                    f"{', '.join(peer.rdma_devices)} at {peer.rdma_address}:{peer.rdma_port})")
