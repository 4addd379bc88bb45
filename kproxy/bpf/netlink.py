"""Follow network interfaces matching a glob, live, through rtnetlink link events.

A LinkFollower subscribes to RTMGRP_LINK *before* listing the existing interfaces, so an interface
created in between is never missed, then turns RTM_NEWLINK/RTM_DELLINK into "added"/"removed"
events for matching names (a rename is a removal plus an addition; link flag changes are not events).
It uses a plain non-blocking netlink socket, so it plugs into asyncio with loop.add_reader (`follow`)
or into a thread with select (`LinkFollower.wait`), and shuts down by closing the socket.

Acts on the network namespace of the thread that opens it.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import ipaddress
import logging
import select
import socket
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("kproxy.netlink")

NETLINK_ROUTE = 0
RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
NLMSG_ERROR = 2
NLMSG_OVERRUN = 4
IFLA_IFNAME = 3
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class LinkEvent:
    kind: Literal["added", "removed"]
    ifname: str
    ifindex: int


def parse_link_messages(data: bytes) -> list[tuple[int, int, str | None]]:
    """(message type, ifindex, ifname) of each RTM_NEWLINK/RTM_DELLINK message in one datagram."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            body = offset + _NLMSGHDR.size
            _family, _type, index, _ifflags, _change = _IFINFOMSG.unpack_from(data, body)
            name = None
            pos = body + _IFINFOMSG.size
            end = offset + length
            while pos + _RTATTR.size <= end:
                rta_len, rta_type = _RTATTR.unpack_from(data, pos)
                if rta_len < _RTATTR.size:
                    break
                if rta_type & 0x3FFF == IFLA_IFNAME:
                    name = (
                        data[pos + _RTATTR.size : pos + rta_len].split(b"\0", 1)[0].decode(errors="replace")
                    )
                pos += (rta_len + 3) & ~3
            out.append((mtype, index, name))
        offset += (length + 3) & ~3
    return out


class LinkFollower:
    """Interfaces whose name matches any of `patterns` (fnmatch globs), as a stream of events."""

    def __init__(self, patterns: str | Iterable[str]) -> None:
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",") if p]
        self.patterns = list(patterns)
        if not self.patterns:
            raise ValueError("LinkFollower needs at least one interface glob, e.g. 'veth*'")
        self.known: dict[int, str] = {}  # ifindex -> name, matching interfaces only
        self.sock: socket.socket | None = None

    def matches(self, ifname: str) -> bool:
        return any(fnmatch.fnmatchcase(ifname, p) for p in self.patterns)

    def open(self) -> list[LinkEvent]:
        """Subscribe, then return an "added" event for every matching interface that exists now."""
        if self.sock is not None:
            raise RuntimeError("LinkFollower is already open")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.bind((0, RTMGRP_LINK))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        return self._resync()

    def _resync(self) -> list[LinkEvent]:
        """Diff the known set against the kernel's current list (start, and after a lost event)."""
        now = {idx: name for idx, name in socket.if_nameindex() if self.matches(name)}
        events = [LinkEvent("removed", name, idx) for idx, name in self.known.items() if now.get(idx) != name]
        events += [
            LinkEvent("added", name, idx) for idx, name in sorted(now.items()) if self.known.get(idx) != name
        ]
        self.known = now
        return events

    def fileno(self) -> int:
        if self.sock is None:
            raise RuntimeError("LinkFollower is not open")
        return self.sock.fileno()

    def read(self) -> list[LinkEvent]:
        """Events from every datagram queued on the socket (non-blocking; [] when none)."""
        if self.sock is None:
            return []
        events: list[LinkEvent] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped events because we were slow: the list is the truth.
                    log.warning("netlink link events overran the socket buffer; re-listing interfaces")
                    events.extend(self._resync())
                    continue
                raise
            for mtype, index, name in parse_link_messages(data):
                events.extend(self._apply(mtype, index, name))

    def _apply(self, mtype: int, index: int, name: str | None) -> list[LinkEvent]:
        old = self.known.get(index)
        if mtype == RTM_DELLINK:
            if old is None:
                return []
            del self.known[index]
            return [LinkEvent("removed", old, index)]
        if name is None or name == old:
            return []
        events = []
        if old is not None:
            del self.known[index]
            events.append(LinkEvent("removed", old, index))
        if self.matches(name):
            self.known[index] = name
            events.append(LinkEvent("added", name, index))
        return events

    def wait(self, timeout: float | None = None) -> list[LinkEvent]:
        """Block up to `timeout` seconds for events (thread use); [] on timeout or after close()."""
        if self.sock is None:
            return []
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):  # closed by another thread
            return []
        return self.read() if ready else []

    def close(self) -> None:
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close()

    def __enter__(self) -> LinkFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def follow(
    patterns: str | Iterable[str], stop: asyncio.Event | None = None
) -> AsyncIterator[LinkEvent]:
    """Existing matching interfaces as "added", then live events, until `stop` is set or the
    consumer stops iterating (aclose/cancel); the socket is always closed."""
    loop = asyncio.get_running_loop()
    follower = LinkFollower(patterns)
    ready = asyncio.Event()
    stopper: asyncio.Future[Any] | None = None
    try:
        for ev in follower.open():
            yield ev
        loop.add_reader(follower.fileno(), ready.set)
        if stop is not None:
            stopper = asyncio.ensure_future(stop.wait())
        while stop is None or not stop.is_set():
            waiter = asyncio.ensure_future(ready.wait())
            waits: set[asyncio.Future[Any]] = {waiter}
            if stopper is not None:
                waits.add(stopper)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            ready.clear()
            for ev in follower.read():
                yield ev
    finally:
        if stopper is not None:
            stopper.cancel()
        if follower.sock is not None:
            loop.remove_reader(follower.fileno())
        follower.close()


