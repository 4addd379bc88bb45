"""The interface every map store offers to sync and the CLI, and its in-memory twin.

The real implementation is kproxy.bpf.maps.PinnedMap (pinned BPF maps through libbpf); the twin,
MemoryMap, holds the same bytes in a dict so sync logic can be unit-tested without root. Keys and
values are ctypes structures from kproxy.abi, or bytes packed in exactly their layout (sync packs
with kproxy.abi's struct packers for speed); implementations must only rely on bytes(key) and
bytes(value).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from kproxy import abi

K = TypeVar("K", bound=ctypes.Structure | ctypes._SimpleCData)  # type: ignore[name-defined]
V = TypeVar("V", bound=ctypes.Structure)


class MapFullError(OSError):
    """A map has no room left for an entry (E2BIG/ENOSPC from the kernel)."""

    def __init__(self, map_name: str, capacity: int, needed: int) -> None:
        super().__init__(
            f"map {map_name} is full: capacity {capacity} entries, {needed} more needed; "
            f"raise its size (agent --map-size {map_name}=N) or remove objects"
        )
        self.map_name = map_name
        self.capacity = capacity
        self.needed = needed


class MapOps(Protocol[K, V]):
    name: str
    key_type: type[K]
    value_type: type[V]
    max_entries: int

    def get(self, key: K) -> V | None: ...

    def put_many(self, items: Sequence[tuple[K, V]]) -> None:
        """Insert or replace all items; one batch where the kernel allows it."""

    def put_packed(self, keys: bytes, values: bytes, n: int) -> None:
        """put_many for n entries already packed back to back in the key and value layout."""

    def delete_many(self, keys: Sequence[K]) -> int:
        """Delete keys, ignoring ones already absent; return how many were deleted."""

    def items(self) -> Iterator[tuple[K, V]]: ...

    def __len__(self) -> int: ...


class MemoryMap(Generic[K, V]):
    """In-memory twin of a BPF hash map, for unit tests of sync logic."""

    def __init__(self, name: str, key_type: type[K], value_type: type[V], max_entries: int) -> None:
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        self.max_entries = max_entries
        self.data: dict[bytes, bytes] = {}
        self.writes = 0  # number of put_many/delete_many calls, to check batching in tests

    def get(self, key: K) -> V | None:
        raw = self.data.get(bytes(key))
        return None if raw is None else self.value_type.from_buffer_copy(raw)

    def put_many(self, items: Sequence[tuple[K, V]]) -> None:
        self.writes += 1
        new = sum(1 for k, _ in items if bytes(k) not in self.data)
        if len(self.data) + new > self.max_entries:
            raise MapFullError(self.name, self.max_entries, len(self.data) + new - self.max_entries)
        for k, v in items:
            self.data[bytes(k)] = bytes(v)

    def put_packed(self, keys: bytes, values: bytes, n: int) -> None:
        ks, vs = len(keys) // n if n else 0, len(values) // n if n else 0
        self.put_many([(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]) for i in range(n)])  # type: ignore[misc]

    def delete_many(self, keys: Sequence[K]) -> int:
        self.writes += 1
        n = 0
        for k in keys:
            if self.data.pop(bytes(k), None) is not None:
                n += 1
        return n

    def items(self) -> Iterator[tuple[K, V]]:
        for k, v in list(self.data.items()):
            yield self.key_type.from_buffer_copy(k), self.value_type.from_buffer_copy(v)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.data)


class MaglevOps(Protocol):
    """kp_maglev_v1: service-port id -> its Maglev table, given and read back as the packed rows of
    its inner array (row 0 the header, abi.MaglevHdr; see kproxy.sync.maglev.pack_rows)."""

    name: str
    max_entries: int

    def put_tables(self, tables: Sequence[tuple[int, bytes]]) -> list[tuple[int, OSError]]:
        """Make each table and swap it in for the service port's old one (readers see one or the other,
        whole). Returns the ports whose table was not written, with why (MapFullError: no room for a new
        port; another OSError: the kernel refused); every other table is written."""

    def delete_tables(self, svc_ids: Sequence[int]) -> int:
        """Remove the tables of these ports, ignoring absent ones; how many went."""

    def headers(self) -> dict[int, bytes]:
        """svc_id -> the table's header row (64 bytes), of every table."""

    def table(self, svc_id: int) -> bytes | None:
        """The port's table, all rows, or None."""

    def __len__(self) -> int: ...


class MemoryMaglev:
    """In-memory twin of kp_maglev_v1."""

    def __init__(self, max_entries: int = abi.MAGLEV_MAX) -> None:
        self.name = abi.MAP_MAGLEV
        self.max_entries = max_entries
        self.data: dict[int, bytes] = {}

    def put_tables(self, tables: Sequence[tuple[int, bytes]]) -> list[tuple[int, OSError]]:
        failed: list[tuple[int, OSError]] = []
        for sid, rows in tables:
            if not rows or len(rows) % abi.MAGLEV_ROW:
                raise ValueError(f"Maglev table of service port {sid}: {len(rows)} bytes is no whole row")
            if sid not in self.data and len(self.data) >= self.max_entries:
                failed.append((sid, MapFullError(self.name, self.max_entries, 1)))
                continue
            self.data[sid] = bytes(rows)
        return failed

    def delete_tables(self, svc_ids: Sequence[int]) -> int:
        return sum(self.data.pop(sid, None) is not None for sid in svc_ids)

    def headers(self) -> dict[int, bytes]:
        return {sid: rows[: abi.MAGLEV_ROW] for sid, rows in self.data.items()}

    def table(self, svc_id: int) -> bytes | None:
        return self.data.get(svc_id)

    def __len__(self) -> int:
        return len(self.data)


