"""Benchmark: translate + sync of 10,000 Services x 10 backends, cold and one endpoint change on top.

    python -m bench.bench_sync [--services N] [--backends N] [--changes N] [--real]

(a) always programs MemoryMap twins; (b) with --real (or by default when root) real pinned maps,
created by kproxy.bpf.loader.Loader on a private bpffs mount that is removed afterwards.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.model import NodeInfo
from kproxy.store import ClusterStore, gc_paused
from kproxy.sync import Syncer, sync_dirty
from kproxy.translate import TranslateConfig

NODE = NodeInfo(name="node-1", addresses=("192.168.0.1",))


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "bench", "name": f"svc-{i}"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def endpoint_slice(i: int, backends: int, generation: int = 0) -> dict[str, Any]:
    base = i * backends
    eps = []
    for j in range(backends):
        n = base + j + generation * 7  # a change moves addresses around
        eps.append(
            {
                "addresses": [f"172.{16 + n // 65536 % 16}.{n // 256 % 256}.{n % 256}"],
                "conditions": {"ready": True},
                "nodeName": "node-1" if j % 2 == 0 else "node-2",
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "bench",
            "name": f"svc-{i}-abcde",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(maps: Any, label: str, n_services: int, n_backends: int, n_changes: int) -> None:
    t0 = time.perf_counter()
    store = ClusterStore(NODE)
    with gc_paused():  # as the sources do for a listing
        for i in range(n_services):
            store.upsert_service(service(i))
            store.upsert_slice(endpoint_slice(i, n_backends))
    store.mark_initial_sync_done()
    t_parse = time.perf_counter() - t0
    syncer = Syncer(maps)
    syncer.adopt()
    cfg = TranslateConfig()
    t0 = time.perf_counter()
    report = sync_dirty(store, syncer, cfg, full=True)
    t_cold = time.perf_counter() - t0
    times = []
    for c in range(n_changes):
        i = (c * 7919) % n_services
        raw = endpoint_slice(i, n_backends)
        # one endpoint replaced by a new address
        raw["endpoints"][c % n_backends]["addresses"] = [f"100.64.{c // 256 % 256}.{c % 256}"]
        t0 = time.perf_counter()
        store.upsert_slice(raw)
        sync_dirty(store, syncer, cfg)
        times.append(time.perf_counter() - t0)
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] if times else 0.0
    print(
        f"[{label}] {n_services} services x {n_backends} backends: parse into store {t_parse:.3f} s, "
        f"cold translate+sync {t_cold:.3f} s ({report.svc4_puts} svc4 + {report.be4_puts} be4 entries); "
        f"one endpoint change (incl. parse) median {statistics.median(times) * 1e3 if times else 0:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms over {len(times)}; peak RSS {peak_rss_mb():.0f} MB"
    )


@contextlib.contextmanager
def private_bpffs() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="kp-bench-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--real", action="store_true", default=os.geteuid() == 0)
    ap.add_argument("--no-real", dest="real", action="store_false")
    args = ap.parse_args(argv)
    run(MemoryMapSet(), "memory maps", args.services, args.backends, args.changes)
    if not args.real:
        why = "--no-real" if os.geteuid() == 0 else "needs root (mount -t bpf, BPF map creation)"
        print(f"[pinned maps] skipped: {why}")
        return 0
    try:
        from kproxy.bpf.loader import Loader
    except ImportError as err:
        print(f"[pinned maps] skipped: kproxy.bpf.loader unavailable ({err})")
        return 0
    try:
        with private_bpffs() as d:
            loader = Loader(os.path.join(d, "kproxy"))
            try:
                maps = loader.open_maps()
            except Exception as err:  # no compiled object, no libbpf: report, do not fail
                print(f"[pinned maps] skipped: cannot create the maps ({err})")
                return 0
            try:
                run(maps, "pinned maps", args.services, args.backends, args.changes)
            finally:
                maps.close()
                loader.close()
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"[pinned maps] skipped: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
