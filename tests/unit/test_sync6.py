"""The Syncer's IPv6 side against MemoryMap twins: kp_svc6/kp_be6/kp_lbsrc6 written with the IPv4
path's guarantees (order, stable ids from abi.ID6_BASE, adoption, undo, flushes, conflicts, full maps),
dual-stack Services split by family, and property runs checking the maps themselves."""

from __future__ import annotations

import ctypes
import ipaddress
import random
from collections.abc import Sequence
from typing import Any

import pytest

from kproxy import abi
from kproxy.abi import ID6_BASE, Scope, SvcFlag, port_to_nbo
from kproxy.bpf.mapapi import MapFullError, MemoryMap, MemoryMapSet
from kproxy.bpf.upkeep import orphaned_tcp_flows, sweep_conntrack
from kproxy.desired import BackendRef, Frontend
from kproxy.sync import Syncer

VIP6 = "fd00:96::10"
VIP4 = "10.96.0.10"


def be(addr: str, port: int = 8080, proto: str = "TCP", **kw: Any) -> BackendRef:
    return BackendRef(addr, port, proto, **kw)


def fe(
    backends: Sequence[BackendRef],
    *,
    service: str = "default/web",
    address: str = VIP6,
    port: int = 80,
    proto: str = "TCP",
    scope: int = Scope.EXT,
    flags: int = 0,
    port_name: str = "http",
    retained: Sequence[BackendRef] = (),
    ftype: str = "ClusterIP",
    source_ranges: Sequence[str] = (),
) -> Frontend:
    return Frontend(service, port_name, ftype, address, port, proto, scope, flags, 0, tuple(backends),  # type: ignore[arg-type]
                    tuple(retained), tuple(source_ranges))  # fmt: skip


def key6(address: str, port: int, slot: int, proto: int = 6, scope: int = 0) -> abi.Svc6Key:
    k = abi.Svc6Key()
    k.addr[:] = list(abi.ip6_to_bytes(address))
    k.port, k.slot, k.proto, k.scope = port_to_nbo(port), slot, proto, scope
    return k


def slot0(maps: MemoryMapSet, address: str = VIP6, port: int = 80, proto: int = 6, scope: int = 0):
    return maps.svc6.get(key6(address, port, 0, proto, scope))


def slots(maps: MemoryMapSet, address: str = VIP6, port: int = 80, proto: int = 6) -> list[str]:
    """Backend addresses in slot order, checking every slot names an existing kp_be6 entry."""
    s0 = slot0(maps, address, port, proto)
    assert s0 is not None
    out = []
    for i in range(1, s0.count + 1):
        v = maps.svc6.get(key6(address, port, i, proto))
        assert v is not None and v.svc_id == s0.svc_id
        b = maps.be6.get(ctypes.c_uint32(v.backend_id))
        assert b is not None, f"slot {i} points at missing backend {v.backend_id}"
        out.append(abi.bytes_to_ip6(b.addr))
    return out


def snapshot(maps: MemoryMapSet) -> tuple[dict[bytes, bytes], ...]:
    return dict(maps.svc4.data), dict(maps.be4.data), dict(maps.svc6.data), dict(maps.be6.data)


def recording(maps: MemoryMapSet, log: list[tuple[str, str, list[bytes]]]) -> MemoryMapSet:
    for attr in ("svc4", "be4", "svc6", "be6", "ct6", "aff6", "lbsrc6"):
        m: MemoryMap[Any, Any] = getattr(maps, attr)
        orig_put, orig_del = m.put_many, m.delete_many

        def put(items: Sequence[Any], _p=orig_put, _a=attr) -> None:
            log.append((_a, "put", [bytes(k) for k, _ in items]))
            _p(items)

        def delete(keys: Sequence[Any], _d=orig_del, _a=attr) -> int:
            log.append((_a, "del", [bytes(k) for k in keys]))
            return _d(keys)

        m.put_many = put  # type: ignore[method-assign]
        m.delete_many = delete  # type: ignore[method-assign]
    return maps


