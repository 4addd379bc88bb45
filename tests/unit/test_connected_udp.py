"""The agent's queue of removed UDP backends (kproxy.agent.udpsockets) and the namespace walk of a cgroup,
without the kernel: a stand-in destroyer records what it is asked (tests/bpf/test_sockdestroy.py and
tests/netns/test_udp_destroy.py run the real one)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from kproxy.abi import Scope
from kproxy.agent.udpsockets import ConnectedUdp
from kproxy.bpf.sockdestroy import Destroyed, DestroyRun, Netns, Removal, cgroup_namespaces, close_namespaces
from kproxy.observe.metrics import Metrics, scrape_value

ADDR = socket.inet_aton("10.244.1.11")
LEFT = [
    (4, 7, ADDR, socket.htons(53)),
    (6, 0x80000001, socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.htons(53)),
]


class FakeDestroyer:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Removal], list[Netns]]] = []

    def run(self, removals: Sequence[Removal], namespaces: Sequence[Netns]) -> DestroyRun:
        self.calls.append((list(removals), list(namespaces)))
        r = DestroyRun(removals=len(removals), namespaces=len(namespaces))
        r.sockets = [
            Destroyed(1, 4, 7, ADDR, 53, 0),
            Destroyed(2, 6, 7, bytes(16), 53, 0),
            Destroyed(3, 4, 7, ADDR, 53, -16),
        ]
        return r

    def close(self) -> None:
        pass


def agent_part(
    attached: bool, cgroup: str | None = None, host_only: bool = False
) -> tuple[ConnectedUdp, Metrics]:
    metrics = Metrics(CollectorRegistry())
    cfg = SimpleNamespace(socket_lb_host_netns_only=host_only)
    dp = SimpleNamespace(socklb=object() if attached else None, socket_lb_cgroup=cgroup, cfg=cfg)
    return ConnectedUdp(dp, lambda: metrics), metrics  # type: ignore[arg-type]


def value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return scrape_value(m.render().decode(), name, labels) or 0.0


def test_nothing_happens_without_socket_lb() -> None:
    part, m = agent_part(attached=False)
    part.removed(LEFT)
    assert not part._pending
    assert value(m, "kproxy_socket_lb_udp_removals_unhandled_total", {"reason": "unsupported"}) == 0


def test_without_the_iterator_each_removal_is_counted_unhandled() -> None:
    part, m = agent_part(attached=True)
    part.problem = "this kernel has no bpf_sock_destroy kfunc (Linux >= 6.5)"
    part.removed(LEFT)
    part.removed(LEFT[:1])
    assert not part._pending
    assert value(m, "kproxy_socket_lb_udp_removals_unhandled_total", {"reason": "unsupported"}) == 3


def test_removals_are_queued_and_one_run_counts_what_it_destroyed(tmp_path: Path) -> None:
    part, m = agent_part(attached=True, cgroup=str(tmp_path))
    fake = FakeDestroyer()
    part.destroyer = fake  # type: ignore[assignment]
    part.removed(LEFT)
    part.removed(LEFT[:1])  # a second sync before the run: one run for both
    assert part._wake.is_set() and len(part._pending) == 3
    batch, part._pending = part._pending, []
    assert part.run_once(batch) is not None
    ((removals, spaces),) = fake.calls
    assert removals[0] == Removal(4, 7, ADDR, 53) and removals[1].family == 6 and removals[1].port == 53
    assert len(spaces) == 1 and spaces[0].what == "agent"  # an empty cgroup: the agent's own namespace
    assert value(m, "kproxy_socket_lb_udp_sockets_destroyed_total", {"family": "IPv4"}) == 1
    assert value(m, "kproxy_socket_lb_udp_sockets_destroyed_total", {"family": "IPv6"}) == 1
    assert value(m, "kproxy_socket_lb_udp_destroy_errors_total") == 1


def test_a_failed_run_counts_its_removals_as_unhandled() -> None:
    part, m = agent_part(attached=True)

    class Broken(FakeDestroyer):
        def run(self, removals: Sequence[Removal], namespaces: Sequence[Netns]) -> Any:
            raise OSError(1, "Operation not permitted")

    part.destroyer = Broken()  # type: ignore[assignment]
    assert part.run_once([Removal(4, 7, ADDR, 53)]) is None
    assert value(m, "kproxy_socket_lb_udp_removals_unhandled_total", {"reason": "error"}) == 1


def test_cgroup_namespaces_are_deduplicated(tmp_path: Path) -> None:
    """Every process of a cgroup tree, each namespace once: here the test's own process, listed twice and
    in a child cgroup, is the agent's namespace too; a gone pid is skipped."""
    (tmp_path / "child").mkdir()
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n999999999\n")
    (tmp_path / "child" / "cgroup.procs").write_text(f"{os.getpid()}\n")
    found = cgroup_namespaces(str(tmp_path))
    try:
        assert [n.what for n in found] == ["agent"]
        assert found[0].ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        close_namespaces(found)
    found = cgroup_namespaces(str(tmp_path), include_self=False)
    try:
        assert [n.what for n in found] == [f"pid {os.getpid()}"]
    finally:
        close_namespaces(found)


