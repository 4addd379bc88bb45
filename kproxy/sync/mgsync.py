"""Maglev tables of one family's service ports (kp_maglev_v1), kept in step with their frontends.

A service port whose frontends carry SvcFlag.MAGLEV gets one table, built (kproxy.sync.maglev) from
its backends' identities alone: address, port and protocol, never this node's backend ids or slot
order, so every node builds the same table and sends a flow to the same backend. The table's list
maps each backend to this node's id for it. All such frontends of a port share their backends (the
Service's external endpoints), hence one table per svc_id.

Order within an apply (FamilySyncer._apply_plans): tables are written after the backends they name
and before the slot-0 entries that raise the MAGLEV flag, so a new frontend finds its table; tables of
ports that lost the flag (or their last backend) go after the frontends stopped pointing at them and
before backend ids are freed. A table is swapped in whole: a reader sees the old one or the new one.
The datapath falls back to a random slot whenever there is no usable table (none yet, a full map).

A table whose digest (of its size and backends) is unchanged is not rewritten: re-applying the same
Services, and an agent restart (adopt), write nothing.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kproxy import abi
from kproxy.bpf.mapapi import MaglevOps, MapFullError
from kproxy.sync import maglev
from kproxy.sync.family import Family
from kproxy.sync.state import Plan

log = logging.getLogger(__name__)

_MAGLEV = int(abi.SvcFlag.MAGLEV)


@dataclass(slots=True)
class MaglevStaged:
    """What one batch of plans changes: tables to put (svc_id -> (digest, rows)) and ports to drop."""

    puts: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    drops: set[int] = field(default_factory=set)


def digest(m: int, names: Iterable[bytes], ids: Iterable[int]) -> int:
    """A table's identity: its size, its backends' names (sorted) and this node's ids for them."""
    h = hashlib.blake2b(digest_size=4, person=b"kproxy-mgdigest")
    h.update(m.to_bytes(4, "little"))
    for name, bid in zip(names, ids, strict=True):
        h.update(len(name).to_bytes(1, "little") + name + bid.to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little")


class MaglevSync:
    """One family's Maglev tables: what is programmed (svc_id -> digest), staged and written per batch."""

    def __init__(self, tables: MaglevOps | None, fam: Family, errors: Counter[str], size: int) -> None:
        self.tables = tables
        self.fam = fam
        self.errors = errors
        self.size = size
        self.programmed: dict[int, int] = {}  # svc_id -> digest of its table in the map
        self._name_len = 7 if fam.version == 4 else 19  # address, port, protocol of a packed backend value

    def _mine(self, sid: int) -> bool:
        return self.fam.id_base <= sid < self.fam.id_limit

    def adopt(self) -> None:
        """Take the tables an earlier agent left (their digests), so unchanged ones are not rewritten."""
        self.programmed.clear()
        if self.tables is None:
            return
        for sid, hdr in self.tables.headers().items():
            if self._mine(sid):
                self.programmed[sid] = abi.MaglevHdr.from_buffer_copy(hdr).digest

    def _name(self, val: int) -> bytes:
        return self.fam.pack_be(val)[: self._name_len]

    def table_size(self, n: int) -> int:
        """The table size for N backends: the configured one, or the smallest of maglev.PRIMES above N
        when N reaches it (a table needs more slots than backends; every node picks the same)."""
        if n < self.size:
            return self.size
        return next(m for m in maglev.PRIMES if m > n)  # n <= 65535 < the largest prime

    def stage(self, plans: Iterable[Plan], value_of: Callable[[Plan, int], int | None]) -> MaglevStaged:
        """The tables the plans need written (new or changed backends) and the ports whose tables go.
        VALUE_OF(plan, backend id) is the backend's value (BVal) as the plan programs it. A table that
        cannot be built is logged and counted, and its port left on random selection."""
        staged = MaglevStaged()
        if self.tables is None:
            return staged
        claimed: dict[int, tuple[int, ...]] = {}  # svc_id -> the backends a plan of this batch wants
        for p in plans:
            wanted: dict[int, tuple[int, ...]] = {}
            for fe in p.new.frontends.values():
                if fe.flags & _MAGLEV and len(fe.slots):
                    wanted.setdefault(fe.svc_id, tuple(fe.slots))
            for fe in p.old.frontends.values():
                if fe.svc_id not in wanted and fe.svc_id in self.programmed:
                    staged.drops.add(fe.svc_id)
            for sid, ids in wanted.items():
                other = claimed.setdefault(sid, ids)
                if other != ids:  # two Services on one id (never, kproxy.sync.ids): neither's table wins
                    log.error("Maglev: service port id %d is wanted with two backend sets; not written", sid)
                    self.errors["maglev_table_failed"] += 1
                    staged.puts.pop(sid, None)
                    continue
                try:
                    got = self._build(p, sid, ids, value_of)
                except (ValueError, OverflowError) as err:
                    log.error("Maglev table of service port %d not built, random selection: %s", sid, err)
                    self.errors["maglev_table_failed"] += 1
                    got = None
                if got is not None:
                    staged.puts[sid] = got
        staged.drops.difference_update(staged.puts)
        return staged

    def _build(
        self, p: Plan, sid: int, ids: tuple[int, ...], value_of: Callable[[Plan, int], int | None]
    ) -> tuple[int, bytes] | None:
        """(digest, rows) of the port's table, None when the programmed one is current."""
        named = []
        for bid in ids:
            val = value_of(p, bid)
            if val is None:  # cannot happen for a planned slot; never build a wrong table
                raise ValueError(f"backend {bid} has no value")
            named.append((self._name(val), bid))
        named.sort()
        names = [n for n, _ in named]
        bids = [b for _, b in named]
        m = self.table_size(len(names))
        d = digest(m, names, bids)
        if self.programmed.get(sid) == d:
            return None
        order, entries = maglev.build(names, m)
        # build sorts too; names are sorted already, so order is the identity
        return d, maglev.pack_rows(m, entries, [bids[k] for k in order], d)

    def write(self, staged: MaglevStaged) -> None:
        """Put the staged tables (before the frontends that use them are written), one at a time. A table
        the kernel refuses (a full kp_maglev_v1, no memory for its inner map) leaves its port on random
        selection, logged and counted; nothing else fails."""
        if not staged.puts or self.tables is None:
            return
        failed = dict(self.tables.put_tables([(sid, rows) for sid, (_, rows) in staged.puts.items()]))
        for sid, (d, _) in staged.puts.items():
            if sid not in failed:
                self.programmed[sid] = d
        if failed:
            for err in failed.values():
                full = isinstance(err, MapFullError)
                self.errors["maglev_map_full" if full else "maglev_write_failed"] += 1
            # A port keeps the table it had (if any, with its digest, so its next change writes it
            # again); a new one picks backends at random.
            log.error(
                "Maglev tables of %d service ports not written (they pick backends at random): %s",
                len(failed), next(iter(failed.values())),
            )  # fmt: skip

    def discard(self, staged: MaglevStaged) -> None:
        """Take back the tables written for plans that then failed: their ports pick at random until
        their Services are planned again (a table naming the failed plan's backends must not stay)."""
        if not staged.puts or self.tables is None:
            return
        sids = list(staged.puts)
        self.tables.delete_tables(sids)
        for sid in sids:
            self.programmed.pop(sid, None)

    def drop(self, staged: MaglevStaged, live: Callable[[int], bool]) -> None:
        """Remove the tables of ports that no longer want one (after their frontends were rewritten).
        LIVE(svc_id) tells whether a committed frontend still wants the port's table (another Service
        of the batch may have taken the id over)."""
        gone = [sid for sid in staged.drops if not live(sid)]
        if gone and self.tables is not None:
            self.tables.delete_tables(gone)
        for sid in gone:
            self.programmed.pop(sid, None)

    def prune(self, live: Callable[[int], bool]) -> int:
        """After a full apply: remove tables no committed frontend wants (left by an earlier agent)."""
        gone = [sid for sid in self.programmed if not live(sid)]
        if gone and self.tables is not None:
            self.tables.delete_tables(gone)
        for sid in gone:
            del self.programmed[sid]
        return len(gone)


@dataclass(frozen=True, slots=True)
class Table:
    """A Maglev table read back from its rows (the CLI, tests): size, entries (list indices), ids."""

    m: int
    digest: int
    entries: tuple[int, ...]
    backend_ids: tuple[int, ...]

    def backend_for(self, h: int) -> int:
        """The backend id the datapath picks for flow hash H (lib/maglev.h kp_maglev_backend)."""
        return self.backend_ids[self.entries[h % self.m]]

    def shares(self) -> dict[int, int]:
        """Backend id -> entries of the table it holds."""
        out: dict[int, int] = dict.fromkeys(self.backend_ids, 0)
        for k in self.entries:
            out[self.backend_ids[k]] += 1
        return out


def decode(rows: bytes) -> Table:
    """A table from its inner array's rows (row 0 the header), as the datapath reads it."""
    hdr = abi.MaglevHdr.from_buffer_copy(rows[: abi.MAGLEV_ROW])
    body = rows[abi.MAGLEV_ROW : hdr.list_row * abi.MAGLEV_ROW]
    entries = tuple(body[: hdr.m]) if hdr.width == 1 else tuple(array("H", body[: 2 * hdr.m]))
    ids = array("I", rows[hdr.list_row * abi.MAGLEV_ROW :][: 4 * hdr.n])
    return Table(hdr.m, hdr.digest, entries, tuple(ids))
