"""translate_service: every Kubernetes rule kproxy implements, case by case."""

from __future__ import annotations

from collections import Counter

import pytest
from unit_objects import NODE, ep, es, slice_raw, svc

from kproxy.abi import Scope, SvcFlag
from kproxy.desired import Frontend
from kproxy.model import NodeInfo, parse_endpoint_slice
from kproxy.translate import TranslateConfig, TranslateError, translate_service

CFG = TranslateConfig()


def tr(service, slices=(), node=NODE, cfg=CFG, skipped=None):
    return translate_service(service, list(slices), node, cfg, skipped)


def addrs(fe: Frontend) -> list[tuple[str, int]]:
    return [(b.address, b.port) for b in fe.backends]


def by_type(fes: list[Frontend], t: str) -> list[Frontend]:
    return [f for f in fes if f.type == t]


# ---- types ----


def test_cluster_ip_resolves_named_target_port_from_slice():
    (fe,) = tr(svc(), [es()])
    assert (fe.service, fe.port_name, fe.type, fe.address, fe.port, fe.protocol) == (
        "default/web", "http", "ClusterIP", "10.96.0.10", 80, "TCP",
    )  # fmt: skip
    assert fe.scope == Scope.EXT and fe.flags == 0 and fe.affinity_timeout == 0
    assert addrs(fe) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]


def test_every_cluster_ip_of_both_families_ipv4_family_first():
    # issue 15: IPv6 clusterIPs are served too (tests/unit/test_translate_dualstack.py has the rest)
    s = svc(cluster_ip="10.96.0.10", clusterIPs=["10.96.0.10", "fd00::10", "10.96.0.11"])
    skipped: Counter[str] = Counter()
    fes = tr(s, [es()], skipped=skipped)
    assert [f.address for f in fes] == ["10.96.0.10", "10.96.0.11", "fd00::10"]
    assert [len(f.backends) for f in fes] == [2, 2, 0]  # no IPv6 slice: the IPv6 ClusterIP rejects
    assert not skipped


def test_nodeport_on_node_internal_ips_by_default():
    node = NodeInfo("node-a", ("192.168.1.10", "10.1.0.5", "fd00::5"))
    s = svc(type="NodePort", ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}])
    fes = tr(s, [es()], node=node)
    nps = by_type(fes, "NodePort")
    assert [(f.address, f.port) for f in nps] == [("192.168.1.10", 30080), ("10.1.0.5", 30080)]
    assert all(f.flags == SvcFlag.NODEPORT for f in nps)
    assert len(by_type(fes, "ClusterIP")) == 1


def test_nodeport_addresses_cidrs_select_node_addresses():
    node = NodeInfo("node-a", ("192.168.1.10", "10.1.0.5"))
    s = svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    cfg = TranslateConfig.from_cidrs(["10.0.0.0/8"])
    nps = by_type(tr(s, [es()], node=node, cfg=cfg), "NodePort")
    assert [f.address for f in nps] == ["10.1.0.5"]


def test_nodeport_addresses_cidrs_select_every_interface_address():
    """kube-proxy serves NodePorts on every address of the node in --nodeport-addresses, not only its
    InternalIPs (TestNodePorts "multiple nodeport-addresses"); never on loopback (nftables mode)."""
    node = NodeInfo(
        "node-a", ("192.168.0.2",), host_addresses=("127.0.0.1", "192.168.0.2", "192.1.2.3", "10.9.9.9")
    )
    s = svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    cfg = TranslateConfig.from_cidrs(["192.168.0.0/24", "192.1.2.0/24", "127.0.0.0/8"])
    nps = by_type(tr(s, [es()], node=node, cfg=cfg), "NodePort")
    assert [f.address for f in nps] == ["192.168.0.2", "192.1.2.3"]
    # without the flag: the InternalIPs only, whatever the interfaces have
    assert [f.address for f in by_type(tr(s, [es()], node=node), "NodePort")] == ["192.168.0.2"]


def test_host_addresses_survive_a_node_update_and_dirty_every_service():
    from unit_objects import svc_raw

    from kproxy.store import ClusterStore

    st = ClusterStore(NodeInfo("node-a", ("192.168.0.2",)))
    st.upsert_service(svc_raw("a"))
    st.take_dirty()
    assert st.set_host_addresses(["192.1.2.3", "192.168.0.2"])
    assert st.take_dirty() == {"default/a"}
    assert not st.set_host_addresses(["192.168.0.2", "192.1.2.3"])
    st.set_node(NodeInfo("node-a", ("192.168.0.2",), zone="z"))  # from the Node object
    assert st.node.host_addresses == ("192.1.2.3", "192.168.0.2") and st.node.zone == "z"


