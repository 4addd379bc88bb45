"""Issue 4 speed: short external connections to a NodePort whose backend runs on the other node.

One lab (kproxy.lab: 2 nodes on a bridge, an external client), kp-echo in pod n2p1, a NodePort
Service on it; the client connects to n1's address (n1 is the ingress node). Measured in one run, in
turn: snat, dsr opt, dsr ipip (toggled with `kproxy dsr` on both nodes), and a no-NAT baseline: the
client straight to the backend's pod address through the same nodes (routed ext -> n1 -> n2 -> pod,
replies n2 -> ext, untouched by kproxy).

    sudo .venv/bin/python -m bench.bench_external [--duration 5] [--concurrency 32] [--rounds 2] [--json]

Prints a table of connections/s, p50 and p99 latency (connect to EOF of the reply) and errors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench/loadgen/kp-loadgen"
ECHO = ROOT / "bench/loadgen/kp-echo"
ECHO_PORT = 7000
NODE_PORT = 31500
CLUSTER_IP = "10.96.60.1"


def set_mode(lab: Any, mode: str) -> None:
    args = ["disable"] if mode == "snat" else ["enable", "--mode", mode]
    for node in lab.nodes:
        subprocess.run(
            [sys.executable, "-m", "kproxy", "dsr", *args, "--bpffs", node.bpffs],
            check=True,
            capture_output=True,
        )


def loadgen(lab: Any, addr: str, port: int, duration: float, conc: int) -> dict[str, Any]:
    r = lab.run_in(
        lab.ext,
        [str(LOADGEN), "-a", addr, "-p", str(port), "-c", str(conc), "-d", str(duration), "-w", "0.5", "-i"],
        timeout=duration + 30,
    )
    if r.returncode != 0:
        raise RuntimeError(f"kp-loadgen failed: {r.stderr}")
    return dict(json.loads(r.stdout))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="each case runs this often, interleaved")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    subprocess.run(["make", "-s", "-C", str(ROOT), "-f", "mk/bench.mk", "loadgen"], check=True)

    from kproxy.lab import Lab
    from kproxy.lab import manifests as mf

    results: dict[str, list[dict[str, Any]]] = {}
    with Lab(nodes=2, pods_per_node=1, agent_args=["--log-level", "warning"]) as lab:
        pod = lab.pod("n2p1")
        n1 = lab.node("n1")
        lab._spawn("bench/echo", pod.ns, [str(ECHO), "-l", f"0.0.0.0:{ECHO_PORT}", "-P", "2"],
                   lab.dir / "logs" / "echo.log")  # fmt: skip
        port = mf.Port("echo", 80, ECHO_PORT, "TCP", NODE_PORT)
        lab.write_manifest("echo", [
            mf.service("echo", [port], CLUSTER_IP, type="NodePort"),
            mf.endpoint_slice("echo", [(pod.ip, pod.node)], [port]),
        ])  # fmt: skip
        lab.wait_programmed(n1.ip, NODE_PORT, [pod.ip], nodes=["n1"])
        lab.wait_programmed(CLUSTER_IP, 80, [pod.ip])
        # baseline route: the client reaches pod addresses through n1, as it reaches the NodePort
        subprocess.run(["ip", "-n", lab.ext.ns, "route", "add", "10.244.2.0/24", "via", n1.ip], check=True)
        cases = [
            ("no NAT (ext -> pod, via n1)", None, pod.ip, ECHO_PORT),
            ("snat", "snat", n1.ip, NODE_PORT),
            ("dsr opt", "opt", n1.ip, NODE_PORT),
            ("dsr ipip", "ipip", n1.ip, NODE_PORT),
        ]
        time.sleep(0.5)
        for _ in range(args.rounds):
            for name, mode, addr, p in cases:
                if mode is not None:
                    set_mode(lab, mode)
                res = loadgen(lab, addr, p, args.duration, args.concurrency)
                results.setdefault(name, []).append(res)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(
        f"{args.concurrency} concurrent short connections, {args.duration:g} s per run, best of {args.rounds}"
    )
    print(f"{'case':30} {'conn/s':>9} {'p50 us':>8} {'p99 us':>8} {'errors':>7}")
    for name, runs in results.items():
        best = max(runs, key=lambda r: float(r["rate"]))
        print(f"{name:30} {best['rate']:>9.0f} {best['p50_us']:>8} {best['p99_us']:>8} {best['errors']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
