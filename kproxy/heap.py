"""Memory chores around big batches (a cold listing, a cold sync): pausing the cyclic GC while they
allocate, and giving the C heap's free pages back afterwards."""

from __future__ import annotations

import contextlib
import ctypes
import gc
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
