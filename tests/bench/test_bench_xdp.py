"""Smoke test of bench/bench_xdp.py at tiny sizes: the real object through PROG_TEST_RUN, then a short UDP
flood through a real lab. Asserts what each part ran on (verdicts, identical frames, counters, path
checks, what is attached where), never a timing. The path checks themselves are tested without root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_xdp as bx

REPO = Path(__file__).resolve().parents[2]


def _leftovers() -> tuple[set[str], set[str]]:
    with open("/proc/self/mounts") as f:
        mounts = {line.split()[1] for line in f if bx.BPFFS_PREFIX in line}
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    return mounts, {n for n in netns if n.startswith("kpxb-")}


@pytest.mark.root
def test_xdp_bench_at_tiny_sizes(tc_object: Path) -> None:
    before = _leftovers()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_xdp", "--runs", "300", "--batch-runs", "50", "--repeat", "1000",
         "--new-runs", "200", "--object", str(tc_object), "--duration", "0.5", "--rounds", "1",
         "--flows", "8", "--rate", "20000", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    cases = {c["case"]: c for c in res["cost"]["cases"]}
    assert set(cases) == {c.key for c in bx.COST_CASES}
    for key, c in cases.items():
        assert c["problems"] == [], (key, c["problems"])
        for prog in ("tc", "xdp", "tc_noop", "xdp_noop"):
            assert c["series"][prog]["runs"] == 300
        want = next(cc for cc in bx.COST_CASES if cc.key == key)
        assert c["series"]["tc"]["verdicts"] == {str(want.tc_verdict): 300}
        assert c["series"]["xdp"]["verdicts"] == {str(want.xdp_verdict): 300}
        # both programs did the case's work on every run (TC and XDP runs count it), XDP said so too
        if want.work:
            assert c["counters_moved"][want.work] == 600, (key, c["counters_moved"])
        assert c["same_bytes"] == (key != "not a service")
        # the kernel's repeat loop: only the untouched frame is the same frame at every repetition
        rep = c["repeat"]
        assert rep["tc_noop"]["valid"] and rep["xdp_noop"]["valid"]
        assert rep["tc"]["valid"] == rep["xdp"]["valid"] == (key == "not a service"), (key, rep)
        if key != "not a service":
            assert rep["tc"]["worked"] == rep["xdp"]["worked"] == 1
    assert cases["snat udp"]["counters_moved"]["XDP_FWD"] == 300
    assert cases["local dnat udp"]["counters_moved"]["XDP_LOCAL"] == 300
    assert "XDP_FWD" not in cases["not a service"]["counters_moved"]
    # first packets: every run opened a flow of its own, in both programs, with the expected verdicts
    new = {c["case"]: c for c in res["cost"]["new_flows"]}
    assert set(new) == {c.key for c in bx.NEW_CASES}
    for key, c in new.items():
        want = next(nc for nc in bx.NEW_CASES if nc.key == key)
        assert c["problems"] == [], (key, c["problems"])
        assert c["series"]["tc"]["verdicts"] == {str(want.tc_verdict): 200}
        assert c["series"]["xdp"]["verdicts"] == {str(want.xdp_verdict): 200}
        assert c["counters_moved"]["XDP_NEW"] == 200 and c["counters_moved"]["CT_NEW"] == 400

    flood = res["flood"]
    accel = flood["meta"]["acceleration"]
    assert accel["n3"]["agent"] == "xdp" and accel["n3"]["xdp"].startswith("native")
    assert accel["n1"]["agent"] == "off" and accel["n1"]["xdp"] is None
    for name, runs in flood["runs"].items():
        (run,) = runs
        assert "failed" not in run, run
        assert run["path_check"] == [], (name, run["path_check"])
        assert 0 < run["received"] <= run["sent"], (name, run)
    kp_tc, kp_xdp = flood["runs"]["kproxy tc"][0]["kp"], flood["runs"]["kproxy xdp"][0]["kp"]
    assert kp_tc["snat"] > 0 and kp_tc["xdp_fwd"] == 0 and kp_tc["from_xdp"] == 0
    assert kp_xdp["xdp_fwd"] > 0 and kp_xdp["from_xdp"] >= kp_xdp["xdp_fwd"]
    assert flood["runs"]["no NAT"][0]["kp"]["snat"] == 0
    assert "ct" in flood["runs"]["nftables"][0]
    assert _leftovers() == before


def _row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {"via": "n1", "received": 1000, "via_eth0": {"rx_packets": 1000}, "kp": {}}
    row.update(kw)
    return row


def test_path_check_accepts_the_paths_it_names() -> None:
    assert bx.path_check("no NAT", "none", _row(kp={"from_netdev": 1000, "snat": 0})) == []
    assert bx.path_check("kproxy tc", "kproxy", _row(kp={"snat": 1000, "from_netdev": 1000})) == []
    xdp = _row(via="n3", kp={"snat": 1010, "xdp_fwd": 1000, "from_xdp": 1010})
    assert bx.path_check("kproxy xdp", "kproxy", xdp) == []
    assert bx.path_check("nftables", "peer", _row(via="n4", kp={})) == []


def test_path_check_reports_a_run_that_measured_another_path() -> None:
    # the client took n1's ICMP redirect and went around it
    bypass = _row(via_eth0={"rx_packets": 12}, kp={"from_netdev": 12})
    problems = bx.path_check("no NAT", "none", bypass)
    assert any("bypassed" in p for p in problems) and any("kp_from_netdev saw 12" in p for p in problems)
    # XDP on the TC node
    assert bx.path_check("kproxy tc", "kproxy", _row(kp={"snat": 1000, "xdp_fwd": 5, "from_xdp": 5}))
    # the XDP node left most datagrams to TC
    problems = bx.path_check("kproxy xdp", "kproxy", _row(via="n3", kp={"snat": 1000, "xdp_fwd": 100}))
    assert problems == ["XDP forwarded 100 of 1000 SNATed datagrams (10.0 %)"]
    assert bx.path_check("nftables", "peer", _row(received=0)) == ["nothing arrived at the backend"]


def test_summary_takes_the_median_round_and_totals() -> None:
    runs = [
        {"received_pps": r, "sent_pps": r, "sent": r, "received": r - lost, "kp": {"snat": r},
         "drop_points": {"lan/x rx_dropped": lost} if lost else {}, "pod_udp": {"RcvbufErrors": 0}}
        for r, lost in ((300, 0), (100, 5), (200, 1))
    ]  # fmt: skip
    s = bx.summarize(runs)
    assert s["received_pps"] == 200 and s["rounds_received_pps"] == [300, 100, 200]
    assert (s["sent"], s["received"], s["dropped"]) == (600, 594, 6)
    assert s["kp"] == {"snat": 600} and s["drop_points"] == {"lan/x rx_dropped": 6}
