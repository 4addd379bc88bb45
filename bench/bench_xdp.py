"""XDP acceleration (--acceleration native) against TC alone, kube-proxy's nftables layout and no NAT, in
one run: what kp_xdp costs per packet, and what it forwards.

    sudo .venv/bin/python -m bench.bench_xdp [--parts cost,flood] [--runs 100000] [--repeat 1000000]
        [--cost-cases ...] [--duration 3] [--rounds 5] [--flows 256] [--size 18] [--batch 16] [--rate 0]
        [--gen-cpu 0] [--cases "no NAT,kproxy tc,kproxy xdp,nftables"] [--object PATH] [--json]

1. cost: per-packet program cost with BPF_PROG_TEST_RUN. kproxy_tc.bpf.o loaded by kproxy.bpf.loader.Loader
   (maps pinned in a private bpffs mount, kp-bench-xdp-..., unmounted at the end); the runs happen in a
   network namespace of the bench's own (kpxb-<hex>: a veth kpe0 with fixed routes and permanent
   neighbours, as tests/bpf/test_bpf_external.py's FIB lab) because both programs call bpf_fib_lookup.
   Per case the flow is set up through kp_from_netdev (its first packets, as on a node), then the SAME
   frame with the SAME maps goes through kp_from_netdev (TC, an skb) and kp_xdp (XDP, an xdp_buff):

       snat udp        a datagram of an established SNAT flow to a backend on another node (forwarded)
       snat tcp ack    an ACK segment of an established SNAT TCP flow (forwarded)
       dsr ipip udp    a datagram of a DSR IPIP flow (DSR option and IPIP header added, forwarded)
       local dnat udp  a datagram of a flow to a backend on this node (DNAT, then the stack: both pass)
       not a service   a datagram to a node port nobody serves (both pass it untouched)

   A flow's first packet (kp_xdp opens the flow itself, in kp_xdp_new) is timed apart, each run on a
   frame of its own flow (client address and port new every run, --new-runs of them per program):

       new snat udp        a flow's first datagram to a backend on another node (SNAT port, forwarded)
       new snat tcp syn    a SYN (its timestamp option read for the SNAT port's TIME_WAIT rules)
       new dsr ipip syn    a SYN in DSR IPIP mode (DSR option and IPIP header added, forwarded)
       new local udp       a flow's first datagram to a backend on this node (DNAT, then the stack)

   Before timing, one run of each must give the expected verdicts and, where both translate, the same
   output bytes. The number is the median of --runs single runs (repeat=1: the kernel's duration of that
   one run), interleaved in batches with the other programs of the case, minus the median of a no-op
   program of the same hook (r0 = TC_ACT_OK or XDP_PASS; exit) measured the same way: the program alone.
   Why single runs and not one run with repeat=N: the kernel runs every repetition on the same buffer,
   which the first one rewrote (addresses, TTL, headers): repetitions 2..N see the translated frame, which
   is no Service's, and cost what a pass costs. The bench shows that too: it also runs each program with
   --repeat in one call and prints the result only where every repetition did the case's work (the
   case's counter moved by --repeat), which is only so for the frame both programs pass untouched.
   What each number includes: the program and its helpers (map lookups, bpf_fib_lookup, checksum and
   header helpers on the skb side; direct writes and bpf_xdp_adjust_head on the XDP side), and for the
   raw numbers the test harness's own time (clock reads, bottom halves off and on: the no-op's number).
   Not included on either side: the kernel copies the frame and builds the skb or xdp_buff before the
   clock starts, and a verdict is only returned (no redirect, no XDP_TX, no neighbour output). So the
   skb that XDP saves on a real NIC is not in these numbers; part 2 measures the path with it. The
   "XDP node" column is what a packet costs in programs on a node with acceleration: kp_xdp alone when
   it forwards, kp_xdp plus kp_from_netdev on what kp_xdp passed on when it passes.

2. flood: packets per second through the lab's external path (kproxy.lab: 4 nodes on a bridge, an
   external client). One Service, a UDP NodePort whose backend is a UDP sink (`kp-echo -u`, counting
   datagrams) in pod n2p1. kp-loadgen -U sends --size-byte datagrams from --flows source ports on ext,
   round-robin, for --duration seconds, open loop (as fast as it can, or --rate datagrams/s). Cases, each
   NAT path on a node of its own:

       no NAT       the client straight to the pod's address, routed ext -> n1 -> n2 -> pod (n1 runs
                    kproxy TC; the datagrams are no Service's). ext takes no ICMP redirects: n1 forwards
                    out of the interface the packet came in by and would tell ext to bypass it.
       kproxy tc    ext -> n1:NodePort, kproxy --acceleration off (kp_from_netdev SNATs, bpf_redirect_neigh)
       kproxy xdp   ext -> n3:NodePort, kproxy --acceleration native (kp_xdp SNATs, XDP_TX)
       nftables     ext -> n4:NodePort, kube-proxy's nftables layout (bench/peers, as bench_external does
                    it): DNAT and masquerade through nf_conntrack

   n2 (the backend's node) runs kproxy with acceleration off. The lab is made with xdp_lan=True for every
   node alike (what a veth needs for XDP_TX, see kproxy.lab.cluster._lan_port: an XDP_PASS program on the
   bridge side of each node's veth, TX checksumming off): without it every datagram kp_xdp sends is
   dropped (the peer veth takes no XDP frames). Every round runs every case once, each round starting one
   case later; the flows keep their source ports (--sport) across rounds, so after the first round every
   flow is established on every path. Per run: datagrams sent (what the kernel took from kp-loadgen),
   received (the sink's count), lost (sent - received, and where: the drop counters that moved on the
   interfaces of ext, the LAN, the NAT node, n2 and the pod; the sink socket's RcvbufErrors), the NAT
   node's counters (kproxy: from_netdev, from_xdp, xdp_fwd, snat, snat_new, dnat; nftables:
   nf_conntrack's drops), and the CPU time per CPU during the run. Path checks: the NAT node's eth0
   received at least what the backend got; no NAT: n1's kp_from_netdev saw every datagram and SNATed
   none; kproxy tc: no XDP ran on n1, snat >= received; kproxy xdp: xdp_fwd >= 95 % of snat.
   CPUs: kp-loadgen is pinned to --gen-cpu and the sink to the next CPU. A veth passes a frame to its peer
   within the sender's context, so the send syscalls and all the forwarding they trigger (ext, the bridge,
   the NAT node, n2, the delivery to the sink's socket) run on the generator's CPU, mostly in softirq:
   that CPU is the bottleneck, the rate is 1 / (the whole path's CPU cost per datagram), nothing queues and
   nothing is dropped. ns/dgram = that CPU's busy time per received datagram; minus no NAT's, it is what a
   NAT path costs more than a node's plain forwarding. The other CPU runs the sink and whatever else runs
   on the VM (its busy share is printed: other work there also takes turns on the generator's CPU).
   And: the lab's veths run "native" XDP on frames that already are skbs (the bridge made them), and
   XDP_TX hands an xdp_frame to the peer veth, which makes an skb of it again; a NIC driver runs XDP
   before any skb exists. So the skb allocation XDP saves on real hardware is not saved here.

Prints the numbers of both parts and their ratios (XDP / TC; rates against no NAT and nftables); --json
prints one JSON object instead. Asserts nothing. The default run takes about 80 s on the 2-core VM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import functools
import ipaddress
import json
import os
import secrets
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import result_header, run_and_print

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench/loadgen/kp-loadgen"
ECHO = ROOT / "bench/loadgen/kp-echo"
PARTS = ("cost", "flood")
BPFFS_PREFIX = "kp-bench-xdp-"

# ---- part 1: BPF_PROG_TEST_RUN ----
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
TC_VERDICTS = {0: "OK", 2: "SHOT", 7: "REDIRECT"}
XDP_VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6
# The FIB namespace (as tests/bpf/test_bpf_external.py's): kpe0 is this node's LAN side.
NODE, NODE2, GW = "192.168.1.10", "192.168.1.20", "192.168.1.1"
NODE2_MAC, GW_MAC = "02:00:00:00:00:20", "02:00:00:00:00:01"
CLIENT, CPORT, NODEPORT, OTHER_PORT = "203.0.113.9", 40000, 30080, 30999
REMOTE_BE = (1, "10.244.2.7", 8080)  # id, address, port: a pod on NODE2
LOCAL_BE = (2, "10.244.1.9", 8080)  # a pod on this node
PAYLOAD = bytes(18)  # 60-byte frames, as part 2's datagrams


@dataclasses.dataclass(frozen=True)
class CostCase:
    key: str
    proto: str  # "udp" | "tcp"
    dsr: int  # abi.DsrMode
    backend: tuple[int, str, int]  # of the NodePort Service NODE:NODEPORT
    local: bool
    tc_verdict: int
    xdp_verdict: int
    work: str  # the counter one packet of the case moves in both programs (abi.Stat name); "" none
    dport: int = NODEPORT  # the frame's destination port (OTHER_PORT: no Service's)

    @property
    def untouched(self) -> bool:
        """Both programs pass the frame as it is."""
        return self.dport != NODEPORT


COST_CASES = (
    CostCase("snat udp", "udp", 0, REMOTE_BE, False, TC_ACT_REDIRECT, XDP_TX, "SNAT"),
    CostCase("snat tcp ack", "tcp", 0, REMOTE_BE, False, TC_ACT_REDIRECT, XDP_TX, "SNAT"),
    CostCase("dsr ipip udp", "udp", 2, REMOTE_BE, False, TC_ACT_REDIRECT, XDP_TX, "DSR_IPIP_TX"),
    CostCase("local dnat udp", "udp", 0, LOCAL_BE, True, TC_ACT_OK, XDP_PASS, "DNAT"),
    CostCase("not a service", "udp", 0, REMOTE_BE, False, TC_ACT_OK, XDP_PASS, "", OTHER_PORT),
)


@dataclasses.dataclass(frozen=True)
class NewCase:
    """A flow's first packet: every run a new flow (kp_from_netdev's kp_lb_forward, kp_xdp's kp_xdp_new)."""

    key: str
    proto: str  # "udp" | "tcp" (a SYN)
    dsr: int  # abi.DsrMode
    local: bool
    tc_verdict: int
    xdp_verdict: int
    work: str  # the counter each run moves in both programs


