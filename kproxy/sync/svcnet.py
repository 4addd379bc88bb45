"""The service address space -> kp_svcnet4_v1 / kp_svcnet6_v1 (LPM tries) and their spans, for packets
that match no frontend.

kube-proxy's nftables mode ends its service lookup with the cluster-ips-check chain: a packet opening a
flow to a ClusterIP on a port or protocol no Service port has is rejected (ICMP port unreachable), one
to any other address of a service CIDR is dropped (nothing is allocated there). The datapath does the
same (bpfsrc/lib/svcnet.h) from these tries, one per family:
  - every ClusterIP of a Service kproxy serves (with ports): /32 or /128, REJECT;
  - every service CIDR (ServiceCIDR objects, --service-cidr): DROP;
  - every ClusterIP of a Service another proxy serves (service-proxy-name label): /32 or /128, PASS;
and skips the lookup for destinations outside the span: the lowest and highest address of all
entries (IPv6: of their upper 64 bits, which a service CIDR's addresses share).

The store counts Services per ClusterIP and remembers which addresses changed; a sync writes only
those, after the frontends of the same sync: a packet to a new frontend finds the frontend first, and
a REJECT entry that outlives its Service by a moment answers what kube-proxy answers then.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kproxy import abi
from kproxy.bpf.mapapi import MapFullError, MapOps
from kproxy.heap import compact_dicts

log = logging.getLogger(__name__)

# A trie key as an int: prefixlen << BITS | address (IPv4: the address in network byte order, as the
# map holds it, so that 10,000s of /32 entries cost no conversion; IPv6: the address as an integer).
Key = int
_REJECT = int(abi.SvcnetAction.REJECT)
_DROP = int(abi.SvcnetAction.DROP)
_PASS = int(abi.SvcnetAction.PASS)
_ZERO_KEY = abi.SVCNET_SPAN_KEY


class ClusterView(Protocol):
    """What ServiceSpaceSync reads of the cluster view (kproxy.store.ClusterStore)."""

    @property
    def cluster_ips(self) -> Mapping[str, int]: ...
    @property
    def foreign_cluster_ips(self) -> Mapping[str, int]: ...  # of Services another proxy serves

    cluster_ips_changed: set[str]
    service_cidrs_version: int

    @property
    def service_cidrs(self) -> list[str]: ...

    def take_cluster_ips_changed(self) -> set[str]: ...


@dataclass(frozen=True)
class _Fam:
    """How one family's trie keys and span are made."""

    name: str
    bits: int  # host prefix length
    is_mine: Callable[[str], bool]  # an address or CIDR text of this family
    addr_key: Callable[[str], int]  # address text -> the key's address part
    key_text: Callable[[int], str]  # the key's address part -> text
    bounds: Callable[[Key], tuple[int, int]]  # lowest and highest span value a key covers
    pack_key: Callable[[Key], bytes]
    pack_span: Callable[[int, int], bytes]
    entry_key: Callable[[Any], Key]  # a trie key read back (adopt)
    no_span: tuple[int, int]  # lo > hi: no entry

    def host(self, ip: str) -> Key:
        return self.bits << self.bits | self.addr_key(ip)

    def cidr(self, cidr: str) -> Key:
        net = ipaddress.ip_network(cidr, strict=False)
        return net.prefixlen << self.bits | self.addr_key(str(net.network_address))


_M32 = 0xFFFFFFFF
_M128 = (1 << 128) - 1


def _bounds4(key: Key) -> tuple[int, int]:
    plen, nbo = key >> 32, key & _M32
    lo = abi.nbo_to_hbo(nbo)
    return lo, lo | ((1 << (32 - plen)) - 1)


def _bounds6(key: Key) -> tuple[int, int]:
    plen, addr = key >> 128, key & _M128
    return addr >> 64, (addr | ((1 << (128 - plen)) - 1)) >> 64


FAM4 = _Fam(
    name="IPv4",
    bits=32,
    is_mine=lambda text: ":" not in text,
    addr_key=abi.ip_to_nbo,
    key_text=abi.nbo_to_ip,
    bounds=_bounds4,
    pack_key=lambda k: abi.pack_svcnet4_key(k >> 32, k & _M32),
    pack_span=abi.pack_svcnet_span,
    entry_key=lambda k: k.prefixlen << 32 | k.addr,
    no_span=(_M32, 0),
)
FAM6 = _Fam(
    name="IPv6",
    bits=128,
    is_mine=lambda text: ":" in text,
    addr_key=lambda text: int(ipaddress.IPv6Address(text)),
    key_text=lambda a: str(ipaddress.IPv6Address(a)),
    bounds=_bounds6,
    pack_key=lambda k: abi.pack_svcnet6_key(k >> 128, (k & _M128).to_bytes(16, "big")),
    pack_span=abi.pack_svcnet6_span,
    entry_key=lambda k: k.prefixlen << 128 | int.from_bytes(bytes(k.addr), "big"),
    no_span=((1 << 64) - 1, 0),
)


