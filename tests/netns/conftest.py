"""Fixtures for the netns tier: one lab (2 nodes x 2 pods, agents running) shared by a test module.

Tests program their own Services (each with its own cluster IP) through the lab's manifests
directory and wait until every agent has written them to its maps before sending traffic.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab import Lab
from kproxy.lab import manifests as mf

LOG_KEEP_DIR = os.environ.get("KPROXY_LAB_LOGS")  # copy the lab's logs here after the module, if set


@pytest.fixture(scope="module")
def lab(tc_object: Path) -> Iterator[Lab]:
    """Name: lab. Scope: module. Depends: root, tc_object.

    A running lab with an agent per node; removed (namespaces, processes, bpffs) after the module.
    """
    with Lab(nodes=2, pods_per_node=2) as lb:
        try:
            yield lb
        finally:
            if LOG_KEEP_DIR:
                shutil.copytree(lb.dir / "logs", Path(LOG_KEEP_DIR) / lb.prefix, dirs_exist_ok=True)


@pytest.fixture
def program(lab: Lab) -> Callable[..., None]:
    """Name: program. Scope: function. Depends: lab.

    program(name, cluster_ip, pods, port=80, target=8080, protocol="TCP", wait=True, node_port=None,
    **service kwargs): write Service NAME (cluster_ip:port -> target on PODS, one EndpointSlice) as
    its own manifest and, unless wait=False, wait until every agent programmed it.
    """

    def do(
        name: str,
        cluster_ip: str,
        pods: Iterable[str],
        port: int = 80,
        target: int = 8080,
        protocol: str = "TCP",
        wait: bool = True,
        node_port: int | None = None,
        **service_kw: Any,
    ) -> None:
        p = mf.Port(name="p", port=port, target=target, protocol=protocol, node_port=node_port)
        pod_objs = [lab.pod(n) for n in pods]
        lab.write_manifest(
            name,
            [
                mf.service(name, [p], cluster_ip, **service_kw),
                mf.endpoint_slice(name, [(po.ip, po.node) for po in pod_objs], [p]),
            ],
        )
        if wait:
            lab.wait_programmed(cluster_ip, port, [po.ip for po in pod_objs], protocol)

    return do


@pytest.fixture
def program_dual(lab: Lab) -> Callable[..., None]:
    """Name: program_dual. Scope: function. Depends: lab.

    program_dual(name, cluster_ip, cluster_ip6, pods, port=80, target=8080, protocol="TCP", wait=True,
    wait6=True, node_port=None, **service kwargs): as `program`, for a dual-stack Service
    (RequireDualStack, clusterIPs of both families unless ip_families/ip_family_policy say otherwise)
    with one EndpointSlice per family listing the PODS' addresses of that family. `wait` waits for the
    IPv4 ClusterIP, `wait6` for the IPv6 one, in every agent's maps.
    """

    def do(
        name: str,
        cluster_ip: str,
        cluster_ip6: str,
        pods: Iterable[str],
        port: int = 80,
        target: int = 8080,
        protocol: str = "TCP",
        wait: bool = True,
        wait6: bool = True,
        node_port: int | None = None,
        **service_kw: Any,
    ) -> None:
        p = mf.Port(name="p", port=port, target=target, protocol=protocol, node_port=node_port)
        pod_objs = [lab.pod(n) for n in pods]
        endpoints = [(po.ip, po.ip6, po.node) for po in pod_objs]
        objects = mf.dual_stack_objects(name, [p], cluster_ip, cluster_ip6, endpoints, **service_kw)
        lab.write_manifest(name, objects)
        if wait:
            lab.wait_programmed(cluster_ip, port, [po.ip for po in pod_objs], protocol)
        if wait6:
            lab.wait_programmed(cluster_ip6, port, [po.ip6 for po in pod_objs], protocol)

    return do
