"""The node-proxy behaviours of upstream Kubernetes e2e tests (test/e2e/network/service.go and conntrack.go,
v1.36), replayed with real packets in the conformance lab (conftest.py).

Upstream creates Services, pods and exec pods in a cluster; the EndpointSlice controller writes the
slices, kube-proxy programs the node, and the test connects. Here each case writes the Service and the
EndpointSlices the controller would write (the endpoint conditions it derives from pod readiness,
deletion and publishNotReadyAddresses, the labels it copies from the Service) as manifests, waits until
both agents programmed them, and connects from the lab's client pod C (n1p1, upstream's exec pod), from
`ext` (outside the cluster) or from a process of n1 (upstream's hostNetwork client). Case ids are
"<upstream file>: <It text>[/<step or variant>]".

Expected results are kube-proxy's (v1.36, as the e2e tests assert them, sharpened to what kube-proxy
decides: a Service without usable endpoints is REJECTed, a Service kube-proxy ignores is not translated),
unless docs/kube-proxy-differences.md documents a difference, which the case then names. Pods: C never
an endpoint; L1..L4 on n1 (C's node), R1..R3 on n2; cases that replace a pod add a new one (its own
address). ClusterIPs are 10.96.12.<i>, NodePorts 31000 + 10 i + k, one index per case; no ServiceCIDR is
written, so an address nobody serves is simply routed (n1 has no route for it: "unreachable").
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from conformance_common import (
    L1,
    L2,
    N1_IP,
    N2_IP,
    R1,
    R2,
    R3,
    C,
    Ep,
    P,
    Port,
    Q,
    attempt,
    counters,
    quiet_counters,
)

from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import Host, Pod
from kproxy.lab.netns import in_netns, netns_path
from kproxy.observe import inspect as insp

pytestmark = pytest.mark.root

SERVICE_GO = "service.go"
CONNTRACK_GO = "conntrack.go"
NS = "e2e"
EXTERNAL_IP = "192.168.78.230"  # in the lab's LB range: ext routes it to n1, no node holds it

OK_TIMEOUT = 10.0  # a connection that must succeed: only reached when something is wrong
SHORT_TIMEOUT = 1.5  # a connection that must not be answered
PROGRAM_TIMEOUT = 60.0  # an agent applying a change, on a busy machine
UDP_MOVE_TIMEOUT = (
    10.0  # a UDP flow reaching the new backend (kube-proxy: its next sync; upstream polls 1 min)
)
MIN_TRIES, MAX_TRIES = 8, 60
AFFINITY_CONFIRM = 15  # upstream's AffinityConfirmCount
AFFINITY_TIMEOUT = 2  # seconds (upstream: 125, then sleeps 130 s per try)


def upstream(file: str, text: str) -> pytest.MarkDecorator:
    """The case's id: the upstream file and It(...) text (a one-value parameter `it`)."""
    return pytest.mark.parametrize("it", [pytest.param(text, id=f"{file}: {text}")])


# ---- manifests ----
def cluster_ip(i: int) -> str:
    return f"10.96.12.{i}"


def node_port(i: int, k: int = 0) -> int:
    return 31000 + 10 * i + k


def service(
    name: str,
    i: int,
    ports: Sequence[Port],
    type: str = "ClusterIP",
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type, "selector": {"app": name}, "ports": []}
    if type == "ExternalName":  # the API server clears clusterIP(s) and nodePorts
        body["externalName"] = "externalsvc.e2e.svc.cluster.local"
    else:
        body["clusterIP"] = cluster_ip(i)
        body["clusterIPs"] = [cluster_ip(i)]
    body["ports"] = [mf.service_port(p, node_port=type in ("NodePort", "LoadBalancer")) for p in ports]
    body.update(spec)
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def endpoint_slice(
    lab: Lab,
    svc: str,
    eps: Iterable[Ep | str],
    ports: Sequence[Port],
    suffix: str = "1",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    endpoints = []
    for e in eps:
        e = Ep(e) if isinstance(e, str) else e
        pod = lab.pod(e.pod)
        cond: dict[str, bool] = {"ready": e.ready}
        if e.serving is not None:
            cond["serving"] = e.serving
        if e.terminating is not None:
            cond["terminating"] = e.terminating
        endpoints.append({"addresses": [pod.ip], "conditions": cond, "nodeName": pod.node})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-{suffix}",
            "namespace": NS,
            "labels": {**(labels or {}), "kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": p.name, "port": p.target, "protocol": p.protocol} for p in ports],
    }


class Cluster:
    """The lab seen as an API server: put() writes a Service's objects, removed again after the case."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.written: set[str] = set()

    def put(self, name: str, objects: Sequence[dict[str, Any]]) -> None:
        self.lab.write_manifest(f"{NS}-{name}", objects)
        self.written.add(name)

    def remove(self, name: str) -> None:
        self.lab.remove_manifest(f"{NS}-{name}")

    def ip(self, pod: str) -> str:
        return self.lab.pod(pod).ip


@pytest.fixture
def k8s(clab: Lab) -> Iterator[Cluster]:
    """Name: k8s. Scope: function. Depends: clab.

    Writes the case's manifests into the module's lab and removes them after the case.
    """
    c = Cluster(clab)
    try:
        yield c
    finally:
        for name in c.written:
            c.remove(name)


# ---- waiting for the agents ----
def frontend_row(lab: Lab, node: str, addr: str, port: int, proto: str = "TCP") -> dict[str, Any] | None:
    with KproxyMaps.open(lab.node(node).bpffs) as maps:
        rows = insp.services(maps.svc4, maps.be4, {})
    for r in rows:
        if (r["address"], r["port"], r["protocol"], r["scope"]) == (addr, port, proto, "external"):
            return r
    return None


def wait_until(lab: Lab, what: str, cond: Callable[[], bool], timeout: float = PROGRAM_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}\n"
                f"agent-n1 log tail:\n{lab.log('agent-n1')[-2500:]}"
            )
        time.sleep(0.05)


def nodes_for(addr: str) -> list[str]:
    """The nodes whose maps hold a frontend on ADDR: a NodePort lives on its node's address only."""
    return {N1_IP: ["n1"], N2_IP: ["n2"]}.get(addr, ["n1", "n2"])


