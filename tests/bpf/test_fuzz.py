"""Fuzz the four TC programs through PROG_TEST_RUN with random and mutated frames against populated maps.

A seeded generator (KPROXY_FUZZ_SEED, printed on failure; KPROXY_FUZZ_FRAMES scales the run, default
100k frames, each through all four programs) builds service traffic, replies, ICMP errors, foreign
traffic and raw random bytes, and mutates a share of them (truncation, bad tot_len / ihl, IP options,
fragment bits, odd protocols, flipped bytes, trailing garbage). Invariants:
  - a frame that is not for kproxy (no address of a frontend, backend, client, node; no IPIP; no DSR
    option) comes out byte-for-byte unchanged with TC_ACT_OK;
  - truncated frames, and fragments of protocols other than TCP and UDP (SCTP's too), come out unchanged;
  - a TCP/UDP fragment may be translated (a first fragment as its datagram, a later one as the first
    fragment of its datagram was, addresses only): its IPv4 header checksum stays valid;
  - every frame a program rewrote, whose input checksums were valid, has valid IP/L4/ICMP checksums
    and a sane length (tot_len fits the frame; size changed at most by an encapsulation or an ICMP
    error replacing it).

IPv6 (test_fuzz_tc_programs_ipv6, the same budget: KPROXY_FUZZ_FRAMES frames): service traffic, replies,
ICMPv6 errors (quotes with extension headers, cut short), neighbour discovery, ESP and foreign traffic,
behind random extension-header chains (hop-by-hop, routing, destination options, fragment headers
anywhere in the chain, more than the parser walks), mutated by truncation, bad payload_len, random
next-header values, header lengths and flipped bits. Invariants:
  - foreign frames, and frames the IPv6 parser must pass (version not 6, payload_len beyond the frame,
    a chain of more than KP_IP6_EXT_MAX headers or cut short, ESP / no next header / unknown upper layers,
    fragments of protocols other than TCP and UDP, L4 headers cut short, neighbour discovery) come out
    byte-for-byte unchanged with TC_ACT_OK; PROG_TEST_RUN refuses (EINVAL) frames shorter than 14 + 40;
  - a translated fragment changes only addresses, ports, the L4 checksum (first fragment: the one's
    complement sum of addresses and its L4 bytes is kept, so the datagram's checksum stays valid),
    MACs and the hop limit;
  - every other rewritten frame whose input checksums were valid has valid checksums and a sane length.
It runs once per DSR mode (off, destination option, IPv6-in-IPv6; the backends' node known), with DSR
traffic for the backend's node too (tunnels to the node, DSR headers, both mutated): a DSR frame may
grow by DSR's bytes on the ingress node and shrink by them on the backend's node, nothing else.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from datapath import PROGRAMS, TC_ACT_OK, Backend, Datapath, ct6_key, ct_key, in6
from frames import (
    ETH_P_IPV6,
    IP_DF,
    IP_MF,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    checksum_errors,
    ether,
    icmp,
    ipv4,
    ones_sum_ok,
    tcp,
    tcp_frame,
    udp,
    udp_frame,
)
from frames6 import (
    ICMP6_DEST_UNREACH,
    ICMP6_PKT_TOOBIG,
    ICMP6_TIME_EXCEED,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_NONE,
    IPPROTO_ROUTING,
    addr6,
    checksum_errors6,
    ext,
    frag_hdr,
    icmp6,
    ipv6,
    tcp6,
    udp6,
)

from kproxy import abi
from kproxy.bpf.libbpf import _TestRunOpts, lib

pytestmark = pytest.mark.root

FRAMES = int(os.environ.get("KPROXY_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("KPROXY_FUZZ_SEED", str(int.from_bytes(os.urandom(4), "little"))))
MAX_REPORT = 10
DSR_OPT_TYPE = 0x9A
IPPROTO_IPIP = 4
IPPROTO_SCTP = 132

NODE = "192.168.1.10"
CLIENTS = [f"10.244.1.{i}" for i in range(5, 13)]
EXT_CLIENTS = ["203.0.113.9", "203.0.113.10"]
BACKENDS = [Backend(i, f"10.244.{2 + i % 3}.{20 + i}", 8080 if i % 2 else 9090) for i in range(1, 9)]
LB_IP = "198.51.100.20"
EXT_IP = "198.51.100.21"
NODEPORT = 30080


@dataclass(frozen=True)
class Fe:
    addr: str
    port: int
    proto: int
    flags: int = 0
    backends: tuple[int, ...] = ()
    svc_id: int = 1
    affinity: int = 0


FRONTENDS = [
    Fe("10.96.0.10", 80, IPPROTO_TCP, 0, (1, 2, 3), 1),
    Fe("10.96.0.10", 53, IPPROTO_UDP, 0, (4, 5), 2),
    Fe("10.96.0.11", 443, IPPROTO_TCP, abi.SvcFlag.AFFINITY, (1, 6), 3, 10800),
    Fe("10.96.0.12", 80, IPPROTO_TCP, 0, (), 4),  # no endpoints: ICMP reject
    Fe("10.96.0.13", 5000, IPPROTO_UDP, abi.SvcFlag.NO_LOCAL_DROP, (), 5),
    Fe(NODE, NODEPORT, IPPROTO_TCP, abi.SvcFlag.NODEPORT, (2, 7), 6),
    Fe(NODE, NODEPORT, IPPROTO_UDP, abi.SvcFlag.NODEPORT, (8,), 7),
    Fe(LB_IP, 80, IPPROTO_TCP, abi.SvcFlag.LOADBALANCER, (3, 8), 8),
    Fe(EXT_IP, 8443, IPPROTO_TCP, abi.SvcFlag.EXTERNAL_IP | abi.SvcFlag.AFFINITY, (5,), 9, 60),
]

UNIVERSE = {socket.inet_aton(a) for a in [NODE, LB_IP, EXT_IP, *CLIENTS, *EXT_CLIENTS]}
UNIVERSE |= {socket.inet_aton(b.addr) for b in BACKENDS}
UNIVERSE |= {socket.inet_aton(f.addr) for f in FRONTENDS}


def populate(dp: Datapath) -> None:
    """Services, backends, conntrack entries of live flows and affinity entries, like an agent wrote them."""
    cfg = abi.Config()
    cfg.node_addr = abi.ip_to_nbo(NODE)
    dp.cfg.update(ctypes.c_uint32(0), cfg)
    by_id = {b.id: b for b in BACKENDS}
    for fe in FRONTENDS:
        bes = [by_id[i] for i in fe.backends]
        dp.add_service(
            fe.addr,
            fe.port,
            fe.proto,
            bes,
            flags=int(fe.flags),
            svc_id=fe.svc_id,
            affinity_timeout=fe.affinity,
        )
    dp.add_backends(BACKENDS, IPPROTO_TCP)
    now = time.monotonic_ns()
    for n, fe in enumerate(fe for fe in FRONTENDS if fe.backends):
        be = by_id[fe.backends[0]]
        client = CLIENTS[n % len(CLIENTS)]
        cport = 41000 + n
        state = abi.CtState.UDP if fe.proto == IPPROTO_UDP else abi.CtState.ESTABLISHED
        fwd = abi.Ct4Val()
        fwd.expires_ns, fwd.backend_id, fwd.svc_id = now + 3600 * 10**9, be.id, fe.svc_id
        fwd.nat_addr, fwd.nat_port = abi.ip_to_nbo(be.addr), abi.port_to_nbo(be.port)
        fwd.state, fwd.flags = state, abi.CtFlag.SEEN_REPLY
        rep = abi.Ct4Val.from_buffer_copy(bytes(fwd))
        rep.nat_addr, rep.nat_port = abi.ip_to_nbo(fe.addr), abi.port_to_nbo(fe.port)
        dp.put_ct(ct_key(client, fe.addr, cport, fe.port, fe.proto, abi.CtDir.FWD), fwd)
        dp.put_ct(ct_key(be.addr, client, be.port, cport, fe.proto, abi.CtDir.REPLY), rep)
        if fe.affinity:
            dp.aff4.update(abi.Aff4Key(abi.ip_to_nbo(client), fe.svc_id), abi.Aff4Val(now, be.id, 0))


# ---- generation ----
class Gen:
    """Frames from one seeded PRNG. Cheap per frame: bytes and struct only, no objects per frame."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.by_id = {b.id: b for b in BACKENDS}

    def foreign_addr(self) -> str:
        return f"100.{64 + self.r.randrange(64)}.{self.r.randrange(256)}.{self.r.randrange(1, 255)}"

    def ip_options(self) -> bytes:
        r = self.r
        kind = r.randrange(5)
        if kind == 0:
            return bytes.fromhex("94040000")  # router alert
        if kind == 1:
            return b"\x01" * r.choice((4, 8, 40))  # NOPs, up to the maximum header
        if kind == 2:
            n = r.randrange(1, 10)
            return bytes([0x44, 4 + 4 * n, 5, 0]) + self.r.randbytes(4 * n)[:36]  # timestamp
        opt = bytearray(self.r.randbytes(r.choice((4, 8, 12, 40))))
        if opt[0] == DSR_OPT_TYPE:
            opt[0] = 0x01
        return bytes(opt)

    def l4(self, proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        r = self.r
        if proto == IPPROTO_TCP:
            flags = r.choice(
                (TCP_SYN, TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK, TCP_RST, r.randrange(256))
            )
            return tcp(src, dst, sport, dport, flags, payload=self.r.randbytes(r.randrange(0, 64)))
        if proto == IPPROTO_UDP:
            return udp(
                src, dst, sport, dport, self.r.randbytes(r.randrange(0, 64)), checksum=r.random() < 0.8
            )
        return self.r.randbytes(r.randrange(0, 64))

    def service_frame(self) -> tuple[bytes, bool]:
        """Client -> frontend, or backend -> client replies, or an ICMP error about a service flow."""
        r = self.r
        fe = r.choice(FRONTENDS)
        kind = r.randrange(10)
        opts = self.ip_options() if r.random() < 0.1 else b""
        if kind < 6:
            src = r.choice(CLIENTS + EXT_CLIENTS)
            sport = r.choice((41000, 41001, 41002, r.randrange(1024, 65536)))
            payload = self.l4(fe.proto, src, fe.addr, sport, fe.port)
            return ether(ipv4(src, fe.addr, fe.proto, payload, options=opts)), False
        if kind < 9 and fe.backends:
            be = self.by_id[r.choice(fe.backends)]
            dst = r.choice(CLIENTS)
            dport = r.choice((41000, 41001, 41002, 41003, r.randrange(1024, 65536)))
            payload = self.l4(fe.proto, be.addr, dst, be.port, dport)
            return ether(ipv4(be.addr, dst, fe.proto, payload, options=opts)), False
        # ICMP error from a router about a packet the client sent to the backend (or the frontend).
        client = r.choice(CLIENTS)
        inner_dst = self.by_id[fe.backends[0]].addr if fe.backends and r.random() < 0.5 else fe.addr
        inner_l4 = self.l4(fe.proto, client, inner_dst, 41000 + r.randrange(4), fe.port)[:8]
        inner = ipv4(client, inner_dst, fe.proto, inner_l4, tot_len=20 + len(inner_l4) + r.randrange(0, 100))
        itype, code = r.choice(((3, 4), (3, 1), (11, 0), (3, 3)))
        msg = icmp(itype, code, 1400 if code == 4 else 0, inner)
        router = r.choice(("10.244.2.1", inner_dst))
        return ether(ipv4(router, client, IPPROTO_ICMP, msg)), False

    def foreign_frame(self) -> tuple[bytes, bool]:
        r = self.r
        src, dst = self.foreign_addr(), self.foreign_addr()
        proto = r.choice((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 47, 50, 132, 0, 255, r.randrange(256)))
        if proto == IPPROTO_IPIP:
            proto = 41
        if proto == IPPROTO_ICMP:
            payload = icmp(r.randrange(256), r.randrange(16), 0, self.r.randbytes(r.randrange(0, 60)))
        else:
            payload = self.l4(proto, src, dst, r.randrange(65536), r.randrange(65536))
        opts = self.ip_options() if r.random() < 0.2 else b""
        ff = r.choice((IP_DF, 0, IP_MF, r.randrange(1, 8192), IP_MF | r.randrange(1, 8192)))
        frame = ether(ipv4(src, dst, proto, payload, options=opts, flags_frag=ff, ttl=r.randrange(256)))
        return frame, True

    def random_frame(self) -> tuple[bytes, bool]:
        r = self.r
        n = r.randrange(14, 200)
        body = bytearray(self.r.randbytes(n))
        if r.random() < 0.7:
            body[12:14] = b"\x08\x00"
            if n > 14 and r.random() < 0.7:
                body[14] = 0x40 | (body[14] & 0x0F)
        return bytes(body), None  # type: ignore[return-value]

    def mutate(self, frame: bytes) -> bytes:
        r = self.r
        b = bytearray(frame)
        for _ in range(r.randrange(1, 3)):
            m = r.randrange(8)
            if m == 0 and len(b) > 14:
                del b[r.randrange(14, len(b)) :]  # truncation
            elif m == 1 and len(b) >= 18:
                struct.pack_into(
                    "!H", b, 16, r.choice((0, 1, 19, 20, 21, len(b) - 14 + 1, 65535, r.randrange(65536)))
                )
            elif m == 2 and len(b) > 14:
                b[14] = (b[14] & 0xF0) | r.randrange(16)  # ihl
            elif m == 3 and len(b) >= 22:
                struct.pack_into("!H", b, 20, r.choice((IP_MF, 1, IP_MF | 7, 8191)))  # fragment
            elif m == 4 and len(b) > 23:
                b[23] = r.choice((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 0, 41, 132, 255))
            elif m == 5 and len(b) > 14:
                i = r.randrange(14, len(b))
                b[i] ^= 1 << r.randrange(8)  # a flipped bit anywhere
            elif m == 6:
                b += self.r.randbytes(r.randrange(1, 64))  # trailing garbage (tot_len < frame)
            elif m == 7 and len(b) > 14:
                b[14] = (b[14] & 0x0F) | (r.randrange(16) << 4)  # version
        return bytes(b)

    def frame(self) -> tuple[bytes, bool | None]:
        """(frame, foreign?) — foreign=None: classify from the bytes (random data)."""
        r = self.r
        x = r.random()
        if x < 0.45:
            f, foreign = self.service_frame()
        elif x < 0.8:
            f, foreign = self.foreign_frame()
        else:
            return self.random_frame()
        if r.random() < 0.5:
            # a mutation may make a foreign frame kproxy's (a flipped byte turning an IP option into
            # DSR's, an address into a service CIDR's): classify what came out from its bytes
            return self.mutate(f), None
        return f, foreign


# ---- classification and checks ----
def is_foreign(frame: bytes) -> bool:
    """Nothing in this frame can concern kproxy: not IPv4, or no known address, no IPIP, no DSR option
    (IPv6: is_foreign6)."""
    if frame[12:14] == b"\x86\xdd":
        return is_foreign6(frame)
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return True
    if frame[26:30] in UNIVERSE or frame[30:34] in UNIVERSE:
        return False
    if frame[23] == IPPROTO_IPIP:
        return False
    ihl = (frame[14] & 0x0F) * 4
    return not (ihl > 20 and len(frame) > 34 and frame[34] == DSR_OPT_TYPE)


def fragment_offset(frame: bytes) -> int | None:
    """The fragment offset of a TCP/UDP fragment (0 for a first fragment), None for anything else."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    (ff,) = struct.unpack_from("!H", frame, 20)
    return ff & 0x1FFF if ff & 0x3FFF else None


def is_truncated_or_fragment(frame: bytes) -> bool:
    """A frame the contract says must never be rewritten: headers cut short, or an IPv4 fragment of a
    protocol whose fragments kproxy does not follow."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4:
        return False  # not IPv4 at all: covered by is_foreign
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20:
        return True
    (ff,) = struct.unpack_from("!H", frame, 20)
    proto = frame[23]
    if ff & 0x3FFF:
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return True
        if ff & 0x1FFF:
            return len(frame) < 14 + ihl  # a later fragment: no L4 header to need
    # SCTP: the common header and a chunk's type, within tot_len (0 is no length: passed)
    need = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_ICMP: 8, IPPROTO_SCTP: 16}.get(proto, 0)
    if proto == IPPROTO_SCTP:
        (tot_len,) = struct.unpack_from("!H", frame, 16)
        return len(frame) < 14 + ihl + need or tot_len < ihl + need
    return len(frame) < 14 + ihl + need


