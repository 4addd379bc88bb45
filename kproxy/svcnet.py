"""The service address space -> kp_svcnet4_v1 (LPM trie) and kp_svcnet_span_v1, for packets that match
no frontend.

kube-proxy's nftables mode ends its service lookup with the cluster-ips-check chain: a packet opening a
flow to a ClusterIP on a port or protocol no Service port has is rejected (ICMP port unreachable), one
to any other address of a service CIDR is dropped (nothing is allocated there). The datapath does the
same (bpfsrc/lib/svcnet.h) from this trie:
  - every IPv4 ClusterIP of a Service kproxy serves (with ports): /32, REJECT;
  - every IPv4 service CIDR (ServiceCIDR objects, --service-cidr): DROP;
and skips the lookup for destinations outside the span (lowest and highest address of all entries).

The store counts Services per ClusterIP and remembers which addresses changed; a sync writes only
those, after the frontends of the same sync: a packet to a new frontend finds the frontend first, and
a REJECT entry that outlives its Service by a moment answers what kube-proxy answers then.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import struct
from typing import Any, Protocol

from kproxy.bpf import abi
from kproxy.bpf.mapapi import MapFullError, MapOps

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (prefixlen, network address NBO)
_PACK_KEY = struct.Struct("=II").pack
_PACK_VAL = struct.Struct("=I").pack
_PACK_SPAN = struct.Struct("=II").pack
_REJECT = int(abi.SvcnetAction.REJECT)
_DROP = int(abi.SvcnetAction.DROP)
_ZERO_KEY = struct.pack("=I", 0)
_EMPTY_SPAN = (0xFFFFFFFF, 0)  # lo > hi: no entry


class ClusterView(Protocol):
    """What ServiceSpaceSync reads of kproxy.store.ClusterStore."""

    cluster_ips: Any  # Mapping[str, int]
    service_cidrs_version: int

    @property
    def service_cidrs(self) -> list[str]: ...

    def take_cluster_ips_changed(self) -> set[str]: ...


def _nbo(address: str) -> int:
    return abi.ip_to_nbo(address)


def _bounds(key: Key) -> tuple[int, int]:
    """HBO lowest and highest address a prefix covers."""
    plen, nbo = key
    lo = int.from_bytes(struct.pack("=I", nbo), "big")
    host = (1 << (32 - plen)) - 1
    return lo, lo | host


class ServiceSpaceSync:
    def __init__(self, trie: MapOps[Any, Any], span: MapOps[Any, Any]) -> None:
        self.trie = trie
        self.span_map = span
        self.programmed: dict[Key, int] = {}  # key -> action
        self._cidrs: set[Key] = set()  # the service CIDRs as keys (DROP unless a ClusterIP is there)
        self._cidrs_version = -1
        self._span = _EMPTY_SPAN
        self.errors = 0

    def adopt(self) -> None:
        """Rebuild the programmed view from the maps (the next full sync removes what is stale)."""
        self.programmed = {(k.prefixlen, k.addr): int(v.action) for k, v in self.trie.items()}
        got = self.span_map.get(ctypes.c_uint32(0))
        self._span = (int(got.lo), int(got.hi)) if got is not None else _EMPTY_SPAN

    def sync(self, store: ClusterView, full: bool = False) -> int:
        """Write what changed in the store's ClusterIPs and service CIDRs (everything if `full`).
        Returns the number of entries written or deleted."""
        changed = store.take_cluster_ips_changed()
        cluster_ips = store.cluster_ips
        cidrs_changed = full or store.service_cidrs_version != self._cidrs_version
        if not (changed or cidrs_changed):
            return 0
        want: dict[Key, int] = {}  # key -> action, for the keys considered
        considered: set[Key] = set()
        if cidrs_changed:
            new_cidrs: set[Key] = set()
            for cidr in store.service_cidrs:
                net = ipaddress.IPv4Network(cidr, strict=False)
                new_cidrs.add((net.prefixlen, _nbo(str(net.network_address))))
            considered |= self._cidrs | new_cidrs
            self._cidrs = new_cidrs
            self._cidrs_version = store.service_cidrs_version
        if full:
            considered |= {k for k, a in self.programmed.items()}
            considered |= {(32, _nbo(ip)) for ip in cluster_ips}
        else:
            considered |= {(32, _nbo(ip)) for ip in changed}
        for key in considered:
            if key[0] == 32 and cluster_ips.get(abi.nbo_to_ip(key[1])):
                want[key] = _REJECT  # a ClusterIP (also when a /32 service CIDR says the same address)
            elif key in self._cidrs:
                want[key] = _DROP
        puts = [(k, a) for k, a in want.items() if self.programmed.get(k) != a]
        dels = [k for k in considered if k not in want and k in self.programmed]
        if not puts and not dels:
            return 0
        if puts:
            room = self.trie.max_entries - (len(self.programmed) - len(dels))
            new_keys = sum(1 for k, _ in puts if k not in self.programmed)
            if new_keys > room:
                self.errors += 1
                log.error(
                    "map %s is full (%d entries): %d service addresses not written, packets to their "
                    "unknown ports pass", self.trie.name, self.trie.max_entries, new_keys - room,
                )  # fmt: skip
                fresh = [(k, a) for k, a in puts if k not in self.programmed]
                puts = [(k, a) for k, a in puts if k in self.programmed] + fresh[: max(room, 0)]
        span = self._span
        lo, hi = span
        for k, _ in puts:
            klo, khi = _bounds(k)
            lo, hi = min(lo, klo), max(hi, khi)
        try:
            if puts:
                # span first: the new entries are within it before a packet can match them
                if (lo, hi) != span:
                    self.span_map.put_many([(_ZERO_KEY, _PACK_SPAN(lo, hi))])
                self.trie.put_many([(_PACK_KEY(*k), _PACK_VAL(a)) for k, a in puts])
                for k, a in puts:
                    self.programmed[k] = a
            if dels:
                self.trie.delete_many([_PACK_KEY(*k) for k in dels])
                for k in dels:
                    del self.programmed[k]
        except (OSError, MapFullError) as err:
            self.errors += 1
            log.error("writing the service address space failed: %s", err)
            return 0
        # shrink the span only when an entry at its edge went (rare; one pass over the entries)
        if dels and any(_bounds(k)[0] == lo or _bounds(k)[1] == hi for k in dels):
            lo, hi = _EMPTY_SPAN
            for k in self.programmed:
                klo, khi = _bounds(k)
                lo, hi = min(lo, klo), max(hi, khi)
        if (lo, hi) != self._span:
            self.span_map.put_many([(_ZERO_KEY, _PACK_SPAN(lo, hi))])
            self._span = (lo, hi)
        n = len(puts) + len(dels)
        log.debug("service address space: %d written, %d deleted", len(puts), len(dels))
        return n

    @property
    def cidrs_version(self) -> int:
        """The store's service_cidrs_version last written."""
        return self._cidrs_version

    @property
    def span(self) -> tuple[str, str] | None:
        lo, hi = self._span
        if lo > hi:
            return None
        return str(ipaddress.IPv4Address(lo)), str(ipaddress.IPv4Address(hi))

    def entries(self) -> dict[str, str]:
        """CIDR -> "reject" | "drop", for the CLI and tests."""
        out = {}
        for (plen, nbo), a in sorted(self.programmed.items(), key=lambda kv: (_bounds(kv[0]), kv[0][0])):
            out[f"{abi.nbo_to_ip(nbo)}/{plen}"] = "reject" if a == _REJECT else "drop"
        return out
