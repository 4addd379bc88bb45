"""The Helm chart's RBAC, evaluated as kube-apiserver's RBAC authorizer does, for the API double.

`render_chart()` runs the real `helm template` on charts/kproxy (cached per values); `Rbac` holds the
ClusterRoles, Roles and their bindings of those documents and answers `allows(user, verb, group,
resource, namespace, name)` with Kubernetes' semantics:

- a request is allowed when any rule bound to the user matches it (RBAC has no deny rules);
- ClusterRoleBindings grant their ClusterRole's rules everywhere, cluster-scoped requests included;
  RoleBindings grant their Role's (or ClusterRole's) rules only in the binding's namespace;
- apiGroups, resources and verbs match exactly or by "*"; "pods/log" rules match that subresource,
  "*/scale" any resource's scale subresource;
- a rule with resourceNames matches only requests that carry a name: get/update/patch/delete of one
  object, or list/watch with a `metadata.name=<name>` field selector (kube-apiserver takes the name
  from the selector, see `request_attributes`); a list or watch without one, or a create, never;
- subjects: User (by name), Group (by group; a service account is in system:serviceaccounts,
  system:serviceaccounts:<ns> and, as everyone authenticated, system:authenticated) and ServiceAccount
  (user `system:serviceaccount:<ns>:<name>`; a RoleBinding's subject without namespace is in the
  binding's namespace);
- non-resource URLs ("/healthz", "/metrics", "/logs/*") through ClusterRole nonResourceURLs rules.

Not modelled: aggregated ClusterRoles (aggregationRule), the bootstrap roles of a real cluster (the
API double allows discovery to every authenticated user itself, as system:discovery does), escalation
checks on writes of RBAC objects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kproxy"
RELEASE = "kproxy"
NAMESPACE = "kube-system"
# helm refuses to render without the API server's address (templates/validate.yaml); any address will do.
API_HOST = "10.0.0.10"

SA_PREFIX = "system:serviceaccount:"
AUTHENTICATED = "system:authenticated"


class HelmNotFound(RuntimeError):
    """No .venv/bin/helm, no helm beside the running interpreter, no helm on PATH."""


class RenderError(RuntimeError):
    """helm refused to render the chart; str() carries helm's stderr."""


def find_helm() -> str:
    """The helm binary: the repository's .venv/bin/helm (`make helm`), else the one beside the running
    interpreter (a checkout tested with another checkout's virtualenv, where `make helm` put it), else a
    helm on PATH."""
    local = REPO / ".venv" / "bin" / "helm"
    for candidate in (local, Path(sys.executable).parent / "helm"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("helm")
    if found is None:
        raise HelmNotFound(
            f"no helm to render {CHART}: neither {local}, nor one beside {sys.executable}, nor a helm on "
            "PATH exists; run `make helm` (mk/helm.mk; `make test` does it) to install the pinned one"
        )
    return found


def render_chart(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    with_api_host: bool = True,
) -> list[dict[str, Any]]:
    """`helm template RELEASE charts/kproxy --namespace NAMESPACE` with VALUES (on top of a placeholder
    k8sServiceHost, which the chart requires, unless not `with_api_host`), as a list of manifests; a
    RenderError carries helm's message. The one renderer of the tests (tests/chart too).

    Rendered once per (values, release, namespace) per process; every call returns a fresh deep copy,
    so callers may change what they get.
    """
    base = {"k8sServiceHost": API_HOST} if with_api_host else {}
    key = json.dumps({**base, **(values or {})}, sort_keys=True, separators=(",", ":"))
    return json.loads(_render_cached(key, release, namespace))  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=32)
