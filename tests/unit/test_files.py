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
