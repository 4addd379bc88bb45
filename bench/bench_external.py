"""Short external connections to a NodePort whose backend runs on another node: kproxy against
kube-proxy's iptables and nftables layouts and a no-NAT baseline, in one run.

One lab (kproxy.lab: 4 nodes on a bridge, an external client), kp-echo in pod n2p1, a NodePort
Service on it. Node 1 runs kproxy (agent and programs), node 2 runs kproxy (it only forwards here).
Nodes 3 and 4 have the same shape as node 1 but no kproxy: they are the kube-proxy peers, with the
rules of bench/peers (kube-proxy's own layouts: DNAT to the backend, MASQUERADE --random-fully
through nf_conntrack) for the same Service: node 3 loaded with iptables-nft-restore, node 4 with
nft -f. Each NAT path has a node address of its own, so none inherits another's TIME_WAIT tuples
at the backend. Cases:

    no NAT      the client straight to the backend's pod address (a second kp-echo port: DSR keeps
                the client's address), routed ext -> n1 -> n2 -> pod
    snat        ext -> n1:NodePort (kproxy SNAT, the default mode) -> n2 -> pod
    dsr opt     the same with `kproxy dsr enable --mode opt` on both kproxy nodes
    dsr ipip    the same with `--mode ipip`
    iptables    ext -> n3:NodePort (kube-proxy's iptables layout, iptables-nft) -> n2 -> pod
    nftables    ext -> n4:NodePort (kube-proxy's nftables layout) -> n2 -> pod

Both address families by default (`--families 4 6`): the Service is dual-stack (a ClusterIP and one
EndpointSlice per family), kp-echo listens on both, and every case has an IPv6 row beside the IPv4 one:
the client fd00:77::100 to n1's (n3's, n4's) fd00:77::1<i> NodePort, kproxy's IPv6 SNAT or DSR
(destination options header / IPv6-in-IPv6), the peers as kube-proxy's IPv6 proxier writes them
(ip6tables-nft-restore, `table ip6 kube-proxy`), and the no-NAT row to the pod's IPv6 address through
n1 (a route on ext to n2's pod /64 via n1's IPv6 address, added for the run and removed after it).
kproxy's rows are checked against n1's counters of their own family (stat_totals_by_family): the mode's
counter (snat_new, dsr_opt_tx, dsr_ipip_tx) must move and the other family's must not, so a row
cannot silently measure another path.

Every round runs every case of every family once, in that order (interleaved rounds, compare within one
run). No
table is flushed between cases or rounds: each path lives with the state (conntrack, SNAT ports held
in TIME_WAIT) its own earlier traffic left, as it would in production. The client uses ports
1024-65535 (`--port-range`), as bench/run.py does.

    sudo .venv/bin/python -m bench.bench_external [--duration 5] [--concurrency 32] [--rounds 3]
                                                  [--cases snat,iptables] [--families 4 6] [--json]

Prints, per family and case, the median round's connections/s, p50 and p99 latency (connect to EOF of the
reply), the errors of all rounds (by kind), the ratio to no NAT and to the faster peer, and what
the datapath counted (kproxy: SNAT retries and drops on n1; peers: nf_conntrack's insert_failed,
drop, early_drop and clashres in n3/n4; the backend: TCP counters), then the ratios of both families
side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench/loadgen/kp-loadgen"
ECHO = ROOT / "bench/loadgen/kp-echo"
ECHO_PORT = 7000
# The no-NAT case goes to a second port: DSR keeps the client's address, so without NAT and with DSR the
# backend would see the same 4-tuples, from client sockets with unrelated timestamps (PAWS in TIME_WAIT).
DIRECT_PORT = 7001
NODE_PORT = 31500
CLUSTER_IP = "10.96.60.1"
CLUSTER_IP6 = "fd00:10:96::6:1"  # in the IPv6 proxier's service CIDR (bench.peers.model.SERVICE_CIDR6)
IPTABLES_RESTORE = "iptables-nft-restore"  # as bench/netbench.py: the backend kube-proxy's image picks here
IP6TABLES_RESTORE = "ip6tables-nft-restore"
FAMILY_CHOICES = (4, 6)
FAMILY_LABELS = {4: "IPv4", 6: "IPv6"}

# (name, kind, kproxy DSR mode): kind none = no NAT, kproxy = node 1, peer = node 3 or 4.
CASES = (
    ("no NAT", "none", None),
    ("snat", "kproxy", "snat"),
    ("dsr opt", "kproxy", "opt"),
    ("dsr ipip", "kproxy", "ipip"),
    ("iptables", "peer", None),
    ("nftables", "peer", None),
)
PEERS = ("iptables", "nftables")
# kproxy counters shown per case (n1, kp_stats_v1); nf_conntrack's (peer node, /proc/net/stat/nf_conntrack).
KP_COUNTERS = ("snat_new", "snat_retry", "drop_snat_no_port", "ct_takeover")
# The n1 counter each kproxy mode moves (in the family of the traffic); the path check reads them per family.
MODE_COUNTERS = {"snat": "snat_new", "opt": "dsr_opt_tx", "ipip": "dsr_ipip_tx"}
CT_COUNTERS = ("insert_failed", "drop", "early_drop", "clashres")
# The backend's: SYNs its TIME_WAIT refused (PAWS: answered with a bare ACK, the client retries in 1 s).
BE_COUNTERS = ("TcpExt.PAWSTimewait", "Tcp.RetransSegs")


def set_mode(lab: Any, nodes: list[Any], mode: str) -> None:
    args = ["disable"] if mode == "snat" else ["enable", "--mode", mode]
    for node in nodes:
        subprocess.run(
            [sys.executable, "-m", "kproxy", "dsr", *args, "--bpffs", node.bpffs],
            check=True,
            capture_output=True,
        )


def kp_stats(bpffs: str) -> dict[str, dict[str, int]]:
    """kproxy's packet counters of one node per family ("IPv4": kp_stats_v1, "IPv6": kp_stats6_v1, summed
    over CPUs), by lower-case name."""
    from kproxy.abi import Stat
    from kproxy.bpf.maps import KproxyMaps

    with KproxyMaps.open(bpffs) as maps:
        by_family = maps.stat_totals_by_family()
    return {
        fam: {s.name.lower(): (totals.get(int(s)) or (0,))[0] for s in Stat}
        for fam, totals in by_family.items()
    }


def family_delta(
    after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """after - before per family and counter, only what moved."""
    out: dict[str, dict[str, int]] = {}
    for fam, counters in after.items():
        moved = {k: v - before.get(fam, {}).get(k, 0) for k, v in counters.items()}
        out[fam] = {k: v for k, v in moved.items() if v}
    return out


def path_check(mode: str, family: str, moved: dict[str, dict[str, int]]) -> list[str]:
    """What is wrong with a kproxy row of MODE ("snat", "opt", "ipip") and FAMILY ("IPv4"/"IPv6"), given
    n1's counter deltas per family over the row (family_delta): empty when the row measured that path.
    The mode's counter must move in the row's family and no mode counter in the other family. A counter
    of another mode in the same family is reported too (flows that kept an earlier mode: nothing is
    flushed between cases), but as a share, for the reader to judge."""
    want = MODE_COUNTERS[mode]
    mine = moved.get(family)
    if mine is None:
        return [f"n1 has no {family} counters (an agent without kp_stats6_v1?)"]
    problems = []
    if mine.get(want, 0) <= 0:
        problems.append(f"{family} {want} did not move")
    for other_mode, counter in MODE_COUNTERS.items():
        if other_mode != mode and mine.get(counter, 0) > 0:
            problems.append(f"{family} {counter} +{mine[counter]} (vs {want} +{mine.get(want, 0)})")
    for fam, counters in moved.items():
        if fam != family:
            stray = {c: counters[c] for c in MODE_COUNTERS.values() if counters.get(c)}
            if stray:
                problems.append(f"{fam} moved: " + ",".join(f"{c}+{v}" for c, v in stray.items()))
    return problems


def ct_stats(ns: str) -> dict[str, int]:
    """nf_conntrack's per-netns statistics (summed over CPUs) of namespace NS."""
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/stat/nf_conntrack"], capture_output=True, text=True
    )
    rows = r.stdout.splitlines()
    if not rows:
        return {}
    head = rows[0].split()
    out = dict.fromkeys(head, 0)
    for row in rows[1:]:
        for k, v in zip(head, row.split(), strict=False):
            out[k] += int(v, 16)
    return out


