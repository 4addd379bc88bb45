"""Run a module (the agent) under tracemalloc; SIGUSR2 writes a snapshot (bench_events --tracemalloc).

    python bench/tracemalloc_agent.py SNAPSHOT FRAMES -m kproxy agent ...

The snapshot is written to SNAPSHOT and pymalloc's statistics to SNAPSHOT.mallocstats, then
SNAPSHOT.done is created. Read it with
`tracemalloc.Snapshot.load(SNAPSHOT)`. Tracing makes the agent several times slower and larger:
use it to find what holds memory, not to measure CPU or RSS.
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def main() -> None:
    snapshot, frames, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: tracemalloc_agent.py SNAPSHOT FRAMES -m MODULE [ARGS...]")
    tracemalloc.start(int(frames))

    def dump(_sig: int, _frame: FrameType | None) -> None:
        gc.collect()
        tracemalloc.take_snapshot().dump(snapshot)
        # pymalloc's arenas, pools and free blocks (what no snapshot shows: the allocator's slack)
        saved = os.dup(2)
        with open(snapshot + ".mallocstats", "w") as f:
            os.dup2(f.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        Path(snapshot + ".done").touch()

    signal.signal(signal.SIGUSR2, dump)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
