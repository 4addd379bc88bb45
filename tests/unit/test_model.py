"""Parsing Kubernetes objects: what is accepted, and how a malformed object is reported."""

from __future__ import annotations

import pytest
from unit_objects import ep, slice_raw, svc_raw

from kproxy.model import ModelError, parse_endpoint_slice, parse_service


def problem(raw, parse=parse_service, origin="dir/web.yaml") -> str:
    with pytest.raises(ModelError) as ei:
        parse(raw, origin)
    return str(ei.value)


def test_unknown_fields_ignored_and_defaults():
    raw = svc_raw(ports=[{"port": 80}])
    raw["spec"]["somethingNew"] = {"x": 1}
    raw["metadata"]["uid"] = "u"
    s = parse_service(raw)
    p = s.spec.ports[0]
    assert (p.name, p.protocol, p.target_port, p.node_port) == ("", "TCP", None, None)
    assert s.key == "default/web"
    assert s.spec.external_traffic_policy == "Cluster" and s.spec.session_affinity == "None"


def test_numeric_string_target_port_is_a_number():
    s = parse_service(svc_raw(ports=[{"port": 80, "targetPort": "8080"}]))
    assert s.spec.ports[0].target_port == 8080


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda r: r["spec"]["ports"][0].update(port=70000), "spec.ports[0].port"),
        (lambda r: r["spec"]["ports"][0].update(port=0), "spec.ports[0].port"),
        (lambda r: r["spec"]["ports"][0].update(port="eighty"), "spec.ports[0].port"),
        (lambda r: r["spec"]["ports"][0].update(protocol="ICMP"), "spec.ports[0].protocol"),
        (lambda r: r["spec"].update(clusterIP="10.96.0.300"), "'10.96.0.300' is not an IP address"),
        (lambda r: r["spec"].update(externalIPs=["nope"]), "externalIPs entry 'nope'"),
        (lambda r: r["spec"].update(type="Weird"), "spec.type"),
        (
            lambda r: r["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
            "duplicate port 80",
        ),
        (
            lambda r: r["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
            "duplicate port name",
        ),
        (lambda r: r["spec"].update(ports=[{"port": 80}, {"port": 81}]), "needs a name"),
        (
            lambda r: r["spec"].update(ports=[{"name": f"p{i}", "port": i + 1} for i in range(1000)]),
            "1000 ports",
        ),
        (
            lambda r: r["spec"].update(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
            "timeoutSeconds",
        ),
        (lambda r: r["metadata"].pop("name"), "metadata.name: Field required"),
        (lambda r: r.update(spec="x"), "spec"),
    ],
)
def test_malformed_service_names_object_origin_and_field(mutate, expect):
    raw = svc_raw()
    mutate(raw)
    msg = problem(raw)
    assert expect in msg
    assert "dir/web.yaml" in msg
    if "name" in raw["metadata"]:
        assert msg.startswith("Service default/web in dir/web.yaml skipped: ")


def test_malformed_error_attributes():
    with pytest.raises(ModelError) as ei:
        parse_service(svc_raw(name="api", namespace="prod", ports=[{"port": 0}]), "x.yaml")
    e = ei.value
    assert (e.kind, e.namespace, e.name, e.origin, e.reason) == (
        "Service",
        "prod",
        "api",
        "x.yaml",
        "invalid",
    )
    assert len(e.problems) == 1


def test_not_a_mapping():
    assert "expected a mapping" in problem(["a"])


def test_slice_bad_address_and_port():
    raw = slice_raw(endpoints=[{"addresses": ["10.0.0.999"]}])
    assert "is not an IPv4 address" in problem(raw, parse_endpoint_slice)
    raw = slice_raw(ports=[{"name": "http", "port": 0}])
    assert "ports[0].port" in problem(raw, parse_endpoint_slice)
    raw = slice_raw()
    del raw["addressType"]
    assert "EndpointSlice default/web-abc" in problem(raw, parse_endpoint_slice)


def test_slice_service_key_and_null_lists():
    raw = slice_raw()
    raw["endpoints"] = None
    s = parse_endpoint_slice(raw)
    assert s.service_key == "default/web" and s.endpoints == []


# The store keeps a compact form built by a fast dict reader; whatever it is unsure of goes through the
# pydantic schema. Both routes must give equal objects, and the fast one must leave errors to the schema.
_SVC_CASES = [
    svc_raw(),
    svc_raw(ports=[{"port": 80}]),
    svc_raw(
        ports=[
            {"name": "a", "port": 80, "targetPort": 8080},
            {"name": "b", "port": 81, "protocol": "UDP"},
        ]
    ),
    svc_raw(ports=[{"port": 80, "targetPort": "8080"}]),
    svc_raw(
        type="NodePort",
        ports=[{"port": 80, "nodePort": 30080}],
        externalTrafficPolicy="Local",
        healthCheckNodePort=31000,
    ),
    svc_raw(
        type="LoadBalancer",
        lb_ips=["203.0.113.7"],
        loadBalancerSourceRanges=["10.0.0.0/8"],
        allocateLoadBalancerNodePorts=False,
    ),
    svc_raw(cluster_ip="None"),
    svc_raw(cluster_ip="fd00::10", ipFamilies=["IPv6"]),
    # dual-stack, as the API server fills it in (issue 15), both orders
    svc_raw(
        type="LoadBalancer",
        cluster_ip="10.96.0.10",
        clusterIPs=["10.96.0.10", "fd00:10:96::a"],
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="PreferDualStack",
        externalIPs=["2001:db8::7"],
        lb_ips=["203.0.113.7", "2001:db8:1::7"],
        loadBalancerSourceRanges=["10.0.0.0/8", "2001:db8::/32"],
    ),
    svc_raw(
        cluster_ip="fd00:10:96::a",
        clusterIPs=["fd00:10:96::a", "10.96.0.10"],
        ipFamilies=["IPv6", "IPv4"],
        ipFamilyPolicy="RequireDualStack",
    ),
    svc_raw(cluster_ip="FD00:10:96:0:0:0:0:A", ipFamilies=["IPv6"]),  # not canonical: the schema rewrites
    svc_raw(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
    svc_raw(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": None}),
    svc_raw(externalIPs=["198.51.100.1"], internalTrafficPolicy="Local", trafficDistribution="PreferClose"),
    svc_raw(externalTrafficPolicy="Global", labels={"a": "b"}, annotations={"x": "y"}),
    svc_raw(type="ExternalName", cluster_ip=None, externalName="example.com"),
    svc_raw(ports=[{"port": 80, "target_port": 8080}]),  # snake_case: the schema reads it too
    {"kind": "Service", "metadata": {"name": "x"}, "spec": None, "status": None},
    {"metadata": {"name": "x", "labels": None}, "spec": {"ports": None, "clusterIPs": None}},
]
_SLICE_CASES = [
    slice_raw(),
    slice_raw(
        endpoints=[
            ep("10.0.0.1", ready=False, serving=True, terminating=True),
            ep("10.0.0.2", node=None),
        ]
    ),
    slice_raw(endpoints=[ep("10.0.0.1", zone="z", hints=["z", "y"]), {"addresses": ["10.0.0.3"]}]),
    slice_raw(endpoints=[{"addresses": ["10.0.0.1"], "conditions": None, "hints": {"forZones": None}}]),
    slice_raw(
        endpoints=[
            {
                "addresses": ["10.0.0.1"],
                "hints": {"forZones": [{"name": "z"}], "forNodes": [{"name": "n1"}, {"name": "n2"}]},
            }
        ]
    ),
    slice_raw(address_type="IPv6", endpoints=[ep("fd00::1")]),
    slice_raw(
        address_type="IPv6", endpoints=[ep("fd00:10:244:1::5", node=None), ep("FD00:10:244:1:0:0:0:6")]
    ),
    slice_raw(address_type="FQDN", endpoints=[ep("db.example.com")]),
    slice_raw(ports=[{"name": None, "port": 8080}, {"port": None, "protocol": "UDP", "name": "u"}]),
    slice_raw(endpoints=[{"addresses": ["10.0.0.1"], "node_name": "n"}]),
    {"metadata": {"name": "s", "namespace": "ns"}, "addressType": "IPv4", "endpoints": None, "ports": None},
]


@pytest.mark.parametrize("raw", _SVC_CASES)
def test_fast_and_schema_routes_agree_on_services(raw):
    from kproxy.model.fastpath import _fast_service
    from kproxy.model.parse import _service_from_schema
    from kproxy.model.schema import _SService

    fast = _fast_service(raw)
    slow = _service_from_schema(_SService.model_validate(raw))
    assert fast is None or fast == slow
    assert parse_service(raw) == slow


@pytest.mark.parametrize("raw", _SLICE_CASES)
def test_fast_and_schema_routes_agree_on_slices(raw):
    from kproxy.model.fastpath import _fast_slice
    from kproxy.model.parse import _slice_from_schema
    from kproxy.model.schema import _SEndpointSlice

    fast = _fast_slice(raw)
    slow = _slice_from_schema(_SEndpointSlice.model_validate(raw))
    assert fast is None or fast == slow
    assert parse_endpoint_slice(raw) == slow


def test_common_objects_take_the_fast_route():
    from kproxy.model.fastpath import _fast_service, _fast_slice

    assert all(_fast_service(r) is not None for r in _SVC_CASES[:6])
    assert all(_fast_slice(r) is not None for r in _SLICE_CASES[:4])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["spec"]["ports"][0].update(port=0),
        lambda r: r["spec"]["ports"][0].update(targetPort="0"),
        lambda r: r["spec"]["ports"][0].update(targetPort="a-name-much-too-long"),
        lambda r: r["spec"].update(clusterIP="10.96.0.300"),
        lambda r: r["spec"].update(clusterIP="10.96.0.1.2"),
        lambda r: r["spec"].update(type=None),
        lambda r: r["metadata"].update(namespace=""),
        lambda r: r["metadata"].update(labels={"a": 1}),
        lambda r: r["spec"].update(loadBalancerSourceRanges=["nope"]),
        lambda r: r["spec"].update(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}}),
    ],
)
def test_fast_route_leaves_invalid_services_to_the_schema(mutate):
    from kproxy.model.fastpath import _fast_service

    raw = svc_raw()
    mutate(raw)
    assert _fast_service(raw) is None
    with pytest.raises(ModelError):
        parse_service(raw)


