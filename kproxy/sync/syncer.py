"""The Syncer: keeps kp_svc4/kp_be4 (and kp_lbsrc4, kp_svcnet4) equal to the desired frontends, one
incremental apply at a time. It owns the programmed view and drives ids (kproxy.sync.ids), planning
(kproxy.sync.plan) and writing (kproxy.sync.writer)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping

from kproxy import abi
from kproxy.bpf.mapapi import MapFullError
from kproxy.desired import Frontend
from kproxy.heap import compact_dicts, gc_paused
from kproxy.sync import writer
from kproxy.sync.ids import BackendIds, ServiceIds, adopt_frontends
from kproxy.sync.lbsrc import SourceRangeSync, Staged
from kproxy.sync.plan import plan_service
from kproxy.sync.state import ORPHANS, PROTO, ApplyReport, FKey, Plan, Svc, SvcPort
from kproxy.sync.svcnet import ServiceSpaceSync
from kproxy.sync.writer import Flush, MapSet

log = logging.getLogger(__name__)

# Services planned, written and committed per batch when an apply has more (see Syncer._apply). 250
# rather than 1,000: a burst of 5,000 changed Services peaked 6 MB lower (that peak stays as RSS), the
# same CPU per change.
APPLY_CHUNK = 250


class Syncer:
    """Keeps kp_svc4/kp_be4 equal to the desired frontends, one incremental apply at a time."""

    def __init__(self, maps: MapSet) -> None:
        self.maps = maps
        self.errors: Counter[str] = Counter()  # by reason, for metrics
        self._services: dict[str, Svc] = {}
        self.applied = 0  # Services applied since it was made (planned, changed or not)
        self._owner: dict[FKey, str] = {}
        self._waiting: dict[FKey, set[str]] = {}
        self._backends = BackendIds()
        self._svc_ids = ServiceIds()
        self._svc4_entries = 0
        self._lbsrc = SourceRangeSync(maps.lbsrc4)
        self.svcnet = ServiceSpaceSync(maps.svcnet4, maps.svcnet_span)

    def set_nodes(self, addrs: Mapping[str, str], local_addr: str | None, version: int | None = None) -> bool:
        """Take the cluster's node table (name -> IPv4); return whether it changed since the last call
        with the same version (the store's node_addrs_version)."""
        return self._backends.set_nodes(addrs, local_addr, version)

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
        max_be = self._backends.adopt(self.maps.be4.items())
        orphans, max_svc, self._svc4_entries = adopt_frontends(self.maps.svc4.items())
        for fk in orphans.frontends:
            self._owner[fk] = ORPHANS
        # Until the first full apply nothing adopted is proven stale: the orphans hold every backend.
        vals = self._backends.vals
        orphans.backends = set(vals)
        for bid in orphans.backends:
            vals.add_ref(bid)
        self._services[ORPHANS] = orphans
        self._lbsrc.adopt(fe.svc_id for fe in orphans.frontends.values())
        self.svcnet.adopt()
        for _k, v in self.maps.ct4.items():
            max_be = max(max_be, v.backend_id)
            max_svc = max(max_svc, v.svc_id)
        for k, v in self.maps.aff4.items():
            max_be = max(max_be, v.backend_id)
            max_svc = max(max_svc, k.svc_id)
        self._backends.next = max_be + 1
        self._svc_ids.next = max_svc + 1
        log.info(
            "adopted %d frontends, %d backends from the maps; next backend id %d, next service id %d",
            len(orphans.frontends), len(vals), self._backends.next, self._svc_ids.next,
        )  # fmt: skip

    # ---- apply ----
    def compact(self) -> int:
        """Shrink the tables that deletions left oversized (heap.compact_dicts); the bytes saved."""
        return compact_dicts(
            self._services, self._owner, self._svc_ids.ids, self._svc_ids.owner, self.svcnet.programmed
        )

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
        return plan_service(service, frontends, self._services, self._owner, self._svc_ids, self._backends)

    def _apply(self, desired: Mapping[str, Iterable[Frontend]], full: bool) -> ApplyReport:
        report = ApplyReport()
        # Big applies (the cold start: 10,000s of Services) go in chunks of APPLY_CHUNK Services, each
        # planned, written in DESIGN.md's order and committed before the next is planned: every
        # Service's own writes stay ordered, and the plans' packed entries of one chunk are garbage
        # before the next is built. One batch for all of them peaked ~50 MB higher, and the allocator
        # keeps such a peak as RSS for good.
        chunk: list[Plan] = []
        flush = Flush()
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
        writer.run_flush(self.maps, flush, report)
        if full:
            self._backends.adopted.clear()  # every adopted id was claimed or freed with the orphans
        return report

    def _apply_plans(
        self, plans: list[Plan], report: ApplyReport, flush: Flush, admitted: bool = False
    ) -> None:
        """Admit (unless done), write, commit, then free and flush one batch of plans."""
        if not admitted:
            plans = self._admit(plans, report)
        plans, ranges = self._stage_source_ranges(plans, report)
        try:
            writer.write_batched(self.maps, plans, report)
        except MapFullError as err:
            log.error("batched map update failed (%s); applying service by service", err)
            self.errors["map_full"] += 1
            ok = []
            for p in plans:
                try:
                    writer.write_batched(self.maps, [p], ApplyReport())
                    ok.append(p)
                except MapFullError as err2:
                    keep = {b for q in ok for b in q.be_puts}
                    writer.undo(self.maps, p, self._backends.vals, keep)
                    self._fail(p, report, f"map {err2.map_name} is full", "map_full")
            plans = ok
            writer.count_writes(plans, report)
        self._lbsrc.finish(ranges, plans)
        freed = self._commit(plans, report)
        writer.free_and_flush(self.maps, self._backends, plans, freed, report, flush)

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
        svc4_max = self.maps.svc4.max_entries
        be4_max = self.maps.be4.max_entries
        svc4 = self._svc4_entries
        programmed = self._backends.vals
        be4 = len(programmed)
        new_be: set[int] = set()
        admitted = []
        for p in plans:
            add_be = {b for b in p.be_puts if b not in programmed and b not in new_be}
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

    def _fail(self, p: Plan, report: ApplyReport, why: str, reason: str) -> None:
        self.errors[reason] += 1
        report.failed[p.service] = why
        log.error("service %s not programmed, its previous state stays: %s", p.service, why)

    def _commit(self, plans: list[Plan], report: ApplyReport) -> set[int]:
        """Record admitted plans as programmed; return backend ids no longer referenced."""
        maybe_free: set[int] = set()
        orphans = self._services.get(ORPHANS)
        for p in plans:
            maybe_free |= self._backends.commit(p)
            self._commit_frontends(p, report)
            if orphans is not None and p.service != ORPHANS:
                for fk in p.claimed:
                    orphans.frontends.pop(fk, None)
            self._svc_ids.commit(p)
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
                        writer.n_entries(p.slot_puts) + writer.n_entries(p.slot0_puts),
                        writer.n_keys(p.slot_dels) + writer.n_keys(p.fe_dels),
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
