"""Syncer against MemoryMap twins: write order, stable ids, adoption, flushing, full maps."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import pytest
from unit_objects import NODE, ep, slice_raw, svc_raw

from kproxy import abi
from kproxy.abi import Scope, SvcFlag, ip_to_nbo, port_to_nbo
from kproxy.bpf.mapapi import MapFullError, MemoryMap, MemoryMapSet
from kproxy.bpf.upkeep import orphaned_tcp_flows, sweep_conntrack, write_config
from kproxy.desired import BackendRef, Frontend
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, str, list[Any]]] = []


def recording(maps: MemoryMapSet, rec: Recorder) -> MemoryMapSet:
    for attr in ("svc4", "be4", "ct4", "aff4"):
        m: MemoryMap[Any, Any] = getattr(maps, attr)
        orig_put, orig_del = m.put_many, m.delete_many

        def put(items: Sequence[Any], _p=orig_put, _a=attr) -> None:
            rec.log.append((_a, "put", [(bytes(k), bytes(v)) for k, v in items]))
            _p(items)

        def delete(keys: Sequence[Any], _d=orig_del, _a=attr) -> int:
            rec.log.append((_a, "del", [bytes(k) for k in keys]))
            return _d(keys)

        m.put_many = put  # type: ignore[method-assign]
        m.delete_many = delete  # type: ignore[method-assign]
    return maps


def be(addr: str, port: int = 8080, proto: str = "TCP", **kw: Any) -> BackendRef:
    return BackendRef(addr, port, proto, **kw)


def fe(
    backends: Sequence[BackendRef],
    *,
    service: str = "default/web",
    address: str = "10.96.0.10",
    port: int = 80,
    proto: str = "TCP",
    scope: int = Scope.EXT,
    flags: int = 0,
    port_name: str = "http",
    retained: Sequence[BackendRef] = (),
    ftype: str = "ClusterIP",
) -> Frontend:
    return Frontend(service, port_name, ftype, address, port, proto, scope, flags, 0, tuple(backends),  # type: ignore[arg-type]
                    tuple(retained))  # fmt: skip


def slot0(maps: MemoryMapSet, address: str = "10.96.0.10", port: int = 80, proto: int = 6, scope: int = 0):
    return maps.svc4.get(abi.Svc4Key(ip_to_nbo(address), port_to_nbo(port), 0, proto, scope))


def slots(maps: MemoryMapSet, address: str = "10.96.0.10", port: int = 80, proto: int = 6) -> list[str]:
    """Backend addresses in slot order, checking every slot points at an existing backend."""
    s0 = slot0(maps, address, port, proto)
    assert s0 is not None
    out = []
    for i in range(1, s0.count + 1):
        v = maps.svc4.get(abi.Svc4Key(ip_to_nbo(address), port_to_nbo(port), i, proto, 0))
        assert v is not None and v.svc_id == s0.svc_id
        b = maps.be4.get(ctypes.c_uint32(v.backend_id))
        assert b is not None, f"slot {i} points at missing backend {v.backend_id}"
        out.append(abi.nbo_to_ip(b.addr))
    return out


def snapshot(maps: MemoryMapSet) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    return dict(maps.svc4.data), dict(maps.be4.data)


def test_cold_apply_programs_service_and_backends():
    maps = MemoryMapSet()
    s = Syncer(maps)
    r = s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2", local=True)])]})
    assert r.changed == ["default/web"] and not r.failed
    assert slots(maps) == ["10.0.0.1", "10.0.0.2"]
    s0 = slot0(maps)
    assert s0.count == 2 and s0.flags == 0 and s0.svc_id == s.svc_id("default/web", "http", "TCP")
    b = maps.be4.get(ctypes.c_uint32(s.backend_id("10.0.0.2", 8080, "TCP")))
    assert b.flags == abi.BackendFlag.LOCAL and abi.nbo_to_port(b.port) == 8080 and b.proto == 6
    assert len(maps.svc4) == 3 and len(maps.be4) == 2


def test_write_order_backends_slots_slot0_deletes_frees():
    rec = Recorder()
    maps = recording(MemoryMapSet(), rec)
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2"), be("10.0.0.3")])],
             "default/old": [fe([be("10.0.0.9")], service="default/old", address="10.96.0.99")]})  # fmt: skip
    rec.log.clear()
    # one backend replaced, one removed; the other service goes away
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.4")])], "default/old": []})
    ops = [(m, op) for m, op, _ in rec.log]
    assert ops == [
        ("be4", "put"),  # new backend 10.0.0.4
        ("svc4", "put"),  # its slot
        ("svc4", "put"),  # slot 0: count 3 -> 2
        ("svc4", "del"),  # slot 3
        ("svc4", "del"),  # frontend of default/old, slot 0 first
        ("be4", "del"),  # freed: 10.0.0.2, 10.0.0.3, 10.0.0.9
    ]
    slot_put = rec.log[1][2]
    assert all(abi.Svc4Key.from_buffer_copy(k).slot > 0 for k, _ in slot_put)
    assert all(abi.Svc4Key.from_buffer_copy(k).slot == 0 for k, _ in rec.log[2][2])
    fe_del = [abi.Svc4Key.from_buffer_copy(k) for k in rec.log[4][2]]
    assert fe_del[0].slot == 0 and {k.slot for k in fe_del} == {0, 1}
    assert len(rec.log[5][2]) == 3
    assert slots(maps) == ["10.0.0.1", "10.0.0.4"]
    assert slot0(maps, "10.96.0.99") is None and len(maps.be4) == 2


def test_growing_writes_slots_before_count():
    rec = Recorder()
    maps = recording(MemoryMapSet(), rec)
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("10.0.0.1")])]})
    rec.log.clear()
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    assert [(m, op) for m, op, _ in rec.log] == [("be4", "put"), ("svc4", "put"), ("svc4", "put")]
    assert abi.Svc4Key.from_buffer_copy(rec.log[1][2][0][0]).slot == 2
    assert abi.Svc4Val.from_buffer_copy(rec.log[2][2][0][1]).count == 2


def test_unchanged_apply_writes_nothing():
    maps = MemoryMapSet()
    s = Syncer(maps)
    desired = {"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]}
    s.apply(desired)
    writes = maps.svc4.writes + maps.be4.writes
    r = s.apply(desired)
    assert r.writes == 0 and r.changed == [] and maps.svc4.writes + maps.be4.writes == writes


def test_batched_one_put_per_map_for_many_services():
    maps = MemoryMapSet()
    s = Syncer(maps)
    desired = {
        f"ns/s{i}": [
            fe([be(f"10.1.{i}.{j}") for j in range(1, 4)], service=f"ns/s{i}", address=f"10.96.1.{i}")
        ]
        for i in range(50)
    }
    s.apply(desired)
    assert maps.be4.writes == 1 and maps.svc4.writes == 2  # slots, then slot 0 entries
    assert len(maps.svc4) == 200 and len(maps.be4) == 150


def test_ids_stable_across_updates_and_monotonic():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    id1, id2 = s.backend_id("10.0.0.1", 8080, "TCP"), s.backend_id("10.0.0.2", 8080, "TCP")
    sid = s.svc_id("default/web", "http", "TCP")
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.3")], flags=SvcFlag.AFFINITY)]})
    assert s.backend_id("10.0.0.1", 8080, "TCP") == id1
    assert s.backend_id("10.0.0.2", 8080, "TCP") is None
    id3 = s.backend_id("10.0.0.3", 8080, "TCP")
    assert id3 > max(id1, id2)
    assert s.svc_id("default/web", "http", "TCP") == sid
    # a removed backend coming back gets a new id, never its old one
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    assert s.backend_id("10.0.0.2", 8080, "TCP") > id3


def test_svc_id_shared_by_frontends_of_a_port_distinct_per_port():
    maps = MemoryMapSet()
    s = Syncer(maps)
    b = [be("10.0.0.1")]
    s.apply({"default/web": [
        fe(b), fe(b, address="192.168.1.10", port=30080, flags=SvcFlag.NODEPORT, ftype="NodePort"),
        fe(b, port=53, proto="UDP", port_name="dns"),
    ]})  # fmt: skip
    a = slot0(maps).svc_id
    assert slot0(maps, "192.168.1.10", 30080).svc_id == a
    assert slot0(maps, port=53, proto=17).svc_id not in (0, a)


def test_retained_backend_keeps_its_entry_without_slot():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    id2 = s.backend_id("10.0.0.2", 8080, "TCP")
    s.apply({"default/web": [fe([be("10.0.0.1")], retained=[be("10.0.0.2", terminating=True)])]})
    assert slots(maps) == ["10.0.0.1"]
    b = maps.be4.get(ctypes.c_uint32(id2))
    assert b is not None and b.flags == abi.BackendFlag.TERMINATING
    s.apply({"default/web": [fe([be("10.0.0.1")])]})
    assert maps.be4.get(ctypes.c_uint32(id2)) is None


def test_backend_shared_by_two_services_freed_only_when_unused():
    maps = MemoryMapSet()
    s = Syncer(maps)
    shared = be("10.0.0.1")
    s.apply(
        {"a/x": [fe([shared], service="a/x")], "a/y": [fe([shared], service="a/y", address="10.96.0.11")]}
    )
    assert len(maps.be4) == 1
    s.apply({"a/x": []})
    assert len(maps.be4) == 1 and slots(maps, "10.96.0.11") == ["10.0.0.1"]
    s.apply({"a/y": []})
    assert len(maps.be4) == 0 and len(maps.svc4) == 0


def test_frontend_conflict_first_owner_wins_then_retry():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")]})
    r = s.apply({"a/y": [fe([be("10.0.0.2")], service="a/y")]})
    assert slots(maps) == ["10.0.0.1"] and s.errors["frontend_conflict"] == 1
    r = s.apply({"a/x": []})
    assert r.retry == {"a/y"}
    s.apply({"a/y": [fe([be("10.0.0.2")], service="a/y")]})
    assert slots(maps) == ["10.0.0.2"]


def ct_pair(maps: MemoryMapSet, backend_id: int, svc_id: int, proto: int, sport: int) -> None:
    fwd = abi.Ct4Key(
        ip_to_nbo("10.0.1.1"), ip_to_nbo("10.96.0.10"), port_to_nbo(sport), port_to_nbo(80), proto, 0
    )
    rep = abi.Ct4Key(
        ip_to_nbo("10.0.0.2"), ip_to_nbo("10.0.1.1"), port_to_nbo(8080), port_to_nbo(sport), proto, 1
    )
    v = abi.Ct4Val(
        10**18, backend_id, svc_id, 0, 0, abi.CtState.UDP if proto == 17 else abi.CtState.ESTABLISHED, 0
    )
    maps.ct4.put_many([(fwd, v), (rep, v)])


def test_removed_backend_udp_conntrack_flushed_tcp_kept():
    maps = MemoryMapSet()
    s = Syncer(maps)
    udp = [be("10.0.0.1", 53, "UDP"), be("10.0.0.2", 53, "UDP")]
    tcp = [be("10.0.0.1"), be("10.0.0.2")]
    s.apply({"default/web": [fe(udp, port=53, proto="UDP", port_name="dns"), fe(tcp)]})
    u2, t2 = s.backend_id("10.0.0.2", 53, "UDP"), s.backend_id("10.0.0.2", 8080, "TCP")
    u1 = s.backend_id("10.0.0.1", 53, "UDP")
    usid, tsid = s.svc_id("default/web", "dns", "UDP"), s.svc_id("default/web", "http", "TCP")
    ct_pair(maps, u2, usid, 17, 1000)
    ct_pair(maps, u1, usid, 17, 1001)
    ct_pair(maps, t2, tsid, 6, 1002)
    r = s.apply({"default/web": [fe(udp[:1], port=53, proto="UDP", port_name="dns"), fe(tcp[:1])]})
    assert r.ct_flushed == 2
    left = {(k.proto, v.backend_id) for k, v in maps.ct4.items()}
    assert left == {(17, u1), (6, t2)}


def test_udp_backend_leaving_slots_but_retained_is_flushed_for_that_service():
    maps = MemoryMapSet()
    s = Syncer(maps)
    udp = [be("10.0.0.1", 53, "UDP"), be("10.0.0.2", 53, "UDP")]
    s.apply({"default/dns": [fe(udp, service="default/dns", port=53, proto="UDP", port_name="dns")]})
    u2, sid = s.backend_id("10.0.0.2", 53, "UDP"), s.svc_id("default/dns", "dns", "UDP")
    ct_pair(maps, u2, sid, 17, 1000)
    s.apply({"default/dns": [fe(udp[:1], service="default/dns", port=53, proto="UDP", port_name="dns",
                                retained=[be("10.0.0.2", 53, "UDP", terminating=True)])]})  # fmt: skip
    assert len(maps.ct4) == 0 and maps.be4.get(ctypes.c_uint32(u2)) is not None


def test_affinity_to_removed_backend_forgotten():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")], flags=SvcFlag.AFFINITY)]})
    b1, b2 = s.backend_id("10.0.0.1", 8080, "TCP"), s.backend_id("10.0.0.2", 8080, "TCP")
    sid = s.svc_id("default/web", "http", "TCP")
    maps.aff4.put_many([
        (abi.Aff4Key(ip_to_nbo("10.0.1.1"), sid), abi.Aff4Val(1, b1, 0)),
        (abi.Aff4Key(ip_to_nbo("10.0.1.2"), sid), abi.Aff4Val(1, b2, 0)),
    ])  # fmt: skip
    r = s.apply({"default/web": [fe([be("10.0.0.1")], flags=SvcFlag.AFFINITY)]})
    assert r.aff_flushed == 1 and [v.backend_id for _, v in maps.aff4.items()] == [b1]


def test_adopt_after_restart_writes_nothing_and_keeps_ids():
    maps = MemoryMapSet()
    s1 = Syncer(maps)
    desired = {
        "default/web": [fe([be("10.0.0.1"), be("10.0.0.2")]),
                        fe([be("10.0.0.1")], port=443, port_name="https", flags=SvcFlag.AFFINITY)],
        "default/api": [fe([be("10.0.0.3")], service="default/api", address="10.96.0.20",
                           retained=[be("10.0.0.4", terminating=True)])],
    }  # fmt: skip
    s1.apply(desired, full=True)
    before = snapshot(maps)
    ids = {a: s1.backend_id(a, 8080, "TCP") for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")}
    sid = s1.svc_id("default/web", "https", "TCP")
    svc_writes, be_writes = maps.svc4.writes, maps.be4.writes

    s2 = Syncer(maps)
    s2.adopt()
    r = s2.apply(desired, full=True)
    assert r.writes == 0 and r.changed == []
    assert (maps.svc4.writes, maps.be4.writes) == (svc_writes, be_writes)
    assert snapshot(maps) == before
    assert {a: s2.backend_id(a, 8080, "TCP") for a in ids} == ids
    assert s2.svc_id("default/web", "https", "TCP") == sid
    assert s2.orphan_frontends == 0


def test_adopt_then_partial_apply_keeps_unclaimed_until_full():
    maps = MemoryMapSet()
    s1 = Syncer(maps)
    s1.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")],
              "a/y": [fe([be("10.0.0.2")], service="a/y", address="10.96.0.11")]})  # fmt: skip
    s2 = Syncer(maps)
    s2.adopt()
    s2.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")]})
    assert slot0(maps, "10.96.0.11") is not None and len(maps.be4) == 2  # not proven stale yet
    s2.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")]}, full=True)
    assert slot0(maps, "10.96.0.11") is None and len(maps.be4) == 1 and len(maps.svc4) == 2


def test_adopt_next_ids_above_conntrack_and_affinity():
    maps = MemoryMapSet()
    ct_pair(maps, 500, 70, 6, 1000)
    maps.aff4.put_many([(abi.Aff4Key(1, 90), abi.Aff4Val(1, 700, 0))])
    s = Syncer(maps)
    s.adopt()
    s.apply({"default/web": [fe([be("10.0.0.1")])]})
    assert s.backend_id("10.0.0.1", 8080, "TCP") == 701
    assert s.svc_id("default/web", "http", "TCP") == 91


def test_adopt_changed_service_rewrites_only_difference():
    maps = MemoryMapSet()
    Syncer(maps).apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    s = Syncer(maps)
    s.adopt()
    r = s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2"), be("10.0.0.3")])]}, full=True)
    assert (r.be4_puts, r.svc4_puts, r.svc4_deletes, r.be4_deletes) == (1, 2, 0, 0)
    assert slots(maps) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_map_full_leaves_service_unwritten_others_apply():
    maps = MemoryMapSet(svc4_max=5)
    s = Syncer(maps)
    r = s.apply({
        "a/small": [fe([be("10.0.0.1")], service="a/small")],
        "a/big": [fe([be(f"10.0.1.{i}") for i in range(1, 10)], service="a/big", address="10.96.0.50")],
    })  # fmt: skip
    assert "a/big" in r.failed and "kp_svc4_v1" in r.failed["a/big"]
    assert s.errors["map_full"] == 1
    assert slot0(maps, "10.96.0.50") is None
    assert slots(maps) == ["10.0.0.1"]
    assert len(maps.be4) == 1  # none of a/big's backends written
    # an update of a/big that does not fit either leaves its earlier (absent) state alone
    assert s.services == ["a/small"]


def test_map_full_update_keeps_previous_state():
    maps = MemoryMapSet(be4_max=3)
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    before = snapshot(maps)
    r = s.apply({"default/web": [fe([be(f"10.0.0.{i}") for i in range(3, 8)])]})
    assert "default/web" in r.failed and "kp_be4_v1" in r.failed["default/web"]
    assert snapshot(maps) == before
    # and it still converges once it fits
    r = s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.3")])]})
    assert not r.failed and slots(maps) == ["10.0.0.1", "10.0.0.3"]


def refuse_frontend(maps: MemoryMapSet, address: str) -> None:
    """The kernel refuses (map full) any kp_svc4 write with slot 1 of ADDRESS:80/TCP, a write the
    syncer's capacity check did not foresee."""
    real_put = maps.svc4.put_many
    refused = bytes(abi.Svc4Key(ip_to_nbo(address), port_to_nbo(80), 1, 6, 0))

    def flaky(items):
        if any(bytes(k) == refused for k, _ in items):
            raise MapFullError("kp_svc4_v1", 10, 1)
        real_put(items)

    maps.svc4.put_many = flaky  # type: ignore[method-assign]


