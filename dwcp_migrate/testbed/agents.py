"""dwcp agents on test hosts: configuration, certificates, the process, its admin client.

Each host's agent runs in the host's namespaces (network; for libvirt hosts also mount and
UTS, so its ``/run/dwcp`` is the host's own). Certificates come from one lab CA made for the
bed, as ``dwcp certs`` makes them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dwcp_migrate.agent.admin import AdminClient, AgentUnavailableError
from dwcp_migrate.errors import TestbedError
from dwcp_migrate.testbed.bed import TestBed
from dwcp_migrate.transports.certs import issue, load_or_make_ca

AGENT_PORT = 7480


class TestAgent:
    """One agent process on one host of a bed."""

    __test__ = False

    def __init__(self, bed: TestBed, host: str, *, link: str = "wan",
                 settings: Mapping[str, Any] | None = None) -> None:
        self.bed = bed
        self.host = host
        self.link = link
        self.settings = dict(settings or {})
        lv = bed.libvirt.get(host)
        # A libvirt host has a private /run/dwcp; a plain host gets a directory of its own.
        self.socket_dir = Path("/run/dwcp") if lv else bed.workdir / host / "dwcp"
        self.local_socket_dir = lv.private("/run/dwcp") if lv else self.socket_dir
        self.state_dir = bed.workdir / host / "state"
        self.config_path = bed.workdir / host / "agent.yaml"
        self.log_path = bed.workdir / host / "agent.log"
        self.process: Any = None

    def peers(self) -> dict[str, str]:
        """Peer agents' addresses: over ``link`` where this host has it, else the LAN."""
        out = {}
        for name in self.bed.host_names:
            if name == self.host:
                continue
            both_linked = (self.link in self.bed.host(self.host).addresses
                           and self.link in self.bed.host(name).addresses)
            out[name] = f"{self.bed.address(name, self.link if both_linked else 'lan')}" \
                        f":{AGENT_PORT}"
        return out

    def write_config(self) -> dict[str, Any]:
        certs = self.bed.workdir / "certs"
        load_or_make_ca(certs)
        if not (certs / f"{self.host}.pem").exists():
            issue(certs, self.host)
        data: dict[str, Any] = {
            "name": self.host,
            "listen": f"0.0.0.0:{AGENT_PORT}",
            "peers": self.peers(),
            "socket_dir": str(self.socket_dir),
            "state_dir": str(self.state_dir),
            "tls": {"cert": str(certs / f"{self.host}.pem"),
                    "key": str(certs / f"{self.host}.key"), "ca": str(certs / "ca.pem")},
        }
        for key, value in self.settings.items():
            if key == "tls" and isinstance(value, dict) and value.get("plaintext"):
                data[key] = value  # plaintext replaces the certificates, never joins them
            elif isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(data))
        return data

    def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        assert self.bed.reaper is not None
        lv = self.bed.libvirt.get(self.host)
        argv = [sys.executable, "-m", "dwcp_migrate.cli", "-v", "agent",
                "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.process = self.bed.reaper.spawn(
                argv, name=f"dwcp agent {self.host}", stdout=log, stderr=log,
                prefix=lv.nsenter_prefix() if lv else (),
                netns=None if lv else self.bed.host(self.host).netns)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().call("ping")
                return
            except AgentUnavailableError:
                if self.process.poll() is not None:
                    raise TestbedError(f"agent on {self.host} exited: "
                                       f"{self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise TestbedError(f"agent on {self.host} did not start in {timeout} s: "
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def client(self) -> AdminClient:
        return AdminClient(self.local_socket_dir / "admin.sock")

    def outgoing_socket(self, peer: str) -> Path:
        """Path a QEMU on this host connects to (as seen inside the host)."""
        return self.socket_dir / "to" / f"{peer}.sock"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""
