"""Smoke test of bench/bench_events.py at 30 Services: the real agent, the API double, real maps.

Checks that every phase ran through the agent (each change reached the pinned maps, which is how a
phase ends), that the numbers exist, and that the bench's namespace is gone. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def _ours() -> set[str]:
    return (
        {n for n in os.listdir("/run/netns") if n.startswith("kpe-")}
        if os.path.isdir("/run/netns")
        else set()
    )


def test_event_stream_bench_at_30_services(tc_object: Path) -> None:
    before = _ours()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_events", "--services", "30", "--changes", "20", "--rate", "100",
         "--burst", "20", "--object", str(tc_object), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = res["phases"]
    assert list(phases) == ["create-1k", "update-1k", "burst-10k", "churn-10k"]
    assert phases["create-1k"]["changes"] == 60  # 30 Services + 30 slices
    assert phases["update-1k"]["changes"] == 20
    lat = phases["update-1k"]["write_to_programmed_ms"]
    assert 0 < lat["p50"] <= lat["max"]
    assert phases["churn-10k"]["changes"] == 120  # 30 deleted and created again, Services and slices
    assert all(p["agent_cpu_s"] >= 0 and p["agent_rss_mb"] > 0 for p in phases.values())
    # the agent's own histogram saw the changes
    assert res["agent_programming_histogram"]["le +Inf"] == 1.0
    assert _ours() <= before
