"""QEMU test guests under the test bed's control: start, talk QMP, migrate, dump RAM.

Guests always run with ``-accel tcg`` (KVM guests hang while booting on these machines) and
``-nodefaults``: no disk, no NIC, no VGA, only a serial console written to a file and a QMP
socket. :class:`QemuBinary` selects the system QEMU (10.0 from bookworm-backports) or the QEMU
7.2 unpacked by ``scripts/setup.sh`` for stream-format tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError

from dwcp_migrate.errors import GuestError, TestbedError
from dwcp_migrate.paths import qemu72_root
from dwcp_migrate.testbed.procs import Reaper


@dataclass(frozen=True)
class QemuBinary:
    """A QEMU system emulator and what it needs to run (modules, firmware search path)."""

    path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()

    @classmethod
    def system(cls) -> QemuBinary:
        found = shutil.which("qemu-system-x86_64")
        if not found:
            raise TestbedError("qemu-system-x86_64 is not installed: run scripts/setup.sh")
        return cls(Path(found))

    @classmethod
    def qemu72(cls) -> QemuBinary:
        """Debian 12's QEMU 7.2, unpacked beside the system QEMU (it keeps the 7.2 format)."""
        root = qemu72_root()
        binary = root / "usr/bin/qemu-system-x86_64"
        if not binary.exists():
            raise TestbedError(f"QEMU 7.2 is not unpacked at {root}: run scripts/setup.sh")
        return cls(
            binary,
            {"QEMU_MODULE_DIR": str(root / "usr/lib/x86_64-linux-gnu/qemu")},
            ("-L", str(root / "usr/share/qemu"), "-L", "/usr/share/seabios"),
        )

    def version(self) -> tuple[int, int, int]:
        out = subprocess.run([str(self.path), "--version"], capture_output=True, text=True,
                             env={**os.environ, **self.env}, check=False).stdout
        match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
        if not match:
            raise TestbedError(f"cannot tell the version of {self.path}: {out!r}")
        major, minor, micro = (int(g) for g in match.groups())
        return major, minor, micro


class GuestVM:
    """One QEMU process: a test guest, or a destination waiting for an incoming migration."""

    def __init__(
        self,
        reaper: Reaper,
        name: str,
        workdir: Path,
        *,
        memory_mib: int,
        boot_args: Sequence[str],
        binary: QemuBinary | None = None,
        netns: str | None = None,
        incoming: str | None = None,
        paused: bool = False,
        machine: str = "pc",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.reaper = reaper
        self.name = name
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.binary = binary or QemuBinary.system()
        self.netns = netns
        workdir.mkdir(parents=True, exist_ok=True)
        self.serial_path = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        self.stderr_path = workdir / f"{name}.stderr"
        self.argv: list[str] = [
            str(self.binary.path), *self.binary.extra_args,
            # debug-threads names QEMU's threads in /proc ("CPU 0/TCG", "mig/src/main"...),
            # which perf and per-thread CPU timelines show.
            "-name", f"{name},debug-threads=on", "-machine", f"{machine},accel=tcg",
            "-m", str(memory_mib),
            "-nodefaults", "-display", "none", "-no-user-config",
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *boot_args, *extra_args,
        ]
        if paused:
            self.argv.append("-S")
        if incoming:
            self.argv += ["-incoming", incoming]
        self._qmp: QEMUMonitorProtocol | None = None
        self.process: subprocess.Popen[bytes] | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        for stale in (self.serial_path, self.qmp_path):
            stale.unlink(missing_ok=True)
        with self.stderr_path.open("wb") as err:
            self.process = self.reaper.spawn(self.argv, name=f"qemu {self.name}",
                                             netns=self.netns, env=self.binary.env, stderr=err)
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.process.poll() is not None:
                raise GuestError(f"QEMU for {self.name} exited ({self.process.returncode}): "
                                 f"{self.stderr_text()}")
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU for {self.name} did not open its QMP socket in "
                                 f"{timeout} s: {self.stderr_text()}")
            time.sleep(0.02)
        # QEMU creates the socket file when it binds and accepts once it listens: a connect in
        # between is refused (seen in CI), so that one error is retried until the deadline.
        while True:
            qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                qmp.connect(negotiate=True)
                break
            except ConnectError as exc:
                with contextlib.suppress(Exception):
                    qmp.close()
                refused = isinstance(exc.exc, ConnectionRefusedError)
                if not refused or self.process.poll() is not None or \
                        time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to the QMP socket of {self.name}'s QEMU: "
                                     f"{exc}; {self.stderr_text()}") from exc
                time.sleep(0.02)
        qmp.settimeout(60)
        self._qmp = qmp

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()[-2000:]
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        if self.process is None:
            raise GuestError(f"{self.name} is not started")
        return self.process.pid

    def running_process(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop_process(self) -> None:
        """Quit QEMU (QMP ``quit``, then the PID if it does not go)."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.cmd("quit")
            with contextlib.suppress(Exception):  # QEMU closing the socket first is normal
                self._qmp.close()
            self._qmp = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    # ---- QMP ------------------------------------------------------------------------------
    def qmp(self, command: str, **arguments: Any) -> Any:
        if self._qmp is None:
            raise GuestError(f"{self.name}: QMP is not connected (start() first)")
        try:
            return self._qmp.cmd(command, **arguments)
        except Exception as exc:
            raise GuestError(f"{self.name}: QMP {command} failed: {exc}") from exc

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def query_migrate(self) -> dict[str, Any]:
        result: dict[str, Any] = self.qmp("query-migrate")
        return result

    def set_migration(self, capabilities: Mapping[str, bool] | None = None,
                      parameters: Mapping[str, Any] | None = None) -> None:
        if capabilities:
            self.qmp("migrate-set-capabilities", capabilities=[
                {"capability": k, "state": v} for k, v in capabilities.items()])
        if parameters:
            self.qmp("migrate-set-parameters", **parameters)

    def pmemsave(self, path: Path) -> None:
        """Write all guest-physical RAM (0 .. memory size) to ``path``."""
        path.unlink(missing_ok=True)
        self.qmp("pmemsave", val=0, size=self.memory_mib * 1024 * 1024, filename=str(path))

    def take_events(self) -> list[dict[str, Any]]:
        """QMP events received so far (read while commands ran), oldest first; then cleared."""
        if self._qmp is None:
            return []
        self._qmp.cmd("query-status")  # lets events that arrived since the last command in
        return self._qmp.get_events(wait=False)

    def hmp(self, command_line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
