"""Backend and service-port ids: allocation, the programmed kp_be4 table, and adoption from the maps.

Backend ids are stable per (address, port, protocol, nodeName) and monotonic: an id is never handed
out twice, and after a restart counting resumes above every id the backend, conntrack and affinity
maps still mention, so a conntrack entry can never point at a recycled id. The node is part of a
backend's identity because its kp_be4 value carries per-EndpointSlice facts (local, node address):
the same pod port listed by two Services whose slices disagree (one without nodeName, which
kube-proxy serves as a remote endpoint) gets one id per description, so each Service sees it as its
own slice says. Service ids are stable per (service, port name, protocol).

Each address family has its own tables (one BackendIds and ServiceIds per kproxy.sync.family.Family):
IPv6 ids count from abi.ID6_BASE, IPv4 ones stay below it.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from kproxy import abi
from kproxy.desired import BackendRef
from kproxy.sync.family import FAMILY4, Family
from kproxy.sync.state import (
    BE_LOCAL,
    BE_TERMINATING,
    NODE_MASK,
    PROTO,
    BKey,
    BVal,
    Fe,
    FKey,
    Plan,
    Svc,
    SvcPort,
)
from kproxy.sync.table import BackendIndex, BackendTable, DictBackendIndex, WideBackendTable

_UNPACK_U32 = abi.unpack_u32
_inet_aton = socket.inet_aton
_htons = abi.port_to_nbo
_inet_pton = socket.inet_pton
_AF_INET6 = socket.AF_INET6
_from_bytes = int.from_bytes


class BackendIds:
    """Backend ids by backend, the programmed kp_be4 (kp_be6) table with reference counts, and the node
    table that fills kp_be4_val.node_addr (kp_be6_val.node_addr)."""

    def __init__(self, fam: Family = FAMILY4) -> None:
        self.fam = fam
        # node name -> its index in BKeys (never reused: an index names one node for the agent's life)
        self.node_idx: dict[str, int] = {}
        # ids adopt() found, by (address, port, protocol) (the maps do not hold node names): the first
        # plan that wants such a backend takes the id over, so a restart keeps ids and flows
        self.adopted: dict[BKey, list[int]] = {}
        # backend id -> programmed kp_be4 value | services referencing it << REFS_SHIFT (packed: see
        # kproxy.sync.table)
        self.vals: BackendTable | WideBackendTable
        self.ids: BackendIndex | DictBackendIndex
        if fam.addr_bits == 32:
            self.vals = BackendTable()
            # BKey -> id of the programmed ids (their keys read from vals: see kproxy.sync.table)
            self.ids = BackendIndex(self.vals)
        else:
            self.vals = WideBackendTable(fam.refs_shift)
            self.ids = DictBackendIndex()
        # BKey -> id allocated by plans not committed yet (vals does not have them): indexed at commit
        self._pending: dict[BKey, int] = {}
        self.next = fam.id_base
        # node name -> NBO address, for kp_be4_val.node_addr; local_node_addr for local backends of a
        # node the table does not list (yet)
        self.node_addrs: dict[str, int] = {}
        self.local_node_addr = 0
        self._node_addrs_version = -1

    def set_nodes(self, addrs: Mapping[str, str], local_addr: str | None, version: int | None = None) -> bool:
        """Take the cluster's node table (name -> address; those of the other family are left out);
        return whether it changed since the last call with the same version (the store's
        node_addrs_version)."""
        fam = self.fam
        local = fam.addr_int(local_addr) if local_addr and fam.is_mine(local_addr) else 0
        if version is not None and version == self._node_addrs_version and self.local_node_addr == local:
            return False
        self._node_addrs_version = -1 if version is None else version
        self.node_addrs = {n: fam.addr_int(a) for n, a in addrs.items() if fam.is_mine(a)}
        self.local_node_addr = local
        return True

    def backend_id(self, address: str, port: int, protocol: str, node: str | None = None) -> int | None:
        fam = self.fam
        base = fam.bkey(fam.addr_int(address), _htons(port), PROTO[protocol])
        if node is not None:
            idx = self.node_idx.get(node)
            return None if idx is None else self.ids.get(base | idx << fam.node_key_shift)
        mask = fam.bk_mask
        found = [bid for bk, bid in self.ids.items() if bk & mask == base]
        return found[0] if len(found) == 1 else None

    def backend_ids(self, address: str, port: int, protocol: str) -> list[int]:
        fam = self.fam
        base = fam.bkey(fam.addr_int(address), _htons(port), PROTO[protocol])
        mask = fam.bk_mask
        return sorted(bid for bk, bid in self.ids.items() if bk & mask == base)

    # ---- adopt ----
    def adopt(self, be4: Iterable[tuple[Any, Any]]) -> int:
        """Rebuild the programmed table from kp_be4 (kp_be6) entries (no references yet); return the
        highest id."""
        self.ids.clear()
        self._pending.clear()
        self.adopted.clear()
        self.vals.clear()
        fam = self.fam
        addr_of = fam.addr_int_of_field
        fshift, nshift = fam.node_key_shift, fam.node_addr_shift
        max_be = 0
        for k, v in be4:
            bid = int(k.value) if isinstance(k, ctypes.c_uint32) else int(k)
            bk = fam.bkey(addr_of(v.addr), v.port, v.proto)
            self.vals[bid] = bk | v.flags << fshift | addr_of(v.node_addr) << nshift
            if 0 < bid < 0xFFFFFFFF:  # never ids of ours: freed with the orphans, never taken over
                self.adopted.setdefault(bk, []).append(bid)
            max_be = max(max_be, bid)
        return max_be

    def _node_index(self, node: str) -> int:
        idx = self.node_idx[node] = len(self.node_idx) + 1
        return idx

    def _claim_adopted(self, base: BKey, node: int, val: BVal) -> int | None:
        """Take over an id adopt() found for this address, port and protocol: the one whose entry says
        the same node address and locality as `val`, else any. Its programmed value gets `node`."""
        cands = [b for b in self.adopted.get(base, ()) if b in self.vals]
        if not cands:
            self.adopted.pop(base, None)
            return None
        fam = self.fam
        facts = (BE_LOCAL << fam.node_key_shift) | (fam.addr_mask << fam.node_addr_shift)
        bid = next((b for b in cands if self.vals[b] & facts == val & facts), cands[0])
        cands.remove(bid)
        if cands:
            self.adopted[base] = cands
        else:
            del self.adopted[base]
        cur = self.vals[bid]
        vshift = fam.node_val_shift
        self.vals[bid] = cur & ~(NODE_MASK << vshift) | node << vshift
        self.ids.add([(bid, base | node << fam.node_key_shift)])
        return bid

    # ---- planning ----
    def ids_of(self, backends: Iterable[BackendRef], plan: Plan) -> set[int]:
        """The backend ids of `backends`, allocating new ones; records their kp_be4 values in the plan."""
        fam = self.fam
        four = fam.version == 4
        pshift, prshift, fshift = fam.port_shift, fam.proto_shift, fam.node_key_shift
        nshift, vshift = fam.node_addr_shift, fam.node_val_shift
        programmed_value = self.vals.value
        be_vals = plan.be_vals
        be_puts = plan.be_puts
        node_addrs = self.node_addrs
        node_idx = self.node_idx
        local_addr = self.local_node_addr
        keys: list[BKey] = []
        vals: list[BVal] = []
        for address, port, protocol, node, local, terminating, _zone in backends:
            base = (
                (
                    _UNPACK_U32(_inet_aton(address))[0]
                    if four
                    else _from_bytes(_inet_pton(_AF_INET6, address), "big")
                )
                | _htons(port) << pshift
                | PROTO[protocol] << prshift
            )
            if node is None:
                nidx = naddr = 0
            else:
                nidx = node_idx.get(node) or self._node_index(node)
                naddr = node_addrs.get(node, 0)
            if local and not naddr:
                naddr = local_addr
            vals.append(
                base
                | ((BE_LOCAL if local else 0) | (BE_TERMINATING if terminating else 0)) << fshift
                | naddr << nshift
                | nidx << vshift
            )
            keys.append(base | nidx << fshift)
        out = set()
        pending = self._pending  # ids allocated by this plan or another of its batch
        adopted = self.adopted
        bk_mask = fam.bk_mask
        for bk, val, bid in zip(keys, vals, self.ids.get_many(keys), strict=True):
            if bid is None:
                bid = pending.get(bk)
                if bid is None and adopted:
                    bid = self._claim_adopted(bk & bk_mask, bk >> fshift, val)
                    if bid is not None:  # indexed already, but get_many ran before: the same
                        pending[bk] = bid  # backend listed again in this call must find it
            if bid is None:  # a new id was never programmed: no need to compare
                bid = pending[bk] = self.next
                if bid >= fam.id_limit:
                    raise OverflowError(f"{fam.name} backend ids are exhausted (next id {bid:#x})")
                self.next += 1
                be_vals[bid] = be_puts[bid] = val
            elif bid not in be_vals:
                be_vals[bid] = val
                prev = programmed_value(bid)  # without the count
                if prev is None or prev != val:
                    be_puts[bid] = val
            out.add(bid)
        return out

    # ---- commit ----
    def commit(self, p: Plan) -> set[int]:
        """Record a written plan's kp_be4 values and references; return ids that lost their last one."""
        maybe_free: set[int] = set()
        vals = self.vals
        puts = p.be_puts
        new = vals.update_keeping_counts(puts)
        if new:  # ids this plan programs first: indexed now, no longer pending
            key_of_val = self.fam.key_of_val
            keyed = [(bid, key_of_val(puts[bid])) for bid in new]
            self.ids.add(keyed)
            pending = self._pending
            for _, key in keyed:
                pending.pop(key, None)
        old_be = p.old.backends
        if old_be and not isinstance(old_be, set):
            old_be = set(old_be)  # committed: an array, whose `in` is a scan
        new_be = p.new.backends
        # every id a plan references is programmed or in its be_puts, so in vals by now
        vals.add_refs(new_be if not old_be else [b for b in new_be if b not in old_be])
        # those that lost their last reference
        maybe_free.update(vals.drop_refs([b for b in old_be if b not in new_be]))
        return maybe_free

    def unreferenced(self, ids: Iterable[int]) -> set[int]:
        return self.vals.unreferenced(ids)

    def forget_unprogrammed(self) -> None:
        """Ids allocated by plans that were not admitted, and never programmed, are forgotten."""
        self._pending.clear()

    def release(self, bids: Iterable[int]) -> dict[int, BVal]:
        """Forget freed ids; return the values they had programmed (those that were)."""
        vals = self.vals.pop_many(bids)
        key_of_val = self.fam.key_of_val
        self.ids.remove([(bid, key_of_val(val)) for bid, val in vals.items()])
        return vals


