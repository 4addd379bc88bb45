"""The CLI as scripts use it: JSON shapes, exit codes, and `kproxy lab up|status|down`."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kproxy import abi
from kproxy.bpf.mapapi import MemoryMap
from kproxy.lab import Lab
from kproxy.observe import inspect as insp

Program = Callable[..., None]


def kproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kproxy", *args], capture_output=True, text=True, timeout=60)


# Imports every kproxy module as root, then becomes the unprivileged user, then runs the command: the
# checkout may sit in a directory that user cannot read (CI clones into a 0700 mktemp directory), and
# what is tested is the command's own check, not whether the user can import the package.
_AS_USER = """
import importlib, os, pkgutil, sys
import kproxy
for mod in pkgutil.walk_packages(kproxy.__path__, "kproxy."):
    if not mod.name.endswith("__main__"):
        importlib.import_module(mod.name)
from kproxy.cli import main
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
main(args=sys.argv[2:], prog_name="kproxy")
"""


def kproxy_as(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`kproxy ARGS` run by an unprivileged user, from any checkout."""
    cmd = [sys.executable, "-c", _AS_USER, str(uid), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


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
        assert r["port_name"] == "p" and r["protocol"] == "TCP" and r["family"] == 4
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
    assert f["state"] == "ESTABLISHED" and f["seconds_left"] > 0 and f["family"] == 4


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
    not_root = kproxy_as(65534, "stats", "--bpffs", str(empty_bpffs))
    assert not_root.returncode == 4 and "needs root" in not_root.stderr, not_root.stderr


def _in6(address: str) -> Any:
    return abi.In6.from_buffer_copy(abi.ip6_to_bytes(address))


@pytest.mark.root
def test_dual_stack_entries_on_pinned_maps(
    empty_bpffs: Path, probe_object: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IPv6 entries written into the real pinned *6 maps show beside the IPv4 ones, in every command,
    with their service names from the agent's metadata file (IPv6 ids >= abi.ID6_BASE)."""
    from kproxy.bpf import libbpf as lb
    from kproxy.bpf.maps import KproxyMaps
    from kproxy.observe.metadata import write_metadata

    monkeypatch.setenv("KPROXY_STATE_ROOT", str(tmp_path / "state"))
    with lb.BpfObject.open(probe_object, pin_root_path=str(empty_bpffs)) as obj:
        obj.load()
    svc4, svc6, be4, be6 = 5, abi.ID6_BASE + 5, 11, abi.ID6_BASE + 11
    tcp, now = abi.IPPROTO_TCP, time.monotonic_ns()
    with KproxyMaps.open(empty_bpffs) as maps:
        maps.be4.put_many(
            [(ctypes.c_uint32(be4), abi.Be4Val(abi.ip_to_nbo("10.244.1.11"), abi.port_to_nbo(8080), tcp))]
        )
        maps.be6.put_many(
            [(ctypes.c_uint32(be6), abi.Be6Val(_in6("fd00:244:1::11"), abi.port_to_nbo(8080), tcp))]
        )
        vip4, vip6, port = abi.ip_to_nbo("10.96.3.1"), _in6("fd00:96::3:1"), abi.port_to_nbo(80)
        maps.svc4.put_many([
            (abi.Svc4Key(vip4, port, 0, tcp), abi.Svc4Val(0, svc4, 1, 0)),
            (abi.Svc4Key(vip4, port, 1, tcp), abi.Svc4Val(be4, svc4)),
        ])  # fmt: skip
        maps.svc6.put_many([
            (abi.Svc6Key(vip6, port, 0, tcp), abi.Svc4Val(0, svc6, 1, 0)),
            (abi.Svc6Key(vip6, port, 1, tcp), abi.Svc4Val(be6, svc6)),
        ])  # fmt: skip
        maps.ct6.put_many([(
            abi.Ct6Key(saddr=_in6("fd00:244:2::12"), daddr=vip6, sport=abi.port_to_nbo(40000), dport=port,
                       proto=tcp, dir=abi.CtDir.FWD),
            abi.Ct6Val(expires_ns=now + 60 * 10**9, backend_id=be6, svc_id=svc6,
                       nat_addr=_in6("fd00:244:1::11"), nat_port=abi.port_to_nbo(8080),
                       state=abi.CtState.ESTABLISHED),
        )])  # fmt: skip
        maps.aff6.put_many([(abi.Aff6Key(_in6("fd00:244:2::12"), svc6), abi.Aff4Val(now, be6))])
        maps.write_config(abi.Config(node_addr=abi.ip_to_nbo("192.168.77.11")))
        maps.cfg6.put_many([(ctypes.c_uint32(0), abi.Config6(_in6("fd00:77::11")))])
    names = {"service": "demo/dual", "port_name": "http", "protocol": "TCP"}
    write_metadata(empty_bpffs, "n1", {svc4: names, svc6: names})
    bpffs = ["--bpffs", str(empty_bpffs)]

    def rows(*cmd: str) -> Any:
        out = kproxy(*cmd, *bpffs, "-o", "json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert rows("status")["node_addresses"] == {"ipv4": "192.168.77.11", "ipv6": "fd00:77::11"}
    assert "node addresses: 192.168.77.11, fd00:77::11" in kproxy("status", *bpffs).stdout
    services = rows("services")
    assert [(r["family"], r["address"], r["service"]) for r in services] == [
        (4, "10.96.3.1", "demo/dual"),
        (6, "fd00:96::3:1", "demo/dual"),
    ]
    assert [(b["family"], b["address"], b["port"]) for b in services[1]["backends"]] == [
        (6, "fd00:244:1::11", 8080)
    ]
    assert [(r["family"], r["id"], r["address"]) for r in rows("backends")] == [
        (4, be4, "10.244.1.11"),
        (6, be6, "fd00:244:1::11"),
    ]
    (flow,) = rows("conntrack")
    assert (flow["family"], flow["src"], flow["dst"], flow["nat"], flow["service"]) == (
        6, "[fd00:244:2::12]:40000", "[fd00:96::3:1]:80", "[fd00:244:1::11]:8080", "demo/dual",
    )  # fmt: skip
    (aff,) = rows("affinity")
    assert (aff["family"], aff["client"], aff["backend"], aff["service"]) == (
        6, "fd00:244:2::12", "[fd00:244:1::11]:8080", "demo/dual",
    )  # fmt: skip
    assert rows("nat") == []
    table = kproxy("services", *bpffs)
    assert table.returncode == 0 and "[fd00:96::3:1]:80/TCP" in table.stdout, table.stdout
    assert "[fd00:244:1::11]:8080" in table.stdout and "10.96.3.1:80/TCP" in table.stdout
    flushed = kproxy("conntrack", "--flush", *bpffs, "-o", "json")
    assert flushed.returncode == 0 and json.loads(flushed.stdout) == {"flushed": 1}, flushed.stderr
    assert rows("conntrack") == []


@pytest.mark.root
def test_an_older_agents_bpffs_without_the_ipv6_maps_is_still_read(
    empty_bpffs: Path, probe_object: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent from before IPv6 pinned only the IPv4 maps: this version's CLI reads them (the *6
    attributes are None) instead of calling the maps incomplete."""
    from kproxy.bpf import libbpf as lb
    from kproxy.bpf.maps import OPTIONAL_MAPS, KproxyMaps
    from kproxy.observe.metadata import write_metadata

    monkeypatch.setenv("KPROXY_STATE_ROOT", str(tmp_path / "state"))
    with lb.BpfObject.open(probe_object, pin_root_path=str(empty_bpffs)) as obj:
        obj.load()
    for name in OPTIONAL_MAPS:
        (empty_bpffs / name).unlink()
    svc, be, tcp, now = 5, 11, abi.IPPROTO_TCP, time.monotonic_ns()
    vip, port = abi.ip_to_nbo("10.96.3.1"), abi.port_to_nbo(80)
    client, backend = abi.ip_to_nbo("10.244.2.12"), abi.ip_to_nbo("10.244.1.11")
    with KproxyMaps.open(empty_bpffs) as maps:
        assert sorted(maps.absent) == sorted(OPTIONAL_MAPS)
        assert (maps.svc6, maps.be6, maps.ct6, maps.aff6, maps.snat6) == (None, None, None, None, None)
        assert (maps.cfg6, maps.lbsrc6, maps.frag6) == (None, None, None)
        maps.be4.put_many([(ctypes.c_uint32(be), abi.Be4Val(backend, abi.port_to_nbo(8080), tcp))])
        maps.svc4.put_many([
            (abi.Svc4Key(vip, port, 0, tcp), abi.Svc4Val(0, svc, 1, abi.SvcFlag.AFFINITY, 60)),
            (abi.Svc4Key(vip, port, 1, tcp), abi.Svc4Val(be, svc)),
        ])  # fmt: skip
        maps.ct4.put_many([(
            abi.Ct4Key(saddr=client, daddr=vip, sport=abi.port_to_nbo(40000), dport=port, proto=tcp,
                       dir=abi.CtDir.FWD),
            abi.Ct4Val(expires_ns=now + 60 * 10**9, backend_id=be, svc_id=svc, nat_addr=backend,
                       nat_port=abi.port_to_nbo(8080), state=abi.CtState.ESTABLISHED),
        )])  # fmt: skip
        maps.aff4.put_many([(abi.Aff4Key(client, svc), abi.Aff4Val(now, be))])
    write_metadata(empty_bpffs, "n1", {svc: {"service": "demo/old", "port_name": "http", "protocol": "TCP"}})
    bpffs = ["--bpffs", str(empty_bpffs)]

    def rows(*cmd: str) -> Any:
        out = kproxy(*cmd, *bpffs, "-o", "json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert [(r["family"], r["address"], r["service"]) for r in rows("services")] == [
        (4, "10.96.3.1", "demo/old")
    ]
    assert [(r["family"], r["id"], r["address"]) for r in rows("backends")] == [(4, be, "10.244.1.11")]
    (flow,) = rows("conntrack")
    assert (flow["family"], flow["src"], flow["service"]) == (4, "10.244.2.12:40000", "demo/old")
    (aff,) = rows("affinity")
    assert (aff["family"], aff["client"], aff["service"]) == (4, "10.244.2.12", "demo/old")
    assert rows("nat") == []
    # its one kp_stats_v1 counts both families: no family is claimed
    stats = rows("stats", "--all")
    assert stats and all(r["ipv4_packets"] is None and r["ipv6_packets"] is None for r in stats)
    assert rows("status")["dsr_mode"]
    assert rows("status")["node_addresses"] == {"ipv4": None, "ipv6": None}
    for cmd in ("services", "backends", "conntrack", "affinity", "nat"):
        table = kproxy(cmd, *bpffs)
        assert table.returncode == 0, (cmd, table.stderr)
    assert rows("conntrack", "--flush") == {"flushed": 1}
    assert rows("conntrack") == []
    # an IPv4 map missing is still an error: those every agent pinned
    (empty_bpffs / abi.MAP_CT4).unlink()
    broken = kproxy("services", *bpffs)
    assert broken.returncode == 5 and abi.MAP_CT4 in broken.stderr and "kp_svc6" not in broken.stderr


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


@pytest.mark.root
def test_agent_exit_code_3_without_bpffs(tmp_path: Path) -> None:
    args = ["agent", "--source", f"file:{tmp_path}", "--node-ip", "192.0.2.1", "--netdev", "lo"]
    missing = kproxy(*args, "--bpffs", str(tmp_path / "nope"))
    assert missing.returncode == 3 and "does not exist" in missing.stderr, missing.stderr
    not_bpffs = kproxy(*args, "--bpffs", str(tmp_path))
    assert not_bpffs.returncode == 3 and "not on a bpf filesystem" in not_bpffs.stderr, not_bpffs.stderr


def test_agent_rejects_a_bad_flag_value_with_a_usage_error(tmp_path: Path) -> None:
    bad = kproxy("agent", "--source", "files", "--node-ip", "192.0.2.1", "--bpffs", str(tmp_path))
    assert bad.returncode == 2 and "'kubernetes' or 'file:DIR'" in bad.stderr, bad.stderr
    bad = kproxy("agent", "--node-ip=192.0.2.1", "--map-size=kp_nope=10", f"--bpffs={tmp_path}")
    assert bad.returncode == 2 and "kp_nope" in bad.stderr, bad.stderr


# ---- DSR ----
@pytest.mark.root
def test_dsr_standalone_round_trip(lab: Lab) -> None:
    from kproxy.bpf.maps import KproxyMaps

    bpffs = lab.node("n2").bpffs
    try:
        for mode, value in (("ipip", abi.DsrMode.IPIP), ("opt", abi.DsrMode.OPT)):
            on = kproxy("dsr", "enable", "--mode", mode, "--bpffs", bpffs, "-o", "json")
            assert on.returncode == 0, on.stderr
            assert json.loads(on.stdout)["dsr_mode"] == mode
            with KproxyMaps.open(bpffs) as maps:
                cfg = maps.read_config()
            assert cfg.dsr_mode == value and cfg.node_addr == abi.ip_to_nbo(lab.node("n2").ip)
            status = kproxy("dsr", "status", f"--bpffs={bpffs}")
            assert status.returncode == 0 and status.stdout.startswith(f"dsr {mode} "), status.stdout
    finally:
        off = kproxy("dsr", "disable", "--bpffs", bpffs, "-o", "json")
    assert off.returncode == 0 and json.loads(off.stdout)["dsr_mode"] == "off", off.stderr
    with KproxyMaps.open(bpffs) as maps:
        assert maps.read_config().dsr_mode == abi.DsrMode.OFF


class FakeApiServer:
    """A tiny API server in a thread: serves one ConfigMap, records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.data: dict[str, str] = {"dsr-mode": "off"}
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.requests.append({
            "method": request.method, "path": request.path, "auth": request.headers.get("Authorization"),
            "content_type": request.headers.get("Content-Type"), "body": body,
        })  # fmt: skip
        if request.path != "/api/v1/namespaces/kp-ns/configmaps/kp-cm":
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        if request.method == "PATCH":
            self.data.update(json.loads(body)["data"])
        return web.json_response({"kind": "ConfigMap", "data": self.data})

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_dsr_cluster_mode_patches_the_configmap(tmp_path: Path) -> None:
    with FakeApiServer() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{api.port}"}}],
            "users": [{"name": "u", "user": {"token": "sekret"}}],
            "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}],
        }))  # fmt: skip
        common = ["--kubeconfig", str(kubeconfig), "--namespace", "kp-ns", "--configmap", "kp-cm"]
        common += ["-o", "json"]
        on = kproxy("dsr", "enable", "--mode", "ipip", *common)
        assert on.returncode == 0, on.stderr
        assert json.loads(on.stdout) == {"where": "configmap kp-ns/kp-cm", "dsr_mode": "ipip"}
        status = kproxy("dsr", "status", *common)
        assert status.returncode == 0 and json.loads(status.stdout)["dsr_mode"] == "ipip", status.stderr
        off = kproxy("dsr", "disable", *common)
        assert off.returncode == 0 and api.data["dsr-mode"] == "off", off.stderr
        missing = kproxy("dsr", "status", "--kubeconfig", str(kubeconfig), "--namespace", "other")
        assert missing.returncode == 1 and "ConfigMap other/kproxy-config not found" in missing.stderr
    patch = api.requests[0]
    assert (patch["method"], patch["path"]) == ("PATCH", "/api/v1/namespaces/kp-ns/configmaps/kp-cm")
    assert patch["content_type"] == "application/merge-patch+json"
    assert json.loads(patch["body"]) == {"data": {"dsr-mode": "ipip"}}
    assert patch["auth"] == "Bearer sekret"
    assert [r["method"] for r in api.requests[:3]] == ["PATCH", "GET", "PATCH"]


