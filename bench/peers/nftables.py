"""nftables peer: the layout kube-proxy v1.36's nftables proxier writes, for any number of Services.

The output is an ``nft -f`` script in the declarative form ``nft list ruleset`` prints, preceded by
"create-if-missing, then delete" of the kube-proxy tables so the whole set is replaced in one
transaction (kube-proxy's full sync). ``endpoint_update`` gives the partial-sync transaction
kube-proxy runs when one Service's endpoints change (its chains flushed and rewritten).

One proxier per family, as in kube-proxy: an IPv4 ``node`` gives ``table ip kube-proxy`` (with the
IPv6 proxier's empty ``table ip6`` beside it, as the capture shows), an IPv6 one (``model.NODE6``)
gives ``table ip6 kube-proxy`` filled: ``ip6 saddr``/``ip6 daddr`` matches, ``ipv6_addr`` set and
map types, ``dnat ip6 to`` and the IPv6 cluster and service CIDRs, as proxier.go's ``ipX`` /
``ipvX_addr`` make them.
"""

# Rule texts are kept whole, as kube-proxy prints them, so they can be grepped against captures.
# ruff: noqa: E501

from __future__ import annotations

import ipaddress

from bench.peers.model import MASQ_MARK, Categorized, Endpoint, NodeConfig, ServicePort, categorize, nft_base

TABLE = "kube-proxy"
REJECT = "goto reject-chain"


def nft_duration(seconds: int) -> str:
    """Durations as nft prints them: 10800 -> "3h", 5400 -> "1h30m"."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def _names(svc: ServicePort) -> dict[str, str]:
    base = nft_base(svc)
    return {
        "service": f"service-{base}",
        "local": f"local-{base}",
        "external": f"external-{base}",
        "firewall": f"firewall-{base}",
    }


def _ep_chain(svc: ServicePort, ep: Endpoint) -> str:
    return f"endpoint-{nft_base(svc, ep)}"


def _affinity_set(svc: ServicePort, ep: Endpoint) -> str:
    return f"affinity-{nft_base(svc, ep)}"


class _Ruleset:
    def __init__(self) -> None:
        self.hairpin: list[str] = []
        self.cluster_ips: list[str] = []
        self.no_ep_services: list[str] = []
        self.no_ep_nodeports: list[str] = []
        self.firewall_ips: list[str] = []
        self.service_ips: list[str] = []
        self.service_nodeports: list[str] = []
        self.affinity_sets: list[tuple[str, int]] = []
        self.chains: list[tuple[str, list[str]]] = []


def _ip(node: NodeConfig) -> str:
    """proxier.go's ipX: the payload expression of the family ("ip" / "ip6")."""
    return "ip6" if node.ipv6 else "ip"


def _addr_type(node: NodeConfig) -> str:
    """proxier.go's ipvX_addr."""
    return "ipv6_addr" if node.ipv6 else "ipv4_addr"


def _dispatch_rules(svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeConfig) -> list[str]:
    """Rules of a service-/local- chain: affinity checks, then a numgen pick."""
    n = len(endpoints)
    ipx = _ip(node)
    if svc.affinity_timeout:
        rules = [f"{ipx} saddr @{_affinity_set(svc, ep)} goto {_ep_chain(svc, ep)}" for ep in endpoints]
        vmap = ", ".join(f"{i} : goto {_ep_chain(svc, ep)}" for i, ep in enumerate(endpoints))
        rules.append(f"numgen random mod {n} vmap {{ {vmap} }}")
        return rules
    targets = ", ".join(f"{i} : {ep.ip} . {svc.target_port}" for i, ep in enumerate(endpoints))
    return [f"meta l4proto {svc.proto} dnat {ipx} to numgen random mod {n} map {{ {targets} }}"]


