"""Desired frontends -> ordered, batched writes to the service, backend and conntrack maps.

Ordering (DESIGN.md) so that a reader in the kernel never sees a frontend pointing at nothing:
  1. new or changed backends (kp_be4)          4. slots beyond a lowered count deleted
  2. new or changed backend slots 1..n          5. frontends that went away deleted (slot 0 first)
  3. slot-0 entries (count, flags, svc_id)      6. backend ids no longer referenced freed, last
then UDP conntrack and affinity entries of backends that left a service are flushed (TCP flows are
left to finish). Each step is one batch for all services of an apply (the map splits it into
kernel batches of kproxy.bpf.maps.BATCH_CHUNK entries).

Speed (10,000 Services x 10 backends cold, bench/bench_sync.py): translate runs lazily per Service
while apply plans (_Translated), map keys and values are packed with struct into bytes (a frontend's
slots as one blob) instead of ctypes objects, backends are ints, committed per-service sets become
tuples, and sync_dirty runs with the cyclic GC paused (frozen afterwards, see store.gc_paused).

Ids: backend ids are stable per (address, port, protocol, nodeName) and monotonic: an id is never handed out
twice, and after a restart counting resumes above every id the backend, conntrack and affinity maps
still mention, so a conntrack entry can never point at a recycled id. The node is part of a backend's
identity because its kp_be4 value carries per-EndpointSlice facts (local, node address): the same pod
port listed by two Services whose slices disagree (one without nodeName, which kube-proxy serves as a
remote endpoint) gets one id per description, so each Service sees it as its own slice says. Service
ids are stable per (service, port name, protocol). adopt() rebuilds both tables and the programmed view
from the maps, so re-applying an unchanged Service after a restart writes nothing.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy import abi
from kproxy.bpf.mapapi import MapFullError, MapOps
from kproxy.desired import BackendRef, Frontend
from kproxy.lbsrc import SourceRangeSync, Staged
from kproxy.store import ClusterStore, gc_paused, trim_heap
from kproxy.svcnet import ServiceSpaceSync
from kproxy.translate import TranslateConfig, TranslateError, translate_service

log = logging.getLogger(__name__)

FKey = tuple[int, int, int, int]  # (addr NBO, port NBO, proto, scope)
# A backend as one int (a 32-44 byte int instead of a 64-88 byte tuple, 100,000 of them at scale):
# BKey = addr NBO | port NBO << 32 | proto << 48 | node << 56, `node` being the index of the
# endpoint's nodeName in Syncer._node_idx (0: no nodeName); BVal (its kp_be4 value) = addr | port |
# proto | flags << 56 | node_addr NBO << 64 | node << 96. The programmed table (Syncer._be_vals) adds
# the number of services referencing the backend above bit 128: one dict less (5 MB at 100,000
# backends), in the same int.
BKey = int
BVal = int
_BK_MASK = (1 << 56) - 1
_NODE_SHIFT = 96
_NODE_MASK = (1 << 32) - 1
_PROG_MASK = (1 << _NODE_SHIFT) - 1  # the bits a kp_be4 entry holds
_REFS_SHIFT = 128
_REF1 = 1 << _REFS_SHIFT
_VAL_MASK = _REF1 - 1


def _bkey(addr: int, port: int, proto: int, node: int = 0) -> BKey:
    return addr | port << 32 | proto << 48 | node << 56


def _key_of_val(val: BVal) -> BKey:
    return (val & _BK_MASK) | ((val >> _NODE_SHIFT) & _NODE_MASK) << 56


def _bval_proto(val: BVal) -> int:
    return (val >> 48) & 0xFF


def _pack_be4(val: BVal) -> bytes:
    return _PACK_BE4_VAL(
        val & 0xFFFFFFFF,
        (val >> 32) & 0xFFFF,
        (val >> 48) & 0xFF,
        (val >> 56) & 0xFF,
        (val >> 64) & 0xFFFFFFFF,
    )


SvcPort = tuple[str, str, int]  # (service, port name, proto)

_PROTO = {"TCP": abi.IPPROTO_TCP, "UDP": abi.IPPROTO_UDP}
ORPHANS = ""  # pseudo-service owning what adopt() found and no Service has claimed yet

_UNPACK_U32 = struct.Struct("=I").unpack
_inet_aton = socket.inet_aton


def _is_ipv4(address: str) -> bool:
    return "." in address and ":" not in address


def _nbo(address: str) -> int:
    return int(_UNPACK_U32(_inet_aton(address))[0])


_htons = socket.htons
# Keys and values are packed straight into bytes: sync writes ~200,000 of them on a cold start, and a
# ctypes structure per entry cost more than everything else sync does. MapOps implementations take
# anything bytes() accepts (they join the bytes into one batch buffer). Layouts equal abi.h's,
# checked below against the ctypes mirror.
_PACK_SVC4_KEY = struct.Struct("=IHHBBxx").pack  # addr, port, slot, proto, scope, pad[2]
_PACK_SVC4_VAL = struct.Struct("=IIHHI").pack  # backend_id, svc_id, count, flags, affinity_timeout
_PACK_BE4_KEY = _PACK_U32 = struct.Struct("=I").pack
_PACK_U16 = struct.Struct("=H").pack
_PACK_BE4_VAL = struct.Struct("=IHBBI").pack  # addr, port, proto, flags, node_addr
assert struct.calcsize("=IHHBBxx") == ctypes.sizeof(abi.Svc4Key)
assert struct.calcsize("=IIHHI") == ctypes.sizeof(abi.Svc4Val)
assert struct.calcsize("=IHBBI") == ctypes.sizeof(abi.Be4Val)
_BE_LOCAL = int(abi.BackendFlag.LOCAL)
_BE_TERMINATING = int(abi.BackendFlag.TERMINATING)


class MapSet(Protocol):
    svc4: MapOps[Any, Any]
    be4: MapOps[Any, Any]
    ct4: MapOps[Any, Any]
    aff4: MapOps[Any, Any]
    lbsrc4: MapOps[Any, Any]
    svcnet4: MapOps[Any, Any]
    svcnet_span: MapOps[Any, Any]

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
    # every id referenced (slots and retained); a set while planned, a tuple once committed
    backends: set[int] | tuple[int, ...] = field(default_factory=set)
    # svc_id -> ids in its slots; sets while planned, tuples once committed
    active: dict[int, set[int]] | dict[int, tuple[int, ...]] = field(default_factory=dict)
    svc_ports: set[SvcPort] | tuple[SvcPort, ...] = field(default_factory=set)  # a tuple once committed

    def compact(self) -> _Svc:
        """The committed form: tuples take a sixth of the memory of small sets (10,000s of services)."""
        # Most services' backends and active ids equal one frontend's slots: share that tuple.
        by_len: dict[int, tuple[int, ...]] = {}
        for fe in self.frontends.values():
            by_len.setdefault(len(fe.slots), fe.slots)

        def share(ids: set[int] | tuple[int, ...]) -> tuple[int, ...]:
            if type(ids) is tuple:
                return ids
            t = by_len.get(len(ids))
            return t if t is not None and ids.issuperset(t) else tuple(ids)  # type: ignore[union-attr]

        self.backends = share(self.backends)
        self.active = {sid: share(ids) for sid, ids in self.active.items()}
        self.svc_ports = tuple(self.svc_ports)  # a set of one is 216 bytes
        return self


@dataclass(slots=True)
class _Plan:
    service: str
    new: _Svc
    old: _Svc
    claimed: list[FKey] = field(default_factory=list)  # orphan frontends taken over
    be_puts: dict[int, BVal] = field(default_factory=dict)
    be_vals: dict[int, BVal] = field(default_factory=dict)
    # kp_svc4 keys and values packed by _PACK_*; an element may hold several consecutive entries
    # (all slots of a new frontend in one keys blob and one values blob)
    slot_puts: list[tuple[bytes, bytes]] = field(default_factory=list)
    slot0_puts: list[tuple[bytes, bytes]] = field(default_factory=list)
    slot_dels: list[bytes] = field(default_factory=list)
    fe_dels: list[bytes] = field(default_factory=list)
    undo_puts: list[tuple[bytes, bytes]] = field(default_factory=list)
    new_svc4_keys: list[bytes] = field(default_factory=list)
    svc4_added: int = 0
    svc4_removed: int = 0
    svc_ids: dict[SvcPort, int] = field(default_factory=dict)
    conflicts: list[FKey] = field(default_factory=list)
    src_ranges: dict[int, tuple[str, ...]] = field(default_factory=dict)  # svc_id -> CIDRs (kproxy.lbsrc)

    @property
    def empty(self) -> bool:
        return not (self.be_puts or self.slot_puts or self.slot0_puts or self.slot_dels or self.fe_dels)


@dataclass(slots=True)
class _Flush:
    """Conntrack and affinity entries to flush once an apply's chunks are written."""

    udp_freed: set[int] = field(default_factory=set)
    aff_freed: set[int] = field(default_factory=set)
    udp_pairs: set[tuple[int, int]] = field(default_factory=set)
    aff_pairs: set[tuple[int, int]] = field(default_factory=set)


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
    tcp_frontends_removed: int = 0  # deleted while their connections may live on (orphan_until_ns)
    services: int = 0  # services applied (planned), changed or not
    # sync_dirty: monotonic time of each synced Service's first change (network programming latency)
    first_change: dict[str, float] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return self.svc4_puts + self.svc4_deletes + self.be4_puts + self.be4_deletes