# ---- stats, nat, cleanup ----
@pytest.mark.root
def test_stats_json_lists_every_abi_stat(lab: Lab) -> None:
    out = kproxy("stats", "--all", "-o", "json", "--bpffs", lab.node("n1").bpffs)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["counter"] for r in rows] == [s.name.lower() for s in abi.Stat]
    assert all(isinstance(r["packets"], int) and r["kind"] in ("program", "decision", "drop") for r in rows)


@pytest.mark.root
def test_nat_lists_snat_entries(lab: Lab) -> None:
    out = kproxy("nat", "-o", "json", "--bpffs", lab.node("n1").bpffs)
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout), list)


def test_snat_rows_decode_live_entries_only() -> None:
    from kproxy.cli.inspect import snat_rows

    def entry(expires: int) -> tuple[abi.Snat4Key, abi.Snat4Val]:
        k = abi.Snat4Key(
            saddr=abi.ip_to_nbo("10.244.2.11"), daddr=abi.ip_to_nbo("192.168.77.11"),
            sport=abi.port_to_nbo(8080), dport=abi.port_to_nbo(40000), proto=abi.IPPROTO_TCP,
        )  # fmt: skip
        v = abi.Snat4Val(
            expires_ns=expires, client_addr=abi.ip_to_nbo("192.168.77.100"),
            front_addr=abi.ip_to_nbo("192.168.77.11"), client_port=abi.port_to_nbo(51000),
            front_port=abi.port_to_nbo(30080), state=abi.CtState.ESTABLISHED,
        )  # fmt: skip
        return k, v

    rows = snat_rows([entry(5_000_000_000), entry(10)], now_ns=1_000_000_000)
    assert rows == [{
        "family": 4, "protocol": "TCP", "backend": "10.244.2.11:8080", "snat": "192.168.77.11:40000",
        "client": "192.168.77.100:51000", "frontend": "192.168.77.11:30080", "state": "ESTABLISHED",
        "seconds_left": 4.0,
    }]  # fmt: skip


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    root = Path("/sys/fs/cgroup/unified")
    if "cgroup2" not in Path("/proc/self/mounts").read_text() or not root.is_dir():
        pytest.skip("no cgroup2 at /sys/fs/cgroup/unified")
    cg = root / f"kpt-cli-{os.getpid()}-{secrets.token_hex(3)}"
    cg.mkdir()
    try:
        yield cg
    finally:
        cg.rmdir()