def programmed(
    k: Cluster, addr: str, port: int, pods: Iterable[str] | None, proto: str = "TCP", **row: Any
) -> None:
    """Wait until every node holding ADDR has frontend addr:port/proto with exactly PODS' addresses as
    backends (None: no frontend at all) and, if given, row fields containing what ROW says."""
    want = None if pods is None else {k.ip(p) for p in pods}

    def ok(node: str) -> bool:
        r = frontend_row(k.lab, node, addr, port, proto)
        if r is None or want is None:
            return r is None and want is None
        if {b["address"] for b in r["backends"]} != want:
            return False
        return all(
            v in r[f] if isinstance(r[f], list) and not isinstance(v, list) else r[f] == v
            for f, v in row.items()
        )

    for node in nodes_for(addr):
        wait_until(k.lab, f"{node}: {addr}:{port}/{proto} -> {pods} {row}", functools.partial(ok, node))


SENTINEL, SENTINEL_INDEX = "zz-sentinel", 250
_sentinel_generation = [0]


def settle(k: Cluster) -> None:
    """Wait until both agents applied every manifest written so far: the file source reads them in order
    and one sync applies all dirty Services, so a sentinel Service written last (its backend alternating)
    seen in the maps means everything before it was applied too."""
    _sentinel_generation[0] += 1
    pod = (R2, R3)[_sentinel_generation[0] % 2]
    p = Port("http", 80, P)
    k.put(SENTINEL, [service(SENTINEL, SENTINEL_INDEX, (p,)), endpoint_slice(k.lab, SENTINEL, [pod], (p,))])
    programmed(k, cluster_ip(SENTINEL_INDEX), 80, [pod])


# ---- clients ----
def host_of(lab: Lab, src: str) -> Host:
    return lab.ext if src == "ext" else lab.pod(src)