# Services planned, written and committed per batch when an apply has more (see Syncer._apply)
APPLY_CHUNK = 1000

_KS = ctypes.sizeof(abi.Svc4Key)
_VS = ctypes.sizeof(abi.Svc4Val)


def _put_entries(m: MapOps[Any, Any], blobs: list[tuple[bytes, bytes]]) -> int:
    """Write kp_svc4 entries given as (keys, values) blobs; returns how many.

    Plans keep blobs (two objects per frontend instead of three per entry until the write), joined
    into one buffer per map that the map writes in kernel-sized batches: no per-entry objects.
    """
    k = b"".join([k for k, _ in blobs])
    v = b"".join([v for _, v in blobs])
    n = len(k) // _KS
    if n:
        m.put_packed(k, v, n)
    return n


def _put_be4(m: MapOps[Any, Any], vals: dict[int, BVal]) -> None:
    """Write kp_be4 entries (backend id -> value)."""
    if vals:
        m.put_packed(b"".join(map(_PACK_U32, vals)), b"".join(map(_pack_be4, vals.values())), len(vals))


def _keys(blobs: list[bytes]) -> list[bytes]:
    """One kp_svc4 key per entry from key blobs."""
    k = b"".join(blobs)
    return [k[i : i + _KS] for i in range(0, len(k), _KS)]