def checksums_ok(frame: bytes) -> bool:
    try:
        (tot_len,) = struct.unpack_from("!H", frame, 16)
        if tot_len < 20 or 14 + tot_len > len(frame):
            return False
        return not checksum_errors(frame)
    except (struct.error, IndexError, OSError, ValueError):
        return False


def sane_length(inp: bytes, out: bytes) -> str | None:
    if len(out) < 34:
        return f"output of {len(out)} bytes"
    (tot_len,) = struct.unpack_from("!H", out, 16)
    if 14 + tot_len > len(out):
        return f"tot_len {tot_len} longer than the {len(out)}-byte frame"
    delta = len(out) - len(inp)
    icmp_error = out[23] == IPPROTO_ICMP and inp[23] != IPPROTO_ICMP
    if delta not in (0, 8, -8, 20, -20) and not icmp_error:
        return f"length changed by {delta} bytes"
    return None


class Runner:
    """PROG_TEST_RUN without per-call allocations: one opts struct and one output buffer."""

    def __init__(self, dp: Datapath) -> None:
        self.fds = [dp.progs[p] for p in PROGRAMS]
        self.out = ctypes.create_string_buffer(8192)
        self.opts = _TestRunOpts()
        self.opts.sz = ctypes.sizeof(_TestRunOpts)
        self.opts.data_out = ctypes.cast(self.out, ctypes.c_void_p)
        self.opts.repeat = 1
        self.fn = lib().bpf_prog_test_run_opts

    def run(self, fd: int, frame: bytes) -> tuple[int, bytes] | None:
        """(verdict, output frame); None when the kernel refuses the input (EINVAL: an IPv4 ethertype
        with less than an IPv4 header, which PROG_TEST_RUN rejects before any program runs)."""
        o = self.opts
        o.data_in = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p)
        o.data_size_in = len(frame)
        o.data_size_out = 8192
        ret = self.fn(fd, ctypes.byref(o))
        if ret == -22:
            return None
        if ret < 0:
            raise OSError(-ret, f"PROG_TEST_RUN of a {len(frame)}-byte frame failed")
        return o.retval, self.out.raw[: o.data_size_out]


