"""Every Node's name, InternalIP and zone reach the store's node table; this node still drives set_node.

The store's node table (upsert_node(raw, origin)/delete_node(name)) belongs to kproxy.store; where the
store lacks it, these tests use a subclass that records what it is given, so the source's side of the
contract is tested either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from kproxy.agent import Agent
from kproxy.config import AgentConfig
from kproxy.model import NodeInfo
from kproxy.observe.health import HealthServer
from kproxy.store import ClusterStore
from tests.controller.apiserver import DEFAULT_TOKEN, FakeApiServer, node
from tests.controller.conftest import NODE, NODE_IP, Harness, new_api, run
from tests.controller.rbac import Rbac, render_chart, settings_configmap


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


async def _health_answers(port: int) -> tuple[int, bool, int]:
    """(/healthz status, its nodeEligible, /livez status)."""

    async def get(path: str) -> tuple[int, dict[str, Any]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    status, body = await get("/healthz")
    livez, _ = await get("/livez")
    return status, body["nodeEligible"], livez


async def _until(what: str, answers: Callable[[], Awaitable[Any]], want: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await answers()) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {got} instead of {want}")
        await asyncio.sleep(0.02)


def test_this_nodes_deletion_and_autoscaler_taint_fail_healthz_not_livez() -> None:
    """KEP-3836 end to end through the agent's wiring: Node watch -> KubeSource -> health server."""

    async def scenario() -> None:
        # this node does not exist yet; the chart's RBAC enforced for the agent
        api = FakeApiServer(bookmark_interval=0.5, rbac=Rbac.from_chart())
        await api.start()
        cm_ns, cm_name = settings_configmap(render_chart())
        cfg = AgentConfig(node_name=NODE, node_ips=[NODE_IP], settings_configmap=f"{cm_ns}/{cm_name}")
        agent = Agent(cfg, connection=kopf.ConnectionInfo(server=api.url, token=DEFAULT_TOKEN))
        agent.store = ClusterStore(NodeInfo(name=NODE, addresses=(NODE_IP,)))
        agent.health = HealthServer("127.0.0.1", 0)
        await agent.health.start()
        agent.synced.set()  # kopf may start watching at once (the agent sets this after its first sync)
        task = asyncio.create_task(agent.make_kube_source().run())

        def answers() -> Awaitable[tuple[int, bool, int]]:
            return _health_answers(agent.health.port)

        try:
            while not agent.store.initial_sync_done:  # bounded by run()'s timeout
                await asyncio.sleep(0.02)
            # kube-proxy's nodeEligible is false while it has not seen its Node
            assert await answers() == (503, False, 200)
            api.put(node(NODE, NODE_IP))
            await _until("the Node to appear", answers, (200, True, 200))
            api.patch("Node", None, NODE, {"metadata": {"deletionTimestamp": "2023-11-14T22:13:20Z"}})
            await _until("the deletion to fail /healthz only", answers, (503, False, 200))
            api.patch("Node", None, NODE, {"metadata": {"deletionTimestamp": None}})
            await _until("the deletion to be cancelled", answers, (200, True, 200))
            taint = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
            api.patch("Node", None, NODE, {"spec": {"taints": [taint]}})
            await _until("the autoscaler taint to fail /healthz only", answers, (503, False, 200))
            api.patch("Node", None, NODE, {"spec": {"taints": [{**taint, "key": "example.com/other"}]}})
            await _until("another taint to leave the node eligible", answers, (200, True, 200))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await agent.health.stop()
            await api.stop()

    run(scenario())