def test_unexpected_map_full_in_batch_undoes_the_failing_service():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")]})
    before = snapshot(maps)
    refuse_frontend(maps, "10.96.0.77")
    r = s.apply({
        "a/x": [fe([be("10.0.0.1"), be("10.0.0.5")], service="a/x")],
        "a/z": [fe([be("10.0.0.9")], service="a/z", address="10.96.0.77")],
    })  # fmt: skip
    assert "a/z" in r.failed and "a/x" not in r.failed
    assert slot0(maps, "10.96.0.77") is None
    assert slots(maps) == ["10.0.0.1", "10.0.0.5"]
    assert s.backend_id("10.0.0.9", 8080, "TCP") is None
    assert all(abi.nbo_to_ip(v.addr) != "10.0.0.9" for _, v in maps.be4.items())
    assert before != snapshot(maps)


def test_a_failing_service_does_not_take_back_a_new_backend_an_earlier_one_shares():
    """Two Services of one batch on the same new pod share its backend id: when the second is refused
    by the kernel after the first was written, undoing the second keeps that backend entry."""
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")]})
    refuse_frontend(maps, "10.96.0.77")
    r = s.apply({
        "a/x": [fe([be("10.0.0.1"), be("10.0.0.5")], service="a/x")],
        "a/z": [fe([be("10.0.0.5")], service="a/z", address="10.96.0.77")],
    })  # fmt: skip
    assert "a/z" in r.failed and "a/x" not in r.failed
    assert slots(maps) == ["10.0.0.1", "10.0.0.5"]
    bid = s.backend_id("10.0.0.5", 8080, "TCP")
    assert bid is not None and maps.be4.get(ctypes.c_uint32(bid)) is not None  # a/x's slot has it


