"""The programmed kp_be4 table (backend id -> BVal with its reference count) in pages of packed words.

As a dict it took ~100 bytes a backend (a 44-byte int per value and the dict's own entry and index:
10 MB at 100,000 backends); packed, each id takes three 8-byte words. Ids are handed out in order and
never reused, so they are not dense forever: the words live in pages of PAGE ids, and a page goes
when its last id does. The worst case (one live id per page, after much churn) costs a page per
backend, about 9 times the dense cost.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import overload

PAGE_BITS = 5
PAGE = 1 << PAGE_BITS
_M64 = (1 << 64) - 1
_EMPTY_PAGE = bytes(3 * 8 * PAGE)


class BackendTable:
    """A dict-like map of backend id (int >= 0) -> BVal (a non-negative int below 2**192).

    Per id three words: the value's bits 0-63, 64-127, and (bits 128 and up) + 1, 0 meaning absent.
    Iteration is in id order."""

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
        page = self._pages.get(bid >> PAGE_BITS)
        if page is None:
            return default
        i = (bid & (PAGE - 1)) * 3
        top = page[i + 2]
        if not top:
            return default
        return page[i] | page[i + 1] << 64 | (top - 1) << 128

    def value(self, bid: int) -> int | None:
        """self[bid] & (1 << 128) - 1 (without the count), None if absent."""
        page = self._pages.get(bid >> PAGE_BITS)
        if page is None:
            return None
        i = (bid & (PAGE - 1)) * 3
        if not page[i + 2]:
            return None
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
        return page is not None and page[(bid & (PAGE - 1)) * 3 + 2] != 0

    def __setitem__(self, bid: int, val: int) -> None:
        if bid < 0 or val < 0:
            raise ValueError(f"backend id {bid} or value {val} is negative")
        pages = self._pages
        page = pages.get(bid >> PAGE_BITS)
        if page is None:
            page = pages[bid >> PAGE_BITS] = array("Q", _EMPTY_PAGE)
        i = (bid & (PAGE - 1)) * 3
        if not page[i + 2]:
            self._n += 1
        page[i] = val & _M64
        page[i + 1] = (val >> 64) & _M64
        page[i + 2] = (val >> 128) + 1

    def pop(self, bid: int, default: int | None = None) -> int | None:
        val = self.get(bid)
        if val is None:
            return default
        page = self._pages[bid >> PAGE_BITS]
        i = (bid & (PAGE - 1)) * 3
        page[i] = page[i + 1] = page[i + 2] = 0
        self._n -= 1
        if not any(page[2::3]):
            del self._pages[bid >> PAGE_BITS]
        return val

    def __delitem__(self, bid: int) -> None:
        if self.pop(bid) is None:
            raise KeyError(bid)

    def update(self, items: dict[int, int]) -> None:
        pages = self._pages
        n = 0
        for bid, val in items.items():
            if bid < 0 or val < 0:
                raise ValueError(f"backend id {bid} or value {val} is negative")
            page = pages.get(bid >> PAGE_BITS)
            if page is None:
                page = pages[bid >> PAGE_BITS] = array("Q", _EMPTY_PAGE)
            i = (bid & (PAGE - 1)) * 3
            if not page[i + 2]:
                n += 1
            page[i] = val & _M64
            page[i + 1] = (val >> 64) & _M64
            page[i + 2] = (val >> 128) + 1
        self._n += n

    # ---- reference counts: the bits from 128 up, without building the whole value ----
    def put_keeping_count(self, bid: int, val: int) -> None:
        """self[bid] = val | the count bits self[bid] has (none for a new id)."""
        page = self._pages.get(bid >> PAGE_BITS)
        top = 0 if page is None else page[(bid & (PAGE - 1)) * 3 + 2]
        if not top:
            self[bid] = val
            return
        assert page is not None
        i = (bid & (PAGE - 1)) * 3
        page[i] = val & _M64
        page[i + 1] = (val >> 64) & _M64
        page[i + 2] = ((val >> 128) | (top - 1)) + 1

    def add_ref(self, bid: int) -> None:
        """self[bid] += 1 << 128; KeyError if absent."""
        page = self._pages.get(bid >> PAGE_BITS)
        i = (bid & (PAGE - 1)) * 3 + 2
        if page is None or not page[i]:
            raise KeyError(bid)
        page[i] += 1

    def drop_ref(self, bid: int) -> bool | None:
        """One reference less (none left if it had one or none); whether none is left, None if absent."""
        page = self._pages.get(bid >> PAGE_BITS)
        if page is None:
            return None
        i = (bid & (PAGE - 1)) * 3 + 2
        top = page[i]
        if not top:
            return None
        if top <= 2:
            page[i] = 1
            return True
        page[i] = top - 1
        return False

    def refs(self, bid: int) -> int:
        """self.get(bid, 0) >> 128: the bits from 128 up (0 if absent)."""
        page = self._pages.get(bid >> PAGE_BITS)
        if page is None:
            return 0
        top = page[(bid & (PAGE - 1)) * 3 + 2]
        return top - 1 if top else 0

    def clear(self) -> None:
        self._pages.clear()
        self._n = 0

    def __iter__(self) -> Iterator[int]:
        for p in sorted(self._pages):
            page = self._pages[p]
            base = p << PAGE_BITS
            for j, top in enumerate(page[2::3]):
                if top:
                    yield base + j

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
        return not any(b in self for b in bids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BackendTable | dict):
            return len(self) == len(other) and all(other.get(b) == v for b, v in self.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BackendTable({dict(self.items())!r})"
