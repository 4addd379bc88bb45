"""FileSource: multi-document YAML, JSON, List, change detection, removal, malformed files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import yaml
from unit_objects import NODE, ep, slice_raw, svc_raw

from kproxy.sources.files import FileSource
from kproxy.store import ClusterStore


def write(path: Path, *docs: object) -> None:
    path.write_text(yaml.safe_dump_all(list(docs)))
    # make the change visible even on file systems with coarse timestamps
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def source(tmp_path: Path) -> tuple[FileSource, ClusterStore]:
    st = ClusterStore(NODE)
    return FileSource(str(tmp_path), st), st


def test_reads_multi_document_yaml_json_and_list(tmp_path):
    write(tmp_path / "web.yaml", svc_raw(), slice_raw())
    (tmp_path / "api.json").write_text(json.dumps(svc_raw(name="api")))
    items = [svc_raw(name="db"), slice_raw(service="db")]
    write(tmp_path / "list.yml", {"apiVersion": "v1", "kind": "List", "items": items})
    (tmp_path / "notes.txt").write_text("ignored")
    write(tmp_path / "cm.yaml", {"kind": "ConfigMap", "metadata": {"name": "x"}})
    src, st = source(tmp_path)
    assert not st.initial_sync_done
    src.scan()
    assert st.initial_sync_done
    assert set(st.services) == {"default/web", "default/api", "default/db"}
    assert set(st.slices) == {"default/web-abc", "default/db-abc"}


def test_change_and_removal_followed(tmp_path):
    f = tmp_path / "web.yaml"
    write(f, svc_raw(), slice_raw())
    src, st = source(tmp_path)
    src.scan()
    st.take_dirty()
    assert not src.scan()
    write(f, svc_raw(), slice_raw(endpoints=[ep("10.0.0.9")]))
    assert src.scan()
    assert st.take_dirty() == {"default/web"}
    assert st.slices["default/web-abc"].endpoints[0].addresses == ["10.0.0.9"]
    # object removed from the file
    write(f, svc_raw())
    src.scan()
    assert st.slices == {} and "default/web" in st.services
    # file removed
    f.unlink()
    src.scan()
    assert st.services == {}


def test_object_moved_between_files_survives_old_file_removal(tmp_path):
    write(tmp_path / "a.yaml", svc_raw())
    src, st = source(tmp_path)
    src.scan()
    write(tmp_path / "b.yaml", svc_raw())
    src.scan()
    (tmp_path / "a.yaml").unlink()
    src.scan()
    assert "default/web" in st.services


def test_malformed_object_skipped_rest_applies(tmp_path, caplog):
    bad = svc_raw(name="bad")
    bad["spec"]["ports"][0]["port"] = 70000
    write(tmp_path / "m.yaml", bad, svc_raw(name="good"))
    src, st = source(tmp_path)
    with caplog.at_level(logging.WARNING):
        src.scan()
    assert set(st.services) == {"default/good"}
    msgs = [r.getMessage() for r in caplog.records]
    assert any("Service default/bad" in m and "m.yaml" in m and "spec.ports[0].port" in m for m in msgs)
    assert st.skipped[("Service", "invalid")] == 1


def test_unparsable_file_keeps_previous_objects(tmp_path, caplog):
    f = tmp_path / "web.yaml"
    write(f, svc_raw())
    src, st = source(tmp_path)
    src.scan()
    f.write_text("kind: Service\nmetadata: [unclosed\n")
    st_ = f.stat()
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns + 2_000_000_000))
    with caplog.at_level(logging.WARNING):
        src.scan()
    assert "default/web" in st.services
    assert any("web.yaml" in r.getMessage() and "not valid YAML" in r.getMessage() for r in caplog.records)
    assert st.skipped[("File", "unparsable")] == 1
    write(f, svc_raw(name="other"))
    src.scan()
    assert set(st.services) == {"default/other"}


def test_run_follows_changes_within_a_second(tmp_path):
    async def main() -> None:
        st = ClusterStore(NODE)
        src = FileSource(str(tmp_path), st, interval=0.05)
        task = asyncio.create_task(src.run())
        try:
            for _ in range(100):
                await asyncio.sleep(0.02)
                if st.initial_sync_done:
                    break
            assert st.initial_sync_done and st.services == {}
            write(tmp_path / "web.yaml", svc_raw())
            for _ in range(100):
                await asyncio.sleep(0.02)
                if st.services:
                    break
            assert "default/web" in st.services
        finally:
            task.cancel()

    asyncio.run(main())


def test_missing_directory_is_not_fatal_and_not_a_complete_view(tmp_path):
    d = tmp_path / "later"
    src, st = source(d)
    src.scan()
    assert not st.initial_sync_done and st.services == {}
    d.mkdir()
    write(d / "web.yaml", svc_raw())
    src.scan()
    assert st.initial_sync_done and "default/web" in st.services


def test_unparsable_file_at_start_delays_initial_sync(tmp_path):
    f = tmp_path / "web.yaml"
    f.write_text("kind: Service\nmetadata: [unclosed\n")
    src, st = source(tmp_path)
    src.scan()
    assert not st.initial_sync_done
    write(f, svc_raw())
    src.scan()
    assert st.initial_sync_done and "default/web" in st.services


def test_unparsable_file_at_start_gives_up_waiting(tmp_path):
    (tmp_path / "web.yaml").write_text("kind: Service\nmetadata: [unclosed\n")
    src, st = source(tmp_path)
    for _ in range(10):
        src.scan()
    assert st.initial_sync_done


# ---- inotify ----
# The polls are set to an hour below: only inotify can deliver the changes these tests wait for.
HOUR = 3600.0


async def _until(cond: object, what: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _run_with_source(tmp_path: Path, body: object, store: object = None) -> None:
    async def main() -> None:
        st = store if store is not None else ClusterStore(NODE)
        src = FileSource(str(tmp_path), st, interval=HOUR, safety_interval=HOUR)  # type: ignore[arg-type]
        task = asyncio.create_task(src.run())
        try:
            await _until(lambda: st.initial_sync_done, "the first scan")  # type: ignore[attr-defined]
            assert src.watching, "inotify watch not set up"
            await body(src, st)  # type: ignore[operator]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not src.watching

    asyncio.run(main())


def test_inotify_follows_rename_into_place_write_and_delete(tmp_path):
    write(tmp_path / "other.yaml", svc_raw(name="other"))

    async def body(src: FileSource, st: ClusterStore) -> None:
        reads = src.reads
        # atomic replace, as the soak driver and editors do (the dot-file is ignored)
        tmp = tmp_path / ".web.yaml.tmp"
        tmp.write_text(yaml.safe_dump_all([svc_raw(), slice_raw()]))
        os.rename(tmp, tmp_path / "web.yaml")
        await _until(lambda: "default/web-abc" in st.slices, "the renamed file")
        assert src.reads == reads + 1, "only the changed file is re-read"
        # written in place (closed after writing)
        (tmp_path / "web.yaml").write_text(
            yaml.safe_dump_all([svc_raw(), slice_raw(endpoints=[ep("10.0.0.9")])])
        )
        await _until(
            lambda: st.slices["default/web-abc"].endpoints[0].addresses == ["10.0.0.9"], "the rewrite"
        )
        (tmp_path / "web.yaml").unlink()
        await _until(lambda: "default/web" not in st.services, "the removal")
        assert "default/other" in st.services
        assert src.scans == 1, "a poll ran: the test did not exercise inotify"

    _run_with_source(tmp_path, body)


def test_inotify_rename_between_files_keeps_objects(tmp_path):
    write(tmp_path / "a.yaml", svc_raw())

    async def body(src: FileSource, st: ClusterStore) -> None:
        st.take_dirty()
        os.rename(tmp_path / "a.yaml", tmp_path / "b.yaml")
        await _until(lambda: src._owner.get(("Service", "default/web")) == str(tmp_path / "b.yaml"), "move")
        assert "default/web" in st.services

    _run_with_source(tmp_path, body)


def test_inotify_hard_link_without_close_is_read(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    d = tmp_path / "manifests"
    d.mkdir()
    write(outside / "web.yaml", svc_raw())

    async def body(src: FileSource, st: ClusterStore) -> None:
        os.link(outside / "web.yaml", d / "web.yaml")  # IN_CREATE only: no write, no close
        await _until(lambda: "default/web" in st.services, "the linked file")

    _run_with_source(d, body)


def test_inotify_configmap_volume_symlink_swap(tmp_path):
    """A ConfigMap volume: web.yaml -> ..data/web.yaml, updated by renaming a new ..data symlink."""
    (tmp_path / "..v1").mkdir()
    write(tmp_path / "..v1" / "web.yaml", svc_raw())
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/web.yaml", tmp_path / "web.yaml")

    async def body(src: FileSource, st: ClusterStore) -> None:
        assert "default/web" in st.services
        (tmp_path / "..v2").mkdir()
        write(tmp_path / "..v2" / "web.yaml", svc_raw(), slice_raw())
        os.symlink("..v2", tmp_path / "..data_tmp")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        await _until(lambda: "default/web-abc" in st.slices, "the swapped ConfigMap data")

    _run_with_source(tmp_path, body)


def test_inotify_directory_removed_and_recreated(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    write(d / "web.yaml", svc_raw())

    async def main() -> None:
        st = ClusterStore(NODE)
        # a fast fallback poll, a slow safety poll: the watch loss must switch to the fast one
        src = FileSource(str(d), st, interval=0.02, safety_interval=HOUR)
        task = asyncio.create_task(src.run())
        try:
            await _until(lambda: src.watching and "default/web" in st.services, "the first scan")
            (d / "web.yaml").unlink()
            d.rmdir()
            await _until(lambda: not src.watching, "the watch to go")
            d.mkdir()
            await _until(lambda: src.watching, "the watch to come back")
            write(d / "api.yaml", svc_raw(name="api"))
            await _until(lambda: "default/api" in st.services, "a file in the new directory")
            assert "default/web" not in st.services
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_inotify_unavailable_falls_back_to_polling(tmp_path, monkeypatch):
    import kproxy.sources.files as files

    def broken() -> None:
        raise OSError(38, "inotify_init1: Function not implemented")

    monkeypatch.setattr(files.Inotify, "__init__", lambda self: broken())

    async def main() -> None:
        st = ClusterStore(NODE)
        src = FileSource(str(tmp_path), st, interval=0.02, safety_interval=HOUR)
        task = asyncio.create_task(src.run())
        try:
            await _until(lambda: st.initial_sync_done, "the first scan")
            assert not src.watching and not src.use_inotify
            write(tmp_path / "web.yaml", svc_raw())
            await _until(lambda: "default/web" in st.services, "the poll")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


# ---- Nodes ----
class NodeStore(ClusterStore):
    """A store with a node table, as kproxy.store's ClusterStore grows one (upsert_node/delete_node)."""

    def __init__(self) -> None:
        super().__init__(NODE)
        self.nodes: dict[str, object] = {}

    def upsert_node(self, raw: dict, origin: str | None = None) -> bool:
        self.nodes[raw["metadata"]["name"]] = raw
        return True

    def delete_node(self, name: str) -> bool:
        return self.nodes.pop(name, None) is not None


