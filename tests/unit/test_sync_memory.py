"""What keeps the agent's memory low at scale: chunked applies, backend reference counts kept in the
programmed values, packed EndpointSlice endpoints, kopf without per-object memories."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from kproxy import abi
from kproxy.abi import Scope, ip_to_nbo
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.desired import BackendRef, Frontend
from kproxy.model import Endpoint, EndpointConditions, PackedEndpoints, endpoint_rows, parse_endpoint_slice
from kproxy.sync import Syncer
from kproxy.sync import syncer as syncer_mod
from kproxy.sync import writer as writer_mod


def fe(service: str, address: str, backends: list[str], proto: str = "TCP") -> Frontend:
    refs = tuple(BackendRef(a, 8080, proto) for a in backends)
    return Frontend(service, "http", "ClusterIP", address, 80, proto, Scope.EXT, 0, 0, refs)


def desired(gen: int) -> dict[str, list[Frontend]]:
    """12 services; neighbours share backends, so references span chunks; gen moves some away."""
    out = {}
    for i in range(12):
        bes = [f"10.1.0.{i}", f"10.1.0.{i + 1}"] + ([f"10.2.{gen}.{i}"] if i % 3 else [])
        out[f"default/s{i}"] = [fe(f"default/s{i}", f"10.96.0.{i + 1}", bes, "UDP" if i % 2 else "TCP")]
    return out


def state(maps: MemoryMapSet) -> tuple[dict[Any, Any], set[str]]:
    """Every frontend's backend addresses in slot order, and the set of backend addresses."""
    out = {}
    for k, v in maps.svc4.items():
        if k.slot == 0:
            addrs = []
            for i in range(1, v.count + 1):
                sv = maps.svc4.get(abi.Svc4Key(k.addr, k.port, i, k.proto, k.scope))
                assert sv is not None
                b = maps.be4.get(ctypes.c_uint32(sv.backend_id))
                assert b is not None, "a slot points at a missing backend"
                addrs.append(abi.nbo_to_ip(b.addr))
            out[(k.addr, k.port, k.proto)] = addrs
    bes = {abi.nbo_to_ip(v.addr) for _, v in maps.be4.items()}
    return out, bes


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_apply_ends_like_one_batch(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(syncer_mod, "APPLY_CHUNK", chunk)
    maps = MemoryMapSet()
    s = Syncer(maps)
    r = s.apply(desired(0), full=True)
    assert r.services == 12 and not r.failed
    first, bes = state(maps)
    assert len(first) == 12 and len(bes) == 13 + 8
    r = s.apply(desired(1), full=True)
    after, bes = state(maps)
    s1 = (ip_to_nbo("10.96.0.2"), abi.port_to_nbo(80), abi.IPPROTO_UDP)
    assert sorted(after[s1]) == ["10.1.0.1", "10.1.0.2", "10.2.1.1"]
    # the gen-0 backends are gone from kp_be4, the shared ones stayed
    assert not any(b.startswith("10.2.0.") for b in bes)
    assert {f"10.1.0.{i}" for i in range(13)} <= bes
    assert r.be4_deletes == 8
    # removing one of two services sharing a backend keeps it; removing both frees it
    d = desired(1)
    d["default/s3"] = []
    s.apply(d)
    assert "10.1.0.3" in state(maps)[1] and "10.1.0.4" in state(maps)[1]
    d["default/s2"] = []
    s.apply(d)
    assert "10.1.0.3" not in state(maps)[1]
    assert len(s.v4._backends.vals) == len(maps.be4)


def test_chunked_apply_flushes_udp_conntrack_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncer_mod, "APPLY_CHUNK", 2)
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply(desired(0), full=True)
    walks = []
    orig = writer_mod.flush_udp_conntrack

    def counting(ct4: Any, backends: set[int], pairs: set[tuple[int, int]]) -> int:
        walks.append((set(backends), set(pairs)))
        return orig(ct4, backends, pairs)

    monkeypatch.setattr(writer_mod, "flush_udp_conntrack", counting)
    s.apply(desired(1), full=True)
    assert len(walks) == 1  # one walk of kp_ct4 for all chunks
    assert len(walks[0][0]) == 4  # the freed UDP gen-0 backends of s1, s5, s7, s11


