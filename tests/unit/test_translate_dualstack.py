"""translate_service on IPv6 and dual-stack clusters (issue 15): each family as kube-proxy's proxier of
that family sees it (pkg/proxy/metaproxier: one proxier per family, each with only its family's
addresses and EndpointSlices).

The objects are written as `kubectl get -o yaml` shows them on a dual-stack cluster (API server 1.33,
EndpointSlice controller), then parsed like the API source does.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest
import yaml

from kproxy.abi import Scope, SvcFlag
from kproxy.desired import Frontend
from kproxy.model import NodeInfo, parse_endpoint_slice, parse_service
from kproxy.model.compact import EndpointSlice, Service
from kproxy.sources.kube.objects import node_info
from kproxy.translate import (
    TranslateConfig,
    lb_source_ranges,
    local_ready_endpoints,
    nodeport_addresses,
    service_families,
    translate_service,
)

# node-a, as `kubelet --node-ip=192.168.1.10,fd00:1::10` registers it
NODE_A_YAML = """
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    kubernetes.io/hostname: node-a
    topology.kubernetes.io/zone: zone-a
status:
  addresses:
  - address: 192.168.1.10
    type: InternalIP
  - address: fd00:1::10
    type: InternalIP
  - address: node-a
    type: Hostname
"""
NODE = node_info(yaml.safe_load(NODE_A_YAML))
V6_NODE = NodeInfo("node-a", ("fd00:1::10",), zone="zone-a")  # an IPv6-only cluster's node
CFG = TranslateConfig()

# two dual-stack pods: web-1 on this node, web-2 on node-b
PODS = {
    "web-1": ("node-a", "10.244.1.5", "fd00:10:244:1::5"),
    "web-2": ("node-b", "10.244.2.7", "fd00:10:244:2::7"),
}


def service_yaml(
    name: str = "web",
    *,
    policy: str = "PreferDualStack",
    families: tuple[str, ...] = ("IPv4", "IPv6"),
    type: str = "ClusterIP",
    itp: str = "Cluster",
    affinity: str = "None",
    extra_spec: str = "",
    status: str = "  loadBalancer: {}",
) -> dict[str, Any]:
    ips = {"IPv4": "10.96.47.10", "IPv6": "fd00:10:96::2f0a"}
    cluster_ips = "\n".join(f"  - {ips[f]}" for f in families)
    ip_families = "\n".join(f"  - {f}" for f in families)
    node_port = "\n    nodePort: 30080" if type in ("NodePort", "LoadBalancer") else ""
    text = f"""
apiVersion: v1
kind: Service
metadata:
  creationTimestamp: "2026-11-02T09:14:07Z"
  labels:
    app: {name}
  name: {name}
  namespace: shop
  resourceVersion: "48211"
  uid: 3f6f3f8e-2b1c-4d7e-9a51-0c5b2a7d8e11
