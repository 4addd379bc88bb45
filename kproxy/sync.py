"""Desired frontends -> ordered, batched writes to the service, backend and conntrack maps.

Ordering (DESIGN.md) so that a reader in the kernel never sees a frontend pointing at nothing:
  1. new or changed backends (kp_be4)          4. slots beyond a lowered count deleted
  2. new or changed backend slots 1..n          5. frontends that went away deleted (slot 0 first)
  3. slot-0 entries (count, flags, svc_id)      6. backend ids no longer referenced freed, last
then UDP conntrack and affinity entries of backends that left a service are flushed (TCP flows are
left to finish). Each step is one batch for all services of an apply.

Ids: backend ids are stable per (address, port, protocol) and monotonic: an id is never handed out
twice, and after a restart counting resumes above every id the backend, conntrack and affinity maps
still mention, so a conntrack entry can never point at a recycled id. Service ids are stable per
(service, port name, protocol). adopt() rebuilds both tables and the programmed view from the maps,
so re-applying an unchanged Service after a restart writes nothing.

A Service whose new entries would not fit a map is not written at all (its previous state stays
programmed); the others still apply.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy.bpf import abi
from kproxy.bpf.mapapi import MapFullError, MapOps
from kproxy.model import BackendRef, Frontend
from kproxy.store import ClusterStore, gc_paused
from kproxy.translate import TranslateConfig, TranslateError, translate_service

log = logging.getLogger(__name__)

FKey = tuple[int, int, int, int]  # (addr NBO, port NBO, proto, scope)
BKey = tuple[int, int, int]  # (addr NBO, port NBO, proto)
BVal = tuple[int, int, int, int]  # kp_be4 value: (addr NBO, port NBO, proto, flags)
SvcPort = tuple[str, str, int]  # (service, port name, proto)

_PROTO = {"TCP": abi.IPPROTO_TCP, "UDP": abi.IPPROTO_UDP}
ORPHANS = ""  # pseudo-service owning what adopt() found and no Service has claimed yet

_UNPACK_U32 = struct.Struct("=I").unpack
_inet_aton = socket.inet_aton


def _nbo(address: str) -> int:
    return int(_UNPACK_U32(_inet_aton(address))[0])


_htons = socket.htons
_BE_LOCAL = int(abi.BackendFlag.LOCAL)
_BE_TERMINATING = int(abi.BackendFlag.TERMINATING)


class MapSet(Protocol):
    svc4: MapOps[Any, Any]
    be4: MapOps[Any, Any]
    ct4: MapOps[Any, Any]
    aff4: MapOps[Any, Any]

    def read_config(self) -> abi.Config: ...

    def write_config(self, config: abi.Config) -> None: ...


@dataclass(slots=True)
class _Fe:
    svc_id: int
    flags: int
    affinity_timeout: int
    slots: tuple[int, ...]
    stale_slots: tuple[int, ...] = ()  # slot numbers found beyond count by adopt(), to delete


@dataclass(slots=True)
class _Svc:
    frontends: dict[FKey, _Fe] = field(default_factory=dict)
    backends: set[int] = field(default_factory=set)  # every id referenced: slots and retained
    active: dict[int, set[int]] = field(default_factory=dict)  # svc_id -> ids in its slots
    svc_ports: set[SvcPort] = field(default_factory=set)


@dataclass(slots=True)
class _Plan:
    service: str
    new: _Svc
    old: _Svc
    claimed: list[FKey] = field(default_factory=list)  # orphan frontends taken over
    be_puts: dict[int, BVal] = field(default_factory=dict)
    be_vals: dict[int, BVal] = field(default_factory=dict)
    slot_puts: list[tuple[abi.Svc4Key, abi.Svc4Val]] = field(default_factory=list)
    slot0_puts: list[tuple[abi.Svc4Key, abi.Svc4Val]] = field(default_factory=list)
    slot_dels: list[abi.Svc4Key] = field(default_factory=list)
    fe_dels: list[abi.Svc4Key] = field(default_factory=list)
    undo_puts: list[tuple[abi.Svc4Key, abi.Svc4Val]] = field(default_factory=list)
    new_svc4_keys: list[abi.Svc4Key] = field(default_factory=list)
    svc4_added: int = 0
    svc4_removed: int = 0
    svc_ids: dict[SvcPort, int] = field(default_factory=dict)
    conflicts: list[FKey] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.be_puts or self.slot_puts or self.slot0_puts or self.slot_dels or self.fe_dels)


@dataclass
class ApplyReport:
    changed: list[str] = field(default_factory=list)  # services whose map entries changed
    failed: dict[str, str] = field(default_factory=dict)  # service -> why it was not programmed
    retry: set[str] = field(default_factory=set)  # services to re-apply (a conflicting frontend was freed)
    svc4_puts: int = 0
    svc4_deletes: int = 0
    be4_puts: int = 0
    be4_deletes: int = 0
    ct_flushed: int = 0
    aff_flushed: int = 0
    # sync_dirty: monotonic time of each synced Service's first change (network programming latency)
    first_change: dict[str, float] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return self.svc4_puts + self.svc4_deletes + self.be4_puts + self.be4_deletes


def _key(fk: FKey, slot: int) -> abi.Svc4Key:
    return abi.Svc4Key(fk[0], fk[1], slot, fk[2], fk[3])


class Syncer:
    """Keeps kp_svc4/kp_be4 equal to the desired frontends, one incremental apply at a time."""

    def __init__(self, maps: MapSet) -> None:
        self.maps = maps
        self.errors: Counter[str] = Counter()  # by reason, for metrics
        self._services: dict[str, _Svc] = {}
        self._owner: dict[FKey, str] = {}
        self._waiting: dict[FKey, set[str]] = {}
        self._be_ids: dict[BKey, int] = {}
        self._be_vals: dict[int, BVal] = {}  # programmed kp_be4 values
        self._be_refs: Counter[int] = Counter()
        self._next_be = 1
        self._svc_ids: dict[SvcPort, int] = {}
        self._svc_id_owner: dict[int, SvcPort] = {}
        self._next_svc = 1
        self._svc4_entries = 0

    # ---- introspection (CLI, metrics, tests) ----
    @property
    def services(self) -> list[str]:
        return [s for s in self._services if s != ORPHANS]

    def backend_id(self, address: str, port: int, protocol: str) -> int | None:
        return self._be_ids.get((_nbo(address), _htons(port), _PROTO[protocol]))

    def svc_id(self, service: str, port_name: str, protocol: str) -> int | None:
        return self._svc_ids.get((service, port_name, _PROTO[protocol]))

    @property
    def orphan_frontends(self) -> int:
        o = self._services.get(ORPHANS)
        return 0 if o is None else len(o.frontends)

    # ---- adopt ----
    def adopt(self) -> None:
        """Rebuild ids and the programmed view from the maps (after an agent restart)."""
        self._services.clear()
        self._owner.clear()
        self._be_ids.clear()
        self._be_vals.clear()
        self._be_refs.clear()
        self._svc_ids.clear()
        self._svc_id_owner.clear()
        max_be = 0
        max_svc = 0
        for k, v in self.maps.be4.items():
            bid = int(k.value) if isinstance(k, ctypes.c_uint32) else int(k)
            self._be_vals[bid] = (v.addr, v.port, v.proto, v.flags)
            self._be_ids.setdefault((v.addr, v.port, v.proto), bid)
            max_be = max(max_be, bid)
        slot0: dict[FKey, abi.Svc4Val] = {}
        slots: dict[FKey, dict[int, int]] = {}
        n = 0
        for k, v in self.maps.svc4.items():
            n += 1
            fk = (k.addr, k.port, k.proto, k.scope)
            max_svc = max(max_svc, v.svc_id)
            if k.slot == 0:
                slot0[fk] = v
            else:
                slots.setdefault(fk, {})[k.slot] = v.backend_id
        self._svc4_entries = n
        orphans = _Svc()
        for fk in set(slot0) | set(slots):
            s0 = slot0.get(fk)
            present = slots.get(fk, {})
            if s0 is None:
                fe = _Fe(0, 0, 0, (), tuple(sorted(present)))
            else:
                count = s0.count
                fe = _Fe(
                    s0.svc_id,
                    s0.flags,
                    s0.affinity_timeout,
                    tuple(present.get(i, 0) for i in range(1, count + 1)),
                    tuple(sorted(i for i in present if i > count)),
                )
            orphans.frontends[fk] = fe
            self._owner[fk] = ORPHANS
        # Until the first full apply nothing adopted is proven stale: the orphans hold every backend.
        orphans.backends = set(self._be_vals)
        for bid in orphans.backends:
            self._be_refs[bid] += 1
        self._services[ORPHANS] = orphans
        for _k, v in self.maps.ct4.items():
            max_be = max(max_be, v.backend_id)
            max_svc = max(max_svc, v.svc_id)
        for k, v in self.maps.aff4.items():
            max_be = max(max_be, v.backend_id)
            max_svc = max(max_svc, k.svc_id)
        self._next_be = max_be + 1
        self._next_svc = max_svc + 1
        log.info(
            "adopted %d frontends, %d backends from the maps; next backend id %d, next service id %d",
            len(orphans.frontends), len(self._be_vals), self._next_be, self._next_svc,
        )  # fmt: skip

    # ---- planning ----
    def _alloc_svc_id(self, sp: SvcPort, fk: FKey, plan: _Plan, old: _Svc) -> int:
        sid = self._svc_ids.get(sp) or plan.svc_ids.get(sp)
        if sid:
            return sid
        # Re-use the id the maps already carry for this frontend (restart), unless another port has it.
        prev = old.frontends.get(fk)
        if prev is None:
            orphans = self._services.get(ORPHANS)
            prev = orphans.frontends.get(fk) if orphans else None
        if (
            prev is not None
            and prev.svc_id
            and prev.svc_id not in self._svc_id_owner
            and prev.svc_id not in plan.svc_ids.values()
        ):
            sid = prev.svc_id
        if not sid:
            sid = self._next_svc
            self._next_svc += 1
        plan.svc_ids[sp] = sid
        return sid

    def _be_id(self, b: BackendRef, plan: _Plan) -> int:
        flags = (_BE_LOCAL if b.local else 0) | (_BE_TERMINATING if b.terminating else 0)
        val = (_UNPACK_U32(_inet_aton(b.address))[0], _htons(b.port), _PROTO[b.protocol], flags)
        bk = val[:3]
        bid = self._be_ids.get(bk)
        if bid is None:
            bid = self._be_ids[bk] = self._next_be
            self._next_be += 1
        be_vals = plan.be_vals
        if bid not in be_vals:
            be_vals[bid] = val
            if self._be_vals.get(bid) != val:
                plan.be_puts[bid] = val
        return bid

    def _plan(self, service: str, frontends: Iterable[Frontend]) -> _Plan:
        old = self._services.get(service) or _Svc()
        new = _Svc()
        plan = _Plan(service, new, old)
        orphans = self._services.get(ORPHANS)
        for fe in frontends:
            proto = _PROTO.get(fe.protocol)
            if proto is None:
                raise ValueError(f"frontend {fe.address}:{fe.port} has unsupported protocol {fe.protocol}")
            fk = (_nbo(fe.address), _htons(fe.port), proto, int(fe.scope))
            owner = self._owner.get(fk)
            if owner is not None and owner != service and owner != ORPHANS:
                plan.conflicts.append(fk)
                continue
            if fk in new.frontends:
                continue
            sp = (service, fe.port_name, proto)
            sid = self._alloc_svc_id(sp, fk, plan, old)
            new.svc_ports.add(sp)
            ids = sorted({self._be_id(b, plan) for b in fe.backends})
            for b in fe.retained:
                new.backends.add(self._be_id(b, plan))
            new.backends.update(ids)
            new.active.setdefault(sid, set()).update(ids)
            new.frontends[fk] = _Fe(sid, fe.flags, fe.affinity_timeout, tuple(ids))
            if owner == ORPHANS:
                plan.claimed.append(fk)
        # diff against what is programmed (own frontends + orphans being claimed)
        prev: dict[FKey, _Fe] = dict(old.frontends)
        if orphans is not None:
            for fk in plan.claimed:
                prev[fk] = orphans.frontends[fk]
        for fk, st in new.frontends.items():
            o = prev.get(fk)
            n_new = len(st.slots)
            if o is None:
                plan.svc4_added += 1 + n_new
                k0 = _key(fk, 0)
                plan.new_svc4_keys.append(k0)
                for i, bid in enumerate(st.slots, 1):
                    k = _key(fk, i)
                    plan.new_svc4_keys.append(k)
                    plan.slot_puts.append((k, abi.Svc4Val(bid, st.svc_id, 0, 0, 0)))
                plan.slot0_puts.append((k0, abi.Svc4Val(0, st.svc_id, n_new, st.flags, st.affinity_timeout)))
                continue
            n_old = len(o.slots)
            same_id = o.svc_id == st.svc_id
            for i, bid in enumerate(st.slots, 1):
                if i <= n_old and same_id and o.slots[i - 1] == bid:
                    continue
                k = _key(fk, i)
                plan.slot_puts.append((k, abi.Svc4Val(bid, st.svc_id, 0, 0, 0)))
                if i <= n_old:
                    plan.undo_puts.append((k, abi.Svc4Val(o.slots[i - 1], o.svc_id, 0, 0, 0)))
                else:
                    plan.new_svc4_keys.append(k)
                    plan.svc4_added += 1
            old0 = (o.svc_id, o.flags, o.affinity_timeout, n_old)
            if old0 != (st.svc_id, st.flags, st.affinity_timeout, n_new):
                k0 = _key(fk, 0)
                plan.slot0_puts.append((k0, abi.Svc4Val(0, st.svc_id, n_new, st.flags, st.affinity_timeout)))
                plan.undo_puts.append((k0, abi.Svc4Val(0, o.svc_id, n_old, o.flags, o.affinity_timeout)))
            for i in range(n_new + 1, n_old + 1):
                plan.slot_dels.append(_key(fk, i))
            plan.slot_dels.extend(_key(fk, i) for i in o.stale_slots)
            plan.svc4_removed += max(0, n_old - n_new) + len(o.stale_slots)
        for fk, o in old.frontends.items():
            if fk not in new.frontends:
                plan.fe_dels.append(_key(fk, 0))  # slot 0 first: readers stop finding the frontend
                plan.fe_dels.extend(_key(fk, i) for i in range(1, len(o.slots) + 1))
                plan.fe_dels.extend(_key(fk, i) for i in o.stale_slots)
                plan.svc4_removed += 1 + len(o.slots) + len(o.stale_slots)
        return plan

    # ---- apply ----
    def apply(self, desired: Mapping[str, Iterable[Frontend]], *, full: bool = False) -> ApplyReport:
        """Program `desired` (service key -> all its frontends; an empty list removes the service).

        full=True means `desired` names every Service there is: programmed services missing from it
        and entries adopted from the maps that no Service claimed are removed. Use it once the source
        has completed its initial listing, and after every complete re-list.
        """
        with gc_paused():
            return self._apply(desired, full)

    def _apply(self, desired: Mapping[str, Iterable[Frontend]], full: bool) -> ApplyReport:
        report = ApplyReport()
        plans: list[_Plan] = []
        for service, frontends in desired.items():
            if service == ORPHANS:
                continue
            try:
                plans.append(self._plan(service, frontends))
            except (ValueError, OverflowError) as err:
                self.errors["invalid_frontend"] += 1
                report.failed[service] = str(err)
                log.error("service %s not programmed: %s", service, err)
        if full:
            for service in list(self._services):
                if service not in desired and service != ORPHANS:
                    plans.append(self._plan(service, ()))
        admitted = self._admit(plans, report)
        orphans = self._services.get(ORPHANS)
        if full and orphans is not None:
            # What adopt() found and no Service claimed is stale now that the view is complete.
            for p in admitted:
                for fk in p.claimed:
                    orphans.frontends.pop(fk, None)
            admitted.append(self._plan(ORPHANS, ()))
        try:
            self._write_batched(admitted, report)
        except MapFullError as err:
            log.error("batched map update failed (%s); applying service by service", err)
            self.errors["map_full"] += 1
            ok = []
            for p in admitted:
                try:
                    self._write_batched([p], ApplyReport())
                    ok.append(p)
                except MapFullError as err2:
                    self._undo(p)
                    self._fail(p, report, f"map {err2.map_name} is full", "map_full")
            admitted = ok
            self._count_writes(admitted, report)
        freed = self._commit(admitted, report)
        self._free_and_flush(admitted, freed, report)
        return report

    def _admit(self, plans: list[_Plan], report: ApplyReport) -> list[_Plan]:
        svc4_max = self.maps.svc4.max_entries
        be4_max = self.maps.be4.max_entries
        svc4 = self._svc4_entries
        be4 = len(self._be_vals)
        new_be: set[int] = set()
        admitted = []
        for p in plans:
            add_be = {b for b in p.be_puts if b not in self._be_vals and b not in new_be}
            if svc4 + p.svc4_added > svc4_max:
                self._fail(p, report, f"map {self.maps.svc4.name} is full ({svc4_max} entries)", "map_full")
                continue
            if be4 + len(add_be) > be4_max:
                self._fail(p, report, f"map {self.maps.be4.name} is full ({be4_max} entries)", "map_full")
                continue
            svc4 += p.svc4_added
            be4 += len(add_be)
            new_be |= add_be
            admitted.append(p)
            for fk in p.conflicts:
                self._waiting.setdefault(fk, set()).add(p.service)
                self.errors["frontend_conflict"] += 1
                log.error(
                    "service %s: frontend %s:%d/%d is already programmed for service %s; "
                    "skipped until that one lets it go",
                    p.service, abi.nbo_to_ip(fk[0]), abi.nbo_to_port(fk[1]), fk[2], self._owner.get(fk),
                )  # fmt: skip
        return admitted

    def _fail(self, p: _Plan, report: ApplyReport, why: str, reason: str) -> None:
        self.errors[reason] += 1
        report.failed[p.service] = why
        log.error("service %s not programmed, its previous state stays: %s", p.service, why)

    def _write_batched(self, plans: list[_Plan], report: ApplyReport) -> None:
        be_puts: dict[int, BVal] = {}
        slot_puts: list[tuple[abi.Svc4Key, abi.Svc4Val]] = []
        slot0_puts: list[tuple[abi.Svc4Key, abi.Svc4Val]] = []
        slot_dels: list[abi.Svc4Key] = []
        fe_dels: list[abi.Svc4Key] = []
        for p in plans:
            be_puts.update(p.be_puts)
            slot_puts += p.slot_puts
            slot0_puts += p.slot0_puts
            slot_dels += p.slot_dels
            fe_dels += p.fe_dels
        m = self.maps
        if be_puts:
            m.be4.put_many([(ctypes.c_uint32(k), abi.Be4Val(*v, 0)) for k, v in be_puts.items()])
        if slot_puts:
            m.svc4.put_many(slot_puts)
        if slot0_puts:
            m.svc4.put_many(slot0_puts)
        if slot_dels:
            m.svc4.delete_many(slot_dels)
        if fe_dels:
            m.svc4.delete_many(fe_dels)
        report.be4_puts += len(be_puts)
        report.svc4_puts += len(slot_puts) + len(slot0_puts)
        report.svc4_deletes += len(slot_dels) + len(fe_dels)

    def _count_writes(self, plans: list[_Plan], report: ApplyReport) -> None:
        report.be4_puts = len({b for p in plans for b in p.be_puts})
        report.svc4_puts = sum(len(p.slot_puts) + len(p.slot0_puts) for p in plans)
        report.svc4_deletes = sum(len(p.slot_dels) + len(p.fe_dels) for p in plans)

    def _undo(self, p: _Plan) -> None:
        """Take back what a failed plan may have written: new keys go, rewritten keys get their old value."""
        m = self.maps
        if p.new_svc4_keys:
            m.svc4.delete_many(p.new_svc4_keys)
        if p.undo_puts:
            m.svc4.put_many(p.undo_puts)
        new_ids = [b for b in p.be_puts if b not in self._be_vals]
        if new_ids:
            m.be4.delete_many([ctypes.c_uint32(b) for b in new_ids])
        old_vals = [(b, self._be_vals[b]) for b in p.be_puts if b in self._be_vals]
        if old_vals:
            m.be4.put_many([(ctypes.c_uint32(b), abi.Be4Val(*v, 0)) for b, v in old_vals])

    def _commit(self, plans: list[_Plan], report: ApplyReport) -> set[int]:
        """Record admitted plans as programmed; return backend ids no longer referenced."""
        maybe_free: set[int] = set()
        orphans = self._services.get(ORPHANS)
        for p in plans:
            for bid, val in p.be_puts.items():
                self._be_vals[bid] = val
            for bid in p.new.backends - p.old.backends:
                self._be_refs[bid] += 1
            for bid in p.old.backends - p.new.backends:
                self._be_refs[bid] -= 1
                if self._be_refs[bid] <= 0:
                    maybe_free.add(bid)
            for fk in p.old.frontends:
                if fk not in p.new.frontends and self._owner.get(fk) == p.service:
                    del self._owner[fk]
                    waiting = self._waiting.pop(fk, None)
                    if waiting:
                        report.retry |= waiting
            for fk in p.new.frontends:
                self._owner[fk] = p.service
            if orphans is not None and p.service != ORPHANS:
                for fk in p.claimed:
                    orphans.frontends.pop(fk, None)
            for sp in p.old.svc_ports - p.new.svc_ports:
                sid = self._svc_ids.pop(sp, None)
                if sid is not None:
                    self._svc_id_owner.pop(sid, None)
            for sp, sid in p.svc_ids.items():
                if sp in p.new.svc_ports:
                    self._svc_ids[sp] = sid
                    self._svc_id_owner[sid] = sp
            self._svc4_entries += p.svc4_added - p.svc4_removed
            if p.new.frontends or p.new.backends:
                self._services[p.service] = p.new
            else:
                self._services.pop(p.service, None)
            if not p.empty:
                if p.service != ORPHANS:
                    report.changed.append(p.service)
                if log.isEnabledFor(logging.INFO):
                    log.info(
                        "service %s: %d frontends, %d backends programmed (%d slot writes, %d deletes)",
                        p.service or "(adopted entries)", len(p.new.frontends), len(p.new.backends),
                        len(p.slot_puts) + len(p.slot0_puts), len(p.slot_dels) + len(p.fe_dels),
                    )  # fmt: skip
        freed = {b for b in maybe_free if self._be_refs[b] <= 0}
        for b in freed:
            del self._be_refs[b]
        # ids allocated by plans that were not admitted, and never programmed, are forgotten
        if len(self._be_ids) != len(self._be_vals):
            for bk, bid in list(self._be_ids.items()):
                if bid not in self._be_vals and self._be_refs.get(bid, 0) <= 0:
                    del self._be_ids[bk]
        return freed

    def _free_and_flush(self, plans: list[_Plan], freed: set[int], report: ApplyReport) -> None:
        m = self.maps
        udp_freed: set[int] = set()
        aff_freed: set[int] = set()
        if freed:
            for b in freed:
                val = self._be_vals.pop(b, None)
                if val is not None:
                    if self._be_ids.get(val[:3]) == b:
                        del self._be_ids[val[:3]]
                    if val[2] == abi.IPPROTO_UDP:
                        udp_freed.add(b)
                aff_freed.add(b)
            m.be4.delete_many([ctypes.c_uint32(b) for b in sorted(freed)])
            report.be4_deletes += len(freed)
        # backends that left a service's slots but still exist: flush that service's UDP flows to them
        udp_pairs: set[tuple[int, int]] = set()
        aff_pairs: set[tuple[int, int]] = set()
        affinity_sids: set[int] = set()
        for p in plans:
            for fe in p.old.frontends.values():
                if fe.flags & abi.SvcFlag.AFFINITY:
                    affinity_sids.add(fe.svc_id)
            for sid, ids in p.old.active.items():
                gone = ids - p.new.active.get(sid, set())
                for b in gone:
                    if b in freed:
                        continue
                    val = self._be_vals.get(b)
                    if val is not None and val[2] == abi.IPPROTO_UDP:
                        udp_pairs.add((b, sid))
                    if sid in affinity_sids:
                        aff_pairs.add((b, sid))
        if udp_freed or udp_pairs:
            report.ct_flushed = flush_udp_conntrack(m.ct4, udp_freed, udp_pairs)
        if aff_freed or aff_pairs:
            report.aff_flushed = flush_affinity(m.aff4, aff_freed, aff_pairs)


def flush_udp_conntrack(ct4: MapOps[Any, Any], backends: set[int], pairs: set[tuple[int, int]]) -> int:
    """Delete UDP conntrack entries (both directions) of `backends`, or of (backend, svc_id) `pairs`."""
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


def sweep_conntrack(ct4: MapOps[Any, Any], now_ns: int | None = None) -> int:
    """Delete expired conntrack entries; return how many. `now_ns`: CLOCK_MONOTONIC, as bpf_ktime_get_ns."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    doomed = [k for k, v in ct4.items() if v.expires_ns <= now]
    return ct4.delete_many(doomed) if doomed else 0


