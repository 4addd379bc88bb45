"""IPv6 frame builder and checksum verifier for the PROG_TEST_RUN tables (frames.py's twin).

Ethernet / IPv6 (optionally with extension headers) / TCP | UDP | ICMPv6 with correct checksums, and a
parser that walks extension headers to check the frames the programs hand back. Pure Python.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from frames import ETH_HLEN, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_SYN, csum, ether

IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60

ICMP6_DEST_UNREACH = 1
ICMP6_PORT_UNREACH = 4
ICMP6_PKT_TOOBIG = 2
ICMP6_TIME_EXCEED = 3
ICMP6_ECHO_REQUEST = 128
ICMP6_NEIGHBOR_SOLICIT = 135
ICMP6_NEIGHBOR_ADVERT = 136

EXT_HEADERS = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT)


def addr6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def pseudo6(src: str, dst: str, proto: int, length: int) -> bytes:
    return addr6(src) + addr6(dst) + struct.pack("!I3xB", length, proto)


def ext(nexthdr_kind: int, length_units: int = 0, fill: int = 0) -> tuple[int, bytes]:
    """An extension header of kind `nexthdr_kind` (hop-by-hop, routing, destination options) with
    (length_units + 1) * 8 bytes; its next-header byte is filled in by ipv6()."""
    body = bytes([0, length_units]) + bytes([fill]) * ((length_units + 1) * 8 - 2)
    if nexthdr_kind == IPPROTO_ROUTING:
        # type 4 (segment routing) with segments left 0: nothing for a router on the way to do
        body = bytes([0, length_units, 4, 0]) + bytes((length_units + 1) * 8 - 4)
    return nexthdr_kind, body


def frag_hdr(offset: int = 0, more: bool = False, ident: int = 0x1234) -> tuple[int, bytes]:
    return IPPROTO_FRAGMENT, struct.pack("!BBHI", 0, 0, (offset << 3) | int(more), ident)


def ipv6(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    exts: list[tuple[int, bytes]] | None = None,
    hop_limit: int = 64,
    payload_len: int | None = None,
) -> bytes:
    """IPv6 header + extension headers (chained in order, the last pointing at `proto`) + payload."""
    exts = exts or []
    chain = b""
    for i, (_kind, body) in enumerate(exts):
        nxt = exts[i + 1][0] if i + 1 < len(exts) else proto
        chain += bytes([nxt]) + body[1:]
    first = exts[0][0] if exts else proto
    plen = payload_len if payload_len is not None else len(chain) + len(payload)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, plen, first, hop_limit, addr6(src), addr6(dst))
    return hdr + chain + payload


def tcp6(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: int = TCP_SYN,
    *,
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
    options: bytes = b"",
) -> bytes:
    """A TCP segment with a correct IPv6 checksum; `options` padded to 32-bit words by the caller."""
    doff = 5 + len(options) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 64240, 0, 0) + options
    seg = hdr + payload
    c = csum(pseudo6(src, dst, IPPROTO_TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello") -> bytes:
    length = 8 + len(payload)
    dgram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    c = csum(pseudo6(src, dst, IPPROTO_UDP, length) + dgram) or 0xFFFF
    return dgram[:6] + struct.pack("!H", c) + dgram[8:]


def icmp6(src: str, dst: str, icmp_type: int, code: int, rest: int = 0, payload: bytes = b"") -> bytes:
    msg = struct.pack("!BBHI", icmp_type, code, 0, rest) + payload
    c = csum(pseudo6(src, dst, IPPROTO_ICMPV6, len(msg)) + msg)
    return msg[:2] + struct.pack("!H", c) + msg[4:]


def tcp6_frame(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: int = TCP_SYN,
    *,
    exts: list[tuple[int, bytes]] | None = None,
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
) -> bytes:
    seg = tcp6(src, dst, sport, dport, flags, seq=seq, ack=ack, payload=payload)
    return ether(ipv6(src, dst, IPPROTO_TCP, seg, exts=exts), ETH_P_IPV6)


def udp6_frame(src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello", **kw: object) -> bytes:
    return ether(ipv6(src, dst, IPPROTO_UDP, udp6(src, dst, sport, dport, payload), **kw), ETH_P_IPV6)  # type: ignore[arg-type]


def icmp6_frame(src: str, dst: str, icmp_type: int, code: int, rest: int = 0, quote: bytes = b"") -> bytes:
    """An Ethernet frame carrying an ICMPv6 message (an error quoting `quote`) from src to dst."""
    return ether(ipv6(src, dst, IPPROTO_ICMPV6, icmp6(src, dst, icmp_type, code, rest, quote)), ETH_P_IPV6)


def ext_chain(exts: list[tuple[int, bytes]], proto: int) -> tuple[int, bytes]:
    """(first next-header value, bytes) of extension headers chained in order, the last naming proto."""
    chain = b""
    for i, (_kind, body) in enumerate(exts):
        nxt = exts[i + 1][0] if i + 1 < len(exts) else proto
        chain += bytes([nxt]) + body[1:]
    return (exts[0][0] if exts else proto), chain


def fragments6(
    src: str,
    dst: str,
    proto: int,
    upper: bytes,
    *,
    ident: int = 0x4242,
    mtu: int = 1280,
    unfragmentable: list[tuple[int, bytes]] | None = None,
    fragmentable: list[tuple[int, bytes]] | None = None,
) -> list[bytes]:
    """Ethernet frames of the IPv6 datagram carrying `upper` (the L4 message), fragmented as Linux's
    ip6_fragment does for `mtu`: the unfragmentable extension headers repeated in every fragment, then
    the fragment header, then a slice of the fragmentable part (its extension headers, e.g. destination
    options, and the upper-layer message)."""
    unfrag = unfragmentable or []
    first, chain = ext_chain(fragmentable or [], proto)
    part = chain + upper
    _, unfrag_bytes = ext_chain(unfrag, IPPROTO_FRAGMENT)
    step = (mtu - 40 - len(unfrag_bytes) - 8) // 8 * 8
    out = []
    for off in range(0, len(part), step):
        more = off + step < len(part)
        exts = [*unfrag, frag_hdr(off // 8, more, ident)]
        out.append(ether(ipv6(src, dst, first, part[off : off + step], exts=exts), ETH_P_IPV6))
    return out


def reassemble6(frames: list[bytes]) -> tuple[str, str, bytes]:
    """(source, destination, fragmentable part) of the fragments of one IPv6 datagram, in order."""
    srcs, dsts, body = set(), set(), b""
    for f in frames:
        ip = f[ETH_HLEN:]
        (plen,) = struct.unpack("!H", ip[4:6])
        nxt, off = ip[6], 40
        while nxt != IPPROTO_FRAGMENT:
            assert nxt in EXT_HEADERS, f"no fragment header in {f.hex()}"
            nxt, off = ip[off], off + (ip[off + 1] + 1) * 8
        (frag_off,) = struct.unpack("!H", ip[off + 2 : off + 4])
        assert frag_off >> 3 == len(body) // 8, "fragments out of order"
        body += ip[off + 8 : 40 + plen]
        srcs.add(ip[8:24])
        dsts.add(ip[24:40])
    assert len(srcs) == len(dsts) == 1, "fragments of one datagram disagree on its addresses"
    return socket.inet_ntop(socket.AF_INET6, srcs.pop()), socket.inet_ntop(socket.AF_INET6, dsts.pop()), body


@dataclass
class Parsed6:
    ethertype: int
    proto: int = -1
    src: str = ""
    dst: str = ""
    sport: int = 0
    dport: int = 0
    hop_limit: int = 0
    l4_off: int = 0  # from the start of the IPv6 header
    l4: bytes = b""  # the upper-layer message, to the end of the payload
    icmp_type: int = -1
    icmp_code: int = -1


def parse6(frame: bytes) -> Parsed6:
    (ethertype,) = struct.unpack("!H", frame[12:14])
    p = Parsed6(ethertype)
    if ethertype != ETH_P_IPV6:
        return p
    ip = frame[ETH_HLEN:]
    (plen,) = struct.unpack("!H", ip[4:6])
    nxt, p.hop_limit = ip[6], ip[7]
    p.src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
    p.dst = socket.inet_ntop(socket.AF_INET6, ip[24:40])
    off = 40
    while nxt in EXT_HEADERS:
        if nxt == IPPROTO_FRAGMENT:
            nxt, off = ip[off], off + 8
        else:
            nxt, off = ip[off], off + (ip[off + 1] + 1) * 8
    p.proto, p.l4_off = nxt, off
    p.l4 = ip[off : 40 + plen]
    if nxt in (IPPROTO_TCP, IPPROTO_UDP):
        p.sport, p.dport = struct.unpack("!HH", p.l4[:4])
    elif nxt == IPPROTO_ICMPV6:
        p.icmp_type, p.icmp_code = p.l4[0], p.l4[1]
    return p


def checksum_errors6(frame: bytes) -> list[str]:
    """What is wrong with the TCP, UDP or ICMPv6 checksum of an IPv6 frame (empty: nothing)."""
    p = parse6(frame)
    if p.ethertype != ETH_P_IPV6:
        return []
    ph = pseudo6(p.src, p.dst, p.proto, len(p.l4))
    if p.proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6) and csum(ph + p.l4) != 0:
        return [f"protocol {p.proto} checksum wrong"]
    return []