# ---- the maps as a datapath reads them ----
def check_maps(maps: MemoryMapSet) -> dict[tuple[str, int, int, int], list[tuple[str, int]]]:
    """Every invariant a reader in the kernel relies on, for both families; returns the IPv6 frontends
    as {(address, port, proto, scope): [(backend address, port) by slot]}."""
    out: dict[tuple[str, int, int, int], list[tuple[str, int]]] = {}
    for six, svc, bemap in ((False, maps.svc4, maps.be4), (True, maps.svc6, maps.be6)):
        entries = {bytes(k): (k, v) for k, v in svc.items()}
        heads = {}
        for k, v in entries.values():
            addr = abi.bytes_to_ip6(k.addr) if six else abi.nbo_to_ip(k.addr)
            if k.slot == 0:
                heads[(addr, k.port, k.proto, k.scope)] = v
        for (addr, port, proto, scope), v0 in heads.items():
            assert (v0.svc_id >= ID6_BASE) == six, (addr, v0.svc_id)
            got = []
            for i in range(1, v0.count + 1):
                k = key6(addr, abi.nbo_to_port(port), i, proto, scope) if six else abi.Svc4Key(
                    abi.ip_to_nbo(addr), port, i, proto, scope)  # fmt: skip
                sv = svc.get(k)
                assert sv is not None, f"{addr} slot {i} of {v0.count} missing"
                assert sv.svc_id == v0.svc_id
                bv = bemap.get(ctypes.c_uint32(sv.backend_id))
                assert bv is not None, f"{addr} slot {i} names missing backend {sv.backend_id}"
                assert (sv.backend_id >= ID6_BASE) == six
                baddr = abi.bytes_to_ip6(bv.addr) if six else abi.nbo_to_ip(bv.addr)
                got.append((baddr, abi.nbo_to_port(bv.port)))
            if six:
                out[(addr, abi.nbo_to_port(port), proto, scope)] = got
        for k, _ in entries.values():  # no slot beyond its frontend's count, none without slot 0
            addr = abi.bytes_to_ip6(k.addr) if six else abi.nbo_to_ip(k.addr)
            head = heads.get((addr, k.port, k.proto, k.scope))
            assert head is not None and k.slot <= head.count, (addr, k.slot)
        for k, _ in bemap.items():
            assert (k.value >= ID6_BASE) == six
    return out


# ---- basics ----
def test_ipv6_frontend_programs_svc6_and_be6_only_with_ids_from_id6_base():
    maps = MemoryMapSet()
    s = Syncer(maps)
    r = s.apply({"default/web": [fe([be("fd00:10::1"), be("fd00:10::2")])]})
    assert not r.failed and r.changed == ["default/web"]
    assert slots(maps) == ["fd00:10::1", "fd00:10::2"]
    assert len(maps.svc4) == 0 and len(maps.be4) == 0
    assert (r.svc6_puts, r.be6_puts, r.svc4_puts, r.be4_puts) == (3, 2, 0, 0) and r.writes == 5
    bid = s.backend_id("fd00:10::1", 8080, "TCP")
    sid = s.svc_id("default/web", "http", "TCP", family=6)
    assert bid is not None and bid >= ID6_BASE and sid is not None and sid >= ID6_BASE
    assert s.svc_id("default/web", "http", "TCP") is None  # no IPv4 frontend
    b = maps.be6.get(ctypes.c_uint32(bid))
    assert b is not None and abi.nbo_to_port(b.port) == 8080 and b.proto == 6
    assert s.service_ports() == {sid: ("default/web", "http", 6)}
    # unchanged: nothing written
    assert s.apply({"default/web": [fe([be("fd00:10::1"), be("fd00:10::2")])]}).writes == 0


def test_dual_stack_service_gets_one_svc_id_per_family_and_reports_both():
    maps = MemoryMapSet()
    s = Syncer(maps)
    assert s.take_svc_id_changes() is None
    d = {"default/web": [fe([be("10.0.0.1")], address=VIP4), fe([be("fd00:10::1")])]}
    r = s.apply(d)
    assert r.changed == ["default/web"] and (r.svc4_puts, r.svc6_puts) == (2, 2)
    sid4 = s.svc_id("default/web", "http", "TCP")
    sid6 = s.svc_id("default/web", "http", "TCP", family=6)
    assert sid4 is not None and sid6 is not None and sid4 < ID6_BASE <= sid6
    assert s.service_ports() == {sid4: ("default/web", "http", 6), sid6: ("default/web", "http", 6)}
    assert sorted(s.take_svc_id_changes() or []) == [
        (sid4, ("default/web", "http", 6)), (sid6, ("default/web", "http", 6))
    ]  # fmt: skip
    v = s.svc_ids_version
    # the IPv6 frontend goes (a Service turned SingleStack IPv4): only the IPv6 id is freed
    s.apply({"default/web": d["default/web"][:1]})
    assert s.svc_ids_version > v and s.take_svc_id_changes() == [(sid6, None)]
    assert len(maps.svc6) == 0 and len(maps.be6) == 0
    assert maps.svc4.get(abi.Svc4Key(abi.ip_to_nbo(VIP4), port_to_nbo(80), 0, 6, 0)) is not None
    assert s.services == ["default/web"]
    s.apply({"default/web": []})
    assert s.services == [] and len(maps.svc4) == 0 and len(maps.be4) == 0


