"""Smoke test of bench/bench_maglev.py at tiny sizes: real object, real Syncer, PROG_TEST_RUN.

Checks that every part ran on the real datapath (the Maglev passes were decided by the tables, every
flow was DNATed), that the numbers exist, that two nodes agree on every Maglev flow (exact by
construction, not a timing), and that the bench's bpffs mounts are gone. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def _mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if "kp-bench-maglev-" in line}


def test_maglev_bench_at_tiny_sizes(tc_object: Path) -> None:
    before = _mounts()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_maglev", "--services", "20", "--changes", "5", "--flows", "300",
         "--backend-counts", "3", "5", "--table-size", "251", "--object", str(tc_object), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    prog = res["programming"]
    assert prog["services"] == 20 and prog["changes"] == 5
    for mode in ("random", "maglev"):
        r = prog[mode]
        # slot 0 + 10 backend slots each, less the 5 backends removed by the change
        assert r["failed"] == 0 and r["svc4_entries"] == 20 * 11 - 5
        assert r["cold"]["wall_s"] > 0 and r["change"]["wall_s"] > 0
    assert prog["random"]["maglev_tables"] == 0 and prog["maglev"]["maglev_tables"] == 20
    assert prog["maglev"]["cold_table_writes"]["tables"] == 20
    assert prog["maglev"]["change_table_writes"]["tables"] == 5
    mem = prog["maglev"]["memory"]
    assert mem["tables"] == 20 and mem["rows_bytes"] > 0

    for n, run in res["disruption"]["runs"].items():
        for mode in ("maglev", "random"):
            assert run[mode]["flows"] == 300 and run[mode]["not_dnated"] == 0
            assert 0 <= run[mode]["moved"] <= 1 and 0 <= run[mode]["survivor_moved"] <= 1
        for key in ("counters_before", "counters_after"):  # the table decided every new Maglev flow
            c = run["maglev"][key]
            assert c["maglev"] == 300 and c["maglev_fallback"] == 0, (n, c)
            assert run["random"][key]["maglev"] == 0
        assert run["maglev"]["table"]["flows"] == 251  # every slot of the table, read back from the map

    for n, run in res["agreement"]["runs"].items():
        mg = run["maglev"]
        assert mg["flows"] == 300 and mg["same"] == 1.0, (n, mg)
        assert mg["svc_id"][0] != mg["svc_id"][1] and mg["backend_ids_differ"] == int(n)
        assert run["random"]["flows"] == 300

    assert _mounts() <= before