def host_addresses() -> list[str]:
    """Every address of this network namespace's interfaces, IPv4 and IPv6 (what --nodeport-addresses
    CIDRs select from, as kube-proxy's GetNodeIPs lists net.InterfaceAddrs), in canonical text form;
    loopback's included (callers filter), IPv6 link-local (fe80::/10) left out: no NodePort is served
    on those, which need an interface to mean anything."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return usable_host_addresses(
            (a["family"], a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()
        )


def usable_host_addresses(addrs: Iterable[tuple[int, Any]]) -> list[str]:
    """host_addresses' filter of (address family, address text) pairs from RTM_GETADDR, pure: the
    IPv4 and IPv6 ones, canonical, IPv6 link-local left out, each once."""
    out: list[str] = []
    for family, text in addrs:
        if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(text, str):
            continue
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.version == 6 and ip.is_link_local:
            continue
        canon = str(ip)
        if canon not in out:
            out.append(canon)
    return out


# The name kproxy.agent.upkeep imports: it lists both families now (see host_addresses).
ipv4_addresses = host_addresses


# ---- the netdev generic netlink family: what a driver's XDP can do (kernel 6.3 and later) ----
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NETDEV_CMD_DEV_GET = 1
NETDEV_A_DEV_IFINDEX = 1
NETDEV_A_DEV_XDP_FEATURES = 3
XDP_ACT_BASIC = 1 << 0  # XDP_PASS, XDP_DROP, XDP_TX
XDP_ACT_REDIRECT = 1 << 1  # the driver carries out XDP_REDIRECT for frames it received
XDP_ACT_NDO_XMIT = 1 << 2  # the driver takes frames redirected to it (ndo_xdp_xmit), now
_NLM_F_REQUEST = 1
_GENLMSGHDR = struct.Struct("=BBH")


def _nla(kind: int, payload: bytes) -> bytes:
    data = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _genl_request(sock: socket.socket, family: int, cmd: int, attrs: bytes, seq: int) -> dict[int, bytes]:
    """One generic netlink request; the attributes of its answer (type -> payload)."""
    body = _GENLMSGHDR.pack(cmd, 1, 0) + attrs
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, _NLM_F_REQUEST, seq, 0) + body)
    data = sock.recv(65536)
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, 0)
    if kind == NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
        raise OSError(
            err, f"generic netlink request {cmd} to family {family}: {errno.errorcode.get(err, err)}"
        )
    out: dict[int, bytes] = {}
    at = _NLMSGHDR.size + _GENLMSGHDR.size
    while at + _RTATTR.size <= length:
        alen, atype = _RTATTR.unpack_from(data, at)
        if alen < _RTATTR.size:
            break
        out[atype & 0x3FFF] = data[at + _RTATTR.size : at + alen]
        at += (alen + 3) & ~3
    return out


def xdp_features(ifindex: int) -> int | None:
    """The XDP_ACT_* bits the kernel reports for interface IFINDEX of the calling thread's namespace
    (netdev family, NETDEV_CMD_DEV_GET), or None where the kernel has no such report (before 6.3) or no
    such interface."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        sock.settimeout(2.0)
        try:
            ctrl = _genl_request(
                sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, _nla(CTRL_ATTR_FAMILY_NAME, b"netdev\0"), 1
            )
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None  # no netdev family
            raise
        family = struct.unpack_from("=H", ctrl[CTRL_ATTR_FAMILY_ID])[0]
        try:
            dev = _genl_request(
                sock, family, NETDEV_CMD_DEV_GET, _nla(NETDEV_A_DEV_IFINDEX, struct.pack("=I", ifindex)), 2
            )
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
    raw = dev.get(NETDEV_A_DEV_XDP_FEATURES)
    return struct.unpack_from("=Q", raw)[0] if raw is not None and len(raw) >= 8 else None
