"""Memory chores around big batches (a cold listing, a cold sync): pausing the cyclic GC while they
allocate, and giving the C heap's free pages back afterwards."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Iterator
from typing import Any

FREEZE_AFTER = 50_000  # objects allocated in one paused batch beyond which its survivors are frozen


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a batch allocates hundreds of thousands of short-lived objects.

    With a large cluster view in memory every generation-2 pass walks all of it; during a cold sync
    that tripled the time. Nothing built here forms reference cycles.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_count()[0] > FREEZE_AFTER:
                # What a big batch kept (the view, the programmed state) is long-lived: move it out of
                # the collector's generations (gc.freeze is O(1)) so no later pass walks it again. The
                # first collection after a cold load otherwise took ~0.4 s. Garbage with cycles made
                # during the batch would stay; nothing here makes cycles.
                gc.freeze()
            gc.enable()


_malloc_trim: Any = None


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps what a burst freed (the cold sync's plans, kopf's listing of every object) as RSS
    unless its free chunks happen to sit at the top of the heap. The trim takes a few milliseconds
    with a big heap: call it after such bursts only.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


COMPACT_FROM = 1024  # entries below which a dict is left as it is


def _sized_for(n: int) -> int:
    """About the bytes of a dict of N entries built at once (CPython 3.11's table for it: the
    smallest power of two slots of which two thirds hold N, 24-byte entries): at most what a copy
    of any dict of N entries takes."""
    slots = 1 << max(3, ((n * 3 + 1) // 2 - 1).bit_length())
    index = 1 if slots <= 0x80 else 2 if slots <= 0x8000 else 4 if slots <= 0x80000000 else 8
    return 64 + 32 + slots * index + (2 * slots // 3) * 24


def compact_dicts(*dicts: dict[Any, Any]) -> int:
    """Shrink each dict's table in place when a copy sized for its entries is a quarter smaller; the
    bytes saved. Deleting never shrinks a dict, and adding after deletions grows it to three times
    its entries: a table of 10,000 Services that lost and regained 1,000 doubled. Only references
    are copied (no new small objects for the heap to keep); ~1 ms for 10,000 entries."""
    saved = 0
    for d in dicts:
        if len(d) < COMPACT_FROM:
            continue
        was = sys.getsizeof(d)
        if was * 4 < _sized_for(len(d)) * 5:
            continue  # no copy can be a quarter smaller: do not make one
        fresh = dict(d)  # sized for its entries
        if sys.getsizeof(fresh) * 4 < was * 3:
            dict.clear(d)
            dict.update(d, fresh)  # dict's own: a Counter's update would add
            saved += was - sys.getsizeof(d)
    return saved