def test_a_restart_takes_over_one_id_for_a_backend_listed_twice():
    """After a restart the first plan that wants an adopted backend takes its id over; the same
    backend listed twice in one frontend gets that one id, not a second."""
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("10.0.0.1"), be("10.0.0.2")], service="a/x")]}, full=True)
    first = s.backend_id("10.0.0.1", 8080, "TCP")
    s2 = Syncer(maps)
    s2.adopt()
    from kproxy.sync.state import Plan, Svc

    plan = Plan("a/x", Svc(), Svc())
    ids = s2.v4._backends.ids_of([be("10.0.0.1", node_name="n1"), be("10.0.0.1", node_name="n1")], plan)
    assert ids == {first}


def test_sweep_conntrack_deletes_expired_only():
    maps = MemoryMapSet()
    k1 = abi.Ct4Key(1, 2, 3, 4, 6, 0)
    k2 = abi.Ct4Key(1, 2, 3, 5, 6, 0)
    maps.ct4.put_many([(k1, abi.Ct4Val(100, 1, 1, 0, 0, 2, 0)), (k2, abi.Ct4Val(300, 1, 1, 0, 0, 2, 0))])
    assert sweep_conntrack(maps.ct4, now_ns=200) == 1
    assert [bytes(k) for k, _ in maps.ct4.items()] == [bytes(k2)]


