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


def _ext_row(rate: float, p99: float, check: list[str] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "rate": rate,
        "p50_us": p99 / 2,
        "p99_us": p99,
        "errors": 0,
        "cpu_us_per_conn": 40.0,
    }
    if check is not None:
        row["path_check"] = check
    return row


def test_external_section_has_both_families_and_their_ratios() -> None:
    res = _result()
    res["external"] = {
        "topology": "ext -> n1 NodePort -> backend pod on n2 (2-node lab)",
        "families": {
            label: {
                "node": node,
                "backend": be,
                "baseline": _ext_row(20000 * scale, 1000),
                "snat": _ext_row(10000 * scale, 2000, []),
                "dsr-opt": _ext_row(16000 * scale, 1000, []),
                "dsr-ipip": _ext_row(
                    15000 * scale, 1250, ["IPv6 dsr_ipip_tx did not move"] if scale < 1 else []
                ),
            }
            for label, node, be, scale in (
                ("IPv4", "192.168.77.11", "10.244.2.10", 1.0),
                ("IPv6", "fd00:77::11", "fd00:10:244:2::10", 0.5),
            )
        },
    }
    md = run.markdown(res)
    ext = md.split("## NodePort from outside")[1]
    assert (
        "### IPv4: 192.168.77.11 → 10.244.2.10" in ext and "### IPv6: fd00:77::11 → fd00:10:244:2::10" in ext
    )
    v4, v6 = ext.split("### IPv6")
    # per family against its own baseline: the scale cancels
    for table in (v4, v6):
        assert "| snat | " in table and "| 0.50× | 0.50× |" in table
    assert "| dsr-ipip |" in v6 and "IPv6 dsr_ipip_tx did not move |" in v6
    assert "| dsr-ipip |" in v4 and "| 0.75× | 0.80× | ok |" in v4
    both = ext.split("NodePort from outside, both families")[1]
    assert "| path | IPv4 | IPv6 |" in both and "| dsr-opt | 0.80× (1.00×) | 0.80× (1.00×) |" in both


def test_external_section_of_a_run_from_before_ipv6() -> None:
    res = _result()
    res["external"] = {"topology": "t", "baseline": _ext_row(20000, 1000), "snat": _ext_row(10000, 2000)}
    md = run.markdown(res)
    assert "### IPv4" in md and "| snat | 10,000 |" in md and "NodePort from outside, both" not in md
