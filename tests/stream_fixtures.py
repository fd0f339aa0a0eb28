"""Helpers for the stream codec tests: synthetic stream builders, and real captures of QEMU
7.2 and 10.0 migration streams (main channel and multifd channels) with a way to replay them
into a destination QEMU.

Captures are made by migrating the bare-metal test guest to a unix socket this module listens
on, recording each connection to its own file. They are cached under
``cache_dir()/captures/<key>`` (key: QEMU version, scenario, sizes, format revision), so only
the first run pays for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp_migrate.errors import GuestError
from dwcp_migrate.paths import cache_dir
from dwcp_migrate.stream import records as rec
from dwcp_migrate.testbed.guests import GuestImages, SerialLog, WorkloadSpec, guest_boot_args
from dwcp_migrate.testbed.procs import Reaper
from dwcp_migrate.testbed.qemu import GuestVM, QemuBinary

PAGE = 4096


# ---- synthetic main-channel streams ----------------------------------------------------------
def _name(name: bytes) -> bytes:
    return bytes((len(name),)) + name


class StreamBuilder:
    """Builds main-channel bytes the way QEMU writes them (savevm.c, ram.c)."""

    def __init__(self, page_size: int = PAGE) -> None:
        self.page_size = page_size
        self.parts: list[bytes] = []

    def raw(self, data: bytes) -> StreamBuilder:
        self.parts.append(data)
        return self

    def header(self, magic: int = rec.QEMU_VM_FILE_MAGIC, version: int = 3) -> StreamBuilder:
        return self.raw(struct.pack(">II", magic, version))

    def configuration(self, machine: bytes = b"pc-i440fx-7.2",
                      subsections: Sequence[tuple[bytes, bytes]] = ()) -> StreamBuilder:
        out = bytes((rec.QEMU_VM_CONFIGURATION,)) + struct.pack(">I", len(machine)) + machine
        for name, body in subsections:
            out += bytes((rec.QEMU_VM_SUBSECTION,)) + _name(name) + struct.pack(">I", 1) + body
        return self.raw(out)

    def start(self, section_id: int, idstr: bytes = b"ram", instance: int = 0,
              version: int = 4, kind: int = rec.QEMU_VM_SECTION_START) -> StreamBuilder:
        return self.raw(struct.pack(">BI", kind, section_id) + _name(idstr)
                        + struct.pack(">II", instance, version))

    def full(self, section_id: int, idstr: bytes, payload: bytes, version: int = 1
             ) -> StreamBuilder:
        self.start(section_id, idstr, 0, version, rec.QEMU_VM_SECTION_FULL)
        return self.raw(payload).footer(section_id)

    def part(self, section_id: int) -> StreamBuilder:
        return self.raw(struct.pack(">BI", rec.QEMU_VM_SECTION_PART, section_id))

    def end(self, section_id: int) -> StreamBuilder:
        return self.raw(struct.pack(">BI", rec.QEMU_VM_SECTION_END, section_id))

    def footer(self, section_id: int) -> StreamBuilder:
        return self.raw(struct.pack(">BI", rec.QEMU_VM_SECTION_FOOTER, section_id))

    def mem_size(self, blocks: Sequence[tuple[bytes, int]],
                 extra: Sequence[Sequence[int]] = ()) -> StreamBuilder:
        total = sum(length for _, length in blocks)
        out = struct.pack(">Q", total | rec.RAM_SAVE_FLAG_MEM_SIZE)
        for i, (name, length) in enumerate(blocks):
            out += _name(name) + struct.pack(">Q", length)
            for value in extra[i] if extra else ():
                out += struct.pack(">Q", value)
        return self.raw(out)

    def _ram_head(self, flag: int, block: bytes, offset: int, cont: bool) -> bytes:
        if cont:
            return struct.pack(">Q", offset | flag | rec.RAM_SAVE_FLAG_CONTINUE)
        return struct.pack(">Q", offset | flag) + _name(block)

    def page(self, block: bytes, offset: int, data: bytes, cont: bool = False) -> StreamBuilder:
        assert len(data) == self.page_size
        return self.raw(self._ram_head(rec.RAM_SAVE_FLAG_PAGE, block, offset, cont) + data)

    def zero(self, block: bytes, offset: int, cont: bool = False, fill: int = 0
             ) -> StreamBuilder:
        return self.raw(self._ram_head(rec.RAM_SAVE_FLAG_ZERO, block, offset, cont)
                        + bytes((fill,)))

    def xbzrle(self, block: bytes, offset: int, delta: bytes, cont: bool = False
               ) -> StreamBuilder:
        return self.raw(self._ram_head(rec.RAM_SAVE_FLAG_XBZRLE, block, offset, cont)
                        + b"\x01" + struct.pack(">H", len(delta)) + delta)

    def compressed(self, block: bytes, offset: int, data: bytes, cont: bool = False
                   ) -> StreamBuilder:
        return self.raw(self._ram_head(rec.RAM_SAVE_FLAG_COMPRESS_PAGE, block, offset, cont)
                        + struct.pack(">I", len(data)) + data)

    def eos(self) -> StreamBuilder:
        return self.raw(struct.pack(">Q", rec.RAM_SAVE_FLAG_EOS))

    def multifd_flush(self) -> StreamBuilder:
        return self.raw(struct.pack(">Q", rec.RAM_SAVE_FLAG_MULTIFD_FLUSH))

    def command(self, cmd: int, data: bytes = b"") -> StreamBuilder:
        return self.raw(struct.pack(">BHH", rec.QEMU_VM_COMMAND, cmd, len(data)) + data)

    def eof(self) -> StreamBuilder:
        return self.raw(b"\x00")

    def vmdescription(self, text: bytes) -> StreamBuilder:
        return self.raw(bytes((rec.QEMU_VM_VMDESCRIPTION,)) + struct.pack(">I", len(text)) + text)

    def build(self) -> bytes:
        return b"".join(self.parts)


def page_bytes(seed: int, size: int = PAGE) -> bytes:
    """A deterministic, non-trivial page."""
    return (seed.to_bytes(4, "big") * (size // 4))[:size]


def typical_stream(pages: int = 6, footers: bool = True) -> bytes:
    """Header, configuration, RAM START/PART/END with pages, zero pages and CONTINUE, a FULL
    device section, EOF and VMDESCRIPTION: what QEMU sends, in miniature."""
    b = StreamBuilder().header().configuration()
    b.start(2, b"ram").mem_size([(b"pc.ram", 64 * PAGE), (b"pc.bios", 16 * PAGE)]).eos()
    if footers:
        b.footer(2)
    b.part(2)
    for i in range(pages):
        if i % 3 == 2:
            b.zero(b"pc.ram", i * PAGE, cont=i > 0)
        else:
            b.page(b"pc.ram", i * PAGE, page_bytes(i), cont=i > 0)
    b.page(b"pc.bios", 0, page_bytes(99)).zero(b"pc.bios", PAGE, cont=True).eos()
    if footers:
        b.footer(2)
    b.command(rec.MIG_CMD_SWITCHOVER_START)
    b.end(2).page(b"pc.bios", 2 * PAGE, page_bytes(7), cont=True).multifd_flush().eos()
    if footers:
        b.footer(2)
    b.full(3, b"timer", b"\x00" * 12 + b"\x7e\x01\x02")
    return b.eof().vmdescription(b'{"page_size": 4096, "devices": []}').build()


# ---- synthetic multifd channels ----------------------------------------------------------------
def multifd_init(channel_id: int = 0, uuid: bytes = bytes(16)) -> bytes:
    return (struct.pack(">II", rec.MULTIFD_MAGIC, rec.MULTIFD_VERSION) + uuid + bytes((channel_id,))
            + bytes(39))


def multifd_packet(block: bytes, normal: Sequence[tuple[int, bytes]], zero: Sequence[int] = (),
                   *, flags: int = 0, packet_num: int = 1, page_count: int = 128,
                   stale_offsets: bool = True, qemu72: bool = False) -> bytes:
    """A RAM packet: header (with stale offsets past the used ones, as QEMU leaves them) and
    the normal pages. ``qemu72`` writes the 7.2 layout (no zero_pages field, zero unused[])."""
    offsets = [off for off, _ in normal] + list(zero)
    head = struct.pack(">IIIIIIQ", rec.MULTIFD_MAGIC, rec.MULTIFD_VERSION, flags, page_count,
                       len(normal), len(normal) * PAGE, packet_num)
    head += bytes(32) if qemu72 else struct.pack(">I", len(zero)) + bytes(28)
    head += block.ljust(256, b"\0")
    table = [struct.pack(">Q", off) for off in offsets]
    filler = struct.pack(">Q", 0xDEAD000) if stale_offsets else bytes(8)
    table += [filler] * (page_count - len(offsets))
    return head + b"".join(table) + b"".join(data for _, data in normal)


def multifd_device_state(idstr: bytes, data: bytes, instance: int = 0) -> bytes:
    head = struct.pack(">III", rec.MULTIFD_MAGIC, rec.MULTIFD_VERSION,
                       rec.MULTIFD_FLAG_DEVICE_STATE)
    return (head + idstr.ljust(256, b"\0") + struct.pack(">II", instance, len(data)) + data)


def typical_multifd(qemu72: bool = False) -> bytes:
    p = [(i * PAGE, page_bytes(100 + i)) for i in range(5)]
    out = multifd_init(1)
    out += multifd_packet(b"pc.ram", p[:3], () if qemu72 else (40 * PAGE, 41 * PAGE),
                          qemu72=qemu72)
    out += multifd_packet(b"", [], flags=rec.MULTIFD_FLAG_SYNC, packet_num=2, qemu72=qemu72)
    out += multifd_packet(b"pc.ram", p[3:], packet_num=3, qemu72=qemu72)
    if not qemu72:
        out += multifd_device_state(b"0000:00:02.0/vfio", b"state" * 20)
    return out


# ---- real captures -------------------------------------------------------------------------
CAPTURE_FORMAT = 1  # bump to invalidate cached captures when the capture procedure changes
SCENARIOS = ("single", "multi", "multifd")
CAPTURES = [(q, s) for q in ("7.2", "10") for s in SCENARIOS]  # every (QEMU, scenario) pair


@dataclass(frozen=True)
class CaptureSpec:
    qemu: str  # "10" (system QEMU) or "7.2"
    scenario: str  # single: paused guest, one pass; multi: dirtying guest, >= 4 passes;
    #                multifd: 2 multifd channels, dirtying guest
    memory_mib: int = 64
    working_set_mib: int = 48
    dirty_mib_per_s: float = 8.0
    bandwidth: int = 16 << 20  # multi only: keeps QEMU iterating while the guest dirties

    def binary(self) -> QemuBinary:
        return QemuBinary.qemu72() if self.qemu == "7.2" else QemuBinary.system()

    def workload(self) -> WorkloadSpec:
        return WorkloadSpec(working_set_mib=self.working_set_mib,
                            dirty_mib_per_s=self.dirty_mib_per_s, seed=7)


@dataclass
class Capture:
    spec: CaptureSpec
    version: tuple[int, int, int]
    directory: Path
    info: dict[str, Any]  # the source's query-migrate at completion
    boot_args: list[str]
    channels: list[Path] = field(default_factory=list)  # in order of connection

    @property
    def main(self) -> Path:
        return self.directory / "main.bin"

    @property
    def multifd(self) -> list[Path]:
        return sorted(self.directory.glob("multifd-*.bin"))


class _Recorder:
    """Listens on a unix socket and records every connection to its own file."""

    def __init__(self, path: Path, out_dir: Path) -> None:
        self.path = path
        self.out_dir = out_dir
        self.files: list[Path] = []
        self._threads: list[threading.Thread] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            target = self.out_dir / f"conn-{len(self.files)}.bin"
            self.files.append(target)
            thread = threading.Thread(target=self._record, args=(conn, target), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _record(conn: socket.socket, target: Path) -> None:
        with conn, target.open("wb") as f:
            while chunk := conn.recv(1 << 20):
                f.write(chunk)

    def close(self, timeout: float = 30.0) -> list[Path]:
        self._stop.set()
        self._acceptor.join(timeout=5)
        self._sock.close()
        for thread in self._threads:
            thread.join(timeout=timeout)
            if thread.is_alive():
                raise RuntimeError(f"recording of {self.path} did not end")
        self.path.unlink(missing_ok=True)
        return list(self.files)


def _capture_key(spec: CaptureSpec, version: tuple[int, int, int]) -> str:
    v = ".".join(map(str, version))
    return (f"qemu{v}-{spec.scenario}-m{spec.memory_mib}-ws{spec.working_set_mib}"
            f"-d{spec.dirty_mib_per_s:g}-bw{spec.bandwidth >> 20}-f{CAPTURE_FORMAT}")


def load_or_capture(spec: CaptureSpec, images: GuestImages, scratch: Path) -> Capture:
    """The cached capture for ``spec``, made first if missing."""
    binary = spec.binary()
    version = binary.version()
    key = _capture_key(spec, version)
    final = cache_dir() / "captures" / key
    meta = final / "meta.json"
    if not meta.exists():
        work = scratch / key
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        info, boot_args, files = _capture(spec, binary, images, work)
        out = work / "out"
        out.mkdir()
        for i, path in enumerate(_order_channels(files)):
            name = "main.bin" if i == 0 else f"multifd-{i - 1}.bin"
            path.rename(out / name)
        (out / "meta.json").write_text(json.dumps(
            {"info": info, "boot_args": boot_args, "version": version}, indent=1))
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
        shutil.rmtree(work, ignore_errors=True)
    loaded = json.loads(meta.read_text())
    return Capture(spec, tuple(loaded["version"]), final, loaded["info"],
                   loaded["boot_args"])


def _order_channels(files: list[Path]) -> list[Path]:
    """Main channel first (by its magic), then the multifd channels by channel id."""
    def key(path: Path) -> tuple[int, int]:
        head = path.read_bytes()[:25] if path.stat().st_size else b""
        if head[:4] == b"QEVM":
            return (0, 0)
        return (1, head[24] if len(head) > 24 else 255)
    return sorted(files, key=key)


def _capture(spec: CaptureSpec, binary: QemuBinary, images: GuestImages, work: Path
             ) -> tuple[dict[str, Any], list[str], list[Path]]:
    reaper = Reaper(f"stream-capture-{os.getpid()}", state_root=work / "state")
    sock = work / "mig.sock"
    boot_args = guest_boot_args("baremetal", images, spec.workload())
    try:
        vm = GuestVM(reaper, "src", work, memory_mib=spec.memory_mib, boot_args=boot_args,
                     binary=binary)
        vm.start()
        log = SerialLog(vm.serial_path, is_alive=vm.running_process)
        log.wait_for_fill(timeout=120)
        caps: dict[str, bool] = {}
        params: dict[str, Any] = {"max-bandwidth": 1 << 40}
        if spec.scenario == "single":
            vm.qmp("stop")
        elif spec.scenario == "multi":
            params = {"max-bandwidth": spec.bandwidth, "downtime-limit": 1}
        elif spec.scenario == "multifd":
            caps = {"multifd": True}
            params["multifd-channels"] = 2
        vm.set_migration(capabilities=caps or None, parameters=params)
        recorder = _Recorder(sock, work)
        try:
            vm.qmp("migrate", uri=f"unix:{sock}")
            info = _wait_migration(vm, spec)
        finally:
            files = recorder.close()
        _quit(vm)
    finally:
        reaper.teardown()
    return info, boot_args, files


def _wait_migration(vm: GuestVM, spec: CaptureSpec, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    released = spec.scenario != "multi"
    while True:
        info = vm.query_migrate()
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"capture migration {status}: {info.get('error-desc')}")
        if not released and info.get("ram", {}).get("dirty-sync-count", 0) >= 4:
            # Enough passes with re-sent pages: let it converge.
            vm.set_migration(parameters={"max-bandwidth": 1 << 40, "downtime-limit": 2000})
            released = True
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                vm.qmp("migrate_cancel")
            raise RuntimeError(f"capture migration still {status} after {timeout} s")
        time.sleep(0.05)


def _quit(vm: GuestVM) -> None:
    """Quit QEMU; the reaper ends it by PID if QMP fails. (GuestVM.stop_process lets the EOF
    of QEMU closing its QMP socket on ``quit`` escape from ``close()``.)"""
    with contextlib.suppress(EOFError, OSError):
        vm.stop_process()


# ---- replay into a destination QEMU --------------------------------------------------------
@contextlib.contextmanager
def destination(capture: Capture, work: Path) -> Iterator[GuestVM]:
    reaper = Reaper(f"stream-replay-{os.getpid()}", state_root=work / "state")
    try:
        vm = GuestVM(reaper, "dst", work, memory_mib=capture.spec.memory_mib,
                     boot_args=capture.boot_args, binary=capture.spec.binary(),
                     incoming="defer")
        vm.start()
        yield vm
        _quit(vm)
    finally:
        reaper.teardown()


def replay(capture: Capture, channels: Sequence[bytes], work: Path, timeout: float = 120.0
           ) -> dict[str, Any]:
    """Feed ``channels`` (main first, then multifd) to a fresh destination QEMU over a unix
    socket; returns the destination's query-migrate once it completed (or failed)."""
    work.mkdir(parents=True, exist_ok=True)
    with destination(capture, work) as vm:
        return feed_channels(vm, channels, work / "in.sock", timeout)


