"""A whole test bed in one object: hosts, LAN, WAN links, optional libvirt daemons.

Use it as a context manager; leaving the ``with`` block (normally, by an exception, or by
Ctrl-C) tears everything down by PID. A bed whose owner died without teardown (a killed test
run) is cleaned up by the next bed that starts (:func:`reap_stale_beds`) or by
``dwcp testbed cleanup``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from dwcp_migrate.errors import TestbedError
from dwcp_migrate.testbed.libvirt_host import LibvirtHost
from dwcp_migrate.testbed.netns import Host, Network, TcpSettings
from dwcp_migrate.testbed.procs import Reaper, reap_stale_beds
from dwcp_migrate.testbed.wan import WanLink, WanSpec

log = logging.getLogger(__name__)


class TestBed:
    """Hosts named ``host_names``; a WAN link between the first two if ``wan`` is given."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        host_names: Sequence[str] = ("a", "b"),
        *,
        wan: WanSpec | None = None,
        libvirt: bool = False,
        start_libvirtd: bool = True,
        tcp: TcpSettings | None = None,
        keep_workdir: bool = False,
    ) -> None:
        if len(set(host_names)) != len(host_names) or not host_names:
            raise TestbedError(f"host names must be unique and non-empty: {list(host_names)}")
        self.host_names = list(host_names)
        self.wan_spec = wan
        self.with_libvirt = libvirt
        self.start_libvirtd = start_libvirtd  # False: the caller starts them (after hooks)
        self.tcp = tcp
        self.keep_workdir = keep_workdir
        self.bed_id = uuid.uuid4().hex[:8]
        self.reaper: Reaper | None = None
        self.network: Network | None = None
        self.wan: WanLink | None = None
        self.libvirt: dict[str, LibvirtHost] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dwcp-bed-{self.bed_id}-"))

    def __enter__(self) -> TestBed:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> None:
        for stale in reap_stale_beds():
            log.warning("cleaned up test bed %s left behind by an interrupted run", stale)
        self.reaper = Reaper(self.bed_id)
        # Namespace names must be short: interface and ns names are limited in length.
        self.network = Network(self.reaper, f"dw{self.bed_id[:6]}")
        for name in self.host_names:
            host = self.network.add_host(name)
            if self.tcp is not None:
                host.apply_tcp(self.tcp)
        if self.wan_spec is not None:
            if len(self.host_names) < 2:
                raise TestbedError("a WAN link needs two hosts")
            a, b = (self.network.hosts[n] for n in self.host_names[:2])
            self.wan = WanLink(self.reaper, a, b, self.wan_spec, index=0)
        if self.with_libvirt:
            for name in self.host_names:
                lv = LibvirtHost(self.reaper, self.network.hosts[name], self.reaper.state_dir)
                lv.setup()
                self.libvirt[name] = lv
            if self.start_libvirtd:
                for lv in self.libvirt.values():
                    lv.start_libvirtd()

    def down(self) -> None:
        if self.reaper is not None:
            problems = self.reaper.teardown()
            self.reaper = None
            if problems:
                raise TestbedError("teardown left things behind: " + "; ".join(problems))
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def host(self, name: str) -> Host:
        if self.network is None or name not in self.network.hosts:
            raise TestbedError(f"no host {name} in this bed")
        return self.network.hosts[name]

    def address(self, name: str, link: str) -> str:
        """Address of host ``name`` on ``link`` ("lan" or "wan")."""
        host = self.host(name)
        if link not in host.addresses:
            raise TestbedError(f"host {name} has no {link} address (links: {list(host.addresses)})")
        return host.addresses[link]
