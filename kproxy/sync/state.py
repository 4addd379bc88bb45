"""The Syncer's vocabulary: frontend and backend keys as ints, the programmed state of a Service, a
plan (what one apply writes for one Service) and the report of an apply."""

from __future__ import annotations

from array import array
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy import abi

# (addr, port NBO, proto, scope); addr: an IPv4 NBO int, or an IPv6 address's 16 bytes (what the
# family's key packer takes, see kproxy.sync.family)
FKey = tuple[Any, int, int, int]
# The IPv4 layout (kproxy.sync.family has both families'). A backend as one int (a 32-44 byte int
# instead of a 64-88 byte tuple, 100,000 of them at scale):
# BKey = addr NBO | port NBO << 32 | proto << 48 | node << 56, `node` being the index of the
# endpoint's nodeName in BackendIds.node_idx (0: no nodeName); BVal (its kp_be4 value) = addr | port |
# proto | flags << 56 | node_addr NBO << 64 | node << 96. The programmed table (BackendIds.vals) adds
# the number of services referencing the backend above bit 128: one dict less (5 MB at 100,000
# backends), in the same int.
BKey = int
BVal = int
BK_MASK = (1 << 56) - 1
NODE_SHIFT = 96
NODE_MASK = (1 << 32) - 1
REFS_SHIFT = 128
REF1 = 1 << REFS_SHIFT
VAL_MASK = REF1 - 1
BE_LOCAL = int(abi.BackendFlag.LOCAL)
BE_TERMINATING = int(abi.BackendFlag.TERMINATING)


def bkey(addr: int, port: int, proto: int, node: int = 0) -> BKey:
    return addr | port << 32 | proto << 48 | node << 56


def key_of_val(val: BVal) -> BKey:
    return (val & BK_MASK) | ((val >> NODE_SHIFT) & NODE_MASK) << 56


def bval_proto(val: BVal) -> int:
    return (val >> 48) & 0xFF


def pack_be4(val: BVal) -> bytes:
    """The kp_be4 value a BVal stands for, packed."""
    return abi.pack_be4_val(
        val & 0xFFFFFFFF,
        (val >> 32) & 0xFFFF,
        (val >> 48) & 0xFF,
        (val >> 56) & 0xFF,
        (val >> 64) & 0xFFFFFFFF,
    )


SvcPort = tuple[str, str, int]  # (service, port name, proto)

PROTO = {"TCP": abi.IPPROTO_TCP, "UDP": abi.IPPROTO_UDP, "SCTP": abi.IPPROTO_SCTP}
ORPHANS = ""  # pseudo-service owning what adopt() found and no Service has claimed yet


@dataclass(slots=True)
class Fe:
    svc_id: int
    flags: int
    affinity_timeout: int
    # backend ids by slot: a tuple while planned, an array("I") once committed (Svc.compact)
    slots: Sequence[int]
    stale_slots: tuple[int, ...] = ()  # slot numbers found beyond count by adopt(), to delete


@dataclass(slots=True)
class Svc:
    frontends: dict[FKey, Fe] = field(default_factory=dict)
    # every id referenced (slots and retained); a set while planned, an array("I") once committed
    backends: set[int] | Sequence[int] = field(default_factory=set)
    # svc_id -> ids in its slots, sets while planned; None once committed: then the union of the slots
    # of its frontends with that svc_id, which it always is (see active_ids); a dict per Service less
    active: dict[int, set[int]] | None = field(default_factory=dict)
    svc_ports: set[SvcPort] | tuple[SvcPort, ...] = field(default_factory=set)  # a tuple once committed

    def active_ids(self) -> Mapping[int, Collection[int]]:
        """svc_id -> the backend ids in its slots."""
        if self.active is not None:
            return self.active
        out: dict[int, Collection[int]] = {}
        for fe in self.frontends.values():
            got = out.get(fe.svc_id)
            if got is None:
                out[fe.svc_id] = fe.slots
            else:
                out[fe.svc_id] = {*got, *fe.slots}
        return out

    def compact(self) -> Svc:
        """The committed form, for 10,000s of services: each frontend's slots an array("I") (4 bytes
        an id instead of a tuple's 8-byte pointer to a 28-byte int), equal slots one array, the
        backends that array when they are one frontend's slots (most services), else an array of
        their own; svc_ports a tuple; `active` left to be worked out from the frontends when asked
        (active_ids)."""
        arrays: dict[tuple[int, ...], array[int]] = {}
        for fe in self.frontends.values():
            slots = fe.slots
            if type(slots) is not array:
                t = tuple(slots)
                a = arrays.get(t)
                if a is None:
                    a = arrays[t] = array("I", t)
                fe.slots = a
        backends = self.backends
        if type(backends) is not array:
            ids = backends if isinstance(backends, set) else set(backends)
            shared = None
            for fe in self.frontends.values():
                if len(fe.slots) == len(ids) and ids.issuperset(fe.slots):
                    shared = fe.slots
                    break
            self.backends = shared if shared is not None else array("I", sorted(ids))
        self.active = None
        self.svc_ports = tuple(self.svc_ports)  # a set of one is 216 bytes
        return self