def _service_chains(svc: ServicePort, c: Categorized, node: NodeConfig) -> list[tuple[str, list[str]]]:
    names = _names(svc)
    ipx = _ip(node)
    chains: list[tuple[str, list[str]]] = []
    if svc.affinity_timeout:
        for ep in c.reachable:
            chains.append(
                (
                    _ep_chain(svc, ep),
                    [
                        f"update @{_affinity_set(svc, ep)} {{ {ipx} saddr }}",
                        f"meta l4proto {svc.proto} dnat to {svc.ep_string(ep)}",
                    ],
                )
            )
    if c.uses_cluster_chain:
        chains.append((names["service"], _dispatch_rules(svc, c.cluster, node)))
    if c.uses_local_chain:
        chains.append((names["local"], _dispatch_rules(svc, c.local, node)))
    if c.uses_external_chain:
        ext: list[str] = []
        if not svc.external_local:
            ext.append(f'meta mark set meta mark | 0x{MASQ_MARK:08x} comment "masquerade"')
            ext.append(f"goto {names['service']}")
        else:
            ext += [
                f'{ipx} saddr {node.cluster_cidr} goto {names["service"]} comment "short-circuit pod traffic"',
                f'fib saddr type local meta mark set meta mark | 0x{MASQ_MARK:08x} comment "masquerade local traffic"',
                f'fib saddr type local goto {names["service"]} comment "short-circuit local traffic"',
            ]
            if c.has_external:
                ext.append(f"goto {names['local']}")
        chains.append((names["external"], ext))
    if svc.source_ranges and c.has_endpoints:
        sources = list(svc.source_ranges)
        if any(
            ipaddress.ip_address(n) in ipaddress.ip_network(r, strict=False)
            for r in svc.source_ranges
            for n in node.node_ips
        ):
            sources += list(svc.lb_ips)
        src = sources[0] if len(sources) == 1 else "{ " + ", ".join(sources) + " }"
        chains.append((names["firewall"], [f"{ipx} saddr != {src} drop"]))
    return chains


def _add_service(r: _Ruleset, svc: ServicePort, node: NodeConfig) -> None:
    c = categorize(svc)
    names = _names(svc)
    p = svc.proto
    key = f"{p} . {svc.port}"
    r.cluster_ips.append(svc.cluster_ip)
    int_verdict = REJECT if not c.has_endpoints else "drop"

    if c.has_internal:
        r.service_ips.append(
            f"{svc.cluster_ip} . {key} : goto {names['local' if svc.internal_local else 'service']}"
        )
    else:
        r.no_ep_services.append(f'{svc.cluster_ip} . {key} comment "{svc.port_name_string}" : {int_verdict}')

    ext_ips = list(svc.external_ips) + list(svc.lb_ips)
    for ip in ext_ips:
        if c.has_endpoints:
            r.service_ips.append(f"{ip} . {key} : goto {names['external']}")
        if not c.has_external:
            r.no_ep_services.append(f'{ip} . {key} comment "{svc.port_name_string}" : {int_verdict}')
    if svc.source_ranges and c.has_endpoints:
        for ip in svc.lb_ips:
            r.firewall_ips.append(f"{ip} . {key} : goto {names['firewall']}")
    if svc.node_port:
        if c.has_endpoints:
            r.service_nodeports.append(f"{p} . {svc.node_port} : goto {names['external']}")
        if not c.has_external:
            r.no_ep_nodeports.append(
                f'{p} . {svc.node_port} comment "{svc.port_name_string}" : {int_verdict}'
            )
    if not c.has_endpoints:
        return
    for ep in c.reachable:
        if ep.local:
            r.hairpin.append(f"{ep.ip} . {ep.ip} . {p} . {svc.target_port}")
        if svc.affinity_timeout:
            r.affinity_sets.append((_affinity_set(svc, ep), svc.affinity_timeout))
    r.chains += _service_chains(svc, c, node)


def _elements(items: list[str]) -> list[str]:
    if not items:
        return []
    body = ",\n\t\t\t     ".join(items)
    return [f"\t\telements = {{ {body} }}"]


def _block(kind: str, name: str, lines: list[str]) -> list[str]:
    return [f"\t{kind} {name} {{", *lines, "\t}", ""]