@pytest.mark.root
def test_cleanup_removes_socket_lb_links(empty_bpffs: Path, child_cgroup: Path, tc_object: Path) -> None:
    from kproxy.bpf.loader import Loader
    from kproxy.bpf.socklb import HOOKS, SocketLB

    with Loader(str(empty_bpffs)) as loader:
        loader.load()
    with SocketLB(empty_bpffs, child_cgroup) as slb:
        assert len(slb.attach()) == len(HOOKS)
    assert {f"cgroup:{h}" for h in HOOKS} <= set(os.listdir(empty_bpffs / "links"))
    assert len(_cgroup_progs(child_cgroup)) == len(HOOKS)
    out = kproxy("cleanup", "--bpffs", str(empty_bpffs), "-o", "json")
    assert out.returncode == 0, out.stderr
    assert {f"cgroup.{h}" for h in HOOKS} <= set(json.loads(out.stdout)["detached"])
    assert set(os.listdir(empty_bpffs)) <= {"progs.debug", "maps.debug"}  # the bpffs root's own files
    assert _cgroup_progs(child_cgroup) == []


def _cgroup_progs(cgroup: Path) -> list[Any]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    progs: list[Any] = json.loads(out.stdout.strip() or "[]")
    return progs


@pytest.mark.root
def test_cleanup_kube_proxy_dry_run_in_a_namespace() -> None:
    ns = f"kpt-ckp-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kproxy", "cleanup-kube-proxy", "--dry-run"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("inspected: ") and "would remove" not in out.stdout