def ask(
    lab: Lab,
    src: str,
    addr: str,
    port: int,
    proto: str = "TCP",
    timeout: float = OK_TIMEOUT,
    tries: int = 1,
    until: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> list[dict[str, Any]]:
    """TRIES connections (fewer once UNTIL holds or one fails) from SRC ("ext" or a pod)."""

    def do() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(tries):
            out.append(attempt(addr, port, proto, timeout))
            if out[-1]["outcome"] != "ok" or (until and until(out)):
                break
        return out

    return in_netns(host_of(lab, src).ns, do)


def evidence(lab: Lab, before: dict[str, dict[str, int]] | None, addr: str, port: int, proto: str) -> str:
    out = []
    for node in ("n1", "n2"):
        now = counters(lab, node)
        moved = {k: v - before[node][k] for k, v in now.items() if before and v != before[node][k]}
        out.append(
            f"{node}: counters moved {moved}; frontend {addr}:{port}/{proto}: "
            f"{frontend_row(lab, node, addr, port, proto)}"
        )
    return "\n".join(out)


def served(
    k: Cluster, src: str, addr: str, port: int, want: Iterable[str], proto: str = "TCP"
) -> list[dict[str, Any]]:
    """Connections from SRC to addr:port/proto are all answered, by exactly WANT ("pod:port")."""
    wanted = set(want)
    lab = k.lab
    before = {n: counters(lab, n) for n in ("n1", "n2")}

    def enough(out: list[dict[str, Any]]) -> bool:
        return len(out) >= MIN_TRIES and wanted <= {f"{r['pod']}:{r['port']}" for r in out}

    got = ask(lab, src, addr, port, proto, tries=MAX_TRIES, until=enough)
    where = f"{src} -> {addr}:{port}/{proto}"
    bad = [r for r in got if r["outcome"] != "ok"]
    assert not bad, (
        f"{where}: {bad[0]} (expected {sorted(wanted)})\n{evidence(lab, before, addr, port, proto)}"
    )
    answered = {f"{r['pod']}:{r['port']}" for r in got}
    assert answered == wanted, (
        f"{where}: answered by {sorted(answered)} in {len(got)} connections, expected {sorted(wanted)}\n"
        f"{evidence(lab, before, addr, port, proto)}"
    )
    return got


def not_served(
    k: Cluster, src: str, addr: str, port: int, proto: str = "TCP", outcome: str | None = None
) -> None:
    """No endpoint answers SRC's connection to addr:port/proto and no node opens a flow for it; with OUTCOME,
    the client sees that ("refused": REJECTed by kproxy on the node that holds the frontend, as kube-proxy
    does)."""
    lab = k.lab
    before = quiet_counters(lab)
    r = ask(lab, src, addr, port, proto, timeout=SHORT_TIMEOUT if outcome != "refused" else OK_TIMEOUT)[0]
    after = {n: counters(lab, n) for n in ("n1", "n2")}
    moved = {c: sum(after[n][c] - before[n][c] for n in after) for c in after["n1"]}
    where = f"{src} -> {addr}:{port}/{proto}: expected {outcome or 'no endpoint'}, got {r}"
    assert r["outcome"] != "ok", f"{where}\n{evidence(lab, before, addr, port, proto)}"
    assert not moved["CT_NEW"], f"{where}: translated\n{evidence(lab, before, addr, port, proto)}"
    if outcome:
        assert r["outcome"] == outcome, f"{where}\n{evidence(lab, before, addr, port, proto)}"
    if outcome == "refused":
        rejected = moved["REJECT"] + moved["SVCNET_REJECT"]
        assert rejected, f"{where}: not rejected by kproxy\n{evidence(lab, before, addr, port, proto)}"


def eps(*pods: str, port: int = P) -> set[str]:
    return {f"{p}:{port}" for p in pods}


# ---- service.go: ports and protocols ----
@upstream(SERVICE_GO, "should serve endpoints on same port and different protocols/different target ports")
def test_same_port_tcp_and_udp_different_target_ports(k8s: Cluster, it: str) -> None:
    """service.go: "should serve endpoints on same port and different protocols", with the UDP port on
    another target port; then the Service keeps TCP only, then UDP only (a ClusterIP's port that is gone
    is REJECTed, as kube-proxy's cluster-ips-check does)."""
    i, name = 1, "multiprotocol-test"
    tcp, udp = Port("tcp-port", 80, P, "TCP"), Port("udp-port", 80, Q, "UDP")
    cip = cluster_ip(i)
    for ports in ((tcp, udp), (tcp,), (udp,)):
        k8s.put(name, [service(name, i, ports), endpoint_slice(k8s.lab, name, [L1, R1], ports)])
        for p in (tcp, udp):
            programmed(k8s, cip, 80, [L1, R1] if p in ports else None, p.protocol)
        for p in (tcp, udp):
            if p in ports:
                served(k8s, C, cip, 80, eps(L1, R1, port=p.target), p.protocol)
            else:
                not_served(k8s, C, cip, 80, p.protocol, outcome="refused")


@upstream(
    SERVICE_GO,
    "should be able to update service type to NodePort listening on same port number but different protocols",
)
def test_update_to_nodeport_same_port_different_protocols(k8s: Cluster, it: str) -> None:
    """service.go: "should be able to update service type to NodePort listening on same port number but
    different protocols": ClusterIP TCP, then NodePort TCP, then NodePort TCP+UDP on port 80 (the API
    server gives both the same nodePort); ClusterIP and NodePort checked for each protocol."""
    i, name = 2, "nodeport-update-service"
    np = node_port(i)
    tcp, udp = Port("tcp-port", 80, P, "TCP", np), Port("udp-port", 80, P, "UDP", np)
    steps: list[tuple[str, tuple[Port, ...]]] = [
        ("ClusterIP", (tcp,)),
        ("NodePort", (tcp,)),
        ("NodePort", (tcp, udp)),
    ]
    for typ, ports in steps:
        k8s.put(name, [service(name, i, ports, type=typ), endpoint_slice(k8s.lab, name, [L1, R1], ports)])
        for p in ports:
            programmed(k8s, cluster_ip(i), 80, [L1, R1], p.protocol)
            if typ == "NodePort":
                programmed(k8s, N1_IP, np, [L1, R1], p.protocol)
                programmed(k8s, N2_IP, np, [L1, R1], p.protocol)
        for p in ports:
            served(k8s, C, cluster_ip(i), 80, eps(L1, R1), p.protocol)
            if typ == "NodePort":
                served(k8s, "ext", N1_IP, np, eps(L1, R1), p.protocol)
                served(k8s, C, N2_IP, np, eps(L1, R1), p.protocol)
            else:
                not_served(k8s, "ext", N1_IP, np, p.protocol)


@upstream(SERVICE_GO, "should serve multiport endpoints from pods")
def test_multiport_endpoints(k8s: Cluster, it: str) -> None:
    """service.go: "should serve multiport endpoints from pods": two Service ports, each pod exposing one
    of them, so the controller writes one slice per port set."""
    i, name = 3, "multi-endpoint-test"
    p1, p2 = Port("portname1", 80, P), Port("portname2", 81, Q)
    k8s.put(
        name,
        [
            service(name, i, (p1, p2)),
            endpoint_slice(k8s.lab, name, [L1], (p1,), suffix="a"),
            endpoint_slice(k8s.lab, name, [R1], (p2,), suffix="b"),
        ],
    )
    programmed(k8s, cluster_ip(i), 80, [L1])
    programmed(k8s, cluster_ip(i), 81, [R1])
    served(k8s, C, cluster_ip(i), 80, eps(L1))
    served(k8s, C, cluster_ip(i), 81, eps(R1, port=Q))


@upstream(
    SERVICE_GO, "should support named targetPorts that resolve to different ports on different endpoints"
)
def test_named_target_ports_differ_per_endpoint(k8s: Cluster, it: str) -> None:
    """service.go: "should support named targetPorts that resolve to different ports on different
    endpoints": one named port, two slices giving it 8080 on one pod and 9090 on the other."""
    i, name = 4, "named-targetport"
    a, b = Port("http", 80, P), Port("http", 80, Q)
    k8s.put(
        name,
        [
            service(name, i, (Port("http", 80, P),)),
            endpoint_slice(k8s.lab, name, [L1], (a,), suffix="a"),
            endpoint_slice(k8s.lab, name, [R1], (b,), suffix="b"),
        ],
    )
    programmed(k8s, cluster_ip(i), 80, [L1, R1])
    served(k8s, C, cluster_ip(i), 80, eps(L1) | eps(R1, port=Q))


@upstream(SERVICE_GO, "should be updated after adding or deleting ports")
def test_updated_after_adding_or_deleting_ports(k8s: Cluster, it: str) -> None:
    """service.go: "should be updated after adding or deleting ports": a second port added, then the first
    deleted (its port on the ClusterIP is then REJECTed)."""
    i, name = 5, "edit-port-test"
    p1, p2 = Port("tcp-port", 80, P), Port("tcp-port2", 81, Q)
    for ports in ((p1,), (p1, p2), (p2,)):
        k8s.put(name, [service(name, i, ports), endpoint_slice(k8s.lab, name, [L1], ports)])
        for p in (p1, p2):
            programmed(k8s, cluster_ip(i), p.port, [L1] if p in ports else None)
        for p in (p1, p2):
            if p in ports:
                served(k8s, C, cluster_ip(i), p.port, eps(L1, port=p.target))
            else:
                not_served(k8s, C, cluster_ip(i), p.port, outcome="refused")


# ---- service.go: lifecycle, types, labels ----
@upstream(SERVICE_GO, "should work after the service has been recreated")
def test_recreated_service(k8s: Cluster, it: str) -> None:
    """service.go: "should work after the service has been recreated" (and "should be able to up and down
    services"): served, deleted (not translated any more), created again (served)."""
    i, name = 6, "service-recreate"
    p = Port("http", 80, P)
    objs = [service(name, i, (p,)), endpoint_slice(k8s.lab, name, [L1, R1], (p,))]
    k8s.put(name, objs)
    programmed(k8s, cluster_ip(i), 80, [L1, R1])
    served(k8s, C, cluster_ip(i), 80, eps(L1, R1))
    k8s.remove(name)
    programmed(k8s, cluster_ip(i), 80, None)
    not_served(k8s, C, cluster_ip(i), 80)
    k8s.put(name, objs)
    programmed(k8s, cluster_ip(i), 80, [L1, R1])
    served(k8s, C, cluster_ip(i), 80, eps(L1, R1))


@upstream(SERVICE_GO, "should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]")
def test_preserve_source_pod_ip(k8s: Cluster, it: str) -> None:
    """service.go: "should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]": the
    endpoint, on the client's node or another, sees the client pod's address."""
    i, name = 7, "sourceip-test"
    p = Port("http", 80, P)
    k8s.put(name, [service(name, i, (p,)), endpoint_slice(k8s.lab, name, [L1, R1], (p,))])
    programmed(k8s, cluster_ip(i), 80, [L1, R1])
    for r in served(k8s, C, cluster_ip(i), 80, eps(L1, R1)):
        assert r["client"].rsplit(":", 1)[0] == k8s.ip(C), f"{r['pod']} saw {r['client']}, not {k8s.ip(C)}"


@upstream(
    SERVICE_GO,
    "should be possible to connect to a service via ExternalIP when the external IP is not assigned "
    "to a node",
)
def test_external_ip_not_assigned_to_a_node(k8s: Cluster, it: str) -> None:
    """service.go: "should be possible to connect to a service via ExternalIP when the external IP is not
    assigned to a node": from a pod and from outside (ext routes it to n1)."""
    i, name = 8, "externalip-test"
    p = Port("http", 80, P)
    k8s.put(
        name,
        [service(name, i, (p,), externalIPs=[EXTERNAL_IP]), endpoint_slice(k8s.lab, name, [L1, R1], (p,))],
    )
    programmed(k8s, EXTERNAL_IP, 80, [L1, R1])
    served(k8s, C, EXTERNAL_IP, 80, eps(L1, R1))
    served(k8s, "ext", EXTERNAL_IP, 80, eps(L1, R1))


TYPE_CHANGES = {
    "should be able to change the type from ExternalName to ClusterIP": ("ExternalName", "ClusterIP"),
    "should be able to change the type from ExternalName to NodePort": ("ExternalName", "NodePort"),
    "should be able to change the type from ClusterIP to ExternalName": ("ClusterIP", "ExternalName"),
    "should be able to change the type from NodePort to ExternalName": ("NodePort", "ExternalName"),
    "ExternalName -> ClusterIP -> NodePort -> ClusterIP -> ExternalName (issue 11)": (
        "ExternalName",
        "ClusterIP",
        "NodePort",
        "ClusterIP",
        "ExternalName",
    ),
}


@pytest.mark.parametrize("steps", [pytest.param(v, id=f"{SERVICE_GO}: {t}") for t, v in TYPE_CHANGES.items()])
def test_type_change(k8s: Cluster, steps: tuple[str, ...]) -> None:
    """The Service's type changes step by step; traffic checked at each: an ExternalName Service is not
    proxied (kube-proxy skips it: its old ClusterIP and NodePort are not translated), a ClusterIP one is
    served on its ClusterIP only, a NodePort one also on every node's NodePort."""
    i = 10 + list(TYPE_CHANGES.values()).index(steps)
    name, np = "externalname-service", node_port(i)
    p = Port("http", 80, P, "TCP", np)
    cip = cluster_ip(i)
    for typ in steps:
        k8s.put(name, [service(name, i, (p,), type=typ), endpoint_slice(k8s.lab, name, [L1, R1], (p,))])
        programmed(k8s, cip, 80, None if typ == "ExternalName" else [L1, R1])
        for addr in (N1_IP, N2_IP):
            programmed(k8s, addr, np, [L1, R1] if typ == "NodePort" else None)
        if typ == "ExternalName":
            not_served(k8s, C, cip, 80)
        else:
            served(k8s, C, cip, 80, eps(L1, R1))
        if typ == "NodePort":
            served(k8s, "ext", N1_IP, np, eps(L1, R1))
            served(k8s, C, N2_IP, np, eps(L1, R1))
        else:
            not_served(k8s, "ext", N1_IP, np)


PROXY_NAME = {"service.kubernetes.io/service-proxy-name": "foo-bar"}
HEADLESS = {"service.kubernetes.io/headless": ""}


@upstream(SERVICE_GO, "should implement service.kubernetes.io/service-proxy-name")
def test_service_proxy_name(k8s: Cluster, it: str) -> None:
    """service.go: "should implement service.kubernetes.io/service-proxy-name": a Service with the label is
    never served; another one is served, not served once labelled, served again once the label is gone.
    The controller copies the Service's labels to its slices. Not served = not translated: another proxy
    owns the address (kproxy passes it; with a ServiceCIDR known, kube-proxy would drop it: documented in
    docs/kube-proxy-differences.md, "The service address space is checked at the interface, before
    netfilter")."""
    lab = k8s.lab
    p = Port("http", 80, P)
    disabled, toggled = (20, "service-proxy-disabled"), (21, "service-proxy-toggled")
    pods = [L1, L2, R1]

    def put(svc: tuple[int, str], labels: dict[str, str] | None) -> None:
        i, name = svc
        k8s.put(
            name,
            [service(name, i, (p,), labels=labels), endpoint_slice(lab, name, pods, (p,), labels=labels)],
        )

    put(disabled, PROXY_NAME)
    for labels in (None, PROXY_NAME, None):
        put(toggled, labels)
        settle(k8s)
        programmed(k8s, cluster_ip(toggled[0]), 80, None if labels else pods)
        programmed(k8s, cluster_ip(disabled[0]), 80, None)
        if labels:
            not_served(k8s, C, cluster_ip(toggled[0]), 80)
        else:
            served(k8s, C, cluster_ip(toggled[0]), 80, eps(*pods))
        not_served(k8s, C, cluster_ip(disabled[0]), 80)


@upstream(SERVICE_GO, "should implement service.kubernetes.io/headless")
def test_headless_label_on_endpointslice(k8s: Cluster, it: str) -> None:
    """service.go: "should implement service.kubernetes.io/headless": a Service without selector and a
    custom EndpointSlice; once the slice carries the headless label kube-proxy ignores it (its
    EndpointSlice informer selects `!service.kubernetes.io/headless`), so the Service has no endpoints:
    REJECT. Served again when the label is removed."""
    i, name = 22, "example-custom-endpoints"
    p = Port("port80", 80, P)
    svc = service(name, i, (p,))
    del svc["spec"]["selector"]
    managed = {"endpointslice.kubernetes.io/managed-by": f"e2e-test{NS}"}
    for labels in (managed, {**managed, **HEADLESS}, managed):
        k8s.put(name, [svc, endpoint_slice(k8s.lab, name, [L1], (p,), suffix="custom", labels=labels)])
        if "service.kubernetes.io/headless" in labels:
            settle(k8s)
            not_served(k8s, C, cluster_ip(i), 80, outcome="refused")
        else:
            programmed(k8s, cluster_ip(i), 80, [L1])
            served(k8s, C, cluster_ip(i), 80, eps(L1))


@upstream(
    SERVICE_GO,
    "should implement service.kubernetes.io/headless/the label on a Service with a ClusterIP (issue 11)",
)
def test_headless_label_on_service_with_cluster_ip(k8s: Cluster, it: str) -> None:
    """The headless label on a Service that has a ClusterIP (issue 11): kube-proxy v1.36 filters Services by
    service-proxy-name and clusterIP None only, and the EndpointSlice controller never copies the headless
    label to the slices of a Service with a ClusterIP, so kube-proxy serves it, with or without the label."""
    i, name = 23, "headless-labelled"
    p = Port("http", 80, P)
    for labels in (None, HEADLESS, None):
        k8s.put(name, [service(name, i, (p,), labels=labels), endpoint_slice(k8s.lab, name, [L1, R1], (p,))])
        if labels:
            settle(k8s)
        else:
            programmed(k8s, cluster_ip(i), 80, [L1, R1])
        served(k8s, C, cluster_ip(i), 80, eps(L1, R1))


@upstream(SERVICE_GO, "should be rejected when no endpoints exist")
def test_rejected_when_no_endpoints_exist(k8s: Cluster, it: str) -> None:
    """service.go: "should be rejected when no endpoints exist": REFUSED."""
    i, name = 24, "no-pods"
    k8s.put(name, [service(name, i, (Port("http", 80, P),))])
    programmed(k8s, cluster_ip(i), 80, [])
    not_served(k8s, C, cluster_ip(i), 80, outcome="refused")


@upstream(SERVICE_GO, "should be rejected for evicted pods (no endpoints exist)")
def test_rejected_for_evicted_pods(k8s: Cluster, it: str) -> None:
    """service.go: "should be rejected for evicted pods (no endpoints exist)": the controller leaves
    evicted (failed) pods out, so the slice is empty: REFUSED."""
    i, name = 25, "evicted-pods"
    p = Port("http", 80, P, "TCP", node_port(25))
    k8s.put(name, [service(name, i, (p,), type="NodePort"), endpoint_slice(k8s.lab, name, [], (p,))])
    programmed(k8s, cluster_ip(i), 80, [])
    programmed(k8s, N1_IP, p.node_port or 0, [])
    not_served(k8s, C, cluster_ip(i), 80, outcome="refused")
    not_served(k8s, "ext", N1_IP, p.node_port or 0, outcome="refused")


# ---- service.go: readiness and publishNotReadyAddresses ----
def unready(pod: str, publish: bool, deleted: bool = False) -> Ep:
    """The endpoint of a pod failing its readiness probe, as the controller writes it: ready is
    publishNotReadyAddresses || podReady, serving is podReady, terminating once deleted."""
    return Ep(pod, ready=publish, serving=False, terminating=deleted)


@upstream(SERVICE_GO, "should create endpoints for unready pods")
def test_endpoints_for_unready_pods(k8s: Cluster, it: str) -> None:
    """service.go: "should create endpoints for unready pods" (publishNotReadyAddresses): an unready pod is
    not served without it (first step, issue 11), served with it; once terminating and the Service stops
    tolerating unready pods, not served; tolerated again, the terminating pod is served."""
    i, name = 26, "tolerate-unready"
    p = Port("http", 80, P)
    steps = [(False, False), (True, False), (False, True), (True, True)]  # (publish, pod deleted)
    for publish, deleted in steps:
        k8s.put(
            name,
            [
                service(name, i, (p,), publishNotReadyAddresses=publish),
                endpoint_slice(k8s.lab, name, [unready(R1, publish, deleted)], (p,)),
            ],
        )
        programmed(k8s, cluster_ip(i), 80, [R1] if publish else [])
        if publish:
            served(k8s, C, cluster_ip(i), 80, eps(R1))
        else:
            not_served(k8s, C, cluster_ip(i), 80, outcome="refused")


@pytest.mark.parametrize(
    "publish",
    [
        pytest.param(
            True,
            id=f"{SERVICE_GO}: should be able to connect to terminating and unready endpoints "
            "if PublishNotReadyAddresses is true",
        ),
        pytest.param(
            False,
            id=f"{SERVICE_GO}: should not be able to connect to terminating and unready "
            "endpoints if PublishNotReadyAddresses is false",
        ),
    ],
)
def test_terminating_unready_endpoints(k8s: Cluster, publish: bool) -> None:
    """A NodePort Service whose only pod (on n2, upstream's node0) was deleted and fails its readiness
    probe; the client pod on n1 connects to the ClusterIP and to both nodes' NodePort."""
    i = 27 if publish else 28
    name, np = f"svc-tolerate-unready-{str(publish).lower()}", node_port(i)
    p = Port("http", 80, P, "TCP", np)
    k8s.put(
        name,
        [
            service(name, i, (p,), type="NodePort", publishNotReadyAddresses=publish),
            endpoint_slice(k8s.lab, name, [unready(R1, publish, deleted=True)], (p,)),
        ],
    )
    want = [R1] if publish else []
    for addr, port in ((cluster_ip(i), 80), (N2_IP, np), (N1_IP, np)):
        programmed(k8s, addr, port, want)
    for addr, port in ((cluster_ip(i), 80), (N2_IP, np), (N1_IP, np)):
        if publish:
            served(k8s, C, addr, port, eps(R1))
        else:
            not_served(k8s, C, addr, port, outcome="refused")


# ---- service.go: session affinity ----
def affinity_trace(k: Cluster, src: str, addr: str, port: int, count: int) -> list[str]:
    got = ask(k.lab, src, addr, port, tries=count)
    bad = [r for r in got if r["outcome"] != "ok"]
    assert not bad, f"{src} -> {addr}:{port}: {bad[0]}\n{evidence(k.lab, None, addr, port, 'TCP')}"
    return [r["pod"] for r in got]


def check_affinity(k: Cluster, src: str, addr: str, port: int, hold: bool) -> None:
    """Upstream's checkAffinity: the last AffinityConfirmCount answers all from one pod (hold), or not."""
    trace: list[str] = []
    for _ in range(4):
        trace += affinity_trace(k, src, addr, port, AFFINITY_CONFIRM)
        last = trace[-AFFINITY_CONFIRM:]
        if (len(set(last)) == 1) == hold:
            return
    raise AssertionError(
        f"{src} -> {addr}:{port}: affinity should {'hold' if hold else 'not hold'}, answers: {trace}\n"
        f"{evidence(k.lab, None, addr, port, 'TCP')}"
    )


AFFINITY_PODS = [L1, L2, R1]


def affinity_service(
    k: Cluster, i: int, typ: str, affinity: bool, timeout: int | None = None
) -> tuple[str, int]:
    name, np = f"affinity-{typ.lower()}-{i}", node_port(i)
    p = Port("http", 80, P, "TCP", np)
    spec: dict[str, Any] = {"sessionAffinity": "ClientIP" if affinity else "None"}
    if affinity and timeout:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
    k.put(name, [service(name, i, (p,), type=typ, **spec), endpoint_slice(k.lab, name, AFFINITY_PODS, (p,))])
    row: dict[str, Any] = {"flags": "affinity"} if affinity else {}
    if affinity and timeout:
        row["affinity_timeout"] = timeout
    programmed(k, cluster_ip(i), 80, AFFINITY_PODS, **row)
    if typ == "NodePort":
        programmed(k, N1_IP, np, AFFINITY_PODS, **row)
        return N1_IP, np
    return cluster_ip(i), 80


def affinity_client(typ: str) -> str:
    return "ext" if typ == "NodePort" else C  # upstream: an exec pod; for NodePort, to a node's address


def wait_affinity_off(k: Cluster, addr: str, port: int) -> None:
    def off(node: str) -> bool:
        row = frontend_row(k.lab, node, addr, port)
        return row is not None and "affinity" not in row["flags"]

    for node in nodes_for(addr):
        wait_until(k.lab, f"{node}: affinity off on {addr}:{port}", functools.partial(off, node))


@pytest.mark.parametrize(
    "typ",
    [
        pytest.param(
            "ClusterIP",
            id=f"{SERVICE_GO}: should have session affinity work for service with type clusterIP [LinuxOnly]",
        ),
        pytest.param(
            "NodePort", id=f"{SERVICE_GO}: should have session affinity work for NodePort service [LinuxOnly]"
        ),
    ],
)
def test_session_affinity(k8s: Cluster, typ: str) -> None:
    addr, port = affinity_service(k8s, 30 if typ == "ClusterIP" else 31, typ, affinity=True)
    check_affinity(k8s, affinity_client(typ), addr, port, hold=True)


@pytest.mark.parametrize(
    "typ",
    [
        pytest.param(
            "ClusterIP",
            id=f"{SERVICE_GO}: should be able to switch session affinity for service "
            "with type clusterIP [LinuxOnly]",
        ),
        pytest.param(
            "NodePort",
            id=f"{SERVICE_GO}: should be able to switch session affinity for NodePort service [LinuxOnly]",
        ),
    ],
)
def test_session_affinity_switch(k8s: Cluster, typ: str) -> None:
    """ClientIP (sticks), None (spreads), ClientIP again (sticks)."""
    i = 32 if typ == "ClusterIP" else 33
    src = affinity_client(typ)
    for on in (True, False, True):
        addr, port = affinity_service(k8s, i, typ, affinity=on)
        if not on:
            wait_affinity_off(k8s, addr, port)
        check_affinity(k8s, src, addr, port, hold=on)


@pytest.mark.parametrize(
    "typ",
    [
        pytest.param(
            "ClusterIP",
            id=f"{SERVICE_GO}: should have session affinity timeout work for service "
            "with type clusterIP [LinuxOnly]",
        ),
        pytest.param(
            "NodePort",
            id=f"{SERVICE_GO}: should have session affinity timeout work for NodePort service [LinuxOnly]",
        ),
    ],
)
def test_session_affinity_timeout(k8s: Cluster, typ: str) -> None:
    """timeoutSeconds AFFINITY_TIMEOUT: sticks while used within it; after an idle timeout + 1.5 s the next
    connection is balanced again, so a few such pauses reach another pod (upstream: up to 10)."""
    addr, port = affinity_service(k8s, 34 if typ == "ClusterIP" else 35, typ, True, timeout=AFFINITY_TIMEOUT)
    src = affinity_client(typ)
    check_affinity(k8s, src, addr, port, hold=True)
    seen: list[str] = []
    for _ in range(10):
        seen += affinity_trace(k8s, src, addr, port, 1)
        if len(set(seen)) > 1:
            return
        time.sleep(AFFINITY_TIMEOUT + 1.5)
    raise AssertionError(f"{src} -> {addr}:{port}: still sticky after the timeout: {seen}")


# ---- service.go: the proxy restarting ----
@upstream(SERVICE_GO, "should work after restarting kube-proxy [Disruptive]")
def test_work_after_restarting_proxy(k8s: Cluster, it: str) -> None:
    """service.go: "should work after restarting kube-proxy" [Disruptive]: n1's agent stops (the datapath
    keeps serving), restarts, and a change made while it was down is applied."""
    lab = k8s.lab
    i, name = 36, "restart-proxy"
    p = Port("http", 80, P)
    k8s.put(name, [service(name, i, (p,)), endpoint_slice(lab, name, [L1, R1], (p,))])
    programmed(k8s, cluster_ip(i), 80, [L1, R1])
    lab.stop_agent("n1")
    try:
        served(k8s, C, cluster_ip(i), 80, eps(L1, R1))
        k8s.put(name, [service(name, i, (p,)), endpoint_slice(lab, name, [L1, R2], (p,))])
    finally:
        lab.start_agent("n1")
        lab.wait_agent("n1")
    programmed(k8s, cluster_ip(i), 80, [L1, R2])
    served(k8s, C, cluster_ip(i), 80, eps(L1, R2))


# ---- conntrack.go: UDP flows while endpoints change ----
PROBER = r"""
import errno, json, select, socket, sys, time
p = json.loads(sys.argv[1])
def new_sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if p["src_port"]:
        s.bind(("0.0.0.0", p["src_port"]))
    s.connect((p["addr"], p["port"]))
    s.settimeout(p["wait"])
    return s
one = None
while p["one_socket"] and one is None:
    try:
        one = new_sock()
    except OSError as e:
        print(json.dumps({"n": 0, "error": "connect: %s" % e}), flush=True)
        time.sleep(p["interval"])
n = 0
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0)
    if r and not sys.stdin.readline():
        break
    n += 1
    t0 = time.monotonic()
    out = {"n": n}
    s = one
    try:
        s = s or new_sock()
        s.send(str(n).encode())
        while True:
            msg = json.loads(s.recv(65536))
            if msg.get("echo") == str(n):
                break
        out.update(pod=msg["pod"], port=msg["port"], client=msg["client"])
    except OSError as e:
        out["error"] = "%s: %s" % (type(e).__name__, e)
        # socket LB destroyed the socket (its backend left the Service): it is no longer connected, and
        # an application connects it again, as a resolver or a Go client does (not after a timeout)
        if one is not None and e.errno in (errno.ECONNABORTED, errno.EDESTADDRREQ, errno.ENOTCONN):
            try:
                one.connect((p["addr"], p["port"]))
                out["reconnected"] = True
            except OSError as e2:
                out["reconnect_error"] = str(e2)
    finally:
        if one is None and s is not None:
            s.close()
    print(json.dumps(out), flush=True)
    time.sleep(max(0.0, p["interval"] - (time.monotonic() - t0)))
"""


class UdpProbe:
    """A UDP client sending a datagram every `interval` to addr:port from SRC ("ext", a pod, or "node":
    a process of n1 in its socket-LB cgroup, upstream's hostNetwork client), on one socket or on a new
    one per datagram from a fixed source port (upstream's `nc -u -p`); each answer's pod and port."""

    def __init__(self, lab: Lab, src: str, addr: str, port: int, one_socket: bool = True) -> None:
        params = {
            "addr": addr,
            "port": port,
            "one_socket": one_socket,
            "src_port": 0 if one_socket else 31999,
            "wait": 0.4,
            "interval": 0.2,
        }
        host: Host = lab.node("n1") if src == "node" else host_of(lab, src)
        argv = ["nsenter", f"--net={netns_path(host.ns)}"]
        if src == "node":
            argv += ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', lab.node("n1").cgroup]
        argv += [sys.executable, "-c", PROBER, json.dumps(params)]
        self.what = f"{src} -> {addr}:{port}/UDP ({'one socket' if one_socket else 'a socket per datagram'})"
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.results: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.results.append(dict(json.loads(line), t=time.monotonic()))

    def wait_for(self, pod: str, timeout: float, port: int | None = None) -> int:
        """Wait until an answer comes from POD (and PORT); its index in results."""
        deadline = time.monotonic() + timeout
        start = len(self.results)
        while time.monotonic() < deadline:
            for idx in range(start, len(self.results)):
                r = self.results[idx]
                if r.get("pod") == pod and (port is None or r.get("port") == port):
                    return idx
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = [f"{r.get('pod') or r.get('error')}:{r.get('port', '')}" for r in self.results[start:]][-30:]
        raise AssertionError(
            f"{self.what}: no answer from {pod}{f':{port}' if port else ''} within "
            f"{timeout:.0f}s; answers since: {tail}"
        )

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)


