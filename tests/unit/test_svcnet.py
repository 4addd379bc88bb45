"""The service address space (kube-proxy's cluster-ips-check): store bookkeeping and kp_svcnet4 writes."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any

from unit_objects import NODE, svc_raw

from kproxy import abi
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig

CFG = TranslateConfig()


@contextlib.contextmanager
def failing(m: Any, method: str) -> Iterator[None]:
    """MAP's METHOD (put_many, delete_many) raises as a kernel refusal would, within the block."""

    def refuse(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    setattr(m, method, refuse)
    try:
        yield
    finally:
        delattr(m, method)


def entries(maps: MemoryMapSet) -> dict[str, str]:
    out = {}
    for k, v in maps.svcnet4.items():
        out[f"{abi.nbo_to_ip(k.addr)}/{k.prefixlen}"] = abi.SvcnetAction(v.action).name.lower()
    return out


def span(maps: MemoryMapSet) -> tuple[str, str] | None:
    v = maps.svcnet_span.get(ctypes.c_uint32(0))
    if v is None or v.lo > v.hi:
        return None
    import ipaddress

    return str(ipaddress.IPv4Address(v.lo)), str(ipaddress.IPv4Address(v.hi))


def setup() -> tuple[ClusterStore, Syncer, MemoryMapSet]:
    maps = MemoryMapSet()
    return ClusterStore(NODE), Syncer(maps), maps


def test_cluster_ips_of_served_services_are_rejected_for_unknown_ports():
    st, s, maps = setup()
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st.upsert_service(svc_raw("b", cluster_ip="10.96.3.7", clusterIPs=["10.96.3.7", "fd00::7"]))
    # not served by kproxy: no entry (kube-proxy leaves their addresses alone too)
    st.upsert_service(svc_raw("h", cluster_ip="None"))
    st.upsert_service(
        svc_raw("o", cluster_ip="10.96.9.9", labels={"service.kubernetes.io/service-proxy-name": "x"})
    )
    st.upsert_service(svc_raw("n", cluster_ip="10.96.9.8", ports=[]))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    # another proxy's ClusterIP: PASS, so a service CIDR around it never drops its traffic
    assert entries(maps) == {"10.96.0.10/32": "reject", "10.96.3.7/32": "reject", "10.96.9.9/32": "pass"}
    assert span(maps) == ("10.96.0.10", "10.96.9.9")
    st.delete_service("default", "o")
    sync_dirty(st, s, CFG)
    # a Service going away takes its entry and shrinks the span
    st.delete_service("default", "b")
    sync_dirty(st, s, CFG)
    assert entries(maps) == {"10.96.0.10/32": "reject"}
    assert span(maps) == ("10.96.0.10", "10.96.0.10")
    # a ClusterIP change moves the entry
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.11"))
    sync_dirty(st, s, CFG)
    assert entries(maps) == {"10.96.0.11/32": "reject"}


def test_service_cidrs_drop_and_cluster_ips_inside_them_reject():
    st, s, maps = setup()
    st.set_service_cidrs("flag", ["10.96.0.0/16", "fd00::/108"])
    st.set_service_cidrs("ServiceCIDR/extra", ["10.100.0.0/24"])
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    assert entries(maps) == {"10.96.0.0/16": "drop", "10.96.0.10/32": "reject", "10.100.0.0/24": "drop"}
    assert span(maps) == ("10.96.0.0", "10.100.0.255")
    # a ServiceCIDR deleted: its range goes, without any Service changing
    st.delete_service_cidrs("ServiceCIDR/extra")
    assert s.svcnet.sync(st) == 1
    assert entries(maps) == {"10.96.0.0/16": "drop", "10.96.0.10/32": "reject"}
    assert span(maps) == ("10.96.0.0", "10.96.255.255")
    # nothing changed: nothing written
    writes = maps.svcnet4.writes
    sync_dirty(st, s, CFG)
    assert maps.svcnet4.writes == writes


def test_shared_cluster_ip_stays_until_the_last_service_goes():
    st, s, maps = setup()
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st.upsert_service(svc_raw("b", cluster_ip="10.96.0.10"))  # invalid in a real cluster; counted anyway
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    st.delete_service("default", "a")
    sync_dirty(st, s, CFG)
    assert entries(maps) == {"10.96.0.10/32": "reject"}
    st.delete_service("default", "b")
    sync_dirty(st, s, CFG)
    assert entries(maps) == {} and span(maps) is None


def test_restart_writes_nothing_and_removes_stale_entries():
    st, s, maps = setup()
    st.set_service_cidrs("flag", ["10.96.0.0/16"])
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st.upsert_service(svc_raw("b", cluster_ip="10.96.0.20"))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    # the new agent's view lacks b
    st2 = ClusterStore(NODE)
    st2.set_service_cidrs("flag", ["10.96.0.0/16"])
    st2.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st2.mark_initial_sync_done()
    s2 = Syncer(maps)
    s2.adopt()
    writes = maps.svcnet4.writes
    sync_dirty(st2, s2, CFG, full=True)
    assert entries(maps) == {"10.96.0.0/16": "drop", "10.96.0.10/32": "reject"}
    assert maps.svcnet4.writes == writes + 1  # the one delete


def test_invalid_service_cidr_is_refused_with_its_name():
    st = ClusterStore(NODE)
    try:
        st.set_service_cidrs("ServiceCIDR/bad", ["10.96.0.0/33"])
    except ValueError as e:
        assert "10.96.0.0/33" in str(e)
    else:
        raise AssertionError("an invalid CIDR was accepted")
    assert st.service_cidrs == []


def test_service_cidr_objects_from_manifests(caplog):
    """kind: ServiceCIDR (networking.k8s.io/v1) as the file source hands it over; bad ones named and
    counted with the Kubernetes source's reasons, their previous version kept."""
    st = ClusterStore(NODE)

    def obj(name, spec):
        return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": name},
                "spec": spec}  # fmt: skip

    assert st.upsert_service_cidr(obj("kubernetes", {"cidrs": ["10.96.0.0/12", "fd00::/108"]}), "a.yaml")
    assert st.service_cidrs == ["10.96.0.0/12", "fd00::/108"]
    assert st.upsert_service_cidr(obj("kubernetes", {"cidrs": ["10.96.0.0/40"]}), "a.yaml") is None
    assert st.upsert_service_cidr(obj("other", None)) is None
    assert st.upsert_service_cidr(obj("third", {"cidrs": "10.0.0.0/8"})) is None
    reasons = {reason: n for (kind, reason), n in st.skipped.items() if kind == "ServiceCIDR"}
    assert reasons == {"invalid_cidr": 1, "missing_spec": 1, "invalid_cidrs": 1}
    assert (
        "ServiceCIDR kubernetes in a.yaml skipped: spec.cidrs entry '10.96.0.0/40' is not a CIDR"
        in caplog.text
    )
    assert st.service_cidrs == ["10.96.0.0/12", "fd00::/108"]  # the last good version stays
    st.delete_service_cidrs("ServiceCIDR/kubernetes")
    assert st.service_cidrs == []