def test_ipv6_write_order_backends_slots_slot0_deletes_frees():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("fd00:10::1"), be("fd00:10::2")])]})
    log: list[tuple[str, str, list[bytes]]] = []
    recording(maps, log)
    s.apply({"default/web": [fe([be("fd00:10::3")])]})
    steps = [(m, op) for m, op, _ in log]
    # new backend, changed slot 1, slot 0 (count 2 -> 1), slot 2 deleted, two ids freed last
    assert steps == [("be6", "put"), ("svc6", "put"), ("svc6", "put"), ("svc6", "del"), ("be6", "del")]
    assert log[2][2] == [bytes(key6(VIP6, 80, 0))] and log[3][2] == [bytes(key6(VIP6, 80, 2))]
    assert slots(maps) == ["fd00:10::3"]
    log.clear()
    s.apply({"default/web": [fe([be("fd00:10::3"), be("fd00:10::4"), be("fd00:10::5")])]})
    assert [(m, op) for m, op, _ in log] == [("be6", "put"), ("svc6", "put"), ("svc6", "put")]
    assert log[2][2] == [bytes(key6(VIP6, 80, 0))]  # the count is raised after the slots exist


def test_ipv6_ids_stable_and_shared_by_services_freed_when_unused():
    maps = MemoryMapSet()
    s = Syncer(maps)
    b = [be("fd00:10::1"), be("fd00:10::2")]
    s.apply({"a/x": [fe(b, service="a/x")], "a/y": [fe(b[:1], service="a/y", address="fd00:96::20")]})
    i1, i2 = s.backend_id("fd00:10::1", 8080, "TCP"), s.backend_id("fd00:10::2", 8080, "TCP")
    s.apply({"a/x": [fe(b[1:], service="a/x")]})
    assert s.backend_id("fd00:10::1", 8080, "TCP") == i1 and maps.be6.get(ctypes.c_uint32(i1)) is not None
    s.apply({"a/y": []})
    assert maps.be6.get(ctypes.c_uint32(i1)) is None and s.backend_id("fd00:10::2", 8080, "TCP") == i2
    s.apply({"a/y": [fe(b[:1], service="a/y", address="fd00:96::20")]})
    i1b = s.backend_id("fd00:10::1", 8080, "TCP")
    assert i1b is not None and i1b > max(i1 or 0, i2 or 0)  # monotonic: a freed id is never handed out again


def test_ipv6_node_addresses_fill_node_addr_of_local_and_remote_backends():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.set_nodes({"n1": "192.168.1.1", "n2": "fd00:1::2"}, "192.168.1.9", 1, local_addr6="fd00:1::9")
    bes = [be("fd00:10::1", node_name="n2"), be("fd00:10::9", node_name="me", local=True),
           be("fd00:10::3", node_name="n1")]  # fmt: skip
    s.apply({"default/web": [fe(bes)]})
    got = {abi.bytes_to_ip6(v.addr): (abi.bytes_to_ip6(v.node_addr), v.flags) for _, v in maps.be6.items()}
    assert got == {
        "fd00:10::1": ("fd00:1::2", 0),
        "fd00:10::9": ("fd00:1::9", abi.BackendFlag.LOCAL),
        "fd00:10::3": ("::", 0),  # n1 has no IPv6 address in the table
    }
    assert not s.set_nodes(
        {"n1": "192.168.1.1", "n2": "fd00:1::2"}, "192.168.1.9", 1, local_addr6="fd00:1::9"
    )
    assert s.set_nodes(
        {"n2": "fd00:1::2"}, "192.168.1.9", 2, addrs6={"n2": "fd00:1::22"}, local_addr6="fd00:1::9"
    )


# ---- conntrack and affinity ----
def ct6_pair(maps: MemoryMapSet, backend_id: int, svc_id: int, proto: int, sport: int) -> None:
    fwd, rep = abi.Ct6Key(), abi.Ct6Key()
    fwd.saddr[:] = list(abi.ip6_to_bytes("fd00:20::1"))
    fwd.daddr[:] = list(abi.ip6_to_bytes(VIP6))
    fwd.sport, fwd.dport, fwd.proto, fwd.dir = port_to_nbo(sport), port_to_nbo(80), proto, 0
    rep.saddr[:] = list(abi.ip6_to_bytes("fd00:10::2"))
    rep.daddr[:] = list(abi.ip6_to_bytes("fd00:20::1"))
    rep.sport, rep.dport, rep.proto, rep.dir = port_to_nbo(8080), port_to_nbo(sport), proto, 1
    v = abi.Ct6Val()
    v.expires_ns, v.backend_id, v.svc_id = 10**18, backend_id, svc_id
    v.state = abi.CtState.UDP if proto == 17 else abi.CtState.ESTABLISHED
    maps.ct6.put_many([(fwd, v), (rep, v)])


