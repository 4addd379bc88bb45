"""PROG_TEST_RUN tables for Maglev backend selection (lib/maglev.h, kp_lb_select).

A frontend flagged KP_SVC_F_MAGLEV sends a new flow to the backend its port's table (kp_maglev_v1)
holds for the flow's hash; the tables are made exactly as the agent makes them (kproxy.sync.mgsync,
kproxy.sync.maglev) and the expected backend of each flow is worked out in Python from the same
table and kproxy.sync.maglev.flow_hash, so the kernel's hash and table walk are checked bit for bit.
"""

from __future__ import annotations

import socket
from collections import Counter

import pytest
from datapath import Backend, Datapath, in6
from frames import parse, tcp_frame, udp_frame
from frames6 import parse6, tcp6_frame

from kproxy import abi
from kproxy.abi import IPPROTO_TCP, IPPROTO_UDP, BackendFlag, Stat, SvcFlag
from kproxy.sync import maglev
from kproxy.sync.mgsync import decode, digest

NODE, NODEPORT = "192.168.1.10", 30080
NODE6 = "fd00:1::10"
MAGLEV_NP = SvcFlag.NODEPORT | SvcFlag.MAGLEV


def name4(be: Backend, proto: int) -> bytes:
    """The backend's identity as the agent hashes it: its kp_be4 value's address, port and protocol."""
    return socket.inet_aton(be.addr) + abi.port_to_nbo(be.port).to_bytes(2, "little") + bytes([proto])


def name6(be: Backend, proto: int) -> bytes:
    return bytes(in6(be.addr)) + abi.port_to_nbo(be.port).to_bytes(2, "little") + bytes([proto])


def put_table(
    dp: Datapath, svc_id: int, backends: list[Backend], names: list[bytes], m: int
) -> list[Backend]:
    """Write the port's table as the agent does; returns the backend of each table index's list entry
    order: table entry j names by_entry[entries[j]]."""
    pairs = sorted(zip(names, backends, strict=True), key=lambda nb: nb[0])
    sorted_names = [n for n, _ in pairs]
    ids = [b.id for _, b in pairs]
    order, entries = maglev.build(sorted_names, m)
    dp.maglev.put_tables(
        [(svc_id, maglev.pack_rows(m, entries, [ids[k] for k in order], digest(m, sorted_names, ids)))]
    )
    put_table.entries = entries  # type: ignore[attr-defined]
    return [pairs[k][1] for k in order]


def expected(
    by_index: list[Backend], entries: object, m: int, client: bytes, sport: int, dport: int, proto: int
) -> Backend:
    h = maglev.flow_hash(client, sport, dport, proto)
    return by_index[entries[h % m]]  # type: ignore[index]


def backends(n: int, flags: int = BackendFlag.LOCAL) -> list[Backend]:
    return [Backend(100 + i, f"10.1.{i // 200}.{i % 200 + 1}", 8080, flags) for i in range(n)]


@pytest.mark.parametrize(
    ("n", "m", "prog"),
    [(10, maglev.DEFAULT_SIZE, "kp_from_netdev"), (3, 251, "kp_from_netdev"), (300, 1021, "kp_from_netdev"),
     (10, maglev.DEFAULT_SIZE, "kp_xdp")],
)  # fmt: skip
def test_new_flows_take_the_table_backend(dp: Datapath, n: int, m: int, prog: str) -> None:
    """kp_xdp picks as kp_from_netdev does for the flows it opens (a local backend: DNAT, XDP_PASS)."""
    bes = backends(n)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, bes, flags=MAGLEV_NP, svc_id=7)
    by_index = put_table(dp, 7, bes, [name4(b, IPPROTO_TCP) for b in bes], m)
    entries = put_table.entries  # type: ignore[attr-defined]
    got = Counter()
    for i in range(200):
        client, sport = f"203.0.{113 + i % 3}.{i % 250 + 1}", 20000 + 37 * i
        out = dp.run(prog, tcp_frame(client, NODE, sport, NODEPORT))
        p = parse(out.data_out)
        want = expected(by_index, entries, m, socket.inet_aton(client), sport, NODEPORT, IPPROTO_TCP)
        verdict = 2 if prog == "kp_xdp" else 0  # XDP_PASS, TC_ACT_OK
        assert (out.retval, p.dst, p.dport) == (verdict, want.addr, want.port), (client, sport)
        got[p.dst] += 1
    assert dp.stat(Stat.MAGLEV)[0] == 200 and dp.stat(Stat.MAGLEV_FALLBACK)[0] == 0
    assert dp.stat(Stat.XDP_NEW)[0] == (200 if prog == "kp_xdp" else 0)
    assert len(got) > 1  # the flows spread


