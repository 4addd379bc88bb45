"""The ctypes mirror (kproxy/abi.py) against the BTF and map definitions of the built objects.

The probe object (tests/abi/probe_maps.bpf.c: bpfsrc/maps.h plus every ABI type) is always checked;
the real kproxy_tc.bpf.o too once it is built. No root needed: nothing is loaded into the kernel.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.loader import PROGRAMS
from kproxy.bpf.maps import MAP_LAYOUT

TC_OBJECT = Path(__file__).resolve().parents[2] / "kproxy" / "bpf" / "obj" / "kproxy_tc.bpf.o"
OBJECTS = [
    "probe",
    pytest.param("tc", marks=pytest.mark.skipif(not TC_OBJECT.exists(), reason="make bpf first")),
]

BPF_F_NO_PREALLOC = 1
MAP_DEFAULTS = {
    abi.MAP_SVC4: (abi.SVC4_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_BE4: (abi.BE4_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_CT4: (abi.CT4_MAX, 0),
    abi.MAP_AFF4: (abi.AFF4_MAX, 0),
    abi.MAP_CFG: (1, 0),
    abi.MAP_STATS: (abi.STAT_MAX, 0),
    abi.MAP_STATS6: (abi.STAT_MAX, 0),
    abi.MAP_SNAT4: (abi.SNAT4_MAX, 0),
    abi.MAP_LBSRC4: (abi.LBSRC4_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_SVCNET4: (abi.SVCNET4_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_SVCNET_SPAN: (1, 0),
    abi.MAP_FRAG4: (abi.FRAG4_MAX, 0),
    abi.MAP_SVC6: (abi.SVC6_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_BE6: (abi.BE6_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_CT6: (abi.CT6_MAX, 0),
    abi.MAP_AFF6: (abi.AFF6_MAX, 0),
    abi.MAP_CFG6: (1, 0),
    abi.MAP_LBSRC6: (abi.LBSRC6_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_FRAG6: (abi.FRAG6_MAX, 0),
    abi.MAP_SNAT6: (abi.SNAT6_MAX, 0),
    abi.MAP_SVCNET6: (abi.SVCNET6_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_SVCNET6_SPAN: (1, 0),
    abi.MAP_MAGLEV: (abi.MAGLEV_MAX, BPF_F_NO_PREALLOC),
    abi.MAP_XDEVS: (abi.XDEVS_MAX, 0),
}
ENUMS: dict[str, Any] = {
    "kp_scope": abi.Scope,
    "kp_ct_dir": abi.CtDir,
    "kp_ct_state": abi.CtState,
    "kp_dsr_mode": abi.DsrMode,
    "kp_svcnet_action": abi.SvcnetAction,
}


@pytest.fixture(params=OBJECTS)
def obj_path(request: pytest.FixtureRequest, probe_object: Path) -> Path:
    return probe_object if request.param == "probe" else TC_OBJECT


class Btf:
    def __init__(self, path: Path) -> None:
        out = subprocess.run(
            ["bpftool", "-j", "btf", "dump", "file", str(path)], capture_output=True, text=True, check=True
        ).stdout
        self.types = {t["id"]: t for t in json.loads(out)["types"]}

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [t for t in self.types.values() if t["kind"] == kind and t.get("name") == name]
        assert found, f"{kind} {name} is not in the BTF"
        return found[0]

    def size(self, type_id: int) -> int:
        t = self.types[type_id]
        if t["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT"):
            return self.size(t["type_id"])
        if t["kind"] == "ARRAY":
            return int(t["nr_elems"]) * self.size(t["type_id"])
        return int(t["size"])


@pytest.fixture
def btf(obj_path: Path) -> Btf:
    return Btf(obj_path)


# Structs no map of kproxy_tc.bpf.o is declared with (only reached through pointers: clang puts no BTF
# of local variables' types in an object): the probe's BTF has them, from the same abi.h.
PROBE_ONLY = {"kp_maglev_hdr"}


@pytest.mark.parametrize("name", sorted(abi.BTF_NAMES))
def test_struct_layout_matches_btf(btf: Btf, name: str, obj_path: Path, probe_object: Path) -> None:
    if name in PROBE_ONLY and obj_path != probe_object:
        pytest.skip(f"{name} is checked in the probe object's BTF")
    mirror = abi.BTF_NAMES[name]
    struct = btf.named("STRUCT", name)
    assert struct["size"] == ctypes.sizeof(mirror), f"struct {name}: C size vs ctypes {mirror.__name__}"
    c_members = [(m["name"], m["bits_offset"] // 8, btf.size(m["type_id"])) for m in struct["members"]]
    for m in struct["members"]:
        assert m["bits_offset"] % 8 == 0, f"{name}.{m['name']} is a bitfield: the ABI forbids them"
    py_members = [(f, getattr(mirror, f).offset, getattr(mirror, f).size) for f, *_ in mirror._fields_]
    assert py_members == c_members, f"struct {name}: (field, offset, size) differ between abi.h and abi.py"


def test_enums_match_btf(probe_object: Path) -> None:
    btf = Btf(probe_object)
    for name, py in ENUMS.items():
        c = {v["name"]: v["val"] for v in btf.named("ENUM", name)["values"]}
        prefix = {
            "kp_scope": "KP_SCOPE_",
            "kp_ct_dir": "KP_CT_DIR_",
            "kp_ct_state": "KP_CT_",
            "kp_dsr_mode": "KP_DSR_",
            "kp_svcnet_action": "KP_SVCNET_",
        }
        assert {k.removeprefix(prefix[name]): v for k, v in c.items()} == {m.name: m.value for m in py}, name
    stats = {v["name"]: v["val"] for v in btf.named("ENUM", "kp_stat")["values"]}
    assert stats.pop("KP_STAT_MAX") == abi.STAT_MAX
    py_stats = {
        ("KP_" + m.name if m.name.startswith("DROP_") else "KP_STAT_" + m.name): m.value for m in abi.Stat
    }
    assert stats == py_stats


def test_maps_match_abi(obj_path: Path) -> None:
    with lb.BpfObject.open(obj_path, pin_root_path="/kpt-pin-root") as obj:
        assert set(abi.ALL_MAPS) <= set(obj.map_names())
        for name in abi.ALL_MAPS:
            _, map_type, key_type, value_type = MAP_LAYOUT[name]
            p = obj.map_params(name)
            max_entries, flags = MAP_DEFAULTS[name]
            assert (p.type, p.key_size, p.value_size) == (
                map_type,
                ctypes.sizeof(key_type),
                ctypes.sizeof(value_type),
            ), name
            assert (p.max_entries, p.map_flags) == (max_entries, flags), name
            assert obj.pin_path(name) == f"/kpt-pin-root/{name}", f"{name} must be pinned by name"


def test_programs_present(obj_path: Path) -> None:
    with lb.BpfObject.open(obj_path) as obj:
        assert set(PROGRAMS) <= set(obj.program_names())


def test_skb_ctx_size_matches_kernel() -> None:
    # struct __sk_buff of the uapi headers the objects are compiled against.
    src = "#include <linux/bpf.h>\nstruct __sk_buff probe_skb;\n"
    btf_obj = Path(__file__).parent / ".skb_probe.o"
    try:
        subprocess.run(
            [
                "clang-19",
                "-g",
                "-target",
                "bpf",
                "-I/usr/include/x86_64-linux-gnu",
                "-x",
                "c",
                "-c",
                "-",
                "-o",
                str(btf_obj),
            ],
            input=src,
            text=True,
            check=True,
            capture_output=True,
        )
        btf = Btf(btf_obj)
        assert btf.named("STRUCT", "__sk_buff")["size"] == abi.SKB_CTX_SIZE
    finally:
        btf_obj.unlink(missing_ok=True)


# The newest BPF helper each object may call. kproxy_tc.bpf.o: bpf_redirect_neigh (kernel 5.10;
# docs/install.md: 5.10 and later). A newer helper (bpf_xdp_load_bytes, 5.18, was one) makes the verifier
# refuse the whole object on older nodes, whatever the agent's flags. kproxy_sock.bpf.o: bpf_set_retval
# (5.18; docs/socket-lb.md: without it the agent runs without socket load balancing and says so).
# kproxy_iter.bpf.o: bpf_seq_write (5.7), but it needs 6.5 for its kfunc (KFUNCS; docs/socket-lb.md:
# without it the agent keeps socket LB, warns that connected UDP sockets keep their backend, and counts).
SOCK_OBJECT = TC_OBJECT.with_name("kproxy_sock.bpf.o")
ITER_OBJECT = TC_OBJECT.with_name("kproxy_iter.bpf.o")
NEWEST_HELPER = {
    TC_OBJECT: (152, "5.10"),  # redirect_neigh
    SOCK_OBJECT: (187, "5.18"),  # set_retval
    ITER_OBJECT: (127, "5.7"),  # seq_write
}
# The kfuncs each object may call (extern functions in its BTF), and the kernel that has them. An object
# calling one its kernel lacks does not load at all: only an object whose loss the agent survives may.
KFUNCS = {TC_OBJECT: {}, SOCK_OBJECT: {}, ITER_OBJECT: {"bpf_sock_destroy": "6.5"}}


def helper_calls(path: Path) -> dict[str, set[int]]:
    """Helper ids called per executable section of the ELF object (BPF_CALL with src_reg 0)."""
    import struct

    data = path.read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx]
    calls: dict[str, set[int]] = {}
    for name_off, sh_type, flags, _addr, offset, size, *_ in sections:
        if sh_type != 1 or not flags & 0x4:  # SHT_PROGBITS, SHF_EXECINSTR
            continue
        name = data[strtab[4] + name_off : data.index(b"\0", strtab[4] + name_off)].decode()
        for at in range(offset, offset + size, 8):
            code, regs, _off, imm = struct.unpack_from("<BBhi", data, at)
            if code == 0x85 and regs >> 4 == 0:  # BPF_JMP | BPF_CALL, a helper (not a subprogram)
                calls.setdefault(name, set()).add(imm)
    return calls


@pytest.mark.parametrize("path", [TC_OBJECT, SOCK_OBJECT, ITER_OBJECT], ids=["tc", "sock", "iter"])
def test_objects_call_no_kfunc_but_their_own(path: Path) -> None:
    if not path.exists():
        pytest.skip("make bpf first")
    externs = {
        t["name"] for t in Btf(path).types.values() if t["kind"] == "FUNC" and t.get("linkage") == "extern"
    }
    assert externs == set(KFUNCS[path]), f"{path.name} calls kfuncs {externs}, expected {set(KFUNCS[path])}"


@pytest.mark.parametrize("name", sorted(abi.ITER_BTF_NAMES))
def test_iter_struct_layout_matches_btf(name: str) -> None:
    if not ITER_OBJECT.exists():
        pytest.skip("make bpf first")
    btf = Btf(ITER_OBJECT)
    mirror = abi.ITER_BTF_NAMES[name]
    struct = btf.named("STRUCT", name)
    assert struct["size"] == ctypes.sizeof(mirror), f"struct {name}: C size vs ctypes {mirror.__name__}"
    c_members = [(m["name"], m["bits_offset"] // 8, btf.size(m["type_id"])) for m in struct["members"]]
    py_members = [(f, getattr(mirror, f).offset, getattr(mirror, f).size) for f, *_ in mirror._fields_]
    assert py_members == c_members, f"struct {name}: (field, offset, size) differ between abi.h and abi.py"


@pytest.mark.parametrize("path", [TC_OBJECT, SOCK_OBJECT, ITER_OBJECT], ids=["tc", "sock", "iter"])
def test_objects_call_no_helper_newer_than_the_oldest_kernel(path: Path) -> None:
    if not path.exists():
        pytest.skip("make bpf first")
    calls = helper_calls(path)
    assert calls, f"{path.name}: no helper call found (the ELF walk is wrong)"
    newest, kernel = NEWEST_HELPER[path]
    newer = {sec: sorted(i for i in ids if i > newest) for sec, ids in calls.items()}
    assert not {s: i for s, i in newer.items() if i}, (
        f"{path.name} calls helpers newer than {kernel}: {newer}"
    )
