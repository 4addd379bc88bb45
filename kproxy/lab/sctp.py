"""SCTP packets by hand (RFC 9260) and the CRC32c arithmetic kproxy's TC programs use on them.

The SCTP checksum is CRC32c (Castagnoli) over the whole SCTP packet with its checksum field zero, stored
little-endian (Linux: ``sctp_compute_cksum()`` returns ``cpu_to_le32(~crc)``). CRC is linear over GF(2):
for two packets of the same length L, ``crc(M') = crc(M) ^ crc0(M ^ M')``, where crc0 is the CRC with zero
initial value and no final xor. When only the ports change, ``M ^ M'`` is 4 bytes ``d`` followed by L - 4
zero bytes, and ``crc0(d || 0^(L-4)) = d * x^(8L) mod P`` in the reflected representation (bit 31 is x^0).
x^(8L) comes from a table of x^(8 * 2^k) mod P by square-and-multiply: O(log L) carry-less products of
32 steps each, no pass over the packet. bpfsrc/lib/sctp.h does the same in BPF; this module is its proof
(tests/unit/test_sctp_crc.py) and builds the SCTP frames the tests send.
"""

from __future__ import annotations

import struct

IPPROTO_SCTP = 132
CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial
X0 = 0x80000000  # the polynomial 1 (x^0) in the reflected representation

# chunk types (RFC 9260 section 3.2)
INIT = 1
INIT_ACK = 2
ABORT = 6
SHUTDOWN = 7
SHUTDOWN_ACK = 8
COOKIE_ECHO = 10
COOKIE_ACK = 11
SHUTDOWN_COMPLETE = 14


def crc32c(data: bytes, crc: int = 0) -> int:
    """The standard CRC32c of data (bitwise, no table): init and final xor 0xFFFFFFFF."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC32C_POLY if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def gf2_mul(a: int, b: int) -> int:
    """a * b mod P, both reflected 32-bit polynomials (bit 31 = x^0). 32 steps, as the BPF loop."""
    p = 0
    for i in range(32):
        if a & (X0 >> i):
            p ^= b
        b = (b >> 1) ^ (CRC32C_POLY if b & 1 else 0)
    return p


def x8_table(n: int = 16) -> list[int]:
    """x^(8 * 2^k) mod P for k in 0..n-1 (k = 16 would cover L = 64 KiB)."""
    t = []
    x = gf2_mul(X0 >> 8, X0)  # x^8
    for _ in range(n):
        t.append(x)
        x = gf2_mul(x, x)
    return t


X8_TABLE = x8_table()


def x8n(length: int) -> int:
    """x^(8 * length) mod P by square-and-multiply over the table (length < 2^16)."""
    assert 0 <= length < 1 << len(X8_TABLE)
    p = X0
    for k, power in enumerate(X8_TABLE):
        if length >> k & 1:
            p = gf2_mul(power, p)
    return p


def crc_ports_delta(d: int, length: int) -> int:
    """What the CRC32c of an L-byte packet changes by when its first 4 bytes change by d (little-endian
    word of the xor of old and new bytes 0..3)."""
    return gf2_mul(d, x8n(length))


def checksum_field(packet: bytes) -> int:
    """The checksum field as the kernel stores it: little-endian, read as the CRC value itself."""
    return int(struct.unpack_from("<I", packet, 8)[0])


def with_checksum(packet: bytes) -> bytes:
    """packet (common header first) with its CRC32c computed over the packet with the field zero."""
    zeroed = packet[:8] + b"\0\0\0\0" + packet[12:]
    return packet[:8] + struct.pack("<I", crc32c(zeroed)) + packet[12:]


def crc_valid(packet: bytes) -> bool:
    return checksum_field(with_checksum(packet)) == checksum_field(packet)


def chunk(ctype: int, value: bytes = b"", flags: int = 0) -> bytes:
    """One chunk, padded to 4 bytes (the length field does not count the padding)."""
    body = struct.pack("!BBH", ctype, flags, 4 + len(value)) + value
    return body + b"\0" * (-len(body) % 4)


def init_chunk(itag: int = 0x11223344, a_rwnd: int = 65535, streams: int = 1, tsn: int = 1) -> bytes:
    return chunk(INIT, struct.pack("!IIHHI", itag, a_rwnd, streams, streams, tsn))


def init_ack_chunk(itag: int = 0x55667788, a_rwnd: int = 65535, streams: int = 1, tsn: int = 1) -> bytes:
    # a state cookie parameter (type 7) is mandatory in INIT ACK
    cookie = struct.pack("!HH", 7, 8) + b"kpck"
    return chunk(INIT_ACK, struct.pack("!IIHHI", itag, a_rwnd, streams, streams, tsn) + cookie)


def packet(sport: int, dport: int, vtag: int, chunks: bytes, checksum: bool = True) -> bytes:
    """An SCTP packet (common header + chunks) with a real CRC32c, or checksum 0 (what a local stack
    sends under CHECKSUM_PARTIAL, filled in later by the NIC or the kernel)."""
    pkt = struct.pack("!HHII", sport, dport, vtag, 0) + chunks
    return with_checksum(pkt) if checksum else pkt


def first_chunk_type(pkt: bytes) -> int:
    return pkt[12] if len(pkt) > 12 else -1