@pytest.mark.parametrize(
    "endpoint",
    [
        {"addresses": ["10.0.0.999"]},
        {"addresses": ["10.0.0.1.1"]},
        {"addresses": ["10.0.0.1"], "hints": {"forNodes": [{"name": 3}]}},
        {"addresses": []},
        {"addresses": ["10.0.0.1"], "conditions": {"ready": "maybe"}},
        {"addresses": ["10.0.0.1"], "nodeName": 7},
        {"addresses": ["10.0.0.1"], "hints": {"forZones": [{}]}},
    ],
)
def test_fast_route_leaves_invalid_slices_to_the_schema(endpoint):
    from kproxy.model.fastpath import _fast_slice

    raw = slice_raw(endpoints=[endpoint])
    assert _fast_slice(raw) is None
    with pytest.raises(ModelError):
        parse_endpoint_slice(raw)


def test_canonical_ipv6_takes_the_fast_route():
    from kproxy.model.fastpath import _fast_service, _fast_slice

    dual = svc_raw(
        cluster_ip="fd00:10:96::a",
        clusterIPs=["fd00:10:96::a", "10.96.0.10"],
        ipFamilies=["IPv6", "IPv4"],
        externalIPs=["2001:db8::7"],
        lb_ips=["2001:db8:1::7"],
    )
    fast = _fast_service(dual)
    assert fast is not None and fast.spec.cluster_ips == ["fd00:10:96::a", "10.96.0.10"]
    v6 = slice_raw(address_type="IPv6", endpoints=[ep("fd00:10:244:1::5"), ep("fd00:10:244:2::5", node=None)])
    es = _fast_slice(v6)
    assert es is not None and [e.addresses for e in es.endpoints] == [
        ["fd00:10:244:1::5"],
        ["fd00:10:244:2::5"],
    ]


