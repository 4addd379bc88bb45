"""kproxy.bpf.maps against the real kernel: typed MapOps on pinned maps, batching, errors."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.mapapi import MapFullError
from kproxy.bpf.maps import KproxyMaps, MapLayoutError, MapsNotFoundError, PinnedMap

pytestmark = pytest.mark.root


def load_pinned(obj_path: Path, bpffs: Path, sizes: dict[str, int] | None = None) -> None:
    with lb.BpfObject.open(obj_path, pin_root_path=str(bpffs), map_sizes=sizes) as obj:
        obj.load()


@pytest.fixture
def kmaps(probe_object: Path, bpffs: Path) -> Iterator[KproxyMaps]:
    load_pinned(probe_object, bpffs, {abi.MAP_BE4: 1000, abi.MAP_SVC4: 1000, abi.MAP_AFF4: 64})
    with KproxyMaps.open(bpffs) as km:
        yield km


def svc_key(i: int, slot: int = 0) -> abi.Svc4Key:
    return abi.Svc4Key(
        addr=abi.ip_to_nbo("10.96.0.1") + (i << 24), port=abi.port_to_nbo(80), slot=slot, proto=6
    )


def test_hash_put_get_items_delete(kmaps: KproxyMaps) -> None:
    items = [(svc_key(i % 50, i // 50), abi.Svc4Val(backend_id=i, svc_id=7)) for i in range(600)]
    kmaps.svc4.put_many(items)
    assert len(kmaps.svc4) == 600
    got = kmaps.svc4.get(svc_key(3, 2))
    assert got is not None and got.backend_id == 103 and got.svc_id == 7
    assert kmaps.svc4.get(svc_key(3, 99)) is None
    assert sorted(v.backend_id for _, v in kmaps.svc4.items()) == list(range(600))
    # replace in place
    kmaps.svc4.put_many([(svc_key(3, 2), abi.Svc4Val(backend_id=9999))])
    assert kmaps.svc4.get(svc_key(3, 2)).backend_id == 9999  # type: ignore[union-attr]
    # absent keys (in the middle, at the end, duplicated) are ignored
    to_delete = [svc_key(0, 0), svc_key(0, 77), svc_key(1, 0), svc_key(1, 0), svc_key(2, 0), svc_key(9, 99)]
    assert kmaps.svc4.delete_many(to_delete) == 3
    assert len(kmaps.svc4) == 597
    assert kmaps.svc4.get(svc_key(2, 0)) is None
    assert kmaps.svc4.delete_many([]) == 0


def test_simple_key_type(kmaps: KproxyMaps) -> None:
    kmaps.be4.put_many([(ctypes.c_uint32(i), abi.Be4Val(addr=i, proto=17)) for i in range(1, 11)])
    assert {k.value: v.addr for k, v in kmaps.be4.items()} == {i: i for i in range(1, 11)}
    assert kmaps.be4.delete_many([ctypes.c_uint32(i) for i in range(0, 20)]) == 10
    assert len(kmaps.be4) == 0


def test_full_hash_map_raises_map_full(kmaps: KproxyMaps) -> None:
    kmaps.be4.put_many([(ctypes.c_uint32(i), abi.Be4Val()) for i in range(1000)])
    with pytest.raises(MapFullError) as exc:
        kmaps.be4.put_many([(ctypes.c_uint32(i), abi.Be4Val()) for i in range(1000, 1005)])
    assert exc.value.map_name == abi.MAP_BE4 and exc.value.capacity == 1000
    assert "kp_be4_v1" in str(exc.value)
    # replacing existing entries still works in a full map
    kmaps.be4.put_many([(ctypes.c_uint32(5), abi.Be4Val(addr=5))])
    assert kmaps.be4.get(ctypes.c_uint32(5)).addr == 5  # type: ignore[union-attr]


def test_lru_map_evicts_instead_of_failing(kmaps: KproxyMaps) -> None:
    kmaps.aff4.put_many([(abi.Aff4Key(i, 1), abi.Aff4Val(backend_id=i)) for i in range(200)])
    n = len(kmaps.aff4)
    assert 0 < n <= 64 + 2 * os.cpu_count()  # type: ignore[operator]  # LRU lists are per-CPU
    keys = [k for k, _ in kmaps.aff4.items()]
    assert kmaps.aff4.delete_many(keys + [abi.Aff4Key(12345, 1)]) == n
    assert len(kmaps.aff4) == 0


def test_large_batches_span_chunks(probe_object: Path, bpffs: Path) -> None:
    load_pinned(probe_object, bpffs)
    with KproxyMaps.open(bpffs) as km:
        keys = [abi.Ct4Key(saddr=i, daddr=1, sport=2, dport=3, proto=6) for i in range(40000)]
        km.ct4.put_many([(k, abi.Ct4Val(backend_id=k.saddr)) for k in keys])
        assert len(km.ct4) == 40000
        assert km.ct4.delete_many(keys[::2]) == 20000
        assert {k.saddr for k, _ in km.ct4.items()} == {k.saddr for k in keys[1::2]}


def test_config_and_stats(kmaps: KproxyMaps, probe_object: Path, bpffs: Path) -> None:
    assert kmaps.read_config().ct_tcp_timeout == 0
    kmaps.write_config(abi.Config(node_addr=abi.ip_to_nbo("192.0.2.1"), ct_tcp_timeout=300))
    cfg = kmaps.read_config()
    assert (abi.nbo_to_ip(cfg.node_addr), cfg.ct_tcp_timeout) == ("192.0.2.1", 300)
    assert len(kmaps.cfg) == 1
    with pytest.raises(TypeError, match="array"):
        kmaps.cfg.delete_many([ctypes.c_uint32(0)])
    # a program of a second object sharing the pinned stats map counts into it
    with lb.BpfObject.open(
        probe_object,
        pin_root_path=str(bpffs),
        map_sizes={abi.MAP_BE4: 1000, abi.MAP_SVC4: 1000, abi.MAP_AFF4: 64},
    ) as obj:
        obj.load()
        for _ in range(3):
            lb.prog_test_run(obj.program("kp_from_netdev").fd, bytes(100))
    totals = kmaps.stats.totals()
    assert len(totals) == abi.STAT_MAX
    assert totals[abi.Stat.FROM_NETDEV] == (3, 300)
    assert totals[abi.Stat.FROM_POD] == (0, 0)
    per_cpu = kmaps.stats.per_cpu(abi.Stat.FROM_NETDEV)
    assert len(per_cpu) == lb.num_possible_cpus()
    assert sum(c.packets for c in per_cpu) == 3


def test_stats_by_family(kmaps: KproxyMaps, bpffs: Path) -> None:
    """IPv6 packets count in kp_stats6_v1, IPv4 ones in kp_stats_v1: `kproxy stats` and the metrics show
    each family and their sum."""
    from kproxy.observe.inspect import stats as stat_rows
    from kproxy.observe.metrics import Metrics

    # the real programs (the probe's count everything in kp_stats_v1); an IPv6 frame too short to parse
    ipv6 = bytes(12) + b"\x86\xdd" + bytes(86)
    tc_object = Path(__file__).resolve().parents[2] / "kproxy" / "bpf" / "obj" / "kproxy_tc.bpf.o"
    with lb.BpfObject.open(
        tc_object,
        pin_root_path=str(bpffs),
        map_sizes={abi.MAP_BE4: 1000, abi.MAP_SVC4: 1000, abi.MAP_AFF4: 64},
    ) as obj:
        obj.load()
        for frame in (bytes(100), bytes(100), ipv6):
            lb.prog_test_run(obj.program("kp_from_netdev").fd, frame)
    by_family = kmaps.stat_totals_by_family()
    assert by_family["IPv4"][abi.Stat.FROM_NETDEV] == (2, 200)
    assert by_family["IPv6"][abi.Stat.FROM_NETDEV] == (1, 100)
    assert kmaps.stat_totals()[abi.Stat.FROM_NETDEV] == (3, 300)
    (row,) = [r for r in stat_rows(by_family) if r["counter"] == "from_netdev"]
    assert (row["packets"], row["ipv4_packets"], row["ipv6_packets"], row["ipv6_bytes"]) == (3, 2, 1, 100)
    m = Metrics()
    m.bind(maps=kmaps)
    text = m.render().decode()
    assert 'kproxy_datapath_packets_total{counter="from_netdev",family="IPv4"} 2.0' in text
    assert 'kproxy_datapath_packets_total{counter="from_netdev",family="IPv6"} 1.0' in text


def test_reopen_keeps_data(probe_object: Path, bpffs: Path) -> None:
    load_pinned(probe_object, bpffs)
    with KproxyMaps.open(bpffs) as km:
        km.be4.put_many([(ctypes.c_uint32(1), abi.Be4Val(addr=abi.ip_to_nbo("10.0.0.1")))])
    load_pinned(probe_object, bpffs)  # a new agent loading the object re-uses the pins
    with KproxyMaps.open(bpffs) as km:
        assert abi.nbo_to_ip(km.be4.get(ctypes.c_uint32(1)).addr) == "10.0.0.1"  # type: ignore[union-attr]


def test_open_errors(tmp_path: Path, bpffs: Path, probe_object: Path) -> None:
    with pytest.raises(MapsNotFoundError, match=f"no kproxy maps in {tmp_path}/x.*--bpffs"):
        KproxyMaps.open(tmp_path / "x")
    with pytest.raises(MapsNotFoundError, match="not a bpf filesystem"):
        KproxyMaps.open(tmp_path)
    with pytest.raises(
        MapsNotFoundError, match=f"no kproxy maps in {bpffs}: is the agent running with --bpffs"
    ):
        KproxyMaps.open(bpffs)
    load_pinned(probe_object, bpffs)
    os.unlink(bpffs / abi.MAP_AFF4)
    with pytest.raises(MapsNotFoundError, match="missing kp_aff4_v1"):
        KproxyMaps.open(bpffs)


def test_layout_mismatch_is_refused(probe_object: Path, bpffs: Path) -> None:
    load_pinned(probe_object, bpffs)
    with pytest.raises(MapLayoutError, match=r"kp_ct4_v1 .*key size 16 \(expected 8"):
        PinnedMap.open(str(bpffs / abi.MAP_CT4), abi.Aff4Key, abi.Ct4Val)
    with pytest.raises(MapLayoutError, match="type lru_hash"):
        PinnedMap.open(str(bpffs / abi.MAP_CT4), abi.Ct4Key, abi.Ct4Val, lb.BPF_MAP_TYPE_HASH)


def test_no_fd_leaks(probe_object: Path, bpffs: Path) -> None:
    load_pinned(probe_object, bpffs)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with KproxyMaps.open(bpffs) as km:
            list(km.svc4.items())
            km.stats.totals()
        with pytest.raises(MapLayoutError):
            PinnedMap.open(str(bpffs / abi.MAP_CT4), abi.Aff4Key, abi.Ct4Val)
    assert len(os.listdir("/proc/self/fd")) == before
