"""The Syncer: keeps kp_svc4/kp_be4 and kp_svc6/kp_be6 (and kp_lbsrc4/6, kp_svcnet4/6) equal to the desired
frontends, one incremental apply at a time.

One engine per address family (FamilySyncer, over kproxy.sync.family's Family) owns that family's
programmed view and drives its ids (kproxy.sync.ids), planning (kproxy.sync.plan) and writing
(kproxy.sync.writer): every guarantee (write order, stable ids, adoption, undo, flushes, conflicts,
full maps) holds per family, and the IPv4 path runs the code it always ran. The Syncer splits each
Service's frontends by family as it reads them (a Service's IPv4 and IPv6 frontends go to the two
engines, each planning and writing in chunks as before), and answers for both (service ids, errors,
reports). A service port's IPv4 and IPv6 frontends get one svc_id per family (IPv6 ones from
abi.ID6_BASE): service_ports() lists both."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from kproxy import abi
from kproxy.bpf.mapapi import MapFullError
from kproxy.desired import Frontend
from kproxy.heap import compact_dicts, gc_paused
from kproxy.sync import maglev, writer
from kproxy.sync.family import FAMILY4, FAMILY6, Family
from kproxy.sync.ids import BackendIds, ServiceIds, adopt_frontends
from kproxy.sync.lbsrc import SourceRangeSync, Staged
from kproxy.sync.mgsync import MaglevSync
from kproxy.sync.plan import plan_service
from kproxy.sync.state import ORPHANS, PROTO, ApplyReport, FKey, Plan, Svc, SvcPort
from kproxy.sync.svcnet import ServiceSpaceSync
from kproxy.sync.writer import FamilyMaps, Flush, MapSet

log = logging.getLogger(__name__)

_MAGLEV = int(abi.SvcFlag.MAGLEV)

# Services planned, written and committed per batch when an apply has more (see Syncer._apply). 250
# rather than 1,000: a burst of 5,000 changed Services peaked 6 MB lower (that peak stays as RSS), the
# same CPU per change.
APPLY_CHUNK = 250


@dataclass(slots=True)
class ApplyRun:
    """One apply of one family in progress (FamilySyncer.start / feed / finish)."""

    report: ApplyReport = field(default_factory=ApplyReport)
    flush: Flush = field(default_factory=Flush)
    chunk: list[Plan] = field(default_factory=list)


class FamilySyncer:
    """Keeps one family's service and backend maps (kp_svc4/kp_be4, or kp_svc6/kp_be6) equal to the
    desired frontends of that family, one incremental apply at a time."""

    def __init__(
        self,
        maps: MapSet,
        fam: Family = FAMILY4,
        errors: Counter[str] | None = None,
        maglev_size: int = maglev.DEFAULT_SIZE,
    ) -> None:
        self.maps = maps
        self.fam = fam
        self.fm = FamilyMaps(maps, fam)
        self.errors: Counter[str] = Counter() if errors is None else errors  # by reason, for metrics
        self._services: dict[str, Svc] = {}
        self.applied = 0  # Services applied since it was made (planned, changed or not)
        self._owner: dict[FKey, str] = {}
        self._waiting: dict[FKey, set[str]] = {}
        # frontends taken by plans of the batch being planned, until it is committed (plan_service)
        self._claims: dict[FKey, str] = {}
        self._backends = BackendIds(fam)
        self._svc_ids = ServiceIds(fam)
        self._svc4_entries = 0  # entries of the family's service map
        self._lbsrc = SourceRangeSync(self.fm.lbsrc, fam.version)
        self._maglev = MaglevSync(getattr(maps, "maglev", None), fam, self.errors, maglev_size)
        # svc_id -> committed frontends with SvcFlag.MAGLEV and backends (of real Services, not orphans)
        self._maglev_live: Counter[int] = Counter()

    def set_nodes(self, addrs: Mapping[str, str], local_addr: str | None, version: int | None = None) -> bool:
        """Take the cluster's node table (name -> address, the other family's left out); return whether
        it changed since the last call with the same version (the store's node_addrs_version)."""
        return self._backends.set_nodes(addrs, local_addr, version)

    def has(self, service: str) -> bool:
        """Whether SERVICE has entries of this family programmed."""
        return service in self._services

    # ---- introspection (CLI, metrics, tests) ----
    @property
    def services(self) -> list[str]:
        return [s for s in self._services if s != ORPHANS]

    def backend_id(self, address: str, port: int, protocol: str, node: str | None = None) -> int | None:
        """The id of this backend as an EndpointSlice on `node` lists it; with node=None, the backend's
        only id whatever its node (None if none or several)."""
        return self._backends.backend_id(address, port, protocol, node)

    def backend_ids(self, address: str, port: int, protocol: str) -> list[int]:
        """Every id of this backend (one per node its EndpointSlices name for it)."""
        return self._backends.backend_ids(address, port, protocol)

    def svc_id(self, service: str, port_name: str, protocol: str) -> int | None:
        return self._svc_ids.ids.get((service, port_name, PROTO[protocol]))

    def slot_backends(self, svc_id: int) -> set[tuple[bytes, int]]:
        """The backends in SVC_ID's slots now, as ApplyReport.udp_left names them: (address bytes in
        network order, port a network-order int). Empty when no Service port has that id."""
        sp = self._svc_ids.owner.get(svc_id)
        svc = self._services.get(sp[0]) if sp is not None else None
        if svc is None:
            return set()
        where = (1 << self.fam.proto_shift) - 1
        vals = self._backends.vals
        out: set[tuple[bytes, int]] = set()
        for b in svc.active_ids().get(svc_id, ()):
            val = vals.get(b)
            if val is not None:
                out.add(writer.address_and_port(self.fam, val & where))
        return out

    @property
    def svc_ids_version(self) -> int:
        """Bumped whenever a service port gets or loses its id (service_ports())."""
        return self._svc_ids.version

    def take_svc_id_changes(self) -> list[tuple[int, SvcPort | None]] | None:
        """The changes of service_ports() since the last call, in order ((id, port) or (id, None) for a
        freed id); None when they are not known (the first call, after adopt()): take service_ports()."""
        return self._svc_ids.take_changes()

    def service_ports(self) -> dict[int, SvcPort]:
        """svc_id -> (service "ns/name", port name, IP protocol number) of every programmed port
        (what the CLI metadata file and metrics label service ids with)."""
        return self._svc_ids.ports()

    @property
    def orphan_frontends(self) -> int:
        o = self._services.get(ORPHANS)
        return 0 if o is None else len(o.frontends)

    # ---- adopt ----
    def adopt(self) -> None:
        """Rebuild ids and the programmed view from the maps (after an agent restart), so re-applying
        an unchanged Service writes nothing."""
        self._services.clear()
        self._owner.clear()
        self._svc_ids.reset()
        fm = self.fm
        max_be = self._backends.adopt(fm.be.items())
        orphans, max_svc, self._svc4_entries = adopt_frontends(fm.svc.items(), self.fam)
        for fk in orphans.frontends:
            self._owner[fk] = ORPHANS
        # Until the first full apply nothing adopted is proven stale: the orphans hold every backend.
        vals = self._backends.vals
        orphans.backends = set(vals)
        for bid in orphans.backends:
            vals.add_ref(bid)
        self._services[ORPHANS] = orphans
        self._lbsrc.adopt(fe.svc_id for fe in orphans.frontends.values())
        self._maglev.adopt()
        self._maglev_live.clear()
        for _k, v in fm.ct.items():
            max_be = max(max_be, v.backend_id)
            max_svc = max(max_svc, v.svc_id)
        for k, v in fm.aff.items():
            max_be = max(max_be, v.backend_id)
            max_svc = max(max_svc, k.svc_id)
        base = self.fam.id_base
        self._backends.next = max(base, max_be + 1)
        self._svc_ids.next = max(base, max_svc + 1)
        if orphans.frontends or vals or self.fam.version == 4:
            log.info(
                "adopted %d %s frontends, %d backends from the maps; next backend id %d, next service id %d",
                len(orphans.frontends), self.fam.name, len(vals), self._backends.next, self._svc_ids.next,
            )  # fmt: skip

    # ---- apply ----
    def compact(self) -> int:
        """Shrink the tables that deletions left oversized (heap.compact_dicts); the bytes saved."""
        return compact_dicts(self._services, self._owner, self._svc_ids.ids, self._svc_ids.owner)

    def apply(self, desired: Mapping[str, Iterable[Frontend]], *, full: bool = False) -> ApplyReport:
        """Program `desired` (service key -> all its frontends; an empty list removes the service).

        full=True means `desired` names every Service there is: programmed services missing from it
        and entries adopted from the maps that no Service claimed are removed. Use it once the source
        has completed its initial listing, and after every complete re-list.
        """
        with gc_paused():
            report = self._apply(desired, full)
        self.applied += report.services
        return report

    def _plan(self, service: str, frontends: Iterable[Frontend]) -> Plan:
        return plan_service(
            service, frontends, self._services, self._owner, self._svc_ids, self._backends, self.fam,
            self._claims,
        )  # fmt: skip

    def _apply(self, desired: Mapping[str, Iterable[Frontend]], full: bool) -> ApplyReport:
        run = ApplyRun()
        for service, frontends in desired.items():
            if service == ORPHANS:
                continue
            run.report.services += 1
            self.feed(run, service, frontends)
        return self.finish(run, desired, full)

    # Big applies (the cold start: 10,000s of Services) go in chunks of APPLY_CHUNK Services, each
    # planned, written in DESIGN.md's order and committed before the next is planned: every Service's
    # own writes stay ordered, and the plans' packed entries of one chunk are garbage before the next is
    # built. One batch for all of them peaked ~50 MB higher, and the allocator keeps such a peak as RSS
    # for good. The Syncer feeds both families' engines Service by Service (start, feed, finish).
    def start(self) -> ApplyRun:
        return ApplyRun()

    def feed(self, run: ApplyRun, service: str, frontends: Iterable[Frontend]) -> None:
        """Plan SERVICE to have exactly FRONTENDS (of this family); a full chunk is written."""
        try:
            run.chunk.append(self._plan(service, frontends))
        except (ValueError, OverflowError, OSError) as err:  # OSError: inet_aton/inet_pton's
            self.errors["invalid_frontend"] += 1
            run.report.failed[service] = str(err)
            log.error("service %s not programmed: %s", service, err)
        if len(run.chunk) >= APPLY_CHUNK:
            self._apply_plans(run.chunk, run.report, run.flush)
            run.chunk = []

    def finish(self, run: ApplyRun, desired: Container[str], full: bool) -> ApplyReport:
        """Write what is left of the apply (see apply(): with FULL, DESIRED names every Service)."""
        report, flush, chunk = run.report, run.flush, run.chunk
        run.chunk = []
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
        if full:
            self._maglev.prune(self._maglev_live.__contains__)
        writer.run_flush(self.fm, flush, report)
        if full:
            self._backends.adopted.clear()  # every adopted id was claimed or freed with the orphans
        return report

    def _apply_plans(
        self, plans: list[Plan], report: ApplyReport, flush: Flush, admitted: bool = False
    ) -> None:
        """Admit (unless done), write, commit, then free and flush one batch of plans."""
        if not admitted:
            plans = self._admit(plans, report)
        if not plans:
            self._release_claims(report)
            return
        plans, ranges = self._stage_source_ranges(plans, report)
        fm = self.fm
        mg = self._maglev
        mg_staged = mg.stage(plans, self._backend_value)
        try:
            writer.write_batched(fm, plans, report, lambda: mg.write(mg_staged))
        except MapFullError as err:
            log.error("batched map update failed (%s); applying service by service", err)
            self.errors["map_full"] += 1
            # the batch's tables may be written already (the failure came later): taken back, and each
            # plan's written before its own slots below, or not at all if it fails
            mg.discard(mg_staged)
            ok = []
            for p in plans:
                staged = mg.stage([p], self._backend_value)
                try:
                    writer.write_batched(fm, [p], ApplyReport(), lambda st=staged: mg.write(st))  # type: ignore[misc]
                    ok.append(p)
                except MapFullError as err2:
                    keep = {b for q in ok for b in q.be_puts}
                    writer.undo(fm, p, self._backends.vals, keep)
                    mg.discard(staged)
                    self._fail(p, report, f"map {err2.map_name} is full", "map_full")
            plans = ok
            mg_staged = mg.stage(plans, self._backend_value)  # the drops of the plans written
            writer.count_writes(plans, report, self.fam.svc_key_size)
        self._lbsrc.finish(ranges, plans)
        freed = self._commit(plans, report)
        mg.drop(mg_staged, self._maglev_live.__contains__)
        self._release_claims(report)
        writer.free_and_flush(fm, self._backends, plans, freed, report, flush)

    def _backend_value(self, p: Plan, bid: int) -> int | None:
        """Backend BID's value (BVal) as plan P programs it."""
        val = p.be_puts.get(bid)
        return val if val is not None else self._backends.vals.value(bid)

    def _count_maglev(self, p: Plan) -> None:
        """Keep _maglev_live (svc_id -> its committed Maglev frontends with backends) after plan P."""
        if p.service == ORPHANS:
            return
        live = self._maglev_live
        for fe in p.old.frontends.values():
            if fe.flags & _MAGLEV and len(fe.slots):
                live[fe.svc_id] -= 1
                if live[fe.svc_id] <= 0:
                    del live[fe.svc_id]
        for fe in p.new.frontends.values():
            if fe.flags & _MAGLEV and len(fe.slots):
                live[fe.svc_id] += 1

    def _release_claims(self, report: ApplyReport) -> None:
        """After a batch: its committed plans own what they claimed; a frontend claimed by a plan that
        failed is free again, and the Services that conflicted on it are retried."""
        self._svc_ids.reserved.clear()  # committed ids are in its owner table now
        if not self._claims:
            return
        owner = self._owner
        for fk, service in self._claims.items():
            if owner.get(fk) != service:
                waiting = self._waiting.pop(fk, None)
                if waiting:
                    report.retry |= waiting
        self._claims.clear()

    def _stage_source_ranges(self, plans: list[Plan], report: ApplyReport) -> tuple[list[Plan], Staged]:
        """kp_lbsrc4 entries the plans add, written before their slot-0 entries (see kproxy.sync.lbsrc);
        plans whose ranges cannot be written fail here, before anything of theirs is."""
        track_old = bool(self._lbsrc.programmed)  # else no old range can go: skip listing svc ids
        owner = self._svc_ids.owner

        def sids(p: Plan) -> list[int]:
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

    def _admit(self, plans: list[Plan], report: ApplyReport) -> list[Plan]:
        svc_map, be_map = self.fm.svc, self.fm.be
        svc4_max = svc_map.max_entries
        be4_max = be_map.max_entries
        svc4 = self._svc4_entries
        programmed = self._backends.vals
        be4 = len(programmed)
        new_be: set[int] = set()
        admitted = []
        for p in plans:
            add_be = {b for b in p.be_puts if b not in programmed and b not in new_be}
            if svc4 + p.svc4_added > svc4_max:
                self._fail(p, report, f"map {svc_map.name} is full ({svc4_max} entries)", "map_full")
                continue
            if be4 + len(add_be) > be4_max:
                self._fail(p, report, f"map {be_map.name} is full ({be4_max} entries)", "map_full")
                continue
            svc4 += p.svc4_added
            be4 += len(add_be)
            new_be |= add_be
            admitted.append(p)
            for fk in p.conflicts:
                self._waiting.setdefault(fk, set()).add(p.service)
                self.errors["frontend_conflict"] += 1
                log.error(
                    "service %s: frontend %s/%d is already programmed for service %s; "
                    "skipped until that one lets it go", p.service,
                    abi.addr_port(self.fam.fe_addr_text(fk[0]), abi.nbo_to_port(fk[1])), fk[2],
                    self._claims.get(fk) or self._owner.get(fk) or "(adopted from the maps)",
                )  # fmt: skip
        return admitted

    def _fail(self, p: Plan, report: ApplyReport, why: str, reason: str) -> None:
        self.errors[reason] += 1
        report.failed[p.service] = why
        log.error("service %s not programmed, its previous state stays: %s", p.service, why)

    def _commit(self, plans: list[Plan], report: ApplyReport) -> set[int]:
        """Record admitted plans as programmed; return backend ids no longer referenced."""
        maybe_free: set[int] = set()
        orphans = self._services.get(ORPHANS)
        ks = self.fam.svc_key_size
        for p in plans:
            maybe_free |= self._backends.commit(p)
            self._commit_frontends(p, report)
            if orphans is not None and p.service != ORPHANS:
                for fk in p.claimed:
                    orphans.frontends.pop(fk, None)
            self._svc_ids.commit(p)
            self._count_maglev(p)
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
                        writer.n_entries(p.slot_puts, ks) + writer.n_entries(p.slot0_puts, ks),
                        writer.n_keys(p.slot_dels, ks) + writer.n_keys(p.fe_dels, ks),
                    )  # fmt: skip
        freed = self._backends.unreferenced(maybe_free)
        self._backends.forget_unprogrammed()
        return freed

    def _commit_frontends(self, p: Plan, report: ApplyReport) -> None:
        """Frontend ownership after a plan: Services waiting for a frontend it let go are retried."""
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


