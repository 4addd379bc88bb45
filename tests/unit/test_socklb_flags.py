"""kp_cfg_v1 bits of socket LB: localhost NodePorts (kube-proxy's rules for when they apply) and the
host-namespace-only mode with its network namespace cookie."""

from __future__ import annotations

import sys

import pytest

from kproxy import abi
from kproxy.bpf import socklb, upkeep
from kproxy.config import AgentConfig


def cfg(**kw: object) -> AgentConfig:
    return AgentConfig(**{"node_name": "n1", "node_ips": ["192.0.2.1"], **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "served"),
    [
        ({}, True),  # kube-proxy's default: --iptables-localhost-nodeports=true, all addresses
        ({"localhost_nodeports": False}, False),
        ({"nodeport_addresses": ["10.0.0.0/8"]}, False),  # no loopback among the IPv4 CIDRs
        ({"nodeport_addresses": ["192.0.2.0/24", "127.0.0.0/8"]}, True),
        ({"nodeport_addresses": ["192.0.2.0/24", "127.0.0.1/32"]}, True),  # kube-proxy: IP.IsLoopback
        # kube-proxy would serve 127.0.0.1 here; kproxy serves a loopback NodePort as on the primary
        # address (kp_cfg_v1.node_addr), which these leave without NodePorts: nothing would match
        ({"nodeport_addresses": ["10.0.0.0/8", "127.0.0.0/8"]}, False),
        ({"nodeport_addresses": ["127.0.0.0/8"]}, False),
        ({"node_ips": ["2001:db8::1"]}, False),  # no IPv4 node address
        ({"nodeport_addresses": ["0.0.0.0/0"]}, True),
        ({"nodeport_addresses": ["fd00::/8"]}, True),  # no IPv4 CIDR: IPv4 matches everything
        ({"nodeport_addresses": ["127.0.0.0/8"], "localhost_nodeports": False}, False),
    ],
)
def test_localhost_nodeports_follow_kube_proxy(kw: dict[str, object], served: bool) -> None:
    assert cfg(**kw).localhost_nodeports_served is served


def test_why_localhost_nodeports_are_off_is_said() -> None:
    assert "holds no 127.0.0.0" in str(cfg(nodeport_addresses=["10.0.0.0/8"]).localhost_nodeports_off)
    off = cfg(nodeport_addresses=["127.0.0.0/8"]).localhost_nodeports_off
    assert off is not None and "192.0.2.1 is outside --nodeport-addresses 127.0.0.0/8" in off


def test_defaults() -> None:
    c = cfg()
    assert c.localhost_nodeports and not c.socket_lb_host_netns_only


class ConfigMemory:
    def __init__(self) -> None:
        self.cfg = abi.Config()

    def read_config(self) -> abi.Config:
        return abi.Config.from_buffer_copy(bytes(self.cfg))

    def write_config(self, config: abi.Config) -> None:
        self.cfg = abi.Config.from_buffer_copy(bytes(config))


def test_write_config_flags_and_cookie() -> None:
    m = ConfigMemory()
    upkeep.write_config(
        m, "192.0.2.1", localhost_nodeports=True, host_netns_only=True, host_netns_cookie=4097
    )
    assert m.cfg.flags == abi.ConfigFlag.LOCALHOST_NODEPORTS | abi.ConfigFlag.SOCK_HOST_NETNS_ONLY
    assert m.cfg.host_netns_cookie == 4097
    upkeep.write_config(m, "192.0.2.1", external_cluster_ip=False)  # rewritten whole: bits and cookie go
    assert m.cfg.flags == abi.ConfigFlag.NO_EXTERNAL_CLUSTER_IP and m.cfg.host_netns_cookie == 0


def test_netns_cookie_is_this_namespaces() -> None:
    if sys.platform != "linux":
        pytest.skip("Linux only")
    try:
        cookie = socklb.netns_cookie()
    except OSError:
        pytest.skip("no SO_NETNS_COOKIE (kernel < 5.14)")
    assert cookie > 0 and cookie == socklb.netns_cookie()  # stable for one namespace


def _cookie_of(monkeypatch: pytest.MonkeyPatch, cookie: int | None) -> None:
    def fake() -> int:
        if cookie is None:
            raise OSError(92, "Protocol not available")  # ENOPROTOOPT: a kernel before 5.14
        return cookie

    monkeypatch.setattr(socklb, "netns_cookie", fake)


def test_agent_writes_its_cookie_for_localhost_nodeports_and_host_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kproxy.agent.dataplane import Dataplane
    from kproxy.agent.upkeep import DatapathConfig

    _cookie_of(monkeypatch, 77)
    assert DatapathConfig(cfg(), Dataplane(cfg())).host_netns_cookie() == 77
    off = cfg(localhost_nodeports=False)
    assert DatapathConfig(off, Dataplane(off)).host_netns_cookie() == 0  # nothing needs it
    only = cfg(localhost_nodeports=False, socket_lb_host_netns_only=True)
    assert DatapathConfig(only, Dataplane(only)).host_netns_cookie() == 77


def test_without_a_cookie_localhost_nodeports_go_and_host_only_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kproxy.agent.dataplane import Dataplane
    from kproxy.agent.errors import AgentError
    from kproxy.agent.upkeep import DatapathConfig

    _cookie_of(monkeypatch, None)
    assert DatapathConfig(cfg(), Dataplane(cfg())).host_netns_cookie() == 0
    only = cfg(socket_lb_host_netns_only=True)
    with pytest.raises(AgentError, match="SO_NETNS_COOKIE"):
        DatapathConfig(only, Dataplane(only)).host_netns_cookie()