@dataclass
class Result:
    frames: int = 0
    runs: int = 0
    rewritten: int = 0
    refused: int = 0  # frames PROG_TEST_RUN does not accept
    checked: int = 0
    failures: list[str] = field(default_factory=list)


def fuzz(dp: Datapath, seed: int, n: int) -> Result:
    gen = Gen(seed)
    runner = Runner(dp)
    res = Result()
    progs = list(zip(PROGRAMS, runner.fds, strict=True))
    for i in range(n):
        frame, foreign = gen.frame()
        if foreign is None:
            foreign = is_foreign(frame)
        must_pass = foreign or is_truncated_or_fragment(frame)
        in_ok: bool | None = None
        for name, fd in progs:
            ran = runner.run(fd, frame)
            if ran is None:
                res.refused += 1
                break
            retval, out = ran
            res.runs += 1
            if out == frame:
                if foreign and retval != TC_ACT_OK:
                    res.failures.append(
                        f"frame {i} (foreign) got verdict {retval} from {name}: {frame.hex()}"
                    )
                continue
            if must_pass:
                why = "foreign" if foreign else "truncated/fragment"
                res.failures.append(f"frame {i} ({why}) rewritten by {name} (ret {retval}): {frame.hex()}")
                continue
            res.rewritten += 1
            if in_ok is None:
                in_ok = checksums_ok(frame)
            if not in_ok:
                continue  # incremental updates carry a broken input checksum over; nothing to verify
            res.checked += 1
            bad = sane_length(frame, out)
            if bad is None and fragment_offset(frame):
                # a later fragment: only its addresses change; its bytes are no L4 header to check
                ihl = (out[14] & 0x0F) * 4
                if not ones_sum_ok(out[14 : 14 + ihl]):
                    bad = "IPv4 header checksum of a translated later fragment"
            elif bad is None and not checksums_ok(out):
                bad = "; ".join(checksum_errors(out)) or "bad checksums"
            if bad:
                res.failures.append(
                    f"frame {i} via {name} (ret {retval}): {bad}: in {frame.hex()} out {out.hex()}"
                )
        res.frames += 1
        if len(res.failures) >= MAX_REPORT:
            break
    return res