def test_nodeport_without_allocated_port_is_counted():
    skipped: Counter[str] = Counter()
    fes = tr(svc(type="NodePort"), [es()], skipped=skipped)
    assert by_type(fes, "NodePort") == []
    assert skipped["nodeport_unallocated"] == 1


def test_loadbalancer_ingress_ips_and_nodeports():
    s = svc(
        type="LoadBalancer",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        lb_ips=["203.0.113.7"],
        loadBalancerSourceRanges=["198.51.100.0/24"],
    )
    fes = tr(s, [es()])
    (lb,) = by_type(fes, "LoadBalancer")
    assert (lb.address, lb.port) == ("203.0.113.7", 80)
    assert lb.flags == SvcFlag.LOADBALANCER | SvcFlag.SRC_RANGES
    assert len(by_type(fes, "NodePort")) == 1


def test_loadbalancer_without_node_ports():
    s = svc(
        type="LoadBalancer", allocateLoadBalancerNodePorts=False, lb_ips=["203.0.113.7"],
        ports=[{"name": "http", "port": 80}],
    )  # fmt: skip
    skipped: Counter[str] = Counter()
    fes = tr(s, [es()], skipped=skipped)
    assert by_type(fes, "NodePort") == [] and len(by_type(fes, "LoadBalancer")) == 1
    assert skipped["nodeport_unallocated"] == 0


def test_lb_ingress_of_non_loadbalancer_service_ignored():
    fes = tr(svc(lb_ips=["203.0.113.7"]), [es()])
    assert by_type(fes, "LoadBalancer") == []


def test_external_ips():
    fes = tr(svc(externalIPs=["198.51.100.5", "2001:db8::5"]), [es()])
    (x,) = by_type(fes, "ExternalIP")
    assert (x.address, x.port, x.flags) == ("198.51.100.5", 80, SvcFlag.EXTERNAL_IP)


def test_several_ports_each_resolved_by_name_and_protocol():
    s = svc(
        ports=[
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ]
    )
    sl = es(ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}])
    fes = tr(s, [sl])
    got = {(f.port_name, f.port, f.protocol): addrs(f) for f in fes}
    assert got[("http", 80, "TCP")] == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    assert got[("dns", 53, "UDP")] == [("10.0.0.1", 5353), ("10.0.0.2", 5353)]
    assert all(b.protocol == "UDP" for b in fes[1].backends)


def test_slice_port_with_other_protocol_does_not_match():
    s = svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    (fe,) = tr(s, [es(ports=[{"name": "dns", "port": 53, "protocol": "TCP"}])])
    assert fe.backends == ()


def test_named_target_port_resolved_per_slice():
    # two slices of one Service resolve the same port name to different numbers (rolling update)
    a = es(name="web-a", endpoints=[ep("10.0.0.1")], ports=[{"name": "http", "port": 8080}])
    b = es(name="web-b", endpoints=[ep("10.0.0.2")], ports=[{"name": "http", "port": 9090}])
    (fe,) = tr(svc(), [a, b])
    assert addrs(fe) == [("10.0.0.1", 8080), ("10.0.0.2", 9090)]


