"""Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
NSDI 2016): a Service's backend set -> a table of m slots (m prime), each naming one backend.

The BPF program picks a flow's backend as table[flow_hash(flow) % m]. This is consistent hashing: the
table is a function of the backend set alone (each backend's name gives its preference list through a
keyed hash; `build` sorts the names first: the agent names a backend by its packed address, port and
protocol, kproxy.sync.mgsync; `backend_name` is a readable spelling for tools), so every node builds the same
table and a flow lands on the same backend whichever node it enters through. When one of N backends
goes away, its ~1/N of the slots are handed out anew and only a little more than that moves among the
survivors (the paper's "minimal disruption"); each backend holds floor(m/N) or ceil(m/N) slots.

`fill` is the paper's population (Pseudocode 1). The native fill (kproxy/native/maglev.c, built by
`make native` into libkpmaglev.so, loaded through ctypes) takes ~0.2 ms for a table of 16381 slots,
~25-30x faster than the pure-Python one (5-6 ms) that takes over, with a warning logged once, when the
library is missing; both give the same table. Either way the fill is most of a table's cost: 10,000
Services of 10 backends take ~2.5 s (build + pack_rows) with the native fill, ~55 s without.

`pack_rows` lays a table out as the 64-byte rows of the BPF inner array map: a header row, the entries
(u8 while a Service has at most 256 backends, u16 above), then the backend ids they index.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import struct
import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

PRIMES: tuple[int, ...] = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)  # table sizes
DEFAULT_SIZE = 16381
ROW = 64  # bytes per row of the BPF inner array map
LIST_PER_ROW = 16  # u32 backend ids per list row

MAX_BACKENDS = 65535  # entries are u16 and 0xFFFF marks an empty slot in the native fill
_PERSON = b"kproxy-maglev"
_HEADER = struct.Struct("=IIHHII")  # m, n, width, zero, list_row, digest (host order, no padding)
_M32 = 0xFFFFFFFF
_JHASH_INIT = (0xDEADBEEF + 12) & _M32
_LITTLE = sys.byteorder == "little"

NATIVE_LIB = Path(__file__).resolve().parents[1] / "native" / "libkpmaglev.so"
_native: ctypes.CDLL | None = None
_native_tried = False


def backend_name(address: str, port: int) -> bytes:
    """The name a backend's preference list is hashed from: b"10.0.0.1:8080" or b"[fd00::1]:8080".

    `address` must already be canonical text (ipaddress's str()): the same backend must give the same
    name on every node."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    if ":" in address:
        return f"[{address}]:{port}".encode("ascii")
    return f"{address}:{port}".encode("ascii")


@lru_cache(maxsize=64)
def _is_prime(m: int) -> bool:
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    f = 3
    while f * f <= m:
        if m % f == 0:
            return False
        f += 2
    return True


def _check_size(m: int, n: int) -> None:
    if not (n < m < 2**31 and _is_prime(m)):
        raise ValueError(f"table size {m}: not a prime above {n} and below 2**31 (the agent's: {PRIMES})")


def permutation(names: Sequence[bytes], m: int) -> tuple[array[int], array[int]]:
    """Each name's (offset, skip) in a table of m slots, in the order given: its preference list is
    (offset + j * skip) % m for j = 0..m-1, every slot once since m is prime and 0 < skip < m."""
    _check_size(m, 1)
    offsets: array[int] = array("I")
    skips: array[int] = array("I")
    for name in names:
        d = hashlib.blake2b(name, digest_size=16, person=_PERSON).digest()
        offsets.append(int.from_bytes(d[:8], "little") % m)
        skips.append(int.from_bytes(d[8:], "little") % (m - 1) + 1)
    return offsets, skips


def _load_native() -> ctypes.CDLL | None:
    global _native, _native_tried
    if not _native_tried:
        _native_tried = True
        try:
            lib = ctypes.CDLL(str(NATIVE_LIB))
            fn = lib.kp_maglev_fill
        except (OSError, AttributeError) as e:
            log.warning("Maglev tables are filled in Python, ~25x slower: %s not loaded (%s)", NATIVE_LIB, e)
        else:
            # int kp_maglev_fill(u32 m, u32 n, const u32 *offsets, const u32 *skips, u16 *out)
            u32, ptr = ctypes.c_uint32, ctypes.c_void_p
            fn.argtypes = [u32, u32, ptr, ptr, ptr]
            fn.restype = ctypes.c_int
            _native = lib
    return _native


def native_available() -> bool:
    """Whether `fill` runs in C (libkpmaglev.so, `make native`). Loads the library on the first call."""
    return _load_native() is not None


def _fill_python(offsets: array[int], skips: array[int], m: int) -> array[int]:
    n = len(offsets)
    entries: array[int] = array("H", bytes(2 * m))
    taken = bytearray(m)
    pos = list(offsets)
    skip = list(skips)
    filled = 0
    while True:
        for i in range(n):
            p = pos[i]
            s = skip[i]
            while taken[p]:
                p += s
                if p >= m:
                    p -= m
            taken[p] = 1
            entries[p] = i
            p += s
            if p >= m:
                p -= m
            pos[i] = p
            filled += 1
            if filled == m:
                return entries


def _fill_native(lib: ctypes.CDLL, offsets: array[int], skips: array[int], m: int) -> array[int]:
    entries: array[int] = array("H", bytes(2 * m))
    rc = lib.kp_maglev_fill(
        m, len(offsets), offsets.buffer_info()[0], skips.buffer_info()[0], entries.buffer_info()[0]
    )
    if rc == -errno.ENOMEM:
        raise MemoryError("kp_maglev_fill")
    if rc != 0:
        raise ValueError(f"kp_maglev_fill: {errno.errorcode.get(-rc, rc)}")
    return entries


def _u32(values: array[int]) -> array[int]:
    if values.typecode == "I" and values.itemsize == 4:
        return values
    try:
        return array("I", values)
    except OverflowError as e:
        raise ValueError(f"not a u32: {e}") from None


def fill(offsets: array[int], skips: array[int], m: int) -> array[int]:
    """The Maglev population: array('H') of m entries, each the index (0..n-1) of a backend in the
    order of `offsets` and `skips` (from `permutation`). The backends take turns, each taking the
    next empty slot of its preference list, until every slot is full: each backend ends up with
    floor(m/n) or ceil(m/n) slots. m must be a prime above n (one of PRIMES in the agent)."""
    n = len(offsets)
    if n == 0:
        raise ValueError("no backends")
    if n > MAX_BACKENDS:
        raise ValueError(f"{n} backends, at most {MAX_BACKENDS}")
    if len(skips) != n:
        raise ValueError(f"{n} offsets but {len(skips)} skips")
    _check_size(m, n)
    offsets, skips = _u32(offsets), _u32(skips)
    if max(offsets) >= m or min(skips) == 0 or max(skips) >= m:
        raise ValueError(f"offsets must be below {m} and skips in 1..{m - 1}")
    lib = _load_native()
    if lib is None:
        return _fill_python(offsets, skips, m)
    return _fill_native(lib, offsets, skips, m)


def build(names: Sequence[bytes], m: int = DEFAULT_SIZE) -> tuple[list[int], array[int]]:
    """A table over the backends named `names`, the same whatever their order: (order, entries), where
    order[k] is the index in `names` of the k-th name in byte order and entries[j] = k names the
    backend names[order[k]]. Duplicate names raise ValueError."""
    order = sorted(range(len(names)), key=names.__getitem__)
    ordered = [names[k] for k in order]
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a == b:
            raise ValueError(f"duplicate backend name {a!r}")
    offsets, skips = permutation(ordered, m)
    return order, fill(offsets, skips, m)


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def flow_hash(saddr: bytes, sport: int, dport: int, proto: int) -> int:
    """The BPF program's flow hash, bit for bit: the source address folded to 32 bits (its big-endian
    words XORed), the ports (sport << 16 | dport) and the protocol through jhash_3words' final mix
    (include/linux/jhash.h, initval 0). The table slot is flow_hash(...) % m."""
    if len(saddr) == 4:
        fold = int.from_bytes(saddr, "big")
    elif len(saddr) == 16:
        w = struct.unpack(">4I", saddr)
        fold = w[0] ^ w[1] ^ w[2] ^ w[3]
    else:
        raise ValueError(f"address of {len(saddr)} bytes, not 4 or 16")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF and 0 <= proto <= 0xFF):
        raise ValueError(f"ports {sport}, {dport} or protocol {proto} out of range")
    a = (fold + _JHASH_INIT) & _M32
    b = (((sport << 16) | dport) + _JHASH_INIT) & _M32
    c = (proto + _JHASH_INIT) & _M32
    c ^= b
    c = (c - _rol32(b, 14)) & _M32
    a ^= c
    a = (a - _rol32(c, 11)) & _M32
    b ^= a
    b = (b - _rol32(a, 25)) & _M32
    c ^= b
    c = (c - _rol32(b, 16)) & _M32
    a ^= c
    a = (a - _rol32(c, 4)) & _M32
    b ^= a
    b = (b - _rol32(a, 14)) & _M32
    c ^= b
    c = (c - _rol32(b, 24)) & _M32
    return c