@pytest.mark.root
def test_agent_serves_healthz_and_metrics(lab: Lab, program: Program) -> None:
    import urllib.request

    from kproxy.observe.metrics import scrape_value

    program("cli-metrics", "10.96.2.3", ["n1p1"])
    n1 = lab.node("n1")

    def get(url: str) -> tuple[int, str]:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()

    status, body = lab.in_ns(n1, lambda: get(f"http://{n1.ip}:10256/healthz"))
    assert status == 200 and "lastUpdated" in json.loads(body)
    status, text = lab.in_ns(n1, lambda: get("http://127.0.0.1:10249/metrics"))
    assert status == 200
    assert (scrape_value(text, "kproxy_map_entries", {"map": abi.MAP_SVC4}) or 0) >= 2
    assert scrape_value(text, "kproxy_map_capacity", {"map": abi.MAP_CT4}) == abi.CT4_MAX
    assert (scrape_value(text, "kproxy_sync_duration_seconds_count", {"kind": "full"}) or 0) >= 1
    assert (scrape_value(text, "kproxy_network_programming_duration_seconds_count") or 0) >= 1


# ---- agent wiring, in memory (no root) ----
def test_agent_follows_the_configmap_dsr_mode() -> None:
    from kproxy.agent import Agent
    from kproxy.bpf.mapapi import MemoryMapSet
    from kproxy.bpf.upkeep import write_config
    from kproxy.config import AgentConfig

    agent = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], dsr_mode="opt"))
    agent.maps = MemoryMapSet()
    write_config(agent.maps, "192.0.2.1")
    agent.apply_settings({"dsr-mode": "ipip"})
    assert agent.maps.read_config().dsr_mode == abi.DsrMode.IPIP
    agent.apply_settings({"dsr-mode": "sideways"})  # invalid: logged, ignored
    assert agent.maps.read_config().dsr_mode == abi.DsrMode.IPIP
    agent.apply_settings({})  # key deleted: back to the --dsr-mode the agent started with
    cfg = agent.maps.read_config()
    assert cfg.dsr_mode == abi.DsrMode.OPT and cfg.node_addr == abi.ip_to_nbo("192.0.2.1")