def test_slices_merged_and_deduplicated():
    a = es(name="web-a", endpoints=[ep("10.0.0.1"), ep("10.0.0.2")])
    b = es(name="web-b", endpoints=[ep("10.0.0.2"), ep("10.0.0.3")])
    (fe,) = tr(svc(), [a, b])
    assert addrs(fe) == [("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080)]


def test_duplicate_prefers_ready_copy():
    a = es(name="web-a", endpoints=[ep("10.0.0.2", ready=False)])
    b = es(name="web-b", endpoints=[ep("10.0.0.2", ready=True)])
    (fe,) = tr(svc(), [a, b])
    assert addrs(fe) == [("10.0.0.2", 8080)]


def test_ipv6_slices_of_an_ipv4_only_service_and_fqdn_slices_ignored():
    v6 = parse_endpoint_slice(slice_raw(name="web-v6", address_type="IPv6", endpoints=[ep("fd00::1")]))
    fqdn = parse_endpoint_slice(slice_raw(name="web-fqdn", address_type="FQDN", endpoints=[ep("a.example")]))
    skipped: Counter[str] = Counter()
    (fe,) = tr(svc(), [v6, fqdn, es()], skipped=skipped)
    assert len(fe.backends) == 2
    assert skipped == {"endpointslice_family_without_cluster_ip": 1, "endpointslice_fqdn": 1}


# ---- endpoint conditions ----


def test_only_ready_endpoints_get_slots_others_are_retained():
    sl = es(
        endpoints=[ep("10.0.0.1"), ep("10.0.0.2", ready=False), ep("10.0.0.3", ready=False, terminating=True)]
    )
    (fe,) = tr(svc(), [sl])
    assert addrs(fe) == [("10.0.0.1", 8080)]
    assert [b.address for b in fe.retained] == ["10.0.0.2", "10.0.0.3"]
    assert [b.terminating for b in fe.retained] == [False, True]


def test_ready_missing_means_ready():
    (fe,) = tr(svc(), [es(endpoints=[ep("10.0.0.1", ready=None)])])
    assert addrs(fe) == [("10.0.0.1", 8080)]


def test_terminating_fallback_when_none_ready():
    sl = es(
        endpoints=[
            ep("10.0.0.1", ready=False, serving=True, terminating=True),
            ep("10.0.0.2", ready=False, serving=False, terminating=True),
            ep("10.0.0.3", ready=False),
        ]
    )
    (fe,) = tr(svc(), [sl])
    assert addrs(fe) == [("10.0.0.1", 8080)]
    assert fe.backends[0].terminating
    assert [b.address for b in fe.retained] == ["10.0.0.2", "10.0.0.3"]


def test_no_fallback_while_one_is_ready():
    sl = es(endpoints=[ep("10.0.0.1", ready=False, serving=True, terminating=True), ep("10.0.0.2")])
    (fe,) = tr(svc(), [sl])
    assert addrs(fe) == [("10.0.0.2", 8080)]


def test_no_endpoints_gives_empty_frontend_that_rejects():
    (fe,) = tr(svc(), [])
    assert fe.backends == () and not fe.flags & SvcFlag.NO_LOCAL_DROP


# ---- skipped Services ----


@pytest.mark.parametrize(
    "service, reason",
    [
        (dict(cluster_ip="None"), "headless"),
        (dict(type="ExternalName", cluster_ip=None, externalName="example.com"), "external_name"),
        (dict(labels={"service.kubernetes.io/service-proxy-name": "other"}), "other_proxy"),
    ],
)
def test_skipped_services(service, reason):
    skipped: Counter[str] = Counter()
    assert tr(svc(**service), [es()], skipped=skipped) == []
    assert skipped[reason] == 1


def test_headless_label_filters_endpointslices_not_services():
    """kube-proxy 1.36: its Service watch filters service-proxy-name and clusterIP None only; its
    EndpointSlice watch leaves out slices labelled service.kubernetes.io/headless."""
    labelled = slice_raw(endpoints=[ep("10.0.0.9")])
    labelled["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    labelled["metadata"]["name"] = "web-headless"
    skipped: Counter[str] = Counter()
    (fe,) = tr(svc(labels={"service.kubernetes.io/headless": ""}), [es(), parse_endpoint_slice(labelled)],
               skipped=skipped)  # fmt: skip
    assert addrs(fe) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]  # the Service is served, that slice is not
    assert skipped["endpointslice_headless"] == 1


def test_sctp_port_served_with_its_endpoint_slice_port():
    # issue 17: SCTP is served as TCP and UDP are (kube-proxy since 1.20); the slice's port is SCTP too
    s = svc(
        ports=[
            {"name": "http", "port": 80},
            {"name": "sctp", "port": 9, "targetPort": 9999, "protocol": "SCTP"},
        ]
    )
    slices = [
        es(
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "sctp", "port": 9999, "protocol": "SCTP"},
            ]
        )
    ]
    skipped: Counter[str] = Counter()
    fes = tr(s, slices, skipped=skipped)
    assert [(f.port_name, f.port, f.protocol) for f in fes] == [("http", 80, "TCP"), ("sctp", 9, "SCTP")]
    assert addrs(fes[1]) == [("10.0.0.1", 9999), ("10.0.0.2", 9999)]
    assert all(b.protocol == "SCTP" for b in fes[1].backends)
    assert not skipped


