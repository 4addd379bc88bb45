"""The API double enforces the Helm chart's RBAC as kube-apiserver does (issue 12, item 1).

The agent's identity and its ConfigMap come from the real `helm template` of charts/kproxy, never
from constants here: the chart's ServiceAccount may list and watch Services, EndpointSlices, Nodes and
ServiceCIDRs cluster-wide, and read and patch its own ConfigMap, listing and watching it only with a
`metadata.name` field selector in its namespace. Everything else is 403 with kube-apiserver's message;
an unknown token is 401. Checked twice: `Rbac.allows` as a table, and real HTTP requests to the double.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kproxy.sources.kube import resolve_connection
from tests.controller.apiserver import FakeApiServer, endpoint_slice, node, pod_ip, service, service_cidr
from tests.controller.conftest import run
from tests.controller.rbac import (
    Rbac,
    agent_user,
    forbidden_message,
    render_chart,
    request_attributes,
    settings_configmap,
)

AGENT_TOKEN = "agent-token"
OTHER_TOKEN = "other-token"


@pytest.fixture(scope="module")
def chart() -> dict[str, Any]:
    """The default render: its RBAC, the agent's user name and its ConfigMap's namespace and name."""
    docs = render_chart()
    namespace, name = settings_configmap(docs)
    return {"rbac": Rbac.from_objects(docs), "agent": agent_user(docs), "cm_ns": namespace, "cm": name}


def test_chart_names_come_from_the_render() -> None:
    """The defaults the rest relies on, and that they follow the release rather than being constants."""
    docs = render_chart()
    assert agent_user(docs) == "system:serviceaccount:kube-system:kproxy"
    assert settings_configmap(docs) == ("kube-system", "kproxy-config")
    other = render_chart(release="edge", namespace="net")
    assert agent_user(other) == "system:serviceaccount:net:edge-kproxy"
    assert settings_configmap(other) == ("net", "edge-kproxy-config")
    # cached per arguments, but every caller gets its own copy
    assert render_chart() == docs and render_chart() is not docs
    docs.clear()
    assert render_chart()
    with_dsr = render_chart({"dsr": {"enabled": True, "mode": "ipip"}})
    cm = next(d for d in with_dsr if d["kind"] == "ConfigMap")
    assert cm["data"]["dsr-mode"] == "ipip"


# (verb, group, resource, namespace, name, allowed); "<ns>" and "<cm>" stand for the chart's ConfigMap.
AGENT_TABLE = [
    # what kopf and KubeSource's LIST read, cluster-wide
    *[
        (verb, group, resource, None, None, True)
        for group, resource in (
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "nodes"),
            ("networking.k8s.io", "servicecidrs"),
        )
        for verb in ("list", "watch")
    ],
    ("get", "", "services", "default", "web", True),
    ("list", "", "services", "default", None, True),  # a ClusterRoleBinding covers every namespace
    ("get", "", "nodes", None, "node-a", True),
    ("get", "discovery.k8s.io", "endpointslices", "default", "web-abc", True),
    ("get", "networking.k8s.io", "servicecidrs", None, "kubernetes", False),  # the chart grants list/watch
    # its ConfigMap: by name only, in its namespace only
    ("get", "", "configmaps", "<ns>", "<cm>", True),
    ("patch", "", "configmaps", "<ns>", "<cm>", True),
    ("list", "", "configmaps", "<ns>", "<cm>", True),  # fieldSelector=metadata.name=<cm>
    ("watch", "", "configmaps", "<ns>", "<cm>", True),
    ("list", "", "configmaps", "<ns>", None, False),
    ("watch", "", "configmaps", "<ns>", None, False),
    ("list", "", "configmaps", None, None, False),
    ("watch", "", "configmaps", None, None, False),
    ("watch", "", "configmaps", None, "<cm>", False),  # the selector does not help at the cluster scope
    ("list", "", "configmaps", None, "<cm>", False),
    ("get", "", "configmaps", "<ns>", "other", False),
    ("get", "", "configmaps", "default", "<cm>", False),
    ("update", "", "configmaps", "<ns>", "<cm>", False),
    ("delete", "", "configmaps", "<ns>", "<cm>", False),
    ("create", "", "configmaps", "<ns>", None, False),
    # nothing else
    ("get", "", "secrets", "<ns>", "<cm>", False),
    ("list", "", "secrets", None, None, False),
    ("list", "", "secrets", "<ns>", None, False),
    ("create", "", "services", "default", None, False),
    ("patch", "", "services", "default", "web", False),
    ("delete", "", "services", "default", "web", False),
    ("update", "", "nodes", None, "node-a", False),
    ("list", "", "endpoints", None, None, False),
    ("list", "apps", "services", None, None, False),
    ("list", "", "pods", None, None, False),
    ("create", "", "events", "<ns>", None, False),
]


@pytest.mark.parametrize(("verb", "group", "resource", "namespace", "name", "allowed"), AGENT_TABLE)
def test_agent_permissions_table(
    chart: dict[str, Any],
    verb: str,
    group: str,
    resource: str,
    namespace: str | None,
    name: str | None,
    allowed: bool,
) -> None:
    ns = chart["cm_ns"] if namespace == "<ns>" else namespace
    obj = chart["cm"] if name == "<cm>" else name
    rbac: Rbac = chart["rbac"]
    assert rbac.allows(chart["agent"], verb, group, resource, ns, obj) is allowed


def test_subresources_and_other_identities_get_nothing(chart: dict[str, Any]) -> None:
    rbac: Rbac = chart["rbac"]
    agent, ns = chart["agent"], chart["cm_ns"]
    assert not rbac.allows(agent, "patch", "", "services", "default", "web", subresource="status")
    assert not rbac.allows(agent, "get", "", "configmaps", ns, chart["cm"], subresource="proxy")
    _, _, sa_name = agent.rpartition(":")
    for user in (
        f"system:serviceaccount:{ns}:default",  # another service account of the namespace
        f"system:serviceaccount:default:{sa_name}",  # the same name in another namespace
        sa_name,  # a User of that name
    ):
        assert not rbac.allows(user, "list", "", "services", None, None), user
        assert not rbac.allows(user, "get", "", "configmaps", ns, chart["cm"]), user


def test_rbac_semantics_beyond_the_chart() -> None:
    """Wildcards, RoleBindings to ClusterRoles, Group/User subjects, subresources, nonResourceURLs."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "reader"},
            "rules": [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]},
                {"nonResourceURLs": ["/metrics", "/logs/*"], "verbs": ["get"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "logs"},
            "rules": [{"apiGroups": [""], "resources": ["pods/log", "*/scale"], "verbs": ["get"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "loggers"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "logs"},
            "subjects": [{"kind": "Group", "name": "loggers"}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "writer"},
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "readers"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader"},
            "subjects": [{"kind": "Group", "name": "readers"}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "writers", "namespace": "team"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "writer"},
            "subjects": [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": "ci"}],
        },
    ]
    rbac = Rbac.from_objects(docs)
    assert rbac.agent is None
    # Group subject, "*" groups and resources, verbs exact
    assert rbac.allows("bob", "get", "apps", "deployments", "x", "d", groups=["readers"])
    assert rbac.allows("bob", "get", "", "nodes", None, "n", groups=["readers"])
    assert not rbac.allows("bob", "list", "", "nodes", None, None, groups=["readers"])
    assert not rbac.allows("bob", "get", "", "nodes", None, "n")  # not in the group
    # subresources: "*" covers them all, "pods/log" that one, "*/scale" every resource's scale; a rule
    # naming the resource alone none
    assert rbac.allows("bob", "get", "", "pods", "x", "p", subresource="exec", groups=["readers"])
    assert not rbac.allows("carol", "get", "", "pods", "x", "p", subresource="exec", groups=["loggers"])
    assert rbac.allows("carol", "get", "", "pods", "x", "p", subresource="log", groups=["loggers"])
    assert rbac.allows("carol", "get", "", "widgets", "x", "w", subresource="scale", groups=["loggers"])
    assert not rbac.allows("carol", "get", "", "pods", "x", "p", groups=["loggers"])
    assert not rbac.allows("alice", "get", "apps", "deployments", "team", "d", subresource="scale")
    # a RoleBinding to a ClusterRole: its rules, in the binding's namespace only
    assert rbac.allows("alice", "delete", "apps", "deployments", "team", "d")
    assert not rbac.allows("alice", "delete", "apps", "deployments", "other", "d")
    assert not rbac.allows("alice", "list", "apps", "deployments", None, None)
    # a ServiceAccount subject without namespace is the binding's namespace's
    assert rbac.allows("system:serviceaccount:team:ci", "create", "apps", "deployments", "team", None)
    assert not rbac.allows("system:serviceaccount:other:ci", "create", "apps", "deployments", "team", None)
    # non-resource URLs: exact or prefix*, ClusterRoles only
    assert rbac.allows_path("bob", "get", "/metrics", groups=["readers"])
    assert rbac.allows_path("bob", "get", "/logs/kubelet.log", groups=["readers"])
    assert not rbac.allows_path("bob", "get", "/healthz", groups=["readers"])
    assert not rbac.allows_path("alice", "get", "/metrics")


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/services", "", ("list", "", "services", None, None, "")),
        ("GET", "/api/v1/services", "watch=true", ("watch", "", "services", None, None, "")),
        ("GET", "/api/v1/services", "watch=1&limit=5", ("watch", "", "services", None, None, "")),
        ("GET", "/api/v1/namespaces/ns/services/web", "", ("get", "", "services", "ns", "web", "")),
        (
            "GET",
            "/api/v1/namespaces/ns/configmaps",
            "fieldSelector=metadata.name%3Dcm",
            ("list", "", "configmaps", "ns", "cm", ""),
        ),
        (
            "GET",
            "/api/v1/configmaps",
            "watch=true&fieldSelector=metadata.namespace%3Dns,metadata.name%3D%3Dcm",
            ("watch", "", "configmaps", None, "cm", ""),
        ),
        (
            "GET",
            "/api/v1/configmaps",
            "fieldSelector=metadata.name!%3Dcm",
            ("list", "", "configmaps", None, None, ""),
        ),
        ("GET", "/api/v1/watch/namespaces/ns/pods", "", ("watch", "", "pods", "ns", None, "")),
        (
            "GET",
            "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices",
            "",
            ("list", "discovery.k8s.io", "endpointslices", "ns", None, ""),
        ),
        (
            "GET",
            "/apis/networking.k8s.io/v1/servicecidrs/kubernetes",
            "",
            ("get", "networking.k8s.io", "servicecidrs", None, "kubernetes", ""),
        ),
        ("POST", "/api/v1/namespaces/ns/services", "", ("create", "", "services", "ns", None, "")),
        ("PUT", "/api/v1/nodes/n/status", "", ("update", "", "nodes", None, "n", "status")),
        ("PATCH", "/api/v1/namespaces/ns/configmaps/cm", "", ("patch", "", "configmaps", "ns", "cm", "")),
        ("DELETE", "/api/v1/namespaces/ns/services/web", "", ("delete", "", "services", "ns", "web", "")),
        (
            "DELETE",
            "/api/v1/namespaces/ns/services",
            "",
            ("deletecollection", "", "services", "ns", None, ""),
        ),
        ("GET", "/api/v1/namespaces/ns", "", ("get", "", "namespaces", "ns", "ns", "")),
        ("PUT", "/api/v1/namespaces/ns/finalize", "", ("update", "", "namespaces", "ns", "ns", "finalize")),
        ("GET", "/api/v1/namespaces", "", ("list", "", "namespaces", None, None, "")),
    ],
)
def test_request_attributes_as_kube_apiserver_computes_them(
    method: str, path: str, query: str, expected: tuple[Any, ...]
) -> None:
    a = request_attributes(method, path, query)
    assert a.resource_request
    assert (a.verb, a.group, a.resource, a.namespace, a.name, a.subresource) == expected


