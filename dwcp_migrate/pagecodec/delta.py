"""Deltas of re-sent pages: the runs of bytes that changed since the cached version.

Both directions work on a whole batch at once with numpy, because per page Python costs more
than the work itself: finding the changed bytes of one 4 KiB page with Python integers (XOR of
two ``int.from_bytes``) takes ~6 us, a regular expression over the XOR ~25 us, while the
batched numpy version below takes ~1 us per page, most of it the two copies into one buffer.

A delta is a list of runs ``(offset, length)`` plus the *new* bytes of each run (not the XOR):
applying it is a plain overwrite, and a delta against a page that is not its base produces a
wrong page that the batch's content check then catches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dwcp_migrate.pagecodec.format import RUN_HEADER, RUN_MERGE_GAP, U8, U16, U64
from dwcp_migrate.pagecodec.types import ByteData

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
UIntArray = npt.NDArray[np.unsignedinteger[Any]]


@dataclass(slots=True)
class Deltas:
    """The deltas chosen among a batch's candidates (in candidate order)."""

    chosen: BoolArray  # per candidate: sent as delta (True) or as literal page
    nruns: npt.NDArray[np.uint16]  # per chosen candidate
    run_off: npt.NDArray[np.uint16]  # per run: first changed byte in its page
    run_len: npt.NDArray[np.uint16]  # per run
    data: bytes  # the new bytes of every run, in order


def _gather_index(starts: IntArray, lens: IntArray) -> IntArray:
    """Indices of every byte of the runs ``[start, start + len)``, concatenated in order."""
    ends_before = np.cumsum(lens) - lens
    return np.repeat(starts - ends_before, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def find_deltas(new: Sequence[ByteData], old: Sequence[ByteData], page_size: int,
                max_bytes: int) -> Deltas:
    """Compare each new page with its old version and choose which to send as deltas.

    A candidate becomes a delta if its runs cost at most ``max_bytes`` (run bytes plus
    ``RUN_HEADER`` per run).
    """
    count = len(new)
    a = np.frombuffer(b"".join(new), U8)
    b = np.frombuffer(b"".join(old), U8)
    # Compare 8-byte words first: a re-sent page differs in a handful of bytes, so the byte
    # comparison then only looks at the few words that changed. A page with more changed
    # words than max_bytes cannot make a small delta (each word holds a changed byte), so a
    # rewritten page is dropped here before its thousands of changed bytes are looked at.
    changed = (a.view(U64) != b.view(U64)).reshape(count, page_size // 8)
    possible = changed.sum(axis=1) <= max_bytes
    changed[~possible] = False
    words = np.flatnonzero(changed)
    maybe = (words[:, None] * 8 + np.arange(8)).ravel()
    pos = maybe[a[maybe] != b[maybe]]
    if pos.size == 0:
        empty = np.zeros(0, U16)
        return Deltas(possible, np.zeros(int(possible.sum()), U16), empty, empty, b"")
    shift = page_size.bit_length() - 1
    page = pos >> shift
    new_run = np.empty(pos.size, np.bool_)
    new_run[0] = True
    np.greater(np.diff(pos), RUN_MERGE_GAP + 1, out=new_run[1:])
    new_run[1:] |= page[1:] != page[:-1]
    first = np.flatnonzero(new_run)
    last = np.append(first[1:] - 1, pos.size - 1)
    starts = pos[first]
    lens = pos[last] + 1 - starts
    run_page = page[first]
    cost = np.bincount(run_page, weights=lens + RUN_HEADER, minlength=count)
    chosen = possible & (cost <= max_bytes)
    keep = chosen[run_page]
    starts, lens, run_page = starts[keep], lens[keep], run_page[keep]
    nruns = np.bincount(run_page, minlength=count)[chosen].astype(U16)
    data = a[_gather_index(starts, lens)].tobytes()
    return Deltas(chosen, nruns, (starts & (page_size - 1)).astype(U16), lens.astype(U16), data)


def apply_deltas(bases: list[ByteData], nruns: UIntArray, run_off: UIntArray,
                 run_len: UIntArray, data: memoryview | bytes, page_size: int
                 ) -> list[ByteData]:
    """Rebuild pages: each base page with its runs overwritten. Inputs must be validated.

    Returns read-only views of one new buffer, a page each."""
    buf = bytearray().join(bases)
    arr = np.frombuffer(buf, U8)
    run_page = np.repeat(np.arange(len(bases), dtype=np.int64), nruns.astype(np.int64))
    starts = run_page * page_size + run_off.astype(np.int64)
    arr[_gather_index(starts, run_len.astype(np.int64))] = np.frombuffer(data, U8)
    del arr  # release the buffer export before copying out
    out = memoryview(bytes(buf))
    return [out[i:i + page_size] for i in range(0, len(out), page_size)]