def test_write_config_only_when_changed():
    maps = MemoryMapSet()
    assert write_config(maps, "192.168.1.10", udp_timeout=30)
    c = maps.read_config()
    assert abi.nbo_to_ip(c.node_addr) == "192.168.1.10" and c.ct_udp_timeout == 30 and c.ct_tcp_timeout == 0
    writes = maps.cfg.writes
    assert not write_config(maps, "192.168.1.10", udp_timeout=30)
    assert maps.cfg.writes == writes


@pytest.mark.parametrize(
    ("field", "top"),
    [("sctp_init_timeout", 0xFFFF), ("sctp_close_timeout", 0xFFFF), ("sctp_timeout", 0xFFFFFFFF),
     ("udp_timeout", 0xFFFFFFFF)],
)  # fmt: skip
def test_write_config_refuses_a_timeout_its_field_cannot_hold(field: str, top: int) -> None:
    """kp_cfg_v1's SCTP INIT and close timeouts are u16 (the former padding), the others u32: ctypes
    would keep the low bits of a larger value (70000 s as 4464 s) without a word."""
    maps = MemoryMapSet()
    assert write_config(maps, "192.168.1.10", **{field: top})
    assert getattr(maps.read_config(), "ct_" + field) == top
    with pytest.raises(ValueError, match=field.removesuffix("_timeout").replace("_", " ")):
        write_config(maps, "192.168.1.10", **{field: top + 1})
    with pytest.raises(ValueError):
        write_config(maps, "192.168.1.10", **{field: -1})
    assert getattr(maps.read_config(), "ct_" + field) == top  # nothing written


