"""``dwcp stream ...``: offline tools for QEMU migration streams (one channel per file).

* ``stats FILE``: pages, zero, duplicate, re-sent pages and bytes by kind, per iteration, of a
  raw QEMU stream (what the page codec would make of it) or of an encoded file;
* ``encode IN OUT``: a raw QEMU stream into the encoded container;
* ``decode IN OUT``: back, byte for byte.

Every failure is one line on stderr and exit status 1 (2 for a bad option); output is written
to a temporary file beside OUT and renamed only once everything was checked, so a failed run
leaves no OUT, and never a wrong one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

import click

from dwcp_migrate.errors import DwcpError

if TYPE_CHECKING:  # imported lazily at run time, so that `dwcp --help` stays fast
    from dwcp_migrate.codec import ChannelStats
    from dwcp_migrate.pagecodec import Compression, PageCodecConfig

CHUNK = 1 << 20  # read size: a socket-like chunking, and bounded memory


class StreamFileError(DwcpError):
    """A file given to ``dwcp stream`` cannot be read or written."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _fail(message: str) -> NoReturn:
    raise StreamFileError(" ".join(message.split()))


def _os_error(action: str, path: Path, exc: OSError) -> NoReturn:
    _fail(f"cannot {action} {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    try:
        f = path.open("rb")
    except OSError as exc:
        _os_error("read", path, exc)
    with f:
        yield f


def _chunks(f: BinaryIO, path: Path) -> Iterator[bytes]:
    while True:
        try:
            chunk = f.read(CHUNK)
        except OSError as exc:
            _os_error("read", path, exc)
        if not chunk:
            return
        yield chunk


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``, renamed to it only if the block succeeds."""
    if path.is_dir():
        _fail(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part",
                                   dir=path.parent if str(path.parent) else ".")
    except OSError as exc:
        _os_error("write", path, exc)
    done = False
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; OUT gets a new file's mode
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as exc:
        _os_error("write", path, exc)
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _compression(_ctx: click.Context, _param: click.Parameter, value: str) -> Compression:
    from dwcp_migrate.pagecodec import Compression

    try:
        return Compression.parse(value)
    except DwcpError as exc:
        raise click.BadParameter(_one_line(exc)) from None


def _classify(head: bytes, path: Path) -> str:
    """"encoded", "main" or "multifd"; anything else is refused."""
    from dwcp_migrate.codec.container import is_encoded
    from dwcp_migrate.stream import ChannelKind, classify_channel

    if is_encoded(head):
        return "encoded"
    kind = classify_channel(head)
    if kind is ChannelKind.MAIN:
        return "main"
    if kind is ChannelKind.MULTIFD:
        return "multifd"
    _fail(f"{path} is not a QEMU migration stream nor an encoded stream: it starts with "
          f"{head[:8]!r} (a main channel starts with b'QEVM', a multifd channel with "
          f"0x11223344)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.group()
def stream() -> None:
    """Offline tools for QEMU migration streams: stats, encode, decode.

    A file holds one channel: a QEMU main channel (as written by migrate to
    "exec:cat > FILE"), one multifd channel, or an encoded stream made by "dwcp stream
    encode".
    """


@stream.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--compression", default="lz4", show_default=True, callback=_compression,
              help="zstd:N (level -7..22), lz4 or none.")
@click.option("--batch-pages", type=click.IntRange(1, 65536), default=1024, show_default=True,
              help="Pages per encoded batch.")
@click.option("--cache-mib", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Page cache of encoder and decoder (kept in the file: the decoder needs "
                   "as much memory).")
def encode(input_path: Path, output_path: Path, compression: Compression, batch_pages: int,
           cache_mib: int) -> None:
    """Encode the raw QEMU stream IN into OUT (decode it back with "dwcp stream decode")."""
    from dwcp_migrate.codec import EncodedStreamWriter, StreamEncoder
    from dwcp_migrate.pagecodec import PageCodecConfig

    started = time.perf_counter()
    try:
        with _reading(input_path) as f:
            chunks = _chunks(f, input_path)
            head = next(chunks, b"")
            kind = _classify(head, input_path)
            if kind == "encoded":
                _fail(f"{input_path} is already encoded: decode it with dwcp stream decode")
            encoder = StreamEncoder(PageCodecConfig(cache_bytes=cache_mib << 20),
                                    compression=compression, batch_pages=batch_pages)
            writer = EncodedStreamWriter(encoder)
            with _writing(output_path) as out:
                out.write(writer.header())
                out.write(writer.feed(head))
                for chunk in chunks:
                    out.write(writer.feed(chunk))
                tail = writer.finish()
                if encoder.truncation is not None:
                    cut = encoder.truncation
                    _fail(f"{input_path} is a truncated QEMU stream ({cut.missing} at byte "
                          f"{cut.offset}); nothing written")
                out.write(tail)
                size = out.tell()
    except DwcpError as exc:
        _fail(_one_line(exc))
    stats = encoder.stats
    click.echo(f"encoded {input_path} ({kind} channel, {_mb(writer.stream_bytes)}, "
               f"{len(stats.iterations)} iterations) into {output_path}: {_mb(size)}, "
               f"{size / max(writer.stream_bytes, 1):.3f} of the stream, {compression}, "
               f"{time.perf_counter() - started:.1f} s")


@stream.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=Path))
def decode(input_path: Path, output_path: Path) -> None:
    """Decode the encoded stream IN into the exact QEMU stream OUT."""
    from dwcp_migrate.codec import EncodedStreamReader

    started = time.perf_counter()
    try:
        with _reading(input_path) as f:
            chunks = _chunks(f, input_path)
            head = next(chunks, b"")
            if len(head) >= 4 and _classify(head, input_path) != "encoded":
                _fail(f"{input_path} is a raw QEMU migration stream, not an encoded one: "
                      f"encode it with dwcp stream encode")
            with _writing(output_path) as out:
                reader = EncodedStreamReader()
                for chunk in _prepend(head, chunks):
                    for batch in reader.feed(chunk):
                        out.write(batch.data)
                reader.finish()
    except DwcpError as exc:
        _fail(_one_line(exc))
    click.echo(f"decoded {input_path} into {output_path}: {_mb(reader.stream_bytes)} checked, "
               f"{time.perf_counter() - started:.1f} s")


@stream.command()
@click.argument("path", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--compression", default="lz4", show_default=True, callback=_compression,
              help="For a raw stream: the compression to try (an encoded file says its own).")
@click.option("--cache-mib", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="For a raw stream: the page cache to try.")
@click.option("--json", "as_json", is_flag=True, help="All counters as JSON.")
def stats(path: Path, compression: Compression, cache_mib: int, as_json: bool) -> None:
    """Pages, zero, duplicate and re-sent pages, bytes by kind, per iteration.

    FILE is a raw QEMU stream (then it is encoded in memory, to show what dwcp would send)
    or an encoded file (then it is decoded and checked).
    """
    from dwcp_migrate.pagecodec import PageCodecConfig

    try:
        with _reading(path) as f:
            chunks = _chunks(f, path)
            head = next(chunks, b"")
            kind = _classify(head, path)
            if kind == "encoded":
                result, wire = _stats_encoded(head, chunks)
                what = "encoded stream"
            else:
                config = PageCodecConfig(cache_bytes=cache_mib << 20)
                result, wire = _stats_raw(path, head, chunks, config, compression)
                what = f"raw QEMU stream, encoded in memory with {compression}"
    except DwcpError as exc:
        _fail(_one_line(exc))
    if as_json:
        click.echo(json.dumps({"file": str(path), "what": what, "encoded_bytes": wire,
                               **result.as_dict()}, indent=1))
        return
    _print_stats(path, what, result, wire)


def _stats_raw(path: Path, head: bytes, chunks: Iterator[bytes], config: PageCodecConfig,
               compression: Compression) -> tuple[ChannelStats, int]:
    from dwcp_migrate.codec import StreamEncoder

    encoder = StreamEncoder(config, compression=compression)
    wire = len(encoder.session_header)
    for chunk in _prepend(head, chunks):
        wire += sum(map(len, encoder.feed(chunk)))
    wire += sum(map(len, encoder.finish()))
    if encoder.truncation is not None:
        cut = encoder.truncation
        _fail(f"{path} is a truncated QEMU stream ({cut.missing} at byte {cut.offset})")
    return encoder.stats, wire


def _stats_encoded(head: bytes, chunks: Iterator[bytes]) -> tuple[ChannelStats, int]:
    from dwcp_migrate.codec import DecodedStreamStats, EncodedStreamReader

    reader = EncodedStreamReader()
    collector: DecodedStreamStats | None = None
    wire = 0
    for chunk in _prepend(head, chunks):
        wire += len(chunk)
        for batch in reader.feed(chunk):
            if collector is None:
                assert reader.decoder is not None
                collector = DecodedStreamStats(reader.decoder.codec.config.page_size)
            collector.add(batch)
    reader.finish()
    if collector is None:
        collector = DecodedStreamStats()
    return collector.finish(), wire


def _prepend(head: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from chunks


def _print_stats(path: Path, what: str, result: ChannelStats, wire: int) -> None:
    total = result.total()
    click.echo(f"{path}: {what}; {result.kind} channel, {_mb(total.stream_bytes)} of QEMU "
               f"stream, {_mb(wire)} encoded ({wire / max(total.stream_bytes, 1):.3f})")
    head = (f"{'iter':>4} {'stream MB':>10} {'pages':>8} {'zero':>8} {'dup':>7} {'delta':>7} "
            f"{'literal':>8} {'re-sent':>8} {'opaque KB':>10} {'sent MB':>9}")
    click.echo(head)
    for it in [*result.iterations, total]:
        c = it.codec
        label = str(it.number) if it.number else "all"
        click.echo(f"{label:>4} {it.stream_bytes / 1e6:10.2f} {it.pages:8d} "
                   f"{c.zero.count + it.header_zero_pages:8d} {c.ref.count:7d} "
                   f"{c.delta.count:7d} {c.literal.count:8d} {it.resent:8d} "
                   f"{it.opaque_bytes / 1e3:10.1f} {c.wire_bytes / 1e6:9.2f}")
    click.echo("by kind (all iterations): items, bytes in -> bytes out before compression")
    for name, k in total.codec.kinds().items():
        click.echo(f"  {name:8s} {k.count:9d} {_mb(k.bytes_in):>11} -> {_mb(k.bytes_out):>11}")
    click.echo(f"  metadata {'':9s} {'':>11}    {_mb(total.codec.metadata_bytes):>11}; "
               f"after compression and framing: {_mb(total.codec.wire_bytes)}")
    if total.header_zero_pages:
        click.echo(f"  (zero includes {total.header_zero_pages} zero pages that QEMU listed in "
                   f"multifd packet headers; they carry no data)")


__all__ = ["stream"]
