"""Standalone source: Service and EndpointSlice manifests in a directory, followed as they change.

`kproxy agent --source file:DIR` reads *.yaml, *.yml and *.json files (multi-document YAML, and
`kind: List` items). It follows the directory with inotify (a file closed after writing, renamed into
place or removed is handled within a millisecond, and only that file is re-read), and rescans it every
2 s as a safety net (and every 200 ms where inotify is unavailable or the directory does not exist
yet): a changed file is re-read, a removed file's objects are deleted. A file that cannot be parsed at
all (for instance half-written) is logged and its previously read objects are kept; a malformed object
is logged with its file and name by the store, counted and skipped, and everything else still applies.
`kind: Node` objects go to the store's node table (every node's address, for DSR), `kind: ServiceCIDR`
objects (networking.k8s.io/v1) to the service address space. Other kinds are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Iterator
from typing import Any

import yaml

from kproxy.heap import gc_paused
from kproxy.store import SourceSink, parse_key

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
KINDS = ("Service", "EndpointSlice", "Node", "ServiceCIDR")
POLL_INTERVAL = 0.2  # without inotify
SAFETY_POLL_INTERVAL = 2.0  # with inotify: a rescan that catches anything inotify could not report
CREATE_GRACE = 0.1  # a file that appeared without being written and closed (a link) is read after this
INITIAL_PATIENCE_SCANS = 10

ObjKey = tuple[str, str]  # (kind, "ns/name")
Stamp = tuple[int, int, int]  # (mtime_ns, size, inode)

try:  # libyaml's loader is ~10x faster; fall back to pure Python where it is missing
    _BaseLoader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _BaseLoader = yaml.SafeLoader


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """The safe loader, reading plain scalars as kubectl does (YAML 1.2, sigs.k8s.io/yaml): YAML 1.1's
    base-60 numbers are strings, so an unquoted IPv6 address made of decimal groups
    ("2001:0:0:0:0:0:0:1", "1:2:3:4:5:6:7:8") stays an address instead of becoming an integer."""


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_YAML12_NUMBERS = {  # PyYAML's resolvers without the base-60 alternatives
    _INT: re.compile(
        r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0[0-7_]+
        |[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    _FLOAT: re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, _YAML12_NUMBERS.get(tag, rx)) for tag, rx in resolvers]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


class FileError(ValueError):
    pass


# ---- inotify (linux/inotify.h), through libc: no extra dependency ----
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = (
    IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
    | IN_ONLYDIR
)  # fmt: skip
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name


class Inotify:
    """A non-blocking inotify instance. Raises OSError when the kernel or libc lacks it."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd: int = fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_add_watch {path}: {os.strerror(e)}")
        return int(wd)

    def read(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); [] when none is queued."""
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
                off += _EVENT.size
                name = os.fsdecode(buf[off : off + n].split(b"\0", 1)[0])
                off += n
                out.append((wd, mask, name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
    """Feeds `store` from the manifests in `directory`. Call scan() directly, or `await run()`.

    run() follows the directory with inotify and rescans it every `safety_interval` seconds; without
    inotify (or while the directory is missing) it rescans every `interval` seconds.
    """

    def __init__(
        self,
        directory: str,
        store: SourceSink,
        interval: float = POLL_INTERVAL,
        safety_interval: float = SAFETY_POLL_INTERVAL,
        use_inotify: bool = True,
    ) -> None:
        self.directory = directory
        self.store = store
        self.interval = interval
        self.safety_interval = safety_interval
        self.use_inotify = use_inotify
        self._stamps: dict[str, Stamp] = {}
        self._objects: dict[str, set[ObjKey]] = {}  # file -> objects it defined
        self._owner: dict[ObjKey, str] = {}  # object -> the file it was last read from
        self.file_errors = 0
        self.scans = 0
        self.reads = 0  # files (re-)read
        self.events = 0  # inotify events handled
        self._inotify: Inotify | None = None
        self._wd: int | None = None  # the directory's watch, None while not watching
        self._rescan: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def watching(self) -> bool:
        return self._wd is not None

    def _list(self) -> dict[str, Stamp] | None:
        out: dict[str, Stamp] = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError as err:
            if self.scans % 50 == 0:
                log.warning("manifest directory %s cannot be read: %s", self.directory, err)
            return None
        for e in entries:
            if not _manifest_name(e.name):
                continue
            try:
                st = e.stat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
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

    def refresh(self, paths: list[str]) -> bool:
        """Re-read just these files (an inotify event named them); True if any was (re)read or removed."""
        with gc_paused():
            stats: list[tuple[str, os.stat_result | None]] = []
            for path in dict.fromkeys(paths):
                try:
                    st: os.stat_result | None = os.stat(path)
                except OSError:
                    st = None
                stats.append((path, st if st is not None and stat.S_ISREG(st.st_mode) else None))
            changed = False
            # Removals first: a rename a.yaml -> b.yaml then moves objects without a transient delete.
            for path, st in sorted(stats, key=lambda x: x[1] is not None):
                if st is None:
                    if self._stamps.pop(path, None) is not None or path in self._objects:
                        self._remove_file(path)
                        changed = True
                    continue
                # Re-read even when the stamp looks unchanged: two writes within one timestamp tick
                # with the same size would otherwise be missed. The store ignores equal objects.
                if self._read_file(path):
                    self._stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
                changed = True
            return changed

    def _read_file(self, path: str) -> bool:
        self.reads += 1
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
            if kind == "Node":
                key = self._upsert_node(obj, path)
                if key is None:
                    continue
            elif kind == "ServiceCIDR":
                meta = obj.get("metadata")
                name = meta.get("name") if isinstance(meta, dict) else None
                self.store.upsert_service_cidr(obj, origin=path)
                key = ("ServiceCIDR", name if isinstance(name, str) else "")
            else:
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

    def _upsert_node(self, obj: dict[str, Any], path: str) -> ObjKey | None:
        """Hand a Node to the store's node table; its key, or None when it was not taken."""
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        self.store.upsert_node(obj, origin=path)  # the store validates, logs and counts a bad one
        # Keyed even when invalid (like Services): the store's previous version must go with the file.
        return ("Node", name if isinstance(name, str) else "")

    def _remove_file(self, path: str) -> None:
        for key in self._objects.pop(path, set()):
            self._delete(key, path)

    def _delete(self, key: ObjKey, path: str) -> None:
        if self._owner.get(key) != path:
            return
        del self._owner[key]
        kind, nsname = key
        if kind == "Node":
            self.store.delete_node(nsname)
            return
        if kind == "ServiceCIDR":
            self.store.delete_service_cidrs(f"ServiceCIDR/{nsname}")
            return
        ns, _, name = nsname.partition("/")
        if kind == "Service":
            self.store.delete_service(ns, name)
        else:
            self.store.delete_slice(ns, name)

    # ---- following the directory ----
    def _arm(self) -> None:
        """Watch the directory (again) if possible; falls back to polling when it cannot."""
        if not self.use_inotify or self._wd is not None or self._loop is None:
            return
        if self._inotify is None:
            try:
                self._inotify = Inotify()
            except (OSError, AttributeError) as err:
                log.warning("inotify is unavailable (%s): polling %s every %.1f s", err, self.directory,
                            self.interval)  # fmt: skip
                self.use_inotify = False
                return
            self._loop.add_reader(self._inotify.fd, self._on_readable)
        try:
            self._wd = self._inotify.add_watch(self.directory, WATCH_MASK)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning(
                    "cannot watch %s (%s): polling it every %.1f s", self.directory, err, self.interval
                )
                self.use_inotify = False
            return  # a missing directory: the fast poll notices it appearing and arms again
        log.debug("watching %s with inotify", self.directory)

    def _disarm(self) -> None:
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        self._wd = None

    def _on_readable(self) -> None:
        assert self._inotify is not None
        try:
            events = self._inotify.read()
        except OSError as err:
            log.warning("reading inotify events for %s failed (%s): polling instead", self.directory, err)
            self._disarm()
            self.use_inotify = False
            self._want_rescan()
            return
        paths: list[str] = []
        rescan = False
        for wd, mask, name in events:
            self.events += 1
            if mask & IN_Q_OVERFLOW:
                rescan = True  # events were lost: compare every file
                continue
            if wd != self._wd:
                continue  # a watch replaced since
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                self._wd = None  # the directory went away: poll until it is back, then watch again
                rescan = True
                continue
            if not _manifest_name(name):
                # A ConfigMap volume swaps its `..data` symlink: the files' targets changed at once.
                rescan = rescan or name.startswith("..")
                continue
            path = os.path.join(self.directory, name)
            if mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE):
                paths.append(path)
            elif mask & IN_CREATE and self._loop is not None:
                # A file being written is read when it is closed; a link made to a finished file never
                # is, so look at it after a moment unless that close came meanwhile.
                self._loop.call_later(CREATE_GRACE, self._created, path)
        try:
            if paths:
                self.refresh(paths)
            if rescan:
                self.scan()
        except Exception:  # a bug here must not stop following the directory
            log.exception("re-reading %s failed", ", ".join(paths) or self.directory)
        if self._wd is None:
            self._want_rescan()

    def _created(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if self._stamps.get(path) != (st.st_mtime_ns, st.st_size, st.st_ino):
            try:
                self.refresh([path])
            except Exception:
                log.exception("reading %s failed", path)

    def _want_rescan(self) -> None:
        if self._rescan is not None:
            self._rescan.set()

    async def run(self) -> None:
        """Follow the directory until cancelled: inotify plus a slow rescan, or a fast poll without it."""
        self._loop = asyncio.get_running_loop()
        self._rescan = asyncio.Event()
        try:
            while True:
                self._arm()  # before the scan, so that nothing changed after it goes unnoticed
                started = time.monotonic()
                try:
                    self.scan()
                except Exception:  # a bug here must not stop following the directory
                    log.exception("scanning %s failed", self.directory)
                wait = self.safety_interval if self.watching else self.interval
                self._rescan.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rescan.wait(), max(0.0, wait - (time.monotonic() - started)))
        finally:
            self._disarm()
            self._loop = None

    def close(self) -> None:
        self._disarm()


def _manifest_name(name: str) -> bool:
    return name.endswith(SUFFIXES) and not name.startswith(".")
