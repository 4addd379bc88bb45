"""Desired frontends -> ordered, batched writes to the service, backend and conntrack maps.

Both families: the Syncer splits each Service's frontends by family and runs one FamilySyncer engine
per family over the same code (kproxy.sync.family: kp_svc4/kp_be4/kp_ct4/kp_aff4/kp_lbsrc4 for IPv4,
the *6 twins for IPv6, whose backend and service-port ids start at abi.ID6_BASE). Everything below
holds per family; svcnet holds one trie per family too (kp_svcnet4, kp_svcnet6).

Ordering (DESIGN.md) so that a reader in the kernel never sees a frontend pointing at nothing:
  1. new or changed backends (kp_be4)          4. slots beyond a lowered count deleted
     then new or changed Maglev tables          5. frontends that went away deleted (slot 0 first)
  2. new or changed backend slots 1..n             then Maglev tables no frontend wants
  3. slot-0 entries (count, flags, svc_id)      6. backend ids no longer referenced freed, last
then UDP conntrack and affinity entries of backends that left a service are flushed (TCP flows are
left to finish). Each step is one batch for all services of an apply (the map splits it into
kernel batches of kproxy.bpf.maps.BATCH_CHUNK entries).

Speed (10,000 Services x 10 backends cold, bench/bench_sync.py): translate runs lazily per Service
while apply plans (kproxy.pipeline), map keys and values are packed with struct into bytes (a
frontend's slots as one blob, kproxy.abi's packers) instead of ctypes objects, backends are ints,
committed per-service sets become tuples, and sync_dirty runs with the cyclic GC paused (frozen
afterwards, see kproxy.heap.gc_paused).

Ids (kproxy.sync.ids): backend ids are stable per (address, port, protocol, nodeName) and monotonic,
service ids per (service, port name, protocol). Syncer.adopt() rebuilds both tables and the
programmed view from the maps, so re-applying an unchanged Service after a restart writes nothing.

A Service whose new entries would not fit a map is not written at all (its previous state stays
programmed); the others still apply.

Modules: family (what differs between IPv4 and IPv6), state (keys, plans, ApplyReport), ids, plan
(diff planning), writer (ordered writes, undo, flushes), syncer (the engines and the Syncer driving
them), lbsrc (kp_lbsrc4/6), svcnet (kp_svcnet4/6), maglev (Maglev tables, built) and mgsync
(kp_maglev_v1, kept in step). Reading the cluster view and translating it is
kproxy.pipeline's; timer chores on the maps are kproxy.bpf.upkeep's.
"""

from kproxy.sync.family import FAMILY4, FAMILY6, Family
from kproxy.sync.state import ORPHANS, ApplyReport
from kproxy.sync.syncer import FamilySyncer, Syncer
from kproxy.sync.writer import MapSet

__all__ = ["FAMILY4", "FAMILY6", "ORPHANS", "ApplyReport", "Family", "FamilySyncer", "MapSet", "Syncer"]
