"""SCTP Services with real packets through the lab (issue 17).

This kernel has no SCTP module (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails), but raw IP sockets of
protocol 132 work without it: the client sends hand-built SCTP packets with a real CRC32c
(kproxy.lab.sctp) and the kernel puts the IP header in front; a raw socket in the backend pod receives
them. A raw socket bound to the protocol also keeps the kernel from answering protocol unreachable.

Lab: nodes n1 and n2, pods n1p1 n1p2 n2p1 n2p2, the external client `ext` (its routes reach n1). The
client pod n1p2 reaches the ClusterIP; the backend n2p1 is on the other node, so the INIT crosses the LAN
DNATed by n1's kp_from_pod and its INIT ACK is reverse-NATed by n1's kp_to_pod. The external client
reaches n1's NodePort, SNATed to n2p1 by kp_from_netdev's SCTP program (kp_netdev_sctp4); the answer is
translated back by it too. Every agent runs with socket LB on (its own child cgroup), which leaves SCTP
to TC: the TC programs still serve it.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kproxy.lab import Lab, sctp
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import Host

pytestmark = pytest.mark.root

CLUSTER_IP, EMPTY_IP, NODE_PORT = "10.96.60.1", "10.96.60.2", 31600
CLUSTER_IP6 = "fd00:10:96::6:1"
PORT, TARGET = 9000, 9999  # targetPort differs from port: the CRC must follow the rewrite
PORTS = [mf.Port("s", PORT, TARGET, "SCTP", NODE_PORT)]
ITAG, ITAG_BACK = 0x0BADCAFE, 0x5EC0DE11


@pytest.fixture(scope="module")
def slab(tc_object: Path) -> Iterator[Lab]:
    with Lab(nodes=2, pods_per_node=2, socket_lb=True) as lab:
        be = lab.pod("n2p1")
        svc = mf.service("sctp", PORTS, CLUSTER_IP, type="NodePort", cluster_ip6=CLUSTER_IP6)
        slices = mf.endpoint_slices("sctp", [(be.ip, be.node), (be.ip6, be.node)], PORTS)
        lab.write_manifest("sctp", [svc, *slices])
        empty = mf.service("empty", [mf.Port("s", PORT, TARGET, "SCTP")], EMPTY_IP)
        lab.write_manifest(
            "empty", [empty, mf.endpoint_slice("empty", [], [mf.Port("s", PORT, TARGET, "SCTP")])]
        )
        lab.wait_programmed(CLUSTER_IP, PORT, [be.ip], protocol="SCTP")
        lab.wait_programmed(CLUSTER_IP6, PORT, [be.ip6], protocol="SCTP")
        lab.wait_programmed(EMPTY_IP, PORT, [], protocol="SCTP")
        yield lab


def raw(lab: Lab, host: Host, proto: int = sctp.IPPROTO_SCTP, family: int = socket.AF_INET) -> socket.socket:
    """A raw socket of `proto` in HOST's namespace (it stays there)."""
    return lab.in_ns(host, lambda: socket.socket(family, socket.SOCK_RAW, proto))


