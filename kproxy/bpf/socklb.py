"""Socket-level load balancing for clients in the node's own network namespace.

Loads kproxy_sock.bpf.o (bpfsrc/kproxy_sock.bpf.c) with its maps pinned by name in the agent's bpffs
directory, so it shares the service, backend and affinity maps of both families (kp_svc4_v1,
kp_svc6_v1, ...), kp_cfg_v1, kp_cfg6_v1, kp_stats_v1 and kp_stats6_v1 with the TC object, and
attaches its eight programs (connect, sendmsg, recvmsg and getpeername, for IPv4 and IPv6) to one
cgroup v2 directory with cgroup links pinned at {bpffs}/links/cgroup:<hook>. The links keep working
while the agent is down; a new agent swaps its programs in with an atomic link update, and adds the
links of hooks an older agent did not have (the *6 ones before IPv6 socket LB). Programs attached to a
cgroup apply to every process in it and in its descendants, whatever network namespace they use.

The cgroup root only on explicit request: socket programs there rewrite the connections of every
process on the machine. That is what a cluster install wants (Cilium attaches there too; the chart
passes `--socket-lb-allow-root-cgroup`), and what a test on a shared machine must never do, so
attach() refuses any cgroup2 mount point unless allow_root is set (see docs/socket-lb.md).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.resources
import logging
import os
import socket
import sys
from dataclasses import dataclass

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.loader import LINKS_DIR, LoaderError, MapParamsMismatch, pinned_param_diffs
from kproxy.bpf.maps import _statfs_type, is_bpffs

log = logging.getLogger("kproxy.socklb")

CGROUP2_SUPER_MAGIC = 0x63677270

# uapi enum bpf_attach_type (checked against /usr/include/linux/bpf.h by tests/bpf/test_socklb.py)
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_CGROUP_INET6_GETPEERNAME = 30

# hook name (pin suffix) -> (program, attach type)
HOOKS: dict[str, tuple[str, int]] = {
    "connect4": ("kp_sock_connect4", BPF_CGROUP_INET4_CONNECT),
    "sendmsg4": ("kp_sock_sendmsg4", BPF_CGROUP_UDP4_SENDMSG),
    "recvmsg4": ("kp_sock_recvmsg4", BPF_CGROUP_UDP4_RECVMSG),
    "getpeername4": ("kp_sock_getpeername4", BPF_CGROUP_INET4_GETPEERNAME),
    "connect6": ("kp_sock_connect6", BPF_CGROUP_INET6_CONNECT),
    "sendmsg6": ("kp_sock_sendmsg6", BPF_CGROUP_UDP6_SENDMSG),
    "recvmsg6": ("kp_sock_recvmsg6", BPF_CGROUP_UDP6_RECVMSG),
    "getpeername6": ("kp_sock_getpeername6", BPF_CGROUP_INET6_GETPEERNAME),
}
PIN_PREFIX = "cgroup:"


# uapi asm-generic/socket.h (kernel >= 5.14); Python's socket module has no name for it
SO_NETNS_COOKIE = 71


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace, as bpf_get_netns_cookie() gives it to the
    socket programs (what kp_cfg_v1.host_netns_cookie holds for --socket-lb-host-netns-only). Raises
    OSError on kernels before 5.14 (ENOPROTOOPT)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)


class SocketLBError(LoaderError):
    """Socket-level load balancing cannot be set up as asked; the message says what to do."""


def default_object_path() -> str:
    return str(importlib.resources.files("kproxy.bpf").joinpath("obj", "kproxy_sock.bpf.o"))


@dataclass(frozen=True)
class CgroupAttachment:
    hook: str  # connect4, sendmsg4, recvmsg4, getpeername4 and their *6 twins
    program: str  # as the kernel reports it (truncated to 15 characters)
    prog_id: int
    link_id: int
    cgroup_id: int  # 0: the cgroup is gone and the link runs nowhere
    attach_type: int
    pin: str

    @property
    def alive(self) -> bool:
        return self.cgroup_id != 0


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_cgroup2_mounts(mountinfo: str) -> list[str]:
    """Mount points of every cgroup2 filesystem listed in a /proc/<pid>/mountinfo text."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        fstype = right.split()[0] if right.split() else ""
        if fstype == "cgroup2" and len(fields) >= 5:
            mounts.append(_unescape_mountinfo(fields[4]))
    return mounts


def cgroup2_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return parse_cgroup2_mounts(f.read())