def test_deleted_tcp_frontends_are_reported():
    """The agent opens kp_config.orphan_until_ns when TCP frontends go (their connections live on);
    a UDP frontend, a changed backend set or a Service without endpoints is no such deletion."""
    s = Syncer(MemoryMapSet())
    web = fe([be("10.0.0.1")])
    dns = fe([be("10.0.0.2", proto="UDP")], service="default/dns", proto="UDP", port=53, port_name="dns")
    np = fe([be("10.0.0.1")], address="192.168.1.10", port=30080, ftype="NodePort")
    s.apply({"default/web": [web, np], "default/dns": [dns]})
    r = s.apply({"default/web": [fe([be("10.0.0.3")]), fe([], address="192.168.1.10", port=30080)],
                 "default/dns": []})  # fmt: skip
    assert r.tcp_frontends_removed == 0
    r = s.apply({"default/web": [fe([be("10.0.0.3")], port=8080)]})
    assert r.tcp_frontends_removed == 2  # port 80 and the NodePort


def test_write_config_keeps_the_later_orphan_deadline():
    """A restarted agent (deadline 0) must not close the window its predecessor opened."""
    maps = MemoryMapSet()
    assert write_config(maps, "192.168.1.10", orphan_until_ns=5_000)
    assert not write_config(maps, "192.168.1.10")
    assert maps.read_config().orphan_until_ns == 5_000
    assert write_config(maps, "192.168.1.10", orphan_until_ns=9_000)
    assert maps.read_config().orphan_until_ns == 9_000


def test_orphaned_tcp_flows_are_external_fwd_tcp_entries_of_gone_ports():
    """What keeps kp_config.orphan_until_ns open past the TCP timeout: live external TCP flows whose
    svc_id is programmed no more; not UDP, not replies, not a pod's flows, not a DSR backend node's
    entries (no svc_id), not expired ones, not flows of live ports."""
    maps = MemoryMapSet()
    ext = int(abi.CtFlag.EXTERNAL)

    def entry(sport: int, svc_id: int, *, flags: int = ext, proto: int = 6, d: int = 0, expires: int = 500):
        return abi.Ct4Key(1, 2, sport, 80, proto, d), abi.Ct4Val(expires, 1, svc_id, 3, 8080, 2, flags)

    maps.ct4.put_many([
        entry(1, 7),  # counts: svc 7 is gone
        entry(2, 7, flags=ext | int(abi.CtFlag.SNAT)),  # counts
        entry(3, 5),  # svc 5 lives
        entry(4, 7, proto=17),  # UDP
        entry(5, 7, d=1),  # a REPLY entry
        entry(6, 7, flags=0),  # a pod's flow (kp_ct_continue keeps those)
        entry(7, 0),  # a DSR backend node's entry
        entry(8, 7, expires=100),  # expired
    ])  # fmt: skip
    assert orphaned_tcp_flows(maps.ct4, {5}, now_ns=200) == 2


def test_sync_dirty_end_to_end_from_store():
    store = ClusterStore(NODE)
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.adopt()
    store.upsert_service(svc_raw())
    store.upsert_slice(slice_raw(endpoints=[ep("10.0.0.1"), ep("10.0.0.2")]))
    store.mark_initial_sync_done()
    sync_dirty(store, s, TranslateConfig(), full=True)
    assert slots(maps) == ["10.0.0.1", "10.0.0.2"]
    store.upsert_slice(slice_raw(endpoints=[ep("10.0.0.2"), ep("10.0.0.3")]))
    r = sync_dirty(store, s, TranslateConfig())
    assert r.changed == ["default/web"] and slots(maps) == ["10.0.0.2", "10.0.0.3"]
    assert set(r.first_change) == {"default/web"}
    assert store.take_dirty() == set()
    store.delete_service("default", "web")
    sync_dirty(store, s, TranslateConfig())
    assert len(maps.svc4) == 0 and len(maps.be4) == 0


