"""bench/bench_external.py's path check, without root: a kproxy row must have moved the counter of its
mode in its own family on n1, and no mode counter of the other family."""

from __future__ import annotations

from bench import bench_external as bx


def test_family_delta_keeps_what_moved_per_family() -> None:
    before = {"IPv4": {"snat_new": 5, "dsr_opt_tx": 1}, "IPv6": {"snat_new": 0}}
    after = {"IPv4": {"snat_new": 5, "dsr_opt_tx": 3}, "IPv6": {"snat_new": 7}}
    assert bx.family_delta(after, before) == {"IPv4": {"dsr_opt_tx": 2}, "IPv6": {"snat_new": 7}}


def test_path_check_accepts_the_right_path_in_either_family() -> None:
    for mode, counter in bx.MODE_COUNTERS.items():
        for fam, other in (("IPv4", "IPv6"), ("IPv6", "IPv4")):
            assert bx.path_check(mode, fam, {fam: {counter: 100, "ct_new": 100}, other: {}}) == []


def test_path_check_reports_a_row_that_measured_another_path() -> None:
    # IPv6 dsr opt, but n1 counted the IPv4 option mode: the row did not measure IPv6 DSR
    problems = bx.path_check("opt", "IPv6", {"IPv4": {"dsr_opt_tx": 50}, "IPv6": {}})
    assert "IPv6 dsr_opt_tx did not move" in problems
    assert any(p.startswith("IPv4 moved: dsr_opt_tx+50") for p in problems)
    # IPv6 ipip that fell back to SNAT
    problems = bx.path_check("ipip", "IPv6", {"IPv4": {}, "IPv6": {"snat_new": 9}})
    assert problems[0] == "IPv6 dsr_ipip_tx did not move" and "IPv6 snat_new +9" in problems[1]
    # an agent without kp_stats6_v1
    assert bx.path_check("snat", "IPv6", {"IPv4": {}}) == [
        "n1 has no IPv6 counters (an agent without kp_stats6_v1?)"
    ]