def test_udp_and_the_frontend_port_are_hashed(dp: Datapath) -> None:
    bes = backends(8)
    dp.add_service(NODE, 53, IPPROTO_UDP, bes, flags=MAGLEV_NP, svc_id=9)
    by_index = put_table(dp, 9, bes, [name4(b, IPPROTO_UDP) for b in bes], 251)
    entries = put_table.entries  # type: ignore[attr-defined]
    for sport in range(40000, 40060):
        out = dp.run("kp_from_netdev", udp_frame("198.51.100.7", NODE, sport, 53))
        want = expected(by_index, entries, 251, socket.inet_aton("198.51.100.7"), sport, 53, IPPROTO_UDP)
        assert parse(out.data_out).dst == want.addr


def test_same_flow_same_backend_on_another_node(dp: Datapath) -> None:
    """Two nodes with different backend ids (and slot orders) for the same endpoints agree."""
    bes = backends(12)
    client = "203.0.113.50"
    picks = []
    for ids_from, reverse in ((100, False), (5000, True)):
        dp.reset()
        node_bes = [Backend(ids_from + i, b.addr, b.port, b.flags) for i, b in enumerate(bes)]
        slots = list(reversed(node_bes)) if reverse else node_bes
        dp.add_service(NODE, NODEPORT, IPPROTO_TCP, slots, flags=MAGLEV_NP, svc_id=3 if reverse else 4)
        put_table(dp, 3 if reverse else 4, node_bes, [name4(b, IPPROTO_TCP) for b in node_bes], 251)
        picks.append([
            parse(dp.run("kp_from_netdev", tcp_frame(client, NODE, sport, NODEPORT)).data_out).dst
            for sport in range(30000, 30100)
        ])  # fmt: skip
    assert picks[0] == picks[1]


def test_no_table_yet_falls_back_to_random(dp: Datapath) -> None:
    bes = backends(4)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, bes, flags=MAGLEV_NP, svc_id=7)
    for sport in range(30000, 30040):
        out = dp.run("kp_from_netdev", tcp_frame("203.0.113.1", NODE, sport, NODEPORT))
        assert out.retval == 0 and parse(out.data_out).dst in {b.addr for b in bes}
    assert dp.stat(Stat.MAGLEV_FALLBACK)[0] == 40 and dp.stat(Stat.MAGLEV)[0] == 0


def test_without_the_flag_the_table_is_not_read(dp: Datapath) -> None:
    bes = backends(4)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, bes, flags=SvcFlag.NODEPORT, svc_id=7)
    put_table(dp, 7, bes, [name4(b, IPPROTO_TCP) for b in bes], 251)
    dp.run("kp_from_netdev", tcp_frame("203.0.113.1", NODE, 30000, NODEPORT))
    assert (
        dp.stat(Stat.MAGLEV)[0] == 0
        and dp.stat(Stat.MAGLEV_FALLBACK)[0] == 0
        and dp.stat(Stat.CT_NEW)[0] == 1
    )


