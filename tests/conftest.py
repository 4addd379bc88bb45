"""Shared fixtures: a private bpffs, network namespaces, and the BPF objects under test.

Every fixture that creates kernel state removes it again, also when the test fails.
Tests marked `root` are skipped when not running as root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TC_OBJECT = REPO / "kproxy" / "bpf" / "obj" / "kproxy_tc.bpf.o"
TC_SOURCE = REPO / "bpfsrc" / "kproxy_tc.bpf.c"
PROBE_SOURCE = REPO / "tests" / "abi" / "probe_maps.bpf.c"
CLANG = shutil.which("clang-19") or shutil.which("clang") or "clang-19"
BPF_CFLAGS = [
    "-O2",
    "-g",
    "-target",
    "bpf",
    "-Wall",
    "-Werror",
    "-Wno-unused-function",
    f"-I{REPO / 'bpfsrc'}",
    f"-I{REPO / 'bpfsrc' / 'include'}",
    # <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory.
    f"-I/usr/include/{os.uname().machine}-linux-gnu",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (bpffs, network namespaces, BPF)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def run(cmd: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the exception text carries its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc  # type: ignore[no-any-return]


@pytest.fixture
def bpffs() -> Iterator[Path]:
    """Name: bpffs. Scope: function. Depends: root.

    A private bpf filesystem mounted on a fresh temporary directory; unmounted (which drops every
    pin in it) and removed afterwards.
    """
    d = Path(tempfile.mkdtemp(prefix="kpt-bpffs-"))
    run(["mount", "-t", "bpf", "bpf", str(d)])
    try:
        yield d
    finally:
        if run(["umount", str(d)], check=False).returncode != 0:
            run(["umount", "-l", str(d)], check=False)
        d.rmdir()


@dataclass
class NetNS:
    """A network namespace created by a test; `exec` runs commands inside it (same mount namespace,
    so a test's bpffs stays visible, unlike `ip netns exec`)."""

    name: str
    path: str = field(init=False)

    def __post_init__(self) -> None:
        self.path = f"/run/netns/{self.name}"

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args])

    def exec(self, argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", f"--net={self.path}", *argv], check=check, **kw)

    def python(self, code: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run Python code in the namespace with this interpreter (and so this venv)."""
        return self.exec([sys.executable, "-c", code], check=check, timeout=timeout)

    def veth(self, name: str, peer: str) -> None:
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer)
        self.ip("link", "set", name, "up")
        self.ip("link", "set", peer, "up")


@pytest.fixture
def netns() -> Iterator[Callable[[], NetNS]]:
    """Name: netns. Scope: function. Depends: root.

    Factory: each call creates a namespace named kpt-<6 hex> with lo up, waiting until it is usable.
    All of them are deleted afterwards.
    """
    created: list[NetNS] = []

    def make() -> NetNS:
        ns = NetNS(f"kpt-{secrets.token_hex(3)}")
        run(["ip", "netns", "add", ns.name])
        created.append(ns)
        deadline = time.monotonic() + 5
        while not os.path.exists(ns.path) and time.monotonic() < deadline:
            time.sleep(0.01)
        ns.ip("link", "set", "lo", "up")
        return ns

    try:
        yield make
    finally:
        for ns in created:
            run(["ip", "netns", "del", ns.name], check=False)


@pytest.fixture(scope="session")
def tc_object() -> Path:
    """Name: tc_object. Scope: session.

    Path of the packaged kproxy_tc.bpf.o (built by `make bpf`); skips while its source does not exist.
    """
    if not TC_OBJECT.exists():
        if not TC_SOURCE.exists():
            pytest.skip("bpfsrc/kproxy_tc.bpf.c does not exist yet")
        pytest.fail(f"{TC_OBJECT} is missing: run `make bpf`")
    return TC_OBJECT


def compile_bpf(source: Path, out_dir: Path) -> Path:
    out = out_dir / (source.name.removesuffix(".c") + ".o")
    run([CLANG, *BPF_CFLAGS, "-c", str(source), "-o", str(out)])
    return out


@pytest.fixture(scope="session")
def bpf_compile() -> Callable[[Path, Path], Path]:
    """Name: bpf_compile. Scope: session.

    compile(source, out_dir) -> object path, with the flags `make bpf` uses.
    """
    return compile_bpf


@pytest.fixture(scope="session")
def probe_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Name: probe_object. Scope: session.

    tests/abi/probe_maps.bpf.c compiled: every map of bpfsrc/maps.h and four trivial programs named
    kp_from_pod, kp_to_pod, kp_from_netdev, kp_to_netdev.
    """
    return compile_bpf(PROBE_SOURCE, tmp_path_factory.mktemp("probe"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- cgroups: children of the machine's cgroup2 mount only, never its root ----
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


@contextlib.contextmanager
def _child_cgroup(prefix: str) -> Iterator[Path]:
    """A fresh child cgroup of CGROUP_ROOT; its processes go back to the parent before rmdir."""
    from kproxy.bpf.socklb import cgroup2_mounts

    if str(CGROUP_ROOT) not in cgroup2_mounts():
        pytest.skip(f"no cgroup2 mounted at {CGROUP_ROOT}")
    cg = CGROUP_ROOT / f"{prefix}-{secrets.token_hex(4)}"
    cg.mkdir()
    try:
        yield cg
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # exited meanwhile
                (CGROUP_ROOT / "cgroup.procs").write_text(pid)
        cg.rmdir()


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    """Name: child_cgroup. Scope: function. A throwaway child cgroup, removed afterwards."""
    with _child_cgroup("kpt") as cg:
        yield cg


@pytest.fixture(scope="module")
def module_child_cgroup() -> Iterator[Path]:
    """Name: module_child_cgroup. Scope: module. A child cgroup shared by one module's tests."""
    with _child_cgroup("kpt-slb") as cg:
        yield cg