def test_removed_ipv6_backend_udp_conntrack_flushed_in_ct6_tcp_kept():
    maps = MemoryMapSet()
    s = Syncer(maps)
    udp = [be("fd00:10::1", 53, "UDP"), be("fd00:10::2", 53, "UDP")]
    tcp = [be("fd00:10::1"), be("fd00:10::2")]
    s.apply({"default/web": [fe(udp, port=53, proto="UDP", port_name="dns"), fe(tcp)]})
    u1, u2 = s.backend_id("fd00:10::1", 53, "UDP"), s.backend_id("fd00:10::2", 53, "UDP")
    t2 = s.backend_id("fd00:10::2", 8080, "TCP")
    usid = s.svc_id("default/web", "dns", "UDP", family=6)
    tsid = s.svc_id("default/web", "http", "TCP", family=6)
    assert None not in (u1, u2, t2, usid, tsid)
    ct6_pair(maps, u2, usid, 17, 1000)  # type: ignore[arg-type]
    ct6_pair(maps, u1, usid, 17, 1001)  # type: ignore[arg-type]
    ct6_pair(maps, t2, tsid, 6, 1002)  # type: ignore[arg-type]
    ct4 = abi.Ct4Key(1, 2, 3, 4, 17, 0)  # an IPv4 flow naming the same number is not ours to flush
    maps.ct4.put_many([(ct4, abi.Ct4Val(10**18, u2, usid, 0, 0, abi.CtState.UDP, 0))])
    r = s.apply({"default/web": [fe(udp[:1], port=53, proto="UDP", port_name="dns"), fe(tcp[:1])]})
    assert r.ct_flushed == 2
    assert {(k.proto, v.backend_id) for k, v in maps.ct6.items()} == {(17, u1), (6, t2)}
    assert len(maps.ct4) == 1


def test_ipv6_affinity_to_removed_backend_forgotten_in_aff6():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/web": [fe([be("fd00:10::1"), be("fd00:10::2")], flags=SvcFlag.AFFINITY)]})
    b1, b2 = s.backend_id("fd00:10::1", 8080, "TCP"), s.backend_id("fd00:10::2", 8080, "TCP")
    sid = s.svc_id("default/web", "http", "TCP", family=6)
    assert sid is not None

    def aff(client: str) -> abi.Aff6Key:
        k = abi.Aff6Key()
        k.client_addr[:] = list(abi.ip6_to_bytes(client))
        k.svc_id = sid
        return k

    maps.aff6.put_many(
        [(aff("fd00:20::1"), abi.Aff4Val(1, b1, 0)), (aff("fd00:20::2"), abi.Aff4Val(1, b2, 0))]
    )
    r = s.apply({"default/web": [fe([be("fd00:10::1")], flags=SvcFlag.AFFINITY)]})
    assert r.aff_flushed == 1 and [v.backend_id for _, v in maps.aff6.items()] == [b1]


def test_upkeep_sweeps_and_counts_orphaned_flows_in_ct6_too():
    maps = MemoryMapSet()
    ct6_pair(maps, ID6_BASE + 1, ID6_BASE + 7, 6, 1000)
    assert orphaned_tcp_flows(maps.ct6, set(), now_ns=0) == 0  # not from outside
    for k, v in list(maps.ct6.items()):
        v.flags = int(abi.CtFlag.EXTERNAL)
        maps.ct6.put_many([(k, v)])
    assert orphaned_tcp_flows(maps.ct6, set(), now_ns=0) == 1
    assert orphaned_tcp_flows(maps.ct6, {ID6_BASE + 7}, now_ns=0) == 0
    assert sweep_conntrack(maps.ct6, now_ns=10**18 + 1) == 2 and len(maps.ct6) == 0


# ---- adoption ----
def test_adopt_after_restart_writes_nothing_keeps_ids_and_resumes_above_ct6_aff6():
    maps = MemoryMapSet()
    s1 = Syncer(maps)
    desired = {
        "default/web": [fe([be("10.0.0.1")], address=VIP4),
                        fe([be("fd00:10::1"), be("fd00:10::2")]),
                        fe([be("fd00:10::1")], port=443, port_name="https", flags=SvcFlag.AFFINITY)],
        "default/api": [fe([be("fd00:10::3")], service="default/api", address="fd00:96::20",
                           retained=[be("fd00:10::4", terminating=True)])],
    }  # fmt: skip
    s1.apply(desired, full=True)
    ids = {a: s1.backend_id(a, 8080, "TCP") for a in ("10.0.0.1", "fd00:10::1", "fd00:10::4")}
    ports = s1.service_ports()
    ct6_pair(maps, ID6_BASE + 500, ID6_BASE + 900, 6, 1)
    before = snapshot(maps)
    log: list[tuple[str, str, list[bytes]]] = []
    s2 = Syncer(recording(maps, log))
    s2.adopt()
    assert s2.orphan_frontends == 4 and s2.take_svc_id_changes() is None
    r = s2.apply(desired, full=True)
    assert not r.failed and r.writes == 0 and log == [] and snapshot(maps) == before
    assert {a: s2.backend_id(a, 8080, "TCP") for a in ids} == ids and s2.service_ports() == ports
    assert s2.orphan_frontends == 0
    s2.apply({"default/new": [fe([be("fd00:10::9")], service="default/new", address="fd00:96::30")]})
    assert (s2.backend_id("fd00:10::9", 8080, "TCP") or 0) > ID6_BASE + 500
    assert (s2.svc_id("default/new", "http", "TCP", family=6) or 0) > ID6_BASE + 900
    check_maps(maps)


