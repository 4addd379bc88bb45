"""kube-proxy's packet-flow tables (pkg/proxy/nftables/proxier_test.go, v1.36), replayed with real packets.

Each upstream test function sets up Services and EndpointSlices and lists flows (source, destination,
expected endpoints or DROP/REJECT, masqueraded or not) that runPacketFlowTests checks against the
generated rules. Here the same set-ups are Services in one lab (conftest.py) and every flow is a
pytest case, id "<upstream function>/<case>", that opens real connections:

- endpoints X: every connection is answered by one of X (pod and target port), and every one of X
  answers at least one of a few connections;
- masquerade: the endpoint sees the node's address (n1's), not the client's; no masquerade: the client's;
- REJECT: ECONNREFUSED (TCP RST or ICMP port unreachable) well before the timeout;
- DROP: nothing comes back within DROP_TIMEOUT;
- PASS (kube-proxy: no rule matches, "output" empty): kproxy leaves the packet alone (no translation,
  reject or drop counted on n1) and no endpoint answers.

Addresses: kube-proxy's node IP is n1's, its secondary node IP NODE_ALT_IP, pods are lab pods (see
conftest.py), its external clients are `ext` (blocked ones: ext's BLOCKED_CLIENT_IP), cluster IPs are
in 10.96.11.0/24 (a ServiceCIDR object, routed to n1 by ext), LoadBalancer and external IPs in
192.168.78.0/24 (routed to n1 by ext). Inside the lab's namespaces only, the `world` fixture adds
BLOCKED_CLIENT_IP to ext, routes from ext to the service CIDR and NODE_ALT_NET via n1, and NODE_ALT_IP
and TestLoadBalancer's two LB IPs as /32s to n1's eth0 (its "same node to LB, SNATted to LB" cases are
node processes whose socket has the LB IP as source, so the LB IP must be an address of the node).
kube-proxy's "node" sources are processes in n1's socket-LB cgroup (DIFF_NODE_SOCKET: the endpoint sees
the node's address as with kube-proxy, so those cases assert kube-proxy's expectations).

Where kproxy deliberately differs, the case names the section of docs/kube-proxy-differences.md in its
`diff` and asserts kproxy's behaviour; with no `diff`, kube-proxy's behaviour is asserted. Not replayed
yet: TestNodePorts' two IPv6 subcases (this lab's Services and clients here are IPv4; the IPv6 behaviour
they check, NodePort from a pod, from outside and from the node, is covered by
tests/netns/test_external.py's IPv6 cells), and kube-proxy options kproxy does not have
(TestInternalExternalMasquerade's masqueradeAll and no-LocalTrafficDetector subcases).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from conformance_common import (
    CLIENT,
    L1,
    L2,
    L3,
    L4,
    N1_IP,
    R1,
    R2,
    R3,
    C,
    Ep,
    P,
    Port,
    Q,
    client_attempts,
    counters,
    quiet_counters,
)

from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import EXT_IP, Host
from kproxy.lab.netns import in_netns, ip
from kproxy.observe import inspect as insp

pytestmark = pytest.mark.root

SERVICE_CIDR = "10.96.11.0/24"
BLOCKED_CLIENT_IP = "192.168.77.130"  # kube-proxy's testExternalClientBlocked: a second address of ext
NODE_ALT_NET = "192.168.79.0/24"
NODE_ALT_IP = "192.168.79.2"  # kube-proxy's testNodeIPAlt: an address of n1 that is not its --node-ip
LB_LOCAL_IPS = ("192.168.78.4", "192.168.78.104")  # TestLoadBalancer's LB IPs, also addresses of n1
HAIRPIN_SOURCE = "169.254.42.1"
UNALLOCATED_CLUSTER_IP = "10.96.11.250"
OK_TIMEOUT = 10.0  # per connection that must succeed: only reached when something is wrong
REJECT_TIMEOUT = 5.0  # a REJECT answers at once; this bounds the wait only
DROP_TIMEOUT = 1.0
PASS_TIMEOUT = 2.0
MIN_TRIES = 12  # connections per case at least: a wrong extra endpoint is missed with p <= 2^-12
MAX_TRIES = 60  # connections per case at most, until every expected endpoint answered

DOC = "docs/kube-proxy-differences.md"
DIFF_EXT_LOCAL = f"{DOC}#external-clients-keep-their-address-when-the-endpoint-is-on-the-ingress-node"
DIFF_POD_EXT = f"{DOC}#pods-reaching-a-nodeport-loadbalancer-ip-or-external-ip-keep-their-address"
DIFF_HAIRPIN = f"{DOC}#a-pod-balanced-to-itself-sees-a-link-local-source"
DIFF_CIP_OUTSIDE = f"{DOC}#clusterips-from-outside-the-node-kube-proxys-behaviour-by-default-and-a-switch"
DIFF_NODE_SOCKET = f"{DOC}#processes-of-the-node-are-balanced-at-the-socket-not-per-packet"
DIFF_SCTP = f"{DOC}#sctp-served-in-the-tc-path-never-by-socket-lb-never-with-dsr"


# ---- Services: one table per upstream set-up ----
def term(pod: str, serving: bool = True, node: str | None = None) -> Ep:
    """A terminating endpoint (ready false), serving or not."""
    return Ep(pod, node=node, ready=False, serving=serving, terminating=True)


@dataclass(frozen=True)
class Svc:
    name: str
    index: int  # gives the cluster IP 10.96.11.<index>
    ports: tuple[Port, ...]
    endpoints: tuple[Ep, ...] | None  # None: no EndpointSlice
    type: str = "ClusterIP"
    etp: str | None = None
    itp: str | None = None
    lb_ips: tuple[tuple[str, str | None], ...] = ()  # (address, ipMode)
    external_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()

    @property
    def cluster_ip(self) -> str:
        return f"10.96.11.{self.index}"


def lb_ip(i: int, k: int = 0) -> str:
    return f"192.168.78.{i + 100 * k}"


def ext_ip(i: int) -> str:
    return f"192.168.78.{200 + i}"


def p80(i: int | None = None, name: str = "p80") -> tuple[Port, ...]:
    """kube-proxy's usual single port 80 -> 80 (here -> P), with NodePort 30<i>0 when I is given."""
    return (Port(name, 80, P, "TCP", None if i is None else 30000 + 10 * i),)


