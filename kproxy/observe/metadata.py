"""The agent's metadata file: what the BPF maps cannot say (service names, port names).

The maps know a frontend only by address, port and a numeric svc_id. The agent writes
`services.json` mapping each svc_id to its Service ("namespace/name"), port name and protocol, so the
CLI can print names. A bpffs directory cannot hold regular files, so the file lives in a state
directory derived from the bpffs path:

    /run/kproxy/<first 16 hex of sha256(real path of the bpffs dir)>/services.json

(KPROXY_STATE_ROOT overrides /run/kproxy). The file is replaced atomically when service ids come or
go (at most every few hundred milliseconds, see ServiceMetadata.changed in kproxy/agent/syncloop.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STATE_ROOT_ENV = "KPROXY_STATE_ROOT"
DEFAULT_STATE_ROOT = "/run/kproxy"
FILE_NAME = "services.json"
STATUS_FILE = "status.json"


def state_dir(bpffs: str | Path) -> Path:
    root = Path(os.environ.get(STATE_ROOT_ENV, DEFAULT_STATE_ROOT))
    digest = hashlib.sha256(os.path.realpath(bpffs).encode()).hexdigest()[:16]
    return root / digest


def metadata_path(bpffs: str | Path) -> Path:
    return state_dir(bpffs) / FILE_NAME


def write_metadata(bpffs: str | Path, node: str, services: dict[int, dict[str, Any]]) -> Path:
    """services: svc_id -> {"service": "ns/name", "port_name": ..., "protocol": ...}."""
    entries = [f'"{k}": {json.dumps(v)}' for k, v in sorted(services.items())]
    return write_metadata_entries(bpffs, node, entries)


def metadata_entry(svc_id: int, service: str, port_name: str, proto: int) -> str:
    """One services.json entry, JSON-encoded (`"7": {...}`), for write_metadata_entries."""
    from kproxy.observe.inspect import proto_name

    value = {"service": service, "port_name": port_name, "protocol": proto_name(proto)}
    return f'"{svc_id}": {json.dumps(value)}'


def write_metadata_entries(bpffs: str | Path, node: str, entries: Iterable[str]) -> Path:
    """write_metadata from entries encoded by metadata_entry (the agent keeps them encoded: a write
    is a join, not a re-encoding of every Service)."""
    path = metadata_path(bpffs)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "version": 1,
        "bpffs": os.path.realpath(bpffs),
        "node": node,
        "pid": os.getpid(),
        "updated": time.time(),
    }
    text = json.dumps(head)[:-1] + ', "services": {' + ", ".join(entries) + "}}"
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.rename(tmp, path)
    return path


def read_metadata(bpffs: str | Path) -> dict[int, dict[str, Any]]:
    """svc_id -> metadata; empty when the agent never wrote the file (names then print as '?')."""
    try:
        doc = json.loads(metadata_path(bpffs).read_text())
    except (OSError, ValueError):
        return {}
    return {int(k): v for k, v in doc.get("services", {}).items()}


def status_path(bpffs: str | Path) -> Path:
    return state_dir(bpffs) / STATUS_FILE


def write_status(bpffs: str | Path, status: dict[str, Any]) -> Path:
    """The agent's own state, for `kproxy status` (replaced atomically)."""
    path = status_path(bpffs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**status, "written": time.time()}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_status(bpffs: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(status_path(bpffs).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
