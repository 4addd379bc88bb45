"""kproxy_iter.bpf.o: the UDP socket iterator destroys connected sockets of removed backends.

Real sockets in a namespace of the test's own: a client process there connects UDP sockets, the test
writes their reverse entries (as connect4/connect6 would) into the object's own kp_sknat maps (no pins),
fills the filter with removed backends and runs the iterator in that namespace. Only sockets whose peer
is a removed backend reached through the Service it left are destroyed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.sockdestroy import (
    Netns,
    Removal,
    SockDestroyer,
    SockDestroyUnavailable,
    close_namespaces,
    default_object_path,
    missing_kernel_feature,
)

pytestmark = pytest.mark.root

ITER_OBJECT = Path(default_object_path())

# Sockets by name: (family, peer, port, dual-stack). Servers listen on 127.0.0.1:5001/5002, [::1]:5003.
CLIENT = r"""
import errno, json, socket, sys
SO_COOKIE = 57
servers = []
for fam, addr, port in ((socket.AF_INET, "127.0.0.1", 5001), (socket.AF_INET, "127.0.0.1", 5002),
                        (socket.AF_INET6, "::1", 5003)):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr if fam == socket.AF_INET else "::", port))
    servers.append(s)
plan = json.loads(sys.argv[1])
socks = {}
for name, (fam, addr, port) in plan.items():
    s = socket.socket(socket.AF_INET6 if fam == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    if fam == 6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.connect((addr, port))
    socks[name] = s
unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print(json.dumps({n: int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
                  for n, s in socks.items()}), flush=True)
sys.stdin.readline()
out = {}
for name, s in socks.items():
    try:
        s.recv(100, socket.MSG_DONTWAIT)
        out[name] = "data"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out), flush=True)
