"""Maps filled to capacity through the agent (small --map-size): a clear error naming the map and the
Service, the other Services keep working with real traffic, nothing of a rejected Service is written.

kp_ct4_v1 and kp_aff4_v1 are LRU maps: when full, the kernel evicts the least recently used entry
(an evicted conntrack entry makes the next packet of that flow pick a backend again; an evicted affinity
entry loses the client's stickiness), so they have no "full" error to test here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import _wait

pytestmark = pytest.mark.root

SVC4_SIZE = 64
BE4_SIZE = 16
PORT = mf.Port(name="p", port=80, target=8080)


@pytest.fixture(scope="module")
def small_lab(tc_object: Path) -> Iterator[Lab]:
    sizes = [f"kp_svc4_v1={SVC4_SIZE}", f"kp_be4_v1={BE4_SIZE}"]
    args = [a for s in sizes for a in ("--map-size", s)] + ["--log-level", "info"]
    with Lab(nodes=1, pods_per_node=2, agent_args=args) as lab:
        yield lab


def svc(lab: Lab, name: str, cluster_ip: str, backends: list[str]) -> list[dict[str, object]]:
    node = lab.nodes[0].name
    return [
        mf.service(name, [PORT], cluster_ip),
        mf.endpoint_slice(name, [(b, node) for b in backends], [PORT]),
    ]


def map_state(lab: Lab) -> tuple[dict[tuple[int, int, int], list[int]], dict[int, int]]:
    """svc4 as {(addr, port, scope): [slots]} and be4 as {id: addr} of the lab's only node."""
    fes: dict[tuple[int, int, int], list[int]] = {}
    with KproxyMaps.open(lab.nodes[0].bpffs) as m:
        for k, _ in m.svc4.items():
            fes.setdefault((k.addr, k.port, k.scope), []).append(k.slot)
        bes = {int(k.value if hasattr(k, "value") else k): v.addr for k, v in m.be4.items()}
    return fes, bes


def check_consistent(lab: Lab) -> None:
    """Every frontend has slot 0 and exactly slots 1..count; every backend a slot refers to exists."""
    with KproxyMaps.open(lab.nodes[0].bpffs) as m:
        entries = list(m.svc4.items())
        be_ids = {int(getattr(k, "value", k)) for k, _ in m.be4.items()}
    by_fe: dict[tuple[int, int, int, int], dict[int, object]] = {}
    for k, v in entries:
        by_fe.setdefault((k.addr, k.port, k.proto, k.scope), {})[k.slot] = v
    for fe, slots in by_fe.items():
        assert 0 in slots, f"frontend {fe} has slots {sorted(slots)} but no slot 0: partially written"
        count = slots[0].count  # type: ignore[attr-defined]
        assert sorted(slots) == list(range(count + 1)), f"frontend {fe}: slots {sorted(slots)}, count {count}"
        for s in range(1, count + 1):
            assert slots[s].backend_id in be_ids, f"frontend {fe} slot {s}: backend missing"  # type: ignore[attr-defined]


def failed_services(lab: Lab, map_name: str) -> set[str]:
    pat = re.compile(rf"service (\S+) not programmed.*map {map_name} is full")
    return set(pat.findall(lab.log(f"agent-{lab.nodes[0].name}")))


def map_full_errors(lab: Lab) -> float:
    """kproxy_sync_errors{reason="map_full"} scraped from the node's agent."""
    import urllib.request

    from kproxy.observe.metrics import scrape_value

    def get() -> str:
        with urllib.request.urlopen("http://127.0.0.1:10249/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = lab.in_ns(lab.nodes[0], get)
    return (
        scrape_value(text, "kproxy_sync_errors_total", {"reason": "map_full"})
        or scrape_value(text, "kproxy_sync_errors", {"reason": "map_full"})
        or 0.0
    )


def test_svc4_full(small_lab: Lab) -> None:
    lab = small_lab
    p1, p2 = lab.pods
    lab.write_manifest("keep", svc(lab, "keep", "10.96.50.1", [p1.ip]))
    lab.wait_programmed("10.96.50.1", 80, [p1.ip])
    # 1 backend each: 2 svc4 entries per Service, so about 30 fit next to "keep"; 40 are written at once.
    objs = [o for i in range(40) for o in svc(lab, f"fill-{i}", f"10.96.51.{1 + i}", [p1.ip])]
    before = map_full_errors(lab)
    lab.write_manifest("fill", objs)
    _wait("svc4-full errors in the agent log", lambda: failed_services(lab, "kp_svc4_v1"), 30)
    assert map_full_errors(lab) > before, "a full kp_svc4_v1 must count kproxy_sync_errors{reason=map_full}"
    _wait("the apply to settle", lambda: len(map_state(lab)[0]) >= (SVC4_SIZE - 2) // 2, 30)
    failed = failed_services(lab, "kp_svc4_v1")
    fes, _ = map_state(lab)
    programmed = {i for i in range(40) if lab.frontend_backends(lab.nodes[0].name, f"10.96.51.{1 + i}", 80)}
    assert failed and programmed, f"failed {failed}, programmed {programmed}"
    assert {f"default/fill-{i}" for i in range(40)} == failed | {f"default/fill-{i}" for i in programmed}
    for name in failed:
        i = int(name.rsplit("-", 1)[1])
        assert lab.frontend_backends(lab.nodes[0].name, f"10.96.51.{1 + i}", 80) is None
    assert sum(len(s) for s in fes.values()) <= SVC4_SIZE
    check_consistent(lab)
    # The others keep working, with real traffic.
    assert lab.tcp_request(p2, "10.96.50.1", 80)["pod"] == p1.name
    some = min(programmed)
    assert lab.tcp_request(p2, f"10.96.51.{1 + some}", 80)["pod"] == p1.name
    # Space freed: a rejected Service is programmed when its manifest changes again.
    lab.remove_manifest("fill")
    _wait(
        "fillers removed",
        lambda: lab.frontend_backends(lab.nodes[0].name, f"10.96.51.{1 + some}", 80) is None,
        30,
    )
    lab.write_manifest("late", svc(lab, "late", "10.96.50.2", [p2.ip]))
    lab.wait_programmed("10.96.50.2", 80, [p2.ip])
    assert lab.tcp_request(p1, "10.96.50.2", 80)["pod"] == p2.name
    lab.remove_manifest("late")


def test_be4_full(small_lab: Lab) -> None:
    lab = small_lab
    p1, p2 = lab.pods
    lab.wait_programmed("10.96.50.1", 80, [p1.ip])
    # Fake backend addresses (never contacted): 3 new backends per Service, be4 holds BE4_SIZE.
    objs = []
    for i in range(10):
        fake = [f"10.244.1.{100 + 3 * i + j}" for j in range(3)]
        objs += svc(lab, f"befill-{i}", f"10.96.52.{1 + i}", fake)
    before = map_full_errors(lab)
    lab.write_manifest("befill", objs)
    _wait("be4-full errors in the agent log", lambda: failed_services(lab, "kp_be4_v1"), 30)
    assert map_full_errors(lab) > before, "a full kp_be4_v1 must count kproxy_sync_errors{reason=map_full}"
    failed = failed_services(lab, "kp_be4_v1")
    _, bes = map_state(lab)
    assert len(bes) <= BE4_SIZE
    for name in failed:
        i = int(name.rsplit("-", 1)[1])
        assert lab.frontend_backends(lab.nodes[0].name, f"10.96.52.{1 + i}", 80) is None, name
    check_consistent(lab)
    assert lab.tcp_request(p2, "10.96.50.1", 80)["pod"] == p1.name
    lab.remove_manifest("befill")
