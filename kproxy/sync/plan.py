"""Diff planning: one Service's desired frontends of one family against what is programmed -> a Plan
of packed kp_svc4 (kp_svc6) entries to put and delete, kp_be4 (kp_be6) values to put, and what to put
back if its writes fail."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from kproxy import abi
from kproxy.desired import Frontend
from kproxy.sync.family import FAMILY4, Family
from kproxy.sync.ids import BackendIds, ServiceIds
from kproxy.sync.state import ORPHANS, PROTO, Fe, FKey, Plan, Svc

_UNPACK_U32 = abi.unpack_u32
_inet_aton = socket.inet_aton
_inet_pton = socket.inet_pton
_AF_INET6 = socket.AF_INET6
_htons = abi.port_to_nbo
_PACK_SVC4_KEY = abi.pack_svc4_key
_PACK_SVC4_VAL = abi.pack_svc4_val
_PACK_U32 = abi.pack_u32
_PACK_U16 = abi.pack_u16


# port -> its NBO int: one int object for every frontend key on that port (FKeys live as long as
# their Services; 10,000s of them on port 80 or 443)
_NBO_PORTS: dict[int, int] = {}


def _nbo_port(port: int) -> int:
    nbo = _htons(port)
    if len(_NBO_PORTS) < 65536:
        _NBO_PORTS[port] = nbo
    return nbo


def svc4_key(fk: FKey, slot: int) -> bytes:
    return _PACK_SVC4_KEY(fk[0], fk[1], slot, fk[2], fk[3])


def plan_service(
    service: str,
    frontends: Iterable[Frontend],
    services: dict[str, Svc],
    owner: dict[FKey, str],
    svc_ids: ServiceIds,
    backends: BackendIds,
    fam: Family = FAMILY4,
    claims: dict[FKey, str] | None = None,
) -> Plan:
    """Plan `service` to have exactly `frontends` (all of family `fam`), given the programmed
    `services` and frontend `owner`s; allocates the ids it needs (recorded in the plan until it is
    committed). `claims`: frontends that plans of the same batch, not committed yet, take (new ones,
    adopted ones): a second Service wanting one of them conflicts, as it would once the first is
    committed (else both would write the same keys, and the loser's later removal delete them)."""
    old = services.get(service) or Svc()
    new_backends: set[int] = set()
    new_active: dict[int, set[int]] = {}
    new = Svc(backends=new_backends, active=new_active)
    plan = Plan(service, new, old)
    orphans = services.get(ORPHANS)
    memo: dict[int, tuple[int, ...]] = {}  # id(fe.backends) -> slots; fe alive meanwhile
    be_ids = backends.ids_of
    sids = svc_ids.ids
    sid_port = svc_ids.owner
    four = fam.version == 4
    for fe in frontends:
        proto = PROTO.get(fe.protocol)
        if proto is None:
            raise ValueError(f"frontend {fe.address}:{fe.port} has unsupported protocol {fe.protocol}")
        port = fe.port
        fk = (
            _UNPACK_U32(_inet_aton(fe.address))[0] if four else _inet_pton(_AF_INET6, fe.address),
            _NBO_PORTS.get(port) or _nbo_port(port),
            proto,
            int(fe.scope),
        )
        fk_owner = owner.get(fk)
        if fk_owner is not None and fk_owner != service and fk_owner != ORPHANS:
            plan.conflicts.append(fk)
            continue
        if fk_owner != service and claims is not None:
            claimant = claims.setdefault(fk, service)
            if claimant != service:
                plan.conflicts.append(fk)
                continue
        if fk in new.frontends:
            continue
        sp = (service, fe.port_name, proto)
        sid = sids.get(sp)
        if sid:
            held = sid_port.get(sid)
            if held == sp:
                sp = held  # the tuple the tables hold already: one per port, not one per plan
        else:
            sid = plan.svc_ids.get(sp) or svc_ids.alloc(sp, fk, plan, old, orphans)
        new.svc_ports.add(sp)  # type: ignore[union-attr]  # a set while planned
        fe_backends = fe.backends
        # translate hands the same backends tuple to several frontends (ClusterIP, NodePorts...)
        ids_t = memo.get(id(fe_backends))
        if ids_t is None:
            ids_t = memo[id(fe_backends)] = tuple(sorted(be_ids(fe_backends, plan)))
        if fe.retained:
            new_backends.update(be_ids(fe.retained, plan))
        new_backends.update(ids_t)
        act = new_active.get(sid)
        if act is None:
            new_active[sid] = set(ids_t)
        else:
            act.update(ids_t)
        new.frontends[fk] = Fe(sid, fe.flags, fe.affinity_timeout, ids_t)
        if fe.source_ranges:
            plan.src_ranges[sid] = fe.source_ranges
        if fk_owner == ORPHANS:
            plan.claimed.append(fk)
    # diff against what is programmed (own frontends + orphans being claimed)
    prev: dict[FKey, Fe] = old.frontends
    if orphans is not None and plan.claimed:
        prev = dict(prev)
        for fk in plan.claimed:
            prev[fk] = orphans.frontends[fk]
    key = svc4_key if four else fam.svc_key
    for fk, st in new.frontends.items():
        o = prev.get(fk)
        if o is None:
            _plan_new_frontend(plan, fk, st, fam)
        else:
            _plan_changed_frontend(plan, fk, st, o, key)
    for fk, o in old.frontends.items():
        if fk not in new.frontends:
            plan.fe_dels.append(key(fk, 0))  # slot 0 first: readers stop finding the frontend
            plan.fe_dels.extend(key(fk, i) for i in range(1, len(o.slots) + 1))
            plan.fe_dels.extend(key(fk, i) for i in o.stale_slots)
            plan.svc4_removed += 1 + len(o.slots) + len(o.stale_slots)
    return plan


def _plan_new_frontend(plan: Plan, fk: FKey, st: Fe, fam: Family) -> None:
    n_new = len(st.slots)
    plan.svc4_added += 1 + n_new
    a, p, pr, sc = fk
    sid = st.svc_id
    k0 = fam.pack_svc_key(a, p, 0, pr, sc)
    plan.new_svc4_keys.append(k0)
    if n_new:
        # all slots at once: keys differ only in the u16 slot (at offset 6 in IPv4 keys), values only
        # in the u32 backend id at offset 0, so each blob is one join of C-packed pieces
        at = fam.slot_offset
        head, tail = k0[:at], k0[at + 2 :]
        keys = head + (tail + head).join(map(_PACK_U16, range(1, n_new + 1))) + tail
        rest = _PACK_SVC4_VAL(0, sid, 0, 0, 0)[4:]
        values = rest.join(map(_PACK_U32, st.slots)) + rest
        plan.new_svc4_keys.append(keys)
        plan.slot_puts.append((keys, values))
    plan.slot0_puts.append((k0, _PACK_SVC4_VAL(0, sid, n_new, st.flags, st.affinity_timeout)))


def _plan_changed_frontend(
    plan: Plan, fk: FKey, st: Fe, o: Fe, key: Callable[[FKey, int], bytes] = svc4_key
) -> None:
    n_new = len(st.slots)
    n_old = len(o.slots)
    same_id = o.svc_id == st.svc_id
    for i, bid in enumerate(st.slots, 1):
        if i <= n_old and same_id and o.slots[i - 1] == bid:
            continue
        k = key(fk, i)
        plan.slot_puts.append((k, _PACK_SVC4_VAL(bid, st.svc_id, 0, 0, 0)))
        if i <= n_old:
            plan.undo_puts.append((k, _PACK_SVC4_VAL(o.slots[i - 1], o.svc_id, 0, 0, 0)))
        else:
            plan.new_svc4_keys.append(k)
            plan.svc4_added += 1
    old0 = (o.svc_id, o.flags, o.affinity_timeout, n_old)
    if old0 != (st.svc_id, st.flags, st.affinity_timeout, n_new):
        k0 = key(fk, 0)
        v0 = _PACK_SVC4_VAL(0, st.svc_id, n_new, st.flags, st.affinity_timeout)
        plan.slot0_puts.append((k0, v0))
        plan.undo_puts.append((k0, _PACK_SVC4_VAL(0, o.svc_id, n_old, o.flags, o.affinity_timeout)))
    for i in range(n_new + 1, n_old + 1):
        plan.slot_dels.append(key(fk, i))
    plan.slot_dels.extend(key(fk, i) for i in o.stale_slots)
    plan.svc4_removed += max(0, n_old - n_new) + len(o.stale_slots)
