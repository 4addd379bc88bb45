"""The event stream: Services and EndpointSlices created, changed and deleted through the API server
double, watched by the real agent (`python -m kproxy agent --source kubernetes`) into real pinned maps.

kube-proxy's cost to stay in sync is its cost per watch event; an agent that starts from a LIST never
measures that. Here the cluster starts empty and every object arrives as a watch event, shaped as a real
kube-apiserver sends it (kubectl's last-applied annotation and managedFields on Services; the
EndpointSlice controller's labels, owner reference, trigger-time annotation and targetRefs on slices).

Phases (each one's agent CPU comes from /proc/PID/stat, all threads; the API double and this
process run apart, so their CPU is not counted):
  create-1k     1,000 Services + their slices created, `kubectl apply` style (two writers)
  update-1k     endpoint changes at a steady rate with 1,000 Services: each change's latency from
                just before its HTTP write to its map entry changed (polled in the pinned map)
  create-10k    9,000 more Services + slices (1,000 -> 10,000)
  update-10k    the steady-rate changes again, at 10,000 Services
  burst-10k     endpoint changes as fast as the writers go, at 10,000 Services
  churn-10k     1,000 Services and their slices deleted, then created again
A phase ends when its last change is in the maps. RSS of the agent at 10,000 Services x N endpoints,
at the end and SETTLE_S later (after the agent's periodic memory chores).
The agent's own programming histogram (watch event handed over -> maps written) is read from
/metrics at the end.

    sudo .venv/bin/python -m bench.bench_events [--services 10000] [--endpoints 10] [--rate 200]
        [--changes 1000] [--burst 5000] [--profile DIR] [--json]

--profile DIR records the agent with py-spy (all threads, samples holding the GIL: Python code
running) into DIR/agent.txt (collapsed stacks) and prints the top functions by own and total
samples; --cprofile FILE runs the agent's main thread under cProfile. For memory: --smaps FILE keeps
the agent's mappings at the end, --tracemalloc FILE a tracemalloc snapshot of what it holds then.
Runs inside a network namespace of its own (kpe-<random>), with a private bpffs; both are gone at
the end, also on errors and SIGTERM. Prints numbers and ratios to issue 13's references; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NODE = "node-a"
NODE_IP = "192.168.0.10"
TICK = os.sysconf("SC_CLK_TCK")

# kube-proxy nftables with a real kube-apiserver v1.36.2, issue 13 (its machine, not this run):
# agent CPU per created object at 1,000 and at 10,000 Services.
REF_KUBE_PROXY_NFT_MS_PER_OBJECT = {"1k": 1.2 / 2 * 1000 / 1000, "10k": 108 / 18_000 * 1000}
REF_KPROXY_BEFORE_MS_PER_OBJECT = {"1k": 6.7 / 2, "10k": 155 / 18}
SETTLE_S = 6  # the agent's sweep interval (5 s), when it tidies its memory, and a second


# ---- objects as a real API server holds them ----
def _ts() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 2}"


def pod_ip(i: int, j: int) -> str:
    n = i * 16 + j
    return f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"


# managedFields as kubectl (client-side apply) and kube-controller-manager leave them
SERVICE_FIELDS = {
    "f:metadata": {
        "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
        "f:labels": {".": {}, "f:app": {}},
    },
    "f:spec": {
        "f:internalTrafficPolicy": {},
        "f:ports": {
            ".": {},
            'k:{"port":80,"protocol":"TCP"}': {
                ".": {},
                "f:name": {},
                "f:port": {},
                "f:protocol": {},
                "f:targetPort": {},
            },
        },
        "f:selector": {},
        "f:sessionAffinity": {},
        "f:type": {},
    },
}


def slice_fields(svc_uid: str) -> dict[str, Any]:
    return {
        "f:addressType": {},
        "f:endpoints": {},
        "f:ports": {},
        "f:metadata": {
            "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
            "f:generateName": {},
            "f:labels": {
                ".": {},
                "f:app": {},
                "f:endpointslice.kubernetes.io/managed-by": {},
                "f:kubernetes.io/service-name": {},
            },
            "f:ownerReferences": {".": {}, f'k:{{"uid":"{svc_uid}"}}': {}},
        },
    }


def service_obj(i: int) -> dict[str, Any]:
    name = f"svc-{i}"
    applied = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"labels": {"app": name}, "name": name, "namespace": "bench"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                 "selector": {"app": name}},
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "bench",
            "uid": str(uuid.uuid4()),
            "creationTimestamp": _ts(),
            "labels": {"app": name},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied) + "\n"
            },
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": _ts(), "fieldsType": "FieldsV1",
                "fieldsV1": SERVICE_FIELDS,
            }],
        },
        "spec": {
            "clusterIP": cluster_ip(i),
            "clusterIPs": [cluster_ip(i)],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    }  # fmt: skip


def slice_obj(i: int, endpoints: int, gen: int = 0, svc_uid: str = "") -> dict[str, Any]:
    name = f"svc-{i}"
    eps = []
    for j in range(endpoints):
        pod = f"{name}-7d9f8b6c5-{j:05d}"
        eps.append({
            "addresses": [pod_ip(i, j + gen % 2)],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "targetRef": {"kind": "Pod", "namespace": "bench", "name": pod, "uid": str(uuid.uuid4())},
            "nodeName": "node-b" if j % 2 else NODE,
            "zone": "zone-a",
        })  # fmt: skip
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-x7k2p",
            "generateName": f"{name}-",
            "namespace": "bench",
            "uid": str(uuid.uuid4()),
            "generation": gen + 1,
            "creationTimestamp": _ts(),
            "labels": {
                "app": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": name,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": _ts()},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc_uid,
                                 "controller": True, "blockOwnerDeletion": True}],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "discovery.k8s.io/v1", "time": _ts(), "fieldsType": "FieldsV1",
                "fieldsV1": slice_fields(svc_uid),
            }],
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    }  # fmt: skip


# ---- the agent process ----
def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, every thread


def main_thread_cpu_s(pid: int) -> float:
    """CPU of the agent's main thread (its asyncio loop: store, translate, sync); the rest is the
    watch threads (kopf's streams, JSON decoding) and executors."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Probe:
    """Reads a Service's frontend in the pinned kp_svc4_v1: its backend count (None: not there)."""

    def __init__(self, bpffs: str) -> None:
        from kproxy import abi
        from kproxy.bpf.maps import KproxyMaps

        self.abi = abi
        self.maps = KproxyMaps.open(bpffs)

    def count(self, i: int) -> int | None:
        abi = self.abi
        addr = int.from_bytes(socket.inet_aton(cluster_ip(i)), "little")
        for scope in (abi.Scope.EXT, abi.Scope.INT):
            key = abi.Svc4Key(addr=addr, port=socket.htons(80), slot=0, proto=6, scope=int(scope))
            v = self.maps.svc4.get(key)
            if v is not None:
                return int(v.count)
        return None

    async def wait(self, i: int, want: int | None, timeout: float = 60.0) -> float:
        """Poll until Service i has `want` backends (None: is gone); the time it became so."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count(i) == want:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"svc-{i} did not reach {want} backends in {timeout} s")
            await asyncio.sleep(0.0002)


class Bench:
    def __init__(self, args: argparse.Namespace, bpffs: str, workdir: Path) -> None:
        self.args = args
        self.bpffs = bpffs
        self.workdir = workdir
        self.api_url = ""
        self.api: subprocess.Popen[str] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.spy: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.uids: dict[int, str] = {}
        self.gen: dict[int, int] = collections.defaultdict(int)
        self.results: dict[str, Any] = {"phases": {}}

    # -- processes --
    def start_api(self) -> None:
        kubeconfig = self.workdir / "kubeconfig"
        self.api = subprocess.Popen(
            [sys.executable, "-m", "tests.controller.apiserver", "--node", NODE, "--node-ip", NODE_IP,
             "--kubeconfig", str(kubeconfig)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.api.stdout is not None
        self.api_url = self.api.stdout.readline().strip()
        if not self.api_url.startswith("http"):
            raise RuntimeError(f"the API double did not start (got {self.api_url!r})")

    def start_agent(self) -> None:
        prof = ["-m", "cProfile", "-o", self.args.cprofile] if self.args.cprofile else []
        if self.args.tracemalloc:
            Path(self.args.tracemalloc + ".done").unlink(missing_ok=True)
            wrapper = str(Path(__file__).with_name("tracemalloc_agent.py"))
            prof = [wrapper, self.args.tracemalloc, str(self.args.tracemalloc_frames)]
        argv = [
            sys.executable, *prof, "-m", "kproxy", "agent", "--source", "kubernetes",
            "--kubeconfig", str(self.workdir / "kubeconfig"),
            "--node-name", NODE, "--node-ip", NODE_IP, "--pod-ifaces", "kpe-nopod*",
            "--bpffs", self.bpffs, "--log-level", self.args.agent_log_level,
            "--health-bind-address", f"127.0.0.1:{self.health_port}",
            "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}",
            "--map-size", "kp_svc4_v1=262144", "--map-size", "kp_be4_v1=262144",
            *(["--object", self.args.object] if self.args.object else []),
        ]  # fmt: skip
        log = open(self.workdir / "agent.log", "wb")  # noqa: SIM115 - kept open for the child
        self.agent = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited:\n{self.agent_log()[-3000:]}")
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not get ready:\n{self.agent_log()[-3000:]}")
            time.sleep(0.1)
        if self.args.profile:
            out = Path(self.args.profile)
            out.mkdir(parents=True, exist_ok=True)
            self.spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(self.agent.pid),
                 "--format", "raw", "--output", str(out / "agent.txt"), "--rate", "200", "--nonblocking",
                 "--gil"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)

    def agent_log(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in (self.spy, self.agent, self.api):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT if p is self.spy else signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # -- writes --
    async def write(self, http: Any, method: str, path: str, body: Any = None) -> None:
        data = None if body is None else json.dumps(body)
        for attempt in range(5):
            async with http.request(method, self.api_url + path, data=data) as r:
                if r.status < 300 or (method == "DELETE" and r.status == 404):
                    await r.read()
                    return
                text = await r.text()
            if attempt == 4:
                raise RuntimeError(f"{method} {path}: HTTP {r.status}: {text[:300]}")
            await asyncio.sleep(0.05)

    def create_ops(self, indices: range) -> list[tuple[str, str, Any]]:
        ops = []
        for i in indices:
            svc = service_obj(i)
            self.uids[i] = svc["metadata"]["uid"]
            ops.append(("POST", "/api/v1/namespaces/bench/services", svc))
            self.gen[i] = 0
            ops.append(("POST", "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices",
                        slice_obj(i, self.args.endpoints, 0, self.uids[i])))  # fmt: skip
        return ops

    def update_op(self, i: int) -> tuple[tuple[str, str, Any], int]:
        """An endpoint change of Service i: every other one drops its last endpoint (the count in the
        map tells that it was programmed), the next brings it back on a new address."""
        self.gen[i] += 1
        g = self.gen[i]
        n = self.args.endpoints - (g % 2)
        body = slice_obj(i, n, g, self.uids[i])
        path = f"/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-{i}-x7k2p"
        return ("PUT", path, body), n

    def delete_ops(self, indices: range) -> list[tuple[str, str, Any]]:
        ops: list[tuple[str, str, Any]] = []
        for i in indices:
            ops.append(
                ("DELETE", f"/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-{i}-x7k2p", None)
            )
            ops.append(("DELETE", f"/api/v1/namespaces/bench/services/svc-{i}", None))
        return ops

    async def run_ops(self, http: Any, ops: list[tuple[str, str, Any]], writers: int) -> None:
        """kubectl apply -f of a 1,000-object file, `writers` files at a time: each writer in order."""
        chunks = [ops[k::writers] for k in range(writers)]

        async def one(chunk: list[tuple[str, str, Any]]) -> None:
            for method, path, body in chunk:
                await self.write(http, method, path, body)

        await asyncio.gather(*(one(c) for c in chunks))

    # -- phases --
    def start(self) -> tuple[float, float]:
        assert self.agent is not None
        self._main0 = main_thread_cpu_s(self.agent.pid)
        return proc_cpu_s(self.agent.pid), time.monotonic()

    def phase(self, name: str, changes: int, cpu0: float, t0: float, **extra: Any) -> dict[str, Any]:
        assert self.agent is not None
        cpu = proc_cpu_s(self.agent.pid) - cpu0
        main = main_thread_cpu_s(self.agent.pid) - self._main0
        wall = time.monotonic() - t0
        out = {
            "changes": changes,
            "agent_cpu_s": round(cpu, 2),
            "agent_cpu_ms_per_change": round(cpu / changes * 1000, 3),
            "main_thread_share": round(main / cpu, 2) if cpu else None,
            "wall_s": round(wall, 2),
            "changes_per_s": round(changes / wall, 1),
            "agent_rss_mb": round(proc_rss_mb(self.agent.pid), 1),
            "agent_peak_rss_mb": round(proc_rss_mb(self.agent.pid, "VmHWM"), 1),
            **extra,
        }
        self.results["phases"][name] = out
        print(f"  {name:11s} {json.dumps(out)}", file=sys.stderr, flush=True)
        return out

    async def create_phase(self, http: Any, probe: Probe, name: str, indices: range) -> None:
        assert self.agent is not None
        ops = self.create_ops(indices)
        cpu0, t0 = self.start()
        await self.run_ops(http, ops, self.args.writers)
        applied = time.monotonic()
        done = await probe.wait(indices[-1], self.args.endpoints)
        await self.quiesce()
        self.phase(name, len(ops), cpu0, t0, last_programmed_after_apply_s=round(done - applied, 3))

    async def quiesce(self) -> None:
        """Let the agent finish what it queued (its CPU counts to the phase that caused it)."""
        assert self.agent is not None
        last = proc_cpu_s(self.agent.pid)
        while True:
            await asyncio.sleep(0.3)
            now = proc_cpu_s(self.agent.pid)
            if now - last < 0.02:
                return
            last = now

    async def update_phase(self, http: Any, probe: Probe, name: str, services: int) -> None:
        """Steady rate: one endpoint change every 1/rate s to a random Service, each one's latency."""
        assert self.agent is not None
        rng = random.Random(services)
        n = self.args.changes
        interval = 1.0 / self.args.rate
        latencies: list[float] = []
        hist0 = histogram_counts(self.metrics_port)
        cpu0, t0 = self.start()
        next_at = t0
        for _ in range(n):
            i = rng.randrange(services)
            (method, path, body), want = self.update_op(i)
            start = time.monotonic()
            await self.write(http, method, path, body)
            done = await probe.wait(i, want)
            latencies.append(done - start)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await self.quiesce()
        ms = [x * 1000 for x in latencies]
        inside = fractions(histogram_counts(self.metrics_port), hist0)
        self.phase(
            name, n, cpu0, t0, rate_per_s=self.args.rate,
            agent_event_to_programmed={
                "p50": quantile_bound(inside, 0.5), "p99": quantile_bound(inside, 0.99), "fractions": inside,
            },
            write_to_programmed_ms={"p50": round(statistics.median(ms), 2), "p90": round(pct(ms, 90), 2),
                                    "p99": round(pct(ms, 99), 2), "max": round(max(ms), 2)},
        )  # fmt: skip

    async def burst_phase(self, http: Any, probe: Probe, name: str, services: int) -> None:
        assert self.agent is not None
        rng = random.Random(-services)
        picks = rng.sample(range(services), min(services, self.args.burst))
        ops, last_want = [], 0
        for i in picks:
            op, last_want = self.update_op(i)
            ops.append(op)
        cpu0, t0 = self.start()
        await self.run_ops(http, ops, self.args.writers)
        applied = time.monotonic()
        # the writers' last ops: each one's final state is in the maps when the agent caught up
        for k in range(self.args.writers):
            chunk = picks[k :: self.args.writers]
            if chunk:
                i = chunk[-1]
                await probe.wait(i, self.args.endpoints - self.gen[i] % 2)
        done = time.monotonic()
        await self.quiesce()
        self.phase(name, len(ops), cpu0, t0, last_programmed_after_apply_s=round(done - applied, 3))
        del last_want

    async def churn_phase(self, http: Any, probe: Probe, name: str, services: int) -> None:
        assert self.agent is not None
        k = min(1000, services)
        indices = range(services - k, services)
        ops = self.delete_ops(indices)
        cpu0, t0 = self.start()
        await self.run_ops(http, ops, self.args.writers)
        await probe.wait(indices[-1], None)
        create = self.create_ops(indices)
        await self.run_ops(http, create, self.args.writers)
        await probe.wait(indices[-1], self.args.endpoints)
        await self.quiesce()
        self.phase(name, len(ops) + len(create), cpu0, t0)

    async def tracemalloc_snapshot(self, rename_to: str | None = None) -> None:
        """Have the agent (under bench/tracemalloc_agent.py) write its snapshot; wait for it."""
        assert self.agent is not None
        done = Path(self.args.tracemalloc + ".done")
        done.unlink(missing_ok=True)
        os.kill(self.agent.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        if rename_to:
            os.replace(self.args.tracemalloc, rename_to)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.args.tracemalloc + ".mallocstats", rename_to + ".mallocstats")

    async def run(self) -> dict[str, Any]:
        import aiohttp

        args = self.args
        self.start_api()
        self.start_agent()
        assert self.agent is not None
        probe = Probe(self.bpffs)
        self.results["agent_rss_mb_idle"] = round(proc_rss_mb(self.agent.pid), 1)
        self.results["agent_rss_anon_mb_idle"] = round(proc_rss_mb(self.agent.pid, "RssAnon"), 1)
        if args.smaps:  # and at idle, next to it
            shutil.copyfile(f"/proc/{self.agent.pid}/smaps", args.smaps + ".idle")
        small = min(1000, args.services)
        conn = aiohttp.TCPConnector(limit=args.writers + 2)
        async with aiohttp.ClientSession(
            connector=conn, headers={"Content-Type": "application/json"}
        ) as http:
            await self.create_phase(http, probe, "create-1k", range(small))
            await self.update_phase(http, probe, "update-1k", small)
            if args.services > small:
                await self.create_phase(http, probe, "create-10k", range(small, args.services))
                await self.update_phase(http, probe, "update-10k", args.services)
            await self.burst_phase(http, probe, "burst-10k", args.services)
            if args.tracemalloc:  # what churn adds: compare with the snapshot at the end
                await self.tracemalloc_snapshot(args.tracemalloc + ".pre-churn")
            await self.churn_phase(http, probe, "churn-10k", args.services)
        self.results["agent_rss_mb_end"] = round(proc_rss_mb(self.agent.pid), 1)
        # anonymous (the agent's data and heap) vs file-backed (interpreter, shared libraries)
        self.results["agent_rss_anon_mb_end"] = round(proc_rss_mb(self.agent.pid, "RssAnon"), 1)
        self.results["agent_rss_file_mb_end"] = round(proc_rss_mb(self.agent.pid, "RssFile"), 1)
        # and once the agent's periodic memory chores ran (every sweep interval, 5 s by default)
        await asyncio.sleep(SETTLE_S)
        self.results["agent_rss_mb_settled"] = round(proc_rss_mb(self.agent.pid), 1)
        if args.smaps:  # the agent's mappings with their resident sizes, for where RSS sits
            shutil.copyfile(f"/proc/{self.agent.pid}/smaps", args.smaps)
        if args.tracemalloc:
            await self.tracemalloc_snapshot()
        self.results["agent_programming_histogram"] = programming_histogram(self.metrics_port)
        probe.maps.close()
        return self.results


def histogram_counts(port: int) -> dict[str, float]:
    """kproxy_network_programming_duration_seconds from /metrics: bucket -> cumulative count."""
    name = "kproxy_network_programming_duration_seconds_bucket"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    return buckets


def fractions(after: dict[str, float], before: dict[str, float] | None = None) -> dict[str, float]:
    """Cumulative fractions of the observations between two histogram_counts."""
    before = before or {}
    diff = {le: v - before.get(le, 0.0) for le, v in after.items()}
    total = diff.get("+Inf") or 1.0
    return {f"le {le}": round(v / total, 4) for le, v in diff.items()}


def quantile_bound(fr: dict[str, float], q: float) -> str:
    """The smallest bucket bound holding the q quantile ("<= 1 ms")."""
    for le, f in fr.items():
        if f >= q:
            bound = le.split(" ", 1)[1]
            return "> 60 s" if bound == "+Inf" else f"<= {float(bound) * 1000:g} ms"
    return "?"


def programming_histogram(port: int) -> dict[str, float]:
    return fractions(histogram_counts(port))


def summarize(res: dict[str, Any]) -> str:
    ph = res["phases"]
    lines = ["", "agent CPU per change (ms), issue 13 references: kube-proxy nftables 0.6 ms/object at 1k, "
             "6 ms at 10k (real API server, another machine); kproxy before: 3.35 / 8.6 ms"]  # fmt: skip
    for name, p in ph.items():
        ref = None
        if name == "create-1k":
            ref = REF_KUBE_PROXY_NFT_MS_PER_OBJECT["1k"]
        elif name == "create-10k":
            ref = REF_KUBE_PROXY_NFT_MS_PER_OBJECT["10k"]
        extra = f"  ({p['agent_cpu_ms_per_change'] / ref:.2f}x kube-proxy nftables' reference)" if ref else ""
        lat = p.get("write_to_programmed_ms")
        lat_s = (
            f"  write->programmed p50/p90/p99/max {lat['p50']}/{lat['p90']}/{lat['p99']}/{lat['max']} ms"
            if lat
            else ""
        )
        inside = p.get("agent_event_to_programmed")
        if inside:
            lat_s += f"; in the agent p50 {inside['p50']}, p99 {inside['p99']}"
        lines.append(
            f"  {name:11s} {p['changes']:6d} changes  {p['agent_cpu_ms_per_change']:7.3f} ms CPU/change"
            f"  {p['changes_per_s']:8.1f}/s  RSS {p['agent_rss_mb']:.0f} MB{extra}{lat_s}"
        )
    if "create-1k" in ph and "create-10k" in ph:
        a, b = ph["create-1k"]["agent_cpu_ms_per_change"], ph["create-10k"]["agent_cpu_ms_per_change"]
        lines.append(f"  CPU per created object, 10k vs 1k: {b / a:.2f}x (flat = 1)")
    if "update-1k" in ph and "update-10k" in ph:
        a, b = ph["update-1k"]["agent_cpu_ms_per_change"], ph["update-10k"]["agent_cpu_ms_per_change"]
        lines.append(f"  CPU per endpoint change, 10k vs 1k: {b / a:.2f}x (flat = 1)")
    lines.append(
        f"  agent RSS at the end: {res['agent_rss_mb_end']} MB (target < 100 MB at 10k x 10;"
        f" anonymous {res.get('agent_rss_anon_mb_end')} MB,"
        f" file-backed {res.get('agent_rss_file_mb_end')} MB;"
        f" idle {res.get('agent_rss_mb_idle')} MB, anonymous {res.get('agent_rss_anon_mb_idle')} MB)"
    )
    settled = res.get("agent_rss_mb_settled")
    lines.append(f"  agent RSS {SETTLE_S} s later (its memory chores ran): {settled} MB")
    return "\n".join(lines)


def print_profile(path: Path, top: int = 25) -> str:
    """Top functions of py-spy's collapsed stacks: own samples and inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"py-spy: {total} samples (all threads, active only)", "own:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out += ["inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


# ---- namespace and bpffs around the run ----
def inside(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="kpe-"))
    bpffs = workdir / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    bench = Bench(args, str(bpffs), workdir)
    try:
        return asyncio.run(bench.run())
    except BaseException:
        print(bench.agent_log()[-4000:] if (workdir / "agent.log").exists() else "", file=sys.stderr)
        raise
    finally:
        bench.stop()
        subprocess.run(["umount", "-l", str(bpffs)], check=False)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rate", type=float, default=200.0, help="steady-rate changes per second")
    ap.add_argument("--changes", type=int, default=1000, help="changes per steady-rate phase")
    ap.add_argument("--burst", type=int, default=5000, help="changes in the as-fast-as-possible phase")
    ap.add_argument("--writers", type=int, default=2, help="concurrent writers (kubectl apply runs)")
    ap.add_argument("--agent-log-level", default="info")
    ap.add_argument("--object", help="the agent's BPF object (default: the package's)")
    ap.add_argument("--profile", metavar="DIR", help="record the agent with py-spy into DIR")
    ap.add_argument("--cprofile", metavar="FILE", help="run the agent's main thread under cProfile into FILE")
    ap.add_argument(
        "--tracemalloc", metavar="FILE",
        help="run the agent under tracemalloc and write a snapshot of what it holds at the end to FILE "
        "(and before the churn phase to FILE.pre-churn)",
    )  # fmt: skip
    ap.add_argument("--tracemalloc-frames", type=int, default=1, help="frames kept per allocation traced")
    ap.add_argument(
        "--smaps", metavar="FILE",
        help="copy the agent's /proc/PID/smaps at the end to FILE (and at idle to FILE.idle)",
    )  # fmt: skip
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--inside", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside:
        res = inside(args)
        print(json.dumps(res))
        return 0
    if os.geteuid() != 0:
        print("bench_events needs root (a network namespace, a bpffs mount)", file=sys.stderr)
        return 2
    ns = f"kpe-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        child_argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.bench_events", *child_argv,
             "--inside", ns],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"the run failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=1))
        print(summarize(res))
    if args.profile and (Path(args.profile) / "agent.txt").exists():
        print(print_profile(Path(args.profile) / "agent.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