def lb_svc(name: str, i: int, eps: tuple[Ep, ...] | None, **kw: Any) -> Svc:
    """A LoadBalancer Service as kube-proxy's tests write it: port 80, NodePort, an LB IP, an external IP."""
    kw.setdefault("ports", p80(i))
    kw.setdefault("lb_ips", ((lb_ip(i), None),))
    kw.setdefault("external_ips", (ext_ip(i),))
    return Svc(name, i, endpoints=eps, type="LoadBalancer", **kw)


# ---- flows ----
@dataclass(frozen=True)
class Flow:
    test: str  # upstream test function (and subcase)
    name: str  # upstream case name
    src: str  # "pod" (C), a pod name, "ext", "ext-blocked", "node", "node@<address>" (bound to it)
    dst: tuple[str, int]
    expect: tuple[str, ...] | str  # ("pod:port", ...) or "REJECT", "DROP", "PASS"
    masq: bool = False
    svc: str = ""  # the Service whose EndpointSlice the case needs present or (slice_deleted) deleted
    slice_deleted: bool = False
    agent_args: tuple[str, ...] = ()  # extra flags of n1's agent for this case
    proto: str = "TCP"
    diff: str | None = None  # section of docs/kube-proxy-differences.md kproxy follows instead
    gap: str | None = None  # a documented open gap: strict xfail
    needs_sctp: bool = False

    @property
    def id(self) -> str:
        return f"{self.test}/{self.name}"


def ep(pod: str, port: int = P) -> str:
    return f"{pod}:{port}"


SERVICES: list[Svc] = []
FLOWS: list[Flow] = []


def add(svcs: Sequence[Svc], flows: Sequence[Flow]) -> None:
    SERVICES.extend(svcs)
    FLOWS.extend(flows)


def cip(s: Svc, port: int = 80) -> tuple[str, int]:
    return (s.cluster_ip, port)


def nodeport(s: Svc, k: int = 0, addr: str = N1_IP) -> tuple[str, int]:
    np = s.ports[k].node_port
    assert np is not None
    return (addr, np)


def lb(s: Svc, k: int = 0) -> tuple[str, int]:
    return (s.lb_ips[k][0], 80)


def xip(s: Svc) -> tuple[str, int]:
    return (s.external_ips[0], 80)


# fmt: off
# TestNoEndpointsReject: a LoadBalancer Service without endpoints rejects on every address.
T = "TestNoEndpointsReject"
_s = lb_svc("noeps", 1, None)
add(
    [_s],
    [
        Flow(T, "pod to cluster IP with no endpoints", "pod", cip(_s), "REJECT"),
        Flow(T, "external to external IP with no endpoints", "ext", xip(_s), "REJECT"),
        Flow(T, "pod to NodePort with no endpoints", "pod", nodeport(_s), "REJECT"),
        Flow(T, "external to NodePort with no endpoints", "ext", nodeport(_s), "REJECT"),
        Flow(T, "pod to LoadBalancer IP with no endpoints", "pod", lb(_s), "REJECT"),
        Flow(T, "external to LoadBalancer IP with no endpoints", "ext", lb(_s), "REJECT"),
    ],
)

