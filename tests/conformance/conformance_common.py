"""What both conformance modules describe their cases with: the lab's addresses and pods by role, the
pod servers' ports, and a Service port and an EndpointSlice endpoint as the tables write them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kproxy import abi
from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab.cluster import LAN_PREFIX

N1_IP = f"{LAN_PREFIX}.11"  # the ingress node of every external client
N2_IP = f"{LAN_PREFIX}.12"
# Lab pods by role (conftest.py): C the client pod, L* on the ingress node n1, R* on n2.
C, L1, L2, L3, L4, R1, R2, R3 = "n1p1", "n1p2", "n1p3", "n1p4", "n1p5", "n2p1", "n2p2", "n2p3"
P = 8080  # the pod servers' first port (upstream's endpoint ports 80, 53, 9376, 8090)
Q = 9090  # their second port (upstream's "different target port": 8443, 5353)


@dataclass(frozen=True)
class Port:
    """A Service port; `target` is the pod servers' port it maps to."""

    name: str
    port: int = 80
    target: int = P
    protocol: str = "TCP"
    node_port: int | None = None


@dataclass(frozen=True)
class Ep:
    """One EndpointSlice endpoint as the controller writes it for a lab pod: the pod's address, its
    node as nodeName unless `node` says otherwise."""

    pod: str
    node: str | None = None
    ready: bool = True
    serving: bool | None = None
    terminating: bool | None = None


def counters(lab: Lab, node: str) -> dict[str, int]:
    """NODE's datapath counters (packets), by kp_stat name."""
    with KproxyMaps.open(lab.node(node).bpffs) as m:
        totals = m.stat_totals()
    return {s.name: (totals.get(int(s)) or (0, 0))[0] for s in abi.Stat}


def quiet_counters(lab: Lab, timeout: float = 3.0) -> dict[str, dict[str, int]]:
    """Both nodes' counters once the packets of earlier connections (late FINs and ACKs) stopped moving
    them, so what moves next is the next connection's doing."""
    deadline = time.monotonic() + timeout
    prev = {n: counters(lab, n) for n in ("n1", "n2")}
    while True:
        time.sleep(0.2)
        now = {n: counters(lab, n) for n in ("n1", "n2")}
        if now == prev or time.monotonic() > deadline:
            return now
        prev = now


# ---- the client of both suites ----
# One function for every client, run in-process (in a namespace) or, for node processes that must be in
# the socket-LB cgroup, as a script in a child process.
CLIENT = r"""
import errno, json, socket, sys, time

KINDS = {"TCP": (socket.SOCK_STREAM, 0), "UDP": (socket.SOCK_DGRAM, 0), "SCTP": (socket.SOCK_STREAM, 132)}


def attempt(addr, port, proto, timeout, bind=None):
    kind, number = KINDS[proto]
    s = socket.socket(socket.AF_INET, kind, number)
    s.settimeout(timeout)
    t0 = time.monotonic()
    try:
        if bind:
            s.bind((bind, 0))
        s.connect((addr, port))
        if proto == "UDP":
            s.send(b"ping")
            buf = s.recv(65536)
        else:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "closed before the greeting")
                buf += chunk
        peer = s.getpeername()
        return dict(json.loads(buf), outcome="ok", peer="%s:%d" % peer, secs=time.monotonic() - t0)
    except OSError as e:
        if isinstance(e, (TimeoutError, socket.timeout)):
            outcome = "timeout"
        elif e.errno == errno.ECONNREFUSED:
            outcome = "refused"
        elif e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            outcome = "unreachable"
        else:
            outcome = "error"
        return {"outcome": outcome, "error": str(e), "secs": time.monotonic() - t0}
    finally:
        s.close()


def attempts(addr, port, proto, timeout, bind=None, want=None, tries=1, min_tries=1):
    out = []
    want = set(want or ())
    for _ in range(tries):
        r = attempt(addr, port, proto, timeout, bind)
        out.append(r)
        if r["outcome"] != "ok":
            break
        seen = {"%s:%d" % (x["pod"], x["port"]) for x in out}
        if len(out) >= min_tries and want <= seen:
            break
    return out


if __name__ == "__main__":
    print(json.dumps(attempts(**json.loads(sys.argv[1]))))
"""
_client: dict[str, Any] = {}
exec(compile(CLIENT, "<conformance client>", "exec"), _client)
# in-process: one connection -> {"outcome": ok|timeout|refused|unreachable|error, ...the greeting}
attempt: Callable[..., dict[str, Any]] = _client["attempt"]
client_attempts: Callable[..., list[dict[str, Any]]] = _client["attempts"]  # tries until WANT seen