def test_terminating_table_backend_falls_back_to_a_slot(dp: Datapath) -> None:
    """The table names a backend now terminating (its table not rewritten yet): the flow takes a slot."""
    bes = backends(2)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, bes[1:], flags=MAGLEV_NP, svc_id=7)
    dp.add_backends(
        [Backend(bes[0].id, bes[0].addr, bes[0].port, BackendFlag.LOCAL | BackendFlag.TERMINATING)],
        IPPROTO_TCP,
    )
    by_index = put_table(dp, 7, bes, [name4(b, IPPROTO_TCP) for b in bes], 251)
    entries = put_table.entries  # type: ignore[attr-defined]
    client = socket.inet_aton("203.0.113.1")
    sport = next(
        s
        for s in range(30000, 31000)
        if expected(by_index, entries, 251, client, s, NODEPORT, IPPROTO_TCP) == bes[0]
    )
    out = dp.run("kp_from_netdev", tcp_frame("203.0.113.1", NODE, sport, NODEPORT))
    assert parse(out.data_out).dst == bes[1].addr
    assert dp.stat(Stat.MAGLEV_FALLBACK)[0] == 1 and dp.stat(Stat.MAGLEV)[0] == 0


def test_a_swapped_table_applies_to_new_flows_only(dp: Datapath) -> None:
    bes = backends(6)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, bes, flags=MAGLEV_NP, svc_id=7)
    put_table(dp, 7, bes, [name4(b, IPPROTO_TCP) for b in bes], 251)
    first = parse(dp.run("kp_from_netdev", tcp_frame("203.0.113.1", NODE, 30000, NODEPORT)).data_out).dst
    # the same flow's next packet follows conntrack; a new table naming only another backend
    other = next(b for b in bes if b.addr != first)
    put_table(dp, 7, [other], [name4(other, IPPROTO_TCP)], 251)
    ack = tcp_frame("203.0.113.1", NODE, 30000, NODEPORT, 0x10)
    assert parse(dp.run("kp_from_netdev", ack).data_out).dst == first
    for sport in range(31000, 31020):
        assert (
            parse(dp.run("kp_from_netdev", tcp_frame("203.0.113.1", NODE, sport, NODEPORT)).data_out).dst
            == other.addr
        )


def test_ipv6_new_flows_take_the_table_backend(dp: Datapath) -> None:
    bes = [Backend(abi.ID6_BASE + 100 + i, f"fd00:2::{i + 1:x}", 8080, BackendFlag.LOCAL) for i in range(9)]
    sid = abi.ID6_BASE + 5
    dp.add_service6(NODE6, NODEPORT, IPPROTO_TCP, bes, flags=MAGLEV_NP, svc_id=sid)
    by_index = put_table(dp, sid, bes, [name6(b, IPPROTO_TCP) for b in bes], 509)
    entries = put_table.entries  # type: ignore[attr-defined]
    for i in range(80):
        client = f"2001:db8::{i + 1:x}"
        out = dp.run("kp_from_netdev", tcp6_frame(client, NODE6, 41000 + i, NODEPORT))
        want = expected(
            by_index,
            entries,
            509,
            socket.inet_pton(socket.AF_INET6, client),
            41000 + i,
            NODEPORT,
            IPPROTO_TCP,
        )
        assert parse6(out.data_out).dst == want.addr
    assert dp.stat(Stat.MAGLEV, family=6)[0] == 80


def test_tables_read_back_from_the_kernel(dp: Datapath) -> None:
    """MaglevMap (what the agent adopts after a restart and the CLI reads): headers, whole tables."""
    bes = backends(300)
    put_table(dp, 11, bes, [name4(b, IPPROTO_TCP) for b in bes], 1021)
    small = backends(2)
    put_table(dp, 12, small, [name4(b, IPPROTO_TCP) for b in small], 251)
    assert len(dp.maglev) == 2 and set(dp.maglev.headers()) == {11, 12}
    t = decode(dp.maglev.table(11) or b"")
    assert (t.m, len(t.backend_ids), len(t.entries)) == (1021, 300, 1021)
    assert sorted(t.shares().values()) == [3] * 179 + [4] * 121  # Maglev: floor or ceil of m / n each
    assert abi.MaglevHdr.from_buffer_copy(dp.maglev.headers()[12]).m == 251
    assert dp.maglev.delete_tables([11, 99]) == 1 and dp.maglev.table(11) is None and len(dp.maglev) == 1
