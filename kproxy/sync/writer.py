"""Ordered, batched writes of planned entries, undo of a failed plan, and the conntrack and affinity
flushes that follow a commit.

Plans keep packed blobs (two objects per frontend instead of three per entry until the write),
joined into one buffer per map that the map writes in kernel-sized batches: no per-entry objects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy import abi
from kproxy.bpf.mapapi import MaglevOps, MapOps
from kproxy.sync.family import FAMILY4, Family
from kproxy.sync.ids import BackendIds
from kproxy.sync.state import ApplyReport, BVal, Plan
from kproxy.sync.table import BackendTable, WideBackendTable

_PACK_BE4_KEY = abi.pack_be4_key  # kp_be6 keys are u32 ids too


class MapSet(Protocol):
    """The maps the Syncer writes (KproxyMaps' pinned maps, or MemoryMapSet in tests); read-only
    attributes, so that a set whose maps are more precisely typed fits."""

    @property
    def svc4(self) -> MapOps[Any, Any]: ...
    @property
    def be4(self) -> MapOps[Any, Any]: ...
    @property
    def ct4(self) -> MapOps[Any, Any]: ...
    @property
    def aff4(self) -> MapOps[Any, Any]: ...
    @property
    def lbsrc4(self) -> MapOps[Any, Any]: ...
    @property
    def svcnet4(self) -> MapOps[Any, Any]: ...
    @property
    def svcnet_span(self) -> MapOps[Any, Any]: ...
    @property
    def svc6(self) -> MapOps[Any, Any]: ...
    @property
    def be6(self) -> MapOps[Any, Any]: ...
    @property
    def ct6(self) -> MapOps[Any, Any]: ...
    @property
    def aff6(self) -> MapOps[Any, Any]: ...
    @property
    def lbsrc6(self) -> MapOps[Any, Any]: ...
    @property
    def svcnet6(self) -> MapOps[Any, Any]: ...
    @property
    def svcnet6_span(self) -> MapOps[Any, Any]: ...
    @property
    def maglev(self) -> MaglevOps | None: ...

    def read_config(self) -> abi.Config: ...

    def write_config(self, config: abi.Config) -> None: ...


class FamilyMaps:
    """One family's maps of a MapSet: kp_svc4/kp_be4/kp_ct4/kp_aff4/kp_lbsrc4 or their *6 twins."""

    __slots__ = ("aff", "be", "ct", "fam", "lbsrc", "maps", "svc")

    def __init__(self, maps: MapSet, fam: Family = FAMILY4) -> None:
        self.maps = maps
        self.fam = fam
        self.svc: MapOps[Any, Any] = getattr(maps, fam.svc_map)
        self.be: MapOps[Any, Any] = getattr(maps, fam.be_map)
        self.ct: MapOps[Any, Any] = getattr(maps, fam.ct_map)
        self.aff: MapOps[Any, Any] = getattr(maps, fam.aff_map)
        self.lbsrc: MapOps[Any, Any] = getattr(maps, fam.lbsrc_map)


def put_entries(m: MapOps[Any, Any], blobs: list[tuple[bytes, bytes]], ks: int = abi.SVC4_KEY_SIZE) -> int:
    """Write kp_svc4 (kp_svc6: KS its key size) entries given as (keys, values) blobs; returns how many."""
    k = b"".join([k for k, _ in blobs])
    v = b"".join([v for _, v in blobs])
    n = len(k) // ks
    if n:
        m.put_packed(k, v, n)
    return n


def put_be(fm: FamilyMaps, vals: dict[int, BVal]) -> None:
    """Write kp_be4 (kp_be6) entries (backend id -> value)."""
    if vals:
        pack = fm.fam.pack_be
        fm.be.put_packed(b"".join(map(_PACK_BE4_KEY, vals)), b"".join(map(pack, vals.values())), len(vals))


def split_keys(blobs: list[bytes], ks: int = abi.SVC4_KEY_SIZE) -> list[bytes]:
    """One kp_svc4 (kp_svc6: KS its key size) key per entry from key blobs."""
    k = b"".join(blobs)
    return [k[i : i + ks] for i in range(0, len(k), ks)]


def n_entries(pairs: list[tuple[bytes, bytes]], ks: int = abi.SVC4_KEY_SIZE) -> int:
    return sum(len(k) for k, _ in pairs) // ks


def n_keys(keys: list[bytes], ks: int = abi.SVC4_KEY_SIZE) -> int:
    return sum(len(k) for k in keys) // ks


def write_batched(
    fm: FamilyMaps, plans: list[Plan], report: ApplyReport, before_slots: Callable[[], None] | None = None
) -> None:
    """Write the plans in DESIGN.md's order (see kproxy.sync), one batch per map and step for all. The
    report's svc4/be4 counts are the family's (see ApplyReport). BEFORE_SLOTS runs once the backends
    are written, before any service entry (the Maglev tables: kproxy.sync.mgsync)."""
    ks = fm.fam.svc_key_size
    be_puts: dict[int, BVal] = {}
    for p in plans:
        be_puts.update(p.be_puts)
    put_be(fm, be_puts)
    if before_slots is not None:
        before_slots()
    svc = fm.svc
    n_slots = put_entries(svc, [e for p in plans for e in p.slot_puts], ks)
    n_slot0 = put_entries(svc, [e for p in plans for e in p.slot0_puts], ks)
    slot_dels = split_keys([k for p in plans for k in p.slot_dels], ks)
    fe_dels = split_keys([k for p in plans for k in p.fe_dels], ks)
    if slot_dels:
        svc.delete_many(slot_dels)
    if fe_dels:
        svc.delete_many(fe_dels)
    report.be4_puts += len(be_puts)
    report.svc4_puts += n_slots + n_slot0
    report.svc4_deletes += len(slot_dels) + len(fe_dels)


def count_writes(plans: list[Plan], report: ApplyReport, ks: int = abi.SVC4_KEY_SIZE) -> None:
    report.be4_puts += len({b for p in plans for b in p.be_puts})
    report.svc4_puts += sum(n_entries(p.slot_puts, ks) + n_entries(p.slot0_puts, ks) for p in plans)
    report.svc4_deletes += sum(n_keys(p.slot_dels, ks) + n_keys(p.fe_dels, ks) for p in plans)


def undo(
    fm: FamilyMaps, p: Plan, programmed: BackendTable | WideBackendTable, keep: Collection[int] = ()
) -> None:
    """Take back what a failed plan may have written: new keys go, rewritten keys get their old value.
    Backends in KEEP stay as they are: plans of the same batch written before it need them (two
    Services on the same pods share backend ids, new ones too)."""
    ks = fm.fam.svc_key_size
    if p.new_svc4_keys:
        fm.svc.delete_many(split_keys(p.new_svc4_keys, ks))
    if p.undo_puts:
        put_entries(fm.svc, p.undo_puts, ks)
    mine = [b for b in p.be_puts if b not in keep]
    new_ids = [b for b in mine if b not in programmed]
    if new_ids:
        fm.be.delete_many([_PACK_BE4_KEY(b) for b in new_ids])
    old_vals = [(b, programmed[b]) for b in mine if b in programmed]
    if old_vals:
        pack = fm.fam.pack_be
        mask = (1 << fm.fam.refs_shift) - 1
        fm.be.put_many([(_PACK_BE4_KEY(b), pack(v & mask)) for b, v in old_vals])


@dataclass(slots=True)
class Flush:
    """Conntrack and affinity entries to flush once an apply's chunks are written."""

    udp_freed: set[int] = field(default_factory=set)
    aff_freed: set[int] = field(default_factory=set)
    udp_pairs: set[tuple[int, int]] = field(default_factory=set)
    aff_pairs: set[tuple[int, int]] = field(default_factory=set)
    # (svc_id, BVal's address and port) of UDP backends that left a service port, whether their id was
    # freed or not, unless the same address and port is in that port's slots under another id
    udp_left: set[tuple[int, int]] = field(default_factory=set)


def free_and_flush(
    fm: FamilyMaps,
    backends: BackendIds,
    plans: list[Plan],
    freed: set[int],
    report: ApplyReport,
    flush: Flush | None = None,
) -> None:
    """Free backend ids no longer referenced, then flush UDP conntrack and affinity entries of
    backends that left a service: now, or, given `flush`, once its caller's chunks are all done
    (each flush walks the whole conntrack map)."""
    later = flush is not None
    if flush is None:
        flush = Flush()
    udp_freed = flush.udp_freed
    aff_freed = flush.aff_freed
    # Affinity entries live only for ports with ClientIP affinity: only their backends are looked
    # for in kp_aff4 (a walk of the whole map), not every freed or moved backend.
    affinity_sids: set[int] = set()
    for p in plans:
        for fe in p.old.frontends.values():
            if fe.flags & abi.SvcFlag.AFFINITY:
                affinity_sids.add(fe.svc_id)
    aff_backends: set[int] = set()
    if affinity_sids:
        for p in plans:
            for sid, ids in p.old.active_ids().items():
                if sid in affinity_sids:
                    aff_backends.update(ids)
    bval_proto = fm.fam.bval_proto
    freed_vals: dict[int, int] = {}
    if freed:
        freed_vals = backends.release(freed)
        for b, freed_val in freed_vals.items():
            if bval_proto(freed_val) == abi.IPPROTO_UDP:
                udp_freed.add(b)
        aff_freed.update(aff_backends.intersection(freed))
        fm.be.delete_many([_PACK_BE4_KEY(b) for b in sorted(freed)])
        report.be4_deletes += len(freed)
    # backends that left a service's slots but still exist: flush that service's UDP flows to them
    udp_pairs = flush.udp_pairs
    aff_pairs = flush.aff_pairs
    vals = backends.vals
    where = (1 << fm.fam.proto_shift) - 1  # a BVal's address and port
    for p in plans:
        new_active = p.new.active_ids()
        for sid, ids in p.old.active_ids().items():
            stay = new_active.get(sid, ())
            gone = set(ids).difference(stay)
            left: set[int] = set()
            for b in gone:
                val = freed_vals.get(b) if b in freed else vals.get(b)
                udp = val is not None and bval_proto(val) == abi.IPPROTO_UDP
                if udp and val is not None:
                    left.add(val & where)
                if b in freed:
                    continue
                if udp:
                    udp_pairs.add((b, sid))
                if sid in affinity_sids:
                    aff_pairs.add((b, sid))
            if left:
                for b in stay:
                    val = vals.get(b)
                    if val is not None:
                        left.discard(val & where)
                flush.udp_left.update((sid, w) for w in left)
    if not later:
        run_flush(fm, flush, report)


def address_and_port(fam: Family, w: int) -> tuple[bytes, int]:
    """A BVal's address and port (BVAL & (1 << proto_shift) - 1) as the maps hold them: the address's
    bytes in network order, the port a network-order int (ApplyReport.udp_left's form)."""
    addr = w & fam.addr_mask
    raw = addr.to_bytes(4, sys.byteorder) if fam.version == 4 else addr.to_bytes(fam.addr_bits // 8, "big")
    return raw, (w >> fam.port_shift) & 0xFFFF


def run_flush(fm: FamilyMaps, flush: Flush, report: ApplyReport) -> None:
    if flush.udp_left:
        fam = fm.fam
        for sid, w in sorted(flush.udp_left):
            report.udp_left.append((fam.version, sid, *address_and_port(fam, w)))
        flush.udp_left.clear()
    if flush.udp_freed or flush.udp_pairs:
        report.ct_flushed += flush_udp_conntrack(fm.ct, flush.udp_freed, flush.udp_pairs)
    if flush.aff_freed or flush.aff_pairs:
        report.aff_flushed += flush_affinity(fm.aff, flush.aff_freed, flush.aff_pairs)


def flush_udp_conntrack(ct4: MapOps[Any, Any], backends: set[int], pairs: set[tuple[int, int]]) -> int:
    """Delete UDP conntrack entries (both directions) of `backends`, or of (backend, svc_id) `pairs`
    (kp_ct4 or kp_ct6: the same fields)."""
    doomed = [
        k
        for k, v in ct4.items()
        if k.proto == abi.IPPROTO_UDP and (v.backend_id in backends or (v.backend_id, v.svc_id) in pairs)
    ]
    return ct4.delete_many(doomed) if doomed else 0


def flush_affinity(aff4: MapOps[Any, Any], backends: set[int], pairs: set[tuple[int, int]]) -> int:
    """Forget affinity to backends that no longer take new connections, so they get none."""
    doomed = [k for k, v in aff4.items() if v.backend_id in backends or (v.backend_id, k.svc_id) in pairs]
    return aff4.delete_many(doomed) if doomed else 0