@contextlib.contextmanager
def udp_probe(lab: Lab, src: str, addr: str, port: int, one_socket: bool = True) -> Iterator[UdpProbe]:
    probe = UdpProbe(lab, src, addr, port, one_socket)
    try:
        yield probe
    finally:
        probe.close()


@dataclass(frozen=True)
class Cycle:
    """A UDP Service whose server pod is replaced while SRC keeps sending."""

    src: str  # "ext", a pod, or "node"
    target: str  # "clusterip", "nodeport-n1", "nodeport-n2"
    node: str = "n2"  # where the server pods run
    itp_local: bool = False
    one_socket: bool = True
    terminating_step: bool = False  # the old pod terminating (serving false) before it leaves the slice


CYCLES = {
    "should be able to preserve UDP traffic when server pod cycles for a NodePort service": Cycle(
        C, "nodeport-n2"
    ),
    "should be able to preserve UDP traffic when server pod cycles for a NodePort service/client outside "
    "the cluster to the ingress node (issue 11)": Cycle("ext", "nodeport-n1"),
    "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service": Cycle(
        C, "clusterip"
    ),
    "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service/old pod "
    "terminating first (issue 11)": Cycle(C, "clusterip", terminating_step=True),
    "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service with "
    "InternalTrafficPolicy set to Local": Cycle(C, "clusterip", node="n1", itp_local=True),
    "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service and client is "
    "hostNetwork": Cycle("node", "clusterip", one_socket=False),
    "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service and client is "
    "hostNetwork/one connected socket (issue 11)": Cycle("node", "clusterip"),
}