def _n_entries(pairs: list[tuple[bytes, bytes]]) -> int:
    return sum(len(k) for k, _ in pairs) // _KS


def _n_keys(keys: list[bytes]) -> int:
    return sum(len(k) for k in keys) // _KS


def _key(fk: FKey, slot: int) -> bytes:
    return _PACK_SVC4_KEY(fk[0], fk[1], slot, fk[2], fk[3])


class Syncer:
    """Keeps kp_svc4/kp_be4 equal to the desired frontends, one incremental apply at a time."""

    def __init__(self, maps: MapSet) -> None:
        self.maps = maps
        self.errors: Counter[str] = Counter()  # by reason, for metrics
        self._services: dict[str, _Svc] = {}
        self._owner: dict[FKey, str] = {}
        self._waiting: dict[FKey, set[str]] = {}
        self._be_ids: dict[BKey, int] = {}
        # node name -> its index in BKeys (never reused: an index names one node for the agent's life)
        self._node_idx: dict[str, int] = {}
        # ids adopt() found, by (address, port, protocol) (the maps do not hold node names): the first
        # plan that wants such a backend takes the id over, so a restart keeps ids and flows
        self._adopted: dict[BKey, list[int]] = {}
        # backend id -> programmed kp_be4 value | services referencing it << _REFS_SHIFT
        self._be_vals: dict[int, BVal] = {}
        self._next_be = 1
        self._svc_ids: dict[SvcPort, int] = {}
        self._svc_id_owner: dict[int, SvcPort] = {}
        self.svc_ids_version = 0  # bumped whenever a service port gets or loses its id (service_ports())
        # what changed in service_ports() since the agent last took it (take_svc_id_changes):
        # (svc_id, its port, or None when the id was freed), in order
        self._svc_id_log: list[tuple[int, SvcPort | None]] = []
        self._svc_id_log_lost = True  # the log does not cover everything: take the whole table
        self._next_svc = 1
        self._svc4_entries = 0
        self._lbsrc = SourceRangeSync(maps.lbsrc4)
        self.svcnet = ServiceSpaceSync(maps.svcnet4, maps.svcnet_span)
        # node name -> NBO address, for kp_be4_val.node_addr; local_node_addr for local backends of a
        # node the table does not list (yet)
        self.node_addrs: dict[str, int] = {}
        self.local_node_addr = 0
        self._node_addrs_version = -1

    def set_nodes(self, addrs: Mapping[str, str], local_addr: str | None, version: int | None = None) -> bool:
        """Take the cluster's node table (name -> IPv4); return whether it changed since the last call
        with the same version (the store's node_addrs_version)."""
        if (
            version is not None
            and version == self._node_addrs_version
            and self.local_node_addr == (_nbo(local_addr) if local_addr else 0)
        ):
            return False
        self._node_addrs_version = -1 if version is None else version
        self.node_addrs = {n: _nbo(a) for n, a in addrs.items() if _is_ipv4(a)}
        self.local_node_addr = _nbo(local_addr) if local_addr and _is_ipv4(local_addr) else 0
        return True

    # ---- introspection (CLI, metrics, tests) ----
    @property
    def services(self) -> list[str]:
        return [s for s in self._services if s != ORPHANS]

    def backend_id(self, address: str, port: int, protocol: str, node: str | None = None) -> int | None:
        """The id of this backend as an EndpointSlice on `node` lists it; with node=None, the backend's
        only id whatever its node (None if none or several)."""
        base = _bkey(_nbo(address), _htons(port), _PROTO[protocol])
        if node is not None:
            idx = self._node_idx.get(node)
            return None if idx is None else self._be_ids.get(base | idx << 56)
        found = [bid for bk, bid in self._be_ids.items() if bk & _BK_MASK == base]
        return found[0] if len(found) == 1 else None

    def backend_ids(self, address: str, port: int, protocol: str) -> list[int]:
        """Every id of this backend (one per node its EndpointSlices name for it)."""
        base = _bkey(_nbo(address), _htons(port), _PROTO[protocol])
        return sorted(bid for bk, bid in self._be_ids.items() if bk & _BK_MASK == base)

    def svc_id(self, service: str, port_name: str, protocol: str) -> int | None:
        return self._svc_ids.get((service, port_name, _PROTO[protocol]))

    def _svc_id_changed(self, sid: int, sp: SvcPort | None) -> None:
        self.svc_ids_version += 1
        if self._svc_id_log_lost:
            return
        self._svc_id_log.append((sid, sp))
        if len(self._svc_id_log) > 2 * len(self._svc_ids) + 4096:  # nobody takes it: stop keeping it
            self._svc_id_log.clear()
            self._svc_id_log_lost = True

    def take_svc_id_changes(self) -> list[tuple[int, SvcPort | None]] | None:
        """The changes of service_ports() since the last call, in order ((id, port) or (id, None) for a
        freed id); None when they are not known (the first call, after adopt()): take service_ports()."""
        if self._svc_id_log_lost:
            self._svc_id_log_lost = False
            return None
        log, self._svc_id_log = self._svc_id_log, []
        return log

    def service_ports(self) -> dict[int, SvcPort]:
        """svc_id -> (service "ns/name", port name, IP protocol number) of every programmed port
        (what the CLI metadata file and metrics label service ids with)."""
        return {sid: sp for sp, sid in self._svc_ids.items()}

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
        self._adopted.clear()
        self._be_vals.clear()
        self._svc_ids.clear()
        self._svc_id_owner.clear()
        self.svc_ids_version += 1
        self._svc_id_log.clear()
        self._svc_id_log_lost = True
        max_be = 0
        max_svc = 0
        for k, v in self.maps.be4.items():
            bid = int(k.value) if isinstance(k, ctypes.c_uint32) else int(k)
            bk = _bkey(v.addr, v.port, v.proto)
            self._be_vals[bid] = bk | v.flags << 56 | v.node_addr << 64
            self._adopted.setdefault(bk, []).append(bid)
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
            self._be_vals[bid] += _REF1
        self._services[ORPHANS] = orphans
        self._lbsrc.adopt(fe.svc_id for fe in orphans.frontends.values())
        self.svcnet.adopt()
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

    def _node_index(self, node: str) -> int:
        idx = self._node_idx[node] = len(self._node_idx) + 1
        return idx

    def _claim_adopted(self, base: BKey, node: int, val: BVal) -> int | None:
        """Take over an id adopt() found for this address, port and protocol: the one whose entry says
        the same node address and locality as `val`, else any. Its programmed value gets `node`."""
        cands = [b for b in self._adopted.get(base, ()) if b in self._be_vals]
        if not cands:
            self._adopted.pop(base, None)
            return None
        facts = (_BE_LOCAL << 56) | (_NODE_MASK << 64)
        bid = next((b for b in cands if self._be_vals[b] & facts == val & facts), cands[0])
        cands.remove(bid)
        if cands:
            self._adopted[base] = cands
        else:
            del self._adopted[base]
        cur = self._be_vals[bid]
        self._be_vals[bid] = cur & ~(_NODE_MASK << _NODE_SHIFT) | node << _NODE_SHIFT
        self._be_ids[base | node << 56] = bid
        return bid

    def _be_ids_of(self, backends: Iterable[BackendRef], plan: _Plan) -> set[int]:
        """The backend ids of `backends`, allocating new ones; records their kp_be4 values in the plan."""
        ids = self._be_ids
        programmed = self._be_vals
        be_vals = plan.be_vals
        be_puts = plan.be_puts
        out = set()
        next_be = self._next_be
        node_addrs = self.node_addrs
        node_idx = self._node_idx
        local_addr = self.local_node_addr
        adopted = self._adopted
        try:
            for address, port, protocol, node, local, terminating, _zone in backends:
                base = _UNPACK_U32(_inet_aton(address))[0] | _htons(port) << 32 | _PROTO[protocol] << 48
                if node is None:
                    nidx = naddr = 0
                else:
                    nidx = node_idx.get(node) or self._node_index(node)
                    naddr = node_addrs.get(node, 0)
                if local and not naddr:
                    naddr = local_addr
                val = (
                    base
                    | ((_BE_LOCAL if local else 0) | (_BE_TERMINATING if terminating else 0)) << 56
                    | naddr << 64
                    | nidx << _NODE_SHIFT
                )
                bk = base | nidx << 56
                bid = ids.get(bk)
                if bid is None and adopted:
                    bid = self._claim_adopted(base, nidx, val)
                if bid is None:  # a new id was never programmed: no need to compare
                    bid = ids[bk] = next_be
                    next_be += 1
                    be_vals[bid] = be_puts[bid] = val
                elif bid not in be_vals:
                    be_vals[bid] = val
                    prev = programmed.get(bid)
                    if prev is None or prev & _VAL_MASK != val:
                        be_puts[bid] = val
                out.add(bid)
        finally:
            self._next_be = next_be
        return out

    def _plan(self, service: str, frontends: Iterable[Frontend]) -> _Plan:
        old = self._services.get(service) or _Svc()
        new_backends: set[int] = set()
        new_active: dict[int, set[int]] = {}
        new = _Svc(backends=new_backends, active=new_active)
        plan = _Plan(service, new, old)
        orphans = self._services.get(ORPHANS)
        memo: dict[int, tuple[int, ...]] = {}  # id(fe.backends) -> slots; fe alive meanwhile
        be_ids = self._be_ids_of
        for fe in frontends:
            proto = _PROTO.get(fe.protocol)
            if proto is None:
                raise ValueError(f"frontend {fe.address}:{fe.port} has unsupported protocol {fe.protocol}")
            fk = (_UNPACK_U32(_inet_aton(fe.address))[0], _htons(fe.port), proto, int(fe.scope))
            owner = self._owner.get(fk)
            if owner is not None and owner != service and owner != ORPHANS:
                plan.conflicts.append(fk)
                continue
            if fk in new.frontends:
                continue
            sp = (service, fe.port_name, proto)
            sid = self._svc_ids.get(sp) or plan.svc_ids.get(sp) or self._alloc_svc_id(sp, fk, plan, old)
            new.svc_ports.add(sp)  # type: ignore[union-attr]  # a set while planned
            backends = fe.backends
            # translate hands the same backends tuple to several frontends (ClusterIP, NodePorts...)
            ids_t = memo.get(id(backends))
            if ids_t is None:
                ids_t = memo[id(backends)] = tuple(sorted(be_ids(backends, plan)))
            if fe.retained:
                new_backends.update(be_ids(fe.retained, plan))
            new_backends.update(ids_t)
            act = new_active.get(sid)
            if act is None:
                new_active[sid] = set(ids_t)
            else:
                act.update(ids_t)
            new.frontends[fk] = _Fe(sid, fe.flags, fe.affinity_timeout, ids_t)
            if fe.source_ranges:
                plan.src_ranges[sid] = fe.source_ranges
            if owner == ORPHANS:
                plan.claimed.append(fk)
        # diff against what is programmed (own frontends + orphans being claimed)
        prev: dict[FKey, _Fe] = old.frontends
        if orphans is not None and plan.claimed:
            prev = dict(prev)
            for fk in plan.claimed:
                prev[fk] = orphans.frontends[fk]
        for fk, st in new.frontends.items():
            o = prev.get(fk)
            n_new = len(st.slots)
            if o is None:
                plan.svc4_added += 1 + n_new
                a, p, pr, sc = fk
                sid = st.svc_id
                k0 = _PACK_SVC4_KEY(a, p, 0, pr, sc)
                plan.new_svc4_keys.append(k0)
                if n_new:
                    # all slots at once: keys differ only in the u16 slot at offset 6, values only in
                    # the u32 backend id at offset 0, so each blob is one join of C-packed pieces
                    head, tail = k0[:6], k0[8:]
                    keys = head + (tail + head).join(map(_PACK_U16, range(1, n_new + 1))) + tail
                    rest = _PACK_SVC4_VAL(0, sid, 0, 0, 0)[4:]
                    values = rest.join(map(_PACK_U32, st.slots)) + rest
                    plan.new_svc4_keys.append(keys)
                    plan.slot_puts.append((keys, values))
                plan.slot0_puts.append((k0, _PACK_SVC4_VAL(0, sid, n_new, st.flags, st.affinity_timeout)))
                continue
            n_old = len(o.slots)
            same_id = o.svc_id == st.svc_id
            for i, bid in enumerate(st.slots, 1):
                if i <= n_old and same_id and o.slots[i - 1] == bid:
                    continue
                k = _key(fk, i)
                plan.slot_puts.append((k, _PACK_SVC4_VAL(bid, st.svc_id, 0, 0, 0)))
                if i <= n_old:
                    plan.undo_puts.append((k, _PACK_SVC4_VAL(o.slots[i - 1], o.svc_id, 0, 0, 0)))
                else:
                    plan.new_svc4_keys.append(k)
                    plan.svc4_added += 1
            old0 = (o.svc_id, o.flags, o.affinity_timeout, n_old)
            if old0 != (st.svc_id, st.flags, st.affinity_timeout, n_new):
                k0 = _key(fk, 0)
                v0 = _PACK_SVC4_VAL(0, st.svc_id, n_new, st.flags, st.affinity_timeout)
                plan.slot0_puts.append((k0, v0))
                plan.undo_puts.append((k0, _PACK_SVC4_VAL(0, o.svc_id, n_old, o.flags, o.affinity_timeout)))
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
        # Big applies (the cold start: 10,000s of Services) go in chunks of APPLY_CHUNK Services, each
        # planned, written in DESIGN.md's order and committed before the next is planned: every
        # Service's own writes stay ordered, and the plans' packed entries of one chunk are garbage
        # before the next is built. One batch for all of them peaked ~50 MB higher, and the allocator
        # keeps such a peak as RSS for good.
        chunk: list[_Plan] = []
        flush = _Flush()
        for service, frontends in desired.items():
            if service == ORPHANS:
                continue
            report.services += 1
            try:
                chunk.append(self._plan(service, frontends))
            except (ValueError, OverflowError) as err:
                self.errors["invalid_frontend"] += 1
                report.failed[service] = str(err)
                log.error("service %s not programmed: %s", service, err)
            if len(chunk) >= APPLY_CHUNK:
                self._apply_plans(chunk, report, flush)
                chunk = []
        if full:
            for service in list(self._services):
                if service not in desired and service != ORPHANS:
                    chunk.append(self._plan(service, ()))
        admitted = self._admit(chunk, report)
        self._apply_plans(admitted, report, flush, admitted=True)
        if full and ORPHANS in self._services:
            # What adopt() found and no Service claimed is stale now that the view is complete. Planned
            # after the Services are committed: only their committed plans took adopted frontends over
            # (_commit); a frontend a failed plan claimed goes with the orphans, slots and backend ids
            # together, never leaving slots that name freed ids.
            self._apply_plans([self._plan(ORPHANS, ())], report, flush)
        self._flush(flush, report)
        if full:
            self._adopted.clear()  # every adopted id was claimed or freed with the orphans
        return report

    def _apply_plans(
        self, plans: list[_Plan], report: ApplyReport, flush: _Flush, admitted: bool = False
    ) -> None:
        """Admit (unless done), write, commit, then free and flush one batch of plans."""
        if not admitted:
            plans = self._admit(plans, report)
        plans, ranges = self._stage_source_ranges(plans, report)
        try:
            self._write_batched(plans, report)
        except MapFullError as err:
            log.error("batched map update failed (%s); applying service by service", err)
            self.errors["map_full"] += 1
            ok = []
            for p in plans:
                try:
                    self._write_batched([p], ApplyReport())
                    ok.append(p)
                except MapFullError as err2:
                    self._undo(p)
                    self._fail(p, report, f"map {err2.map_name} is full", "map_full")
            plans = ok
            self._count_writes(plans, report)
        self._lbsrc.finish(ranges, plans)
        freed = self._commit(plans, report)
        self._free_and_flush(plans, freed, report, flush)

    def _stage_source_ranges(self, plans: list[_Plan], report: ApplyReport) -> tuple[list[_Plan], Staged]:
        """kp_lbsrc4 entries the plans add, written before their slot-0 entries (see kproxy.lbsrc);
        plans whose ranges cannot be written fail here, before anything of theirs is."""
        track_old = bool(self._lbsrc.programmed)  # else no old range can go: skip listing svc ids
        owner = self._svc_id_owner

        def sids(p: _Plan) -> list[int]:
            # not the ids another Service owns: adopted orphans may share one with the claiming Service
            if not track_old:
                return []
            mine = (p.service,)
            return [
                f.svc_id
                for s in (p.old, p.new)
                for f in s.frontends.values()
                if owner.get(f.svc_id, mine)[0] == p.service
            ]

        staged, refused = self._lbsrc.stage((p, p.src_ranges, sids(p)) for p in plans)
        if refused:
            for p, why in refused:
                reason = "map_full" if "full" in why else "invalid_source_range"
                self._fail(p, report, why, reason)  # type: ignore[arg-type]
            bad = {id(p) for p, _ in refused}
            plans = [p for p in plans if id(p) not in bad]
        return plans, staged

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
        for p in plans:
            be_puts.update(p.be_puts)
        # one batch per map and step for all services
        m = self.maps
        _put_be4(m.be4, be_puts)
        n_slots = _put_entries(m.svc4, [e for p in plans for e in p.slot_puts])
        n_slot0 = _put_entries(m.svc4, [e for p in plans for e in p.slot0_puts])
        slot_dels = _keys([k for p in plans for k in p.slot_dels])
        fe_dels = _keys([k for p in plans for k in p.fe_dels])
        if slot_dels:
            m.svc4.delete_many(slot_dels)
        if fe_dels:
            m.svc4.delete_many(fe_dels)
        report.be4_puts += len(be_puts)
        report.svc4_puts += n_slots + n_slot0
        report.svc4_deletes += len(slot_dels) + len(fe_dels)

    def _count_writes(self, plans: list[_Plan], report: ApplyReport) -> None:
        report.be4_puts += len({b for p in plans for b in p.be_puts})
        report.svc4_puts += sum(_n_entries(p.slot_puts) + _n_entries(p.slot0_puts) for p in plans)
        report.svc4_deletes += sum(_n_keys(p.slot_dels) + _n_keys(p.fe_dels) for p in plans)

    def _undo(self, p: _Plan) -> None:
        """Take back what a failed plan may have written: new keys go, rewritten keys get their old value."""
        m = self.maps
        if p.new_svc4_keys:
            m.svc4.delete_many(_keys(p.new_svc4_keys))
        if p.undo_puts:
            _put_entries(m.svc4, p.undo_puts)
        new_ids = [b for b in p.be_puts if b not in self._be_vals]
        if new_ids:
            m.be4.delete_many([_PACK_BE4_KEY(b) for b in new_ids])
        old_vals = [(b, self._be_vals[b]) for b in p.be_puts if b in self._be_vals]
        if old_vals:
            m.be4.put_many([(_PACK_BE4_KEY(b), _pack_be4(v)) for b, v in old_vals])

    def _commit(self, plans: list[_Plan], report: ApplyReport) -> set[int]:
        """Record admitted plans as programmed; return backend ids no longer referenced."""
        maybe_free: set[int] = set()
        orphans = self._services.get(ORPHANS)
        vals = self._be_vals
        vals_get = vals.get
        for p in plans:
            puts = p.be_puts
            if vals.keys().isdisjoint(puts):  # all new (the cold start): nothing to keep
                vals.update(puts)
            else:
                for bid, v in puts.items():
                    prev = vals_get(bid)
                    vals[bid] = v if prev is None else v | (prev - (prev & _VAL_MASK))  # keeps the count
            old_be = p.old.backends
            new_be = p.new.backends
            # every id a plan references is programmed or in its be_puts, so in vals by now
            for bid in new_be if not old_be else [b for b in new_be if b not in old_be]:
                vals[bid] += _REF1
            for bid in [b for b in old_be if b not in new_be]:
                cur = vals_get(bid)
                if cur is None:
                    continue
                if cur < _REF1 * 2:  # this was the last reference
                    vals[bid] = cur & _VAL_MASK
                    maybe_free.add(bid)
                else:
                    vals[bid] = cur - _REF1
            for fk in p.old.frontends:
                if fk in p.new.frontends:
                    continue
                if fk[2] == abi.IPPROTO_TCP:
                    report.tcp_frontends_removed += 1
                if self._owner.get(fk) == p.service:
                    del self._owner[fk]
                    waiting = self._waiting.pop(fk, None)
                    if waiting:
                        report.retry |= waiting
            for fk in p.new.frontends:
                self._owner[fk] = p.service
            if orphans is not None and p.service != ORPHANS:
                for fk in p.claimed:
                    orphans.frontends.pop(fk, None)
            for sp in [sp for sp in p.old.svc_ports if sp not in p.new.svc_ports]:
                sid = self._svc_ids.pop(sp, None)
                if sid is not None:
                    self._svc_id_owner.pop(sid, None)
                    self._svc_id_changed(sid, None)
            for sp, sid in p.svc_ids.items():
                if sp in p.new.svc_ports:
                    was = self._svc_ids.get(sp)
                    if was != sid:
                        if was is not None:
                            self._svc_id_changed(was, None)
                        self._svc_id_changed(sid, sp)
                    self._svc_ids[sp] = sid
                    self._svc_id_owner[sid] = sp
            self._svc4_entries += p.svc4_added - p.svc4_removed
            if p.new.frontends or p.new.backends:
                self._services[p.service] = p.new.compact()
            else:
                self._services.pop(p.service, None)
            if not p.empty:
                if p.service != ORPHANS:
                    report.changed.append(p.service)
                if log.isEnabledFor(logging.DEBUG):  # a line per Service per change: debug
                    log.debug(
                        "service %s: %d frontends, %d backends programmed (%d slot writes, %d deletes)",
                        p.service or "(adopted entries)", len(p.new.frontends), len(p.new.backends),
                        _n_entries(p.slot_puts) + _n_entries(p.slot0_puts),
                        _n_keys(p.slot_dels) + _n_keys(p.fe_dels),
                    )  # fmt: skip
        freed = {b for b in maybe_free if vals_get(b, 0) < _REF1}
        # ids allocated by plans that were not admitted, and never programmed, are forgotten
        if len(self._be_ids) != len(self._be_vals):
            for bk, bid in list(self._be_ids.items()):
                if bid not in self._be_vals:
                    del self._be_ids[bk]
        return freed

    def _free_and_flush(
        self, plans: list[_Plan], freed: set[int], report: ApplyReport, flush: _Flush | None = None
    ) -> None:
        """Free backend ids no longer referenced, then flush UDP conntrack and affinity entries of
        backends that left a service: now, or, given `flush`, once its caller's chunks are all done
        (each flush walks the whole conntrack map)."""
        m = self.maps
        later = flush is not None
        if flush is None:
            flush = _Flush()
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
                for sid, ids in p.old.active.items():
                    if sid in affinity_sids:
                        aff_backends.update(ids)
        if freed:
            for b in freed:
                val = self._be_vals.pop(b, None)
                if val is not None:
                    if self._be_ids.get(_key_of_val(val)) == b:
                        del self._be_ids[_key_of_val(val)]
                    if _bval_proto(val) == abi.IPPROTO_UDP:
                        udp_freed.add(b)
                if b in aff_backends:
                    aff_freed.add(b)
            m.be4.delete_many([_PACK_BE4_KEY(b) for b in sorted(freed)])
            report.be4_deletes += len(freed)
        # backends that left a service's slots but still exist: flush that service's UDP flows to them
        udp_pairs = flush.udp_pairs
        aff_pairs = flush.aff_pairs
        for p in plans:
            for sid, ids in p.old.active.items():
                gone = set(ids).difference(p.new.active.get(sid, ()))
                for b in gone:
                    if b in freed:
                        continue
                    val = self._be_vals.get(b)
                    if val is not None and _bval_proto(val) == abi.IPPROTO_UDP:
                        udp_pairs.add((b, sid))
                    if sid in affinity_sids:
                        aff_pairs.add((b, sid))
        if not later:
            self._flush(flush, report)

    def _flush(self, flush: _Flush, report: ApplyReport) -> None:
        m = self.maps
        if flush.udp_freed or flush.udp_pairs:
            report.ct_flushed += flush_udp_conntrack(m.ct4, flush.udp_freed, flush.udp_pairs)
        if flush.aff_freed or flush.aff_pairs:
            report.aff_flushed += flush_affinity(m.aff4, flush.aff_freed, flush.aff_pairs)


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