"""

PLAN = {
    "via_service": (4, "127.0.0.1", 5001),  # through service 7 to the removed backend: destroyed
    "other_backend": (4, "127.0.0.1", 5002),  # through service 7 to the backend that stays
    "direct": (4, "127.0.0.1", 5001),  # to the removed backend's address itself: no reverse entry
    "other_service": (4, "127.0.0.1", 5001),  # the same backend through service 9, which keeps it
    "via_service6": (6, "::1", 5003),  # IPv6, through service 7: destroyed
    "mapped": (6, "::ffff:127.0.0.1", 5001),  # a dual-stack socket's IPv4 flow through service 7: destroyed
}
SERVICE_OF = {"via_service": 7, "other_backend": 7, "other_service": 9, "via_service6": 7, "mapped": 7}
DESTROYED = {"via_service", "via_service6", "mapped"}


@pytest.fixture
def destroyer() -> Iterator[SockDestroyer]:
    if not ITER_OBJECT.exists():
        pytest.fail(f"{ITER_OBJECT} is missing: run `make bpf`")
    d = SockDestroyer(None, ITER_OBJECT)
    try:
        d.load()
    except SockDestroyUnavailable as e:
        pytest.skip(f"this kernel cannot destroy sockets from an iterator: {e}")
    try:
        yield d
    finally:
        d.close()


def write_entry(d: SockDestroyer, cookie: int, fam: int, addr: str, port: int, svc_id: int) -> None:
    if fam == 4:
        k4 = abi.Sknat4Key(cookie, int.from_bytes(socket.inet_aton(addr), "little"), socket.htons(port))
        d.sknat_map(abi.MAP_SKNAT4).update(k4, abi.Sknat4Val(0, 0, 0, svc_id, 1))
    else:
        k6 = abi.Sknat6Key(cookie, abi.In6(*socket.inet_pton(socket.AF_INET6, addr)), socket.htons(port))
        d.sknat_map(abi.MAP_SKNAT6).update(k6, abi.Sknat6Val(abi.In6(), 0, 0, svc_id, 1))


def open_ns(path: str) -> Netns:
    fd = os.open(path, os.O_RDONLY)
    return Netns(os.fstat(fd).st_ino, fd, path)


def test_removed_backend_sockets_are_destroyed_and_others_are_not(
    destroyer: SockDestroyer, netns: Callable[[], Any]
) -> None:
    ns = netns()
    proc = subprocess.Popen(
        ["nsenter", f"--net={ns.path}", sys.executable, "-c", CLIENT, json.dumps(PLAN)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        cookies = json.loads(proc.stdout.readline() or "null")
        assert cookies, proc.stderr.read() if proc.stderr else ""
        for name, svc in SERVICE_OF.items():
            fam, addr, port = PLAN[name]
            if addr.startswith("::ffff:"):
                fam, addr = 4, addr.removeprefix("::ffff:")  # connect6 writes kp_sknat4_v1 for these
            write_entry(destroyer, cookies[name], fam, addr, port, svc)
        removals = [
            Removal(4, 7, socket.inet_aton("127.0.0.1"), 5001),
            Removal(6, 7, socket.inet_pton(socket.AF_INET6, "::1"), 5003),
            Removal(4, 8, socket.inet_aton("127.0.0.1"), 5002),  # another Service's: not service 7's
        ]
        spaces = [open_ns(ns.path)]
        try:
            run = destroyer.run(removals, spaces)
        finally:
            close_namespaces(spaces)
        assert run.failed_namespaces == []
        assert run.failed == 0, run.sockets
        assert sorted(s.cookie for s in run.sockets) == sorted(cookies[n] for n in DESTROYED)
        proc.stdin.write("\n")
        proc.stdin.flush()
        after = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert {n for n, e in after.items() if e == "ECONNABORTED"} == DESTROYED, after
    assert {n for n, e in after.items() if e == "EAGAIN"} == set(PLAN) - DESTROYED, after
    # the filter is emptied after the run
    assert destroyer.filter is not None and list(destroyer.filter.iter_keys()) == []


def test_the_calling_thread_keeps_its_namespace(destroyer: SockDestroyer, netns: Callable[[], Any]) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    ns = netns()
    spaces = [open_ns(ns.path)]
    try:
        run = destroyer.run([Removal(4, 7, socket.inet_aton("127.0.0.1"), 5001)], spaces)
    finally:
        close_namespaces(spaces)
    assert run.sockets == [] and run.failed_namespaces == []
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_an_object_whose_kfunc_the_kernel_lacks_does_not_load(
    tmp_path: Path, bpf_compile: Callable[[Path, Path], Path]
) -> None:
    """The fallback's trigger, for real: the same source calling a kfunc this kernel does not have
    (what bpf_sock_destroy is before 6.5) fails to load with SockDestroyUnavailable naming it."""
    src = tmp_path / "kproxy_iter_nokfunc.bpf.c"
    root = Path(__file__).resolve().parents[2] / "bpfsrc"
    src.write_text(
        f'#define bpf_sock_destroy kproxy_test_absent_kfunc\n#include "{root}/kproxy_iter.bpf.c"\n'
    )
    obj = bpf_compile(src, tmp_path)
    d = SockDestroyer(None, obj)
    with pytest.raises(SockDestroyUnavailable, match="kproxy_test_absent_kfunc"):
        d.load()
    assert d.obj is None and d.link is None
    assert missing_kernel_feature() is None  # this kernel (>= 6.5) has what the real object needs
    assert lb.vmlinux_btf_has("kproxy_test_absent_kfunc", lb.BTF_KIND_FUNC) is False


MANY = r"""
import json, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("127.0.0.1", 5001))
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", 5001))
    socks.append(s)
cookies = [int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little") for s in socks]
print(json.dumps(cookies), flush=True)
sys.stdin.readline()
aborted = 0
for s in socks:
    try:
        s.recv(100, socket.MSG_DONTWAIT)
    except OSError as e:
        aborted += e.errno == 103  # ECONNABORTED
print(aborted, flush=True)
"""


def test_every_destroyed_socket_is_reported_however_many(
    destroyer: SockDestroyer, netns: Callable[[], Any]
) -> None:
    """1,500 matching sockets: more records (40 bytes each) than the kernel's 32 KiB iterator buffer
    holds, so the output spans reads; every socket is destroyed and every one is reported."""
    n = 1500
    ns = netns()
    proc = subprocess.Popen(
        ["nsenter", f"--net={ns.path}", sys.executable, "-c", MANY, str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        cookies = json.loads(proc.stdout.readline() or "null")
        assert cookies and len(cookies) == n, proc.stderr.read() if proc.stderr else ""
        for c in cookies:
            write_entry(destroyer, c, 4, "127.0.0.1", 5001, 7)
        spaces = [open_ns(ns.path)]
        try:
            run = destroyer.run([Removal(4, 7, socket.inet_aton("127.0.0.1"), 5001)], spaces)
        finally:
            close_namespaces(spaces)
        proc.stdin.write("\n")
        proc.stdin.flush()
        aborted = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert aborted == n
    assert run.destroyed == n and sorted(s.cookie for s in run.sockets) == sorted(cookies)
