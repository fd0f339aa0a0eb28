"""The memory-integrity test guests: the workload spec, the serial-log parser, the workload run
natively, and both guests booted under QEMU (TCG) filling, verifying and catching a corruption.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dwcp_migrate.errors import GuestError
from dwcp_migrate.paths import build_dir
from dwcp_migrate.testbed import guests
from dwcp_migrate.testbed.guests import (
    GuestImages,
    GuestKind,
    PageMix,
    SerialLog,
    WorkloadSpec,
    build_guests,
    guest_boot_args,
)

WORKLOAD_BINARY = "dwcp-guest-linux-workload"
RecordProperty = Callable[[str, object], None]


@pytest.fixture(scope="session")
def images() -> GuestImages:
    return build_guests(build_dir())


@contextmanager
def booted(tmp_path: Path, kind: GuestKind, images: GuestImages, spec: WorkloadSpec,
           memory_mib: int = 512) -> Iterator[tuple[SerialLog, float]]:
    """One QEMU guest, killed by its PID on the way out; yields its log and its start time."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 not found: run scripts/setup.sh")
    serial = tmp_path / f"{kind}.serial"
    argv = [qemu, "-accel", "tcg", "-m", str(memory_mib), "-nodefaults", "-display", "none",
            "-serial", f"file:{serial}", "-no-reboot", *guest_boot_args(kind, images, spec)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield SerialLog(serial, is_alive=lambda: proc.poll() is None), started
    finally:
        proc.kill()
        proc.wait(timeout=30)


def run_native(images: GuestImages, out_dir: Path, *params: str) -> SerialLog:
    """The Linux guest's workload run on this host (no VM), to a finite number of passes."""
    binary = images.linux_initrd.parent / WORKLOAD_BINARY
    done = subprocess.run([str(binary), *params], capture_output=True, timeout=120, check=False)
    out = out_dir / f"native-{len(list(out_dir.glob('native-*')))}.log"
    out.write_bytes(done.stdout)
    return SerialLog(out)


# ---- WorkloadSpec ----------------------------------------------------------------------------
def test_spec_cmdlines() -> None:
    spec = WorkloadSpec(working_set_mib=64, dirty_mib_per_s=0.5, mix=PageMix(10, 20, 30, 40),
                        dup_percent=5, rewrite_percent=20, seed=42, corrupt_after_passes=3)
    params = "ws=64 dirty=0.5 mix=10,20,30,40 dup=5 rewrite=20 seed=42 corrupt_after=3"
    assert spec.baremetal_cmdline() == params
    linux = spec.linux_cmdline()
    assert linux.startswith("console=ttyS0 ")
    assert "panic=-1" in linux.split()
    assert linux.endswith(" ".join(f"dwcp.{p}" for p in params.split()))
    assert WorkloadSpec(dirty_mib_per_s=8).guest_params()[1] == "dirty=8"
    assert "corrupt_after" not in WorkloadSpec().baremetal_cmdline()
    assert WorkloadSpec(working_set_mib=256).min_memory_mib("baremetal") < 300


def test_boot_args() -> None:
    imgs = GuestImages(Path("/b/bm.elf"), Path("/boot/vmlinuz"), Path("/b/initrd.gz"))
    spec = WorkloadSpec(working_set_mib=32)
    assert guest_boot_args("baremetal", imgs, spec) == [
        "-kernel", "/b/bm.elf", "-append", spec.baremetal_cmdline()]
    assert guest_boot_args("linux", imgs, spec) == [
        "-kernel", "/boot/vmlinuz", "-initrd", "/b/initrd.gz", "-append", spec.linux_cmdline()]


@pytest.mark.parametrize("kwargs", [
    {"working_set_mib": 0},
    {"working_set_mib": 70000},
    {"working_set_mib": 1.5},
    {"dirty_mib_per_s": -1},
    {"dirty_mib_per_s": float("nan")},
    {"dirty_mib_per_s": 0.0001},
    {"dirty_mib_per_s": 5000},
    {"mix": PageMix(50, 50, 50, 0)},
    {"mix": PageMix(-10, 50, 50, 10)},
    {"dup_percent": 101},
    {"rewrite_percent": -1},
    {"seed": -1},
    {"seed": 2**64},
    {"corrupt_after_passes": 0},
    {"working_set_mib": True},
], ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()))
def test_spec_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(GuestError, match="invalid workload"):
        WorkloadSpec(**kwargs)  # type: ignore[arg-type]


