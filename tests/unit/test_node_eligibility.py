"""This node's Node object decides /healthz's nodeEligible (KEP-3836): the rule, and the file source
feeding it to the agent's health server end to end (the Kubernetes source: tests/controller/test_nodes.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import yaml

from kproxy.agent import Agent
from kproxy.config import AgentConfig
from kproxy.lab import manifests as mf
from kproxy.model import NodeInfo
from kproxy.observe.health import HealthServer
from kproxy.sources.nodes import TO_BE_DELETED_TAINT, LocalNodeWatch, node_eligible
from kproxy.store import ClusterStore

NODE, NODE_IP = "n1", "192.0.2.1"
TAINT = {"key": TO_BE_DELETED_TAINT, "value": "1700000000", "effect": "NoSchedule"}


def node(
    name: str = NODE, *, deleting: bool = False, taints: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    raw = mf.node(name, NODE_IP)
    if deleting:
        raw["metadata"]["deletionTimestamp"] = "2023-11-14T22:13:20Z"
    if taints is not None:
        raw["spec"] = {"taints": taints}
    return raw


def test_node_eligible_is_kube_proxys_rule() -> None:
    assert node_eligible(node())
    assert not node_eligible(node(deleting=True))
    assert not node_eligible(node(taints=[TAINT]))
    assert not node_eligible(node(taints=[{**TAINT, "effect": "PreferNoSchedule"}])), "any effect"
    assert node_eligible(node(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]))
    assert node_eligible({"metadata": {"name": NODE}, "spec": {"taints": None}})


def test_local_node_watch_reports_changes_of_this_node_only() -> None:
    seen: list[bool] = []
    watch = LocalNodeWatch(NODE, seen.append)
    watch.upserted(node("other", taints=[TAINT]))
    watch.deleted("other")
    assert seen == []
    watch.upserted(node())
    watch.upserted(node())
    watch.upserted(node(taints=[TAINT]))
    watch.upserted(node(deleting=True))
    watch.deleted(NODE)
    assert seen == [True, False, True]


def write(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(obj))
    st = path.stat()  # visible even on file systems with coarse timestamps
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_file_source_node_manifest_drives_healthz_through_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent = Agent(AgentConfig(node_name=NODE, node_ips=[NODE_IP], source=f"file:{tmp_path}"))
        agent.store = ClusterStore(NodeInfo(name=NODE, addresses=(NODE_IP,)))
        agent.health = HealthServer("127.0.0.1", 0)
        await agent.health.start()
        try:
            assert agent.cfg.source_dir is not None
            src = agent.make_file_source(agent.cfg.source_dir)
            port = agent.health.port

            async def answers() -> tuple[int, bool, int]:
                status, body = await get(port, "/healthz")
                livez, _ = await get(port, "/livez")
                return status, body["nodeEligible"], livez

            src.scan()  # no Node manifest: the node named on the command line is eligible
            assert await answers() == (200, True, 200)
            write(tmp_path / "nodes.yaml", node(taints=[TAINT]))
            write(tmp_path / "other.yaml", node("n2", deleting=True))  # another node: no effect
            src.scan()
            assert await answers() == (503, False, 200)
            assert agent.store.node_addrs.get(NODE) == NODE_IP, "the node table is still fed"
            write(tmp_path / "nodes.yaml", node(taints=[{"key": "other", "effect": "NoSchedule"}]))
            src.scan()
            assert await answers() == (200, True, 200)
            write(tmp_path / "nodes.yaml", node(deleting=True))
            src.scan()
            assert await answers() == (503, False, 200)
            (tmp_path / "nodes.yaml").unlink()  # the manifest is gone: back to the command line's node
            src.scan()
            assert await answers() == (200, True, 200)
            assert NODE not in agent.store.node_addrs
        finally:
            await agent.health.stop()

    asyncio.run(scenario())