# A connected UDP socket of a node process keeps the backend socket LB gave it at connect() unless the
# agent can destroy it when that backend leaves (issue 17: bpf_sock_destroy, Linux >= 6.5); without it,
# a documented gap.
GAP_CONNECTED_UDP = "docs/socket-lb.md#connected-udp-sockets (a kernel without bpf_sock_destroy)"


def _cycle_param(t: str, v: Cycle) -> Any:
    from kproxy.bpf.sockdestroy import missing_kernel_feature

    gap = v.src == "node" and v.one_socket and missing_kernel_feature() is not None
    marks = [pytest.mark.xfail(strict=True, reason=GAP_CONNECTED_UDP)] if gap else []
    return pytest.param(v, id=f"{CONNTRACK_GO}: {t}", marks=marks)


@pytest.mark.parametrize("cycle", [_cycle_param(t, v) for t, v in CYCLES.items()])
def test_udp_server_pod_cycles(k8s: Cluster, cycle: Cycle) -> None:
    """The client sends all along; the Service gets a second server pod (a new address), then the first
    one leaves the slice (upstream deletes it; here its server keeps running, so a flow left on it shows).
    kube-proxy flushes the UDP conntrack entries of endpoints that are no longer serving, so the flow
    reaches the new pod within seconds and stays there."""
    lab = k8s.lab
    i = 40 + list(CYCLES.values()).index(cycle)
    name, np = f"udp-cycle-{i}", node_port(i)
    p = Port("udp", 80, P, "UDP", np)
    typ = "NodePort" if cycle.target.startswith("nodeport") else "ClusterIP"
    spec: dict[str, Any] = {"internalTrafficPolicy": "Local"} if cycle.itp_local else {}
    others = [R1] if cycle.itp_local else []  # the DaemonSet's pod on the other node

    def put(endpoints: Sequence[Ep | str]) -> None:
        k8s.put(name, [service(name, i, (p,), type=typ, **spec), endpoint_slice(lab, name, endpoints, (p,))])

    old: Pod = lab.add_pod(cycle.node)
    addr, port = {"clusterip": (cluster_ip(i), 80), "nodeport-n1": (N1_IP, np), "nodeport-n2": (N2_IP, np)}[
        cycle.target
    ]
    with udp_probe(lab, cycle.src, addr, port, cycle.one_socket) as probe:
        time.sleep(0.5)  # the client sends before the Service has an endpoint, as upstream's does
        put([old.name, *others])
        probe.wait_for(old.name, UDP_MOVE_TIMEOUT)
        new = lab.add_pod(cycle.node)
        put([old.name, new.name, *others])
        time.sleep(1.0)
        if cycle.terminating_step:
            put([Ep(old.name, ready=False, serving=False, terminating=True), new.name, *others])
        else:
            put([new.name, *others])
        t0 = time.monotonic()
        first = probe.wait_for(new.name, UDP_MOVE_TIMEOUT)
        moved_after = probe.results[first]["t"] - t0
        time.sleep(1.0)
        stale = [r for r in probe.results[first:] if r.get("pod") != new.name]
    assert not stale, (
        f"{probe.what}: answers after moving to {new.name} (after {moved_after:.1f}s): {stale[:5]}"
    )