def test_ipv6_addresses_are_canonicalised_by_the_schema():
    """Frontend and backend addresses are compared as text: one spelling per address (RFC 5952, as Go
    prints it), whatever the object says."""
    from kproxy.model.fastpath import _fast_service, _fast_slice

    raw = svc_raw(cluster_ip="FD00:10:96:0:0:0:0:A", ipFamilies=["IPv6"], externalIPs=["2001:DB8::0:7"],
                  lb_ips=["2001:0db8:0001::7"])  # fmt: skip
    assert _fast_service(raw) is None
    notes: list[str] = []
    s = parse_service(raw, notes=notes)
    assert s.spec.cluster_ip == "fd00:10:96::a" and s.spec.cluster_ips == ["fd00:10:96::a"]
    assert s.spec.external_ips == ["2001:db8::7"]
    assert s.status.load_balancer.ingress[0].ip == "2001:db8:1::7"
    assert notes == []  # not a legacy spelling: nothing to warn about
    sraw = slice_raw(address_type="IPv6", endpoints=[ep("FD00:10:244:1:0:0:0:5"), ep("fd00:10:244:1::6")])
    assert _fast_slice(sraw) is None
    es = parse_endpoint_slice(sraw)
    assert [e.addresses for e in es.endpoints] == [["fd00:10:244:1::5"], ["fd00:10:244:1::6"]]


