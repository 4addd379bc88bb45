"""--acceleration as the agent applies it per netdev (kproxy.agent.dataplane.Dataplane.accelerate), with a
stand-in loader; the loader's XDP attach itself runs against the kernel in tests/bpf/test_loader.py."""

from __future__ import annotations

import ctypes
import logging

import pytest

from kproxy import abi
from kproxy.agent import dataplane as dataplane_mod
from kproxy.agent.dataplane import Dataplane
from kproxy.agent.errors import AgentError
from kproxy.bpf.loader import XdpUnsupported
from kproxy.bpf.mapapi import MemoryMap
from kproxy.bpf.netlink import XDP_ACT_BASIC, XDP_ACT_NDO_XMIT, XDP_ACT_REDIRECT
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
    assert dp.status()["acceleration"] == {"mode": "native", "netdevs": {"eth0": "xdp"}, "redirect": []}


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


# ---- kp_xdevs_v1: the netdevs kp_xdp may redirect between ----
class XdevMaps:
    def __init__(self) -> None:
        self.xdevs = MemoryMap(abi.MAP_XDEVS, ctypes.c_uint32, abi.XdevVal, abi.XDEVS_MAX)

    def ifindexes(self) -> set[int]:
        return {int.from_bytes(k, "little") for k in self.xdevs.data}


REDIRECT_BOTH = XDP_ACT_BASIC | XDP_ACT_REDIRECT | XDP_ACT_NDO_XMIT


class XdevLoader(FakeLoader):
    """Where kproxy's XDP links run now (netdev -> ifindex; None: no live link)."""

    def __init__(self, links: dict[str, int | None]) -> None:
        super().__init__()
        self.links = links

    def xdp_ifindex(self, ifname: str) -> int | None:
        return self.links.get(ifname)


def xdev_dataplane(
    monkeypatch: pytest.MonkeyPatch, links: dict[str, int | None], features: dict[int, int | None]
) -> tuple[Dataplane, XdevMaps]:
    dp = dataplane("native", XdevLoader(links))
    maps = XdevMaps()
    dp.maps = maps  # type: ignore[assignment]
    monkeypatch.setattr(dataplane_mod, "xdp_features", lambda ifindex: features.get(ifindex))
    return dp, maps


def test_xdevs_are_the_netdevs_that_run_kp_xdp_and_can_redirect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed: a netdev whose XDP link runs and whose driver carries out redirects and takes redirected
    frames now. Not: one whose driver takes none (a veth whose peer runs no XDP), one whose link died
    with it (deleted, or re-created under its name), one left to TC, an earlier agent's entry."""
    links = {"eth0": 10, "eth1": 11, "eth2": None, "eth3": 13}
    dp, maps = xdev_dataplane(
        monkeypatch, links, {10: REDIRECT_BOTH, 11: XDP_ACT_BASIC | XDP_ACT_REDIRECT, 13: 0}
    )
    maps.xdevs.put_many([(ctypes.c_uint32(999), abi.XdevVal(0))])
    dp.acceleration = {"eth0": "xdp", "eth1": "xdp", "eth2": "xdp", "eth3": "tc (best-effort: no)"}
    dp.sync_xdevs()
    assert maps.ifindexes() == {10}
    # the peer of eth1 starts running XDP: its driver takes redirected frames from then on
    monkeypatch.setattr(dataplane_mod, "xdp_features", lambda ifindex: REDIRECT_BOTH)
    dp.sync_xdevs()
    assert maps.ifindexes() == {10, 11}
    assert dp.status()["acceleration"]["redirect"] == ["eth0", "eth1"]


def test_a_kernel_without_xdp_features_gets_no_redirect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 6.3 the kernel does not say what a driver's XDP can do: XDP_TX only."""
    dp, maps = xdev_dataplane(monkeypatch, {"eth0": 10, "eth1": 11}, {})
    dp.acceleration = {"eth0": "xdp", "eth1": "xdp"}
    dp.sync_xdevs()
    assert maps.ifindexes() == set()


def test_turning_acceleration_off_removes_the_entry_before_the_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver takes redirected XDP frames only while it runs an XDP program: the entry goes first."""
    dp, maps = xdev_dataplane(monkeypatch, {"eth0": 10}, {10: REDIRECT_BOTH})
    dp.accelerate("eth0")
    dp.sync_xdevs()
    assert maps.ifindexes() == {10}
    dp.cfg = dp.cfg.model_copy(update={"acceleration": "off"})
    seen_at_detach: list[set[int]] = []
    loader = dp.loader
    real_detach = loader.detach_xdp  # type: ignore[union-attr]

    def detach(dev: str) -> bool:
        seen_at_detach.append(maps.ifindexes())
        return real_detach(dev)

    loader.detach_xdp = detach  # type: ignore[union-attr,method-assign]
    dp.accelerate("eth0")
    assert seen_at_detach == [set()] and maps.ifindexes() == set()
