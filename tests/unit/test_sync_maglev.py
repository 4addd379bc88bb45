"""Maglev tables through the Syncer and translate (in memory: kproxy.bpf.mapapi.MemoryMapSet).

What a table holds is checked by reading it back as the datapath does (mgsync.decode): the backend a
flow hash selects, per address. The kernel side of the same tables: tests/bpf/test_bpf_maglev.py.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import Any

import pytest
from unit_objects import NODE, ep, slice_raw, svc_raw

from kproxy import abi
from kproxy.abi import Scope, SvcFlag
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.desired import BackendRef, Frontend
from kproxy.model import parse_endpoint_slice, parse_service
from kproxy.sync import Syncer, maglev
from kproxy.sync.mgsync import decode
from kproxy.translate import TranslateConfig, translate_service

LB = "198.51.100.20"


def lb_fe(service: str, backends: list[str], *, maglev_flag: bool = True, lb: str = LB) -> Frontend:
    refs = tuple(BackendRef(a, 8080, "TCP") for a in backends)
    flags = SvcFlag.LOADBALANCER | (SvcFlag.MAGLEV if maglev_flag else 0)
    return Frontend(service, "http", "LoadBalancer", lb, 80, "TCP", Scope.EXT, int(flags), 0, refs)


def addresses(maps: MemoryMapSet, sid: int) -> list[str]:
    """The backend address each of the table's hash buckets selects."""
    rows = maps.maglev.table(sid)
    assert rows is not None, f"no table for service port {sid}"
    t = decode(rows)
    out = []
    for k in t.entries:
        be = maps.be4.get(ctypes.c_uint32(t.backend_ids[k]))
        assert be is not None, "a table names a backend id the backend map lacks"
        out.append(abi.nbo_to_ip(be.addr))
    return out


class Counting(MemoryMapSet):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.puts: list[int] = []
        put = self.maglev.put_tables

        def counted(tables: Any) -> Any:
            self.puts.extend(sid for sid, _ in tables)
            return put(tables)

        self.maglev.put_tables = counted  # type: ignore[method-assign]


def backends(n: int, base: str = "10.1.0.") -> list[str]:
    return [f"{base}{i + 1}" for i in range(n)]