class FamilySpace:
    """One family's trie and span, kept equal to the store's ClusterIPs and service CIDRs of it."""

    def __init__(self, fam: _Fam, trie: MapOps[Any, Any], span: MapOps[Any, Any]) -> None:
        self.fam = fam
        self.trie = trie
        self.span_map = span
        self.programmed: dict[Key, int] = {}  # key -> action
        # how many programmed keys start / end at each span value: the span is (min, max) of them, kept
        # without a pass over the entries (IPv6 ClusterIPs all share their CIDR's upper 64 bits)
        self._los: Counter[int] = Counter()
        self._his: Counter[int] = Counter()
        self._cidrs: set[Key] = set()  # the service CIDRs as keys (DROP unless a ClusterIP is there)
        self._cidrs_version = -1
        self._span: tuple[int, int] | None = fam.no_span  # as written; None: unknown (rewritten)
        self._full_pending = False  # a full sync failed: the next one is full again
        self.errors = 0

    def adopt(self) -> None:
        """Rebuild the programmed view from the trie (the next full sync removes what is stale). The
        span map is rewritten from the entries on the next sync: one the loader just created reads as
        zeros, which is no span at all."""
        entry_key = self.fam.entry_key
        self.programmed = {entry_key(k): int(v.action) for k, v in self.trie.items()}
        self._los, self._his = Counter(), Counter()
        for k in self.programmed:
            self._count(k, 1)
        self._span = None

    def _count(self, key: Key, n: int) -> None:
        lo, hi = self.fam.bounds(key)
        for counts, v in ((self._los, lo), (self._his, hi)):
            counts[v] += n
            if counts[v] <= 0:
                del counts[v]

    def _current_span(self, extra: Sequence[Key] = ()) -> tuple[int, int]:
        """(lo, hi) of the programmed keys and EXTRA; no_span if none."""
        lo, hi = (min(self._los), max(self._his)) if self._los else self.fam.no_span
        for k in extra:
            klo, khi = self.fam.bounds(k)
            lo, hi = min(lo, klo), max(hi, khi)
        return lo, hi

    def _write_span(self, span: tuple[int, int]) -> None:
        if span != self._span:
            self.span_map.put_many([(_ZERO_KEY, self.fam.pack_span(*span))])
            self._span = span

    def sync(self, store: ClusterView, changed: set[str], full: bool = False) -> int:
        """Write what changed of this family: CHANGED (its ClusterIPs whose count changed) and the
        service CIDRs (everything if `full`, or if the last full sync failed). Returns the number of
        entries written or deleted. What could not be written (a write error, a full map) is handed back
        to the store for the next sync."""
        fam = self.fam
        full = full or self._full_pending
        cidrs_changed = full or store.service_cidrs_version != self._cidrs_version
        if not (changed or cidrs_changed or self._span is None):
            return 0
        cluster_ips = store.cluster_ips
        foreign = store.foreign_cluster_ips
        new_cidrs = self._cidrs
        considered: set[Key] = set()
        if cidrs_changed:
            new_cidrs = {fam.cidr(c) for c in store.service_cidrs if fam.is_mine(c)}
            considered |= self._cidrs | new_cidrs
        if full:
            considered |= set(self.programmed)
            considered |= {fam.host(ip) for ip in cluster_ips if fam.is_mine(ip)}
            considered |= {fam.host(ip) for ip in foreign if fam.is_mine(ip)}
        else:
            considered |= {fam.host(ip) for ip in changed}
        host_plen = fam.bits
        mask = (1 << fam.bits) - 1
        want: dict[Key, int] = {}
        for key in considered:
            if key >> fam.bits == host_plen:
                ip = fam.key_text(key & mask)
                if cluster_ips.get(ip):
                    want[key] = _REJECT  # a ClusterIP (also when a host-sized service CIDR says the same)
                    continue
                if foreign.get(ip):
                    want[key] = _PASS  # another proxy's: its traffic is not ours to judge
                    continue
            if key in new_cidrs:
                want[key] = _DROP
        puts = [(k, a) for k, a in want.items() if self.programmed.get(k) != a]
        dels = [k for k in considered if k not in want and k in self.programmed]
        complete = True
        if puts:
            room = self.trie.max_entries - (len(self.programmed) - len(dels))  # the deletes go first
            fresh = [(k, a) for k, a in puts if k not in self.programmed]
            if len(fresh) > room:
                self.errors += 1
                complete = False
                log.error(
                    "map %s is full (%d entries): %d service addresses not written, packets to their "
                    "unknown ports pass; retried on the next change", self.trie.name, self.trie.max_entries,
                    len(fresh) - max(room, 0),
                )  # fmt: skip
                puts = [(k, a) for k, a in puts if k in self.programmed] + fresh[: max(room, 0)]
        pack_key, pack_val = fam.pack_key, abi.pack_svcnet4_val
        try:
            # deletes first (their room is what the new entries may need), then the span widened to the
            # new entries before a packet can match them, then the entries, then the span narrowed
            if dels:
                self.trie.delete_many([pack_key(k) for k in dels])
                for k in dels:
                    del self.programmed[k]
                    self._count(k, -1)
            if puts:
                new = [k for k, _ in puts if k not in self.programmed]
                self._write_span(self._current_span(new))
                self.trie.put_many([(pack_key(k), pack_val(a)) for k, a in puts])
                for k in new:
                    self._count(k, 1)
                self.programmed.update(puts)
            self._write_span(self._current_span())
        except (OSError, MapFullError) as err:
            self.errors += 1
            log.error(
                "writing the %s service address space failed (retried on the next change): %s", fam.name, err
            )
            store.cluster_ips_changed |= changed
            self._full_pending = self._full_pending or full
            self.adopt()  # what the map holds now, whatever part of the batch went in
            return 0
        if complete:
            self._cidrs = new_cidrs
            self._cidrs_version = store.service_cidrs_version
            self._full_pending = False
        else:
            store.cluster_ips_changed |= changed
        log.debug("%s service address space: %d written, %d deleted", fam.name, len(puts), len(dels))
        return len(puts) + len(dels)

    @property
    def cidrs_version(self) -> int:
        return self._cidrs_version

    @property
    def span(self) -> tuple[int, int] | None:
        """The span as written (IPv4: addresses, IPv6: upper 64 bits, host byte order); None if empty."""
        lo, hi = self._span if self._span is not None else self.fam.no_span
        return None if lo > hi else (lo, hi)

    def entries(self) -> dict[str, str]:
        """CIDR -> "reject" | "drop" | "pass"."""
        fam, mask = self.fam, (1 << self.fam.bits) - 1
        out = {}
        for k, a in sorted(self.programmed.items(), key=lambda kv: (fam.bounds(kv[0]), kv[0])):
            out[f"{fam.key_text(k & mask)}/{k >> fam.bits}"] = abi.SvcnetAction(a).name.lower()
        return out