def tcp_stats(ns: str) -> dict[str, int]:
    """The TCP counters (/proc/net/snmp Tcp, /proc/net/netstat TcpExt) of namespace NS, by name."""
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp", "/proc/net/netstat"],
        capture_output=True,
        text=True,
    )
    out: dict[str, int] = {}
    rows = r.stdout.splitlines()
    for head, vals in zip(rows[::2], rows[1::2], strict=False):
        kind, _, names = head.partition(":")
        if kind in ("Tcp", "TcpExt"):
            for k, v in zip(names.split(), vals.partition(":")[2].split(), strict=False):
                out[f"{kind}.{k}"] = int(v)
    return out


def delta(after: dict[str, int], before: dict[str, int], keys: tuple[str, ...]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def loadgen(lab: Any, addr: str, port: int, duration: float, conc: int) -> dict[str, Any]:
    r = lab.run_in(
        lab.ext,
        [str(LOADGEN), "-a", addr, "-p", str(port), "-c", str(conc), "-d", str(duration), "-w", "0.5", "-i"],
        timeout=duration + 30,
    )
    if r.returncode != 0:
        raise RuntimeError(f"kp-loadgen failed: {r.stderr}")
    return dict(json.loads(r.stdout))


def ns_run(ns: str, argv: list[str], input: str | None = None) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, input=input)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {ns} failed: {r.stderr.strip() or r.stdout.strip()}")


