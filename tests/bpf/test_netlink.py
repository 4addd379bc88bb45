"""kproxy.bpf.netlink: parsing (pure) and live link events inside a throw-away namespace."""

from __future__ import annotations

import json
import struct
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from kproxy.bpf.netlink import (
    IFLA_IFNAME,
    RTM_DELLINK,
    RTM_NEWLINK,
    XDP_ACT_NDO_XMIT,
    XDP_ACT_REDIRECT,
    LinkFollower,
    parse_link_messages,
)


def link_msg(mtype: int, index: int, name: str | None) -> bytes:
    attrs = b""
    if name is not None:
        raw = name.encode() + b"\0"
        attrs = struct.pack("=HH", 4 + len(raw), IFLA_IFNAME) + raw
        attrs += b"\0" * (-len(attrs) % 4)
    attrs = struct.pack("=HH", 8, 13) + b"\0\0\0\0" + attrs  # an unrelated attribute first
    body = struct.pack("=BxHiII", 0, 1, index, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def test_parse_messages() -> None:
    data = (
        link_msg(RTM_NEWLINK, 5, "veth1") + link_msg(RTM_DELLINK, 6, "kp.x") + link_msg(RTM_NEWLINK, 7, None)
    )
    assert parse_link_messages(data) == [
        (RTM_NEWLINK, 5, "veth1"),
        (RTM_DELLINK, 6, "kp.x"),
        (RTM_NEWLINK, 7, None),
    ]
    assert parse_link_messages(data[:20]) == []


def test_events_from_messages_match_glob_and_renames() -> None:
    f = LinkFollower("kp*,lxc*")
    assert [e.kind for e in f._apply(RTM_NEWLINK, 5, "kpa")] == ["added"]
    assert f._apply(RTM_NEWLINK, 5, "kpa") == []  # a flag change is not an event
    assert f._apply(RTM_NEWLINK, 6, "eth1") == []
    renamed = f._apply(RTM_NEWLINK, 5, "lxc9")
    assert [(e.kind, e.ifname) for e in renamed] == [("removed", "kpa"), ("added", "lxc9")]
    assert [(e.kind, e.ifname) for e in f._apply(RTM_DELLINK, 5, "lxc9")] == [("removed", "lxc9")]
    assert f._apply(RTM_DELLINK, 6, "eth1") == []
    with pytest.raises(ValueError):
        LinkFollower("")


FOLLOW_THREAD = """
import json, subprocess
from kproxy.bpf.netlink import LinkFollower
ip = lambda *a: subprocess.run(["ip", *a], check=True)
ip("link", "add", "kpa0", "type", "veth", "peer", "name", "other0")
with LinkFollower("kp*") as f:
    events = f.open()
    ip("link", "add", "kpb0", "type", "veth", "peer", "name", "other1")
    ip("link", "set", "kpb0", "up")
    ip("link", "set", "kpa0", "name", "zz0")
    ip("link", "del", "kpb0")
    while len(events) < 4:
        got = f.wait(5)
        if not got:
            break
        events += got
    events += f.wait(0.2)  # anything unexpected that follows
print(json.dumps([[e.kind, e.ifname] for e in events]))
"""

FOLLOW_ASYNC = """
import asyncio, json, subprocess
from kproxy.bpf.netlink import follow
async def main():
    stop = asyncio.Event()
    seen = []
    async def churn():
        await asyncio.sleep(0.05)
        subprocess.run(["ip", "link", "add", "kpc0", "type", "veth", "peer", "name", "kpc1"], check=True)
    task = asyncio.create_task(churn())
    async for ev in follow("kpc*", stop):
        seen.append([ev.kind, ev.ifname])
        if len(seen) == 2:
            stop.set()
    await task
    return sorted(seen)
print(json.dumps(asyncio.run(asyncio.wait_for(main(), 20))))
"""


@pytest.mark.root
def test_follow_in_thread(netns: Callable[[], Any]) -> None:
    ns = netns()
    events = json.loads(ns.python(textwrap.dedent(FOLLOW_THREAD)).stdout)
    assert events == [
        ["added", "kpa0"],
        ["added", "kpb0"],
        ["removed", "kpa0"],
        ["removed", "kpb0"],
    ]


@pytest.mark.root
def test_follow_async_stops_cleanly(netns: Callable[[], Any]) -> None:
    ns = netns()
    assert json.loads(ns.python(FOLLOW_ASYNC).stdout) == [["added", "kpc0"], ["added", "kpc1"]]


@pytest.mark.root
def test_xdp_features_of_a_veth_follow_its_peer(netns: Callable[[], Any]) -> None:
    """The kernel's netdev xdp-features (6.3+): a veth carries out redirects and takes redirected frames
    (NDO_XMIT) only while its peer runs XDP, what kproxy's kp_xdevs_v1 relies on."""
    ns = netns()
    ns.veth("kpf0", "kpf1")
    code = textwrap.dedent(
        """
        import json, socket
        from kproxy.bpf import libbpf as lb
        from kproxy.bpf.netlink import xdp_features
        a, b = socket.if_nametoindex("kpf0"), socket.if_nametoindex("kpf1")
        before = xdp_features(a)
        lb.xdp_pass_everywhere(b)
        print(json.dumps([before, xdp_features(a), xdp_features(b), xdp_features(10**6)]))
        """
    )
    proc = ns.python(code)
    before, after, peer, missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before & XDP_ACT_REDIRECT and not before & XDP_ACT_NDO_XMIT, before
    assert after & XDP_ACT_REDIRECT and after & XDP_ACT_NDO_XMIT, after
    assert not peer & XDP_ACT_NDO_XMIT, peer  # kpf1's own peer runs none
    assert missing is None