spec:
  clusterIP: {ips[families[0]]}
  clusterIPs:
{cluster_ips}
  internalTrafficPolicy: {itp}
  ipFamilies:
{ip_families}
  ipFamilyPolicy: {policy}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http{node_port}
  selector:
    app: web
  sessionAffinity: {affinity}
  type: {type}
{extra_spec}
status:
{status}
"""
    return yaml.safe_load(text)  # type: ignore[no-any-return]


def slice_yaml(
    family: str, service: str = "web", suffix: str = "x7k2p", pods: tuple[str, ...] = ("web-1", "web-2"),
    *, ready: dict[str, bool] | None = None, node_names: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """An EndpointSlice as the controller writes it, one per family."""
    eps = []
    for pod in pods:
        node, v4, v6 = PODS[pod]
        r = (ready or {}).get(pod, True)
        ep: dict[str, Any] = {
            "addresses": [v4 if family == "IPv4" else v6],
            "conditions": {"ready": r, "serving": r, "terminating": False},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop", "uid": f"uid-{pod}"},
            "zone": "zone-a" if node == "node-a" else "zone-b",
        }
        if node_names:
            ep["nodeName"] = node
        eps.append(ep)
    return {
        "addressType": family,
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": eps,
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": f"{service}-",
            "labels": {
                "app": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "name": f"{service}-{'v6' if family == 'IPv6' else 'v4'}{suffix}",
            "namespace": "shop",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": "u"}],
        },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def svc(**kw: Any) -> Service:
    return parse_service(service_yaml(**kw))


def slices(*families: str, **kw: Any) -> list[EndpointSlice]:
    return [parse_endpoint_slice(slice_yaml(f, **kw)) for f in families]


def tr(service: Service, sl: list[EndpointSlice], node: NodeInfo = NODE, cfg: TranslateConfig = CFG,
       skipped: Counter[str] | None = None) -> list[Frontend]:  # fmt: skip
    return translate_service(service, sl, node, cfg, skipped)


def backends(fe: Frontend) -> list[str]:
    return [b.address for b in fe.backends]


def by(fes: list[Frontend], type: str, scope: int | None = None) -> list[Frontend]:
    return [f for f in fes if f.type == type and (scope is None or f.scope == scope)]


def is_v6(address: str) -> bool:
    return ipaddress.ip_address(address).version == 6


# ---- families of a Service ----


@pytest.mark.parametrize(
    "policy, families, want",
    [
        ("PreferDualStack", ("IPv4", "IPv6"), ["10.96.47.10", "fd00:10:96::2f0a"]),
        ("RequireDualStack", ("IPv4", "IPv6"), ["10.96.47.10", "fd00:10:96::2f0a"]),
        ("PreferDualStack", ("IPv6", "IPv4"), ["fd00:10:96::2f0a", "10.96.47.10"]),
        ("RequireDualStack", ("IPv6", "IPv4"), ["fd00:10:96::2f0a", "10.96.47.10"]),
        ("SingleStack", ("IPv6",), ["fd00:10:96::2f0a"]),
        ("SingleStack", ("IPv4",), ["10.96.47.10"]),
    ],
)
def test_cluster_ips_of_every_family_policy_each_fed_by_its_own_slices(policy, families, want):
    skipped: Counter[str] = Counter()
    fes = tr(svc(policy=policy, families=families), slices("IPv4", "IPv6"), skipped=skipped)
    assert [f.address for f in fes] == want  # the primary family (ipFamilies[0]) first
    for fe in fes:
        assert fe.type == "ClusterIP" and fe.scope == Scope.EXT and fe.port == 80
        v6 = is_v6(fe.address)
        want_backends = [PODS[p][2 if v6 else 1] for p in ("web-1", "web-2")]
        assert backends(fe) == want_backends
        assert all(b.port == 8080 and b.protocol == "TCP" for b in fe.backends)
    if len(families) == 1:  # the other family's slice belongs to no frontend
        assert skipped == {"endpointslice_family_without_cluster_ip": 1}
    else:
        assert not skipped
    assert service_families(svc(policy=policy, families=families)) == families


def test_ipv6_only_cluster_slices_without_node_name():
    """An IPv6-only cluster (kind with ipFamily: ipv6); endpoints without nodeName (an external
    controller's slices) are never local."""
    s = svc(policy="SingleStack", families=("IPv6",), type="NodePort")
    sl = slices("IPv6", node_names=False)
    skipped: Counter[str] = Counter()
    fes = tr(s, sl, node=V6_NODE, skipped=skipped)
    assert [(f.type, f.address, f.port) for f in fes] == [
        ("ClusterIP", "fd00:10:96::2f0a", 80),
        ("NodePort", "fd00:1::10", 30080),
    ]
    for fe in fes:
        assert backends(fe) == ["fd00:10:244:1::5", "fd00:10:244:2::7"]
        assert not any(b.local or b.node_name for b in fe.backends)
    assert by(fes, "NodePort")[0].flags == SvcFlag.NODEPORT
    assert not skipped
    # externalTrafficPolicy Local: no endpoint is known to be local, others exist -> drop, not reject
    s = svc(policy="SingleStack", families=("IPv6",), type="NodePort",
            extra_spec="  externalTrafficPolicy: Local\n  healthCheckNodePort: 31234")  # fmt: skip
    fes = tr(s, sl, node=V6_NODE)
    (ext,) = by(fes, "NodePort", Scope.EXT)
    (int_,) = by(fes, "NodePort", Scope.INT)
    assert ext.backends == () and ext.flags & SvcFlag.NO_LOCAL_DROP
    assert backends(int_) == ["fd00:10:244:1::5", "fd00:10:244:2::7"]
    assert local_ready_endpoints(s, sl, V6_NODE) == 0


def test_same_dual_stack_pods_in_several_services():
    """web and web-canary select the same pods: each Service gets each pod once per family, as equal
    BackendRefs (the Syncer shares backend IDs by address, port and protocol)."""
    web = tr(svc(name="web"), slices("IPv4", "IPv6", service="web"))
    canary = tr(
        svc(name="web-canary", families=("IPv6", "IPv4"), policy="RequireDualStack"),
        slices("IPv6", "IPv4", service="web-canary", suffix="q9z"),
    )
    assert [f.service for f in web] == ["shop/web"] * 2
    assert [f.service for f in canary] == ["shop/web-canary"] * 2
    web_by_family = {is_v6(f.address): f.backends for f in web}
    canary_by_family = {is_v6(f.address): f.backends for f in canary}
    assert web_by_family == canary_by_family
    assert [b.address for b in web_by_family[True]] == ["fd00:10:244:1::5", "fd00:10:244:2::7"]
    assert [b.local for b in web_by_family[True]] == [True, False]  # web-1 runs on node-a


def test_backend_addresses_canonical_whatever_the_slice_spelling():
    raw6 = slice_yaml("IPv6")
    raw6["endpoints"][0]["addresses"] = ["FD00:10:244:1:0:0:0:5"]  # a hand-written slice
    raw6b = slice_yaml("IPv6", suffix="dup", pods=("web-1",))  # the same pod in a second slice
    fes = tr(svc(), [parse_endpoint_slice(raw6), parse_endpoint_slice(raw6b), *slices("IPv4")])
    v6 = next(f for f in fes if is_v6(f.address))
    assert backends(v6) == ["fd00:10:244:1::5", "fd00:10:244:2::7"]  # de-duplicated after canonicalising


def test_fqdn_slices_skipped_and_counted():
    fqdn = slice_yaml("IPv4", suffix="fq")
    fqdn["addressType"] = "FQDN"
    for e in fqdn["endpoints"]:
        e["addresses"] = ["web-1.example.com"]
    skipped: Counter[str] = Counter()
    fes = tr(svc(), [*slices("IPv4", "IPv6"), parse_endpoint_slice(fqdn)], skipped=skipped)
    assert len(fes) == 2 and skipped == {"endpointslice_fqdn": 1}
    assert "endpointslice_ipv6" not in skipped and "ipv6_address" not in skipped


# ---- traffic policies, per family ----


def test_external_traffic_policy_local_per_family():
    """web-1 (on node-a) is ready in IPv4 but its IPv6 endpoint is not ready yet: IPv4 external
    frontends get it, IPv6 ones have no local endpoint and drop; pods (INT scope) use all endpoints."""
    s = svc(type="LoadBalancer", extra_spec="  externalTrafficPolicy: Local\n  healthCheckNodePort: 31234",
            status="  loadBalancer:\n    ingress:\n    - ip: 203.0.113.7\n      ipMode: VIP\n"
                   "    - ip: 2001:db8:1::7\n      ipMode: VIP")  # fmt: skip
    sl = [parse_endpoint_slice(slice_yaml("IPv4")),
          parse_endpoint_slice(slice_yaml("IPv6", ready={"web-1": False}))]  # fmt: skip
    fes = tr(s, sl)
    ext = {(f.type, f.address): f for f in fes if f.scope == Scope.EXT and f.type != "ClusterIP"}
    assert set(ext) == {
        ("NodePort", "192.168.1.10"), ("NodePort", "fd00:1::10"),
        ("LoadBalancer", "203.0.113.7"), ("LoadBalancer", "2001:db8:1::7"),
    }  # fmt: skip
    for (_, address), fe in ext.items():
        assert fe.flags & SvcFlag.ETP_LOCAL and fe.flags & SvcFlag.TWO_SCOPES
        if is_v6(address):
            assert fe.backends == () and fe.flags & SvcFlag.NO_LOCAL_DROP
            assert [b.address for b in fe.retained] == ["fd00:10:244:1::5"]
        else:
            assert backends(fe) == ["10.244.1.5"] and not fe.flags & SvcFlag.NO_LOCAL_DROP
    for fe in by(fes, "LoadBalancer", Scope.INT):
        assert backends(fe) == (["fd00:10:244:2::7"] if is_v6(fe.address) else ["10.244.1.5", "10.244.2.7"])
    # the health check: kube-proxy's IPv4 and IPv6 servers each count their own family
    assert local_ready_endpoints(s, sl, NODE) == 1  # primary family: IPv4
    assert local_ready_endpoints(s, sl, NODE, "IPv4") == 1
    assert local_ready_endpoints(s, sl, NODE, "IPv6") == 0


def test_internal_traffic_policy_local_per_family():
    s = svc(families=("IPv6", "IPv4"), itp="Local")
    sl = [parse_endpoint_slice(slice_yaml("IPv4", pods=("web-2",))),
          parse_endpoint_slice(slice_yaml("IPv6"))]  # fmt: skip
    v6, v4 = tr(s, sl)
    assert v6.address == "fd00:10:96::2f0a" and backends(v6) == ["fd00:10:244:1::5"]
    assert v6.flags == SvcFlag.ITP_LOCAL
    assert v4.address == "10.96.47.10" and v4.backends == ()
    assert v4.flags == SvcFlag.ITP_LOCAL | SvcFlag.NO_LOCAL_DROP  # web-2 exists elsewhere: drop


def test_dual_stack_pod_counts_once_in_local_endpoints():
    s = svc(type="NodePort", families=("IPv6", "IPv4"),
            extra_spec="  externalTrafficPolicy: Local\n  healthCheckNodePort: 31234")  # fmt: skip
    sl = slices("IPv4", "IPv6")
    assert local_ready_endpoints(s, sl, NODE) == 1  # primary family IPv6: web-1 once, not twice
    assert local_ready_endpoints(s, sl, NODE, "IPv4") == 1
    single = svc(type="NodePort", policy="SingleStack", families=("IPv4",))
    assert local_ready_endpoints(single, sl, NODE, "IPv6") == 0  # not served in IPv6 at all


def test_affinity_and_topology_per_family():
    s = svc(affinity="ClientIP", extra_spec="  sessionAffinityConfig:\n    clientIP:\n"
            "      timeoutSeconds: 600\n  trafficDistribution: PreferClose")  # fmt: skip
    raws = [slice_yaml("IPv4"), slice_yaml("IPv6")]
    for raw in raws:  # the controller's hints for PreferClose: each endpoint for its own zone
        for e in raw["endpoints"]:
            e["hints"] = {"forZones": [{"name": e["zone"]}]}
    raws[1]["endpoints"][1].pop("hints")  # one IPv6 endpoint without hints: no topology in IPv6
    v4, v6 = tr(s, [parse_endpoint_slice(r) for r in raws])
    assert v4.flags == v6.flags == SvcFlag.AFFINITY and v4.affinity_timeout == v6.affinity_timeout == 600
    assert backends(v4) == ["10.244.1.5"]  # same zone only
    assert backends(v6) == ["fd00:10:244:1::5", "fd00:10:244:2::7"]


# ---- external addresses ----


def test_external_ips_and_lb_ips_of_each_family_served_by_that_family():
    ingress = "\n    - ip: 203.0.113.7\n      ipMode: VIP\n    - ip: 2001:db8:1::7\n      ipMode: Proxy"
    s = svc(
        type="LoadBalancer",
        extra_spec="  externalIPs:\n  - 198.51.100.9\n  - 2001:db8:9::9",
        status=f"  loadBalancer:\n    ingress:{ingress}\n    - hostname: lb.example.com",
    )
    skipped: Counter[str] = Counter()
    fes = tr(s, slices("IPv4", "IPv6"), skipped=skipped)
    got = [(f.type, f.address) for f in fes]
    assert got == [
        ("ClusterIP", "10.96.47.10"), ("NodePort", "192.168.1.10"), ("LoadBalancer", "203.0.113.7"),
        ("ExternalIP", "198.51.100.9"),
        ("ClusterIP", "fd00:10:96::2f0a"), ("NodePort", "fd00:1::10"), ("ExternalIP", "2001:db8:9::9"),
    ]  # fmt: skip
    for fe in fes:
        assert all(is_v6(b) == is_v6(fe.address) for b in backends(fe)) and len(fe.backends) == 2
    assert skipped == {"lb_ip_mode_proxy": 1}


def test_single_stack_service_ignores_addresses_of_the_other_family():
    """kube-proxy's IPv6 proxier never sees a Service without an IPv6 clusterIP: no IPv6 NodePort,
    external IP or LB IP for it."""
    s = svc(
        type="LoadBalancer",
        policy="SingleStack",
        families=("IPv4",),
        extra_spec="  externalIPs:\n  - 2001:db8:9::9",
        status="  loadBalancer:\n    ingress:\n    - ip: 203.0.113.7\n    - ip: 2001:db8:1::7",
    )
    skipped: Counter[str] = Counter()
    fes = tr(s, slices("IPv4"), skipped=skipped)
    assert not any(is_v6(f.address) for f in fes)
    assert [f.type for f in fes] == ["ClusterIP", "NodePort", "LoadBalancer"]
    assert skipped == {"family_without_cluster_ip": 2}


# ---- loadBalancerSourceRanges, per family ----


def lb_svc(ranges: list[str], lb_ips: tuple[str, ...] = ("203.0.113.7", "2001:db8:1::7")) -> Service:
    ranges_yaml = "".join(f"\n  - {r!r}" for r in ranges)
    ingress = "".join(f"\n    - ip: {ip}" for ip in lb_ips)
    return svc(type="LoadBalancer", extra_spec=f"  loadBalancerSourceRanges:{ranges_yaml}",
               status=f"  loadBalancer:\n    ingress:{ingress}")  # fmt: skip


def lb_ranges(fes: list[Frontend]) -> dict[str, tuple[str, ...] | None]:
    """LB address -> its source ranges, or None when it has no SRC_RANGES flag."""
    out: dict[str, tuple[str, ...] | None] = {}
    for f in by(fes, "LoadBalancer"):
        out[f.address] = f.source_ranges if f.flags & SvcFlag.SRC_RANGES else None
        assert bool(f.source_ranges) == bool(f.flags & SvcFlag.SRC_RANGES)
    return out


def test_source_ranges_mixing_families_filtered_and_normalised():
    fes = tr(lb_svc(["10.20.0.0/16", " 2001:DB8:ABCD:0:0:0:0:0/48", "172.16.5.9/12", "2001:db8:ffff::/48 "]),
             slices("IPv4", "IPv6"))  # fmt: skip
    assert lb_ranges(fes) == {
        "203.0.113.7": ("10.20.0.0/16", "172.16.0.0/12"),
        "2001:db8:1::7": ("2001:db8:abcd::/48", "2001:db8:ffff::/48"),
    }
    for f in by(fes, "NodePort") + by(fes, "ClusterIP"):  # the ranges restrict LB IPs only
        assert not f.flags & SvcFlag.SRC_RANGES and f.source_ranges == ()


def test_a_family_without_ranges_of_its_own_is_unrestricted():
    assert lb_ranges(tr(lb_svc(["2001:db8::/32"]), slices("IPv4", "IPv6"))) == {
        "203.0.113.7": None, "2001:db8:1::7": ("2001:db8::/32",),
    }  # fmt: skip
    assert lb_ranges(tr(lb_svc(["10.0.0.0/8"]), slices("IPv4", "IPv6"))) == {
        "203.0.113.7": ("10.0.0.0/8",), "2001:db8:1::7": None,
    }  # fmt: skip
    # a zero CIDR means "allow any" (kube-proxy's IsZeroCIDR), per family
    assert lb_ranges(tr(lb_svc(["::/0", "10.0.0.0/8"]), slices("IPv4", "IPv6"))) == {
        "203.0.113.7": ("10.0.0.0/8",), "2001:db8:1::7": None,
    }  # fmt: skip


def test_lb_ips_themselves_allowed_when_a_range_holds_the_primary_node_address_of_their_family():
    # fd00:1::10 is node-a's primary IPv6 address: the IPv6 LB IPs loop back from themselves
    fes = tr(lb_svc(["fd00:1::/64", "10.99.0.0/16"], ("203.0.113.7", "2001:db8:1::7", "2001:db8:1::8")),
             slices("IPv4", "IPv6"))  # fmt: skip
    assert lb_ranges(fes) == {
        "203.0.113.7": ("10.99.0.0/16",),
        "2001:db8:1::7": ("2001:db8:1::7/128", "2001:db8:1::8/128", "fd00:1::/64"),
        "2001:db8:1::8": ("2001:db8:1::7/128", "2001:db8:1::8/128", "fd00:1::/64"),
    }
    # the primary is the first InternalIP of the family, not any: fd00:2::10 is not in the range
    node = NodeInfo("node-a", ("fd00:2::10", "192.168.1.10", "fd00:1::10"))
    s = lb_svc(["fd00:1::/64"])
    assert lb_source_ranges(s, ["2001:db8:1::7"], node) == ("fd00:1::/64",)
    assert lb_source_ranges(s, ["2001:db8:1::7"], NODE) == ("2001:db8:1::7/128", "fd00:1::/64")
    assert lb_source_ranges(s, ["203.0.113.7"], NODE) == ()


# ---- NodePorts, per family ----


def test_nodeport_on_internal_ips_of_each_family_by_default():
    node = NodeInfo("node-a", ("fd00:1::10", "192.168.1.10", "10.1.0.5", "fd00:1::11"))
    assert nodeport_addresses(node, CFG) == ["192.168.1.10", "10.1.0.5", "fd00:1::10", "fd00:1::11"]
    fes = tr(svc(type="NodePort"), slices("IPv4", "IPv6"), node=node)
    assert [f.address for f in by(fes, "NodePort")] == [
        "192.168.1.10",
        "10.1.0.5",
        "fd00:1::10",
        "fd00:1::11",
    ]
    assert all(f.port == 30080 and f.flags == SvcFlag.NODEPORT for f in by(fes, "NodePort"))


HOST = ("127.0.0.1", "192.168.1.10", "10.1.0.5", "172.17.0.1", "::1", "fd00:1::10", "2001:db8:5::1")


@pytest.mark.parametrize(
    "cidrs, want",
    [
        # CIDRs of both families: each family by its own CIDRs
        (["192.168.1.0/24", "fd00:1::/64"], ["192.168.1.10", "fd00:1::10"]),
        (["10.0.0.0/8", "2001:db8::/32"], ["10.1.0.5", "2001:db8:5::1"]),
        # IPv4 CIDRs only: IPv6 NodePorts on every IPv6 address (kube-proxy warns about this), loopback never
        (["192.168.1.0/24"], ["192.168.1.10", "fd00:1::10", "2001:db8:5::1"]),
        (["::/0", "172.16.0.0/12"], ["172.17.0.1", "fd00:1::10", "2001:db8:5::1"]),
        (["127.0.0.0/8", "::1/128"], []),
    ],
)
def test_nodeport_addresses_cidrs_of_both_families(cidrs, want):
    node = NodeInfo("node-a", ("192.168.1.10", "fd00:1::10"), host_addresses=HOST)
    cfg = TranslateConfig.from_cidrs(cidrs)
    assert nodeport_addresses(node, cfg) == want
    fes = tr(svc(type="NodePort"), slices("IPv4", "IPv6"), node=node, cfg=cfg)
    assert [f.address for f in by(fes, "NodePort")] == want


def test_frontends_of_both_families_sorted_backends_and_unique():
    # several ports, both families, backends in sorted (slot) order per family
    raw = service_yaml()
    raw["spec"]["ports"].append({"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443})
    sl = []
    for fam in ("IPv4", "IPv6"):
        r = slice_yaml(fam, pods=("web-2", "web-1"))
        r["ports"].append({"name": "https", "port": 8443, "protocol": "TCP"})
        sl.append(parse_endpoint_slice(r))
    fes = tr(parse_service(raw), sl)
    assert [(f.address, f.port) for f in fes] == [
        ("10.96.47.10", 80), ("fd00:10:96::2f0a", 80), ("10.96.47.10", 443), ("fd00:10:96::2f0a", 443),
    ]  # fmt: skip
    for fe in fes:
        assert backends(fe) == sorted(backends(fe))
    assert len({(f.address, f.port, f.protocol, f.scope) for f in fes}) == len(fes)


def test_host_addresses_of_both_families_without_link_local():
    """What --nodeport-addresses selects from (kproxy.bpf.netlink.host_addresses' filter)."""
    import socket

    from kproxy.bpf.netlink import usable_host_addresses

    dump = [
        (socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "192.168.1.10"), (socket.AF_INET6, "::1"),
        (socket.AF_INET6, "fe80::a8c1:abff:fe12:3456"), (socket.AF_INET6, "FD00:1:0:0:0:0:0:10"),
        (socket.AF_INET6, "2001:db8:5::1"), (socket.AF_PACKET, "x"), (socket.AF_INET, "192.168.1.10"),
    ]  # fmt: skip
    host = usable_host_addresses(dump)
    assert host == ["127.0.0.1", "192.168.1.10", "::1", "fd00:1::10", "2001:db8:5::1"]
    node = NodeInfo("node-a", ("192.168.1.10", "fd00:1::10"), host_addresses=tuple(host))
    assert nodeport_addresses(node, TranslateConfig.from_cidrs(["0.0.0.0/0", "::/0"])) == [
        "192.168.1.10", "fd00:1::10", "2001:db8:5::1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("families", "want"),
    [((), ["192.168.1.10"]), (("IPv6",), ["fd00:1::10"]), (("IPv6", "IPv4"), ["fd00:1::10", "192.168.1.10"])],
)
def test_a_service_without_cluster_ip_is_served_in_the_families_it_asks_for(
    families: tuple[str, ...], want: list[str]
) -> None:
    """A standalone manifest may leave clusterIP out (the API server always allocates one): its NodePorts
    are served in spec.ipFamilies, IPv4 when it names none, as before dual-stack; no ClusterIP frontend."""
    spec: dict[str, Any] = {
        "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}],
    }
    if families:
        spec["ipFamilies"] = list(families)
    meta = {"name": "np", "namespace": "demo"}
    svc = parse_service({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec})
    fes = translate_service(svc, [], NODE, CFG)
    assert [(fe.type, fe.address) for fe in fes] == [("NodePort", a) for a in want]
