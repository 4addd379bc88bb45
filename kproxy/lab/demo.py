"""`make demo`: a lab with the manifests in examples/, real requests through each kind of Service.

    python -m kproxy.lab.demo [--requests N] [--examples DIR]

Brings the lab up (2 nodes x 2 pods, one agent per node, every host dual-stack), sends N TCP
connections through the ClusterIP echo service from pod n2p2, UDP datagrams through its UDP port,
then N connections from the external client through a NodePort, a LoadBalancer IP and an external IP;
then the same through the IPv6 ClusterIP, NodePort, LoadBalancer IP and external IP of a dual-stack
Service (demo/echo-dual, written by the demo beside the examples); prints how many went to each
backend and the `kproxy services` table of node n1, and tears everything down (also on failure or
Ctrl-C).

An IPv4 failure ends the demo with exit status 1. An IPv6 failure is printed as a failure and the
demo goes on (so one broken step does not hide the others), then exits with status 1.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kproxy.lab import manifests as mf
from kproxy.lab.cluster import Lab, addr_port, client_address
from kproxy.lab.netns import LabError

DEFAULT_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The dual-stack Service the demo adds: the echo pods, both families, a NodePort of its own.
DUAL_NAME, DUAL_NS = "echo-dual", "demo"
DUAL_IPS = ("10.96.0.12", "fd00:10:96::12")
DUAL_NODE_PORT = 30090
DUAL_LB6, DUAL_EXTERNAL6 = "fd00:78::10", "fd00:78::20"  # in LB6_CIDR, which ext routes via n1
DUAL_PODS = ("n1p1", "n1p2", "n2p1")
DUAL_PORTS = [mf.Port("http", 80, 8080, "TCP", DUAL_NODE_PORT), mf.Port("dns", 53, 9090, "UDP")]
IPV6_WAIT = 20.0  # seconds for the agents to program an IPv6 frontend before the demo calls it failed


def show(title: str, answers: list[str]) -> None:
    counts = collections.Counter(answers)
    total = len(answers)
    print(f"\n{title}: {total} requests")
    for pod, n in sorted(counts.items()):
        print(f"  {pod:6s} {n:5d}  {100 * n / total:5.1f}%  {'#' * round(40 * n / total)}")


def run_demo(examples: Path, requests: int) -> list[str]:
    """The demo; raises on an IPv4 failure, returns the IPv6 failures (empty when IPv6 worked)."""
    print(f"bringing the lab up with the manifests in {examples} ...")
    with Lab(nodes=2, pods_per_node=2, manifests_from=examples) as lab:
        n1 = lab.node("n1")
        nodes = ", ".join(f"{n.name}={n.ip},{n.ip6}" for n in lab.nodes)
        pods = ", ".join(f"{p.name}={p.ip},{p.ip6}" for p in lab.pods)
        print(f"lab {lab.prefix}: nodes {nodes}; pods {pods}; external client {lab.ext.ip},{lab.ext.ip6}")
        endpoints = [(p.ip, p.ip6, p.node) for p in map(lab.pod, DUAL_PODS)]
        lab.write_manifest(
            DUAL_NAME,
            mf.dual_stack_objects(
                DUAL_NAME,
                DUAL_PORTS,
                *DUAL_IPS,
                endpoints,
                namespace=DUAL_NS,
                type="LoadBalancer",
                lb_ips=[DUAL_LB6],
                external_ips=[DUAL_EXTERNAL6],
            ),
        )
        lab.wait_programmed("10.96.0.10", 80, ["10.244.1.11", "10.244.1.12", "10.244.2.11"])
        lab.wait_programmed("192.168.78.10", 80, ["10.244.1.11"], nodes=["n1"])
        client = lab.pod("n2p2")
        show(
            f"ClusterIP 10.96.0.10:80/TCP (demo/echo) from pod {client.name} {client.ip}",
            lab.tcp_requests(client, "10.96.0.10", 80, requests),
        )
        show(
            "ClusterIP 10.96.0.10:53/UDP (demo/echo) from pod n2p2",
            [lab.udp_request(client, "10.96.0.10", 53)["pod"] for _ in range(min(requests, 60))],
        )
        show(
            "ClusterIP 10.96.0.11:80/TCP (demo/sticky, sessionAffinity ClientIP) from pod n2p2",
            lab.tcp_requests(client, "10.96.0.11", 80, min(requests, 60)),
        )
        for title, addr, port in (
            ("NodePort", n1.ip, 30080),
            ("LoadBalancer", "192.168.78.10", 80),
            ("ExternalIP", "192.168.78.20", 80),
        ):
            show(f"{title} {addr}:{port} from the external client {lab.ext.ip}",
                 lab.tcp_requests(lab.ext, addr, port, requests))  # fmt: skip
        seen = lab.tcp_request(lab.ext, "192.168.78.10", 80)["client"]
        print(f"\nthe LoadBalancer backend saw the client as {seen} (source address preserved)")
        failures6 = ipv6_part(lab, requests)
        print(f"\n$ kproxy services --bpffs {n1.bpffs}   (node n1)")
        out = subprocess.run(
            [sys.executable, "-m", "kproxy", "services", "--bpffs", n1.bpffs],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        print(out.stdout + out.stderr, end="")
        print("\ntearing the lab down ...")
    print("done: no namespace, process or mount of the lab is left.")
    return failures6


def ipv6_part(lab: Lab, requests: int) -> list[str]:
    """Traffic to the IPv6 frontends of demo/echo-dual; every step that fails is printed as a failure
    and returned, and the next one is tried all the same."""
    print("\n---- IPv6 (dual-stack Service demo/echo-dual) ----")
    failures: list[str] = []
    client, n1 = lab.pod("n2p2"), lab.node("n1")
    vip6 = DUAL_IPS[1]
    backends6 = [lab.pod(p).ip6 for p in DUAL_PODS]

    def step(title: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (LabError, OSError, ValueError, KeyError) as e:
            msg = f"{title}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failures.append(msg)
            print(f"\nIPv6 FAILED  {msg}", flush=True)

    step(
        f"ClusterIP {addr_port(vip6, 80)} programmed",
        lambda: lab.wait_programmed(vip6, 80, backends6, timeout=IPV6_WAIT),
    )
    step(
        f"ClusterIP {addr_port(vip6, 80)}/TCP from pod {client.name} {client.ip6}",
        lambda: show(
            f"ClusterIP {addr_port(vip6, 80)}/TCP (demo/echo-dual) from pod {client.name} {client.ip6}",
            lab.tcp_requests(client, vip6, 80, requests, timeout=3),
        ),
    )
    step(
        f"ClusterIP {addr_port(vip6, 53)}/UDP from pod {client.name}",
        lambda: show(
            f"ClusterIP {addr_port(vip6, 53)}/UDP (demo/echo-dual) from pod {client.name}",
            [lab.udp_request(client, vip6, 53, timeout=3)["pod"] for _ in range(min(requests, 60))],
        ),
    )
    nodeport = addr_port(n1.ip6, DUAL_NODE_PORT)
    step(
        f"NodePort {nodeport} programmed on n1",
        lambda: lab.wait_programmed(n1.ip6, DUAL_NODE_PORT, backends6, nodes=["n1"], timeout=IPV6_WAIT),
    )
    step(
        f"NodePort {nodeport} from the external client {lab.ext.ip6}",
        lambda: show(
            f"NodePort {nodeport} from the external client {lab.ext.ip6}",
            lab.tcp_requests(lab.ext, n1.ip6, DUAL_NODE_PORT, requests, timeout=3),
        ),
    )

    for title, addr in (("LoadBalancer", DUAL_LB6), ("ExternalIP", DUAL_EXTERNAL6)):

        def from_outside(title: str = title, addr: str = addr) -> None:
            lab.wait_programmed(addr, 80, backends6, nodes=["n1"], timeout=IPV6_WAIT)
            show(
                f"{title} {addr_port(addr, 80)} from the external client {lab.ext.ip6}",
                lab.tcp_requests(lab.ext, addr, 80, requests, timeout=3),
            )

        step(f"{title} {addr_port(addr, 80)} from the external client", from_outside)

    def seen_by_backend() -> None:
        reply = lab.tcp_request(client, vip6, 80, timeout=3)
        print(f"\nthe IPv6 backend {reply['pod']} saw the client as {client_address(reply)}")

    step("client address seen over IPv6", seen_by_backend)
    print(f"\nIPv6: {len(failures)} step(s) FAILED" if failures else "\nIPv6: every step worked", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="connections per frontend (default 300)")
    ap.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES, help="manifests directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "the demo needs root (network namespaces, bpffs, BPF programs): run it with sudo", file=sys.stderr
        )
        return 4
    try:
        failures6 = run_demo(args.examples, args.requests)
    except (LabError, OSError, AssertionError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the lab was torn down", file=sys.stderr)
        return 130
    if failures6:
        print(f"demo: IPv6 FAILED in {len(failures6)} step(s):", file=sys.stderr)
        for f in failures6:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