def run_fuzz(dp: Datapath, label: str, fuzzer: Callable[[Datapath, int, int], Result]) -> None:
    """Run one fuzzer (fuzz or fuzz6) on the populated maps, print its numbers, fail with its failures."""
    t0 = time.monotonic()
    res = fuzzer(dp, SEED, FRAMES)
    dt = time.monotonic() - t0
    print(
        f"{label} seed {SEED}: {res.frames} frames, {res.runs} program runs in {dt:.1f}s "
        f"({res.frames / dt:.0f} frames/s), {res.rewritten} rewrites, {res.checked} checked, "
        f"{res.refused} refused by PROG_TEST_RUN"
    )
    assert not res.failures, f"{label} failures (reproduce with KPROXY_FUZZ_SEED={SEED}):\n" + "\n".join(
        res.failures
    )
    assert res.checked > 0, (
        f"{label} seed {SEED}: no rewritten frame was checked; the generator misses the services"
    )


def test_fuzz_tc_programs(dp: Datapath) -> None:
    populate(dp)
    run_fuzz(dp, "fuzz", fuzz)


def test_generator_is_reproducible() -> None:
    """The seed alone determines the frames: a printed seed reproduces a failure."""
    g1, g2, g3 = Gen(7), Gen(7), Gen(8)
    a = [g1.frame() for _ in range(200)]
    assert a == [g2.frame() for _ in range(200)]
    assert a != [g3.frame() for _ in range(200)]


# ---- IPv6 ----
NODE6 = "fd00:a::1"
NODE2_6 = "fd00:a::2"  # the node of every IPv6 backend (DSR sends there)
IPPROTO_IPV6 = 41  # IPv6-in-IPv6
SVC_CIDR6 = ipaddress.IPv6Network("fd00:96::/108")  # the service CIDR of FRONTENDS6' ClusterIPs
CLIENTS6 = [f"fd00:10:244:1::{i:x}" for i in range(5, 13)]
EXT_CLIENTS6 = ["2001:db8::9", "2001:db8::a"]
BACKENDS6 = [
    Backend(abi.ID6_BASE + i, f"fd00:10:244:{2 + i % 3}::{20 + i:x}", 8080 if i % 2 else 9090)
    for i in range(1, 9)
]
HAIRPIN_BE6 = Backend(abi.ID6_BASE + 9, CLIENTS6[0], 8080, abi.BackendFlag.LOCAL)  # a pod balanced to itself
LB6 = "2001:db8:1::20"
EXT_IP6 = "2001:db8:1::21"
ALLOWED6 = "2001:db8::/96"  # the source range of the LB with SRC_RANGES: EXT_CLIENTS6 inside
B6 = abi.ID6_BASE

FRONTENDS6 = [
    Fe("fd00:96::10", 80, IPPROTO_TCP, 0, (B6 + 1, B6 + 2, B6 + 3), B6 + 1),
    Fe("fd00:96::10", 53, IPPROTO_UDP, 0, (B6 + 4, B6 + 5), B6 + 2),
    Fe("fd00:96::11", 443, IPPROTO_TCP, abi.SvcFlag.AFFINITY, (B6 + 1, B6 + 6), B6 + 3, 10800),
    Fe("fd00:96::12", 80, IPPROTO_TCP, 0, (), B6 + 4),  # no endpoints: ICMPv6 reject
    Fe("fd00:96::13", 5000, IPPROTO_UDP, abi.SvcFlag.NO_LOCAL_DROP, (), B6 + 5),
    Fe(NODE6, NODEPORT, IPPROTO_TCP, abi.SvcFlag.NODEPORT, (B6 + 2, B6 + 7), B6 + 6),
    Fe(NODE6, NODEPORT, IPPROTO_UDP, abi.SvcFlag.NODEPORT, (B6 + 8,), B6 + 7),
    Fe(LB6, 80, IPPROTO_TCP, abi.SvcFlag.LOADBALANCER | abi.SvcFlag.SRC_RANGES, (B6 + 3, B6 + 8), B6 + 8),
    Fe(EXT_IP6, 8443, IPPROTO_TCP, abi.SvcFlag.EXTERNAL_IP | abi.SvcFlag.AFFINITY, (B6 + 5,), B6 + 9, 60),
    Fe("fd00:96::14", 8080, IPPROTO_UDP, 0, (B6 + 9,), B6 + 10),  # hairpin
]

UNIVERSE6 = {addr6(a) for a in [NODE6, LB6, EXT_IP6, abi.HAIRPIN6_ADDR_DEFAULT, *CLIENTS6, *EXT_CLIENTS6]}
UNIVERSE6 |= {addr6(b.addr) for b in BACKENDS6} | {addr6(f.addr) for f in FRONTENDS6}
EXT6 = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT)
IP6_EXT_MAX = 6  # KP_IP6_EXT_MAX: headers the parser walks


# the flows populate6 writes into conntrack: (client, client port, frontend, backend)
LIVE6 = [
    (CLIENTS6[n % len(CLIENTS6)], 41000 + n, fe, next(b for b in BACKENDS6 if b.id == fe.backends[0]))
    for n, fe in enumerate(fe for fe in FRONTENDS6 if fe.backends and fe.svc_id != B6 + 10)
]