def find_cgroup2(path: str | os.PathLike[str], mountinfo: str | None = None) -> str:
    """PATH if it is a cgroup v2 directory; else the cgroup2 mount below it (a hybrid cgroup v1/v2 host
    mounts cgroup v2 at /sys/fs/cgroup/unified, under a tmpfs of v1 controllers), the shallowest if
    several. PATH itself when there is none (check_cgroup() then says why it cannot be used)."""
    p = os.path.realpath(os.fspath(path))
    with contextlib.suppress(OSError):
        if _statfs_type(p) == CGROUP2_SUPER_MAGIC:
            return p
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return p
    below = [m for m in parse_cgroup2_mounts(mountinfo) if m.startswith(p.rstrip("/") + "/")]
    return min(below, key=lambda m: (m.count("/"), m)) if below else p


def check_cgroup(path: str | os.PathLike[str], allow_root: bool = False) -> str:
    """The cgroup v2 directory to attach to, resolved; refuses anything that is not a child cgroup
    unless allow_root (the root of a hierarchy: every process of the machine)."""
    p = os.path.realpath(os.fspath(path))
    if not os.path.isdir(p):
        raise SocketLBError(
            f"cgroup {p} does not exist: create a child cgroup (`mkdir {p}`) and move the processes whose "
            "sockets should be load-balanced into it (echo PID > cgroup.procs)"
        )
    if _statfs_type(p) != CGROUP2_SUPER_MAGIC:
        raise SocketLBError(
            f"{p} is not a cgroup v2 directory: pass a directory under a cgroup2 mount "
            "(e.g. /sys/fs/cgroup/unified/kproxy-host)"
        )
    for mount in [] if allow_root else cgroup2_mounts():
        with contextlib.suppress(OSError):
            if os.path.samefile(mount, p):
                raise SocketLBError(
                    f"refusing to attach socket load balancing to {p}: it is the root of a cgroup2 "
                    "hierarchy, so every process on the machine would have its connections rewritten. "
                    f"Create a child cgroup (`mkdir {p}/kproxy-host`), move the node processes meant "
                    "to use it there, and pass that directory; or, to balance every process of the node "
                    "(a cluster install), pass --socket-lb-allow-root-cgroup"
                )
    return p


