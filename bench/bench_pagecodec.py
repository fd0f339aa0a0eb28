"""Speed and size of the page codec (dwcp_migrate.pagecodec) beside plain zstd-1 and lz4.

Usage: ``python bench/bench_pagecodec.py [--mib 64] [--iterations 5] [--batch 256]
[--repeat 3] [--capture FILE] [--compression lz4 zstd:1 ...] [--pipeline]``

The synthetic workload is shaped like the test guests' (``testbed/csrc/pages.c``): a quarter
each zero, text-like (log lines; a quarter of them drawn from a pool of 16 identical pages),
low-entropy (records, runs of small numbers, sparse pointers) and random pages, 10% of all
pages exact copies of another. The first iteration sends every page; each later one re-sends a
shrinking dirty set, 90% of it with a handful of bytes changed in place (a counter, a
timestamp), 10% rewritten whole. It is turned into items the way the stream layer will: every
page is a PageItem (QEMU's zero pages included, as 4 KiB of zeros), section framing is opaque.

Speeds are MB/s of *stream* bytes (what QEMU writes: 9 bytes per zero page, 8 + 4096 per
normal page) per CPU second of the one thread doing the work, best of ``--repeat``; "raw"
sizes are of that stream. ``--capture`` runs a real QEMU migration stream through
dwcp_migrate.stream's parser first (needs the stream codec; the page codec itself does not).
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lz4.block  # type: ignore[import-untyped]
import numpy as np
import zstandard

from dwcp_migrate.pagecodec import (
    Compression,
    Item,
    OpaqueItem,
    PageCodecConfig,
    PageDecoder,
    PageEncoder,
    PageItem,
)
from dwcp_migrate.pagecodec.delta import find_deltas

PAGE = 4096
BLOCK = b"pc.ram"
WORDS = (
    "request", "user", "session", "cache", "miss", "hit", "timeout", "retry", "connection",
    "closed", "opened", "worker", "queue", "job", "started", "finished", "error", "warning", "ok",
    "latency", "bytes", "sent", "received", "table", "index", "commit", "rollback", "select",
    "update", "insert", "delete", "from", "where", "order", "customer", "invoice", "payment",
    "shipment", "token", "refresh", "login", "logout", "health", "check", "backend", "frontend",
    "upstream", "config", "reload", "signal", "memory", "disk", "network", "packet", "dropped",
    "accepted", "the", "a", "for", "with", "and", "to", "in", "of",
)
SERVICES = ("nginx", "postgres", "redis", "app", "sshd", "cron", "kernel", "worker")
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR", "INFO", "DEBUG")


def text_page(rng: random.Random) -> bytes:
    day, ts, us, host = rng.randrange(1, 29), rng.randrange(86000), rng.randrange(10**6), \
        rng.randrange(32)
    lines: list[str] = []
    size = 0
    while size < PAGE:
        ts += rng.randrange(3)
        us = (us + rng.randrange(300000)) % 1000000
        k = rng.randrange(8)
        words = " ".join(rng.choice(WORDS) for _ in range(3 + rng.randrange(8)))
        tail = f" id={rng.randrange(100000)}" if rng.randrange(2) else ""
        line = (f"2025-06-{day:02d}T{ts // 3600 % 24:02d}:{ts // 60 % 60:02d}:{ts % 60:02d}."
                f"{us:06d}Z host-{host:02d} {SERVICES[k]}[{100 + k * 997}]: "
                f"{LEVELS[rng.randrange(8)]} {words}{tail}\n")
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:PAGE]


def lowent_page(rng: random.Random) -> bytes:
    w = np.zeros(PAGE // 4, np.uint32)
    style = rng.randrange(3)
    if style == 0:
        base, flags = rng.getrandbits(16), rng.randrange(4) << 16
        n = PAGE // 16
        w[0::4] = base + np.arange(n)
        w[1::4] = np.array([rng.randrange(4) for _ in range(n)], np.uint32) | flags
        w[2::4] = np.array([rng.randrange(16) for _ in range(n)], np.uint32)
    elif style == 1:
        i = 0
        while i < len(w):
            run = 1 + rng.randrange(16)
            w[i:i + run] = rng.randrange(256) >> rng.randrange(8)
            i += run
    else:
        i = rng.randrange(16) & ~1
        while i + 1 < len(w):
            w[i] = 0x88800000 | (rng.getrandbits(32) & 0x000FFFC0)
            w[i + 1] = 0xFFFF8880
            i += 2 * (4 + rng.randrange(28))
    return w.tobytes()


def modify_small(rng: random.Random, page: bytes, kind: int) -> bytes:
    """The guest's in-place changes (pages.c ``wl_modify_small``)."""
    p = bytearray(page)
    if kind == 0:
        return page  # zeros written over zeros
    if kind == 1:
        at = rng.randrange(PAGE - 16)
        stamp = str(10**9 + rng.randrange(10**9)).encode()
        p[at:at + 10] = stamp
        at += 10 + 1 + rng.randrange(4)
        p[at:at + 4] = f"{rng.randrange(10000):04d}".encode()[:max(0, PAGE - at)]
        del p[PAGE:]
    elif kind == 2:
        w = np.frombuffer(p, np.uint32)
        w[rng.randrange(PAGE // 4)] += 1
        o = rng.randrange(PAGE // 8) * 2
        w[o] = rng.getrandbits(20)
        w[o + 1] = 0x00010000 | rng.randrange(256)
    else:
        o = rng.randrange(PAGE // 4 - 3) * 4
        p[o:o + 12] = rng.randbytes(12)
    return bytes(p)


@dataclass
class Workload:
    name: str
    batches: list[list[Item]]
    stream_bytes: bytes  # the QEMU-like stream the items stand for (for the baselines)


def synthetic(mib: int, iterations: int, batch: int, seed: int = 7) -> Workload:
    rng = random.Random(seed)
    n = mib * 256
    pool = [text_page(rng) for _ in range(16)]
    kinds = [rng.randrange(4) for _ in range(n)]
    pages: list[bytes] = []
    for i, k in enumerate(kinds):
        if i and rng.randrange(100) < 10:
            src = rng.randrange(i)
            kinds[i] = kinds[src]
            pages.append(pages[src])
        elif k == 0:
            pages.append(bytes(PAGE))
        elif k == 1:
            pages.append(rng.choice(pool) if rng.randrange(4) == 0 else text_page(rng))
        elif k == 2:
            pages.append(lowent_page(rng))
        else:
            pages.append(rng.randbytes(PAGE))
    fresh = {1: lambda: text_page(rng), 2: lambda: lowent_page(rng),
             3: lambda: rng.randbytes(PAGE), 0: lambda: bytes(PAGE)}
    items: list[Item] = []
    stream: list[bytes] = []
    dirty_share = 0.25
    for it in range(iterations):
        if it:
            dirty = sorted(rng.sample(range(n), int(n * dirty_share)))
            dirty_share /= 2
            for i in dirty:
                pages[i] = (fresh[kinds[i]]() if rng.randrange(100) < 10
                            else modify_small(rng, pages[i], kinds[i]))
        else:
            dirty = list(range(n))
        section = b"\x02" + it.to_bytes(4, "big")  # QEMU_VM_SECTION_PART + section id
        items.append(OpaqueItem(section))
        stream.append(section)
        for i in dirty:
            zero = pages[i] == bytes(PAGE)
            flags = 0x02 if zero else 0x08
            items.append(PageItem(BLOCK, i * PAGE, pages[i], flags))
            stream.append((i * PAGE | flags).to_bytes(8, "big"))
            stream.append(b"\0" if zero else pages[i])
        eos = (0x10).to_bytes(8, "big")
        items.append(OpaqueItem(eos))
        stream.append(eos)
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    return Workload(f"synthetic {mib} MiB x {iterations} iterations", batches, b"".join(stream))


def from_capture(path: Path, batch: int) -> Workload:
    from dwcp_migrate.stream import MainChannelParser, RamPage, ZeroPage, write_records

    data = path.read_bytes()
    parser = MainChannelParser()
    records = parser.feed(data) + parser.end_of_stream(strict=False)
    zero = bytes(PAGE)
    items: list[Item] = []
    for rec in records:
        if isinstance(rec, RamPage):
            items.append(PageItem(rec.block, rec.offset, rec.data, rec.flags))
        elif isinstance(rec, ZeroPage) and rec.fill == 0:
            items.append(PageItem(rec.block, rec.offset, zero, rec.flags))
        else:
            items.append(OpaqueItem(write_records([rec])))
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    return Workload(f"capture {path.parent.name}/{path.name}", batches, data)


def best_of(repeat: int, run: Callable[[], object],
            clock: Callable[[], float] = time.thread_time) -> float:
    """Least time of ``run`` over ``repeat`` runs: CPU time of this thread by default (the
    machine is shared; wall-clock time would measure the neighbours)."""
    best = float("inf")
    for _ in range(repeat):
        started = clock()
        run()
        best = min(best, clock() - started)
    return best


def bench_codec(work: Workload, how: Compression, repeat: int, pipeline: bool) -> None:
    config = PageCodecConfig(cache_bytes=512 << 20, compression=how)
    mb = len(work.stream_bytes) / 1e6
    encoded: list[bytes] = []

    def encode() -> None:
        enc = PageEncoder(config, session_id=1)
        encoded[:] = [enc.encode_batch(b) for b in work.batches]
        bench_codec.stats = enc.stats  # type: ignore[attr-defined]

    def decode() -> None:
        dec = PageDecoder(config)
        dec.accept_session_header(PageEncoder(config, session_id=1).session_header)
        for data in encoded:
            dec.decode_batch(data)

    def encode_pipelined() -> None:
        # The main thread prepares batch n+1 while a second thread compresses batch n.
        enc = PageEncoder(config, session_id=1)
        with ThreadPoolExecutor(1) as pool:
            futures = [pool.submit(enc.prepare_batch(b).finish) for b in work.batches]
            encoded[:] = [f.result() for f in futures]

    t_enc = best_of(repeat, encode)
    t_dec = best_of(repeat, decode)
    size = sum(map(len, encoded))
    stats = bench_codec.stats  # type: ignore[attr-defined]
    kinds = " ".join(f"{name} {k.count}" for name, k in stats.kinds().items())
    print(f"  hde {how!s:8s} {size / 1e6:8.2f} MB  {size / len(work.stream_bytes):6.3f} "
          f"of raw  encode {mb / t_enc:6.0f} MB/s  decode {mb / t_dec:6.0f} MB/s  [{kinds}]")
    if pipeline:
        t_wall = best_of(repeat, encode_pipelined, time.perf_counter)
        t_cpu = best_of(repeat, encode_pipelined, time.process_time)
        print(f"  {'':13s} encode with compression in a second thread: {mb / t_wall:6.0f} MB/s "
              f"wall-clock, {mb / t_cpu:6.0f} MB/s per CPU second of the process")


def bench_plain(work: Workload, repeat: int) -> dict[str, int]:
    data = work.stream_bytes
    mb = len(data) / 1e6
    sizes: dict[str, int] = {}
    chunk = 1 << 20  # per-batch compression, as a streaming agent would do it
    for name, fn in (
            ("zstd:1", zstandard.ZstdCompressor(level=1).compress),
            ("zstd:3", zstandard.ZstdCompressor(level=3).compress),
            ("lz4", lambda b: lz4.block.compress(b, store_size=False))):
        out: list[int] = []

        def run(fn: Callable[[bytes], bytes] = fn, out: list[int] = out) -> None:
            out[:] = [len(fn(data[i:i + chunk])) for i in range(0, len(data), chunk)]

        t = best_of(repeat, run)
        sizes[name] = sum(out)
        print(f"  plain {name:6s} {sum(out) / 1e6:8.2f} MB  {sum(out) / len(data):6.3f} of raw  "
              f"compress {mb / t:6.0f} MB/s  (1 MiB chunks)")
    return sizes


def bench_delta_methods(work: Workload, repeat: int) -> None:
    """Sparse runs (what the codec sends) against XOR + batch compression, on re-sent pages.

    Only pages that the codec sends as deltas are compared (a rewritten page goes literal).
    """
    last: dict[tuple[bytes, int], bytes] = {}
    pairs: list[tuple[bytes, bytes]] = []
    for batch in work.batches:
        for item in batch:
            if isinstance(item, PageItem):
                page = bytes(item.data)
                key = (item.block, item.offset)
                prev = last.get(key)
                if prev is not None and prev != page and page != bytes(PAGE):
                    pairs.append((page, prev))
                last[key] = page
    limit = PageCodecConfig().delta_limit
    small = find_deltas([p[0] for p in pairs], [p[1] for p in pairs], PAGE, limit).chosen
    pairs = [p for p, keep in zip(pairs, small.tolist(), strict=True) if keep]
    if not pairs:
        return
    n = len(pairs)
    groups = [([p[0] for p in pairs[i:i + 256]], [p[1] for p in pairs[i:i + 256]])
              for i in range(0, n, 256)]
    zc = zstandard.ZstdCompressor(level=1)
    sizes: dict[str, int] = {}

    def sparse(codec: str) -> None:
        raw = packed = 0
        for a, b in groups:
            d = find_deltas(a, b, PAGE, limit)
            blob = d.nruns.tobytes() + d.run_off.tobytes() + d.run_len.tobytes() + d.data
            raw += len(blob)
            packed += len(zc.compress(blob) if codec == "zstd"
                          else lz4.block.compress(blob, store_size=False))
        sizes["raw"], sizes[codec] = raw, packed

    def xor(codec: str) -> None:
        out = 0
        for a, b in groups:
            x = (np.frombuffer(b"".join(a), np.uint8) ^ np.frombuffer(b"".join(b), np.uint8)
                 ).tobytes()
            out += len(zc.compress(x) if codec == "zstd"
                       else lz4.block.compress(x, store_size=False))
        sizes["xor-" + codec] = out

    print(f"  re-sent pages sent as deltas: {n} (delta cost per page, batches of 256)")
    for codec in ("zstd", "lz4"):
        t_sparse = best_of(repeat, functools.partial(sparse, codec))
        t_xor = best_of(repeat, functools.partial(xor, codec))
        print(f"    {codec:4s}: sparse runs {sizes[codec] / n:5.1f} B/page "
              f"({sizes['raw'] / n:.1f} before compression) {t_sparse / n * 1e6:5.2f} us/page;"
              f"  XOR + {codec} {sizes['xor-' + codec] / n:5.1f} B/page "
              f"{t_xor / n * 1e6:5.2f} us/page")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="synthetic working set (MiB)")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="items per batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--capture", type=Path, action="append", default=[],
                    help="a captured QEMU main-channel stream (repeatable)")
    ap.add_argument("--compression", nargs="*", default=["lz4", "zstd:1", "zstd:3", "none"])
    ap.add_argument("--pipeline", action="store_true",
                    help="also time prepare_batch/finish overlapped on two threads")
    args = ap.parse_args(argv)
    works = [from_capture(p, args.batch) for p in args.capture]
    if not args.capture:
        works.append(synthetic(args.mib, args.iterations, args.batch))
    for work in works:
        pages = sum(isinstance(i, PageItem) for b in work.batches for i in b)
        print(f"{work.name}: {len(work.stream_bytes) / 1e6:.1f} MB of stream, {pages} pages, "
              f"{len(work.batches)} batches of {args.batch} items")
        bench_plain(work, args.repeat)
        for text in args.compression:
            bench_codec(work, Compression.parse(text), args.repeat, args.pipeline)
        bench_delta_methods(work, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
