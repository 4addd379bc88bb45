"""The CLI as scripts use it: JSON shapes, exit codes, and `kproxy lab up|status|down`."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.bpf import abi
from kproxy.bpf.mapapi import MemoryMap
from kproxy.lab import Lab
from kproxy.observe import inspect as insp

Program = Callable[..., None]


def kproxy(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kproxy", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# ---- decoding, on the in-memory twin (no root) ----
def memory_maps() -> tuple[MemoryMap[Any, Any], MemoryMap[Any, Any]]:
    svc4: MemoryMap[Any, Any] = MemoryMap(abi.MAP_SVC4, abi.Svc4Key, abi.Svc4Val, 64)
    be4: MemoryMap[Any, Any] = MemoryMap(abi.MAP_BE4, ctypes.c_uint32, abi.Be4Val, 64)
    vip, port = abi.ip_to_nbo("10.96.0.10"), abi.port_to_nbo(80)
    np_addr, np_port = abi.ip_to_nbo("192.168.77.11"), abi.port_to_nbo(30080)
    be4.put_many([
        (ctypes.c_uint32(7), abi.Be4Val(abi.ip_to_nbo("10.244.1.11"), abi.port_to_nbo(8080), 6, 1, 0)),
        (ctypes.c_uint32(9), abi.Be4Val(abi.ip_to_nbo("10.244.2.11"), abi.port_to_nbo(8080), 6, 2, 0)),
    ])  # fmt: skip
    svc4.put_many([
        (abi.Svc4Key(vip, port, 0, 6, 0), abi.Svc4Val(0, 3, 2, 0, 0)),
        (abi.Svc4Key(vip, port, 1, 6, 0), abi.Svc4Val(7, 3, 0, 0, 0)),
        (abi.Svc4Key(vip, port, 2, 6, 0), abi.Svc4Val(9, 3, 0, 0, 0)),
        (abi.Svc4Key(np_addr, np_port, 0, 6, 0), abi.Svc4Val(0, 3, 1, abi.SvcFlag.NODEPORT, 0)),
        (abi.Svc4Key(np_addr, np_port, 1, 6, 0), abi.Svc4Val(7, 3, 0, 0, 0)),
    ])  # fmt: skip
    return svc4, be4


def test_services_rows_name_type_and_backends() -> None:
    svc4, be4 = memory_maps()
    rows = insp.services(svc4, be4, {3: {"service": "demo/echo", "port_name": "http", "protocol": "TCP"}})
    assert [(r["type"], r["address"], r["port"]) for r in rows] == [
        ("ClusterIP", "10.96.0.10", 80),
        ("NodePort", "192.168.77.11", 30080),
    ]
    cip = rows[0]
    assert (cip["service"], cip["port_name"], cip["protocol"]) == ("demo/echo", "http", "TCP")
    assert [(b["address"], b["port"], b["state"]) for b in cip["backends"]] == [
        ("10.244.1.11", 8080, "active"),
        ("10.244.2.11", 8080, "terminating"),
    ]


def test_services_without_metadata_still_list_frontends() -> None:
    svc4, be4 = memory_maps()
    rows = insp.services(svc4, be4, {})
    assert {r["service"] for r in rows} == {"?svc#3"}


# ---- the real thing ----
@pytest.mark.root
def test_services_json_in_the_lab(lab: Lab, program: Program) -> None:
    program("cli-json", "10.96.2.1", ["n1p2", "n2p1"], node_port=30200, type="NodePort")
    n1 = lab.node("n1")
    out = kproxy("services", "--bpffs", n1.bpffs, "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["service"] == "default/cli-json"]
    by_type = {r["type"]: r for r in rows}
    assert set(by_type) == {"ClusterIP", "NodePort"}
    assert (by_type["ClusterIP"]["address"], by_type["ClusterIP"]["port"]) == ("10.96.2.1", 80)
    assert (by_type["NodePort"]["address"], by_type["NodePort"]["port"]) == (n1.ip, 30200)
    for r in rows:
        assert r["port_name"] == "p" and r["protocol"] == "TCP"
        assert {(b["address"], b["port"], b["state"]) for b in r["backends"]} == {
            ("10.244.1.12", 8080, "active"),
            ("10.244.2.11", 8080, "active"),
        }
    table = kproxy("services", "--bpffs", n1.bpffs)
    assert table.returncode == 0 and "default/cli-json" in table.stdout


@pytest.mark.root
def test_conntrack_json_shows_an_open_flow(lab: Lab, program: Program) -> None:
    program("cli-ct", "10.96.2.2", ["n2p1"])
    client = lab.pod("n1p1")
    with lab.stream(client, "10.96.2.2", 80) as s:
        s.roundtrip()
        local = "{}:{}".format(*s.sock.getsockname())
        out = kproxy("conntrack", "--bpffs", lab.node("n1").bpffs, "-o", "json")
    assert out.returncode == 0, out.stderr
    flows = [r for r in json.loads(out.stdout) if r["src"] == local]
    assert len(flows) == 1, out.stdout
    f = flows[0]
    assert (f["dst"], f["nat"], f["protocol"], f["service"]) == (
        "10.96.2.2:80",
        "10.244.2.11:8080",
        "TCP",
        "default/cli-ct",
    )
    assert f["state"] == "ESTABLISHED" and f["seconds_left"] > 0


@pytest.fixture
def empty_bpffs() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kpt-cli-"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        d.rmdir()


@pytest.mark.root
def test_exit_codes(empty_bpffs: Path, tmp_path: Path) -> None:
    missing = kproxy("services", "--bpffs", str(tmp_path / "nope"))
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    not_bpffs = kproxy("backends", "--bpffs", str(tmp_path))
    assert not_bpffs.returncode == 3 and "not on a bpf filesystem" in not_bpffs.stderr
    no_maps = kproxy("conntrack", "--bpffs", str(empty_bpffs))
    assert no_maps.returncode == 5 and "no kproxy maps" in no_maps.stderr
    assert len(no_maps.stderr.strip().splitlines()) == 1
    if shutil.which("setpriv"):
        not_root = kproxy("stats", "--bpffs", str(empty_bpffs), user="65534")
        assert not_root.returncode == 4 and "needs root" in not_root.stderr


@pytest.mark.root
def test_lab_up_status_down_leaves_nothing(tc_object: Path) -> None:
    up = kproxy("lab", "up", "--nodes", "1", "--pods-per-node", "1", "--no-agents")
    assert up.returncode == 0, up.stderr
    prefix = up.stdout.split()[1]
    try:
        status = json.loads(kproxy("lab", "status", "-o", "json").stdout)
        mine = [s for s in status if s["prefix"] == prefix]
        assert mine and all(mine[0]["namespaces"].values()) and all(mine[0]["mounts"].values())
    finally:
        down = kproxy("lab", "down", prefix)
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix)]
    assert prefix not in Path("/proc/mounts").read_text()