# TestClusterIPGeneral: svc1 one local endpoint; svc2 a local and a remote one, five ports.
T = "TestClusterIPGeneral"
_s1 = Svc("cipg-svc1", 2, (Port("http", 80, P),), (Ep(L1),))
_s2 = Svc(
    "cipg-svc2",
    3,
    (
        Port("http", 80, P),
        Port("https", 443, Q),
        Port("dns-udp", 53, P, "UDP"),
        Port("dns-tcp", 53, Q, "TCP"),
        Port("dns-sctp", 53, P, "SCTP"),
    ),
    (Ep(L1), Ep(R1)),
)
add(
    [_s1, _s2],
    [
        Flow(T, "simple clusterIP", "pod", cip(_s1), (ep(L1),)),
        Flow(T, "hairpin to cluster IP", L1, cip(_s1), (ep(L1),), masq=True, diff=DIFF_HAIRPIN),
        Flow(T, "clusterIP with multiple endpoints", "pod", cip(_s2), (ep(L1), ep(R1))),
        Flow(T, "clusterIP with TargetPort", "pod", cip(_s2, 443), (ep(L1, Q), ep(R1, Q))),
        Flow(T, "clusterIP with TCP, UDP, and SCTP on same port (TCP)", "pod", cip(_s2, 53),
             (ep(L1, Q), ep(R1, Q))),
        # (upstream names this case "(TCP)" too)
        Flow(T, "clusterIP with TCP, UDP, and SCTP on same port (UDP)", "pod", cip(_s2, 53),
             (ep(L1), ep(R1)), proto="UDP"),
        Flow(T, "clusterIP with TCP, UDP, and SCTP on same port (SCTP)", "pod", cip(_s2, 53),
             (ep(L1), ep(R1)), proto="SCTP", diff=DIFF_SCTP, needs_sctp=True),
        Flow(T, "TCP-only port does not match UDP traffic", "pod", cip(_s2), "REJECT", proto="UDP"),
        Flow(T, "svc1 does not accept svc2's ports", "pod", cip(_s1, 443), "REJECT"),
        Flow(T, "packet to unallocated cluster ip", "pod", (UNALLOCATED_CLUSTER_IP, 80), "DROP"),
    ],
)

# TestLoadBalancer: two LB IPs, loadBalancerSourceRanges holding the node's network and the allowed
# client (" 192.168.77.96/27": the leading blank is upstream's whitespace regression), one local endpoint.
T = "TestLoadBalancer"
_s = lb_svc(
    "lb",
    4,
    (Ep(L1),),
    lb_ips=((LB_LOCAL_IPS[0], None), (LB_LOCAL_IPS[1], None)),
    external_ips=(),
    source_ranges=("192.168.77.0/28", " 192.168.77.96/27"),
)
assert lb_ip(4, 0) == LB_LOCAL_IPS[0] and lb_ip(4, 1) == LB_LOCAL_IPS[1]
_e = (ep(L1),)
add(
    [_s],
    [
        Flow(T, "pod to cluster IP", "pod", cip(_s), _e),
        Flow(T, "external to nodePort", "ext", nodeport(_s), _e, masq=True, diff=DIFF_EXT_LOCAL),
        Flow(T, "nodePort bypasses LoadBalancerSourceRanges", "ext-blocked", nodeport(_s), _e, masq=True,
             diff=DIFF_EXT_LOCAL),
        Flow(T, "accepted external to LB1", "ext", lb(_s, 0), _e, masq=True, diff=DIFF_EXT_LOCAL),
        Flow(T, "accepted external to LB2", "ext", lb(_s, 1), _e, masq=True, diff=DIFF_EXT_LOCAL),
        Flow(T, "blocked external to LB1", "ext-blocked", lb(_s, 0), "DROP"),
        Flow(T, "blocked external to LB2", "ext-blocked", lb(_s, 1), "DROP"),
        Flow(T, "pod to LB1 (blocked by LoadBalancerSourceRanges)", "pod", lb(_s, 0), "DROP"),
        Flow(T, "pod to LB2 (blocked by LoadBalancerSourceRanges)", "pod", lb(_s, 1), "DROP"),
        Flow(T, "node to LB1 (allowed by LoadBalancerSourceRanges)", "node", lb(_s, 0), _e, masq=True),
        Flow(T, "node to LB2 (allowed by LoadBalancerSourceRanges)", "node", lb(_s, 1), _e, masq=True),
        # a node process whose socket has the LB IP, an address of n1 here, as its source: balanced at
        # the socket, the endpoint sees that address of the node (kube-proxy masquerades it to another)
        Flow(T, "same node to LB1, SNATted to LB1 (implicitly allowed)", f"node@{LB_LOCAL_IPS[0]}",
             lb(_s, 0), _e, masq=True, diff=DIFF_NODE_SOCKET),
        Flow(T, "same node to LB2, SNATted to LB2 (implicitly allowed)", f"node@{LB_LOCAL_IPS[1]}",
             lb(_s, 1), _e, masq=True, diff=DIFF_NODE_SOCKET),
    ],
)

