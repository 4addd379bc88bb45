"""The sync pipeline: the store's dirty Services -> translate -> the Syncer's apply (which splits each
Service's frontends by family: kp_svc4 and kp_svc6) -> the service address space (IPv4). The one
module that knows the cluster view, translate and the maps' writer together."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from kproxy import abi
from kproxy.desired import Frontend
from kproxy.heap import gc_paused, trim_heap
from kproxy.sync import ApplyReport, Syncer
from kproxy.translate import TranslateConfig, TranslateError, translate_service

if TYPE_CHECKING:  # the store calls nothing here, the agent hands it over: no import at run time
    from kproxy.store import ClusterStore

log = logging.getLogger(__name__)

TRIM_AFTER = 1000  # Services applied since the last trim of the C heap beyond which it is trimmed again
_applied_since_trim = 0


def sync_dirty(
    store: ClusterStore, syncer: Syncer, cfg: TranslateConfig, *, full: bool = False
) -> ApplyReport:
    """Translate the store's dirty Services (all of them if `full`) and apply them in one batch.

    Translate problems are counted in store.skipped as ("Service", reason); the Service is then
    removed from the maps, as it cannot be served. Services to retry are marked dirty again.
    """
    global _applied_since_trim
    with gc_paused():
        report = _sync_dirty(store, syncer, cfg, full)
    # What the applies freed, see trim_heap: after a big one (the cold sync's plans), and after many
    # small ones too (a burst or churn of changes, each sync a few Services: their garbage is spread
    # over the heap and glibc kept ~5 MB of it at 10,000 Services). A trim takes a few milliseconds.
    _applied_since_trim += report.services
    if _applied_since_trim >= TRIM_AFTER:
        _applied_since_trim = 0
        trim_heap()
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
        left_out: Counter[str] = Counter()
        try:
            return translate_service(svc, slices, store.node, self.cfg, left_out)
        except TranslateError as err:
            store.skipped[("Service", err.reason)] += 1
            log.warning("%s", err)
            return []
        finally:
            # an invalid kproxy.io/lb-algorithm is counted (each time the Service is translated); translate's
            # other notes (a headless Service, an unallocated NodePort...) are no malformed objects
            if left_out["lb_algorithm_invalid"]:
                store.skipped[("Service", "lb_algorithm_invalid")] += left_out["lb_algorithm_invalid"]

    def __contains__(self, key: object) -> bool:
        return key in self.keys_

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _sync_dirty(store: ClusterStore, syncer: Syncer, cfg: TranslateConfig, full: bool) -> ApplyReport:
    addresses = store.node.addresses
    local = next((a for a in addresses if abi.is_ipv4(a)), None)
    local6 = next((a for a in addresses if ":" in a), None)
    # Services with endpoints on a node whose address changed were marked dirty by the store. Both
    # families' node tables come from it (the nodes' InternalIPs of each family).
    syncer.set_nodes(
        store.node_addrs, local, store.node_addrs_version,
        addrs6=store.node_addrs6, local_addr6=local6, version6=store.node_addrs_version,
    )  # fmt: skip
    dirty = store.take_dirty_with_times()
    keys = set(store.services) | set(syncer.services) | set(dirty) if full else set(dirty)
    report = syncer.apply(_Translated(store, keys, cfg), full=full)
    # after the frontends: a packet to a new frontend finds it before its ClusterIP's REJECT entry
    syncer.svcnet.sync(store, full=full)
    report.first_change = dirty
    if report.retry:
        store.mark_dirty(report.retry)
    return report
