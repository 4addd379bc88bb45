"""The cluster's nodes as the datapath needs them: node name -> IPv4 InternalIP.

Every backend entry carries the address of the node running it (kp_be4_val.node_addr: the outer
destination of DSR IPIP). EndpointSlice endpoints name their node (nodeName); this table maps the
name to an address. Sources feed ClusterStore.set_node_address() / replace_node_addresses():
  - Kubernetes: a watch on all Nodes (the agent's RBAC allows list/watch nodes) calls node_address()
    on every event;
  - files: `kind: Node` manifests in the manifests directory: kproxy.sources.files hands them to
    ClusterStore.upsert_node(); with a FileSource that ignores Node objects the agent runs NodeFiles,
    a separate scanner of the same directory, instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kproxy.store import ClusterStore

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
POLL_INTERVAL = 0.2
# Cheap pre-check, so manifests without a Node (thousands of Service files) are never YAML-parsed here.
_NODE_KIND = re.compile(r"""^\s*(-\s*)?["']?kind["']?\s*:\s*["']?Node["']?\s*,?\s*$""", re.M)


def node_address(raw: Mapping[str, Any]) -> tuple[str, str | None]:
    """(name, first IPv4 InternalIP or None) of a raw Node object."""
    meta = raw.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("Node without metadata.name")
    status = raw.get("status") or {}
    for a in (status.get("addresses") or []) if isinstance(status, Mapping) else []:
        if isinstance(a, Mapping) and a.get("type") == "InternalIP":
            addr = a.get("address")
            if isinstance(addr, str) and "." in addr and ":" not in addr:
                return name, addr
    return name, None


def nodes_of(objects: list[Any]) -> dict[str, str]:
    """name -> IPv4 of every well-formed Node among OBJECTS (others are skipped)."""
    out: dict[str, str] = {}
    for obj in objects:
        if not isinstance(obj, Mapping) or obj.get("kind") != "Node":
            continue
        try:
            name, addr = node_address(obj)
        except ValueError as e:
            log.warning("skipping a Node manifest: %s", e)
            continue
        if addr is None:
            log.warning("Node %s has no IPv4 InternalIP: its backends get no node address", name)
            continue
        out[name] = addr
    return out


class NodeFiles:
    """Follows `kind: Node` objects in a manifests directory into store's node table."""

    def __init__(self, directory: str, store: ClusterStore, interval: float = POLL_INTERVAL) -> None:
        self.directory = directory
        self.store = store
        self.interval = interval
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._nodes: dict[str, dict[str, str]] = {}  # file -> its nodes

    def scan(self) -> bool:
        """Re-read changed files; return whether the node table changed."""
        from kproxy.sources.files import FileError, load_file

        seen: set[str] = set()
        changed = False
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if not entry.name.endswith(SUFFIXES) or entry.name.startswith("."):
                    continue
                path = entry.path
                seen.add(path)
                try:
                    st = entry.stat()
                except OSError:
                    continue
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if self._stamps.get(path) == stamp:
                    continue
                self._stamps[path] = stamp
                try:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    nodes = nodes_of(load_file(path)) if _NODE_KIND.search(text) else {}
                except (OSError, FileError) as e:
                    log.warning("cannot read nodes from %s: %s", path, e)
                    continue
                if self._nodes.get(path, {}) != nodes:
                    changed = True
                    if nodes:
                        self._nodes[path] = nodes
                    else:
                        self._nodes.pop(path, None)
        for path in [p for p in self._stamps if p not in seen]:
            del self._stamps[path]
            if self._nodes.pop(path, None):
                changed = True
        if changed:
            table: dict[str, str] = {}
            for nodes in self._nodes.values():
                table.update(nodes)
            self.store.replace_node_addresses(table)
            log.info("node table: %s", ", ".join(f"{n}={a}" for n, a in sorted(table.items())) or "empty")
        return changed

    async def run(self) -> None:
        while True:
            self.scan()
            await asyncio.sleep(self.interval)
