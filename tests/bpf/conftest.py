"""Fixtures for the PROG_TEST_RUN tables.

dp
    Name: dp. Scope: function. Depends: bpf_object.
    A Datapath with every map emptied and counters zeroed before the test.
bpf_object
    Name: bpf_object. Scope: module. Depends: root, tc_object (tests/conftest.py).
    kproxy_tc.bpf.o loaded once per module, its maps pinned in a private bpffs mount (module-scoped,
    so it cannot use the function-scoped `bpffs` fixture).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath import Datapath, open_datapath, private_bpffs


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
