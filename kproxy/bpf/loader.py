"""Load the kproxy TC object, pin its maps, attach its programs to interfaces, upgrade, clean up.

Maps are pinned by name under the agent's bpffs directory and re-used by the next load, so the
service tables and conntrack survive agent restarts and upgrades. Programs are attached with tcx
links (kernel >= 6.6) pinned at {bpffs}/links/{ifname}:{direction}: they keep running while the
agent is down, and a new agent swaps its programs in with an atomic link update. Kernels without
tcx get a clsact qdisc and a direct-action cls_bpf filter at a fixed priority and handle, which
`tc filter replace` swaps just as atomically. Never detach-then-attach: that drops packets.

Everything here acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.resources
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from kproxy import abi
from kproxy.bpf import BPFFS_ROOT
from kproxy.bpf import libbpf as lb
from kproxy.bpf.maps import KproxyMaps, _statfs_type, is_bpffs

log = logging.getLogger("kproxy.loader")

PROG_FROM_POD = "kp_from_pod"
PROG_TO_POD = "kp_to_pod"
PROG_FROM_NETDEV = "kp_from_netdev"
PROG_TO_NETDEV = "kp_to_netdev"
PROG_XDP = "kp_xdp"  # XDP acceleration on the netdevs (--acceleration)
PROGRAMS = (PROG_FROM_POD, PROG_TO_POD, PROG_FROM_NETDEV, PROG_TO_NETDEV, PROG_XDP)

Direction = Literal["ingress", "egress"]
DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")
# XDP programs are pinned like tcx links, as {ifname}:xdp (Attachment.direction "xdp", mode "xdp")
XDP: Literal["xdp"] = "xdp"
_TCX_TYPE = {"ingress": lb.BPF_TCX_INGRESS, "egress": lb.BPF_TCX_EGRESS}
_TCX_DIR = {lb.BPF_TCX_INGRESS: "ingress", lb.BPF_TCX_EGRESS: "egress"}

# cls_bpf fallback: one filter per direction at this priority and handle, replaced in place.
TC_PRIO = 0x4B50  # "KP"
TC_HANDLE = 1
_TC_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}

LINKS_DIR = "links"


def pin_name(ifname: str, direction: str) -> str:
    """File name of an interface's link pin. bpffs refuses names with a dot (EPERM: reserved for the
    kernel's own files), so a dot in an interface name (eth0.100) is escaped, as is the escape itself."""
    return ifname.replace("%", "%25").replace(".", "%2E") + ":" + direction


def parse_pin_name(name: str) -> tuple[str, str]:
    ifname, _, direction = name.rpartition(":")
    return ifname.replace("%2E", ".").replace("%25", "%"), direction


class LoaderError(RuntimeError):
    """Loading or attaching failed for a reason the operator can fix; the message says how."""


class MapParamsMismatch(LoaderError):
    """A pinned map exists with parameters (e.g. max_entries) other than the ones requested."""


def default_object_path() -> str:
    return str(importlib.resources.files("kproxy.bpf").joinpath("obj", "kproxy_tc.bpf.o"))


class XdpUnsupported(LoaderError):
    """The interface's driver has no native XDP (or another XDP program holds it): says which and why."""


@dataclass(frozen=True)
class Attachment:
    ifname: str
    direction: Direction | Literal["xdp"]
    mode: Literal["tcx", "tc", "xdp"]
    program: str  # program name as the kernel reports it (truncated to 15 characters)
    prog_id: int
    link_id: int  # 0 for cls_bpf
    ifindex: int  # 0: the interface is gone (stale pinned link)
    pin: str | None

    @property
    def alive(self) -> bool:
        return self.ifindex != 0


SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003