@upstream(CONNTRACK_GO, "should be able to preserve UDP traffic when initial unready endpoints get ready")
def test_udp_initial_unready_endpoints_get_ready(k8s: Cluster, it: str) -> None:
    """conntrack.go: "should be able to preserve UDP traffic when initial unready endpoints get ready": the
    client sends while the only endpoint is not ready yet, then it becomes ready: the flow reaches it."""
    lab = k8s.lab
    i, name = 50, "udp-unready"
    p = Port("udp", 80, P, "UDP")
    with udp_probe(lab, C, cluster_ip(i), 80) as probe:
        k8s.put(
            name,
            [service(name, i, (p,)), endpoint_slice(lab, name, [Ep(R1, ready=False, serving=False)], (p,))],
        )
        programmed(k8s, cluster_ip(i), 80, [], "UDP")
        time.sleep(1.0)
        k8s.put(name, [service(name, i, (p,)), endpoint_slice(lab, name, [R1], (p,))])
        probe.wait_for(R1, UDP_MOVE_TIMEOUT)


@upstream(
    CONNTRACK_GO,
    "should be able to cleanup conntrack entries when UDP service target port changes for a NodePort service",
)
def test_udp_target_port_changes_nodeport(k8s: Cluster, it: str) -> None:
    """conntrack.go: "should be able to cleanup conntrack entries when UDP service target port changes for a
    NodePort service": 8080 -> 9090 on the same pod while the client (on n1, to n2's NodePort) sends."""
    lab = k8s.lab
    i, name = 51, "udp-targetport"
    np = node_port(i)
    with udp_probe(lab, C, N2_IP, np) as probe:
        for target in (P, Q):
            p = Port("udp", 80, target, "UDP", np)
            k8s.put(name, [service(name, i, (p,), type="NodePort"), endpoint_slice(lab, name, [R1], (p,))])
            probe.wait_for(R1, UDP_MOVE_TIMEOUT, port=target)


