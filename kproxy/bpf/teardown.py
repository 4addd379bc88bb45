"""Remove a whole kproxy dataplane: what `kproxy cleanup` and an agent being uninstalled do.

TC programs (tcx links and cls_bpf fallback filters, in the calling thread's network namespace), the
socket load balancing cgroup links, every pinned map and link under the bpffs directory, the ports the
agent recorded adding to net.ipv4.ip_local_reserved_ports, and the agent's state directory. Traffic then
falls back to whatever else handles Services.
"""

from __future__ import annotations

import contextlib
import logging
import shutil

from kproxy.bpf import reserved_ports
from kproxy.bpf.loader import Loader
from kproxy.bpf.socklb import SocketLB
from kproxy.observe.metadata import state_dir

log = logging.getLogger("kproxy.teardown")


def remove_dataplane(bpffs: str, loader: Loader | None = None) -> list[str]:
    """Detach and unpin everything under BPFFS; return what was attached ("eth0.ingress",
    "cgroup.connect4", ...). Raises LibbpfError or OSError when something could not be removed.

    LOADER: the agent's own (closed by this), which also knows the cls_bpf filters it attached where
    the kernel has no tcx (they have no pin a new Loader could find)."""
    loader = loader if loader is not None else Loader(bpffs)
    try:
        detached = [f"{a.ifname}.{a.direction}" for a in loader.attached()]
        slb = SocketLB(bpffs, None)
        with contextlib.suppress(OSError):  # listed or not, cleanup() below removes the pins
            detached += [f"cgroup.{a.hook}" for a in slb.attached()]
        slb.cleanup()
        loader.cleanup()
    finally:
        loader.close()
    # only what the agent recorded adding (in this network namespace); see kproxy.bpf.reserved_ports
    try:
        released = reserved_ports.release(state_dir(bpffs))
        if released:
            detached.append("ip_local_reserved_ports " + reserved_ports.render(released))
    except (OSError, ValueError) as e:
        # the record goes with the state directory below: say what stays reserved
        log.warning(
            "cannot take %s out of net.ipv4.ip_local_reserved_ports at %s: %s; they stay reserved "
            "(only ephemeral port selection skips them) until removed by hand or a reboot",
            reserved_ports.render(reserved_ports.recorded(state_dir(bpffs))), reserved_ports.sysctl_path(), e,
        )  # fmt: skip
    shutil.rmtree(state_dir(bpffs), ignore_errors=True)
    return detached
