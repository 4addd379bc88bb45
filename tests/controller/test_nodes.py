"""Every Node's name, InternalIP and zone reach the store's node table; this node still drives set_node.

The store's node table (upsert_node(raw, origin)/delete_node(name)) belongs to kproxy.store; where the
store lacks it, these tests use a subclass that records what it is given, so the source's side of the
contract is tested either way.
"""

from __future__ import annotations

from typing import Any

from kproxy.store import ClusterStore
from tests.controller.apiserver import node
from tests.controller.conftest import NODE, NODE_IP, Harness, new_api, run


class RecordingStore(ClusterStore):
    """The store, with a node table recording the raw objects it is handed (and checking their size)."""

    def __init__(self) -> None:
        super().__init__()
        self.node_raw: dict[str, dict[str, Any]] = {}

    def upsert_node(self, raw: dict[str, Any], origin: str | None = None) -> bool:
        self.node_raw[raw["metadata"]["name"]] = raw
        parent = getattr(super(), "upsert_node", None)
        return bool(parent(raw, origin)) if parent is not None else True

    def delete_node(self, name: str) -> bool:
        self.node_raw.pop(name, None)
        parent = getattr(super(), "delete_node", None)
        return bool(parent(name)) if parent is not None else True


def big_node(name: str, address: str, zone: str) -> dict[str, Any]:
    """A Node as kubelet reports it: most of the body is of no use to a proxy."""
    raw = node(name, address, zone=zone)
    raw["metadata"]["labels"].update({f"example.com/l{i}": "x" * 40 for i in range(20)})
    raw["status"]["addresses"].append({"type": "ExternalIP", "address": "203.0.113.9"})
    raw["status"]["images"] = [{"names": [f"registry.example/img{i}@sha256:{'0' * 64}"], "sizeBytes": i}
                               for i in range(100)]  # fmt: skip
    raw["status"]["conditions"] = [{"type": "Ready", "status": "True", "message": "kubelet is posting"}]
    return raw


def addresses(raw: dict[str, Any]) -> list[str]:
    return [a["address"] for a in raw["status"]["addresses"]]


def test_every_node_reaches_the_node_table_cut_down(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(big_node("node-b", "192.168.0.11", "zone-b"))
        api.put(big_node("node-c", "192.168.0.12", "zone-c"))
        await api.start()
        h = Harness(api, mapset_factory(), store_factory=RecordingStore)
        await h.start()
        try:
            await h.settled()
            st = h.store
            assert isinstance(st, RecordingStore)
            assert set(st.node_raw) == {NODE, "node-b", "node-c"}
            b = st.node_raw["node-b"]
            assert addresses(b) == ["192.168.0.11"]
            assert b["metadata"]["labels"] == {"topology.kubernetes.io/zone": "zone-b"}
            assert "images" not in b["status"] and "conditions" not in b["status"]
            assert st.node.name == NODE and st.node.addresses == (NODE_IP,), "this node drives set_node"
            await h.wait_for("kopf watching nodes", lambda: api.watch_count("nodes") > 0)
            # a change, an addition and a deletion through the watch
            api.put(big_node("node-b", "192.168.0.21", "zone-b"))
            api.put(big_node("node-d", "192.168.0.13", "zone-d"))
            api.delete("Node", None, "node-c")
            await h.wait_for(
                "node table to follow the watch",
                lambda: (
                    set(st.node_raw) == {NODE, "node-b", "node-d"}
                    and addresses(st.node_raw["node-b"]) == ["192.168.0.21"]
                ),
            )
            assert "images" not in st.node_raw["node-d"]["status"]
            assert st.node.addresses == (NODE_IP,), "another node's change must not touch this node"
            # deleted while the history is compacted away: only the source's own LIST can notice
            api.delete_silently("Node", None, "node-d")
            api.expire_history()
            await h.wait_for("the deletion during the gap", lambda: "node-d" not in st.node_raw)
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def test_without_node_table_only_this_node_is_used(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(big_node("node-b", "192.168.0.11", "zone-b"))
        await api.start()
        h = Harness(api, mapset_factory())
        await h.start()
        try:
            await h.settled()
            assert h.store.node.name == NODE and h.store.node.addresses == (NODE_IP,)
            assert h.store.node.zone == "zone-a"
        finally:
            await h.stop()
            await api.stop()

    run(scenario())
