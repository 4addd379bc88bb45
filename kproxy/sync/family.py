"""An address family as the Syncer sees it: which maps it writes, how its keys and values are packed,
and the int layout of its backend keys and values (kproxy.sync.state).

The Syncer runs one engine per family (kproxy.sync.syncer.FamilySyncer) over the same code; what differs
is here. IPv4 keeps the layouts the IPv4 path always had (32-bit addresses: BVals fit the three words of
kproxy.sync.table.BackendTable); IPv6 widens them to 128-bit addresses (a dict-backed table, see
kproxy.sync.table.WideBackendTable). Backend and service-port ids of IPv6 start at abi.ID6_BASE, IPv4
ones stay below it, so one id names one thing in metrics and the CLI.

Backend key and value layout, A being the address width (32 or 128):
  BKey = addr | port NBO << A | proto << A+16 | node << A+24
  BVal = addr | port NBO << A | proto << A+16 | flags << A+24 | node_addr << A+32 | node << 2A+32
and the programmed table adds the reference count above bit 2A+64.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kproxy import abi
from kproxy.sync import state
from kproxy.sync.state import pack_be4

_M32 = 0xFFFFFFFF
_inet_pton = socket.inet_pton
_AF_INET6 = socket.AF_INET6


@dataclass(frozen=True, slots=True)
class Family:
    version: int  # 4 | 6
    name: str  # "IPv4" | "IPv6", as Kubernetes spells ipFamilies
    id_base: int  # the first backend and service-port id
    id_limit: int  # ids stay below it
    addr_bits: int
    # the MapSet attributes of this family's maps
    svc_map: str
    be_map: str
    ct_map: str
    aff_map: str
    lbsrc_map: str
    svc_key_size: int
    slot_offset: int  # of the u16 slot in a service key
    pack_svc_key: Callable[..., bytes]  # (addr, port NBO, slot, proto, scope)
    fe_addr_of_key: Callable[[Any], Any]  # a service key structure's addr field -> the FKey's address
    fe_addr_text: Callable[[Any], str]  # the FKey's address -> text
    addr_int: Callable[[str], int]  # backend or node address text -> int (NBO bytes as read by the maps)
    addr_int_of_field: Callable[[Any], int]  # a map structure's address field -> int
    pack_be: Callable[[int], bytes]  # BVal -> its kp_be4 / kp_be6 value, packed

    # backend key and value layout (see the module docstring), worked out by _layout()
    port_shift: int
    proto_shift: int
    node_key_shift: int  # the node index in a BKey, the flags in a BVal
    node_addr_shift: int
    node_val_shift: int  # the node index in a BVal
    refs_shift: int
    bk_mask: int  # address, port and protocol of a BKey
    addr_mask: int
    key_of_val: Callable[[int], int]  # BVal -> its BKey
    bval_proto: Callable[[int], int]  # BVal -> its IP protocol

    def is_mine(self, address: str) -> bool:
        return (":" in address) == (self.version == 6)

    def bkey(self, addr: int, port: int, proto: int, node: int = 0) -> int:
        return addr | port << self.port_shift | proto << self.proto_shift | node << self.node_key_shift

    def svc_key(self, fk: tuple[Any, int, int, int], slot: int) -> bytes:
        return self.pack_svc_key(fk[0], fk[1], slot, fk[2], fk[3])


def _layout(addr_bits: int) -> dict[str, Any]:
    """The shifts and masks of Family for ADDR_BITS-wide addresses, with its key_of_val and bval_proto
    (kproxy.sync.state's for IPv4: the IPv4 path calls the functions it always called)."""
    a = addr_bits
    bk_mask = (1 << a + 24) - 1
    vshift, kshift, pshift = 2 * a + 32, a + 24, a + 16
    if a == 32:
        key_of_val, bval_proto = state.key_of_val, state.bval_proto
    else:

        def key_of_val(val: int) -> int:
            return (val & bk_mask) | ((val >> vshift) & _M32) << kshift

        def bval_proto(val: int) -> int:
            return (val >> pshift) & 0xFF

    return {
        "port_shift": a,
        "proto_shift": pshift,
        "node_key_shift": kshift,
        "node_addr_shift": a + 32,
        "node_val_shift": vshift,
        "refs_shift": 2 * a + 64,
        "bk_mask": bk_mask,
        "addr_mask": (1 << a) - 1,
        "key_of_val": key_of_val,
        "bval_proto": bval_proto,
    }


def _ip6_int(address: str) -> int:
    return int.from_bytes(_inet_pton(_AF_INET6, address), "big")


def _ip6_field_int(field: Any) -> int:
    return int.from_bytes(bytes(field), "big")


_M128 = (1 << 128) - 1


def pack_be6(val: int) -> bytes:
    """The kp_be6 value an IPv6 BVal stands for, packed."""
    return abi.pack_be6_val(
        (val & _M128).to_bytes(16, "big"),
        (val >> 128) & 0xFFFF,
        (val >> 144) & 0xFF,
        (val >> 152) & 0xFF,
        ((val >> 160) & _M128).to_bytes(16, "big"),
    )


FAMILY4 = Family(
    version=4,
    name="IPv4",
    id_base=1,
    id_limit=abi.ID6_BASE,
    addr_bits=32,
    svc_map="svc4",
    be_map="be4",
    ct_map="ct4",
    aff_map="aff4",
    lbsrc_map="lbsrc4",
    svc_key_size=abi.SVC4_KEY_SIZE,
    slot_offset=6,
    pack_svc_key=abi.pack_svc4_key,
    fe_addr_of_key=int,
    fe_addr_text=abi.nbo_to_ip,
    addr_int=abi.ip_to_nbo,
    addr_int_of_field=int,
    pack_be=pack_be4,
    **_layout(32),
)

FAMILY6 = Family(
    version=6,
    name="IPv6",
    id_base=abi.ID6_BASE,
    id_limit=0xFFFFFFFF,
    addr_bits=128,
    svc_map="svc6",
    be_map="be6",
    ct_map="ct6",
    aff_map="aff6",
    lbsrc_map="lbsrc6",
    svc_key_size=abi.SVC6_KEY_SIZE,
    slot_offset=18,
    pack_svc_key=abi.pack_svc6_key,
    fe_addr_of_key=bytes,
    fe_addr_text=abi.bytes_to_ip6,
    addr_int=_ip6_int,
    addr_int_of_field=_ip6_field_int,
    pack_be=pack_be6,
    **_layout(128),
)

FAMILIES = (FAMILY4, FAMILY6)