class ServiceIds:
    """Service-port ids, and the log of their changes the agent's services.json follows."""

    def __init__(self, fam: Family = FAMILY4) -> None:
        self.fam = fam
        self.ids: dict[SvcPort, int] = {}
        self.owner: dict[int, SvcPort] = {}
        self.version = 0  # bumped whenever a service port gets or loses its id (ports())
        # what changed in ports() since the agent last took it (take_changes):
        # (svc_id, its port, or None when the id was freed), in order
        self._log: list[tuple[int, SvcPort | None]] = []
        self._log_lost = True  # the log does not cover everything: take the whole table
        self.next = fam.id_base
        # ids of adopted frontends re-used by plans of the batch being planned (until it is committed):
        # another port of the batch must not take the same one (two Services on one id would share
        # source ranges and a Maglev table)
        self.reserved: set[int] = set()

    def reset(self) -> None:
        """Forget every id (adopt rebuilds what the maps say); the change log starts over."""
        self.ids.clear()
        self.owner.clear()
        self.version += 1
        self._log.clear()
        self._log_lost = True

    def _changed(self, sid: int, sp: SvcPort | None) -> None:
        self.version += 1
        if self._log_lost:
            return
        self._log.append((sid, sp))
        if len(self._log) > 2 * len(self.ids) + 4096:  # nobody takes it: stop keeping it
            self._log.clear()
            self._log_lost = True

    def take_changes(self) -> list[tuple[int, SvcPort | None]] | None:
        if self._log_lost:
            self._log_lost = False
            return None
        log, self._log = self._log, []
        return log

    def ports(self) -> dict[int, SvcPort]:
        return {sid: sp for sp, sid in self.ids.items()}

    def alloc(self, sp: SvcPort, fk: FKey, plan: Plan, old: Svc, orphans: Svc | None) -> int:
        sid = self.ids.get(sp) or plan.svc_ids.get(sp)
        if sid:
            return sid
        # Re-use the id the maps already carry for this frontend (restart), unless another port has it.
        prev = old.frontends.get(fk)
        if prev is None:
            prev = orphans.frontends.get(fk) if orphans else None
        if (
            prev is not None
            and prev.svc_id
            and prev.svc_id not in self.owner
            and prev.svc_id not in plan.svc_ids.values()
            and prev.svc_id not in self.reserved
        ):
            sid = prev.svc_id
            self.reserved.add(sid)
        if not sid:
            sid = self.next
            if sid >= self.fam.id_limit:
                raise OverflowError(f"{self.fam.name} service ids are exhausted (next id {sid:#x})")
            self.next += 1
        plan.svc_ids[sp] = sid
        return sid

    def commit(self, p: Plan) -> None:
        """Record a written plan's service-port ids; those of ports it dropped are freed."""
        for sp in [sp for sp in p.old.svc_ports if sp not in p.new.svc_ports]:
            sid = self.ids.pop(sp, None)
            if sid is not None:
                self.owner.pop(sid, None)
                self._changed(sid, None)
        for sp, sid in p.svc_ids.items():
            if sp in p.new.svc_ports:
                was = self.ids.get(sp)
                if was != sid:
                    if was is not None:
                        self._changed(was, None)
                    self._changed(sid, sp)
                self.ids[sp] = sid
                self.owner[sid] = sp


