"""Pinned BPF maps as typed MapOps (see kproxy.bpf.mapapi), plus the set of all kproxy maps.

Writes go through the kernel's batch operations with contiguous buffers built once per chunk:
about 5x faster than one syscall per element (DESIGN.md). Keys and values are the ctypes structures
of kproxy.abi; sizes are checked against the kernel's map when a map is opened.
"""

from __future__ import annotations

import ctypes
import errno
import os
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.mapapi import MapFullError

K = TypeVar("K")
V = TypeVar("V", bound=ctypes.Structure)

BPFFS_MAGIC = 0xCAFE4A11
BATCH_CHUNK = 16384
_BATCH_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
_FULL = (errno.E2BIG, errno.ENOSPC)

# not in kproxy.bpf.libbpf's constants (yet)
BPF_MAP_TYPE_LPM_TRIE = 11

_TYPE_NAMES = {
    lb.BPF_MAP_TYPE_HASH: "hash",
    lb.BPF_MAP_TYPE_ARRAY: "array",
    lb.BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    lb.BPF_MAP_TYPE_LRU_HASH: "lru_hash",
    BPF_MAP_TYPE_LPM_TRIE: "lpm_trie",
}


class MapLayoutError(RuntimeError):
    """A pinned map does not have the type or key/value sizes this kproxy version expects."""


class MapsNotFoundError(FileNotFoundError):
    """The bpffs directory or a pinned map in it is missing."""


def _check_layout(m: lb.Map, where: str, map_type: int | None, key_type: Any, value_type: Any) -> None:
    want_k, want_v = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
    problems = []
    if map_type is not None and m.type != map_type:
        problems.append(
            f"type {_TYPE_NAMES.get(m.type, m.type)} (expected {_TYPE_NAMES.get(map_type, map_type)})"
        )
    if m.key_size != want_k:
        problems.append(f"key size {m.key_size} (expected {want_k}, {key_type.__name__})")
    if m.value_size != want_v:
        problems.append(f"value size {m.value_size} (expected {want_v}, {value_type.__name__})")
    if problems:
        raise MapLayoutError(
            f"map {m.name} at {where} has " + ", ".join(problems) + ": it was created by a different kproxy "
            "version; run `kproxy cleanup` (or remove the pin) and restart the agent"
        )