def test_adopt_then_full_apply_removes_unclaimed_ipv6_entries_and_reports_tcp_frontends():
    maps = MemoryMapSet()
    s1 = Syncer(maps)
    s1.apply({"a/x": [fe([be("fd00:10::1")], service="a/x")],
              "a/y": [fe([be("fd00:10::2")], service="a/y", address="fd00:96::20")]})  # fmt: skip
    s2 = Syncer(maps)
    s2.adopt()
    r = s2.apply({"a/x": [fe([be("fd00:10::1")], service="a/x")]})  # partial: nothing proven stale
    assert slot0(maps, "fd00:96::20") is not None and r.writes == 0
    r = s2.apply({"a/x": [fe([be("fd00:10::1")], service="a/x")]}, full=True)
    assert slot0(maps, "fd00:96::20") is None and r.tcp_frontends_removed == 1
    assert [abi.bytes_to_ip6(v.addr) for _, v in maps.be6.items()] == ["fd00:10::1"]
    check_maps(maps)


def test_adopted_ipv6_source_ranges_kept_and_stale_ones_deleted():
    maps = MemoryMapSet()
    s = Syncer(maps)
    lb = fe([be("fd00:10::1")], address="2001:db8:1b::1", ftype="LoadBalancer", flags=SvcFlag.SRC_RANGES,
            source_ranges=["2001:db8:1::/48", "fd00:20::7/128"])  # fmt: skip
    s.apply({"default/web": [lb]})
    sid = s.svc_id("default/web", "http", "TCP", family=6)
    keys = {(k.prefixlen, k.svc_id, abi.bytes_to_ip6(k.addr)) for k, _ in maps.lbsrc6.items()}
    assert keys == {(32 + 48, sid, "2001:db8:1::"), (32 + 128, sid, "fd00:20::7")}
    assert len(maps.lbsrc4) == 0
    s2 = Syncer(maps)
    s2.adopt()
    assert s2.apply({"default/web": [lb]}, full=True).writes == 0 and len(maps.lbsrc6) == 2
    s2.apply({"default/web": [fe([be("fd00:10::1")], address="2001:db8:1b::1", ftype="LoadBalancer")]})
    assert len(maps.lbsrc6) == 0


# ---- failures, per family ----
def test_ipv6_frontend_conflict_first_owner_wins_its_ipv4_frontends_still_apply():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("fd00:10::1")], service="a/x")]})
    r = s.apply({"a/y": [fe([be("10.0.0.2")], service="a/y", address=VIP4),
                         fe([be("fd00:10::2")], service="a/y")]})  # fmt: skip
    assert slots(maps) == ["fd00:10::1"] and s.errors["frontend_conflict"] == 1
    assert maps.svc4.get(abi.Svc4Key(abi.ip_to_nbo(VIP4), port_to_nbo(80), 0, 6, 0)) is not None
    r = s.apply({"a/x": []})
    assert r.retry == {"a/y"}
    s.apply(
        {"a/y": [fe([be("10.0.0.2")], service="a/y", address=VIP4), fe([be("fd00:10::2")], service="a/y")]}
    )
    assert slots(maps) == ["fd00:10::2"]


def test_full_svc6_fails_the_ipv6_part_only_and_keeps_its_previous_state():
    maps = MemoryMapSet(svc6_max=3)
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("fd00:10::1")], service="a/x")]})
    before = dict(maps.svc6.data)
    three = [be("fd00:10::1"), be("fd00:10::2"), be("fd00:10::3")]
    r = s.apply({"a/x": [fe([be("10.0.0.1")], service="a/x", address=VIP4), fe(three, service="a/x")]})
    assert "kp_svc6_v1" in r.failed["a/x"] and s.errors["map_full"] == 1
    assert maps.svc6.data == before and len(maps.be6) == 1 and len(maps.svc4) == 2
    check_maps(maps)


def test_invalid_ipv6_address_fails_that_service_only():
    maps = MemoryMapSet()
    s = Syncer(maps)
    r = s.apply({"a/bad": [fe([be("fd00:10::1")], service="a/bad", address="fd00::zz")],
                 "a/ok": [fe([be("fd00:10::2")], service="a/ok")]})  # fmt: skip
    assert set(r.failed) == {"a/bad"} and s.errors["invalid_frontend"] == 1 and slots(maps) == ["fd00:10::2"]


