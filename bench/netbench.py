"""Self-contained data-plane benchmark of the peers (until the kproxy lab takes over).

Three network namespaces, all named with a per-run prefix and always removed::

    client (pod 10.244.1.2) --veth-- node (10.244.1.1 | 10.244.2.1, forwarding) --veth-- backends
                                      peer rules live here                        (10.244.2.10..19)

Every link is dual-stack (client fd00:10:244:1::2, node fd00:10:244:1::1 | fd00:10:244:2::1 and
fd00:77::2, backends fd00:10:244:2::10..19; servers listen on both families): ``--family 6`` runs
the same measurement over IPv6 with the ip6tables / ``table ip6`` peers.

The node namespace gets N Services' rules in kube-proxy's layout (``--peer iptables|nftables``, or
``none``), the backends run ``kp-echo`` (short connections) and ``iperf3 -s``. Measured from the
client: short-connection rate and latency (``kp-loadgen``) to one ClusterIP and, for the baseline,
directly to a backend over the same path; single-stream iperf3 throughput; machine-wide system +
softirq CPU from /proc/stat per GB moved; time to load the rules from cold and to apply one
endpoint change the way kube-proxy does (iptables: full iptables-restore; nftables: the Service's
chains flushed and refilled in one transaction).

    python -m bench.netbench --peer iptables --services 1000 [--family 6] [-o out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import iptables, nftables
from bench.peers.model import CLUSTER_CIDR6, SERVICE_CIDR6, Endpoint, NodeConfig, ServicePort, synth_services

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench/loadgen/kp-loadgen"
ECHO = ROOT / "bench/loadgen/kp-echo"
IPTABLES_RESTORE = "iptables-nft-restore"  # Debian 12's default backend, the one kube-proxy's image picks
IPTABLES_SAVE = "iptables-nft-save"
IP6TABLES_RESTORE = "ip6tables-nft-restore"
IP6TABLES_SAVE = "ip6tables-nft-save"

CLIENT_IP, CLIENT_GW = "10.244.1.2", "10.244.1.1"
BACKEND_GW = "10.244.2.1"
BACKEND_IPS = tuple(f"10.244.2.{10 + i}" for i in range(10))
NODE_IP = "192.168.250.2"
TARGET_VIP, IPERF_VIP = "10.96.0.10", "10.96.0.11"
SERVICE_PORT, ECHO_PORT, IPERF_PORT = 80, 8080, 5201

# The same topology's IPv6 addresses (the lab's plan: pods fd00:10:244:<node>::/64, nodes fd00:77::/64,
# Services fd00:10:96::/108).
CLIENT_IP6, CLIENT_GW6 = "fd00:10:244:1::2", "fd00:10:244:1::1"
BACKEND_GW6 = "fd00:10:244:2::1"
BACKEND_IPS6 = tuple(f"fd00:10:244:2::{10 + i}" for i in range(10))
NODE_IP6 = "fd00:77::2"
TARGET_VIP6, IPERF_VIP6 = "fd00:10:96::a", "fd00:10:96::b"


@dataclasses.dataclass(frozen=True)
class Family:
    """What one address family of the topology uses: addresses, the peers' node config, tools."""

    version: int
    client: str
    backends: tuple[str, ...]
    node_ip: str
    target_vip: str
    iperf_vip: str
    changed_endpoint: str  # the endpoint an "endpoint change" puts in (an address nothing answers)
    node: NodeConfig
    iptables_restore: str
    iptables_save: str

    @property
    def label(self) -> str:
        return f"IPv{self.version}"


FAMILIES = {
    4: Family(
        4, CLIENT_IP, BACKEND_IPS, NODE_IP, TARGET_VIP, IPERF_VIP, "10.244.99.99",
        NodeConfig(node_ips=(NODE_IP,)), IPTABLES_RESTORE, IPTABLES_SAVE,
    ),
    6: Family(
        6, CLIENT_IP6, BACKEND_IPS6, NODE_IP6, TARGET_VIP6, IPERF_VIP6, "fd00:10:244:99::99",
        NodeConfig(cluster_cidr=CLUSTER_CIDR6, service_cidr=SERVICE_CIDR6, node_ips=(NODE_IP6,)),
        IP6TABLES_RESTORE, IP6TABLES_SAVE,
    ),
}  # fmt: skip


