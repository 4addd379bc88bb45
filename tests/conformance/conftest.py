"""Fixtures for the conformance tier: kube-proxy's own packet-flow tables replayed with real packets.

One lab for the whole directory's module: 2 nodes, socket LB for the node's processes, pods

    n1p1                    the client pod (kube-proxy's 10.0.0.2 / 10.180.0.2), never an endpoint
    n1p2 n1p3 n1p4 n1p5     endpoints on the ingress node n1 (kube-proxy's "test-node")
    n2p1 n2p2 n2p3          endpoints on n2 (kube-proxy's "other-node", "node-1", "node2", "remote", ...)

(the addresses the test module adds inside the lab's namespaces are described there).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.bpf.socklb import cgroup2_mounts
from kproxy.lab import Lab
from kproxy.lab.cluster import CGROUP2_ROOT

LOG_KEEP_DIR = os.environ.get("KPROXY_LAB_LOGS")  # copy the lab's logs here after the module, if set

EXTRA_PODS = {"n1": 2}  # on top of 3 pods per node


@pytest.fixture(scope="module")
def clab(tc_object: Path) -> Iterator[Lab]:
    """Name: clab. Scope: module. Depends: root, tc_object.

    The lab described above, agents running with socket LB on a child cgroup per node;
    everything (namespaces, processes, bpffs, cgroups) removed after the module.
    """
    if str(CGROUP2_ROOT) not in cgroup2_mounts():
        pytest.skip(f"no cgroup2 mounted at {CGROUP2_ROOT} (node clients need a socket-LB cgroup)")
    with Lab(nodes=2, pods_per_node=3, socket_lb=True) as lab:
        try:
            for node, count in EXTRA_PODS.items():
                for _ in range(count):
                    lab.add_pod(node)
            yield lab
        finally:
            if LOG_KEEP_DIR:
                shutil.copytree(lab.dir / "logs", Path(LOG_KEEP_DIR) / lab.prefix, dirs_exist_ok=True)
