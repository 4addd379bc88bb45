"""kproxy.sync.maglev: the Maglev table (balance, determinism, minimal disruption), its native and Python
fills, the flow hash the BPF program mirrors, and the rows of the BPF inner array."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import struct
from array import array
from collections import Counter
from collections.abc import Sequence

import pytest

from kproxy import abi, config
from kproxy.sync import maglev as mg

M = mg.DEFAULT_SIZE
SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 31, 97, 101, 251, 257, 509, 1009, 1021, 2039, 4093)


def names_of(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct backend names, IPv4 and IPv6 mixed."""
    rng = random.Random(seed)
    out: set[bytes] = set()
    while len(out) < count:
        if rng.random() < 0.7:
            addr = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        else:
            addr = str(ipaddress.IPv6Address((0xFD00 << 112) | rng.getrandbits(64)))
        out.add(mg.backend_name(addr, rng.choice((80, 443, 8080, rng.randrange(1, 65536)))))
    return sorted(out, key=lambda _: rng.random())  # not in byte order


def slot_names(names: Sequence[bytes], m: int = M) -> list[bytes]:
    """Slot j -> the name of its backend."""
    order, entries = mg.build(names, m)
    by_index = [names[k] for k in order]
    return [by_index[k] for k in entries]


def reference_fill(offsets: Sequence[int], skips: Sequence[int], m: int) -> list[int]:
    """The paper's Pseudocode 1 as printed: permutation[i][j] = (offset + j * skip) % m, next[i] counts."""
    n = len(offsets)
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            c = (offsets[i] + nxt[i] * skips[i]) % m
            while entry[c] >= 0:
                nxt[i] += 1
                c = (offsets[i] + nxt[i] * skips[i]) % m
            entry[c] = i
            nxt[i] += 1
            filled += 1
            if filled == m:
                return entry


def random_permutation(rng: random.Random, n: int, m: int) -> tuple[array[int], array[int]]:
    offsets = array("I", (rng.randrange(m) for _ in range(n)))
    skips = array("I", (rng.randrange(1, m) for _ in range(n)))
    return offsets, skips


# ---- sizes, names and permutations ----


def test_sizes() -> None:
    assert all(mg._is_prime(p) for p in mg.PRIMES) and list(mg.PRIMES) == sorted(mg.PRIMES)
    assert not any(mg._is_prime(q) for q in (0, 1, 4, 9, 16383, 65535, 65537 * 3))
    assert mg.DEFAULT_SIZE in mg.PRIMES and mg.ROW == 64 and mg.LIST_PER_ROW == mg.ROW // 4
    # the CLI's copy (kproxy.config imports no sync module)
    assert config.MAGLEV_PRIMES == mg.PRIMES and config.MAGLEV_DEFAULT_SIZE == mg.DEFAULT_SIZE


def test_backend_name() -> None:
    assert mg.backend_name("10.0.0.1", 8080) == b"10.0.0.1:8080"
    assert mg.backend_name("fd00::1", 8080) == b"[fd00::1]:8080"
    assert mg.backend_name("::ffff:10.0.0.1", 0) == b"[::ffff:10.0.0.1]:0"
    for port in (-1, 65536):
        with pytest.raises(ValueError):
            mg.backend_name("10.0.0.1", port)


def test_permutation_follows_the_spec() -> None:
    names = [b"10.0.0.1:80", b"[fd00::1]:8080", b""]
    offsets, skips = mg.permutation(names, 251)
    assert offsets.typecode == skips.typecode == "I" and len(offsets) == len(skips) == 3
    for name, off, skip in zip(names, offsets, skips, strict=True):
        d = hashlib.blake2b(name, digest_size=16, person=b"kproxy-maglev").digest()
        assert off == int.from_bytes(d[:8], "little") % 251
        assert skip == int.from_bytes(d[8:], "little") % 250 + 1
    # pinned: every node, of every kproxy version, must compute the same preference lists
    offsets, skips = mg.permutation([b"10.0.0.1:80", b"[fd00::1]:8080"], 16381)
    assert (offsets.tolist(), skips.tolist()) == ([14870, 5877], [11205, 12711])
    for m in (0, 1, 16383):
        with pytest.raises(ValueError):
            mg.permutation(names, m)


def test_pinned_table() -> None:
    """The same backend set gives the same table on nodes running different kproxy versions."""
    _, entries = mg.build([mg.backend_name(f"10.0.0.{i}", 80) for i in range(1, 4)], 251)
    assert entries.tolist()[:24] == [1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 2, 1, 2, 1, 2, 2, 2, 2, 2, 1, 1, 1, 0, 1]
    assert hashlib.sha256(entries.tobytes()).hexdigest() == (
        "fda4ff26b19efe76e6d82a28fa4080885749b0421471acf76f51cd5addb40882"
    )