def _is6(fe: Frontend) -> bool:
    return ":" in fe.address


class Syncer:
    """Keeps kp_svc4/kp_be4 and kp_svc6/kp_be6 (with kp_lbsrc4/6) equal to the desired frontends, and
    kp_svcnet4/6 to the service address space: one FamilySyncer per family (v4, v6) and the svcnet sync."""

    def __init__(self, maps: MapSet, maglev_size: int = maglev.DEFAULT_SIZE) -> None:
        self.maps = maps
        self.errors: Counter[str] = Counter()  # by reason, for metrics (both families')
        self.v4 = FamilySyncer(maps, FAMILY4, self.errors, maglev_size)
        self.v6 = FamilySyncer(maps, FAMILY6, self.errors, maglev_size)
        self.applied = 0  # Services applied since it was made (planned, changed or not)
        self.svcnet = ServiceSpaceSync(maps.svcnet4, maps.svcnet_span, maps.svcnet6, maps.svcnet6_span)

    @property
    def families(self) -> tuple[FamilySyncer, FamilySyncer]:
        return self.v4, self.v6

    def family(self, address: str) -> FamilySyncer:
        """The engine of ADDRESS's family."""
        return self.v6 if ":" in address else self.v4

    def set_nodes(
        self,
        addrs: Mapping[str, str],
        local_addr: str | None,
        version: int | None = None,
        *,
        addrs6: Mapping[str, str] | None = None,
        local_addr6: str | None = None,
        version6: int | None = None,
    ) -> bool:
        """Take the cluster's node table (name -> address) for kp_be4_val.node_addr, and for
        kp_be6_val.node_addr ADDRS6 (name -> IPv6 address; None: the IPv6 addresses in ADDRS) with
        this node's LOCAL_ADDR6; return whether either changed since the last call with the same
        versions (the store's node_addrs_version)."""
        changed = self.v4.set_nodes(addrs, local_addr, version)
        if addrs6 is None:
            addrs6, version6 = addrs, version
        return self.v6.set_nodes(addrs6, local_addr6, version6) or changed

    # ---- introspection (CLI, metrics, tests) ----
    @property
    def services(self) -> list[str]:
        """Services with entries programmed, of either family."""
        six = self.v6.services
        if not six:
            return self.v4.services
        return list(dict.fromkeys([*self.v4.services, *six]))

    def backend_id(self, address: str, port: int, protocol: str, node: str | None = None) -> int | None:
        """The id of this backend as an EndpointSlice on `node` lists it; with node=None, the backend's
        only id whatever its node (None if none or several)."""
        return self.family(address).backend_id(address, port, protocol, node)

    def backend_ids(self, address: str, port: int, protocol: str) -> list[int]:
        """Every id of this backend (one per node its EndpointSlices name for it)."""
        return self.family(address).backend_ids(address, port, protocol)

    def svc_id(self, service: str, port_name: str, protocol: str, family: int = 4) -> int | None:
        """The service-port id of the port's frontends of FAMILY (4 or 6)."""
        return (self.v6 if family == 6 else self.v4).svc_id(service, port_name, protocol)

    def slot_backends(self, family: int, svc_id: int) -> set[tuple[bytes, int]]:
        """The backends in the slots of FAMILY's service port SVC_ID now, as ApplyReport.udp_left names
        them (address bytes, network-order port): a backend reported as left may be back since."""
        return (self.v6 if family == 6 else self.v4).slot_backends(svc_id)

    @property
    def svc_ids_version(self) -> int:
        """Bumped whenever a service port gets or loses an id (service_ports())."""
        return self.v4.svc_ids_version + self.v6.svc_ids_version

    def take_svc_id_changes(self) -> list[tuple[int, SvcPort | None]] | None:
        """The changes of service_ports() since the last call, in order ((id, port) or (id, None) for a
        freed id); None when they are not known (the first call, after adopt()): take service_ports().
        The families' ids never collide (IPv6 ones from abi.ID6_BASE), so their changes interleave."""
        c4 = self.v4.take_svc_id_changes()
        c6 = self.v6.take_svc_id_changes()
        if c4 is None or c6 is None:
            return None
        return c4 + c6 if c6 else c4

    def service_ports(self) -> dict[int, SvcPort]:
        """svc_id -> (service "ns/name", port name, IP protocol number) of every programmed port, both
        families' ids (what the CLI metadata file and metrics label service ids with)."""
        ports = self.v4.service_ports()
        ports.update(self.v6.service_ports())
        return ports

    @property
    def orphan_frontends(self) -> int:
        return self.v4.orphan_frontends + self.v6.orphan_frontends

    # ---- adopt ----
    def adopt(self) -> None:
        """Rebuild ids and the programmed view of both families from the maps (after an agent
        restart), so re-applying an unchanged Service writes nothing."""
        self.v4.adopt()
        self.v6.adopt()
        self.svcnet.adopt()

    # ---- apply ----
    def compact(self) -> int:
        """Shrink the tables that deletions left oversized (heap.compact_dicts); the bytes saved."""
        return self.v4.compact() + self.v6.compact() + self.svcnet.compact()

    def apply(self, desired: Mapping[str, Iterable[Frontend]], *, full: bool = False) -> ApplyReport:
        """Program `desired` (service key -> all its frontends, of both families; an empty list removes
        the service).

        full=True means `desired` names every Service there is: programmed services missing from it
        and entries adopted from the maps that no Service claimed are removed. Use it once the source
        has completed its initial listing, and after every complete re-list.
        """
        with gc_paused():
            report = self._apply(desired, full)
        self.applied += report.services
        return report

    def _apply(self, desired: Mapping[str, Iterable[Frontend]], full: bool) -> ApplyReport:
        v4, v6 = self.v4, self.v6
        run4 = v4.start()
        run6: ApplyRun | None = None  # the IPv6 engine runs when it has something to do (or full)
        has6 = v6.has
        n = 0
        for service, frontends in desired.items():
            if service == ORPHANS:
                continue
            n += 1
            fes = frontends if type(frontends) is list else list(frontends)
            for fe in fes:
                if ":" in fe.address:
                    if run6 is None:
                        run6 = v6.start()
                    v4.feed(run4, service, [fe for fe in fes if not _is6(fe)])
                    v6.feed(run6, service, [fe for fe in fes if _is6(fe)])
                    break
            else:
                v4.feed(run4, service, fes)
                if has6(service):  # its IPv6 frontends went
                    if run6 is None:
                        run6 = v6.start()
                    v6.feed(run6, service, ())
        report = v4.finish(run4, desired, full)
        if run6 is not None or full:
            report.merge_family(v6.finish(run6 or v6.start(), desired, full), v6=True)
        report.services = n
        return report
