"""The service address space (kube-proxy's cluster-ips-check): store bookkeeping and kp_svcnet4 writes."""

from __future__ import annotations

import ctypes

from unit_objects import NODE, svc_raw

from kproxy import abi
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig

CFG = TranslateConfig()


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
    assert st.service_cidrs == ["10.96.0.0/12"]
    assert st.upsert_service_cidr(obj("kubernetes", {"cidrs": ["10.96.0.0/40"]}), "a.yaml") is None
    assert st.upsert_service_cidr(obj("other", None)) is None
    assert st.upsert_service_cidr(obj("third", {"cidrs": "10.0.0.0/8"})) is None
    reasons = {reason: n for (kind, reason), n in st.skipped.items() if kind == "ServiceCIDR"}
    assert reasons == {"invalid_cidr": 1, "missing_spec": 1, "invalid_cidrs": 1}
    assert (
        "ServiceCIDR kubernetes in a.yaml skipped: spec.cidrs entry '10.96.0.0/40' is not a CIDR"
        in caplog.text
    )
    assert st.service_cidrs == ["10.96.0.0/12"]  # the last good version stays
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
    real_put = maps.svcnet4.put_many

    def failing(items):
        raise OSError(28, "No space left on device")

    maps.svcnet4.put_many = failing  # type: ignore[method-assign]
    st.upsert_service(svc_raw("a", cluster_ip="10.96.0.10"))
    st.set_service_cidrs("flag", ["10.96.0.0/16"])
    sync_dirty(st, s, CFG)
    assert entries(maps) == {} and s.svcnet.errors == 1
    maps.svcnet4.put_many = real_put  # type: ignore[method-assign]
    s.svcnet.sync(st)  # nothing else changed: what failed is written now
    assert entries(maps) == {"10.96.0.0/16": "drop", "10.96.0.10/32": "reject"}
    assert span(maps) == ("10.96.0.0", "10.96.255.255")
