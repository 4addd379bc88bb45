"""Smoke test of the benchmark harness (bench/run.py) at one Service with tiny durations.

It checks that every peer is programmed and carries traffic in both address families (IPv4 and
IPv6), that the kproxy agent's control-plane numbers are real (its maps held the Services and the
endpoint change), and that the report files are written. It asserts no timing: the numbers are only
checked to exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench import run

pytestmark = pytest.mark.root


def _netns(prefix: str) -> set[str]:
    return (
        {n for n in os.listdir("/run/netns") if n.startswith(prefix)}
        if os.path.isdir("/run/netns")
        else set()
    )


def test_harness_at_one_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The prefixes of this run's topologies: another run on the machine (its own prefixes) is no leak.
    prefixes: list[str] = []
    topology = run.nb.Topology

    def recorded() -> Any:
        topo = topology()
        prefixes.append(topo.prefix)
        return topo

    monkeypatch.setattr(run.nb, "Topology", recorded)
    if not (run.nb.LOADGEN.exists() and run.nb.ECHO.exists()):
        run.nb.ensure_tools()
    rc = run.main(
        [
            "--services",
            "1",
            "--duration",
            "1.0",  # long enough for a first connection on a busy machine
            "--connections",
            "200",  # but a path ends once 200 are done, if sooner (16 paths of 1 s were half the test's time)
            "--warmup",
            "0.05",  # unrecorded connections first: this test only checks that the numbers exist
            "--iperf-seconds",
            "0",
            "--concurrency",
            "4",
            "-o",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    assert set(result["families"]) == {"IPv4", "IPv6"}
    for label, fam in result["families"].items():
        assert fam["baseline"]["direct"]["short_conns"]["connections"] > 0, label
        peers = fam["runs"]["1"]
        assert set(peers) == {"iptables", "nftables", "kproxy"}, label
        for name, res in peers.items():
            sc = res["service"]["short_conns"]
            assert sc["connections"] > 0 and sc["backends_reached"] >= 1, (label, name)
            assert res["program"]["load_s"] is not None, (label, name)
            assert res["program"]["endpoint_update_s"] is not None, (label, name)
        prog = peers["kproxy"]["program"]
        v = label[-1]  # the agent's maps of that family held every Service: kp_svc4_v1 / kp_svc6_v1
        assert prog[f"svc{v}_entries"] == prog[f"svc{v}_entries_expected"], label
        assert prog["size"]["agent_rss_mb"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "1 Services" in md and "vs iptables" in md
    assert "Both families at a glance" in md and ", IPv6" in md and ", IPv4" in md
    for png in ("latency.png", "control-plane.png"):
        assert (tmp_path / png).stat().st_size > 0
    # Nothing of the run is left behind: no namespace with the prefix of one of its topologies.
    assert prefixes and all(_netns(p) == set() for p in prefixes), prefixes