def test_tcp_udp_and_sctp_on_the_same_port_are_three_frontends():
    ports = [
        {"name": n.lower(), "port": 53, "targetPort": 5353, "protocol": n} for n in ("TCP", "UDP", "SCTP")
    ]
    slice_ports = [{"name": n.lower(), "port": 5353, "protocol": n} for n in ("TCP", "UDP", "SCTP")]
    skipped: Counter[str] = Counter()
    fes = tr(svc(ports=ports), [es(ports=slice_ports)], skipped=skipped)
    assert [(f.port, f.protocol) for f in fes] == [(53, "TCP"), (53, "UDP"), (53, "SCTP")]
    assert [{(b.port, b.protocol) for b in f.backends} for f in fes] == [
        {(5353, "TCP")}, {(5353, "UDP")}, {(5353, "SCTP")},
    ]  # fmt: skip
    assert not skipped


def test_sctp_nodeport_and_load_balancer():
    s = svc(type="LoadBalancer", ports=[{"name": "s", "port": 9, "targetPort": 99, "nodePort": 30009,
                                          "protocol": "SCTP"}],
            lb_ips=["203.0.113.9"])  # fmt: skip
    fes = tr(s, [es(ports=[{"name": "s", "port": 99, "protocol": "SCTP"}])])
    assert {(f.type, f.protocol) for f in fes} == {("ClusterIP", "SCTP"), ("NodePort", "SCTP"),
                                                    ("LoadBalancer", "SCTP")}  # fmt: skip
    assert all(addrs(f) == [("10.0.0.1", 99), ("10.0.0.2", 99)] for f in fes)


# ---- affinity ----


def test_session_affinity_default_timeout():
    (fe,) = tr(svc(sessionAffinity="ClientIP"), [es()])
    assert fe.flags == SvcFlag.AFFINITY and fe.affinity_timeout == 10800


def test_session_affinity_configured_timeout():
    s = svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})
    (fe,) = tr(s, [es()])
    assert fe.affinity_timeout == 30


# ---- traffic policies ----


def local_mix():
    return es(endpoints=[ep("10.0.0.1", node="node-a"), ep("10.0.0.2", node="node-b")])


def test_external_traffic_policy_local_two_scopes():
    s = svc(
        type="NodePort",
        externalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    fes = tr(s, [local_mix()])
    (cip,) = by_type(fes, "ClusterIP")
    assert addrs(cip) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)] and cip.flags == 0
    ext = {f.scope: f for f in by_type(fes, "NodePort")}
    assert addrs(ext[Scope.EXT]) == [("10.0.0.1", 8080)]
    assert ext[Scope.EXT].backends[0].local
    assert ext[Scope.EXT].flags == SvcFlag.NODEPORT | SvcFlag.ETP_LOCAL | SvcFlag.TWO_SCOPES
    assert addrs(ext[Scope.INT]) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    assert ext[Scope.INT].flags & SvcFlag.TWO_SCOPES


def test_external_traffic_policy_local_without_local_endpoint_drops():
    s = svc(type="LoadBalancer", externalTrafficPolicy="Local", lb_ips=["203.0.113.7"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}])  # fmt: skip
    fes = tr(s, [es(endpoints=[ep("10.0.0.2", node="node-b")])])
    for f in by_type(fes, "LoadBalancer") + by_type(fes, "NodePort"):
        if f.scope == Scope.EXT:
            assert f.backends == () and f.flags & SvcFlag.NO_LOCAL_DROP
        else:
            assert len(f.backends) == 1 and not f.flags & SvcFlag.NO_LOCAL_DROP