# ---- a removal undone before its run (the syncer's view at run time) ----
def _syncer_and_part() -> tuple[Any, ConnectedUdp]:
    from kproxy.bpf.mapapi import MemoryMapSet
    from kproxy.sync import Syncer

    syncer = Syncer(MemoryMapSet())
    metrics = Metrics(CollectorRegistry())
    dp = SimpleNamespace(socklb=object(), socket_lb_cgroup=None, cfg=None)
    part = ConnectedUdp(dp, lambda: metrics, slot_backends=syncer.slot_backends)  # type: ignore[arg-type]
    part.destroyer = FakeDestroyer()  # type: ignore[assignment]
    return syncer, part


def _dns(service: str, vip: str, addrs: list[str]) -> Any:
    from kproxy.desired import BackendRef, Frontend

    backends = tuple(BackendRef(a, 5353, "UDP") for a in addrs)
    return [Frontend(service, "dns", "ClusterIP", vip, 53, "UDP", Scope.EXT, 0, 0, backends, ())]


def test_a_backend_back_in_its_service_port_before_the_run_keeps_its_sockets() -> None:
    """Removed in one sync, re-added in the next before the queued run: the run must not destroy the
    sockets connected to it (some connected after it came back); the other removal still runs."""
    syncer, part = _syncer_and_part()
    cases = (("10.96.0.10", "10.244.1.1", "10.244.1.2"), ("fd00:96::a", "fd00:244::1", "fd00:244::2"))
    for vip, a, b in cases:
        syncer.apply({"kube-system/dns": _dns("kube-system/dns", vip, [a, b])})
        r = syncer.apply({"kube-system/dns": _dns("kube-system/dns", vip, [])})
        assert len(r.udp_left) == 2
        part.removed(r.udp_left)
        syncer.apply({"kube-system/dns": _dns("kube-system/dns", vip, [a])})  # a is back, b is not
        left = part.still_removed(part._pending)
        part._pending.clear()
        fam = 6 if ":" in vip else 4
        af = socket.AF_INET6 if fam == 6 else socket.AF_INET
        assert [(x.family, socket.inet_ntop(af, x.addr), x.port) for x in left] == [(fam, b, 5353)]


def test_the_removals_of_a_deleted_service_stay() -> None:
    """A Service deleted: no port has its id any more, its backends' sockets are destroyed."""
    syncer, part = _syncer_and_part()
    syncer.apply({"a/dns": _dns("a/dns", "10.96.0.10", ["10.244.1.1"])})
    part.removed(syncer.apply({"a/dns": []}).udp_left)
    syncer.apply({"b/dns": _dns("b/dns", "10.96.0.11", ["10.244.1.1"])})  # the pod in another Service
    assert len(part._pending) == 1 and part.still_removed(part._pending) == part._pending


# ---- --no-socket-lb-destroy-connected-udp ----
def test_switched_off_nothing_is_loaded_and_removals_are_counted_disabled(monkeypatch: Any) -> None:
    from kproxy.agent import udpsockets

    def no_load(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the iterator object is loaded although the feature is off")

    monkeypatch.setattr(udpsockets, "SockDestroyer", no_load)
    metrics = Metrics(CollectorRegistry())
    dp = SimpleNamespace(socklb=object(), socket_lb_cgroup="/nonexistent", cfg=SimpleNamespace(bpffs="/x"))
    part = ConnectedUdp(dp, lambda: metrics, enabled=False)  # type: ignore[arg-type]
    part.setup()
    assert part.destroyer is None and part.problem is not None
    part.removed(LEFT)
    assert not part._pending and not part._wake.is_set()
    assert value(metrics, "kproxy_socket_lb_udp_removals_unhandled_total", {"reason": "disabled"}) == 2
    assert value(metrics, "kproxy_socket_lb_udp_removals_unhandled_total", {"reason": "unsupported"}) == 0


def test_the_agent_flag_reaches_the_agent_part() -> None:
    from kproxy.agent.core import Agent
    from kproxy.cli.agent import agent, config_values
    from kproxy.config import AgentConfig

    def cfg(*args: str) -> AgentConfig:
        ctx = agent.make_context("agent", ["--node-ip", "192.0.2.1", *args])
        return AgentConfig.model_validate(config_values(ctx.params))

    assert cfg().socket_lb_destroy_connected_udp is True
    off = cfg("--no-socket-lb-destroy-connected-udp")
    assert off.socket_lb_destroy_connected_udp is False
    assert Agent(off).connected_udp.enabled is False
    on = Agent(cfg())
    assert on.connected_udp.enabled is True and on.connected_udp.slot_backends is not None


def test_a_namespace_the_agent_may_not_open_is_said_once(
    tmp_path: Path, monkeypatch: Any, caplog: Any
) -> None:
    """No CAP_SYS_PTRACE (or an LSM's ptrace rule): opening /proc/PID/ns/net fails with EACCES. Not taken
    for an exited process: listed, and the agent warns once, naming what it needs."""
    import errno
    import logging

    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    real_open = os.open

    def deny(path: Any, *a: Any, **kw: Any) -> int:
        if str(path) == "/proc/1/ns/net":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    denied: list[str] = []
    close_namespaces(cgroup_namespaces(str(tmp_path), denied=denied))
    assert denied == ["pid 1: Permission denied"]
    part, _ = agent_part(attached=True, cgroup=str(tmp_path))
    part.destroyer = FakeDestroyer()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="kproxy.agent"):
        part.run_once([Removal(4, 7, ADDR, 53)])
        part.run_once([Removal(4, 7, ADDR, 53)])
    said = [r.getMessage() for r in caplog.records if "cannot open the network namespace" in r.getMessage()]
    assert len(said) == 1 and "pid 1: Permission denied" in said[0] and "CAP_SYS_PTRACE" in said[0]


