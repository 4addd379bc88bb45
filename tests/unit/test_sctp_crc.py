"""The CRC32c arithmetic of lib/sctp.h (kproxy.lab.sctp mirrors it) against a plain bitwise CRC32c."""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path

import pytest

from kproxy.lab import sctp

SCTP_H = Path(__file__).resolve().parents[2] / "bpfsrc" / "lib" / "sctp.h"


def test_crc32c_vectors() -> None:
    assert sctp.crc32c(b"123456789") == 0xE3069283
    assert sctp.crc32c(bytes(32)) == 0x8A9136AA
    assert sctp.crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4


@pytest.mark.parametrize("seed", range(8))
def test_incremental_port_update_equals_full_recomputation(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        length = rng.choice([16, 17, 64, 255, 256, 1000, 1480, 9000, 65515, rng.randrange(16, 65535)])
        pkt = sctp.with_checksum(rng.randbytes(length))
        which = rng.choice(["sport", "dport", "both"])
        new = bytearray(pkt)
        if which in ("sport", "both"):
            new[0:2] = rng.randbytes(2)
        if which in ("dport", "both"):
            new[2:4] = rng.randbytes(2)
        (d,) = struct.unpack("<I", bytes(a ^ b for a, b in zip(pkt[:4], new[:4], strict=True)))
        updated = sctp.checksum_field(pkt) ^ sctp.crc_ports_delta(d, length)
        assert updated == sctp.checksum_field(sctp.with_checksum(bytes(new))), (length, which)


def test_x8n_is_x_to_the_8n() -> None:
    # x^(8n) by repeated multiplication by x^8, against the square-and-multiply of the table
    x8 = sctp.X8_TABLE[0]
    p = sctp.X0
    for n in range(600):
        assert sctp.x8n(n) == p
        p = sctp.gf2_mul(p, x8)


def test_the_bpf_table_and_flag_codes_are_python_s() -> None:
    text = SCTP_H.read_text()
    table = re.search(r"x8\[KP_SCTP_X8_BITS\] = \{([^}]*)\}", text)
    assert table is not None
    assert [int(x, 16) for x in re.findall(r"0x[0-9a-f]+", table.group(1))] == sctp.X8_TABLE
    codes = int(re.search(r"KP_SCTP_FLAG_CODES (0x[0-9a-f]+)ULL", text).group(1), 16)  # type: ignore[union-attr]
    flags = int(re.search(r"KP_SCTP_CODE_FLAGS (0x[0-9a-f]+)ULL", text).group(1), 16)  # type: ignore[union-attr]
    want = {sctp.INIT: 0x02, sctp.INIT_ACK: 0x12, sctp.ABORT: 0x04, sctp.SHUTDOWN: 0x11,
            sctp.SHUTDOWN_ACK: 0x11, sctp.SHUTDOWN_COMPLETE: 0x04}  # fmt: skip
    for t in range(256):
        low = 0xFFFFFFFF if t < 16 else 0
        code = (codes >> (3 * (t & 15))) & 7 & low
        assert (flags >> (8 * code)) & 0xFF == want.get(t, 0x10), t
