"""The service address space -> kp_svcnet4_v1 (LPM trie) and kp_svcnet_span_v1, for packets that match
no frontend.

kube-proxy's nftables mode ends its service lookup with the cluster-ips-check chain: a packet opening a
flow to a ClusterIP on a port or protocol no Service port has is rejected (ICMP port unreachable), one
to any other address of a service CIDR is dropped (nothing is allocated there). The datapath does the
same (bpfsrc/lib/svcnet.h) from this trie:
  - every IPv4 ClusterIP of a Service kproxy serves (with ports): /32, REJECT;
  - every IPv4 service CIDR (ServiceCIDR objects, --service-cidr): DROP;
  - every IPv4 ClusterIP of a Service another proxy serves (service-proxy-name label): /32, PASS;
and skips the lookup for destinations outside the span (lowest and highest address of all entries).
IPv6 has no such map yet: IPv6 ClusterIPs and service CIDRs are left out here (the store keeps IPv4
ones only; an IPv6 address reaching sync() anyway is skipped, never written nor fatal).

The store counts Services per ClusterIP and remembers which addresses changed; a sync writes only
those, after the frontends of the same sync: a packet to a new frontend finds the frontend first, and
a REJECT entry that outlives its Service by a moment answers what kube-proxy answers then.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from kproxy import abi
from kproxy.bpf.mapapi import MapFullError, MapOps

log = logging.getLogger(__name__)

Key = int  # prefixlen << 32 | network address NBO (an int: 10,000s of /32 entries, a tuple each)
_HOST32 = 32 << 32  # a /32 key without its address
_M32 = 0xFFFFFFFF
_PACK_KEY = abi.pack_svcnet4_key
_PACK_VAL = abi.pack_svcnet4_val
_PACK_SPAN = abi.pack_svcnet_span
_REJECT = int(abi.SvcnetAction.REJECT)
_DROP = int(abi.SvcnetAction.DROP)
_PASS = int(abi.SvcnetAction.PASS)
_ZERO_KEY = abi.SVCNET_SPAN_KEY
_EMPTY_SPAN = (0xFFFFFFFF, 0)  # lo > hi: no entry


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


def _bounds(key: Key) -> tuple[int, int]:
    """HBO lowest and highest address a prefix covers."""
    plen, nbo = key >> 32, key & _M32
    lo = abi.nbo_to_hbo(nbo)
    host = (1 << (32 - plen)) - 1
    return lo, lo | host


class ServiceSpaceSync:
    def __init__(self, trie: MapOps[Any, Any], span: MapOps[Any, Any]) -> None:
        self.trie = trie
        self.span_map = span
        self.programmed: dict[Key, int] = {}  # key -> action
        self._cidrs: set[Key] = set()  # the service CIDRs as keys (DROP unless a ClusterIP is there)
        self._cidrs_version = -1
        self._span: tuple[int, int] | None = _EMPTY_SPAN  # None: unknown, written from programmed
        self.errors = 0

    def adopt(self) -> None:
        """Rebuild the programmed view from the trie (the next full sync removes what is stale). The
        span is recomputed from the entries on the next sync: a span map the loader just created reads
        as zeros, which is no span at all."""
        self.programmed = {k.prefixlen << 32 | k.addr: int(v.action) for k, v in self.trie.items()}
        self._span = None

    def sync(self, store: ClusterView, full: bool = False) -> int:
        """Write what changed in the store's ClusterIPs and service CIDRs (everything if `full`).
        Returns the number of entries written or deleted. What could not be written (a write error, a
        full map) is tried again on the next sync."""
        changed = store.take_cluster_ips_changed()
        cidrs_changed = full or store.service_cidrs_version != self._cidrs_version
        if not (changed or cidrs_changed or self._span is None):
            return 0
        cluster_ips = store.cluster_ips
        foreign = store.foreign_cluster_ips
        new_cidrs = self._cidrs
        considered: set[Key] = set()
        if cidrs_changed:
            new_cidrs = set()
            for cidr in store.service_cidrs:
                if ":" in cidr:
                    continue  # IPv6: no kp_svcnet6 yet
                net = ipaddress.IPv4Network(cidr, strict=False)
                new_cidrs.add(net.prefixlen << 32 | abi.ip_to_nbo(str(net.network_address)))
            considered |= self._cidrs | new_cidrs
        if full:
            considered |= set(self.programmed)
            considered |= {_HOST32 | abi.ip_to_nbo(ip) for ip in cluster_ips if ":" not in ip}
            considered |= {_HOST32 | abi.ip_to_nbo(ip) for ip in foreign if ":" not in ip}
        else:
            considered |= {_HOST32 | abi.ip_to_nbo(ip) for ip in changed if ":" not in ip}
        want: dict[Key, int] = {}
        for key in considered:
            if key >> 32 == 32:
                ip = abi.nbo_to_ip(key & _M32)
                if cluster_ips.get(ip):
                    want[key] = _REJECT  # a ClusterIP (also when a /32 service CIDR says the same address)
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
            room = self.trie.max_entries - (len(self.programmed) - len(dels))
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
        lo, hi = self._span if self._span is not None else _EMPTY_SPAN
        for k, _ in puts:
            klo, khi = _bounds(k)
            lo, hi = min(lo, klo), max(hi, khi)
        try:
            if puts:
                # the span first: new entries are inside it before a packet can match them
                if self._span is None or (lo, hi) != self._span:
                    self.span_map.put_many([(_ZERO_KEY, _PACK_SPAN(lo, hi))])
                    self._span = (lo, hi)
                self.trie.put_many([(_PACK_KEY(k >> 32, k & _M32), _PACK_VAL(a)) for k, a in puts])
                self.programmed.update(puts)
            if dels:
                self.trie.delete_many([_PACK_KEY(k >> 32, k & _M32) for k in dels])
                for k in dels:
                    del self.programmed[k]
            # narrow the span when an entry at its edge went, or when it is not known (after adopt):
            # one pass over the entries, rare
            if (
                self._span is None
                or full
                or (dels and any(_bounds(k)[0] == lo or _bounds(k)[1] == hi for k in dels))
            ):
                lo, hi = _EMPTY_SPAN
                for k in self.programmed:
                    klo, khi = _bounds(k)
                    lo, hi = min(lo, klo), max(hi, khi)
            if (lo, hi) != self._span:
                self.span_map.put_many([(_ZERO_KEY, _PACK_SPAN(lo, hi))])
                self._span = (lo, hi)
        except (OSError, MapFullError) as err:
            self.errors += 1
            log.error("writing the service address space failed (retried on the next change): %s", err)
            store.cluster_ips_changed |= changed
            self.adopt()  # what the map holds now, whatever part of the batch went in
            return 0
        if complete:
            self._cidrs = new_cidrs
            self._cidrs_version = store.service_cidrs_version
        else:
            store.cluster_ips_changed |= changed
        log.debug("service address space: %d written, %d deleted", len(puts), len(dels))
        return len(puts) + len(dels)

    @property
    def cidrs_version(self) -> int:
        """The store's service_cidrs_version last written."""
        return self._cidrs_version

    @property
    def span(self) -> tuple[str, str] | None:
        lo, hi = self._span if self._span is not None else _EMPTY_SPAN
        if lo > hi:
            return None
        return str(ipaddress.IPv4Address(lo)), str(ipaddress.IPv4Address(hi))

    def entries(self) -> dict[str, str]:
        """CIDR -> "reject" | "drop" | "pass", for the CLI and tests."""
        out = {}
        for k, a in sorted(self.programmed.items(), key=lambda kv: (_bounds(kv[0]), kv[0] >> 32)):
            plen, nbo = k >> 32, k & _M32
            out[f"{abi.nbo_to_ip(nbo)}/{plen}"] = abi.SvcnetAction(a).name.lower()
        return out