def test_unexpected_svc6_map_full_in_batch_undoes_the_failing_service():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("fd00:10::1")], service="a/x")]})
    real_put = maps.svc6.put_many
    refused = bytes(key6("fd00:96::77", 80, 1))

    def flaky(items: Sequence[Any]) -> None:
        if any(bytes(k) == refused for k, _ in items):
            raise MapFullError("kp_svc6_v1", 10, 1)
        real_put(items)

    maps.svc6.put_many = flaky  # type: ignore[method-assign]
    r = s.apply({
        "a/x": [fe([be("fd00:10::1"), be("fd00:10::5")], service="a/x")],
        "a/z": [fe([be("fd00:10::9"), be("fd00:10::5")], service="a/z", address="fd00:96::77")],
    })  # fmt: skip
    assert "a/z" in r.failed and "a/x" not in r.failed
    assert slot0(maps, "fd00:96::77") is None and slots(maps) == ["fd00:10::1", "fd00:10::5"]
    assert s.backend_id("fd00:10::9", 8080, "TCP") is None
    assert all(abi.bytes_to_ip6(v.addr) != "fd00:10::9" for _, v in maps.be6.items())
    check_maps(maps)


# ---- properties: random dual-stack churn, failures and restarts against the maps themselves ----
POOL4 = [f"10.0.0.{i}" for i in range(1, 7)]
POOL6 = [f"fd00:10::{i:x}" for i in range(1, 7)]


def random_desired(rng: random.Random, n: int) -> dict[str, list[Frontend]]:
    d: dict[str, list[Frontend]] = {}
    for i in range(n):
        if rng.random() < 0.15:
            continue
        svc = f"ns/s{i}"
        fams = rng.choice([(4,), (6,), (4, 6), (6, 4)])
        proto = "UDP" if i % 4 == 3 else "TCP"
        fes = []
        for fam in fams:
            pool = POOL6 if fam == 6 else POOL4
            picks = rng.sample(pool, rng.randint(0, 3))
            gone = [p for p in rng.sample(pool, rng.randint(0, 2)) if p not in picks]
            addr = f"fd00:96::{10 + i:x}" if fam == 6 else f"10.96.0.{10 + i}"
            node = rng.choice([None, "n1", "n2"])
            flags = SvcFlag.AFFINITY if rng.random() < 0.2 else 0
            ranges: tuple[str, ...] = ()
            if rng.random() < 0.2:
                flags |= SvcFlag.SRC_RANGES
                ranges = ("fd00:20::/64",) if fam == 6 else ("192.0.2.0/24",)
            fes.append(fe([be(p, proto=proto, node_name=node) for p in picks], service=svc, address=addr,
                          proto=proto, flags=flags, source_ranges=ranges,
                          retained=[be(p, proto=proto, terminating=True) for p in gone]))  # fmt: skip
            if rng.random() < 0.3:  # a second frontend of the port (a NodePort-like scope)
                fes.append(fe([be(p, proto=proto) for p in picks[:1]], service=svc, address=addr,
                              proto=proto, scope=Scope.INT, flags=SvcFlag.TWO_SCOPES))  # fmt: skip
        if rng.random() < 0.05:  # another Service wanting s0's frontend: a conflict
            fes.append(fe([be(POOL6[0])], service=svc, address="fd00:96::a", proto="TCP"))
        d[svc] = fes
    return d