# TestNodePorts (IPv4 subcases): endpoints on the other node and on this one; the node's second
# address serves NodePorts only when --nodeport-addresses selects it.
_s = Svc("np", 5, p80(5), (Ep(R1), Ep(L1)), type="NodePort")
_e2 = (ep(R1), ep(L1))
_multi = ("--nodeport-addresses", "192.168.77.0/24,192.168.79.0/24")
_no_localhost = ("--no-localhost-nodeports",)
# localhost to a NodePort: IPv4 only, unless --localhost-nodeports is off or --nodeport-addresses has
# IPv4 CIDRs none of which holds 127.0.0.1 (then "ignored": nothing listens on the node's loopback)
for _sub, _args in (
    ("ipv4", ()),
    ("ipv4, multiple nodeport-addresses", _multi),
    ("ipv4, localhost-nodeports disabled", _no_localhost),
):
    T = f"TestNodePorts/{_sub}"
    _localhost = nodeport(_s, addr="127.0.0.1")
    FLOWS.extend(
        [
            Flow(T, "pod to cluster IP", "pod", cip(_s), _e2, agent_args=_args),
            Flow(T, "external to nodePort", "ext", nodeport(_s), _e2, masq=True, agent_args=_args,
                 diff=DIFF_EXT_LOCAL),
            Flow(T, "node to nodePort", "node", nodeport(_s), _e2, masq=True, agent_args=_args),
            Flow(T, "localhost to nodePort gets masqueraded", "node", _localhost, _e2, masq=True,
                 agent_args=_args)
            if not _args else
            Flow(T, "localhost to nodePort is ignored", "node", _localhost, "PASS", agent_args=_args),
        ]
    )
    if _args == _multi:
        FLOWS.append(
            Flow(T, "external to nodePort on secondary IP", "ext", nodeport(_s, addr=NODE_ALT_IP), _e2,
                 masq=True, agent_args=_args, diff=DIFF_EXT_LOCAL)
        )
    else:
        FLOWS.append(
            Flow(T, "secondary nodeIP ignores NodePorts", "ext", nodeport(_s, addr=NODE_ALT_IP), "PASS",
                 agent_args=_args)
        )
SERVICES.append(_s)

# TestExternalTrafficPolicyLocal / Cluster: one remote and one local endpoint.
for _policy, _i in (("Local", 6), ("Cluster", 7)):
    T = f"TestExternalTrafficPolicy{_policy}"
    _s = lb_svc(f"etp-{_policy.lower()}", _i, (Ep(R1), Ep(L1)), etp=_policy)
    both = (ep(R1), ep(L1))
    if _policy == "Local":
        add(
            [_s],
            [
                Flow(T, "pod to cluster IP hits both endpoints, unmasqueraded", "pod", cip(_s), both),
                Flow(T, "pod to external IP hits both endpoints, unmasqueraded", "pod", xip(_s), both),
                Flow(T, "external to external IP hits only local endpoint, unmasqueraded", "ext", xip(_s),
                     (ep(L1),)),
                Flow(T, "pod to LB IP hits only both endpoints, unmasqueraded", "pod", lb(_s), both),
                Flow(T, "external to LB IP hits only local endpoint, unmasqueraded", "ext", lb(_s),
                     (ep(L1),)),
                Flow(T, "pod to NodePort hits both endpoints, unmasqueraded", "pod", nodeport(_s), both),
                Flow(T, "external to NodePort hits only local endpoint, unmasqueraded", "ext", nodeport(_s),
                     (ep(L1),)),
            ],
        )
    else:
        m: dict[str, Any] = {"masq": True}
        add(
            [_s],
            [
                Flow(T, "pod to cluster IP hits both endpoints, unmasqueraded", "pod", cip(_s), both),
                Flow(T, "pod to external IP hits both endpoints, masqueraded", "pod", xip(_s), both, **m,
                     diff=DIFF_POD_EXT),
                Flow(T, "external to external IP hits both endpoints, masqueraded", "ext", xip(_s), both,
                     **m, diff=DIFF_EXT_LOCAL),
                Flow(T, "pod to LB IP hits both endpoints, masqueraded", "pod", lb(_s), both, **m,
                     diff=DIFF_POD_EXT),
                Flow(T, "external to LB IP hits both endpoints, masqueraded", "ext", lb(_s), both, **m,
                     diff=DIFF_EXT_LOCAL),
                Flow(T, "pod to NodePort hits both endpoints, masqueraded", "pod", nodeport(_s), both, **m,
                     diff=DIFF_POD_EXT),
                Flow(T, "external to NodePort hits both endpoints, masqueraded", "ext", nodeport(_s), both,
                     **m, diff=DIFF_EXT_LOCAL),
            ],
        )

# TestInternalTrafficPolicy: per subcase a ClusterIP Service (one unnamed port), then its slice deleted.
_itp_cases: list[tuple[str, str, tuple[Ep, ...], tuple[str, ...] | str, str]] = [
    ("internalTrafficPolicy is cluster", "Cluster", (Ep(L1), Ep(R1), Ep(R2)),
     (ep(L1), ep(R1), ep(R2)), "pod to ClusterIP hits all endpoints"),
    ("internalTrafficPolicy is local and there is one local endpoint", "Local", (Ep(L1), Ep(R1), Ep(R2)),
     (ep(L1),), "pod to ClusterIP hits only local endpoint"),
    ("internalTrafficPolicy is local and there are multiple local endpoints", "Local",
     (Ep(L1), Ep(L2), Ep(R1)), (ep(L1), ep(L2)), "pod to ClusterIP hits all local endpoints"),
    ("internalTrafficPolicy is local and there are no local endpoints", "Local", (Ep(R1), Ep(R2), Ep(R3)),
     "DROP", "no endpoints"),
]
for _k, (_sub, _policy, _eps, _out, _case) in enumerate(_itp_cases):
    T = f"TestInternalTrafficPolicy/{_sub}"
    _s = Svc(f"itp-{_k}", 10 + _k, p80(name=""), _eps, itp=_policy)
    add(
        [_s],
        [
            Flow(T, _case, "pod", cip(_s), _out, svc=_s.name),
            Flow(T, "endpoints deleted", "pod", cip(_s), "REJECT", svc=_s.name, slice_deleted=True),
        ],
    )