def test_external_traffic_policy_local_without_any_endpoint_rejects():
    s = svc(
        type="NodePort",
        externalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    for f in by_type(tr(s, []), "NodePort"):
        assert f.backends == () and not f.flags & SvcFlag.NO_LOCAL_DROP


def test_external_policy_local_ignored_for_cluster_ip_only_service():
    (fe,) = tr(svc(externalTrafficPolicy="Local"), [local_mix()])
    assert fe.flags == 0 and len(fe.backends) == 2


def test_internal_traffic_policy_local():
    (fe,) = tr(svc(internalTrafficPolicy="Local"), [local_mix()])
    assert addrs(fe) == [("10.0.0.1", 8080)] and fe.flags == SvcFlag.ITP_LOCAL
    assert [b.address for b in fe.retained] == ["10.0.0.2"]


def test_internal_traffic_policy_local_without_local_endpoint_drops():
    (fe,) = tr(svc(internalTrafficPolicy="Local"), [es(endpoints=[ep("10.0.0.2", node="node-b")])])
    assert fe.backends == () and fe.flags == SvcFlag.ITP_LOCAL | SvcFlag.NO_LOCAL_DROP


def test_local_policy_falls_back_to_local_serving_terminating():
    sl = es(
        endpoints=[
            ep("10.0.0.1", node="node-a", ready=False, serving=True, terminating=True),
            ep("10.0.0.2", node="node-b"),
        ]
    )
    (fe,) = tr(svc(internalTrafficPolicy="Local"), [sl])
    assert addrs(fe) == [("10.0.0.1", 8080)]


# ---- topology ----


def zoned():
    return es(
        endpoints=[
            ep("10.0.0.1", zone="zone-a", hints=["zone-a"]),
            ep("10.0.0.2", zone="zone-b", hints=["zone-b"]),
            ep("10.0.0.3", zone="zone-a", hints=["zone-a"]),
        ]
    )


def test_topology_hints_used_with_traffic_distribution():
    (fe,) = tr(svc(trafficDistribution="PreferClose"), [zoned()])
    assert [b.address for b in fe.backends] == ["10.0.0.1", "10.0.0.3"]


def test_topology_hints_used_with_annotation_auto():
    (fe,) = tr(svc(annotations={"service.kubernetes.io/topology-mode": "Auto"}), [zoned()])
    assert [b.address for b in fe.backends] == ["10.0.0.1", "10.0.0.3"]


def test_topology_hints_decide_without_the_service_field():
    """kube-proxy 1.36 reads only the hints (the EndpointSlice controller writes them for the Service's
    trafficDistribution or topology-mode annotation; hints on a slice are used wherever they come from)."""
    (fe,) = tr(svc(), [zoned()])
    assert [b.address for b in fe.backends] == ["10.0.0.1", "10.0.0.3"]


def test_topology_hints_ignored_when_one_endpoint_lacks_hints():
    sl = es(endpoints=[ep("10.0.0.1", hints=["zone-a"]), ep("10.0.0.2")])
    (fe,) = tr(svc(trafficDistribution="PreferClose"), [sl])
    assert len(fe.backends) == 2


def test_topology_hints_ignored_when_none_for_this_zone():
    sl = es(endpoints=[ep("10.0.0.1", hints=["zone-b"]), ep("10.0.0.2", hints=["zone-c"])])
    (fe,) = tr(svc(trafficDistribution="PreferClose"), [sl])
    assert len(fe.backends) == 2


def test_topology_hints_ignored_when_node_has_no_zone():
    (fe,) = tr(svc(trafficDistribution="PreferClose"), [zoned()], node=NodeInfo("node-a", ("192.168.1.10",)))
    assert len(fe.backends) == 3


# ---- errors ----


def test_too_many_backends_raises_typed_error(monkeypatch):
    import kproxy.translate as t

    monkeypatch.setattr(t, "MAX_BACKENDS_PER_FRONTEND", 1)
    with pytest.raises(TranslateError) as ei:
        tr(svc(), [es()])
    assert ei.value.reason == "too_many_backends" and "default/web" in str(ei.value)


def test_translate_is_deterministic_and_pure():
    s, sl = svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]), [local_mix()]
    assert tr(s, sl) == tr(s, list(reversed(sl)))


# ---- trafficDistribution PreferSameNode / PreferSameZone (kube-proxy 1.36 topology_test.go cases) ----
def hinted(*rows, ready=True):
    """Endpoints 10.1.2.<i> with (zone hints, node hints) each; None = no hints of that kind."""
    eps = []
    for i, (zones, nodes) in enumerate(rows, start=3):
        e = ep(f"10.1.2.{i}", ready=ready if not isinstance(ready, list) else ready[i - 3])
        h = {}
        if zones is not None:
            h["forZones"] = [{"name": z} for z in zones]
        if nodes is not None:
            h["forNodes"] = [{"name": n} for n in nodes]
        if h:
            e["hints"] = h
        eps.append(e)
    return es(endpoints=eps)


NODE1 = NodeInfo("node-1", ("192.168.1.10",), zone="zone-a")
FOUR = [
    (["zone-a"], ["node-1"]),
    (["zone-b"], ["node-2"]),
    (["zone-c"], ["node-3"]),
    (["zone-a"], ["node-4"]),
]


