"""iptables peer: the rule layout kube-proxy v1.36's iptables proxier writes, for any number of Services.

One proxier per family, as in kube-proxy: ``render(services, node)`` gives ``iptables-restore``
input for an IPv4 ``node`` and ``ip6tables-restore`` input for an IPv6 one (``model.NODE6``). The
IPv6 proxier differs where kube-proxy's proxier.go branches on the family: /128 host masks, REJECT
printed with ``--reject-with icmp6-port-unreachable``, no localhost NodePort rule (route_localnet is
IPv4-only) and no rule in KUBE-FIREWALL (its localnet rule is IPv4-only; the chain and its jumps
stay, kubelet's jump chains), the KUBE-NODEPORTS tail rule excluding ``::1/128``, DNAT to
``[addr]:port``, IPv6 ``recent`` masks and the IPv6 cluster CIDR for the masquerade rules.

The output is a complete ``iptables-restore`` input (mangle, filter and nat tables) written the way
``iptables-save`` prints it (canonical match order, chains sorted), so a generated file and a
capture of the real kube-proxy can be compared line by line. Loading it with ``iptables-restore``
replaces the tables in one go, which is what kube-proxy's full sync does. The nfacct matches need
their accounting objects to exist first (see ``bench.peers.nfacct``), as kube-proxy creates them.
"""

# Rule texts are kept whole, as kube-proxy prints them, so they can be grepped against captures.
# ruff: noqa: E501

from __future__ import annotations

import ipaddress
from collections import defaultdict

from bench.peers.model import Categorized, Endpoint, NodeConfig, ServicePort, categorize, ipt_hash

MARK_MASQ = "KUBE-MARK-MASQ"
NFACCT_LOCALHOST_NP = "localhost_nps_accepted_pkts"
NFACCT_INVALID = "ct_state_invalid_dropped_pkts"
NFACCT_OBJECTS = (NFACCT_INVALID, NFACCT_LOCALHOST_NP)

_MANGLE = """*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
"""

_FILTER_BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
_FILTER_CHAINS = (
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FIREWALL",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-CANARY",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SERVICES",
)
_FILTER_STATIC = [
    ("INPUT", "-j KUBE-FIREWALL"),
    ("INPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
              "-j KUBE-PROXY-FIREWALL"),
    ("INPUT", '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS'),
    ("INPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
              "-j KUBE-EXTERNAL-SERVICES"),
    ("FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
                "-j KUBE-PROXY-FIREWALL"),
    ("FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    ("FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
                "-j KUBE-EXTERNAL-SERVICES"),
    ("OUTPUT", "-j KUBE-FIREWALL"),
    ("OUTPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
               "-j KUBE-PROXY-FIREWALL"),
    ("OUTPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("KUBE-FIREWALL", '! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" '
                      "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"),
]  # fmt: skip