NEW_CASES = (
    NewCase("new snat udp", "udp", 0, False, TC_ACT_REDIRECT, XDP_TX, "SNAT_NEW"),
    NewCase("new snat tcp syn", "tcp", 0, False, TC_ACT_REDIRECT, XDP_TX, "SNAT_NEW"),
    NewCase("new dsr ipip syn", "tcp", 2, False, TC_ACT_REDIRECT, XDP_TX, "DSR_IPIP_TX"),
    NewCase("new local udp", "udp", 0, True, TC_ACT_OK, XDP_PASS, "DNAT"),
)
NEW_BACKENDS = 8  # remote backends of the new-flow cases: SNAT ports enough for every run's flow

# ---- part 2: the lab ----
SINK_PORT = 7100
NODE_PORT = 31600
CLUSTER_IP = "10.96.61.1"
# (name, via node, kind): kind none = no NAT, kproxy = a kproxy node, peer = kube-proxy's nftables
FLOOD_CASES = (
    ("no NAT", "n1", "none"),
    ("kproxy tc", "n1", "kproxy"),
    ("kproxy xdp", "n3", "kproxy"),
    ("nftables", "n4", "peer"),
)
KP_COUNTERS = ("from_netdev", "from_xdp", "xdp_fwd", "xdp_local", "snat", "snat_new", "dnat")
CT_COUNTERS = ("found", "insert", "insert_failed", "drop", "early_drop", "invalid")
UDP_COUNTERS = ("InDatagrams", "RcvbufErrors", "InErrors", "NoPorts")


def log(msg: str) -> None:
    print(f"[bench_xdp] {msg}", file=sys.stderr, flush=True)


# =====================================================================================================
# 1. per-packet program cost
# =====================================================================================================
@dataclasses.dataclass
class FibNs:
    name: str
    ifindex: int
    mac: bytes


@contextlib.contextmanager
def fib_namespace() -> Iterator[FibNs]:
    """A namespace kpxb-<hex> whose kpe0 (192.168.1.10/24, its veth peer kpe1) routes 10.244.2.0/24 via
    NODE2 and the rest via GW, both permanent neighbours: bpf_fib_lookup answers at once, on kpe0."""
    from kproxy.lab.netns import add_netns, del_netns, ip

    name = f"kpxb-{secrets.token_hex(3)}"
    add_netns(name)
    try:
        ip(name, "link", "add", "kpe0", "type", "veth", "peer", "name", "kpe1")
        for dev in ("kpe0", "kpe1"):
            ip(name, "link", "set", dev, "up")
        ip(name, "addr", "add", f"{NODE}/24", "dev", "kpe0")
        for addr, mac in ((GW, GW_MAC), (NODE2, NODE2_MAC)):
            ip(name, "neigh", "replace", addr, "lladdr", mac, "dev", "kpe0", "nud", "permanent")
        ip(name, "route", "add", "default", "via", GW)
        ip(name, "route", "add", "10.244.2.0/24", "via", NODE2)
        ip(name, "route", "add", "10.244.1.0/24", "dev", "kpe0")  # this node's pods (the local case)
        ip(
            name,
            "neigh",
            "replace",
            LOCAL_BE[1],
            "lladdr",
            "02:00:00:00:01:09",
            "dev",
            "kpe0",
            "nud",
            "permanent",
        )
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"], check=True
        )
        link = json.loads(ip(name, "-j", "link", "show", "kpe0").stdout)[0]
        yield FibNs(name, int(link["ifindex"]), bytes.fromhex(link["address"].replace(":", "")))
    finally:
        del_netns(name)