# ---- balance ----


@pytest.mark.parametrize("m", [M, 32749])
def test_every_backend_gets_its_share(m: int) -> None:
    names = names_of(100, seed=1)
    for n in range(1, 101):
        counts = Counter(mg.build(names[:n], m)[1])
        assert sorted(counts) == list(range(n)), n
        lo, hi = m // n, -(-m // n)
        for k, c in counts.items():
            assert lo <= c <= hi, (n, k, c)
            assert abs(c / m - 1 / n) <= 0.01 / n, (n, k, c)


@pytest.mark.parametrize("m", [251, 257, 1021])
def test_small_tables_are_balanced_too(m: int) -> None:
    names = names_of(60, seed=2)
    for n in (1, 2, 7, 59, 60):
        counts = Counter(mg.build(names[:n], m)[1])
        assert len(counts) == n and sum(counts.values()) == m
        assert min(counts.values()) == m // n and max(counts.values()) == -(-m // n)


def test_as_many_backends_as_the_table_allows() -> None:
    counts = Counter(mg.build(names_of(250, seed=3), 251)[1])
    assert sorted(counts.values()) == [1] * 249 + [2]


# ---- determinism ----


def test_input_order_does_not_matter() -> None:
    names = names_of(37, seed=4)
    order, entries = mg.build(names, M)
    assert [names[k] for k in order] == sorted(names)
    node_a = slot_names(names)
    for seed in range(3):
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        node_b = slot_names(shuffled)
        assert sum(a == b for a, b in zip(node_a, node_b, strict=True)) == M  # 100 % agreement
    # and the table does depend on the names: another backend set agrees on only a fraction of slots
    other = slot_names(names[:-1] + [mg.backend_name("192.0.2.1", 1)])
    assert sum(a == b for a, b in zip(node_a, other, strict=True)) < M


def test_build_errors() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        mg.build([b"a:1", b"b:1", b"a:1"], 251)
    with pytest.raises(ValueError):
        mg.build([], 251)
    with pytest.raises(ValueError):
        mg.build([b"a:1"], 250)


# ---- minimal disruption ----
#
# Ideal: removing one of N backends moves only its own slots (1/N of the table), adding one moves only
# the ~1/(N+1) the newcomer takes. Maglev moves some slots between survivors as well, more as m / N
# shrinks (the paper sizes m >= 100 N). Measured at m = 16381 over 2,000 random backend sets (N = 2, 3,
# 5, 10, 20, 50, 100; one removal and one addition each): survivors' moved share averages 0.1-0.5 % for
# N <= 10, 0.7 % at 20, 1.0 % at 50, 1.35 % at 100; its 99th percentile is at most 1.6 % and the worst
# case 3.2 % (a set of 5). Bounds: every change moves at most SURVIVORS_MAX of the table between
# survivors, and the five changes of a test at most SURVIVORS_MEAN on average. A modulo hash (slot =
# hash % N) would move ~(N-1)/N.
SURVIVORS_MAX = 0.04
SURVIVORS_MEAN = 0.02


