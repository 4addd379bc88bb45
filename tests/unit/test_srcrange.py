"""loadBalancerSourceRanges: translate's source-range output and sync's kp_lbsrc4 writes."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from unit_objects import NODE, ep, slice_raw, svc_raw

from kproxy import abi
from kproxy.abi import Scope, SvcFlag, ip_to_nbo, port_to_nbo
from kproxy.bpf.mapapi import MemoryMap, MemoryMapSet
from kproxy.desired import BackendRef, Frontend
from kproxy.model import NodeInfo, parse_endpoint_slice, parse_service
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig, TranslateError, translate_service

LB = "198.51.100.10"
CFG = TranslateConfig()


def lb_svc(ranges: list[str] | None, *, lb_ips: Sequence[str] = (LB,), **spec: Any):
    extra = {} if ranges is None else {"loadBalancerSourceRanges": ranges}
    return parse_service(
        svc_raw(
            "lb", type="LoadBalancer", lb_ips=list(lb_ips),
            ports=[{"name": "http", "port": 443, "targetPort": 8443, "nodePort": 30443}], **extra, **spec,
        )
    )  # fmt: skip


def lb_slice():
    return parse_endpoint_slice(
        slice_raw("lb", endpoints=[ep("10.244.1.40", "node-a")], ports=[{"name": "http", "port": 8443}])
    )


def frontends(service, node: NodeInfo = NODE, skipped: Counter[str] | None = None) -> list[Frontend]:
    return translate_service(service, [lb_slice()], node, CFG, skipped)


def by_type(fes: list[Frontend], t: str) -> list[Frontend]:
    return [f for f in fes if f.type == t]


# ---- translate ----


def test_ranges_only_on_loadbalancer_frontends():
    fes = frontends(lb_svc(["203.0.113.0/24", "10.1.2.3/32"]))
    (lb,) = by_type(fes, "LoadBalancer")
    assert lb.flags & SvcFlag.SRC_RANGES
    assert lb.source_ranges == ("10.1.2.3/32", "203.0.113.0/24")
    for f in by_type(fes, "ClusterIP") + by_type(fes, "NodePort"):
        assert not f.flags & SvcFlag.SRC_RANGES and f.source_ranges == (), f.type


def test_ranges_normalised_and_deduplicated():
    (lb,) = by_type(frontends(lb_svc([" 203.0.113.77/24", "203.0.113.0/24"])), "LoadBalancer")
    assert lb.source_ranges == ("203.0.113.0/24",)


def test_no_ranges_no_flag():
    (lb,) = by_type(frontends(lb_svc(None)), "LoadBalancer")
    assert not lb.flags & SvcFlag.SRC_RANGES and lb.source_ranges == ()


def test_ranges_of_the_other_family_do_not_restrict_ipv4_ipv6_only_means_unrestricted():
    (lb,) = by_type(frontends(lb_svc(["2001:db8::/32", "203.0.113.0/24"])), "LoadBalancer")
    assert lb.source_ranges == ("203.0.113.0/24",)
    # kube-proxy filters the ranges by IP family: none left for IPv4 means no firewall for IPv4
    (lb,) = by_type(frontends(lb_svc(["2001:db8::/32"])), "LoadBalancer")
    assert not lb.flags & SvcFlag.SRC_RANGES and lb.source_ranges == ()


def test_range_holding_node_address_allows_the_lb_ips_as_sources():
    # kube-proxy's allowFromNode: a VIP routed locally loops back with itself as the source
    node = NodeInfo("node-a", ("192.168.1.10",))
    fes = frontends(lb_svc(["192.168.0.0/16"], lb_ips=[LB, "198.51.100.11"]), node=node)
    for lb in by_type(fes, "LoadBalancer"):
        assert lb.source_ranges == ("192.168.0.0/16", "198.51.100.10/32", "198.51.100.11/32")
    (lb, _) = by_type(
        frontends(lb_svc(["203.0.113.0/24"], lb_ips=[LB, "198.51.100.11"]), node=node), "LoadBalancer"
    )
    assert lb.source_ranges == ("203.0.113.0/24",)


def test_etp_local_both_scopes_carry_the_ranges():
    fes = frontends(lb_svc(["203.0.113.0/24"], externalTrafficPolicy="Local"))
    lbs = by_type(fes, "LoadBalancer")
    assert {f.scope for f in lbs} == {Scope.EXT, Scope.INT}
    assert all(f.flags & SvcFlag.SRC_RANGES and f.source_ranges == ("203.0.113.0/24",) for f in lbs)


def test_invalid_cidr_rejected_by_the_model_and_store_counts_it():
    store = ClusterStore(NODE)
    bad = svc_raw("lb", type="LoadBalancer", lb_ips=[LB], loadBalancerSourceRanges=["203.0.113.0/33"])
    assert store.upsert_service(bad) is False
    assert store.skipped and "lb" not in str(list(store.services))
    assert any("loadBalancerSourceRanges" in msg for msg in store.last_error.values())


def test_invalid_cidr_reaching_translate_is_a_translate_error():
    s = lb_svc(["203.0.113.0/24"])
    broken = s._replace(spec=s.spec._replace(load_balancer_source_ranges=["nope"]))
    with pytest.raises(TranslateError) as err:
        frontends(broken)
    assert err.value.reason == "invalid_source_range" and "nope" in str(err.value)


# ---- sync ----


def be(addr: str = "10.244.1.40") -> BackendRef:
    return BackendRef(addr, 8443, "TCP")


def lb_fe(ranges: Sequence[str], *, service: str = "default/lb", address: str = LB, port_name: str = "http",
          scope: int = Scope.EXT) -> Frontend:  # fmt: skip
    flags = SvcFlag.LOADBALANCER | (SvcFlag.SRC_RANGES if ranges else 0)
    return Frontend(service, port_name, "LoadBalancer", address, 443, "TCP", scope, int(flags), 0,
                    (be(),), (), tuple(ranges))  # fmt: skip


def programmed(maps: MemoryMapSet, svc_id: int) -> list[str]:
    out = []
    for k, _ in maps.lbsrc4.items():
        if k.svc_id == svc_id:
            out.append(f"{abi.nbo_to_ip(k.addr)}/{k.prefixlen - abi.LBSRC4_SVC_BITS}")
    return sorted(out)


def allowed(maps: MemoryMapSet, svc_id: int, source: str) -> bool:
    """The datapath's LPM lookup, done over the twin's exact keys."""
    src = ipaddress.IPv4Address(source)
    return any(
        k.svc_id == svc_id
        and src in ipaddress.IPv4Network(f"{abi.nbo_to_ip(k.addr)}/{k.prefixlen - abi.LBSRC4_SVC_BITS}")
        for k, _ in maps.lbsrc4.items()
    )


def slot0_flags(maps: MemoryMapSet, address: str = LB) -> int | None:
    v = maps.svc4.get(abi.Svc4Key(ip_to_nbo(address), port_to_nbo(443), 0, 6, 0))
    return None if v is None else v.flags


def test_sync_writes_ranges_keyed_by_svc_id():
    maps = MemoryMapSet()
    s = Syncer(maps)
    r = s.apply({"default/lb": [lb_fe(["203.0.113.0/24", "10.0.0.7/32"])]})
    assert not r.failed
    sid = s.svc_id("default/lb", "http", "TCP")
    assert programmed(maps, sid) == ["10.0.0.7/32", "203.0.113.0/24"]
    assert allowed(maps, sid, "203.0.113.9") and allowed(maps, sid, "10.0.0.7")
    assert not allowed(maps, sid, "10.0.0.8") and not allowed(maps, sid + 1, "203.0.113.9")
    assert slot0_flags(maps) & SvcFlag.SRC_RANGES
    # an unchanged re-apply writes nothing
    writes = maps.lbsrc4.writes
    s.apply({"default/lb": [lb_fe(["203.0.113.0/24", "10.0.0.7/32"])]})
    assert maps.lbsrc4.writes == writes


def test_ranges_changed_removed_and_service_deleted():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/lb": [lb_fe(["203.0.113.0/24"])]})
    sid = s.svc_id("default/lb", "http", "TCP")
    s.apply({"default/lb": [lb_fe(["192.0.2.0/24"])]})
    assert programmed(maps, sid) == ["192.0.2.0/24"]
    s.apply({"default/lb": [lb_fe([])]})
    assert programmed(maps, sid) == [] and not slot0_flags(maps) & SvcFlag.SRC_RANGES
    s.apply({"default/lb": [lb_fe(["192.0.2.0/24"])]})
    s.apply({"default/lb": []})
    assert len(maps.lbsrc4) == 0 and slot0_flags(maps) is None


class OrderLog:
    """Records the order of svc4 and lbsrc4 writes (the order the datapath relies on)."""

    def __init__(self, maps: MemoryMapSet) -> None:
        self.events: list[tuple[str, str]] = []
        for attr in ("svc4", "lbsrc4"):
            m: MemoryMap[Any, Any] = getattr(maps, attr)
            orig_put, orig_del = m.put_many, m.delete_many

            def put(items: Any, _p=orig_put, _a=attr) -> None:
                _p(items)
                self.events.append((_a, "put"))

            def delete(keys: Any, _d=orig_del, _a=attr) -> int:
                n = _d(keys)
                self.events.append((_a, "del"))
                return n

            m.put_many = put  # type: ignore[method-assign]
            m.delete_many = delete  # type: ignore[method-assign]


def test_ranges_written_before_the_flag_and_deleted_after_it():
    maps = MemoryMapSet()
    log = OrderLog(maps)
    s = Syncer(maps)
    s.apply({"default/lb": [lb_fe(["203.0.113.0/24"])]})
    assert log.events.index(("lbsrc4", "put")) < max(
        i for i, e in enumerate(log.events) if e == ("svc4", "put")
    )
    log.events.clear()
    s.apply({"default/lb": [lb_fe([])]})  # the flag goes first, then the ranges
    assert log.events == [("svc4", "put"), ("lbsrc4", "del")]
    log.events.clear()
    s.apply({"default/lb": [lb_fe(["203.0.113.0/24"])]})
    log.events.clear()
    s.apply({"default/lb": [lb_fe(["192.0.2.0/24"])]})  # new range before the old one goes: never neither
    assert log.events == [("lbsrc4", "put"), ("lbsrc4", "del")]


def test_ranges_shared_by_all_lb_ips_and_scopes_of_a_port():
    maps = MemoryMapSet()
    s = Syncer(maps)
    fes = [lb_fe(["203.0.113.0/24"], address=a, scope=sc) for a in (LB, "198.51.100.11") for sc in (0, 1)]
    s.apply({"default/lb": fes})
    assert len(maps.lbsrc4) == 1
    s.apply({"default/lb": fes[:2]})  # one LB IP left: its ranges stay
    assert len(maps.lbsrc4) == 1


def test_adopt_keeps_ranges_and_writes_nothing_and_drops_unreferenced():
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/lb": [lb_fe(["203.0.113.0/24"])]}, full=True)
    sid = s.svc_id("default/lb", "http", "TCP")
    stray = abi.LbSrc4Key(abi.LBSRC4_SVC_BITS + 8, sid + 100, ip_to_nbo("10.0.0.0"))
    maps.lbsrc4.put_many([(stray, abi.LbSrc4Val())])
    s2 = Syncer(maps)
    s2.adopt()
    assert programmed(maps, sid + 100) == []  # no frontend uses that id
    writes = maps.lbsrc4.writes
    s2.apply({"default/lb": [lb_fe(["203.0.113.0/24"])]}, full=True)
    assert maps.lbsrc4.writes == writes and programmed(maps, sid) == ["203.0.113.0/24"]
    s2.apply({"default/lb": [lb_fe(["192.0.2.0/24"])]}, full=True)
    assert programmed(maps, sid) == ["192.0.2.0/24"]


def test_adopted_orphan_sharing_the_svc_id_does_not_take_the_ranges_away():
    # An LB IP removed while the agent was down stays an orphan with the port's svc id; the full
    # apply deletes that orphan but must keep the ranges the remaining LB IP still uses.
    maps = MemoryMapSet()
    s = Syncer(maps)
    s.apply({"default/lb": [lb_fe(["203.0.113.0/24"]), lb_fe(["203.0.113.0/24"], address="198.51.100.11")]})
    sid = s.svc_id("default/lb", "http", "TCP")
    s2 = Syncer(maps)
    s2.adopt()
    s2.apply({"default/lb": [lb_fe(["203.0.113.0/24"])]}, full=True)
    assert slot0_flags(maps, "198.51.100.11") is None
    assert slot0_flags(maps) & SvcFlag.SRC_RANGES and programmed(maps, sid) == ["203.0.113.0/24"]


def test_lbsrc4_full_fails_only_that_service():
    maps = MemoryMapSet(lbsrc4_max=2)
    s = Syncer(maps)
    r = s.apply({
        "default/lb": [lb_fe(["203.0.113.0/24", "192.0.2.0/24", "10.0.0.0/8"])],
        "default/ok": [lb_fe(["203.0.113.0/24"], service="default/ok", address="198.51.100.20")],
    })  # fmt: skip
    assert "default/lb" in r.failed and "kp_lbsrc4_v1 is full" in r.failed["default/lb"]
    assert slot0_flags(maps) is None  # nothing of the failed Service was written
    assert slot0_flags(maps, "198.51.100.20") and len(maps.lbsrc4) == 1
    assert s.errors["map_full"] == 1


def test_sync_dirty_end_to_end_from_store():
    store = ClusterStore(NODE)
    store.upsert_service(svc_raw(
        "lb", type="LoadBalancer", lb_ips=[LB], loadBalancerSourceRanges=["203.0.113.0/24"],
        ports=[{"name": "http", "port": 443, "targetPort": 8443}], allocateLoadBalancerNodePorts=False,
    ))  # fmt: skip
    store.upsert_slice(
        slice_raw("lb", endpoints=[ep("10.244.1.40", "node-a")], ports=[{"name": "http", "port": 8443}])
    )
    maps = MemoryMapSet()
    s = Syncer(maps)
    sync_dirty(store, s, CFG, full=True)
    sid = s.svc_id("default/lb", "http", "TCP")
    assert programmed(maps, sid) == ["203.0.113.0/24"]
    store.upsert_service(svc_raw(
        "lb", type="LoadBalancer", lb_ips=[LB], loadBalancerSourceRanges=["192.0.2.1/32"],
        ports=[{"name": "http", "port": 443, "targetPort": 8443}], allocateLoadBalancerNodePorts=False,
    ))  # fmt: skip
    sync_dirty(store, s, CFG)
    assert programmed(maps, sid) == ["192.0.2.1/32"]
