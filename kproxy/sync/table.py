"""The syncer's two big tables, packed: the programmed kp_be4 table (backend id -> BVal with its
reference count) and the backend key -> id index.

As dicts they took ~100 bytes a backend each (int objects for keys and values, the dict's entry and
index: ~20 MB at 100,000 backends). Packed, an id takes three 8-byte words in BackendTable, and one
8-byte slot at 20-60% use in BackendIndex (which keeps no keys: they are in the table's values).
Ids are handed out in order and never reused, so after churn the live ids are spread thin over the
id space: BackendTable keeps only present ids' words in each page.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import overload

PAGE_BITS = 6
PAGE = 1 << PAGE_BITS
_LOW = PAGE - 1
_M64 = (1 << 64) - 1
_SHRINK_AT = frozenset(PAGE >> k for k in range(1, PAGE_BITS + 1))  # 32, 16, ... 1 present ids


class BackendTable:
    """A dict-like map of backend id (int >= 0) -> BVal (a non-negative int below 2**192).

    Ids live in pages of PAGE consecutive ids. A page is one array of 8-byte words: a bitmap of the
    ids present, then three words per present id, in id order (the value's bits 0-63, 64-127, and
    128 up: the reference count). An id's words sit at 1 + 3 * (present ids below it in the page): a
    page takes 24 bytes per present id and ~150 bytes of its own (the array, the bitmap, its dict
    entry), so ~28 bytes an id when dense and ~40 with a quarter of the ids left after churn (a page
    of fixed slots took over 100), ~200 at worst (one id a page). Iteration is in id order."""

    __slots__ = ("_n", "_pages")

    def __init__(self) -> None:
        self._pages: dict[int, array[int]] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    @overload
    def get(self, bid: int) -> int | None: ...
    @overload
    def get(self, bid: int, default: int) -> int: ...
    def get(self, bid: int, default: int | None = None) -> int | None:
        at = self._at(bid)
        if at is None:
            return default
        page, i = at
        return page[i] | page[i + 1] << 64 | page[i + 2] << 128

    def value(self, bid: int) -> int | None:
        """self[bid] & (1 << 128) - 1 (without the count), None if absent."""
        at = self._at(bid)
        if at is None:
            return None
        page, i = at
        return page[i] | page[i + 1] << 64

    def __getitem__(self, bid: int) -> int:
        val = self.get(bid)
        if val is None:
            raise KeyError(bid)
        return val

    def __contains__(self, bid: object) -> bool:
        if type(bid) is not int:
            return False
        page = self._pages.get(bid >> PAGE_BITS)
        return page is not None and bool(page[0] >> (bid & _LOW) & 1)

    def _put(self, bid: int, w0: int, w1: int, w2: int) -> bool:
        """Set BID's words; whether it is new."""
        pages = self._pages
        page = pages.get(bid >> PAGE_BITS)
        j = bid & _LOW
        if page is None:
            pages[bid >> PAGE_BITS] = array("Q", (1 << j, w0, w1, w2))
            return True
        bm = page[0]
        i = 1 + 3 * (bm & ((1 << j) - 1)).bit_count()
        if bm >> j & 1:
            page[i] = w0
            page[i + 1] = w1
            page[i + 2] = w2
            return False
        words = array("Q", (w0, w1, w2))  # first: a value too big fails before the page changes
        page[0] = bm | 1 << j
        page[i:i] = words
        return True

    def __setitem__(self, bid: int, val: int) -> None:
        if bid < 0 or val < 0:
            raise ValueError(f"backend id {bid} or value {val} is negative")
        if self._put(bid, val & _M64, (val >> 64) & _M64, val >> 128):
            self._n += 1

    def pop(self, bid: int, default: int | None = None) -> int | None:
        got = self.pop_many((bid,))
        return got.get(bid, default)

    def pop_many(self, bids: Iterable[int]) -> dict[int, int]:
        """Remove BIDS; return the values of those that were present (the count bits included)."""
        pages = self._pages
        out: dict[int, int] = {}
        for bid in bids:
            page = pages.get(bid >> PAGE_BITS)
            if page is None:
                continue
            bm = page[0]
            j = bid & _LOW
            if not bm >> j & 1:
                continue
            i = 1 + 3 * (bm & ((1 << j) - 1)).bit_count()
            out[bid] = page[i] | page[i + 1] << 64 | page[i + 2] << 128
            bm ^= 1 << j
            if not bm:
                del pages[bid >> PAGE_BITS]
                continue
            page[0] = bm
            del page[i : i + 3]
            if bm.bit_count() in _SHRINK_AT:
                # an array keeps its buffer when it shrinks by fewer than 16 items at a time: a copy
                # is exactly as long (once per halving)
                pages[bid >> PAGE_BITS] = page[:]
        self._n -= len(out)
        return out

    def __delitem__(self, bid: int) -> None:
        if self.pop(bid) is None:
            raise KeyError(bid)

    def update(self, items: dict[int, int]) -> None:
        put = self._put
        n = 0
        for bid, val in items.items():
            if bid < 0 or val < 0:
                raise ValueError(f"backend id {bid} or value {val} is negative")
            if put(bid, val & _M64, (val >> 64) & _M64, val >> 128):
                n += 1
        self._n += n

    def update_keeping_counts(self, items: dict[int, int]) -> list[int]:
        """put_keeping_count for each item (one call for a plan's values); the ids that were absent."""
        pages = self._pages
        new = []
        for bid, val in items.items():
            if bid < 0 or val < 0:
                raise ValueError(f"backend id {bid} or value {val} is negative")
            w0, w1, w2 = val & _M64, (val >> 64) & _M64, val >> 128
            page = pages.get(bid >> PAGE_BITS)
            j = bid & _LOW
            if page is None:
                pages[bid >> PAGE_BITS] = array("Q", (1 << j, w0, w1, w2))
                new.append(bid)
                continue
            bm = page[0]
            i = 1 + 3 * (bm & ((1 << j) - 1)).bit_count()
            if bm >> j & 1:
                page[i] = w0
                page[i + 1] = w1
                page[i + 2] |= w2
            else:
                words = array("Q", (w0, w1, w2))  # first: a value too big fails before the page changes
                page[0] = bm | 1 << j
                page[i:i] = words
                new.append(bid)
        self._n += len(new)
        return new

    # ---- reference counts: the bits from 128 up, without building the whole value ----
    def _at(self, bid: int) -> tuple[array[int], int] | None:
        """BID's page and the index of its first word, None if absent."""
        page = self._pages.get(bid >> PAGE_BITS)
        if page is None:
            return None
        bm = page[0]
        j = bid & _LOW
        if not bm >> j & 1:
            return None
        return page, 1 + 3 * (bm & ((1 << j) - 1)).bit_count()

    def put_keeping_count(self, bid: int, val: int) -> None:
        """self[bid] = val | the count bits self[bid] has (none for a new id)."""
        at = self._at(bid)
        if at is None:
            self[bid] = val
            return
        page, i = at
        page[i] = val & _M64
        page[i + 1] = (val >> 64) & _M64
        page[i + 2] |= val >> 128

    def add_ref(self, bid: int) -> None:
        """self[bid] += 1 << 128; KeyError if absent."""
        at = self._at(bid)
        if at is None:
            raise KeyError(bid)
        at[0][at[1] + 2] += 1

    def drop_ref(self, bid: int) -> bool | None:
        """One reference less (none left if it had one or none); whether none is left, None if absent."""
        at = self._at(bid)
        if at is None:
            return None
        page, i = at
        refs = page[i + 2]
        if refs <= 1:
            page[i + 2] = 0
            return True
        page[i + 2] = refs - 1
        return False

    def add_refs(self, bids: Iterable[int]) -> None:
        """add_ref for each of BIDS (KeyError at the first absent one)."""
        get_page = self._pages.get
        for bid in bids:
            page = get_page(bid >> PAGE_BITS)
            j = bid & _LOW
            if page is None or not page[0] >> j & 1:
                raise KeyError(bid)
            page[3 + 3 * (page[0] & ((1 << j) - 1)).bit_count()] += 1

    def drop_refs(self, bids: Iterable[int]) -> list[int]:
        """drop_ref for each of BIDS; those left with none (absent ones are skipped)."""
        get_page = self._pages.get
        out = []
        for bid in bids:
            page = get_page(bid >> PAGE_BITS)
            j = bid & _LOW
            if page is None or not page[0] >> j & 1:
                continue
            i = 3 + 3 * (page[0] & ((1 << j) - 1)).bit_count()
            refs = page[i]
            if refs <= 1:
                page[i] = 0
                out.append(bid)
            else:
                page[i] = refs - 1
        return out

    def unreferenced(self, bids: Iterable[int]) -> set[int]:
        """Those of BIDS present with no reference, or absent."""
        get_page = self._pages.get
        out = set()
        for bid in bids:
            page = get_page(bid >> PAGE_BITS)
            j = bid & _LOW
            if (
                page is None
                or not page[0] >> j & 1
                or not page[3 + 3 * (page[0] & ((1 << j) - 1)).bit_count()]
            ):
                out.add(bid)
        return out

    def refs(self, bid: int) -> int:
        """self.get(bid, 0) >> 128: the bits from 128 up (0 if absent)."""
        at = self._at(bid)
        return 0 if at is None else at[0][at[1] + 2]

    def clear(self) -> None:
        self._pages.clear()
        self._n = 0

    def __iter__(self) -> Iterator[int]:
        for p in sorted(self._pages):
            bm = self._pages[p][0]
            base = p << PAGE_BITS
            while bm:
                low = bm & -bm
                yield base + low.bit_length() - 1
                bm ^= low

    def keys(self) -> Iterator[int]:
        return iter(self)

    def items(self) -> Iterator[tuple[int, int]]:
        for bid in self:
            yield bid, self[bid]

    def values(self) -> Iterator[int]:
        for _, val in self.items():
            yield val

    def isdisjoint(self, bids: Iterable[int]) -> bool:
        """Whether none of `bids` is in the table."""
        get_page = self._pages.get
        for bid in bids:
            page = get_page(bid >> PAGE_BITS)
            if page is not None and page[0] >> (bid & _LOW) & 1:
                return False
        return True

    def missing(self, bids: Iterable[int]) -> list[int]:
        """Those of `bids` not in the table, in order."""
        get_page = self._pages.get
        out = []
        for bid in bids:
            page = get_page(bid >> PAGE_BITS)
            if page is None or not page[0] >> (bid & _LOW) & 1:
                out.append(bid)
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BackendTable | dict):
            return len(self) == len(other) and all(other.get(b) == v for b, v in self.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BackendTable({dict(self.items())!r})"


# ---- BackendIndex ----
_TOMB = 0xFFFFFFFF  # a removed id's slot: probing goes on past it (ids are 1 .. 2**32 - 2)
_FIB = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing spreads nearby keys
_BK_LOW = (1 << 56) - 1  # a BKey's address, port and protocol (kproxy.sync.state)
_MIN_BITS = 10


class BackendIndex:
    """Backend key (BKey) -> id, for the ids of a BackendTable.

    A BKey is in its id's value (kproxy.sync.state.key_of_val), so the index needs no keys: open
    addressing with linear probing over one array of 8-byte slots, each an id and 32 bits of its
    key's hash. A probe reads the table only when those bits match, so misses stay cheap. At most 60%
    of slots used (removed ids included) and 20-40% after a resize: 13-40 bytes a backend, where a
    dict of ints took ~105. Lookups run Python, not dict.get: about half a microsecond a key, a
    Service's at a time (get_many). Every indexed id is in the table, under the key it has there."""

    __slots__ = ("_bits", "_filled", "_slots", "_table", "_used")

    def __init__(self, table: BackendTable) -> None:
        self._table = table
        self._alloc(_MIN_BITS)

    def _alloc(self, bits: int) -> None:
        self._bits = bits
        self._slots: array[int] = array("Q", bytes(8 << bits))
        self._used = 0
        self._filled = 0  # used and removed slots

    def clear(self) -> None:
        self._alloc(_MIN_BITS)

    def __len__(self) -> int:
        return self._used

    def _key(self, bid: int) -> int:
        val = self._table.value(bid)
        if val is None:
            raise KeyError(f"backend id {bid} is not in the table")
        return (val & _BK_LOW) | ((val >> 96) & 0xFFFFFFFF) << 56

    def get_many(self, keys: Iterable[int]) -> list[int | None]:
        """The id of each key (None if not indexed), in one call."""
        out: list[int | None] = []
        append = out.append
        slots = self._slots
        pages = self._table._pages
        mask = (1 << self._bits) - 1
        shift = 64 - self._bits
        for key in keys:
            h = (key ^ key >> 64) * _FIB
            tag = (h >> 64) & 0xFFFFFFFF | 1  # never 0: a removed slot's
            i = (h & _M64) >> shift
            while True:
                s = slots[i]
                if not s:
                    append(None)
                    break
                if s >> 32 == tag:
                    bid = s & 0xFFFFFFFF
                    page = pages[bid >> PAGE_BITS]
                    bm = page[0]
                    j = bid & _LOW
                    w = 1 + 3 * (bm & ((1 << j) - 1)).bit_count()
                    if bm >> j & 1 and (page[w] & _BK_LOW) | (page[w + 1] >> 32) << 56 == key:
                        append(bid)
                        break
                i = (i + 1) & mask
        return out

    def get(self, key: int) -> int | None:
        return self.get_many((key,))[0]

    def add(self, items: Iterable[tuple[int, int]]) -> None:
        """Index each (id, its key): ids in the table under those keys, neither indexed yet."""
        for bid, key in items:
            if not 0 < bid < _TOMB:
                raise ValueError(f"backend id {bid} out of range")
            if (self._filled + 1) * 5 > 3 << self._bits:
                self._resize()
            slots = self._slots
            mask = (1 << self._bits) - 1
            h = (key ^ key >> 64) * _FIB
            i = (h & _M64) >> (64 - self._bits)
            while True:
                s = slots[i]
                if not s or s == _TOMB:
                    break
                i = (i + 1) & mask
            if not s:
                self._filled += 1
            slots[i] = ((h >> 64) & 0xFFFFFFFF | 1) << 32 | bid
            self._used += 1

    def remove(self, items: Iterable[tuple[int, int]]) -> None:
        """Unindex each (id, its key) that is indexed (the table need not have it any more)."""
        slots = self._slots
        mask = (1 << self._bits) - 1
        shift = 64 - self._bits
        for bid, key in items:
            i = (((key ^ key >> 64) * _FIB) & _M64) >> shift
            while True:
                s = slots[i]
                if s & 0xFFFFFFFF == bid and s != _TOMB:
                    slots[i] = _TOMB
                    self._used -= 1
                    break
                if not s:
                    break
                i = (i + 1) & mask

    def _resize(self) -> None:
        """Rebuild without removed ids, at 20-40% use (grown or shrunk as needed)."""
        bits = _MIN_BITS
        while 2 << bits < 5 * self._used:
            bits += 1
        old = self._slots
        self._alloc(bits)
        slots = self._slots
        mask = (1 << bits) - 1
        shift = 64 - bits
        key_of = self._key
        n = 0
        # one slot at a time: lists of 100,000s of ids and keys would fragment the heap for good
        for s in old:
            if s and s != _TOMB:
                key = key_of(s & 0xFFFFFFFF)
                i = (((key ^ key >> 64) * _FIB) & _M64) >> shift
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = s  # the same id and hash bits
                n += 1
        self._used = self._filled = n

    def items(self) -> Iterator[tuple[int, int]]:
        """(key, id) for every indexed id."""
        key_of = self._key
        for bid in [s & 0xFFFFFFFF for s in self._slots if s and s != _TOMB]:
            yield key_of(bid), bid


# ---- the IPv6 twins: values wider than BackendTable's words ----
class WideBackendTable:
    """BackendTable's interface over a dict, for values of any width: IPv6 BVals are 320 bits and their
    reference count sits above bit REFS_SHIFT (kproxy.sync.family). ~100 bytes an id more than the
    packed table: IPv6 backends are the fewer (dual-stack Services list both), and a dict is simple."""

    __slots__ = ("_d", "_mask", "_one")

    def __init__(self, refs_shift: int) -> None:
        self._d: dict[int, int] = {}
        self._one = 1 << refs_shift
        self._mask = self._one - 1

    def __len__(self) -> int:
        return len(self._d)

    def __bool__(self) -> bool:
        return bool(self._d)

    @overload
    def get(self, bid: int) -> int | None: ...
    @overload
    def get(self, bid: int, default: int) -> int: ...
    def get(self, bid: int, default: int | None = None) -> int | None:
        return self._d.get(bid, default)

    def value(self, bid: int) -> int | None:
        val = self._d.get(bid)
        return None if val is None else val & self._mask

    def __getitem__(self, bid: int) -> int:
        return self._d[bid]

    def __contains__(self, bid: object) -> bool:
        return bid in self._d

    def __setitem__(self, bid: int, val: int) -> None:
        if bid < 0 or val < 0:
            raise ValueError(f"backend id {bid} or value {val} is negative")
        self._d[bid] = val

    def pop(self, bid: int, default: int | None = None) -> int | None:
        return self._d.pop(bid, default)

    def pop_many(self, bids: Iterable[int]) -> dict[int, int]:
        d = self._d
        return {bid: d.pop(bid) for bid in bids if bid in d}

    def __delitem__(self, bid: int) -> None:
        del self._d[bid]

    def update(self, items: dict[int, int]) -> None:
        for bid, val in items.items():
            self[bid] = val

    def update_keeping_counts(self, items: dict[int, int]) -> list[int]:
        d = self._d
        mask = self._mask
        new = []
        for bid, val in items.items():
            if bid < 0 or val < 0:
                raise ValueError(f"backend id {bid} or value {val} is negative")
            cur = d.get(bid)
            if cur is None:
                new.append(bid)
                d[bid] = val
            else:
                d[bid] = val | (cur & ~mask)
        return new

    def put_keeping_count(self, bid: int, val: int) -> None:
        self.update_keeping_counts({bid: val})

    def add_ref(self, bid: int) -> None:
        self._d[bid] += self._one

    def drop_ref(self, bid: int) -> bool | None:
        got = self.drop_refs((bid,))
        return None if bid not in self._d else bool(got)

    def add_refs(self, bids: Iterable[int]) -> None:
        d = self._d
        one = self._one
        for bid in bids:
            d[bid] += one

    def drop_refs(self, bids: Iterable[int]) -> list[int]:
        d = self._d
        one = self._one
        out = []
        for bid in bids:
            cur = d.get(bid)
            if cur is None:
                continue
            if cur < 2 * one:
                d[bid] = cur & self._mask
                out.append(bid)
            else:
                d[bid] = cur - one
        return out

    def unreferenced(self, bids: Iterable[int]) -> set[int]:
        d = self._d
        one = self._one
        return {bid for bid in bids if d.get(bid, 0) < one}

    def refs(self, bid: int) -> int:
        return self._d.get(bid, 0) // self._one

    def clear(self) -> None:
        self._d.clear()

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._d))

    def keys(self) -> Iterator[int]:
        return iter(self)

    def items(self) -> Iterator[tuple[int, int]]:
        for bid in self:
            yield bid, self._d[bid]

    def values(self) -> Iterator[int]:
        for _, val in self.items():
            yield val

    def isdisjoint(self, bids: Iterable[int]) -> bool:
        return self._d.keys().isdisjoint(bids)

    def missing(self, bids: Iterable[int]) -> list[int]:
        return [bid for bid in bids if bid not in self._d]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WideBackendTable | BackendTable | dict):
            return len(self) == len(other) and all(other.get(b) == v for b, v in self.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"WideBackendTable({dict(self.items())!r})"


class DictBackendIndex:
    """BackendIndex's interface over a dict (backend key -> id), for WideBackendTable's ids."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[int, int] = {}

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def get_many(self, keys: Iterable[int]) -> list[int | None]:
        get = self._d.get
        return [get(key) for key in keys]

    def get(self, key: int) -> int | None:
        return self._d.get(key)

    def add(self, items: Iterable[tuple[int, int]]) -> None:
        for bid, key in items:
            if not 0 < bid < _TOMB:
                raise ValueError(f"backend id {bid} out of range")
            self._d[key] = bid

    def remove(self, items: Iterable[tuple[int, int]]) -> None:
        d = self._d
        for bid, key in items:
            if d.get(key) == bid:
                del d[key]

    def items(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._d.items()))
