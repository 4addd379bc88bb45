"""Maglev against random backend selection, in one run: programming time, disruption, node agreement.

    sudo .venv/bin/python -m bench.bench_maglev [--services 10000] [--backends 10] [--changes 1000]
        [--flows 20000] [--backend-counts 10 50 100] [--table-size 16381] [--seed 1]
        [--parts programming,disruption,agreement] [--object PATH] [--json]

Everything goes through the real code: kproxy_tc.bpf.o loaded by kproxy.bpf.loader.Loader with its maps
pinned in a private bpffs mount (one per node and mode, unmounted at the end), the real Syncer writing
them, and kp_from_netdev run with BPF_PROG_TEST_RUN on hand-made SYNs (tests/bpf/frames.py). The process
first moves into a network namespace of its own (unshare), so nothing touches the host's; nothing is
attached to any interface.

1. programming: N Services (LoadBalancer frontend, a distinct LB IP each, B backends, TCP) applied cold
   (Syncer.apply(full=True) into freshly loaded maps), once with SvcFlag.MAGLEV on every frontend
   (tables of --table-size entries in kp_maglev_v1) and once without (random), then one backend removed
   from each of --changes Services (one apply). Wall and CPU seconds, maglev / random. The Maglev rows
   also say how much of the wall time went into MaglevMap.put_tables (inner map made and filled, swapped
   into the outer map) and the kernel memory of the tables: rows x 64 bytes, and the inner maps'
   memlock as /proc/self/fdinfo reports it.
2. disruption: for each N of --backend-counts, a Maglev LB frontend and a random one, N local backends
   each (plain DNAT: the output frame's destination is the backend); --flows distinct flows (random client
   addresses in 100.64.0.0/10 and ports, fixed --seed) through kp_from_netdev, each flow's backend read
   from the output frame; one backend removed through the Syncer, kp_ct4_v1 emptied (else the flows keep
   their backends through conntrack, which is right but not what is measured) and the same flows run
   again. Share of flows that moved (ideal 1/N) and of flows whose backend survived but moved anyway
   (ideal 0), for both, and maglev / random.
3. agreement: two nodes (two objects in two private bpffs mounts, a Syncer each); node B first programs
   other Services (its backend and service-port ids differ from A's) and gets the endpoints in another
   order; both get the same Services; the same flows through each node's kp_from_netdev. Share of flows
   sent to the same backend address (ideal 100 %; random: ~1/N).

Prints the numbers and their ratios to the peer measured in the same run; asserts nothing. --json prints
one JSON object on the last line instead of the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import result_header, run_and_print
from bench.bench_controller import private_bpffs
from kproxy import abi
from kproxy.abi import Scope, Stat, SvcFlag
from kproxy.bpf import libbpf as lb
from kproxy.bpf.loader import PROG_FROM_NETDEV, Loader
from kproxy.bpf.maps import KproxyMaps
from kproxy.desired import BackendRef, Frontend
from kproxy.sync import Syncer, maglev
from kproxy.sync.mgsync import decode

REPO = Path(__file__).resolve().parent.parent
PARTS = ("programming", "disruption", "agreement")
CLONE_NEWNET = 0x40000000
TC_ACT_OK = 0
LB_PORT = 80
BPFFS_PREFIX = "kp-bench-maglev-"  # the private bpffs mounts' directories (in the system's temp dir)
BACKEND_PORT = 8080


# ---- Services as the Syncer takes them ----
def lb_frontend(service: str, lb_ip: str, backends: Sequence[BackendRef], use_maglev: bool) -> Frontend:
    flags = SvcFlag.LOADBALANCER | (SvcFlag.MAGLEV if use_maglev else 0)
    return Frontend(service, "http", "LoadBalancer", lb_ip, LB_PORT, "TCP", Scope.EXT, int(flags), 0,
                    tuple(backends))  # fmt: skip


def scale_lb_ip(i: int) -> str:
    """The LB IP of programming Service i: 198.18.0.0/15 (the benchmarking range), 131,072 of them."""
    return f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}"


def scale_backend(n: int) -> BackendRef:
    """Backend n (from 1) of the programming Services: 172.16.0.0/12, a million of them."""
    return BackendRef(f"172.{16 + n // 65536}.{n // 256 % 256}.{n % 256}", BACKEND_PORT, "TCP")


def scale_desired(
    n_services: int, n_backends: int, use_maglev: bool, shrunk: set[int] | None = None
) -> dict[str, list[Frontend]]:
    """The N programming Services (SHRUNK: those whose last backend is gone, alone)."""
    out = {}
    for i in range(n_services) if shrunk is None else sorted(shrunk):
        count = n_backends - 1 if shrunk is not None else n_backends
        bes = [scale_backend(i * n_backends + j + 1) for j in range(count)]
        out[f"bench/svc-{i}"] = [lb_frontend(f"bench/svc-{i}", scale_lb_ip(i), bes, use_maglev)]
    return out


def local_backends(prefix: str, n: int) -> list[BackendRef]:
    """N backends on this node (BackendFlag.LOCAL: plain DNAT, the output frame goes to the backend)."""
    return [
        BackendRef(f"{prefix}.{i // 250}.{i % 250 + 1}", BACKEND_PORT, "TCP", local=True) for i in range(n)
    ]


# ---- a loaded object on a private bpffs ----


@dataclass
class Node:
    loader: Loader
    maps: KproxyMaps
    prog_fd: int

    def run(self, frame: bytes) -> lb.TestRun:
        return lb.prog_test_run(self.prog_fd, frame)

    def stat(self, stat: Stat) -> int:
        return (self.maps.stats.totals().get(int(stat)) or (0,))[0]


@contextlib.contextmanager
def loaded_node(obj: str | None) -> Iterator[Node]:
    """kproxy_tc.bpf.o loaded with its maps pinned in a bpffs mount of its own, gone afterwards."""
    with private_bpffs(BPFFS_PREFIX) as d:
        loader = Loader(os.path.join(d, "kproxy"), object_path=obj)
        try:
            maps = loader.open_maps()
            try:
                yield Node(loader, maps, loader.program(PROG_FROM_NETDEV).fd)
            finally:
                maps.close()
        finally:
            loader.close()


# ---- 1. programming ----
@dataclass
class Timed:
    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], Any]) -> tuple[Timed, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return Timed(time.perf_counter() - t0, time.process_time() - c0), r


def fdinfo_memlock(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def table_memory(node: Node) -> dict[str, Any]:
    """Per table in kp_maglev_v1: rows x 64 bytes and the inner map's memlock (by map id from the outer
    map's value, as `bpftool map show id` would)."""
    outer = node.maps.maglev.map
    row_bytes: list[int] = []
    memlock: list[int] = []
    for key in list(outer.iter_keys()):
        raw = outer.lookup(key)
        if raw is None:
            continue
        try:
            inner = lb.map_by_id(int.from_bytes(raw, "little"))
        except lb.LibbpfError:
            continue
        with inner:
            row_bytes.append(inner.max_entries * abi.MAGLEV_ROW)
            ml = fdinfo_memlock(inner.fd)
            if ml is not None:
                memlock.append(ml)
    out: dict[str, Any] = {"tables": len(row_bytes), "rows_bytes": sum(row_bytes)}
    if row_bytes:
        out["rows_bytes_per_table"] = [min(row_bytes), max(row_bytes)]
    if memlock:
        out["memlock_bytes"] = sum(memlock)
        out["memlock_bytes_per_table"] = [min(memlock), max(memlock)]
    outer_ml = fdinfo_memlock(outer.fd)
    if outer_ml is not None:
        out["outer_memlock_bytes"] = outer_ml
    return out


