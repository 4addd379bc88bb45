"""`kproxy services|backends|conntrack|affinity|nat` on a dual-stack node: IPv6 rows beside IPv4 ones.

The rows come from kproxy.observe.inspect over MemoryMapSet (the in-memory twin of the pinned maps,
same keys and values); tests/netns/test_cli.py runs the commands on real pinned maps.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kproxy import abi
from kproxy.abi import SvcFlag
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.cli.common import Cli
from kproxy.cli.inspect import render_services, snat_rows
from kproxy.observe import inspect as insp
from kproxy.observe.metadata import read_metadata, write_metadata

TCP = abi.IPPROTO_TCP
SEC = 1_000_000_000
NOW = 1000 * SEC

SVC4, SVC6 = 3, abi.ID6_BASE + 3  # the two service-port ids of one dual-stack Service port
BE4_A, BE4_B = 7, 9
BE6_A, BE6_B = abi.ID6_BASE + 7, abi.ID6_BASE + 9
META = {
    SVC4: {"service": "demo/echo", "port_name": "http", "protocol": "TCP"},
    SVC6: {"service": "demo/echo", "port_name": "http", "protocol": "TCP"},
}


def in6(address: str) -> Any:
    return abi.In6.from_buffer_copy(abi.ip6_to_bytes(address))


def svc6_key(address: str, port: int, slot: int, scope: int = 0) -> abi.Svc6Key:
    return abi.Svc6Key(addr=in6(address), port=abi.port_to_nbo(port), slot=slot, proto=TCP, scope=scope)


def svc4_key(address: str, port: int, slot: int) -> abi.Svc4Key:
    return abi.Svc4Key(abi.ip_to_nbo(address), abi.port_to_nbo(port), slot, TCP, 0)


def dual_stack(maps: Any) -> Any:
    """demo/echo:http on both families (ClusterIP 10.96.0.10 and fd00:96::a, NodePort 30080 on
    192.168.77.11 and fd00:77::11), two backends each (one terminating), affinity on; one flow and
    one affinity entry per family. MAPS: a MemoryMapSet or KproxyMaps."""
    aff = SvcFlag.AFFINITY
    maps.be4.put_many([
        (ctypes.c_uint32(BE4_A), abi.Be4Val(abi.ip_to_nbo("10.244.1.11"), abi.port_to_nbo(8080), TCP, 1, 0)),
        (ctypes.c_uint32(BE4_B), abi.Be4Val(abi.ip_to_nbo("10.244.2.11"), abi.port_to_nbo(8080), TCP, 2,
                                            abi.ip_to_nbo("192.168.77.12"))),
    ])  # fmt: skip
    maps.be6.put_many([
        (ctypes.c_uint32(BE6_A), abi.Be6Val(in6("fd00:244:1::11"), abi.port_to_nbo(8080), TCP, 1, in6("::"))),
        (ctypes.c_uint32(BE6_B), abi.Be6Val(in6("fd00:244:2::11"), abi.port_to_nbo(8080), TCP, 2,
                                            in6("fd00:77::12"))),
    ])  # fmt: skip
    maps.svc4.put_many([
        (svc4_key("10.96.0.10", 80, 0), abi.Svc4Val(0, SVC4, 2, aff, 600)),
        (svc4_key("10.96.0.10", 80, 1), abi.Svc4Val(BE4_A, SVC4, 0, 0, 0)),
        (svc4_key("10.96.0.10", 80, 2), abi.Svc4Val(BE4_B, SVC4, 0, 0, 0)),
        (svc4_key("192.168.77.11", 30080, 0), abi.Svc4Val(0, SVC4, 1, SvcFlag.NODEPORT | aff, 600)),
        (svc4_key("192.168.77.11", 30080, 1), abi.Svc4Val(BE4_A, SVC4, 0, 0, 0)),
    ])  # fmt: skip
    maps.svc6.put_many([
        (svc6_key("fd00:96::a", 80, 0), abi.Svc4Val(0, SVC6, 2, aff, 600)),
        (svc6_key("fd00:96::a", 80, 1), abi.Svc4Val(BE6_A, SVC6, 0, 0, 0)),
        (svc6_key("fd00:96::a", 80, 2), abi.Svc4Val(BE6_B, SVC6, 0, 0, 0)),
        (svc6_key("fd00:77::11", 30080, 0), abi.Svc4Val(0, SVC6, 2, SvcFlag.NODEPORT | aff, 600)),
        (svc6_key("fd00:77::11", 30080, 1), abi.Svc4Val(BE6_A, SVC6, 0, 0, 0)),  # slot 2 missing
    ])  # fmt: skip
    maps.ct4.put_many([(
        abi.Ct4Key(saddr=abi.ip_to_nbo("10.244.1.12"), daddr=abi.ip_to_nbo("10.96.0.10"),
                   sport=abi.port_to_nbo(40000), dport=abi.port_to_nbo(80), proto=TCP, dir=abi.CtDir.FWD),
        abi.Ct4Val(expires_ns=NOW + 30 * SEC, backend_id=BE4_A, svc_id=SVC4,
                   nat_addr=abi.ip_to_nbo("10.244.1.11"), nat_port=abi.port_to_nbo(8080),
                   state=abi.CtState.ESTABLISHED),
    )])  # fmt: skip
    maps.ct6.put_many([
        (
            abi.Ct6Key(saddr=in6("fd00:244:1::12"), daddr=in6("fd00:96::a"), sport=abi.port_to_nbo(40001),
                       dport=abi.port_to_nbo(80), proto=TCP, dir=d),
            abi.Ct6Val(expires_ns=NOW + 20 * SEC, backend_id=BE6_B, svc_id=SVC6,
                       nat_addr=in6("fd00:244:2::11"), nat_port=abi.port_to_nbo(8080),
                       state=abi.CtState.ESTABLISHED),
        )
        for d in (abi.CtDir.FWD, abi.CtDir.REPLY)
    ])  # fmt: skip
    maps.aff4.put_many([
        (abi.Aff4Key(abi.ip_to_nbo("10.244.1.12"), SVC4),
         abi.Aff4Val(last_used_ns=NOW - 100 * SEC, backend_id=BE4_A)),
    ])  # fmt: skip
    maps.aff6.put_many([
        (abi.Aff6Key(in6("fd00:244:1::12"), SVC6),
         abi.Aff4Val(last_used_ns=NOW - 50 * SEC, backend_id=BE6_B)),
    ])  # fmt: skip
    return maps


@pytest.fixture
def maps() -> MemoryMapSet:
    return dual_stack(MemoryMapSet())


def test_services_list_both_families_with_names_through_the_metadata(maps: MemoryMapSet) -> None:
    rows = insp.services(maps.svc4, maps.be4, META, svc6=maps.svc6, be6=maps.be6)
    assert [(r["type"], r["family"], r["address"], r["port"]) for r in rows] == [
        ("ClusterIP", 4, "10.96.0.10", 80),
        ("ClusterIP", 6, "fd00:96::a", 80),
        ("NodePort", 4, "192.168.77.11", 30080),
        ("NodePort", 6, "fd00:77::11", 30080),
    ]
    cip6 = rows[1]
    assert (cip6["service"], cip6["port_name"], cip6["svc_id"]) == ("demo/echo", "http", SVC6)
    assert (cip6["protocol"], cip6["scope"], cip6["affinity_timeout"]) == ("TCP", "external", 600)
    assert cip6["flags"] == ["affinity"]
    got = [(b["family"], b["id"], b["address"], b["port"], b["state"], b["node"]) for b in cip6["backends"]]
    assert got == [
        (6, BE6_A, "fd00:244:1::11", 8080, "active", None),
        (6, BE6_B, "fd00:244:2::11", 8080, "terminating", "fd00:77::12"),
    ]  # fmt: skip
    np6 = rows[3]
    assert [(b["slot"], b["family"], b["state"]) for b in np6["backends"]] == [
        (1, 6, "active"),
        (2, 6, "missing-slot"),
    ]
    assert all(r["family"] == 4 for r in rows[0]["backends"])
    json.dumps(rows)  # what -o json prints


def test_services_table_prints_ipv6_in_brackets(maps: MemoryMapSet) -> None:
    text = render_services(insp.services(maps.svc4, maps.be4, META, svc6=maps.svc6, be6=maps.be6))
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "PORT", "TYPE", "FRONTEND", "SCOPE", "AFFINITY", "LB", "BACKENDS"]
    assert "10.96.0.10:80/TCP" in lines[1] and "10.244.1.11:8080, 10.244.2.11:8080 (terminating)" in lines[1]
    assert "[fd00:96::a]:80/TCP" in lines[2]
    assert "[fd00:244:1::11]:8080, [fd00:244:2::11]:8080 (terminating)" in lines[2]
    assert "[fd00:77::11]:30080/TCP" in lines[4] and "? (missing-slot)" in lines[4]
    assert all("demo/echo" in line and "600s" in line for line in lines[1:])


def test_v6_ids_without_metadata_are_labelled_by_id(maps: MemoryMapSet) -> None:
    rows = insp.services(maps.svc4, maps.be4, {}, svc6=maps.svc6, be6=maps.be6)
    assert {r["service"] for r in rows} == {f"?svc#{SVC4}", f"?svc#{SVC6}"}


def test_a_v6_backend_missing_from_its_map_is_reported_as_such(maps: MemoryMapSet) -> None:
    maps.be6.delete_many([ctypes.c_uint32(BE6_B)])
    rows = insp.services(maps.svc4, maps.be4, META, svc6=maps.svc6, be6=maps.be6)
    missing = rows[1]["backends"][1]
    assert (missing["id"], missing["family"], missing["state"]) == (BE6_B, 6, "missing")


def test_backends_ipv4_then_ipv6(maps: MemoryMapSet) -> None:
    rows = insp.backends(maps.be4, maps.be6)
    assert [(r["family"], r["id"], r["address"], r["flags"]) for r in rows] == [
        (4, BE4_A, "10.244.1.11", ["local"]),
        (4, BE4_B, "10.244.2.11", ["terminating"]),
        (6, BE6_A, "fd00:244:1::11", ["local"]),
        (6, BE6_B, "fd00:244:2::11", ["terminating"]),
    ]
    assert [r["node"] for r in rows] == [None, "192.168.77.12", None, "fd00:77::12"]


def test_conntrack_both_families_with_bracketed_endpoints(maps: MemoryMapSet) -> None:
    rows = insp.conntrack(maps.ct4, META, now_ns=NOW, ct6=maps.ct6)
    assert [(r["family"], r["src"], r["dst"], r["nat"], r["service"], r["seconds_left"]) for r in rows] == [
        (4, "10.244.1.12:40000", "10.96.0.10:80", "10.244.1.11:8080", "demo/echo", 30.0),
        (6, "[fd00:244:1::12]:40001", "[fd00:96::a]:80", "[fd00:244:2::11]:8080", "demo/echo", 20.0),
    ]  # fmt: skip
    both = insp.conntrack(maps.ct4, META, include_reply=True, now_ns=NOW, ct6=maps.ct6)
    assert [(r["direction"], r["family"]) for r in both] == [("forward", 4), ("forward", 6), ("reply", 6)]


def test_affinity_both_families(maps: MemoryMapSet) -> None:
    rows = insp.affinity(
        maps.aff4, maps.svc4, maps.be4, META, now_ns=NOW, aff6=maps.aff6, svc6=maps.svc6, be6=maps.be6
    )
    assert rows == [
        {
            "family": 4, "client": "10.244.1.12", "service": "demo/echo", "svc_id": SVC4, "backend_id": BE4_A,
            "backend": "10.244.1.11:8080", "age_seconds": 100.0, "seconds_left": 500.0,
        },
        {
            "family": 6, "client": "fd00:244:1::12", "service": "demo/echo", "svc_id": SVC6,
            "backend_id": BE6_B, "backend": "[fd00:244:2::11]:8080", "age_seconds": 50.0,
            "seconds_left": 550.0,
        },
    ]  # fmt: skip


def test_addresses_sort_numerically_ipv4_first() -> None:
    order = ["10.0.0.9", "10.0.0.10", "::1", "fd00::9", "fd00::10"]
    assert sorted(reversed(order), key=insp.addr_order) == order
    eps = ["10.0.0.9:80", "10.0.0.9:443", "[fd00::1]:80"]
    assert sorted(reversed(eps), key=insp.endpoint_order) == ["10.0.0.9:80", "10.0.0.9:443", "[fd00::1]:80"]


def test_snat_rows_carry_the_family() -> None:
    k = abi.Snat4Key(saddr=abi.ip_to_nbo("10.244.2.11"), daddr=abi.ip_to_nbo("192.168.77.11"),
                     sport=abi.port_to_nbo(8080), dport=abi.port_to_nbo(40000), proto=TCP)  # fmt: skip
    v = abi.Snat4Val(expires_ns=NOW + SEC, client_addr=abi.ip_to_nbo("192.168.77.100"),
                     front_addr=abi.ip_to_nbo("192.168.77.11"), client_port=abi.port_to_nbo(51000),
                     front_port=abi.port_to_nbo(30080), state=abi.CtState.ESTABLISHED)  # fmt: skip
    (row,) = snat_rows([(k, v)], now_ns=NOW)
    assert row["family"] == 4 and row["backend"] == "10.244.2.11:8080"
    k6 = abi.Snat6Key(saddr=in6("fd00:244:2::11"), daddr=in6("fd00:77::11"), sport=abi.port_to_nbo(8080),
                      dport=abi.port_to_nbo(40000), proto=TCP)  # fmt: skip
    v6 = abi.Snat6Val(expires_ns=NOW + SEC, client_addr=in6("2001:db8::100"), front_addr=in6("fd00:77::11"),
                      client_port=abi.port_to_nbo(51000), front_port=abi.port_to_nbo(30080),
                      state=abi.CtState.ESTABLISHED)  # fmt: skip
    (row6,) = snat_rows([(k6, v6)], now_ns=NOW, family=6)
    assert row6 == {
        "family": 6, "protocol": "TCP", "backend": "[fd00:244:2::11]:8080", "snat": "[fd00:77::11]:40000",
        "client": "[2001:db8::100]:51000", "frontend": "[fd00:77::11]:30080", "state": "ESTABLISHED",
        "seconds_left": 1.0,
    }  # fmt: skip


def test_metadata_waits_for_the_names_of_new_v6_ids(
    maps: MemoryMapSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI waits (up to METADATA_WAIT_S) for names of ids in either service map; the agent
    writes the ids of IPv6 service ports (>= ID6_BASE) into services.json as it does IPv4 ones."""
    monkeypatch.setenv("KPROXY_STATE_ROOT", str(tmp_path / "state"))
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    write_metadata(bpffs, "n1", {SVC4: META[SVC4]})
    late = threading.Timer(0.2, write_metadata, (bpffs, "n1", META))
    late.start()
    try:
        started = time.monotonic()
        meta = Cli(bpffs=str(bpffs)).metadata(maps.svc4, maps.svc6)
    finally:
        late.join()
    assert meta == read_metadata(bpffs) and meta[SVC6]["service"] == "demo/echo"
    assert time.monotonic() - started < 0.9