def _render_cached(values_json: str, release: str, namespace: str) -> str:
    values = json.loads(values_json)
    helm = find_helm()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="kproxy-values-", delete=False) as f:
        yaml.safe_dump(values, f)
    try:
        done = subprocess.run(
            [helm, "template", release, str(CHART), "--namespace", namespace, "-f", f.name],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RenderError(f"helm template {release} {CHART} failed: {done.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    return json.dumps(docs)  # immutable in the cache; decoded anew for each caller


def service_account_user(namespace: str, name: str) -> str:
    """The user name a service account's token authenticates as."""
    return f"{SA_PREFIX}{namespace}:{name}"


def agent_user(docs: Iterable[Mapping[str, Any]]) -> str:
    """The user name of the chart's ServiceAccount (the one the agent's DaemonSet runs as)."""
    docs = list(docs)
    accounts = {
        (d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in _of_kind(docs, "ServiceAccount")
    }
    used = {
        d["spec"]["template"]["spec"].get("serviceAccountName", "default")
        for d in _of_kind(docs, "DaemonSet")
    }
    chosen = [(ns, name) for ns, name in accounts if not used or name in used]
    if len(chosen) != 1:
        raise ValueError(f"expected one ServiceAccount used by the agent, found {sorted(chosen)}")
    return service_account_user(*chosen[0])


def settings_configmap(docs: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """(namespace, name) of the chart's ConfigMap (the agent's settings)."""
    found = [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in _of_kind(docs, "ConfigMap")]
    if len(found) != 1:
        raise ValueError(f"expected one ConfigMap in the chart, found {found}")
    return found[0]


def _of_kind(docs: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def groups_of(user: str) -> frozenset[str]:
    """The groups kube-apiserver puts an authenticated user of this name in (service accounts: theirs)."""
    groups = {AUTHENTICATED}
    if user.startswith(SA_PREFIX):
        namespace = user[len(SA_PREFIX) :].partition(":")[0]
        groups |= {"system:serviceaccounts", f"system:serviceaccounts:{namespace}"}
    return frozenset(groups)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rbac.authorization.k8s.io/v1 PolicyRule."""

    verbs: tuple[str, ...]
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, rule: Mapping[str, Any]) -> Rule:
        return cls(
            verbs=tuple(rule.get("verbs") or ()),
            api_groups=tuple(rule.get("apiGroups") or ()),
            resources=tuple(rule.get("resources") or ()),
            resource_names=tuple(rule.get("resourceNames") or ()),
            non_resource_urls=tuple(rule.get("nonResourceURLs") or ()),
        )

    def matches(self, verb: str, group: str, resource: str, subresource: str, name: str | None) -> bool:
        """rbac/v1 RuleAllows for a resource request."""
        if not _has(self.verbs, verb) or not _has(self.api_groups, group):
            return False
        combined = f"{resource}/{subresource}" if subresource else resource
        if not any(r in ("*", combined) or (subresource and r == f"*/{subresource}") for r in self.resources):
            return False
        return not self.resource_names or (bool(name) and name in self.resource_names)

    def matches_path(self, verb: str, path: str) -> bool:
        """rbac/v1 RuleAllows for a non-resource request."""
        return _has(self.verbs, verb) and any(
            u in ("*", path) or (u.endswith("*") and path.startswith(u[:-1])) for u in self.non_resource_urls
        )


def _has(items: Iterable[str], wanted: str) -> bool:
    return any(item in ("*", wanted) for item in items)


@dataclasses.dataclass(frozen=True)
class Subject:
    kind: str  # ServiceAccount, User or Group
    name: str
    namespace: str = ""

    def applies_to(self, user: str, groups: frozenset[str], binding_namespace: str) -> bool:
        if self.kind == "User":
            return user == self.name
        if self.kind == "Group":
            return self.name in groups
        if self.kind == "ServiceAccount":
            namespace = self.namespace or binding_namespace
            return bool(namespace) and user == service_account_user(namespace, self.name)
        return False


@dataclasses.dataclass(frozen=True)
class Binding:
    """A ClusterRoleBinding (namespace None) or a RoleBinding."""

    name: str
    namespace: str | None
    role_kind: str  # Role or ClusterRole
    role_name: str
    subjects: tuple[Subject, ...]

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Binding:
        meta = obj["metadata"]
        ref = obj["roleRef"]
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", "default") if obj["kind"] == "RoleBinding" else None,
            role_kind=ref["kind"],
            role_name=ref["name"],
            subjects=tuple(
                Subject(s["kind"], s["name"], s.get("namespace", "")) for s in obj.get("subjects") or ()
            ),
        )


class Rbac:
    """The RBAC objects of a set of manifests and the decisions they give.

    agent: the user name of the chart's ServiceAccount when built with `from_chart` (None otherwise):
    the API double maps its default token to it.
    """

    def __init__(
        self,
        cluster_roles: Mapping[str, Iterable[Rule]],
        roles: Mapping[tuple[str, str], Iterable[Rule]],
        bindings: Iterable[Binding],
        *,
        agent: str | None = None,
    ) -> None:
        self.cluster_roles = {name: tuple(rules) for name, rules in cluster_roles.items()}
        self.roles = {key: tuple(rules) for key, rules in roles.items()}  # (namespace, name) -> rules
        self.bindings = tuple(bindings)
        self.agent = agent

    @classmethod
    def from_objects(cls, docs: Iterable[Mapping[str, Any]], *, agent: str | None = None) -> Rbac:
        """From manifests (other kinds are ignored). A RoleBinding or Role without a namespace is in
        "default", as `kubectl apply` would put it."""
        cluster_roles: dict[str, list[Rule]] = {}
        roles: dict[tuple[str, str], list[Rule]] = {}
        bindings: list[Binding] = []
        for doc in docs:
            kind = doc.get("kind")
            if kind not in ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"):
                continue
            if doc.get("apiVersion") != "rbac.authorization.k8s.io/v1":
                raise ValueError(f"{kind} {doc['metadata']['name']}: unsupported {doc.get('apiVersion')}")
            if kind in ("ClusterRoleBinding", "RoleBinding"):
                bindings.append(Binding.from_dict(doc))
                continue
            rules = [Rule.from_dict(r) for r in doc.get("rules") or ()]
            if kind == "ClusterRole":
                if doc.get("aggregationRule"):
                    raise ValueError(
                        f"ClusterRole {doc['metadata']['name']}: aggregationRule is not modelled"
                    )
                cluster_roles[doc["metadata"]["name"]] = rules
            else:
                roles[(doc["metadata"].get("namespace", "default"), doc["metadata"]["name"])] = rules
        return cls(cluster_roles, roles, bindings, agent=agent)

    @classmethod
    def from_chart(
        cls, values: Mapping[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
    ) -> Rbac:
        """From `render_chart(values, ...)`; `agent` is the chart's ServiceAccount."""
        docs = render_chart(values, release=release, namespace=namespace)
        return cls.from_objects(docs, agent=agent_user(docs))

    def _rules_for(self, user: str, groups: frozenset[str], namespace: str | None) -> Iterable[Rule]:
        """The rules the authorizer visits: every ClusterRoleBinding's, then (namespaced requests only)
        the RoleBindings' of the request's namespace. A binding to a missing role grants nothing."""
        for b in self.bindings:
            if b.namespace is None:
                if b.role_kind != "ClusterRole" or not any(
                    s.applies_to(user, groups, "") for s in b.subjects
                ):
                    continue
                yield from self.cluster_roles.get(b.role_name, ())
        if not namespace:
            return
        for b in self.bindings:
            if b.namespace != namespace or not any(s.applies_to(user, groups, namespace) for s in b.subjects):
                continue
            if b.role_kind == "ClusterRole":
                yield from self.cluster_roles.get(b.role_name, ())
            elif b.role_kind == "Role":
                yield from self.roles.get((namespace, b.role_name), ())

    def allows(
        self,
        user: str,
        verb: str,
        group: str,
        resource: str,
        namespace: str | None = None,
        name: str | None = None,
        *,
        subresource: str = "",
        groups: Iterable[str] | None = None,
    ) -> bool:
        """Whether USER may VERB RESOURCE (plural) of API GROUP ("" for core) in NAMESPACE (None or ""
        for a cluster-scoped or all-namespaces request), on object NAME (None: no name, e.g. a list
        without a metadata.name field selector). GROUPS default to `groups_of(user)`."""
        member_of = groups_of(user) if groups is None else frozenset(groups)
        return any(
            rule.matches(verb, group, resource, subresource, name)
            for rule in self._rules_for(user, member_of, namespace or None)
        )

    def allows_path(self, user: str, verb: str, path: str, *, groups: Iterable[str] | None = None) -> bool:
        """Whether USER may VERB (get, post, ...) the non-resource URL PATH (ClusterRoles only)."""
        member_of = groups_of(user) if groups is None else frozenset(groups)
        return any(rule.matches_path(verb, path) for rule in self._rules_for(user, member_of, None))


# ---- what kube-apiserver authorizes a request as ----

# Subresources of a namespace object (/api/v1/namespaces/NS/status), not namespaced resources.
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What the authorizer sees of a request (k8s.io/apiserver RequestInfo)."""

    verb: str
    path: str
    resource_request: bool
    group: str = ""
    version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str | None = None
    name: str | None = None


def _go_bool(text: str | None) -> bool:
    return text in ("1", "t", "T", "true", "TRUE", "True")


def _name_from_field_selector(selector: str) -> str | None:
    """The name a field selector requires exactly (`metadata.name=x` or `==x`, among other terms)."""
    for term in selector.split(","):
        field, sep, value = term.partition("=")
        if sep and not field.endswith("!") and field.strip() == "metadata.name":
            value = value[1:] if value.startswith("=") else value
            return value.strip() or None
    return None


def request_attributes(method: str, path: str, query: Mapping[str, str] | str = "") -> Attributes:
    """kube-apiserver's RequestInfoFactory: the verb, group, resource, namespace and name of a request.

    A GET without a name is list, or watch with watch=true; its name is then the one a metadata.name
    field selector requires, so that resourceNames rules can allow it. A DELETE without a name is
    deletecollection. /api/v1/watch/... (the deprecated watch prefix) is watch, and takes no name from a
    selector. Anything not under /api/VERSION/ or /apis/GROUP/VERSION/ is a non-resource request (the
    lower-case method is its verb).
    """
    if isinstance(query, str):
        query = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    parts = [p for p in path.split("/") if p]
    non_resource = Attributes(verb=method.lower(), path=path, resource_request=False)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return non_resource
    rest = parts[1:]
    group = ""
    if parts[0] == "apis":
        if len(rest) < 3:
            return non_resource
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    if rest[0] in ("watch", "proxy") and len(rest) >= 2:
        verb, rest = rest[0], rest[1:]
    else:
        verb = _VERBS.get(method.upper(), "")
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) >= 3 and verb not in ("proxy",) else ""
    if name is None and verb == "get":
        verb = "watch" if _go_bool(query.get("watch")) else "list"
        name = _name_from_field_selector(query.get("fieldSelector", ""))
    if name is None and verb == "delete":
        verb = "deletecollection"
    return Attributes(
        verb=verb,
        path=path,
        resource_request=True,
        group=group,
        version=version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
    )


def forbidden_message(user: str, attrs: Attributes) -> str:
    """kube-apiserver's 403 message (apiserver's forbiddenMessage wrapped by apierrors.NewForbidden)."""
    if not attrs.resource_request:
        return f'forbidden: User "{user}" cannot {attrs.verb} path "{attrs.path}"'
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    why = f'User "{user}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.group}" {scope}'
    what = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
    return f'{what} "{attrs.name}" is forbidden: {why}' if attrs.name else f"{what} is forbidden: {why}"