def entry_width(n: int) -> int:
    """Bytes per table entry for n backends: u8 up to 256 backends, u16 above."""
    return 1 if n <= 256 else 2


def table_rows(m: int, width: int) -> int:
    """Rows of ROW bytes holding m entries of `width` bytes."""
    return -(-m * width // ROW)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % ROW)


def pack_rows(m: int, entries: array[int], backend_ids: Sequence[int], digest: int) -> bytes:
    """The value rows of a table's BPF inner array map (key: u32 row index), concatenated, row 0 first.

    Everything in host order (little-endian on x86), as the BPF program reads it (struct
    kp_maglev_hdr and lib/maglev.h). Row 0, the header: u32 m, u32 n (backends), u16 width
    (entry_width(n)), u16 0, u32 list_row (1 + table_rows(m, width)), u32 digest, zeros. Rows 1 ..:
    the m entries, `width` bytes each, ROW // width a row. Rows list_row ..: backend_ids (u32),
    LIST_PER_ROW a row. The last row of each part is zero-padded. entries[j] indexes backend_ids."""
    n = len(backend_ids)
    if len(entries) != m or m == 0:
        raise ValueError(f"{len(entries)} entries for a table of {m}")
    if n == 0 or n > MAX_BACKENDS:
        raise ValueError(f"{n} backends: 1 to {MAX_BACKENDS}")
    if not 0 <= digest <= _M32:
        raise ValueError(f"digest {digest} is not a u32")
    if entries.typecode != "H":
        try:
            entries = array("H", entries)
        except OverflowError:
            raise ValueError("entries out of range") from None
    try:
        ids = array("I", backend_ids)
    except OverflowError:
        raise ValueError("backend ids must be u32") from None
    width = entry_width(n)
    raw = entries.tobytes()
    if width == 1:
        low, high = (raw[0::2], raw[1::2]) if _LITTLE else (raw[1::2], raw[0::2])
        # range checks at C speed: every high byte zero, every low byte below n
        if high.count(0) != m or low.translate(None, bytes(range(n))):
            raise ValueError(f"entries must be below {n}")
        raw = low
    elif max(entries) >= n:
        raise ValueError(f"entries must be below {n}")
    header = _HEADER.pack(m, n, width, 0, 1 + table_rows(m, width), digest)
    return b"".join((_pad(header), _pad(raw), _pad(ids.tobytes())))
