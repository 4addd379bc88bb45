"""The agent's one-way layers (.importlinter, run by `make lint`): kept by the tree, and each contract
breaks when a module imports against it (function-local imports count as well)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's kproxy, not the installed one
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO / ".importlinter")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def linter() -> None:
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (make install installs the dev extras)")


def test_the_tree_keeps_every_contract(linter: None) -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # the map writer must not reach up into the cluster view
        ("sync/plan.py", "def _up():\n    import kproxy.store\n", "layers"),
        # the BPF layer must not know what translate decides
        ("bpf/upkeep.py", "from kproxy.translate import skip_reason\n", "layers"),
        # the store does not call the sources that feed it
        ("store.py", "def _up():\n    from kproxy.sources import kube\n", "layers"),
        # the pure core does no I/O
        ("translate.py", "import socket\n", "pure core"),
        ("model/parse.py", "import asyncio\n", "pure core"),
        ("abi.py", "import subprocess\n", "map vocabulary"),
    ],
)
def test_an_import_against_the_layers_breaks_a_contract(
    linter: None, tmp_path: Path, module: str, line: str, contract: str
) -> None:
    shutil.copytree(
        REPO / "kproxy", tmp_path / "kproxy", ignore=shutil.ignore_patterns("__pycache__", "obj", "*.o")
    )
    path = tmp_path / "kproxy" / module
    path.write_text(path.read_text() + "\n\n" + line)
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    broken = r.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, r.stdout
