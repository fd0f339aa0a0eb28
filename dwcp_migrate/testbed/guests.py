"""The memory-integrity test guests: building them, booting arguments, reading their console.

Both guests run the same C workload core (``csrc/workload.c``, ``csrc/pages.c``): it fills a
working set with a realistic mix of pages (zero, text-like, low-entropy, random, exact
duplicates), keeps a 64-bit checksum per page in a table outside the working set, dirties pages
at a paced rate and keeps walking the whole set comparing every page with its checksum. It
reports on the serial console in lines starting with ``dwcp-guest:`` (formats in
``csrc/workload.c``), which :class:`SerialLog` parses. The same parameters give the same pages
on both guests, and the same ``digest`` on the ``filled`` line.

Where the working set lives:

* **bare-metal** (``csrc/baremetal``, a 32-bit multiboot v1 kernel, no paging, so every address
  is guest-physical): the program at 1 MiB, its 64 KiB stack in its .bss, the checksum table
  (8 bytes per page) from the next page boundary after the image, then the working set from the
  next 1 MiB boundary, in one contiguous run (``memory ws_gpa=0x200000 ws_end=...`` on the
  console; 0x200000 for working sets up to 468 MiB). It must end below the end of the
  RAM region holding 1 MiB, else the guest prints an error. Low memory (below 1 MiB) is unused.
* **linux** (``csrc/linux``, a static x86-64 program started by the initramfs ``/init``): the
  working set and the table are two anonymous mappings in the program; the kernel places their
  pages anywhere in guest RAM and may move them (THP compaction). CORRUPT lines carry the
  guest-physical address read from ``/proc/self/pagemap`` when the corruption is reported. The
  kernel and the initramfs (unpacked into RAM) take the rest: a 512 MiB VM has 427 MiB
  available, and the program refuses a working set that would leave less than 16 MiB of it.

A checksum catches torn or mixed-up pages, and stale pages too as long as the table page was
sent correctly (the table lives apart from the pages it covers); a page and its table entry both
stale from the same earlier moment look consistent: comparing RAM at switchover catches that.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import math
import os
import re
import shutil
import stat
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dwcp_migrate.errors import GuestError

GuestKind = Literal["baremetal", "linux"]

CSRC = Path(__file__).resolve().parent / "csrc"
BUSYBOX = Path("/bin/busybox")
BOOT_DIR = Path("/boot")
LINE_PREFIX = "dwcp-guest: "
SETUP_HINT = "run scripts/setup.sh"

_CORE = ("workload.c", "pages.c", "workload.h", "pages.h")
_BAREMETAL = ("baremetal/boot.S", "baremetal/main.c", "baremetal/link.ld")
_LINUX = ("linux/main.c",)
_COMMON_CFLAGS = ["-O2", "-fno-strict-aliasing", "-Wall", "-Wextra"]
_BAREMETAL_CFLAGS = [
    "-m32", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-fno-pie", "-no-pie",
    "-fno-stack-protector", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables",
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,--no-warn-rwx-segments",
]
_MULTIBOOT_MAGIC = 0x1BADB002


@dataclass(frozen=True)
class GuestImages:
    """What :func:`build_guests` made (the Linux kernel is the one in /boot)."""

    baremetal_kernel: Path
    linux_kernel: Path
    linux_initrd: Path


# ---- workload parameters ----------------------------------------------------------------------
@dataclass(frozen=True)
class PageMix:
    """Percent of zero, text-like, low-entropy and random pages; the four sum to 100."""

    zero: int = 25
    text: int = 25
    lowent: int = 25
    random: int = 25

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.zero, self.text, self.lowent, self.random)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.as_tuple())


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class WorkloadSpec:
    """What the guest workload does; raises :class:`GuestError` on nonsense.

    ``dup_percent`` of the pages are exact copies of another non-zero page (the mix applies to
    the others); ``rewrite_percent`` of the dirtying writes replace a whole page, the rest
    change a few bytes in place; ``corrupt_after_passes`` makes the guest corrupt one page
    itself after that many verification passes, to prove detection works.
    """

    working_set_mib: int = 256
    dirty_mib_per_s: float = 8.0
    mix: PageMix = field(default_factory=PageMix)
    dup_percent: int = 10
    rewrite_percent: int = 10
    seed: int = 1
    corrupt_after_passes: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.working_set_mib) or not 1 <= self.working_set_mib <= 65535:
            problems.append(f"working_set_mib must be 1..65535, not {self.working_set_mib!r}")
        rate = self.dirty_mib_per_s
        if (isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate)
                or not 0 <= rate <= 4096):
            problems.append(f"dirty_mib_per_s must be 0..4096, not {rate!r}")
        elif abs(rate * 1000 - round(rate * 1000)) > 1e-6:
            problems.append(f"dirty_mib_per_s takes at most 3 decimals, not {rate!r}")
        parts = self.mix.as_tuple() if isinstance(self.mix, PageMix) else None
        if parts is None or not all(_is_int(p) and 0 <= p <= 100 for p in parts):
            problems.append(f"mix must be a PageMix of percents 0..100, not {self.mix!r}")
        elif sum(parts) != 100:
            problems.append(f"mix percents must sum to 100, not {sum(parts)} ({self.mix})")
        for name in ("dup_percent", "rewrite_percent"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= 100:
                problems.append(f"{name} must be 0..100, not {value!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**64:
            problems.append(f"seed must be an integer 0..2**64-1, not {self.seed!r}")
        after = self.corrupt_after_passes
        if after is not None and (not _is_int(after) or not 1 <= after < 2**32):
            problems.append(f"corrupt_after_passes must be None or >= 1, not {after!r}")
        if problems:
            raise GuestError("invalid workload: " + "; ".join(problems))

    def guest_params(self) -> list[str]:
        """The workload's own key=value parameters, as the C core reads them."""
        rate = f"{self.dirty_mib_per_s:.3f}".rstrip("0").rstrip(".")
        params = [f"ws={self.working_set_mib}", f"dirty={rate}", f"mix={self.mix}",
                  f"dup={self.dup_percent}", f"rewrite={self.rewrite_percent}",
                  f"seed={self.seed}"]
        if self.corrupt_after_passes is not None:
            params.append(f"corrupt_after={self.corrupt_after_passes}")
        return params

    def baremetal_cmdline(self) -> str:
        return " ".join(self.guest_params())

    def linux_cmdline(self) -> str:
        return " ".join(["console=ttyS0", "quiet", "panic=-1",
                         *(f"dwcp.{p}" for p in self.guest_params())])

    def cmdline(self, kind: GuestKind) -> str:
        return self.baremetal_cmdline() if kind == "baremetal" else self.linux_cmdline()

    def min_memory_mib(self, kind: GuestKind) -> int:
        """Smallest VM that holds the working set (the guest itself has the last word)."""
        table = -(-self.working_set_mib * 2 // 1024)  # 8 bytes per 4 KiB page
        overhead = 4 if kind == "baremetal" else 128
        return self.working_set_mib + table + overhead


def guest_boot_args(kind: GuestKind, images: GuestImages, spec: WorkloadSpec) -> list[str]:
    """QEMU arguments for kernel, initrd and command line (the caller adds everything else)."""
    if kind == "baremetal":
        return ["-kernel", str(images.baremetal_kernel), "-append", spec.baremetal_cmdline()]
    if kind == "linux":
        return ["-kernel", str(images.linux_kernel), "-initrd", str(images.linux_initrd),
                "-append", spec.linux_cmdline()]
    raise GuestError(f"unknown guest kind {kind!r} (baremetal or linux)")


# ---- building -----------------------------------------------------------------------------------
def _version_key(path: Path) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p)
            for p in re.split(r"(\d+)", path.name) if p]


