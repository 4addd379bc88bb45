"""Fixtures for the PROG_TEST_RUN tables.

dp
    Name: dp. Scope: function. Depends: bpf_object.
    A Datapath with every map emptied and counters zeroed before the test.
bpf_object
    Name: bpf_object. Scope: module. Depends: root, tc_object (tests/conftest.py).
    kproxy_tc.bpf.o loaded once per module, its maps pinned in a private bpffs mount (module-scoped,
    so it cannot use the function-scoped `bpffs` fixture).
ipv6_counts_in_kp_stats6
    Name: ipv6_counts_in_kp_stats6. Scope: function, autouse in modules with IPV6_ONLY = True.
    After each test (but those named in the module's SENDS_IPV4), no counter of kp_stats_v1 moved: an
    IPv6 packet counts in kp_stats6_v1 (kproxy stats and the metrics split the families).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath import Datapath, open_datapath, private_bpffs

from kproxy.abi import Stat


@pytest.fixture(scope="module")
def bpf_object(tc_object: Path) -> Iterator[Datapath]:
    if os.geteuid() != 0:
        pytest.skip("PROG_TEST_RUN and bpffs need root")
    with private_bpffs() as bpffs:
        obj, dp = open_datapath(bpffs, tc_object)
        try:
            yield dp
        finally:
            obj.close()


@pytest.fixture
def dp(bpf_object: Datapath) -> Datapath:
    bpf_object.reset()
    return bpf_object


@pytest.fixture(autouse=True)
def ipv6_counts_in_kp_stats6(request: pytest.FixtureRequest) -> Iterator[None]:
    if not getattr(request.module, "IPV6_ONLY", False):
        yield
        return
    dp: Datapath = request.getfixturevalue("dp")  # set up before this fixture's teardown runs
    yield
    if request.node.name.split("[")[0] in getattr(request.module, "SENDS_IPV4", ()):
        return
    moved = {s.name: dp.stat(s, family=4)[0] for s in Stat if dp.stat(s, family=4)[0]}
    assert not moved, f"IPv6 packets counted in kp_stats_v1: {moved}"