def test_table_follows_the_backends_and_goes_with_the_flag() -> None:
    maps = Counting(maglev_max=8)
    s = Syncer(maps, maglev_size=251)
    s.apply({"default/web": [lb_fe("default/web", backends(5))]}, full=True)
    sid = s.svc_id("default/web", "http", "TCP")
    assert sid is not None and maps.puts == [sid]
    got = addresses(maps, sid)
    assert len(got) == 251 and set(got) == set(backends(5))
    assert set(Counter(got).values()) <= {250 // 5, 251 // 5 + 1}  # Maglev's even share
    # unchanged: nothing written
    s.apply({"default/web": [lb_fe("default/web", backends(5))]})
    assert maps.puts == [sid]
    # one backend goes: the table is swapped; only its buckets move
    s.apply({"default/web": [lb_fe("default/web", backends(5)[:4])]})
    after = addresses(maps, sid)
    assert maps.puts == [sid, sid] and set(after) == set(backends(4))
    moved = sum(a != b for a, b in zip(got, after, strict=True) if a != backends(5)[4])
    assert moved < 251 * 0.05, moved
    # the flag goes: so does the table
    s.apply({"default/web": [lb_fe("default/web", backends(4), maglev_flag=False)]})
    assert maps.maglev.table(sid) is None and len(maps.maglev) == 0
    s.apply({"default/web": [lb_fe("default/web", backends(4))]})
    assert maps.maglev.table(sid) is not None
    s.apply({"default/web": []})
    assert len(maps.maglev) == 0


def test_no_backends_no_table() -> None:
    maps = MemoryMapSet()
    s = Syncer(maps, maglev_size=251)
    s.apply({"default/web": [lb_fe("default/web", [])]}, full=True)
    assert len(maps.maglev) == 0
    s.apply({"default/web": [lb_fe("default/web", backends(2))]})
    assert len(maps.maglev) == 1
    s.apply({"default/web": [lb_fe("default/web", [])]})
    assert len(maps.maglev) == 0


def test_two_nodes_with_different_ids_agree() -> None:
    """Backend ids and slot orders differ between nodes (history); the tables select the same addresses."""
    a_maps, b_maps = MemoryMapSet(), MemoryMapSet()
    a, b = Syncer(a_maps, maglev_size=509), Syncer(b_maps, maglev_size=509)
    a.apply({"default/web": [lb_fe("default/web", backends(7))]})
    # node b saw other Services first (other ids) and the endpoints in another order
    b.apply(
        {
            f"default/other{i}": [
                lb_fe(f"default/other{i}", backends(3, f"10.9.{i}."), lb=f"198.51.100.{i + 30}")
            ]
            for i in range(5)
        }
    )
    b.apply({"default/web": [lb_fe("default/web", list(reversed(backends(7))))]})
    sa, sb = a.svc_id("default/web", "http", "TCP"), b.svc_id("default/web", "http", "TCP")
    assert sa != sb
    assert addresses(a_maps, sa) == addresses(b_maps, sb)  # type: ignore[arg-type]


def test_restart_adopts_tables_and_prunes_stale_ones() -> None:
    maps = Counting()
    s = Syncer(maps, maglev_size=251)
    want = {
        "default/web": [lb_fe("default/web", backends(3))],
        "default/gone": [lb_fe("default/gone", backends(2, "10.2.0."), lb="198.51.100.21")],
    }
    s.apply(want, full=True)
    assert len(maps.maglev) == 2
    maps.puts.clear()
    again = Syncer(maps, maglev_size=251)
    again.adopt()
    del want["default/gone"]
    again.apply(want, full=True)
    assert maps.puts == []  # the unchanged table stayed
    assert len(maps.maglev) == 1 and maps.maglev.table(again.svc_id("default/web", "http", "TCP")) is not None  # type: ignore[arg-type]
    # another table size: every table is rebuilt
    bigger = Syncer(maps, maglev_size=509)
    bigger.adopt()
    bigger.apply(want, full=True)
    assert len(maps.puts) == 1 and decode(maps.maglev.table(maps.puts[0]) or b"").m == 509


def test_full_map_leaves_the_port_on_random_selection() -> None:
    maps = MemoryMapSet(maglev_max=1)
    s = Syncer(maps, maglev_size=251)
    r = s.apply({
        "default/a": [lb_fe("default/a", backends(2))],
        "default/b": [lb_fe("default/b", backends(2, "10.3.0."), lb="198.51.100.22")],
    }, full=True)  # fmt: skip
    assert not r.failed and s.errors["maglev_map_full"] == 1  # both Services programmed, one table missing
    assert len(maps.maglev) == 1 and len(maps.svc4) == 6


def test_ipv6_tables_have_ipv6_ids() -> None:
    maps = MemoryMapSet()
    s = Syncer(maps, maglev_size=251)
    refs = tuple(BackendRef(f"fd00::{i + 1}", 8080, "TCP") for i in range(4))
    fe6 = Frontend("default/web", "http", "LoadBalancer", "2001:db8::20", 80, "TCP", Scope.EXT,
                   int(SvcFlag.LOADBALANCER | SvcFlag.MAGLEV), 0, refs)  # fmt: skip
    s.apply({"default/web": [fe6]}, full=True)
    sid = s.svc_id("default/web", "http", "TCP", family=6)
    assert sid is not None and sid >= abi.ID6_BASE
    t = decode(maps.maglev.table(sid) or b"")
    assert all(b >= abi.ID6_BASE for b in t.backend_ids) and len(t.backend_ids) == 4


# ---- translate: which frontends get the flag ----
def frontends(
    annotations: dict[str, str] | None, cfg: TranslateConfig, **spec: Any
) -> tuple[list[Frontend], Counter[str]]:
    svc = parse_service(
        svc_raw(
            type="LoadBalancer",
            annotations=annotations,
            lb_ips=[LB],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            **spec,
        )
    )
    es = parse_endpoint_slice(
        slice_raw(
            endpoints=[ep("10.1.0.1", NODE.name), ep("10.1.0.2")], ports=[{"name": "http", "port": 8080}]
        )
    )
    skipped: Counter[str] = Counter()
    return translate_service(svc, [es], NODE, cfg, skipped), skipped


def maglev_types(fes: list[Frontend]) -> set[tuple[str, int]]:
    return {(f.type, f.scope) for f in fes if f.flags & SvcFlag.MAGLEV}


@pytest.mark.parametrize(
    ("annotation", "default", "on"),
    [(None, "random", False), (None, "maglev", True), ("maglev", "random", True), ("Maglev ", "random", True),
     ("random", "maglev", False)],
)  # fmt: skip
def test_annotation_and_flag(annotation: str | None, default: str, on: bool) -> None:
    ann = {"kproxy.io/lb-algorithm": annotation} if annotation is not None else None
    fes, skipped = frontends(ann, TranslateConfig(lb_algorithm=default))
    want = {("NodePort", Scope.EXT), ("LoadBalancer", Scope.EXT)} if on else set()
    assert maglev_types(fes) == want and not skipped


def test_invalid_annotation_is_counted_and_the_default_applies() -> None:
    fes, skipped = frontends(
        {"kproxy.io/lb-algorithm": "round-robin"}, TranslateConfig(lb_algorithm="maglev")
    )
    assert skipped["lb_algorithm_invalid"] == 1
    assert maglev_types(fes) == {("NodePort", Scope.EXT), ("LoadBalancer", Scope.EXT)}


def test_etp_local_pods_scope_stays_random() -> None:
    fes, _ = frontends({"kproxy.io/lb-algorithm": "maglev"}, TranslateConfig(), externalTrafficPolicy="Local")
    assert maglev_types(fes) == {("NodePort", Scope.EXT), ("LoadBalancer", Scope.EXT)}
    assert any(f.scope == Scope.INT for f in fes)  # pods' scope exists, without the flag


def test_the_annotation_survives_the_compact_model() -> None:
    svc = parse_service(svc_raw(annotations={"kproxy.io/lb-algorithm": "maglev", "example.com/x": "y"}))
    assert svc.metadata.annotations.get("kproxy.io/lb-algorithm") == "maglev"


def test_config_primes_agree_with_the_builder() -> None:
    from kproxy import config

    assert config.MAGLEV_PRIMES == maglev.PRIMES and config.MAGLEV_DEFAULT_SIZE == maglev.DEFAULT_SIZE


def test_as_many_backends_as_slots_take_a_bigger_prime() -> None:
    """A table needs more slots than backends: at or above the configured size, the next of PRIMES (the
    same on every node); nothing fails."""
    maps = MemoryMapSet()
    s = Syncer(maps, maglev_size=251)
    many = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(251)]
    r = s.apply(
        {
            "default/web": [lb_fe("default/web", many)],
            "default/other": [lb_fe("default/other", backends(2, "10.7.0."), lb="198.51.100.9")],
        },
        full=True,
    )
    assert not r.failed and not s.errors
    t = decode(maps.maglev.table(s.svc_id("default/web", "http", "TCP")) or b"")  # type: ignore[arg-type]
    assert t.m == 509 and len(t.backend_ids) == 251 and len(maps.maglev) == 2


