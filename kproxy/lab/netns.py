"""Small helpers over network namespaces for the lab: `ip` commands, sysctls, sockets in a namespace.

Everything here works on named namespaces (/run/netns/NAME) the lab created itself. Links are created
directly inside those namespaces (`ip -n`), so nothing ever appears in the root namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LabError(RuntimeError):
    """A lab set-up or tear-down step failed."""


def run(args: list[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return run(cmd, check=check)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def netns_pids(name: str) -> list[int]:
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def del_netns(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a short-lived thread that joined namespace NAME; return its result.

    setns(CLONE_NEWNET) changes only the calling thread, so the rest of the process stays where it is.
    Sockets created by fn keep belonging to NAME after the thread ends.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise LabError(f"setns into network namespace {name} failed: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{name}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def sysctl(ns: str, key: str, value: str | int) -> None:
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(value))

    in_netns(ns, write)


def ns_socket(ns: str, kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET) -> socket.socket:
    """A new socket (IPv4 unless FAMILY says AF_INET6) that lives in namespace NS."""
    return in_netns(ns, lambda: socket.socket(family, kind))
