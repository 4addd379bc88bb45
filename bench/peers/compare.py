"""Normalise iptables-save and ``nft list ruleset`` text so generated and captured rule sets compare.

Only what kube-proxy leaves to chance is normalised: counters, timestamps, the order of Services in
the dispatch chains (Go map iteration), the order of set/map elements and of chains in nft listings,
and the 31-bit rounding the kernel applies to statistic probabilities. Everything else (rule order
inside a Service's chains, match arguments, comments, targets) must be equal.
"""

from __future__ import annotations

import re
import shlex
from collections import defaultdict

# Chains where kube-proxy appends one block of rules per Service in map order.
IPT_SERVICE_ORDERED = {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL"}

IptTables = dict[str, dict[str, list[str]]]  # table -> chain -> rules (normalised)


def _norm_probability(tokens: list[str]) -> list[str]:
    out = list(tokens)
    for i, tok in enumerate(out[:-1]):
        if tok == "--probability":
            raw = round(float(out[i + 1]) * 0x80000000)
            out[i + 1] = f"{raw / 0x80000000:.11f}"
    return out


def _service_key(rule: str) -> str:
    m = re.search(r"--comment ['\"]?([^'\" ]+)", rule)
    return m.group(1) if m else ""


def parse_iptables(text: str) -> IptTables:
    tables: IptTables = {}
    chains: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            tokens = _norm_probability(shlex.split(line))
            chains.setdefault(tokens[1], []).append(shlex.join(tokens[2:]))
    for table, cmap in tables.items():
        for name, rules in cmap.items():
            if name in IPT_SERVICE_ORDERED:
                # Stable: a Service's own rules keep their relative order; the catch-all
                # "must be the last rule" stays last because it has no Service key ("kubernetes ...").
                last = [r for r in rules if "must be the last rule" in r]
                body = [r for r in rules if "must be the last rule" not in r]
                cmap[name] = sorted(body, key=_service_key) + last
        tables[table] = cmap
    return tables


# --- nft ---------------------------------------------------------------------------------------

NftObjects = dict[str, dict[str, object]]  # "table ip kube-proxy" -> {"chain X": [...], "set Y": {...}}


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth, quote = 0, False
    for ch in text:
        if ch == '"':
            quote = not quote
        elif not quote and ch == "{":
            depth += 1
        elif not quote and ch == "}":
            depth -= 1
        if ch == sep and depth == 0 and not quote:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _join_statements(lines: list[str]) -> list[str]:
    """Join continuation lines (an open brace spanning lines) into one statement each."""
    out, cur, depth = [], "", 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        cur = f"{cur} {line}" if cur else line
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            out.append(re.sub(r"\s+", " ", cur))
            cur, depth = "", 0
    return out


def parse_nft(text: str) -> NftObjects:
    """Parse ``nft list ruleset`` output (or a generated script in the same declarative form)."""
    result: NftObjects = {}
    lines = text.splitlines()
    i = 0
    table: dict[str, object] | None = None
    while i < len(lines):
        line = lines[i].rstrip()
        s = line.strip()
        i += 1
        if not s or s.startswith("#"):
            continue
        m = re.match(r"^table (\w+) (\S+) \{$", s)
        if m and not line.startswith("\t"):
            table = result.setdefault(f"table {m.group(1)} {m.group(2)}", {})
            continue
        if table is None:
            # Script statements outside a table block (e.g. "delete table ...") are not objects.
            continue
        m = re.match(r"^(set|map|chain) (\S+) \{$", s)
        if m:
            body = []
            while lines[i].strip() != "}":
                body.append(lines[i])
                i += 1
            i += 1
            stmts = _join_statements(body)
            kind, name = m.group(1), m.group(2)
            if kind == "chain":
                table[f"chain {name}"] = stmts
            else:
                props: list[str] = []
                elements: frozenset[str] = frozenset()
                for st in stmts:
                    em = re.match(r"^elements = \{(.*)\}$", st)
                    if em:
                        elements = frozenset(_split_top(em.group(1)))
                    else:
                        props.append(st)
                table[f"{kind} {name}"] = {"props": props, "elements": elements}
            continue
        if s == "}":
            table = None
            continue
        props_list = table.setdefault("props", [])
        assert isinstance(props_list, list)
        props_list.append(s)
    return result


def diff_objects(got: dict, want: dict) -> list[str]:
    """Human-readable differences between two parsed rule sets (empty when equal)."""
    problems = []
    for key in sorted(set(got) | set(want)):
        if key not in got:
            problems.append(f"missing {key}")
        elif key not in want:
            problems.append(f"unexpected {key}")
        elif isinstance(want[key], dict) and isinstance(got[key], dict):
            problems += [f"{key}: {p}" for p in diff_objects(got[key], want[key])]
        elif got[key] != want[key]:
            problems.append(f"{key}:\n  got  {got[key]!r}\n  want {want[key]!r}")
    return problems


def count_nft(objects: NftObjects) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for table in objects.values():
        for key, val in table.items():
            kind = key.split()[0]
            if kind == "props":
                continue
            counts[kind + "s"] += 1
            if kind == "chain":
                counts["rules"] += len(val)  # type: ignore[arg-type]
            elif kind in ("set", "map"):
                counts["elements"] += len(val["elements"])  # type: ignore[index]
    return dict(counts)
