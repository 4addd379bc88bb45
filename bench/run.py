"""kproxy against kube-proxy's iptables and nftables dataplanes and a no-NAT baseline, in one run.

    python -m bench.run --quick        # N = 1 and 1,000 Services (what `make bench` runs, < 10 min)
    python -m bench.run --full         # N = 1, 1,000 and 10,000 (`make bench-full`)
    python -m bench.run --services 1 --duration 1 --iperf-seconds 1 -o DIR   # anything in between
    python -m bench.run --quick --families 6   # the IPv6 rows only (default: both families)

For every N, the same N + 1 Services x 10 endpoints (bench.netbench.bench_services: the target
ClusterIP in the middle, a one-backend Service for iperf3 next to it) are programmed in a fresh
client / node / backends topology (bench.netbench.Topology) four ways:

- iptables: kube-proxy's iptables layout (bench.peers.iptables), nfacct objects first, loaded with
  iptables-nft-restore as on Debian 12;
- nftables: kube-proxy's nftables layout (bench.peers.nftables), loaded with nft -f;
- kproxy: the real agent (`kproxy agent --source file:DIR`) in the node namespace on a private bpffs,
  attached to both veths of the node, fed the same Services as JSON manifests;
- baseline: no rules at all, the client addressing a backend directly (measured once per run), and
  the same direct path with each peer's rules loaded (the "direct" rows of every peer).

Every measurement is made per address family (``--families 4 6``, both by default): the topology is
dual-stack, and for IPv6 the same Services get IPv6 addresses (bench.netbench.FAMILIES) and the peers
are kube-proxy's IPv6 proxier: ip6tables-nft-restore of the ip6tables layout, ``table ip6 kube-proxy``;
kproxy gets SingleStack IPv6 Services and programs kp_svc6_v1 / kp_be6_v1.

Measured per peer and N: short connections with kp-loadgen (rate, p50, p99) to the ClusterIP and
directly to a backend; single-stream iperf3 at -b 2G and unlimited with system+softirq CPU per GB;
time to program all N Services from cold and to apply one endpoint change; agent RSS and rule-set
sizes. Results: bench/results/<timestamp>.json, latest.json, results.md and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import netbench as nb
from bench.peers.model import Endpoint, ServicePort

RESULTS = nb.ROOT / "bench/results"
PEERS = ("iptables", "nftables", "kproxy")
FAMILY_CHOICES = (4, 6)
# the agent's own sync durations (incremental syncs), read from its /metrics in the node namespace
SYNC_METRIC = "kproxy_sync_duration_seconds"
MANIFEST_CHUNK = 1000  # Services per manifest file (a Service and its slice per Service)
DIRECT_PORT = 8081  # backends' second kp-echo port, for the direct path


@dataclasses.dataclass
class Settings:
    services: list[int]
    duration: float = 5.0
    connections: int = 0  # short connections end after this many per path, or after `duration` (0: duration)
    warmup: float = 0.5
    concurrency: int = 32
    iperf_seconds: float = 3.0
    bitrates: tuple[str | None, ...] = ("2G", None)
    endpoints: int = 10
    peers: tuple[str, ...] = PEERS
    families: tuple[int, ...] = FAMILY_CHOICES
    direct_after_service: bool = False  # measure the direct path once more after the Service path
    agent_args: tuple[str, ...] = ()  # extra `kproxy agent` arguments


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data path
def measure_path(
    topo: nb.Topology, st: Settings, echo: tuple[str, int], iperf_addr: str, fam: nb.Family
) -> dict[str, Any]:
    addr, port = echo
    lg = nb.loadgen(topo, addr, port, st.duration, st.concurrency, st.warmup, st.connections)
    bad = [r for r in lg.get("replies", {}) if nb.reply_addr(r) not in fam.backends]
    if bad or not lg["connections"]:
        raise RuntimeError(
            f"no valid replies through {addr}:{port} (replies {lg.get('replies')}, "
            f"errors {lg.get('errors')}: {lg.get('error_kinds')})"
        )
    lg["backends_reached"] = len(lg.pop("replies", {}))
    out: dict[str, Any] = {"short_conns": lg, "iperf": {}}
    if st.iperf_seconds > 0:
        for rate in st.bitrates:
            out["iperf"][rate or "unlimited"] = nb.iperf(topo, iperf_addr, st.iperf_seconds, rate)
    return out


def measure_paths(topo: nb.Topology, st: Settings, service: bool, fam: nb.Family) -> dict[str, Any]:
    # The direct path goes to a second server port of the backend: at these rates client ports are re-used
    # within seconds, and a Service connection landing on a backend 4-tuple that a direct connection left in
    # TIME_WAIT (or the reverse: a direct connection matching a Service flow's REPLY conntrack entry in
    # kproxy) would measure that collision instead of the path (see bench/README.md).
    res: dict[str, Any] = {}
    be = fam.backends[0]
    res["direct"] = measure_path(topo, st, (be, DIRECT_PORT), be, fam)
    if service:
        res["service"] = measure_path(topo, st, (fam.target_vip, nb.SERVICE_PORT), fam.iperf_vip, fam)
    if service and st.direct_after_service:
        try:
            res["direct_after_service"] = measure_path(topo, st, (be, nb.ECHO_PORT), be, fam)
        except RuntimeError as e:
            res["direct_after_service"] = {"failed": str(e)}
    return res


# ---------------------------------------------------------------- kproxy peer
def to_manifests(svc: ServicePort) -> list[dict[str, Any]]:
    from kproxy.lab import manifests as mf

    port = mf.Port(svc.port_name or "p", svc.port, svc.target_port, svc.protocol)
    if ":" in svc.cluster_ip:  # SingleStack IPv6, its slice of addressType IPv6
        head = mf.service(svc.name, [port], None, namespace=svc.namespace, cluster_ip6=svc.cluster_ip)
    else:
        head = mf.service(svc.name, [port], svc.cluster_ip, namespace=svc.namespace)
    return [
        head,
        mf.endpoint_slice(
            svc.name, [(e.ip, "other") for e in svc.endpoints], [port], namespace=svc.namespace
        ),
    ]


def write_json_atomic(path: Path, objects: list[dict[str, Any]]) -> None:
    # A dot-prefixed temporary name: the file source skips it, and rename makes the switch atomic.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    os.rename(tmp, path)


def changed_endpoint(svc: ServicePort, fam: nb.Family) -> ServicePort:
    eps = list(svc.endpoints)
    eps[-1] = Endpoint(fam.changed_endpoint)
    return dataclasses.replace(svc, endpoints=tuple(eps))


class KproxyAgent:
    """The real agent in the node namespace, on a private bpffs, fed manifests from a temp dir. It
    knows both node addresses; the Services (and so the maps checked) are of FAM's family."""

    def __init__(
        self,
        topo: nb.Topology,
        services: list[ServicePort],
        extra_args: tuple[str, ...] = (),
        fam: nb.Family = nb.FAMILIES[4],
    ) -> None:
        self.topo = topo
        self.fam = fam
        self.extra_args = extra_args
        self.services = services
        self.dir = Path(tempfile.mkdtemp(prefix=f"{topo.prefix}kproxy-", dir="/run"))
        self.manifests = self.dir / "manifests"
        self.bpffs_root = self.dir / "bpffs"
        self.bpffs = self.bpffs_root / "node"
        self.logfile = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounted = False

    def __enter__(self) -> KproxyAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.mounted:
            # Pins (maps, tcx links) go with the mount; the links also die with the node's veths.
            r = subprocess.run(["umount", str(self.bpffs_root)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.bpffs_root)], capture_output=True)
            self.mounted = False
        with contextlib.suppress(Exception):
            from kproxy.observe.metadata import metadata_path

            shutil.rmtree(metadata_path(self.bpffs).parent, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def agent_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def render_bulk(self) -> list[tuple[Path, str]]:
        """Every Service but the changing one, MANIFEST_CHUNK Services (and their slices) per file: the
        file source re-reads a whole file when it changes, and a few big files list fastest."""
        rest = self.services[1:]
        out = []
        for i in range(0, len(rest), MANIFEST_CHUNK):
            objs = [o for s in rest[i : i + MANIFEST_CHUNK] for o in to_manifests(s)]
            doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
            out.append((self.manifests / f"bulk-{i // MANIFEST_CHUNK:03d}.json", doc))
        return out

    def write_changing(self) -> None:
        self.manifests.mkdir(exist_ok=True)
        write_json_atomic(self.manifests / "changing.json", to_manifests(self.services[0]))

    def load_bulk(self, docs: list[tuple[Path, str]]) -> dict[str, Any]:
        """Write the bulk files into the running agent's directory; seconds until the maps hold them all."""
        from kproxy.bpf.maps import KproxyMaps

        rest = self.services[1:]
        probes = [rest[min(i + MANIFEST_CHUNK, len(rest)) - 1] for i in range(0, len(rest), MANIFEST_CHUNK)]
        expected = sum(1 + len(s.endpoints) for s in self.services)
        with KproxyMaps.open(self.bpffs) as maps:
            sum0, n0 = self.sync_seconds()
            t0 = time.perf_counter()
            for path, doc in docs:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(doc)
                os.rename(tmp, path)
            # The last Service of every file, cheap lookups; then the whole map's entry count: the agent
            # applies a batch in chunks, not in file order, so the probes alone may be there before the
            # rest (seen: half the entries at 1,000 Services).
            self._wait(
                "every Service in the maps",
                lambda: all(len(self.backends(maps, p)) == len(p.endpoints) for p in probes),
                600,
                0.002,
            )
            svc_map = maps.svc6 if self.fam.version == 6 else maps.svc4
            self._wait(
                f"{expected} entries in kp_svc{self.fam.version}_v1",
                lambda: len(svc_map) >= expected,
                600,
                0.002,
            )
            load_s = time.perf_counter() - t0
            entries = len(svc_map)
        # The agent counts a batch after writing it: wait for the count, and a little for later
        # batches, so that the endpoint change that follows does not see them.
        self._wait("the agent's sync metrics", lambda: self.sync_seconds()[1] > n0, 30, 0.01)
        time.sleep(0.5)
        sum1, n1 = self.sync_seconds()
        return {
            "load_s": round(load_s, 4),
            "load_sync_ms": round((sum1 - sum0) * 1000, 1),
            "load_sync_batches": int(n1 - n0),
            f"svc{self.fam.version}_entries": entries,
            f"svc{self.fam.version}_entries_expected": expected,
        }

    def start(self) -> float:
        """Start the agent on what the manifest directory holds; seconds until its first full sync is done."""
        from kproxy.observe.metadata import metadata_path

        self.bpffs_root.mkdir()
        nb.run(["mount", "-t", "bpf", "bpf", str(self.bpffs_root)])
        self.mounted = True
        self.bpffs.mkdir()
        meta = metadata_path(self.bpffs)
        meta.unlink(missing_ok=True)
        argv = [
            "nsenter", f"--net=/run/netns/{self.topo.node}",
            sys.executable, "-m", "kproxy", "agent",
            "--source", f"file:{self.manifests}",
            "--node-name", "node", "--node-ip", f"{nb.NODE_IP},{nb.NODE_IP6}",
            "--pod-ifaces", "vc,vb",
            "--bpffs", str(self.bpffs),
            "--log-level", "info",
            *self.extra_args,
        ]  # fmt: skip
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=nb.ROOT
            )
        self._wait("its first full sync", meta.exists, 300)
        cold = time.perf_counter() - t0
        self._wait(
            "the attach to vc and vb",
            lambda: all(f"attached pod interface {i} " in self.agent_log() for i in ("vc", "vb")),
            30,
        )
        return cold

    def _wait(self, what: str, cond: Any, timeout: float, interval: float = 0.005) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"kproxy agent exited while waiting for {what}:\n{self.agent_log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"kproxy agent: timed out waiting for {what}:\n{self.agent_log()[-3000:]}")
            time.sleep(interval)

    def backends(self, maps: Any, svc: ServicePort) -> set[str]:
        """Backend addresses the pinned maps hold for the ClusterIP of SVC (external scope): kp_svc4_v1 and
        kp_be4_v1, or kp_svc6_v1 and kp_be6_v1 for an IPv6 ClusterIP."""
        import ctypes

        from kproxy import abi

        v6 = ":" in svc.cluster_ip
        svc_map, be_map = (maps.svc6, maps.be6) if v6 else (maps.svc4, maps.be4)

        def key(slot: int) -> Any:
            if v6:
                addr6 = abi.In6.from_buffer_copy(abi.ip6_to_bytes(svc.cluster_ip))
                return abi.Svc6Key(addr=addr6, port=abi.port_to_nbo(svc.port), slot=slot, proto=6, scope=0)
            return abi.Svc4Key(
                addr=abi.ip_to_nbo(svc.cluster_ip),
                port=abi.port_to_nbo(svc.port),
                slot=slot,
                proto=6,
                scope=0,
            )

        head = svc_map.get(key(0))
        if head is None:
            return set()
        out = set()
        for slot in range(1, head.count + 1):
            v = svc_map.get(key(slot))
            be = be_map.get(ctypes.c_uint32(v.backend_id)) if v is not None else None
            if be is not None:
                out.add(abi.bytes_to_ip6(be.addr) if v6 else abi.nbo_to_ip(be.addr))
        return out

    def endpoint_change(self) -> dict[str, Any]:
        """Rewrite the changing Service's file with one endpoint replaced; seconds until the map has it.
        Then put it back (and wait), so the data path is measured on the original Services."""
        from kproxy.bpf.maps import KproxyMaps

        svc = self.services[0]
        new = changed_endpoint(svc, self.fam)
        with KproxyMaps.open(self.bpffs) as maps:
            sum0, n0 = self.sync_seconds()
            t0 = time.perf_counter()
            write_json_atomic(self.manifests / "changing.json", to_manifests(new))
            want = {e.ip for e in new.endpoints}
            self._wait(
                "the changed endpoint in the maps", lambda: self.backends(maps, svc) == want, 30, 0.001
            )
            update_s = time.perf_counter() - t0
            self._wait("the agent's sync metrics", lambda: self.sync_seconds()[1] > n0, 30, 0.01)
            sum1, n1 = self.sync_seconds()
            write_json_atomic(self.manifests / "changing.json", to_manifests(svc))
            orig = {e.ip for e in svc.endpoints}
            self._wait("the original endpoints in the maps", lambda: self.backends(maps, svc) == orig, 30)
        return {
            "endpoint_update_s": round(update_s, 4),
            # the syncs that carried the change (one, unless the file was read in two steps)
            "endpoint_update_apply_ms": round((sum1 - sum0) * 1000 / max(1, n1 - n0), 3),
        }

    def sync_seconds(self) -> tuple[float, float]:
        """(sum, count) of the agent's incremental sync durations (kproxy_sync_duration_seconds)."""
        import urllib.request

        from kproxy.lab.netns import in_netns
        from kproxy.observe.metrics import scrape_value

        def fetch() -> str:
            with urllib.request.urlopen("http://127.0.0.1:10249/metrics", timeout=5) as r:
                return str(r.read().decode())

        text = in_netns(self.topo.node, fetch)
        total = scrape_value(text, SYNC_METRIC + "_sum", {"kind": "incremental"})
        count = scrape_value(text, SYNC_METRIC + "_count", {"kind": "incremental"})
        return total or 0.0, count or 0.0

    def memory(self) -> dict[str, Any]:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kb = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
        return {
            "agent_rss_mb": round(kb["VmRSS"] / 1024, 1),
            "agent_peak_rss_mb": round(kb["VmHWM"] / 1024, 1),
        }

    def full_sync_ms(self) -> float | None:
        m = re.search(r"full sync: \d+ services changed, \d+ map writes.* in ([\d.]+) ms", self.agent_log())
        return float(m.group(1)) if m else None