def populate6(dp: Datapath, dsr: abi.DsrMode = abi.DsrMode.OFF) -> None:
    """IPv6 services, backends (on NODE2_6), conntrack entries of live flows, affinity, a source range,
    the DSR mode."""
    dp.set_node6(NODE6)
    cfg = abi.Config()
    cfg.dsr_mode = dsr
    dp.cfg.update(ctypes.c_uint32(0), cfg)
    by_id = {b.id: b for b in [*BACKENDS6, HAIRPIN_BE6]}
    for fe in FRONTENDS6:
        dp.add_service6(
            fe.addr,
            fe.port,
            fe.proto,
            [by_id[i] for i in fe.backends],
            flags=int(fe.flags),
            svc_id=fe.svc_id,
            affinity_timeout=fe.affinity,
            node_addr=NODE2_6,
        )
    # the service address space: the ClusterIPs REJECT their unknown ports, the rest of the CIDR drops
    dp.add_svcnet6(str(SVC_CIDR6), abi.SvcnetAction.DROP)
    for addr in sorted({fe.addr for fe in FRONTENDS6 if fe.addr.startswith("fd00:96::")}):
        dp.add_svcnet6(f"{addr}/128", abi.SvcnetAction.REJECT)
    net = ipaddress.IPv6Network(ALLOWED6)
    dp.lbsrc6.update(
        abi.LbSrc6Key(32 + net.prefixlen, B6 + 8, in6(str(net.network_address))), abi.LbSrc4Val(0)
    )
    now = time.monotonic_ns()
    for client, cport, fe, be in LIVE6:
        fwd = abi.Ct6Val()
        fwd.expires_ns, fwd.backend_id, fwd.svc_id = now + 3600 * 10**9, be.id, fe.svc_id
        fwd.nat_addr, fwd.nat_port = in6(be.addr), abi.port_to_nbo(be.port)
        fwd.state = abi.CtState.UDP if fe.proto == IPPROTO_UDP else abi.CtState.ESTABLISHED
        fwd.flags = abi.CtFlag.SEEN_REPLY
        rep = abi.Ct6Val.from_buffer_copy(bytes(fwd))
        rep.nat_addr, rep.nat_port = in6(fe.addr), abi.port_to_nbo(fe.port)
        dp.put_ct6(ct6_key(client, fe.addr, cport, fe.port, fe.proto, abi.CtDir.FWD), fwd)
        dp.put_ct6(ct6_key(be.addr, client, be.port, cport, fe.proto, abi.CtDir.REPLY), rep)
        if fe.affinity:
            dp.put_aff6(client, fe.svc_id, abi.Aff4Val(now, be.id, 0))