# TestTerminatingEndpointsTrafficPolicyLocal / Cluster: a LoadBalancer Service (no NodePort) per
# subcase, its slice mixing ready, serving-terminating and terminating endpoints; then the slice deleted.
_lt: list[tuple[str, tuple[Ep, ...], tuple[str, ...] | str, tuple[str, ...] | str]] = [
    # (subcase, endpoints, pod to clusterIP, external to LB)
    ("ready endpoints exist", (Ep(L1), Ep(L2), term(L3), term(L4, serving=False), Ep(R1)),
     (ep(L1), ep(L2), ep(R1)), (ep(L1), ep(L2))),
    ("only terminating endpoints exist", (term(L2), term(L3), term(L4, serving=False), Ep(R1)),
     (ep(R1),), (ep(L2), ep(L3))),
    ("terminating endpoints on remote node", (term(R1),), (ep(R1),), "DROP"),
    ("no usable endpoints on any node", (term(R1, serving=False, node="n1"), term(R1, serving=False)),
     "REJECT", "REJECT"),
]
_ct: list[tuple[str, tuple[Ep, ...], tuple[str, ...] | str, tuple[str, ...] | str]] = [
    ("ready endpoints exist", (Ep(L1), Ep(L2), term(R2), term(R3, serving=False), Ep(R1)),
     (ep(L1), ep(L2), ep(R1)), (ep(L1), ep(L2), ep(R1))),
    ("only terminating endpoints exist", (term(L2), term(L3), term(R3, serving=False), term(R1)),
     (ep(L2), ep(L3), ep(R1)), (ep(L2), ep(L3), ep(R1))),
    ("terminating endpoints on remote node", (term(R1),), (ep(R1),), (ep(R1),)),
    ("no usable endpoints on any node", (term(R1, serving=False, node="n1"), term(R1, serving=False)),
     "REJECT", "REJECT"),
]
for _policy, _table, _base in (("Local", _lt, 20), ("Cluster", _ct, 30)):
    for _k, (_sub, _eps, _to_cip, _to_lb) in enumerate(_table):
        T = f"TestTerminatingEndpointsTrafficPolicy{_policy}/{_sub}"
        _s = Svc(f"term-{_policy.lower()}-{_k}", _base + _k, p80(name=""), _eps, type="LoadBalancer",
                 etp=_policy, lb_ips=((lb_ip(_base + _k), None),))
        ext_masq = _policy == "Cluster" and isinstance(_to_lb, tuple)
        ext_diff = DIFF_EXT_LOCAL if ext_masq and any(e.startswith("n1") for e in _to_lb) else None
        add(
            [_s],
            [
                Flow(T, "pod to clusterIP", "pod", cip(_s), _to_cip, svc=_s.name),
                Flow(T, "external to LB", "ext", lb(_s), _to_lb, masq=ext_masq, svc=_s.name, diff=ext_diff),
                Flow(T, "pod to clusterIP after endpoints deleted", "pod", cip(_s), "REJECT", svc=_s.name,
                     slice_deleted=True),
                Flow(T, "external to LB after endpoints deleted", "ext", lb(_s), "REJECT", svc=_s.name,
                     slice_deleted=True),
            ],
        )