def program_kproxy(agent: KproxyAgent) -> dict[str, Any]:
    """Start the agent with the changing Service only (the process, BPF load and attach cost), then
    hand it the other N Services while it runs (what an iptables-restore / nft -f of N compares to)."""
    t0 = time.perf_counter()
    docs = agent.render_bulk()
    gen_s = time.perf_counter() - t0
    agent.write_changing()
    start_s = agent.start()
    out: dict[str, Any] = {"generate_s": round(gen_s, 4), "agent_start_s": round(start_s, 4)}
    out.update(agent.load_bulk(docs))
    out["cold_total_s"] = round(start_s + out["load_s"], 4)
    out.update(agent.endpoint_change())
    out["size"] = agent.memory()
    return out


# ---------------------------------------------------------------- one configuration
def start_direct_server(topo: nb.Topology) -> None:
    p = topo.spawn(
        topo.backends, str(nb.ECHO), "-l", f"0.0.0.0:{DIRECT_PORT}", "-l", f"[::]:{DIRECT_PORT}", "-P", "2"
    )
    deadline = time.monotonic() + 5
    while not all(
        a in topo.ns(topo.backends, "ss", "-Hltn").stdout
        for a in (f"0.0.0.0:{DIRECT_PORT}", f"[::]:{DIRECT_PORT}")
    ):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kp-echo on :{DIRECT_PORT} in {topo.backends} is not listening")
        time.sleep(0.05)


