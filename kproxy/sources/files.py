"""Standalone source: Service and EndpointSlice manifests in a directory, followed as they change.

`kproxy agent --source file:DIR` reads *.yaml, *.yml and *.json files (multi-document YAML, and
`kind: List` items), and polls the directory every ~200 ms: a changed file is re-read, a removed
file's objects are deleted. A file that cannot be parsed at all (for instance half-written) is
logged and its previously read objects are kept; a malformed object is logged with its file and name
by the store, counted and skipped, and everything else still applies. Other kinds are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import yaml

from kproxy.store import ClusterStore, gc_paused, parse_key

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
KINDS = ("Service", "EndpointSlice")
POLL_INTERVAL = 0.2
INITIAL_PATIENCE_SCANS = 10

ObjKey = tuple[str, str]  # (kind, "ns/name")
Stamp = tuple[int, int, int]  # (mtime_ns, size, inode)

try:  # libyaml's loader is ~10x faster; fall back to pure Python where it is missing
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


class FileError(ValueError):
    pass


def _flatten(doc: Any) -> Iterator[Any]:
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            yield from _flatten(item)
    elif doc is not None:
        yield doc


def load_file(path: str) -> list[Any]:
    """Every object in a manifest file. Raises FileError when the file cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise FileError(f"{path}: cannot read: {err}") from None
    try:
        if path.endswith(".json"):
            docs = [json.loads(text)] if text.strip() else []
        else:
            docs = list(yaml.load_all(text, Loader=_Loader))
    except (yaml.YAMLError, ValueError) as err:
        raise FileError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from None
    return [obj for doc in docs for obj in _flatten(doc)]


class FileSource:
    """Feeds `store` from the manifests in `directory`. Call scan() directly, or `await run()`."""

    def __init__(self, directory: str, store: ClusterStore, interval: float = POLL_INTERVAL) -> None:
        self.directory = directory
        self.store = store
        self.interval = interval
        self._stamps: dict[str, Stamp] = {}
        self._objects: dict[str, set[ObjKey]] = {}  # file -> objects it defined
        self._owner: dict[ObjKey, str] = {}  # object -> the file it was last read from
        self.file_errors = 0
        self.scans = 0

    def _list(self) -> dict[str, Stamp] | None:
        out: dict[str, Stamp] = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError as err:
            if self.scans % 50 == 0:
                log.warning("manifest directory %s cannot be read: %s", self.directory, err)
            return None
        for e in entries:
            if not e.name.endswith(SUFFIXES) or e.name.startswith("."):
                continue
            try:
                st = e.stat()
            except OSError:
                continue
            if not os.path.isfile(e.path):
                continue
            out[e.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def scan(self) -> bool:
        """Apply what changed in the directory since the last scan; True if anything did."""
        with gc_paused():
            return self._scan()

    def _scan(self) -> bool:
        listed = self._list()
        self.scans += 1
        if listed is None:
            return False  # keep everything as it is until the directory is back
        now = listed
        errors_before = self.file_errors
        changed = False
        for path in sorted(self._stamps.keys() - now.keys()):
            self._remove_file(path)
            changed = True
        for path in sorted(now):
            if self._stamps.get(path) != now[path]:
                if self._read_file(path):
                    self._stamps[path] = now[path]
                changed = True
        for path in list(self._stamps):
            if path not in now:
                del self._stamps[path]
        # The view is complete once every file parsed; a file caught half-written at start-up gets a few
        # more polls, since completing the view allows sync to delete what the view lacks.
        if not self.store.initial_sync_done and (
            self.file_errors == errors_before or self.scans >= INITIAL_PATIENCE_SCANS
        ):
            self.store.mark_initial_sync_done()
        return changed

    def _read_file(self, path: str) -> bool:
        try:
            objects = load_file(path)
        except FileError as err:
            self.file_errors += 1
            self.store.skipped[("File", "unparsable")] += 1
            log.warning("%s; keeping what it defined before", err)
            # Not retried until it changes again, except before the initial sync is complete.
            return self.store.initial_sync_done
        seen: set[ObjKey] = set()
        for i, obj in enumerate(objects):
            kind = obj.get("kind") if isinstance(obj, dict) else None
            if kind not in KINDS:
                if not isinstance(obj, dict):
                    self.store.skipped[("File", "not_an_object")] += 1
                    log.warning("%s: document %d is not a Kubernetes object; skipped", path, i + 1)
                continue
            key = (kind, parse_key(obj))
            if kind == "Service":
                self.store.upsert_service(obj, origin=path)
            else:
                self.store.upsert_slice(obj, origin=path)
            # Invalid objects are recorded too: the store keeps their previous valid version, which
            # must go when the object leaves this file.
            seen.add(key)
            other = self._owner.get(key)
            if other is not None and other != path:
                log.warning(
                    "%s %s is defined in both %s and %s; the last one read wins", kind, key[1], other, path
                )
                self._objects.get(other, set()).discard(key)
            self._owner[key] = path
        for key in self._objects.get(path, set()) - seen:
            self._delete(key, path)
        self._objects[path] = seen
        return True

    def _remove_file(self, path: str) -> None:
        for key in self._objects.pop(path, set()):
            self._delete(key, path)

    def _delete(self, key: ObjKey, path: str) -> None:
        if self._owner.get(key) != path:
            return
        del self._owner[key]
        kind, nsname = key
        ns, _, name = nsname.partition("/")
        if kind == "Service":
            self.store.delete_service(ns, name)
        else:
            self.store.delete_slice(ns, name)

    async def run(self) -> None:
        """Scan now and then every `interval` seconds until cancelled."""
        while True:
            try:
                self.scan()
            except Exception:  # a bug here must not stop following the directory
                log.exception("scanning %s failed", self.directory)
            await asyncio.sleep(self.interval)