def load_peer(ns: str, peer: str, rules: str, family: int = 4) -> None:
    """Load PEER's rules of FAMILY into the (fresh) node namespace NS, as kube-proxy's full sync does (the
    IPv4 nftables rule set must come first: it carries the empty `table ip6` the IPv6 one replaces)."""
    if peer == "iptables":
        from bench.peers import iptables

        ns_run(ns, [sys.executable, "-m", "bench.peers.nfacct", *iptables.NFACCT_OBJECTS])
        ns_run(ns, [IPTABLES_RESTORE if family == 4 else IP6TABLES_RESTORE], input=rules)
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(rules)
            f.flush()
            ns_run(ns, ["nft", "-f", f.name])


def peer_rules(peer: str, node_ip: str, backend: str, family: int = 4) -> str:
    """kube-proxy's full rule set (iptables or nftables) for the one NodePort Service, as the proxier of
    FAMILY writes it (IPv6: ip6tables layout, `table ip6 kube-proxy`; NODE_IP and BACKEND of that family)."""
    from bench.peers import iptables, nftables
    from bench.peers.model import NODE6, Endpoint, NodeConfig, ServicePort

    svc = ServicePort(
        "default", "echo", CLUSTER_IP if family == 4 else CLUSTER_IP6, 80, ECHO_PORT, port_name="echo",
        type="NodePort", node_port=NODE_PORT, endpoints=(Endpoint(backend),),
    )  # fmt: skip
    node = NodeConfig(node_ips=(node_ip,)) if family == 4 else dataclasses.replace(NODE6, node_ips=(node_ip,))
    return iptables.render([svc], node) if peer == "iptables" else nftables.render([svc], node)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by rate (its p50/p99), and errors of all rounds."""
    ok = [r for r in runs if "rate" in r]
    med = sorted(ok, key=lambda r: float(r["rate"]))[(len(ok) - 1) // 2] if ok else {}
    kinds: dict[str, int] = {}
    for r in ok:
        for k, v in (r.get("error_kinds") or {}).items():
            kinds[k] = kinds.get(k, 0) + int(v)
    counters: dict[str, int] = {}
    for r in ok:
        for k, v in (r.get("counters") or {}).items():
            counters[k] = counters.get(k, 0) + int(v)
    return {
        "rate": float(med.get("rate", 0.0)),
        "rates": [round(float(r["rate"])) for r in ok],
        "p50_us": med.get("p50_us"),
        "p99_us": med.get("p99_us"),
        "connections": sum(int(r.get("connections", 0)) for r in ok),
        "errors": sum(int(r.get("errors", 0)) for r in ok),
        "error_kinds": {k: v for k, v in kinds.items() if v},
        "counters": {k: v for k, v in counters.items() if v},
        "failed": [r["failed"] for r in runs if "failed" in r],
        "path_check": sorted({p for r in runs for p in r.get("path_check", [])}),
    }


def print_table(by_family: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    """One table per family (ratios against that family's no NAT and peers), then both families' ratios
    side by side."""
    print(
        f"{args.concurrency} concurrent short connections, {args.duration:g} s per run, {args.rounds} rounds"
        " (median round shown, errors of all rounds)"
    )
    for family, summary in by_family.items():
        base = summary.get("no NAT", {}).get("rate") or 0.0
        peer_rates = [summary[p]["rate"] for p in PEERS if p in summary and summary[p]["rate"]]
        fast = max(peer_rates) if peer_rates else 0.0
        print(f"\n{family}")
        print(
            f"{'case':10} {'conn/s':>8} {'p50 us':>7} {'p99 us':>7} {'errors':>7} {'/noNAT':>7} {'/peer':>6}"
            f"  rounds (conn/s); errors by kind; counters"
        )
        for name, s in summary.items():
            r = s["rate"]
            vs_base = f"{r / base:.2f}" if base else "-"
            vs_peer = f"{r / fast:.2f}" if fast else "-"
            extra = " ".join(str(x) for x in s["rates"])
            if s["error_kinds"]:
                extra += "; " + ",".join(f"{k}={v}" for k, v in s["error_kinds"].items())
            if s["counters"]:
                extra += "; " + ",".join(f"{k}={v}" for k, v in s["counters"].items())
            if s["failed"]:
                extra += "; FAILED: " + " | ".join(s["failed"])
            if s.get("path_check"):
                extra += "; PATH CHECK: " + " | ".join(s["path_check"])
            print(
                f"{name:10} {r:>8.0f} {s['p50_us'] or '-':>7} {s['p99_us'] or '-':>7} {s['errors']:>7}"
                f" {vs_base:>7} {vs_peer:>6}  {extra}"
            )
    print(
        "/noNAT: rate / the same family's no-NAT baseline's;"
        " /peer: rate / the faster of iptables and nftables"
    )
    if len(by_family) > 1:
        print("\nratios per family (rate / no NAT; IPv6/IPv4: the IPv6 rate / the IPv4 rate of the case)")
        fams = list(by_family)
        names = [n for n in by_family[fams[0]] if all(n in by_family[f] for f in fams)]
        print(f"{'case':10} " + " ".join(f"{f + ' /noNAT':>12}" for f in fams) + f" {'IPv6/IPv4':>10}")
        for name in names:
            cells = []
            for f in fams:
                base = by_family[f].get("no NAT", {}).get("rate") or 0.0
                r = by_family[f][name]["rate"]
                cells.append(f"{r / base:>12.2f}" if base else f"{'-':>12}")
            r4, r6 = (by_family.get(x, {}).get(name, {}).get("rate") or 0.0 for x in ("IPv4", "IPv6"))
            print(f"{name:10} " + " ".join(cells) + (f" {r6 / r4:>10.2f}" if r4 else f" {'-':>10}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="each case runs this often, interleaved")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated subset")
    ap.add_argument(
        "--families", nargs="+", type=int, choices=FAMILY_CHOICES, default=list(FAMILY_CHOICES),
        help="address families to measure: 4, 6 or both (default: both)",
    )  # fmt: skip
    ap.add_argument("--port-range", default="1024 65535", help="the client's ip_local_port_range")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    wanted = [c.strip() for c in args.cases.split(",")]
    cases = [c for c in CASES if c[0] in wanted]
    if len(cases) != len(wanted):
        ap.error(f"--cases: choose from {', '.join(c[0] for c in CASES)}")
    families = [f for f in FAMILY_CHOICES if f in args.families]
    subprocess.run(["make", "-s", "-C", str(ROOT), "-f", "mk/bench.mk", "loadgen"], check=True)

    from kproxy.lab import Lab
    from kproxy.lab import manifests as mf
    from kproxy.lab.netns import sysctl

    # per family label: case -> its runs
    results: dict[str, dict[str, list[dict[str, Any]]]] = {FAMILY_LABELS[f]: {} for f in families}
    # n3 and n4 are the peer nodes: the lab starts no agent anywhere, kproxy then runs on n1 and n2 only.
    with Lab(nodes=4, pods_per_node=1, start_agents=False, agent_args=["--log-level", "warning"]) as lab:
        n1, n2 = lab.node("n1"), lab.node("n2")
        peer_node = {"iptables": lab.node("n3"), "nftables": lab.node("n4")}
        # no NAT goes to the pod through n1, which forwards it out by the interface it came in: n1 sends
        # the client ICMP redirects (to n2), and a client taking them would bypass n1 (bench_xdp found it)
        from kproxy.lab.netns import sysctl

        for dev in ("all", "default", "eth0"):
            sysctl(lab.ext.ns, f"net.ipv4.conf.{dev}.accept_redirects", 0)
            sysctl(lab.ext.ns, f"net.ipv6.conf.{dev}.accept_redirects", 0)
        for n in (n1, n2):
            lab.start_agent(n.name)
        for n in (n1, n2):
            lab.wait_agent(n.name)
        pod = lab.pod("n2p1")
        for p in (ECHO_PORT, DIRECT_PORT):
            lab._spawn(f"bench/echo{p}", pod.ns, [str(ECHO), "-l", f"0.0.0.0:{p}", "-l", f"[::]:{p}",
                       "-P", "2"], lab.dir / "logs" / f"echo{p}.log")  # fmt: skip
        port = mf.Port("echo", 80, ECHO_PORT, "TCP", NODE_PORT)
        lab.write_manifest("echo", [
            mf.service("echo", [port], CLUSTER_IP, type="NodePort", cluster_ip6=CLUSTER_IP6),
            *mf.endpoint_slices("echo", [(pod.ip, pod.node), (pod.ip6, pod.node)], [port]),
        ])  # fmt: skip
        node_ip = {4: lambda n: n.ip, 6: lambda n: n.ip6}
        pod_ip = {4: pod.ip, 6: pod.ip6}
        for f in families:
            lab.wait_programmed(node_ip[f](n1), NODE_PORT, [pod_ip[f]], nodes=["n1"])
        lab.wait_programmed(CLUSTER_IP, 80, [pod.ip], nodes=["n1", "n2"])
        lab.wait_programmed(CLUSTER_IP6, 80, [pod.ip6], nodes=["n1", "n2"])
        sysctl(lab.ext.ns, "net.ipv4.ip_local_port_range", args.port_range)  # IPv6 sockets use it too
        # baseline routes: the client reaches pod addresses through n1, as it reaches the NodePort
        routes = {
            4: ["route", "add", n2.pod_cidr, "via", n1.ip],
            6: ["-6", "route", "add", n2.pod_cidr6, "via", n1.ip6],
        }
        added: list[list[str]] = []
        try:
            for f in families:
                subprocess.run(["ip", "-n", lab.ext.ns, *routes[f]], check=True)
                added.append(routes[f])
            for peer, node in peer_node.items():
                if any(c[0] == peer for c in cases):
                    # What kube-proxy sets on its node (the rest is the lab's: forwarding on, rp_filter off).
                    sysctl(node.ns, "net.ipv4.conf.all.route_localnet", 1)
                    for f in families:  # IPv4 first (see load_peer)
                        load_peer(node.ns, peer, peer_rules(peer, node_ip[f](node), pod_ip[f], f), f)
            time.sleep(0.5)
            for _ in range(args.rounds):
                for f in families:
                    label = FAMILY_LABELS[f]
                    for name, kind, mode in cases:
                        results[label].setdefault(name, []).append(
                            run_case(lab, kind, mode, node_ip[f](n1) if kind == "kproxy" else
                                     node_ip[f](peer_node[name]) if kind == "peer" else pod_ip[f],
                                     label, name, [n1, n2], peer_node, pod, args)
                        )  # fmt: skip
        finally:
            for route in added:  # only in the lab's ext namespace; the lab goes away after this anyway
                subprocess.run(["ip", "-n", lab.ext.ns, *[("del" if a == "add" else a) for a in route]],
                               check=False, capture_output=True)  # fmt: skip
    summary = {
        label: {name: summarize(runs) for name, runs in cases_.items()} for label, cases_ in results.items()
    }
    if args.json:
        print(json.dumps({"families": {
            label: {"summary": summary[label], "runs": results[label]} for label in results
        }}, indent=1))  # fmt: skip
        return 0
    print_table(summary, args)
    return 0


def run_case(
    lab: Any,
    kind: str,
    mode: str | None,
    addr: str,
    family: str,
    name: str,
    kp_nodes: list[Any],
    peer_node: dict[str, Any],
    pod: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One run of case NAME to ADDR (of FAMILY), with the counters it moved; kproxy rows path-checked."""
    n1 = kp_nodes[0]
    if kind == "kproxy":
        assert mode is not None
        set_mode(lab, kp_nodes, mode)
    before_kp = kp_stats(n1.bpffs) if kind == "kproxy" else {}
    before_ct = ct_stats(peer_node[name].ns) if kind == "peer" else {}
    before_be = tcp_stats(pod.ns)
    port = NODE_PORT if kind != "none" else DIRECT_PORT
    try:
        res = loadgen(lab, addr, port, args.duration, args.concurrency)
    except RuntimeError as e:
        res = {"failed": str(e)}
    if kind == "kproxy":
        assert mode is not None
        moved = family_delta(kp_stats(n1.bpffs), before_kp)
        res["kp_counters_by_family"] = moved
        res["counters"] = {k: moved.get(family, {}).get(k, 0) for k in (*KP_COUNTERS, MODE_COUNTERS[mode])}
        res["path_check"] = path_check(mode, family, moved)
    elif kind == "peer":
        res["counters"] = delta(ct_stats(peer_node[name].ns), before_ct, CT_COUNTERS)
    res.setdefault("counters", {}).update(delta(tcp_stats(pod.ns), before_be, BE_COUNTERS))
    return res


if __name__ == "__main__":
    raise SystemExit(main())