# ---- conntrack.go: out-of-window segments ----
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_segment(
    src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int, payload: bytes
) -> bytes:
    """An IPv4 packet with a TCP segment, checksums filled (for a raw IPPROTO_RAW socket)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0) + payload
    tcp = tcp[:16] + struct.pack("!H", _csum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.randrange(1, 65535), 0, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return ip + tcp


TCP_RST, TCP_PSH_ACK = 0x04, 0x18


class Sniffer:
    """Every IPv4 TCP packet a pod's eth0 receives from SRC_IP, recorded as (sport, dport, flags)."""

    def __init__(self, pod: Pod, src_ip: str) -> None:
        def open_() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
            s.bind(("eth0", 0))
            s.setblocking(False)
            return s

        self.sock = in_netns(pod.ns, open_)
        self.src = socket.inet_aton(src_ip)

    def read(self) -> list[tuple[int, int, int]]:
        out = []
        while select.select([self.sock], [], [], 0)[0]:
            frame, meta = self.sock.recvfrom(65536)
            if meta[2] == socket.PACKET_OUTGOING:
                continue
            ip = frame[14:]
            if len(ip) < 40 or ip[9] != 6 or ip[12:16] != self.src:
                continue
            tcp = ip[(ip[0] & 0x0F) * 4 :]
            sport, dport = struct.unpack("!HH", tcp[:4])
            out.append((sport, dport, tcp[13]))
        return out


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            L1,
            id=f"{CONNTRACK_GO}: proxy implementation should not be vulnerable to the "
            "invalid conntrack state bug [Privileged]/server on the client's node",
        ),
        pytest.param(
            R1,
            id=f"{CONNTRACK_GO}: proxy implementation should not be vulnerable to the "
            "invalid conntrack state bug [Privileged]/server on another node",
        ),
    ],
)
def test_invalid_conntrack_state(k8s: Cluster, backend: str) -> None:
    """Upstream's boom-server injects segments with out-of-window sequence numbers into its connections
    from a ClusterIP client: if the proxy lets them through untranslated (netfilter conntrack marks them
    INVALID and skips the NAT), the client answers the pod address with a RST and the connection dies.
    Here the server pod sends such segments with a raw socket; the client must not RST (the segment
    arrives translated, or not at all) and the connection must keep working. A control segment from a
    port the connection does not use must provoke the client's RST (the sniffer sees RSTs)."""
    lab = k8s.lab
    i, name = 52 if backend == L1 else 53, f"boom-server-{backend}"
    p = Port("boom", 9000, P)
    k8s.put(name, [service(name, i, (p,)), endpoint_slice(lab, name, [backend], (p,))])
    programmed(k8s, cluster_ip(i), 9000, [backend])
    server, client = lab.pod(backend), lab.pod(C)
    with lab.stream(client, cluster_ip(i), 9000) as stream:
        assert stream.hello["pod"] == backend
        cport = int(stream.hello["client"].rsplit(":", 1)[1])
        stream.roundtrip()
        sniffer = Sniffer(server, client.ip)
        raw = in_netns(server.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
        with raw:
            before = {n: counters(lab, n) for n in ("n1", "n2")}
            for _ in range(3):
                bogus = random.randrange(1 << 32)  # out of the client's window with p > 1 - 2^-15
                raw.sendto(
                    tcp_segment(
                        server.ip,
                        P,
                        client.ip,
                        cport,
                        bogus,
                        random.randrange(1 << 32),
                        TCP_PSH_ACK,
                        b"boom!!!\n",
                    ),
                    (client.ip, 0),
                )
                time.sleep(0.2)
            time.sleep(0.5)
            stream.roundtrip()
            seen = sniffer.read()
            rsts = [s for s in seen if s[2] & TCP_RST]
            assert not rsts, (
                f"the client reset the connection ({client.ip}:{cport} -> {server.ip}): {seen}\n"
                f"{evidence(lab, before, cluster_ip(i), 9000, 'TCP')}"
            )
            for _ in range(5):
                stream.roundtrip()
            # control: a segment of no connection provokes the client's RST, which the sniffer sees
            raw.sendto(
                tcp_segment(server.ip, P + 1, client.ip, cport, 1, 1, TCP_PSH_ACK, b"x"), (client.ip, 0)
            )
            deadline = time.monotonic() + 5
            while not any(s[0] == cport and s[1] == P + 1 and s[2] & TCP_RST for s in seen):
                assert time.monotonic() < deadline, f"control: no RST from the client seen: {seen}"
                time.sleep(0.05)
                seen += sniffer.read()
        sniffer.sock.close()
