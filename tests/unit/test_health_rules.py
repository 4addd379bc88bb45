"""healthCheckNodePort counts and translate agree: translate owns readiness and locality, health.py
only reports what translate.local_ready_endpoints says (kube-proxy's LocalReadyEndpoints)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from unit_objects import NODE, ep, slice_raw, svc_raw

from kproxy.abi import Scope
from kproxy.model import EndpointSlice, NodeInfo, Service, parse_endpoint_slice, parse_service
from kproxy.observe.health import health_check_services
from kproxy.translate import TranslateConfig, is_local, is_ready, local_ready_endpoints, translate_service

HC_PORT = 32000


@dataclass
class _Store:
    """What health_check_services reads of the cluster view."""

    node: NodeInfo
    services: dict[str, Service] = field(default_factory=dict)
    slices: dict[str, list[EndpointSlice]] = field(default_factory=dict)

    def slices_of(self, key: str) -> list[EndpointSlice]:
        return self.slices.get(key, [])


def _local_svc_raw() -> dict[str, Any]:
    return {
        "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": HC_PORT,
    }


def _local_svc(**kw: Any) -> Service:
    return parse_service(svc_raw(**{**_local_svc_raw(), **kw}))


def _count(svc: Service, endpoints: list[dict[str, Any]], node: NodeInfo = NODE) -> int:
    store = _Store(node, {svc.key: svc}, {svc.key: [parse_endpoint_slice(slice_raw(endpoints=endpoints))]})
    port, count = health_check_services(store)[("default", "web")]
    assert port == HC_PORT
    return count


def _local_backends(svc: Service, endpoints: list[dict[str, Any]]) -> set[str]:
    """The addresses translate gives the NodePort's external scope (eTP Local: the local endpoints)."""
    es = parse_endpoint_slice(slice_raw(endpoints=endpoints))
    fes = translate_service(svc, [es], NODE, TranslateConfig())
    (fe,) = [f for f in fes if f.type == "NodePort" and f.scope == Scope.EXT]
    return {b.address for b in fe.backends}


_TRI = (None, True, False)


@pytest.mark.parametrize(("ready", "serving", "terminating"), list(itertools.product(_TRI, _TRI, _TRI)))
@pytest.mark.parametrize("node_name", ["node-a", "node-b", None])
def test_health_counts_what_translate_calls_local_and_ready(
    ready: bool | None, serving: bool | None, terminating: bool | None, node_name: str | None
) -> None:
    svc = _local_svc()
    endpoint = ep("10.0.0.1", node_name, ready=ready, serving=serving, terminating=terminating)
    parsed = parse_endpoint_slice(slice_raw(endpoints=[endpoint])).endpoints[0]
    local_ready = is_ready(parsed.conditions) and is_local(parsed.node_name, NODE.name)
    assert _count(svc, [endpoint]) == int(local_ready)
    if local_ready:  # and translate sends the external traffic to it
        assert _local_backends(svc, [endpoint]) == {"10.0.0.1"}


def test_health_count_matches_translates_local_endpoints() -> None:
    svc = _local_svc()
    endpoints = [
        ep("10.0.0.1", "node-a"),  # local, ready: counted
        ep("10.0.0.2", "node-a", ready=None),  # ready unset means ready: counted
        ep("10.0.0.3", "node-a", ready=True, terminating=True),  # kube-proxy's IsReady ignores terminating
        ep("10.0.0.4", "node-a", ready=False, serving=True, terminating=True),  # terminating, serving
        ep("10.0.0.5", "node-a", ready=False),  # not ready
        ep("10.0.0.6", "node-b"),  # another node's
        ep("10.0.0.7", None),  # no nodeName: never local
    ]
    assert _local_backends(svc, endpoints) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert _count(svc, endpoints) == 3


def test_only_terminating_local_endpoints_fail_the_health_check_though_they_get_traffic() -> None:
    # kube-proxy: terminating endpoints may still serve, but the health check signal fails so load
    # balancers send new connections to other nodes
    svc = _local_svc()
    endpoints = [ep("10.0.0.4", "node-a", ready=False, serving=True, terminating=True), ep("10.0.0.6")]
    assert _local_backends(svc, endpoints) == {"10.0.0.4"}
    assert _count(svc, endpoints) == 0


def test_an_address_counts_once_over_ports_and_slices() -> None:
    svc = parse_service(
        svc_raw(
            type="LoadBalancer",
            ports=[
                {"name": "http", "port": 80, "nodePort": 30080},
                {"name": "https", "port": 443, "nodePort": 30443},
            ],
            externalTrafficPolicy="Local",
            healthCheckNodePort=HC_PORT,
        )
    )
    ports = [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]
    slices = [
        parse_endpoint_slice(slice_raw(name="web-1", endpoints=[ep("10.0.0.1", "node-a")], ports=ports)),
        parse_endpoint_slice(slice_raw(name="web-2", endpoints=[ep("10.0.0.1", "node-a")], ports=ports)),
    ]
    assert local_ready_endpoints(svc, slices, NODE) == 1


def test_services_without_a_local_external_policy_get_no_health_check() -> None:
    cluster = parse_service(svc_raw(type="NodePort", healthCheckNodePort=HC_PORT))
    store = _Store(NODE, {cluster.key: cluster})
    assert health_check_services(store) == {}


def test_a_service_another_proxy_serves_gets_no_health_check() -> None:
    # kube-proxy watches Services without service.kubernetes.io/service-proxy-name only: it never
    # opens that Service's healthCheckNodePort, which belongs to the other proxy
    other = _local_svc(labels={"service.kubernetes.io/service-proxy-name": "other-proxy"})
    ours = parse_service(svc_raw(**{**_local_svc_raw(), "name": "ours"}))
    store = _Store(NODE, {other.key: other, ours.key: ours})
    assert set(health_check_services(store)) == {("default", "ours")}


def test_health_check_counts_each_family_the_node_has_on_its_own() -> None:
    # kube-proxy's proxier of each family counts the endpoints of its family: a dual-stack pod once in
    # each, an IPv6-only endpoint in the IPv6 proxier only
    svc = _local_svc(
        cluster_ip="10.96.0.10", clusterIPs=["10.96.0.10", "fd00:96::10"], ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="PreferDualStack",
    )  # fmt: skip
    slices = [
        parse_endpoint_slice(slice_raw(name="web-4", endpoints=[ep("10.0.0.1", "node-a")])),
        parse_endpoint_slice(
            slice_raw(
                name="web-6",
                address_type="IPv6",
                endpoints=[ep("fd00:244::1", "node-a"), ep("fd00:244::2", "node-a")],
            )
        ),
    ]
    store = _Store(NODE, {svc.key: svc}, {svc.key: slices})
    assert health_check_services(store, ("IPv4", "IPv6")) == {
        ("default", "web"): (HC_PORT, {"IPv4": 1, "IPv6": 2})
    }
    assert health_check_services(store, ("IPv6",)) == {("default", "web"): (HC_PORT, {"IPv6": 2})}
    assert health_check_services(store) == {("default", "web"): (HC_PORT, 1)}  # the primary family's
    # a Service without a ClusterIP of the node's family counts 0 there (kube-proxy: no listener)
    v4_only = _local_svc()
    store = _Store(NODE, {v4_only.key: v4_only}, {v4_only.key: slices})
    assert health_check_services(store, ("IPv4", "IPv6")) == {
        ("default", "web"): (HC_PORT, {"IPv4": 1, "IPv6": 0})
    }