def find_linux_kernel(boot_dir: Path = BOOT_DIR) -> Path:
    """The newest ``vmlinuz-*`` in /boot (by version, not by date)."""
    kernels = sorted(boot_dir.glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise GuestError(f"no Linux kernel in {boot_dir} for the Linux test guest "
                         f"(apt-get install linux-image-amd64; {SETUP_HINT})")
    newest = kernels[-1]
    if not os.access(newest, os.R_OK):
        raise GuestError(f"{newest} is not readable: run the tests as root ({SETUP_HINT})")
    return newest


def _stale(output: Path, inputs: Sequence[Path]) -> bool:
    if not output.exists():
        return True
    built = output.stat().st_mtime
    return any(p.stat().st_mtime > built for p in inputs)


def _run_gcc(what: str, argv: list[str], hint: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestError(f"compiling {what} failed to run ({exc}); {SETUP_HINT}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
        raise GuestError(f"compiling {what} failed: {' '.join(argv)}\n{tail}\n{hint}")


def _check_multiboot(elf: Path) -> None:
    """QEMU only boots a 32-bit ELF whose header sits in the first 8 KiB: check both."""
    data = elf.read_bytes()
    if data[:5] != b"\x7fELF\x01":
        raise GuestError(f"{elf} is not a 32-bit ELF; QEMU's multiboot loader needs one")
    for off in range(0, min(len(data), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == _MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return
    raise GuestError(f"{elf} has no valid multiboot header in its first 8 KiB")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        is64 = head[4] == 2
        if is64:
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
        else:
            phoff, = struct.unpack_from("<I", head, 28)
            phentsize, phnum = struct.unpack_from("<HH", head, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


@dataclass(frozen=True)
class _CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _newc(entries: Sequence[_CpioEntry]) -> bytes:
    """A cpio "newc" archive, written here so that no mknod (nor cpio) is needed."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, _CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % v for v in fields) + name)
        pad()
        out.extend(entry.data)
        pad()
    return bytes(out)


def _initramfs(init: Path, workload: Path, busybox: Path) -> bytes:
    dirs = ["bin", "dev", "proc", "sys", "tmp", "sbin", "usr", "usr/bin", "usr/sbin"]
    entries = [_CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries += [
        # The kernel opens /dev/console for /init before anything is mounted.
        _CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _CpioEntry("init", stat.S_IFREG | 0o755, init.read_bytes()),
        _CpioEntry("workload", stat.S_IFREG | 0o755, workload.read_bytes()),
        _CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
    ]
    return gzip.compress(_newc(entries), compresslevel=6, mtime=0)


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    # Parallel pytest sessions and setup.sh may build at once; each output is also renamed
    # into place, so a reader never sees a half-written file.
    with (out_dir / ".guests.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_guests(out_dir: Path, *, force: bool = False) -> GuestImages:
    """Compile both guests and pack the Linux guest's initramfs into ``out_dir``.

    Outputs newer than their sources are kept. Raises :class:`GuestError` saying what is
    missing when a tool or input is absent.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestError(f"gcc not found: the test guests are compiled from C; {SETUP_HINT}")
    if not BUSYBOX.exists():
        raise GuestError(f"{BUSYBOX} not found (apt-get install busybox-static; {SETUP_HINT})")
    if not _is_static_elf(BUSYBOX):
        raise GuestError(f"{BUSYBOX} is dynamically linked, the initramfs has no libc "
                         f"(apt-get install busybox-static; {SETUP_HINT})")
    kernel = find_linux_kernel()
    missing = [p for p in (*_CORE, *_BAREMETAL, *_LINUX, "linux/init") if not (CSRC / p).exists()]
    if missing:
        raise GuestError(f"guest sources missing under {CSRC}: {', '.join(missing)} "
                         "(a broken installation: reinstall dwcp-migrate)")
    out_dir.mkdir(parents=True, exist_ok=True)
    this_file = Path(__file__).resolve()
    core = [CSRC / p for p in _CORE]
    baremetal = out_dir / "dwcp-guest-baremetal.elf"
    workload = out_dir / "dwcp-guest-linux-workload"
    initrd = out_dir / "dwcp-guest-linux-initramfs.cpio.gz"
    init = CSRC / "linux" / "init"
    with _build_lock(out_dir):
        bm_sources = [CSRC / p for p in _BAREMETAL]
        if force or _stale(baremetal, [*core, *bm_sources, this_file]):
            tmp = baremetal.with_name(baremetal.name + ".tmp")
            compile_units = [str(p) for p in bm_sources if p.suffix != ".ld"]
            compile_units += [str(CSRC / "workload.c"), str(CSRC / "pages.c")]
            _run_gcc("the bare-metal guest",
                     [gcc, *_BAREMETAL_CFLAGS, *_COMMON_CFLAGS,
                      "-T", str(CSRC / "baremetal" / "link.ld"), "-o", str(tmp),
                      *compile_units, "-lgcc"],
                     f"32-bit builds need gcc-multilib; {SETUP_HINT}")
            _check_multiboot(tmp)
            tmp.replace(baremetal)
        lx_sources = [CSRC / p for p in _LINUX]
        if force or _stale(workload, [*core, *lx_sources, this_file]):
            tmp = workload.with_name(workload.name + ".tmp")
            _run_gcc("the Linux guest's workload",
                     [gcc, "-static", *_COMMON_CFLAGS, "-o", str(tmp), *map(str, lx_sources),
                      str(CSRC / "workload.c"), str(CSRC / "pages.c")],
                     f"a static build needs libc6-dev; {SETUP_HINT}")
            tmp.replace(workload)
        if force or _stale(initrd, [workload, init, BUSYBOX, this_file]):
            tmp = initrd.with_name(initrd.name + ".tmp")
            tmp.write_bytes(_initramfs(init, workload, BUSYBOX))
            tmp.replace(initrd)
    return GuestImages(baremetal_kernel=baremetal, linux_kernel=kernel, linux_initrd=initrd)


# ---- the serial console -------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyPass:
    """One ``verify`` line: a complete walk over the working set."""

    number: int
    pages: int
    dirtied_total: int
    corrupt_total: int
    ms: int
    dirty_kib_s: int
    at_ms: int


@dataclass(frozen=True)
class Corruption:
    """One ``CORRUPT`` line: a page whose content no longer matches its checksum."""

    page: int  # -1 when the line could not be parsed (``where`` then holds its text)
    gpa: int | None
    expected: int
    got: int
    pass_number: int
    where: str

    def __str__(self) -> str:
        gpa = f"{self.gpa:#x}" if self.gpa is not None else "unknown"
        return (f"page {self.page} (gpa {gpa}) expected {self.expected:#018x} "
                f"got {self.got:#018x} in pass {self.pass_number} ({self.where})")


@dataclass(frozen=True)
class GuestLine:
    """Any ``dwcp-guest:`` line: its event word and its key=value fields."""

    event: str
    fields: dict[str, str]
    text: str


_PANIC_MARKERS = ("Kernel panic", "end Kernel panic")


def _int(value: str) -> int:
    return int(value, 0)


class SerialLog:
    """Reads a guest's serial log while it grows.

    Only complete lines are parsed; the ``dwcp-guest:`` prefix may follow kernel noise on the
    same line. Every property reads what was appended since the last look. A destination's log
    after a migration starts mid-run: it has no start or fill lines, and pass numbers continue
    from the source, which is why :meth:`wait_for_passes` counts the passes seen in this log.
    """

    def __init__(self, path: Path | str, *, is_alive: Callable[[], bool] | None = None) -> None:
        self.path = Path(path)
        self._is_alive = is_alive
        self._reset()

    def _reset(self) -> None:
        self._offset = 0
        self._partial = b""
        self._tail: deque[str] = deque(maxlen=60)
        self._lines: list[GuestLine] = []
        self._passes: list[VerifyPass] = []
        self._corruptions: list[Corruption] = []
        self._errors: list[str] = []
        self._panics: list[str] = []
        self._boots = 0
        self._start: GuestLine | None = None
        self._filled: GuestLine | None = None
        self._selftests: list[GuestLine] = []

    # ---- reading ---------------------------------------------------------------------------
    def refresh(self) -> None:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    # Truncated: a new VM writes to this path now; what it says is all that counts.
                    self._reset()
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        for raw in chunks:
            self._parse(raw.decode("utf-8", errors="replace").rstrip("\r"))

    def _parse(self, line: str) -> None:
        self._tail.append(line)
        if any(marker in line for marker in _PANIC_MARKERS):
            self._panics.append(line)
        at = line.find(LINE_PREFIX)
        if at < 0:
            return
        body = line[at + len(LINE_PREFIX):].strip()
        event, _, rest = body.partition(" ")
        fields = dict(tok.split("=", 1) for tok in rest.split() if "=" in tok)
        parsed = GuestLine(event, fields, body)
        self._lines.append(parsed)
        try:
            self._record(parsed, rest)
        except (KeyError, ValueError):
            # Mangled by interleaved kernel output. A corruption must still count as one.
            self._tail.append(f"(unparsed) {line}")
            if event == "CORRUPT":
                self._corruptions.append(Corruption(-1, None, 0, 0, 0, "unparsed: " + body))

    def _record(self, line: GuestLine, rest: str) -> None:
        f = line.fields
        if line.event == "error":
            self._errors.append(rest)
        elif line.event == "boot":
            self._boots += 1
        elif line.event == "start":
            self._start = line
        elif line.event == "filled":
            _int(f["ms"])
            self._filled = line
        elif line.event == "verify":
            self._passes.append(VerifyPass(
                number=_int(f["pass"]), pages=_int(f["pages"]),
                dirtied_total=_int(f["dirtied_total"]), corrupt_total=_int(f["corrupt_total"]),
                ms=_int(f["ms"]), dirty_kib_s=_int(f.get("dirty_kib_s", "0")),
                at_ms=_int(f.get("at_ms", "0"))))
        elif line.event == "CORRUPT":
            gpa = f.get("gpa", "none")
            self._corruptions.append(Corruption(
                page=_int(f["page"]), gpa=None if gpa == "none" else _int(gpa),
                expected=_int(f["expected"]), got=_int(f["got"]),
                pass_number=_int(f.get("pass", "0")), where=f.get("where", "verify")))
        elif line.event == "selftest":
            self._selftests.append(line)

    # ---- what the guest said -----------------------------------------------------------------
    @property
    def lines(self) -> list[GuestLine]:
        """Every ``dwcp-guest:`` line so far, parsed into event and fields."""
        self.refresh()
        return list(self._lines)

    @property
    def started(self) -> bool:
        self.refresh()
        return self._start is not None

    @property
    def start_fields(self) -> dict[str, str]:
        self.refresh()
        return dict(self._start.fields) if self._start else {}

    @property
    def filled(self) -> bool:
        self.refresh()
        return self._filled is not None

    @property
    def fill_ms(self) -> int | None:
        """Milliseconds from the start line to the end of the fill, by the guest's clock."""
        self.refresh()
        return _int(self._filled.fields["ms"]) if self._filled else None

    @property
    def digest(self) -> int | None:
        """Hash of all page checksums after the fill: equal for equal parameters."""
        self.refresh()
        return _int(self._filled.fields["digest"]) if self._filled else None

    @property
    def verify_passes(self) -> int:
        """How many verify lines this log holds."""
        self.refresh()
        return len(self._passes)

    @property
    def passes(self) -> list[VerifyPass]:
        self.refresh()
        return list(self._passes)

    @property
    def latest_pass(self) -> VerifyPass | None:
        self.refresh()
        return self._passes[-1] if self._passes else None

    @property
    def corruptions(self) -> list[Corruption]:
        self.refresh()
        return list(self._corruptions)

    @property
    def errors(self) -> list[str]:
        self.refresh()
        return list(self._errors)

    @property
    def panics(self) -> list[str]:
        self.refresh()
        return list(self._panics)

    @property
    def selftests(self) -> list[dict[str, str]]:
        """Fields of each ``selftest corrupted`` line (page, gpa, offset, after_pass)."""
        self.refresh()
        return [dict(line.fields) for line in self._selftests]

    def tail(self, n: int = 25) -> str:
        self.refresh()
        lines = list(self._tail)[-n:]
        if self._partial:
            lines.append(self._partial.decode("utf-8", errors="replace") + " (incomplete)")
        return "\n".join(lines)

    # ---- waiting ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`GuestError` if the guest reported an error, panicked or rebooted."""
        self.refresh()
        problem = None
        if self._errors:
            problem = f"the guest reported an error: {self._errors[0]}"
        elif self._panics:
            problem = f"the guest kernel panicked: {self._panics[0].strip()}"
        elif self._boots > 1:
            problem = f"the guest rebooted ({self._boots} boot lines)"
        if problem:
            raise GuestError(f"{problem}\n--- {self.path} (tail) ---\n{self.tail()}")

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll until ``done()``; raise :class:`GuestError` on a guest problem or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if done():
                return
            if self._is_alive is not None and not self._is_alive():
                self.refresh()
                if done():
                    return
                raise GuestError(f"the guest's VM exited while waiting for {what}\n"
                                 f"--- {self.path} (tail) ---\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise GuestError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 f"--- {self.path} (tail) ---\n{self.tail()}")
            time.sleep(0.1)

    def wait_for_start(self, timeout: float) -> None:
        self.wait_until(lambda: self.started, timeout, "the workload to start")

    def wait_for_fill(self, timeout: float) -> int:
        """Wait for the ``filled`` line; returns the fill time in ms (guest clock)."""
        self.wait_until(lambda: self.filled, timeout, "the working set to be filled")
        fill_ms = self.fill_ms
        assert fill_ms is not None
        return fill_ms

    def wait_for_passes(self, n: int, timeout: float) -> VerifyPass:
        """Wait until this log holds ``n`` verify lines; returns the latest."""
        self.wait_until(lambda: self.verify_passes >= n, timeout, f"{n} verification passes")
        latest = self.latest_pass
        assert latest is not None
        return latest

    def wait_for_corruption(self, timeout: float) -> Corruption:
        self.wait_until(lambda: bool(self.corruptions), timeout, "a CORRUPT line")
        return self.corruptions[0]