def test_two_services_never_share_an_id_after_a_restart() -> None:
    """While the agent was down, Service a's LoadBalancer IP moved to Service b. After the restart each
    keeps its own service-port id, so neither gets the other's table (nor its source ranges)."""
    maps = MemoryMapSet()
    s = Syncer(maps, maglev_size=251)
    refs = tuple(BackendRef(a, 8080, "TCP") for a in backends(3))
    flags = int(SvcFlag.NODEPORT | SvcFlag.MAGLEV)
    np_a = Frontend("default/a", "http", "NodePort", "192.168.1.10", 30080, "TCP", Scope.EXT, flags, 0, refs)
    s.apply({"default/a": [lb_fe("default/a", backends(3)), np_a]}, full=True)
    again = Syncer(maps, maglev_size=251)
    again.adopt()
    b_backends = backends(2, "10.9.0.")
    again.apply({"default/a": [np_a], "default/b": [lb_fe("default/b", b_backends)]}, full=True)
    sa, sb = again.svc_id("default/a", "http", "TCP"), again.svc_id("default/b", "http", "TCP")
    assert sa != sb
    assert set(addresses(maps, sa)) == set(backends(3)) and set(addresses(maps, sb)) == set(b_backends)  # type: ignore[arg-type]


def test_a_full_backend_map_keeps_tables_in_step() -> None:
    """A batch that fails on a full map is written Service by Service: each Service's table goes with its
    frontends, and a Service that does not fit leaves no table naming its backends."""
    maps = MemoryMapSet(be4_max=5)
    s = Syncer(maps, maglev_size=251)
    s.apply({"default/a": [lb_fe("default/a", backends(3))]}, full=True)
    r = s.apply({
        "default/a": [lb_fe("default/a", backends(2))],
        "default/e": [lb_fe("default/e", backends(4, "10.5.0."), lb="198.51.100.30")],  # does not fit
    })  # fmt: skip
    assert set(r.failed) == {"default/e"}
    assert set(addresses(maps, s.svc_id("default/a", "http", "TCP"))) == set(backends(2))  # type: ignore[arg-type]
    assert len(maps.maglev) == 1