class PinnedMap(Generic[K, V]):
    """A HASH, LRU_HASH or ARRAY map as MapOps: typed get/put_many/delete_many/items/len."""

    def __init__(self, m: lb.Map, key_type: type[K], value_type: type[V], path: str | None = None) -> None:
        _check_layout(m, path or "fd", None, key_type, value_type)
        self.map = m
        self.name = m.name
        self.key_type = key_type
        self.value_type = value_type
        self.max_entries = m.max_entries
        self.path = path
        self._ks = ctypes.sizeof(key_type)  # type: ignore[arg-type]
        self._vs = ctypes.sizeof(value_type)
        self._batch = True

    @classmethod
    def open(
        cls, path: str, key_type: type[K], value_type: type[V], map_type: int | None = None
    ) -> PinnedMap[K, V]:
        m = lb.Map.open_pinned(path)
        try:
            _check_layout(m, path, map_type, key_type, value_type)
            return cls(m, key_type, value_type, path)
        except BaseException:
            m.close()
            raise

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> PinnedMap[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- MapOps ----
    def get(self, key: K) -> V | None:
        out = self.value_type()
        return out if self.map.lookup_into(key, out) else None

    def put(self, key: K, value: V) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Sequence[tuple[K, V]]) -> None:
        for start in range(0, len(items), BATCH_CHUNK):
            chunk = items[start : start + BATCH_CHUNK]
            keys = b"".join(bytes(k) for k, _ in chunk)  # type: ignore[call-overload]
            values = b"".join(bytes(v) for _, v in chunk)
            self._put_chunk(keys, values, len(chunk))

    def put_packed(self, keys: bytes, values: bytes, n: int) -> None:
        """put_many for n entries already packed back to back in the map's key and value layout."""
        ks, vs = self._ks, self._vs
        for start in range(0, n, BATCH_CHUNK):
            end = min(n, start + BATCH_CHUNK)
            self._put_chunk(keys[start * ks : end * ks], values[start * vs : end * vs], end - start)

    def _put_chunk(self, keys: bytes, values: bytes, n: int) -> None:
        if self._batch:
            try:
                self.map.update_batch(keys, values, n)
                return
            except lb.LibbpfError as exc:
                done = getattr(exc, "done", 0)
                if exc.errno in _FULL:
                    raise MapFullError(self.name, self.max_entries, n - done) from exc
                if not (exc.errno in _BATCH_UNSUPPORTED and done == 0):
                    raise
                self._batch = False  # kernel without batch ops for this map type
        ks, vs = self._ks, self._vs
        for i in range(n):
            try:
                self.map.update(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs])
            except lb.LibbpfError as exc:
                if exc.errno in _FULL:
                    raise MapFullError(self.name, self.max_entries, n - i) from exc
                raise

    def delete_many(self, keys: Sequence[K]) -> int:
        if self.map.type == lb.BPF_MAP_TYPE_ARRAY:
            raise TypeError(
                f"map {self.name} is an array: its entries cannot be deleted, write zeroes instead"
            )
        deleted = 0
        for start in range(0, len(keys), BATCH_CHUNK):
            chunk = keys[start : start + BATCH_CHUNK]
            raw = b"".join(bytes(k) for k in chunk)  # type: ignore[call-overload]
            deleted += self._delete_chunk(ctypes.create_string_buffer(raw), len(chunk))
        return deleted

    def _delete_chunk(self, buf: ctypes.Array[ctypes.c_char], n: int) -> int:
        ks = self._ks
        deleted = 0
        offset = 0
        while offset < n and self._batch:
            view = (ctypes.c_char * ((n - offset) * ks)).from_buffer(buf, offset * ks)
            try:
                done = self.map.delete_batch(view, n - offset)
            except lb.LibbpfError as exc:
                if not (exc.errno in _BATCH_UNSUPPORTED and getattr(exc, "done", 0) == 0):
                    raise
                self._batch = False
                break
            deleted += done
            offset += done
            if offset < n:
                # The batch stopped at an absent key (ENOENT): skip it and go on with the rest.
                offset += 1
        raw = buf.raw
        for i in range(offset, n):
            if self.map.delete(raw[i * ks : (i + 1) * ks]):
                deleted += 1
        return deleted

    def _raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        if self._batch:
            try:
                it = self.map.lookup_batch()
                first = next(it, None)
            except lb.LibbpfError as exc:
                if exc.errno not in _BATCH_UNSUPPORTED:
                    raise
                self._batch = False
            else:
                if first is not None:
                    yield first
                    yield from it
                return
        for key in self.map.iter_keys():
            value = self.map.lookup(key)
            if value is not None:  # deleted meanwhile
                yield key, value

    def items(self) -> Iterator[tuple[K, V]]:
        kt, vt = self.key_type, self.value_type
        for k, v in self._raw_items():
            yield kt.from_buffer_copy(k), vt.from_buffer_copy(v)  # type: ignore[attr-defined]

    def keys(self) -> Iterator[K]:
        for k, _ in self.items():
            yield k

    def __len__(self) -> int:
        if self.map.type == lb.BPF_MAP_TYPE_ARRAY:
            return self.max_entries
        return sum(1 for _ in self._raw_items())

    def clear(self) -> int:
        """Delete every entry (hash maps); returns how many were deleted."""
        return self.delete_many([k for k, _ in self.items()])


