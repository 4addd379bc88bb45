"""Churn soak: Services and backends created, scaled and deleted at a steady rate while probes check
every answer against the backends valid at that moment.

    python -m bench.soak --duration 600 --rate 200 [--services 12] [--window-ms 1000] [--out bench/results]

A lab of 2 nodes (3 server pods each, one client pod each) and an external client; agents on both nodes
follow the lab's manifest directory (file source). The churn driver rewrites one Service's manifest (a
`kind: List` JSON file with the Service and its EndpointSlice, written atomically) per change and logs
(time, service, valid backend set). Probes (one asyncio loop per source namespace, in a thread that
joined that namespace) connect continuously: ClusterIP from the client pods, NodePort to both nodes and
LoadBalancer from the external client. Every pod server answers with its identity.

The lab is dual-stack and so is every Service (RequireDualStack: a ClusterIP, an EndpointSlice, a
LoadBalancer IP per family), so one change moves both families' backend sets at once. Every probe
target exists once per family (`--families 4 6`, both by default): ClusterIP over IPv6 from the client
pods, NodePort to the nodes' IPv6 addresses, LoadBalancer IPv6 (fd00:78::/64) from the external client,
and the long-lived streams too; every check below is made per family and the report is split by family.

Checks (see `Soak.report`):
  wrong answers       an answer from a backend that was not valid during the probe, nor removed less than
                      the programming window W before it (in-window answers are counted, with their lag);
  failed probes       to a Service that had ready backends during the whole [start - W, end] of the probe;
  broken streams      long-lived TCP streams to backends that are never removed (anchors of the stable
                      Services), a round trip every 500 ms;
  TTFP                change -> first probe answered by a new backend, for backends that stayed long enough;
  agents              RSS and CPU from /proc, sampled every second (PNG plot);
  maps                svc4/be4/ct4/aff4 and svc6/be6/ct6/aff6 entries per node over time, back to
                      baseline once churn ends and conntrack expired (short --ct-timeout-* for the soak).
Both agents are killed with SIGKILL twice and restarted, while churn and probes go on. A probe that starts
during a restart (kill -9 until both agents re-synced, plus W) is not judged as strictly as the others;
with --judged-s J > 0 each kill waits until J s of strictly judged churn followed the previous restart
(or the start), and the churn goes on until J s followed the last one, however long the restarts take.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import POD_PORTS, Host
from kproxy.lab.netns import netns_path

CT_TIMEOUTS = {"syn": 3, "tcp": 8, "fin": 2, "udp": 3}
SWEEP_INTERVAL = 1.0
TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
ANCHORS = ("n1p1", "n2p1")  # never removed from the stable Services; the long-lived streams end there
MAP_NAMES = ("svc4", "be4", "ct4", "aff4", "svc6", "be6", "ct6", "aff6")
FAMILY_LABEL = {4: "IPv4", 6: "IPv6"}
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass
class Slot:
    """One churned (or stable) Service: fixed name, frontends and type; its backend set changes."""

    index: int
    name: str
    type: str
    cluster_ip: str
    cluster_ip6: str
    target: int
    node_port: int | None = None
    lb_ip: str | None = None
    lb_ip6: str | None = None
    stable: bool = False
    backends: frozenset[str] | None = None  # pod names; None = Service absent
    probed: bool = True
    history: list[tuple[float, frozenset[str] | None]] = field(
        default_factory=lambda: [(float("-inf"), None)]
    )
    history_t: list[float] = field(default_factory=lambda: [float("-inf")])

    def record(self, t: float) -> None:
        self.history.append((t, self.backends))
        self.history_t.append(t)

    def sets_during(self, t0: float, t1: float) -> list[frozenset[str] | None]:
        """Every backend set that was current at some moment of [t0, t1]."""
        i = max(0, bisect.bisect_right(self.history_t, t0) - 1)
        out = []
        for t, s in self.history[i:]:
            if t > t1:
                break
            out.append(s)
        return out

    def removed_at(self, pod: str, before: float) -> float | None:
        """When POD last stopped being valid before `before` (None: it never was)."""
        i = bisect.bisect_right(self.history_t, before) - 1
        while i >= 0:
            t, s = self.history[i]
            if s is not None and pod in s:
                return self.history[i + 1][0] if i + 1 < len(self.history) else None
            i -= 1
        return None


@dataclass
class Probe:
    t0: float
    t1: float
    slot: int
    kind: str  # clusterip@n1 / nodeport@n2 / lb
    pod: str | None  # None: failed
    error: str = ""
    family: int = 4


def setns(name: str) -> None:
    fd = os.open(netns_path(name), os.O_RDONLY)
    try:
        if _libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rng = random.Random(args.seed)
        self.lab: Lab | None = None
        self.slots: list[Slot] = []
        self.probes: list[Probe] = []
        self.stream_breaks: list[str] = []
        self.streams_open = 0
        self.stream_roundtrips = 0
        self.streams_by_family = {4: 0, 6: 0}
        self.roundtrips_by_family = {4: 0, 6: 0}
        self.samples: list[dict[str, Any]] = []
        self.changes = 0
        self.change_lag: list[float] = []
        self.kills: list[float] = []
        self.restart_errors: list[str] = []
        self.restarts: list[tuple[float, float]] = []  # (kill, both agents synced again), monotonic
        self.killers: list[threading.Thread] = []
        self.stop_probes = threading.Event()
        self.stop_streams = threading.Event()
        self.lock = threading.Lock()
        self.pod_by_ip: dict[str, str] = {}
        self.server_pods: list[str] = []
        self.clients: list[Host] = []
        self.t_start = 0.0
        self.t_churn_end = 0.0

    # ---- set-up ----
    def make_slots(self) -> None:
        for i in range(self.a.services):
            typ = TYPES[i % 3]
            self.slots.append(
                Slot(
                    index=i,
                    name=f"soak-{i}",
                    type=typ,
                    cluster_ip=f"10.96.100.{10 + i}",
                    cluster_ip6=f"fd00:10:96::100:{10 + i}",
                    target=POD_PORTS[i % 2],
                    node_port=30100 + i if typ != "ClusterIP" else None,
                    lb_ip=f"192.168.78.{10 + i}" if typ == "LoadBalancer" else None,
                    lb_ip6=f"fd00:78::{10 + i}" if typ == "LoadBalancer" else None,
                )
            )
        for k in range(self.a.background):
            i = len(self.slots)
            self.slots.append(
                Slot(
                    index=i,
                    name=f"soak-bg-{k}",
                    type="ClusterIP",
                    cluster_ip=f"10.97.{k // 250}.{1 + k % 250}",
                    cluster_ip6=f"fd00:10:96::97:{k:x}",
                    target=POD_PORTS[k % 2],
                    probed=False,
                )
            )
        for j, typ in enumerate(("ClusterIP", "NodePort")):
            i = len(self.slots)
            self.slots.append(
                Slot(
                    index=i,
                    name=f"stable-{j}",
                    type=typ,
                    cluster_ip=f"10.96.101.{10 + j}",
                    cluster_ip6=f"fd00:10:96::101:{10 + j}",
                    target=8080,
                    node_port=30200 + j if typ == "NodePort" else None,
                    stable=True,
                )
            )

    def objects(self, s: Slot) -> dict[str, Any]:
        assert self.lab is not None and s.backends is not None
        port = mf.Port(name="p", port=80, target=s.target, node_port=s.node_port)
        # Dual-stack: both ClusterIPs, an LB IP per family, one EndpointSlice per family.
        lbs = [ip for ip in (s.lb_ip, s.lb_ip6) if ip]
        svc = mf.service(s.name, [port], s.cluster_ip, type=s.type, lb_ips=lbs, cluster_ip6=s.cluster_ip6)
        pods = [self.lab.pod(p) for p in sorted(s.backends)]
        eps = [(p.ip, p.node) for p in pods] + [(p.ip6, p.node) for p in pods]
        return {"apiVersion": "v1", "kind": "List", "items": [svc, *mf.endpoint_slices(s.name, eps, [port])]}

    def write(self, s: Slot) -> None:
        """Make the slot's current backend set the lab's, and log it as valid from just before the agents
        can see it. Logged after the rename, a busy machine (this process's probe threads holding the
        GIL) could delay the log by 100 ms and more, while the agents had already programmed the change:
        probes answered by a just-added backend then counted as wrong answers."""
        assert self.lab is not None
        path = self.lab.manifests_dir / f"{s.name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        if s.backends is not None:
            tmp.write_text(json.dumps(self.objects(s)))
        s.record(time.monotonic())
        if s.backends is None:
            path.unlink(missing_ok=True)
        else:
            os.rename(tmp, path)

    def random_backends(self, lo: int = 1) -> frozenset[str]:
        return frozenset(self.rng.sample(self.server_pods, self.rng.randint(lo, 3)))

    # ---- churn ----
    def change(self) -> None:
        s = self.rng.choice(self.slots)
        r = self.rng.random()
        if s.stable:
            extra = frozenset(self.rng.sample([p for p in self.server_pods if p not in ANCHORS], 2))
            s.backends = frozenset(ANCHORS) | frozenset(p for p in extra if self.rng.random() < 0.5)
        elif s.backends is None:
            s.backends = self.random_backends()
        elif r < 0.15:
            s.backends = None
        elif r < 0.25:
            s.backends = frozenset()  # scaled to zero
        else:
            cur = set(s.backends)
            if cur and (len(cur) >= 3 or self.rng.random() < 0.5):
                cur.discard(self.rng.choice(sorted(cur)))
            free = [p for p in self.server_pods if p not in cur]
            if free and len(cur) < 3:
                cur.add(self.rng.choice(free))
            s.backends = frozenset(cur)
        self.write(s)
        self.changes += 1

    def judged_from(self) -> float:
        """When the strictly judged churn after the last restart (or the start) began: its end plus
        the window."""
        return self.restarts[-1][1] + self.a.window_ms / 1000 if self.restarts else self.t_start

    def kill_due(self, now: float, at: float) -> bool:
        """Whether to kill the agents now, the kill being planned at AT: with --judged-s, not while a
        restart is under way nor before that long of strictly judged churn followed the last one."""
        if now < at:
            return False
        if self.a.judged_s <= 0:
            return True
        return not any(k.is_alive() for k in self.killers) and now >= self.judged_from() + self.a.judged_s

    def churn_until(self, until: float, kills_left: int) -> float:
        """When the churn ends: UNTIL; with --judged-s, not before every kill was made and that long of
        strictly judged churn followed the last restart."""
        if self.a.judged_s <= 0:
            return until
        if kills_left or any(k.is_alive() for k in self.killers):
            return float("inf")
        return max(until, self.judged_from() + self.a.judged_s)

    def churn(self, until: float) -> None:
        period = 1.0 / self.a.rate
        nxt = time.monotonic()
        kill_at = [self.t_start + self.a.duration * f for f in (1 / 3, 2 / 3)]
        while (now := time.monotonic()) < self.churn_until(until, len(kill_at)):
            if kill_at and self.kill_due(now, kill_at[0]):
                kill_at.pop(0)
                killer = threading.Thread(target=self.kill_agents_guarded, daemon=True)
                killer.start()
                self.killers.append(killer)
            if now < nxt:
                time.sleep(nxt - now)
                continue
            self.change_lag.append(now - nxt)
            self.change()
            nxt += period
            if now - nxt > 1.0:  # far behind: do not burst, report the rate reached instead
                nxt = now

    def kill_agents_guarded(self) -> None:
        try:
            self.kill_agents()
        except Exception as e:  # reported: a restart that fails is a soak failure
            self.restart_errors.append(f"{type(e).__name__}: {e}"[:3000])

    def kill_agents(self) -> None:
        assert self.lab is not None
        t_kill = time.monotonic()
        self.kills.append(t_kill - self.t_start)
        for n in self.lab.nodes:
            self.lab.stop_agent(n.name, signal.SIGKILL)
        for n in self.lab.nodes:
            self.lab.start_agent(n.name)
        for n in self.lab.nodes:
            self.lab.wait_agent(n.name, timeout=60)
        self.restarts.append((t_kill, time.monotonic()))

    def in_restart(self, t: float, w: float) -> bool:
        """Whether t falls while the agents were down or re-syncing (plus the window): changes made then
        can only be programmed once the new agents are up; the datapath keeps the last programmed state."""
        return any(k <= t <= r + w for k, r in self.restarts)

    # ---- probes ----
    def targets(self) -> dict[str, list[tuple[int, str, str, int, int]]]:
        """Per source namespace: (slot, kind, addr, port, family), each target once per family."""
        assert self.lab is not None
        lab = self.lab
        fams = self.a.families
        out: dict[str, list[tuple[int, str, str, int, int]]] = {}
        for c in self.clients:
            out[c.ns] = [
                (s.index, f"clusterip@{c.name}", s.cluster_ip6 if f == 6 else s.cluster_ip, 80, f)
                for s in self.slots
                if s.probed
                for f in fams
            ]
        ext: list[tuple[int, str, str, int, int]] = []
        for s in self.slots:
            for f in fams:
                if s.node_port:
                    ext += [
                        (s.index, f"nodeport@{n.name}", n.ip6 if f == 6 else n.ip, s.node_port, f)
                        for n in lab.nodes
                    ]
                lb = s.lb_ip6 if f == 6 else s.lb_ip
                if lb:
                    ext.append((s.index, "lb", lb, 80, f))
        out[lab.ext.ns] = ext
        return out

    async def probe_one(self, slot: int, kind: str, addr: str, port: int, family: int = 4) -> None:
        t0 = time.monotonic()
        pod = None
        err = ""
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(addr, port), self.a.probe_timeout)
            try:
                line = await asyncio.wait_for(r.readline(), self.a.probe_timeout)
                pod = json.loads(line)["pod"] if line else None
                if pod is None:
                    err = "closed without a greeting"
            finally:
                w.close()
        except (OSError, TimeoutError, ValueError) as e:
            err = type(e).__name__ + (f" {e.errno}" if isinstance(e, OSError) and e.errno else "")
        self.probes.append(Probe(t0, time.monotonic(), slot, kind, pod, err, family))

    async def prober(self, targets: list[tuple[int, str, str, int, int]]) -> None:
        interval = self.a.probe_interval / 1000
        pending: set[asyncio.Task[None]] = set()
        nxt = time.monotonic()
        k = 0
        step = interval / max(1, len(targets))
        while not self.stop_probes.is_set():
            t = targets[k % len(targets)]
            k += 1
            task = asyncio.create_task(self.probe_one(*t))
            pending.add(task)
            task.add_done_callback(pending.discard)
            nxt += step
            delay = nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                nxt = time.monotonic()
        await asyncio.gather(*pending, return_exceptions=True)

    async def stream(self, addr: str, port: int, label: str) -> None:
        """Keep one TCP stream to an anchor open and echoing; a connection to a non-anchor is retried."""
        fam = 6 if ":" in addr else 4
        for _ in range(50):
            r, w = await asyncio.open_connection(addr, port)
            hello = json.loads(await r.readline())
            if hello["pod"] in ANCHORS:
                break
            w.close()
        else:
            self.stream_breaks.append(f"{label}: never reached an anchor")
            return
        self.streams_open += 1
        self.streams_by_family[fam] += 1
        n = 0
        try:
            while not self.stop_streams.is_set():
                n += 1
                msg = f"{label} {n:08d}\n".encode()
                w.write(msg)
                await w.drain()
                got = await asyncio.wait_for(r.readexactly(len(msg)), 15)  # a break, not a slow machine
                if got != msg:
                    raise ConnectionError("echo mismatch")
                self.stream_roundtrips += 1
                self.roundtrips_by_family[fam] += 1
                await asyncio.sleep(0.5)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.stream_breaks.append(f"{label} to {hello['pod']} broke after {n} round trips: {e!r}")
        finally:
            w.close()

    def ns_thread(
        self, ns: str, targets: list[tuple[int, str, str, int, int]], streams: list[tuple[str, int, str]]
    ) -> None:
        setns(ns)

        async def main() -> None:
            st = [asyncio.create_task(self.stream(*s)) for s in streams]
            await self.prober(targets)
            while not self.stop_streams.is_set():
                await asyncio.sleep(0.1)
            await asyncio.gather(*st, return_exceptions=True)

        asyncio.run(main())

    # ---- sampling ----
    def sample(self) -> None:
        from kproxy.bpf.maps import KproxyMaps

        assert self.lab is not None
        row: dict[str, Any] = {"t": time.monotonic() - self.t_start}
        for n in self.lab.nodes:
            p = self.lab.agent_proc(n.name)
            if p is not None:
                with contextlib.suppress(OSError):
                    st = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                    row[f"{n.name}.cpu_ticks"] = int(st[11]) + int(st[12])
                    row[f"{n.name}.pid"] = p.pid
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            row[f"{n.name}.rss_kb"] = int(line.split()[1])
            with contextlib.suppress(Exception), KproxyMaps.open(n.bpffs) as m:
                for name in MAP_NAMES:
                    if getattr(m, name, None) is not None:
                        row[f"{n.name}.{name}"] = len(getattr(m, name))
        self.samples.append(row)

    def sampler(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.sample()

    def map_counts(self) -> dict[str, int]:
        self.sample()
        return {k: v for k, v in self.samples[-1].items() if k.split(".")[-1] in MAP_NAMES}

    # ---- run ----
    def run(self) -> dict[str, Any]:
        a = self.a
        ct = [f"--ct-timeout-{k}={v}" for k, v in CT_TIMEOUTS.items()]
        agent_args = [*ct, f"--ct-sweep-interval={SWEEP_INTERVAL}", "--log-level", "info"]
        self.make_slots()
        with Lab(nodes=2, pods_per_node=3, agent_args=agent_args) as lab:
            self.lab = lab
            self.server_pods = [p.name for p in lab.pods]
            self.clients = [lab.add_pod(n.name, start_server=False) for n in lab.nodes]
            self.pod_by_ip = {p.ip: p.name for p in lab.pods}
            for s in self.slots:
                if s.stable:
                    s.backends = frozenset(ANCHORS)
                    self.write(s)
            for s in self.slots:
                if s.stable:
                    lab.wait_programmed(s.cluster_ip, 80, [lab.pod(p).ip for p in ANCHORS], timeout=20)
                    lab.wait_programmed(s.cluster_ip6, 80, [lab.pod(p).ip6 for p in ANCHORS], timeout=20)
            time.sleep(1.0)
            baseline = self.map_counts()  # the stable Services only, no conntrack yet
            self.samples.clear()  # taken before t_start: not part of the time series
            stop_sampler = threading.Event()
            self.t_start = time.monotonic()
            sampler = threading.Thread(target=self.sampler, args=(stop_sampler,), daemon=True)
            sampler.start()
            stable = [s for s in self.slots if s.stable]
            streams: dict[str, list[tuple[str, int, str]]] = {c.ns: [] for c in self.clients}
            streams[lab.ext.ns] = []
            for f in a.families:
                v = "-v6" if f == 6 else ""
                for c in self.clients:
                    vip = stable[0].cluster_ip6 if f == 6 else stable[0].cluster_ip
                    for k in range(a.streams):
                        streams[c.ns].append((vip, 80, f"stream{v}-{c.name}-{k}"))
                for k in range(a.streams):
                    n = lab.nodes[k % 2]
                    addr = n.ip6 if f == 6 else n.ip
                    streams[lab.ext.ns].append(
                        (addr, stable[1].node_port or 0, f"stream{v}-ext-{n.name}-{k}")
                    )
            threads = [
                threading.Thread(target=self.ns_thread, args=(ns, tg, streams[ns]), daemon=True)
                for ns, tg in self.targets().items()
            ]
            for t in threads:
                t.start()
            try:
                self.churn(self.t_start + a.duration)
                self.t_churn_end = time.monotonic()
                for killer in self.killers:  # a restart still under way on a busy machine is waited for
                    killer.join(timeout=180)
                # Churn over: every churned Service goes away; the stable ones return to their anchors.
                for s in self.slots:
                    s.backends = frozenset(ANCHORS) if s.stable else None
                    self.write(s)
                time.sleep(max(2.0, a.window_ms / 1000))
                self.stop_probes.set()
                time.sleep(1.0)
                self.stop_streams.set()
                for t in threads:
                    t.join(timeout=30)
                drained = self.wait_baseline(baseline)
            finally:
                self.stop_probes.set()
                self.stop_streams.set()
                stop_sampler.set()
                sampler.join(timeout=5)
            logs = {n.name: lab.log(f"agent-{n.name}") for n in lab.nodes}
            return self.report(baseline, drained, logs)

    def wait_baseline(self, baseline: dict[str, int]) -> dict[str, int]:
        """Map counts once they are back to the baseline, or once conntrack had time to expire twice over."""
        deadline = time.monotonic() + max(CT_TIMEOUTS.values()) * 2 + 10
        want = baseline
        while True:
            got = self.map_counts()
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(1.0)

    # ---- analysis ----
    def check(self, probes: list[Probe]) -> dict[str, Any]:
        """The probe checks (wrong answers, failed probes, answers in the window, TTFP) over PROBES."""
        w = self.a.window_ms / 1000
        wrong: list[str] = []
        in_window: list[float] = []
        failed: list[str] = []
        excused_fail = restart_fail = restart_stale = 0
        ok = 0
        first_hit: dict[tuple[int, str], list[float]] = {}
        for p in probes:
            s = self.slots[p.slot]
            fam = FAMILY_LABEL[p.family]
            if p.pod is None:
                sets = s.sets_during(p.t0 - w, p.t1)
                if any(not x for x in sets):  # absent or empty at some moment: failure allowed
                    excused_fail += 1
                elif self.in_restart(p.t0, w):
                    restart_fail += 1
                else:
                    failed.append(f"t={p.t0 - self.t_start:.3f} {s.name} {p.kind} {fam}: {p.error}")
                continue
            ok += 1
            first_hit.setdefault((p.slot, p.pod), []).append(p.t1)
            if any(x and p.pod in x for x in s.sets_during(p.t0, p.t1)):
                continue
            removed = s.removed_at(p.pod, p.t0)
            if removed is not None and p.t0 - removed <= w:
                in_window.append((p.t0 - removed) * 1000)
            elif self.in_restart(p.t0, w):
                restart_stale += 1
            else:
                lag = f"{(p.t0 - removed) * 1000:.0f} ms after removal" if removed else "never valid"
                wrong.append(
                    f"t={p.t0 - self.t_start:.3f} {s.name} {p.kind} {fam}: answered by {p.pod} ({lag})"
                )
        for hits in first_hit.values():
            hits.sort()
        ttfp, unreached = self.ttfp(first_hit, w)
        return {
            "probes": len(probes),
            "answers_ok": ok,
            "wrong_answers": len(wrong),
            "wrong_examples": wrong[:20],
            "in_window_answers": len(in_window),
            "in_window_lag_ms": pct(in_window),
            "failed_probes": len(failed),
            "failed_examples": failed[:20],
            "failed_excused": excused_fail,
            "restart_stale_answers": restart_stale,
            "restart_failed_probes": restart_fail,
            "ttfp_ms": pct(ttfp),
            "ttfp_count": len(ttfp),
            "backends_unreached": unreached,
        }

    def report(self, baseline: dict[str, int], final: dict[str, int], logs: dict[str, str]) -> dict[str, Any]:
        total = self.check(self.probes)
        by_family: dict[str, dict[str, Any]] = {}
        for f in self.a.families:
            fam = FAMILY_LABEL[f]
            breaks = [b for b in self.stream_breaks if ("-v6-" in b) == (f == 6)]
            by_family[fam] = {
                **self.check([p for p in self.probes if p.family == f]),
                "streams": self.streams_by_family[f],
                "stream_roundtrips": self.roundtrips_by_family[f],
                "streams_broken": len(breaks),
                "maps_leak": {
                    k: final.get(k, 0) - v
                    for k, v in baseline.items()
                    if final.get(k, 0) != v and k.endswith(str(f))
                },
            }
        agent = self.agent_series()
        dur = max(1e-9, self.t_churn_end - self.t_start)
        res: dict[str, Any] = {
            "config": {
                "duration_s": self.a.duration,
                "judged_s": self.a.judged_s,
                "rate_target": self.a.rate,
                "services": self.a.services,
                "window_ms": self.a.window_ms,
                "probe_interval_ms": self.a.probe_interval,
                "ct_timeouts_s": CT_TIMEOUTS,
                "seed": self.a.seed,
                "families": [FAMILY_LABEL[f] for f in self.a.families],
            },
            "churn_s": dur,
            "changes": self.changes,
            "rate_reached": self.changes / dur,
            **total,  # both families together; by_family has the same checks per family
            "probe_rate": len(self.probes) / dur,
            "by_family": by_family,
            "restart_gaps_s": [(k - self.t_start, r - k) for k, r in self.restarts],
            "restart_errors": self.restart_errors,
            "streams": self.streams_open,
            "stream_roundtrips": self.stream_roundtrips,
            "streams_broken": len(self.stream_breaks),
            "stream_breaks": self.stream_breaks[:20],
            "kills_at_s": self.kills,
            "maps_baseline": baseline,
            "maps_final": final,
            "maps_leak": {k: final.get(k, 0) - v for k, v in baseline.items()
                          if final.get(k, 0) != v},
            "agent": agent,
            "agent_errors": {n: [ln for ln in t.splitlines() if " ERROR " in ln or "Traceback" in ln][:10]
                             for n, t in logs.items()},
            "samples": self.samples,
        }  # fmt: skip
        return res

    def ttfp(self, first_hit: dict[tuple[int, str], list[float]], w: float) -> tuple[list[float], int]:
        """For each backend addition to a probed Service that stayed valid at least 1 s (outside agent
        restarts): time to the first probe it answered."""
        out: list[float] = []
        unreached = 0
        for s in self.slots:
            if not s.probed:
                continue
            prev: frozenset[str] = frozenset()
            for i, (t, cur) in enumerate(s.history):
                cur_set = cur or frozenset()
                for pod in cur_set - prev:
                    end = self._valid_until(s, i, pod)
                    if end - t < 1.0 or self.in_restart(t, w):
                        continue
                    hits = first_hit.get((s.index, pod), [])
                    j = bisect.bisect_left(hits, t)
                    if j < len(hits) and hits[j] <= end:
                        out.append((hits[j] - t) * 1000)
                    else:
                        unreached += 1
                prev = cur_set
        return out, unreached

    def _valid_until(self, s: Slot, i: int, pod: str) -> float:
        for t, cur in s.history[i + 1 :]:
            if not cur or pod not in cur:
                return t
        return self.t_churn_end

    def agent_series(self) -> dict[str, Any]:
        hz = os.sysconf("SC_CLK_TCK")
        out: dict[str, Any] = {}
        for n in ("n1", "n2"):
            rss = [r[f"{n}.rss_kb"] for r in self.samples if f"{n}.rss_kb" in r]
            cpu = []
            prev = None
            for r in self.samples:
                if f"{n}.cpu_ticks" not in r:
                    prev = None
                    continue
                if prev and prev[2] == r[f"{n}.pid"] and r["t"] - prev[0] >= 0.5:
                    cpu.append(100 * (r[f"{n}.cpu_ticks"] - prev[1]) / hz / max(1e-3, r["t"] - prev[0]))
                if not prev or r["t"] - prev[0] >= 0.5 or prev[2] != r[f"{n}.pid"]:
                    prev = (r["t"], r[f"{n}.cpu_ticks"], r[f"{n}.pid"])
            out[n] = {
                "rss_mb_max": max(rss) / 1024 if rss else None,
                "rss_mb_last": rss[-1] / 1024 if rss else None,
                "cpu_pct_mean": statistics.fmean(cpu) if cpu else None,
                "cpu_pct_max": max(cpu) if cpu else None,
            }
        return out


def pct(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p99": None, "max": None}
    s = sorted(xs)
    return {"p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(len(s) * 0.99))], "max": s[-1]}


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = res["samples"]
    hz = os.sysconf("SC_CLK_TCK")
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for n in ("n1", "n2"):
        t = [r["t"] for r in rows if f"{n}.rss_kb" in r]
        axes[0].plot(t, [r[f"{n}.rss_kb"] / 1024 for r in rows if f"{n}.rss_kb" in r], label=f"{n} RSS MiB")
        ts, cpu, prev = [], [], None
        for r in rows:
            if f"{n}.cpu_ticks" in r and prev and prev[2] == r[f"{n}.pid"] and r["t"] - prev[0] >= 0.5:
                ts.append(r["t"])
                cpu.append(100 * (r[f"{n}.cpu_ticks"] - prev[1]) / hz / max(1e-3, r["t"] - prev[0]))
            if f"{n}.cpu_ticks" not in r:
                prev = None
            elif not prev or r["t"] - prev[0] >= 0.5 or prev[2] != r[f"{n}.pid"]:
                prev = (r["t"], r[f"{n}.cpu_ticks"], r[f"{n}.pid"])
        axes[1].plot(ts, cpu, label=f"{n} CPU %")
        for m in MAP_NAMES:
            k = f"{n}.{m}"
            axes[2].plot([r["t"] for r in rows if k in r], [r[k] for r in rows if k in r], label=k)
    for k in res["kills_at_s"]:
        for ax in axes:
            ax.axvline(k, color="red", linestyle=":", linewidth=1)
    axes[0].set_ylabel("MiB")
    axes[1].set_ylabel("% of a CPU")
    axes[2].set_ylabel("map entries")
    axes[2].set_xlabel("seconds (red: kill -9 of both agents)")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"kproxy churn soak: {res['config']['rate_target']} changes/s for {res['config']['duration_s']} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def markdown(res: dict[str, Any]) -> str:
    def f(x: float | None, unit: str = "") -> str:
        return "-" if x is None else f"{x:.1f}{unit}"

    t, lag = res["ttfp_ms"], res["in_window_lag_ms"]
    lines = [
        f"# Churn soak ({res['config']['duration_s']} s, target {res['config']['rate_target']} changes/s)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| changes in {res.get('churn_s', res['config']['duration_s']):.1f} s (rate reached) | "
        f"{res['changes']} ({res['rate_reached']:.0f}/s) |",
        f"| probes (rate) | {res['probes']} ({res['probe_rate']:.0f}/s) |",
        f"| wrong answers (beyond {res['config']['window_ms']} ms window) | **{res['wrong_answers']}** |",
        f"| in-window answers (lag p50/p99/max) | {res['in_window_answers']} "
        f"({f(lag['p50'])}/{f(lag['p99'])}/{f(lag['max'])} ms) |",
        f"| failed probes with ready backends | **{res['failed_probes']}** "
        f"(excused: {res['failed_excused']}) |",
        f"| long-lived streams broken | **{res['streams_broken']}** of {res['streams']} "
        f"({res['stream_roundtrips']} round trips) |",
        f"| time to first ping p50/p99/max | {f(t['p50'])} / {f(t['p99'])} / {f(t['max'])} ms "
        f"(n={res['ttfp_count']}, unreached {res['backends_unreached']}) |",
        f"| agent kills at s (down+resync s) | "
        f"{', '.join(f'{k:.0f} ({g:.1f})' for k, g in res['restart_gaps_s'])} |",
        f"| during restarts: stale answers, failed probes | {res['restart_stale_answers']}, "
        f"{res['restart_failed_probes']} |",
        f"| map leak after churn | {res['maps_leak'] or 'none'} |",
    ]
    for n, a in res["agent"].items():
        lines.append(
            f"| agent {n} RSS max/last, CPU mean/max | {f(a['rss_mb_max'], ' MiB')} / "
            f"{f(a['rss_mb_last'], ' MiB')}, {f(a['cpu_pct_mean'], '%')} / {f(a['cpu_pct_max'], '%')} |"
        )
    fams = res.get("by_family", {})
    if fams:
        lines += ["", "Per family (every check above, on that family's probes and streams):", ""]
        lines += ["| measure | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]

        def row(label: str, cell: Any) -> str:
            return f"| {label} | " + " | ".join(cell(r) for r in fams.values()) + " |"

        win = res["config"]["window_ms"]
        lines += [
            row("probes, answered", lambda r: f"{r['probes']}, {r['answers_ok']}"),
            row(f"wrong answers (beyond {win} ms)", lambda r: f"**{r['wrong_answers']}**"),
            row(
                "in-window answers (lag p50/p99/max ms)",
                lambda r: (
                    f"{r['in_window_answers']} ({f(r['in_window_lag_ms']['p50'])}/"
                    f"{f(r['in_window_lag_ms']['p99'])}/{f(r['in_window_lag_ms']['max'])})"
                ),
            ),
            row(
                "failed probes with ready backends",
                lambda r: f"**{r['failed_probes']}** (excused {r['failed_excused']})",
            ),
            row(
                "long-lived streams broken",
                lambda r: (
                    f"**{r['streams_broken']}** of {r['streams']} ({r['stream_roundtrips']} round trips)"
                ),
            ),
            row(
                "TTFP p50/p99/max ms",
                lambda r: (
                    f"{f(r['ttfp_ms']['p50'])} / {f(r['ttfp_ms']['p99'])} / {f(r['ttfp_ms']['max'])} "
                    f"(n={r['ttfp_count']})"
                ),
            ),
            row(
                "during restarts: stale, failed",
                lambda r: f"{r['restart_stale_answers']}, {r['restart_failed_probes']}",
            ),
            row("map leak after churn", lambda r: str(r["maps_leak"] or "none")),
        ]
    lines += ["", "Changes made while the agents are down (kill -9 until both re-synced, plus the window) "
              "are programmed by the restarted agents: answers then are counted apart, not as wrong answers.",
              "TTFP includes the probe sampling delay: each Service/type is probed every "
              f"{res['config']['probe_interval_ms']} ms and picks a backend at random.", ""]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of churn [600]")
    ap.add_argument("--rate", type=float, default=200, help="changes per second [200]")
    ap.add_argument("--services", type=int, default=12, help="churned and probed Services [12]")
    ap.add_argument("--background", type=int, default=188, help="churned Services not probed [188]")
    ap.add_argument("--window-ms", type=float, default=1000, help="programming window W [1000]")
    ap.add_argument("--probe-interval", type=float, default=100, help="ms between probes of one target [100]")
    # One SYN retransmit (1 s) is a delay, not a failure: on a rare reply-tuple clash (a pod reusing a
    # source port toward another Service on the same backend) kproxy drops the SYN (drop_tuple_held)
    # and the client's retransmit draws again. A probe fails when it has no answer after 2.5 s.
    ap.add_argument("--probe-timeout", type=float, default=2.5, help="seconds [2.5]")
    ap.add_argument("--streams", type=int, default=2, help="long-lived streams per source [2]")
    ap.add_argument(
        "--judged-s",
        type=float,
        default=0,
        help="seconds of strictly judged churn before each kill and after the last restart, the churn "
        "lasting longer than --duration if need be [0: kills at 1/3 and 2/3 of --duration]",
    )
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--families", type=int, nargs="+", choices=(4, 6), default=[4, 6], help="probed families [4 6]"
    )
    ap.add_argument("--out", default="bench/results", help="results directory [bench/results]")
    a = ap.parse_args(argv)
    a.families = tuple(sorted(set(a.families)))
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(4), "little")
    return a


def run(argv: list[str] | None = None, write: bool = True) -> dict[str, Any]:
    a = parse_args(argv)
    res = Soak(a).run()
    if write:
        out = Path(a.out) / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(res, indent=1))
        md = markdown(res)
        if plot(res, out / "soak.png"):
            md += "\n![agents and maps over time](soak.png)\n"
        (out / "soak.md").write_text(md)
        print(md)
        print(f"results in {out}")
    return res


def main(argv: list[str] | None = None) -> None:
    res = run(argv)
    bad = (
        res["wrong_answers"]
        or res["failed_probes"]
        or res["streams_broken"]
        or res["maps_leak"]
        or res["restart_errors"]
    )
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