def noop_program(prog_type: int, retval: int) -> int:
    """A loaded program `r0 = retval; exit` of PROG_TYPE (its fd): the harness's own cost."""
    from kproxy.bpf import libbpf as lb

    insns = bytes.fromhex("b7000000") + retval.to_bytes(4, "little") + bytes.fromhex("9500000000000000")
    fd = int(lb.lib().bpf_prog_load(prog_type, b"kp_bench_noop", b"GPL", insns, len(insns) // 8, None))
    if fd < 0:
        raise OSError(-fd, f"cannot load a no-op program of type {prog_type}: {os.strerror(-fd)}")
    return fd


class Series:
    """One program on one frame, run with BPF_PROG_TEST_RUN from prebuilt arguments (the frame is copied
    in per run; nothing is copied out): per run, the kernel's duration and the verdict."""

    def __init__(self, name: str, hook: str, fd: int, frame: bytes, ctx: bytes) -> None:
        from kproxy.bpf import libbpf as lb

        self.name, self.hook, self.fd, self.frame, self.ctx = name, hook, fd, frame, ctx
        self._data = ctypes.create_string_buffer(frame, len(frame))
        self._ctx = ctypes.create_string_buffer(ctx, len(ctx))
        self._opts = lb._TestRunOpts()  # the binding's struct bpf_test_run_opts
        self._opts.sz = ctypes.sizeof(self._opts)
        self._opts.data_in = ctypes.cast(self._data, ctypes.c_void_p)
        self._opts.data_size_in = len(frame)
        self._opts.ctx_in = ctypes.cast(self._ctx, ctypes.c_void_p)
        self._opts.ctx_size_in = len(ctx)
        self._opts.repeat = 1
        self._call = lb.lib().bpf_prog_test_run_opts
        self.durations: list[int] = []
        self.verdicts: collections.Counter[int] = collections.Counter()

    def run(self, n: int) -> None:
        call, fd, ref, opts = self._call, self.fd, ctypes.byref(self._opts), self._opts
        durations, verdicts = self.durations, self.verdicts
        for _ in range(n):
            err = call(fd, ref)
            if err:
                raise OSError(-err, f"BPF_PROG_TEST_RUN of {self.name}: {os.strerror(-err)}")
            durations.append(opts.duration)
            verdicts[opts.retval] += 1

    def once(self, repeat: int = 1) -> Any:
        from kproxy.bpf import libbpf as lb

        return lb.prog_test_run(self.fd, self.frame, self.ctx, repeat=repeat)

    def summary(self) -> dict[str, Any]:
        d = sorted(self.durations)
        n = len(d)
        return {
            "runs": n,
            "median_ns": d[n // 2] if n else None,
            "p10_ns": d[n // 10] if n else None,
            "p90_ns": d[n * 9 // 10] if n else None,
            "mean_ns": round(statistics.fmean(d), 1) if n else None,
            "verdicts": {str(k): v for k, v in sorted(self.verdicts.items())},
        }


def tc_ctx(ifindex: int) -> bytes:
    ctx = bytearray(192)  # struct __sk_buff: ingress_ifindex at 36, ifindex at 40
    ctx[36:40] = ifindex.to_bytes(4, "little")
    ctx[40:44] = ifindex.to_bytes(4, "little")
    return bytes(ctx)


def xdp_ctx(ifindex: int, frame_len: int) -> bytes:
    # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    return b"".join(v.to_bytes(4, "little") for v in (0, frame_len, 0, ifindex, 0, 0))


class CostNode:
    """The loaded object and its maps: writes a case's Service and config, reads the counters."""

    def __init__(self, maps: Any, fib: FibNs) -> None:
        self.maps, self.fib = maps, fib

    def reset(self, dsr: int) -> None:
        from kproxy import abi

        m = self.maps
        for pm in (m.svc4, m.be4, m.ct4, m.snat4, m.aff4):
            pm.clear()
        m.stats.reset()
        cfg = abi.Config()
        cfg.node_addr = abi.ip_to_nbo(NODE)
        cfg.dsr_mode = dsr
        m.write_config(cfg)
        m.svcnet_span.put(ctypes.c_uint32(0), abi.SvcnetSpan(0xFFFFFFFF, 0))  # no service address space

    def add_nodeport(self, proto: int, backend: tuple[int, str, int], local: bool, extra: int = 0) -> None:
        """The NodePort NODE:NODEPORT with BACKEND, and EXTRA more backends on NODE2 after it."""
        from kproxy import abi

        bid, addr, port = backend
        flags = abi.BackendFlag.LOCAL if local else 0
        node = NODE if local else NODE2
        ids = [bid]
        self.maps.be4.put(
            ctypes.c_uint32(bid),
            abi.Be4Val(abi.ip_to_nbo(addr), abi.port_to_nbo(port), proto, flags, abi.ip_to_nbo(node)),
        )
        for i in range(extra):
            ids.append(bid + 1 + i)
            other = str(ipaddress.IPv4Address(addr) + 1 + i)
            self.maps.be4.put(
                ctypes.c_uint32(ids[-1]),
                abi.Be4Val(abi.ip_to_nbo(other), abi.port_to_nbo(port), proto, 0, abi.ip_to_nbo(NODE2)),
            )
        slots = [(i + 1, abi.Svc4Val(b, 1, 0, 0, 0)) for i, b in enumerate(ids)]
        for slot, val in (
            *slots,
            (0, abi.Svc4Val(0, 1, len(ids), abi.SvcFlag.NODEPORT, 0)),
        ):
            k = abi.Svc4Key()
            k.addr, k.port, k.slot, k.proto, k.scope = (
                abi.ip_to_nbo(NODE), abi.port_to_nbo(NODEPORT), slot, proto, abi.Scope.EXT,
            )  # fmt: skip
            self.maps.svc4.put(k, val)

    def counters(self) -> dict[str, int]:
        from kproxy.abi import Stat

        totals = self.maps.stats.totals()
        return {s.name: (totals.get(int(s)) or (0,))[0] for s in Stat}


def frame_to(src: str, dst: str, l4: bytes, proto: int, dst_mac: bytes, ttl: int = 64) -> bytes:
    from tests.bpf.frames import ether, ipv4

    return ether(ipv4(src, dst, proto, l4, ttl=ttl), dst=dst_mac, src=bytes.fromhex("02bbbbbbbbbb"))


def set_up_case(case: CostCase, node: CostNode, tc: Callable[[bytes], Any]) -> bytes:
    """Program the case's Service and open its flow through kp_from_netdev, as a node would; return the
    frame to time."""
    from tests.bpf.frames import IPPROTO_TCP, IPPROTO_UDP, SYN_OPTIONS, TCP_ACK, TCP_SYN, parse, tcp, udp

    node.reset(case.dsr)
    mac = node.fib.mac
    proto = IPPROTO_TCP if case.proto == "tcp" else IPPROTO_UDP
    node.add_nodeport(proto, case.backend, case.local)
    if case.proto == "udp":
        frame = frame_to(CLIENT, NODE, udp(CLIENT, NODE, CPORT, case.dport, PAYLOAD), IPPROTO_UDP, mac)
        if not case.untouched:
            tc(frame)  # the flow's first datagram: kp_from_netdev opens it
        return frame
    # TCP: SYN (kp_from_netdev: new flow, SNAT port), the backend's SYN-ACK back (ESTABLISHED), then ACKs
    syn = frame_to(
        CLIENT, NODE, tcp(CLIENT, NODE, CPORT, NODEPORT, TCP_SYN, options=SYN_OPTIONS), IPPROTO_TCP, mac
    )
    out = tc(syn)
    snat_port = parse(out.data_out).sport
    _, be_addr, be_port = case.backend
    synack = tcp(
        be_addr, NODE, be_port, snat_port, TCP_SYN | TCP_ACK, seq=5000, ack=1001, options=SYN_OPTIONS
    )
    before = node.counters()["SNAT_REVNAT"]
    tc(frame_to(be_addr, NODE, synack, IPPROTO_TCP, mac, ttl=63))
    if node.counters()["SNAT_REVNAT"] != before + 1:
        raise RuntimeError(
            "snat tcp ack: the backend's SYN-ACK was not translated back (flow not established)"
        )
    ack = tcp(CLIENT, NODE, CPORT, NODEPORT, TCP_ACK, seq=1001, ack=5001)
    return frame_to(CLIENT, NODE, ack, IPPROTO_TCP, mac)


def check_case(case: CostCase, frame: bytes, tc_run: Any, xdp_run: Any) -> list[str]:
    """What is wrong with one run of each program on the case's frame (empty: as expected)."""
    from tests.bpf.frames import checksum_errors

    problems = []
    if tc_run.retval != case.tc_verdict:
        problems.append(f"kp_from_netdev returned {tc_run.retval}, expected {case.tc_verdict}")
    if xdp_run.retval != case.xdp_verdict:
        problems.append(f"kp_xdp returned {xdp_run.retval}, expected {case.xdp_verdict}")
    if case.untouched:
        if xdp_run.data_out != frame:
            problems.append("kp_xdp changed a frame it passes")
    elif xdp_run.data_out != tc_run.data_out:
        problems.append("kp_xdp and kp_from_netdev wrote different frames")
    for who, r in (("kp_from_netdev", tc_run), ("kp_xdp", xdp_run)):
        errs = checksum_errors(r.data_out)
        if errs:
            problems.append(f"{who}: " + "; ".join(errs))
    return problems


def cost_case(
    case: CostCase, node: CostNode, progs: dict[str, int], noops: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    """One case: set up, check once, then the interleaved single runs and the --repeat runs."""
    ifindex = node.fib.ifindex

    def tc(frame: bytes) -> Any:
        return Series("setup", "tc", progs["tc"], frame, tc_ctx(ifindex)).once()

    frame = set_up_case(case, node, tc)
    series = {
        "tc": Series("kp_from_netdev", "tc", progs["tc"], frame, tc_ctx(ifindex)),
        "xdp": Series("kp_xdp", "xdp", progs["xdp"], frame, xdp_ctx(ifindex, len(frame))),
        "tc_noop": Series("tc no-op", "tc", noops["tc"], frame, tc_ctx(ifindex)),
        "xdp_noop": Series("xdp no-op", "xdp", noops["xdp"], frame, xdp_ctx(ifindex, len(frame))),
    }
    xdp_once = series["xdp"].once()
    tc_once = series["tc"].once()
    problems = check_case(case, frame, tc_once, xdp_once)
    if case.xdp_verdict == XDP_PASS:
        # on an accelerated node, what kp_xdp passes on meets kp_from_netdev next
        after = xdp_once.data_out
        series["tc_after_xdp"] = Series(
            "kp_from_netdev after kp_xdp", "tc", progs["tc"], after, tc_ctx(ifindex)
        )
    before = node.counters()
    batch = max(1, min(args.batch_runs, args.runs))
    done = 0
    while done < args.runs:
        n = min(batch, args.runs - done)
        for s in series.values():
            s.run(n)
        done += n
    moved = {k: v - before[k] for k, v in node.counters().items() if v != before[k]}
    runs = args.runs
    # each run of the case's programs did the case's work: the counters say so
    if case.work:
        want = runs * 2  # kp_from_netdev's runs and kp_xdp's both count it
        if moved.get(case.work, 0) != want:
            problems.append(f"{case.work} moved {moved.get(case.work, 0)}, expected {want} (TC + XDP runs)")
    xdp_counter = "" if case.untouched else "XDP_LOCAL" if case.local else "XDP_FWD"
    if xdp_counter and moved.get(xdp_counter, 0) != runs:
        problems.append(f"{xdp_counter} moved {moved.get(xdp_counter, 0)}, expected {runs} (every XDP run)")
    if not xdp_counter and moved.get("XDP_FWD", 0) + moved.get("XDP_LOCAL", 0):
        problems.append("kp_xdp forwarded a frame it should pass")
    for key, want_verdict in (("tc", case.tc_verdict), ("xdp", case.xdp_verdict)):
        other = {v: c for v, c in series[key].verdicts.items() if v != want_verdict}
        if other:
            problems.append(f"{key}: unexpected verdicts {other}")
    res: dict[str, Any] = {
        "case": case.key,
        "frame_bytes": len(frame),
        "tc_verdict": TC_VERDICTS.get(case.tc_verdict, str(case.tc_verdict)),
        "xdp_verdict": XDP_VERDICTS.get(case.xdp_verdict, str(case.xdp_verdict)),
        "same_bytes": not case.untouched and xdp_once.data_out == tc_once.data_out,
        "series": {k: s.summary() for k, s in series.items()},
        "counters_moved": moved,
        "problems": problems,
    }
    med = {k: s.summary()["median_ns"] for k, s in series.items()}
    net = {
        "tc": med["tc"] - med["tc_noop"],
        "xdp": med["xdp"] - med["xdp_noop"],
    }
    if "tc_after_xdp" in med:
        net["tc_after_xdp"] = med["tc_after_xdp"] - med["tc_noop"]
    net["xdp_node"] = net["xdp"] + net.get("tc_after_xdp", 0)
    res["net_ns"] = net
    res["xdp_over_tc"] = round(net["xdp"] / net["tc"], 3) if net["tc"] > 0 else None
    res["xdp_node_over_tc"] = round(net["xdp_node"] / net["tc"], 3) if net["tc"] > 0 else None
    res["repeat"] = repeat_runs(case, node, series, args.repeat) if args.repeat > 1 else {}
    return res


def repeat_runs(case: CostCase, node: CostNode, series: dict[str, Series], repeat: int) -> dict[str, Any]:
    """Each program once with repeat=REPEAT (the kernel's loop): ns per repetition, and how many of the
    repetitions did the case's work. Valid only when all of them did."""
    out: dict[str, Any] = {}
    for key in ("tc", "xdp", "tc_noop", "xdp_noop"):
        s = series[key]
        if key in ("tc", "xdp"):  # kp_from_netdev refreshes the flow (once a second): kp_xdp needs it fresh
            series["tc"].once()
        before = node.counters()
        r = s.once(repeat)
        after = node.counters()
        if key.endswith("noop"):
            worked = repeat
        elif case.untouched:
            entered = "FROM_XDP" if key == "xdp" else "FROM_NETDEV"
            worked = after[entered] - before[entered] if r.data_out == s.frame else 0
        else:
            worked = after[case.work] - before[case.work]
        out[key] = {
            "ns": r.duration_ns,
            "worked": worked,
            "valid": worked == repeat,
            "last_verdict": r.retval,
        }
    return out


def new_flow_frames(case: NewCase, first: int, n: int, mac: bytes) -> list[bytes]:
    """N first packets of N flows: clients 100.64.0.0/10 from index FIRST on, each its own source port."""
    from tests.bpf.frames import IPPROTO_TCP, IPPROTO_UDP, SYN_OPTIONS, TCP_SYN, tcp, udp

    frames = []
    for i in range(first, first + n):
        client = str(ipaddress.IPv4Address(0x64400000 + 1 + i // 50))
        sport = 10000 + i % 50
        if case.proto == "udp":
            l4, proto = udp(client, NODE, sport, NODEPORT, PAYLOAD), IPPROTO_UDP
        else:
            l4, proto = tcp(client, NODE, sport, NODEPORT, TCP_SYN, options=SYN_OPTIONS), IPPROTO_TCP
        frames.append(frame_to(client, NODE, l4, proto, mac))
    return frames


def new_flow_case(
    case: NewCase, node: CostNode, progs: dict[str, int], noops: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    """One first-packet case: TC and XDP each open --new-runs flows of their own, interleaved one by one
    (the maps fill alike for both); the no-op programs run on the first frame as often."""
    from kproxy.bpf import libbpf as lb
    from tests.bpf.frames import IPPROTO_TCP, IPPROTO_UDP, checksum_errors

    ifindex, n = node.fib.ifindex, args.new_runs
    node.reset(case.dsr)
    proto = IPPROTO_TCP if case.proto == "tcp" else IPPROTO_UDP
    if case.local:
        node.add_nodeport(proto, LOCAL_BE, True)
    else:
        node.add_nodeport(proto, REMOTE_BE, False, extra=NEW_BACKENDS - 1)
    tc_frames = new_flow_frames(case, 0, n, node.fib.mac)
    xdp_frames = new_flow_frames(case, n, n, node.fib.mac)
    series = {
        "tc": Series("kp_from_netdev", "tc", progs["tc"], tc_frames[0], tc_ctx(ifindex)),
        "xdp": Series("kp_xdp", "xdp", progs["xdp"], xdp_frames[0], xdp_ctx(ifindex, len(xdp_frames[0]))),
        "tc_noop": Series("tc no-op", "tc", noops["tc"], tc_frames[0], tc_ctx(ifindex)),
        "xdp_noop": Series(
            "xdp no-op", "xdp", noops["xdp"], xdp_frames[0], xdp_ctx(ifindex, len(xdp_frames[0]))
        ),
    }
    problems: list[str] = []
    before = node.counters()
    for i in range(n):
        for key, f in (("tc", tc_frames[i]), ("xdp", xdp_frames[i])):
            s = series[key]
            ctx = tc_ctx(ifindex) if key == "tc" else xdp_ctx(ifindex, len(f))
            r = lb.prog_test_run(s.fd, f, ctx)
            s.durations.append(r.duration_ns)
            s.verdicts[r.retval] += 1
            if i == 0:
                errs = checksum_errors(r.data_out)
                if errs:
                    problems.append(f"{s.name}: " + "; ".join(errs))
        series["tc_noop"].run(1)
        series["xdp_noop"].run(1)
    moved = {k: v - before[k] for k, v in node.counters().items() if v != before[k]}
    if moved.get(case.work, 0) != 2 * n:
        problems.append(f"{case.work} moved {moved.get(case.work, 0)}, expected {2 * n} (TC + XDP runs)")
    if moved.get("CT_NEW", 0) != 2 * n or moved.get("XDP_NEW", 0) != n:
        problems.append(
            f"CT_NEW moved {moved.get('CT_NEW', 0)} (expected {2 * n}), XDP_NEW {moved.get('XDP_NEW', 0)} "
            f"(expected {n}): not every run opened its flow"
        )
    for key, want_verdict in (("tc", case.tc_verdict), ("xdp", case.xdp_verdict)):
        other = {v: c for v, c in series[key].verdicts.items() if v != want_verdict}
        if other:
            problems.append(f"{key}: unexpected verdicts {other}")
    med = {k: s.summary()["median_ns"] for k, s in series.items()}
    net = {"tc": med["tc"] - med["tc_noop"], "xdp": med["xdp"] - med["xdp_noop"]}
    return {
        "case": case.key,
        "runs": n,
        "tc_verdict": TC_VERDICTS.get(case.tc_verdict, str(case.tc_verdict)),
        "xdp_verdict": XDP_VERDICTS.get(case.xdp_verdict, str(case.xdp_verdict)),
        "series": {k: s.summary() for k, s in series.items()},
        "net_ns": net,
        "xdp_over_tc": round(net["xdp"] / net["tc"], 3) if net["tc"] > 0 else None,
        "counters_moved": moved,
        "problems": problems,
    }


def measure_cost(args: argparse.Namespace) -> dict[str, Any]:
    from bench.bench_controller import private_bpffs
    from kproxy.bpf.loader import PROG_FROM_NETDEV, PROG_XDP, Loader
    from kproxy.lab.netns import in_netns

    res: dict[str, Any] = {"runs": args.runs, "repeat": args.repeat, "cases": []}
    with private_bpffs(BPFFS_PREFIX) as d, fib_namespace() as fib:
        loader = Loader(os.path.join(d, "kproxy"), object_path=args.object)
        try:
            maps = loader.open_maps()
            progs = {"tc": loader.program(PROG_FROM_NETDEV).fd, "xdp": loader.program(PROG_XDP).fd}
            noops = {
                "tc": noop_program(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_OK),
                "xdp": noop_program(BPF_PROG_TYPE_XDP, XDP_PASS),
            }
            node = CostNode(maps, fib)
            try:
                for case in COST_CASES:
                    if args.cost_cases and case.key not in args.cost_cases:
                        continue
                    log(f"cost: {case.key}, {args.runs:,} single runs per program")
                    res["cases"].append(
                        in_netns(fib.name, functools.partial(cost_case, case, node, progs, noops, args))
                    )
                res["new_runs"] = args.new_runs
                res["new_flows"] = []
                for nc in NEW_CASES if args.new_runs else ():
                    log(f"cost: {nc.key}, {args.new_runs:,} new flows per program")
                    res["new_flows"].append(
                        in_netns(fib.name, functools.partial(new_flow_case, nc, node, progs, noops, args))
                    )
            finally:
                for fd in noops.values():
                    os.close(fd)
                maps.close()
        finally:
            loader.close()
    return res


# =====================================================================================================
# 2. packets per second through the lab
# =====================================================================================================
def nft_rules(node_ip: str, backend: str) -> str:
    """kube-proxy's nftables rule set for the one UDP NodePort Service (bench/peers)."""
    from bench.peers import nftables
    from bench.peers.model import Endpoint, NodeConfig, ServicePort

    svc = ServicePort(
        "default", "flood", CLUSTER_IP, 80, SINK_PORT, protocol="UDP", port_name="flood",
        type="NodePort", node_port=NODE_PORT, endpoints=(Endpoint(backend),),
    )  # fmt: skip
    return nftables.render([svc], NodeConfig(node_ips=(node_ip,)))


class Sink:
    """kp-echo -u in a pod: counts datagrams; `count()` asks it for the total so far (SIGUSR1)."""

    def __init__(self, ns_path: str, port: int, cpu: int | None) -> None:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={ns_path}", *pin, str(ECHO), "-u", f"0.0.0.0:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"kp-echo -u exited: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def count(self, timeout: float = 5.0) -> int:
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the UDP sink did not answer SIGUSR1")
        return int(json.loads(self.proc.stdout.readline())["datagrams"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ns_cmd(ns: str, argv: Sequence[str]) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def link_stats(ns: str) -> dict[str, dict[str, int]]:
    """Every interface of namespace NS: packets and drops both ways (ip -s), and the veth's XDP and
    queue counters (ethtool -S) where it has them."""
    r = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show"], capture_output=True, text=True)
    out: dict[str, dict[str, int]] = {}
    for link in json.loads(r.stdout or "[]"):
        name = link["ifname"]
        if name == "lo":
            continue
        st = link.get("stats64", {})
        row = {
            f"{d}_{k}": int(st.get(d, {}).get(k, 0))
            for d in ("rx", "tx")
            for k in ("packets", "dropped", "errors")
        }
        for line in ns_cmd(ns, ["ethtool", "-S", name]).splitlines()[1:]:
            k, _, v = line.strip().partition(":")
            if ("drop" in k or "xdp" in k or "error" in k) and v.strip().isdigit():
                row[k.strip()] = int(v)
        out[name] = row
    return out


def snmp_udp(ns: str) -> dict[str, int]:
    rows = [
        line.split() for line in ns_cmd(ns, ["cat", "/proc/net/snmp"]).splitlines() if line.startswith("Udp:")
    ]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=False) if k in UDP_COUNTERS}


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> dict[str, dict[str, int]]:
    """/proc/stat: clock ticks per state, of all CPUs ("cpu") and of each ("cpu0", ...)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *vals = line.split()
                out[name] = {k: int(v) for k, v in zip(CPU_FIELDS, vals, strict=False)}
    return out


def cpu_shares(
    after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]
) -> dict[str, dict[str, float]]:
    """Per CPU (and "cpu", all of them): % of the time busy, in user, system and (soft)irq."""
    out = {}
    for cpu, ticks in after.items():
        d = {k: v - before.get(cpu, {}).get(k, 0) for k, v in ticks.items()}
        total = sum(d.values()) or 1
        out[cpu] = {
            "busy": round(100.0 * (total - d.get("idle", 0) - d.get("iowait", 0)) / total, 1),
            "user": round(100.0 * (d.get("user", 0) + d.get("nice", 0)) / total, 1),
            "system": round(100.0 * d.get("system", 0) / total, 1),
            "softirq": round(100.0 * (d.get("softirq", 0) + d.get("irq", 0)) / total, 1),
        }
    return out


def kp_counters(bpffs: str) -> dict[str, int]:
    from kproxy.abi import Stat
    from kproxy.bpf.maps import KproxyMaps

    with KproxyMaps.open(bpffs) as maps:
        totals = maps.stats.totals()  # IPv4 (kp_stats_v1)
    return {s.name.lower(): (totals.get(int(s)) or (0,))[0] for s in Stat}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def drop_points(
    after: dict[str, dict[str, dict[str, int]]], before: dict[str, dict[str, dict[str, int]]]
) -> dict[str, int]:
    """The drop and error counters that moved, as "namespace/interface counter" -> delta."""
    out = {}
    for ns, links in after.items():
        for ifname, row in links.items():
            for k, v in row.items():
                if ("drop" in k or "error" in k) and v - before.get(ns, {}).get(ifname, {}).get(k, 0):
                    out[f"{ns}/{ifname} {k}"] = v - before[ns].get(ifname, {}).get(k, 0)
    return out


@dataclasses.dataclass
class FloodLab:
    lab: Any
    sink: Sink
    pod: Any
    cpus: int


def snapshot(fl: FloodLab, via: Any, kind: str, ns_watch: dict[str, str]) -> dict[str, Any]:
    from bench.bench_external import ct_stats

    snap: dict[str, Any] = {
        "t": time.monotonic(),
        "sink": fl.sink.count(),
        "udp": snmp_udp(fl.pod.ns),
        "links": {label: link_stats(ns) for label, ns in ns_watch.items()},
    }
    if kind in ("kproxy", "none"):
        snap["kp"] = kp_counters(via.bpffs)
    if kind == "peer":
        snap["ct"] = ct_stats(via.ns)
    return snap


def flood_case(fl: FloodLab, name: str, via: Any, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    lab = fl.lab
    addr = fl.pod.ip if kind == "none" else via.ip
    port = SINK_PORT if kind == "none" else NODE_PORT
    n2 = lab.node("n2")
    ns_watch = {
        "lan": f"{lab.prefix}-lan",
        via.name: via.ns,
        "n2": n2.ns,
        "pod": fl.pod.ns,
        "ext": lab.ext.ns,
    }
    before = snapshot(fl, via, kind, ns_watch)
    pin = ["taskset", "-c", str(args.gen_cpu)] if args.gen_cpu >= 0 else []
    argv = [*pin, str(LOADGEN), "-U", "-a", addr, "-p", str(port), "-d", str(args.duration),
            "-f", str(args.flows), "-s", str(args.size), "-b", str(args.batch),
            "-F", str(args.sport)]  # fmt: skip
    if args.rate:
        argv += ["-R", str(args.rate)]
    cpu0 = cpu_times()
    r = lab.run_in(lab.ext, argv, timeout=args.duration + 30)
    cpu1 = cpu_times()
    if r.returncode != 0:
        return {"failed": f"kp-loadgen: {r.stderr.strip()}"}
    gen = json.loads(r.stdout)
    time.sleep(args.settle)  # what is still on its way arrives (or is dropped) before the counters are read
    after = snapshot(fl, via, kind, ns_watch)
    sent, received = int(gen["sent"]), after["sink"] - before["sink"]
    secs = float(gen["duration_s"])
    res: dict[str, Any] = {
        "via": via.name,
        "sent": sent,
        "received": received,
        "dropped": sent - received,
        "drop_pct": round(100.0 * (sent - received) / sent, 2) if sent else None,
        "sent_pps": round(sent / secs),
        "received_pps": round(received / secs),
        "duration_s": secs,
        "send_errors": gen.get("send_errors", {}),
        "generator_cpu_pct": round(100.0 * (gen["cpu_user_s"] + gen["cpu_sys_s"]) / secs, 1),
        "cpu_pct": cpu_shares(cpu1, cpu0),
        "pod_udp": diff(after["udp"], before["udp"]),
        "drop_points": drop_points(after["links"], before["links"]),
    }
    via_eth0 = diff(after["links"][via.name].get("eth0", {}), before["links"][via.name].get("eth0", {}))
    res["via_eth0"] = {k: v for k, v in via_eth0.items() if v}
    if "kp" in after:
        moved = diff(after["kp"], before["kp"])
        res["kp"] = {k: moved.get(k, 0) for k in KP_COUNTERS}
    if "ct" in after:
        res["ct"] = {k: v for k, v in diff(after["ct"], before["ct"]).items() if k in CT_COUNTERS}
    res["path_check"] = path_check(name, kind, res)
    return res


def path_check(name: str, kind: str, res: dict[str, Any]) -> list[str]:
    """What says the run did not measure its path (empty: it did)."""
    problems = []
    kp = res.get("kp", {})
    received = res["received"]
    if received <= 0:
        problems.append("nothing arrived at the backend")
    rx = res.get("via_eth0", {}).get("rx_packets", 0)
    if rx < received:
        problems.append(
            f"{res['via']} eth0 received {rx} packets, the backend {received}: the path bypassed it"
        )
    if kind == "none":
        if kp.get("snat", 0):
            problems.append(f"n1 SNATed {kp['snat']} datagrams of the no-NAT run")
        if kp.get("from_netdev", 0) < received:
            problems.append(
                f"n1's kp_from_netdev saw {kp.get('from_netdev', 0)} packets, the backend got {received}"
            )
    elif kind == "kproxy" and name == "kproxy tc":
        if kp.get("xdp_fwd", 0) or kp.get("from_xdp", 0):
            problems.append(
                f"XDP ran on the TC node (from_xdp +{kp.get('from_xdp', 0)}, xdp_fwd +{kp.get('xdp_fwd', 0)})"
            )
        if kp.get("snat", 0) < received:
            problems.append(f"snat +{kp.get('snat', 0)} < received {received}")
    elif kind == "kproxy":
        fwd, snat = kp.get("xdp_fwd", 0), kp.get("snat", 0)
        if snat < received:
            problems.append(f"snat +{snat} < received {received}")
        if fwd < 0.95 * snat:
            problems.append(
                f"XDP forwarded {fwd} of {snat} SNATed datagrams ({100.0 * fwd / max(1, snat):.1f} %)"
            )
    return problems


def flood(args: argparse.Namespace) -> dict[str, Any]:
    subprocess.run(["make", "-s", "-C", str(ROOT), "-f", "mk/bench.mk", "loadgen"], check=True)
    from bench.bench_external import load_peer
    from kproxy.lab import Lab
    from kproxy.lab import manifests as mf
    from kproxy.lab.netns import netns_path, sysctl

    cases = [c for c in FLOOD_CASES if c[0] in args.cases]
    runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in cases}
    meta: dict[str, Any] = {}
    base_args = ["--log-level", "warning"]
    log("flood: lab up (4 nodes)")
    # xdp_lan: the LAN made ready for XDP_TX from a node's veth (the lab's _lan_port), for every node alike
    with Lab(nodes=4, pods_per_node=1, start_agents=False, agent_args=base_args, xdp_lan=True) as lab:
        accel = {"n1": "off", "n2": "off", "n3": "native"}
        for n, mode in accel.items():
            lab.agent_args = [*base_args, "--acceleration", mode]
            lab.start_agent(n)
        lab.agent_args = base_args
        for n in accel:
            lab.wait_agent(n)
        pod = lab.pod("n2p1")
        port = mf.Port("flood", 80, SINK_PORT, "UDP", NODE_PORT)
        lab.write_manifest("flood", [
            mf.service("flood", [port], CLUSTER_IP, type="NodePort"),
            mf.endpoint_slice("flood", [(pod.ip, pod.node)], [port]),
        ])  # fmt: skip
        for n in ("n1", "n3"):
            lab.wait_programmed(lab.node(n).ip, NODE_PORT, [pod.ip], protocol="UDP", nodes=[n])
        meta["acceleration"] = {n: acceleration_of(lab, n) for n in accel}
        n4 = lab.node("n4")
        sysctl(n4.ns, "net.ipv4.conf.all.route_localnet", 1)
        load_peer(n4.ns, "nftables", nft_rules(n4.ip, pod.ip), 4)
        # no NAT: the client reaches the pod through n1. n1 forwards it out of the interface it came in by,
        # so it sends the client ICMP redirects (to n2); a client that took them would bypass n1.
        for dev in ("all", "default", "eth0"):
            sysctl(lab.ext.ns, f"net.ipv4.conf.{dev}.accept_redirects", 0)
        route = ["route", "add", lab.node("n2").pod_cidr, "via", lab.node("n1").ip]
        subprocess.run(["ip", "-n", lab.ext.ns, *route], check=True)
        cpus = os.cpu_count() or 1
        sink_cpu = (args.gen_cpu + 1) % cpus if args.gen_cpu >= 0 and cpus > 1 else None
        sink = Sink(netns_path(pod.ns), SINK_PORT, sink_cpu)
        meta["generator_cpu"], meta["sink_cpu"] = args.gen_cpu, sink_cpu
        fl = FloodLab(lab, sink, pod, os.cpu_count() or 1)
        meta["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3]
        try:
            for rnd in range(args.rounds):
                # each round starts one case later: no case always runs first (or after the same one)
                for name, via, kind in cases[rnd % len(cases) :] + cases[: rnd % len(cases)]:
                    log(f"flood: round {rnd + 1}/{args.rounds}, {name}")
                    runs[name].append(flood_case(fl, name, lab.node(via), kind, args))
        finally:
            sink.stop()
        meta["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return {"meta": meta, "runs": runs, "summary": {n: summarize(r) for n, r in runs.items()}}


def acceleration_of(lab: Any, node: str) -> dict[str, Any]:
    """What runs on NODE's eth0: the agent's own account (`kproxy status`: --acceleration and per netdev)
    and the kernel's (ip link: the XDP program attached, and how)."""
    from kproxy.observe.metadata import read_status

    n = lab.node(node)
    status = read_status(n.bpffs) or {}
    shown = subprocess.run(
        ["ip", "-n", n.ns, "-d", "-j", "link", "show", "eth0"], capture_output=True, text=True
    )
    xdp = json.loads(shown.stdout or "[{}]")[0].get("xdp") or {}
    modes: dict[Any, str] = {1: "native", 2: "generic", 3: "offload", 4: "multi"}
    mode = modes.get(xdp.get("mode"), str(xdp.get("mode")))
    return {
        "agent": status.get("acceleration", {}).get("netdevs", {}).get("eth0"),
        "xdp": f"{mode} prog {xdp.get('prog', {}).get('id')}" if xdp else None,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by received rate, and the totals of all rounds."""
    ok = [r for r in runs if "received" in r]
    med = sorted(ok, key=lambda r: r["received_pps"])[(len(ok) - 1) // 2] if ok else {}
    sent = sum(r["sent"] for r in ok)
    received = sum(r["received"] for r in ok)
    kp: dict[str, int] = {}
    for r in ok:
        for k, v in r.get("kp", {}).items():
            kp[k] = kp.get(k, 0) + v
    ct: dict[str, int] = {}
    for r in ok:
        for k, v in r.get("ct", {}).items():
            ct[k] = ct.get(k, 0) + v
    drops: dict[str, int] = {}
    for r in ok:
        for k, v in r.get("drop_points", {}).items():
            drops[k] = drops.get(k, 0) + v
    return {
        "received_pps": med.get("received_pps", 0),
        "sent_pps": med.get("sent_pps", 0),
        "rounds_received_pps": [r["received_pps"] for r in ok],
        "rounds_lost_pct": [r.get("drop_pct") for r in ok],
        "sent": sent,
        "received": received,
        "dropped": sent - received,
        "drop_pct": round(100.0 * (sent - received) / sent, 2) if sent else None,
        "generator_cpu_pct": med.get("generator_cpu_pct"),
        "cpu_pct": med.get("cpu_pct"),
        "kp": kp,
        "ct": ct,
        "drop_points": dict(sorted(drops.items(), key=lambda kv: -kv[1])),
        "pod_udp_rcvbuf_errors": sum(r.get("pod_udp", {}).get("RcvbufErrors", 0) for r in ok),
        "failed": [r["failed"] for r in runs if "failed" in r],
        "path_check": sorted({p for r in ok for p in r.get("path_check", [])}),
    }


# =====================================================================================================
# report
# =====================================================================================================
def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    m = res["machine"]
    lines.append(f"bench_xdp: kernel {m['kernel']}, {m['cpus']} CPUs, {res['started']}")
    if "cost" in res:
        lines += report_cost(res["cost"])
    if "flood" in res:
        lines += report_flood(res["flood"], res["settings"], m["cpus"])
    lines.append(f"\nTotal wall time {res['wall_s']:.1f} s.")
    return "\n".join(lines)


def report_cost(cost: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"1. Program cost per packet (BPF_PROG_TEST_RUN): median of {cost['runs']:,} single runs (repeat=1)",
        "   per program minus the median of a no-op program of the same hook (the harness's own time). The",
        "   same frame and maps through kp_from_netdev (TC, skb) and kp_xdp (XDP). Not timed on either side:",
        "   copying the frame in, making the skb or xdp_buff; verdicts are returned, not carried out (no",
        "   transmit, no redirect).",
        "",
        f"{'case':15} {'verdicts TC/XDP':>16} {'TC ns':>6} {'XDP ns':>6} {'XDP/TC':>6} {'XDP node':>8} "
        f"{'node/TC':>7}  {'same bytes':10} raw medians TC/XDP (no-op TC/XDP)",
    ]
    for c in cost["cases"]:
        s, net = c["series"], c["net_ns"]
        ratio = f"{c['xdp_over_tc']:.2f}" if c["xdp_over_tc"] is not None else "-"
        node_ratio = f"{c['xdp_node_over_tc']:.2f}" if c["xdp_node_over_tc"] is not None else "-"
        same = "yes" if c["same_bytes"] else ("n/a" if c["case"] == "not a service" else "NO")
        raw = f"{s['tc']['median_ns']}/{s['xdp']['median_ns']}"
        raw += f" ({s['tc_noop']['median_ns']}/{s['xdp_noop']['median_ns']})"
        verdicts = f"{c['tc_verdict']}/{c['xdp_verdict']}"
        lines.append(
            f"{c['case']:15} {verdicts:>16} {net['tc']:>6} {net['xdp']:>6} {ratio:>6} {net['xdp_node']:>8} "
            f"{node_ratio:>7}  {same:10} {raw}"
        )
        for p in c["problems"]:
            lines.append(f"  PROBLEM {c['case']}: {p}")
    lines += [
        "TC ns, XDP ns: the program alone. XDP node: the programs a packet meets on a node with",
        "acceleration (kp_xdp, plus kp_from_netdev on what kp_xdp passes on). same bytes: kp_xdp wrote",
        "the frame kp_from_netdev wrote.",
    ]
    if cost.get("new_flows"):
        lines += [
            "",
            f"   A flow's first packet: median of {cost['new_runs']:,} runs per program, each on a new flow",
            "   (kp_xdp opens it in kp_xdp_new, kp_from_netdev in kp_lb_forward), minus the no-op's median.",
            f"   {'case':18} {'verdicts TC/XDP':>16} {'TC ns':>6} {'XDP ns':>6} {'XDP/TC':>6}"
            "  raw medians TC/XDP",
        ]
        for c in cost["new_flows"]:
            s, net = c["series"], c["net_ns"]
            ratio = f"{c['xdp_over_tc']:.2f}" if c["xdp_over_tc"] is not None else "-"
            verdicts = f"{c['tc_verdict']}/{c['xdp_verdict']}"
            lines.append(
                f"   {c['case']:18} {verdicts:>16} {net['tc']:>6} {net['xdp']:>6} {ratio:>6}  "
                f"{s['tc']['median_ns']}/{s['xdp']['median_ns']}"
            )
            for p in c["problems"]:
                lines.append(f"  PROBLEM {c['case']}: {p}")
    if any(c.get("repeat") for c in cost["cases"]):
        lines += [
            "",
            f"   The same with one call of repeat={cost['repeat']:,} (the kernel's loop, ns per repetition,",
            "   the no-op's subtracted). Each repetition runs on the buffer the one before rewrote: valid",
            "   only when each did the case's work (its counter moved by repeat).",
        ]
        for c in cost["cases"]:
            rep = c.get("repeat") or {}
            cells = []
            for k in ("tc", "xdp"):
                r, noop = rep[k], rep[f"{k}_noop"]["ns"]
                who = "TC" if k == "tc" else "XDP"
                if r["valid"]:
                    cells.append(f"{who} {r['ns'] - noop} ns")
                else:
                    cells.append(
                        f"{who} invalid: {r['worked']:,} of {cost['repeat']:,} did the work"
                        f" ({r['ns']} ns raw)"
                    )
            lines.append(f"   {c['case']:15} " + "; ".join(cells))
    return lines


def report_flood(fl: dict[str, Any], settings: dict[str, Any], cpus: int) -> list[str]:
    summary, meta = fl["summary"], fl["meta"]
    offered = f"{settings['rate']:,} datagrams/s offered" if settings["rate"] else "open loop"
    gen = meta.get("generator_cpu")
    gen_key = f"cpu{gen}" if gen is not None and gen >= 0 else "cpu"
    sink = meta.get("sink_cpu")
    other_key = f"cpu{sink}" if sink is not None else ""
    accel = ", ".join(
        f"{n} {a.get('agent')} (XDP: {a.get('xdp') or 'none'})" for n, a in meta["acceleration"].items()
    )
    lines = [
        "",
        f"2. UDP flood through the lab, ext -> NodePort -> UDP sink in pod n2p1: {settings['flows']} flows x "
        f"{settings['size']}-byte datagrams",
        f"   ({settings['size'] + 42}-byte frames), {settings['duration']:g} s per run, "
        f"{settings['rounds']} rounds "
        f"interleaved, {offered}; kp-loadgen pinned to CPU {gen}, the sink to CPU {sink}.",
        "   Median round by received rate (sent/s, recv/s, CPU); lost %: all rounds (per round: after the",
        "   rate, when not 0; *: kp-loadgen had less than 90 % of its CPU, something else ran there).",
        f"   kproxy: {accel}.",
        "",
    ]
    base = summary.get("no NAT", {}).get("received_pps") or 0
    nft = summary.get("nftables", {}).get("received_pps") or 0
    lines.append(
        f"{'case':11} {'via':>3} {'sent/s':>9} {'recv/s':>9} {'lost %':>6} {'/noNAT':>6} {'/nft':>5} "
        f"{'gen CPU':>7} {'softirq':>7} {'ns/dgram':>8} {'-noNAT':>6} {'other %':>7}  rounds recv/s;"
        " NAT node counters"
    )
    base_ns = None
    if "no NAT" in summary:
        b = summary["no NAT"]
        bc = (b.get("cpu_pct") or {}).get(gen_key, {})
        base_ns = bc.get("busy", 0) * 1e7 / b["received_pps"] if b["received_pps"] and bc else None
    for name, s in summary.items():
        r = s["received_pps"]
        cpu = s.get("cpu_pct") or {}
        g = cpu.get(gen_key, {})
        ns_val = g.get("busy", 0) * 1e7 / r if r and g else None
        ns_per = f"{ns_val:.0f}" if ns_val is not None else "-"
        ns_delta = f"{ns_val - base_ns:+.0f}" if ns_val is not None and base_ns is not None else "-"
        via = next((c[1] for c in FLOOD_CASES if c[0] == name), "")
        counters = ""
        if s["kp"]:
            counters = ",".join(f"{k}={v}" for k, v in s["kp"].items() if v)
        if s["ct"]:
            counters = "conntrack " + (",".join(f"{k}={v}" for k, v in s["ct"].items() if v) or "no drops")
        runs = [x for x in fl["runs"].get(name, []) if "received" in x]
        others = [x["cpu_pct"].get(other_key, {}).get("busy", 0.0) for x in runs if x.get("cpu_pct")]
        other = f"{min(others):.0f}-{max(others):.0f}" if others else "-"
        extra = " ".join(
            f"{x['received_pps']}"
            + (f"({-x['drop_pct']:.1f}%)" if x.get("drop_pct") else "")
            + ("*" if x.get("generator_cpu_pct", 100) < 90 else "")
            for x in runs
        ) + (f"; {counters}" if counters else "")
        if s["failed"]:
            extra += "; FAILED: " + " | ".join(s["failed"])
        if s["path_check"]:
            extra += "; PATH CHECK: " + " | ".join(s["path_check"])
        drop = f"{s['drop_pct']:.2f}" if s["drop_pct"] is not None else "-"
        lines.append(
            f"{name:11} {via:>3} {s['sent_pps']:>9,} {r:>9,} {drop:>6} "
            f"{(f'{r / base:.2f}' if base else '-'):>6} {(f'{r / nft:.2f}' if nft else '-'):>5} "
            f"{g.get('busy', 0):>6.0f}% {g.get('softirq', 0):>6.0f}% {ns_per:>8} {ns_delta:>6} "
            f"{other:>7}  {extra}"
        )
    lines.append("lost datagrams (sent - received, all rounds) and the interface drop counters that moved:")
    for name, s in summary.items():
        top = list(s["drop_points"].items())[:4]
        pts = ", ".join(f"{k} {v:,}" for k, v in top) or "none counted"
        lines.append(
            f"  {name:11} {s['dropped']:>10,} lost: {pts}; sink socket full: {s['pod_udp_rcvbuf_errors']:,}"
        )
    lines += [
        "/noNAT, /nft: received rate / that of no NAT, of nftables. gen CPU: the generator's CPU busy",
        "(softirq: of which in softirq); ns/dgram: that CPU's busy time per received datagram (-noNAT: minus",
        "no NAT's: what the path costs more than plain forwarding through a node); other %: the other CPU",
        "busy, lowest-highest round (the sink, and anything else on the VM). This VM has "
        f"{cpus} CPUs: the sends",
        "and all the forwarding they trigger (bridge, NAT node, n2, delivery to the sink's socket) run in",
        "softirq on the generator's CPU, so the rates compare the whole path's per-packet CPU cost, not a",
        "node's capacity. Lost datagrams: the generator outran the path; they were dropped where a queue was",
        "full (a veth's 256-frame XDP ring, a CPU's backlog). The lab's veths run XDP on frames that are",
        "skbs already (a NIC driver runs XDP before any skb exists): the skb allocation XDP saves on a NIC",
        "is not saved here.",
    ]
    return lines


# =====================================================================================================
# main
# =====================================================================================================
def run_all(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    res: dict[str, Any] = result_header(args)
    if "cost" in args.parts:
        res["cost"] = measure_cost(args)
    if "flood" in args.parts:
        res["flood"] = flood(args)
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--runs", type=int, default=100_000, help="single runs per program and case (part 1)")
    ap.add_argument("--batch-runs", type=int, default=1000, help="runs per program before the next (part 1)")
    ap.add_argument(
        "--repeat", type=int, default=1_000_000, help="repeat of the kernel-loop runs; 1: none (part 1)"
    )
    ap.add_argument("--cost-cases", default="", help="comma-separated subset of part 1's cases")
    ap.add_argument(
        "--new-runs", type=int, default=5000, help="new flows per program of the first-packet cases; 0: none"
    )
    ap.add_argument("--object", help="the BPF object (default: the package's kproxy_tc.bpf.o)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per flood run (part 2)")
    ap.add_argument("--rounds", type=int, default=5, help="each case runs this often, interleaved (part 2)")
    ap.add_argument("--flows", type=int, default=256, help="source ports of the flood (part 2)")
    ap.add_argument("--size", type=int, default=18, help="UDP payload bytes (18: 60-byte frames) (part 2)")
    ap.add_argument("--batch", type=int, default=16, help="datagrams per sendmmsg (part 2)")
    ap.add_argument(
        "--rate", type=int, default=0, help="datagrams/s offered; 0: as fast as possible (part 2)"
    )
    ap.add_argument("--sport", type=int, default=20000, help="first source port of the flows (part 2)")
    ap.add_argument(
        "--gen-cpu", type=int, default=0,
        help="CPU kp-loadgen is pinned to (the sink gets the next one); -1: not pinned (part 2)",
    )  # fmt: skip
    ap.add_argument("--settle", type=float, default=0.3, help="seconds between a run's end and its counters")
    ap.add_argument(
        "--cases", default=",".join(c[0] for c in FLOOD_CASES), help="comma-separated subset (part 2)"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object, no tables")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if any(p not in PARTS for p in args.parts):
        ap.error(f"--parts: choose from {', '.join(PARTS)}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in [fc[0] for fc in FLOOD_CASES] for c in args.cases):
        ap.error(f"--cases: choose from {', '.join(c[0] for c in FLOOD_CASES)}")
    args.cost_cases = [c.strip() for c in args.cost_cases.split(",") if c.strip()]
    if any(c not in [cc.key for cc in COST_CASES] for c in args.cost_cases):
        ap.error(f"--cost-cases: choose from {', '.join(c.key for c in COST_CASES)}")
    if args.runs < 1 or args.repeat < 1 or args.rounds < 1 or args.duration <= 0 or args.flows < 1:
        ap.error("--runs, --repeat, --rounds, --flows must be at least 1 and --duration positive")
    if args.sport + args.flows > 65536:
        ap.error("--sport + --flows must stay within 65535")
    if os.geteuid() != 0:
        print("bench_xdp needs root (bpffs mounts, BPF, network namespaces)", file=sys.stderr)
        return 2

    return run_and_print(args, run_all, report)


if __name__ == "__main__":
    sys.exit(main())