def reply_addr(reply: str) -> str:
    """The address of a kp-echo identity: "10.0.0.1:8080" or "[fd00::1]:8080"."""
    if reply.startswith("["):
        return reply[1 : reply.index("]")]
    return reply.rsplit(":", 1)[0]


def ensure_tools() -> None:
    """Build kp-loadgen and kp-echo with mk/bench.mk when they are missing or stale."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "-f", "mk/bench.mk", "loadgen"], check=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}"
        )
    return res


@dataclasses.dataclass
class Topology:
    """client / node / backends namespaces. Use as a context manager: everything goes on exit."""

    prefix: str = dataclasses.field(default_factory=lambda: f"kpb-{secrets.token_hex(3)}-")
    procs: list[subprocess.Popen[str]] = dataclasses.field(default_factory=list)
    created: list[str] = dataclasses.field(default_factory=list)

    @property
    def client(self) -> str:
        return self.prefix + "cli"

    @property
    def node(self) -> str:
        return self.prefix + "node"

    @property
    def backends(self) -> str:
        return self.prefix + "be"

    def ns(self, ns: str, *cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *cmd], **kw)

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.client, self.node, self.backends):
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No duplicate address detection on the links created below (their link-local addresses
            # too): nothing else is on these links, and DAD would hold IPv6 for a second or two.
            self.ns(
                ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"
            )
        # Both ends are created inside namespaces we own: the root namespace never sees a link.
        run(
            [
                "ip",
                "-n",
                self.node,
                "link",
                "add",
                "vc",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.client,
            ]
        )
        run(
            [
                "ip",
                "-n",
                self.node,
                "link",
                "add",
                "vb",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.backends,
            ]
        )
        n = ["ip", "-n", self.node]
        n6 = ["ip", "-6", "-n", self.node]
        run([*n, "addr", "add", f"{CLIENT_GW}/24", "dev", "vc"])
        run([*n, "addr", "add", f"{BACKEND_GW}/24", "dev", "vb"])
        run([*n, "addr", "add", f"{NODE_IP}/32", "dev", "lo"])
        # IPv6 addresses with nodad: usable at once, no 1-2 s of duplicate address detection.
        run([*n6, "addr", "add", f"{CLIENT_GW6}/64", "dev", "vc", "nodad"])
        run([*n6, "addr", "add", f"{BACKEND_GW6}/64", "dev", "vb", "nodad"])
        run([*n6, "addr", "add", f"{NODE_IP6}/128", "dev", "lo", "nodad"])
        run([*n, "link", "set", "vc", "up"])
        run([*n, "link", "set", "vb", "up"])
        self.ns(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns(self.node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        c = ["ip", "-n", self.client]
        run([*c, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"])
        run(["ip", "-6", "-n", self.client, "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad"])
        run([*c, "link", "set", "eth0", "up"])
        run([*c, "route", "add", "default", "via", CLIENT_GW])
        run(["ip", "-6", "-n", self.client, "route", "add", "default", "via", CLIENT_GW6])
        # Many short connections: let the client use the whole port range (IPv6 sockets too).
        self.ns(self.client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        b = ["ip", "-n", self.backends]
        for ip in BACKEND_IPS:
            run([*b, "addr", "add", f"{ip}/24", "dev", "eth0"])
        for ip in BACKEND_IPS6:
            run(["ip", "-6", "-n", self.backends, "addr", "add", f"{ip}/64", "dev", "eth0", "nodad"])
        run([*b, "link", "set", "eth0", "up"])
        run([*b, "route", "add", "default", "via", BACKEND_GW])
        run(["ip", "-6", "-n", self.backends, "route", "add", "default", "via", BACKEND_GW6])
        self._wait_ipv6()

    def _wait_ipv6(self) -> None:
        """Until no IPv6 address is tentative (duplicate address detection is off, so normally at
        once): with DAD on the link-local addresses, the first IPv6 SYNs of a run were lost (a second
        each), which a 1-s measurement cannot tell from a broken path."""
        deadline = time.monotonic() + 10
        for ns in (self.client, self.node, self.backends):
            while run(["ip", "-6", "-n", ns, "addr", "show", "tentative"]).stdout.strip():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"IPv6 addresses in {ns} still tentative after 10 s")
                time.sleep(0.05)

    def spawn(self, ns: str, *cmd: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.procs.append(p)
        return p

    def start_servers(self) -> None:
        echo = ("-l", f"0.0.0.0:{ECHO_PORT}", "-l", f"[::]:{ECHO_PORT}")
        self.spawn(self.backends, str(ECHO), *echo, "-P", "2")
        self.spawn(self.backends, "iperf3", "-s", "-B", BACKEND_IPS[0], "-p", str(IPERF_PORT))
        self.spawn(self.backends, "iperf3", "-s", "-B", BACKEND_IPS6[0], "-p", str(IPERF_PORT))
        want = (
            f"0.0.0.0:{ECHO_PORT}", f"[::]:{ECHO_PORT}",
            f"{BACKEND_IPS[0]}:{IPERF_PORT}", f"[{BACKEND_IPS6[0]}]:{IPERF_PORT}",
        )  # fmt: skip
        deadline = time.monotonic() + 30  # only bounds a failure: a busy machine starts them slowly
        while time.monotonic() < deadline:
            out = self.ns(self.backends, "ss", "-Hltn").stdout
            if all(w in out for w in want):
                return
            for p in self.procs:
                if p.poll() is not None:
                    err = p.stderr.read() if p.stderr else ""
                    raise RuntimeError(f"backend server exited: {p.args!r}: {err}")
            time.sleep(0.05)
        raise RuntimeError(f"backend servers not listening in {self.backends} after 30 s")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        self.procs.clear()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()

    # --- peers ----------------------------------------------------------------------------------

    def load_iptables(self, text: str, family: int = 4) -> float:
        """iptables-restore (ip6tables-restore for family 6) of TEXT; seconds it took."""
        self.ns(self.node, sys.executable, "-m", "bench.peers.nfacct", *iptables.NFACCT_OBJECTS, cwd=ROOT)
        t0 = time.perf_counter()
        self.ns(self.node, FAMILIES[family].iptables_restore, input=text)
        return time.perf_counter() - t0

    def load_nft(self, text: str) -> float:
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
            f.write(text)
        try:
            t0 = time.perf_counter()
            self.ns(self.node, "nft", "-f", f.name)
            return time.perf_counter() - t0
        finally:
            os.unlink(f.name)


def target_services(family: int = 4) -> tuple[ServicePort, ServicePort]:
    """The Service the client connects to (10 real backends) and a one-backend one for iperf3
    (iperf3 opens two connections that must reach the same server)."""
    fam = FAMILIES[family]
    target = ServicePort(
        "bench", "target", fam.target_vip, SERVICE_PORT, ECHO_PORT, port_name="http",
        endpoints=tuple(Endpoint(ip) for ip in fam.backends),
    )  # fmt: skip
    perf = ServicePort(
        "bench", "iperf", fam.iperf_vip, IPERF_PORT, IPERF_PORT, port_name="iperf",
        endpoints=(Endpoint(fam.backends[0]),),
    )  # fmt: skip
    return target, perf


def bench_services(n: int, endpoints: int = 10, family: int = 4) -> list[ServicePort]:
    """N Services with the target in the middle and the iperf Service right after it (N + 1 total)."""
    target, perf = target_services(family)
    services = synth_services(n, endpoints, target=target, family=family)
    services.insert(n // 2 + 1, perf)
    return services


def cpu_times() -> dict[str, float]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    hz = os.sysconf("SC_CLK_TCK")
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {k: int(v) / hz for k, v in zip(names, fields, strict=False)}


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 3) for k in ("system", "softirq", "irq", "user")}


def loadgen(
    topo: Topology, addr: str, port: int, duration: float, conc: int, warmup: float = 0.5, total: int = 0
) -> dict:
    """Short connections for DURATION s after WARMUP s; with TOTAL, ended as soon as TOTAL connections
    begun after the warm-up are done (kp-loadgen -n), if that comes first."""
    before = cpu_times()
    out = topo.ns(
        topo.client, str(LOADGEN), "-a", addr, "-p", str(port), "-c", str(conc), "-d", str(duration),
        "-w", str(warmup), "-i", *(["-n", str(total)] if total else []),
    ).stdout  # fmt: skip
    res = json.loads(out)
    cpu = _cpu_delta(before, cpu_times())
    res["cpu_s"] = cpu
    if res["connections"]:
        res["cpu_us_per_conn"] = round((cpu["system"] + cpu["softirq"]) * 1e6 / res["connections"], 1)
    return res


def iperf(topo: Topology, addr: str, seconds: float, bitrate: str | None) -> dict:
    cmd = ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if bitrate:
        cmd += ["-b", bitrate]
    before = cpu_times()
    raw = json.loads(topo.ns(topo.client, *cmd).stdout)
    cpu = _cpu_delta(before, cpu_times())
    end = raw["end"]
    gbytes = end["sum_received"]["bytes"] / 1e9
    return {
        "gbit_s": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
        "retransmits": end["sum_sent"].get("retransmits"),
        "gbytes": round(gbytes, 3),
        "cpu_s": cpu,
        "cpu_s_per_gb": round((cpu["system"] + cpu["softirq"]) / gbytes, 3) if gbytes else None,
    }


def _changed_endpoint(svc: ServicePort, family: int = 4) -> ServicePort:
    eps = list(svc.endpoints)
    eps[-1] = Endpoint(FAMILIES[family].changed_endpoint)
    return dataclasses.replace(svc, endpoints=tuple(eps))


def program_peer(topo: Topology, peer: str, services: list[ServicePort], node: NodeConfig) -> dict:
    """Load the rules from cold, then apply one endpoint change; times and rule-set sizes. NODE's
    family picks iptables or ip6tables, ``table ip`` or ``table ip6``."""
    if peer == "none":
        return {}
    fam = node.family
    t0 = time.perf_counter()
    if peer == "iptables":
        text = iptables.render(services, node)
        gen_s = time.perf_counter() - t0
        load_s = topo.load_iptables(text, fam)
        # One endpoint of an unrelated Service changes: kube-proxy rewrites the tables.
        changed = list(services)
        changed[0] = _changed_endpoint(changed[0], fam)
        t1 = time.perf_counter()
        update_s = topo.load_iptables(iptables.render(changed, node), fam)
        update_total = time.perf_counter() - t1
        topo.load_iptables(text, fam)
        size = {"rules": iptables.rule_count(text), "bytes": len(text)}
    else:
        text = nftables.render(services, node)
        gen_s = time.perf_counter() - t0
        load_s = topo.load_nft(text)
        t1 = time.perf_counter()
        update_s = topo.load_nft(nftables.endpoint_update(_changed_endpoint(services[0], fam), node))
        update_total = time.perf_counter() - t1
        topo.load_nft(nftables.endpoint_update(services[0], node))
        size = {"bytes": len(text), "lines": text.count("\n")}
    return {
        "generate_s": round(gen_s, 4),
        "load_s": round(load_s, 4),
        "endpoint_update_s": round(update_s, 4),
        "endpoint_update_with_render_s": round(update_total, 4),
        "size": size,
    }


def bench(args: argparse.Namespace) -> dict:
    ensure_tools()
    fam = FAMILIES[args.family]
    node = fam.node
    services = bench_services(args.services, args.endpoints, args.family)
    result: dict = {
        "peer": args.peer,
        "family": fam.label,
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "iptables_backend": fam.iptables_restore if args.peer == "iptables" else None,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }
    t_start = time.perf_counter()
    with Topology() as topo:
        topo.start_servers()
        result["program"] = program_peer(topo, args.peer, services, node)
        paths = {"direct": (fam.backends[0], ECHO_PORT, fam.backends[0])}
        if args.peer != "none":
            paths = {"service": (fam.target_vip, SERVICE_PORT, fam.iperf_vip), **paths}
        for label, (echo_addr, echo_port, iperf_addr) in paths.items():
            lg = loadgen(topo, echo_addr, echo_port, args.duration, args.concurrency)
            bad = [r for r in lg.get("replies", {}) if reply_addr(r) not in fam.backends]
            if bad or not lg["connections"]:
                raise RuntimeError(
                    f"{label}: no valid replies through {echo_addr} (replies {lg.get('replies')})"
                )
            lg["backends_reached"] = len(lg.pop("replies", {}))
            result[label] = {"short_conns": lg}
            if args.iperf_seconds > 0:
                result[label]["iperf"] = iperf(topo, iperf_addr, args.iperf_seconds, args.iperf_bitrate)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", choices=["none", "iptables", "nftables"], required=True)
    ap.add_argument("--services", type=int, default=1)
    ap.add_argument("--family", type=int, choices=[4, 6], default=4, help="address family of the Services")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of short connections")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--iperf-seconds", type=float, default=5.0, help="0 skips iperf3")
    ap.add_argument("--iperf-bitrate", default=None, help="iperf3 -b (default: unlimited)")
    ap.add_argument("-o", "--output", type=Path, help="write the JSON here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("netbench: needs root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM must unwind through the Topology's cleanup like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    res = bench(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