# TestInternalExternalMasquerade ("base": a working local-traffic detector, no masqueradeAll):
# svc1 plain, svc2 externalTrafficPolicy Local, svc3 internalTrafficPolicy Local; each a local and a
# remote endpoint.
T = "TestInternalExternalMasquerade/base"
_m1 = lb_svc("iem-svc1", 40, (Ep(L1), Ep(R1)), external_ips=())
_m2 = lb_svc("iem-svc2", 41, (Ep(L2), Ep(R2)), external_ips=(), etp="Local")
_m3 = lb_svc("iem-svc3", 42, (Ep(L3), Ep(R3)), external_ips=(), itp="Local")
_b1, _b2, _b3 = (ep(L1), ep(R1)), (ep(L2), ep(R2)), (ep(L3), ep(R3))
_X, _P, _O = DIFF_EXT_LOCAL, DIFF_POD_EXT, DIFF_CIP_OUTSIDE
add(
    [_m1, _m2, _m3],
    [
        Flow(T, "pod to ClusterIP", "pod", cip(_m1), _b1),
        Flow(T, "pod to NodePort", "pod", nodeport(_m1), _b1, masq=True, diff=_P),
        Flow(T, "pod to LB", "pod", lb(_m1), _b1, masq=True, diff=_P),
        Flow(T, "node to ClusterIP", "node", cip(_m1), _b1, masq=True),
        Flow(T, "node to NodePort", "node", nodeport(_m1), _b1, masq=True),
        Flow(T, "localhost to NodePort", "node", nodeport(_m1, addr="127.0.0.1"), _b1, masq=True),
        Flow(T, "node to LB", "node", lb(_m1), _b1, masq=True),
        Flow(T, "external to ClusterIP", "ext", cip(_m1), _b1, masq=True, diff=_O),
        Flow(T, "external to NodePort", "ext", nodeport(_m1), _b1, masq=True, diff=_X),
        Flow(T, "external to LB", "ext", lb(_m1), _b1, masq=True, diff=_X),
        Flow(T, "pod to ClusterIP with eTP:Local", "pod", cip(_m2), _b2),
        Flow(T, "pod to NodePort with eTP:Local", "pod", nodeport(_m2), _b2),
        Flow(T, "pod to LB with eTP:Local", "pod", lb(_m2), _b2),
        Flow(T, "node to ClusterIP with eTP:Local", "node", cip(_m2), _b2, masq=True),
        # upstream sends this one to svc1's NodePort (3001), and expects svc1's endpoints
        Flow(T, "node to NodePort with eTP:Local", "node", nodeport(_m1), _b1, masq=True),
        # short-circuited, ignoring externalTrafficPolicy: every endpoint
        Flow(T, "localhost to NodePort with eTP:Local", "node", nodeport(_m2, addr="127.0.0.1"), _b2,
             masq=True),
        Flow(T, "node to LB with eTP:Local", "node", lb(_m2), _b2, masq=True),
        Flow(T, "external to ClusterIP with eTP:Local", "ext", cip(_m2), _b2, masq=True, diff=_O),
        Flow(T, "external to NodePort with eTP:Local", "ext", nodeport(_m2), (ep(L2),)),
        Flow(T, "external to LB with eTP:Local", "ext", lb(_m2), (ep(L2),)),
        Flow(T, "pod to ClusterIP with iTP:Local", "pod", cip(_m3), (ep(L3),)),
        Flow(T, "pod to NodePort with iTP:Local", "pod", nodeport(_m3), _b3, masq=True, diff=_P),
        Flow(T, "pod to LB with iTP:Local", "pod", lb(_m3), _b3, masq=True, diff=_P),
        Flow(T, "node to ClusterIP with iTP:Local", "node", cip(_m3), (ep(L3),), masq=True),
        Flow(T, "node to NodePort with iTP:Local", "node", nodeport(_m3), _b3, masq=True),
        # internalTrafficPolicy does not apply to NodePort traffic
        Flow(T, "localhost to NodePort with iTP:Local", "node", nodeport(_m3, addr="127.0.0.1"), _b3,
             masq=True),
        Flow(T, "node to LB with iTP:Local", "node", lb(_m3), _b3, masq=True),
        Flow(T, "external to ClusterIP with iTP:Local", "ext", cip(_m3), (ep(L3),), masq=True, diff=_O),
        Flow(T, "external to NodePort with iTP:Local", "ext", nodeport(_m3), _b3, masq=True, diff=_X),
        Flow(T, "external to LB with iTP:Local", "ext", lb(_m3), _b3, masq=True, diff=_X),
    ],
)

# TestLoadBalancerIngressRouteTypeProxy: upstream checks that an LB IP with ipMode Proxy gets no rule;
# here an external client's connection to each LB IP.
for _k, (_sub, _mode) in enumerate((("ipMode Proxy", "Proxy"), ("ipMode VIP", "VIP"), ("ipMode nil", None))):
    T = f"TestLoadBalancerIngressRouteTypeProxy/{_sub}"
    _s = lb_svc(f"ipmode-{_k}", 50 + _k, (Ep(L1),), external_ips=(), lb_ips=((lb_ip(50 + _k), _mode),))
    _verdict: tuple[str, ...] | str = "PASS" if _mode == "Proxy" else (ep(L1),)
    _served = _verdict != "PASS"
    add([_s], [Flow(T, "external to LB IP", "ext", lb(_s), _verdict, masq=_served,
                    diff=DIFF_EXT_LOCAL if _served else None)])
# fmt: on


def _check_tables() -> None:
    names = [s.name for s in SERVICES]
    assert len(set(names)) == len(names), names
    indexes = [s.index for s in SERVICES]
    assert len(set(indexes)) == len(indexes) and max(indexes) < 250, indexes
    ids = [f.id for f in FLOWS]
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]


_check_tables()


# ---- manifests ----
def service_objects(s: Svc, lab: Lab, with_slice: bool = True) -> list[dict[str, Any]]:
    spec: dict[str, Any] = {
        "type": s.type,
        "clusterIP": s.cluster_ip,
        "clusterIPs": [s.cluster_ip],
        "selector": {"app": s.name},
        "ports": [mf.service_port(p) for p in s.ports],
    }
    if s.etp:
        spec["externalTrafficPolicy"] = s.etp
    if s.itp:
        spec["internalTrafficPolicy"] = s.itp
    if s.external_ips:
        spec["externalIPs"] = list(s.external_ips)
    if s.source_ranges:
        spec["loadBalancerSourceRanges"] = list(s.source_ranges)
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": "conformance"},
        "spec": spec,
    }
    if s.lb_ips:
        svc["status"] = {
            "loadBalancer": {
                "ingress": [{"ip": a, **({"ipMode": m} if m else {})} for a, m in s.lb_ips],
            }
        }
    objs = [svc]
    if s.endpoints is not None and with_slice:
        endpoints = []
        for e in s.endpoints:
            pod = lab.pod(e.pod)
            cond: dict[str, bool] = {"ready": e.ready}
            if e.serving is not None:
                cond["serving"] = e.serving
            if e.terminating is not None:
                cond["terminating"] = e.terminating
            endpoints.append({"addresses": [pod.ip], "conditions": cond, "nodeName": e.node or pod.node})
        objs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{s.name}-1",
                    "namespace": "conformance",
                    "labels": {"kubernetes.io/service-name": s.name},
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": p.name, "port": p.target, "protocol": p.protocol} for p in s.ports],
            }
        )
    return objs


