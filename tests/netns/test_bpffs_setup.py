"""The agent on a fresh host: it mounts a bpf filesystem at /sys/fs/bpf when none is, creates its own
pin directory under it, and says so; read-only commands mount nothing.

Every kernel-facing case runs in a private mount namespace (`unshare --mount --propagation private`)
entered into a throw-away network namespace, so the bpffs the agent mounts, its pins and the programs
it attaches to that namespace's loopback vanish with the driver process. The root namespace's
/sys/fs/bpf is never touched; the tests check that too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.bpf.loader import BpffsError, mount_of, prepare_pin_dir

# Runs inside the private mount namespace. Makes /sys/fs/bpf look like SETUP says, runs a read-only
# command and then the agent with the default --bpffs, and prints what it saw as JSON.
_DRIVER = r"""
import json, os, signal, subprocess, sys, time

from kproxy.observe.metadata import metadata_path

args = json.loads(sys.argv[1])
kproxy = [sys.executable, "-m", "kproxy"]
ready = metadata_path("/sys/fs/bpf/kproxy")  # written after the agent's first sync: it is up
def fs_type(path):
    out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return out.stdout.strip()
def bpf_mounts():  # under /sys/fs/bpf only: labs of concurrent tests mount theirs elsewhere
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] + " " + l.partition(" - ")[2].split()[0]
                for l in f if l.split()[4].startswith("/sys/fs/bpf")]
# A fresh host, whatever the root namespace has at /sys/fs/bpf (nothing, on the test machine).
while subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode == 0:
    subprocess.run(["umount", "-l", "/sys/fs/bpf"], check=True)
for step in args["setup"]:
    subprocess.run(step, check=True)
out = {"setup_mounts": bpf_mounts()}
ro = subprocess.run([*kproxy, "stats", "-o", "json"], capture_output=True, text=True, timeout=30)
out["stats"] = {"rc": ro.returncode, "stderr": ro.stderr}
out["mounts_after_stats"] = bpf_mounts()
log = open(args["log"], "w")
agent = subprocess.Popen(
    [*kproxy, "agent", "--source", "file:" + args["manifests"], "--node-name", "n1",
     "--node-ip", "192.0.2.1", "--netdev", "lo", *args.get("agent_args", [])],
    stdout=log, stderr=subprocess.STDOUT,
)
try:
    deadline = time.monotonic() + args["timeout"]
    while time.monotonic() < deadline and agent.poll() is None and not ready.exists():
        time.sleep(0.05)
    out["ready"] = ready.exists()
    out["exit"] = agent.poll()
    out["root_type"] = fs_type("/sys/fs/bpf")
    # progs.debug and maps.debug belong to the bpffs mount itself.
    out["root_entries"] = sorted(set(os.listdir("/sys/fs/bpf")) - {"progs.debug", "maps.debug"})
    pins = "/sys/fs/bpf/kproxy"
    out["pins"] = sorted(os.listdir(pins)) if os.path.isdir(pins) else None
    out["pins_mode"] = oct(os.stat(pins).st_mode & 0o7777) if os.path.isdir(pins) else None
    out["mounts"] = bpf_mounts()
    if out["ready"] and agent.poll() is None:
        maps = subprocess.run([*kproxy, "stats", "-o", "json"], capture_output=True, text=True, timeout=30)
        out["stats_after"] = maps.returncode
finally:
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
log.close()
out["log"] = open(args["log"]).read()
print(json.dumps(out))
"""


def root_bpffs_state() -> tuple[list[str], list[str]]:
    """What the root mount namespace has at /sys/fs/bpf: mounts, and entries."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if line.split()[4].startswith("/sys/fs/bpf")]
    return mounts, sorted(os.listdir("/sys/fs/bpf")) if os.path.isdir("/sys/fs/bpf") else []


def run_fresh_host(
    netns_path: str, tmp_path: Path, setup: list[list[str]], timeout: float = 30, agent_args: Any = ()
) -> Any:
    """Run the driver in a private mount namespace inside NETNS_PATH; kill its whole process group
    (the agent included) if it overruns, so no namespace outlives the test."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    state = tmp_path / "state"
    args = {
        "setup": setup,
        "manifests": str(manifests),
        "log": str(tmp_path / "agent.log"),
        "timeout": timeout,
        "agent_args": list(agent_args),
    }
    env = {**os.environ, "KPROXY_STATE_ROOT": str(state)}
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "nsenter", f"--net={netns_path}"]
    cmd += [sys.executable, "-c", _DRIVER, json.dumps(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def untouched_root() -> Iterator[None]:
    """The root namespace's /sys/fs/bpf is the same after the test as before."""
    before = root_bpffs_state()
    yield
    assert root_bpffs_state() == before