def netdev_driver(ifname: str) -> str | None:
    """The driver of an interface of this network namespace ("veth", "mlx5_core"...), by ETHTOOL_GDRVINFO
    (sysfs may show another namespace's devices); None when the device does not say."""
    import fcntl
    import struct

    info = bytearray(struct.pack("I", ETHTOOL_GDRVINFO) + bytes(192))  # struct ethtool_drvinfo
    ifreq = bytearray(struct.pack("16sP", ifname.encode()[:15], 0))
    buf = ctypes.create_string_buffer(bytes(info), len(info))
    struct.pack_into("P", ifreq, 16, ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError:
            return None
    return buf.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


def _ifindex(iface: str | int) -> tuple[str, int]:
    if isinstance(iface, int):
        try:
            return socket.if_indextoname(iface), iface
        except OSError as exc:
            raise LoaderError(f"no interface with index {iface} in this network namespace") from exc
    try:
        return iface, socket.if_nametoindex(iface)
    except OSError as exc:
        raise LoaderError(f"no interface {iface!r} in this network namespace") from exc


def _check_direction(direction: str) -> Direction:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
    return direction  # type: ignore[return-value]


# ---- the agent's bpffs directory on a fresh host ----
PIN_DIR_MODE = 0o700
BPFFS_MOUNT_OPTIONS = "mode=0700"  # as systemd mounts it
SYSFS_MAGIC = 0x62656572


class BpffsError(LoaderError):
    """The pin directory is not on a bpf filesystem and the agent may not make it so; says why and how."""


def _on_bpffs(path: str) -> bool:
    try:
        return os.path.isdir(path) and is_bpffs(path)
    except OSError as exc:
        raise BpffsError(f"cannot inspect {path}: {exc.strerror}") from exc


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount PATH is on, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best = ("/", "unknown")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, sep, post = line.partition(" - ")
            fields = pre.split()
            if not sep or len(fields) < 5:
                continue
            point = _unescape_mountinfo(fields[4])
            # Later lines are mounted on top of earlier ones at the same point: the last one wins.
            if _under(real, point) and len(point) >= len(best[0]):
                best = (point, post.split()[0])
    return best


def _mount_bpffs(root: str) -> None:
    if not os.path.isdir(root):
        raise BpffsError(
            f"{root} does not exist: sysfs is not mounted at /sys or the kernel has no bpf filesystem "
            "(CONFIG_BPF_SYSCALL); mount a bpf filesystem yourself (`mkdir -p DIR && mount -t bpf bpf DIR`) "
            "and pass a directory on it as --bpffs"
        )
    try:
        fs_type = _statfs_type(root)
    except OSError as exc:
        raise BpffsError(f"cannot inspect {root}: {exc.strerror}") from exc
    if fs_type != SYSFS_MAGIC:
        # Not the kernel's empty sysfs directory: something else is mounted there, and a bpf filesystem
        # on top would hide it from whoever uses it.
        point, name = mount_of(root)
        raise BpffsError(
            f"{root} is not a bpf filesystem but on the {name} mounted at {point}, which kproxy does not "
            f"mount over: unmount it and mount a bpf filesystem there (`mount -t bpf bpf {root}`), or "
            "pass --bpffs a directory on a bpf filesystem"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if libc.mount(b"bpf", os.fsencode(root), b"bpf", 0, BPFFS_MOUNT_OPTIONS.encode()) != 0:
        err = ctypes.get_errno()
        why = " (the agent needs CAP_SYS_ADMIN to mount)" if err == errno.EPERM else ""
        raise BpffsError(
            f"cannot mount a bpf filesystem at {root}: {os.strerror(err)}{why}; mount one as root "
            f"(`mount -t bpf bpf {root}`), or with the Helm chart keep bpffs.autoMount=true"
        )
    if not _on_bpffs(root):
        raise BpffsError(
            f"mounted a bpf filesystem at {root}, but {root} is still not one: check `findmnt {root}`"
        )


def prepare_pin_dir(
    pin_dir: str | os.PathLike[str], bpffs_root: str = BPFFS_ROOT, mount: bool = True
) -> list[str]:
    """Make PIN_DIR a directory on a bpf filesystem, as the agent needs it on a fresh host. Returns what
    was done, in the words it was logged with ("mounted a bpf filesystem at /sys/fs/bpf", "created
    /sys/fs/bpf/kproxy"); nothing when PIN_DIR already is one.

    As Cilium and Calico do: when PIN_DIR is BPFFS_ROOT or under it and no bpf filesystem is mounted
    there (it is still the kernel's empty sysfs directory), mount one; then create PIN_DIR (mode 0700)
    when its closest existing parent is on a bpf filesystem. Nothing is ever mounted over a directory
    of another filesystem: those cases raise BpffsError naming the path and the fix. Acts in the
    calling process's mount namespace. Read-only commands must not call this. MOUNT false
    (--no-bpffs-mount): raise BpffsError where a mount would be needed.
    """
    d = os.path.abspath(os.fspath(pin_dir))
    root = os.path.abspath(bpffs_root)
    done: list[str] = []
    if _on_bpffs(d):
        return done + migrate_legacy_pins(d)
    if os.path.lexists(d) and not os.path.isdir(d):
        raise BpffsError(f"--bpffs {d} is not a directory: pass a directory on a bpf filesystem")
    if _under(d, root) and not _on_bpffs(root):
        if not mount:
            raise BpffsError(
                f"no bpf filesystem is mounted at {root} and --no-bpffs-mount: mount one on the host "
                f"(`mount -t bpf bpf {root}`, or the chart's bpffs.autoMount=true) or pass --bpffs a "
                "directory on a bpf filesystem"
            )
        _mount_bpffs(root)
        done.append(f"mounted a bpf filesystem at {root}")
        log.info("%s", done[-1])
        if _on_bpffs(d):
            return done
    parent = d
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not _on_bpffs(parent):
        point, fs_type = mount_of(parent)
        where = f"on the {fs_type} mounted at {point}"
        fix = (
            f"pass --bpffs a directory under {root} (the agent mounts a bpf filesystem there when none is), "
            "or mount one yourself: "
        )
        if parent == d:
            raise BpffsError(f"{d} is not on a bpf filesystem but {where}: {fix}`mount -t bpf bpf {d}`")
        raise BpffsError(
            f"bpffs directory {d} does not exist and {parent} is not on a bpf filesystem but {where}: "
            f"{fix}`mkdir -p {d} && mount -t bpf bpf {d}`"
        )
    try:
        os.makedirs(d, mode=PIN_DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise BpffsError(f"cannot create {d} on the bpf filesystem at {parent}: {exc.strerror}") from exc
    done.append(f"created {d}")
    log.info("%s", done[-1])
    return done + migrate_legacy_pins(d)


# Everything a kproxy agent pins in its directory (the socket-LB object's map besides the TC object's).
LEGACY_PIN_NAMES = (*abi.ALL_MAPS, *abi.SOCK_MAPS, LINKS_DIR)


def migrate_legacy_pins(pin_dir: str) -> list[str]:
    """Move the pins of an agent that used PIN_DIR's parent as its --bpffs (the chart before it pinned
    under /sys/fs/bpf/kproxy) into PIN_DIR, so this agent adopts them: its maps keep their state and
    its links are updated in place instead of the old programs staying attached, working from maps
    nothing updates any more. Only when the parent holds kproxy's service map and PIN_DIR has none;
    a name PIN_DIR already has is left alone. Returns what was done, as logged."""
    parent = os.path.dirname(pin_dir.rstrip("/"))
    if not parent or parent == pin_dir:
        return []
    if not os.path.exists(os.path.join(parent, abi.MAP_SVC4)) or os.path.exists(
        os.path.join(pin_dir, abi.MAP_SVC4)
    ):
        return []
    if not (_on_bpffs(parent) and os.stat(parent).st_dev == os.stat(pin_dir).st_dev):
        return []
    moved = []
    for name in LEGACY_PIN_NAMES:
        src, dst = os.path.join(parent, name), os.path.join(pin_dir, name)
        if os.path.lexists(src) and not os.path.lexists(dst):
            try:
                os.rename(src, dst)
            except OSError as exc:
                log.warning("cannot move %s to %s: %s", src, dst, exc.strerror)
                continue
            moved.append(name)
    if not moved:
        return []
    done = f"moved the pins of an earlier agent from {parent} to {pin_dir}: {', '.join(moved)}"
    log.info("%s", done)
    return [done]


def pinned_param_diffs(
    obj: lb.BpfObject, bpffs_dir: str, names: Iterable[str], sizes: bool, ours: str = ""
) -> Iterator[tuple[str, str, Any, list[str]]]:
    """For each of NAMES pinned in BPFFS_DIR: (name, pin path, the pin's parameters, how OBJ's
    definition differs: type, key and value sizes, flags, and with SIZES max_entries). libbpf refuses a
    pin whose parameters differ with a bare EINVAL: callers say which, and what to do. OURS names OBJ's
    side ("in <object path>" when empty)."""
    ours = ours or f"in {obj.path}"
    fields = ("type", "key_size", "value_size", *(("max_entries",) if sizes else ()), "map_flags")
    for name in names:
        path = os.path.join(bpffs_dir, name)
        if not os.path.exists(path):
            continue
        want = obj.map_params(name)
        with lb.Map.open_pinned(path) as pinned:
            have = pinned.info()
        diffs = [
            f"{f} {getattr(have, f)} pinned vs {getattr(want, f)} {ours}"
            for f in fields
            if getattr(have, f) != getattr(want, f)
        ]
        yield name, path, have, diffs


class Loader:
    """Loads the TC object with maps pinned under `bpffs_dir`, and manages its attachments."""

    def __init__(
        self,
        bpffs_dir: str | os.PathLike[str],
        object_path: str | os.PathLike[str] | None = None,
        map_sizes: dict[str, int] | None = None,
        mode: Literal["auto", "tcx", "tc"] = "auto",
    ) -> None:
        self.bpffs_dir = os.path.abspath(os.fspath(bpffs_dir))
        self.object_path = os.fspath(object_path) if object_path is not None else default_object_path()
        self.map_sizes = dict(map_sizes or {})
        self.mode = mode
        self.obj: lb.BpfObject | None = None
        self._tcx_ok: bool | None = None if mode == "auto" else mode == "tcx"
        self._tc_attached: dict[tuple[str, Direction], Attachment] = {}

    @property
    def links_dir(self) -> str:
        return os.path.join(self.bpffs_dir, LINKS_DIR)

    # ---- load ----
    def _ensure_bpffs(self) -> None:
        d = self.bpffs_dir
        if not os.path.isdir(d):
            parent = os.path.dirname(d)
            if os.path.isdir(parent) and is_bpffs(parent):
                os.makedirs(d, exist_ok=True)
            else:
                raise LoaderError(
                    f"bpffs directory {d} does not exist: mount one with "
                    f"`mkdir -p {d} && mount -t bpf bpf {d}`, or pass --bpffs a directory on a bpf filesystem"
                )
        if not is_bpffs(d):
            raise LoaderError(f"{d} is not on a bpf filesystem: mount one with `mount -t bpf bpf {d}`")

    def _check_pinned_params(self, obj: lb.BpfObject) -> None:
        # libbpf refuses a pinned map whose parameters differ with a bare EINVAL; say which and how.
        for name, path, have, diffs in pinned_param_diffs(
            obj, self.bpffs_dir, obj.map_names(), sizes=True, ours="requested"
        ):
            if diffs:
                raise MapParamsMismatch(
                    f"pinned map {name} at {path} does not match the object: {', '.join(diffs)}. "
                    f"Keep the pinned size (--map-size {name}={have.max_entries}) or remove the pins "
                    f"(`kproxy cleanup --bpffs {self.bpffs_dir}`, drops conntrack) and restart"
                )

    def load(self) -> lb.BpfObject:
        """Open and load the object; maps are pinned by name, existing pins are re-used."""
        if self.obj is not None:
            return self.obj
        self._ensure_bpffs()
        obj = lb.BpfObject.open(self.object_path, pin_root_path=self.bpffs_dir, map_sizes=self.map_sizes)
        try:
            self._check_pinned_params(obj)
            obj.load()
        except BaseException:
            obj.close()
            raise
        self.obj = obj
        return obj

    def program(self, name: str) -> lb.Program:
        return self.load().program(name)

    def open_maps(self) -> KproxyMaps:
        self.load()
        return KproxyMaps.open(self.bpffs_dir)

    def close(self) -> None:
        """Release the object; pinned maps and links (and so the attached programs) stay."""
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- attach ----
    def link_pin(self, ifname: str, direction: Direction | Literal["xdp"]) -> str:
        return os.path.join(self.links_dir, pin_name(ifname, direction))

    def attach(self, iface: str | int, direction: str, program: str) -> Attachment:
        """Run `program` on `direction` of the interface; replaces what kproxy attached there before."""
        d = _check_direction(direction)
        ifname, ifindex = _ifindex(iface)
        prog = self.program(program)
        if self._tcx_ok is not False:
            try:
                return self._attach_tcx(ifname, ifindex, d, prog)
            except lb.LibbpfError as exc:
                if self._tcx_ok is None and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    log.info("tcx links unavailable (%s); falling back to clsact + cls_bpf", exc.strerror)
                    self._tcx_ok = False
                else:
                    raise
        return self._attach_tc(ifname, ifindex, d, prog)

    def _updated_pin(
        self,
        pin: str,
        ifname: str,
        ifindex: int,
        d: Direction | Literal["xdp"],
        attach_type: int,
        prog: lb.Program,
    ) -> Attachment | None:
        """The pinned link PIN swapped to PROG in place (an agent restart or upgrade: never detach then
        attach), or None after removing it when it is stale (made for an interface since gone or
        re-created: it does nothing) or when there is none."""
        if not os.path.exists(pin):
            return None
        with lb.Fd(lb.obj_get(pin), f"link {pin}") as link:
            info = lb.link_info(link.fd, f"pinned link {pin}")
            if info.ifindex == ifindex and info.attach_type == attach_type:
                new_id = prog.info().id
                if info.prog_id != new_id:
                    lb.link_update(link.fd, prog.fd, what=pin)
                    log.info("upgraded %s %s: program id %d -> %d", ifname, d, info.prog_id, new_id)
                return self._describe_pin(pin, ifname, d)
        log.info(
            "removing stale link pin %s (link ifindex %d, %s is now %d)", pin, info.ifindex, ifname, ifindex
        )
        os.unlink(pin)
        return None

    def _attach_tcx(self, ifname: str, ifindex: int, d: Direction, prog: lb.Program) -> Attachment:
        pin = self.link_pin(ifname, d)
        got = self._updated_pin(pin, ifname, ifindex, d, _TCX_TYPE[d], prog)
        if got is not None:
            self._tcx_ok = True
            return got
        os.makedirs(self.links_dir, exist_ok=True)
        with lb.link_create(prog.fd, ifindex, _TCX_TYPE[d], what=f"tcx {d} of {ifname}") as link:
            self._tcx_ok = True
            link.pin(pin)
        log.info("attached %s to %s %s (tcx, pinned at %s)", prog.name, ifname, d, pin)
        return self._describe_pin(pin, ifname, d)

    def attach_xdp(
        self, iface: str | int, program: str = PROG_XDP, *, allow_veth: bool = False
    ) -> Attachment:
        """Run `program` as native XDP on the interface (a pinned XDP link, swapped in place on
        upgrade). XdpUnsupported when the kernel refuses it (no native XDP in the driver, another XDP
        program attached, an MTU too large for XDP...), or for a veth or tun unless ALLOW_VETH: never the
        generic (skb) mode, which would run after the skb is made, slower than TC.

        A veth takes native XDP but is no place for it: the frames XDP sends back out are dropped unless
        the peer runs XDP too, and a sender on the same host leaves its checksums to "the hardware"
        (CHECKSUM_PARTIAL), which XDP sees unfinished and cannot complete."""
        ifname, ifindex = _ifindex(iface)
        driver = netdev_driver(ifname)
        if driver in ("veth", "tun") and not allow_veth:
            raise XdpUnsupported(
                f"{ifname} is a {driver}: XDP_TX from it reaches nothing unless its peer runs XDP, and its "
                "same-host senders' checksums are left unfinished (--xdp-veth when both are taken care of)"
            )
        prog = self.program(program)
        pin = self.link_pin(ifname, XDP)
        got = self._updated_pin(pin, ifname, ifindex, XDP, lb.BPF_XDP, prog)
        if got is not None:
            return got
        os.makedirs(self.links_dir, exist_ok=True)
        try:
            link = lb.link_create(
                prog.fd, ifindex, lb.BPF_XDP, what=f"native XDP of {ifname}", flags=lb.XDP_FLAGS_DRV_MODE
            )
        except lb.LibbpfError as exc:
            why = {
                errno.EOPNOTSUPP: f"{ifname} has no native XDP",
                errno.ENOTSUP: f"{ifname} has no native XDP",
                errno.EBUSY: f"another XDP program is attached to {ifname}",
                errno.EEXIST: f"another XDP program is attached to {ifname}",
                errno.ERANGE: f"{ifname}'s MTU is too large for XDP in its driver",
                errno.EINVAL: f"{ifname}'s driver refuses native XDP (no support, or too large an MTU)",
            }.get(exc.errno or 0, f"{ifname}'s driver refuses native XDP")
            raise XdpUnsupported(f"{why} ({exc.strerror})") from exc
        with link:
            link.pin(pin)
        log.info("attached %s to %s as native XDP (pinned at %s)", prog.name, ifname, pin)
        return self._describe_pin(pin, ifname, XDP)

    def detach_xdp(self, iface: str) -> bool:
        """Remove kproxy's XDP program from the interface; whether there was one."""
        pin = self.link_pin(iface, XDP)
        if not os.path.exists(pin):
            return False
        self._detach_pin(pin)
        return True

    def _forget_xdevs(self) -> None:
        """Empty kp_xdevs_v1 before XDP programs go: kp_xdp still running on one netdev must not redirect
        to another whose program was removed (its driver drops such frames)."""
        path = os.path.join(self.bpffs_dir, abi.MAP_XDEVS)
        if not os.path.exists(path):
            return
        try:
            with lb.Map.open_pinned(path) as m:
                for key in list(m.iter_keys()):
                    m.delete(key)
        except (lb.LibbpfError, OSError) as e:
            log.warning("cannot empty %s before removing the XDP programs: %s", path, e)

    def xdp_ifindex(self, ifname: str) -> int | None:
        """The ifindex kproxy's XDP link of interface IFNAME runs on now, or None: no pinned link, or
        one whose interface is gone (its link died with it, also when a new interface took the name)."""
        pin = self.link_pin(ifname, XDP)
        try:
            att = self._describe_pin(pin, ifname, XDP)
        except (lb.LibbpfError, OSError):
            return None
        return att.ifindex or None

    def _describe_pin(self, pin: str, ifname: str, d: Direction | Literal["xdp"]) -> Attachment:
        with lb.Fd(lb.obj_get(pin), f"link {pin}") as link:
            info = lb.link_info(link.fd, f"pinned link {pin}")
        name = ""
        try:
            with lb.prog_by_id(info.prog_id) as p:
                name = lb.prog_info(p.fd).name
        except lb.LibbpfError:
            pass
        return Attachment(
            ifname, d, "xdp" if d == XDP else "tcx", name, info.prog_id, info.id, info.ifindex, pin
        )

    def _attach_tc(self, ifname: str, ifindex: int, d: Direction, prog: lb.Program) -> Attachment:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise LoaderError(f"cannot add clsact qdisc to {ifname}: {exc}") from exc
            try:
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    ifindex,
                    TC_HANDLE,
                    fd=prog.fd,
                    name=prog.name,
                    parent=_TC_PARENT[d],
                    prio=TC_PRIO,
                    direct_action=True,
                )
            except NetlinkError as exc:
                raise LoaderError(f"cannot attach {prog.name} to {ifname} {d} with cls_bpf: {exc}") from exc
        info = prog.info()
        att = Attachment(ifname, d, "tc", info.name, info.id, 0, ifindex, None)
        self._tc_attached[(ifname, d)] = att
        log.info("attached %s to %s %s (cls_bpf prio %d)", prog.name, ifname, d, TC_PRIO)
        return att

    # ---- detach / list / reconcile / cleanup ----
    def detach(self, iface: str | int, direction: str | None = None) -> int:
        """Remove kproxy's programs from the interface (one or both directions); returns how many."""
        if isinstance(iface, int):
            ifname, ifindex = _ifindex(iface)
        else:
            ifname = iface
            try:
                ifindex = socket.if_nametoindex(iface)
            except OSError:
                ifindex = 0
        dirs = DIRECTIONS if direction is None else (_check_direction(direction),)
        removed = 0
        if direction is None and self.detach_xdp(ifname):
            removed += 1
        for d in dirs:
            pin = self.link_pin(ifname, d)
            if os.path.exists(pin):
                self._detach_pin(pin)
                removed += 1
            if self._tc_attached.pop((ifname, d), None) is not None and ifindex:
                self._detach_tc(ifindex, d)
                removed += 1
        return removed

    def _detach_pin(self, pin: str) -> None:
        try:
            with lb.Fd(lb.obj_get(pin), f"link {pin}") as link:
                lb.link_detach(link.fd, what=pin)
        except lb.LibbpfError as exc:
            # A link whose interface is gone is already detached; removing the pin is all that is left.
            if exc.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
                raise
        os.unlink(pin)

    def _detach_tc(self, ifindex: int, d: Direction) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=_TC_PARENT[d], prio=TC_PRIO)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise

    def attached(self) -> list[Attachment]:
        """Every pinned tcx link of this bpffs directory (alive or stale), and the cls_bpf filters this
        process attached."""
        result: list[Attachment] = []
        if os.path.isdir(self.links_dir):
            for entry in sorted(os.listdir(self.links_dir)):
                ifname, d = parse_pin_name(entry)
                if d not in DIRECTIONS and d != XDP:
                    continue
                result.append(self._describe_pin(os.path.join(self.links_dir, entry), ifname, d))  # type: ignore[arg-type]
        result.extend(self._tc_attached.values())
        return result

    def reconcile(self) -> list[str]:
        """Unpin links whose interface is gone (device deleted, namespace gone); returns their pins."""
        removed = []
        for att in self.attached():
            if att.pin is not None and not att.alive:
                log.info("interface %s is gone: removing its link pin %s", att.ifname, att.pin)
                self._detach_pin(att.pin)
                removed.append(att.pin)
        return removed

    def cleanup(self) -> None:
        """Detach every program, unpin every link and map, remove the directories kproxy made."""
        self._forget_xdevs()
        for att in self.attached():
            if att.pin is not None:
                self._detach_pin(att.pin)
            elif att.ifindex and att.direction != XDP:
                self._detach_tc(att.ifindex, att.direction)
        self._tc_attached.clear()
        names = {*abi.ALL_MAPS, *abi.PROG_MAPS}
        if self.obj is not None:
            names.update(self.obj.map_names())
        self.close()
        for name in sorted(names):
            path = os.path.join(self.bpffs_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        for d in (self.links_dir, self.bpffs_dir):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                # A bpffs mount point cannot be removed, and other tools' pins may live next to ours.
                log.debug("left directory %s in place: %s", d, exc.strerror)