@pytest.mark.parametrize(
    ("name", "rows", "node", "want", "ready"),
    [
        ("PreferSameNode available", FOUR, NODE1, ["10.1.2.3"], True),
        ("PreferSameNode ignored if some endpoints unhinted",
         [FOUR[0], (None, None), FOUR[2], FOUR[3]], NODE1,
         ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"], True),
        ("PreferSameNode falls back to PreferSameZone if no endpoint for node",
         FOUR, NodeInfo("node-0", ("192.168.1.10",), zone="zone-a"), ["10.1.2.3", "10.1.2.6"], True),
        ("zone hints only: same zone",
         [(["zone-a"], None), (["zone-b"], None), (["zone-c"], None), (["zone-a"], None)], NODE1,
         ["10.1.2.3", "10.1.2.6"], True),
        ("node in different zone, no endpoint filtering", [(["zone-a"], None)],
         NodeInfo("node-1", ("192.168.1.10",), zone="zone-b"), ["10.1.2.3"], True),
        ("node without zone label, node hints still apply",
         [(["zone-a"], ["node-1"]), (["zone-a"], ["node-2"])],
         NodeInfo("node-1", ("192.168.1.10",)), ["10.1.2.3"], True),
        ("unready endpoints' hints do not count",
         [(["zone-a"], ["node-1"]), (["zone-b"], ["node-2"]), (None, None)], NODE1, ["10.1.2.3"],
         [True, True, False]),
        ("only unready endpoints for this node: no filtering",
         [(["zone-b"], ["node-1"]), (["zone-b"], ["node-2"]), (["zone-c"], ["node-3"])], NODE1,
         ["10.1.2.4", "10.1.2.5"], [False, True, True]),
        ("multiple node hints per endpoint", [(["zone-a"], ["node-2", "node-1"]), (["zone-a"], ["node-2"])],
         NODE1, ["10.1.2.3"], True),
    ],
)  # fmt: skip
def test_traffic_distribution_from_hints(name, rows, node, want, ready):
    (fe,) = tr(svc(trafficDistribution="PreferSameNode"), [hinted(*rows, ready=ready)], node=node)
    assert [b.address for b in fe.backends] == want, name


def test_prefer_same_node_is_not_applied_to_local_policies():
    """externalTrafficPolicy Local: the EXT scope gets the local endpoints whatever the hints; the pods'
    scope (cluster endpoints) follows them."""
    raw = slice_raw(endpoints=[dict(e, nodeName="node-1") if i == 1 else dict(e, nodeName="node-9")
                               for i, e in enumerate([ep("10.1.2.3"), ep("10.1.2.4")])])  # fmt: skip
    raw["endpoints"][0]["hints"] = {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-1"}]}
    raw["endpoints"][1]["hints"] = {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-2"}]}
    s = svc(
        type="NodePort",
        externalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    fes = tr(s, [parse_endpoint_slice(raw)], node=NODE1)
    ext = [f for f in fes if f.type == "NodePort" and f.scope == Scope.EXT][0]
    internal = [f for f in fes if f.type == "NodePort" and f.scope == Scope.INT][0]
    assert [b.address for b in ext.backends] == ["10.1.2.4"]  # local (node-1), not the hinted one
    assert [b.address for b in internal.backends] == ["10.1.2.3"]  # cluster endpoints, same-node hint


# ---- LoadBalancer ipMode (KEP-1860) ----
def test_lb_ip_mode_proxy_is_not_served_vip_and_unset_are():
    raw_ing = [{"ip": "203.0.113.7", "ipMode": "Proxy"}, {"ip": "203.0.113.8", "ipMode": "VIP"},
               {"ip": "203.0.113.9"}]  # fmt: skip
    from unit_objects import svc_raw

    from kproxy.model import parse_service

    raw = svc_raw(type="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                  loadBalancerSourceRanges=["198.51.100.0/24"])  # fmt: skip
    raw["status"] = {"loadBalancer": {"ingress": raw_ing}}
    skipped: Counter[str] = Counter()
    fes = tr(parse_service(raw), [es()], skipped=skipped)
    assert sorted(f.address for f in by_type(fes, "LoadBalancer")) == ["203.0.113.8", "203.0.113.9"]
    assert skipped["lb_ip_mode_proxy"] == 1
    assert len(by_type(fes, "NodePort")) == 1 and len(by_type(fes, "ClusterIP")) == 1
    # only Proxy-mode IPs: no LoadBalancer frontend (and no source-range entries) at all
    raw["status"] = {"loadBalancer": {"ingress": [raw_ing[0]]}}
    fes = tr(parse_service(raw), [es()])
    assert by_type(fes, "LoadBalancer") == []
