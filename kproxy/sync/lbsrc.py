"""loadBalancerSourceRanges -> kp_lbsrc4_v1 / kp_lbsrc6_v1 (LPM tries keyed by service-port id and
source prefix; one SourceRangeSync per family).

The Syncer calls stage() with an apply's plans before it writes any slot-0 entry and finish() after
its slot-0 writes and deletes, so a reader in the kernel never sees SvcFlag.SRC_RANGES on a
frontend whose ranges are not all there yet (its flows would be dropped), nor a range of a frontend
that no longer allows it while the flag is still checked against the old set:
  - ranges added: written before the slot 0 that sets the flag or uses them;
  - ranges removed: deleted after the slot 0 that clears the flag or no longer uses them.
A range change from A to B therefore allows A and B for the moment between the two writes, and
never neither.

State: the programmed ranges per svc_id, rebuilt from the map by adopt() after a restart (so an
unchanged Service writes nothing). Ranges of a service port are keyed by its svc_id only: every
LoadBalancer frontend of that port shares them.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy import abi
from kproxy.bpf.mapapi import MapOps

log = logging.getLogger(__name__)

# (LPM prefixlen = LBSRC4_SVC_BITS + CIDR length, network address: IPv4 NBO int, IPv6 16 bytes)
Range = tuple[int, Any]
_PACK_KEY = abi.pack_lbsrc4_key  # prefixlen, svc_id, addr
_PACK_KEY6 = abi.pack_lbsrc6_key
_VALUE = abi.LBSRC4_VAL_ALLOW  # kp_lbsrc6 values are kp_lbsrc4_val too


def parse_ranges(cidrs: Iterable[str], family: int = 4) -> frozenset[Range]:
    """CIDR strings (of FAMILY, as translate normalises them) -> trie prefixes. Raises ValueError."""
    out: set[Range] = set()
    for cidr in cidrs:
        if family == 4:
            net4 = ipaddress.IPv4Network(cidr, strict=False)
            out.add((abi.LBSRC4_SVC_BITS + net4.prefixlen, abi.ip_to_nbo(str(net4.network_address))))
        else:
            net6 = ipaddress.IPv6Network(cidr, strict=False)
            out.add((abi.LBSRC4_SVC_BITS + net6.prefixlen, net6.network_address.packed))
    return frozenset(out)


def range_key(svc_id: int, r: Range) -> bytes:
    if type(r[1]) is bytes:
        return _PACK_KEY6(r[0], svc_id, r[1])
    return _PACK_KEY(r[0], svc_id, r[1])


def _addr_text(r: Range) -> str:
    return abi.bytes_to_ip6(r[1]) if type(r[1]) is bytes else abi.nbo_to_ip(r[1])


def range_text(r: Range) -> str:
    return f"{_addr_text(r)}/{r[0] - abi.LBSRC4_SVC_BITS}"


def _text_order(r: Range) -> tuple[str, int]:
    return _addr_text(r), r[0]


@dataclass
class Staged:
    """What stage() wrote, for finish(): per plan its wanted ranges by svc_id, and the entries put."""

    wants: dict[int, dict[int, frozenset[Range]]] = field(default_factory=dict)  # id(plan) -> sid -> ranges
    put: dict[int, frozenset[Range]] = field(default_factory=dict)  # sid -> entries written by stage()


class SourceRangeSync:
    def __init__(self, m: MapOps[Any, Any], family: int = 4) -> None:
        self.map = m
        self.family = family
        self.programmed: dict[int, frozenset[Range]] = {}
        self._entries = 0

    def adopt(self, live_sids: Iterable[int]) -> None:
        """Rebuild the programmed view from the map; delete ranges of svc ids no frontend has."""
        live = set(live_sids)
        acc: dict[int, set[Range]] = {}
        stale = []
        six = self.family == 6
        for k, _ in self.map.items():
            r = (k.prefixlen, bytes(k.addr) if six else k.addr)
            if k.svc_id in live:
                acc.setdefault(k.svc_id, set()).add(r)
            else:
                stale.append(range_key(k.svc_id, r))
        if stale:
            self.map.delete_many(stale)
            log.info("deleted %d source ranges of service ids no frontend uses", len(stale))
        self.programmed = {sid: frozenset(rs) for sid, rs in acc.items()}
        self._entries = sum(len(rs) for rs in self.programmed.values())

    def stage(
        self, plans: Iterable[tuple[object, Mapping[int, tuple[str, ...]], Iterable[int]]]
    ) -> tuple[Staged, list[tuple[object, str]]]:
        """Write the ranges the plans add; before any slot-0 write of these plans.

        Each plan is (identity, {svc_id: allowed CIDRs}, svc ids its old and new frontends use).
        Returns what was staged and the plans refused, with why (the map would overflow, or a CIDR
        is invalid): the caller fails those plans before writing anything else of theirs.
        """
        staged = Staged()
        refused: list[tuple[object, str]] = []
        memo: dict[tuple[str, ...], frozenset[Range]] = {}
        prog = self.programmed
        entries = self._entries
        puts: dict[int, set[Range]] = {}
        for ident, wanted, sids in plans:
            want: dict[int, frozenset[Range]] = {}
            try:
                for sid, cidrs in wanted.items():
                    rs = memo.get(cidrs)
                    if rs is None:
                        rs = memo[cidrs] = parse_ranges(cidrs, self.family)
                    want[sid] = want.get(sid, frozenset()) | rs
            except ValueError as err:
                refused.append((ident, f"invalid loadBalancerSourceRanges: {err}"))
                continue
            for sid in sids:
                if sid in prog and sid not in want:
                    want[sid] = frozenset()  # its ranges go (after slot 0 stops using them)
            if not want:
                continue
            new = {sid: rs - prog.get(sid, frozenset()) - puts.get(sid, set()) for sid, rs in want.items()}
            n_new = sum(len(rs) for rs in new.values())
            if entries + n_new > self.map.max_entries:
                refused.append((ident, f"map {self.map.name} is full ({self.map.max_entries} entries)"))
                continue
            entries += n_new
            for sid, rs in new.items():
                if rs:
                    puts.setdefault(sid, set()).update(rs)
            staged.wants[id(ident)] = want
        if puts:
            self.map.put_many([(range_key(sid, r), _VALUE) for sid, rs in puts.items() for r in sorted(rs)])
        staged.put = {sid: frozenset(rs) for sid, rs in puts.items()}
        return staged, refused

    def finish(self, staged: Staged, done: Iterable[object]) -> int:
        """After the slot-0 writes and deletes: delete ranges no longer wanted and record the new state.

        `done` are the plans whose writes succeeded; ranges staged for the others are taken back.
        Returns the number of entries deleted.
        """
        final: dict[int, set[Range]] = {}
        for ident in done:
            for sid, rs in staged.wants.get(id(ident), {}).items():
                final.setdefault(sid, set()).update(rs)
        touched = set(staged.put)
        for want in staged.wants.values():
            touched.update(want)
        dels = []
        for sid in touched:
            old = self.programmed.get(sid, frozenset())
            new = frozenset(final[sid]) if sid in final else old
            for r in (old | staged.put.get(sid, frozenset())) - new:
                dels.append(range_key(sid, r))
            if new:
                self.programmed[sid] = new
            else:
                self.programmed.pop(sid, None)
        if dels:
            self.map.delete_many(dels)
        self._entries = sum(len(rs) for rs in self.programmed.values())
        return len(dels)

    def ranges(self, svc_id: int) -> list[str]:
        """The programmed ranges of a service port as CIDRs (for the CLI and tests)."""
        return [range_text(r) for r in sorted(self.programmed.get(svc_id, ()), key=_text_order)]