def test_ipv4_mapped_service_address_is_read_as_ipv4_and_noted():
    """Go's ParseIPSloppy reads ::ffff:10.96.0.1 as the IPv4 address (kube-proxy serves it in IPv4)."""
    notes: list[str] = []
    s = parse_service(svc_raw(cluster_ip="::ffff:10.96.0.1"), notes=notes)
    assert s.spec.cluster_ip == "10.96.0.1"
    assert notes[0] == "clusterIP '::ffff:10.96.0.1' read as 10.96.0.1"


@pytest.mark.parametrize(
    "address", ["::ffff:10.0.0.1", "fe80::1%eth0", "10.0.0.1", "fd00::1::2", "fd00::g"]
)  # fmt: skip
def test_ipv6_slice_rejects_what_the_api_server_rejects(address):
    # IsValidIPv6Address: no IPv4 (mapped or not), no zone
    raw = slice_raw(address_type="IPv6", endpoints=[ep(address)])
    with pytest.raises(ModelError, match="is not an IPv6 address"):
        parse_endpoint_slice(raw)


def test_zoned_service_address_rejected():
    assert "is not an IP address" in problem(svc_raw(cluster_ip="fe80::1%eth0"))


def test_node_info_keeps_canonical_addresses_of_both_families():
    from kproxy.model import NodeInfo

    n = NodeInfo(
        "a", ("10.0.0.1", "FD00::0001", "::ffff:10.0.0.2", "bogus", "fd00::1"), host_addresses=("::1",)
    )
    assert n.addresses == ("10.0.0.1", "fd00::1", "10.0.0.2")
    assert n.host_addresses == ("::1",)


def test_canonical_ipv6_matches_ipaddress():
    import ipaddress
    import random

    from kproxy.model.names import canonical_ipv6

    rng = random.Random(15)
    for _ in range(3000):
        groups = [rng.choice([0, 0, 0, 1, 0xFFFF, 0xABC, rng.randrange(65536)]) for _ in range(8)]
        ip = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        want = ip.compressed if ip.ipv4_mapped is None else None
        for spelling in (ip.compressed, ip.exploded, ip.compressed.upper()):
            assert canonical_ipv6(spelling) == want, spelling
    assert canonical_ipv6("::") == "::" and canonical_ipv6("1:0:0:2::3") == "1:0:0:2::3"
    assert canonical_ipv6("1:0::2") == "1::2" and canonical_ipv6("10.0.0.1") is None


def test_leading_zeros_go_to_the_schema_which_reads_them_as_decimal():
    """Kubernetes accepted "010.96.0.1" before Go 1.17 and kube-proxy still parses it (ParseIPSloppy)."""
    from kproxy.model.fastpath import _fast_service, _fast_slice

    raw = svc_raw(cluster_ip="010.096.000.001")
    assert _fast_service(raw) is None
    notes: list[str] = []
    svc = parse_service(raw, notes=notes)
    assert svc.spec.cluster_ip == "10.96.0.1" and svc.spec.cluster_ips == ["10.96.0.1"]
    assert notes == ["clusterIP '010.096.000.001' read as 10.96.0.1",
                     "clusterIPs entry '010.096.000.001' read as 10.96.0.1"]  # fmt: skip
    sraw = slice_raw(endpoints=[ep("10.0.0.01"), ep("10.0.0.2")])
    assert _fast_slice(sraw) is None
    es = parse_endpoint_slice(sraw, notes=notes)
    assert [e.addresses for e in es.endpoints] == [["10.0.0.1"], ["10.0.0.2"]]
    assert parse_endpoint_slice(slice_raw(endpoints=[ep("10.0.0.1"), ep("10.0.0.2")])) == es


