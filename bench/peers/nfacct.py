"""Create nfacct (extended accounting) objects in the current network namespace.

kube-proxy's iptables rules match ``-m nfacct --nfacct-name X``; the match fails to load unless the
object exists, and kube-proxy creates them over netlink at start-up. Debian has no ``nfacct`` tool
installed by default, so this speaks NFNL_SUBSYS_ACCT directly. Run it inside the target namespace:
``ip netns exec NS python3 -m bench.peers.nfacct NAME...``.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW = 0
NFACCT_NAME = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2


def add(name: str) -> None:
    """Create the object ``name``; an existing one is fine (kube-proxy re-uses them too)."""
    raw = name.encode() + b"\0"
    attr = struct.pack("HH", 4 + len(raw), NFACCT_NAME) + raw
    attr += b"\0" * (-len(attr) % 4)
    payload = struct.pack("BBH", socket.AF_UNSPEC, 0, 0) + attr
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    msg = struct.pack("IHHII", 16 + len(payload), (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW, flags, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.bind((0, 0))
        s.send(msg + payload)
        reply = s.recv(4096)
    _, typ, _, _, _ = struct.unpack("IHHII", reply[:16])
    err = -struct.unpack("i", reply[16:20])[0] if typ == NLMSG_ERROR else 0
    if err not in (0, errno.EEXIST):
        raise OSError(
            err, f"nfacct: cannot create accounting object {name!r} (kernel without nfnetlink_acct?)"
        )


def main(argv: list[str]) -> int:
    for name in argv:
        add(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