@pytest.mark.parametrize(
    "path", ["/version", "/api", "/api/v1", "/apis", "/apis/apps", "/apis/apps/v1", "/healthz"]
)
def test_discovery_paths_are_not_resource_requests(path: str) -> None:
    a = request_attributes("GET", path)
    assert not a.resource_request and a.verb == "get" and a.path == path


FORBIDDEN_MESSAGES = [
    (
        "GET", "/api/v1/configmaps",
        'configmaps is forbidden: User "{u}" cannot list resource "configmaps" in API group "" at the '
        'cluster scope',
    ),
    (
        "GET", "/api/v1/namespaces/kube-system/configmaps",
        'configmaps is forbidden: User "{u}" cannot list resource "configmaps" in API group "" in the '
        'namespace "kube-system"',
    ),
    (
        "GET", "/api/v1/namespaces/kube-system/secrets/x",
        'secrets "x" is forbidden: User "{u}" cannot get resource "secrets" in API group "" in the namespace '
        '"kube-system"',
    ),
    (
        "POST", "/apis/networking.k8s.io/v1/servicecidrs",
        'servicecidrs.networking.k8s.io is forbidden: User "{u}" cannot create resource "servicecidrs" in '
        'API group "networking.k8s.io" at the cluster scope',
    ),
    (
        "PATCH", "/api/v1/namespaces/default/services/web/status",
        'services "web" is forbidden: User "{u}" cannot patch resource "services/status" in API group "" in '
        'the namespace "default"',
    ),
    ("GET", "/metrics", 'forbidden: User "{u}" cannot get path "/metrics"'),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "message"), FORBIDDEN_MESSAGES)
