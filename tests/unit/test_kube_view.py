"""The Kubernetes source's object view: newer-only upserts, and the deletions it remembers (tombstones)
only while its own LIST of that kind could still bring an older copy back."""

from __future__ import annotations

from typing import Any

from unit_objects import NODE, svc_raw

from kproxy.sources.kube.view import ObjectView
from kproxy.store import ClusterStore


def with_rv(raw: dict[str, Any], rv: int) -> dict[str, Any]:
    raw["metadata"]["resourceVersion"] = str(rv)
    return raw


def view() -> tuple[ObjectView, ClusterStore]:
    store = ClusterStore(NODE)
    v = ObjectView(
        store, node_name=NODE, settings_configmap="kube-system/kproxy-config", metrics=None,
        on_settings=None, on_node_eligible=None,
    )  # fmt: skip
    return v, store


KEY = ("Service", "default", "web")
PORT_81 = [{"name": "http", "port": 81, "targetPort": "http"}]


def test_only_newer_versions_apply() -> None:
    v, store = view()
    assert v.upsert(KEY, with_rv(svc_raw(), 5), quiet=True)
    assert not v.upsert(KEY, with_rv(svc_raw(ports=PORT_81), 4), quiet=True)
    assert store.services["default/web"].spec.ports[0].port == 80
    assert v.upsert(KEY, with_rv(svc_raw(ports=PORT_81), 6), quiet=True)
    assert store.services["default/web"].spec.ports[0].port == 81


def test_a_deletion_outside_a_list_leaves_no_tombstone() -> None:
    """A LIST that starts after a deletion was seen reads a snapshot that has it (the agent's LISTs
    are consistent reads): nothing can bring the object back, so nothing is kept. Every deleted
    object used to stay in the view until the next full LIST, for the agent's life."""
    v, store = view()
    for i in range(1000):
        key = ("Service", "default", f"s{i}")
        v.upsert(key, with_rv(svc_raw(name=f"s{i}"), 10 + i), quiet=True)
        v.delete(key, 5000 + i, quiet=True)
    assert not v.tombstones.get("Service") and not v.held() and not store.services


def test_a_deletion_during_a_list_keeps_an_older_page_from_bringing_it_back() -> None:
    v, store = view()
    v.upsert(KEY, with_rv(svc_raw(), 5), quiet=True)
    v.begin_list("Service")
    v.delete(KEY, 9, quiet=True)  # the watch saw it go while the LIST's pages were on their way
    assert not v.upsert(KEY, with_rv(svc_raw(), 5), quiet=True)  # a page of the LIST's older snapshot
    assert "default/web" not in store.services
    assert v.upsert(("Service", "default", "other"), with_rv(svc_raw(name="other"), 7), quiet=True)
    assert v.sweep("Service", {("Service", "default", "other")}, 8, quiet=True) == 0
    assert not v.tombstones.get("Service")  # the LIST is over: the next one reads a newer snapshot
    # created again, newer than the deletion: applied
    assert v.upsert(KEY, with_rv(svc_raw(), 12), quiet=True)
    assert "default/web" in store.services


def test_a_recreation_during_a_list_is_not_blocked_by_its_tombstone() -> None:
    v, store = view()
    v.upsert(KEY, with_rv(svc_raw(), 5), quiet=True)
    v.begin_list("Service")
    v.delete(KEY, 9, quiet=True)
    assert v.upsert(KEY, with_rv(svc_raw(ports=PORT_81), 10), quiet=True)
    assert store.services["default/web"].spec.ports[0].port == 81
    # the LIST's snapshot predates the deletion: its copy is older than what the watch brought
    v.sweep("Service", {KEY}, 8, quiet=True)
    assert store.services["default/web"].spec.ports[0].port == 81 and not v.tombstones.get("Service")


def test_a_list_of_one_kind_keeps_tombstones_of_that_kind_only() -> None:
    v, _ = view()
    slice_key = ("EndpointSlice", "default", "web-1")
    v.begin_list("Service")
    v.delete(slice_key, 9, quiet=True)
    v.delete(KEY, 9, quiet=True)
    assert v.tombstones == {"Service": {"default/web": 9}}


def test_the_view_and_the_store_share_their_names() -> None:
    """The view keys objects by the interned "namespace/name" the store keys them by: one string."""
    v, store = view()
    v.upsert(KEY, with_rv(svc_raw(), 5), quiet=True)
    (held,) = v.seen["Service"]
    (stored,) = store.services
    assert held is stored and v.held() == {KEY} and v.count("Service") == 1