def test_a_table_the_kernel_refuses_leaves_the_port_random() -> None:
    maps = MemoryMapSet()
    maps.maglev.put_tables = lambda tables: [(sid, OSError(12, "no memory")) for sid, _ in tables]  # type: ignore[method-assign]
    s = Syncer(maps, maglev_size=251)
    r = s.apply({"default/a": [lb_fe("default/a", backends(3))]}, full=True)
    assert not r.failed and s.errors["maglev_write_failed"] == 1 and len(maps.svc4) == 4


def test_tables_are_written_after_backends_and_before_the_frontends() -> None:
    """The datapath must find a new Maglev frontend's table (and the table its backends)."""
    maps = MemoryMapSet()
    order: list[str] = []
    for name in ("svc4", "be4"):
        m = getattr(maps, name)
        put = m.put_packed

        def traced(keys: bytes, values: bytes, n: int, put: Any = put, name: str = name) -> None:
            order.append(name)
            put(keys, values, n)

        m.put_packed = traced
    put_tables = maps.maglev.put_tables

    def traced_tables(tables: Any) -> Any:
        order.append("maglev")
        return put_tables(tables)

    maps.maglev.put_tables = traced_tables  # type: ignore[method-assign]
    Syncer(maps, maglev_size=251).apply({"default/a": [lb_fe("default/a", backends(3))]}, full=True)
    assert order == ["be4", "maglev", "svc4", "svc4"]  # backends, the table, slots, then slot 0


def test_only_an_invalid_annotation_is_counted_in_the_store() -> None:
    from kproxy.pipeline import _Translated as DesiredView

    class Store:
        node = NODE
        skipped: Counter[tuple[str, str]] = Counter()

        def view(self, key: str) -> Any:
            svc = parse_service(svc_raw(annotations={"kproxy.io/lb-algorithm": "hash"}, cluster_ip="None"
                                        if key == "default/headless" else "10.96.0.10"))  # fmt: skip
            return svc, []

    store = Store()
    view = DesiredView(store, {"default/web", "default/headless"}, TranslateConfig())  # type: ignore[arg-type]
    view["default/web"]
    view["default/headless"]
    assert store.skipped == Counter({("Service", "lb_algorithm_invalid"): 1})


def test_kproxy_services_says_which_frontends_use_maglev() -> None:
    from kproxy.cli.inspect import render_services
    from kproxy.observe import inspect as insp

    maps = MemoryMapSet()
    s = Syncer(maps, maglev_size=251)
    s.apply(
        {
            "default/web": [
                lb_fe("default/web", backends(2)),
                lb_fe("default/web", backends(2), maglev_flag=False, lb="198.51.100.21"),
            ]
        },
        full=True,
    )
    rows = insp.services(maps.svc4, maps.be4, {})
    assert sorted(("maglev" in r["flags"], r["address"]) for r in rows) == [
        (False, "198.51.100.21"),
        (True, LB),
    ]
    lines = render_services(rows).splitlines()
    assert lines[0].split()[6] == "LB"
    assert [("maglev" in line.split()) for line in lines[1:]] == [r["address"] == LB for r in rows]