def test_agent_builds_the_kube_source_from_its_config() -> None:
    from kproxy.agent import Agent
    from kproxy.config import AgentConfig
    from kproxy.store import ClusterStore

    cfg = AgentConfig(
        node_name="n1", node_ips=["192.0.2.1"], kubeconfig="/k", k8s_api_server="https://10.0.0.1:6443",
        settings_configmap="kp-ns/kp-cm",
    )  # fmt: skip
    agent = Agent(cfg)
    agent.store = ClusterStore()
    src = agent.make_kube_source()
    assert (src.cfg.node_name, src.cfg.kubeconfig) == ("n1", "/k")
    assert src.cfg.api_server == "https://10.0.0.1:6443"
    assert src.cfg.settings_configmap == "kp-ns/kp-cm" and src.on_settings == agent.apply_settings


def test_netdev_autodetection_reads_default_routes() -> None:
    from kproxy.agent import default_route_ifaces

    table = (
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "bond0\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n"
    )
    assert default_route_ifaces(table) == ["eth0", "bond0"]


def test_agent_accepts_every_flag_the_chart_passes() -> None:
    from kproxy.cli.agent import agent

    chart_flags = {
        "--source", "--node-name", "--node-ip", "--netdev", "--pod-ifaces", "--bpffs", "--map-size",
        "--ct-timeout-syn", "--ct-timeout-tcp", "--ct-timeout-fin", "--ct-timeout-udp",
        "--ct-timeout-sctp-init", "--ct-timeout-sctp", "--ct-timeout-sctp-close", "--log-level",
        "--k8s-api-server", "--kubeconfig", "--nodeport-addresses", "--metrics-bind-address",
        "--health-bind-address", "--dsr-mode", "--socket-lb-cgroup", "--service-cidr", "--hairpin-address",
    }  # fmt: skip
    have = {o for p in agent.params for o in p.opts}
    assert chart_flags - have == set()
