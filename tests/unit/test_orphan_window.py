"""The agent keeps kp_config.orphan_until_ns open while connections of deleted TCP Service ports live
(they can outlast the established timeout counted from the deletion: traffic refreshes them), and lets
it close when none is left. Against the in-memory map twins."""

from __future__ import annotations

import time
from types import SimpleNamespace

from kproxy import abi
from kproxy.agent import Agent
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.config import AgentConfig

S = 10**9


def _agent(*live_svc_ids: int) -> Agent:
    agent = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], sweep_interval=5))
    agent.maps = MemoryMapSet()
    agent.syncer = SimpleNamespace(service_ports=lambda: dict.fromkeys(live_svc_ids))
    return agent


def _flow(svc_id: int) -> tuple[abi.Ct4Key, abi.Ct4Val]:
    far = time.monotonic_ns() + 3600 * S
    return abi.Ct4Key(1, 2, 3, 80, abi.IPPROTO_TCP, 0), abi.Ct4Val(
        far, 1, svc_id, 3, 8080, 2, abi.CtFlag.EXTERNAL
    )


def test_the_window_stays_open_while_an_orphaned_connection_lives() -> None:
    agent = _agent(5)
    agent.maps.ct4.put_many([_flow(7)])
    agent.orphan_until_ns = time.monotonic_ns() + 3 * S  # closing within two sweeps
    agent.keep_orphan_window()
    tcp = abi.CT_TCP_TIMEOUT_DEFAULT * S
    assert agent.orphan_until_ns > time.monotonic_ns() + tcp - 60 * S
    assert agent.maps.read_config().orphan_until_ns == agent.orphan_until_ns


def test_the_window_closes_when_no_orphaned_connection_is_left() -> None:
    agent = _agent(7)  # the flow's port is programmed again: no orphan
    agent.maps.ct4.put_many([_flow(7)])
    agent.orphan_until_ns = time.monotonic_ns() - 1
    agent.keep_orphan_window()
    assert agent.orphan_until_ns == 0 and agent.maps.read_config().orphan_until_ns == 0


def test_far_from_closing_nothing_is_scanned() -> None:
    agent = _agent()
    agent.maps.ct4.put_many([_flow(7)])
    until = agent.orphan_until_ns = time.monotonic_ns() + 3600 * S
    agent.keep_orphan_window()
    assert agent.orphan_until_ns == until


def _flow6(svc_id: int) -> tuple[abi.Ct6Key, abi.Ct6Val]:
    k, v = abi.Ct6Key(), abi.Ct6Val()
    k.saddr[:] = list(abi.ip6_to_bytes("2001:db8::1"))
    k.daddr[:] = list(abi.ip6_to_bytes("fd00:96::10"))
    k.sport, k.dport, k.proto, k.dir = 3, 80, abi.IPPROTO_TCP, 0
    v.expires_ns, v.backend_id, v.svc_id = time.monotonic_ns() + 3600 * S, abi.ID6_BASE + 1, svc_id
    v.state, v.flags = 2, abi.CtFlag.EXTERNAL
    return k, v


def test_an_orphaned_ipv6_connection_keeps_the_window_open_too() -> None:
    agent = _agent(abi.ID6_BASE + 5)
    agent.maps.ct6.put_many([_flow6(abi.ID6_BASE + 7)])
    agent.orphan_until_ns = time.monotonic_ns() + 3 * S
    agent.keep_orphan_window()
    assert agent.orphan_until_ns > time.monotonic_ns() + 60 * S
    agent = _agent(abi.ID6_BASE + 7)  # its port is programmed: no orphan
    agent.maps.ct6.put_many([_flow6(abi.ID6_BASE + 7)])
    agent.orphan_until_ns = time.monotonic_ns() - 1
    agent.keep_orphan_window()
    assert agent.orphan_until_ns == 0


def test_the_node_ipv6_address_goes_into_kp_cfg6_hairpin_left_default() -> None:
    import ctypes

    agent = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1", "FD00:1:0::9"], sweep_interval=5))
    agent.maps = MemoryMapSet()
    agent.datapath_config.write()
    cfg6 = agent.maps.cfg6.get(ctypes.c_uint32(0))
    assert cfg6 is not None and abi.bytes_to_ip6(cfg6.node_addr) == "fd00:1::9"
    assert abi.bytes_to_ip6(cfg6.hairpin_addr) == "::"
    assert agent.maps.read_config().node_addr == abi.ip_to_nbo("192.0.2.1")
    agent = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], sweep_interval=5))
    agent.maps = MemoryMapSet()
    agent.datapath_config.write()
    cfg6 = agent.maps.cfg6.get(ctypes.c_uint32(0))
    assert cfg6 is None or bytes(cfg6.node_addr) == bytes(16)
