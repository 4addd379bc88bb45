"""`kproxy cleanup-kube-proxy`: removes kube-proxy's iptables, ip6tables and nftables rules, and nothing else.

The root tests load the rules the real kube-proxy v1.36.2 wrote (tests/data/peer-rules, a copy of
shared/peer-rules) into a network namespace created for the test, next to unrelated rules, run the
cleanup inside that namespace and compare. Every iptables/nft command runs through `ip netns exec` in
that namespace: the root namespace's firewall is only read, to prove it did not change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.cleanup_kube_proxy import (
    CleanupReport,
    cleanup_kube_proxy,
    find_iptables_tools,
    parse_iptables_save,
    parse_nft_tables,
    plan_iptables,
)

REPO = Path(__file__).resolve().parents[2]
PEER_RULES = REPO / "tests" / "data" / "peer-rules"
SHARED_PEER_RULES = REPO.parent / "shared" / "peer-rules"

# What kube-proxy's own cleanup deletes, written out independently of the module under test.
KUBE_PROXY_FIXED = {
    "nat": {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY"},
    "filter": {
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    },
    "mangle": {"KUBE-PROXY-CANARY"},
}
KUBE_PROXY_NAT_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-")
# Kubelet's chains: kube-proxy's cleanup leaves them, so must we.
KUBELET_CHAINS = {"KUBE-FIREWALL", "KUBE-KUBELET-CANARY"}


def is_kube_proxy(table: str, chain: str) -> bool:
    return chain in KUBE_PROXY_FIXED.get(table, set()) or (
        table == "nat" and chain.startswith(KUBE_PROXY_NAT_PREFIXES)
    )


def peer_iptables_rules() -> str:
    """kube-proxy's iptables-save, minus its nfacct matches: they need nfacct objects kube-proxy creates
    over nfnetlink_acct, which no tool here can create. Chains, jumps and every other match are kept."""
    text = (PEER_RULES / "kube-proxy-iptables.rules").read_text()
    return re.sub(r" -m nfacct --nfacct-name +\S+", "", text)


# kube-proxy's IPv6 layout (same chains and jumps as its IPv4 dump, for one Service with one endpoint),
# plus kubelet's chains.
IP6_KUBE_PROXY_RULES = """\
*mangle
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" \
-j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FIREWALL -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-SEP-7QBKTOBWZOW2ADYZ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XRY76EGRC3BSCIIJ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" \
-j MASQUERADE --random-fully
-A KUBE-SEP-7QBKTOBWZOW2ADYZ -s fd00:10:244:1::10/128 -m comment --comment "demo/web6:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-7QBKTOBWZOW2ADYZ -p tcp -m comment --comment "demo/web6:http" -m tcp \
-j DNAT --to-destination [fd00:10:244:1::10]:8080
-A KUBE-SERVICES -d fd00:10:96::40/128 -p tcp -m comment --comment "demo/web6:http cluster IP" \
-m tcp --dport 80 \
-j KUBE-SVC-XRY76EGRC3BSCIIJ
-A KUBE-SERVICES -m comment \
--comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" \
-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment "demo/web6:http -> [fd00:10:244:1::10]:8080" \
-j KUBE-SEP-7QBKTOBWZOW2ADYZ
COMMIT
"""  # a backslash at a line's end joins it with the next (Python string continuation)

# Rules of other owners (an admin, a CNI, kubelet), loaded with --noflush on top of kube-proxy's.
UNRELATED_IPV4_RULES = """\
*mangle
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:MY-APP - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A INPUT -p tcp -m tcp --dport 2222 -m comment --comment "ssh on 2222" -j ACCEPT
-A INPUT -j MY-APP
-A FORWARD -s 10.244.0.0/16 -j ACCEPT
-A MY-APP -s 192.0.2.0/24 -j DROP
COMMIT
*nat
:CNI-MASQ - [0:0]
-A POSTROUTING -s 10.244.0.0/16 -j CNI-MASQ
-A CNI-MASQ ! -d 10.244.0.0/16 -j MASQUERADE
COMMIT
"""
UNRELATED_IPV6_RULES = """\
*filter
:MY-APP6 - [0:0]
-A INPUT -j MY-APP6
-A MY-APP6 -s 2001:db8::/32 -j DROP
COMMIT
"""
# `inet kube-proxy` is not a family kube-proxy uses: its cleanup leaves such a table alone, so do we.
UNRELATED_NFT = """\
table inet unrelated {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 2222 counter accept
    }
}
table inet kube-proxy {
    chain forward {
        type filter hook forward priority 0; policy accept;
    }
}
"""


# --- pure planning (no root) ---------------------------------------------------------------------------


def test_peer_rules_copy_matches_shared() -> None:
    if not SHARED_PEER_RULES.is_dir():
        pytest.skip(f"{SHARED_PEER_RULES} is not beside the clone; the copy in tests/data is used alone")
    for name in ("kube-proxy-iptables.rules", "kube-proxy-nftables.nft"):
        assert (PEER_RULES / name).read_text() == (SHARED_PEER_RULES / name).read_text(), name


def test_plan_for_kube_proxy_dump_removes_its_chains_and_jumps_only() -> None:
    text = peer_iptables_rules()
    tables = parse_iptables_save(text)
    plans = {p.table: p for p in plan_iptables(text)}
    assert set(plans) == {"nat", "filter", "mangle"}
    for name, table in tables.items():
        expected = {c for c in table.chains if is_kube_proxy(name, c)}
        assert set(plans[name].chains) == expected, name
        assert "KUBE-FIREWALL" not in plans[name].chains
    assert {(r.chain, r.args[-1]) for r in plans["nat"].unlink} == {
        ("PREROUTING", "KUBE-SERVICES"),
        ("OUTPUT", "KUBE-SERVICES"),
        ("POSTROUTING", "KUBE-POSTROUTING"),
    }
    # INPUT -j KUBE-FIREWALL (kubelet's) stays; kube-proxy's 9 filter jumps go.
    unlinked = {(r.chain, r.args[-1]) for r in plans["filter"].unlink}
    assert len(plans["filter"].unlink) == 9
    assert ("INPUT", "KUBE-FIREWALL") not in unlinked and ("OUTPUT", "KUBE-FIREWALL") not in unlinked


def test_restore_input_keeps_iptables_save_quoting() -> None:
    plan = {p.table: p for p in plan_iptables(peer_iptables_rules())}["nat"]
    text = plan.restore_input()
    assert text.startswith("*nat\n:KUBE-")
    assert text.endswith("COMMIT\n")
    assert '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n' in text
    # Flush (chain lines) before unlink before delete.
    assert text.index(":KUBE-SERVICES") < text.index("-D PREROUTING") < text.index("-X KUBE-SERVICES")


def test_plan_ignores_tables_without_kube_proxy() -> None:
    assert plan_iptables(UNRELATED_IPV4_RULES) == []


def test_parse_rejects_garbage_with_line_number() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_iptables_save("*nat\n-I PREROUTING -j X\nCOMMIT\n")


def test_parse_nft_tables() -> None:
    out = "table ip kube-proxy\ntable ip6 kube-proxy\ntable inet unrelated\n"
    assert parse_nft_tables(out) == {("ip", "kube-proxy"), ("ip6", "kube-proxy"), ("inet", "unrelated")}


def test_tool_choice_prefers_backend_specific_tools() -> None:
    everything = {"iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"}
    everything |= {
        f"{f}-{b}-{op}"
        for f in ("iptables", "ip6tables")
        for b in ("legacy", "nft")
        for op in ("save", "restore")
    }

    def which(name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in everything else None

    assert [t[0] for t in find_iptables_tools(which)] == [
        "iptables-legacy",
        "iptables-nft",
        "ip6tables-legacy",
        "ip6tables-nft",
    ]
    only_generic = {"iptables-save", "iptables-restore"}
    assert [t[0] for t in find_iptables_tools(lambda n: n if n in only_generic else None)] == ["iptables"]


def test_dry_run_changes_nothing_and_reports() -> None:
    calls: list[list[str]] = []

    def run(argv: object, stdin: str | None) -> subprocess.CompletedProcess[str]:
        args = list(argv)  # type: ignore[call-overload]
        calls.append(args)
        if args[0] == "iptables-nft-save":
            return subprocess.CompletedProcess(args, 0, peer_iptables_rules(), "")
        if args[:3] == ["nft", "list", "tables"]:
            return subprocess.CompletedProcess(args, 0, "table ip kube-proxy\ntable inet unrelated\n", "")
        raise AssertionError(f"dry run ran {args}")

    tools = {"iptables-nft-save", "iptables-nft-restore", "nft"}
    report = cleanup_kube_proxy(dry_run=True, run=run, which=lambda n: n if n in tools else None)
    assert report.ok and report.dry_run
    assert calls == [["iptables-nft-save"], ["nft", "list", "tables"]]
    assert "KUBE-SERVICES" in report.removed_chains["iptables-nft/nat"]
    assert report.removed_nft_tables == ["ip kube-proxy"]
    assert "would remove" in report.summary()


def test_failing_restore_is_reported_with_advice() -> None:
    def run(argv: object, stdin: str | None) -> subprocess.CompletedProcess[str]:
        args = list(argv)  # type: ignore[call-overload]
        if args[0] == "iptables-nft-save":
            return subprocess.CompletedProcess(args, 0, peer_iptables_rules(), "")
        return subprocess.CompletedProcess(args, 1, "", "Resource busy")

    tools = {"iptables-nft-save", "iptables-nft-restore"}
    report = cleanup_kube_proxy(run=run, which=lambda n: n if n in tools else None)
    assert not report.ok
    assert all("Resource busy" in e and "DaemonSet" in e for e in report.errors)
    assert report.removed_chains == {}


# --- in a network namespace (root) ---------------------------------------------------------------------


def ns_run(ns: str, argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in {ns} failed ({done.returncode}): {done.stderr}")
    return done.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """Name: netns. Scope: function. Depends: root, iproute2. A fresh network namespace, always deleted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    name = f"kpt-clean-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ns_run(name, ["ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def iptables_backends() -> list[tuple[str, str, str]]:
    tools = find_iptables_tools()
    if not tools:
        pytest.skip("no iptables tools installed")
    return tools