class ServiceSpaceSync:
    """Both families' service address spaces: kp_svcnet4_v1 and, when the maps have it (an older
    agent's bpffs may not), kp_svcnet6_v1."""

    def __init__(
        self,
        trie: MapOps[Any, Any],
        span: MapOps[Any, Any],
        trie6: MapOps[Any, Any] | None = None,
        span6: MapOps[Any, Any] | None = None,
    ) -> None:
        self.v4 = FamilySpace(FAM4, trie, span)
        self.v6 = FamilySpace(FAM6, trie6, span6) if trie6 is not None and span6 is not None else None

    @property
    def families(self) -> list[FamilySpace]:
        return [self.v4] if self.v6 is None else [self.v4, self.v6]

    def adopt(self) -> None:
        for f in self.families:
            f.adopt()

    def sync(self, store: ClusterView, full: bool = False) -> int:
        """Write what changed in the store's ClusterIPs and service CIDRs, both families (everything if
        `full`). Returns the number of entries written or deleted."""
        changed = store.take_cluster_ips_changed()
        v6 = {ip for ip in changed if ":" in ip}
        n = self.v4.sync(store, changed - v6, full)
        if self.v6 is not None:
            n += self.v6.sync(store, v6, full)
        return n

    @property
    def cidrs_version(self) -> int:
        """The store's service_cidrs_version last written by every family."""
        return min(f.cidrs_version for f in self.families)

    @property
    def errors(self) -> int:
        return sum(f.errors for f in self.families)

    @property
    def span(self) -> tuple[str, str] | None:
        """The IPv4 span as addresses, None if empty."""
        s = self.v4.span
        return None if s is None else (str(ipaddress.IPv4Address(s[0])), str(ipaddress.IPv4Address(s[1])))

    def entries(self) -> dict[str, str]:
        """CIDR -> "reject" | "drop" | "pass", IPv4 first, for the CLI and tests."""
        out: dict[str, str] = {}
        for f in self.families:
            out.update(f.entries())
        return out

    def compact(self) -> int:
        """Shrink the programmed views that deletions left oversized; the bytes saved."""
        return compact_dicts(*(f.programmed for f in self.families))