class MemoryMapSet:
    """The map set sync works on (the attributes of kproxy.bpf.maps.KproxyMaps), all in memory."""

    def __init__(
        self,
        svc4_max: int | None = None,
        be4_max: int | None = None,
        ct4_max: int | None = None,
        aff4_max: int | None = None,
        lbsrc4_max: int | None = None,
        svcnet4_max: int | None = None,
        svc6_max: int | None = None,
        be6_max: int | None = None,
        svcnet6_max: int | None = None,
        maglev_max: int | None = None,
    ) -> None:
        self.svc4: MemoryMap[abi.Svc4Key, abi.Svc4Val] = MemoryMap(
            abi.MAP_SVC4, abi.Svc4Key, abi.Svc4Val, svc4_max or abi.SVC4_MAX
        )
        self.be4: MemoryMap[ctypes.c_uint32, abi.Be4Val] = MemoryMap(
            abi.MAP_BE4, ctypes.c_uint32, abi.Be4Val, be4_max or abi.BE4_MAX
        )
        self.ct4: MemoryMap[abi.Ct4Key, abi.Ct4Val] = MemoryMap(
            abi.MAP_CT4, abi.Ct4Key, abi.Ct4Val, ct4_max or abi.CT4_MAX
        )
        self.aff4: MemoryMap[abi.Aff4Key, abi.Aff4Val] = MemoryMap(
            abi.MAP_AFF4, abi.Aff4Key, abi.Aff4Val, aff4_max or abi.AFF4_MAX
        )
        self.cfg: MemoryMap[ctypes.c_uint32, abi.Config] = MemoryMap(
            abi.MAP_CFG, ctypes.c_uint32, abi.Config, 1
        )
        # LPM trie in the kernel; sync only puts, deletes and lists exact keys, as with a hash map
        self.lbsrc4: MemoryMap[abi.LbSrc4Key, abi.LbSrc4Val] = MemoryMap(
            abi.MAP_LBSRC4, abi.LbSrc4Key, abi.LbSrc4Val, lbsrc4_max or abi.LBSRC4_MAX
        )
        self.svcnet4: MemoryMap[abi.Svcnet4Key, abi.Svcnet4Val] = MemoryMap(
            abi.MAP_SVCNET4, abi.Svcnet4Key, abi.Svcnet4Val, svcnet4_max or abi.SVCNET4_MAX
        )
        self.svcnet_span: MemoryMap[ctypes.c_uint32, abi.SvcnetSpan] = MemoryMap(
            abi.MAP_SVCNET_SPAN, ctypes.c_uint32, abi.SvcnetSpan, 1
        )
        self.svc6: MemoryMap[abi.Svc6Key, abi.Svc4Val] = MemoryMap(
            abi.MAP_SVC6, abi.Svc6Key, abi.Svc6Val, svc6_max or abi.SVC6_MAX
        )
        self.be6: MemoryMap[ctypes.c_uint32, abi.Be6Val] = MemoryMap(
            abi.MAP_BE6, ctypes.c_uint32, abi.Be6Val, be6_max or abi.BE6_MAX
        )
        self.ct6: MemoryMap[abi.Ct6Key, abi.Ct6Val] = MemoryMap(
            abi.MAP_CT6, abi.Ct6Key, abi.Ct6Val, abi.CT6_MAX
        )
        self.aff6: MemoryMap[abi.Aff6Key, abi.Aff4Val] = MemoryMap(
            abi.MAP_AFF6, abi.Aff6Key, abi.Aff6Val, abi.AFF6_MAX
        )
        self.lbsrc6: MemoryMap[abi.LbSrc6Key, abi.LbSrc4Val] = MemoryMap(
            abi.MAP_LBSRC6, abi.LbSrc6Key, abi.LbSrc6Val, abi.LBSRC6_MAX
        )
        self.cfg6: MemoryMap[ctypes.c_uint32, abi.Config6] = MemoryMap(
            abi.MAP_CFG6, ctypes.c_uint32, abi.Config6, 1
        )
        self.svcnet6: MemoryMap[abi.Svcnet6Key, abi.Svcnet4Val] = MemoryMap(
            abi.MAP_SVCNET6, abi.Svcnet6Key, abi.Svcnet4Val, svcnet6_max or abi.SVCNET6_MAX
        )
        self.svcnet6_span: MemoryMap[ctypes.c_uint32, abi.Svcnet6Span] = MemoryMap(
            abi.MAP_SVCNET6_SPAN, ctypes.c_uint32, abi.Svcnet6Span, 1
        )
        self.maglev = MemoryMaglev(maglev_max or abi.MAGLEV_MAX)

    def read_config(self) -> abi.Config:
        value = self.cfg.get(ctypes.c_uint32(0))
        return value if value is not None else abi.Config()

    def write_config(self, config: abi.Config) -> None:
        self.cfg.put_many([(ctypes.c_uint32(0), config)])


def as_pairs(items: Iterable[tuple[K, V]]) -> list[tuple[K, V]]:
    return list(items)