def save_all(ns: str) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """Per backend label: per table: (chains, rule lines)."""
    out = {}
    for label, save, _ in iptables_backends():
        tables = parse_iptables_save(ns_run(ns, [save]))
        out[label] = {t.name: (t.chains, [f"-A {r.text}" for r in t.rules]) for t in tables.values()}
    return out


def run_cleanup_in(ns: str, dry_run: bool = False) -> dict[str, Any]:
    code = (
        "import json, dataclasses; from kproxy.cleanup_kube_proxy import cleanup_kube_proxy; "
        f"r = cleanup_kube_proxy(dry_run={dry_run}); print(json.dumps(dataclasses.asdict(r)))"
    )
    return json.loads(ns_run(ns, [sys.executable, "-c", code]).splitlines()[-1])


def root_firewall() -> str:
    """Read-only snapshot of the root namespace's nftables ruleset (iptables-nft lives there too),
    stateless (-s): rule counters and set timeouts move with the host's own traffic."""
    if not shutil.which("nft"):
        return ""
    return subprocess.run(
        ["nft", "-s", "list", "ruleset"], capture_output=True, text=True, check=False
    ).stdout


@pytest.mark.root
def test_cleanup_removes_kube_proxy_rules_and_nothing_else(netns: str) -> None:
    root_before = root_firewall()
    for label, _, restore in iptables_backends():
        family = label.split("-")[0]
        if family == "iptables":
            ns_run(netns, [restore], peer_iptables_rules())
            ns_run(netns, [restore, "--noflush"], UNRELATED_IPV4_RULES)
        else:
            ns_run(netns, [restore], IP6_KUBE_PROXY_RULES)
            ns_run(netns, [restore, "--noflush"], UNRELATED_IPV6_RULES)
    ns_run(netns, ["nft", "-f", str(PEER_RULES / "kube-proxy-nftables.nft")])
    ns_run(netns, ["nft", "-f", "-"], UNRELATED_NFT)

    before = save_all(netns)
    nft_unrelated_before = ns_run(netns, ["nft", "list", "table", "inet", "unrelated"])
    for label, tables in before.items():
        assert any(is_kube_proxy(t, c) for t, (chains, _) in tables.items() for c in chains), label
    assert {("ip", "kube-proxy"), ("ip6", "kube-proxy")} <= parse_nft_tables(
        ns_run(netns, ["nft", "list", "tables"])
    )

    dry = run_cleanup_in(netns, dry_run=True)
    assert dry["errors"] == [] and dry["removed_nft_tables"] == ["ip kube-proxy", "ip6 kube-proxy"]
    assert save_all(netns) == before, "dry run changed rules"

    report = run_cleanup_in(netns)
    assert report["errors"] == []
    assert sorted(report["backends"]) == sorted([t[0] for t in iptables_backends()] + ["nftables"])

    after = save_all(netns)
    for label, tables in before.items():
        for table, (chains, rules) in tables.items():
            kept_chains = [c for c in chains if not is_kube_proxy(table, c)]
            kept_rules = [
                r
                for r in rules
                if not is_kube_proxy(table, r.split()[1])
                and not any(is_kube_proxy(table, t) for t in re.findall(r"-[jg] (\S+)", r))
            ]
            got_chains, got_rules = after[label].get(table, ([], []))
            assert got_chains == kept_chains, f"{label}/{table}"
            assert got_rules == kept_rules, f"{label}/{table}"
            assert {c for c in got_chains if c.startswith("KUBE-")} <= KUBELET_CHAINS, f"{label}/{table}"
        # The unrelated rules really were there and really survived.
        assert "-A MY-APP -s 192.0.2.0/24 -j DROP" in after[label]["filter"][1] or label.startswith("ip6")
        assert "KUBE-FIREWALL" in after[label]["filter"][0]

    nft_tables = parse_nft_tables(ns_run(netns, ["nft", "list", "tables"]))
    assert ("ip", "kube-proxy") not in nft_tables and ("ip6", "kube-proxy") not in nft_tables
    assert ("inet", "kube-proxy") in nft_tables
    assert ns_run(netns, ["nft", "list", "table", "inet", "unrelated"]) == nft_unrelated_before

    again = run_cleanup_in(netns)
    assert again["errors"] == [] and CleanupReport(**again).nothing_found
    assert save_all(netns) == after

    assert root_firewall() == root_before, "the root namespace's firewall changed"