def test_adopting_a_fresh_span_map_does_not_make_the_span_start_at_zero():
    """A span array the loader just created reads as zeros: [0.0.0.0, 0.0.0.0] widened by the first
    entry would send every packet below the service range through the trie lookup."""
    st, s, maps = setup()
    maps.svcnet_span.put_many([(ctypes.c_uint32(0), abi.SvcnetSpan(0, 0))])  # what the kernel gives
    s.adopt()
    st.set_service_cidrs("flag", ["10.96.0.0/12"])
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    assert span(maps) == ("10.96.0.0", "10.111.255.255")
    # and a stale, too wide span left by a crash is narrowed by the next full sync after adopt
    maps.svcnet_span.put_many([(ctypes.c_uint32(0), abi.SvcnetSpan(0, 0xFFFFFFFF))])
    s2 = Syncer(maps)
    s2.adopt()
    sync_dirty(st, s2, CFG, full=True)
    assert span(maps) == ("10.96.0.0", "10.111.255.255")


def test_a_failed_write_is_retried_on_the_next_sync():
    st, s, maps = setup()
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    with failing(maps.svcnet4, "put_many"):
        st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
        st.set_service_cidrs("flag", ["10.96.0.0/16"])
        sync_dirty(st, s, CFG)
        assert entries(maps) == {} and s.svcnet.errors == 1
    s.svcnet.sync(st)  # nothing else changed: what failed is written now
    assert entries(maps) == {"10.96.0.0/16": "drop", "10.96.0.10/32": "reject"}
    assert span(maps) == ("10.96.0.0", "10.96.255.255")