SENTINEL = "zz-sentinel"
SENTINEL_IP = "10.96.11.254"
SENTINEL_PODS = (R2, R3)


@dataclass
class World:
    """The lab with every Service of the tables, and what the test changed since (slices, n1's flags)."""

    lab: Lab
    deleted: set[str] = field(default_factory=set)
    agent_args: tuple[str, ...] = ()
    generation: int = 0

    def settle(self) -> None:
        """Wait until both agents applied every manifest written so far: the file source reads them in
        order and one sync applies all dirty Services, so a sentinel Service written last and seen in
        the maps means everything before it was programmed too."""
        self.generation += 1
        pod = self.lab.pod(SENTINEL_PODS[self.generation % 2])
        p = Port("p", 80, P)
        sentinel = Svc(SENTINEL, 254, (p,), (Ep(pod.name),))
        self.lab.write_manifest(SENTINEL, service_objects(sentinel, self.lab))
        self.lab.wait_programmed(SENTINEL_IP, 80, [pod.ip], timeout=60)

    def ensure(self, flow: Flow) -> None:
        changed = False
        if flow.agent_args != self.agent_args:
            self.lab.stop_agent("n1")
            self.lab.agent_args = list(flow.agent_args)
            self.lab.start_agent("n1")
            self.lab.wait_agent("n1")
            self.agent_args = flow.agent_args
            changed = True
        if flow.svc:
            s = next(s for s in SERVICES if s.name == flow.svc)
            if flow.slice_deleted != (s.name in self.deleted):
                self.lab.write_manifest(
                    s.name, service_objects(s, self.lab, with_slice=not flow.slice_deleted)
                )
                (self.deleted.add if flow.slice_deleted else self.deleted.discard)(s.name)
                changed = True
        if changed:
            self.settle()


@pytest.fixture(scope="module")
def world(clab: Lab) -> Iterator[World]:
    """Name: world. Scope: module. Depends: clab.

    The addresses and routes described in the module docstring, every Service of the tables written
    (with its EndpointSlice) and programmed on both nodes, the service CIDR known to the agents.
    """
    n1 = clab.node("n1")
    ip(clab.ext.ns, "addr", "add", f"{BLOCKED_CLIENT_IP}/24", "dev", "eth0")
    for net in (SERVICE_CIDR, NODE_ALT_NET):
        ip(clab.ext.ns, "route", "replace", net, "via", n1.ip)
    # /32s added after eth0's LAN address, so the node's own connections keep that one as their source
    for addr in (NODE_ALT_IP, *LB_LOCAL_IPS):
        ip(n1.ns, "addr", "add", f"{addr}/32", "dev", "eth0")
    clab.write_manifest(
        "service-cidr",
        [{"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "conformance"},
          "spec": {"cidrs": [SERVICE_CIDR]}}],
    )  # fmt: skip
    for s in SERVICES:
        clab.write_manifest(s.name, service_objects(s, clab))
    w = World(clab)
    w.settle()
    for node in clab.nodes:  # every ClusterIP frontend is there (a cheap check that the sentinel held)
        with KproxyMaps.open(node.bpffs) as maps:
            have = {(r["address"], r["port"]) for r in insp.services(maps.svc4, maps.be4, {})}
        missing = [s.name for s in SERVICES if (s.cluster_ip, s.ports[0].port) not in have]
        assert not missing, f"{node.name}: no ClusterIP frontend for {missing}"
    yield w


# ---- clients ----


def run_client(lab: Lab, src: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    if src.startswith("node"):
        n1 = lab.node("n1")
        if "@" in src:
            params = dict(params, bind=src.split("@", 1)[1])
        r = lab.run_in(n1, [sys.executable, "-c", CLIENT, json.dumps(params)], cgroup=n1.cgroup, timeout=600)
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout))
    host: Host
    if src == "ext":
        host = lab.ext
    elif src == "ext-blocked":
        host, params = lab.ext, dict(params, bind=BLOCKED_CLIENT_IP)
    else:
        host = lab.pod(C if src == "pod" else src)
    return list(in_netns(host.ns, lambda: client_attempts(**params)))


def client_address(lab: Lab, src: str) -> str:
    if src.startswith("node@"):
        return src.split("@", 1)[1]
    return {
        "ext": EXT_IP,
        "ext-blocked": BLOCKED_CLIENT_IP,
        "node": N1_IP,
        "pod": lab.pod(C).ip,
    }.get(src) or lab.pod(src).ip


def expected_source(lab: Lab, flow: Flow, endpoint_pod: str) -> str:
    """The address the endpoint must see: kube-proxy's rule, unless the flow names kproxy's difference."""
    client = client_address(lab, flow.src)
    if not flow.masq:
        return client
    if flow.diff == DIFF_HAIRPIN:
        return HAIRPIN_SOURCE
    if flow.diff in (DIFF_POD_EXT, DIFF_NODE_SOCKET):
        return client
    if flow.diff in (DIFF_EXT_LOCAL, DIFF_CIP_OUTSIDE) and lab.pod(endpoint_pod).node == "n1":
        return client
    return N1_IP