def orphaned_tcp_flows(ct4: MapOps[Any, Any], live_svc_ids: set[int], now_ns: int | None = None) -> int:
    """Live TCP flows from outside the node whose Service port is gone (their svc_id is programmed no
    more): while there are any, kp_from_netdev must keep looking them up (kp_config.orphan_until_ns).
    Flows a DSR backend node tracks carry no svc_id and do not count."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    external = int(abi.CtFlag.EXTERNAL)
    return sum(
        1
        for k, v in ct4.items()
        if k.dir == abi.CtDir.FWD
        and k.proto == abi.IPPROTO_TCP
        and v.flags & external
        and v.svc_id
        and v.svc_id not in live_svc_ids
        and v.expires_ns > now
    )


def sweep_snat(snat4: MapOps[Any, Any], now_ns: int | None = None) -> int:
    """Delete expired SNAT entries (their expiry follows their flow's conntrack entry); return how many.
    The datapath ignores them already and takes their ports over; sweeping frees the map's room."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    doomed = [k for k, v in snat4.items() if v.expires_ns <= now]
    return snat4.delete_many(doomed) if doomed else 0


def write_config(
    maps: MapSet,
    node_addr: str | None,
    *,
    syn_timeout: int = 0,
    tcp_timeout: int = 0,
    fin_timeout: int = 0,
    udp_timeout: int = 0,
    dsr_mode: int = abi.DsrMode.OFF,
    hairpin_addr: str | None = None,
    snat_port_min: int = 0,
    snat_port_max: int = 0,
    lan_mtu: int = 0,
    external_cluster_ip: bool = True,
    orphan_until_ns: int = 0,
) -> bool:
    """Write kp_cfg_v1 whole from these settings (0 / None = the datapath default). Of the previous
    contents only a later orphan_until_ns is kept (CLOCK_MONOTONIC: until then kp_from_netdev looks
    up connections whose frontend was deleted), so a restarted agent does not forget the flows its
    predecessor's deletions left. Return whether it changed."""
    if not 0 <= snat_port_min <= snat_port_max <= 65535:
        raise ValueError(f"SNAT port range {snat_port_min}-{snat_port_max}: need 0 <= MIN <= MAX <= 65535")
    cfg = abi.Config()
    cfg.node_addr = _nbo(node_addr) if node_addr else 0
    cfg.dsr_mode = int(dsr_mode)
    cfg.ct_syn_timeout = syn_timeout
    cfg.ct_tcp_timeout = tcp_timeout
    cfg.ct_fin_timeout = fin_timeout
    cfg.ct_udp_timeout = udp_timeout
    cfg.hairpin_addr = _nbo(hairpin_addr) if hairpin_addr else 0
    cfg.snat_port_min = snat_port_min
    cfg.snat_port_max = snat_port_max
    cfg.lan_mtu = lan_mtu
    cfg.flags = 0 if external_cluster_ip else int(abi.ConfigFlag.NO_EXTERNAL_CLUSTER_IP)
    old = maps.read_config()
    cfg.orphan_until_ns = max(orphan_until_ns, old.orphan_until_ns)
    if bytes(old) == bytes(cfg):
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
        report = _sync_dirty(store, syncer, cfg, full)
    if report.services >= APPLY_CHUNK:
        trim_heap()  # what a big apply's plans freed, see trim_heap
    return report


class _Translated(Mapping[str, list[Frontend]]):
    """service key -> its frontends, translated when apply asks for them: apply plans one Service at a
    time, so the frontends and BackendRefs of one Service are garbage by the time the next is
    translated instead of all of them being alive at once (the cold sync's peak memory)."""

    def __init__(self, store: ClusterStore, keys: set[str], cfg: TranslateConfig) -> None:
        self.store = store
        self.keys_ = keys
        self.cfg = cfg

    def __getitem__(self, key: str) -> list[Frontend]:
        if key not in self.keys_:
            raise KeyError(key)
        store = self.store
        svc, slices = store.view(key)
        if svc is None:
            return []
        try:
            return translate_service(svc, slices, store.node, self.cfg)
        except TranslateError as err:
            store.skipped[("Service", err.reason)] += 1
            log.warning("%s", err)
            return []

    def __contains__(self, key: object) -> bool:
        return key in self.keys_

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _sync_dirty(store: ClusterStore, syncer: Syncer, cfg: TranslateConfig, full: bool) -> ApplyReport:
    local = next((a for a in store.node.addresses if _is_ipv4(a)), None)
    # Services with endpoints on a node whose address changed were marked dirty by the store.
    syncer.set_nodes(store.node_addrs, local, store.node_addrs_version)
    dirty = store.take_dirty_with_times()
    keys = set(store.services) | set(syncer.services) | set(dirty) if full else set(dirty)
    report = syncer.apply(_Translated(store, keys, cfg), full=full)
    # after the frontends: a packet to a new frontend finds it before its ClusterIP's REJECT entry
    syncer.svcnet.sync(store, full=full)
    report.first_change = dirty
    if report.retry:
        store.mark_dirty(report.retry)
    return report
