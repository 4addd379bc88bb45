"""Connected UDP sockets follow the removal of their backend (socket-level balancing, issue 17).

Socket LB (kproxy.bpf.socklb) picks a connected UDP socket's backend once, at connect(). When that
backend leaves the Service the socket would keep sending to it; kube-proxy clears the conntrack entries
of such flows, kproxy destroys the sockets: kproxy_iter.bpf.o (bpfsrc/kproxy_iter.bpf.c) walks the UDP
sockets of a network namespace (a BPF iterator, iter/udp) and calls the kfunc bpf_sock_destroy (kernel
>= 6.5) on each connected socket whose peer is a removed backend it reached through the Service it left
(its reverse entry in kp_sknat4_v1 / kp_sknat6_v1, re-used by their pins, says so). The application
gets ECONNABORTED, its socket is no longer connected, it connects again and gets a live backend.

A UDP iterator walks the network namespace of the thread that creates its fd (fs/proc/proc_net.c,
bpf_iter_init_seq_net: current->nsproxy->net_ns), and socket LB's cgroup holds processes of many
namespaces (hostNetwork pods, the node's processes, pods when it is the root cgroup). So one run fills
the filter map kp_skd_v1 with all removals of one sync, then, in a thread of its own, enters each network
namespace of the cgroup's processes in turn (setns), creates an iterator there and reads it to the end,
and comes back. What each iterator wrote (struct kp_skd_event per matched socket) is what was destroyed.

Without bpf_sock_destroy or UDP iterators the object does not load: load() raises SockDestroyUnavailable
naming the missing kernel feature, and the agent falls back (connected sockets keep their backend).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.resources
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.loader import LoaderError, MapParamsMismatch, pinned_param_diffs

log = logging.getLogger("kproxy.sockdestroy")

PROG_ITER_UDP = "kp_iter_udp"
CLONE_NEWNET = 0x40000000
KFUNC = "bpf_sock_destroy"
# read() size of an iterator: well below its seq_file buffer (8 pages, kernel/bpf/bpf_iter.c), so a
# read ends when this much is written and never on a full buffer. On a full buffer the kernel drops the
# output of the socket being shown and shows it again on the next read, but a destroyed socket has left
# its hash bucket by then: its record would be lost (measured: 1 in 1,000 with 64 KiB reads).
READ_CHUNK = 4096
# Walks of one namespace while the last one destroyed sockets and took more than one read. Linux 6.5 to
# 6.15 resume a UDP iterator inside a hash bucket by counting sockets: when a read ends mid-bucket after
# sockets of that bucket were destroyed (they left it), the next read skips as many live ones. A walk
# that fits in one read never resumes; another walk finds the skipped ones (later kernels resume by
# socket cookie, and the extra walk finds nothing).
MAX_WALKS = 4


def default_object_path() -> str:
    return str(importlib.resources.files("kproxy.bpf").joinpath("obj", "kproxy_iter.bpf.o"))


class SockDestroyUnavailable(LoaderError):
    """Connected UDP sockets cannot be destroyed on this node; the message says which feature is missing."""


@dataclass(frozen=True, order=True)
class Removal:
    """A UDP backend that left a Service port: sockets sent to it through SVC_ID are to be destroyed."""

    family: int  # 4 | 6: the flow's (a dual-stack socket's v4-mapped peer is 4)
    svc_id: int
    addr: bytes  # NBO, 4 or 16 bytes
    port: int  # host order

    def key(self) -> abi.SkdKey:
        k = abi.SkdKey()
        ctypes.memmove(ctypes.addressof(k.addr), self.addr, len(self.addr))
        k.svc_id = self.svc_id
        k.port = socket.htons(self.port)
        k.family = self.family
        k.proto = abi.IPPROTO_UDP
        return k

    def __str__(self) -> str:
        if self.family == 4:
            return f"{socket.inet_ntop(socket.AF_INET, self.addr)}:{self.port} (service port {self.svc_id})"
        return f"[{socket.inet_ntop(socket.AF_INET6, self.addr)}]:{self.port} (service port {self.svc_id})"


@dataclass(frozen=True)
class Destroyed:
    """One socket the iterator matched (struct kp_skd_event)."""

    cookie: int
    family: int
    svc_id: int
    addr: bytes
    port: int
    err: int  # 0: destroyed; else -errno of bpf_sock_destroy

    @classmethod
    def parse(cls, raw: bytes) -> Destroyed:
        ev = abi.SkdEvent.from_buffer_copy(raw)
        n = 4 if ev.family == 4 else 16
        return cls(ev.cookie, ev.family, ev.svc_id, bytes(ev.addr)[:n], socket.ntohs(ev.port), ev.err)


@dataclass
class DestroyRun:
    """What one run did, over every namespace it visited."""

    removals: int = 0
    namespaces: int = 0
    sockets: list[Destroyed] = field(default_factory=list)
    failed_namespaces: list[str] = field(default_factory=list)  # "what: why" of namespaces not walked
    seconds: float = 0.0

    @property
    def destroyed(self) -> int:
        return sum(1 for s in self.sockets if s.err == 0)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.sockets if s.err != 0)


def missing_kernel_feature() -> str | None:
    """What the running kernel lacks for destroying sockets from an iterator, in words for the log; None
    when it has both (or its BTF cannot be read: then the load says)."""
    if lb.vmlinux_btf_has("bpf_iter__udp", lb.BTF_KIND_STRUCT) is False:
        return "this kernel has no BPF UDP socket iterator (iter/udp, Linux >= 5.9)"
    if lb.vmlinux_btf_has(KFUNC, lb.BTF_KIND_FUNC) is False:
        return f"this kernel has no {KFUNC} kfunc (Linux >= 6.5)"
    return None


# ---- the network namespaces of a cgroup's processes ----
@dataclass(frozen=True)
class Netns:
    """A network namespace, by an open fd of it (held until close) and the process it was found by."""

    ino: int
    fd: int
    what: str  # "pid 1234" or "agent"


def _cgroup_pids(cgroup: str) -> Iterator[int]:
    for dirpath, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                text = f.read()
        except OSError:
            continue  # removed while walked
        for line in text.split():
            with contextlib.suppress(ValueError):
                yield int(line)


def cgroup_namespaces(
    cgroup: str | None, include_self: bool = True, denied: list[str] | None = None
) -> list[Netns]:
    """The distinct network namespaces of the processes in CGROUP and its descendants (and the agent's
    own, with INCLUDE_SELF), each opened once. The caller closes them (close_namespaces). A process whose
    namespace the agent may not open (no CAP_SYS_PTRACE, an LSM's ptrace rule) is skipped and, with
    DENIED, listed there ("pid N: why"); one that exited is skipped."""
    found: dict[tuple[int, int], Netns] = {}

    def add(path: str, what: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError as e:
            if denied is not None:
                denied.append(f"{what}: {e.strerror}")
            return
        except OSError:
            return  # the process exited
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in found:
            os.close(fd)
            return
        found[(st.st_dev, st.st_ino)] = Netns(st.st_ino, fd, what)

    if include_self:
        add("/proc/self/ns/net", "agent")
    if cgroup is not None:
        for pid in _cgroup_pids(cgroup):
            add(f"/proc/{pid}/ns/net", f"pid {pid}")
    return list(found.values())


def close_namespaces(namespaces: Iterable[Netns]) -> None:
    for ns in namespaces:
        with contextlib.suppress(OSError):
            os.close(ns.fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _ns_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class SockDestroyer:
    """The loaded iterator object of one bpffs directory (its kp_sknat maps are the socket LB's). Without
    a directory (tests) the object has kp_sknat maps of its own (SockDestroyer.sknat_map)."""

    def __init__(
        self, bpffs_dir: str | os.PathLike[str] | None, object_path: str | os.PathLike[str] | None = None
    ) -> None:
        self.bpffs_dir = os.path.abspath(os.fspath(bpffs_dir)) if bpffs_dir is not None else None
        self.object_path = os.fspath(object_path) if object_path is not None else default_object_path()
        self.obj: lb.BpfObject | None = None
        self.link: lb.Fd | None = None
        self.filter: lb.Map | None = None
        self._lock = threading.Lock()  # one run at a time: the filter map is shared

    def _adopt_pinned_params(self, obj: lb.BpfObject) -> None:
        """Size the kp_sknat maps like their pins (the socket object's); another layout fails clearly."""
        if self.bpffs_dir is None:
            return
        for name, path, have, diffs in pinned_param_diffs(obj, self.bpffs_dir, abi.SOCK_MAPS, sizes=False):
            if diffs:
                raise MapParamsMismatch(
                    f"pinned map {name} at {path} does not match the iterator object: {', '.join(diffs)}. "
                    "Both objects must come from the same kproxy build"
                )
            obj.set_max_entries(name, have.max_entries)

    def load(self) -> None:
        """Load the object and create its iterator link. SockDestroyUnavailable when this kernel (or this
        object) cannot: the message names the missing feature or the load error."""
        if self.obj is not None:
            return
        try:
            obj = lb.BpfObject.open(self.object_path, pin_root_path=self.bpffs_dir)
        except (lb.LibbpfError, OSError) as e:
            raise SockDestroyUnavailable(f"cannot open {self.object_path}: {e}") from e
        try:
            self._adopt_pinned_params(obj)
            obj.load()
            prog = obj.program(PROG_ITER_UDP)
            self.link = lb.link_create(prog.fd, 0, lb.BPF_TRACE_ITER, what="iter/udp")
            self.filter = obj.map(abi.MAP_SKD)
        except (lb.LibbpfError, OSError) as e:
            obj.close()
            missing = missing_kernel_feature()
            if missing is not None:
                raise SockDestroyUnavailable(missing) from e
            # one line for the log: the error's first, and what libbpf said besides "failed to load"
            said = [m.strip() for m in getattr(e, "libbpf_messages", []) if "failed to load object" not in m]
            first = (str(e).splitlines() or [""])[0]
            more = f" ({'; '.join(said[-2:])})" if said else ""
            raise SockDestroyUnavailable(first + more) from e
        self.obj = obj

    def sknat_map(self, name: str) -> lb.Map:
        """The object's kp_sknat4_v1 or kp_sknat6_v1 (the pinned one when it has a bpffs directory)."""
        if self.obj is None:
            raise SockDestroyUnavailable("the iterator object is not loaded")
        return self.obj.map(name)

    def close(self) -> None:
        """Unload; waits for a run in progress (an agent stopping while a worker thread runs): its fds
        closed under it would be numbers the process may give to anything next."""
        with self._lock:
            if self.link is not None:
                self.link.close()
                self.link = None
            self.filter = None
            if self.obj is not None:
                self.obj.close()
                self.obj = None

    # ---- runs ----
    def run(self, removals: Sequence[Removal], namespaces: Sequence[Netns]) -> DestroyRun:
        """Destroy the connected UDP sockets of REMOVALS in each of NAMESPACES: the filter holds up to
        abi.SKD_MAX removals at a time, one iterator per namespace per filling. Blocks; the namespaces are
        entered by a thread of its own (setns changes the calling thread only), never by the caller's."""
        if self.link is None or self.filter is None:
            raise SockDestroyUnavailable("the iterator object is not loaded")
        result = DestroyRun(removals=len(removals), namespaces=len(namespaces))
        t0 = time.monotonic()
        with self._lock:
            uniq = sorted(set(removals))
            for at in range(0, len(uniq), abi.SKD_MAX):
                chunk = uniq[at : at + abi.SKD_MAX]
                keys = b"".join(bytes(r.key()) for r in chunk)
                self.filter.update_batch(keys, bytes(4 * len(chunk)), len(chunk))
                try:
                    self._in_thread(namespaces, result)
                finally:
                    self.filter.delete_batch(keys, len(chunk))
        result.seconds = time.monotonic() - t0
        return result

    def _in_thread(self, namespaces: Sequence[Netns], result: DestroyRun) -> None:
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._walk(namespaces, result)
            except BaseException as e:  # reported to the caller below
                failure.append(e)

        t = threading.Thread(target=work, name="kproxy-sockdestroy", daemon=True)
        t.start()
        t.join()
        if failure:
            raise failure[0]

    def _walk(self, namespaces: Sequence[Netns], result: DestroyRun) -> None:
        assert self.link is not None
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        home_id = _ns_id(home)
        here = home_id
        try:
            for ns in namespaces:
                try:
                    # setns needs CAP_SYS_ADMIN even into the namespace the thread is in: not for that
                    # one (an agent without it still walks its own, the node's, namespace)
                    if _ns_id(ns.fd) != here:
                        _setns(ns.fd)
                        here = _ns_id(ns.fd)
                    for _ in range(MAX_WALKS):
                        with lb.iter_create(self.link.fd, f"iter/udp in netns {ns.ino}") as it:
                            found, reads = self._read(it.fd)
                        result.sockets.extend(found)
                        if not found or reads <= 1:
                            break
                except (OSError, lb.LibbpfError) as e:
                    result.failed_namespaces.append(f"netns {ns.ino} ({ns.what}): {e}")
        finally:
            try:
                if here != home_id:
                    _setns(home)
            finally:
                os.close(home)

    @staticmethod
    def _read(fd: int) -> tuple[list[Destroyed], int]:
        """The records of one iterator, and how many reads returned some."""
        size = ctypes.sizeof(abi.SkdEvent)
        buf = bytearray()
        reads = 0
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    continue
                raise
            if not chunk:
                break
            reads += 1
            buf += chunk
        found = [Destroyed.parse(bytes(buf[i : i + size])) for i in range(0, len(buf) - size + 1, size)]
        return found, reads


def removal_of(family: int, svc_id: int, addr: bytes, port_nbo: int) -> Removal:
    """The Removal of a backend as the syncer reports it (port in network order, as in the maps)."""
    return Removal(family, svc_id, bytes(addr), struct.unpack("!H", struct.pack("=H", port_nbo))[0])
