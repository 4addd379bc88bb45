"""What the Kubernetes source holds of the cluster (the last resourceVersion applied per object, the
deletions it saw), and the one place that writes it to the store, through the store's SourceSink."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from kproxy.heap import compact_dicts
from kproxy.sources.kube.config import SourceMetrics
from kproxy.sources.kube.objects import (
    InvalidServiceCIDR,
    display,
    node_info,
    resource_version,
    service_cidr_owner,
    service_cidrs_of,
)
from kproxy.sources.nodes import node_eligible
from kproxy.store import SourceSink

log = logging.getLogger("kproxy.sources.kube")

# an object: (kind, namespace, name)
Key = tuple[str, str, str]
_intern = sys.intern


def _split(k: str) -> tuple[str, str]:
    """ "namespace/name" (namespace "" for cluster-scoped objects) -> (namespace, name)."""
    ns, _, name = k.partition("/")
    return ns, name


class ObjectView:
    """Applies Kubernetes objects to the store, each only when newer than what was applied before.

    Every object carries a resourceVersion: the last one applied per object is kept and anything not
    newer is ignored, so the LIST and the watch can race freely and re-listings cost no store work
    and no log line. Only ever used from the agent's loop.
    """

    def __init__(
        self,
        store: SourceSink,
        *,
        node_name: str,
        settings_configmap: str,
        metrics: SourceMetrics | None,
        on_settings: Callable[[dict[str, str]], None] | None,
        on_node_eligible: Callable[[bool], None] | None,
    ) -> None:
        self.store = store
        self.node_name = node_name
        self.settings_configmap = settings_configmap  # "namespace/name", for the log
        self.metrics = metrics
        self.on_settings = on_settings
        self.on_node_eligible = on_node_eligible
        # kind -> "namespace/name" -> resourceVersion last applied (None for opaque versions). The
        # names are interned: the store's tables hold the same strings (a (kind, ns, name) tuple a
        # key took 1.3 MB at 10,000 Services).
        self.seen: dict[str, dict[str, int | None]] = {}
        # Deletions the watch saw while our LIST of their kind was running, so that a page of its older
        # snapshot cannot bring the object back (begin_list .. sweep). A LIST started after a deletion
        # was seen reads a snapshot that has it (the LISTs are consistent reads: no resourceVersion),
        # so none is kept outside a LIST: every deleted object used to stay here until the next
        # full LIST, for the agent's life. Kind -> "namespace/name" -> resourceVersion.
        self.tombstones: dict[str, dict[str, int]] = {}
        self._listing: set[str] = set()  # kinds our LIST is reading
        self._settings: dict[str, str] | None = None
        self._node_eligible: bool | None = None

    def compact(self) -> int:
        """Shrink the tables that deletions left oversized (heap.compact_dicts); the bytes saved."""
        return compact_dicts(*self.seen.values(), *self.tombstones.values())

    def count(self, kind: str) -> int:
        """How many objects of KIND are held."""
        return len(self.seen.get(kind, ()))

    def held(self) -> set[Key]:
        """Every object held, as (kind, namespace, name)."""
        return {(kind, *_split(k)) for kind, names in self.seen.items() for k in names}

    def upsert(self, key: Key, raw: dict[str, Any], quiet: bool) -> bool:
        kind, ns, name = key
        k = _intern(f"{ns}/{name}")
        seen = self.seen.get(kind)
        if seen is None:
            seen = self.seen[kind] = {}
        rv = resource_version(raw)
        if rv is not None:
            last = seen.get(k)
            if last is not None and last >= rv:
                return False  # already applied (a re-listing, or the LIST raced the watch)
            gone = self.tombstones.get(kind, {}).get(k)
            if gone is not None and gone >= rv:
                return False  # an older copy of an object the watch saw deleted
        existed = k in seen
        seen[k] = rv
        tombstones = self.tombstones.get(kind)
        if tombstones:
            tombstones.pop(k, None)
        detail = ""
        try:
            if kind == "Service":
                self.store.upsert_service(raw, origin="kubernetes")
            elif kind == "Node":
                self.store.upsert_node(raw, origin="kubernetes")
            elif kind == "ServiceCIDR":
                cidrs = service_cidrs_of(raw, name)
                try:
                    self.store.set_service_cidrs(service_cidr_owner(name), cidrs)
                except ValueError as e:
                    raise InvalidServiceCIDR(name, f"spec.cidrs {cidrs}: {e}", "invalid_cidr") from e
                detail = ": " + ", ".join(cidrs)
            else:
                self.store.upsert_slice(raw, origin="kubernetes")
        except InvalidServiceCIDR as e:  # the store only raises: count it as it counts the others
            log.warning("%s", e)
            self.store.skipped[(kind, e.reason)] += 1
            return True
        except ValueError as e:  # kproxy.model.ModelError and friends: the store names the problem
            log.warning("%s", e)
            self.count_skipped(kind, getattr(e, "reason", "invalid"))
            return True
        if not quiet and log.isEnabledFor(logging.DEBUG):  # a line per event costs as much as the event
            log.debug("%s %s%s", display(kind, ns, name), "updated" if existed else "added", detail)
        return True

    def delete(self, key: Key, rv: int | None, quiet: bool) -> None:
        kind, ns, name = key
        k = f"{ns}/{name}"
        seen = self.seen.get(kind, {})
        if rv is not None:
            last = seen.get(k)
            if last is not None and last > rv:
                return
            if kind in self._listing:
                self.tombstones.setdefault(kind, {})[_intern(k)] = rv
        if k not in seen:
            return
        del seen[k]
        if kind == "Service":
            self.store.delete_service(ns, name)
        elif kind == "Node":
            self.store.delete_node(name)
        elif kind == "ServiceCIDR":
            self.store.delete_service_cidrs(service_cidr_owner(name))
        else:
            self.store.delete_slice(ns, name)
        if not quiet:
            log.debug("%s deleted", display(kind, ns, name))

    def apply_node(self, raw: dict[str, Any], deleted: bool) -> None:
        if deleted:
            eligible = False
        else:
            self.store.set_node(node_info(raw))
            eligible = node_eligible(raw)
        if eligible != self._node_eligible:
            self._node_eligible = eligible
            if not eligible:
                log.warning("node %s is being deleted or drained: /healthz will fail", self.node_name)
            if self.on_node_eligible is not None:
                self.on_node_eligible(eligible)

    def apply_settings(self, data: dict[str, Any]) -> None:
        settings = {str(k): str(v) for k, v in data.items()}
        if settings == self._settings:
            return
        self._settings = settings
        log.info("runtime settings from ConfigMap %s: %s", self.settings_configmap, settings or "defaults")
        if self.on_settings is not None:
            try:
                self.on_settings(settings)
            except Exception:
                log.exception("applying runtime settings %s failed; keeping the previous ones", settings)

    def count_skipped(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.object_skipped(kind, reason)

    def begin_list(self, kind: str) -> None:
        """Our LIST of KIND starts: deletions are remembered until its sweep."""
        self._listing.add(kind)

    def sweep(self, kind: str, listed: set[Key], list_rv: int | None, quiet: bool) -> int:
        """After a full LIST of KIND (its snapshot at LIST_RV): delete what is held that the LIST does
        not have (and is not newer than it), forget the deletions seen meanwhile (no page of it is
        left to bring them back). Returns the deleted count."""
        deleted = 0
        names = {f"{ns}/{name}" for k, ns, name in listed if k == kind}
        for k, seen_rv in list(self.seen.get(kind, {}).items()):
            if k in names:
                continue
            if list_rv is not None and seen_rv is not None and seen_rv > list_rv:
                continue  # created after the LIST's snapshot
            self.delete((kind, *_split(k)), list_rv, quiet=quiet)
            deleted += 1
        self._listing.discard(kind)
        self.tombstones.pop(kind, None)
        return deleted