_NAT_BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
_NAT_STATIC = [
    ("PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
    (MARK_MASQ, "-j MARK --set-xmark 0x4000/0x4000"),
    ("KUBE-POSTROUTING", "-m mark ! --mark 0x4000/0x4000 -j RETURN"),
    ("KUBE-POSTROUTING", "-j MARK --set-xmark 0x4000/0x0"),
    ("KUBE-POSTROUTING", '-m comment --comment "kubernetes service traffic requiring SNAT" '
                         "-j MASQUERADE --random-fully"),
]  # fmt: skip
_NAT_STATIC_CHAINS = (MARK_MASQ, "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-PROXY-CANARY", "KUBE-SERVICES")
_NODEPORTS_LAST = (
    '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" '
    "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
)


def probability(n: int) -> str:
    """kube-proxy's probability(n): 1/n printed with 10 decimals (the kernel keeps 31 bits)."""
    return f"{1.0 / n:0.10f}"


def _q(text: str) -> str:
    return f'"{text}"'


def _host(ip: str) -> str:
    """An address as iptables-save prints a host match: /32, or /128 for IPv6."""
    if "/" in ip:
        return ip
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _dst(ip: str) -> str:
    return f"-d {_host(ip)}"


def _reject(node: NodeConfig) -> str:
    # kube-proxy writes a bare "-j REJECT"; iptables-save / ip6tables-save print the default type.
    return "REJECT --reject-with " + ("icmp6-port-unreachable" if node.ipv6 else "icmp-port-unreachable")


def _recent_mask(node: NodeConfig) -> str:
    # the recent match's default mask (every address bit), as the save tools print it
    return "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" if node.ipv6 else "255.255.255.255"


class _Tables:
    def __init__(self) -> None:
        self.filter: dict[str, list[str]] = defaultdict(list)
        self.nat: dict[str, list[str]] = defaultdict(list)
        self.nat_chains: set[str] = set(_NAT_STATIC_CHAINS)


def _svc_port_match(svc: ServicePort, ip: str, port: int, comment: str) -> str:
    p = svc.proto
    return f"{_dst(ip)} -p {p} -m comment --comment {_q(comment)} -m {p} --dport {port}"


def _write_service(t: _Tables, svc: ServicePort, node: NodeConfig) -> None:
    c: Categorized = categorize(svc)
    name = svc.port_name_string
    h = ipt_hash(svc)
    svc_chain, svl_chain = f"KUBE-SVC-{h}", f"KUBE-SVL-{h}"
    ext_chain, fw_chain = f"KUBE-EXT-{h}", f"KUBE-FW-{h}"
    p = svc.proto

    internal_chain = svl_chain if svc.internal_local else svc_chain
    external_policy_chain = svl_chain if svc.external_local else svc_chain
    if not c.has_endpoints:
        int_target = ext_target = _reject(node)
        int_comment = ext_comment = f"{name} has no endpoints"
    else:
        int_target = ext_target = "DROP"
        int_comment = ext_comment = f"{name} has no local endpoints"

    # ClusterIP capture (nat) or rejection (filter).
    if c.has_internal:
        t.nat["KUBE-SERVICES"].append(
            f"{_svc_port_match(svc, svc.cluster_ip, svc.port, f'{name} cluster IP')} -j {internal_chain}"
        )
    else:
        t.filter["KUBE-SERVICES"].append(
            f"{_svc_port_match(svc, svc.cluster_ip, svc.port, int_comment)} -j {int_target}"
        )

    for ip in svc.external_ips:
        if c.has_endpoints:
            t.nat["KUBE-SERVICES"].append(
                f"{_svc_port_match(svc, ip, svc.port, f'{name} external IP')} -j {ext_chain}"
            )
        if not c.has_external:
            t.filter["KUBE-EXTERNAL-SERVICES"].append(
                f"{_svc_port_match(svc, ip, svc.port, ext_comment)} -j {ext_target}"
            )

    uses_fw = bool(svc.source_ranges) and c.has_endpoints
    lb_target = fw_chain if uses_fw else ext_chain
    for ip in svc.lb_ips:
        if c.has_endpoints:
            t.nat["KUBE-SERVICES"].append(
                f"{_svc_port_match(svc, ip, svc.port, f'{name} loadbalancer IP')} -j {lb_target}"
            )
        if uses_fw:
            t.filter["KUBE-PROXY-FIREWALL"].append(
                f"{_svc_port_match(svc, ip, svc.port, f'{name} traffic not accepted by {fw_chain}')} -j DROP"
            )
    if not c.has_external:
        for ip in svc.lb_ips:
            t.filter["KUBE-EXTERNAL-SERVICES"].append(
                f"{_svc_port_match(svc, ip, svc.port, ext_comment)} -j {ext_target}"
            )

    if svc.node_port:
        if c.has_endpoints:
            m = f"-p {p} -m comment --comment {_q(name)} -m {p} --dport {svc.node_port}"
            # proxier.go: only the IPv4 proxier accepts NodePorts on localhost (route_localnet)
            if node.localhost_nodeports and not node.ipv6:
                acct = f" -m nfacct --nfacct-name  {NFACCT_LOCALHOST_NP}" if node.nfacct else ""
                t.nat["KUBE-NODEPORTS"].append(f"-d 127.0.0.0/8 {m}{acct} -j {ext_chain}")
            t.nat["KUBE-NODEPORTS"].append(f"{m} -j {ext_chain}")
        if not c.has_external:
            t.filter["KUBE-EXTERNAL-SERVICES"].append(
                f"-p {p} -m comment --comment {_q(ext_comment)} -m addrtype --dst-type LOCAL "
                f"-m {p} --dport {svc.node_port} -j {ext_target}"
            )
    if svc.health_check_node_port:
        t.filter["KUBE-NODEPORTS"].append(
            f"-p tcp -m comment --comment {_q(f'{name} health check node port')} "
            f"-m tcp --dport {svc.health_check_node_port} -j ACCEPT"
        )

    if not c.has_endpoints:
        return

    if c.uses_cluster_chain:
        t.nat_chains.add(svc_chain)
    if c.uses_local_chain:
        t.nat_chains.add(svl_chain)

    # Internal traffic from outside the cluster CIDR is masqueraded (localDetector.IfNotLocal).
    if c.has_internal:
        t.nat[internal_chain].append(
            f"! -s {node.cluster_cidr} {_svc_port_match(svc, svc.cluster_ip, svc.port, f'{name} cluster IP')}"
            f" -j {MARK_MASQ}"
        )

    if c.uses_external_chain:
        t.nat_chains.add(ext_chain)
        ext = t.nat[ext_chain]
        if not svc.external_local:
            ext.append(
                f'-m comment --comment "masquerade traffic for {name} external destinations" -j {MARK_MASQ}'
            )
        else:
            ext.append(
                f'-s {node.cluster_cidr} -m comment --comment "pod traffic for {name} external destinations" '
                f"-j {svc_chain}"
            )
            ext.append(
                f'-m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {MARK_MASQ}"
            )
            ext.append(
                f'-m comment --comment "route LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {svc_chain}"
            )
        if c.has_external:
            ext.append(f"-j {external_policy_chain}")

    if uses_fw:
        t.nat_chains.add(fw_chain)
        fw = t.nat[fw_chain]
        lb_comment = f"-m comment --comment {_q(f'{name} loadbalancer IP')}"
        allow_from_node = False
        for cidr in svc.source_ranges:
            fw.append(f"-s {cidr} {lb_comment} -j {ext_chain}")
            net = ipaddress.ip_network(cidr, strict=False)
            allow_from_node |= any(ipaddress.ip_address(n) in net for n in node.node_ips)
        if allow_from_node:
            for ip in svc.lb_ips:
                fw.append(f"-s {_host(ip)} {lb_comment} -j {ext_chain}")
        fw.append(f'-m comment --comment "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"')

    if c.uses_cluster_chain:
        _write_lb_rules(t, svc, svc_chain, c.cluster, node)
    if c.uses_local_chain:
        _write_lb_rules(t, svc, svl_chain, c.local, node)

    for ep in c.reachable:
        sep = f"KUBE-SEP-{ipt_hash(svc, svc.ep_string(ep))}"
        t.nat_chains.add(sep)
        cm = f"-m comment --comment {_q(name)}"
        t.nat[sep].append(f"-s {_host(ep.ip)} {cm} -j {MARK_MASQ}")
        recent = (
            f" -m recent --set --name {sep} --mask {_recent_mask(node)} --rsource"
            if svc.affinity_timeout
            else ""
        )
        t.nat[sep].append(f"-p {p} {cm}{recent} -m {p} -j DNAT --to-destination {svc.ep_string(ep)}")


def _write_lb_rules(
    t: _Tables, svc: ServicePort, chain: str, endpoints: tuple[Endpoint, ...], node: NodeConfig
) -> None:
    """writeServiceToEndpointRules: affinity checks first, then the statistic cascade."""
    name = svc.port_name_string
    rules = t.nat[chain]
    seps = [f"KUBE-SEP-{ipt_hash(svc, svc.ep_string(ep))}" for ep in endpoints]
    if svc.affinity_timeout:
        for ep, sep in zip(endpoints, seps, strict=True):
            rules.append(
                f"-m comment --comment {_q(f'{name} -> {svc.ep_string(ep)}')} -m recent --rcheck "
                f"--seconds {svc.affinity_timeout} --reap --name {sep} --mask {_recent_mask(node)} --rsource -j {sep}"
            )
    n = len(endpoints)
    for i, (ep, sep) in enumerate(zip(endpoints, seps, strict=True)):
        stat = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        rules.append(f"-m comment --comment {_q(f'{name} -> {svc.ep_string(ep)}')}{stat} -j {sep}")


def render(services: list[ServicePort], node: NodeConfig | None = None) -> str:
    """The complete iptables-restore input for ``services`` on ``node``."""
    node = node or NodeConfig()
    t = _Tables()
    for svc in services:
        _write_service(t, svc, node)

    out = [_MANGLE, "*filter\n"]
    out += [f":{ch} ACCEPT [0:0]\n" for ch in _FILTER_BUILTIN]
    out += [f":{ch} - [0:0]\n" for ch in _FILTER_CHAINS]
    # KUBE-FIREWALL's localnet rule exists only for IPv4 (proxier.go); the chain and its jumps stay.
    out += [f"-A {ch} {rule}\n" for ch, rule in _FILTER_STATIC if not (node.ipv6 and ch == "KUBE-FIREWALL")]
    forward = [
        "-m conntrack --ctstate INVALID"
        + (f" -m nfacct --nfacct-name  {NFACCT_INVALID}" if node.nfacct else "")
        + " -j DROP",
        '-m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED '
        "-j ACCEPT",
    ]
    out += [f"-A KUBE-FORWARD {r}\n" for r in forward]
    for ch in ("KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES"):
        out += [f"-A {ch} {r}\n" for r in t.filter[ch]]
    out.append("COMMIT\n*nat\n")
    out += [f":{ch} ACCEPT [0:0]\n" for ch in _NAT_BUILTIN]
    chains = sorted(t.nat_chains)
    out += [f":{ch} - [0:0]\n" for ch in chains]
    out += [f"-A {ch} {rule}\n" for ch, rule in _NAT_STATIC[:3]]
    # IPv6 NodePorts never work on localhost: the tail rule leaves ::1 out (iptables-save order).
    t.nat["KUBE-SERVICES"].append(f"! -d ::1/128 {_NODEPORTS_LAST}" if node.ipv6 else _NODEPORTS_LAST)
    static = defaultdict(list)
    for ch, rule in _NAT_STATIC[3:]:
        static[ch].append(rule)
    for ch in chains:
        out += [f"-A {ch} {r}\n" for r in static.get(ch, []) + t.nat.get(ch, [])]
    out.append("COMMIT\n")
    return "".join(out)


def rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))
