"""kproxy's benchmarks (bench/README.md)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any


def result_header(args: Any) -> dict[str, Any]:
    """What every bench's JSON starts with: when, on what machine, with which settings."""
    import os
    import time

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"kernel": os.uname().release, "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }


def run_and_print(
    args: Any, run_all: Callable[[Any], dict[str, Any]], report: Callable[[dict[str, Any]], str]
) -> int:
    """A bench's main after its checks: SIGTERM raises KeyboardInterrupt (so its clean-up runs), then
    RUN_ALL(args), printed as one JSON object with --json, else as REPORT's text."""

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res = run_all(args)
    print(json.dumps(res) if args.json else report(res))
    return 0