def write_config(
    maps: MapSet,
    node_addr: str | None,
    *,
    syn_timeout: int = 0,
    tcp_timeout: int = 0,
    fin_timeout: int = 0,
    udp_timeout: int = 0,
    dsr_mode: int = abi.DsrMode.OFF,
) -> bool:
    """Write kp_cfg_v1 (0 timeouts mean the datapath default); return whether it changed."""
    cfg = abi.Config()
    cfg.node_addr = _nbo(node_addr) if node_addr else 0
    cfg.dsr_mode = int(dsr_mode)
    cfg.ct_syn_timeout = syn_timeout
    cfg.ct_tcp_timeout = tcp_timeout
    cfg.ct_fin_timeout = fin_timeout
    cfg.ct_udp_timeout = udp_timeout
    if bytes(maps.read_config()) == bytes(cfg):
        return False
    maps.write_config(cfg)
    return True


def sync_dirty(
    store: ClusterStore, syncer: Syncer, cfg: TranslateConfig, *, full: bool = False
) -> ApplyReport:
    """Translate the store's dirty Services (all of them if `full`) and apply them in one batch.

    Translate problems are counted in store.skipped as ("Service", reason); the Service is then
    removed from the maps, as it cannot be served. Services to retry are marked dirty again.
    """
    with gc_paused():
        return _sync_dirty(store, syncer, cfg, full)


def _sync_dirty(store: ClusterStore, syncer: Syncer, cfg: TranslateConfig, full: bool) -> ApplyReport:
    dirty = store.take_dirty_with_times()
    keys = set(store.services) | set(syncer.services) | set(dirty) if full else set(dirty)
    node = store.node
    desired: dict[str, list[Frontend]] = {}
    for key in keys:
        svc, slices = store.view(key)
        if svc is None:
            desired[key] = []
            continue
        try:
            desired[key] = translate_service(svc, slices, node, cfg)
        except TranslateError as err:
            store.skipped[("Service", err.reason)] += 1
            log.warning("%s", err)
            desired[key] = []
    report = syncer.apply(desired, full=full)
    report.first_change = dirty
    if report.retry:
        store.mark_dirty(report.retry)
    return report
