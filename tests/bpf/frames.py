"""Frame builder and checksum verifier for the PROG_TEST_RUN tables.

Builds Ethernet / IPv4 (optionally with options) / TCP | UDP | ICMP frames with correct checksums,
and checks the checksums of frames the programs hand back. Pure Python, no root needed.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_HLEN = 14

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

IP_MF = 0x2000
IP_DF = 0x4000

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

POD_MAC = bytes.fromhex("020000000001")
HOST_MAC = bytes.fromhex("020000000002")

# A realistic SYN option block: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
SYN_OPTIONS = bytes.fromhex("020405b40402080a0001e2400000000001030307")


def addr(text: str) -> bytes:
    return socket.inet_aton(text)


def csum(data: bytes) -> int:
    """RFC 1071 Internet checksum of `data` (the value to store, already inverted)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ones_sum_ok(data: bytes) -> bool:
    """True if `data` (checksum field included) sums to 0xffff: its checksum is valid."""
    return csum(data) == 0


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ether(payload: bytes, ethertype: int = ETH_P_IP, dst: bytes = HOST_MAC, src: bytes = POD_MAC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    options: bytes = b"",
    ttl: int = 64,
    ident: int = 0x1234,
    tos: int = 0,
    flags_frag: int = IP_DF,
    tot_len: int | None = None,
) -> bytes:
    """IPv4 header (with `options`, padded to 4 bytes) + payload, with a valid header checksum."""
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)
    ihl = 5 + len(options) // 4
    length = tot_len if tot_len is not None else ihl * 4 + len(payload)
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, tos, length, ident, flags_frag, ttl, proto, 0, addr(src), addr(dst)
    )
    hdr += options
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: int = TCP_SYN,
    *,
    seq: int = 1000,
    ack: int = 0,
    window: int = 64240,
    options: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    """TCP segment with a valid checksum for the (src, dst) pseudo-header."""
    if len(options) % 4:
        options += b"\x01" * (4 - len(options) % 4)
    doff = 5 + len(options) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0) + options
    seg = hdr + payload
    c = csum(pseudo_header(addr(src), addr(dst), IPPROTO_TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *, checksum: bool = True) -> bytes:
    """UDP datagram; checksum=False leaves the field 0 ("no checksum", legal in IPv4)."""
    length = 8 + len(payload)
    dgram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if not checksum:
        return dgram
    c = csum(pseudo_header(addr(src), addr(dst), IPPROTO_UDP, length) + dgram) or 0xFFFF
    return dgram[:6] + struct.pack("!H", c) + dgram[8:]


def icmp(icmp_type: int, code: int, rest: int = 0, payload: bytes = b"") -> bytes:
    msg = struct.pack("!BBHI", icmp_type, code, 0, rest) + payload
    return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]


def tcp_frame(
    src: str, dst: str, sport: int, dport: int, flags: int = TCP_SYN, *, ip_options: bytes = b"", **kw: object
) -> bytes:
    """Ethernet + IPv4 + TCP; keyword arguments go to tcp()."""
    return ether(ipv4(src, dst, IPPROTO_TCP, tcp(src, dst, sport, dport, flags, **kw), options=ip_options))  # type: ignore[arg-type]


def udp_frame(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"hello",
    *,
    checksum: bool = True,
    ip_options: bytes = b"",
) -> bytes:
    return ether(
        ipv4(
            src, dst, IPPROTO_UDP, udp(src, dst, sport, dport, payload, checksum=checksum), options=ip_options
        )
    )


def swap_macs(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


# ---- parsing and verification of output frames ----
@dataclass
class Parsed:
    ethertype: int
    ihl: int = 0
    proto: int = 0
    src: str = ""
    dst: str = ""
    sport: int = 0
    dport: int = 0
    ttl: int = 0
    l3: bytes = b""  # IPv4 header
    l4: bytes = b""  # everything after the IPv4 header, up to tot_len


def parse(frame: bytes) -> Parsed:
    (ethertype,) = struct.unpack("!H", frame[12:14])
    p = Parsed(ethertype)
    if ethertype != ETH_P_IP:
        return p
    ip = frame[ETH_HLEN:]
    p.ihl = (ip[0] & 0x0F) * 4
    (tot_len,) = struct.unpack("!H", ip[2:4])
    p.ttl, p.proto = ip[8], ip[9]
    p.src, p.dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    p.l3 = ip[: p.ihl]
    p.l4 = ip[p.ihl : tot_len]
    if p.proto in (IPPROTO_TCP, IPPROTO_UDP):
        p.sport, p.dport = struct.unpack("!HH", p.l4[:4])
    return p


def checksum_errors(frame: bytes) -> list[str]:
    """Recompute the IPv4 header checksum and the TCP, UDP or ICMP checksum of `frame`.

    For an ICMP error, the quoted IPv4 header's checksum is checked too. Returns what is wrong
    (an empty list for a good frame)."""
    p = parse(frame)
    if p.ethertype != ETH_P_IP:
        return []
    errors = []
    if not ones_sum_ok(p.l3):
        errors.append(f"IPv4 header checksum wrong: {p.l3[10:12].hex()}")
    src, dst = p.l3[12:16], p.l3[16:20]
    if p.proto == IPPROTO_TCP:
        if not ones_sum_ok(pseudo_header(src, dst, IPPROTO_TCP, len(p.l4)) + p.l4):
            errors.append(f"TCP checksum wrong: {p.l4[16:18].hex()}")
    elif p.proto == IPPROTO_UDP:
        if p.l4[6:8] != b"\0\0" and not ones_sum_ok(pseudo_header(src, dst, IPPROTO_UDP, len(p.l4)) + p.l4):
            errors.append(f"UDP checksum wrong: {p.l4[6:8].hex()}")
    elif p.proto == IPPROTO_ICMP:
        if not ones_sum_ok(p.l4):
            errors.append(f"ICMP checksum wrong: {p.l4[2:4].hex()}")
        if p.l4[0] in (3, 11) and len(p.l4) >= 28:
            inner = p.l4[8:]
            inner_ihl = (inner[0] & 0x0F) * 4
            if not ones_sum_ok(inner[:inner_ihl]):
                errors.append(f"quoted IPv4 header checksum wrong: {inner[10:12].hex()}")
    return errors
