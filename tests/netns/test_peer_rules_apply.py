"""The peer rule sets load into a real kernel and DNAT real connections (own namespaces only)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

from bench import netbench as nb
from bench.peers import compare, iptables, nftables
from bench.peers.model import NODE6, NodeConfig, reference_services, reference_services6

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ip", "nft", nb.IPTABLES_RESTORE, nb.IP6TABLES_RESTORE, "gcc")),
        reason="needs iproute2, nftables, iptables and ip6tables (nft backend) and gcc",
    ),
]

NODE = NodeConfig(node_ips=(nb.NODE_IP,))


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    nb.ensure_tools()


@pytest.fixture
def topo():  # type: ignore[no-untyped-def]
    t = nb.Topology()
    with t:
        t.start_servers()
        yield t
    remaining = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert t.prefix not in remaining, f"namespaces of {t.prefix} left behind"


def _connect(topo: nb.Topology, addr: str, port: int, n: int = 40) -> dict:
    out = topo.ns(
        topo.client,
        str(nb.LOADGEN),
        "-a",
        addr,
        "-p",
        str(port),
        "-c",
        "4",
        "-n",
        str(n),
        "-i",
        "-t",
        "10000",
    ).stdout
    return json.loads(out)


def _assert_dnat_to_backends(res: dict, n: int = 40, backends: tuple[str, ...] = nb.BACKEND_IPS) -> None:
    assert res["errors"] == 0, res
    assert res["connections"] == n, res
    reached = {nb.reply_addr(r) for r in res["replies"]}
    assert reached <= set(backends), res["replies"]
    assert len(reached) >= 2, f"one ClusterIP, 10 backends, 40 connections: expected a spread, got {reached}"


def test_iptables_1000_services_dnat(topo: nb.Topology) -> None:
    # Before any rule, the ClusterIP leads nowhere: the test can tell DNAT from no DNAT.
    assert _connect(topo, nb.TARGET_VIP, nb.SERVICE_PORT, 4)["connections"] == 0
    text = iptables.render(nb.bench_services(1000), NODE)
    topo.load_iptables(text)
    saved = topo.ns(topo.node, nb.IPTABLES_SAVE).stdout
    assert iptables.rule_count(saved) == iptables.rule_count(text)
    _assert_dnat_to_backends(_connect(topo, nb.TARGET_VIP, nb.SERVICE_PORT))


def test_nftables_1000_services_dnat(topo: nb.Topology) -> None:
    assert _connect(topo, nb.TARGET_VIP, nb.SERVICE_PORT, 4)["connections"] == 0
    topo.load_nft(nftables.render(nb.bench_services(1000), NODE))
    listed = compare.parse_nft(topo.ns(topo.node, "nft", "list", "table", "ip", "kube-proxy").stdout)
    assert len(listed["table ip kube-proxy"]["map service-ips"]["elements"]) == 1001  # type: ignore[index]
    _assert_dnat_to_backends(_connect(topo, nb.TARGET_VIP, nb.SERVICE_PORT))
    # kube-proxy's partial sync: the target's endpoints shrink to one, in one transaction.
    target = next(s for s in nb.bench_services(1) if s.name == "target")
    one = dataclasses.replace(target, endpoints=target.endpoints[:1])
    topo.load_nft(nftables.endpoint_update(one, NODE))
    res = _connect(topo, nb.TARGET_VIP, nb.SERVICE_PORT)
    assert set(res["replies"]) == {f"{nb.BACKEND_IPS[0]}:{nb.ECHO_PORT}"}, res


def test_loaded_rules_read_back_as_kube_proxy_wrote_them(topo: nb.Topology) -> None:
    """Round trip through the kernel: what iptables-save / nft list print for the generated rules
    equals the capture of the real kube-proxy."""
    ref_ipt = compare.parse_iptables(
        (nb.ROOT / "bench/peers/reference/kube-proxy-iptables.rules").read_text()
    )
    ref_nft = compare.parse_nft((nb.ROOT / "bench/peers/reference/kube-proxy-nftables.nft").read_text())
    topo.load_iptables(iptables.render(reference_services()))
    saved = compare.parse_iptables(topo.ns(topo.node, nb.IPTABLES_SAVE).stdout)
    assert compare.diff_objects(saved, ref_ipt) == []
    # iptables-nft keeps its rules in tables "ip filter"/"ip nat"/...: drop them before the nft comparison.
    topo.ns(topo.node, "nft", "flush", "ruleset")
    topo.load_nft(nftables.render(reference_services()))
    listed = compare.parse_nft(topo.ns(topo.node, "nft", "list", "ruleset").stdout)
    assert compare.diff_objects(listed, ref_nft) == []


# --- IPv6: kube-proxy's IPv6 proxier layouts load into the kernel, read back unchanged and DNAT ---


def test_ip6tables_reference_round_trip(topo: nb.Topology) -> None:
    """ip6tables-restore takes the IPv6 layout and ip6tables-save prints it back rule for rule, with the
    shapes only the IPv6 proxier has."""
    text = iptables.render(reference_services6(), NODE6)
    topo.load_iptables(text, family=6)
    saved_text = topo.ns(topo.node, nb.IP6TABLES_SAVE).stdout
    assert compare.diff_objects(compare.parse_iptables(saved_text), compare.parse_iptables(text)) == []
    assert "-j REJECT --reject-with icmp6-port-unreachable" in saved_text
    assert "! -d ::1/128 -m comment" in saved_text and "127.0.0.0/8" not in saved_text
    assert "-j DNAT --to-destination [fd00:10:244:1::10]:8080" in saved_text
    assert "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource" in saved_text
    assert ":KUBE-FIREWALL - [0:0]" in saved_text and "-A KUBE-FIREWALL " not in saved_text
    # the IPv4 tables were not touched by the IPv6 restore
    assert "KUBE-SERVICES" not in topo.ns(topo.node, nb.IPTABLES_SAVE).stdout


def test_nft_ip6_reference_round_trip(topo: nb.Topology) -> None:
    """nft -f takes the `table ip6 kube-proxy` layout and `nft list` prints it back object for object."""
    topo.load_nft(nftables.render(reference_services6(), NODE6))
    listed = topo.ns(topo.node, "nft", "list", "ruleset").stdout
    want = compare.parse_nft(nftables.render_listing(reference_services6(), NODE6))
    assert compare.diff_objects(compare.parse_nft(listed), want) == []
    assert "table ip kube-proxy" not in listed
    assert "dnat ip6 to numgen random mod 3 map" in listed and "{ ip6 saddr }" in listed


def test_ip6tables_1000_services_dnat(topo: nb.Topology) -> None:
    fam = nb.FAMILIES[6]
    assert _connect(topo, fam.target_vip, nb.SERVICE_PORT, 4)["connections"] == 0
    text = iptables.render(nb.bench_services(1000, family=6), fam.node)
    topo.load_iptables(text, family=6)
    assert iptables.rule_count(topo.ns(topo.node, nb.IP6TABLES_SAVE).stdout) == iptables.rule_count(text)
    _assert_dnat_to_backends(_connect(topo, fam.target_vip, nb.SERVICE_PORT), backends=fam.backends)


def test_nft_ip6_1000_services_dnat(topo: nb.Topology) -> None:
    fam = nb.FAMILIES[6]
    assert _connect(topo, fam.target_vip, nb.SERVICE_PORT, 4)["connections"] == 0
    topo.load_nft(nftables.render(nb.bench_services(1000, family=6), fam.node))
    listed = compare.parse_nft(topo.ns(topo.node, "nft", "list", "table", "ip6", "kube-proxy").stdout)
    assert len(listed["table ip6 kube-proxy"]["map service-ips"]["elements"]) == 1001  # type: ignore[index]
    _assert_dnat_to_backends(_connect(topo, fam.target_vip, nb.SERVICE_PORT), backends=fam.backends)
    target = next(s for s in nb.bench_services(1, family=6) if s.name == "target")
    one = dataclasses.replace(target, endpoints=target.endpoints[:1])
    topo.load_nft(nftables.endpoint_update(one, fam.node))
    res = _connect(topo, fam.target_vip, nb.SERVICE_PORT)
    assert set(res["replies"]) == {f"[{fam.backends[0]}]:{nb.ECHO_PORT}"}, res
