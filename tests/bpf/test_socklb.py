"""Socket-level load balancing (bpfsrc/kproxy_sock.bpf.c, kproxy/bpf/socklb.py) with real sockets.

Each root test makes a child cgroup of /sys/fs/cgroup/unified (never the root), a private bpffs and
a network namespace whose lo carries three IPv4 and three IPv6 backend addresses with TCP and UDP
servers. Clients run
inside that namespace, inside (or, to show it is untouched, outside) the child cgroup. The service
address exists nowhere: only the socket programs can make it reach anything.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import subprocess
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.maps import KproxyMaps, PinnedMap
from kproxy.bpf.socklb import (
    HOOKS,
    PIN_PREFIX,
    SocketLB,
    SocketLBError,
    cgroup2_mounts,
    check_cgroup,
    find_cgroup2,
    parse_cgroup2_mounts,
)
from kproxy.sync import maglev

REPO = Path(__file__).resolve().parents[2]
SOCK_OBJECT = REPO / "kproxy" / "bpf" / "obj" / "kproxy_sock.bpf.o"
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")

VIP = "10.96.0.10"
NODE_ADDR = "192.168.77.2"  # a node address of the namespace, for NodePort frontends
BACKENDS = ["10.244.7.11", "10.244.7.12", "10.244.7.13"]
VIP6 = "fd00:96::10"
NODE_ADDR6 = "fd00:77::2"  # written to kp_cfg6_v1 only; not on any interface
BACKENDS6 = ["fd00:244:7::11", "fd00:244:7::12", "fd00:244:7::13"]
MAPPED_VIP = f"::ffff:{VIP}"  # VIP as a dual-stack AF_INET6 socket names it
BE_TCP_PORT = 8080
BE_UDP_PORT = 5353
TCP, UDP = abi.IPPROTO_TCP, abi.IPPROTO_UDP

SERVER = rf"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for a in sys.argv[1:]:
    family = socket.AF_INET6 if ":" in a else socket.AF_INET
    t = socket.socket(family)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((a, {BE_TCP_PORT}))
    t.listen(256)
    sel.register(t, selectors.EVENT_READ, ("tcp", a))
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.bind((a, {BE_UDP_PORT}))
    sel.register(u, selectors.EVENT_READ, ("udp", a))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        kind, a = key.data
        if kind == "tcp":
            c, _ = key.fileobj.accept()
            c.sendall(a.encode())
            c.close()
        else:
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(a.encode() + b" " + data, peer)
"""

# Client helpers; each returns a dict, errors by errno name so a refusal and a timeout differ.
PRELUDE = r"""
import errno, json, socket

def _err(e):
    return errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__

def _sock(addr, kind, family, v6only):
    # family None: the address's own; AF_INET6 with v6only False is a dual-stack socket
    s = socket.socket(family or (socket.AF_INET6 if ":" in addr else socket.AF_INET), kind)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    return s

def tcp(addr, port, family=None, v6only=None):
    s = _sock(addr, socket.SOCK_STREAM, family, v6only)
    s.settimeout(10)
    try:
        s.connect((addr, port))
        peer = list(s.getpeername())[:2]
        data = b""
        while chunk := s.recv(100):
            data += chunk
    except TimeoutError:
        return {"error": "timeout"}
    except OSError as e:
        return {"error": _err(e)}
    finally:
        s.close()
    return {"backend": data.decode(), "peer": peer}

def udp(addr, port, connected=False, family=None, v6only=None):
    s = _sock(addr, socket.SOCK_DGRAM, family, v6only)
    s.settimeout(10)
    peer = None
    try:
        if connected:
            s.connect((addr, port))
            peer = list(s.getpeername())[:2]
            s.send(b"ping")
        else:
            s.sendto(b"ping", (addr, port))
        data, src = s.recvfrom(2048)
    except TimeoutError:
        return {"error": "timeout"}
    except OSError as e:
        return {"error": _err(e)}
    finally:
        s.close()
    return {"backend": data.decode().split()[0], "src": list(src)[:2], "peer": peer}
"""


def in6(address: str) -> ctypes.Array[ctypes.c_uint8]:
    return abi.In6.from_buffer_copy(abi.ip6_to_bytes(address))


# ---- unit tests (no root) ----
def test_attach_types_match_uapi_header() -> None:
    header = Path("/usr/include/linux/bpf.h")
    if not header.exists():
        pytest.skip("no uapi linux/bpf.h")
    body = re.search(r"enum bpf_attach_type \{(.*?)\}", header.read_text(), re.S)
    assert body is not None
    names = [ln.strip().rstrip(",") for ln in body.group(1).splitlines() if ln.strip().startswith("BPF_")]
    want = {
        "connect4": "BPF_CGROUP_INET4_CONNECT",
        "sendmsg4": "BPF_CGROUP_UDP4_SENDMSG",
        "recvmsg4": "BPF_CGROUP_UDP4_RECVMSG",
        "getpeername4": "BPF_CGROUP_INET4_GETPEERNAME",
        "connect6": "BPF_CGROUP_INET6_CONNECT",
        "sendmsg6": "BPF_CGROUP_UDP6_SENDMSG",
        "recvmsg6": "BPF_CGROUP_UDP6_RECVMSG",
        "getpeername6": "BPF_CGROUP_INET6_GETPEERNAME",
    }
    assert {hook: names[attach_type] for hook, (_, attach_type) in HOOKS.items()} == want


def test_parse_cgroup2_mounts() -> None:
    text = (
        "24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
        "30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "36 24 0:31 / /sys/fs/cgroup/systemd rw shared:10 - cgroup cgroup rw,name=systemd\n"
        "37 30 0:30 / /mnt/my\\040cg rw shared:11 - cgroup2 none rw\n"
    )
    assert parse_cgroup2_mounts(text) == ["/sys/fs/cgroup/unified", "/mnt/my cg"]