def expected6(services: dict[str, list[Frontend]]) -> dict[tuple[str, int, int, int], list[tuple[str, int]]]:
    out = {}
    for fes in services.values():
        for f in fes:
            if ":" in f.address:
                key = (
                    f.address,
                    f.port,
                    abi.IPPROTO_TCP if f.protocol == "TCP" else abi.IPPROTO_UDP,
                    f.scope,
                )
                out.setdefault(key, sorted((b.address, b.port) for b in f.backends))
    return out


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_random_dual_stack_applies_failures_and_restarts_keep_the_maps_consistent(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """After every step of random applies (partial, full), kernel refusals mid-batch (undo), adopts and
    node changes: every frontend's slots name existing backends of its family, counts are right, no
    slot outlives its count, IPv6 ids are >= ID6_BASE and IPv4 ones below; after a full apply the IPv6
    maps say exactly what the desired frontends say."""
    import kproxy.sync.syncer as ks

    monkeypatch.setattr(ks, "APPLY_CHUNK", chunk)
    for seed in range(60):
        rng = random.Random(seed)
        maps = MemoryMapSet()
        s = Syncer(maps)
        n = rng.randint(2, 7)
        real_put = maps.svc6.put_many
        refuse: list[bytes] = []

        def flaky(items: Sequence[Any], _p=real_put, _r=refuse, _m=maps.svc6) -> None:
            # a full map refuses new keys (an update of an existing one always goes in)
            if _r and any(bytes(k) in _r and bytes(k) not in _m.data for k, _ in items):
                raise MapFullError("kp_svc6_v1", 10, 1)
            _p(items)

        maps.svc6.put_many = flaky  # type: ignore[method-assign]
        for step in range(25):
            d = random_desired(rng, n)
            refuse.clear()
            if rng.random() < 0.15:  # the kernel refuses slot 1 of one IPv6 frontend
                refuse.append(bytes(key6(f"fd00:96::{10 + rng.randrange(n):x}", 80, 1, rng.choice([6, 17]))))
            where = f"seed {seed} step {step}"
            roll = rng.random()
            if roll < 0.2:
                s = Syncer(maps)
                s.adopt()
                r = s.apply(d, full=True)
            elif roll < 0.35:
                r = s.apply(d, full=True)
            else:
                sub = {k: d[k] for k in rng.sample(sorted(d), rng.randint(0, len(d)))}
                sub.update({f"ns/s{i}": [] for i in range(n) if f"ns/s{i}" not in d and rng.random() < 0.5})
                r = s.apply(sub)
            if rng.random() < 0.1:
                s.set_nodes({"n1": "fd00:1::1", "n2": "192.168.0.2"}, None, step, local_addr6="fd00:1::9")
            got = check_maps(maps)
            for sid in s.service_ports():
                assert sid > 0
            if roll < 0.35 and not r.failed and not refuse:
                want = expected6(d)
                conflicted = {k for k in want if k[0] == "fd00:96::a"}
                assert {k: sorted(v) for k, v in got.items() if k not in conflicted} == {
                    k: v for k, v in want.items() if k not in conflicted
                }, where
        # no IPv6 backend entry is left unreferenced once everything is removed
        s.apply({}, full=True)
        assert len(maps.svc6) == 0 and len(maps.be6) == 0 and len(maps.lbsrc6) == 0, seed
        assert len(maps.svc4) == 0 and len(maps.be4) == 0, seed


def test_ipv6_backend_id_survives_restarts_under_churn() -> None:
    """A backend one Service always keeps never changes id and its kp_be6 entry is never deleted,
    across applies and agent restarts (adopt + full apply of a changed view)."""
    for seed in range(40):
        rng = random.Random(seed)
        maps = MemoryMapSet()
        anchor = "fd00:10::aa"  # in no random Service

        def desired(rng: random.Random, anchor: str = anchor) -> dict[str, list[Frontend]]:
            d = random_desired(rng, 4)
            d["ns/keep"] = [fe([be(anchor), *(be(p) for p in rng.sample(POOL6[1:], 2))], service="ns/keep",
                               address="fd00:96::1")]  # fmt: skip
            for fes in d.values():
                fes[:] = [f for f in fes if f.address != "fd00:96::a"]
            return d

        s = Syncer(maps)
        s.apply(desired(rng), full=True)
        aid = s.backend_id(anchor, 8080, "TCP")
        assert aid is not None and aid >= ID6_BASE
        orig_del = maps.be6.delete_many

        def delete(keys: Sequence[Any], _d=orig_del, _aid=aid, _seed=seed) -> int:
            assert all(bytes(k) != bytes(ctypes.c_uint32(_aid)) for k in keys), f"seed {_seed}: deleted"
            return _d(keys)

        maps.be6.delete_many = delete  # type: ignore[method-assign]
        for _ in range(20):
            d = desired(rng)
            if rng.random() < 0.3:
                s = Syncer(maps)
                s.adopt()
                s.apply(d, full=True)
            else:
                s.apply(d, full=rng.random() < 0.3)
            assert aid in s.backend_ids(anchor, 8080, "TCP"), f"seed {seed}"
            check_maps(maps)


def test_ipv6_addresses_are_canonical_whatever_the_spelling():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"a/x": [fe([be("FD00:10:0::1")], service="a/x", address="fd00:96:0:0::10")]})
    assert slots(maps) == ["fd00:10::1"]
    assert s.backend_id("fd00:10::1", 8080, "TCP") == s.backend_id("fd00:10:0:0::1", 8080, "TCP")
    assert ipaddress.ip_address(
        abi.bytes_to_ip6(next(iter(maps.svc6.items()))[0].addr)
    ) == ipaddress.ip_address(VIP6)