def node_raw(name: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def test_nodes_handed_to_the_store_node_table(tmp_path):
    f = tmp_path / "nodes.yaml"
    write(f, node_raw("node-a", "192.168.1.10"), node_raw("node-b", "192.168.1.11"), svc_raw())
    st = NodeStore()
    src = FileSource(str(tmp_path), st)
    src.scan()
    assert set(st.nodes) == {"node-a", "node-b"} and "default/web" in st.services
    write(f, node_raw("node-a", "192.168.1.10"), svc_raw())
    src.scan()
    assert set(st.nodes) == {"node-a"}
    f.unlink()
    src.scan()
    assert st.nodes == {} and st.services == {}


DUAL_STACK_YAML = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: fd00:10:96::2f0a
  clusterIPs:
  - fd00:10:96::2f0a
  - 10.96.47.10
  ipFamilies:
  - IPv6
  - IPv4
  ipFamilyPolicy: RequireDualStack
  externalIPs:
  - 2001:0:0:0:0:0:0:9
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv6
endpoints:
- addresses:
  - fd00:10:244:1::5
  conditions:
    ready: true
  nodeName: node-a
- addresses:
  - 1:2:3:4:5:6:7:8
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses:
  - 10.244.1.5
  nodeName: node-a
ports:
- name: http
  port: 8080
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
status:
  addresses:
  - type: InternalIP
    address: 192.168.1.10
  - type: InternalIP
    address: fd00:1::10
"""


def test_dual_stack_service_and_ipv6_slice_read_unfiltered(tmp_path):
    """Issue 15: nothing in the file source filters by family. Unquoted IPv6 addresses made of decimal
    groups stay addresses (kubectl reads YAML 1.2: no base-60 numbers)."""
    (tmp_path / "web.yaml").write_text(DUAL_STACK_YAML)
    src, st = source(tmp_path)
    src.scan()
    svc = st.services["shop/web"]
    assert svc.spec.cluster_ips == ["fd00:10:96::2f0a", "10.96.47.10"]
    assert svc.spec.ip_families == ["IPv6", "IPv4"]
    assert svc.spec.external_ips == ["2001::9"]  # canonical text
    v6 = st.slices["shop/web-v6"]
    assert v6.address_type == "IPv6"
    assert [e.addresses for e in v6.endpoints] == [["fd00:10:244:1::5"], ["1:2:3:4:5:6:7:8"]]
    assert v6.endpoints[1].node_name is None
    assert st.slices["shop/web-v4"].address_type == "IPv4"
