"""bench/run.py's report, without root: both families' tables and the summary of kproxy's ratios."""

from __future__ import annotations

from typing import Any

from bench import run


def _peer(rate: float, p99: float, cpu: float, load_s: float, update_s: float) -> dict[str, Any]:
    conns = {"rate": rate, "p50_us": p99 / 2, "p99_us": p99, "cpu_us_per_conn": cpu}
    return {
        "program": {"load_s": load_s, "endpoint_update_s": update_s, "size": {}},
        "service": {"short_conns": conns, "iperf": {}},
        "direct": {"short_conns": conns, "iperf": {}},
    }


def _family(scale: float) -> dict[str, Any]:
    base = {"direct": {"short_conns": {"rate": 20000.0 * scale, "p50_us": 500, "p99_us": 1000}, "iperf": {}}}
    return {
        "baseline": base,
        "baseline_runs": [base, base],
        "runs": {
            "1000": {
                "iptables": _peer(10000 * scale, 4000, 100, 1.0, 1.0),
                "nftables": _peer(15000 * scale, 2000, 80, 0.2, 0.02),
                "kproxy": _peer(18000 * scale, 1000, 50, 0.1, 0.002),
            }
        },
    }


def _result() -> dict[str, Any]:
    return {
        "started": "2026-12-06T00:00:00+00:00",
        "settings": {"endpoints": 10, "concurrency": 32},
        "machine": {"kernel": "6.18", "cpus": 2, "loadavg": (1.0, 1.0, 1.0)},
        "iptables_backend": {"IPv4": "iptables-nft-restore", "IPv6": "ip6tables-nft-restore"},
        "families": {"IPv4": _family(1.0), "IPv6": _family(0.5)},
        "wall_s": 1.0,
    }


def test_markdown_has_a_table_per_family_and_the_ratios_of_both() -> None:
    md = run.markdown(_result())
    assert "## 1,000 Services × 10 endpoints, IPv4" in md and "## 1,000 Services × 10 endpoints, IPv6" in md
    assert "IPv6 via ip6tables-nft-restore" in md
    summary = md.split("## Both families at a glance")[1].split("\n## ")[0]
    rows = [ln for ln in summary.splitlines() if ln.startswith("| 1,000 |")]
    assert [r.split(" | ")[1] for r in rows] == ["IPv4", "IPv6"]
    for r in rows:
        cells = r.split(" | ")
        # conn/s: kproxy/iptables, kproxy/nftables, kproxy/baseline (same family: the scale cancels)
        assert cells[2] == "1.80× / 1.20× / 0.90×", r
        # program from cold and one endpoint change: peer / kproxy
        assert cells[5] == "10.00× / 2.00×" and cells[6].startswith("500.00× / 10.00×"), r


def test_markdown_with_one_family_only() -> None:
    res = _result()
    del res["families"]["IPv4"]
    res["iptables_backend"] = {"IPv6": "ip6tables-nft-restore"}
    md = run.markdown(res)
    assert ", IPv6" in md and ", IPv4" not in md
