"""Hosts as network namespaces, joined by a LAN (veth into a bridge).

A :class:`Host` is a named network namespace with its own TCP settings; commands run inside it
with ``ip netns exec``. The LAN is a bridge in a separate "switch" namespace with one veth per
host, so the root namespace's network is never touched. WAN links (emulated delay, rate, loss)
are in :mod:`dwcp_migrate.testbed.wan`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from dwcp_migrate.errors import TestbedError
from dwcp_migrate.testbed.procs import Reaper, netns_exec_prefix

LAN_PREFIX = "10.200.0"  # host i gets 10.200.0.(i+1)/24 on the LAN


def run(argv: Sequence[str], *, netns: str | None = None, check: bool = True,
        input_text: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command (inside ``netns`` if given); raise TestbedError with its stderr on failure."""
    full = [*netns_exec_prefix(netns), *argv]
    try:
        res = subprocess.run(full, capture_output=True, text=True, input=input_text, check=False,
                             timeout=timeout)
    except FileNotFoundError as exc:
        raise TestbedError(f"{argv[0]} is not installed: run scripts/setup.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{' '.join(full)} did not finish in {timeout} s") from exc
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(full)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass(frozen=True)
class TcpSettings:
    """Per-host TCP settings. ``None`` keeps what the namespace inherited from the host.

    Only per-namespace sysctls: ``net.core.rmem_max``/``wmem_max`` are global on this kernel
    (read-only inside a namespace), so a program that sets SO_SNDBUF/SO_RCVBUF itself stays
    capped by the root namespace's values (4 MiB here); autotuning follows ``tcp_[rw]mem``.
    """

    congestion_control: str | None = None  # "cubic", "bbr", "reno"
    tcp_rmem: tuple[int, int, int] | None = None
    tcp_wmem: tuple[int, int, int] | None = None

    @classmethod
    def stock(cls) -> TcpSettings:
        """Debian's stock settings: cubic, 4 MiB maximum send buffer, 6 MiB receive."""
        return cls("cubic", (4096, 131072, 6291456), (4096, 16384, 4 * 1024 * 1024))

    def sysctls(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.congestion_control:
            out["net.ipv4.tcp_congestion_control"] = self.congestion_control
        if self.tcp_rmem:
            out["net.ipv4.tcp_rmem"] = " ".join(map(str, self.tcp_rmem))
        if self.tcp_wmem:
            out["net.ipv4.tcp_wmem"] = " ".join(map(str, self.tcp_wmem))
        return out


@dataclass
class Host:
    """One test host: a network namespace (and, for libvirt hosts, more; see libvirt_host)."""

    name: str
    netns: str
    index: int
    lan_address: str
    addresses: dict[str, str] = field(default_factory=dict)  # link name -> this host's address

    def run(self, argv: Sequence[str], *, check: bool = True, input_text: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(argv, netns=self.netns, check=check, input_text=input_text, timeout=timeout)

    def apply_tcp(self, settings: TcpSettings) -> None:
        for key, value in settings.sysctls().items():
            self.run(["sysctl", "-q", "-w", f"{key}={value}"], check=False)
            # sysctl exits 0 on some refusals ("Invalid argument"): read the value back.
            got = self.run(["sysctl", "-n", key], check=False).stdout.split()
            if got != value.split():
                hint = ""
                if key.endswith("congestion_control"):
                    hint = (" (a namespace may only use congestion controls allowed in the root "
                            "namespace: net.ipv4.tcp_allowed_congestion_control, set by setup.sh)")
                raise TestbedError(f"host {self.name}: cannot set {key}={value} "
                                   f"(it reads {' '.join(got)!r}){hint}")


class Network:
    """Creates hosts and the LAN between them; everything is recorded in the reaper."""

    def __init__(self, reaper: Reaper, prefix: str) -> None:
        self.reaper = reaper
        self.prefix = prefix  # namespace names start with it; short, unique per bed
        self.hosts: dict[str, Host] = {}
        self._switch: str | None = None

    def add_host(self, name: str) -> Host:
        if name in self.hosts:
            raise TestbedError(f"host {name} already exists in this bed")
        index = len(self.hosts)
        netns = f"{self.prefix}-{name}"
        run(["ip", "netns", "add", netns])
        self.reaper.track_netns(netns)
        run(["ip", "link", "set", "lo", "up"], netns=netns)
        host = Host(name, netns, index, f"{LAN_PREFIX}.{index + 1}")
        self.hosts[name] = host
        self._attach_to_lan(host)
        return host

    def _attach_to_lan(self, host: Host) -> None:
        if self._switch is None:
            self._switch = f"{self.prefix}-sw"
            run(["ip", "netns", "add", self._switch])
            self.reaper.track_netns(self._switch)
            run(["ip", "link", "add", "br0", "type", "bridge"], netns=self._switch)
            run(["ip", "link", "set", "br0", "up"], netns=self._switch)
        # Create the pair inside the switch namespace, then move one end into the host.
        port, inner = f"p{host.index}", f"lan{host.index}"
        run(["ip", "link", "add", port, "type", "veth", "peer", "name", inner],
            netns=self._switch)
        run(["ip", "link", "set", inner, "netns", host.netns, "name", "lan0"],
            netns=self._switch)
        run(["ip", "link", "set", port, "master", "br0", "up"], netns=self._switch)
        host.run(["ip", "addr", "add", f"{host.lan_address}/24", "dev", "lan0"])
        host.run(["ip", "link", "set", "lan0", "up"])
        host.addresses["lan"] = host.lan_address
