"""--acceleration as the agent applies it per netdev (kproxy.agent.dataplane.Dataplane.accelerate), with a
stand-in loader; the loader's XDP attach itself runs against the kernel in tests/bpf/test_loader.py."""

from __future__ import annotations

import ctypes
import logging
import socket

import pytest

from kproxy import abi
from kproxy.agent.dataplane import Dataplane
from kproxy.agent.errors import AgentError
from kproxy.bpf.loader import XdpUnsupported
from kproxy.bpf.mapapi import MemoryMap
from kproxy.config import AgentConfig


class FakeLoader:
    def __init__(self, supported: bool = True, pinned: bool = False) -> None:
        self.supported = supported
        self.pinned = pinned
        self.calls: list[tuple[str, str]] = []

    def attach_xdp(self, dev: str, program: str, allow_veth: bool = False) -> None:
        self.calls.append(("attach", dev))
        if not self.supported:
            raise XdpUnsupported(f"{dev} has no native XDP (Operation not supported)")
        self.pinned = True

    def detach_xdp(self, dev: str) -> bool:
        self.calls.append(("detach", dev))
        was, self.pinned = self.pinned, False
        return was


def dataplane(acceleration: str, loader: FakeLoader) -> Dataplane:
    dp = Dataplane(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], acceleration=acceleration))
    dp.loader = loader  # type: ignore[assignment]
    return dp


def test_native_attaches_and_says_so() -> None:
    dp = dataplane("native", FakeLoader())
    dp.accelerate("eth0")
    assert dp.status()["acceleration"] == {"mode": "native", "netdevs": {"eth0": "xdp"}}


def test_native_refuses_a_netdev_without_native_xdp() -> None:
    dp = dataplane("native", FakeLoader(supported=False))
    with pytest.raises(AgentError, match=r"--acceleration native: eth0 has no native XDP .*best-effort"):
        dp.accelerate("eth0")


def test_best_effort_falls_back_to_tc_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    dp = dataplane("best-effort", FakeLoader(supported=False))
    with caplog.at_level(logging.WARNING, logger="kproxy.agent"):
        dp.accelerate("eth0")
    got = dp.status()["acceleration"]["netdevs"]["eth0"]
    assert got.startswith("tc (best-effort: eth0 has no native XDP")
    assert "netdev eth0 runs TC alone" in caplog.text


def test_off_removes_what_an_earlier_agent_attached() -> None:
    loader = FakeLoader(pinned=True)
    dp = dataplane("off", loader)
    dp.accelerate("eth0")
    assert loader.calls == [("detach", "eth0")] and not loader.pinned
    assert dp.status()["acceleration"]["netdevs"] == {"eth0": "off"}


def test_the_flag_takes_only_known_modes() -> None:
    with pytest.raises(ValueError, match="acceleration"):
        AgentConfig(node_name="n1", acceleration="generic")  # type: ignore[arg-type]


# ---- kp_xdevs_v1: the netdevs kp_xdp may redirect to ----
class XdevMaps:
    def __init__(self) -> None:
        self.xdevs = MemoryMap(abi.MAP_XDEVS, ctypes.c_uint32, abi.XdevVal, abi.XDEVS_MAX)

    def ifindexes(self) -> set[int]:
        return {int.from_bytes(k, "little") for k in self.xdevs.data}


def test_xdevs_list_the_accelerated_netdevs_only() -> None:
    """Entries of netdevs running kp_xdp natively; an earlier agent's stale entry, a netdev gone and one
    left to TC are not there."""
    dp = dataplane("native", FakeLoader())
    maps = XdevMaps()
    maps.xdevs.put_many([(ctypes.c_uint32(999_999), abi.XdevVal(0))])  # an earlier agent's ifindex
    dp.maps = maps  # type: ignore[assignment]
    dp.acceleration = {"lo": "xdp", "kp-no-such-dev": "xdp", "eth9": "tc (best-effort: no)"}
    dp.sync_xdevs()
    assert maps.ifindexes() == {socket.if_nametoindex("lo")}


def test_turning_acceleration_off_removes_the_entry_before_the_program() -> None:
    """A driver takes redirected XDP frames only while it runs an XDP program: the entry goes first."""
    maps = XdevMaps()
    dp = dataplane("native", FakeLoader())
    dp.maps = maps  # type: ignore[assignment]
    dp.accelerate("lo")
    dp.sync_xdevs()
    assert maps.ifindexes() == {socket.if_nametoindex("lo")}
    dp.cfg = dp.cfg.model_copy(update={"acceleration": "off"})
    seen_at_detach: list[set[int]] = []
    loader = dp.loader
    real_detach = loader.detach_xdp  # type: ignore[union-attr]

    def detach(dev: str) -> bool:
        seen_at_detach.append(maps.ifindexes())
        return real_detach(dev)

    loader.detach_xdp = detach  # type: ignore[union-attr,method-assign]
    dp.accelerate("lo")
    assert seen_at_detach == [set()] and maps.ifindexes() == set()