@pytest.mark.parametrize("full", [False, True])
def test_sync_dirty_invalid_update_keeps_programmed_state(full):
    store = ClusterStore(NODE)
    maps = MemoryMapSet()
    s = Syncer(maps)
    store.upsert_service(svc_raw())
    store.upsert_slice(slice_raw())
    sync_dirty(store, s, TranslateConfig(), full=full)
    before = snapshot(maps)
    bad = svc_raw()
    bad["spec"]["ports"][0]["port"] = 70000
    assert not store.upsert_service(bad)
    sync_dirty(store, s, TranslateConfig(), full=full)
    assert snapshot(maps) == before


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_restarts_under_churn_keep_a_kept_backends_id_and_entry(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Services sharing backends churn (retained terminating endpoints, two scopes, UDP next to TCP)
    across applies and agent restarts (adopt + full apply of a changed view): a backend one Service
    always keeps never changes id and its kp_be4 entry is never deleted (a conntrack entry naming a
    missing id is re-balanced). Soak investigation, stream T: this held; the break was elsewhere."""
    import random

    import kproxy.sync.syncer as ks

    monkeypatch.setattr(ks, "APPLY_CHUNK", chunk)
    pool = [f"10.0.0.{i}" for i in range(1, 8)]
    anchor = "10.0.0.1"

    def desired(rng: random.Random, n: int) -> dict[str, list[Frontend]]:
        d: dict[str, list[Frontend]] = {}
        for i in range(n):
            svc = f"ns/s{i}"
            if i and rng.random() < 0.15:
                continue
            picks = [anchor, *(p for p in rng.sample(pool[1:], 2) if rng.random() < 0.5)] if i == 0 else (
                rng.sample(pool, rng.randint(0, 3)))  # fmt: skip
            proto = "UDP" if i % 5 == 4 else "TCP"
            gone = [p for p in rng.sample(pool, rng.randint(0, 2)) if p not in picks] if i else []
            addr = f"10.96.0.{10 + i}"
            fes = [fe([be(p, proto=proto) for p in picks], service=svc, address=addr, proto=proto,
                      retained=[be(p, proto=proto, terminating=True) for p in gone])]  # fmt: skip
            if i % 3 == 1:
                fes.append(fe([be(p, proto=proto) for p in picks[:1]], service=svc, address=addr, proto=proto,
                              scope=Scope.INT, flags=SvcFlag.TWO_SCOPES))  # fmt: skip
            d[svc] = fes
        return d

    for seed in range(100):
        rng = random.Random(seed)
        maps = MemoryMapSet()
        s = Syncer(maps)
        n = rng.randint(2, 8)
        s.apply(desired(rng, n), full=True)
        aid = s.backend_id(anchor, 8080, "TCP")
        assert aid is not None
        orig_del = maps.be4.delete_many

        def delete(keys: Sequence[Any], _d=orig_del, _aid=aid, _seed=seed) -> int:
            assert all(bytes(k) != bytes(ctypes.c_uint32(_aid)) for k in keys), f"seed {_seed}: deleted"
            return _d(keys)

        maps.be4.delete_many = delete  # type: ignore[method-assign]
        for _ in range(30):
            d = desired(rng, n)
            if rng.random() < 0.3:
                s = Syncer(maps)
                s.adopt()
                s.apply(d, full=True)
            elif rng.random() < 0.2:
                s.apply(d, full=True)
            else:
                sub = {k: d[k] for k in rng.sample(sorted(d), rng.randint(0, len(d)))}
                sub.update({f"ns/s{i}": [] for i in range(n) if f"ns/s{i}" not in d and rng.random() < 0.5})
                s.apply(sub)
            assert s.backend_id(anchor, 8080, "TCP") == aid, f"seed {seed}"
            assert maps.be4.get(ctypes.c_uint32(aid)) is not None, f"seed {seed}"


# ---- one pod port in several Services (issue 11): each Service sees it as its own slice says ----
def test_same_pod_port_in_two_services_with_disagreeing_slices_gets_one_id_each():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.set_nodes({"n1": "192.168.1.1", "n2": "192.168.1.2"}, "192.168.1.1")
    here = be("10.0.0.5", node_name="n1", local=True)
    unnamed = be("10.0.0.5")  # a slice without nodeName: kube-proxy serves it as not local
    s.apply({
        "a/web": [fe([here], service="a/web")],
        "a/alt": [fe([unnamed], service="a/alt", address="10.96.0.11")],
    })  # fmt: skip
    ids = s.backend_ids("10.0.0.5", 8080, "TCP")
    assert len(ids) == 2 and s.backend_id("10.0.0.5", 8080, "TCP") is None
    local_id = s.backend_id("10.0.0.5", 8080, "TCP", node="n1")
    unnamed_id = next(i for i in ids if i != local_id)
    b_local = maps.be4.get(ctypes.c_uint32(local_id))
    b_unnamed = maps.be4.get(ctypes.c_uint32(unnamed_id))
    assert b_local.flags == abi.BackendFlag.LOCAL and abi.nbo_to_ip(b_local.node_addr) == "192.168.1.1"
    assert b_unnamed.flags == 0 and b_unnamed.node_addr == 0
    # each frontend's slot names its own description of the pod
    for address, want in (("10.96.0.10", local_id), ("10.96.0.11", unnamed_id)):
        v = maps.svc4.get(abi.Svc4Key(ip_to_nbo(address), port_to_nbo(80), 1, 6, 0))
        assert v.backend_id == want, address
    # writing the Services again in the other order changes nothing
    r = s.apply({
        "a/alt": [fe([unnamed], service="a/alt", address="10.96.0.11")],
        "a/web": [fe([here], service="a/web")],
    })  # fmt: skip
    assert r.writes == 0
    # one Service dropping the pod frees only its own description
    s.apply({"a/alt": []})
    assert s.backend_ids("10.0.0.5", 8080, "TCP") == [local_id] and len(maps.be4) == 1


def test_same_pod_port_on_two_named_nodes_and_restart_keeps_both_ids():
    """Two slices naming different nodes for one address (a stale slice during a pod move): two ids,
    each with its node's address; after a restart both are re-adopted with no write."""
    maps = MemoryMapSet()
    s1 = Syncer(maps)
    nodes = {"n1": "192.168.1.1", "n2": "192.168.1.2"}
    s1.set_nodes(nodes, "192.168.1.1")
    desired = {
        "a/x": [fe([be("10.0.0.5", node_name="n2")], service="a/x")],
        "a/y": [fe([be("10.0.0.5", node_name="n1", local=True)], service="a/y", address="10.96.0.11")],
        "a/z": [fe([be("10.0.0.5")], service="a/z", address="10.96.0.12")],
    }
    s1.apply(desired, full=True)
    ids = {n: s1.backend_id("10.0.0.5", 8080, "TCP", node=n) for n in ("n1", "n2")}
    assert abi.nbo_to_ip(maps.be4.get(ctypes.c_uint32(ids["n2"])).node_addr) == "192.168.1.2"
    all_ids = s1.backend_ids("10.0.0.5", 8080, "TCP")
    assert len(all_ids) == 3
    before = snapshot(maps)
    s2 = Syncer(maps)
    s2.set_nodes(nodes, "192.168.1.1")
    s2.adopt()
    r = s2.apply(desired, full=True)
    assert r.writes == 0 and snapshot(maps) == before
    assert {n: s2.backend_id("10.0.0.5", 8080, "TCP", node=n) for n in ids} == ids
    assert s2.backend_ids("10.0.0.5", 8080, "TCP") == all_ids
    # and freeing one after the restart removes exactly that one
    s2.apply({"a/x": []})
    assert maps.be4.get(ctypes.c_uint32(ids["n2"])) is None
    assert maps.be4.get(ctypes.c_uint32(ids["n1"])) is not None


def test_a_plan_that_fails_after_claiming_adopted_entries_leaves_no_slot_naming_a_freed_id():
    """After a restart, a Service takes its adopted frontend over; if its writes then fail (a full map),
    that frontend goes with the orphans, slots and backends together."""
    maps = MemoryMapSet()
    s1 = Syncer(maps)
    s1.apply({"a/x": [fe([be("10.0.0.1")], service="a/x")]}, full=True)
    s2 = Syncer(maps)
    s2.adopt()
    real_put = maps.svc4.put_many
    calls = {"n": 0}

    def full_once(items):
        calls["n"] += 1
        if calls["n"] <= 2:  # the batch, then the service-by-service retry
            raise MapFullError(abi.MAP_SVC4, 0, 1)
        return real_put(items)

    maps.svc4.put_many = full_once  # type: ignore[method-assign]
    r = s2.apply({"a/x": [fe([be("10.0.0.1"), be("10.0.0.2")], service="a/x")]}, full=True)
    maps.svc4.put_many = real_put  # type: ignore[method-assign]
    assert "a/x" in r.failed
    backends = {int(k.value) for k, _ in maps.be4.items()}
    for k, v in maps.svc4.items():
        if k.slot:
            assert v.backend_id in backends, f"slot {k.slot} names freed backend {v.backend_id}"


def test_svc_id_changes_replay_to_service_ports():
    """The agent keeps services.json from take_svc_id_changes(): replaying them must give exactly
    service_ports() after ports come and go, Services are deleted, ids are re-used, and adopt()."""
    import random

    maps = MemoryMapSet()
    s = Syncer(maps)
    assert s.take_svc_id_changes() is None  # first call: take the whole table
    mirror: dict[int, Any] = dict(s.service_ports())
    rng = random.Random(13)
    services: dict[str, list[Frontend]] = {}
    for step in range(300):
        name = f"default/svc-{rng.randrange(12)}"
        ports = rng.sample([("http", 80, "TCP"), ("dns", 53, "UDP"), ("https", 443, "TCP")], rng.randrange(4))
        addr = f"10.96.1.{int(name.rsplit('-', 1)[1]) + 1}"
        fes = [fe([be(f"10.0.{step % 7}.1")], service=name, address=addr, port=p, proto=pr, port_name=pn)
               for pn, p, pr in ports]  # fmt: skip
        services[name] = fes
        s.apply({name: fes})
        if step == 150:  # a restarted agent: ids re-read from the maps, the log starts over
            s = Syncer(maps)
            s.adopt()
            s.apply(services, full=True)
        changes = s.take_svc_id_changes()
        if changes is None:
            mirror = dict(s.service_ports())
            continue
        for sid, sp in changes:
            if sp is None:
                mirror.pop(sid, None)
            else:
                mirror[sid] = sp
        assert mirror == s.service_ports(), f"step {step}"


def test_agent_metadata_entries_follow_service_ids(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from kproxy.agent import Agent
    from kproxy.config import AgentConfig
    from kproxy.observe.metadata import metadata_path, read_metadata

    monkeypatch.setenv("KPROXY_STATE_ROOT", str(tmp_path / "state"))
    agent = Agent(AgentConfig(node_name="n1", node_ips=["192.168.0.1"], bpffs=str(tmp_path / "bpffs")))
    agent.syncer = Syncer(MemoryMapSet())
    agent.syncer.apply(
        {"default/web": [fe([be("10.0.0.1")]), fe([be("10.0.0.1")], port=53, proto="UDP", port_name="dns")]}
    )
    agent.write_metadata()
    agent.syncer.apply(
        {
            "default/web": [fe([be("10.0.0.1")])],
            "kube-system/dns": [
                fe(
                    [be("10.0.0.9")],
                    service="kube-system/dns",
                    address="10.96.0.53",
                    port=53,
                    proto="UDP",
                    port_name="dns",
                )
            ],
        }
    )
    agent.write_metadata()
    want = {sid: {"service": svc, "port_name": port, "protocol": {6: "TCP", 17: "UDP"}[proto]}
            for sid, (svc, port, proto) in agent.syncer.service_ports().items()}  # fmt: skip
    assert read_metadata(agent.cfg.bpffs) == want
    assert len(want) == 2
    assert json.loads(metadata_path(agent.cfg.bpffs).read_text())["node"] == "n1"


def test_endpoint_changes_without_affinity_do_not_walk_the_affinity_map():
    """kp_aff4 is walked (every entry) only for ports with ClientIP affinity: an endpoint change of any
    other Service, however many, leaves it alone (it cost a full walk per change before)."""
    maps = MemoryMapSet()
    s = Syncer(maps)
    walks = 0
    items = maps.aff4.items

    def counting_items() -> Any:
        nonlocal walks
        walks += 1
        return items()

    maps.aff4.items = counting_items  # type: ignore[method-assign]
    s.apply({"default/web": [fe([be("10.0.0.1"), be("10.0.0.2")])]})
    s.apply({"default/web": [fe([be("10.0.0.1")])]})  # 10.0.0.2 freed
    s.apply({"default/web": [fe([be("10.0.0.3")])]})  # 10.0.0.1 freed
    assert walks == 0
    s.apply({"default/aff": [fe([be("10.0.0.7"), be("10.0.0.8")], service="default/aff", address="10.96.0.11",
                                flags=SvcFlag.AFFINITY)]})  # fmt: skip
    s.apply({"default/aff": [fe([be("10.0.0.7")], service="default/aff", address="10.96.0.11",
                                flags=SvcFlag.AFFINITY)]})  # fmt: skip
    assert walks == 1


def test_two_services_wanting_one_new_frontend_in_one_batch_the_first_wins():
    """Two Services planned in one batch both want a frontend nobody owned yet: the first takes it, the
    second conflicts as it would once the first is committed (both writing it left the map saying one
    and the loser's bookkeeping claiming it: its removal then deleted the winner's frontend)."""
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("10.0.0.1"), be("10.0.0.3")], service="a/x")],
             "a/y": [fe([be("10.0.0.2")], service="a/y")]})  # fmt: skip
    assert slots(maps) == ["10.0.0.1", "10.0.0.3"] and s.errors["frontend_conflict"] == 1
    s.apply({"a/y": []})
    assert slots(maps) == ["10.0.0.1", "10.0.0.3"]
    s.apply({"a/y": [fe([be("10.0.0.2")], service="a/y")]})
    assert s.apply({"a/x": []}).retry == {"a/y"}
    s.apply({"a/y": [fe([be("10.0.0.2")], service="a/y")]})
    assert slots(maps) == ["10.0.0.2"]