def program_mode(args: argparse.Namespace, use_maglev: bool) -> dict[str, Any]:
    n, b = args.services, args.backends
    desired = scale_desired(n, b, use_maglev)
    step = max(1, n // max(1, args.changes))
    shrunk = set(range(0, n, step)[: args.changes])
    change = scale_desired(n, b, use_maglev, shrunk)
    with loaded_node(args.object) as node:
        syncer = Syncer(node.maps, maglev_size=args.table_size)
        syncer.adopt()
        put = node.maps.maglev.put_tables
        spent = {"s": 0.0, "cpu_s": 0.0, "tables": 0}

        def counted(tables: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return put(tables)
            finally:
                spent["s"] += time.perf_counter() - t0
                spent["cpu_s"] += time.process_time() - c0
                spent["tables"] += len(tables)

        node.maps.maglev.put_tables = counted  # type: ignore[method-assign]
        cold, report = timed(lambda: syncer.apply(desired, full=True))
        cold_put = dict(spent)
        spent.update(s=0.0, cpu_s=0.0, tables=0)
        failed = dict(report.failed)
        incr, report = timed(lambda: syncer.apply(change))
        failed.update(report.failed)
        res: dict[str, Any] = {
            "cold": vars(cold),
            "cold_table_writes": cold_put,
            "change": vars(incr),
            "change_table_writes": dict(spent),
            "changed_services": len(change),
            "failed": len(failed),
            "errors": dict(syncer.errors),
            "svc4_entries": len(node.maps.svc4),
            "maglev_tables": len(node.maps.maglev),
        }
        if use_maglev:
            res["memory"] = table_memory(node)
    return res


def programming(args: argparse.Namespace) -> dict[str, Any]:
    out = {"services": args.services, "backends": args.backends, "changes": min(args.changes, args.services),
           "table_size": args.table_size, "native_fill": maglev.native_available()}  # fmt: skip
    for mode, flag in (("random", False), ("maglev", True)):
        log(f"programming: {args.services:,} Services, {mode}")
        out[mode] = program_mode(args, flag)
    return out


# ---- flows and frames ----
def make_flows(k: int, seed: int) -> list[tuple[str, int]]:
    """K distinct (client address, client port): addresses in 100.64.0.0/10, ports 1024-65535."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    flows: list[tuple[str, int]] = []
    while len(flows) < k:
        a, p = 0x64400000 + rng.randrange(1 << 22), rng.randrange(1024, 65536)
        if (a, p) not in seen:
            seen.add((a, p))
            flows.append((f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}", p))
    return flows


def frames_to(flows: Sequence[tuple[str, int]], dst: str) -> list[bytes]:
    from tests.bpf.frames import tcp_frame

    return [tcp_frame(client, dst, sport, LB_PORT) for client, sport in flows]


def backends_of(node: Node, frames: Sequence[bytes]) -> tuple[list[str | None], dict[str, int]]:
    """Each frame's backend (the output frame's destination; None when not TC_ACT_OK) and the counters
    that moved (new flows, DNAT, Maglev picks and fallbacks)."""
    from tests.bpf.frames import parse

    watched = (Stat.CT_NEW, Stat.DNAT, Stat.MAGLEV, Stat.MAGLEV_FALLBACK)
    before = {s: node.stat(s) for s in watched}
    out: list[str | None] = []
    for f in frames:
        r = node.run(f)
        out.append(parse(r.data_out).dst if r.retval == TC_ACT_OK else None)
    return out, {s.name.lower(): node.stat(s) - before[s] for s in watched}


# ---- 2. disruption ----
def moved_shares(before: Sequence[str | None], after: Sequence[str | None], removed: str) -> dict[str, Any]:
    ok = [(a, b) for a, b in zip(before, after, strict=True) if a is not None and b is not None]
    on_survivors = [(a, b) for a, b in ok if a != removed]
    moved = sum(a != b for a, b in ok)
    moved_surv = sum(a != b for a, b in on_survivors)
    return {
        "flows": len(ok),
        "not_dnated": len(before) - len(ok),
        "on_removed": len(ok) - len(on_survivors),
        "moved": moved / len(ok) if ok else None,
        # of all flows, as the ideal 0 is stated; and of the flows whose backend survived
        "survivor_moved": moved_surv / len(ok) if ok else None,
        "survivor_moved_of_survivors": moved_surv / len(on_survivors) if on_survivors else None,
        "distinct_backends": len({a for a, _ in ok}),
    }


DISRUPTION_IPS = {"maglev": "203.0.113.10", "random": "203.0.113.11"}
AGREEMENT_IPS = {"maglev": "203.0.113.20", "random": "203.0.113.21"}


def pair(
    ips: dict[str, str], bes: dict[str, list[BackendRef]], skip: int | None = None
) -> dict[str, list[Frontend]]:
    """The two measured Services, bench/maglev and bench/random (SKIP: that backend index left out)."""
    return {
        f"bench/{mode}": [
            lb_frontend(f"bench/{mode}", ips[mode], [b for j, b in enumerate(bes[mode]) if j != skip],
                        mode == "maglev")
        ]
        for mode in ips
    }  # fmt: skip


def disruption(args: argparse.Namespace, flows: Sequence[tuple[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"flows": len(flows), "table_size": args.table_size, "runs": {}}
    rng = random.Random(args.seed)
    frames = {m: frames_to(flows, ip) for m, ip in DISRUPTION_IPS.items()}
    with loaded_node(args.object) as node:
        syncer = Syncer(node.maps, maglev_size=args.table_size)
        for n in args.backend_counts:
            log(f"disruption: {n} backends, {len(flows):,} flows")
            bes = {"maglev": local_backends("10.1", n), "random": local_backends("10.2", n)}
            gone = rng.randrange(n)  # the same backend index leaves both Services
            syncer.apply(pair(DISRUPTION_IPS, bes), full=True)
            sid = syncer.svc_id("bench/maglev", "http", "TCP")
            slots_before = table_addresses(node, sid)
            node.maps.ct4.clear()
            before = {m: backends_of(node, frames[m]) for m in frames}
            syncer.apply(pair(DISRUPTION_IPS, bes, gone))
            slots_after = table_addresses(node, sid)
            node.maps.ct4.clear()
            after = {m: backends_of(node, frames[m]) for m in frames}
            run: dict[str, Any] = {"removed_index": gone, "ideal_moved": 1 / n}
            for m in frames:
                run[m] = moved_shares(before[m][0], after[m][0], bes[m][gone].address)
                run[m]["counters_before"], run[m]["counters_after"] = before[m][1], after[m][1]
            # the same shares over every slot of the table (what the flows sample), read back from the map
            run["maglev"]["table"] = moved_shares(slots_before, slots_after, bes["maglev"][gone].address)
            out["runs"][str(n)] = run
        syncer.apply({}, full=True)
    return out


# ---- 3. agreement ----
def agreement(args: argparse.Namespace, flows: Sequence[tuple[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"flows": len(flows), "table_size": args.table_size, "runs": {}}
    frames = {m: frames_to(flows, ip) for m, ip in AGREEMENT_IPS.items()}
    rng = random.Random(args.seed + 1)
    with loaded_node(args.object) as a, loaded_node(args.object) as b:
        sa = Syncer(a.maps, maglev_size=args.table_size)
        sb = Syncer(b.maps, maglev_size=args.table_size)
        for n in args.backend_counts:
            log(f"agreement: {n} backends, {len(flows):,} flows, 2 nodes")
            sa.apply({}, full=True)  # the previous N's Services go
            sb.apply({}, full=True)
            bes = {"maglev": local_backends("10.3", n), "random": local_backends("10.4", n)}
            # node B saw other Services first (so its backend and service-port ids for the same endpoints
            # differ from A's), then gets the endpoints in another order
            others = {
                f"bench/other-{i}": [lb_frontend(f"bench/other-{i}", f"203.0.114.{i + 1}",
                                                 local_backends(f"10.{10 + i}", 7), i % 2 == 0)]
                for i in range(20)
            }  # fmt: skip
            sb.apply(others, full=True)
            shuffled = {m: rng.sample(v, len(v)) for m, v in bes.items()}
            sa.apply(pair(AGREEMENT_IPS, bes))
            sb.apply(pair(AGREEMENT_IPS, shuffled))
            ids_a, ids_b = be_ids(a), be_ids(b)
            run: dict[str, Any] = {"ideal_same_random": 1 / n}
            for mode in bes:
                pa, ca = backends_of(a, frames[mode])
                pb, cb = backends_of(b, frames[mode])
                both = [(x, y) for x, y in zip(pa, pb, strict=True) if x is not None and y is not None]
                svc = f"bench/{mode}"
                run[mode] = {
                    "flows": len(both),
                    "not_dnated": len(flows) - len(both),
                    "same": sum(x == y for x, y in both) / len(both) if both else None,
                    "svc_id": [sa.svc_id(svc, "http", "TCP"), sb.svc_id(svc, "http", "TCP")],
                    "backend_ids_differ": sum(
                        ids_a.get(x.address) != ids_b.get(x.address) for x in bes[mode]
                    ),
                    "counters": [ca, cb],
                }
            out["runs"][str(n)] = run
            a.maps.ct4.clear()
            b.maps.ct4.clear()
    return out


def table_addresses(node: Node, sid: int | None) -> list[str | None]:
    """The backend address each slot of service port SID's table in kp_maglev_v1 names (None: no table,
    or an id without a kp_be4_v1 entry)."""
    rows = node.maps.maglev.table(sid) if sid is not None else None
    if rows is None:
        return []
    t = decode(rows)
    by_id = {i: a for a, i in be_ids(node).items()}
    names = [by_id.get(i) for i in t.backend_ids]
    return [names[k] for k in t.entries]


def be_ids(node: Node) -> dict[str, int]:
    """Backend address -> this node's backend id (kp_be4_v1)."""
    return {abi.nbo_to_ip(v.addr): int(k.value) for k, v in node.maps.be4.items()}


