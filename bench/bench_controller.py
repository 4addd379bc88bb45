"""Controller benchmark: 10,000 Services x 10 endpoints served by the API double.

Measures, for the real KubeSource (kopf + its own LIST) -> store -> translate -> sync on the
in-memory map twin, or real pinned maps (--real-maps: a private bpffs mounted on a temporary directory
and unmounted at the end, as root; --bpffs DIR: an existing one) so that the maps' memory, which is the
kernel's, is not counted in the process:
  - time from agent start to every Service programmed,
  - the agent process' RSS after that (and after kopf's own listing is over),
  - change -> programmed latency p50/p99 over 200 EndpointSlice changes, measured from just before
    the HTTP write to the API double until the sync that wrote the Service's maps returned.
The API double runs in a separate process so it does not share the agent's CPU time or memory.

    .venv/bin/python -m bench.bench_controller [--services 10000] [--endpoints 10] [--changes 200]
        [--real-maps] [--tracemalloc 25]

--tracemalloc N traces Python allocations and prints the N source files holding the most memory
once everything is programmed (tracing slows the start several times: use it to find where memory
goes, not for the timings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import kopf

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from kproxy.bpf.mapapi import MemoryMapSet
    from kproxy.pipeline import sync_dirty
    from kproxy.sources.kube import KubeSource, KubeSourceConfig
    from kproxy.store import ClusterStore
    from kproxy.sync import Syncer
    from kproxy.translate import TranslateConfig
    from tests.controller.apiserver import endpoint_slice, pod_ip

    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.controller.apiserver", "--services", str(args.services),
         "--endpoints", str(args.endpoints)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = (await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)).strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the API double did not start (got {url!r})")
        loader = None
        if args.bpffs:
            from kproxy.bpf.loader import Loader

            loader = Loader(args.bpffs, map_sizes={"kp_svc4_v1": 262144, "kp_be4_v1": 262144})
            maps: Any = loader.open_maps()
        else:
            maps = MemoryMapSet()
        rss_before = rss_mb()
        t_start = time.monotonic()
        store = ClusterStore()
        first_full = asyncio.Event()
        source = KubeSource(
            store,
            KubeSourceConfig(node_name="node-a", resync_interval=0),
            connection=kopf.ConnectionInfo(server=url),
            kopf_gate=None if args.no_kopf_gate else first_full,
        )
        programmed: dict[str, float] = {}
        waiters: dict[str, asyncio.Event] = {}

        async def sync_loop() -> None:
            while not store.initial_sync_done:
                store.event.clear()
                if store.initial_sync_done:
                    break
                await store.event.wait()
            syncer = Syncer(maps)
            syncer.adopt()
            full = True
            while True:
                store.event.clear()
                report = sync_dirty(store, syncer, TranslateConfig(), full=full)
                now = time.monotonic()
                if full:
                    first_full.set()
                full = False
                for svc in report.changed:
                    programmed[svc] = now
                    ev = waiters.pop(svc, None)
                    if ev is not None:
                        ev.set()
                await store.event.wait()
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(source.run()), asyncio.create_task(sync_loop())]
        await asyncio.wait_for(first_full.wait(), 300)
        t_programmed = time.monotonic() - t_start
        services_programmed = len(programmed)
        rss_programmed = rss_mb()
        # kopf keeps listing in its own thread after our LIST; measure again once it is quiet.
        await asyncio.sleep(args.settle)
        rss_settled = rss_mb()
        top_files: list[tuple[str, float]] = []
        if args.tracemalloc:
            snap = tracemalloc.take_snapshot()
            stats = snap.statistics("filename")
            top_files = [(str(st.traceback[0].filename), round(st.size / 2**20, 1)) for st in stats]
            top_files = top_files[: args.tracemalloc]
            traced_mb = round(sum(st.size for st in stats) / 2**20, 1)

        latencies: list[float] = []
        async with aiohttp.ClientSession() as http:
            for n in range(args.changes):
                i = (n * 7919) % args.services
                name = f"svc-{i}"
                addrs = [pod_ip(2_000_000 + n * args.endpoints + j) for j in range(args.endpoints)]
                body = endpoint_slice(name, addrs)
                ev = asyncio.Event()
                waiters[f"default/{name}"] = ev
                t0 = time.monotonic()
                async with http.put(
                    f"{url}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/{name}-abc",
                    data=json.dumps(body),
                ) as r:
                    r.raise_for_status()
                await asyncio.wait_for(ev.wait(), 30)
                latencies.append(programmed[f"default/{name}"] - t0)
                await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        entries = (len(maps.svc4), len(maps.be4))
        if loader is not None:
            maps.close()
            loader.close()
        return {
            "services": args.services,
            "endpoints_per_service": args.endpoints,
            "start_to_programmed_s": round(t_programmed, 2),
            "services_programmed": services_programmed,
            "svc4_entries": entries[0],
            "be4_entries": entries[1],
            "rss_mb_before_start": round(rss_before, 1),
            "rss_mb_programmed": round(rss_programmed, 1),
            "rss_mb_after_kopf_listing": round(rss_settled, 1),
            "change_to_programmed_ms_p50": round(statistics.median(latencies) * 1000, 2),
            "change_to_programmed_ms_p99": round(pct(latencies, 99) * 1000, 2),
            "change_to_programmed_ms_max": round(max(latencies) * 1000, 2),
            "changes": len(latencies),
            "maps": "pinned (kernel memory)" if loader is not None else "in-memory twin (counted in RSS)",
            **(
                {"tracemalloc_total_mb": traced_mb, "tracemalloc_top_files_mb": top_files}
                if top_files
                else {}
            ),
        }
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


@contextlib.contextmanager
def private_bpffs(prefix: str = "kpbench-bpffs-") -> Any:
    """A bpf filesystem of our own on a temporary directory: unmounting it drops every pin."""
    d = tempfile.mkdtemp(prefix=prefix)
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        if subprocess.run(["umount", d], check=False).returncode != 0:
            subprocess.run(["umount", "-l", d], check=False)
        with contextlib.suppress(OSError):
            Path(d).rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to let kopf finish listing")
    parser.add_argument("--bpffs", help="program real pinned maps in this bpffs directory (root)")
    parser.add_argument(
        "--real-maps",
        action="store_true",
        help="real pinned maps in a private bpffs mounted for the run (root)",
    )
    parser.add_argument("--no-kopf-gate", action="store_true", help="start kopf before the first sync")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="N", help="print the N biggest files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.path.insert(0, str(REPO))
    if args.tracemalloc:
        tracemalloc.start()
    if args.real_maps:
        with private_bpffs() as d:
            args.bpffs = d
            result = asyncio.run(bench(args))
    else:
        result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