def test_only_kubernetes_labels_and_annotations_are_kept() -> None:
    """The view keeps the labels and annotations Kubernetes defines (kproxy reads some of them), not
    kubectl's last-applied copy of the object or users' own (issue 13: memory per Service)."""
    from kproxy.model import parse_endpoint_slice, parse_service

    meta = {
        "name": "web", "namespace": "default",
        "labels": {"app": "web", "service.kubernetes.io/service-proxy-name": "other"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 4000 + "}",
                        "service.kubernetes.io/topology-mode": "Auto", "team": "a"},
    }  # fmt: skip
    for ports in ([{"port": 80}], [{"port": 80, "targetPort": "http"}]):  # the fast path and the schema's
        svc = parse_service({"metadata": meta, "spec": {"clusterIP": "10.96.0.1", "ports": ports}})
        assert svc.metadata.labels == {"service.kubernetes.io/service-proxy-name": "other"}
        assert svc.metadata.annotations == {"service.kubernetes.io/topology-mode": "Auto"}
    es = parse_endpoint_slice({
        "metadata": {"name": "web-1", "namespace": "default", "labels": {
            "kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "x", "app": "web"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 8080}],
    })  # fmt: skip
    assert es.metadata.labels == {
        "kubernetes.io/service-name": "web",
        "endpointslice.kubernetes.io/managed-by": "x",
    }
    assert es.metadata.annotations == {}
    assert es.service_key == "default/web"


def test_packed_addresses_round_trip_without_the_socket_module() -> None:
    """PackedEndpoints converts dotted quads itself (the model does no I/O): the same 4 bytes as
    inet_aton, and every way of reading gives the addresses back."""
    import socket

    from kproxy.model import PackedEndpoints, endpoint_rows

    addrs = ["0.0.0.0", "255.255.255.255", "10.0.0.1", "192.168.100.9", "1.20.255.0"]
    es = parse_endpoint_slice(slice_raw(endpoints=[ep(a) for a in addrs]))
    assert type(es.endpoints) is PackedEndpoints
    assert es.endpoints._addrs == b"".join(socket.inet_aton(a) for a in addrs)
    assert [e.addresses[0] for e in es.endpoints] == addrs
    assert [es.endpoints[i].addresses[0] for i in range(len(addrs))] == addrs
    assert [row[0] for row in endpoint_rows(es.endpoints)] == addrs


def test_shared_values_are_shared_by_type_and_never_mutated_by_a_sync() -> None:
    from kproxy.bpf.mapapi import MemoryMapSet
    from kproxy.model import NodeInfo
    from kproxy.model.compact import EMPTY_LIST, ForNode, ForZone, shared_list, shared_tuple
    from kproxy.pipeline import sync_dirty
    from kproxy.store import ClusterStore
    from kproxy.sync import Syncer
    from kproxy.translate import TranslateConfig

    # equal values of other types are not handed out for each other
    assert type(shared_list([ForZone("a")])[0]) is ForZone
    assert type(shared_list([ForNode("a")])[0]) is ForNode
    assert shared_list([True]) == [True] and shared_list([1])[0] is not True
    assert (
        type(shared_tuple((ForNode("b"),))[0]) is ForNode
        and type(shared_tuple((ForZone("b"),))[0]) is ForZone
    )
    # equal values are one object
    a = parse_service(svc_raw("a", ports=[{"name": "http", "port": 80}]))
    b = parse_service(svc_raw("b", ports=[{"name": "http", "port": 80}]))
    assert a.spec.ports is b.spec.ports and a.spec.external_ips is EMPTY_LIST
    # the whole pipeline reads the shared lists without changing them
    store = ClusterStore(NodeInfo(name="node-a", addresses=("192.168.0.10",)))
    for i in range(20):
        port = {"name": "http", "port": 80, "nodePort": 30000 + i}
        store.upsert_service(svc_raw(f"s{i}", cluster_ip=f"10.96.0.{i + 1}", type="NodePort", ports=[port]))
        store.upsert_slice(slice_raw(f"s{i}", f"s{i}-x", endpoints=[ep(f"10.0.0.{i + 1}", "node-a")]))
    store.mark_initial_sync_done()
    sync_dirty(store, Syncer(MemoryMapSet()), TranslateConfig(), full=True)
    assert EMPTY_LIST == [] and a.spec.ports == [b.spec.ports[0]] and len(a.spec.ports) == 1