def run_peer(peer: str, n: int, st: Settings, family: int = 4) -> dict[str, Any]:
    fam = nb.FAMILIES[family]
    services = nb.bench_services(n, st.endpoints, family)
    node = fam.node
    t0 = time.perf_counter()
    with nb.Topology() as topo:
        topo.start_servers()
        start_direct_server(topo)
        if peer == "kproxy":
            with KproxyAgent(topo, services, st.agent_args, fam) as agent:
                res: dict[str, Any] = {"program": program_kproxy(agent)}
                before = _stats(str(agent.bpffs))
                res.update(measure_paths(topo, st, service=True, fam=fam))
                res["program"]["size"].update(agent.memory())  # RSS after the traffic too
                after = _stats(str(agent.bpffs))
                res["stats_delta"] = {
                    k: v - before.get("n1", {}).get(k, 0)
                    for k, v in after.get("n1", {}).items()
                    if v - before.get("n1", {}).get(k, 0)
                }
        elif peer == "none":
            res = measure_paths(topo, st, service=False, fam=fam)
        else:
            res = {"program": nb.program_peer(topo, peer, services, node)}
            res.update(measure_paths(topo, st, service=True, fam=fam))
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


EXT_PORT, EXT_NODEPORT, EXT_VIP = 8081, 30081, "10.96.0.80"
EXT_VIP6 = "fd00:10:96::80"
EXT_MODES = (("snat", None), ("dsr-opt", "opt"), ("dsr-ipip", "ipip"))


