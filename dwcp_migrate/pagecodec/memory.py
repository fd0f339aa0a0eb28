"""Memory of the page codec: the page caches, and the allocator's handling of batch buffers.

A batch makes a few buffers of about a batch's size (the payload, the compressed payload,
the framed batch; on the decoding side the decompressed payload and the stream bytes), all
freed again within the batch. glibc's malloc serves buffers that big from fresh mappings
(above its mmap threshold) or from the top of the heap, which it trims back to the kernel
once that much is free; either way every batch faulted its buffers in again: ~1000 page
faults per 4 MiB batch, 1.7 us each on the 2-core test VM, up to a fifth of the encoder's
time and a third of the decoder's. :func:`tune_allocator` raises glibc's mmap threshold to
64 MiB and its trim threshold to 256 MiB (``mallopt``), so the same heap memory serves batch
after batch: the process may keep up to 256 MiB of freed heap resident, and in exchange the
faults are gone (measured: 46000 faults per 420 MB of stream down to 431). It is
process-wide, done once, on the first PageEncoder or PageDecoder; ``DWCP_MALLOC_TUNE=0`` in
the environment leaves the allocator alone. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from typing import Final

# glibc malloc.h: mallopt parameters, and the values set
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 64 << 20
TRIM_THRESHOLD: Final = 256 << 20

POOL_ARENAS: Final = 2
POOL_BYTES: Final = 1 << 30

_tuned: list[bool] = []  # the outcome, once tried
# Page-cache mappings of encoders and decoders that are gone, with the bytes written in them.
_pool: list[tuple[list[int], mmap.mmap]] = []
_lock = threading.Lock()


def new_arena(owner: object, size: int) -> tuple[mmap.mmap, list[int]]:
    """Memory for the page cache of ``owner`` (an encoder or decoder): ``size`` bytes of an
    anonymous private mapping, zero pages until written, so the cache takes memory as it
    fills; and a one-element list in which the owner keeps how many bytes from the start it
    has written (faulted in).

    When the owner is gone the mapping goes to a small pool (at most :data:`POOL_ARENAS`
    mappings, :data:`POOL_BYTES` in all; the most written-to are kept) for the next cache of
    the same size, which then finds its memory already faulted in: a fresh 256 MiB cache
    costs 65536 page faults (0.1 s of CPU on the test VM) to fill. What the mapping holds is
    of no concern: a cache reads only the slots it wrote itself.

    (Transparent huge pages would fault it in 512 times less often, but where the kernel
    compacts memory for them on demand, the first cache of a process took 0.6 s of CPU to
    fill instead of 0.1 s on the test VM: not asked for.)"""
    with _lock:
        fitting = [entry for entry in _pool if len(entry[1]) == size]
        if fitting:
            entry = max(fitting, key=lambda e: e[0][0])
            _pool.remove(entry)
            touched, arena = entry
        else:
            touched, arena = [0], mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    weakref.finalize(owner, _release, arena, touched)
    return arena, touched


def _release(arena: mmap.mmap, touched: list[int]) -> None:
    """Pool a freed mapping; keep the most written-to ones, within the pool's limits."""
    with _lock:
        _pool.append((touched, arena))
        _pool.sort(key=lambda e: -e[0][0])
        while len(_pool) > POOL_ARENAS or sum(len(e[1]) for e in _pool) > POOL_BYTES:
            _pool.pop()[1].close()


def release_pool() -> int:
    """Unmap every pooled page-cache mapping (an agent does this when it has been idle for a
    while: pooled caches are resident memory); returns the bytes released."""
    with _lock:
        freed = sum(len(e[1]) for e in _pool)
        for _touched, arena in _pool:
            arena.close()
        _pool.clear()
    return freed


def tune_allocator() -> bool:
    """Keep batch-sized buffers' memory in the process (see the module doc), once.

    Returns whether glibc took the setting (on this or an earlier call)."""
    with _lock:
        if not _tuned:
            _tuned.append(_set_thresholds())
        return _tuned[0]


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("DWCP_MALLOC_TUNE") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "POOL_ARENAS", "POOL_BYTES", "TRIM_THRESHOLD", "new_arena",
           "release_pool", "tune_allocator"]
