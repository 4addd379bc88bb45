"""ClusterStore: indexing, dirty tracking, malformed input, full re-listing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from unit_objects import NODE, ep, slice_raw, svc_raw

from kproxy import abi
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.model import NodeInfo
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore, node_addresses
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig


def test_upsert_marks_dirty_and_indexes_slices_by_service_label():
    st = ClusterStore(NODE)
    assert st.upsert_service(svc_raw())
    assert st.upsert_slice(slice_raw(name="web-1"))
    assert st.upsert_slice(slice_raw(name="web-2"))
    assert st.upsert_slice(slice_raw(service="api", name="api-1"))
    assert st.take_dirty() == {"default/web", "default/api"}
    svc, slices = st.view("default/web")
    assert svc is not None and sorted(s.metadata.name for s in slices) == ["web-1", "web-2"]
    assert st.take_dirty() == set()


def test_unchanged_upsert_is_not_dirty():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw())
    st.upsert_slice(slice_raw())
    st.take_dirty()
    st.upsert_service(svc_raw())
    st.upsert_slice(slice_raw())
    assert st.take_dirty() == set()


def test_slice_moving_to_other_service_dirties_both():
    st = ClusterStore(NODE)
    st.upsert_slice(slice_raw(service="a", name="s"))
    st.take_dirty()
    st.upsert_slice(slice_raw(service="b", name="s"))
    assert st.take_dirty() == {"default/a", "default/b"}
    assert st.slices_of("default/a") == [] and len(st.slices_of("default/b")) == 1


def test_deletes():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw())
    st.upsert_slice(slice_raw())
    st.take_dirty()
    assert st.delete_slice("default", "web-abc")
    assert st.take_dirty() == {"default/web"} and st.slices_of("default/web") == []
    assert st.delete_service("default", "web")
    assert st.take_dirty() == {"default/web"}
    assert not st.delete_service("default", "web") and st.take_dirty() == set()


def test_malformed_is_logged_counted_and_previous_version_kept(caplog):
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw())
    st.take_dirty()
    bad = svc_raw()
    bad["spec"]["ports"][0]["port"] = 0
    with caplog.at_level(logging.WARNING):
        assert not st.upsert_service(bad, origin="/m/web.yaml")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "Service default/web in /m/web.yaml" in lines[0] and "spec.ports[0].port" in lines[0]
    assert st.skipped[("Service", "invalid")] == 1
    assert st.services["default/web"].spec.ports[0].port == 80
    assert st.take_dirty() == set()
    assert "Service default/web" in st.last_error


def test_slice_without_service_label_skipped():
    st = ClusterStore(NODE)
    raw = slice_raw()
    raw["metadata"]["labels"] = {}
    assert not st.upsert_slice(raw)
    assert st.skipped[("EndpointSlice", "no_service_label")] == 1 and st.slices == {}


def test_set_node_dirties_every_service():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw(name="a"))
    st.upsert_service(svc_raw(name="b"))
    st.take_dirty()
    st.set_node(NODE)
    assert st.take_dirty() == set()
    st.set_node(NodeInfo("node-a", ("192.168.1.11",)))
    assert st.take_dirty() == {"default/a", "default/b"}


def test_replace_all_removes_absent_objects():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw(name="a"))
    st.upsert_service(svc_raw(name="b"))
    st.upsert_slice(slice_raw(service="a", name="a-1"))
    st.upsert_slice(slice_raw(service="b", name="b-1"))
    st.take_dirty()
    st.replace_all([svc_raw(name="a")], [slice_raw(service="a", name="a-1", endpoints=[ep("10.0.0.9")])])
    assert set(st.services) == {"default/a"} and set(st.slices) == {"default/a-1"}
    assert st.take_dirty() == {"default/a", "default/b"}


def test_replace_all_keeps_previous_version_of_invalid_object():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw(name="a"))
    bad = svc_raw(name="a")
    bad["spec"]["clusterIP"] = "nope"
    st.replace_all([bad], [])
    assert "default/a" in st.services


def test_event_and_listener_wake_the_sync_task():
    async def main() -> None:
        st = ClusterStore(NODE)
        woke: list[int] = []
        st.add_listener(lambda: woke.append(1))
        ev = st.event
        assert not ev.is_set()
        st.upsert_service(svc_raw())
        assert ev.is_set() and woke
        ev.clear()
        st.mark_initial_sync_done()
        assert st.initial_sync_done and ev.is_set()

    asyncio.run(main())


def test_dirty_times_are_first_change():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw())
    t1 = st.take_dirty_with_times()["default/web"]
    st.upsert_slice(slice_raw())
    st.upsert_slice(slice_raw(endpoints=[ep("10.0.0.7")]))
    times = st.take_dirty_with_times()
    assert times["default/web"] >= t1


# ---- legacy IPv4 spellings (issue 11): read as decimal like kube-proxy's ParseIPSloppy, counted ----
def test_leading_zero_addresses_are_decimal_and_counted(caplog):
    from kproxy.translate import TranslateConfig, translate_service

    st = ClusterStore()
    raw = svc_raw(
        "legacy", type="LoadBalancer", cluster_ip="172.30.0.041", external_ips=["192.168.010.005"],
        ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
        loadBalancerSourceRanges=["010.0.0.0/8"], lb_ips=["192.168.078.009"],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert st.upsert_service(raw, origin="legacy.yaml")
        assert st.upsert_slice(slice_raw("legacy", endpoints=[ep("10.244.001.011")],
                                         ports=[{"name": "http", "port": 8080}]))  # fmt: skip
    svc = st.services["default/legacy"]
    assert svc.spec.cluster_ip == "172.30.0.41" and svc.spec.cluster_ips == ["172.30.0.41"]
    assert svc.spec.external_ips == ["192.168.10.5"]
    assert svc.spec.load_balancer_source_ranges == ["10.0.0.0/8"]
    assert svc.status.load_balancer.ingress[0].ip == "192.168.78.9"
    assert st.normalized == {("Service", "legacy_ip"): 1, ("EndpointSlice", "legacy_ip"): 1}
    assert not st.skipped
    assert (
        "Service default/legacy in legacy.yaml: clusterIP '172.30.0.041' read as 172.30.0.41" in caplog.text
    )
    # not octal (inet_aton reads 041 as 33): the frontends and backends are the decimal addresses
    fes = translate_service(svc, st.slices_of("default/legacy"), NODE, TranslateConfig())
    assert {f.address for f in fes} == {"172.30.0.41", "192.168.10.5", "192.168.78.9", "192.168.1.10"}
    assert {b.address for f in fes for b in f.backends} == {"10.244.1.11"}
    # the same version again is not counted or logged again
    caplog.clear()
    assert st.upsert_service(raw)
    assert st.normalized[("Service", "legacy_ip")] == 1 and "read as" not in caplog.text


@pytest.mark.parametrize(
    "bad",
    ["172.30.0.256", "172.30.0.0256", "172.30.0", "172.30.0.1.2", "0x10.0.0.1", "172.30.0.-1", "1e1.0.0.1"],
)
def test_not_an_address_even_sloppily_is_still_skipped(bad):
    st = ClusterStore()
    assert not st.upsert_service(svc_raw("bad", cluster_ip=bad))
    assert st.skipped == {("Service", "invalid"): 1} and not st.normalized


# ---- the node table: both families' InternalIPs (DSR sends to a backend's node) ----
def node_raw(name: str, *addresses: tuple[str, str]) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
    }


@pytest.mark.parametrize(
    ("addresses", "want"),
    [
        ([("InternalIP", "192.168.1.2"), ("InternalIP", "fd00:1::2")], ("192.168.1.2", "fd00:1::2")),
        ([("InternalIP", "FD00:1:0::2"), ("InternalIP", "192.168.1.2")], ("192.168.1.2", "fd00:1::2")),
        (
            [("Hostname", "n2"), ("ExternalIP", "2001:db8::2"), ("InternalIP", "fd00:1::2")],
            (None, "fd00:1::2"),
        ),
        ([("InternalIP", "192.168.001.002")], ("192.168.1.2", None)),  # ParseIPSloppy: decimal, not octal
        ([("InternalIP", "::ffff:192.168.1.2")], ("192.168.1.2", None)),  # Kubernetes reads it as IPv4
        (
            [("InternalIP", "not-an-ip"), ("InternalIP", "fd00:1::2"), ("InternalIP", "fd00:1::3")],
            (None, "fd00:1::2"),
        ),
        ([], (None, None)),
    ],
)
def test_node_addresses_of_both_families(addresses, want):
    assert node_addresses(node_raw("n2", *addresses)) == ("n2", *want)


def test_node_table_keeps_both_families_and_dirties_the_services_on_a_changed_node():
    st = ClusterStore(NODE)
    st.upsert_service(svc_raw())
    st.upsert_slice(slice_raw(endpoints=[ep("10.244.2.5", "n2")]))
    st.upsert_service(svc_raw("other"))
    st.upsert_slice(slice_raw("other", endpoints=[ep("10.244.3.5", "n3")]))
    st.take_dirty()
    assert st.upsert_node(node_raw("n2", ("InternalIP", "192.168.1.2"), ("InternalIP", "fd00:1::2")))
    assert (st.node_addrs, st.node_addrs6) == ({"n2": "192.168.1.2"}, {"n2": "fd00:1::2"})
    assert st.take_dirty() == {"default/web"}
    version = st.node_addrs_version
    # only the IPv6 address changes: still a change of the table and of n2's Services
    st.upsert_node(node_raw("n2", ("InternalIP", "192.168.1.2"), ("InternalIP", "fd00:1::22")))
    assert st.node_addrs6 == {"n2": "fd00:1::22"} and st.node_addrs_version > version
    assert st.take_dirty() == {"default/web"}
    # the same again: nothing
    st.upsert_node(node_raw("n2", ("InternalIP", "192.168.1.2"), ("InternalIP", "fd00:1::22")))
    assert st.take_dirty() == set()
    assert st.upsert_node(node_raw("n3", ("InternalIP", "fd00:1::3")))  # an IPv6-only node
    assert st.node_addrs6 == {"n2": "fd00:1::22", "n3": "fd00:1::3"} and "n3" not in st.node_addrs
    assert st.delete_node("n2") and not st.delete_node("n2")
    assert "n2" not in st.node_addrs and "n2" not in st.node_addrs6


def test_sync_fills_the_ipv6_backends_node_addresses_from_the_node_table():
    """The pipeline hands the store's IPv6 node table to the IPv6 engine: kp_be6_val.node_addr (where
    DSR's IPv6-in-IPv6 goes) is the backend's node's IPv6 InternalIP, kp_be4_val's its IPv4 one."""
    st = ClusterStore(NODE)
    st.upsert_service(
        svc_raw(cluster_ip="10.96.0.10", clusterIPs=["10.96.0.10", "fd00:96::10"],
                ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    )  # fmt: skip
    st.upsert_slice(slice_raw(name="web-4", endpoints=[ep("10.244.2.5", "n2")]))
    st.upsert_slice(slice_raw(name="web-6", endpoints=[ep("fd00:10:244:2::5", "n2")], address_type="IPv6"))
    st.upsert_node(node_raw("n2", ("InternalIP", "192.168.1.2"), ("InternalIP", "fd00:1::2")))
    maps = MemoryMapSet()
    syncer = Syncer(maps)
    sync_dirty(st, syncer, TranslateConfig(), full=True)
    assert [abi.bytes_to_ip6(v.node_addr) for _, v in maps.be6.items()] == ["fd00:1::2"]
    assert [abi.nbo_to_ip(v.node_addr) for _, v in maps.be4.items()] == ["192.168.1.2"]
    # the node's IPv6 address changes: the next (incremental) sync rewrites the IPv6 backend only
    st.upsert_node(node_raw("n2", ("InternalIP", "192.168.1.2"), ("InternalIP", "fd00:1::22")))
    sync_dirty(st, syncer, TranslateConfig())
    assert [abi.bytes_to_ip6(v.node_addr) for _, v in maps.be6.items()] == ["fd00:1::22"]
    assert [abi.nbo_to_ip(v.node_addr) for _, v in maps.be4.items()] == ["192.168.1.2"]
