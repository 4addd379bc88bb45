"""Connected UDP sockets follow the removal of their backend (socket LB, issue 17).

A one-node dual-stack lab with socket LB on the node's cgroup. Long-lived clients, each one connected UDP
socket sending a datagram every 0.1 s and reading the pod server's answer (it says which pod it is):
in a pod's namespace inside the socket-LB cgroup, and in the node's namespace (IPv4, IPv6, and a
dual-stack socket to the IPv4-mapped ClusterIP). When their backend leaves the Service their socket fails
with ECONNABORTED, the client connects again and reaches the live backend. Sockets that must stay: one
connected to the Service's other backend, one connected to the removed pod through another Service that
keeps it, one connected to the pod's own address (not through any Service).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.bpf.sockdestroy import default_object_path
from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import Host
from kproxy.lab.netns import netns_path
from kproxy.observe.metrics import scrape_value

pytestmark = pytest.mark.root

DEADLINE = 60.0  # generous: only reached when something is wrong

# One connected UDP socket; every 0.1 s a datagram, the answer's pod printed. An error (the socket was
# destroyed: ECONNABORTED) is printed, and the client connects the same socket again.
CLIENT = r"""
import errno, json, select, socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(0.5)
s.connect((addr, port))
n = 0
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0)
    if r and not sys.stdin.readline():
        break
    n += 1
    out = {"n": n}
    try:
        s.send(str(n).encode())
        while True:
            msg = json.loads(s.recv(65536))
            if msg.get("echo") == str(n):
                break
        out["pod"] = msg["pod"]
    except socket.timeout:
        out["timeout"] = True
    except OSError as e:
        out["error"] = errno.errorcode.get(e.errno, str(e.errno))
        try:
            s.connect((addr, port))
            out["reconnected"] = True
        except OSError as e2:
            out["reconnect_error"] = errno.errorcode.get(e2.errno, str(e2.errno))
    print(json.dumps(out), flush=True)
    time.sleep(0.1)
