"""AgentConfig: defaults and the errors a mistyped flag gets."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from kproxy.config import AgentConfig


def test_defaults():
    c = AgentConfig(node_name="n1", node_ips=["fd00::1", "192.168.1.10"])
    assert c.bpffs == "/sys/fs/bpf/kproxy" and c.source == "kubernetes" and c.source_dir is None
    assert (c.metrics_bind, c.health_bind) == ("127.0.0.1:10249", "0.0.0.0:10256")
    assert c.primary_ipv4 == "192.168.1.10"
    assert c.map_sizes.by_map_name()["kp_ct4_v1"] == 262144
    assert c.translate_config().nodeport_addresses == ()


def test_file_source_and_nodeport_cidrs():
    c = AgentConfig(node_name="n1", source="file:/etc/kproxy", nodeport_addresses=["10.0.0.0/8"])
    assert c.source_dir == "/etc/kproxy"
    assert c.translate_config().nodeport_addresses == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    "kw, expect",
    [
        (dict(node_ips=["300.1.1.1"]), "--node-ip '300.1.1.1'"),
        (dict(source="files"), "'kubernetes' or 'file:DIR'"),
        (dict(nodeport_addresses=["10.0.0.0/33"]), "is not a CIDR"),
        (dict(metrics_bind="localhost"), "HOST:PORT"),
        (dict(node_name=""), "node_name"),
        (dict(map_sizes={"ct4": 1}), "ct4"),
    ],
)
def test_invalid(kw, expect):
    args = {"node_name": "n1", **kw}
    with pytest.raises(ValidationError) as ei:
        AgentConfig(**args)
    assert expect in str(ei.value)