# ---- IPv6: kp_svcnet6_v1 and its span over the upper 64 bits ----
def entries6(maps: MemoryMapSet) -> dict[str, str]:
    return {
        f"{abi.bytes_to_ip6(k.addr)}/{k.prefixlen}": abi.SvcnetAction(v.action).name.lower()
        for k, v in maps.svcnet6.items()
    }


def span6(maps: MemoryMapSet) -> tuple[int, int] | None:
    v = maps.svcnet6_span.get(ctypes.c_uint32(0))
    return None if v is None or v.lo > v.hi else (v.lo, v.hi)


def upper64(addr: str) -> int:
    import ipaddress

    return int(ipaddress.IPv6Address(addr)) >> 64


def dual(name: str, v4: str, v6: str, **kw) -> dict:
    return svc_raw(name, cluster_ip=v4, clusterIPs=[v4, v6], ipFamilies=["IPv4", "IPv6"],
                   ipFamilyPolicy="RequireDualStack", **kw)  # fmt: skip


def test_ipv6_cluster_ips_and_service_cidrs_in_their_own_trie():
    st, s, maps = setup()
    st.set_service_cidrs("flag", ["10.96.0.0/16", "FD00:10:96::/108"])
    st.upsert_service(dual("a", "10.96.0.10", "fd00:10:96::a"))
    st.upsert_service(svc_raw("b", cluster_ip="fd00:10:96::b", ipFamilies=["IPv6"]))
    st.upsert_service(
        svc_raw("o", cluster_ip="fd00:10:96::c", labels={"service.kubernetes.io/service-proxy-name": "x"})
    )
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    assert entries(maps) == {"10.96.0.0/16": "drop", "10.96.0.10/32": "reject"}
    assert entries6(maps) == {
        "fd00:10:96::/108": "drop",
        "fd00:10:96::a/128": "reject",
        "fd00:10:96::b/128": "reject",
        "fd00:10:96::c/128": "pass",
    }
    # the span is the upper 64 bits the service CIDR's addresses share
    assert span6(maps) == (upper64("fd00:10:96::"), upper64("fd00:10:96::"))
    # an IPv6 ClusterIP going away: only its /128 goes; the IPv4 trie is not written
    writes4 = maps.svcnet4.writes
    st.delete_service("default", "b")
    sync_dirty(st, s, CFG)
    assert "fd00:10:96::b/128" not in entries6(maps) and maps.svcnet4.writes == writes4
    assert s.svcnet.entries()["fd00:10:96::a/128"] == "reject"


def test_ipv6_span_spreads_over_cidrs_in_two_prefixes_and_narrows_back():
    st, s, maps = setup()
    st.set_service_cidrs("flag", ["fd00:10:96::/108"])
    st.set_service_cidrs("ServiceCIDR/more", ["fd00:10:97::/112"])
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    assert span6(maps) == (upper64("fd00:10:96::"), upper64("fd00:10:97::"))
    st.delete_service_cidrs("ServiceCIDR/more")
    s.svcnet.sync(st)
    assert span6(maps) == (upper64("fd00:10:96::"), upper64("fd00:10:96::"))
    st.delete_service_cidrs("flag")
    s.svcnet.sync(st)
    assert entries6(maps) == {} and span6(maps) is None


