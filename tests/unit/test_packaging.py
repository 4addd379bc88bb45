"""The wheel built from the repo carries the compiled BPF objects and the native Maglev fill: a node
needs no compiler."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NATIVE_LIB = REPO / "kproxy/native/libkpmaglev.so"


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The files of a wheel built from the checkout (once for the module)."""
    out = tmp_path_factory.mktemp("wheel")
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
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (wheel,) = out.glob("kproxy-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_bpf_objects(request: pytest.FixtureRequest) -> None:
    built = sorted((REPO / "kproxy/bpf/obj").glob("*.bpf.o"))
    if not built:
        pytest.skip("BPF objects not built (make bpf)")
    wheel_names: set[str] = request.getfixturevalue("wheel_names")
    for obj in built:
        assert f"kproxy/bpf/obj/{obj.name}" in wheel_names, f"{obj.name} missing from the wheel"
    assert "kproxy/cli/__init__.py" in wheel_names and "kproxy/cli/agent.py" in wheel_names


def test_wheel_ships_the_native_maglev_fill(request: pytest.FixtureRequest) -> None:
    if not NATIVE_LIB.exists():
        pytest.skip("the native Maglev fill is not built (make native)")
    wheel_names: set[str] = request.getfixturevalue("wheel_names")
    assert "kproxy/native/libkpmaglev.so" in wheel_names
    assert "kproxy/sync/maglev.py" in wheel_names
