"""A loaded kproxy_tc object with typed helpers to set maps up, run programs and read results.

Loads the object with its maps pinned in a private bpffs mount (never /sys/fs/bpf) through the
project's libbpf binding, so these tests exercise the same loading path as the agent.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kproxy import abi
from kproxy.bpf.libbpf import BpfObject, Map, TestRun, prog_test_run
from kproxy.bpf.maps import MaglevMap

OBJECT = Path(__file__).resolve().parents[2] / "kproxy" / "bpf" / "obj" / "kproxy_tc.bpf.o"
PROGRAMS = ("kp_from_pod", "kp_to_pod", "kp_from_netdev", "kp_to_netdev")  # the TC programs

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


@dataclass(frozen=True)
class Backend:
    id: int
    addr: str
    port: int
    flags: int = 0


def ct_key(saddr: str, daddr: str, sport: int, dport: int, proto: int, direction: abi.CtDir) -> abi.Ct4Key:
    k = abi.Ct4Key()
    k.saddr, k.daddr = abi.ip_to_nbo(saddr), abi.ip_to_nbo(daddr)
    k.sport, k.dport = abi.port_to_nbo(sport), abi.port_to_nbo(dport)
    k.proto, k.dir = proto, direction
    return k


def in6(text: str) -> ctypes.Array[ctypes.c_uint8]:
    return abi.In6.from_buffer_copy(abi.ip6_to_bytes(text))


def ct6_key(saddr: str, daddr: str, sport: int, dport: int, proto: int, direction: abi.CtDir) -> abi.Ct6Key:
    return abi.Ct6Key(
        in6(saddr), in6(daddr), abi.port_to_nbo(sport), abi.port_to_nbo(dport), proto, direction
    )


@contextmanager
def private_bpffs() -> Iterator[str]:
    """A bpffs instance of our own in a temporary directory, unmounted and removed afterwards."""
    path = tempfile.mkdtemp(prefix="kpt-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)


class Datapath:
    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.svc4 = obj.map(abi.MAP_SVC4)
        self.be4 = obj.map(abi.MAP_BE4)
        self.ct4 = obj.map(abi.MAP_CT4)
        self.aff4 = obj.map(abi.MAP_AFF4)
        self.cfg = obj.map(abi.MAP_CFG)
        self.stats = obj.map(abi.MAP_STATS)
        self.stats6 = obj.map(abi.MAP_STATS6)
        self.snat4 = obj.map(abi.MAP_SNAT4)
        self.svcnet4 = obj.map(abi.MAP_SVCNET4)
        self.svcnet_span = obj.map(abi.MAP_SVCNET_SPAN)
        self.svc6 = obj.map(abi.MAP_SVC6)
        self.be6 = obj.map(abi.MAP_BE6)
        self.ct6_map = obj.map(abi.MAP_CT6)
        self.aff6_map = obj.map(abi.MAP_AFF6)
        self.cfg6 = obj.map(abi.MAP_CFG6)
        self.lbsrc4 = obj.map(abi.MAP_LBSRC4)
        self.lbsrc6 = obj.map(abi.MAP_LBSRC6)
        self.xnew = obj.map(abi.MAP_XNEW)
        self.xdevs = obj.map(abi.MAP_XDEVS)
        self.frag6 = obj.map(abi.MAP_FRAG6)
        self.snat6 = obj.map(abi.MAP_SNAT6)
        self.svcnet6 = obj.map(abi.MAP_SVCNET6)
        self.svcnet6_span = obj.map(abi.MAP_SVCNET6_SPAN)
        self.maglev = MaglevMap(obj.map(abi.MAP_MAGLEV))
        self.progs = {name: obj.program(name).fd for name in PROGRAMS}
        for name in ("kp_xdp", "kp_xdp_new", "kp_xdp_new6"):
            self.progs[name] = obj.program(name).fd

    # ---- set-up ----
    def reset(self) -> None:
        for m in (
            self.svc4, self.be4, self.ct4, self.aff4, self.snat4, self.svcnet4, self.lbsrc4, self.xdevs,
            self.svc6, self.be6, self.ct6_map, self.aff6_map, self.lbsrc6, self.frag6, self.snat6,
            self.svcnet6,
        ):  # fmt: skip
            for key in list(m.iter_keys()):
                m.delete(key)
        self.maglev.delete_tables([int.from_bytes(k, "little") for k in self.maglev.map.iter_keys()])
        self.cfg.update(ctypes.c_uint32(0), abi.Config())
        self.cfg6.update(ctypes.c_uint32(0), abi.Config6())
        self.svcnet_span.update(ctypes.c_uint32(0), abi.SvcnetSpan(0xFFFFFFFF, 0))
        self.svcnet6_span.update(ctypes.c_uint32(0), abi.Svcnet6Span((1 << 64) - 1, 0))
        zero = bytes(self.stats.user_value_size)
        for i in range(abi.STAT_MAX):
            self.stats.update(ctypes.c_uint32(i), zero)
            self.stats6.update(ctypes.c_uint32(i), zero)

    def add_backends(self, backends: Iterable[Backend], proto: int) -> None:
        for b in backends:
            v = abi.Be4Val(abi.ip_to_nbo(b.addr), abi.port_to_nbo(b.port), proto, b.flags, 0)
            self.be4.update(ctypes.c_uint32(b.id), v)

    def add_service(
        self,
        addr: str,
        port: int,
        proto: int,
        backends: list[Backend],
        *,
        flags: int = 0,
        svc_id: int = 1,
        scope: abi.Scope = abi.Scope.EXT,
        affinity_timeout: int = 0,
    ) -> None:
        """Frontend slot 0 + slots 1..n + the backends, in the agent's write order."""
        self.add_backends(backends, proto)
        for slot, b in enumerate(backends, start=1):
            self.svc4.update(self.svc_key(addr, port, proto, scope, slot), abi.Svc4Val(b.id, svc_id, 0, 0, 0))
        val = abi.Svc4Val(0, svc_id, len(backends), flags, affinity_timeout)
        self.svc4.update(self.svc_key(addr, port, proto, scope, 0), val)

    def add_svcnet(self, cidr: str, action: abi.SvcnetAction) -> None:
        """A service address space entry, the span widened to cover it (as kproxy.sync.svcnet writes them)."""
        net = ipaddress.IPv4Network(cidr)
        self.svcnet4.update(
            abi.Svcnet4Key(net.prefixlen, abi.ip_to_nbo(str(net.network_address))), abi.Svcnet4Val(action)
        )
        raw = self.svcnet_span.lookup(ctypes.c_uint32(0))
        span = abi.SvcnetSpan.from_buffer_copy(raw) if raw else abi.SvcnetSpan(0xFFFFFFFF, 0)
        lo, hi = int(net.network_address), int(net.broadcast_address)
        self.svcnet_span.update(ctypes.c_uint32(0), abi.SvcnetSpan(min(span.lo, lo), max(span.hi, hi)))

    def add_svcnet6(self, cidr: str, action: abi.SvcnetAction) -> None:
        """add_svcnet for IPv6: kp_svcnet6_v1, its span over the upper 64 bits widened to cover it."""
        net = ipaddress.IPv6Network(cidr)
        self.svcnet6.update(
            abi.Svcnet6Key(net.prefixlen, in6(str(net.network_address))), abi.Svcnet4Val(action)
        )
        raw = self.svcnet6_span.lookup(ctypes.c_uint32(0))
        span = abi.Svcnet6Span.from_buffer_copy(raw) if raw else abi.Svcnet6Span((1 << 64) - 1, 0)
        lo, hi = int(net.network_address) >> 64, int(net.broadcast_address) >> 64
        self.svcnet6_span.update(ctypes.c_uint32(0), abi.Svcnet6Span(min(span.lo, lo), max(span.hi, hi)))

    @staticmethod
    def svc_key(addr: str, port: int, proto: int, scope: abi.Scope, slot: int) -> abi.Svc4Key:
        k = abi.Svc4Key()
        k.addr, k.port, k.slot, k.proto, k.scope = (
            abi.ip_to_nbo(addr),
            abi.port_to_nbo(port),
            slot,
            proto,
            scope,
        )
        return k

    # ---- IPv6 set-up ----
    def add_service6(
        self,
        addr: str,
        port: int,
        proto: int,
        backends: list[Backend],
        *,
        flags: int = 0,
        svc_id: int = abi.ID6_BASE + 1,
        scope: abi.Scope = abi.Scope.EXT,
        affinity_timeout: int = 0,
        node_addr: str = "::",
    ) -> None:
        """add_service for kp_svc6_v1 / kp_be6_v1 (Backend.addr IPv6; node_addr: their node's address)."""
        for b in backends:
            v = abi.Be6Val(in6(b.addr), abi.port_to_nbo(b.port), proto, b.flags, in6(node_addr))
            self.be6.update(ctypes.c_uint32(b.id), v)
        for slot, b in enumerate(backends, start=1):
            self.svc6.update(
                self.svc6_key(addr, port, proto, scope, slot), abi.Svc4Val(b.id, svc_id, 0, 0, 0)
            )
        val = abi.Svc4Val(0, svc_id, len(backends), flags, affinity_timeout)
        self.svc6.update(self.svc6_key(addr, port, proto, scope, 0), val)

    @staticmethod
    def svc6_key(addr: str, port: int, proto: int, scope: abi.Scope, slot: int) -> abi.Svc6Key:
        return abi.Svc6Key(in6(addr), abi.port_to_nbo(port), slot, proto, scope)

    def set_node6(self, node_addr: str = "::", hairpin: str = "::") -> None:
        self.cfg6.update(ctypes.c_uint32(0), abi.Config6(in6(node_addr), in6(hairpin)))

    def ct6(self, key: abi.Ct6Key) -> abi.Ct6Val | None:
        raw = self.ct6_map.lookup(key)
        return abi.Ct6Val.from_buffer_copy(raw) if raw is not None else None

    def aff6(self, client: str, svc_id: int) -> abi.Aff4Val | None:
        raw = self.aff6_map.lookup(abi.Aff6Key(in6(client), svc_id))
        return abi.Aff4Val.from_buffer_copy(raw) if raw is not None else None

    def put_ct6(self, key: abi.Ct6Key, val: abi.Ct6Val) -> None:
        self.ct6_map.update(key, val)

    def ct6_entries(self) -> dict[bytes, abi.Ct6Val]:
        return {
            bytes(k): abi.Ct6Val.from_buffer_copy(self.ct6_map.lookup(k) or b"")
            for k in self.ct6_map.iter_keys()
        }

    def put_aff6(self, client: str, svc_id: int, val: abi.Aff4Val) -> None:
        self.aff6_map.update(abi.Aff6Key(in6(client), svc_id), val)

    def add_backends6(self, backends: Iterable[Backend], proto: int) -> None:
        """kp_be6_v1 entries only (no frontend slot names them)."""
        for b in backends:
            v = abi.Be6Val(in6(b.addr), abi.port_to_nbo(b.port), proto, b.flags, in6("::"))
            self.be6.update(ctypes.c_uint32(b.id), v)

    # ---- running ----
    def run(self, prog: str, frame: bytes) -> TestRun:
        return prog_test_run(self.progs[prog], frame)

    # ---- results ----
    def ct(self, key: abi.Ct4Key) -> abi.Ct4Val | None:
        raw = self.ct4.lookup(key)
        return abi.Ct4Val.from_buffer_copy(raw) if raw is not None else None

    def put_ct(self, key: abi.Ct4Key, val: abi.Ct4Val) -> None:
        self.ct4.update(key, val)

    def ct_entries(self) -> dict[bytes, abi.Ct4Val]:
        return {k: abi.Ct4Val.from_buffer_copy(self.ct4.lookup(k) or b"") for k in self.ct4.iter_keys()}

    def aff(self, client: str, svc_id: int) -> abi.Aff4Val | None:
        raw = self.aff4.lookup(abi.Aff4Key(abi.ip_to_nbo(client), svc_id))
        return abi.Aff4Val.from_buffer_copy(raw) if raw is not None else None

    def stat(self, stat: abi.Stat, family: int | None = None) -> tuple[int, int]:
        """(packets, bytes) of one counter summed over CPUs, of both families (kp_stats_v1 and
        kp_stats6_v1) or of FAMILY (4 or 6)."""
        maps = {4: [self.stats], 6: [self.stats6], None: [self.stats, self.stats6]}[family]
        packets = bytes_ = 0
        for m in maps:
            raw = m.lookup(ctypes.c_uint32(stat)) or b""
            for cpu in range(m.ncpus):
                c = abi.Counter.from_buffer_copy(raw, cpu * m.value_stride)
                packets += c.packets
                bytes_ += c.bytes
        return packets, bytes_


def open_datapath(bpffs: str, path: Path = OBJECT) -> tuple[BpfObject, Datapath]:
    obj = BpfObject.open(path, pin_root_path=bpffs)
    try:
        obj.load()
        return obj, Datapath(obj)
    except BaseException:
        obj.close()
        raise


__all__ = ["Backend", "Datapath", "Map", "ct6_key", "ct_key", "in6", "open_datapath", "private_bpffs"]