def test_ipv6_restart_rewrites_no_entry():
    st, s, maps = setup()
    st.set_service_cidrs("flag", ["fd00:10:96::/108"])
    st.upsert_service(dual("a", "10.96.0.10", "fd00:10:96::a"))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    s2 = Syncer(maps)
    s2.adopt()
    writes, before = maps.svcnet6.writes, span6(maps)
    sync_dirty(st, s2, CFG, full=True)
    assert maps.svcnet6.writes == writes and span6(maps) == before  # the span is re-derived, the same


def test_a_failed_ipv6_write_is_retried_and_ipv4_goes_on():
    st, s, maps = setup()
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    with failing(maps.svcnet6, "put_many"):
        st.upsert_service(dual("a", "10.96.0.10", "fd00:10:96::a"))
        sync_dirty(st, s, CFG)
        assert entries(maps) == {"10.96.0.10/32": "reject"} and entries6(maps) == {}
        assert s.svcnet.errors == 1
    s.svcnet.sync(st)
    assert entries6(maps) == {"fd00:10:96::a/128": "reject"}


def test_a_full_trie_takes_a_new_cluster_ip_when_another_goes_in_the_same_sync():
    """The deletes go first: a full trie whose batch both removes and adds an entry makes progress
    (writing first failed every time, until some unrelated deletion freed a slot)."""
    maps = MemoryMapSet(svcnet6_max=3)
    st, s = ClusterStore(NODE), Syncer(maps)
    st.set_service_cidrs("flag", ["fd00:10:96::/108"])
    st.upsert_service(svc_raw("a", cluster_ip="fd00:10:96::a", ipFamilies=["IPv6"]))
    st.upsert_service(svc_raw("b", cluster_ip="fd00:10:96::b", ipFamilies=["IPv6"]))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    assert len(entries6(maps)) == 3
    st.delete_service("default", "a")
    st.upsert_service(svc_raw("c", cluster_ip="fd00:10:96::c", ipFamilies=["IPv6"]))
    sync_dirty(st, s, CFG)
    assert entries6(maps) == {
        "fd00:10:96::/108": "drop", "fd00:10:96::b/128": "reject", "fd00:10:96::c/128": "reject",
    }  # fmt: skip
    assert s.svcnet.errors == 0


def test_after_a_restart_a_failed_write_leaves_the_span_over_every_entry():
    """The span written before new entries covers the entries already there too (after adopt it was
    derived from the new ones alone: a failed write then left the service CIDR outside the span)."""
    st, s, maps = setup()
    st.set_service_cidrs("flag", ["fd00:10:96::/108"])
    st.upsert_service(dual("a", "10.96.0.10", "fd00:10:96::a"))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    s2 = Syncer(maps)
    s2.adopt()
    with failing(maps.svcnet6, "put_many"):
        st.upsert_service(svc_raw("far", cluster_ip="fd00:20::1", ipFamilies=["IPv6"]))
        sync_dirty(st, s2, CFG)
        assert span6(maps) == (upper64("fd00:10:96::"), upper64("fd00:20::"))
    s2.svcnet.sync(st)
    assert entries6(maps)["fd00:20::1/128"] == "reject"


def test_a_failed_full_sync_is_full_again_next_time():
    """Entries of Services deleted while no agent ran are found by the first (full) sync only: if it
    fails, the next sync is full again, so they do not stay until the next restart."""
    st, s, maps = setup()
    st.upsert_service(svc_raw("gone", cluster_ip="fd00:10:96::9", ipFamilies=["IPv6"]))
    st.mark_initial_sync_done()
    sync_dirty(st, s, CFG, full=True)
    st2 = ClusterStore(NODE)  # the restarted agent's view: "gone" was deleted meanwhile
    st2.upsert_service(svc_raw("a", cluster_ip="fd00:10:96::a", ipFamilies=["IPv6"]))
    st2.mark_initial_sync_done()
    s2 = Syncer(maps)
    s2.adopt()
    with failing(maps.svcnet6, "delete_many"):
        sync_dirty(st2, s2, CFG, full=True)
        assert "fd00:10:96::9/128" in entries6(maps)
    s2.svcnet.sync(st2)  # nothing changed since: still full
    assert entries6(maps) == {"fd00:10:96::a/128": "reject"}
