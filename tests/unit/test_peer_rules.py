"""The benchmark peers reproduce the rules the real kube-proxy v1.36.2 wrote (captured in
/work/shared/peer-rules/), and scale that layout to many Services."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import re
from pathlib import Path

import pytest

from bench.peers import compare, iptables, nftables
from bench.peers.model import (
    CLUSTER_CIDR6,
    NODE6,
    SERVICE_CIDR6,
    Endpoint,
    NodeConfig,
    ServicePort,
    categorize,
    reference_services,
    reference_services6,
    synth_services,
)

REF_DIR = Path(__file__).resolve().parents[2] / "bench/peers/reference"
SHARED_DIR = Path("/work/shared/peer-rules")


def _ref(name: str) -> str:
    for d in (REF_DIR, SHARED_DIR):
        if (d / name).exists():
            return (d / name).read_text()
    pytest.skip(f"reference capture {name} not found in {REF_DIR} or {SHARED_DIR}")


@pytest.fixture(scope="module")
def ipt_ref() -> compare.IptTables:
    return compare.parse_iptables(_ref("kube-proxy-iptables.rules"))


@pytest.fixture(scope="module")
def nft_ref() -> compare.NftObjects:
    return compare.parse_nft(_ref("kube-proxy-nftables.nft"))


def test_iptables_reproduces_kube_proxy(ipt_ref: compare.IptTables) -> None:
    got = compare.parse_iptables(iptables.render(reference_services()))
    assert compare.diff_objects(got, ipt_ref) == []


def test_nftables_reproduces_kube_proxy(nft_ref: compare.NftObjects) -> None:
    got = compare.parse_nft(nftables.render(reference_services()))
    assert compare.diff_objects(got, nft_ref) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_service_order_does_not_matter(
    seed: int, ipt_ref: compare.IptTables, nft_ref: compare.NftObjects
) -> None:
    """kube-proxy walks a Go map: any Service order must give the captured rule set."""
    services = reference_services()
    random.Random(seed).shuffle(services)
    assert compare.diff_objects(compare.parse_iptables(iptables.render(services)), ipt_ref) == []
    assert compare.diff_objects(compare.parse_nft(nftables.render(services)), nft_ref) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: dataclasses.replace(s, affinity_timeout=None) if s.name == "dns" else s,
        lambda s: dataclasses.replace(s, external_local=False) if s.name == "lb" else s,
        lambda s: dataclasses.replace(s, endpoints=s.endpoints[:2]) if s.name == "web" else s,
        lambda s: dataclasses.replace(s, source_ranges=()) if s.name == "lb" else s,
        lambda s: dataclasses.replace(s, port_name="web") if s.name == "web" else s,
    ],
    ids=["no-affinity", "etp-cluster", "fewer-endpoints", "no-source-ranges", "port-name"],
)
def test_comparison_catches_layout_changes(mutate, ipt_ref, nft_ref) -> None:  # type: ignore[no-untyped-def]
    services = [mutate(s) for s in reference_services()]
    assert compare.diff_objects(compare.parse_iptables(iptables.render(services)), ipt_ref) != []
    assert compare.diff_objects(compare.parse_nft(nftables.render(services)), nft_ref) != []


def test_probability_rounding_is_normalised_like_the_kernel() -> None:
    a = compare.parse_iptables(
        "*nat\n-A X -m statistic --mode random --probability 0.3333333333 -j Y\nCOMMIT\n"
    )
    b = compare.parse_iptables(
        "*nat\n-A X -m statistic --mode random --probability 0.33333333349 -j Y\nCOMMIT\n"
    )
    c = compare.parse_iptables("*nat\n-A X -m statistic --mode random --probability 0.3333 -j Y\nCOMMIT\n")
    assert a == b
    assert a != c


def test_chain_names_use_kube_proxy_hashes() -> None:
    text = iptables.render(reference_services())
    for chain in ("KUBE-SVC-XRY76EGRC3BSCIIJ", "KUBE-SEP-44G7TT7GZ5X3BGN6", "KUBE-SVL-MWAZOLWASR2RTM3S",
                  "KUBE-FW-MWAZOLWASR2RTM3S", "KUBE-EXT-4IIC76BHGSQBKXMN"):  # fmt: skip
        assert f":{chain} - [0:0]" in text
    nft = nftables.render(reference_services())
    assert "chain service-AXK6CI2C-demo/web/tcp/http {" in nft
    assert "chain endpoint-5RWQVTRI-demo/dns/udp/dns__10.244.1.20/5353 {" in nft


def test_scaled_layout_counts() -> None:
    n, eps = 1000, 10
    services = synth_services(n, eps)
    text = iptables.render(services)
    tables = compare.parse_iptables(text)
    nat = tables["nat"]
    assert len(nat["KUBE-SERVICES"]) == n + 1  # one per ClusterIP + the nodeports catch-all
    assert sum(name.startswith("KUBE-SVC-") for name in nat) == n
    assert sum(name.startswith("KUBE-SEP-") for name in nat) == n * eps
    # per Service: dispatch + masquerade + one rule per endpoint + two per endpoint chain
    assert iptables.rule_count(text) == iptables.rule_count(iptables.render([])) + n * (2 + eps + 2 * eps)
    objs = compare.parse_nft(nftables.render(services))["table ip kube-proxy"]
    assert len(objs["map service-ips"]["elements"]) == n  # type: ignore[index]
    assert len(objs["set cluster-ips"]["elements"]) == n  # type: ignore[index]
    assert sum(k.startswith("chain service-") and "/" in k for k in objs) == n


def test_synth_places_target_in_the_middle() -> None:
    target = ServicePort("bench", "target", "10.96.0.10", 80, 8080, endpoints=(Endpoint("10.244.2.10"),))
    services = synth_services(9, 3, target=target)
    assert services[4] is target
    assert len({s.cluster_ip for s in services}) == 9


def test_terminating_endpoints_only_when_none_ready() -> None:
    term = Endpoint("10.0.0.2", ready=False, serving=True, terminating=True)
    svc = ServicePort("a", "b", "10.96.0.5", 80, 80, endpoints=(Endpoint("10.0.0.1"), term))
    assert categorize(svc).cluster == (Endpoint("10.0.0.1"),)
    only_term = dataclasses.replace(svc, endpoints=(term,))
    assert categorize(only_term).cluster == (term,)
    assert "DNAT --to-destination 10.0.0.2:80" in iptables.render([only_term])


def test_etp_local_without_local_endpoints_drops_external_traffic() -> None:
    svc = ServicePort(
        "a", "lb", "10.96.0.7", 80, 8080, type="LoadBalancer", node_port=30001, external_local=True,
        endpoints=(Endpoint("10.244.2.1"),), lb_ips=("198.51.100.7",),
    )  # fmt: skip
    ipt = compare.parse_iptables(iptables.render([svc]))
    ext = ipt["filter"]["KUBE-EXTERNAL-SERVICES"]
    assert any("198.51.100.7" in r and r.endswith("-j DROP") for r in ext)
    assert any("--dport 30001" in r and r.endswith("-j DROP") for r in ext)
    nft = compare.parse_nft(nftables.render([svc]))["table ip kube-proxy"]
    assert 'tcp . 30001 comment "a/lb" : drop' in nft["map no-endpoint-nodeports"]["elements"]  # type: ignore[index]


def test_nft_endpoint_update_rewrites_only_that_service() -> None:
    svc = synth_services(3, 2)[1]
    script = nftables.endpoint_update(svc)
    lines = script.splitlines()
    assert lines[0].startswith("flush chain ip kube-proxy service-")
    assert lines[1].startswith("add rule ip kube-proxy service-") and "numgen random mod 2 map" in lines[1]
    assert len(lines) == 2
    with pytest.raises(ValueError, match="full sync"):
        nftables.endpoint_update(reference_services()[2])  # dns: affinity


@pytest.mark.parametrize(
    ("seconds", "text"), [(10800, "3h"), (5400, "1h30m"), (90061, "1d1h1m1s"), (0, "0s")]
)
def test_nft_duration(seconds: int, text: str) -> None:
    assert nftables.nft_duration(seconds) == text


def test_nfacct_can_be_left_out() -> None:
    text = iptables.render(reference_services(), NodeConfig(nfacct=False))
    assert "nfacct" not in text
    assert "-d 127.0.0.0/8" in text


# --- IPv6: kube-proxy's IPv6 proxier (no capture exists; the shapes follow proxier.go's family branches,
# and tests/netns/test_peer_rules_apply.py loads them into a kernel) ---


def test_ipv6_node_config_is_the_ipv6_proxier() -> None:
    assert NODE6.family == 6 and NODE6.ipv6
    assert NodeConfig().family == 4 and not NodeConfig().ipv6


def test_ip6tables_layout_differs_from_ipv4_where_kube_proxy_branches() -> None:
    v4 = iptables.render(reference_services())
    v6 = iptables.render(reference_services6(), NODE6)
    # every host match is a /128 and REJECT prints the ICMPv6 type
    assert "/32" not in v6 and "-d fd00:10:96::b028/128 -p tcp" in v6
    assert "-j REJECT --reject-with icmp6-port-unreachable" in v6 and "icmp-port-unreachable" not in v6
    # no localhost NodePorts (route_localnet is IPv4-only): no 127.0.0.0/8 rule, no nfacct for them
    assert "127.0.0.0/8" not in v6 and iptables.NFACCT_LOCALHOST_NP not in v6
    assert iptables.NFACCT_INVALID in v6  # the conntrack INVALID counter is per proxier, both families
    # KUBE-FIREWALL exists with its INPUT/OUTPUT jumps but holds no rule (the localnet rule is IPv4-only)
    assert ":KUBE-FIREWALL - [0:0]" in v6 and "-A INPUT -j KUBE-FIREWALL" in v6
    assert "-A KUBE-FIREWALL " not in v6 and "-A KUBE-FIREWALL " in v4
    # the NodePorts catch-all leaves ::1 out and stays last
    nat6 = compare.parse_iptables(v6)["nat"]
    assert (
        "! -d ::1/128 -m comment" in v6.split("-A KUBE-SERVICES ")[-1]
        and "--dst-type LOCAL" in nat6["KUBE-SERVICES"][-1]
    )
    # the IPv6 cluster CIDR in the masquerade and short-circuit rules, DNAT to [addr]:port, IPv6 recent masks
    assert "! -s fd00:10:244::/56 -d fd00:10:96::b028/128" in v6 and "-s 10.244.0.0/16" not in v6
    assert "-j DNAT --to-destination [fd00:10:244:1::10]:8080" in v6
    assert "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource" in v6
    assert "-A KUBE-FW-MWAZOLWASR2RTM3S -s 2001:db8:113::/64 " in v6
    # same Service chains (their hash has no address), other endpoint chains ("[addr]:port" is in the hash)
    nat4 = compare.parse_iptables(v4)["nat"]
    svc4 = {c for c in nat4 if not c.startswith("KUBE-SEP-")}
    assert svc4 == {c for c in nat6 if not c.startswith("KUBE-SEP-")}
    sep4, sep6 = ({c for c in t if c.startswith("KUBE-SEP-")} for t in (nat4, nat6))
    assert len(sep4) == len(sep6) and not sep4 & sep6
    # IPv4 minus two localhost NodePort rules (np, lb) and the KUBE-FIREWALL rule
    assert iptables.rule_count(v6) == iptables.rule_count(v4) - 3


def test_nft_ip6_table_uses_the_ipv6_payload_everywhere() -> None:
    script = nftables.render(reference_services6(), NODE6)
    # replaces only the IPv6 proxier's table: the IPv4 proxier's table is another transaction
    assert script.startswith("table ip6 kube-proxy\ndelete table ip6 kube-proxy\ntable ip6 kube-proxy {")
    assert "table ip kube-proxy" not in script
    assert not re.search(r"\bip (saddr|daddr)\b|ipv4_addr|dnat ip to", script)
    objs = compare.parse_nft(script)["table ip6 kube-proxy"]
    assert "type ipv6_addr . inet_proto . inet_service : verdict" in objs["map service-ips"]["props"]  # type: ignore[index]
    assert "fd00:77::2" in objs["set nodeport-ips"]["elements"]  # type: ignore[index]
    assert (
        "ip6 daddr @cluster-ips ip6 saddr != fd00:10:244::/56 meta mark set meta mark | 0x00004000 "
        'comment "masquerade clusterIP traffic from outside cluster"'
    ) in objs["chain services"]
    assert 'ip6 daddr fd00:10:96::/108 drop comment "Drop traffic to unallocated ClusterIPs"' in script
    assert "meta l4proto tcp dnat ip6 to numgen random mod 3 map { 0 : fd00:10:244:1::10 . 8080," in script
    # affinity: IPv6 source sets, DNAT to [addr]:port, chain names with the address's colons as dots
    assert "update @affinity-4DDWNQSU-demo/dns/udp/dns__fd00.10.244.1..20/5353 { ip6 saddr }" in script
    assert "meta l4proto udp dnat to [fd00:10:244:1::20]:5353" in script
    assert "ip6 saddr != 2001:db8:113::/64 drop" in script
    assert "ip6 saddr fd00:10:244::/56 goto service-" in script


def test_nft_ip6_endpoint_update_is_an_ip6_transaction() -> None:
    svc = synth_services(3, 2, family=6)[1]
    lines = nftables.endpoint_update(svc, NODE6).splitlines()
    assert lines[0].startswith("flush chain ip6 kube-proxy service-")
    assert (
        lines[1].startswith("add rule ip6 kube-proxy service-")
        and "dnat ip6 to numgen random mod 2" in lines[1]
    )


def test_synth_services_ipv6_stay_in_the_cidrs() -> None:
    services = synth_services(5000, 10, family=6)
    vips = {ipaddress.ip_address(s.cluster_ip) for s in services}
    assert len(vips) == 5000 and all(v in ipaddress.ip_network(SERVICE_CIDR6) for v in vips)
    eps = {ipaddress.ip_address(e.ip) for s in services for e in s.endpoints}
    assert len(eps) == 4096 and all(e in ipaddress.ip_network(CLUSTER_CIDR6) for e in eps)


def test_ipv6_scaled_layout_counts_match_ipv4() -> None:
    """The IPv6 rule sets grow exactly like the IPv4 ones: the benchmark compares like with like."""
    n = 200
    v4, v6 = synth_services(n, 10), synth_services(n, 10, family=6)
    assert iptables.rule_count(iptables.render(v6, NODE6)) == iptables.rule_count(iptables.render(v4)) - 1
    o4 = compare.parse_nft(nftables.render(v4))["table ip kube-proxy"]
    o6 = compare.parse_nft(nftables.render(v6, NODE6))["table ip6 kube-proxy"]
    assert len(o6["map service-ips"]["elements"]) == len(o4["map service-ips"]["elements"]) == n  # type: ignore[index]
    assert sorted(k.split(" ")[0] for k in o6) == sorted(k.split(" ")[0] for k in o4)