"""


class Client:
    """CLIENT in HOST's namespace, inside CGROUP; its lines in `lines` as they come."""

    def __init__(self, host: Host, cgroup: str, addr: str, port: int, what: str) -> None:
        into_cgroup = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        argv = ["nsenter", f"--net={netns_path(host.ns)}", "sh", "-c", into_cgroup, cgroup,
                sys.executable, "-c", CLIENT, addr, str(port)]  # fmt: skip
        self.what = what
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def wait(self, cond: Callable[[list[dict[str, Any]]], bool], what: str, start: int = 0) -> int:
        """Wait until COND holds for lines[start:]; the number of lines then."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            n = len(self.lines)
            if cond(self.lines[start:n]):
                return n
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"{self.what}: {what}; lines since: {self.lines[start:][-20:]} {err}")

    def first_pod(self) -> str:
        self.wait(lambda ls: any("pod" in x for x in ls), "no answer")
        return str(next(x["pod"] for x in self.lines if "pod" in x))

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*a: Any) -> Client:
        c = Client(*a)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture(scope="module")
def lab(tc_object: Path) -> Iterator[Lab]:
    if not Path(default_object_path()).exists():
        pytest.fail(f"{default_object_path()} is missing: run `make bpf`")
    with Lab(nodes=1, pods_per_node=3, socket_lb=True) as lb:
        yield lb


def metric(lab: Lab, name: str, labels: dict[str, str] | None = None) -> float:
    def get() -> str:
        with urllib.request.urlopen("http://127.0.0.1:10249/metrics", timeout=5) as r:
            return str(r.read().decode())

    return scrape_value(lab.in_ns(lab.nodes[0], get), name, labels) or 0.0


def answers(pod: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda ls: any(x.get("pod") == pod for x in ls)


def test_connected_udp_sockets_follow_their_backend_out_of_the_service(
    lab: Lab, program_dual: Any, clients: Callable[..., Client]
) -> None:
    n1 = lab.node("n1")
    p1, p2 = lab.pod("n1p1"), lab.pod("n1p2")
    vip, vip6 = "10.96.7.1", "fd00:10:96::7:1"
    udp = {"port": 53, "target": 9090, "protocol": "UDP"}
    assert "connected UDP sockets follow their backend's removal" in lab.log("agent-n1")
    # Service A with n1p1 alone: the clients that will see it go all reach n1p1
    program_dual("udp-a", vip, vip6, ["n1p1"], **udp)
    moving = [
        clients(lab.pod("n1p3"), n1.cgroup, vip, 53, "pod n1p3 -> A (IPv4)"),
        clients(n1, n1.cgroup, vip, 53, "node -> A (IPv4)"),
        clients(n1, n1.cgroup, vip6, 53, "node -> A (IPv6)"),
        clients(n1, n1.cgroup, "::ffff:" + vip, 53, "node -> A (dual-stack socket, mapped IPv4)"),
    ]
    for c in moving:
        assert c.first_pod() == "n1p1", c.what
    # Service B keeps n1p1; a socket to n1p1's own address goes through no Service
    program_dual("udp-b", "10.96.7.2", "fd00:10:96::7:2", ["n1p1"], **udp)
    staying = [
        clients(n1, n1.cgroup, "10.96.7.2", 53, "node -> B (n1p1 through a Service that keeps it)"),
        clients(n1, n1.cgroup, p1.ip, 9090, "node -> n1p1's address"),
    ]
    # A gets n1p2 too; a client of A that reaches n1p2 must stay there (random choice: try until one does)
    program_dual("udp-a", vip, vip6, ["n1p1", "n1p2"], **udp)
    for _ in range(40):
        c = clients(n1, n1.cgroup, vip, 53, "node -> A's other backend")
        if c.first_pod() == "n1p2":
            staying.append(c)
            break
        c.close()
    else:
        raise AssertionError("40 connects to A never reached n1p2")
    for c in staying:
        c.first_pod()
    destroyed = {
        f: metric(lab, "kproxy_socket_lb_udp_sockets_destroyed_total", {"family": f})
        for f in ("IPv4", "IPv6")
    }

    # n1p1 leaves A (its pod still runs: a socket left on it would still get answers)
    marks = {id(c): len(c.lines) for c in moving + staying}
    program_dual("udp-a", vip, vip6, ["n1p2"], **udp)
    for c in moving:
        start = marks[id(c)]
        c.wait(lambda ls: any(x.get("error") == "ECONNABORTED" and x.get("reconnected") for x in ls),
               "its socket was not destroyed (no ECONNABORTED)", start)  # fmt: skip
        aborted = start + next(i for i, x in enumerate(c.lines[start:]) if x.get("error"))
        c.wait(answers(p2.name), "no answer from n1p2 after connecting again", aborted)
        after = [x.get("pod") for x in c.lines[aborted + 1 :] if "pod" in x]
        assert set(after) == {"n1p2"}, (c.what, after)
        before = [x.get("pod") for x in c.lines[start:aborted] if "pod" in x]
        assert set(before) <= {"n1p1"}, (c.what, before)
    # the others answered since, from the same pod, and never failed
    for c in staying:
        start = marks[id(c)]
        pod = c.first_pod()
        n = c.wait(answers(pod), "no answer after the removal", len(c.lines))
        since = c.lines[start:n]
        assert not [x for x in since if "error" in x], (c.what, since)
        assert {x["pod"] for x in since if "pod" in x} == {pod}, (c.what, since)
    # counted once the run that destroyed them is done (the clients may see it first)
    for family, more in (("IPv4", 3), ("IPv6", 1)):  # IPv4: the pod's, the node's and the mapped one
        deadline = time.monotonic() + DEADLINE
        name = "kproxy_socket_lb_udp_sockets_destroyed_total"
        while metric(lab, name, {"family": family}) < destroyed[family] + more:
            assert time.monotonic() < deadline, (family, metric(lab, name, {"family": family}), destroyed)
            time.sleep(0.1)


WARNING = "connected UDP sockets are NOT moved"


def test_without_bpf_sock_destroy_the_agent_says_so_once_and_counts(
    tc_object: Path, tmp_path: Path, bpf_compile: Callable[[Path, Path], Path], clients: Callable[..., Client]
) -> None:
    """The fallback, with a real load failure: an iterator object calling a kfunc this kernel does not have
    (as bpf_sock_destroy is missing before Linux 6.5). The agent runs, warns once, counts each removal it
    could not act on; the connected socket keeps its backend."""
    src = tmp_path / "kproxy_iter_nokfunc.bpf.c"
    real = Path(__file__).resolve().parents[2] / "bpfsrc" / "kproxy_iter.bpf.c"
    src.write_text(f'#define bpf_sock_destroy kproxy_test_absent_kfunc\n#include "{real}"\n')
    args = ["--socket-lb-iter-object", str(bpf_compile(src, tmp_path))]
    with Lab(nodes=1, pods_per_node=2, socket_lb=True, agent_args=args) as lb:
        n1 = lb.node("n1")
        warned = [ln for ln in lb.log("agent-n1").splitlines() if WARNING in ln]
        assert len(warned) == 1 and "kproxy_test_absent_kfunc" in warned[0], warned

        def put(pods: list[str]) -> None:
            p = mf.Port(name="p", port=53, target=9090, protocol="UDP")
            eps = [(lb.pod(n).ip, lb.pod(n).node) for n in pods]
            lb.write_manifest(
                "udp-fb", [mf.service("udp-fb", [p], "10.96.7.9"), mf.endpoint_slice("udp-fb", eps, [p])]
            )
            lb.wait_programmed("10.96.7.9", 53, [lb.pod(n).ip for n in pods], "UDP")

        put(["n1p1"])
        c = clients(n1, n1.cgroup, "10.96.7.9", 53, "node -> fallback Service")
        assert c.first_pod() == "n1p1"
        start = len(c.lines)
        put(["n1p2"])
        deadline = time.monotonic() + DEADLINE
        while metric(lb, "kproxy_socket_lb_udp_removals_unhandled_total", {"reason": "unsupported"}) < 1:
            assert time.monotonic() < deadline, "the removal was not counted as unhandled"
            time.sleep(0.1)
        n = c.wait(answers("n1p1"), "no answer after the removal", len(c.lines))
        assert not [x for x in c.lines[start:n] if "error" in x]  # nothing destroyed it: it stays on n1p1
        assert len([ln for ln in lb.log("agent-n1").splitlines() if WARNING in ln]) == 1
