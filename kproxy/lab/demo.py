"""`make demo`: a lab with the manifests in examples/, real requests through each kind of Service.

    python -m kproxy.lab.demo [--requests N] [--examples DIR]

Brings the lab up (2 nodes x 2 pods, one agent per node), sends N TCP connections through the
ClusterIP echo service from pod n2p2, UDP datagrams through its UDP port, then N connections from
the external client through a NodePort, a LoadBalancer IP and an external IP; prints how many went to
each backend and the `kproxy services` table of node n1, and tears everything down (also on failure
or Ctrl-C).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path

from kproxy.lab.cluster import Lab
from kproxy.lab.netns import LabError

DEFAULT_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def show(title: str, answers: list[str]) -> None:
    counts = collections.Counter(answers)
    total = len(answers)
    print(f"\n{title}: {total} requests")
    for pod, n in sorted(counts.items()):
        print(f"  {pod:6s} {n:5d}  {100 * n / total:5.1f}%  {'#' * round(40 * n / total)}")


def run_demo(examples: Path, requests: int) -> None:
    print(f"bringing the lab up with the manifests in {examples} ...")
    with Lab(nodes=2, pods_per_node=2, manifests_from=examples) as lab:
        n1 = lab.node("n1")
        nodes = ", ".join(f"{n.name}={n.ip}" for n in lab.nodes)
        pods = ", ".join(f"{p.name}={p.ip}" for p in lab.pods)
        print(f"lab {lab.prefix}: nodes {nodes}; pods {pods}; external client {lab.ext.ip}")
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
        print(f"\n$ kproxy services --bpffs {n1.bpffs}   (node n1)")
        out = subprocess.run(
            [sys.executable, "-m", "kproxy", "services", "--bpffs", n1.bpffs],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        print(out.stdout + out.stderr, end="")
        print("\ntearing the lab down ...")
    print("done: no namespace, process or mount of the lab is left.")


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
        run_demo(args.examples, args.requests)
    except (LabError, OSError, AssertionError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the lab was torn down", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
