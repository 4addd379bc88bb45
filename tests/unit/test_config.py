"""AgentConfig: defaults and the errors a mistyped flag gets."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from kproxy import abi
from kproxy.config import AgentConfig, split_hostport


def test_defaults():
    c = AgentConfig(node_name="n1", node_ips=["fd00::1", "192.168.1.10"])
    assert c.bpffs == "/sys/fs/bpf/kproxy" and c.source == "kubernetes" and c.source_dir is None
    assert (c.metrics_bind, c.health_bind) == ("127.0.0.1:10249", "0.0.0.0:10256")
    assert c.primary_ipv4 == "192.168.1.10"
    assert c.map_sizes == {}  # the object's compiled sizes
    assert (c.conntrack.syn, c.conntrack.udp) == (0, 0)  # 0: the datapath default
    assert c.dsr_mode == "off" and c.dsr_mode_value == abi.DsrMode.OFF
    assert c.socket_lb_cgroup is None and c.netdevs == []
    assert c.settings_configmap == "kube-system/kproxy-config"
    assert c.translate_config().nodeport_addresses == ()


def test_file_source_and_nodeport_cidrs():
    c = AgentConfig(node_name="n1", source="file:/etc/kproxy", nodeport_addresses=["10.0.0.0/8"])
    assert c.source_dir == "/etc/kproxy"
    assert c.translate_config().nodeport_addresses == (ipaddress.ip_network("10.0.0.0/8"),)


def test_map_sizes_by_pinned_name_and_dsr_mode():
    c = AgentConfig(node_name="n1", map_sizes={abi.MAP_CT4: 524288}, dsr_mode="ipip")
    assert c.map_sizes == {"kp_ct4_v1": 524288} and c.dsr_mode_value == abi.DsrMode.IPIP


def test_split_hostport():
    assert split_hostport("[::1]:10249") == ("::1", 10249)
    assert split_hostport("0.0.0.0:10256") == ("0.0.0.0", 10256)


@pytest.mark.parametrize(
    "kw, expect",
    [
        (dict(node_ips=["300.1.1.1"]), "--node-ip '300.1.1.1'"),
        (dict(source="files"), "'kubernetes' or 'file:DIR'"),
        (dict(nodeport_addresses=["10.0.0.0/33"]), "is not a CIDR"),
        (dict(metrics_bind="localhost"), "HOST:PORT"),
        (dict(health_bind="example.org:10256"), "--health-bind-address"),
        (dict(node_name=""), "node_name"),
        (dict(map_sizes={"ct4": 1024}), "'ct4' is not a kproxy map"),
        (dict(map_sizes={abi.MAP_CT4: 1}), "kp_ct4_v1=1"),
        (dict(dsr_mode="on"), "dsr_mode"),
        (dict(pod_ifaces=[]), "--pod-ifaces"),
        (dict(service_cidrs=["10.96.0.0/12", "10.96.0.0/99"]), "--service-cidr entry '10.96.0.0/99'"),
        (dict(hairpin_addresses=["169.254.42.256"]), "--hairpin-address '169.254.42.256' is not an IP"),
        (dict(hairpin_addresses=["169.254.1.1", "169.254.1.2"]), "one address per family"),
    ],
)
def test_invalid(kw, expect):
    args = {"node_name": "n1", **kw}
    with pytest.raises(ValidationError) as ei:
        AgentConfig(**args)
    assert expect in str(ei.value)


def test_external_cluster_ip_switch_reaches_the_datapath_config():
    from kproxy.bpf.mapapi import MemoryMapSet
    from kproxy.bpf.upkeep import write_config

    assert AgentConfig(node_name="n1").external_cluster_ip is True  # kube-proxy's behaviour by default
    maps = MemoryMapSet()
    write_config(maps, "192.168.1.10")
    assert maps.read_config().flags == 0
    write_config(maps, "192.168.1.10", external_cluster_ip=False)
    assert maps.read_config().flags == abi.ConfigFlag.NO_EXTERNAL_CLUSTER_IP


def test_node_ips_of_both_families_give_a_primary_address_each():
    c = AgentConfig(node_name="n1", node_ips=["FD00:0::1", "192.168.1.10", "fd00::2", "10.0.0.1"])
    assert (c.primary_ipv4, c.primary_ipv6) == ("192.168.1.10", "fd00::1")
    assert AgentConfig(node_name="n1", node_ips=["192.168.1.10"]).primary_ipv6 is None
    with pytest.raises(ValidationError, match="is not an IP address"):
        AgentConfig(node_name="n1", node_ips=["fd00::zz"])


def test_hairpin_addresses_one_per_family():
    c = AgentConfig(node_name="n1", hairpin_addresses=["FD00:0::a", "169.254.1.1"])
    assert (c.hairpin_ipv4, c.hairpin_ipv6) == ("169.254.1.1", "fd00::a")
    c = AgentConfig(node_name="n1")
    assert (c.hairpin_ipv4, c.hairpin_ipv6) == (None, None)  # the datapath defaults


@pytest.mark.parametrize("field", ["sctp_init", "sctp_close"])
def test_sctp_short_timeouts_fit_their_16_bit_config_fields(field: str) -> None:
    """kp_cfg_v1 holds the SCTP INIT and close timeouts in 16 bits (the former padding): a larger value
    is refused by name, never truncated."""
    ok = AgentConfig(node_name="n1", node_ips=["192.0.2.1"], conntrack={field: 65535})
    assert getattr(ok.conntrack, field) == 65535
    with pytest.raises(ValidationError, match=field):
        AgentConfig(node_name="n1", node_ips=["192.0.2.1"], conntrack={field: 65536})