def test_build_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(GuestError, match=r"gcc not found.*setup\.sh"):
        build_guests(tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(guests, "BUSYBOX", tmp_path / "no-busybox")
    with pytest.raises(GuestError, match=r"busybox-static.*setup\.sh"):
        build_guests(tmp_path)
    monkeypatch.setattr(guests, "BUSYBOX", Path("/usr/bin/python3"))  # dynamically linked
    with pytest.raises(GuestError, match="dynamically linked"):
        build_guests(tmp_path)
    with pytest.raises(GuestError, match="no Linux kernel"):
        guests.find_linux_kernel(tmp_path)


def test_newest_kernel_is_chosen_by_version(tmp_path: Path) -> None:
    for version in ("6.1.0-9-amd64", "6.1.0-56-amd64", "5.10.0-30-amd64"):
        (tmp_path / f"vmlinuz-{version}").write_bytes(b"")
    assert guests.find_linux_kernel(tmp_path).name == "vmlinuz-6.1.0-56-amd64"


# ---- SerialLog -------------------------------------------------------------------------------
GOOD_LOG = (
    "SeaBIOS noise\r\n"
    "dwcp-guest: boot kind=baremetal clock=pit tsc_khz=2600000 mem_mib=511\n"
    "dwcp-guest: start kind=baremetal ws_mib=16 dirty_mib_s=8 mix=25,25,25,25 dup=0 rewrite=10"
    " seed=1 corrupt_after=1 passes=0 pages=4096\n"
    "dwcp-guest: memory ws_gpa=0x200000 ws_end=0x1200000 table_gpa=0x116000 mem_end=0x1ffe0000\n"
    "dwcp-guest: filled mib=16 pages=4096 zero=1 text=1 lowent=1 random=1 dup=0 ms=52"
    " digest=0xec329e9d5ac9e5a8\r\n"
    "[    3.141592] random: crng init done\n"
    "dwcp-guest: verify pass=1 pages=4096 dirtied_total=3 corrupt_total=0 ms=11 dirty_kib_s=8192"
    " at_ms=64\n"
    "dwcp-guest: selftest corrupted page=1685 gpa=0x895000 offset=3314 after_pass=1\n"
    "[    4.0] some kernel line dwcp-guest: CORRUPT page=1685 gpa=0x895000"
    " expected=0xb9d143ffb3101c3d got=0x95c9f3cf184c1ded pass=2 where=verify\n"
    "dwcp-guest: verify pass=2 pages=4096 dirtied_total=7 corrupt_total=1 ms=10 dirty_kib_s=8"
)


def test_serial_log_parses_lines_and_waits_for_complete_ones(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    log = SerialLog(path)
    assert not log.started  # no file yet
    path.write_bytes(GOOD_LOG.encode())
    assert log.started
    assert log.start_fields["ws_mib"] == "16"
    assert log.filled and log.fill_ms == 52
    assert log.digest == 0xEC329E9D5AC9E5A8
    assert log.verify_passes == 1  # the second verify line has no newline yet
    assert log.selftests == [{"page": "1685", "gpa": "0x895000", "offset": "3314",
                              "after_pass": "1"}]
    (bad,) = log.corruptions
    assert (bad.page, bad.gpa, bad.pass_number, bad.where) == (1685, 0x895000, 2, "verify")
    assert bad.expected == 0xB9D143FFB3101C3D and bad.got == 0x95C9F3CF184C1DED
    assert "page 1685" in str(bad)
    assert "(incomplete)" in log.tail()
    with path.open("ab") as f:
        f.write(b"1 at_ms=80\r\ndwcp-guest: verify pass=3 pag")
    latest = log.wait_for_passes(2, timeout=1)
    assert (latest.number, latest.corrupt_total, latest.dirty_kib_s) == (2, 1, 81)
    assert log.errors == [] and log.panics == []
    log.check()


def test_serial_log_counts_passes_of_a_log_that_starts_mid_run(tmp_path: Path) -> None:
    # A migration destination's log: the tail of a line, then passes numbered from the source.
    path = tmp_path / "dst.log"
    path.write_text("es=4096 dirtied_total=1 corrupt_total=0 ms=1\n"
                    "dwcp-guest: verify pass=41 pages=4096 dirtied_total=9 corrupt_total=0 ms=9\n")
    log = SerialLog(path)
    with pytest.raises(GuestError, match="2 verification passes"):
        log.wait_for_passes(2, timeout=0.3)
    assert not log.started and log.verify_passes == 1
    with path.open("a") as f:
        f.write("dwcp-guest: verify pass=42 pages=4096 dirtied_total=9 corrupt_total=0 ms=9\n")
    assert log.wait_for_passes(2, timeout=1).number == 42


@pytest.mark.parametrize(("text", "message"), [
    ("dwcp-guest: boot kind=linux\ndwcp-guest: error working set does not fit: needs 9 MiB\n",
     "does not fit"),
    ("dwcp-guest: boot kind=linux\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n",
     "panicked"),
    ("dwcp-guest: boot kind=baremetal\ndwcp-guest: start kind=baremetal\n"
     "dwcp-guest: boot kind=baremetal\n", "rebooted"),
    ("dwcp-guest: boot kind=baremetal\ndwcp-guest: start kind=baremetal ws_mib=1\n",
     "timed out after 0 s waiting for the working set"),
], ids=["error", "panic", "reboot", "timeout"])
def test_serial_log_raises_with_the_tail(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "serial.log"
    path.write_text(text)
    with pytest.raises(GuestError, match=message) as caught:
        SerialLog(path).wait_for_fill(timeout=0.2)
    assert "dwcp-guest: boot" in str(caught.value)  # the log's tail comes with the error


def test_serial_log_counts_a_mangled_corrupt_line_and_follows_a_truncated_file(
        tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_text("dwcp-guest: CORRUPT page=12 gpa=0x2[  9.1] noise expected=0x1 got=0x2\n"
                    "dwcp-guest: verify pass=1 pages=4096 dirtied_total=0 corrupt_total=1 ms=9\n")
    log = SerialLog(path)
    (bad,) = log.corruptions
    assert bad.page == -1 and "page=12" in bad.where
    path.write_text("dwcp-guest: boot kind=baremetal\n")  # a new VM on the same path
    assert log.verify_passes == 0 and log.corruptions == []
    log.check()


def test_serial_log_notices_a_dead_vm(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_text("dwcp-guest: boot kind=baremetal\n")
    with pytest.raises(GuestError, match="VM exited"):
        SerialLog(path, is_alive=lambda: False).wait_for_fill(timeout=30)


# ---- the workload on this host (no VM) -------------------------------------------------------
def test_native_workload_detects_and_locates_a_corruption(
        tmp_path: Path, images: GuestImages) -> None:
    log = run_native(images, tmp_path, "ws=16", "dirty=50", "dup=10", "seed=5",
                     "corrupt_after=2", "passes=4")
    assert log.errors == []
    (selftest,) = log.selftests
    (bad,) = log.corruptions
    assert bad.page == int(selftest["page"])
    assert bad.pass_number == 3
    assert [p.corrupt_total for p in log.passes] == [0, 0, 1, 1]
    assert log.passes[-1].dirtied_total > 0


def test_native_workload_is_deterministic_and_rejects_bad_parameters(
        tmp_path: Path, images: GuestImages) -> None:
    common = ("ws=8", "dup=20", "passes=1")
    a = run_native(images, tmp_path, *common, "seed=9", "mix=10,30,30,30")
    b = run_native(images, tmp_path, *common, "seed=9", "mix=10:30:30:30", "ignored-token")
    c = run_native(images, tmp_path, *common, "seed=10", "mix=10,30,30,30")
    assert a.digest is not None and a.digest == b.digest != c.digest
    for bad in (["dirty=1"], ["ws=8", "mix=50,50"], ["ws=8", "colour=blue"], ["ws=8", "dup=x"],
                ["ws=8", "dirty=1.2345"], ["ws=0"]):
        log = run_native(images, tmp_path, *bad)
        assert len(log.errors) == 1, (bad, log.tail())
        assert not log.filled


# ---- booted guests ---------------------------------------------------------------------------
@pytest.mark.guest
def test_baremetal_fills_256_mib_and_verifies(
        tmp_path: Path, images: GuestImages, record_property: RecordProperty) -> None:
    spec = WorkloadSpec(working_set_mib=256, dirty_mib_per_s=8, dup_percent=10, seed=1)
    with booted(tmp_path, "baremetal", images, spec) as (log, started):
        log.wait_for_start(timeout=30)
        boot_s = time.monotonic() - started
        fill_ms = log.wait_for_fill(timeout=120)
        filled_s = time.monotonic() - started
        latest = log.wait_for_passes(2, timeout=120)
    print(f"\nbare-metal 256 MiB: workload started {boot_s:.2f} s after launch, "
          f"filled in {fill_ms} ms (guest clock), {filled_s:.2f} s after launch; "
          f"verify pass {latest.ms} ms")
    record_property("boot_s", round(boot_s, 2))
    record_property("fill_ms", fill_ms)
    assert latest.pages == 256 * 256
    assert latest.corrupt_total == 0 and log.corruptions == []
    assert latest.dirtied_total > 0
    # Same parameters, same pages: the bare-metal digest equals the native one.
    native = run_native(images, tmp_path, *spec.guest_params(), "passes=1")
    assert log.digest == native.digest


@pytest.mark.guest
def test_baremetal_selftest_corruption_is_detected_at_the_right_page(
        tmp_path: Path, images: GuestImages) -> None:
    spec = WorkloadSpec(working_set_mib=64, dirty_mib_per_s=4, seed=3, corrupt_after_passes=2)
    with booted(tmp_path, "baremetal", images, spec, memory_mib=128) as (log, _):
        bad = log.wait_for_corruption(timeout=120)
        log.wait_for_passes(4, timeout=60)
        memory = next(line for line in log.lines if line.event == "memory").fields
    (selftest,) = log.selftests
    assert bad.page == int(selftest["page"])
    assert bad.gpa == int(selftest["gpa"], 0) == int(memory["ws_gpa"], 0) + bad.page * 4096
    assert bad.pass_number == 3 and bad.expected != bad.got
    assert len(log.corruptions) == 1  # reported once, not once per pass
    assert [p.corrupt_total for p in log.passes[:4]] == [0, 0, 1, 1]


@pytest.mark.guest
def test_baremetal_refuses_a_working_set_that_does_not_fit(
        tmp_path: Path, images: GuestImages) -> None:
    spec = WorkloadSpec(working_set_mib=600)
    with booted(tmp_path, "baremetal", images, spec) as (log, _), \
            pytest.raises(GuestError, match="does not fit"):
        log.wait_for_fill(timeout=60)


@pytest.mark.guest
def test_linux_guest_fills_verifies_and_detects(
        tmp_path: Path, images: GuestImages, record_property: RecordProperty) -> None:
    spec = WorkloadSpec(working_set_mib=128, dirty_mib_per_s=8, seed=1, corrupt_after_passes=3)
    with booted(tmp_path, "linux", images, spec) as (log, started):
        log.wait_for_start(timeout=180)
        boot_s = time.monotonic() - started
        fill_ms = log.wait_for_fill(timeout=180)
        clean = log.wait_for_passes(3, timeout=120)
        bad = log.wait_for_corruption(timeout=60)
    print(f"\nLinux 128 MiB: workload started {boot_s:.2f} s after launch, "
          f"filled in {fill_ms} ms (guest clock); verify pass {clean.ms} ms")
    record_property("boot_s", round(boot_s, 2))
    record_property("fill_ms", fill_ms)
    assert [p.corrupt_total for p in log.passes[:3]] == [0, 0, 0]
    (selftest,) = log.selftests
    assert bad.page == int(selftest["page"]) and bad.pass_number == 4
    assert bad.gpa is not None and bad.gpa == int(selftest["gpa"], 0)
    assert len(log.corruptions) == 1
    native = run_native(images, tmp_path, *spec.guest_params(), "passes=1")
    assert log.digest == native.digest