@pytest.mark.root
def test_agent_mounts_bpffs_and_creates_its_directory_on_a_fresh_host(
    tc_object: Path, netns: Callable[[], Any], tmp_path: Path, untouched_root: None
) -> None:
    got = run_fresh_host(netns().path, tmp_path, setup=[])
    assert got["setup_mounts"] == []
    # A read-only command keeps its clear error and mounts nothing.
    assert got["stats"]["rc"] == 3, got["stats"]
    assert (
        "/sys/fs/bpf/kproxy does not exist (no bpf filesystem is mounted at /sys/fs/bpf)"
        in (got["stats"]["stderr"])
    )
    assert got["mounts_after_stats"] == []
    # The agent mounted one at /sys/fs/bpf (only there), pinned under its own directory, and said so.
    assert got["ready"], got["log"][-3000:]
    assert got["mounts"] == ["/sys/fs/bpf bpf"] and got["root_type"] == "bpf_fs"
    assert "mounted a bpf filesystem at /sys/fs/bpf" in got["log"]
    assert "created /sys/fs/bpf/kproxy" in got["log"]
    assert got["root_entries"] == ["kproxy"]
    assert {"kp_svc4_v1", "kp_be4_v1", "kp_ct4_v1", "links"} <= set(got["pins"])
    assert got["pins_mode"] == "0o700"
    assert got["stats_after"] == 0


@pytest.mark.root
def test_without_bpffs_mount_the_agent_mounts_nothing_and_exits_saying_so(
    tc_object: Path, netns: Callable[[], Any], tmp_path: Path, untouched_root: None
) -> None:
    """--no-bpffs-mount (the chart's: a containerised agent's mount would be its container's, its pins
    gone with the pod): a fresh host gets no mount, and the agent exits 3 naming the fix."""
    got = run_fresh_host(netns().path, tmp_path, setup=[], agent_args=["--no-bpffs-mount"])
    assert not got["ready"] and got["exit"] == 3, got["log"][-3000:]
    assert got["mounts"] == [] and got["pins"] is None
    assert "no bpf filesystem is mounted at /sys/fs/bpf and --no-bpffs-mount" in got["log"]
    assert "mount -t bpf bpf /sys/fs/bpf" in got["log"]


@pytest.mark.root
def test_agent_creates_its_directory_on_an_existing_bpffs(
    tc_object: Path, netns: Callable[[], Any], tmp_path: Path, untouched_root: None
) -> None:
    setup = [["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], ["mkdir", "/sys/fs/bpf/other-tool"]]
    got = run_fresh_host(netns().path, tmp_path, setup=setup)
    assert got["setup_mounts"] == ["/sys/fs/bpf bpf"]
    assert got["stats"]["rc"] == 3 and "does not exist: is the agent running" in got["stats"]["stderr"]
    assert got["ready"], got["log"][-3000:]
    assert got["mounts"] == ["/sys/fs/bpf bpf"], "the agent mounted a second bpffs over the first"
    assert "created /sys/fs/bpf/kproxy" in got["log"]
    assert "mounted a bpf filesystem" not in got["log"]
    assert got["root_entries"] == ["kproxy", "other-tool"]
    assert {"kp_svc4_v1", "links"} <= set(got["pins"])


@pytest.mark.root
def test_agent_never_mounts_over_another_filesystem(
    tc_object: Path, netns: Callable[[], Any], tmp_path: Path, untouched_root: None
) -> None:
    setup = [["mount", "-t", "tmpfs", "-o", "size=1m", "kpt-tmpfs", "/sys/fs/bpf"]]
    got = run_fresh_host(netns().path, tmp_path, setup=setup, timeout=15)
    assert got["exit"] == 3, got["log"]
    assert "/sys/fs/bpf is not a bpf filesystem but on the tmpfs mounted at /sys/fs/bpf" in got["log"]
    assert "mount -t bpf bpf /sys/fs/bpf" in got["log"]
    assert got["mounts"] == got["setup_mounts"] == ["/sys/fs/bpf tmpfs"]
    assert got["root_type"] == "tmpfs" and got["pins"] is None


# ---- refusals that never reach mount(2) (no namespace needed) ----
def test_a_directory_on_another_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BpffsError) as exc:
        prepare_pin_dir(tmp_path)
    point, fs_type = mount_of(str(tmp_path))
    text = str(exc.value)
    assert text.startswith(f"{tmp_path} is not on a bpf filesystem but on the {fs_type} mounted at {point}")
    assert f"`mount -t bpf bpf {tmp_path}`" in text and "under /sys/fs/bpf" in text


def test_a_missing_directory_outside_the_bpffs_root_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(BpffsError, match="does not exist and .* is not on a bpf filesystem"):
        prepare_pin_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    # A bpffs root that is not the kernel's empty sysfs directory is never mounted over.
    with pytest.raises(BpffsError, match="which kproxy does not mount over"):
        prepare_pin_dir(tmp_path / "kproxy", bpffs_root=str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(BpffsError, match="is not a directory"):
        prepare_pin_dir(tmp_path / "file")


def test_the_cli_and_the_loader_agree_on_the_bpffs_root() -> None:
    from kproxy import config
    from kproxy.bpf import loader

    assert config.BPFFS_ROOT == loader.BPFFS_ROOT and config.DEFAULT_BPFFS == loader.BPFFS_ROOT + "/kproxy"