def test_adopt_then_unchanged_full_apply_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncer_mod, "APPLY_CHUNK", 4)
    maps = MemoryMapSet()
    Syncer(maps).apply(desired(0), full=True)
    before = (dict(maps.svc4.data), dict(maps.be4.data))
    s2 = Syncer(maps)
    s2.adopt()
    r = s2.apply(desired(0), full=True)
    assert r.writes == 0
    assert (dict(maps.svc4.data), dict(maps.be4.data)) == before
    # the adopted backends' references moved from the orphans to the services
    s2.apply({"default/s0": []})
    assert "10.1.0.0" not in state(maps)[1] and "10.1.0.1" in state(maps)[1]


def slice_raw(endpoints: list[dict[str, Any]], address_type: str = "IPv4") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def test_common_slices_are_packed_and_read_back_equal() -> None:
    eps = [
        {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "nodeName": "n1", "zone": "a"},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "terminating": True}, "nodeName": "n2"},
        {"addresses": ["10.0.0.3"]},
    ]
    es = parse_endpoint_slice(slice_raw(eps))
    assert type(es.endpoints) is PackedEndpoints
    expected = [
        Endpoint(["10.0.0.1"], EndpointConditions(True, None, None), "n1", "a"),
        Endpoint(["10.0.0.2"], EndpointConditions(False, None, True), "n2", None),
        Endpoint(["10.0.0.3"], EndpointConditions(), None, None),
    ]
    assert list(es.endpoints) == expected
    assert es.endpoints == expected and expected == es.endpoints
    assert es.endpoints[1] == expected[1] and es.endpoints[-1] == expected[2]
    assert es.endpoints[0:2] == expected[0:2]
    assert len(es.endpoints) == 3
    with pytest.raises(IndexError):
        es.endpoints[3]
    assert list(endpoint_rows(es.endpoints)) == [
        (e.addresses[0], e.conditions, e.node_name, e.zone, None) for e in expected
    ]
    # equal slices compare equal (the store skips unchanged objects), a changed one does not
    assert parse_endpoint_slice(slice_raw(eps)) == es
    eps[2]["conditions"] = {"ready": False}
    assert parse_endpoint_slice(slice_raw(eps)) != es


