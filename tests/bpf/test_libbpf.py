"""kproxy.bpf.libbpf against the real kernel: load, maps, pins, test runs, errors, no fd leaks."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kproxy import abi
from kproxy.bpf import libbpf as lb

pytestmark = pytest.mark.root


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_load_pins_maps_and_runs_program(probe_object: Path, bpffs: Path) -> None:
    with lb.BpfObject.open(probe_object, pin_root_path=str(bpffs), map_sizes={abi.MAP_CT4: 1024}) as obj:
        obj.load()
        assert {p.name for p in bpffs.iterdir()} >= set(abi.ALL_MAPS)
        ct = obj.map(abi.MAP_CT4)
        assert (ct.type, ct.max_entries, ct.key_size) == (lb.BPF_MAP_TYPE_LRU_HASH, 1024, 16)
        assert ct.info().max_entries == 1024
        prog = obj.program("kp_to_pod")
        frame = bytes(range(64))
        run = lb.prog_test_run(prog.fd, frame, ctx=bytes(abi.SKB_CTX_SIZE), repeat=2)
        assert run.retval == 0
        assert run.data_out == frame
        assert run.ctx_out is not None and len(run.ctx_out) == abi.SKB_CTX_SIZE
        stats = obj.map(abi.MAP_STATS)
        raw = stats.lookup(ctypes.c_uint32(abi.Stat.TO_POD))
        assert raw is not None and len(raw) == 16 * lb.num_possible_cpus()
        per_cpu = [abi.Counter.from_buffer_copy(raw, 16 * i) for i in range(stats.ncpus)]
        assert sum(c.packets for c in per_cpu) == 2
        assert sum(c.bytes for c in per_cpu) == 128


def test_element_ops_and_iteration(probe_object: Path) -> None:
    with lb.BpfObject.open(probe_object) as obj:
        obj.load()
        be = obj.map(abi.MAP_BE4)
        assert be.lookup(ctypes.c_uint32(7)) is None
        be.update(ctypes.c_uint32(7), abi.Be4Val(addr=1, port=2))
        be.update(ctypes.c_uint32(8), bytes(abi.Be4Val(addr=3)))
        got = be.lookup(ctypes.c_uint32(7))
        assert got is not None and abi.Be4Val.from_buffer_copy(got).port == 2
        assert sorted(int.from_bytes(k, "little") for k in be.iter_keys()) == [7, 8]
        with pytest.raises(lb.LibbpfError) as exc:
            be.update(ctypes.c_uint32(7), abi.Be4Val(), flags=lb.BPF_NOEXIST)
        assert exc.value.errno == errno.EEXIST and "kp_be4_v1" in str(exc.value)
        assert be.delete(ctypes.c_uint32(7)) is True
        assert be.delete(ctypes.c_uint32(7)) is False
        with pytest.raises(ValueError, match="key is 2 bytes"):
            be.lookup(b"ab")


def test_batch_ops(probe_object: Path) -> None:
    with lb.BpfObject.open(probe_object, map_sizes={abi.MAP_BE4: 5000}) as obj:
        obj.load()
        be = obj.map(abi.MAP_BE4)
        n = 3000
        keys = (ctypes.c_uint32 * n)(*range(n))
        values = (abi.Be4Val * n)(*[abi.Be4Val(addr=i) for i in range(n)])
        assert be.update_batch(keys, values, n) == n
        items = dict(be.lookup_batch(chunk=128))
        assert len(items) == n
        assert abi.Be4Val.from_buffer_copy(items[(1234).to_bytes(4, "little")]).addr == 1234
        # delete stops at the first absent key
        absent = (ctypes.c_uint32 * 3)(0, 99999, 1)
        assert be.delete_batch(absent, 3) == 1
        assert be.lookup(ctypes.c_uint32(1)) is not None


def test_pin_and_reopen(probe_object: Path, bpffs: Path) -> None:
    with lb.BpfObject.open(probe_object, pin_root_path=str(bpffs)) as obj:
        obj.load()
        obj.map(abi.MAP_BE4).update(ctypes.c_uint32(1), abi.Be4Val(addr=42))
    with lb.Map.open_pinned(str(bpffs / abi.MAP_BE4)) as m:
        assert m.name == abi.MAP_BE4
        got = m.lookup(ctypes.c_uint32(1))
        assert got is not None and abi.Be4Val.from_buffer_copy(got).addr == 42
    with pytest.raises(lb.LibbpfError, match="open pinned object .*nothing"):
        lb.obj_get(str(bpffs / "nothing"))


def test_max_entries_mismatch_with_pin_fails(probe_object: Path, bpffs: Path) -> None:
    with lb.BpfObject.open(probe_object, pin_root_path=str(bpffs)) as obj:
        obj.load()
    with (
        lb.BpfObject.open(probe_object, pin_root_path=str(bpffs), map_sizes={abi.MAP_CT4: 999}) as obj,
        pytest.raises(lb.LibbpfError) as exc,
    ):
        obj.load()
    assert exc.value.errno == errno.EINVAL
    assert any("kp_ct4_v1" in m for m in exc.value.libbpf_messages)


BAD_PROGRAM = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("tc") int kp_unchecked(struct __sk_buff *skb)
{
	return *(int *)(long)skb->data; /* no bounds check against data_end */
}
"""


def test_verifier_rejection_carries_log(tmp_path: Path, bpf_compile: Callable[[Path, Path], Path]) -> None:
    src = tmp_path / "bad.bpf.c"
    src.write_text(BAD_PROGRAM)
    obj_path = bpf_compile(src, tmp_path)
    with lb.BpfObject.open(obj_path) as obj, pytest.raises(lb.LibbpfError) as exc:
        obj.load()
    assert exc.value.errno == errno.EACCES
    assert "invalid access to packet" in exc.value.log
    assert "invalid access to packet" in str(exc.value)
    assert str(obj_path) in str(exc.value)


def test_no_fd_leaks(probe_object: Path, bpffs: Path) -> None:
    before = fd_count()
    for _ in range(3):
        with lb.BpfObject.open(probe_object, pin_root_path=str(bpffs)) as obj:
            obj.load()
            lb.prog_test_run(obj.program("kp_from_pod").fd, bytes(64))
            list(obj.map(abi.MAP_STATS).lookup_batch())
        with lb.Map.open_pinned(str(bpffs / abi.MAP_CFG)) as m:
            m.info()
        with (
            lb.BpfObject.open(probe_object, pin_root_path=str(bpffs), map_sizes={abi.MAP_CT4: 5}) as bad,
            pytest.raises(lb.LibbpfError),
        ):
            bad.load()
    assert fd_count() == before


def test_open_missing_object_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make bpf"):
        lb.BpfObject.open(tmp_path / "nope.bpf.o")