class SocketLB:
    """The socket-level load balancer of one bpffs directory, attached to one cgroup."""

    def __init__(
        self,
        bpffs_dir: str | os.PathLike[str],
        cgroup_path: str | os.PathLike[str] | None,
        object_path: str | os.PathLike[str] | None = None,
        allow_root: bool = False,
    ) -> None:
        self.allow_root = allow_root
        self.bpffs_dir = os.path.abspath(os.fspath(bpffs_dir))
        self.cgroup_path = os.fspath(cgroup_path) if cgroup_path is not None else None
        self.object_path = os.fspath(object_path) if object_path is not None else default_object_path()
        self.obj: lb.BpfObject | None = None

    @property
    def links_dir(self) -> str:
        return os.path.join(self.bpffs_dir, LINKS_DIR)

    def link_pin(self, hook: str) -> str:
        return os.path.join(self.links_dir, PIN_PREFIX + hook)

    # ---- load ----
    def _adopt_pinned_params(self, obj: lb.BpfObject) -> None:
        """Size every map like its pin, so this object re-uses the TC object's maps whatever
        --map-size the agent gave; any other difference is a different layout and fails clearly."""
        for name, path, have, diffs in pinned_param_diffs(obj, self.bpffs_dir, obj.map_names(), sizes=False):
            if diffs:
                raise MapParamsMismatch(
                    f"pinned map {name} at {path} does not match the socket object: {', '.join(diffs)}. "
                    f"Both objects must come from the same kproxy build; remove the pins "
                    f"(`kproxy cleanup --bpffs {self.bpffs_dir}`) and restart"
                )
            obj.set_max_entries(name, have.max_entries)

    def load(self) -> lb.BpfObject:
        if self.obj is not None:
            return self.obj
        if not os.path.isdir(self.bpffs_dir) or not is_bpffs(self.bpffs_dir):
            raise SocketLBError(
                f"{self.bpffs_dir} is not a directory on a bpf filesystem: mount one "
                f"(`mount -t bpf bpf {self.bpffs_dir}`) or pass the agent's --bpffs directory"
            )
        obj = lb.BpfObject.open(self.object_path, pin_root_path=self.bpffs_dir)
        try:
            self._adopt_pinned_params(obj)
            obj.load()
        except BaseException:
            obj.close()
            raise
        self.obj = obj
        return obj

    def close(self) -> None:
        """Release the object; pinned links (and so the attached programs) and maps stay."""
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self) -> SocketLB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- attach ----
    def attach(self) -> list[CgroupAttachment]:
        """Attach (or upgrade in place) all eight programs on the cgroup; returns the attachments.
        Pins of an older agent without the *6 hooks are upgraded and the missing links created."""
        if self.cgroup_path is None:
            raise SocketLBError("no cgroup given: pass the cgroup v2 directory to balance sockets of")
        cgroup = check_cgroup(self.cgroup_path, self.allow_root)
        cgroup_id = os.stat(cgroup).st_ino  # a cgroup v2 directory's inode number is its cgroup id
        obj = self.load()
        os.makedirs(self.links_dir, exist_ok=True)
        created: list[str] = []
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook, (prog_name, attach_type) in HOOKS.items():
                prog = obj.program(prog_name)
                pin = self.link_pin(hook)
                if os.path.exists(pin):
                    if self._upgrade(pin, prog, cgroup_id, attach_type):
                        continue
                    self._detach_pin(pin)
                with lb.link_create(prog.fd, cg_fd, attach_type, what=f"cgroup {hook} of {cgroup}") as link:
                    link.pin(pin)
                created.append(pin)
                log.info("attached %s to cgroup %s (%s, pinned at %s)", prog_name, cgroup, hook, pin)
        except BaseException:
            # All new links or none: a connect hook without its recvmsg twin would break UDP replies.
            for pin in created:
                with contextlib.suppress(Exception):
                    self._detach_pin(pin)
            raise
        finally:
            os.close(cg_fd)
        return self.attached()

    def _upgrade(self, pin: str, prog: lb.Program, cgroup_id: int, attach_type: int) -> bool:
        """Swap the program of a pinned link on this cgroup; False when the link is for elsewhere."""
        with lb.Fd(lb.obj_get(pin), f"link {pin}") as link:
            info = lb.cgroup_link_info(link.fd, f"pinned link {pin}")
            if info.cgroup_id != cgroup_id or info.attach_type != attach_type:
                log.info(
                    "replacing link %s: it is on cgroup id %d (attach type %d), wanted %d (%d)",
                    pin,
                    info.cgroup_id,
                    info.attach_type,
                    cgroup_id,
                    attach_type,
                )
                return False
            new_id = prog.info().id
            if info.prog_id != new_id:
                lb.link_update(link.fd, prog.fd, what=pin)
                log.info("upgraded %s: program id %d -> %d", pin, info.prog_id, new_id)
        return True

    def _detach_pin(self, pin: str) -> None:
        try:
            with lb.Fd(lb.obj_get(pin), f"link {pin}") as link:
                lb.link_detach(link.fd, what=pin)
        except lb.LibbpfError as exc:
            # The cgroup of the link is gone: it is detached already, only the pin is left.
            if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.ENOLINK):
                raise
        os.unlink(pin)

    def pinned_hooks(self) -> list[str]:
        """The hooks with a pinned cgroup link in this bpffs directory: this version's, then any other
        `cgroup:*` pin (a newer version's hook, after a downgrade: detached and listed all the same)."""
        try:
            names = os.listdir(self.links_dir)
        except OSError:
            return []
        found = {n[len(PIN_PREFIX) :] for n in names if n.startswith(PIN_PREFIX)}
        return [h for h in HOOKS if h in found] + sorted(found - set(HOOKS))

    def attached(self) -> list[CgroupAttachment]:
        """The pinned cgroup links of this bpffs directory."""
        result = []
        for hook in self.pinned_hooks():
            pin = self.link_pin(hook)
            with lb.Fd(lb.obj_get(pin), f"link {pin}") as link:
                info = lb.cgroup_link_info(link.fd, f"pinned link {pin}")
            name = ""
            with contextlib.suppress(lb.LibbpfError), lb.prog_by_id(info.prog_id) as p:
                name = lb.prog_info(p.fd).name
            result.append(
                CgroupAttachment(hook, name, info.prog_id, info.id, info.cgroup_id, info.attach_type, pin)
            )
        return result

    def detach(self) -> int:
        """Detach and unpin every cgroup link of this bpffs directory; returns how many."""
        removed = 0
        for hook in self.pinned_hooks():
            self._detach_pin(self.link_pin(hook))
            removed += 1
        return removed

    def cleanup(self) -> None:
        """Detach, unpin the links and the socket-only maps; the maps shared with the TC object stay
        (Loader.cleanup removes those)."""
        self.detach()
        self.close()
        for name in abi.SOCK_MAPS:
            path = os.path.join(self.bpffs_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        # Missing, or the TC loader's links live there too.
        with contextlib.suppress(OSError):
            os.rmdir(self.links_dir)