def test_uniform_node_is_stored_once_and_unusual_slices_stay_lists() -> None:
    eps = [{"addresses": [f"10.0.0.{i}"], "nodeName": "n1"} for i in range(1, 5)]
    es = parse_endpoint_slice(slice_raw(eps))
    assert type(es.endpoints) is PackedEndpoints
    assert [e.node_name for e in es.endpoints] == ["n1"] * 4
    two = parse_endpoint_slice(slice_raw([{"addresses": ["10.0.0.1", "10.0.0.2"]}]))
    assert type(two.endpoints) is list and two.endpoints[0].addresses == ["10.0.0.1", "10.0.0.2"]
    hinted = parse_endpoint_slice(
        slice_raw([{"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "a"}]}}])
    )
    assert type(hinted.endpoints) is list
    fqdn = parse_endpoint_slice(slice_raw([{"addresses": ["a.example"]}], "FQDN"))
    assert type(fqdn.endpoints) is list
    empty = parse_endpoint_slice(slice_raw([]))
    assert list(empty.endpoints) == []


def test_backend_table_behaves_like_the_dict_it_replaced() -> None:
    """kproxy.sync.table.BackendTable against a dict: random puts, counts and pops over sparse ids
    (pages come and go), values using all three words."""
    import random

    from kproxy.sync.state import REF1, VAL_MASK
    from kproxy.sync.table import PAGE, BackendTable

    rng = random.Random(7)
    t = BackendTable()
    d: dict[int, int] = {}
    for _ in range(20_000):
        bid = rng.choice((rng.randrange(3 * PAGE), rng.randrange(1 << 20)))
        op = rng.randrange(9)
        if op == 0:
            v = rng.getrandbits(rng.choice((30, 70, 130)))
            t[bid] = d[bid] = v
        elif op == 1:
            v = rng.getrandbits(100)
            t.put_keeping_count(bid, v)
            prev = d.get(bid)
            d[bid] = v if prev is None else v | (prev - (prev & VAL_MASK))
        elif op == 2 and bid in d:
            t.add_ref(bid)
            d[bid] += REF1
        elif op == 3:
            cur = d.get(bid)
            last = t.drop_ref(bid)
            if cur is None:
                assert last is None
            elif cur < 2 * REF1:
                assert last is True
                d[bid] = cur & VAL_MASK
            else:
                assert last is False
                d[bid] = cur - REF1
        elif op == 4:
            assert t.pop(bid, None) == d.pop(bid, None)
        elif op == 5:
            t.update({bid: 5, bid + 1: 6})
            d.update({bid: 5, bid + 1: 6})
        elif op == 6:  # the batch forms the syncer uses
            batch = {bid: rng.getrandbits(100), bid + 2: rng.getrandbits(70)}
            t.update_keeping_counts(batch)
            for b, v in batch.items():
                prev = d.get(b)
                d[b] = v if prev is None else v | (prev - (prev & VAL_MASK))
            present = [b for b in (bid, bid + 2) if b in d]
            t.add_refs(present)
            for b in present:
                d[b] += REF1
        elif op == 7:
            some = [bid, bid + 1, bid + 2]
            assert t.unreferenced(some) == {b for b in some if d.get(b, 0) < REF1}
            gone = t.drop_refs(some)
            want = []
            for b in some:
                if b in d:
                    if d[b] < 2 * REF1:
                        d[b] &= VAL_MASK
                        want.append(b)
                    else:
                        d[b] -= REF1
            assert gone == want
        else:
            some = [bid, bid + 1, 1 << 21]
            assert t.pop_many(some) == {b: d.pop(b) for b in some if b in d}
        assert t.get(bid) == d.get(bid) and (bid in t) == (bid in d)
        assert t.refs(bid) == d.get(bid, 0) >> 128
        assert t.value(bid) == (None if bid not in d else d[bid] & VAL_MASK)
    assert len(t) == len(d) and list(t) == sorted(d) and dict(t.items()) == d and t == d
    assert t.isdisjoint([-1, 1 << 40]) and not t.isdisjoint(list(d)[:1])
    for bid in list(d):
        del t[bid]
    assert len(t) == 0 and not t._pages  # every page went with its last id
    with pytest.raises(KeyError):
        t.add_ref(1)


def test_backend_table_pop_many_frees_pages_like_pop() -> None:
    from kproxy.sync.table import PAGE, BackendTable

    t = BackendTable()
    t.update({b: b + 1 for b in range(3 * PAGE)})
    t.add_ref(5)
    got = t.pop_many([5, 6, 10**9, 5, *range(PAGE, 2 * PAGE)])
    assert got[5] == 6 | 1 << 128 and got[6] == 7 and 10**9 not in got and len(got) == PAGE + 2
    assert len(t) == 2 * PAGE - 2 and sorted(t._pages) == [0, 2]  # the middle page went
    assert list(t) == [b for b in range(3 * PAGE) if b not in (5, 6) and not PAGE <= b < 2 * PAGE]
    t.pop_many(list(t))
    assert not t and not t._pages


def test_backend_index_behaves_like_a_dict() -> None:
    """kproxy.sync.table.BackendIndex against a dict: ids whose values carry keys of every shape a
    BKey takes (TCP, UDP, SCTP, node indexes past 8 and 32 bits' worth of nodes...), through growth,
    removals (probe chains across removed slots) and rebuilds."""
    import random

    from kproxy.sync.state import NODE_SHIFT, bkey, key_of_val
    from kproxy.sync.table import BackendIndex, BackendTable

    rng = random.Random(11)
    table = BackendTable()
    ix = BackendIndex(table)
    d: dict[int, int] = {}  # key -> id
    next_id = 1
    for step in range(40_000):
        node = rng.choice((0, 1, rng.randrange(300), 16383, (1 << 32) - 1))
        proto = rng.choice((6, 6, 17, 132))
        addr = ip_to_nbo(f"10.0.{rng.randrange(4)}.{rng.randrange(256)}")  # few: keys come back
        key = bkey(addr, rng.randrange(3), proto, node)
        op = rng.randrange(3)
        if (op < 2 or step < 4000) and key not in d:
            val = (key & ((1 << 56) - 1)) | rng.getrandbits(40) << 56 | node << NODE_SHIFT
            assert key_of_val(val) == key
            table[next_id] = val | rng.randrange(1, 4) << 128
            ix.add([(next_id, key)])
            d[key] = next_id
            next_id += 1
        elif op == 2 and key in d:
            bid = d.pop(key)
            ix.remove([(bid, key)])
            del table[bid]
        assert ix.get_many([key, key ^ 1 << 40]) == [d.get(key), d.get(key ^ 1 << 40)]
        assert len(ix) == len(d)
    assert dict(ix.items()) == d
    assert ix.get_many(list(d)) == list(d.values())
    ix.remove([(bid, key) for key, bid in d.items()])
    assert len(ix) == 0 and list(ix.items()) == []
    with pytest.raises(ValueError, match="out of range"):
        ix.add([(0, 1)])


def test_backend_index_stays_small_and_rebuilds_past_removed_ids() -> None:
    """100,000 backends in ~2 MB of index (a dict of ints took ~10 MB); removing and re-adding them
    all, again and again, rebuilds the table instead of growing it."""
    from kproxy.sync.state import NODE_SHIFT, bkey
    from kproxy.sync.table import BackendIndex, BackendTable

    table = BackendTable()
    ix = BackendIndex(table)
    keys = [
        bkey(ip_to_nbo(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"), 8080, 6, i % 50) for i in range(100_000)
    ]

    def val(key: int) -> int:
        return (key & ((1 << 56) - 1)) | (key >> 56) << NODE_SHIFT

    bid = 0
    for key in keys:
        bid += 1
        table[bid] = val(key)
        ix.add([(bid, key)])
    size = len(ix._slots)
    assert 8 * size <= 2200_000
    for _ in range(4):
        ix.remove([(b, key) for b, key in enumerate(keys, bid - len(keys) + 1)])
        table.clear()
        for key in keys:
            bid += 1
            table[bid] = val(key)
            ix.add([(bid, key)])
        assert len(ix) == 100_000 and len(ix._slots) <= size
    assert ix.get_many(keys) == list(range(bid - len(keys) + 1, bid + 1))


def test_backend_table_costs_what_it_holds_after_churn() -> None:
    """Ids are never reused: after churn the live ids are spread thin (here a quarter of 400,000).
    The table's pages hold only present ids, so it still costs ~24 bytes an id plus a little per
    page, not a full page per few ids (a page of fixed slots took over 100 bytes an id here)."""
    import random
    import sys

    from kproxy.sync.table import BackendTable

    rng = random.Random(3)
    t = BackendTable()
    t.update({b: (b << 64) | 0x1F90 for b in range(1, 400_001)})
    t.pop_many([b for b in range(1, 400_001) if rng.random() < 0.75])
    size = sum(sys.getsizeof(p) for p in t._pages.values())
    assert 90_000 < len(t) < 110_000
    assert size / len(t) < 48, size / len(t)
    assert all(t[b] == (b << 64) | 0x1F90 for b in list(t)[:1000])


def test_compact_dicts_shrinks_what_deletions_left_oversized() -> None:
    """Deleting never shrinks a dict, and adding after deletions grows it to three times its entries:
    10,000 Services that lost and regained 1,000 left every table keyed by Service twice its size."""
    import sys
    from collections import Counter

    from kproxy.heap import compact_dicts

    d = {f"default/s{i}": i for i in range(10_000)}
    c = Counter({f"10.96.0.{i}": 2 for i in range(2000)})
    fresh = sys.getsizeof(d)
    for i in range(1000):
        del d[f"default/s{i}"]
        del c[f"10.96.0.{i}"]
    for i in range(1000):
        d[f"default/t{i}"] = i
        c[f"10.97.0.{i}"] = 3
    assert sys.getsizeof(d) > 1.5 * fresh
    want, want_c = dict(d), dict(c)
    small = {1: 2}
    assert compact_dicts(d, c, small) > fresh // 2
    assert sys.getsizeof(d) <= fresh and d == want and dict(c) == want_c  # a Counter's counts not added
    assert compact_dicts(d, c) == 0  # nothing left to gain


def test_store_tables_do_not_double_after_churn() -> None:
    """The pipeline compacts the store's (and the syncer's) tables with its heap trims: after 20% of
    the Services went and others came, the store's table is as big as before."""
    import sys

    from unit_objects import NODE, svc_raw

    from kproxy.store import ClusterStore

    st = ClusterStore(NODE)
    for i in range(5000):
        st.upsert_service(svc_raw(name=f"s{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}"))
    before = sys.getsizeof(st.services)
    for i in range(1000):
        st.delete_service("default", f"s{i}")
    for i in range(1000):
        st.upsert_service(svc_raw(name=f"t{i}", cluster_ip=f"10.97.{i // 250}.{i % 250 + 1}"))
    assert sys.getsizeof(st.services) > before
    assert st.compact() > 0 and sys.getsizeof(st.services) <= before and len(st.services) == 5000


def test_wide_backend_table_and_dict_index_behave_as_the_packed_ones() -> None:
    """kproxy.sync.table.WideBackendTable (IPv6 values, count above bit 320) against BackendTable (the
    same operations on IPv4-width values) and DictBackendIndex against BackendIndex: random puts,
    counts, pops and lookups agree."""
    import random

    from kproxy.sync.family import FAMILY4, FAMILY6
    from kproxy.sync.table import BackendIndex, BackendTable, DictBackendIndex, WideBackendTable

    rng = random.Random(7)
    packed, wide = BackendTable(), WideBackendTable(FAMILY6.refs_shift)
    pix, wix = BackendIndex(packed), DictBackendIndex()
    widen = 1 << 256  # a v4 value moved up into bits no IPv4 value has: the wide table keeps them
    for _ in range(3000):
        op = rng.random()
        bid = rng.randrange(1, 300)
        if op < 0.3:
            key = FAMILY4.bkey(rng.randrange(1 << 32), rng.randrange(3), 6, rng.randrange(3))
            val = key & FAMILY4.bk_mask | (key >> 56) << 96 | rng.randrange(2) << 56
            if bid not in packed:
                packed[bid] = val
                wide[bid] = val | widen
                pix.add([(bid, key)])
                wix.add([(bid, key)])
        elif op < 0.5 and bid in packed:
            packed.add_refs([bid])
            wide.add_refs([bid])
        elif op < 0.65:
            assert sorted(packed.drop_refs([bid])) == sorted(wide.drop_refs([bid]))
        elif op < 0.75:
            got_p, got_w = packed.pop_many([bid]), wide.pop_many([bid])
            assert got_p.keys() == got_w.keys()
            for b, v in got_p.items():
                pix.remove([(b, FAMILY4.key_of_val(v))])
                wix.remove([(b, FAMILY4.key_of_val(v))])
        else:
            some = [rng.randrange(1, 300) for _ in range(5)]
            assert packed.unreferenced(some) == wide.unreferenced(some)
            assert [packed.refs(b) for b in some] == [wide.refs(b) for b in some]
        assert len(packed) == len(wide) and list(packed) == list(wide)
    keys = [FAMILY4.key_of_val(packed.value(b) or 0) for b in packed]
    assert pix.get_many(keys) == wix.get_many(keys) == list(packed)
    assert all(wide.value(b) == (packed.value(b) or 0) | widen for b in packed)
