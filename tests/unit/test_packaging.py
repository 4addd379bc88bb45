"""The wheel built from the repo carries the compiled BPF objects: a node needs no clang."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_bpf_objects(tmp_path: Path) -> None:
    built = sorted((REPO / "kproxy/bpf/obj").glob("*.bpf.o"))
    if not built:
        pytest.skip("BPF objects not built (make bpf)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("kproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for obj in built:
        assert f"kproxy/bpf/obj/{obj.name}" in names, f"{obj.name} missing from {wheel.name}"
    assert "kproxy/cli/__init__.py" in names and "kproxy/cli/agent.py" in names