def test_find_cgroup2_takes_the_unified_mount_of_a_hybrid_host(tmp_path: Path) -> None:
    """The chart mounts the host's socketLB.cgroupPath (/sys/fs/cgroup) in the agent's container; on a
    hybrid cgroup v1/v2 host that is a tmpfs and cgroup v2 lives at .../unified below it (issue 12:
    the agent crash-looped with "is not a cgroup v2 directory")."""
    text = (
        "30 1 0:26 / /run/kproxy/cgroupv2 rw - tmpfs tmpfs rw\n"
        "35 30 0:30 / /run/kproxy/cgroupv2/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
        "36 30 0:31 / /run/kproxy/cgroupv2/systemd rw - cgroup cgroup rw,name=systemd\n"
        "37 1 0:30 / /run/kproxy/cgroupv2-other rw - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2("/run/kproxy/cgroupv2", text) == "/run/kproxy/cgroupv2/unified"
    # a plain directory with nothing mounted below: itself (check_cgroup then says why not)
    assert find_cgroup2(tmp_path, text) == str(tmp_path)
    # this machine is such a host: cgroup v2 at /sys/fs/cgroup/unified, v1 and a tmpfs at /sys/fs/cgroup
    if os.path.ismount("/sys/fs/cgroup/unified") and "/sys/fs/cgroup" not in cgroup2_mounts():
        assert find_cgroup2("/sys/fs/cgroup") == "/sys/fs/cgroup/unified"
    for mount in cgroup2_mounts():
        assert find_cgroup2(mount) == os.path.realpath(mount)


def test_check_cgroup_refuses_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(SocketLBError, match="not a cgroup v2 directory"):
        check_cgroup(tmp_path)
    with pytest.raises(SocketLBError, match="does not exist"):
        check_cgroup(tmp_path / "missing")


@pytest.fixture
def sock_object() -> Path:
    if not SOCK_OBJECT.exists():
        pytest.fail(f"{SOCK_OBJECT} is missing: run `make bpf`")
    return SOCK_OBJECT


@pytest.mark.parametrize("name", sorted(abi.SOCK_BTF_NAMES))
def test_sknat_layout_matches_btf(sock_object: Path, name: str) -> None:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(sock_object)], capture_output=True, text=True, check=True
    ).stdout
    types = {t["id"]: t for t in json.loads(out)["types"]}

    def size(type_id: int) -> int:
        t = types[type_id]
        if t["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT"):
            return size(t["type_id"])
        if t["kind"] == "ARRAY":  # pad[3], and union kp_in6's b[16] / w[4]
            return int(t["nr_elems"]) * size(t["type_id"])
        return int(t["size"])

    (struct,) = [t for t in types.values() if t["kind"] == "STRUCT" and t.get("name") == name]
    mirror = abi.SOCK_BTF_NAMES[name]
    assert struct["size"] == ctypes.sizeof(mirror)
    c_members = [(m["name"], m["bits_offset"] // 8, size(m["type_id"])) for m in struct["members"]]
    py_members = [(f, getattr(mirror, f).offset, getattr(mirror, f).size) for f, *_ in mirror._fields_]
    assert py_members == c_members


def test_sock_object_maps_and_programs(sock_object: Path) -> None:
    with lb.BpfObject.open(sock_object, pin_root_path="/kpt-pin-root") as obj:
        assert {p for p, _ in HOOKS.values()} == set(obj.program_names())
        assert set(abi.ALL_MAPS) | set(abi.SOCK_MAPS) <= set(obj.map_names())
        for name, key, val, size in (
            (abi.MAP_SKNAT4, abi.Sknat4Key, abi.Sknat4Val, abi.SKNAT4_MAX),
            (abi.MAP_SKNAT6, abi.Sknat6Key, abi.Sknat6Val, abi.SKNAT6_MAX),
        ):
            p = obj.map_params(name)
            assert (p.type, p.key_size, p.value_size, p.max_entries) == (
                lb.BPF_MAP_TYPE_LRU_HASH,
                ctypes.sizeof(key),
                ctypes.sizeof(val),
                size,
            )
            assert obj.pin_path(name) == f"/kpt-pin-root/{name}"


# ---- the lab ----
@dataclass
class SockLab:
    ns: Any
    cgroup: Path
    bpffs: Path
    slb: SocketLB
    maps: KproxyMaps
    sknat: PinnedMap[abi.Sknat4Key, abi.Sknat4Val]
    sknat6: PinnedMap[abi.Sknat6Key, abi.Sknat6Val]
    _next_be: int = 1
    _be_ids: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def backend(self, addr: str, port: int, proto: int) -> int:
        key = (addr, port, proto)
        if key not in self._be_ids:
            self._next_be += 1
            if ":" in addr:
                self._be_ids[key] = abi.ID6_BASE + self._next_be
                val6 = abi.Be6Val(addr=in6(addr), port=abi.port_to_nbo(port), proto=proto)
                self.maps.be6.put_many([(ctypes.c_uint32(self._be_ids[key]), val6)])
            else:
                self._be_ids[key] = self._next_be
                val = abi.Be4Val(addr=abi.ip_to_nbo(addr), port=abi.port_to_nbo(port), proto=proto)
                self.maps.be4.put_many([(ctypes.c_uint32(self._be_ids[key]), val)])
        return self._be_ids[key]

    def service(
        self,
        addr: str,
        port: int,
        proto: int,
        backends: list[str],
        svc_id: int = 1,
        flags: int = 0,
        affinity_timeout: int = 0,
        scope: int = abi.Scope.EXT,
    ) -> None:
        be_port = BE_TCP_PORT if proto == TCP else BE_UDP_PORT
        ids = [self.backend(b, be_port, proto) for b in backends]
        if ":" in addr:
            self.maps.svc6.put_many(
                [
                    (
                        abi.Svc6Key(
                            addr=in6(addr), port=abi.port_to_nbo(port), slot=i, proto=proto, scope=scope
                        ),
                        val,
                    )
                    for i, val in self._svc_vals(ids, svc_id, flags, affinity_timeout)
                ]
            )
            return

        def key(slot: int) -> abi.Svc4Key:
            return abi.Svc4Key(
                addr=abi.ip_to_nbo(addr), port=abi.port_to_nbo(port), slot=slot, proto=proto, scope=scope
            )

        self.maps.svc4.put_many(
            [(key(i), val) for i, val in self._svc_vals(ids, svc_id, flags, affinity_timeout)]
        )

    @staticmethod
    def _svc_vals(
        ids: list[int], svc_id: int, flags: int, affinity_timeout: int
    ) -> list[tuple[int, abi.Svc4Val]]:
        """(slot, value) of a frontend: the backend slots, then slot 0, as the agent writes them."""
        items = [(i + 1, abi.Svc4Val(backend_id=b, svc_id=svc_id)) for i, b in enumerate(ids)]
        items.append(
            (0, abi.Svc4Val(svc_id=svc_id, count=len(ids), flags=flags, affinity_timeout=affinity_timeout))
        )
        return items

    def _run(self, argv_prefix: list[str], body: str) -> Any:
        code = PRELUDE + "\nprint(json.dumps(" + body + "))\n"
        proc = subprocess.run(
            [*argv_prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def client(self, body: str) -> Any:
        """Evaluate `body` in a client process inside the child cgroup and the namespace."""
        enter = f'echo $$ > {self.cgroup}/cgroup.procs && exec "$0" "$@"'
        return self._run(["nsenter", f"--net={self.ns.path}", "sh", "-c", enter], body)

    def outsider(self, body: str) -> Any:
        """The same, in the namespace but in the cgroup this test runs in."""
        return self._run(["nsenter", f"--net={self.ns.path}"], body)

    def stat(self, s: abi.Stat, family: str | None = None) -> int:
        """A counter of both families, or of FAMILY ("IPv4": kp_stats_v1, "IPv6": kp_stats6_v1)."""
        if family is None:
            return self.maps.stat_totals()[int(s)][0]
        return self.maps.stat_totals_by_family()[family][int(s)][0]


@pytest.fixture
def socklab(
    bpffs: Path, netns: Callable[[], Any], child_cgroup: Path, sock_object: Path
) -> Iterator[SockLab]:
    ns = netns()
    for a in [*BACKENDS, NODE_ADDR]:
        ns.ip("addr", "add", f"{a}/32", "dev", "lo")
    for a in BACKENDS6:
        ns.ip("-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad")
    server = subprocess.Popen(
        ["nsenter", f"--net={ns.path}", sys.executable, "-c", SERVER, *BACKENDS, *BACKENDS6],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    slb = SocketLB(bpffs, child_cgroup, SOCK_OBJECT)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", server.stderr.read() if server.stderr else ""
        slb.attach()
        with (
            KproxyMaps.open(bpffs) as maps,
            PinnedMap.open(str(bpffs / abi.MAP_SKNAT4), abi.Sknat4Key, abi.Sknat4Val) as sknat,
            PinnedMap.open(str(bpffs / abi.MAP_SKNAT6), abi.Sknat6Key, abi.Sknat6Val) as sknat6,
        ):
            yield SockLab(ns, child_cgroup, bpffs, slb, maps, sknat, sknat6)
    finally:
        slb.cleanup()
        server.kill()
        server.wait()


# ---- root tests ----
@pytest.mark.root
def test_tcp_connect_reaches_a_backend_and_getpeername_shows_the_service(socklab: SockLab) -> None:
    socklab.service(VIP, 80, TCP, BACKENDS[:1])
    r = socklab.client(f"tcp({VIP!r}, 80)")
    assert r == {"backend": BACKENDS[0], "peer": [VIP, 80]}
    assert socklab.stat(abi.Stat.SOCK_CONNECT) == 1
    assert socklab.stat(abi.Stat.SOCK_GETPEERNAME_REVNAT) == 1
    entries = [(k, v) for k, v in socklab.sknat.items()]
    assert len(entries) == 1
    k, v = entries[0]
    assert (abi.nbo_to_ip(k.addr), abi.nbo_to_port(k.port)) == (BACKENDS[0], BE_TCP_PORT)
    assert (abi.nbo_to_ip(v.addr), abi.nbo_to_port(v.port), v.svc_id) == (VIP, 80, 1)


@pytest.mark.root
def test_udp_replies_come_from_the_service(socklab: SockLab) -> None:
    socklab.service(VIP, 53, UDP, BACKENDS[1:2], svc_id=2)
    r = socklab.client(f"[udp({VIP!r}, 53), udp({VIP!r}, 53, connected=True)]")
    assert r[0] == {"backend": BACKENDS[1], "src": [VIP, 53], "peer": None}
    assert r[1] == {"backend": BACKENDS[1], "src": [VIP, 53], "peer": [VIP, 53]}
    assert socklab.stat(abi.Stat.SOCK_SENDMSG) == 1
    assert socklab.stat(abi.Stat.SOCK_CONNECT) == 1
    assert socklab.stat(abi.Stat.SOCK_RECVMSG_REVNAT) == 2
    assert socklab.stat(abi.Stat.SOCK_GETPEERNAME_REVNAT) == 1


@pytest.mark.root
def test_service_without_backends_is_refused_at_once(socklab: SockLab) -> None:
    socklab.service(VIP, 80, TCP, [])
    socklab.service(VIP, 53, UDP, [], svc_id=2)
    r = socklab.client(f"[tcp({VIP!r}, 80), udp({VIP!r}, 53), udp({VIP!r}, 53, connected=True)]")
    # A refusal, not a timeout: the client's 10 s timeout would say "timeout".
    assert r == [{"error": "ECONNREFUSED"}] * 3
    assert socklab.stat(abi.Stat.DROP_SOCK_NO_BACKEND) == 3
    assert len(socklab.sknat) == 0


@pytest.mark.root
def test_service_address_space_holds_for_node_processes(socklab: SockLab) -> None:
    """kube-proxy's cluster-ips-check runs in OUTPUT too: a node process connecting to a ClusterIP's
    unknown port or protocol is refused; to an unallocated service address it fails at once
    (EHOSTUNREACH) instead of timing out behind a DROP; another proxy's ClusterIP is left alone."""
    socklab.service(VIP, 80, TCP, BACKENDS[:1])

    def put(cidr: str, action: abi.SvcnetAction) -> None:
        net, plen = cidr.split("/")
        socklab.maps.svcnet4.put_many(
            [(abi.Svcnet4Key(int(plen), abi.ip_to_nbo(net)), abi.Svcnet4Val(action))]
        )

    put("10.96.0.0/16", abi.SvcnetAction.DROP)
    put(f"{VIP}/32", abi.SvcnetAction.REJECT)
    put("10.96.0.77/32", abi.SvcnetAction.PASS)
    socklab.maps.svcnet_span.put_many(
        [(ctypes.c_uint32(0), abi.SvcnetSpan(int.from_bytes(bytes([10, 96, 0, 0]), "big"),
                                              int.from_bytes(bytes([10, 96, 255, 255]), "big")))]
    )  # fmt: skip
    r = socklab.client(
        f"[tcp({VIP!r}, 80), tcp({VIP!r}, 81), udp({VIP!r}, 80, connected=True), tcp('10.96.5.5', 80),"
        f" udp('10.96.5.5', 53)]"
    )
    assert r[0]["backend"] == BACKENDS[0]
    assert r[1:] == [{"error": "ECONNREFUSED"}] * 2 + [{"error": "EHOSTUNREACH"}] * 2
    assert socklab.stat(abi.Stat.SVCNET_REJECT) == 2 and socklab.stat(abi.Stat.DROP_SVCNET) == 2
    # another proxy's ClusterIP: not judged (the connection goes out as the process asked)
    assert socklab.client("tcp('10.96.0.77', 80)").get("error") != "EHOSTUNREACH"


@pytest.mark.root
def test_connections_spread_over_all_backends(socklab: SockLab) -> None:
    socklab.service(VIP, 80, TCP, BACKENDS)
    r = socklab.client(f"[tcp({VIP!r}, 80) for _ in range(60)]")
    assert all(x["peer"] == [VIP, 80] for x in r), r
    # Each backend is missed by 60 uniform picks with probability (2/3)^60 < 1e-10.
    assert {x["backend"] for x in r} == set(BACKENDS)


@pytest.mark.root
def test_maglev_frontends_stay_random_for_node_processes(socklab: SockLab) -> None:
    """connect() has no source port yet: a Maglev table's hash would send every connection of the node
    to one backend. The socket hooks never read the table (here one naming a single backend)."""
    socklab.service(NODE_ADDR, 30080, TCP, BACKENDS, flags=abi.SvcFlag.NODEPORT | abi.SvcFlag.MAGLEV)
    only = socklab.backend(BACKENDS[0], BE_TCP_PORT, TCP)
    rows = maglev.pack_rows(251, array("H", [0] * 251), [only], 0)
    assert socklab.maps.maglev.put_tables([(1, rows)]) == []
    r = socklab.client(f"[tcp({NODE_ADDR!r}, 30080) for _ in range(60)]")
    assert {x["backend"] for x in r} == set(BACKENDS), r
    assert socklab.stat(abi.Stat.MAGLEV) == 0 and socklab.stat(abi.Stat.MAGLEV_FALLBACK) == 0


@pytest.mark.root
def test_session_affinity_keeps_the_backend(socklab: SockLab) -> None:
    socklab.service(VIP, 80, TCP, BACKENDS, flags=abi.SvcFlag.AFFINITY, affinity_timeout=600)
    r = socklab.client(f"[tcp({VIP!r}, 80) for _ in range(30)]")
    backends = {x["backend"] for x in r}
    assert len(backends) == 1, r
    assert socklab.stat(abi.Stat.AFFINITY_HIT) == 29
    (key, val), *rest = list(socklab.maps.aff4.items())
    assert not rest and key.svc_id == 1
    assert abi.nbo_to_ip(socklab.maps.be4.get(ctypes.c_uint32(val.backend_id)).addr) in backends


@pytest.mark.root
def test_nodeport_on_a_node_address_and_internal_scope(socklab: SockLab) -> None:
    # NodePort with externalTrafficPolicy Local and no local endpoint: EXT says drop, INT has the
    # cluster-wide backends. A node-local client is internal, like a pod.
    flags = abi.SvcFlag.NODEPORT | abi.SvcFlag.ETP_LOCAL | abi.SvcFlag.TWO_SCOPES
    socklab.service(NODE_ADDR, 30080, TCP, BACKENDS[2:], scope=abi.Scope.INT, flags=flags)
    socklab.service(NODE_ADDR, 30080, TCP, [], flags=flags | abi.SvcFlag.NO_LOCAL_DROP)
    r = socklab.client(f"tcp({NODE_ADDR!r}, 30080)")
    assert r == {"backend": BACKENDS[2], "peer": [NODE_ADDR, 30080]}
    # Without socket LB nothing listens there.
    assert socklab.outsider(f"tcp({NODE_ADDR!r}, 30080)") == {"error": "ECONNREFUSED"}


@pytest.mark.root
def test_client_outside_the_cgroup_is_not_affected(socklab: SockLab) -> None:
    socklab.service(VIP, 80, TCP, BACKENDS)
    socklab.service(VIP, 53, UDP, BACKENDS)
    r = socklab.outsider(f"[tcp({VIP!r}, 80), udp({VIP!r}, 53), tcp({BACKENDS[0]!r}, {BE_TCP_PORT})]")
    assert r[0] == {"error": "ENETUNREACH"}  # the service address is routed nowhere in this namespace
    assert r[1] == {"error": "ENETUNREACH"}
    assert r[2] == {"backend": BACKENDS[0], "peer": [BACKENDS[0], BE_TCP_PORT]}
    assert socklab.stat(abi.Stat.SOCK_CONNECT) == 0
    assert socklab.stat(abi.Stat.SOCK_SENDMSG) == 0


@pytest.mark.root
def test_reattach_upgrades_in_place_and_cleanup_detaches(socklab: SockLab) -> None:
    socklab.service(VIP, 80, TCP, BACKENDS[:1])
    before = {a.hook: a for a in socklab.slb.attached()}
    assert set(before) == set(HOOKS) and all(a.alive for a in before.values())
    assert all(a.cgroup_id == os.stat(socklab.cgroup).st_ino for a in before.values())

    # A restarted agent: a second object, same pins -> same links, new programs, no gap.
    with SocketLB(socklab.bpffs, socklab.cgroup, SOCK_OBJECT) as again:
        after = {a.hook: a for a in again.attach()}
    assert {h: a.link_id for h, a in after.items()} == {h: a.link_id for h, a in before.items()}
    assert all(after[h].prog_id != before[h].prog_id for h in HOOKS)
    assert socklab.client(f"tcp({VIP!r}, 80)") == {"backend": BACKENDS[0], "peer": [VIP, 80]}

    socklab.slb.cleanup()
    assert socklab.slb.attached() == []
    assert not any(p.name.startswith(PIN_PREFIX) for p in (socklab.bpffs / "links").glob("*"))
    assert not any((socklab.bpffs / name).exists() for name in abi.SOCK_MAPS)
    assert socklab.client(f"tcp({VIP!r}, 80)") == {"error": "ENETUNREACH"}


def test_cleanup_detaches_links_of_hooks_it_does_not_know(socklab: SockLab) -> None:
    """After a downgrade, a newer version's hooks are pinned beside this version's: cleanup (and
    `attached`) walk every `cgroup:*` pin, so no link of a newer version stays attached."""
    links = socklab.bpffs / "links"
    os.rename(socklab.slb.link_pin("connect6"), links / f"{PIN_PREFIX}future7")
    hooks = [a.hook for a in socklab.slb.attached()]
    assert "future7" in hooks and "connect6" not in hooks
    socklab.slb.cleanup()
    assert socklab.slb.attached() == []
    assert not any(p.name.startswith(PIN_PREFIX) for p in links.glob("*"))


@pytest.mark.root
def test_refuses_the_cgroup_root(bpffs: Path) -> None:
    if str(CGROUP_ROOT) not in cgroup2_mounts():
        pytest.skip(f"no cgroup2 mounted at {CGROUP_ROOT}")
    for path in (CGROUP_ROOT, Path(f"{CGROUP_ROOT}/."), CGROUP_ROOT / ".." / CGROUP_ROOT.name):
        slb = SocketLB(bpffs, path, SOCK_OBJECT)
        with pytest.raises(SocketLBError, match="root of a cgroup2 hierarchy"):
            slb.attach()
        slb.close()
    assert not (bpffs / "links").exists() or not list((bpffs / "links").iterdir())
    # Nothing of ours got attached to the root, by link or otherwise. (Only the root is looked at:
    # another kproxy on the machine, e.g. a second test run, may have socket LB on its own cgroups.)
    cmd = ["bpftool", "-j", "cgroup", "show", str(CGROUP_ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    attached = json.loads(out.stdout) if out.stdout.strip() else []
    assert not [a for a in attached if str(a.get("name", "")).startswith("kp_sock_")], attached


@pytest.mark.root
def test_load_balancer_source_ranges_hold_for_node_processes(socklab: SockLab) -> None:
    # A node process connects from the node address (kp_cfg_v1), as kube-proxy's KUBE-FW sees it.
    cfg = socklab.maps.read_config()
    cfg.node_addr = abi.ip_to_nbo(NODE_ADDR)
    socklab.maps.write_config(cfg)
    lb_ip = "192.0.2.80"
    socklab.service(
        lb_ip, 443, TCP, BACKENDS[:1], svc_id=7, flags=abi.SvcFlag.LOADBALANCER | abi.SvcFlag.SRC_RANGES
    )
    # Only 203.0.113.0/24 may connect: the node is outside it.
    allowed = abi.LbSrc4Key(prefixlen=abi.LBSRC4_SVC_BITS + 24, svc_id=7, addr=abi.ip_to_nbo("203.0.113.0"))
    socklab.maps.lbsrc4.put_many([(allowed, abi.LbSrc4Val())])
    assert socklab.client(f"tcp({lb_ip!r}, 443)") == {"error": "ECONNREFUSED"}
    assert socklab.stat(abi.Stat.DROP_SRC_RANGE) == 1
    node = abi.LbSrc4Key(prefixlen=abi.LBSRC4_SVC_BITS + 32, svc_id=7, addr=abi.ip_to_nbo(NODE_ADDR))
    socklab.maps.lbsrc4.put_many([(node, abi.LbSrc4Val())])
    assert socklab.client(f"tcp({lb_ip!r}, 443)") == {"backend": BACKENDS[0], "peer": [lb_ip, 443]}


# ---- IPv6, and IPv4 through IPv4-mapped addresses on dual-stack sockets ----
def sknat6_entries(socklab: SockLab) -> list[tuple[str, int, str, int, int]]:
    """(backend, backend port, frontend, frontend port, svc_id) of every kp_sknat6_v1 entry."""
    return [
        (abi.bytes_to_ip6(k.addr), abi.nbo_to_port(k.port), abi.bytes_to_ip6(v.addr), abi.nbo_to_port(v.port),
         v.svc_id)
        for k, v in socklab.sknat6.items()
    ]  # fmt: skip


@pytest.mark.root
def test_tcp_connect6_reaches_a_backend_and_getpeername_shows_the_service(socklab: SockLab) -> None:
    socklab.service(VIP6, 80, TCP, BACKENDS6[:1], svc_id=abi.ID6_BASE + 1)
    r = socklab.client(f"tcp({VIP6!r}, 80)")
    assert r == {"backend": BACKENDS6[0], "peer": [VIP6, 80]}
    assert socklab.stat(abi.Stat.SOCK_CONNECT, "IPv6") == 1
    assert socklab.stat(abi.Stat.SOCK_GETPEERNAME_REVNAT, "IPv6") == 1
    assert socklab.stat(abi.Stat.SOCK_CONNECT, "IPv4") == 0
    assert sknat6_entries(socklab) == [(BACKENDS6[0], BE_TCP_PORT, VIP6, 80, abi.ID6_BASE + 1)]
    assert len(socklab.sknat) == 0


@pytest.mark.root
def test_ipv6_service_address_space_holds_for_node_processes(socklab: SockLab) -> None:
    """kp_svcnet6_v1 for node processes: an IPv6 ClusterIP's unknown port is refused, an unallocated
    address of the IPv6 service CIDR fails at once (EHOSTUNREACH), another proxy's ClusterIP passes."""
    socklab.service(VIP6, 80, TCP, BACKENDS6[:1], svc_id=abi.ID6_BASE + 1)

    def put(cidr: str, action: abi.SvcnetAction) -> None:
        net, plen = cidr.split("/")
        socklab.maps.svcnet6.put_many([(abi.Svcnet6Key(int(plen), in6(net)), abi.Svcnet4Val(action))])

    put("fd00:96::/108", abi.SvcnetAction.DROP)
    put(f"{VIP6}/128", abi.SvcnetAction.REJECT)
    put("fd00:96::77/128", abi.SvcnetAction.PASS)
    upper = int(ipaddress.IPv6Address("fd00:96::")) >> 64
    socklab.maps.svcnet6_span.put_many([(ctypes.c_uint32(0), abi.Svcnet6Span(upper, upper))])
    r = socklab.client(
        f"[tcp({VIP6!r}, 80), tcp({VIP6!r}, 81), udp({VIP6!r}, 80, connected=True),"
        f" tcp('fd00:96::5', 80), udp('fd00:96::5', 53)]"
    )
    assert r[0]["backend"] == BACKENDS6[0]
    assert r[1:] == [{"error": "ECONNREFUSED"}] * 2 + [{"error": "EHOSTUNREACH"}] * 2
    assert socklab.stat(abi.Stat.SVCNET_REJECT) == 2 and socklab.stat(abi.Stat.DROP_SVCNET) == 2
    assert socklab.client("tcp('fd00:96::77', 80)").get("error") != "EHOSTUNREACH"


@pytest.mark.root
def test_udp6_replies_come_from_the_service(socklab: SockLab) -> None:
    socklab.service(VIP6, 53, UDP, BACKENDS6[1:2], svc_id=abi.ID6_BASE + 2)
    r = socklab.client(f"[udp({VIP6!r}, 53), udp({VIP6!r}, 53, connected=True)]")
    assert r[0] == {"backend": BACKENDS6[1], "src": [VIP6, 53], "peer": None}
    assert r[1] == {"backend": BACKENDS6[1], "src": [VIP6, 53], "peer": [VIP6, 53]}
    assert socklab.stat(abi.Stat.SOCK_SENDMSG) == 1
    assert socklab.stat(abi.Stat.SOCK_CONNECT) == 1
    assert socklab.stat(abi.Stat.SOCK_RECVMSG_REVNAT) == 2
    assert socklab.stat(abi.Stat.SOCK_GETPEERNAME_REVNAT) == 1
    assert {e[:4] for e in sknat6_entries(socklab)} == {(BACKENDS6[1], BE_UDP_PORT, VIP6, 53)}


@pytest.mark.root
def test_ipv6_service_without_backends_is_refused_at_once(socklab: SockLab) -> None:
    socklab.service(VIP6, 80, TCP, [])
    socklab.service(VIP6, 53, UDP, [], svc_id=2)
    r = socklab.client(f"[tcp({VIP6!r}, 80), udp({VIP6!r}, 53), udp({VIP6!r}, 53, connected=True)]")
    assert r == [{"error": "ECONNREFUSED"}] * 3
    assert socklab.stat(abi.Stat.DROP_SOCK_NO_BACKEND) == 3
    assert len(socklab.sknat6) == 0


@pytest.mark.root
def test_ipv6_connections_spread_and_session_affinity_keeps_the_backend(socklab: SockLab) -> None:
    socklab.service(VIP6, 80, TCP, BACKENDS6)
    r = socklab.client(f"[tcp({VIP6!r}, 80) for _ in range(60)]")
    assert all(x["peer"] == [VIP6, 80] for x in r), r
    assert {x["backend"] for x in r} == set(BACKENDS6)  # each one missed with probability < 1e-10

    # an unbound socket's client address is the node's IPv6 one (kp_cfg6_v1), as for IPv4
    socklab.maps.cfg6.put_many([(ctypes.c_uint32(0), abi.Config6(node_addr=in6(NODE_ADDR6)))])
    socklab.service(VIP6, 81, TCP, BACKENDS6, svc_id=9, flags=abi.SvcFlag.AFFINITY, affinity_timeout=600)
    r = socklab.client(f"[tcp({VIP6!r}, 81) for _ in range(30)]")
    backends = {x["backend"] for x in r}
    assert len(backends) == 1, r
    assert socklab.stat(abi.Stat.AFFINITY_HIT) == 29
    (key, val), *rest = list(socklab.maps.aff6.items())
    assert not rest and key.svc_id == 9
    assert abi.bytes_to_ip6(key.client_addr) == NODE_ADDR6
    assert abi.bytes_to_ip6(socklab.maps.be6.get(ctypes.c_uint32(val.backend_id)).addr) in backends


@pytest.mark.root
def test_dual_stack_socket_reaches_an_ipv4_service_through_a_mapped_address(socklab: SockLab) -> None:
    """An AF_INET6 socket with IPV6_V6ONLY off names the IPv4 ClusterIP ::ffff:<VIP>: connect6 balances
    it from kp_svc4_v1 (TCP, connected UDP), the kernel hands an unconnected sendto() to sendmsg4; the
    peer and the reply source it is shown are the mapped frontend, from kp_sknat4_v1."""
    socklab.service(VIP, 80, TCP, BACKENDS[:1])
    socklab.service(VIP, 53, UDP, BACKENDS[1:2], svc_id=2)
    socklab.service(VIP, 81, TCP, [], svc_id=3)
    dual = "family=socket.AF_INET6, v6only=False"
    r = socklab.client(
        f"[tcp({MAPPED_VIP!r}, 80, {dual}), udp({MAPPED_VIP!r}, 53, connected=True, {dual}),"
        f" udp({MAPPED_VIP!r}, 53, {dual}), tcp({MAPPED_VIP!r}, 81, {dual})]"
    )
    assert r[0] == {"backend": BACKENDS[0], "peer": [MAPPED_VIP, 80]}
    assert r[1] == {"backend": BACKENDS[1], "src": [MAPPED_VIP, 53], "peer": [MAPPED_VIP, 53]}
    assert r[2] == {"backend": BACKENDS[1], "src": [MAPPED_VIP, 53], "peer": None}
    assert r[3] == {"error": "ECONNREFUSED"}
    # IPv4 flows, whatever the socket's family: kp_stats_v1's counters
    assert socklab.stat(abi.Stat.SOCK_CONNECT, "IPv4") == 2
    assert socklab.stat(abi.Stat.SOCK_SENDMSG, "IPv4") == 1
    assert socklab.stat(abi.Stat.SOCK_GETPEERNAME_REVNAT, "IPv4") == 2
    assert socklab.stat(abi.Stat.SOCK_RECVMSG_REVNAT, "IPv4") == 2
    assert socklab.stat(abi.Stat.DROP_SOCK_NO_BACKEND, "IPv4") == 1
    assert not any(socklab.maps.stat_totals_by_family()["IPv6"].get(int(s), (0,))[0] for s in abi.Stat)
    entries = {
        (abi.nbo_to_ip(k.addr), abi.nbo_to_port(k.port), abi.nbo_to_ip(v.addr))
        for k, v in socklab.sknat.items()
    }
    assert entries == {(BACKENDS[0], BE_TCP_PORT, VIP), (BACKENDS[1], BE_UDP_PORT, VIP)}
    assert len(socklab.sknat6) == 0  # an IPv4 flow: its entries are kp_sknat4_v1's


@pytest.mark.root
def test_v6only_socket_to_a_mapped_address_is_left_alone(socklab: SockLab) -> None:
    """An IPv6-only socket cannot reach IPv4 (the kernel fails a mapped destination with ENETUNREACH):
    connect6 neither balances it nor refuses it, even for a frontend without backends."""
    socklab.service(VIP, 80, TCP, BACKENDS[:1])
    socklab.service(VIP, 53, UDP, BACKENDS[1:2], svc_id=2)
    socklab.service(VIP, 81, TCP, [], svc_id=3)
    v6only = "family=socket.AF_INET6, v6only=True"
    r = socklab.client(
        f"[tcp({MAPPED_VIP!r}, 80, {v6only}), udp({MAPPED_VIP!r}, 53, connected=True, {v6only}),"
        f" udp({MAPPED_VIP!r}, 53, {v6only}), tcp({MAPPED_VIP!r}, 81, {v6only})]"
    )
    assert r == [{"error": "ENETUNREACH"}] * 4
    assert socklab.stat(abi.Stat.SOCK_CONNECT) == 0
    assert socklab.stat(abi.Stat.SOCK_SENDMSG) == 0
    assert socklab.stat(abi.Stat.DROP_SOCK_NO_BACKEND) == 0
    assert len(socklab.sknat) == 0 and len(socklab.sknat6) == 0
    # the same socket with IPV6_V6ONLY off is balanced (the hooks are there and see it)
    r = socklab.client(f"tcp({MAPPED_VIP!r}, 80, family=socket.AF_INET6, v6only=False)")
    assert r == {"backend": BACKENDS[0], "peer": [MAPPED_VIP, 80]}


@pytest.mark.root
def test_ipv6_client_outside_the_cgroup_is_not_affected(socklab: SockLab) -> None:
    socklab.service(VIP6, 80, TCP, BACKENDS6)
    socklab.service(VIP, 80, TCP, BACKENDS)
    r = socklab.outsider(
        f"[tcp({VIP6!r}, 80), tcp({MAPPED_VIP!r}, 80, family=socket.AF_INET6, v6only=False),"
        f" tcp({BACKENDS6[0]!r}, {BE_TCP_PORT})]"
    )
    assert r[0] == {"error": "ENETUNREACH"} and r[1] == {"error": "ENETUNREACH"}
    assert r[2] == {"backend": BACKENDS6[0], "peer": [BACKENDS6[0], BE_TCP_PORT]}
    assert socklab.stat(abi.Stat.SOCK_CONNECT) == 0


@pytest.mark.root
def test_upgrade_from_a_pinned_set_without_ipv6_hooks(socklab: SockLab) -> None:
    """An agent from before IPv6 socket LB pinned the four *4 links and kp_sknat4_v1 only: a new
    agent upgrades those links in place (same link, new program) and adds the *6 links and map."""
    socklab.service(VIP, 80, TCP, BACKENDS[:1])
    socklab.service(VIP6, 80, TCP, BACKENDS6[:1])
    v6_hooks = [h for h in HOOKS if h.endswith("6")]
    assert len(v6_hooks) == 4
    for hook in v6_hooks:
        socklab.slb._detach_pin(socklab.slb.link_pin(hook))
    socklab.sknat6.close()
    os.unlink(socklab.bpffs / abi.MAP_SKNAT6)
    before = {a.hook: a for a in socklab.slb.attached()}
    assert set(before) == set(HOOKS) - set(v6_hooks)
    assert socklab.client(f"tcp({VIP6!r}, 80)") == {"error": "ENETUNREACH"}  # the older set: no IPv6

    with SocketLB(socklab.bpffs, socklab.cgroup, SOCK_OBJECT) as again:
        after = {a.hook: a for a in again.attach()}
    assert set(after) == set(HOOKS) and all(a.alive for a in after.values())
    assert {h: after[h].link_id for h in before} == {h: a.link_id for h, a in before.items()}
    assert all(after[h].prog_id != before[h].prog_id for h in before)
    assert (socklab.bpffs / abi.MAP_SKNAT6).exists()
    assert socklab.client(f"[tcp({VIP!r}, 80), tcp({VIP6!r}, 80)]") == [
        {"backend": BACKENDS[0], "peer": [VIP, 80]},
        {"backend": BACKENDS6[0], "peer": [VIP6, 80]},
    ]


# ---- localhost NodePorts, host-namespace-only mode (kp_cfg_v1 flags) ----
SO_NETNS_COOKIE = 71  # uapi asm-generic/socket.h; Python's socket module has no name for it


def set_config(socklab: SockLab, flags: int, node_addr: str = NODE_ADDR, cookie: int = 0) -> None:
    cfg = socklab.maps.read_config()
    cfg.node_addr = abi.ip_to_nbo(node_addr)
    cfg.flags = flags
    cfg.host_netns_cookie = cookie
    socklab.maps.write_config(cfg)


def ns_cookie(socklab: SockLab) -> int:
    """The network namespace cookie of the clients' namespace (what the agent writes for its own)."""
    raw = socklab.client(f"socket.socket().getsockopt(socket.SOL_SOCKET, {SO_NETNS_COOKIE}, 8).hex()")
    cookie = int.from_bytes(bytes.fromhex(raw), "little")
    assert cookie
    return cookie


@pytest.mark.root
def test_localhost_nodeport_is_served_as_on_the_node_address(socklab: SockLab) -> None:
    """kube-proxy's --iptables-localhost-nodeports: 127.0.0.0/8:<nodePort> reaches the NodePort's
    backends; the socket keeps seeing the loopback address it asked for (getpeername, UDP sources)."""
    set_config(socklab, abi.ConfigFlag.LOCALHOST_NODEPORTS, cookie=ns_cookie(socklab))
    socklab.service(NODE_ADDR, 30080, TCP, BACKENDS[:1], svc_id=3, flags=abi.SvcFlag.NODEPORT)
    socklab.service(NODE_ADDR, 30053, UDP, BACKENDS[1:2], svc_id=4, flags=abi.SvcFlag.NODEPORT)
    r = socklab.client(
        "[tcp('127.0.0.1', 30080), tcp('127.3.2.1', 30080), udp('127.0.0.1', 30053),"
        " udp('127.0.0.1', 30053, connected=True), tcp('::ffff:127.0.0.1', 30080, v6only=False)]"
    )
    assert r[0] == {"backend": BACKENDS[0], "peer": ["127.0.0.1", 30080]}
    assert r[1] == {"backend": BACKENDS[0], "peer": ["127.3.2.1", 30080]}  # all of 127.0.0.0/8
    assert r[2] == {"backend": BACKENDS[1], "src": ["127.0.0.1", 30053], "peer": None}
    assert r[3] == {"backend": BACKENDS[1], "src": ["127.0.0.1", 30053], "peer": ["127.0.0.1", 30053]}
    # a dual-stack socket's mapped loopback is an IPv4 flow, as kube-proxy's iptables sees it
    assert r[4] == {"backend": BACKENDS[0], "peer": ["::ffff:127.0.0.1", 30080]}
    svc_ids = {(abi.nbo_to_ip(v.addr), v.svc_id) for _, v in socklab.sknat.items()}
    assert svc_ids == {("127.0.0.1", 3), ("127.3.2.1", 3), ("127.0.0.1", 4)}
    # outside the cgroup nothing is translated: nothing listens on the loopback port
    assert socklab.outsider("tcp('127.0.0.1', 30080)") == {"error": "ECONNREFUSED"}


@pytest.mark.root
def test_localhost_nodeports_off_ipv6_and_non_nodeport_frontends(socklab: SockLab) -> None:
    socklab.service(NODE_ADDR, 30080, TCP, BACKENDS[:1], flags=abi.SvcFlag.NODEPORT)
    # a LoadBalancer IP or external IP that is the node's address is no NodePort: not on loopback
    socklab.service(NODE_ADDR, 443, TCP, BACKENDS[:1], svc_id=2, flags=abi.SvcFlag.EXTERNAL_IP)
    cookie = ns_cookie(socklab)
    set_config(socklab, abi.ConfigFlag.LOCALHOST_NODEPORTS, cookie=cookie)
    r = socklab.client("[tcp('::1', 30080), tcp('127.0.0.1', 443), tcp('127.0.0.1', 30081)]")
    assert r == [{"error": "ECONNREFUSED"}] * 3  # ::1 never (kube-proxy: IPv6 has no route_localnet)
    # another namespace's loopback (a pod's) is its own; an unknown cookie serves no namespace
    for other in (cookie + 1, 0):
        set_config(socklab, abi.ConfigFlag.LOCALHOST_NODEPORTS, cookie=other)
        assert socklab.client("tcp('127.0.0.1', 30080)") == {"error": "ECONNREFUSED"}
    set_config(socklab, 0, cookie=cookie)  # --no-localhost-nodeports
    assert socklab.client("tcp('127.0.0.1', 30080)") == {"error": "ECONNREFUSED"}
    assert socklab.client(f"tcp({NODE_ADDR!r}, 30080)")["backend"] == BACKENDS[0]
    assert len([1 for _, v in socklab.sknat.items() if abi.nbo_to_ip(v.addr).startswith("127.")]) == 0


@pytest.mark.root
def test_host_netns_only_translates_sockets_of_that_namespace_only(socklab: SockLab) -> None:
    """KP_CFG_F_SOCK_HOST_NETNS_ONLY: only sockets whose network namespace cookie is host_netns_cookie
    are translated (the agent writes its own); the others are left alone, as are all with cookie 0."""
    here = ns_cookie(socklab)
    socklab.service(VIP, 80, TCP, BACKENDS[:1])
    socklab.service(VIP6, 80, TCP, BACKENDS6[:1], svc_id=abi.ID6_BASE + 1)
    both = f"[tcp({VIP!r}, 80), tcp({VIP6!r}, 80), udp({VIP!r}, 80)]"
    set_config(socklab, abi.ConfigFlag.SOCK_HOST_NETNS_ONLY, cookie=here)
    r = socklab.client(both)
    assert r[0] == {"backend": BACKENDS[0], "peer": [VIP, 80]} and r[1]["backend"] == BACKENDS6[0], r
    for other in (here + 1, 0):
        set_config(socklab, abi.ConfigFlag.SOCK_HOST_NETNS_ONLY, cookie=other)
        r = socklab.client(both)
        assert all(x.get("error") in ("ENETUNREACH", "EHOSTUNREACH", "timeout") for x in r), r
    set_config(socklab, 0, cookie=here + 1)  # the flag alone decides: off, every namespace
    assert socklab.client(f"tcp({VIP!r}, 80)")["backend"] == BACKENDS[0]