def receive(
    s: socket.socket, match: Callable[[str, bytes], bool], timeout: float = 10.0
) -> tuple[str, bytes]:
    """The first packet on raw socket s whose (source, payload after the IP header) matches. An IPv4 raw
    socket reads the IP header too, an IPv6 one the payload only."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        data, peer = s.recvfrom(65535)
        if s.family == socket.AF_INET6:
            src, payload = ipaddress.IPv6Address(peer[0]).compressed, data
        else:
            ihl = (data[0] & 0x0F) * 4
            (tot_len,) = struct.unpack("!H", data[2:4])
            src, payload = socket.inet_ntoa(data[12:16]), data[ihl:tot_len]
        if match(src, payload):
            return src, payload
    raise AssertionError("no matching packet arrived")


def ports(pkt: bytes) -> tuple[int, int]:
    return struct.unpack("!HH", pkt[:4])  # type: ignore[return-value]


def quoted_ports(icmp_msg: bytes) -> tuple[int, int]:
    """The ports of the packet an ICMPv4 error quotes (its IP header, then the L4 header)."""
    inner = icmp_msg[8:]
    return ports(inner[(inner[0] & 0x0F) * 4 :])


def association(lab: Lab, client: Host, dst: str, dport: int, cport: int) -> tuple[str, int]:
    """INIT from client to dst:dport, seen by the backend n2p1 at TARGET with a valid CRC; its INIT ACK
    seen by the client from dst:dport with a valid CRC. Returns the source the backend saw. Each call's
    initiate tag is its own (ITAG ^ cport): a late INIT of an earlier call (a retry that waited for a
    neighbour) is never taken for this one's, whose source port SNAT may have changed."""
    be = lab.pod("n2p1")
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    itag = ITAG ^ cport
    with raw(lab, be, family=fam) as srv, raw(lab, client, family=fam) as cli:
        init = sctp.packet(cport, dport, 0, sctp.init_chunk(itag=itag))
        for _ in range(3):  # the first may meet an unresolved neighbour
            cli.sendto(init, (dst, 0))
            try:
                src, got = receive(
                    srv,
                    lambda _s, p: (
                        p[4:8] == b"\0\0\0\0" and p[12] == sctp.INIT and p[16:20] == struct.pack("!I", itag)
                    ),
                    3.0,
                )
                break
            except AssertionError:
                continue
        else:
            raise AssertionError(f"the backend never saw the INIT to {dst}:{dport}")
        sport, bport = ports(got)
        assert bport == TARGET, f"backend saw destination port {bport}"
        assert sctp.crc_valid(got), f"CRC32c {sctp.checksum_field(got):#x} invalid at the backend"
        # the backend answers whoever it saw, with the client's tag
        srv.sendto(sctp.packet(TARGET, sport, itag, sctp.init_ack_chunk(itag=ITAG_BACK)), (src, 0))
        rsrc, reply = receive(cli, lambda _s, p: p[12] == sctp.INIT_ACK and p[4:8] == struct.pack("!I", itag))
        assert (rsrc, ports(reply)) == (ipaddress.ip_address(dst).compressed, (dport, cport))
        assert sctp.crc_valid(reply), f"CRC32c {sctp.checksum_field(reply):#x} invalid at the client"
        return src, sport


def test_cluster_ip_init_and_init_ack(slab: Lab) -> None:
    client = slab.pod("n1p2")
    src, sport = association(slab, client, CLUSTER_IP, PORT, 40001)
    assert (src, sport) == (client.ip, 40001)  # a pod client keeps its address and port
    # the CLI shows the association (and the Service) as SCTP
    bpffs = slab.node("n1").bpffs
    out = subprocess.run([sys.executable, "-m", "kproxy", "conntrack", "--bpffs", bpffs, "-o", "json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    (flow,) = [r for r in json.loads(out.stdout) if r["src"] == f"{client.ip}:40001"]
    assert (flow["dst"], flow["nat"], flow["protocol"], flow["state"]) == (
        f"{CLUSTER_IP}:{PORT}", f"{slab.pod('n2p1').ip}:{TARGET}", "SCTP", "ESTABLISHED",
    )  # fmt: skip
    assert 0 < flow["seconds_left"] <= 210
    out = subprocess.run([sys.executable, "-m", "kproxy", "services", "--bpffs", bpffs, "-o", "json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert any(r.get("protocol") == "SCTP" for r in json.loads(out.stdout)), out.stdout


def test_nodeport_from_outside_is_snated(slab: Lab) -> None:
    n1 = slab.node("n1")
    src, sport = association(slab, slab.ext, n1.ip, NODE_PORT, 40002)
    assert src == n1.ip  # SNATed to the ingress node's address (a port of its SNAT range)


def test_ipv6_cluster_ip_and_nodeport(slab: Lab) -> None:
    client = slab.pod("n1p2")
    src, sport = association(slab, client, CLUSTER_IP6, PORT, 40004)
    assert (src, sport) == (ipaddress.IPv6Address(client.ip6).compressed, 40004)
    n1 = slab.node("n1")
    src, _ = association(slab, slab.ext, n1.ip6, NODE_PORT, 40005)
    assert src == ipaddress.IPv6Address(n1.ip6).compressed  # SNATed to the ingress node's IPv6 address


def test_no_endpoints_is_port_unreachable(slab: Lab) -> None:
    client = slab.pod("n1p2")
    with raw(slab, client, socket.IPPROTO_ICMP) as icmp, raw(slab, client) as cli:
        cli.sendto(sctp.packet(40003, PORT, 0, sctp.init_chunk(itag=ITAG)), (EMPTY_IP, 0))
        # this INIT's error only: the quote (IP header, then SCTP) names its ports
        src, msg = receive(
            icmp, lambda _s, p: p[0] == 3 and len(p) >= 8 + 20 + 4 and quoted_ports(p) == (40003, PORT)
        )
        assert (src, msg[0], msg[1]) == (EMPTY_IP, 3, 3)  # destination unreachable, port unreachable
        assert msg[8 + 9] == sctp.IPPROTO_SCTP
