"""Remove kube-proxy's iptables, ip6tables and nftables rules from a node, as `kube-proxy --cleanup` does.

Followed from kube-proxy's own cleanup (pkg/proxy/iptables/cleanup.go and pkg/proxy/nftables, v1.36):
- iptables and ip6tables, for every backend present (legacy and nft): unlink kube-proxy's chains from
  the chains that stay, then flush and delete
    nat:    KUBE-SERVICES KUBE-NODEPORTS KUBE-POSTROUTING KUBE-MARK-MASQ KUBE-PROXY-CANARY and every
            per-service chain (KUBE-SVC-, KUBE-SVL-, KUBE-EXT-, KUBE-FW-, KUBE-SEP-, pre-1.24 KUBE-XLB-)
    filter: KUBE-SERVICES KUBE-EXTERNAL-SERVICES KUBE-FORWARD KUBE-NODEPORTS KUBE-PROXY-FIREWALL
            KUBE-PROXY-CANARY
    mangle: KUBE-PROXY-CANARY
  Kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-MARK-DROP) stay, as kube-proxy leaves them.
- nftables: delete the tables `ip kube-proxy` and `ip6 kube-proxy`.

One difference, on purpose: kube-proxy deletes the jump rules it knows by their exact text; here every
rule of a remaining chain that jumps (-j/-g) to a chain being deleted goes, so jumps written by older
kube-proxy versions (other comments or matches) cannot keep a chain alive. Such a rule could not stay
anyway: a chain still referenced cannot be deleted.

Each table is changed in one `*-restore --noflush` transaction. The planning functions are pure (text in,
text out); `cleanup_kube_proxy` runs the tools on the current network namespace.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

KUBE_PROXY_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY"),
    "filter": (
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    ),
    "mangle": ("KUBE-PROXY-CANARY",),
}
# Per-service chains exist only in the nat table.
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-")
NFT_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))

# (label, save command, restore command) per iptables family and backend. The generic names are used only
# when no backend-specific tool exists (then they are whatever backend the distribution picked).
IPTABLES_TOOLS = (
    ("iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft", "iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft", "ip6tables-nft-save", "ip6tables-nft-restore"),
)
GENERIC_TOOLS = (
    ("iptables", "iptables-save", "iptables-restore"),
    ("ip6tables", "ip6tables-save", "ip6tables-restore"),
)


@dataclass
class SavedTable:
    """One table of an iptables-save dump: chain names in order, and its rules."""

    name: str
    chains: list[str] = field(default_factory=list)
    rules: list[SavedRule] = field(default_factory=list)


@dataclass(frozen=True)
class SavedRule:
    """One `-A` line: its chain, its parsed arguments, and its text after `-A ` exactly as saved (the
    restore tools understand iptables-save's own quoting, which differs from the shell's)."""

    chain: str
    args: tuple[str, ...]
    text: str


@dataclass
class TablePlan:
    """What to remove from one table: rules to delete (from chains that stay) and chains to delete."""

    table: str
    unlink: list[SavedRule]
    chains: list[str]

    @property
    def empty(self) -> bool:
        return not self.unlink and not self.chains

    def restore_input(self) -> str:
        """iptables-restore --noflush input doing the whole plan atomically: flush, unlink, delete."""
        lines = [f"*{self.table}"]
        # In restore input, declaring an existing chain flushes it.
        lines += [f":{chain} - [0:0]" for chain in self.chains]
        lines += [f"-D {rule.text}" for rule in self.unlink]
        lines += [f"-X {chain}" for chain in self.chains]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


@dataclass
class CleanupReport:
    """What cleanup_kube_proxy removed (or, with dry_run, would remove) and what went wrong."""

    dry_run: bool
    removed_chains: dict[str, list[str]] = field(default_factory=dict)  # "iptables-nft/nat" -> chains
    removed_rules: dict[str, list[str]] = field(default_factory=dict)  # "iptables-nft/nat" -> rule texts
    removed_nft_tables: list[str] = field(default_factory=list)  # "ip kube-proxy"
    backends: list[str] = field(default_factory=list)  # tools found and inspected
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def nothing_found(self) -> bool:
        return not (self.removed_chains or self.removed_rules or self.removed_nft_tables)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"inspected: {', '.join(self.backends) or 'no iptables or nft tools found'}"]
        for where, chains in sorted(self.removed_chains.items()):
            shown = ", ".join(chains[:5]) + (", ..." if len(chains) > 5 else "")
            lines.append(f"{where}: {verb} {len(chains)} chains ({shown})")
        for where, rules in sorted(self.removed_rules.items()):
            lines.append(f"{where}: {verb} {len(rules)} jump rules")
        for table in self.removed_nft_tables:
            lines.append(f"nftables: {verb} table {table}")
        if self.nothing_found:
            lines.append("no kube-proxy rules found")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


def parse_iptables_save(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save output (any backend, without counters) into tables."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable(line[1:]))
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise ValueError(f"iptables-save line {lineno} is outside a table: {raw!r}")
        elif line.startswith(":"):
            current.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            chain, *args = shlex.split(line[3:])
            current.rules.append(SavedRule(chain, tuple(args), line[3:]))
        else:
            raise ValueError(f"iptables-save line {lineno} is not a chain or an -A rule: {raw!r}")
    return tables


def is_kube_proxy_chain(table: str, chain: str) -> bool:
    if chain in KUBE_PROXY_CHAINS.get(table, ()):
        return True
    return table == "nat" and chain.startswith(SERVICE_CHAIN_PREFIXES)


def rule_target(args: Sequence[str]) -> str | None:
    """The chain or target a rule jumps (-j) or goes (-g) to, if any."""
    for i, arg in enumerate(args[:-1]):
        if arg in ("-j", "--jump", "-g", "--goto"):
            return args[i + 1]
    return None


def plan_table(table: SavedTable) -> TablePlan:
    doomed = [c for c in table.chains if is_kube_proxy_chain(table.name, c)]
    doomed_set = set(doomed)
    # Rules inside doomed chains vanish with the flush; only the chains that stay need their jumps removed.
    unlink = [r for r in table.rules if r.chain not in doomed_set and rule_target(r.args) in doomed_set]
    return TablePlan(table.name, unlink, doomed)


def plan_iptables(save_output: str) -> list[TablePlan]:
    """Plans for every table of one iptables-save dump that holds kube-proxy chains or jumps."""
    plans = [plan_table(t) for t in parse_iptables_save(save_output).values()]
    return [p for p in plans if not p.empty]


def parse_nft_tables(list_tables_output: str) -> set[tuple[str, str]]:
    """(family, name) of every table in `nft list tables` output."""
    found = set()
    for line in list_tables_output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            found.add((parts[1], parts[2]))
    return found


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


def run_command(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=60)


def find_iptables_tools(which: Callable[[str], str | None] = shutil.which) -> list[tuple[str, str, str]]:
    specific = [t for t in IPTABLES_TOOLS if which(t[1]) and which(t[2])]
    families_covered = {label.split("-")[0] for label, _, _ in specific}
    generic = [t for t in GENERIC_TOOLS if t[0] not in families_covered and which(t[1]) and which(t[2])]
    return specific + generic


def _cleanup_iptables(tool: tuple[str, str, str], report: CleanupReport, run: Runner) -> None:
    label, save, restore = tool
    saved = run([save], None)
    if saved.returncode != 0:
        report.errors.append(f"{save} failed ({saved.returncode}): {saved.stderr.strip()}")
        return
    report.backends.append(label)
    try:
        plans = plan_iptables(saved.stdout)
    except ValueError as e:
        report.errors.append(f"cannot read the output of {save}: {e}")
        return
    for plan in plans:
        where = f"{label}/{plan.table}"
        if not report.dry_run:
            # -w: wait for the xtables lock instead of failing when kubelet or a CNI holds it.
            done = run([restore, "-w", "--noflush"], plan.restore_input())
            if done.returncode != 0:
                report.errors.append(
                    f"{restore} failed on table {plan.table} ({done.returncode}): {done.stderr.strip()}; "
                    f"is kube-proxy still running? Delete its DaemonSet first."
                )
                continue
        if plan.chains:
            report.removed_chains[where] = plan.chains
        if plan.unlink:
            report.removed_rules[where] = [f"-A {rule.text}" for rule in plan.unlink]


def _cleanup_nftables(report: CleanupReport, run: Runner, which: Callable[[str], str | None]) -> None:
    if not which("nft"):
        return
    listed = run(["nft", "list", "tables"], None)
    if listed.returncode != 0:
        report.errors.append(f"nft list tables failed ({listed.returncode}): {listed.stderr.strip()}")
        return
    report.backends.append("nftables")
    present = parse_nft_tables(listed.stdout)
    for family, name in NFT_TABLES:
        if (family, name) not in present:
            continue
        if not report.dry_run:
            done = run(["nft", "delete", "table", family, name], None)
            if done.returncode != 0:
                report.errors.append(
                    f"nft delete table {family} {name} failed ({done.returncode}): {done.stderr.strip()}"
                )
                continue
        report.removed_nft_tables.append(f"{family} {name}")


def cleanup_kube_proxy(
    dry_run: bool = False,
    run: Runner = run_command,
    which: Callable[[str], str | None] = shutil.which,
) -> CleanupReport:
    """Remove kube-proxy's rules from the current network namespace; with dry_run only report them.

    Errors do not stop the other backends and tables; they are collected in the report (report.ok).
    """
    report = CleanupReport(dry_run=dry_run)
    for tool in find_iptables_tools(which):
        _cleanup_iptables(tool, report, run)
    _cleanup_nftables(report, run, which)
    for error in report.errors:
        log.error("cleanup-kube-proxy: %s", error)
    return report
