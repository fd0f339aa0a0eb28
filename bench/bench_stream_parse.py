"""Parse speed of the stream codec on real captures.

Usage: ``python bench/bench_stream_parse.py [FILE ...] [--chunk BYTES] [--repeat N]``.
Without files it takes the biggest main-channel capture and the biggest multifd channel under
``cache_dir()/captures`` (``tests/test_stream_codec.py`` makes them). The stream is read into
memory first and fed in chunks (256 KiB by default, like socket reads), so the numbers are the
codec's own: records/s and MB/s of stream, for parsing alone and for parse + write back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dwcp_migrate.paths import cache_dir
from dwcp_migrate.stream import (
    MainChannelParser,
    MultifdChannelParser,
    Record,
    write_records,
)


def _biggest(pattern: str) -> Path | None:
    files = list((cache_dir() / "captures").glob(pattern))
    return max(files, key=lambda p: p.stat().st_size) if files else None


def _parse(data: bytes, chunk: int, multifd: bool) -> list[Record]:
    parser = MultifdChannelParser() if multifd else MainChannelParser()
    out: list[Record] = []
    feed = parser.feed
    for pos in range(0, len(data), chunk):
        out += feed(data[pos:pos + chunk])
    return out + parser.end_of_stream(strict=False)


def bench(path: Path, chunk: int, repeat: int) -> None:
    data = path.read_bytes()
    multifd = data[:4] != b"QEVM"
    best_parse = best_both = float("inf")
    records: list[Record] = []
    for _ in range(repeat):
        started = time.perf_counter()
        records = _parse(data, chunk, multifd)
        parsed = time.perf_counter()
        out = write_records(records)
        done = time.perf_counter()
        assert out == data, "round trip differs"
        best_parse = min(best_parse, parsed - started)
        best_both = min(best_both, done - started)
    mb = len(data) / 1e6
    print(f"{path.parent.name}/{path.name}: {mb:.1f} MB, {len(records)} records, "
          f"chunk {chunk} B")
    print(f"  parse        {len(records) / best_parse / 1e6:6.2f} M records/s "
          f"{mb / best_parse:8.0f} MB/s  ({best_parse * 1e3:.1f} ms)")
    print(f"  parse+write  {len(records) / best_both / 1e6:6.2f} M records/s "
          f"{mb / best_both:8.0f} MB/s  ({best_both * 1e3:.1f} ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    files: list[Path] = list(args.files)
    if not files:
        files = [p for p in (_biggest("*/main.bin"), _biggest("*/multifd-*.bin")) if p]
    if not files:
        print("no captures: run tests/test_stream_codec.py first", file=sys.stderr)
        return 1
    for path in files:
        bench(path, args.chunk, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
