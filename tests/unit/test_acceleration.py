"""--acceleration as the agent applies it per netdev (kproxy.agent.dataplane.Dataplane.accelerate), with a
stand-in loader; the loader's XDP attach itself runs against the kernel in tests/bpf/test_loader.py."""

from __future__ import annotations

import logging

import pytest

from kproxy.agent.dataplane import Dataplane
from kproxy.agent.errors import AgentError
from kproxy.bpf.loader import XdpUnsupported
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
