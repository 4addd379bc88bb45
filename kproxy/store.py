"""The cluster view: parsed Services and EndpointSlices (kproxy.model's compact form), this node, and
which Services are dirty.

Sources (files, Kubernetes) call the upsert/delete methods of SourceSink, the one contract both write
through; they only update the view and mark Services dirty, then wake the sync task, which takes the
dirty set and re-translates just those (kproxy.pipeline).

Malformed input: an object that fails validation is logged (one line naming the object, its origin
and the problem), counted in `skipped` by kind and reason, and ignored. If an earlier valid version
of the same object is in the view, that version stays: the dataplane keeps serving the last known
good state rather than dropping a Service because of a bad edit (the API server never sends invalid
objects; a half-saved manifest file does). Deleting the object, or removing its file, removes it.

Legacy spellings: an address written with leading zeros ("172.30.0.041", accepted by Kubernetes before
Go 1.17) is read as decimal, as kube-proxy reads it; such an object is used, counted in `normalized`
by kind and reason, and logged once per version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from kproxy.heap import compact_dicts, gc_paused
from kproxy.model import (
    EndpointSlice,
    ModelError,
    NodeInfo,
    Service,
    canonical_ip,
    parse_endpoint_slice,
    parse_service,
    sloppy_ipv4,
)
from kproxy.translate import skip_reason

log = logging.getLogger(__name__)
_intern = sys.intern


class SourceSink(Protocol):
    """What a source writes into the cluster view: the one contract of kproxy.sources.kube and
    kproxy.sources.files. ClusterStore implements it."""

    change_time: float | None  # monotonic time the change being applied was received (None: now)
    skipped: Counter[tuple[str, str]]  # (kind, reason) -> objects skipped as invalid
    initial_sync_done: bool

    def upsert_service(self, raw: Any, origin: str | None = None) -> bool: ...
    def delete_service(self, namespace: str, name: str) -> bool: ...
    def upsert_slice(self, raw: Any, origin: str | None = None) -> bool: ...
    def delete_slice(self, namespace: str, name: str) -> bool: ...
    def set_node(self, node: NodeInfo) -> None: ...
    def upsert_node(self, raw: Any, origin: str | None = None) -> bool: ...
    def delete_node(self, name: str) -> bool: ...
    def set_service_cidrs(self, owner: str, cidrs: Iterable[str]) -> None: ...
    def upsert_service_cidr(self, raw: Any, origin: str | None = None) -> str | None: ...
    def delete_service_cidrs(self, owner: str) -> None: ...
    def mark_initial_sync_done(self) -> None: ...


class ClusterStore:
    def __init__(self, node: NodeInfo | None = None) -> None:
        self.services: dict[str, Service] = {}
        # Services with a healthCheckNodePort (the health servers look at these only, not at all)
        self.health_check_keys: set[str] = set()
        self.slices: dict[str, EndpointSlice] = {}  # "ns/name" -> slice
        # service key -> its slices' keys, in the order they came (a tuple of one is 48 bytes, a dict
        # 224: 10,000s of Services). A slice's owner is its service_key.
        self._by_service: dict[str, tuple[str, ...]] = {}
        self.node: NodeInfo = node or NodeInfo(name="")
        self._dirty: dict[str, float] = {}  # service key -> monotonic time of its first unsynced change
        # when set, the monotonic time the change being applied was received (a watch event's arrival),
        # which dates the Services it makes dirty; None: now
        self.change_time: float | None = None
        self.skipped: Counter[tuple[str, str]] = Counter()  # (kind, reason) -> objects skipped
        self.last_error: dict[str, str] = {}  # "Kind ns/name" -> last validation problem
        # (kind, reason) -> object versions used after reading a legacy spelling (see the docstring)
        self.normalized: Counter[tuple[str, str]] = Counter()
        self.initial_sync_done = False
        self._event: asyncio.Event | None = None
        self._listeners: list[Callable[[], None]] = []
        self.node_changed = False
        # every node's name -> its IPv4 InternalIP, for kp_be4_val.node_addr (DSR IPIP sends there);
        # node_addrs6 the same for IPv6 (kp_be6_val.node_addr, DSR IPv6-in-IPv6)
        self.node_addrs: dict[str, str] = {}
        self.node_addrs6: dict[str, str] = {}
        self.node_addrs_version = 0  # bumped on every change, so sync re-reads the table only then
        # The service address space (kube-proxy's service CIDRs): owner -> CIDRs. Owners are
        # ServiceCIDR objects ("ServiceCIDR/<name>") and the --service-cidr flag ("flag").
        self._service_cidrs: dict[str, tuple[str, ...]] = {}
        self.service_cidrs_version = 0  # bumped on every change
        # ClusterIP (either family) -> number of served Services on it; addresses whose count changed since
        # sync last took them (take_cluster_ips_changed)
        self.cluster_ips: Counter[str] = Counter()
        self.foreign_cluster_ips: Counter[str] = Counter()
        self.cluster_ips_changed: set[str] = set()

    # ---- waking the sync task ----
    @property
    def event(self) -> asyncio.Event:
        """Set whenever there is something to sync; the sync task clears it before take_dirty()."""
        if self._event is None:
            self._event = asyncio.Event()
            if self._dirty or self.node_changed:
                self._event.set()
        return self._event

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
        for cb in self._listeners:
            cb()

    def _mark(self, key: str, now: float | None = None) -> None:
        if key not in self._dirty:
            if now is None:
                now = self.change_time if self.change_time is not None else time.monotonic()
            self._dirty[key] = now
        self._wake()

    def mark_dirty(self, keys: Iterable[str]) -> None:
        now = time.monotonic()
        for k in keys:
            self._mark(k, now)

    def take_dirty(self) -> set[str]:
        return set(self.take_dirty_with_times())

    def take_dirty_with_times(self) -> dict[str, float]:
        """The dirty service keys with the monotonic time of their first change since the last take."""
        dirty, self._dirty = self._dirty, {}
        return dirty

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    # ---- the view ----
    def slices_of(self, service_key: str) -> list[EndpointSlice]:
        slices = self.slices
        return [slices[k] for k in self._by_service.get(service_key, ())]

    def view(self, service_key: str) -> tuple[Service | None, list[EndpointSlice]]:
        return self.services.get(service_key), self.slices_of(service_key)

    def _normalized(self, kind: str, key: str, origin: str | None, notes: list[str]) -> None:
        self.normalized[(kind, "legacy_ip")] += 1
        where = f" in {origin}" if origin else ""
        log.warning("%s %s%s: %s (leading zeros are decimal, as kube-proxy reads them)",
                    kind, key, where, "; ".join(notes))  # fmt: skip

    def _skip(self, err: ModelError) -> None:
        self.skipped[(err.kind, err.reason)] += 1
        self.last_error[err.object_name] = err.describe()
        log.warning("%s", err.describe())

    # ---- Services ----
    def compact(self) -> int:
        """Shrink the tables that deletions left oversized (heap.compact_dicts); the bytes saved."""
        return compact_dicts(
            self.services, self.slices, self._by_service, self.last_error, self.cluster_ips,
            self.foreign_cluster_ips,
        )  # fmt: skip

    def upsert_service(self, raw: Any, origin: str | None = None) -> bool:
        """Add or replace a Service; False if it was invalid (logged, counted, previous version kept)."""
        notes: list[str] = []
        try:
            svc = parse_service(raw, origin, notes)
        except ModelError as err:
            self._skip(err)
            return False
        if notes and self.services.get(svc.key) != svc:
            self._normalized("Service", svc.key, origin, notes)
        self._put_service(svc)
        return True

    def _put_service(self, svc: Service) -> None:
        key = _intern(svc.key)  # one string for the store's, the syncer's and its slices' tables
        old = self.services.get(key)
        if old == svc:
            return
        self.services[key] = svc
        if svc.spec.health_check_node_port:
            self.health_check_keys.add(key)
        else:
            self.health_check_keys.discard(key)
        self.last_error.pop(f"Service {key}", None)
        self._count_cluster_ips(old, -1)
        self._count_cluster_ips(svc, 1)
        self._mark(key)

    def delete_service(self, namespace: str, name: str) -> bool:
        key = f"{namespace}/{name}"
        old = self.services.pop(key, None)
        if old is None:
            return False
        self.health_check_keys.discard(key)
        self._count_cluster_ips(old, -1)
        self._mark(key)
        return True

    def _count_cluster_ips(self, svc: Service | None, delta: int) -> None:
        """Keep cluster_ips (ClusterIP of either family -> Services kproxy serves on it) and
        foreign_cluster_ips (those of Services another proxy serves: service.kubernetes.io/
        service-proxy-name), and note which addresses changed."""
        if svc is None or not svc.spec.ports:
            return
        reason = skip_reason(svc)
        if reason is None:
            counts = self.cluster_ips
        elif reason == "other_proxy":
            counts = self.foreign_cluster_ips
        else:
            return
        spec = svc.spec
        ips = spec.cluster_ips or ([spec.cluster_ip] if spec.cluster_ip else [])
        for ip in ips:
            if "." not in ip and ":" not in ip:
                continue  # "None" (headless) or nothing
            n = counts[ip] + delta
            if n > 0:
                counts[ip] = n
            else:
                del counts[ip]
            self.cluster_ips_changed.add(ip)

    # ---- EndpointSlices ----
    def upsert_slice(self, raw: Any, origin: str | None = None) -> bool:
        """Add or replace an EndpointSlice; False if it was invalid (logged, counted, previous kept)."""
        notes: list[str] = []
        try:
            es = parse_endpoint_slice(raw, origin, notes)
        except ModelError as err:
            self._skip(err)
            return False
        if notes and self.slices.get(es.key) != es:
            self._normalized("EndpointSlice", es.key, origin, notes)
        if es.service_key is None:
            unowned = ModelError(
                "EndpointSlice",
                es.metadata.namespace,
                es.metadata.name,
                ["metadata.labels: no kubernetes.io/service-name label, so it belongs to no Service"],
                origin,
                reason="no_service_label",
            )
            self._skip(unowned)
            return False
        self._put_slice(es)
        return True

    def _put_slice(self, es: EndpointSlice) -> None:
        key = _intern(es.key)  # the same string as the kube source's view and the slice index
        svc_key = es.service_key
        assert svc_key is not None
        old = self.slices.get(key)
        if old == es:
            return
        svc_key = _intern(svc_key)
        if old is not None:
            old_owner = old.service_key
            if old_owner != svc_key:
                assert old_owner is not None
                self._unindex_slice(key, old_owner)
                old = None
        self.slices[key] = es
        if old is None:  # else it is listed already
            self._by_service[svc_key] = (*self._by_service.get(svc_key, ()), key)
        self.last_error.pop(f"EndpointSlice {key}", None)
        self._mark(svc_key)

    def _unindex_slice(self, key: str, owner: str) -> None:
        group = self._by_service.get(owner)
        if group is not None:
            rest = tuple(k for k in group if k != key)
            if rest:
                self._by_service[owner] = rest
            else:
                del self._by_service[owner]
        self._mark(owner)

    def delete_slice(self, namespace: str, name: str) -> bool:
        key = f"{namespace}/{name}"
        old = self.slices.pop(key, None)
        if old is None:
            return False
        owner = old.service_key
        assert owner is not None
        self._unindex_slice(key, owner)
        return True

    # ---- node ----
    def set_node(self, node: NodeInfo) -> None:
        """A node change (addresses, zone) can change every Service: all of them become dirty. The
        interface addresses (set_host_addresses) are kept."""
        if node.host_addresses != self.node.host_addresses:
            node = dataclasses.replace(node, host_addresses=self.node.host_addresses)
        if node == self.node:
            return
        self.node = node
        self.node_changed = True
        now = time.monotonic()
        for key in self.services:
            self._mark(key, now)
        self._wake()

    def set_host_addresses(self, addresses: Iterable[str]) -> bool:
        """The addresses of this node's interfaces (for --nodeport-addresses); whether they changed."""
        addrs = tuple(sorted(set(addresses)))
        if addrs == self.node.host_addresses:
            return False
        self.set_node(self.node)  # no-op unless something else changed
        self.node = dataclasses.replace(self.node, host_addresses=addrs)
        self.node_changed = True
        now = time.monotonic()
        for key in self.services:
            self._mark(key, now)
        self._wake()
        return True

    # ---- the cluster's nodes (name -> address of each node running endpoints) ----
    def set_node_address(self, name: str, address: str | None, *, address6: str | None) -> None:
        """Record (or with None, forget) the IPv4 ADDRESS and IPv6 ADDRESS6 of node NAME; the Services
        with endpoints on it become dirty, as their backends carry that address."""
        if self.node_addrs.get(name) == address and self.node_addrs6.get(name) == address6:
            return
        for table, value in ((self.node_addrs, address), (self.node_addrs6, address6)):
            if value is None:
                table.pop(name, None)
            else:
                table[name] = value
        self.node_addrs_version += 1
        now = time.monotonic()
        slices = self.slices
        for skey, group in self._by_service.items():
            if any(ep[2] == name for k in group for ep in slices[k].endpoints):
                self._mark(skey, now)

    def upsert_node(self, raw: Any, origin: str | None = None) -> bool:
        """A Node object from a source: record its InternalIPs of both families (False if it had no name)."""
        try:
            name, addr, addr6 = node_addresses(raw if isinstance(raw, dict) else {})
        except ValueError as e:
            self.skipped[("Node", "no_name")] += 1
            log.warning("Node%s skipped: %s", f" from {origin}" if origin else "", e)
            return False
        if addr is None and addr6 is None:
            log.warning("Node %s has no InternalIP: DSR cannot reach its backends (they are SNATed)", name)
        self.set_node_address(name, addr, address6=addr6)
        return True

    def delete_node(self, name: str) -> bool:
        existed = name in self.node_addrs or name in self.node_addrs6
        self.set_node_address(name, None, address6=None)
        return existed

    # ---- the service address space ----
    def set_service_cidrs(self, owner: str, cidrs: Iterable[str]) -> None:
        """Record the service CIDRs of OWNER (a ServiceCIDR object, or "flag"), of both families.
        Invalid entries raise ValueError naming them."""
        nets = [str(ipaddress.ip_network(c.strip(), strict=False)) for c in cidrs]
        new = tuple(sorted(set(nets)))
        if self._service_cidrs.get(owner) == new:
            return
        self._service_cidrs[owner] = new
        self.service_cidrs_version += 1
        self._wake()

    def upsert_service_cidr(self, raw: Any, origin: str | None = None) -> str | None:
        """A ServiceCIDR object (networking.k8s.io/v1): record its spec.cidrs. Returns its name, or None
        if it was invalid (logged naming it, counted; its previous version is kept)."""
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        spec = raw.get("spec") if isinstance(raw, dict) else None
        cidrs = spec.get("cidrs") if isinstance(spec, dict) else None
        where = f" in {origin}" if origin else ""
        problem = reason = None
        if not isinstance(name, str) or not name:
            problem, reason = "no metadata.name", "missing_name"
        elif not isinstance(spec, dict):
            problem, reason = "it has no spec", "missing_spec"
        elif not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
            problem, reason = "spec.cidrs is not a list of CIDRs", "invalid_cidrs"
        else:
            try:
                self.set_service_cidrs(f"ServiceCIDR/{name}", cidrs)
            except ValueError:
                bad = next(c for c in cidrs if not _is_cidr(c))
                problem, reason = f"spec.cidrs entry {bad!r} is not a CIDR", "invalid_cidr"
        if problem is not None:
            # the same reasons as the Kubernetes source's (kproxy.sources.kube)
            self.skipped[("ServiceCIDR", reason or "invalid")] += 1
            log.warning("ServiceCIDR %s%s skipped: %s", name or "?", where, problem)
            return None
        return name  # type: ignore[no-any-return]

    def delete_service_cidrs(self, owner: str) -> None:
        if self._service_cidrs.pop(owner, None) is not None:
            self.service_cidrs_version += 1
            self._wake()

    def take_cluster_ips_changed(self) -> set[str]:
        changed, self.cluster_ips_changed = self.cluster_ips_changed, set()
        return changed

    @property
    def service_cidrs(self) -> list[str]:
        """Every service CIDR of both families, de-duplicated and sorted."""
        return sorted({c for cidrs in self._service_cidrs.values() for c in cidrs})

    # ---- full relist ----
    def replace_all(self, services: Iterable[Any], slices: Iterable[Any], origin: str | None = None) -> None:
        """Make the view exactly these objects (a complete listing): what is absent is removed.

        Invalid objects are skipped as in upsert; their previous valid version, if any, is kept.
        """
        with gc_paused():
            self._replace_all(services, slices, origin)

    def _replace_all(self, services: Iterable[Any], slices: Iterable[Any], origin: str | None) -> None:
        keep_svc: set[str] = set()
        keep_es: set[str] = set()
        for raw in services:
            self.upsert_service(raw, origin)
            keep_svc.add(parse_key(raw))  # also when invalid: its previous good version stays
        for raw in slices:
            self.upsert_slice(raw, origin)
            keep_es.add(parse_key(raw))
        for key in [k for k in self.services if k not in keep_svc]:
            ns, name = key.split("/", 1)
            self.delete_service(ns, name)
        for key in [k for k in self.slices if k not in keep_es]:
            ns, name = key.split("/", 1)
            self.delete_slice(ns, name)

    def mark_initial_sync_done(self) -> None:
        if not self.initial_sync_done:
            self.initial_sync_done = True
            log.info(
                "initial listing complete: %d Services, %d EndpointSlices",
                len(self.services),
                len(self.slices),
            )
        self._wake()


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return False
    return True


def parse_key(raw: Any) -> str:
    """'ns/name' of a raw object, as far as it can be read (used to keep invalid objects' old versions)."""
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        return ""
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def node_address(raw: Mapping[str, Any]) -> tuple[str, str | None]:
    """(name, first IPv4 InternalIP or None) of a raw Node object."""
    name, addr, _ = node_addresses(raw)
    return name, addr


def node_addresses(raw: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    """(name, first IPv4 InternalIP, first IPv6 InternalIP) of a raw Node object; None for a family it
    lists none of. A dual-stack node lists one InternalIP per family (kubelet's --node-ip a,b)."""
    meta = raw.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("Node without metadata.name")
    status = raw.get("status") or {}
    found: dict[int, str] = {}
    for a in (status.get("addresses") or []) if isinstance(status, Mapping) else []:
        if isinstance(a, Mapping) and a.get("type") == "InternalIP" and isinstance(a.get("address"), str):
            # as Kubernetes reads it (ParseIPSloppy): leading zeros, an IPv4-mapped IPv6 address is IPv4
            text = a["address"].strip()
            ip = canonical_ip(text) or sloppy_ipv4(text)
            if ip is not None:
                found.setdefault(6 if ":" in ip else 4, ip)
    return name, found.get(4), found.get(6)
