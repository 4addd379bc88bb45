"""Benchmark: translate + sync of 10,000 Services x 10 backends, cold and one endpoint change on top.

    python -m bench.bench_sync [--services N] [--backends N] [--changes N] [--real]

(a) always programs MemoryMap twins; (b) with --real (or by default when root) real BPF maps,
created by kproxy.bpf.loader.Loader on a private bpffs mount that is removed afterwards, or, when the
BPF object cannot be loaded, created bare with bpf_map_create (same types, sizes and flags as
bpfsrc/maps.h, unpinned, gone when closed): the write path is the same PinnedMap either way.
Times are wall clock with CPU time of this process in brackets (the machine may be shared).
Prints numbers and their ratio to the issue's targets; asserts nothing.
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

from kproxy import abi
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.heap import gc_paused
from kproxy.model import NodeInfo
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig

NODE = NodeInfo(name="node-1", addresses=("192.168.0.1",))
# issue 2: cold translate+sync under 1 s, one change under 5 ms; issue 3: agent RSS under 150 MB
TARGET_COLD_S = 1.0
TARGET_CHANGE_S = 0.005
TARGET_RSS_MB = 150.0
PAGE = 500


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


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(maps: Any, label: str, n_services: int, n_backends: int, n_changes: int) -> None:
    store = ClusterStore(NODE)
    t_parse = c_parse = 0.0
    with gc_paused():  # as the sources do for a listing
        # objects arrive a page at a time, as from a paginated LIST; building them is not timed
        for start in range(0, n_services, PAGE):
            page = [
                (service(i), endpoint_slice(i, n_backends))
                for i in range(start, min(start + PAGE, n_services))
            ]
            t0, c0 = time.perf_counter(), time.process_time()
            for svc_raw, slice_raw in page:
                store.upsert_service(svc_raw)
                store.upsert_slice(slice_raw)
            t_parse += time.perf_counter() - t0
            c_parse += time.process_time() - c0
        del page, svc_raw, slice_raw
    store.mark_initial_sync_done()
    rss_store = rss_mb()
    syncer = Syncer(maps)
    syncer.adopt()
    cfg = TranslateConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    report = sync_dirty(store, syncer, cfg, full=True)
    t_cold, c_cold = time.perf_counter() - t0, time.process_time() - c0
    rss_after = rss_mb()
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
    median = statistics.median(times) if times else 0.0
    peak = peak_rss_mb()
    print(
        f"[{label}] {n_services} services x {n_backends} backends: parse into store {t_parse:.3f} s "
        f"(cpu {c_parse:.3f}), cold translate+sync {t_cold:.3f} s (cpu {c_cold:.3f}; "
        f"{report.svc4_puts} svc4 + {report.be4_puts} be4 entries); one endpoint change (incl. parse) "
        f"median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms over {len(times)}; RSS with the store "
        f"{rss_store:.0f} MB, after the cold sync {rss_after:.0f} MB, peak {peak:.0f} MB"
    )
    print(
        f"[{label}] vs targets (lower is better, < 1 meets): "
        f"cold translate+sync {t_cold / TARGET_COLD_S:.2f}, "
        f"cold incl. parse {(t_parse + t_cold) / TARGET_COLD_S:.2f}, change p99 {p99 / TARGET_CHANGE_S:.3f}, "
        f"RSS after cold sync {rss_after / TARGET_RSS_MB:.2f}, peak RSS {peak / TARGET_RSS_MB:.2f}"
    )


class BareMaps:
    """The maps sync writes, created directly with bpf_map_create (no BPF object, no pins)."""

    def __init__(self) -> None:
        import ctypes

        from kproxy.bpf import libbpf as lb
        from kproxy.bpf.maps import PinnedMap

        no_prealloc = 1  # BPF_F_NO_PREALLOC, as bpfsrc/maps.h for svc4 and be4
        layout = [
            ("svc4", abi.MAP_SVC4, lb.BPF_MAP_TYPE_HASH, abi.Svc4Key, abi.Svc4Val, abi.SVC4_MAX, no_prealloc),
            ("be4", abi.MAP_BE4, lb.BPF_MAP_TYPE_HASH, ctypes.c_uint32, abi.Be4Val, abi.BE4_MAX, no_prealloc),
            ("ct4", abi.MAP_CT4, lb.BPF_MAP_TYPE_LRU_HASH, abi.Ct4Key, abi.Ct4Val, abi.CT4_MAX, 0),
            ("aff4", abi.MAP_AFF4, lb.BPF_MAP_TYPE_LRU_HASH, abi.Aff4Key, abi.Aff4Val, abi.AFF4_MAX, 0),
        ]
        self._maps: list[Any] = []
        for attr, name, mtype, kt, vt, size, flags in layout:
            try:
                raw = lb.map_create(mtype, name, ctypes.sizeof(kt), ctypes.sizeof(vt), size, flags)
            except OSError:
                self.close()
                raise
            m: Any = PinnedMap(raw, kt, vt)
            self._maps.append(m)
            setattr(self, attr, m)

    def read_config(self) -> abi.Config:
        return abi.Config()

    def write_config(self, config: abi.Config) -> None:
        pass

    def close(self) -> None:
        for m in self._maps:
            m.close()


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
    ap.add_argument("--only-real", action="store_true", help="skip the memory-map run (RSS of one run)")
    args = ap.parse_args(argv)
    if not args.only_real:
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
            except Exception as err:  # no compiled object, a verifier rejection...: fall back to bare maps
                loader.close()
                print(f"[pinned maps] BPF object not loadable ({str(err).splitlines()[0]}); using bare maps")
            else:
                try:
                    run(maps, "pinned maps", args.services, args.backends, args.changes)
                finally:
                    maps.close()
                    loader.close()
                return 0
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"[pinned maps] no private bpffs ({err}); using bare maps")
    try:
        bare = BareMaps()
    except OSError as err:
        print(f"[bare maps] skipped: {err}")
        return 0
    try:
        run(bare, "bare BPF maps", args.services, args.backends, args.changes)
    finally:
        bare.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