class Gen6(Gen):
    """IPv6 frames from one seeded PRNG (Gen's IPv4 methods unused)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.by_id = {b.id: b for b in [*BACKENDS6, HAIRPIN_BE6]}

    def foreign_addr(self) -> str:
        r = self.r
        return f"2001:db8:{r.randrange(0x100, 0xFFFF):x}::{r.randrange(1, 0xFFFF):x}"

    def exts(self) -> list[tuple[int, bytes]]:
        """A random extension-header chain: mostly none or a few, sometimes more than the parser walks;
        fragment headers anywhere, first or later fragments of a few identifications."""
        r = self.r
        x = r.random()
        n = 0 if x < 0.55 else r.randrange(1, 4) if x < 0.9 else r.randrange(4, 10)
        out = []
        for _ in range(n):
            kind = r.choice(EXT6)
            if kind == IPPROTO_FRAGMENT:
                offset = r.choice((0, 0, r.randrange(1, 400), 8191))
                out.append(frag_hdr(offset, r.random() < 0.5, r.choice((1, 2, 0x4242))))
            else:
                out.append(ext(kind, r.choice((0, 0, 1, 2, r.randrange(32))), r.randrange(256)))
        return out

    def l4(self, proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        r = self.r
        if proto == IPPROTO_TCP:
            flags = r.choice(
                (TCP_SYN, TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK, TCP_RST, r.randrange(256))
            )
            return tcp6(src, dst, sport, dport, flags, payload=r.randbytes(r.randrange(0, 64)))
        if proto == IPPROTO_UDP:
            return udp6(src, dst, sport, dport, r.randbytes(r.randrange(0, 64)))
        return r.randbytes(r.randrange(0, 64))

    def packet(self, src: str, dst: str, proto: int, payload: bytes, **kw: object) -> bytes:
        return ether(ipv6(src, dst, proto, payload, **kw), ETH_P_IPV6)  # type: ignore[arg-type]

    def dsr_frame(self, fe: Fe) -> bytes:
        """What an ingress node's DSR sends to a backend's node: client -> backend with DSR's header
        (or without, a later packet), as it is or in IPv6-in-IPv6 to this node (or another)."""
        r = self.r
        client = r.choice(CLIENTS6 + EXT_CLIENTS6)
        be = self.by_id[r.choice(fe.backends)] if fe.backends else r.choice(BACKENDS6)
        sport = r.choice((41000, 41001, r.randrange(1024, 65536)))
        exts = [dsr6_header(fe.addr, fe.port)] if r.random() < 0.8 else []
        if r.random() < 0.2:
            exts += self.exts()
        inner = ipv6(client, be.addr, fe.proto, self.l4(fe.proto, client, be.addr, sport, be.port), exts=exts)
        if r.random() < 0.5:
            return ether(inner, ETH_P_IPV6)
        outer_dst = NODE6 if r.random() < 0.9 else "fd00:a::77"
        return self.packet(
            NODE2_6, outer_dst, IPPROTO_IPV6, inner, exts=self.exts() if r.random() < 0.1 else None
        )

    def service_frame(self) -> tuple[bytes, bool]:
        r = self.r
        fe = r.choice(FRONTENDS6)
        kind = r.randrange(14)
        if kind >= 12:
            return self.dsr_frame(fe), False
        exts = self.exts()
        hlim = r.choice((64, 64, 1, 0, 255))
        if kind < 6:
            src = r.choice(CLIENTS6 + EXT_CLIENTS6)
            sport = r.choice((41000, 41001, 41002, r.randrange(1024, 65536)))
            payload = self.l4(fe.proto, src, fe.addr, sport, fe.port)
            return self.packet(src, fe.addr, fe.proto, payload, exts=exts, hop_limit=hlim), False
        if kind < 9 and fe.backends:
            be = self.by_id[r.choice(fe.backends)]
            dst = r.choice(CLIENTS6 + [abi.HAIRPIN6_ADDR_DEFAULT])
            dport = r.choice((41000, 41001, 41002, 41003, r.randrange(1024, 65536)))
            payload = self.l4(fe.proto, be.addr, dst, be.port, dport)
            return self.packet(be.addr, dst, fe.proto, payload, exts=exts, hop_limit=hlim), False
        if kind == 9:
            # neighbour discovery, echo, ESP, no next header: between addresses kproxy knows
            src, dst = r.choice(CLIENTS6), fe.addr
            if r.random() < 0.5:
                t = r.choice((133, 134, 135, 136, 137, 128, 129))
                msg = icmp6(src, dst, t, 0, 0, r.randbytes(r.randrange(0, 40)))
                return self.packet(src, dst, IPPROTO_ICMPV6, msg, exts=exts, hop_limit=255), False
            proto = r.choice((IPPROTO_ESP, IPPROTO_NONE, 132, 47, r.randrange(256)))
            return self.packet(src, dst, proto, r.randbytes(r.randrange(0, 80)), exts=exts), False
        # an ICMPv6 error from a router (or the backend) about a packet the client sent: mostly of a
        # live flow (populate6), as its backend saw it
        if r.random() < 0.7:
            client, cport, fe, be = r.choice(LIVE6)
            inner_dst, inner_dport = (be.addr, be.port) if r.random() < 0.8 else (fe.addr, fe.port)
        else:
            client, cport = r.choice(CLIENTS6), 41000 + r.randrange(4)
            inner_dst = self.by_id[fe.backends[0]].addr if fe.backends and r.random() < 0.6 else fe.addr
            inner_dport = fe.port
        inner_l4 = self.l4(fe.proto, client, inner_dst, cport, inner_dport)
        inner = ipv6(client, inner_dst, fe.proto, inner_l4, exts=self.exts() if r.random() < 0.3 else None)
        inner = inner[: r.choice((len(inner), len(inner), 48, 60, r.randrange(0, len(inner) + 1)))]
        itype, code, rest = r.choice(
            (
                (ICMP6_DEST_UNREACH, 0, 0),
                (ICMP6_DEST_UNREACH, 1, 0),
                (ICMP6_DEST_UNREACH, 4, 0),
                (ICMP6_PKT_TOOBIG, 0, 1280),
                (ICMP6_TIME_EXCEED, 0, 0),
                (4, 0, r.randrange(64)),
            )
        )
        router = r.choice(("fd00:10:244:2::1", inner_dst))
        msg = icmp6(router, client, itype, code, rest, inner)
        return self.packet(router, client, IPPROTO_ICMPV6, msg, exts=exts), False

    def foreign_frame(self) -> tuple[bytes, bool]:
        r = self.r
        src, dst = self.foreign_addr(), self.foreign_addr()
        proto = r.choice(
            (
                IPPROTO_TCP,
                IPPROTO_UDP,
                IPPROTO_ICMPV6,
                IPPROTO_ESP,
                IPPROTO_NONE,
                132,
                4,
                41,
                r.randrange(256),
            )
        )
        if proto == IPPROTO_ICMPV6:
            payload = icmp6(src, dst, r.randrange(256), r.randrange(16), 0, r.randbytes(r.randrange(0, 60)))
        else:
            payload = self.l4(proto, src, dst, r.randrange(65536), r.randrange(65536))
        return self.packet(src, dst, proto, payload, exts=self.exts(), hop_limit=r.randrange(256)), True

    def random_frame(self) -> tuple[bytes, bool]:
        r = self.r
        n = r.randrange(14, 200) if r.random() < 0.2 else r.randrange(54, 200)
        body = bytearray(r.randbytes(n))
        body[12:14] = b"\x86\xdd"
        if n > 14 and r.random() < 0.8:
            body[14] = 0x60 | (body[14] & 0x0F)
        if n > 54 and r.random() < 0.3:
            body[22:38] = r.choice(sorted(UNIVERSE6))  # a known source, random rest
        return bytes(body), None  # type: ignore[return-value]

    def mutate(self, frame: bytes) -> bytes:
        r = self.r
        b = bytearray(frame)
        for _ in range(r.randrange(1, 3)):
            m = r.randrange(9)
            if m == 0 and len(b) > 14:
                # truncation; below 14 + 40 bytes PROG_TEST_RUN refuses the frame (EINVAL)
                del b[r.randrange(54 if r.random() < 0.8 and len(b) > 54 else 14, len(b)) :]
            elif m == 1 and len(b) >= 20:
                plen = len(b) - 54
                struct.pack_into(
                    "!H",
                    b,
                    18,
                    r.choice((0, 1, 8, plen - 8, plen - 1, plen + 1, 65535, r.randrange(65536))) & 0xFFFF,
                )
            elif m == 2 and len(b) > 20:
                # the fixed header's next header
                b[20] = r.choice((0, 6, 17, 43, 44, 50, 51, 58, 59, 60, 135, 255, r.randrange(256)))
            elif m == 3 and len(b) > 55:
                # an extension header's next header or length
                i = r.choice((54, 55, 62, 63, r.randrange(54, len(b))))
                if i < len(b):
                    b[i] = r.randrange(256)
            elif m == 4 and len(b) > 14:
                i = r.randrange(14, len(b))
                b[i] ^= 1 << r.randrange(8)
            elif m == 5:
                b += r.randbytes(r.randrange(1, 64))  # trailing bytes beyond payload_len
            elif m == 6 and len(b) > 14:
                b[14] = (b[14] & 0x0F) | (r.randrange(16) << 4)  # version
            elif m == 7 and len(b) > 21:
                b[21] = r.choice((0, 1, 255))  # hop limit
            elif m == 8 and len(b) > 54:
                # a fragment header spliced in after the fixed header
                offset = r.choice((0, r.randrange(1, 8192)))
                fh = struct.pack("!BBHI", b[20], 0, (offset << 3) | r.randrange(2), r.choice((1, 2, 0x4242)))
                b[20] = IPPROTO_FRAGMENT
                b[54:54] = fh
                struct.pack_into("!H", b, 18, (struct.unpack_from("!H", b, 18)[0] + 8) & 0xFFFF)
        return bytes(b)


def dsr6_header(addr: str, port: int) -> tuple[int, bytes]:
    """DSR's destination options header (struct kp_dsr6_opt) for frontend addr:port."""
    return IPPROTO_DSTOPTS, bytes(
        [0, abi.DSR6_HDR_LEN // 8 - 1, abi.DSR6_OPT_TYPE, abi.DSR6_OPT_LEN]
    ) + addr6(addr) + struct.pack("!HH", port, 0)


DSR6_START = bytes([abi.DSR6_HDR_LEN // 8 - 1, abi.DSR6_OPT_TYPE, abi.DSR6_OPT_LEN])


def has_dsr6(frame: bytes) -> bool:
    """Whether DSR's header follows the fixed header (where kp_dsr_opt_push6 puts it)."""
    return (
        len(frame) >= 78
        and frame[20] == IPPROTO_DSTOPTS
        and frame[55:58] == bytes([abi.DSR6_HDR_LEN // 8 - 1, abi.DSR6_OPT_TYPE, abi.DSR6_OPT_LEN])
    )


def tunnel_inner(frame: bytes) -> bytes | None:
    """The inner frame of an IPv6-in-IPv6 frame as kp_tunnel_push6 makes them (no extension header)."""
    if len(frame) >= 94 and frame[14] >> 4 == 6 and frame[20] == IPPROTO_IPV6:
        return frame[:14] + frame[54:]
    return None


def is_foreign6(frame: bytes) -> bool:
    """No known address outside, nor in the packet an ICMPv6 error quotes (a router's error about a flow
    kproxy translated concerns it, whoever it is addressed to)."""
    if len(frame) < 54:
        return True
    if frame[22:38] in UNIVERSE6 or frame[38:54] in UNIVERSE6:
        return False
    if has_dsr6(frame):
        return False  # the backend node's side of DSR takes whatever carries its header
    if ipaddress.IPv6Address(frame[38:54]) in SVC_CIDR6:
        return False  # the service address space (populate6): unknown ports rejected, the rest dropped
    w = walk6(frame)
    if w.must_pass or w.proto != IPPROTO_ICMPV6:
        return True
    inner = frame[w.l4_off + 8 + 8 : w.l4_off + 8 + 40]
    return inner[:16] not in UNIVERSE6 and inner[16:] not in UNIVERSE6


@dataclass
class Walk6:
    """What lib/parse6.h makes of a frame: pass (must come out unchanged) or the upper layer's place."""

    must_pass: bool
    proto: int = -1
    l4_off: int = 0
    frag: int = 0  # 0 whole, 1 first fragment, 2 later fragment
    plen: int = 0


def walk6(frame: bytes) -> Walk6:
    """The parser's contract, independently: version 6, payload_len within the frame (0: unknown), at
    most IP6_EXT_MAX extension headers each inside the frame, the upper layer TCP/UDP/ICMPv6 with its
    header inside the frame and payload_len, no first fragment of another protocol, no neighbour
    discovery. A later fragment (offset > 0) ends the walk at its fragment header: it may be translated
    as its first fragment was (kp_frag6_v1), addresses only, or passed, or dropped as its first was."""
    if len(frame) < 54 or frame[14] >> 4 != 6:
        return Walk6(True)
    (plen,) = struct.unpack_from("!H", frame, 18)
    end = 54 + plen if plen else len(frame)
    if plen and end > len(frame):
        return Walk6(True)
    nxt, off, frag_off = frame[20], 54, 0
    for _ in range(IP6_EXT_MAX + 1):
        if nxt not in EXT6:
            break
        if nxt == IPPROTO_FRAGMENT:
            if off + 8 > len(frame):
                return Walk6(True)
            (frag_off,) = struct.unpack_from("!H", frame, off + 2)
            nxt, off = frame[off], off + 8
            if frag_off & 0xFFF8:
                break  # a later fragment: data follows, no headers; its protocol is its first's
        else:
            if off + 2 > len(frame):
                return Walk6(True)
            nxt, off = frame[off], off + (frame[off + 1] + 1) * 8
    else:
        return Walk6(True)
    if off > end:
        return Walk6(True)
    if nxt == IPPROTO_IPV6 and off == 54 and not frag_off and frame[38:54] == addr6(NODE6):
        # DSR's tunnel to this node: kp_from_netdev takes it if the inner packet carries DSR's header
        # or may belong to a DSR tunnel flow (TCP/UDP); any other tunnel passes as it came
        # (and its length is the inner packet's, as kp_tunnel_push6 makes them); any other tunnel
        # passes as it came
        inner = tunnel_inner(frame)
        if (
            inner is not None
            and len(frame) >= 98
            and plen == 40 + struct.unpack_from("!H", inner, 18)[0]
            and (
                inner[20] in (IPPROTO_TCP, IPPROTO_UDP)
                or (inner[20] == IPPROTO_DSTOPTS and inner[55:58] == DSR6_START)
            )
        ):
            return Walk6(False, nxt, off, 0, plen)
        return Walk6(True)
    if frag_off & 0xFFF8:
        return Walk6(False, nxt, off, 2, plen)
    frag = 0
    if frag_off & 1:
        if nxt not in (IPPROTO_TCP, IPPROTO_UDP):
            return Walk6(True)
        frag = 1
    need = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_ICMPV6: 2, IPPROTO_SCTP: 16}.get(nxt)
    if need is None or off + need > len(frame) or (nxt != IPPROTO_ICMPV6 and off + need > end):
        return Walk6(True)
    if nxt == IPPROTO_SCTP and not plen:
        return Walk6(True)  # SCTP needs its length (its CRC covers the packet): not a jumbogram's
    if nxt == IPPROTO_ICMPV6 and 133 <= frame[off] <= 137:
        return Walk6(True)
    return Walk6(False, nxt, off, frag, plen)


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF if total == 0 else total  # +0 and -0 are one value


def fragment_check6(inp: bytes, out: bytes, w: Walk6) -> str | None:
    """A translated fragment: only MACs, hop limit, addresses and (first fragment) the ports and the L4
    checksum may change, keeping the one's complement sum of addresses and L4 bytes."""
    if len(out) != len(inp):
        return f"fragment length changed by {len(out) - len(inp)}"
    allowed = set(range(12)) | {21} | set(range(22, 54))
    if w.frag == 1:
        csum_at = w.l4_off + (16 if w.proto == IPPROTO_TCP else 6)
        allowed |= set(range(w.l4_off, w.l4_off + 4)) | {csum_at, csum_at + 1}
        end = 54 + w.plen if w.plen else len(inp)
        if ones_sum(inp[22:54] + inp[w.l4_off : end]) != ones_sum(out[22:54] + out[w.l4_off : end]):
            return "L4 checksum of a translated first fragment no longer matches its datagram"
    changed = [i for i in range(len(inp)) if inp[i] != out[i] and i not in allowed]
    if changed:
        return f"translated fragment changed at bytes {changed[:8]}"
    return None


def checksums_ok6(frame: bytes) -> bool:
    inner = tunnel_inner(frame)
    if inner is not None:
        return checksums_ok6(inner)
    try:
        (plen,) = struct.unpack_from("!H", frame, 18)
        if plen == 0 or 54 + plen > len(frame):
            return False
        w = walk6(frame)
        if w.must_pass or w.frag or w.proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6):
            return False
        if w.proto == IPPROTO_UDP and frame[w.l4_off + 6 : w.l4_off + 8] == b"\0\0":
            return False  # no checksum: invalid in IPv6, nothing to verify
        return not checksum_errors6(frame)
    except (struct.error, IndexError, OSError, ValueError):
        return False


def sane_length6(inp: bytes, out: bytes) -> str | None:
    if len(out) < 54:
        return f"output of {len(out)} bytes"
    (plen,) = struct.unpack_from("!H", out, 18)
    if 54 + plen > len(out):
        return f"payload_len {plen} longer than the {len(out)}-byte frame"
    w = walk6(inp)
    # REJECT (no backend, or a ClusterIP's unknown port or protocol: an echo request too)
    reject = out[20] == IPPROTO_ICMPV6 and (
        w.proto != IPPROTO_ICMPV6 or (len(inp) > w.l4_off and inp[w.l4_off] == 128 and len(out) != len(inp))
    )
    if reject:
        if (out[54], out[55]) != (ICMP6_DEST_UNREACH, 4) or len(out) > 14 + 40 + 8 + 124:
            return f"ICMPv6 error {out[54]}/{out[55]} of {len(out)} bytes"
    elif len(out) - len(inp) != dsr_bytes(out) - dsr_bytes(inp):
        return f"length changed by {len(out) - len(inp)} bytes"
    return None


def dsr_bytes(frame: bytes) -> int:
    """The bytes DSR adds to a frame: a tunnel's header and DSR's header (in the tunnel or not)."""
    inner = tunnel_inner(frame)
    if inner is not None:
        return 40 + dsr_bytes(inner)
    return abi.DSR6_HDR_LEN if has_dsr6(frame) else 0


def fuzz6(dp: Datapath, seed: int, n: int) -> Result:
    gen = Gen6(seed)
    runner = Runner(dp)
    res = Result()
    progs = list(zip(PROGRAMS, runner.fds, strict=True))
    for i in range(n):
        frame, foreign = gen.frame()
        if foreign is None:
            foreign = is_foreign6(frame)
        w = walk6(frame)
        must_pass = foreign or w.must_pass
        in_ok: bool | None = None
        for name, fd in progs:
            ran = runner.run(fd, frame)
            if ran is None:
                res.refused += 1
                if len(frame) >= 54:
                    res.failures.append(
                        f"frame {i}: PROG_TEST_RUN refused a {len(frame)}-byte frame: {frame.hex()}"
                    )
                break
            retval, out = ran
            res.runs += 1
            if must_pass:
                if (retval, out) != (TC_ACT_OK, frame):
                    why = "foreign" if foreign else "must pass"
                    res.failures.append(
                        f"frame {i} ({why}) got verdict {retval} from {name}, "
                        f"{'unchanged' if out == frame else 'rewritten'}: in {frame.hex()} out {out.hex()}"
                    )
                continue
            if out == frame:
                continue
            res.rewritten += 1
            if w.frag and not (w.frag == 1 and len(out) > 20 and out[20] == IPPROTO_ICMPV6):
                # a fragment of a DSR IPv6-in-IPv6 flow is sent in the tunnel: its inner frame is checked
                bad = fragment_check6(frame, tunnel_inner(out) or out, w)
                res.checked += 1
            else:
                if in_ok is None:
                    # a first fragment answered port unreachable: the answer is checked, not the input
                    in_ok = checksums_ok6(frame) or w.frag == 1
                if not in_ok:
                    continue
                res.checked += 1
                bad = sane_length6(frame, out)
                errors = checksum_errors6(tunnel_inner(out) or out)
                if bad is None and errors:
                    bad = "; ".join(errors)
            if bad:
                res.failures.append(
                    f"frame {i} via {name} (ret {retval}): {bad}: in {frame.hex()} out {out.hex()}"
                )
        res.frames += 1
        if len(res.failures) >= MAX_REPORT:
            break
    return res


@pytest.mark.parametrize("dsr", list(abi.DsrMode), ids=lambda m: m.name.lower())
def test_fuzz_tc_programs_ipv6(dp: Datapath, dsr: abi.DsrMode) -> None:
    populate6(dp, dsr)
    run_fuzz(dp, f"fuzz6 dsr {dsr.name.lower()}", fuzz6)


def test_walk6_agrees_with_hand_made_cases() -> None:
    """The fuzzer's oracle itself, on frames whose fate test_bpf_ipv6.py pins down."""
    src, dst = CLIENTS6[0], FRONTENDS6[0].addr
    seg = tcp6(src, dst, 1, 80)

    def frame(**kw: object) -> bytes:
        return ether(ipv6(src, dst, kw.pop("proto", IPPROTO_TCP), kw.pop("payload", seg), **kw), ETH_P_IPV6)  # type: ignore[arg-type]

    assert not walk6(frame()).must_pass
    assert not walk6(frame(exts=[ext(IPPROTO_DSTOPTS)] * 6)).must_pass
    assert walk6(frame(exts=[ext(IPPROTO_DSTOPTS)] * 7)).must_pass
    assert walk6(frame(proto=IPPROTO_ESP)).must_pass
    assert walk6(frame(payload_len=len(seg) + 8)).must_pass
    assert walk6(frame()[:-1]).must_pass
    assert walk6(frame(proto=IPPROTO_ICMPV6, payload=icmp6(src, dst, 135, 0))).must_pass
    assert walk6(frame(proto=IPPROTO_ICMPV6, payload=b"\x80\0\0\0", exts=[frag_hdr(0, True)])).must_pass
    assert walk6(frame(exts=[frag_hdr(5, False)])).frag == 2
    assert walk6(frame(exts=[ext(IPPROTO_HOPOPTS), frag_hdr(0, True)])).frag == 1


def test_generator6_is_reproducible() -> None:
    g1, g2, g3 = Gen6(7), Gen6(7), Gen6(8)
    a = [g1.frame() for _ in range(200)]
    assert a == [g2.frame() for _ in range(200)]
    assert a != [g3.frame() for _ in range(200)]


# The builders below are re-exported for ad-hoc reproduction in a REPL.
__all__ = ["Gen", "Gen6", "fuzz", "fuzz6", "populate", "populate6", "tcp_frame", "udp_frame"]