# ---- through the pipeline: a dual-stack Service from the store ----
def test_sync_dirty_programs_a_dual_stack_service_in_both_families_and_both_svcnets() -> None:
    from unit_objects import ep, slice_raw, svc_raw

    from kproxy.model import NodeInfo
    from kproxy.pipeline import sync_dirty
    from kproxy.store import ClusterStore
    from kproxy.translate import TranslateConfig

    store = ClusterStore(NodeInfo(name="node-a", addresses=("192.168.1.10", "fd00:1::10")))
    raw = svc_raw(cluster_ip="10.96.0.10", clusterIPs=["10.96.0.10", VIP6], ipFamilies=["IPv4", "IPv6"],
                  ipFamilyPolicy="RequireDualStack")  # fmt: skip
    store.upsert_service(raw)
    store.upsert_slice(slice_raw(endpoints=[ep("10.0.0.1")]))
    store.upsert_slice(
        slice_raw(name="web-v6", address_type="IPv6", endpoints=[ep("fd00:10::1", node="node-a")])
    )
    store.set_service_cidrs("flag", ["10.96.0.0/16", "fd00:96::/108"])
    store.initial_sync_done = True
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.adopt()
    r = sync_dirty(store, s, TranslateConfig(), full=True)
    assert not r.failed and r.changed == ["default/web"]
    assert slots(maps) == ["fd00:10::1"]
    b = maps.be6.get(ctypes.c_uint32(s.backend_id("fd00:10::1", 8080, "TCP") or 0))
    assert b is not None and b.flags & abi.BackendFlag.LOCAL and abi.bytes_to_ip6(b.node_addr) == "fd00:1::10"
    assert len(maps.svc4) == 2 and len(maps.be4) == 1
    assert {sp for sp in s.service_ports().values()} == {("default/web", "http", 6)} and len(
        s.service_ports()
    ) == 2
    assert s.svcnet.entries() == {
        "10.96.0.0/16": "drop",
        "10.96.0.10/32": "reject",
        "fd00:96::/108": "drop",
        "fd00:96::10/128": "reject",
    }
    check_maps(maps)
    # IPv6 family gone from the Service: its kp_svc6/kp_be6 entries go, IPv4 ones stay
    raw = svc_raw(cluster_ip="10.96.0.10")
    store.upsert_service(raw)
    sync_dirty(store, s, TranslateConfig())
    assert len(maps.svc6) == 0 and len(maps.be6) == 0 and len(maps.svc4) == 2


# ---- agent wiring ----
def test_health_status_has_an_entry_per_family_the_node_serves() -> None:
    from kproxy.observe.health import HealthServer

    hs = HealthServer("127.0.0.1", 0, clock=lambda: 1_700_000_000.0, ip_families=("IPv4", "IPv6"))
    hs.last_updated = 1_700_000_000.0
    status, body = hs.healthz()
    assert status == 200 and set(body["status"]) == {"IPv4", "IPv6"}
    assert (
        body["status"]["IPv4"]
        == body["status"]["IPv6"]
        == {"lastUpdated": "2023-11-14T22:13:20Z", "healthy": True}
    )
    assert set(HealthServer("127.0.0.1", 0).livez()[1].get("status", {"IPv4": 0})) == {"IPv4"}


def test_metrics_count_both_families_maps_and_conntrack_by_family() -> None:
    from kproxy.observe.metrics import Metrics

    maps = MemoryMapSet()
    ct6_pair(maps, ID6_BASE + 1, ID6_BASE + 2, 6, 1000)
    m = Metrics()
    m.bind(maps=maps)
    text = m.render().decode()
    assert 'kproxy_conntrack_entries{family="IPv6"} 2.0' in text
    assert 'kproxy_conntrack_entries{family="IPv4"} 0.0' in text
    assert (
        'kproxy_map_entries{map="kp_ct6_v1"} 2.0' in text and 'kproxy_map_capacity{map="kp_svc6_v1"}' in text
    )


def test_services_json_names_both_families_ids(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kproxy.agent import Agent
    from kproxy.config import AgentConfig
    from kproxy.observe.metadata import read_metadata

    monkeypatch.setenv("KPROXY_STATE_ROOT", str(tmp_path / "state"))
    agent = Agent(
        AgentConfig(node_name="n1", node_ips=["192.168.0.1", "fd00:1::1"], bpffs=str(tmp_path / "b"))
    )
    agent.syncer = Syncer(MemoryMapSet())
    agent.syncer.apply({"default/web": [fe([be("10.0.0.1")], address=VIP4), fe([be("fd00:10::1")])]})
    agent.write_metadata()
    sid4 = agent.syncer.svc_id("default/web", "http", "TCP")
    sid6 = agent.syncer.svc_id("default/web", "http", "TCP", family=6)
    entry = {"service": "default/web", "port_name": "http", "protocol": "TCP"}
    assert read_metadata(agent.cfg.bpffs) == {sid4: entry, sid6: entry}
    agent.syncer.apply({"default/web": [fe([be("10.0.0.1")], address=VIP4)]})  # the IPv6 port goes
    agent.syncloop.metadata.write(agent.syncer)
    assert read_metadata(agent.cfg.bpffs) == {sid4: entry}


def test_udp_backend_leaving_an_ipv6_service_port_is_reported_with_its_address():
    import socket

    maps = MemoryMapSet()
    s = Syncer(maps)
    udp = [be("fd00:10::1", 53, "UDP"), be("fd00:10::2", 53, "UDP")]
    s.apply({"default/dns": [fe(udp, service="default/dns", port=53, proto="UDP", port_name="dns")]})
    sid = s.svc_id("default/dns", "dns", "UDP", family=6)
    r = s.apply({"default/dns": [fe(udp[:1], service="default/dns", port=53, proto="UDP", port_name="dns")]})
    assert [(f, i, socket.inet_ntop(socket.AF_INET6, a), socket.ntohs(p)) for f, i, a, p in r.udp_left] == [
        (6, sid, "fd00:10::2", 53)
    ]
    assert sid >= ID6_BASE
