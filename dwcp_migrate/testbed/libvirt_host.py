"""A test host with its own libvirtd: network + mount + UTS namespaces on one machine.

Each libvirt host is a network namespace (from :class:`~dwcp_migrate.testbed.netns.Network`)
plus a persistent mount and UTS namespace (``unshare --mount=FILE --uts=FILE``) in which
private directories are bind-mounted over ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt`` and ``/run/dwcp``, so two
daemons on one machine never see each other's state. Commands run in all three namespaces
through ``nsenter``. The daemon runs in the foreground so its PID is the one we track.

Settings that made libvirt work here are in docs/TESTBED.md (no systemd, no virtlogd,
``security_driver = "none"``, no cgroups, no namespaces for QEMU).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from dwcp_migrate.errors import TestbedError
from dwcp_migrate.testbed.netns import Host, run
from dwcp_migrate.testbed.procs import Reaper

PRIVATE_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
                "/var/cache/libvirt", "/run/dwcp")

LIBVIRTD_CONF = """\
listen_tls = 0
listen_tcp = 1
auth_tcp = "none"
host_uuid = "{host_uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


class LibvirtHost:
    """Mount/UTS namespaces and a libvirtd for a :class:`Host`."""

    def __init__(self, reaper: Reaper, host: Host, state_dir: Path) -> None:
        self.reaper = reaper
        self.host = host
        self.root = state_dir / f"host-{host.name}"  # private dirs live here, seen from root ns
        self.mnt_ns = self.root / "ns.mnt"
        self.uts_ns = self.root / "ns.uts"
        self.libvirtd: subprocess.Popen[bytes] | None = None

    # ---- paths as seen from the root namespace ------------------------------------------
    def private(self, path: str) -> Path:
        """Where a path inside this host's mount namespace is stored, seen from outside."""
        for private_dir in PRIVATE_DIRS:
            if path == private_dir or path.startswith(private_dir + "/"):
                return self.root / private_dir.strip("/").replace("/", "_") / \
                    path[len(private_dir):].lstrip("/")
        return Path(path)

    def nsenter_prefix(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.host.netns}", f"--mount={self.mnt_ns}",
                f"--uts={self.uts_ns}"]

    def run(self, argv: Sequence[str], *, check: bool = True, input_text: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([*self.nsenter_prefix(), *argv], check=check, input_text=input_text,
                   timeout=timeout)

    def virsh(self, *args: str, check: bool = True, timeout: float = 180
              ) -> subprocess.CompletedProcess[str]:
        return self.run(["virsh", "-c", "qemu:///system", *args], check=check, timeout=timeout)

    # ---- bring-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.reaper.track_path(str(self.root))
        for private_dir in PRIVATE_DIRS:
            Path(private_dir).mkdir(parents=True, exist_ok=True)  # mount points in the root ns
            self.private(private_dir).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.private("/etc/libvirt"), dirs_exist_ok=True)
        self.private("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        for sub in ("qemu", "images", "qemu/save", "qemu/snapshot", "qemu/dump"):
            self.private(f"/var/lib/libvirt/{sub}").mkdir(parents=True, exist_ok=True)
        autostart = self.private("/etc/libvirt/qemu/networks/autostart/default.xml")
        autostart.unlink(missing_ok=True)
        self.private("/etc/libvirt/libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(host_uuid=uuid.uuid4()))
        self.private("/etc/libvirt/qemu.conf").write_text(QEMU_CONF)
        hooks = self.private("/etc/libvirt/hooks")
        if hooks.exists():
            shutil.rmtree(hooks)
        hooks.mkdir()

        # The namespace files must be on a private mount to be bind-mounted on.
        for ns_file in (self.mnt_ns, self.uts_ns):
            ns_file.touch()
        binds = " && ".join(
            f"mount --bind {self.private(d)} {d}" for d in PRIVATE_DIRS)
        script = f"{binds} && hostname {self.host.name}"
        run(["unshare", f"--mount={self.mnt_ns}", f"--uts={self.uts_ns}",
             "--propagation", "private", "sh", "-c", script])
        self.reaper.track_mount(str(self.mnt_ns))
        self.reaper.track_mount(str(self.uts_ns))

    def start_libvirtd(self, timeout: float = 30.0) -> None:
        log = self.root / "libvirtd.stderr"
        with log.open("wb") as err:
            self.libvirtd = self.reaper.spawn(
                # Its own pid file: the default /run/libvirtd.pid is shared by all hosts.
                ["libvirtd", "--listen", "--pid-file", "/run/libvirt/libvirtd.pid"],
                name=f"libvirtd {self.host.name}",
                prefix=self.nsenter_prefix(), stderr=err, stdout=err)
        deadline = time.monotonic() + timeout
        while True:
            res = self.virsh("version", check=False, timeout=10)
            if res.returncode == 0:
                return
            if self.libvirtd.poll() is not None:
                raise TestbedError(f"libvirtd on {self.host.name} exited "
                                   f"({self.libvirtd.returncode}): "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TestbedError(f"libvirtd on {self.host.name} did not answer in {timeout} s: "
                                   f"{res.stderr.strip()}")
            time.sleep(0.2)

    @property
    def uri(self) -> str:
        """How another host's libvirt reaches this one (over the LAN)."""
        return f"qemu+tcp://{self.host.lan_address}/system"


def domain_xml(
    name: str,
    *,
    memory_mib: int,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    serial_log: str,
    emulator: str = "/usr/bin/qemu-system-x86_64",
) -> str:
    """A TCG guest with direct kernel boot, serial to a file, no disk and no NIC."""
    initrd_xml = f"<initrd>{escape(str(initrd))}</initrd>" if initrd else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    {initrd_xml}
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <serial type='file'>
      <source path='{escape(serial_log)}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