def external_support() -> str | None:
    """None when the build has what the NodePort snat/DSR speed bench needs, else the reason."""
    try:
        import click

        from kproxy import abi
        from kproxy.cli import main as cli
    except Exception as e:  # a tree in the middle of a change
        return f"kproxy does not import: {e}"
    if not hasattr(abi, "DsrMode") or not hasattr(abi, "Snat4Key"):
        return "kproxy.abi has no DsrMode/Snat4Key (SNAT/DSR not in this build)"
    # kproxy.cli is a lazy group: its commands are listed, not held in `commands`, until they run
    commands = set(getattr(cli, "commands", {})) | set(cli.list_commands(click.Context(cli)))
    if "dsr" not in commands:
        return "`kproxy dsr` is not in the CLI yet, so DSR modes cannot be switched"
    return None


def _kproxy_cli(*args: str) -> str:
    return nb.run([sys.executable, "-m", "kproxy", *args], cwd=nb.ROOT).stdout


def _stats(*bpffs: str) -> dict[str, dict[str, int]]:
    """Packet counters per node (n1, n2, ...) from `kproxy stats -o json`; empty when unreadable."""
    out: dict[str, dict[str, int]] = {}
    for i, d in enumerate(bpffs, 1):
        with contextlib.suppress(RuntimeError, ValueError, TypeError, KeyError):
            rows = json.loads(_kproxy_cli("stats", "-o", "json", "--bpffs", d))
            out[f"n{i}"] = {f"{r['kind']}:{r['counter']}": int(r["packets"]) for r in rows}
    return out


def run_external(st: Settings) -> dict[str, Any]:
    """Short external connections to a NodePort of node 1 whose backend is on node 2, in snat and both
    DSR modes, beside the same client connecting to the backend pod directly (no NAT), for each family
    of st.families: a dual-stack Service, the IPv6 rows over n1's IPv6 address (IPv6 SNAT, DSR with a
    destination options header or IPv6-in-IPv6) and the IPv6 baseline to the pod's IPv6 address via n1.
    Each mode row is checked against n1's counters of its family (bench_external.path_check)."""
    reason = external_support()
    if reason:
        return {"skipped": reason}
    from bench import bench_external as bx
    from kproxy.bpf.maps import KproxyMaps
    from kproxy.lab import manifests as mf
    from kproxy.lab.cluster import Lab
    from kproxy.lab.netns import ip, netns_path, sysctl

    out: dict[str, Any] = {"topology": "ext -> n1 NodePort -> backend pod on n2 (2-node lab)", "families": {}}
    with Lab(nodes=2, pods_per_node=1) as lab:
        n1, n2 = lab.node("n1"), lab.node("n2")
        backend = lab.pods_on("n2")[0]
        lab._spawn(
            f"echo/{backend.name}", backend.ns,
            [str(nb.ECHO), "-l", f"0.0.0.0:{EXT_PORT}", "-l", f"[::]:{EXT_PORT}", "-P", "2"],
            lab.dir / "logs" / "kp-echo.log",
        )  # fmt: skip
        ext = lab.ext
        sysctl(ext.ns, "net.ipv4.ip_local_port_range", "1024 65535")  # IPv6 sockets use it too
        port = mf.Port("http", 80, EXT_PORT, node_port=EXT_NODEPORT)
        lab.write_manifest(
            "speed",
            [
                mf.service("speed", [port], EXT_VIP, type="NodePort", cluster_ip6=EXT_VIP6),
                *mf.endpoint_slices("speed", [(backend.ip, n2.name), (backend.ip6, n2.name)], [port]),
            ],
        )
        fam_addrs = {4: (n1.ip, backend.ip), 6: (n1.ip6, backend.ip6)}
        for f in st.families:
            node_addr, be_addr = fam_addrs[f]
            lab.wait_programmed(node_addr, EXT_NODEPORT, {be_addr}, nodes=[n1.name], timeout=30)

        def load(addr: str, port: int) -> dict[str, Any]:
            before = nb.cpu_times()
            res = json.loads(
                nb.run(
                    ["nsenter", f"--net={netns_path(ext.ns)}", str(nb.LOADGEN), "-a", addr, "-p", str(port),
                     "-c", str(st.concurrency), "-d", str(st.duration), "-w", str(st.warmup), "-i",
                     *(["-n", str(st.connections)] if st.connections else [])]
                ).stdout
            )  # fmt: skip
            cpu = nb._cpu_delta(before, nb.cpu_times())
            replies = res.pop("replies", {}) or {}
            res["backends_reached"] = sorted({r.rpartition(":")[0].strip("[]") for r in replies})
            if res["connections"]:
                res["cpu_us_per_conn"] = round((cpu["system"] + cpu["softirq"]) * 1e6 / res["connections"], 1)
            return res

        for f in st.families:
            label = nb.FAMILIES[f].label
            node_addr, be_addr = fam_addrs[f]
            fam_out: dict[str, Any] = {"node": node_addr, "backend": be_addr}
            out["families"][label] = fam_out
            # the baseline's direct path: ext -> n1 -> n2 -> pod, added for this family and removed after it
            route = (["-6"] if f == 6 else []) + ["route", "add", n2.pod_cidr6 if f == 6 else n2.pod_cidr]
            route += ["via", n1.ip6 if f == 6 else n1.ip]
            ip(ext.ns, *route)
            try:
                fam_out["baseline"] = load(be_addr, EXT_PORT)
            except RuntimeError as e:
                fam_out["baseline"] = {"failed": str(e)}
            finally:
                ip(ext.ns, *[("del" if a == "add" else a) for a in route])
            for mlabel, mode in EXT_MODES:
                for node in (n1, n2):
                    if mode:
                        _kproxy_cli("dsr", "enable", "--mode", mode, "--bpffs", node.bpffs)
                    else:
                        _kproxy_cli("dsr", "disable", "--bpffs", node.bpffs)
                    # Flows keep the mode they began with: start each mode from empty conntrack and
                    # SNAT tables (`kproxy nat` has no --flush; the previous mode's SNAT ports would
                    # still be held).
                    _kproxy_cli("conntrack", "--flush", "--bpffs", node.bpffs)
                    with KproxyMaps.open(node.bpffs) as maps:
                        for name in ("snat4", "snat6"):
                            if getattr(maps, name, None) is not None:
                                getattr(maps, name).clear()
                before = _stats(n1.bpffs, n2.bpffs)
                before_fam = bx.kp_stats(n1.bpffs)
                try:
                    fam_out[mlabel] = load(node_addr, EXT_NODEPORT)
                except RuntimeError as e:
                    fam_out[mlabel] = {"failed": str(e)}
                # What the datapath did in this mode (decisions and drops by reason per node), for diagnosis.
                after = _stats(n1.bpffs, n2.bpffs)
                moved = bx.family_delta(bx.kp_stats(n1.bpffs), before_fam)
                fam_out[mlabel]["n1_by_family"] = moved
                check = bx.path_check(mode or "snat", label, moved)
                reached = fam_out[mlabel].get("backends_reached")
                if reached is not None and reached != [be_addr]:
                    check.append(f"replies from {reached}, expected only {be_addr}")
                fam_out[mlabel]["path_check"] = check
                fam_out[mlabel]["stats_delta"] = {
                    node: {
                        k: v - before.get(node, {}).get(k, 0)
                        for k, v in c.items()
                        if v - before.get(node, {}).get(k, 0)
                    }
                    for node, c in after.items()
                }
    return out