# ---- report ----
def log(msg: str) -> None:
    print(f"[bench_maglev] {msg}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    if b == 0:
        return "∞" if a else "–"
    return f"{a / b:.2f}×"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def report(res: dict[str, Any]) -> str:
    lines = [f"# Maglev vs random — {res['started']}", "",
             f"Kernel {res['machine']['kernel']}, {res['machine']['cpus']} CPUs. Ratios are maglev / random, "
             "both measured in this run.", ""]  # fmt: skip
    p = res.get("programming")
    if p:
        mg, rd = p["maglev"], p["random"]
        lines += [
            f"## Programming: {p['services']:,} LoadBalancer Services × {p['backends']} backends "
            f"(Syncer → pinned maps; table size {p['table_size']}, native fill "
            f"{'yes' if p['native_fill'] else 'NO (pure Python)'})",
            "",
        ]
        rows = []
        for label, key, wkey, count in (
            (f"cold, all {p['services']:,} Services", "cold", "cold_table_writes", p["services"]),
            (f"{p['changes']:,} Services lose one backend (one apply)", "change", "change_table_writes",
             p["changes"]),
        ):  # fmt: skip
            w = mg[wkey]
            per = f"{1e3 * w['s'] / w['tables']:.2f} ms/table" if w["tables"] else "–"
            rows.append([
                label, f"{rd[key]['wall_s']:.3f} ({rd[key]['cpu_s']:.3f})",
                f"{mg[key]['wall_s']:.3f} ({mg[key]['cpu_s']:.3f})",
                ratio(mg[key]["wall_s"], rd[key]["wall_s"]), ratio(mg[key]["cpu_s"], rd[key]["cpu_s"]),
                f"{w['s']:.3f} s (cpu {w['cpu_s']:.3f}) for {w['tables']:,} tables ({per})",
                f"{1e3 * mg[key]['wall_s'] / count:.3f} / {1e3 * rd[key]['wall_s'] / count:.3f}",
            ])  # fmt: skip
        lines += table(
            ["apply", "random s (cpu)", "maglev s (cpu)", "wall ratio", "cpu ratio",
             "maglev: of which put_tables", "ms/Service maglev / random"],
            rows,
        )  # fmt: skip
        lines.append(
            f"Entries: kp_svc4_v1 {rd['svc4_entries']:,} (random) / {mg['svc4_entries']:,} (maglev); "
            f"kp_maglev_v1 tables {rd['maglev_tables']:,} / {mg['maglev_tables']:,}; "
            f"failed Services {rd['failed']} / {mg['failed']}; sync errors {rd['errors'] or '{}'} / "
            f"{mg['errors'] or '{}'}."
        )
        w = mg["cold_table_writes"]
        if w["tables"] and mg["cold"]["wall_s"]:
            lines.append(
                f"Maglev cold apply: put_tables is {100 * w['s'] / mg['cold']['wall_s']:.0f} % of its wall "
                f"time, and {100 * w['cpu_s'] / w['s']:.0f} % of put_tables' wall time is this process on a "
                "CPU (the rest it waits in bpf() calls)."
            )
        mem = mg.get("memory", {})
        if mem.get("tables"):
            t = mem["tables"]
            lo, hi = mem["rows_bytes_per_table"]
            line = (f"Kernel memory of the Maglev tables: {t:,} tables, rows × 64 B = "
                    f"{mem['rows_bytes'] / 2**20:.1f} MiB ({lo:,}–{hi:,} B a table)")  # fmt: skip
            if "memlock_bytes" in mem:
                mlo, mhi = mem["memlock_bytes_per_table"]
                line += (f"; inner maps' memlock (fdinfo) {mem['memlock_bytes'] / 2**20:.1f} MiB "
                         f"({mlo:,}–{mhi:,} B a table)")  # fmt: skip
            if "outer_memlock_bytes" in mem:
                line += f"; outer map kp_maglev_v1 memlock {mem['outer_memlock_bytes'] / 2**20:.2f} MiB"
            lines.append(line + ". Random selection needs no table (0 B).")
        lines.append("")
    d = res.get("disruption")
    if d:
        lines += [
            f"## Disruption: one backend of N removed, {d['flows']:,} flows, conntrack emptied before each "
            "pass (real datapath, kp_from_netdev)",
            "",
        ]
        rows = []
        for n, run in d["runs"].items():
            mg, rd = run["maglev"], run["random"]
            rows.append([
                n, pct(run["ideal_moved"]), pct(mg["moved"]), pct(rd["moved"]),
                ratio(mg["moved"], rd["moved"]),
                pct(mg["survivor_moved"]), pct(rd["survivor_moved"]),
                ratio(mg["survivor_moved"], rd["survivor_moved"]),
                f"{pct(mg['survivor_moved_of_survivors'])} / {pct(rd['survivor_moved_of_survivors'])}",
                f"{pct(mg['table']['moved'])} / {pct(mg['table']['survivor_moved'])}",
                f"{mg['not_dnated']} / {rd['not_dnated']}",
            ])  # fmt: skip
        lines += table(
            ["N", "ideal moved (1/N)", "maglev moved", "random moved", "ratio",
             "maglev survivor moved (ideal 0)", "random survivor moved", "ratio",
             "survivor moved of survivors' flows, maglev / random",
             "maglev table slots: moved / survivor moved", "not DNATed maglev / random"],
            rows,
        )  # fmt: skip
        checks = []
        for n, run in d["runs"].items():
            c = [run["maglev"][k] for k in ("counters_before", "counters_after")]
            checks.append(f"N={n}: maglev picks {c[0]['maglev']}+{c[1]['maglev']}, fallbacks "
                          f"{c[0]['maglev_fallback'] + c[1]['maglev_fallback']}")  # fmt: skip
        lines += ["Path check (kp_stats_v1 of the Maglev passes): " + "; ".join(checks) + ".", ""]
    g = res.get("agreement")
    if g:
        lines += [
            f"## Node agreement: the same {g['flows']:,} flows through two nodes (other ids, endpoints in "
            "another order)",
            "",
        ]
        rows = []
        for n, run in g["runs"].items():
            mg, rd = run["maglev"], run["random"]
            rows.append([
                n, pct(mg["same"]), pct(rd["same"]), pct(run["ideal_same_random"]),
                ratio(mg["same"], rd["same"]),
                f"{mg['svc_id'][0]} / {mg['svc_id'][1]}", f"{mg['backend_ids_differ']} of {n}",
                f"{mg['not_dnated']} / {rd['not_dnated']}",
            ])  # fmt: skip
        lines += table(
            ["N", "maglev same backend (ideal 100 %)", "random same backend", "random expected (1/N)",
             "ratio", "maglev svc_id A / B", "backend ids differing A vs B", "not DNATed maglev / random"],
            rows,
        )  # fmt: skip
    lines.append(f"Total wall time {res['wall_s']:.1f} s.")
    return "\n".join(lines) + "\n"


# ---- main ----
def enter_own_netns() -> None:
    """Move this (single-threaded) process into a new network namespace: PROG_TEST_RUN then runs in it,
    never in the host's. It goes away with the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    res: dict[str, Any] = result_header(args)
    if "programming" in args.parts:
        res["programming"] = programming(args)
    if "disruption" in args.parts or "agreement" in args.parts:
        flows = make_flows(args.flows, args.seed)
        if "disruption" in args.parts:
            res["disruption"] = disruption(args, flows)
        if "agreement" in args.parts:
            res["agreement"] = agreement(args, flows)
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000, help="Services programmed (part 1)")
    ap.add_argument("--backends", type=int, default=10, help="backends per programmed Service (part 1)")
    ap.add_argument("--changes", type=int, default=1000, help="Services that lose one backend (part 1)")
    ap.add_argument("--flows", type=int, default=20_000, help="flows per pass (parts 2 and 3)")
    ap.add_argument("--backend-counts", type=int, nargs="+", default=[10, 50, 100], help="N (parts 2 and 3)")
    ap.add_argument("--table-size", type=int, default=maglev.DEFAULT_SIZE, choices=maglev.PRIMES)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--object", help="the BPF object (default: the package's kproxy_tc.bpf.o)")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line, no tables")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}: choose from {', '.join(PARTS)}")
    if min(args.backend_counts) < 2 or args.backends < 2:
        ap.error("at least 2 backends: one of them is removed")
    if os.geteuid() != 0:
        print("bench_maglev needs root (bpffs mounts, BPF, a network namespace)", file=sys.stderr)
        return 2

    enter_own_netns()
    return run_and_print(args, run_all, report)


if __name__ == "__main__":
    sys.exit(main())