# ---- evidence ----
def frontends(lab: Lab, node: str, addr: str, port: int) -> list[str]:
    with KproxyMaps.open(lab.node(node).bpffs) as maps:
        rows = insp.services(maps.svc4, maps.be4, {})
    return [
        f"{r['scope']} {r['protocol']} flags={r['flags']} -> "
        + ",".join(f"{b['address']}:{b['port']}" for b in r["backends"])
        for r in rows
        if (r["address"], r["port"]) == (addr, port)
    ]


def evidence(lab: Lab, before: dict[str, dict[str, int]], flow: Flow) -> str:
    out = []
    for node in ("n1", "n2"):
        after = counters(lab, node)
        d = {k: v - before[node][k] for k, v in after.items() if v != before[node][k]}
        out.append(f"{node} counters {d}; frontends {flow.dst[0]}:{flow.dst[1]}: "
                   f"{frontends(lab, node, *flow.dst)}")  # fmt: skip
    return "\n".join(out)


PASS_UNTOUCHED = ("DNAT", "REJECT", "SVCNET_REJECT", "SNAT", "SOCK_CONNECT")


def _sctp_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError:
        return False
    return True


def _param(f: Flow) -> Any:
    marks = []
    if f.gap:
        marks.append(pytest.mark.xfail(strict=True, reason=f"documented gap: {f.gap}"))
    return pytest.param(f, id=f.id, marks=marks)


@pytest.mark.parametrize("flow", [_param(f) for f in FLOWS])
def test_flow(world: World, flow: Flow) -> None:
    lab = world.lab
    if flow.needs_sctp and not _sctp_available():
        pytest.skip(
            "this kernel has no SCTP sockets (no sctp module); kproxy serves SCTP "
            f"({DIFF_SCTP}): tests/bpf/test_bpf_sctp.py and tests/netns/test_sctp.py test it with raw sockets"
        )
    world.ensure(flow)
    addr, port = flow.dst
    # a case that asserts what did not happen waits until earlier connections' late packets stopped
    before = (
        {n: counters(lab, n) for n in ("n1", "n2")} if isinstance(flow.expect, tuple) else quiet_counters(lab)
    )
    where = f"{flow.id}: {flow.src} ({client_address(lab, flow.src)}) -> {addr}:{port}/{flow.proto}"

    if isinstance(flow.expect, tuple):
        want = set(flow.expect)
        params = {"addr": addr, "port": port, "proto": flow.proto, "timeout": OK_TIMEOUT}
        got = run_client(lab, flow.src, dict(params, want=sorted(want), tries=MAX_TRIES, min_tries=MIN_TRIES))
        bad = [r for r in got if r["outcome"] != "ok"]
        assert not bad, f"{where}: {bad[0]}\n{evidence(lab, before, flow)}"
        answered = {f"{r['pod']}:{r['port']}" for r in got}
        assert answered == want, (
            f"{where}: answered by {sorted(answered)} in {len(got)} connections, expected {sorted(want)}\n"
            f"{evidence(lab, before, flow)}"
        )
        for r in got:
            source = r["client"].rsplit(":", 1)[0]
            expected = expected_source(lab, flow, r["pod"])
            assert source == expected, (
                f"{where}: {r['pod']} saw the client as {source}, expected {expected}"
                f" (kube-proxy: masquerade={flow.masq}; kproxy difference: {flow.diff})\n"
                f"{evidence(lab, before, flow)}"
            )
            assert r["peer"] == f"{addr}:{port}", f"{where}: the answer came from {r['peer']}"
        return

    timeout = {"REJECT": REJECT_TIMEOUT, "DROP": DROP_TIMEOUT, "PASS": PASS_TIMEOUT}[flow.expect]
    got = run_client(lab, flow.src, {"addr": addr, "port": port, "proto": flow.proto, "timeout": timeout})
    r = got[0]
    after = counters(lab, "n1")
    moved = {k: after[k] - before["n1"][k] for k in after if after[k] != before["n1"][k]}
    if flow.expect == "REJECT":
        # refused by kproxy on the ingress node (not, say, by an endpoint's closed port)
        ok = r["outcome"] == "refused" and (moved.get("REJECT", 0) + moved.get("SVCNET_REJECT", 0)) >= 1
        assert ok, f"{where}: expected REJECT, got {r}\n{evidence(lab, before, flow)}"
    elif flow.expect == "DROP":
        # dropped by kproxy on the ingress node (not lost elsewhere)
        ok = r["outcome"] == "timeout" and any(k.startswith("DROP_") for k in moved)
        assert ok, f"{where}: expected DROP, got {r}\n{evidence(lab, before, flow)}"
    else:
        assert r["outcome"] != "ok", f"{where}: expected no endpoint, got {r}\n{evidence(lab, before, flow)}"
        touched = {k: v for k, v in moved.items() if k in PASS_UNTOUCHED or k.startswith("DROP_")}
        assert not touched, f"{where}: expected untouched by kproxy, got {r}\n{evidence(lab, before, flow)}"