@dataclass(slots=True)
class Plan:
    service: str
    new: Svc
    old: Svc
    claimed: list[FKey] = field(default_factory=list)  # orphan frontends taken over
    be_puts: dict[int, BVal] = field(default_factory=dict)
    be_vals: dict[int, BVal] = field(default_factory=dict)
    # kp_svc4 (kp_svc6: the plan's family) keys and values packed by abi.pack_*; an element may hold
    # several consecutive entries (all slots of a new frontend in one keys blob and one values blob)
    slot_puts: list[tuple[bytes, bytes]] = field(default_factory=list)
    slot0_puts: list[tuple[bytes, bytes]] = field(default_factory=list)
    slot_dels: list[bytes] = field(default_factory=list)
    fe_dels: list[bytes] = field(default_factory=list)
    undo_puts: list[tuple[bytes, bytes]] = field(default_factory=list)
    new_svc4_keys: list[bytes] = field(default_factory=list)
    svc4_added: int = 0
    svc4_removed: int = 0
    svc_ids: dict[SvcPort, int] = field(default_factory=dict)
    conflicts: list[FKey] = field(default_factory=list)
    src_ranges: dict[int, tuple[str, ...]] = field(default_factory=dict)  # svc_id -> CIDRs (sync.lbsrc)

    @property
    def empty(self) -> bool:
        return not (self.be_puts or self.slot_puts or self.slot0_puts or self.slot_dels or self.fe_dels)


@dataclass
class ApplyReport:
    """What an apply did. The write counts are per family: svc4/be4 for IPv4, svc6/be6 for IPv6 (the
    Syncer's per-family engines count in the *4 fields, Syncer.apply moves the IPv6 ones over)."""

    changed: list[str] = field(default_factory=list)  # services whose map entries changed
    failed: dict[str, str] = field(default_factory=dict)  # service -> why it was not programmed
    retry: set[str] = field(default_factory=set)  # services to re-apply (a conflicting frontend was freed)
    svc4_puts: int = 0
    svc4_deletes: int = 0
    be4_puts: int = 0
    be4_deletes: int = 0
    svc6_puts: int = 0
    svc6_deletes: int = 0
    be6_puts: int = 0
    be6_deletes: int = 0
    ct_flushed: int = 0
    aff_flushed: int = 0
    tcp_frontends_removed: int = 0  # deleted while their connections may live on (orphan_until_ns)
    # UDP backends that left a service port: (family 4|6, svc_id, address NBO bytes, port NBO), for the
    # agent to destroy the connected sockets socket LB sent there (kproxy.bpf.sockdestroy)
    udp_left: list[tuple[int, int, bytes, int]] = field(default_factory=list)
    services: int = 0  # services applied (planned), changed or not
    # sync_dirty: monotonic time of each synced Service's first change (network programming latency)
    first_change: dict[str, float] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return (
            self.svc4_puts + self.svc4_deletes + self.be4_puts + self.be4_deletes
            + self.svc6_puts + self.svc6_deletes + self.be6_puts + self.be6_deletes
        )  # fmt: skip

    def merge_family(self, other: ApplyReport, *, v6: bool) -> None:
        """Add another family's report of the same apply (an engine's, see kproxy.sync.syncer)."""
        if other.changed:
            mine = set(self.changed)
            self.changed.extend(svc for svc in other.changed if svc not in mine)
        for svc, why in other.failed.items():
            self.failed[svc] = f"{self.failed[svc]}; {why}" if svc in self.failed else why
        self.retry |= other.retry
        if v6:
            self.svc6_puts += other.svc4_puts
            self.svc6_deletes += other.svc4_deletes
            self.be6_puts += other.be4_puts
            self.be6_deletes += other.be4_deletes
        else:
            self.svc4_puts += other.svc4_puts
            self.svc4_deletes += other.svc4_deletes
            self.be4_puts += other.be4_puts
            self.be4_deletes += other.be4_deletes
        self.ct_flushed += other.ct_flushed
        self.aff_flushed += other.aff_flushed
        self.tcp_frontends_removed += other.tcp_frontends_removed
        self.udp_left.extend(other.udp_left)
