"""A private network namespace for the PROG_TEST_RUN runs whose programs call bpf_fib_lookup: that helper
reads the routing table of the calling thread's namespace, so those runs happen in one of these, which
holds a veth "node" interface (kpe0) with fixed routes and permanent neighbours: verdicts and MACs are
exact. Subclasses add their addresses, routes and neighbours in setup().
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from datapath import Datapath

from kproxy.bpf.libbpf import TestRun, prog_test_run

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class FibLab:
    """kpe0 (up, its veth peer kpe1 up too) in a namespace named PREFIX-<hex>, removed by delete()."""

    prefix = "kpt"

    def __init__(self) -> None:
        self.name = f"{self.prefix}-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", "kpe0", "type", "veth", "peer", "name", "kpe1")
            self.ip("link", "set", "kpe0", "up")
            self.ip("link", "set", "kpe1", "up")
            self.setup()
            link = json.loads(self.ip("-j", "link", "show", "kpe0"))[0]
            self.ifindex = int(link["ifindex"])
            self.mac = bytes.fromhex(link["address"].replace(":", ""))
        except BaseException:
            self.delete()
            raise

    def setup(self) -> None:
        """Addresses, routes, neighbours and sysctls of the namespace."""

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def sysctl(self, setting: str) -> None:
        sh("nsenter", f"--net=/run/netns/{self.name}", "sysctl", "-qw", setting)

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Run the calling thread in the namespace (setns changes only this thread)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name}")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test's namespace")
        finally:
            os.close(home)
            os.close(target)

    def run(self, dp: Datapath, prog: str, frame: bytes, flags: int = 0) -> TestRun:
        """Run `prog` as if the frame arrived on kpe0 (struct __sk_buff ifindex at offset 40); `flags`:
        BPF_F_TEST_* (BPF_F_TEST_SKB_CHECKSUM_COMPLETE: the kernel checks skb->csum afterwards)."""
        ctx = bytearray(192)
        struct.pack_into("=I", ctx, 36, self.ifindex)  # ingress_ifindex
        struct.pack_into("=I", ctx, 40, self.ifindex)  # ifindex
        with self.inside():
            return prog_test_run(dp.progs[prog], frame, bytes(ctx), flags=flags)

    def run_xdp(self, dp: Datapath, frame: bytes, prog: str = "kp_xdp", repeat: int = 1) -> TestRun:
        """Run the XDP program `prog` as if the frame arrived on kpe0 (struct xdp_md: data 0, data_end,
        data_meta 0, ingress_ifindex; the kernel binds the run to kpe0's first receive queue)."""
        ctx = struct.pack("=6I", 0, len(frame), 0, self.ifindex, 0, 0)
        with self.inside():
            return prog_test_run(dp.progs[prog], frame, ctx, repeat=repeat)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)