def adopt_frontends(svc4: Iterable[tuple[Any, Any]], fam: Family = FAMILY4) -> tuple[Svc, int, int]:
    """The frontends kp_svc4 (kp_svc6) holds, as the pseudo-service ORPHANS (no Service has claimed
    them yet); with the highest service id they carry and the number of entries."""
    addr_of = fam.fe_addr_of_key
    max_svc = 0
    slot0: dict[FKey, abi.Svc4Val] = {}
    slots: dict[FKey, dict[int, int]] = {}
    n = 0
    for k, v in svc4:
        n += 1
        fk = (addr_of(k.addr), k.port, k.proto, k.scope)
        max_svc = max(max_svc, v.svc_id)
        if k.slot == 0:
            slot0[fk] = v
        else:
            slots.setdefault(fk, {})[k.slot] = v.backend_id
    orphans = Svc()
    for fk in set(slot0) | set(slots):
        s0 = slot0.get(fk)
        present = slots.get(fk, {})
        if s0 is None:
            fe = Fe(0, 0, 0, (), tuple(sorted(present)))
        else:
            count = s0.count
            fe = Fe(
                s0.svc_id,
                s0.flags,
                s0.affinity_timeout,
                tuple(present.get(i, 0) for i in range(1, count + 1)),
                tuple(sorted(i for i in present if i > count)),
            )
        orphans.frontends[fk] = fe
    return orphans, max_svc, n