def feed_channels(vm: GuestVM, channels: Sequence[bytes], sock_path: Path, timeout: float
                  ) -> dict[str, Any]:
    """Make ``vm`` (a destination started with ``incoming="defer"``) listen at ``sock_path``
    and send it ``channels``, main first; its query-migrate once completed or failed (status
    "timeout (...)" or "destination exited (...)" otherwise), with its stderr."""
    if len(channels) > 1:
        vm.set_migration(capabilities={"multifd": True},
                         parameters={"multifd-channels": len(channels) - 1})
    vm.qmp("migrate-incoming", uri=f"unix:{sock_path}")
    errors: list[BaseException] = []

    def send(sock: socket.socket, data: bytes) -> None:
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []
    try:
        for i, data in enumerate(channels):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path))
            socks.append(s)
            t = threading.Thread(target=send, args=(s, data), daemon=True)
            t.start()
            threads.append(t)
            if i == 0 and len(channels) > 1:
                time.sleep(0.3)  # QEMU 7.2 takes the first connection as the main one
        deadline = time.monotonic() + timeout
        while True:
            try:
                info: dict[str, Any] = vm.query_migrate()
            except GuestError:  # QEMU exits when an incoming migration fails
                time.sleep(0.2)
                info = {"status": f"destination exited ({vm.process and vm.process.poll()})"}
                break
            if info.get("status") in ("completed", "failed"):
                break
            if time.monotonic() > deadline:
                info["status"] = f"timeout ({info.get('status')})"
                break
            time.sleep(0.05)
        info["stderr"] = vm.stderr_text()
        for t in threads:
            t.join(timeout=10)
        info["send_errors"] = [repr(e) for e in errors]
        return info
    finally:
        for s in socks:
            s.close()
