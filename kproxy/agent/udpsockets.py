"""Connected UDP sockets of socket load balancing follow the removal of their backend (issue 17).

After each sync (its map writes done: the removed backends get no new flows), the UDP backends that left
a service port (ApplyReport.udp_left) are queued; one task destroys the connected sockets socket LB sent
to them through that port, in every network namespace of the socket-LB cgroup's processes and the
agent's own (kproxy.bpf.sockdestroy), off the sync's path: removals of syncs that come while a run is
in progress form the next run. The application gets ECONNABORTED, connects again and reaches a live
backend, as kube-proxy's conntrack flush of removed UDP endpoints moves the flows of pod clients.

Without bpf_sock_destroy (Linux < 6.5) or UDP socket iterators the agent says so once at start and
counts each removal it could not act on (kproxy_socket_lb_udp_removals_unhandled{reason="unsupported"}).
With --no-socket-lb-destroy-connected-udp nothing is loaded and no namespace entered (reason="disabled").
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence

from kproxy.bpf.sockdestroy import (
    DestroyRun,
    Removal,
    SockDestroyer,
    SockDestroyUnavailable,
    cgroup_namespaces,
    close_namespaces,
    removal_of,
)
from kproxy.observe.metrics import Metrics

from .dataplane import Dataplane

log = logging.getLogger("kproxy.agent")

UdpLeft = Sequence[tuple[int, int, bytes, int]]  # ApplyReport.udp_left
SlotBackends = Callable[[int, int], set[tuple[bytes, int]]]  # Syncer.slot_backends


class ConnectedUdp:
    """Destroys the connected UDP sockets of removed backends (when socket LB is attached)."""

    def __init__(
        self,
        dataplane: Dataplane,
        metrics: Callable[[], Metrics | None],
        object_path: str | None = None,
        slot_backends: SlotBackends | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled  # --socket-lb-destroy-connected-udp
        self.dataplane = dataplane
        self.metrics = metrics
        self.object_path = object_path
        # the backends a service port has now (Syncer.slot_backends), to drop the removals undone since
        self.slot_backends = slot_backends
        self.destroyer: SockDestroyer | None = None
        self.problem: str | None = None  # why sockets cannot be destroyed on this node
        self._pending: list[Removal] = []
        self._wake = asyncio.Event()
        self.runs = 0  # runs done, for tests
        self._said_denied = False

    def setup(self) -> None:
        """Load the iterator object, once socket LB is attached; one warning when this kernel cannot."""
        dp = self.dataplane
        if dp.socklb is None or self.destroyer is not None:
            return
        if not self.enabled:
            self.problem = "off (--no-socket-lb-destroy-connected-udp)"
            log.info(
                "connected UDP sockets are not moved off removed backends: "
                "--no-socket-lb-destroy-connected-udp; removals are counted in "
                'kproxy_socket_lb_udp_removals_unhandled_total{reason="disabled"}'
            )
            return
        destroyer = SockDestroyer(self.dataplane.cfg.bpffs, self.object_path)
        try:
            destroyer.load()
        except SockDestroyUnavailable as e:
            self.problem = str(e)
            log.warning(
                "connected UDP sockets are NOT moved off removed backends: %s. With socket load balancing a "
                "connected UDP socket (a resolver's, a Go client's) keeps the backend it got at connect() "
                "and keeps sending to it after that backend left the Service, until the application "
                "reconnects; unconnected sockets and pod traffic are not affected. Needs Linux >= 6.5 "
                "(bpf_sock_destroy); removals not acted on are counted in "
                "kproxy_socket_lb_udp_removals_unhandled_total", e,
            )  # fmt: skip
            return
        self.destroyer = destroyer
        self.problem = None
        log.info("connected UDP sockets follow their backend's removal (iter/udp + bpf_sock_destroy)")

    def removed(self, udp_left: UdpLeft) -> None:
        """A sync removed these UDP backends from their service ports (called after its writes)."""
        if not udp_left or self.dataplane.socklb is None:
            return
        if self.destroyer is None:
            m = self.metrics()
            if m is not None:
                reason = "unsupported" if self.enabled else "disabled"
                m.udp_removals_unhandled.labels(reason).inc(len(udp_left))
            return
        self._pending.extend(removal_of(*r) for r in udp_left)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            batch = self.still_removed(batch)
            if batch:
                await asyncio.to_thread(self.run_once, batch)

    def still_removed(self, removals: Sequence[Removal]) -> list[Removal]:
        """REMOVALS less those whose backend is back in the slots of the service port it left (a later
        sync re-added it, or the port's id went to a Service that has it): their sockets are connected
        to a live backend of that port. Called on the sync's thread, just before a run."""
        if self.slot_backends is None:
            return list(removals)
        now: dict[tuple[int, int], set[tuple[bytes, int]]] = {}
        out = []
        for r in removals:
            have = now.get((r.family, r.svc_id))
            if have is None:
                have = now[(r.family, r.svc_id)] = self.slot_backends(r.family, r.svc_id)
            if (r.addr, socket.htons(r.port)) in have:
                log.debug("UDP backend %s is back in its service port: its sockets stay", r)
            else:
                out.append(r)
        return out

    def run_once(self, removals: Sequence[Removal]) -> DestroyRun | None:
        """One run over every namespace of the socket-LB cgroup (blocks: a worker thread's)."""
        destroyer = self.destroyer
        if destroyer is None:
            return None
        m = self.metrics()
        denied: list[str] = []
        # --socket-lb-host-netns-only: the hooks translate only sockets of the agent's own namespace, so
        # no other namespace holds a socket to look for (nor needs the host's PIDs and CAP_SYS_PTRACE)
        cgroup = None if self.dataplane.cfg.socket_lb_host_netns_only else self.dataplane.socket_lb_cgroup
        namespaces = cgroup_namespaces(cgroup, denied=denied)
        if denied and not self._said_denied:
            self._said_denied = True  # once: host processes an LSM hides are mostly in the agent's namespace
            log.warning(
                "cannot open the network namespace of %d processes of the socket-LB cgroup (%s%s): connected "
                "UDP sockets in namespaces only they are in are not looked for; the agent needs the host's "
                "PID namespace and CAP_SYS_PTRACE (an AppArmor or SELinux ptrace rule may deny it too). "
                "Said once", len(denied), ", ".join(denied[:3]), ", ..." if len(denied) > 3 else "",
            )  # fmt: skip
        try:
            result = destroyer.run(removals, namespaces)
        except Exception as e:  # the kernel refused a map write or an iterator: counted, said, go on
            log.warning(
                "cannot destroy the connected UDP sockets of %d removed backends: %s", len(removals), e
            )
            if m is not None:
                m.udp_removals_unhandled.labels("error").inc(len(removals))
            return None
        finally:
            close_namespaces(namespaces)
        self.runs += 1
        for fail in result.failed_namespaces:
            log.warning("connected UDP sockets of removed backends not looked for in %s", fail)
        for s in result.sockets:
            if s.err:
                log.warning("cannot destroy UDP socket %d (to %s): error %d", s.cookie, s.port, s.err)
        if m is not None:
            for s in result.sockets:
                if s.err:
                    m.udp_destroy_errors.inc()
                else:
                    m.udp_sockets_destroyed.labels("IPv4" if s.family == 4 else "IPv6").inc()
            if result.failed_namespaces:
                m.udp_removals_unhandled.labels("error").inc(len(removals))
        log.log(
            logging.INFO if result.sockets else logging.DEBUG,
            "destroyed %d connected UDP sockets of %d removed backends (%s) in %d network namespaces "
            "in %.1f ms", result.destroyed, len(removals), ", ".join(map(str, removals[:5]))
            + (", ..." if len(removals) > 5 else ""), result.namespaces, result.seconds * 1000,
        )  # fmt: skip
        return result

    def close(self) -> None:
        if self.destroyer is not None:
            self.destroyer.close()
            self.destroyer = None