# ---- UDP backends that left a service port, for socket LB's connected sockets (issue 17) ----
def _left(r: Any) -> set[tuple[int, int, str, int]]:
    import socket

    return {(f, sid, socket.inet_ntoa(a), socket.ntohs(p)) for f, sid, a, p in r.udp_left}


def test_udp_backends_leaving_a_service_port_are_reported_tcp_ones_not():
    maps = MemoryMapSet()
    s = Syncer(maps)
    udp = [be("10.0.0.1", 53, "UDP"), be("10.0.0.2", 53, "UDP")]
    tcp = [be("10.0.0.1"), be("10.0.0.2")]
    r = s.apply({"default/web": [fe(udp, port=53, proto="UDP", port_name="dns"), fe(tcp)]})
    assert r.udp_left == []
    usid = s.svc_id("default/web", "dns", "UDP")
    # 10.0.0.2 leaves both ports (its UDP id is freed); only the UDP one is reported
    r = s.apply({"default/web": [fe(udp[:1], port=53, proto="UDP", port_name="dns"), fe(tcp[:1])]})
    assert _left(r) == {(4, usid, "10.0.0.2", 53)}
    # the Service goes: its last backend left too
    r = s.apply({"default/web": []})
    assert _left(r) == {(4, usid, "10.0.0.1", 53)}


def test_udp_backend_kept_by_a_service_port_and_left_by_another_is_reported_for_that_one():
    maps = MemoryMapSet()
    s = Syncer(maps)
    udp = [be("10.0.0.1", 53, "UDP"), be("10.0.0.2", 53, "UDP")]
    dns: dict[str, Any] = {"port": 53, "proto": "UDP", "port_name": "dns"}
    s.apply({
        "default/a": [fe(udp, service="default/a", **dns)],
        "default/b": [fe(udp, service="default/b", address="10.96.0.11", **dns)],
    })  # fmt: skip
    a, b = s.svc_id("default/a", "dns", "UDP"), s.svc_id("default/b", "dns", "UDP")
    r = s.apply({"default/a": [fe(udp[:1], service="default/a", port=53, proto="UDP", port_name="dns")]})
    assert _left(r) == {(4, a, "10.0.0.2", 53)} and a != b