def test_forbidden_messages_are_kube_apiservers(method: str, path: str, message: str) -> None:
    user = "system:serviceaccount:kube-system:kproxy"
    assert forbidden_message(user, request_attributes(method, path)) == message.format(u=user)


# ---- over HTTP ----


def _populate(api: FakeApiServer, cm_ns: str, cm: str) -> None:
    api.put(node("node-a", "192.168.0.10"))
    api.put(service("web", "10.96.0.10"))
    api.put(endpoint_slice("web", [pod_ip(1)]))
    api.put(service_cidr("kubernetes", "10.96.0.0/16"))
    for namespace, name in ((cm_ns, cm), (cm_ns, "other"), ("default", cm)):
        api.put(
            {
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace},
                "data": {"dsr-mode": "off"},
            }
        )


class _Client:
    def __init__(self, api: FakeApiServer, http: aiohttp.ClientSession) -> None:
        self.api = api
        self.http = http

    async def __call__(
        self, method: str, path: str, token: str | None = AGENT_TOKEN, body: Any = None
    ) -> tuple[int, Any]:
        """(status, decoded body); of a watch, its first event."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
        data = json.dumps(body) if body is not None else None
        async with self.http.request(method, self.api.url + path, headers=headers, data=data) as resp:
            if resp.status == 200 and "watch=true" in path:
                return resp.status, json.loads(await resp.content.readline())
            return resp.status, await resp.json()


def _items(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in body["items"]]


def test_the_double_serves_the_agent_what_the_chart_grants(chart: dict[str, Any]) -> None:
    agent, cm_ns, cm = chart["agent"], chart["cm_ns"], chart["cm"]

    async def scenario() -> None:
        api = FakeApiServer(rbac=chart["rbac"], tokens={AGENT_TOKEN: agent})
        _populate(api, cm_ns, cm)
        async with api, aiohttp.ClientSession() as http:
            call = _Client(api, http)
            for path in ("/version", "/api", "/api/v1", "/apis", "/apis/discovery.k8s.io/v1"):
                assert (await call("GET", path))[0] == 200, path
            for path, kind in (
                ("/api/v1/services", "Service"),
                ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice"),
                ("/api/v1/nodes", "Node"),
                ("/apis/networking.k8s.io/v1/servicecidrs", "ServiceCIDR"),
            ):
                status, body = await call("GET", path + "?limit=500")
                assert status == 200 and body["kind"] == f"{kind}List" and len(body["items"]) == 1, body
                status, event = await call("GET", path + "?watch=true&allowWatchBookmarks=true")
                assert status == 200 and event["type"] == "ADDED" and event["object"]["kind"] == kind, event
            status, body = await call("GET", "/api/v1/namespaces/default/services/web")
            assert status == 200 and body["metadata"]["name"] == "web"

            one = f"/api/v1/namespaces/{cm_ns}/configmaps/{cm}"
            status, body = await call("GET", one)
            assert status == 200 and body["data"] == {"dsr-mode": "off"}
            status, body = await call("PATCH", one, body={"data": {"dsr-mode": "ipip"}})
            assert status == 200 and body["data"] == {"dsr-mode": "ipip"}
            selected = f"/api/v1/namespaces/{cm_ns}/configmaps?fieldSelector=metadata.name%3D{cm}"
            status, body = await call("GET", selected)
            assert status == 200 and _items(body) == [(cm_ns, cm)]
            status, event = await call("GET", selected + "&watch=true")
            assert status == 200 and event["object"]["metadata"]["name"] == cm
            assert not api.denied and not [k for k in api.requests if k.startswith(("FORBIDDEN", "UNAUTH"))]

    run(scenario())


def test_the_double_refuses_the_agent_everything_else(chart: dict[str, Any]) -> None:
    agent, cm_ns, cm = chart["agent"], chart["cm_ns"], chart["cm"]

    async def scenario() -> None:
        api = FakeApiServer(rbac=chart["rbac"], tokens={AGENT_TOKEN: agent})
        _populate(api, cm_ns, cm)
        async with api, aiohttp.ClientSession() as http:
            call = _Client(api, http)

            async def refused(method: str, path: str, message: str, body: Any = None) -> None:
                status, answer = await call(method, path, body=body)
                assert status == 403, (path, status, answer)
                assert (
                    answer["kind"] == "Status" and answer["reason"] == "Forbidden" and answer["code"] == 403
                )
                assert answer["message"] == message.replace("USER", f'User "{agent}"'), answer["message"]

            # the request that took every watch down on a real cluster: configmaps at the cluster scope
            await refused(
                "GET",
                "/api/v1/configmaps?limit=500",
                'configmaps is forbidden: USER cannot list resource "configmaps" in API group "" '
                "at the cluster scope",
            )
            # a name selector does not make a cluster-scoped watch namespaced (the Role is)
            await refused(
                "GET",
                f"/api/v1/configmaps?watch=true&fieldSelector=metadata.name%3D{cm}",
                f'configmaps "{cm}" is forbidden: USER cannot watch resource "configmaps" in API group "" '
                "at the cluster scope",
            )
            # its namespace, without the selector
            for verb, query in (("list", ""), ("watch", "?watch=true")):
                await refused(
                    "GET",
                    f"/api/v1/namespaces/{cm_ns}/configmaps{query}",
                    f'configmaps is forbidden: USER cannot {verb} resource "configmaps" in API group "" '
                    f'in the namespace "{cm_ns}"',
                )
            await refused(
                "GET",
                f"/api/v1/namespaces/{cm_ns}/configmaps/other",
                f'configmaps "other" is forbidden: USER cannot get resource "configmaps" in API group "" '
                f'in the namespace "{cm_ns}"',
            )
            await refused(
                "GET",
                f"/api/v1/namespaces/default/configmaps/{cm}",
                f'configmaps "{cm}" is forbidden: USER cannot get resource "configmaps" in API group "" '
                'in the namespace "default"',
            )
            # secrets: 403 although the double does not even serve them (authorization comes first)
            await refused(
                "GET",
                f"/api/v1/namespaces/{cm_ns}/secrets",
                f'secrets is forbidden: USER cannot list resource "secrets" in API group "" '
                f'in the namespace "{cm_ns}"',
            )
            await refused(
                "GET",
                "/api/v1/secrets",
                'secrets is forbidden: USER cannot list resource "secrets" in API group "" '
                "at the cluster scope",
            )
            await refused(
                "POST",
                "/api/v1/namespaces/default/services",
                'services is forbidden: USER cannot create resource "services" in API group "" '
                'in the namespace "default"',
                body=service("evil", "10.96.0.66"),
            )
            await refused(
                "PATCH",
                "/api/v1/namespaces/default/services/web",
                'services "web" is forbidden: USER cannot patch resource "services" in API group "" '
                'in the namespace "default"',
                body={"spec": {"clusterIP": "10.96.0.66"}},
            )
            assert api.get("Service", "default", "evil") is None
            assert api.get("Service", "default", "web")["spec"]["clusterIP"] == "10.96.0.10"  # type: ignore[index]
            assert api.requests["FORBIDDEN list configmaps"] == 2
            assert api.requests["FORBIDDEN watch configmaps"] == 2
            assert api.requests["FORBIDDEN create services"] == 1
            assert [(u, a.verb, a.resource, a.namespace, a.name) for u, a in api.denied][:2] == [
                (agent, "list", "configmaps", None, None),
                (agent, "watch", "configmaps", None, cm),
            ]
            assert "LIST configmaps" not in api.requests and "WATCH configmaps" not in api.requests

    run(scenario())


def test_unknown_or_missing_token_is_401_and_another_account_is_403(chart: dict[str, Any]) -> None:
    cm_ns = chart["cm_ns"]
    other = f"system:serviceaccount:{cm_ns}:default"

    async def scenario() -> None:
        api = FakeApiServer(rbac=chart["rbac"], tokens={AGENT_TOKEN: chart["agent"], OTHER_TOKEN: other})
        _populate(api, cm_ns, chart["cm"])
        async with api, aiohttp.ClientSession() as http:
            call = _Client(api, http)
            for token in (None, "nope"):
                for path in ("/api/v1/services", "/version", "/apis"):
                    status, body = await call("GET", path, token=token)
                    assert status == 401 and body["reason"] == "Unauthorized" and body["code"] == 401, body
            async with http.get(
                api.url + "/api/v1/services", headers={"Authorization": "Basic eDp5"}
            ) as resp:
                assert resp.status == 401
            assert api.requests["UNAUTHORIZED"] == 7
            # authenticated: discovery yes, the agent's resources no
            assert (await call("GET", "/apis", token=OTHER_TOKEN))[0] == 200
            status, body = await call("GET", "/api/v1/services", token=OTHER_TOKEN)
            assert status == 403 and f'User "{other}" cannot list resource "services"' in body["message"]
            status, body = await call("GET", "/metrics", token=AGENT_TOKEN)
            assert status == 403
            assert body["message"] == f'forbidden: User "{chart["agent"]}" cannot get path "/metrics"'

    run(scenario())


def test_kubeconfig_token_is_the_chart_agent_by_default(chart: dict[str, Any], tmp_path: Path) -> None:
    """FakeApiServer(rbac=Rbac.from_chart()) maps write_kubeconfig's token to the chart's agent."""

    async def scenario() -> None:
        rbac = Rbac.from_chart()
        assert rbac.agent == chart["agent"]
        api = FakeApiServer(rbac=rbac)
        _populate(api, chart["cm_ns"], chart["cm"])
        async with api:
            info = resolve_connection(kubeconfig=api.write_kubeconfig(str(tmp_path / "kubeconfig")))
            async with aiohttp.ClientSession(headers=dict(info.as_http_headers())) as http:
                async with http.get(info.server + "/api/v1/services") as resp:
                    assert resp.status == 200
                async with http.get(info.server + "/api/v1/configmaps") as resp:
                    body = await resp.json()
                    assert resp.status == 403 and f'User "{chart["agent"]}"' in body["message"]
            info = resolve_connection(kubeconfig=api.write_kubeconfig(str(tmp_path / "bad"), token="bad"))
            async with (
                aiohttp.ClientSession(headers=dict(info.as_http_headers())) as http,
                http.get(info.server + "/api/v1/services") as resp,
            ):
                assert resp.status == 401

    run(scenario())


def test_rbac_is_off_by_default_and_the_forbidden_knob_still_applies(chart: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with FakeApiServer() as api, aiohttp.ClientSession() as http:
            _populate(api, chart["cm_ns"], chart["cm"])
            async with http.get(api.url + "/api/v1/configmaps") as resp:
                assert resp.status == 200 and len((await resp.json())["items"]) == 3
        api = FakeApiServer(
            rbac=chart["rbac"], tokens={AGENT_TOKEN: chart["agent"]}, forbidden={"servicecidrs"}
        )
        async with api, aiohttp.ClientSession() as http:
            call = _Client(api, http)
            status, body = await call("GET", "/apis/networking.k8s.io/v1/servicecidrs")
            assert status == 403 and body["message"] == (
                f'servicecidrs.networking.k8s.io is forbidden: User "{chart["agent"]}" cannot list resource '
                '"servicecidrs" in API group "networking.k8s.io" at the cluster scope'
            )
            assert api.requests["FORBIDDEN servicecidrs"] == 1
            api.set_access("servicecidrs")
            assert (await call("GET", "/apis/networking.k8s.io/v1/servicecidrs"))[0] == 200

    run(scenario())