class PerCpuArray(Generic[V]):
    """A PERCPU_ARRAY map: one value per possible CPU, each padded to 8 bytes, summed on request."""

    def __init__(self, m: lb.Map, value_type: type[V], path: str | None = None) -> None:
        _check_layout(m, path or "fd", lb.BPF_MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, value_type)
        self.map = m
        self.name = m.name
        self.value_type = value_type
        self.max_entries = m.max_entries
        self.ncpus = m.ncpus
        self.path = path

    @classmethod
    def open(cls, path: str, value_type: type[V]) -> PerCpuArray[V]:
        m = lb.Map.open_pinned(path)
        try:
            return cls(m, value_type, path)
        except BaseException:
            m.close()
            raise

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> PerCpuArray[V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _split(self, raw: bytes) -> list[V]:
        stride = self.map.value_stride
        return [self.value_type.from_buffer_copy(raw, i * stride) for i in range(self.ncpus)]

    def per_cpu(self, index: int) -> list[V]:
        raw = self.map.lookup(ctypes.c_uint32(index))
        if raw is None:
            raise IndexError(f"map {self.name} has no index {index} (max_entries {self.max_entries})")
        return self._split(raw)

    def all_per_cpu(self) -> dict[int, list[V]]:
        result: dict[int, list[V]] = {}
        try:
            for k, v in self.map.lookup_batch(chunk=self.max_entries):
                result[int.from_bytes(k, "little")] = self._split(v)
        except lb.LibbpfError as exc:
            if exc.errno not in _BATCH_UNSUPPORTED:
                raise
            result = {i: self.per_cpu(i) for i in range(self.max_entries)}
        return result

    def totals(self) -> dict[int, tuple[int, ...]]:
        """index -> field-wise sum over CPUs; for kp_counter that is (packets, bytes)."""
        fields = [f[0] for f in self.value_type._fields_]  # type: ignore[attr-defined]
        return {
            index: tuple(sum(getattr(v, f) for v in values) for f in fields)
            for index, values in sorted(self.all_per_cpu().items())
        }

    def reset(self) -> None:
        zero = bytes(self.map.user_value_size)
        for i in range(self.max_entries):
            self.map.update(ctypes.c_uint32(i), zero)


class MaglevMap:
    """kp_maglev_v1 (a hash of maps) as MaglevOps: each table is an inner array of its own, made, filled
    in one batch and swapped in by one update of the outer map, so the datapath reads one table or the
    other, whole (never a half-written one). The inner maps live as long as the outer map holds them."""

    def __init__(self, m: lb.Map, path: str | None = None) -> None:
        if m.type != lb.BPF_MAP_TYPE_HASH_OF_MAPS or (m.key_size, m.value_size) != (4, 4):
            raise MapLayoutError(
                f"map {m.name} at {path or 'fd'} is not kproxy's Maglev hash of maps (type {m.type}, "
                f"key {m.key_size} bytes, value {m.value_size}): run `kproxy cleanup` and restart the agent"
            )
        self.map = m
        self.name = m.name
        self.max_entries = m.max_entries
        self.path = path

    @classmethod
    def open(cls, path: str) -> MaglevMap:
        m = lb.Map.open_pinned(path)
        try:
            return cls(m, path)
        except BaseException:
            m.close()
            raise

    def close(self) -> None:
        self.map.close()

    def put_tables(self, tables: Sequence[tuple[int, bytes]]) -> list[tuple[int, OSError]]:
        """As MaglevOps. The inner maps of up to _TABLE_BATCH tables are made and filled, then swapped in
        with ONE batch update of the outer map: the kernel waits for an RCU grace period after each
        update of a map of maps from user space (~10 ms here), once per call, so one table a call took
        88 s for 10,000 tables and a batch takes the wait once."""
        failed: list[tuple[int, OSError]] = []
        for start in range(0, len(tables), _TABLE_BATCH):
            inners: list[lb.Map] = []
            sids: list[int] = []
            try:
                for sid, rows in tables[start : start + _TABLE_BATCH]:
                    try:
                        inners.append(self._inner_of(sid, rows))
                    except OSError as err:
                        failed.append((sid, err))
                        continue
                    sids.append(sid)
                self._swap(sids, inners, failed)
            finally:
                for m in inners:
                    m.close()
        return failed

    @staticmethod
    def _inner_of(sid: int, rows: bytes) -> lb.Map:
        row = abi.MAGLEV_ROW
        n = len(rows) // row
        if not n or len(rows) % row:
            raise ValueError(f"Maglev table of service port {sid}: {len(rows)} bytes is no whole row")
        inner = lb.map_create(lb.BPF_MAP_TYPE_ARRAY, "kp_maglev_t", 4, row, n, lb.BPF_F_INNER_MAP)
        try:
            inner.update_batch(_ROW_KEYS(n), rows, n)
        except BaseException:
            inner.close()
            raise
        return inner

    def _swap(self, sids: list[int], inners: list[lb.Map], failed: list[tuple[int, OSError]]) -> None:
        """Point the outer map's entries of SIDS at INNERS, in batches; failures appended to FAILED."""
        i = 0
        while i < len(sids):
            rest = len(sids) - i
            keys = b"".join(map(_U32, sids[i:]))
            fds = b"".join(_U32(m.fd) for m in inners[i:])
            try:
                i += self.map.update_batch(keys, fds, rest)
            except lb.LibbpfError as err:
                done = getattr(err, "done", 0)
                bad = sids[i + done]
                i += done + 1
                if err.errno not in _FULL:
                    failed.append((bad, err))
                    continue
                # full: no new port fits; the ports that have a table can still have it replaced
                failed.append((bad, MapFullError(self.name, self.max_entries, 1)))
                keep_s, keep_m = [], []
                for s, m in zip(sids[i:], inners[i:], strict=True):
                    if self.map.lookup(_U32(s)) is None:
                        failed.append((s, MapFullError(self.name, self.max_entries, 1)))
                    else:
                        keep_s.append(s)
                        keep_m.append(m)
                sids, inners, i = keep_s, keep_m, 0

    def delete_tables(self, svc_ids: Sequence[int]) -> int:
        """As MaglevOps; in batches (each update of a map of maps waits for a grace period)."""
        keys = list(svc_ids)
        gone = 0
        while keys:
            n = self.map.delete_batch(b"".join(map(_U32, keys)), len(keys))
            gone += n
            keys = keys[n + 1 :]  # the batch stops at an absent key: skip it
        return gone

    def _inner(self, svc_id: int) -> lb.Map | None:
        raw = self.map.lookup(_U32(svc_id))
        if raw is None:
            return None
        try:
            return lb.map_by_id(int.from_bytes(raw, "little"))
        except lb.LibbpfError as err:
            if err.errno == errno.ENOENT:  # replaced meanwhile
                return None
            raise

    def headers(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for key in list(self.map.iter_keys()):
            sid = int.from_bytes(key, "little")
            inner = self._inner(sid)
            if inner is None:
                continue
            with inner:
                hdr = inner.lookup(_U32(0))
            if hdr is not None:
                out[sid] = hdr
        return out

    def table(self, svc_id: int) -> bytes | None:
        inner = self._inner(svc_id)
        if inner is None:
            return None
        with inner:
            rows = [inner.lookup(_U32(i)) for i in range(inner.max_entries)]
        return b"".join(r or bytes(abi.MAGLEV_ROW) for r in rows)

    def __len__(self) -> int:
        return sum(1 for _ in self.map.iter_keys())


_TABLE_BATCH = 1024  # Maglev tables made and swapped in per batch (their inner maps' fds open meanwhile)


def _U32(v: int) -> bytes:  # noqa: N802
    return v.to_bytes(4, "little")


def _ROW_KEYS(n: int) -> bytes:  # noqa: N802
    return array("I", range(n)).tobytes()


def _statfs_type(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64; f_type comes first
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: str) -> bool:
    return _statfs_type(path) == BPFFS_MAGIC


# name -> (attribute, map type, key type, value type)
MAP_LAYOUT: dict[str, tuple[str, int, Any, Any]] = {
    abi.MAP_SVC4: ("svc4", lb.BPF_MAP_TYPE_HASH, abi.Svc4Key, abi.Svc4Val),
    abi.MAP_BE4: ("be4", lb.BPF_MAP_TYPE_HASH, ctypes.c_uint32, abi.Be4Val),
    abi.MAP_CT4: ("ct4", lb.BPF_MAP_TYPE_LRU_HASH, abi.Ct4Key, abi.Ct4Val),
    abi.MAP_AFF4: ("aff4", lb.BPF_MAP_TYPE_LRU_HASH, abi.Aff4Key, abi.Aff4Val),
    abi.MAP_CFG: ("cfg", lb.BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, abi.Config),
    abi.MAP_STATS: ("stats", lb.BPF_MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, abi.Counter),
    abi.MAP_SNAT4: ("snat4", lb.BPF_MAP_TYPE_LRU_HASH, abi.Snat4Key, abi.Snat4Val),
    abi.MAP_LBSRC4: ("lbsrc4", BPF_MAP_TYPE_LPM_TRIE, abi.LbSrc4Key, abi.LbSrc4Val),
    abi.MAP_SVCNET4: ("svcnet4", BPF_MAP_TYPE_LPM_TRIE, abi.Svcnet4Key, abi.Svcnet4Val),
    abi.MAP_SVCNET_SPAN: ("svcnet_span", lb.BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, abi.SvcnetSpan),
    abi.MAP_FRAG4: ("frag4", lb.BPF_MAP_TYPE_LRU_HASH, abi.Frag4Key, abi.Frag4Val),
    abi.MAP_SVC6: ("svc6", lb.BPF_MAP_TYPE_HASH, abi.Svc6Key, abi.Svc6Val),
    abi.MAP_BE6: ("be6", lb.BPF_MAP_TYPE_HASH, ctypes.c_uint32, abi.Be6Val),
    abi.MAP_CT6: ("ct6", lb.BPF_MAP_TYPE_LRU_HASH, abi.Ct6Key, abi.Ct6Val),
    abi.MAP_AFF6: ("aff6", lb.BPF_MAP_TYPE_LRU_HASH, abi.Aff6Key, abi.Aff6Val),
    abi.MAP_CFG6: ("cfg6", lb.BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, abi.Config6),
    abi.MAP_LBSRC6: ("lbsrc6", BPF_MAP_TYPE_LPM_TRIE, abi.LbSrc6Key, abi.LbSrc6Val),
    abi.MAP_FRAG6: ("frag6", lb.BPF_MAP_TYPE_LRU_HASH, abi.Frag6Key, abi.Frag6Val),
    abi.MAP_SNAT6: ("snat6", lb.BPF_MAP_TYPE_LRU_HASH, abi.Snat6Key, abi.Snat6Val),
    abi.MAP_SVCNET6: ("svcnet6", BPF_MAP_TYPE_LPM_TRIE, abi.Svcnet6Key, abi.Svcnet4Val),
    abi.MAP_SVCNET6_SPAN: ("svcnet6_span", lb.BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, abi.Svcnet6Span),
    abi.MAP_STATS6: ("stats6", lb.BPF_MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, abi.Counter),
    # values are inner maps (MaglevMap), read as their u32 ids
    abi.MAP_MAGLEV: ("maglev", lb.BPF_MAP_TYPE_HASH_OF_MAPS, ctypes.c_uint32, ctypes.c_uint32),
    abi.MAP_XDEVS: ("xdevs", lb.BPF_MAP_TYPE_HASH, ctypes.c_uint32, abi.XdevVal),
}

# Maps an older agent's bpffs may lack: the IPv6 ones came with issue 15, kp_maglev_v1 and kp_xdevs_v1 with
# issue 16.
# KproxyMaps.open leaves their attributes None there, so this version's CLI still reads an older agent's
# IPv4 maps; every other map is required.
OPTIONAL_MAPS = frozenset({
    abi.MAP_SVC6, abi.MAP_BE6, abi.MAP_CT6, abi.MAP_AFF6, abi.MAP_CFG6, abi.MAP_LBSRC6, abi.MAP_FRAG6,
    abi.MAP_SNAT6, abi.MAP_SVCNET6, abi.MAP_SVCNET6_SPAN, abi.MAP_STATS6, abi.MAP_MAGLEV, abi.MAP_XDEVS,
})  # fmt: skip


class KproxyMaps:
    """All pinned kproxy maps of one bpffs directory, typed. Implements the MapSet used by sync."""

    svc4: PinnedMap[abi.Svc4Key, abi.Svc4Val]
    be4: PinnedMap[ctypes.c_uint32, abi.Be4Val]
    ct4: PinnedMap[abi.Ct4Key, abi.Ct4Val]
    aff4: PinnedMap[abi.Aff4Key, abi.Aff4Val]
    cfg: PinnedMap[ctypes.c_uint32, abi.Config]
    stats: PerCpuArray[abi.Counter]
    snat4: PinnedMap[abi.Snat4Key, abi.Snat4Val]
    lbsrc4: PinnedMap[abi.LbSrc4Key, abi.LbSrc4Val]
    svcnet4: PinnedMap[abi.Svcnet4Key, abi.Svcnet4Val]
    svcnet_span: PinnedMap[ctypes.c_uint32, abi.SvcnetSpan]
    frag4: PinnedMap[abi.Frag4Key, abi.Frag4Val]
    # The IPv6 maps (OPTIONAL_MAPS) are None when opened from a bpffs an agent older than IPv6 pinned:
    # readers (the CLI, kproxy.observe) check. Typed as always there for the agent, which loads the
    # object, and so pins every map, before it opens them.
    svc6: PinnedMap[abi.Svc6Key, abi.Svc4Val]
    be6: PinnedMap[ctypes.c_uint32, abi.Be6Val]
    ct6: PinnedMap[abi.Ct6Key, abi.Ct6Val]
    aff6: PinnedMap[abi.Aff6Key, abi.Aff4Val]
    cfg6: PinnedMap[ctypes.c_uint32, abi.Config6]
    lbsrc6: PinnedMap[abi.LbSrc6Key, abi.LbSrc4Val]
    frag6: PinnedMap[abi.Frag6Key, abi.Frag6Val]
    snat6: PinnedMap[abi.Snat6Key, abi.Snat6Val]
    svcnet6: PinnedMap[abi.Svcnet6Key, abi.Svcnet4Val]
    svcnet6_span: PinnedMap[ctypes.c_uint32, abi.Svcnet6Span]
    stats6: PerCpuArray[abi.Counter]
    maglev: MaglevMap
    xdevs: PinnedMap[ctypes.c_uint32, abi.XdevVal]

    def __init__(self, bpffs_dir: str, maps: dict[str, Any]) -> None:
        self.bpffs_dir = bpffs_dir
        self.by_name = maps
        for name in OPTIONAL_MAPS:
            setattr(self, MAP_LAYOUT[name][0], None)
        for name, m in maps.items():
            setattr(self, MAP_LAYOUT[name][0], m)

    @property
    def absent(self) -> list[str]:
        """The optional maps this bpffs has no pin of (an older agent's): their attributes are None."""
        return [name for name in abi.ALL_MAPS if name not in self.by_name]

    @classmethod
    def open(cls, bpffs_dir: str | os.PathLike[str]) -> KproxyMaps:
        d = os.fspath(bpffs_dir)
        hint = f"is the agent running with --bpffs {d}?"
        if not os.path.isdir(d):
            raise MapsNotFoundError(
                errno.ENOENT, f"no kproxy maps in {d}: the directory does not exist; {hint}"
            )
        if not is_bpffs(d):
            raise MapsNotFoundError(
                errno.ENOENT,
                f"no kproxy maps in {d}: it is not a bpf filesystem (mount -t bpf bpf {d}); {hint}",
            )
        absent = {n for n in abi.ALL_MAPS if not os.path.exists(os.path.join(d, n))}
        if len(absent) == len(abi.ALL_MAPS):
            raise MapsNotFoundError(errno.ENOENT, f"no kproxy maps in {d}: {hint}")
        missing = [n for n in abi.ALL_MAPS if n in absent and n not in OPTIONAL_MAPS]
        if missing:
            raise MapsNotFoundError(
                errno.ENOENT,
                f"kproxy maps in {d} are incomplete, missing {', '.join(missing)}: restart the agent "
                f"(it re-creates them) or run `kproxy cleanup --bpffs {d}`",
            )
        opened: dict[str, Any] = {}
        try:
            for name, (_, map_type, kt, vt) in MAP_LAYOUT.items():
                if name in absent:
                    continue  # an optional map (OPTIONAL_MAPS) an older agent did not pin
                path = os.path.join(d, name)
                if map_type == lb.BPF_MAP_TYPE_PERCPU_ARRAY:
                    opened[name] = PerCpuArray.open(path, vt)
                elif map_type == lb.BPF_MAP_TYPE_HASH_OF_MAPS:
                    opened[name] = MaglevMap.open(path)
                else:
                    opened[name] = PinnedMap.open(path, kt, vt, map_type)
        except BaseException:
            for m in opened.values():
                m.close()
            raise
        return cls(d, opened)

    def close(self) -> None:
        for m in self.by_name.values():
            m.close()

    def __enter__(self) -> KproxyMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat_totals_by_family(self) -> dict[str, dict[int, tuple[int, ...]]]:
        """The datapath counters per family, counter index -> (packets, bytes) summed over CPUs: "IPv4"
        (kp_stats_v1) and "IPv6" (kp_stats6_v1); from an older agent's bpffs without kp_stats6_v1, whose
        kp_stats_v1 counts both families, "all" alone."""
        if self.stats6 is None:
            return {"all": self.stats.totals()}
        return {"IPv4": self.stats.totals(), "IPv6": self.stats6.totals()}

    def stat_totals(self) -> dict[int, tuple[int, ...]]:
        """The datapath counters of both families added up: counter index -> (packets, bytes)."""
        total: dict[int, tuple[int, ...]] = {}
        for fam in self.stat_totals_by_family().values():
            for index, values in fam.items():
                old = total.get(index)
                total[index] = (
                    values if old is None else tuple(a + b for a, b in zip(old, values, strict=True))
                )
        return total

    def read_config(self) -> abi.Config:
        value = self.cfg.get(ctypes.c_uint32(0))
        return value if value is not None else abi.Config()

    def write_config(self, config: abi.Config) -> None:
        self.cfg.put_many([(ctypes.c_uint32(0), config)])