@pytest.mark.parametrize("n", [2, 5, 10, 50, 100])
def test_removing_a_backend_moves_little_else(n: int) -> None:
    names = names_of(n, seed=10 + n)
    before = slot_names(names)
    shares = []
    for gone in names[:5]:
        after = slot_names([x for x in names if x != gone])
        assert gone not in after
        own = sum(a == gone for a in before)
        assert own in (M // n, -(-M // n))
        moved = sum(a != gone and a != b for a, b in zip(before, after, strict=True)) / M
        if n == 2:
            assert moved == 0  # the one survivor had every other slot already
        assert moved <= SURVIVORS_MAX, (gone, moved)
        total = sum(a != b for a, b in zip(before, after, strict=True)) / M
        assert total == pytest.approx(own / M + moved)
        assert total <= 1 / n + 1 / M + SURVIVORS_MAX
        shares.append(moved)
    assert sum(shares) / len(shares) <= SURVIVORS_MEAN, shares


@pytest.mark.parametrize("n", [2, 5, 10, 50, 100])
def test_adding_a_backend_moves_little_else(n: int) -> None:
    names = names_of(n + 5, seed=20 + n)
    before = slot_names(names[:n])
    shares = []
    for new in names[n:]:
        after = slot_names(names[:n] + [new])
        taken = sum(b == new for b in after)
        assert taken in (M // (n + 1), -(-M // (n + 1)))
        moved = sum(b != new and a != b for a, b in zip(before, after, strict=True)) / M
        assert moved <= SURVIVORS_MAX, (new, moved)
        shares.append(moved)
    assert sum(shares) / len(shares) <= SURVIVORS_MEAN, shares


# ---- fill: native and Python ----


def test_fill_matches_the_paper_pseudocode() -> None:
    rng = random.Random(5)
    for m in SMALL_PRIMES[1:]:
        n = rng.randrange(1, min(m, 200))
        offsets, skips = random_permutation(rng, n, m)
        assert mg.fill(offsets, skips, m).tolist() == reference_fill(offsets, skips, m), (m, n)
    offsets, skips = mg.permutation(names_of(10, seed=6), M)
    assert mg._fill_python(offsets, skips, M).tolist() == reference_fill(offsets, skips, M)


@pytest.fixture
def native() -> object:
    if not mg.native_available():
        pytest.skip(f"{mg.NATIVE_LIB} is not built (make native)")
    return mg._native


def test_native_fill_equals_python_fill(native: object) -> None:
    rng = random.Random(7)
    cases = [(m, rng.randrange(1, min(m, 1000))) for m in SMALL_PRIMES[1:] + mg.PRIMES for _ in range(2)]
    cases += [(251, 250), (131071, 65535), (3, 1), (2, 1)]
    for m, n in cases:
        offsets, skips = random_permutation(rng, n, m)
        a = mg._fill_native(native, offsets, skips, m)  # type: ignore[arg-type]
        assert a.typecode == "H" and len(a) == m
        assert a == mg._fill_python(offsets, skips, m), (m, n)
    assert mg.fill(offsets, skips, m) == a  # fill() takes the native path


@pytest.mark.timeout(10)
def test_native_fill_refuses_what_would_loop(native: object) -> None:
    fill = native.kp_maglev_fill  # type: ignore[attr-defined]
    # m = 10 is no prime: skips of 5 visit two slots each, the table never fills
    with pytest.raises(ValueError):
        mg._fill_native(native, array("I", [0, 1]), array("I", [5, 5]), 10)  # type: ignore[arg-type]
    out = array("H", bytes(2 * 7))
    good = array("I", [1, 2])
    ptr = good.buffer_info()[0]
    assert fill(7, 2, ptr, ptr, out.buffer_info()[0]) == 0
    for m, n, offsets, skips in (
        (0, 1, [0], [1]),
        (7, 0, [0], [1]),
        (7, 8, [0] * 8, [1] * 8),
        (7, 1, [7], [1]),
    ):
        o, s = array("I", offsets), array("I", skips)
        assert fill(m, n, o.buffer_info()[0], s.buffer_info()[0], out.buffer_info()[0]) < 0, (m, n)
    for bad_skip in (0, 7):
        s = array("I", [bad_skip])
        assert fill(7, 1, ptr, s.buffer_info()[0], out.buffer_info()[0]) < 0


def test_python_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    offsets, skips = mg.permutation(names_of(20, seed=8), 4093)
    expected = reference_fill(offsets, skips, 4093)
    monkeypatch.setattr(mg, "NATIVE_LIB", mg.NATIVE_LIB.with_name("libkp-missing.so"))
    monkeypatch.setattr(mg, "_native", None)
    monkeypatch.setattr(mg, "_native_tried", False)
    with caplog.at_level(logging.WARNING, logger=mg.__name__):
        assert not mg.native_available()
        assert mg.fill(offsets, skips, 4093).tolist() == expected
        assert not mg.native_available()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # once
    assert "libkp-missing.so" in caplog.records[0].getMessage()


def test_fill_errors() -> None:
    o, s = array("I", [0, 1]), array("I", [1, 2])
    with pytest.raises(ValueError):
        mg.fill(array("I"), array("I"), 251)
    for m in (2, 4, 15, 16383, 2**31 - 1 + 2):  # not above n=2, or no prime
        with pytest.raises(ValueError):
            mg.fill(o, s, m)
    with pytest.raises(ValueError):
        mg.fill(o, array("I", [1]), 251)
    for offsets, skips in (([0, 251], [1, 1]), ([0, 0], [0, 1]), ([0, 0], [1, 251])):
        with pytest.raises(ValueError):
            mg.fill(array("I", offsets), array("I", skips), 251)
    many = array("I", bytes(4 * 65536))
    with pytest.raises(ValueError):
        mg.fill(many, array("I", [1]) * 65536, 131071)
    # a prime above n that is not one of PRIMES is fine (tests use them)
    assert mg.fill(o, s, 7).tolist() == reference_fill(o, s, 7)
    assert mg.fill(array("L", [0, 1]), array("L", [1, 2]), 7).tolist() == reference_fill(o, s, 7)


# ---- flow hash ----


def jhash_final_reference(a: int, b: int, c: int) -> int:
    """include/linux/jhash.h's __jhash_final, step by step as a table of (x, y, rotation):
    x ^= y; x -= rol32(y, rotation)."""

    def rol(w: int, s: int) -> int:
        return ((w << s) & 0xFFFFFFFF) | (w >> (32 - s))

    steps = (
        ("c", "b", 14), ("a", "c", 11), ("b", "a", 25),
        ("c", "b", 16), ("a", "c", 4), ("b", "a", 14),
        ("c", "b", 24),
    )  # fmt: skip
    v = {"a": a, "b": b, "c": c}
    for x, y, r in steps:
        v[x] = ((v[x] ^ v[y]) - rol(v[y], r)) & 0xFFFFFFFF
    return v["c"]


def flow_hash_reference(addr: str, sport: int, dport: int, proto: int) -> int:
    packed = ipaddress.ip_address(addr).packed
    fold = 0
    for i in range(0, len(packed), 4):
        fold ^= int.from_bytes(packed[i : i + 4], "big")
    init = (0xDEADBEEF + 12) & 0xFFFFFFFF
    return jhash_final_reference(
        (fold + init) & 0xFFFFFFFF, ((sport << 16 | dport) + init) & 0xFFFFFFFF, (proto + init) & 0xFFFFFFFF
    )


# Computed by a C program with jhash_3words(fold, sport << 16 | dport, proto, 0) copied from
# include/linux/jhash.h, the address folded with inet_pton and ntohl.
FLOW_VECTORS = [
    ("10.0.0.1", 12345, 80, 6, 0x5A18B178),
    ("192.168.1.100", 65535, 443, 17, 0xCBCBD775),
    ("0.0.0.0", 0, 0, 0, 0x1B68E557),
    ("255.255.255.255", 65535, 65535, 132, 0xFD6EB638),
    ("fd00::1", 40000, 8080, 6, 0x4B9BF98C),
    ("2001:db8::abcd:1234", 1, 53, 17, 0xA3E2F4EC),
    ("::", 0, 0, 0, 0x1B68E557),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 65535, 255, 0x4D0379B9),
    ("::ffff:10.0.0.1", 12345, 80, 6, 0x3B9331DB),
]


@pytest.mark.parametrize(("addr", "sport", "dport", "proto", "expected"), FLOW_VECTORS)
def test_flow_hash_vectors(addr: str, sport: int, dport: int, proto: int, expected: int) -> None:
    assert flow_hash_reference(addr, sport, dport, proto) == expected
    assert mg.flow_hash(ipaddress.ip_address(addr).packed, sport, dport, proto) == expected


def test_flow_hash_random_inputs() -> None:
    rng = random.Random(9)
    seen = set()
    for _ in range(300):
        packed = rng.randbytes(rng.choice((4, 16)))
        sport, dport, proto = rng.randrange(65536), rng.randrange(65536), rng.choice((6, 17, 132))
        h = mg.flow_hash(packed, sport, dport, proto)
        assert h == flow_hash_reference(str(ipaddress.ip_address(packed)), sport, dport, proto)
        seen.add(h)
    assert len(seen) == 300
    # each input counts: the ports are not symmetric, the protocol matters
    a = bytes([10, 0, 0, 1])
    assert len({mg.flow_hash(a, 1, 2, 6), mg.flow_hash(a, 2, 1, 6), mg.flow_hash(a, 1, 2, 17)}) == 3


def test_flow_hash_errors() -> None:
    for args in ((bytes(5), 1, 1, 6), (bytes(4), 65536, 1, 6), (bytes(4), 1, -1, 6), (bytes(16), 1, 1, 256)):
        with pytest.raises(ValueError):
            mg.flow_hash(*args)


# ---- rows of the BPF inner array ----


def lookup(rows: bytes, h: int) -> int:
    """kp_maglev_backend (bpfsrc/lib/maglev.h) over the packed rows: the backend id for hash h, or 0."""

    def row(i: int) -> bytes:
        return rows[i * mg.ROW : (i + 1) * mg.ROW]

    m, n, width, _, list_row, _ = struct.unpack_from("=IIHHII", row(0))
    if not m or not n:
        return 0
    idx = h % m
    if width == 1:
        slot = row(1 + idx // 64)[idx % 64]
    else:
        slot = struct.unpack_from("=H", row(1 + idx // 32), 2 * (idx % 32))[0]
    if slot >= n:
        return 0
    return struct.unpack_from("=I", row(list_row + slot // 16), 4 * (slot % 16))[0]


def test_entry_width_and_table_rows() -> None:
    assert [mg.entry_width(n) for n in (1, 255, 256, 257, 65535)] == [1, 1, 1, 2, 2]
    assert [mg.table_rows(m, 1) for m in (1, 64, 65, 251, 16381)] == [1, 1, 2, 4, 256]
    assert [mg.table_rows(m, 2) for m in (1, 32, 33, 251, 16381, 131071)] == [1, 1, 2, 8, 512, 4096]


@pytest.mark.parametrize(
    ("n", "width", "list_rows"), [(1, 1, 1), (16, 1, 1), (17, 1, 2), (256, 1, 16), (257, 2, 17)]
)
def test_pack_rows_layout(n: int, width: int, list_rows: int) -> None:
    m = M
    order, entries = mg.build(names_of(n, seed=n), m)
    ids = [1000 + 7 * k for k in range(n - 1)] + [0xFFFFFFFF]
    rows = mg.pack_rows(m, entries, ids, 0xCAFEF00D)
    t = mg.table_rows(m, width)
    assert t == (256 if width == 1 else 512)
    assert len(rows) == mg.ROW * (1 + t + list_rows)
    assert rows[:20] == struct.pack("<IIHHII", m, n, width, 0, 1 + t, 0xCAFEF00D)
    assert rows[20:64] == bytes(44)
    hdr = getattr(abi, "MaglevHdr", None)
    if hdr is not None:  # the ctypes twin of struct kp_maglev_hdr agrees
        h = hdr.from_buffer_copy(rows[:64])
        assert (h.m, h.n, h.width, h.pad, h.list_row, h.digest) == (m, n, width, 0, 1 + t, 0xCAFEF00D)
    table = rows[64 : 64 * (1 + t)]
    if width == 1:
        assert table[:m] == bytes(entries.tolist())
    else:
        assert table[: 2 * m] == struct.pack(f"<{m}H", *entries)
    assert table[width * m :] == bytes(len(table) - width * m)
    lists = rows[64 * (1 + t) :]
    assert lists[: 4 * n] == struct.pack(f"<{n}I", *ids)
    assert lists[4 * n :] == bytes(len(lists) - 4 * n)
    # what the BPF program reads for every slot is the backend id the table names there
    for j in range(m):
        assert lookup(rows, j + m * (j % 3)) == ids[entries[j]], j


def test_pack_rows_small_table() -> None:
    entries = array("H", [0, 1, 2] * 83 + [0, 1])  # m = 251
    rows = mg.pack_rows(251, entries, [5, 6, 7], 1)
    assert len(rows) == 64 * (1 + 4 + 1)
    assert rows[64 : 64 + 251] == bytes(entries.tolist()) and rows[64 + 251 : 64 * 5] == bytes(5)
    assert rows[64 * 5 :] == struct.pack("<3I", 5, 6, 7) + bytes(52)


def test_pack_rows_errors() -> None:
    e1 = array("H", [0, 1, 2, 1, 0, 2, 1])
    with pytest.raises(ValueError):
        mg.pack_rows(7, e1, [1, 2], 0)  # entry 2 with 2 backends
    with pytest.raises(ValueError):
        mg.pack_rows(7, array("H", [0, 1, 256, 1, 0, 2, 1]), [1, 2, 3], 0)  # width 1: a high byte
    with pytest.raises(ValueError):
        mg.pack_rows(8, e1, [1, 2, 3], 0)  # m is not len(entries)
    with pytest.raises(ValueError):
        mg.pack_rows(0, array("H"), [1], 0)
    with pytest.raises(ValueError):
        mg.pack_rows(7, e1, [], 0)
    for digest in (-1, 2**32):
        with pytest.raises(ValueError):
            mg.pack_rows(7, e1, [1, 2, 3], digest)
    for bad_id in (-1, 2**32):
        with pytest.raises(ValueError):
            mg.pack_rows(7, e1, [1, 2, bad_id], 0)
    wide = array("H", list(range(300)) + [299, 300])
    with pytest.raises(ValueError):
        mg.pack_rows(302, wide, list(range(300)), 0)  # width 2: entry 300 with 300 backends
    assert len(mg.pack_rows(302, wide, list(range(301)), 0)) == 64 * (1 + 10 + 19)
    with pytest.raises(ValueError):
        mg.pack_rows(7, e1, list(range(65536)), 0)