def run_all(st: Settings, out_dir: Path, external: bool) -> dict[str, Any]:
    nb.ensure_tools()
    started = dt.datetime.now(dt.UTC)
    labels = {f: nb.FAMILIES[f].label for f in st.families}
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "settings": {k: v for k, v in dataclasses.asdict(st).items()},
        "machine": {"kernel": os.uname().release, "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "iptables_backend": {labels[f]: nb.FAMILIES[f].iptables_restore for f in st.families},
        # per family ("IPv4", "IPv6"): the no-rule baseline (start and end of the run) and the peers per N
        "families": {labels[f]: {"baseline": {}, "baseline_runs": [], "runs": {}} for f in st.families},
    }
    t0 = time.perf_counter()
    fams = result["families"]
    for f in st.families:
        log(f"baseline {labels[f]}: no rules, client -> backend directly")
        fams[labels[f]]["baseline"] = run_peer("none", 0, st, f)
        fams[labels[f]]["baseline_runs"].append(fams[labels[f]]["baseline"])
    for n in st.services:
        for f in st.families:
            runs = fams[labels[f]]["runs"][str(n)] = {}
            for peer in st.peers:
                log(f"{peer} {labels[f]}: {n} Services x {st.endpoints} endpoints")
                runs[peer] = run_peer(peer, n, st, f)
                save(result, out_dir, partial=True)
    for f in st.families:
        log(f"baseline {labels[f]} again (drift over the run)")
        fams[labels[f]]["baseline_runs"].append(run_peer("none", 0, st, f))
    if external:
        log("external: NodePort snat / DSR opt / DSR ipip against the no-NAT baseline, per family")
        try:
            result["external"] = run_external(st)
        except Exception as e:  # the other results stay valid
            result["external"] = {"failed": f"{type(e).__name__}: {e}"}
        if "skipped" in result["external"] or "failed" in result["external"]:
            log(f"--external not measured: {result['external']}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


# ---------------------------------------------------------------- output
def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


# (label, path inside a peer's result, unit, higher is better, format)
METRICS: list[tuple[str, tuple[str, ...], str, bool, str]] = [
    ("conn/s via ClusterIP", ("service", "short_conns", "rate"), "/s", True, "{:,.0f}"),
    ("p50 via ClusterIP", ("service", "short_conns", "p50_us"), "µs", False, "{:,.0f}"),
    ("p99 via ClusterIP", ("service", "short_conns", "p99_us"), "µs", False, "{:,.0f}"),
    ("conn/s direct, rules loaded", ("direct", "short_conns", "rate"), "/s", True, "{:,.0f}"),
    ("p99 direct, rules loaded", ("direct", "short_conns", "p99_us"), "µs", False, "{:,.0f}"),
    ("CPU per conn via ClusterIP", ("service", "short_conns", "cpu_us_per_conn"), "µs", False, "{:,.1f}"),
    ("iperf3 -b 2G via ClusterIP", ("service", "iperf", "2G", "gbit_s"), "Gbit/s", True, "{:.2f}"),
    ("CPU per GB at 2G", ("service", "iperf", "2G", "cpu_s_per_gb"), "s/GB", False, "{:.3f}"),
    ("iperf3 unlimited via ClusterIP", ("service", "iperf", "unlimited", "gbit_s"), "Gbit/s", True, "{:.2f}"),
    ("retransmits unlimited", ("service", "iperf", "unlimited", "retransmits"), "", False, "{:,}"),
    ("CPU per GB unlimited", ("service", "iperf", "unlimited", "cpu_s_per_gb"), "s/GB", False, "{:.3f}"),
    ("program from cold", ("program", "load_s"), "s", False, "{:.3f}"),
    ("one endpoint change", ("program", "endpoint_update_s"), "s", False, "{:.4f}"),
]


def _fmt(v: Any, f: str) -> str:
    if v is None:
        return "–"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def _ratio(k: Any, p: Any, higher: bool) -> str:
    if not isinstance(k, int | float) or not isinstance(p, int | float) or not k or not p:
        return "–"
    r = k / p if higher else p / k
    return f"{r:.2f}×"


def _size(peer: str, r: dict[str, Any]) -> str:
    size = _get(r, "program", "size") or {}
    if peer == "kproxy":
        return f"agent RSS {size.get('agent_rss_mb')} MB (peak {size.get('agent_peak_rss_mb')})"
    if peer == "iptables":
        return f"{size.get('rules', 0):,} rules, {size.get('bytes', 0) / 1e6:.2f} MB"
    return f"{size.get('lines', 0):,} lines, {size.get('bytes', 0) / 1e6:.2f} MB"


# The ratios the summary gives for both families: (column label, metric label in METRICS).
SUMMARY = [
    ("conn/s via ClusterIP", "conn/s via ClusterIP"),
    ("p99 via ClusterIP", "p99 via ClusterIP"),
    ("CPU/conn via ClusterIP", "CPU per conn via ClusterIP"),
    ("program from cold", "program from cold"),
    ("one endpoint change", "one endpoint change"),
]


def _metric(label: str) -> tuple[str, tuple[str, ...], str, bool, str]:
    return next(m for m in METRICS if m[0] == label)


def _baseline_value(base: dict[str, Any], path: tuple[str, ...]) -> Any:
    if path[0] == "service":
        return _get(base, "direct", *path[1:])
    if path[0] == "direct":
        return _get(base, *path)
    return None


def _baseline_line(base: dict[str, Any], again: list[dict[str, Any]]) -> str:
    line = (
        "Baseline without any rule (client → backend IP): "
        f"{_fmt(_get(base, 'direct', 'short_conns', 'rate'), '{:,.0f}')} conn/s, "
        f"p50 {_fmt(_get(base, 'direct', 'short_conns', 'p50_us'), '{:,.0f}')} µs, "
        f"p99 {_fmt(_get(base, 'direct', 'short_conns', 'p99_us'), '{:,.0f}')} µs; iperf3 "
        f"{_fmt(_get(base, 'direct', 'iperf', '2G', 'gbit_s'), '{:.2f}')} Gbit/s at -b 2G "
        f"({_fmt(_get(base, 'direct', 'iperf', '2G', 'cpu_s_per_gb'), '{:.3f}')} s CPU/GB), "
        f"{_fmt(_get(base, 'direct', 'iperf', 'unlimited', 'gbit_s'), '{:.2f}')} Gbit/s unlimited "
        f"({_fmt(_get(base, 'direct', 'iperf', 'unlimited', 'cpu_s_per_gb'), '{:.3f}')} s CPU/GB)."
    )
    if again:
        b2 = again[-1]
        line += (
            " Again at the end of the run: "
            f"{_fmt(_get(b2, 'direct', 'short_conns', 'rate'), '{:,.0f}')} conn/s, "
            f"p99 {_fmt(_get(b2, 'direct', 'short_conns', 'p99_us'), '{:,.0f}')} µs, "
            f"{_fmt(_get(b2, 'direct', 'iperf', 'unlimited', 'gbit_s'), '{:.2f}')} Gbit/s unlimited "
            "(the spread between the two is the noise floor of this machine)."
        )
    return line


def _summary(result: dict[str, Any]) -> list[str]:
    """kproxy's advantage per family and N, on the metrics that matter most, in one table."""
    fams = result["families"]
    rows = []
    for n in sorted({n for fr in fams.values() for n in fr["runs"]}, key=int):
        for label, fr in fams.items():
            peers = fr["runs"].get(n, {})
            if "kproxy" not in peers:
                continue
            row = [f"{int(n):,}", label]
            for _, metric in SUMMARY:
                _, path, _, higher, _ = _metric(metric)
                k = _get(peers["kproxy"], *path)
                cells = [_ratio(k, _get(peers.get(p), *path), higher) for p in ("iptables", "nftables")]
                if path[0] in ("service", "direct"):
                    cells.append(_ratio(k, _baseline_value(fr["baseline"], path), higher))
                row.append(" / ".join(cells))
            rows.append("| " + " | ".join(row) + " |")
    if not rows:
        return []
    head = ["Services", "family"] + [
        f"{label} (vs ipt / nft{' / base' if _metric(m)[1][0] in ('service', 'direct') else ''})"
        for label, m in SUMMARY
    ]
    return [
        "## Both families at a glance: kproxy's advantage",
        "",
        "kproxy ÷ peer for rates, peer ÷ kproxy for times, latencies and CPU (> 1 = kproxy better) against "
        "the iptables (ip6tables for IPv6) peer, the nftables (`table ip` / `table ip6`) peer and the "
        "no-NAT baseline of the same family; the tables below have the raw values.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *rows,
        "",
    ]


def _family_tables(result: dict[str, Any], label: str, fr: dict[str, Any]) -> list[str]:
    base = fr["baseline"]
    lines: list[str] = []
    for n, peers in fr["runs"].items():
        lines += [f"## {int(n):,} Services × {result['settings']['endpoints']} endpoints, {label}", ""]
        cols = [p for p in PEERS if p in peers]
        head = ["metric", *cols, "baseline (no rules)"]
        if "kproxy" in peers:
            head += [f"vs {p}" for p in cols if p != "kproxy"] + ["vs baseline"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for mlabel, path, unit, higher, f in METRICS:
            vals = {p: _get(peers[p], *path) for p in cols}
            bval = _baseline_value(base, path)
            row = [f"{mlabel} ({unit})" if unit else mlabel, *[_fmt(vals[p], f) for p in cols], _fmt(bval, f)]
            if "kproxy" in peers:
                row += [_ratio(vals["kproxy"], vals[p], higher) for p in cols if p != "kproxy"]
                row.append(_ratio(vals["kproxy"], bval, higher) if bval is not None else "–")
            lines.append("| " + " | ".join(row) + " |")
        sizes = [f"{p}: {_size(p, peers[p])}" for p in cols]
        lines += ["", "Memory / rule-set size: " + "; ".join(sizes) + "."]
        k = peers.get("kproxy", {}).get("program", {})
        if k:
            v = "6" if label == "IPv6" else "4"
            lines.append(
                f"kproxy details: program from cold = the N Services' manifests written into the running "
                f"agent's directory until the maps hold them all (includes the file source noticing them "
                f"— inotify, or a 200 ms poll without it — and parsing; the agent's own sync took "
                f"{k.get('load_sync_ms')} ms in "
                f"{k.get('load_sync_batches')} batch(es)); starting the agent itself (Python, BPF load, "
                f"attach, first sync) took {_fmt(k.get('agent_start_s'), '{:.2f}')} s, so "
                f"{_fmt(k.get('cold_total_s'), '{:.2f}')} s from nothing. Endpoint change = the Service's "
                f"manifest rewritten until the map reflects it (same path); the agent's "
                f"apply alone took {k.get('endpoint_update_apply_ms')} ms. kp_svc{v}_v1 entries "
                f"{k.get(f'svc{v}_entries')} (expected {k.get(f'svc{v}_entries_expected')})."
            )
        lines.append("")
    return lines


def _external_tables(ext: dict[str, Any], concurrency: Any) -> list[str]:
    """The --external section: one table per family (runs from before IPv6 hold one flat IPv4 table),
    then the ratios to the no-NAT baseline of both families side by side."""
    lines = ["## NodePort from outside, backend on the other node (snat / DSR), per family", ""]
    if "skipped" in ext or "failed" in ext:
        return [*lines, f"Not measured: {ext.get('skipped') or ext.get('failed')}", ""]
    fams: dict[str, Any] = ext.get("families") or {"IPv4": ext}
    lines += [
        f"{ext['topology']}; short connections at concurrency {concurrency}. Ratio = mode / baseline for "
        "the rate, baseline / mode for latency (1 = no cost), against the baseline of the same family "
        "(the client to the pod address via n1, no NAT). Path check: n1's counter of the mode "
        "(snat_new / dsr_opt_tx / dsr_ipip_tx) moved in the row's family and not in the other.",
        "",
    ]
    modes = ("baseline", *(m for m, _ in EXT_MODES))
    for label, fr in fams.items():
        lines += [
            f"### {label}" + (f": {fr['node']} → {fr['backend']}" if "node" in fr else ""),
            "",
            "| path | conn/s | p50 (µs) | p99 (µs) | errors | CPU/conn (µs) | rate vs baseline "
            "| p99 vs baseline | path check |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        b = fr.get("baseline", {})
        for m in modes:
            r = fr.get(m, {})
            if "failed" in r:
                lines.append(f"| {m} | failed: {r['failed'][:120]} | | | | | | | |")
                continue
            if m == "baseline":
                check = ""
            elif "path_check" not in r:
                check = "-"
            else:
                check = "; ".join(r["path_check"]) or "ok"
            lines.append(
                f"| {m} | {_fmt(r.get('rate'), '{:,.0f}')} | {_fmt(r.get('p50_us'), '{:,.0f}')} | "
                f"{_fmt(r.get('p99_us'), '{:,.0f}')} | {_fmt(r.get('errors'), '{:,}')} | "
                f"{_fmt(r.get('cpu_us_per_conn'), '{:.1f}')} | "
                f"{_ratio(r.get('rate'), b.get('rate'), True)} | "
                f"{_ratio(r.get('p99_us'), b.get('p99_us'), False)} | {check} |"
            )
        lines.append("")
    if len(fams) > 1:
        labels = list(fams)
        lines += [
            "NodePort from outside, both families: rate vs the same family's baseline (p99 vs baseline)",
            "",
            "| path | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for m in modes[1:]:
            cells = []
            for label in labels:
                r, b = fams[label].get(m, {}), fams[label].get("baseline", {})
                cells.append(
                    f"{_ratio(r.get('rate'), b.get('rate'), True)} "
                    f"({_ratio(r.get('p99_us'), b.get('p99_us'), False)})"
                )
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(result: dict[str, Any]) -> str:
    fams = result["families"]
    backends = ", ".join(f"{label} via {tool}" for label, tool in result["iptables_backend"].items())
    lines = [
        f"# kproxy benchmark — {result['started']}",
        "",
        f"Kernel {result['machine']['kernel']}, {result['machine']['cpus']} CPUs, load average at start "
        f"{', '.join(f'{x:.2f}' for x in result['machine']['loadavg'])}; iptables peer {backends}. "
        "Ratios are **kproxy's advantage**: peer/kproxy for times, kproxy/peer for rates, so > 1 means "
        "kproxy is better.",
        "",
    ]
    for label, fr in fams.items():
        lines += [f"{label}: " + _baseline_line(fr["baseline"], fr.get("baseline_runs", [])[1:]), ""]
    lines += _summary(result)
    for label, fr in fams.items():
        lines += _family_tables(result, label, fr)
    ext = result.get("external")
    if ext is not None:
        lines += _external_tables(ext, result["settings"]["concurrency"])
    lines.append(f"Total wall time {result.get('wall_s')} s.")
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = result["families"]
    ns = sorted({int(n) for fr in fams.values() for n in fr["runs"]})
    xs = [max(n, 1) for n in ns]
    colours = {"kproxy": "tab:green", "iptables": "tab:red", "nftables": "tab:blue"}
    # IPv4 solid with circles, IPv6 dash-dot with triangles
    styles = {"IPv4": ("o", "-"), "IPv6": ("^", "-.")}
    written = []

    def series(fr: dict[str, Any], peer: str, *path: str) -> list[Any]:
        return [_get(fr["runs"].get(str(n), {}).get(peer), *path) for n in ns]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, q in zip(axes, ("p50_us", "p99_us"), strict=True):
        for label, fr in fams.items():
            marker, line = styles.get(label, ("o", "-"))
            for peer in PEERS:
                ys = series(fr, peer, "service", "short_conns", q)
                if any(y is not None for y in ys):
                    ax.plot(xs, ys, marker + line, label=f"{peer} {label} via ClusterIP", color=colours[peer])
                if label == "IPv4":
                    yd = series(fr, peer, "direct", "short_conns", q)
                    if any(y is not None for y in yd):
                        ax.plot(
                            xs,
                            yd,
                            "x:",
                            label=f"{peer} {label} rules, direct",
                            color=colours[peer],
                            alpha=0.6,
                        )
            b = _get(fr["baseline"], "direct", "short_conns", q)
            if b is not None:
                ax.axhline(
                    b, color="grey", linestyle="--" if label == "IPv4" else ":", label=f"baseline {label}"
                )
        ax.set_xscale("log")
        ax.set_xlabel("Services")
        ax.set_ylabel(f"{q.split('_')[0]} connection latency (µs)")
        ax.set_title(f"New-connection latency {q.split('_')[0]}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, fr in fams.items():
        marker, line = styles.get(label, ("o", "-"))
        for peer in PEERS:
            for key, style, what in (
                ("load_s", marker + line, "all Services from cold"),
                ("endpoint_update_s", "s" + ("--" if label == "IPv4" else ":"), "one endpoint change"),
            ):
                ys = series(fr, peer, "program", key)
                if any(y is not None for y in ys):
                    ax.plot(xs, ys, style, label=f"{peer} {label}: {what}", color=colours[peer])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Services")
    ax.set_ylabel("seconds")
    ax.set_title("Control plane: time to program")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "control-plane.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def save(result: dict[str, Any], out_dir: Path, partial: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"
    if partial:
        (out_dir / "partial.json.tmp").write_text(text)
        return
    stamp = result["started"].replace(":", "").replace("-", "")
    (out_dir / f"run-{stamp}.json").write_text(text)
    (out_dir / "latest.json").write_text(text)
    (out_dir / "results.md").write_text(markdown(result))
    (out_dir / "partial.json.tmp").unlink(missing_ok=True)
    try:
        plots(result, out_dir)
    except ImportError as e:
        log(f"no plots: {e} (pip install matplotlib, in the dev extras)")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="N = 1, 1000; 5 s + 2 x 3 s iperf3 per path (default)"
    )
    mode.add_argument("--full", action="store_true", help="N = 1, 1000, 10000; 10 s + 2 x 5 s per path")
    ap.add_argument("--services", type=int, nargs="+", help="override the list of N")
    ap.add_argument("--peers", nargs="+", choices=PEERS, help="only these peers (default: all)")
    ap.add_argument(
        "--families",
        nargs="+",
        type=int,
        choices=FAMILY_CHOICES,
        help="address families to measure: 4, 6 or both (default: both)",
    )
    ap.add_argument("--duration", type=float, help="seconds of short connections per path")
    ap.add_argument(
        "--connections",
        type=int,
        default=0,
        help="end a path's short connections after this many, if before --duration [0: --duration alone]",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        help="seconds of connections not recorded before each path's [0.5, at most a quarter of --duration]",
    )
    ap.add_argument("--iperf-seconds", type=float, help="seconds per iperf3 run (0 skips iperf3)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--direct-after-service",
        action="store_true",
        help="measure the direct path again right after the Service path (client-port re-use check)",
    )
    ap.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `kproxy agent` (repeat; e.g. --agent-arg=--ct-sweep-interval=60)",
    )
    ap.add_argument(
        "--external", action="store_true", help="also the NodePort snat/DSR speed bench (per family)"
    )
    ap.add_argument("-o", "--output", type=Path, default=RESULTS, help=f"results directory [{RESULTS}]")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.run: needs root (network namespaces, bpffs, iptables)", file=sys.stderr)
        return 2
    if args.full:
        st = Settings(services=[1, 1000, 10000], duration=10.0, iperf_seconds=5.0)
    else:
        st = Settings(services=[1, 1000])
    if args.services:
        st.services = args.services
    if args.peers:
        st.peers = tuple(p for p in PEERS if p in args.peers)
    if args.families:
        st.families = tuple(f for f in FAMILY_CHOICES if f in args.families)
    if args.duration is not None:
        st.duration = args.duration
        st.warmup = min(st.warmup, args.duration / 4)
    if args.warmup is not None:
        st.warmup = args.warmup
    if args.iperf_seconds is not None:
        st.iperf_seconds = args.iperf_seconds
    st.concurrency = args.concurrency
    st.connections = args.connections
    st.direct_after_service = args.direct_after_service
    st.agent_args = tuple(args.agent_arg)
    with _sigterm_as_interrupt():
        result = run_all(st, args.output, args.external)
    save(result, args.output)
    print((args.output / "results.md").read_text())
    log(f"results in {args.output} (latest.json, results.md, latency.png, control-plane.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
