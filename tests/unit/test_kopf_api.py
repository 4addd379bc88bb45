"""kproxy uses kopf's watch client and login machinery without kopf.operator (sources/kube/watch.py, issue
13). Those names are kopf internals: this test fails on a kopf whose internals moved, before an agent
would (pyproject pins kopf to the versions checked here)."""

from __future__ import annotations

import inspect

import kopf
from kopf._cogs.clients import auth, watching
from kopf._cogs.structs import credentials, ephemera, references
from kopf._core.engines import activities


def test_the_kopf_internals_kube_source_uses_are_there() -> None:
    params = inspect.signature(watching.infinite_watch).parameters
    assert {"settings", "resource", "namespace"} <= set(params)
    assert watching.Bookmark.LISTED
    params = inspect.signature(activities.authenticator).parameters
    assert {"registry", "settings", "indices", "vault", "memo"} <= set(params)
    assert isinstance(auth.vault_var.get(None), (credentials.Vault, type(None)))
    assert issubclass(credentials.LoginError, Exception)
    ephemera.AnyMemo(ephemera.Memo())
    r = references.Resource("discovery.k8s.io", "v1", "endpointslices", kind="EndpointSlice", namespaced=True,
                            verbs=frozenset({"list", "watch"}))  # fmt: skip
    assert (
        r.get_url(namespace=None, params={"watch": "true"})
        == "/apis/discovery.k8s.io/v1/endpointslices?watch=true"
    )
    ns = references.NamespaceName("kube-system")
    cm = references.Resource("", "v1", "configmaps", kind="ConfigMap", namespaced=True)
    assert cm.get_url(namespace=ns) == "/api/v1/namespaces/kube-system/configmaps"
    assert kopf.OperatorRegistry and kopf.on.login