def test_closing_waits_for_the_run_in_progress(monkeypatch: Any) -> None:
    """The agent stops (tasks cancelled, then close) while a worker thread still runs the iterator: the
    object's fds must not be closed under it."""
    import threading
    import time

    from kproxy.bpf.sockdestroy import SockDestroyer

    d = SockDestroyer(None, "/nonexistent.o")
    closed: list[str] = []
    d.link = SimpleNamespace(close=lambda: closed.append("link"), fd=-1)  # type: ignore[assignment]
    d.filter = SimpleNamespace(update_batch=lambda *a: None, delete_batch=lambda *a: None)  # type: ignore[assignment]
    entered, release = threading.Event(), threading.Event()

    def slow(namespaces: Any, result: Any) -> None:
        entered.set()
        release.wait(5)
        assert not closed, "closed during the run"

    monkeypatch.setattr(d, "_in_thread", slow)
    runner = threading.Thread(target=d.run, args=([Removal(4, 7, ADDR, 53)], []))
    runner.start()
    assert entered.wait(5)
    closer = threading.Thread(target=d.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive() and not closed
    release.set()
    runner.join(5)
    closer.join(5)
    assert closed == ["link"] and d.link is None


def test_host_namespace_only_walks_the_agents_namespace_alone(tmp_path: Path, monkeypatch: Any) -> None:
    """--socket-lb-host-netns-only: the hooks translate only the agent's namespace's sockets, so the
    cgroup's other processes are not even looked at (no hostPID or CAP_SYS_PTRACE needed)."""
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    opened: list[str] = []
    real_open = os.open

    def record(path: Any, *a: Any, **kw: Any) -> int:
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", record)
    cgroup_pids = [f"/proc/{os.getpid()}/ns/net", "/proc/1/ns/net"]
    for host_only in (True, False):
        opened.clear()
        part, _ = agent_part(attached=True, cgroup=str(tmp_path), host_only=host_only)
        fake = FakeDestroyer()
        part.destroyer = fake  # type: ignore[assignment]
        part.run_once([Removal(4, 7, ADDR, 53)])
        walked = [p for p in opened if p.endswith("/ns/net")]
        assert walked == ["/proc/self/ns/net"] + ([] if host_only else cgroup_pids)
        ((_, spaces),) = fake.calls
        assert [n.what for n in spaces][:1] == ["agent"]


def test_a_namespace_is_walked_again_while_a_walk_destroyed_sockets_over_several_reads(
    monkeypatch: Any,
) -> None:
    """Linux 6.5 to 6.15 resume a UDP iterator in a bucket by count, so a walk whose output took several
    reads may have skipped live sockets behind destroyed ones: another walk, until one destroys nothing
    or fits one read (bounded)."""
    import contextlib

    from kproxy.bpf import libbpf as lb
    from kproxy.bpf import sockdestroy as sd

    walks: list[tuple[list[Destroyed], int]] = [
        ([Destroyed(1, 4, 7, ADDR, 53, 0)] * 200, 3),  # several reads: a skip may have happened
        ([Destroyed(2, 4, 7, ADDR, 53, 0)], 1),  # the skipped one, in one read: done
        ([Destroyed(3, 4, 7, ADDR, 53, 0)], 1),  # never reached
    ]
    monkeypatch.setattr(lb, "iter_create", lambda fd, what: contextlib.nullcontext(SimpleNamespace(fd=-1)))
    monkeypatch.setattr(sd.SockDestroyer, "_read", staticmethod(lambda fd: walks.pop(0)))
    d = sd.SockDestroyer.__new__(sd.SockDestroyer)
    d.link = SimpleNamespace(fd=-1)  # type: ignore[assignment]
    spaces = cgroup_namespaces(None)
    try:
        result = DestroyRun(removals=1, namespaces=1)
        d._walk(spaces, result)
    finally:
        close_namespaces(spaces)
    assert result.destroyed == 201 and [w[0][0].cookie for w in walks] == [3]

    walks[:] = [([Destroyed(1, 4, 7, ADDR, 53, 0)] * 200, 3)] * (sd.MAX_WALKS + 1)
    result = DestroyRun(removals=1, namespaces=1)
    spaces = cgroup_namespaces(None)
    try:
        d._walk(spaces, result)
    finally:
        close_namespaces(spaces)
    assert result.destroyed == 200 * sd.MAX_WALKS and len(walks) == 1  # bounded
