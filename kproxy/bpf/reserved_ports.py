"""NodePort bind protection: the NodePort range in net.ipv4.ip_local_reserved_ports.

A host process that binds port 0 or connects without binding gets an ephemeral port from
net.ipv4.ip_local_port_range. Should that port be a NodePort, the replies of a Service's flows to it
(and the flows themselves) meet the process's socket, not the Service. Ports listed in
ip_local_reserved_ports are never handed out as ephemeral ports (explicit binds still work), so the
agent adds the NodePort range there, as Cilium's --enable-auto-protect-node-port-range does. The
sysctl is per network namespace (the agent's: the node's); the IPv4 name covers AF_INET6 sockets too
(the kernel keeps one bitmap per namespace, inet_is_local_reserved_port(), for both families).

The value is a comma list of ports and ranges ("8080,30000-32767") that a write replaces whole: the
agent merges its range into what is there, never removes others' entries, and writes nothing when the
range is covered already. What it added (the part of the range not covered before) is recorded in the
agent's state directory, so `kproxy cleanup` and an uninstall remove that part only; with no record
(a state directory lost with its container, or a range reserved before the agent came) the entry stays:
it only keeps ephemeral ports off those ports, and the kernel forgets it at reboot.

The parsing and merging are pure (unit-tested); reserve() and release() do the I/O.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger("kproxy.reserved_ports")

PROC_SYS_NET_ENV = "KPROXY_PROC_SYS_NET"  # a host's /proc/sys/net mounted writable into the container
DEFAULT_PROC_SYS_NET = "/proc/sys/net"
SYSCTL = "ipv4/ip_local_reserved_ports"
PORT_RANGE_SYSCTL = "ipv4/ip_local_port_range"  # the ephemeral ports: "32768\t60999"
RECORD_FILE = "reserved-ports.json"
PORT_MAX = 65535

Range = tuple[int, int]  # first and last port, inclusive


# ---- pure ----
def parse(text: str) -> list[Range]:
    """The sysctl's value ("", "8080", "30000-32767,8080") as normalized ranges. ValueError when it is
    anything else: a value the agent does not understand is one it must not rewrite."""
    out: list[Range] = []
    for tok in text.strip().split(","):
        tok = tok.strip()
        if not tok:
            continue
        lo_s, sep, hi_s = tok.partition("-")
        lo_s, hi_s = lo_s.strip(), hi_s.strip() if sep else lo_s.strip()
        if not lo_s.isdigit() or not hi_s.isdigit():
            raise ValueError(f"{tok!r} is not a port or a FIRST-LAST range")
        lo, hi = int(lo_s), int(hi_s)
        if not 0 <= lo <= hi <= PORT_MAX:
            raise ValueError(f"{tok!r} is not a range of ports 0-{PORT_MAX}")
        out.append((lo, hi))
    return normalize(out)


def normalize(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, overlapping and adjacent ranges joined (30000-30010 and 30011-30020 are 30000-30020)."""
    out: list[Range] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def render(ranges: Iterable[Range]) -> str:
    """The sysctl's syntax, as the kernel prints it: "8080,30000-32767"."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in normalize(ranges))


def subtract(ranges: Iterable[Range], remove: Iterable[Range]) -> list[Range]:
    """RANGES without the ports of REMOVE."""
    out = normalize(ranges)
    for rlo, rhi in normalize(remove):
        kept: list[Range] = []
        for lo, hi in out:
            if hi < rlo or lo > rhi:
                kept.append((lo, hi))
                continue
            if lo < rlo:
                kept.append((lo, rlo - 1))
            if hi > rhi:
                kept.append((rhi + 1, hi))
        out = kept
    return out


def missing(have: Iterable[Range], want: Range) -> list[Range]:
    """The parts of WANT not in HAVE (empty: covered)."""
    return subtract([want], have)


# ---- I/O ----
def sysctl_path() -> Path:
    return Path(os.environ.get(PROC_SYS_NET_ENV, DEFAULT_PROC_SYS_NET)) / SYSCTL


def ephemeral_range() -> Range:
    """net.ipv4.ip_local_port_range of this network namespace, as (first, last)."""
    path = sysctl_path().parent.parent / PORT_RANGE_SYSCTL
    fields = path.read_text().split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise ValueError(f"{path}: {' '.join(fields)!r} is not FIRST LAST")
    return int(fields[0]), int(fields[1])


def netns_id() -> int:
    """The inode of the calling thread's network namespace: a record is valid only there."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def recorded(state_dir: Path) -> list[Range]:
    """The ranges the record in STATE_DIR says the agent added in this network namespace."""
    return _read_record(state_dir)


def _read_record(state_dir: Path) -> list[Range]:
    try:
        rec = json.loads((state_dir / RECORD_FILE).read_text())
        if rec.get("netns") != netns_id():
            return []
        return normalize((int(lo), int(hi)) for lo, hi in rec.get("added", []))
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def _write_record(state_dir: Path, added: Sequence[Range]) -> None:
    path = state_dir / RECORD_FILE
    if not added:
        path.unlink(missing_ok=True)
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "netns": netns_id(), "added": [list(r) for r in added]}) + "\n")
    tmp.replace(path)


def reserve(want: Range, state_dir: Path) -> list[Range]:
    """Merge WANT into the sysctl; return the ranges added now (empty: covered already). The additions
    join the record in STATE_DIR. Raises OSError (cannot read or write the sysctl) or ValueError (its
    value is not understood, or the merge would leave no ephemeral port: nothing is written)."""
    path = sysctl_path()
    have = parse(path.read_text())
    add = missing(have, want)
    if not add:
        return []
    # Every ephemeral port reserved: each connect() without a bound source port, and bind() to port 0,
    # would fail with EADDRNOTAVAIL on the whole node (kubelet, the runtime, this agent).
    first, last = ephemeral_range()
    if not subtract([(first, last)], [*have, *add]):
        raise ValueError(
            f"adding {render(add)} to {path} ({render(have) or 'empty'}) would leave no port of "
            f"net.ipv4.ip_local_port_range {first}-{last} for ephemeral use; nothing written. Move "
            f"ip_local_port_range off the NodePort range"
        )
    path.write_text(render([*have, *add]) + "\n")
    _write_record(state_dir, normalize([*_read_record(state_dir), *add]))
    return add


def release(state_dir: Path) -> list[Range]:
    """Remove from the sysctl the ranges the record in STATE_DIR says the agent added (in this network
    namespace); return them. Nothing is recorded: nothing is touched."""
    added = _read_record(state_dir)
    if not added:
        return []
    path = sysctl_path()
    have = parse(path.read_text())
    path.write_text(render(subtract(have, added)) + "\n")
    _write_record(state_dir, [])
    return added