def _static_chains(node: NodeConfig) -> list[str]:
    cidr, scidr = node.cluster_cidr, node.service_cidr
    mark = f"0x{MASQ_MARK:08x}"
    ipx = _ip(node)
    spec = [
        ("filter-prerouting-pre-dnat",
         ["type filter hook prerouting priority dstnat - 10; policy accept;", "ct state new jump firewall-check"]),
        ("filter-output-pre-dnat",
         ["type filter hook output priority -110; policy accept;", "ct state new jump firewall-check"]),
        ("filter-input", ["type filter hook input priority filter; policy accept;",
                          "ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check"]),
        ("filter-forward", ["type filter hook forward priority filter; policy accept;",
                            "ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"]),
        ("filter-output", ["type filter hook output priority filter; policy accept;",
                           "ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"]),
        ("nat-prerouting", ["type nat hook prerouting priority dstnat; policy accept;", "jump services"]),
        ("nat-output", ["type nat hook output priority -100; policy accept;", "jump services"]),
        ("nat-postrouting", ["type nat hook postrouting priority srcnat; policy accept;", "jump masquerading"]),
        ("nodeport-endpoints-check", [f"{ipx} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"]),
        ("service-endpoints-check", [f"{ipx} daddr . meta l4proto . th dport vmap @no-endpoint-services"]),
        ("firewall-check", [f"{ipx} daddr . meta l4proto . th dport vmap @firewall-ips"]),
        ("services", [
            f"{ipx} daddr @cluster-ips {ipx} saddr != {cidr} meta mark set meta mark | {mark} "
            'comment "masquerade clusterIP traffic from outside cluster"',
            f"{ipx} daddr . meta l4proto . th dport vmap @service-ips",
            f"{ipx} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ]),
        ("masquerading", [
            f"meta mark & {mark} != 0x00000000 meta mark set meta mark ^ {mark} masquerade fully-random",
            f"ct status dnat {ipx} saddr . {ipx} daddr . meta l4proto . th dport @hairpin-connections "
            "masquerade fully-random",
        ]),
        ("cluster-ips-check", [
            f'{ipx} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
            f'{ipx} daddr {scidr} drop comment "Drop traffic to unallocated ClusterIPs"',
        ]),
        ("reject-chain", ['comment "helper for @no-endpoint-services / @no-endpoint-nodeports"', "reject"]),
    ]  # fmt: skip
    out: list[str] = []
    for name, rules in spec:
        out += _block("chain", name, [f"\t\t{r}" for r in rules])
    return out


def _vmap(name: str, key: str, comment: str, items: list[str]) -> list[str]:
    return _block("map", name, [f"\t\ttype {key} : verdict", f'\t\tcomment "{comment}"', *_elements(items)])


def render_table(services: list[ServicePort], node: NodeConfig | None = None) -> str:
    """The ``table ip kube-proxy { ... }`` block (``table ip6`` for an IPv6 node), in ``nft list
    ruleset`` form."""
    node = node or NodeConfig()
    r = _Ruleset()
    for svc in services:
        _add_service(r, svc, node)
    at = _addr_type(node)
    addr_key = f"{at} . inet_proto . inet_service"
    out = [f"table {_ip(node)} {TABLE} {{", '\tcomment "rules for kube-proxy"']
    out += _block(
        "set",
        "hairpin-connections",
        [
            f"\t\ttype {at} . {at} . inet_proto . inet_service",
            '\t\tcomment "service hairpin connections"',
            *_elements(r.hairpin),
        ],
    )
    out += _block(
        "set",
        "cluster-ips",
        [f"\t\ttype {at}", '\t\tcomment "Active ClusterIPs"', *_elements(r.cluster_ips)],
    )
    out += _block(
        "set",
        "nodeport-ips",
        [
            f"\t\ttype {at}",
            '\t\tcomment "IPs that accept NodePort traffic"',
            *_elements(list(node.node_ips)),
        ],
    )
    out += _vmap(
        "no-endpoint-services",
        addr_key,
        "vmap to drop or reject packets to services with no endpoints",
        r.no_ep_services,
    )
    out += _vmap(
        "no-endpoint-nodeports",
        "inet_proto . inet_service",
        "vmap to drop or reject packets to service nodeports with no endpoints",
        r.no_ep_nodeports,
    )
    out += _vmap(
        "firewall-ips", addr_key, "destinations that are subject to LoadBalancerSourceRanges", r.firewall_ips
    )
    out += _vmap("service-ips", addr_key, "ClusterIP, ExternalIP and LoadBalancer IP traffic", r.service_ips)
    out += _vmap("service-nodeports", "inet_proto . inet_service", "NodePort traffic", r.service_nodeports)
    for name, timeout in r.affinity_sets:
        out += _block(
            "set",
            name,
            [
                f"\t\ttype {at}",
                "\t\tsize 65535",
                "\t\tflags dynamic,timeout",
                f"\t\ttimeout {nft_duration(timeout)}",
            ],
        )
    out += _static_chains(node)
    for name, rules in r.chains:
        out += _block("chain", name, [f"\t\t{x}" for x in rules])
    if out[-1] == "":
        out.pop()
    out.append("}")
    return "\n".join(out) + "\n"  # fmt: skip


_IP6_TABLE = """table ip6 kube-proxy {
	comment "rules for kube-proxy"
	set hairpin-connections {
		type ipv6_addr . ipv6_addr . inet_proto . inet_service
		comment "service hairpin connections"
	}

	set cluster-ips {
		type ipv6_addr
		comment "Active ClusterIPs"
	}

	map no-endpoint-services {
		type ipv6_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
	}

	map no-endpoint-nodeports {
		type inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to service nodeports with no endpoints"
	}

	map firewall-ips {
		type ipv6_addr . inet_proto . inet_service : verdict
		comment "destinations that are subject to LoadBalancerSourceRanges"
	}

	map service-ips {
		type ipv6_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
	}

	map service-nodeports {
		type inet_proto . inet_service : verdict
		comment "NodePort traffic"
	}

	chain filter-prerouting-pre-dnat {
		type filter hook prerouting priority dstnat - 10; policy accept;
		ct state new jump firewall-check
	}

	chain filter-output-pre-dnat {
		type filter hook output priority -110; policy accept;
		ct state new jump firewall-check
	}

	chain filter-input {
		type filter hook input priority filter; policy accept;
		ct state new jump nodeport-endpoints-check
		ct state new jump service-endpoints-check
	}

	chain filter-forward {
		type filter hook forward priority filter; policy accept;
		ct state new jump service-endpoints-check
		ct state new jump cluster-ips-check
	}

	chain filter-output {
		type filter hook output priority filter; policy accept;
		ct state new jump service-endpoints-check
		ct state new jump cluster-ips-check
	}

	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}

	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}

	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}

	chain nodeport-endpoints-check {
		ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports
	}

	chain service-endpoints-check {
		ip6 daddr . meta l4proto . th dport vmap @no-endpoint-services
	}

	chain firewall-check {
		ip6 daddr . meta l4proto . th dport vmap @firewall-ips
	}

	chain services {
		ip6 daddr . meta l4proto . th dport vmap @service-ips
		fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports
	}

	chain masquerading {
		meta mark & 0x00004000 != 0x00000000 meta mark set meta mark ^ 0x00004000 masquerade fully-random
		ct status dnat ip6 saddr . ip6 daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random
	}

	chain cluster-ips-check {
		ip6 daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
	}

	chain reject-chain {
		comment "helper for @no-endpoint-services / @no-endpoint-nodeports"
		reject
	}
}
"""


def render_listing(services: list[ServicePort], node: NodeConfig | None = None) -> str:
    """What ``nft list ruleset`` shows once the script is loaded (the form of the reference capture)."""
    node = node or NodeConfig()
    if node.ipv6:
        return render_table(services, node)
    return render_table(services, node) + (_IP6_TABLE if node.ipv6_table else "")


def render(services: list[ServicePort], node: NodeConfig | None = None) -> str:
    """An ``nft -f`` script that replaces kube-proxy's tables with the layout for ``services``. For an
    IPv6 node only ``table ip6 kube-proxy`` (the IPv4 proxier's table is its own transaction)."""
    node = node or NodeConfig()
    if node.ipv6:
        head = [f"table ip6 {TABLE}", f"delete table ip6 {TABLE}"]
    else:
        head = [f"table ip {TABLE}", f"delete table ip {TABLE}"]
    if node.ipv6_table and not node.ipv6:
        head += [f"table ip6 {TABLE}", f"delete table ip6 {TABLE}"]
    return "\n".join(head) + "\n" + render_listing(services, node)


def endpoint_update(svc: ServicePort, node: NodeConfig | None = None) -> str:
    """kube-proxy's partial sync after an endpoint change of ``svc``: its chains flushed and refilled.

    Covers Services without affinity whose set of chains does not change (the benchmark's case:
    an endpoint replaced in a ClusterIP Service), which is one transaction of a few statements.
    """
    node = node or NodeConfig()
    c = categorize(svc)
    if svc.affinity_timeout or not c.has_endpoints:
        raise ValueError(
            f"endpoint_update: {svc.port_name_string} needs a full sync (affinity or no endpoints)"
        )
    lines = []
    fam = _ip(node)
    for name, rules in _service_chains(svc, c, node):
        lines.append(f"flush chain {fam} {TABLE} {name}")
        lines += [f"add rule {fam} {TABLE} {name} {rule}" for rule in rules]
    return "\n".join(lines) + "\n"
