"""A watch-capable Kubernetes API server double for controller tests and benchmarks.

No kube-apiserver ships in the registries this project can use, so controller tests talk to this
aiohttp server instead. It implements the part of the API that kopf and kproxy's own lister use:

- discovery: /version, /api, /api/v1, /apis, /apis/{group}/{version};
- list with a resourceVersion and pagination (limit/continue, consistent snapshots);
- streaming watch (watch=true&resourceVersion=R&allowWatchBookmarks=true) with ADDED, MODIFIED,
  DELETED and periodic BOOKMARK events; an expired resourceVersion gets an ERROR event with
  code 410 (as the real server does) or, when configured, an HTTP 410;
- create/replace/merge-patch/delete over HTTP (kubectl-like writes for tests in other processes);
- fault injection: drop every open connection, go down (refuse connections) for a while, expire
  the event history (the next watch from an old version gets 410), inject a non-410 ERROR event;
- access: a resource can be left unserved (absent from discovery, 404, as networking.k8s.io/v1
  servicecidrs before Kubernetes 1.33) or forbidden (in discovery, but 403 to every request, as when
  RBAC does not grant it), at construction or at run time (`set_access`);
- authentication and RBAC, when given an `Rbac` (tests/controller/rbac.py, e.g. the Helm chart's):
  bearer tokens map to users (401 otherwise), discovery is open to every authenticated user (as
  system:discovery grants) and every other request is authorized as kube-apiserver does it, with its
  403 Status and message when RBAC does not allow it. Off by default: then every request is served.

Objects are served from pre-encoded JSON so 10,000+ objects list in milliseconds. Test code in the
server's event loop changes objects directly (`put`, `delete`, ...); other processes use HTTP or run
this module: `python -m tests.controller.apiserver --port 0 --services 10000 --endpoints 10`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.controller.rbac import Attributes, Rbac, Rule, forbidden_message, request_attributes

log = logging.getLogger("kproxy.tests.apiserver")


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    @property
    def prefix(self) -> str:
        return f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "services", "Service", True, ("svc",)),
    ResourceType("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    ResourceType("", "v1", "nodes", "Node", False, ("no",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    ResourceType("", "v1", "namespaces", "Namespace", False, ("ns",)),
    ResourceType("", "v1", "events", "Event", True, ("ev",)),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    ResourceType("networking.k8s.io", "v1", "servicecidrs", "ServiceCIDR", False),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",)),
)
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}

Key = tuple[str, str]  # (namespace or "", name)

DEFAULT_TOKEN = "test-token"  # write_kubeconfig's token; with RBAC and no `tokens`, the chart's agent
# What the built-in system:discovery and system:public-info-viewer ClusterRoles give every authenticated user.
DISCOVERY = Rule(
    verbs=("get",),
    non_resource_urls=(
        "/api",
        "/api/*",
        "/apis",
        "/apis/*",
        "/healthz",
        "/livez",
        "/readyz",
        "/openapi",
        "/openapi/*",
        "/version",
        "/version/",
    ),
)
# The user the `forbidden` knob's 403 names when no token says who asks (the chart's agent).
AGENT_USER = "system:serviceaccount:kube-system:kproxy"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _error(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status(code, reason, message), status=code)


@dataclasses.dataclass
class _Stored:
    obj: dict[str, Any]
    raw: bytes  # the object encoded once; lists and events are built from these bytes


@dataclasses.dataclass
class _Event:
    rv: int
    rtype: ResourceType
    etype: str
    key: Key
    raw: bytes


class _Watch:
    def __init__(self, rtype: ResourceType, namespace: str | None, fields: dict[str, str]) -> None:
        self.rtype = rtype
        self.namespace = namespace
        self.fields = fields
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def matches(self, key: Key) -> bool:
        if self.namespace is not None and key[0] != self.namespace:
            return False
        if "metadata.name" in self.fields and key[1] != self.fields["metadata.name"]:
            return False
        return not ("metadata.namespace" in self.fields and key[0] != self.fields["metadata.namespace"])


def _parse_fields(selector: str | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in (selector or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or name.endswith("!"):
            raise ValueError(f"unsupported field selector {part!r}: only field=value is served")
        fields[name.strip()] = value.lstrip("=").strip()
    return fields


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic-merge patches of plain maps)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


def _free_port_outside_ephemeral(host: str) -> int:
    """A free port below the kernel's ephemeral range, so that going down and up again re-binds the same
    one: while the server is down, no connect() elsewhere on the machine can be handed it as its local
    port (which a port from bind(0) could be, failing the re-bind)."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, lo))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000-{lo} on {host}")


class FakeApiServer:
    """The API double. Start it with `await start()`; its URL is in `.url`.

    history: how many events are kept for watches resuming from an old resourceVersion; a watch
    from a version older than the oldest kept event gets 410 Gone.
    bookmark_interval: seconds between BOOKMARK events on open watches (allowWatchBookmarks).
    gone_as_http: answer an expired resourceVersion with HTTP 410 instead of an ERROR event.
    unserved: plurals the server does not serve: left out of discovery, 404 to every request.
    forbidden: plurals in discovery that every request is refused with 403 (RBAC does not grant them).
    Objects of unserved or forbidden resources can still be put and deleted from test code.
    rbac: authenticate and authorize every request as kube-apiserver does (None: serve everybody).
        A request without a known bearer token gets 401; discovery (/version, /api, /apis...) is open
        to every authenticated user; every other request is checked with `rbac.allows` for the
        token's user and gets kube-apiserver's 403 Status when not allowed. The `forbidden` knob still
        applies on top. RBAC's denials are counted in `requests` ("FORBIDDEN list configmaps"; the
        knob's keep their "FORBIDDEN servicecidrs"); both kinds are kept, with their user, in `denied`.
    tokens: bearer token -> user name, e.g. {"agent-token": "system:serviceaccount:kube-system:kproxy"}.
        Default with rbac: DEFAULT_TOKEN (write_kubeconfig's) is `rbac.agent`, the chart's agent.
    """

    def __init__(
        self,
        *,
        history: int = 10_000,
        bookmark_interval: float = 1.0,
        gone_as_http: bool = False,
        host: str = "127.0.0.1",
        unserved: Iterable[str] = (),
        forbidden: Iterable[str] = (),
        rbac: Rbac | None = None,
        tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.unserved: set[str] = set(unserved)
        self.forbidden: set[str] = set(forbidden)
        self.rbac = rbac
        if tokens is None:
            tokens = {DEFAULT_TOKEN: rbac.agent} if rbac is not None and rbac.agent else {}
        self.tokens: dict[str, str] = dict(tokens)
        self.denied: list[tuple[str, Attributes]] = []  # (user, request) of every 403, in order
        self.host = host
        self.port = 0
        self.history_limit = history
        self.bookmark_interval = bookmark_interval
        self.gone_as_http = gone_as_http
        self._rv = itertools.count(1000)
        self.resource_version = next(self._rv)
        self._store: dict[ResourceType, dict[Key, _Stored]] = {r: {} for r in RESOURCES}
        self._history: collections.deque[_Event] = collections.deque()
        self._oldest_valid_rv = self.resource_version  # watches from below this get 410
        self._watches: set[_Watch] = set()
        self._snapshots: collections.OrderedDict[str, tuple[int, list[bytes]]] = collections.OrderedDict()
        self._down = False
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._bookmarker: asyncio.Task[None] | None = None
        # "LIST services", "WATCH nodes"; "FORBIDDEN list configmaps" (403), "UNAUTHORIZED" (401)
        self.requests: collections.Counter[str] = collections.Counter()

    # ---- lifecycle ----
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, port: int = 0, sock: socket.socket | None = None) -> str:
        """Serve on host:port, or on SOCK, a listening socket made elsewhere (e.g. inside a network
        namespace: it stays there). A socket cannot be re-bound: go_down()/come_up() need host:port."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]
            self._site = web.SockSite(self._runner, sock)
            await self._site.start()
            self._bookmarker = asyncio.create_task(self._bookmarks(), name="apiserver bookmarks")
            return self.url
        if port == 0:
            port = _free_port_outside_ephemeral(self.host)
        self.port = port
        await self._listen()
        self._bookmarker = asyncio.create_task(self._bookmarks(), name="apiserver bookmarks")
        return self.url

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def stop(self) -> None:
        if self._bookmarker is not None:
            self._bookmarker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bookmarker
        self.drop_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def write_kubeconfig(self, path: str, *, token: str = DEFAULT_TOKEN) -> str:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester"}}],
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)  # JSON is YAML
        return path

    # ---- fault injection ----
    def drop_connections(self) -> None:
        """End every open watch stream (clients see the connection close and reconnect)."""
        for watch in list(self._watches):
            watch.queue.put_nowait(None)

    async def go_down(self) -> None:
        """Refuse new connections and abort requests on kept-alive ones until `come_up()`."""
        self._down = True
        self.drop_connections()
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def come_up(self) -> None:
        self._down = False
        if self._site is None:
            await self._listen()

    async def outage(self, seconds: float) -> None:
        await self.go_down()
        try:
            await asyncio.sleep(seconds)
        finally:
            await self.come_up()

    def expire_history(self) -> None:
        """Forget all past events: every watch resuming from an older version gets 410 Gone.

        Open watches are ended so that clients must resume, as after an etcd compaction.
        """
        self._history.clear()
        self._oldest_valid_rv = self.resource_version
        self.drop_connections()

    def inject_error(self, code: int = 500, message: str = "injected internal error") -> None:
        """Send an ERROR event (not 410) on every open watch, then end it."""
        line = json.dumps({"type": "ERROR", "object": _status(code, "InternalError", message)}).encode()
        for watch in list(self._watches):
            watch.queue.put_nowait(line + b"\n")
            watch.queue.put_nowait(None)

    def set_access(self, plural: str, *, served: bool = True, allowed: bool = True) -> None:
        """Serve PLURAL or not (404, absent from discovery), allow it or not (403); open watches of a
        resource that stops being served or allowed end (clients see it when they reconnect)."""
        assert any(r.plural == plural for r in RESOURCES), plural
        for names, on in ((self.unserved, not served), (self.forbidden, not allowed)):
            if on:
                names.add(plural)
            else:
                names.discard(plural)
        if not served or not allowed:
            for watch in list(self._watches):
                if watch.rtype.plural == plural:
                    watch.queue.put_nowait(None)

    def watch_count(self, plural: str | None = None) -> int:
        return sum(1 for w in self._watches if plural is None or w.rtype.plural == plural)

    # ---- object operations (call from the server's event loop) ----
    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        stored = self._store[BY_KIND[kind]].get((namespace or "", name))
        return None if stored is None else copy.deepcopy(stored.obj)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [s.obj for s in self._store[BY_KIND[kind]].values()]

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (by kind, namespace, name); returns the stored object."""
        rtype = BY_KIND[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "") if rtype.namespaced else "", meta["name"])
        if rtype.namespaced and not key[0]:
            meta["namespace"] = key = ("default", key[1])
        old = self._store[rtype].get(key)
        obj["apiVersion"] = rtype.api_version
        meta["uid"] = old.obj["metadata"]["uid"] if old else meta.get("uid") or str(uuid.uuid4())
        meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
        self.resource_version = next(self._rv)
        meta["resourceVersion"] = str(self.resource_version)
        meta.setdefault("generation", 1)
        raw = json.dumps(obj, separators=(",", ":")).encode()
        self._store[rtype][key] = _Stored(obj, raw)
        self._emit(rtype, "MODIFIED" if old else "ADDED", key, raw)
        return obj

    def put_many(self, objs: Iterable[dict[str, Any]]) -> None:
        for obj in objs:
            self.put(obj)

    def patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        rtype = BY_KIND[kind]
        stored = self._store[rtype].get((namespace or "" if rtype.namespaced else "", name))
        if stored is None:
            raise KeyError(f"{kind} {namespace}/{name} not found")
        merged = _merge_patch(copy.deepcopy(stored.obj), patch)
        merged["kind"] = kind
        merged.setdefault("metadata", {})["name"] = name
        if rtype.namespaced:
            merged["metadata"]["namespace"] = namespace
        return self.put(merged)

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        rtype = BY_KIND[kind]
        key = (namespace or "" if rtype.namespaced else "", name)
        stored = self._store[rtype].pop(key, None)
        if stored is None:
            return False
        self.resource_version = next(self._rv)
        obj = copy.deepcopy(stored.obj)
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        raw = json.dumps(obj, separators=(",", ":")).encode()
        self._emit(rtype, "DELETED", key, raw)
        return True

    def delete_silently(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete without recording a watch event, as when the deletion fell into a compacted gap.

        Open watches end and resuming from any older version gets 410 Gone: clients only learn
        about the deletion by listing again.
        """
        rtype = BY_KIND[kind]
        key = (namespace or "" if rtype.namespaced else "", name)
        self.resource_version = next(self._rv)
        # The history no longer covers this version: watches from before it must get 410 Gone.
        self._oldest_valid_rv = self.resource_version
        self.drop_connections()
        return self._store[rtype].pop(key, None) is not None

    def _emit(self, rtype: ResourceType, etype: str, key: Key, raw: bytes) -> None:
        event = _Event(self.resource_version, rtype, etype, key, raw)
        self._history.append(event)
        while len(self._history) > self.history_limit:
            dropped = self._history.popleft()
            self._oldest_valid_rv = dropped.rv
        line = b'{"type":"' + etype.encode() + b'","object":' + raw + b"}\n"
        for watch in self._watches:
            if watch.rtype is rtype and watch.matches(key):
                watch.queue.put_nowait(line)

    # ---- HTTP ----
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._down:
            # A kept-alive connection must not keep working while the server is "down".
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()
        response: web.StreamResponse = await handler(request)
        return response

    def _user(self, request: web.Request) -> str | None:
        """The user of the request's bearer token, None when it has none or an unknown one."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.tokens.get(token.strip())

    def _authorize(self, request: web.Request) -> web.Response | None:
        """With RBAC: 401 for an unknown user, 403 for a request RBAC does not allow, None to serve it."""
        assert self.rbac is not None
        user = self._user(request)
        if user is None:
            self.requests["UNAUTHORIZED"] += 1
            return _error(401, "Unauthorized", "Unauthorized")
        attrs = request_attributes(request.method, request.path, request.query)
        if attrs.resource_request:
            allowed = self.rbac.allows(
                user,
                attrs.verb,
                attrs.group,
                attrs.resource,
                attrs.namespace,
                attrs.name,
                subresource=attrs.subresource,
            )
            what = f"{attrs.verb} {attrs.resource}"
        else:
            allowed = DISCOVERY.matches_path(attrs.verb, attrs.path) or self.rbac.allows_path(
                user, attrs.verb, attrs.path
            )
            what = f"{attrs.verb} {attrs.path}"
        if allowed:
            return None
        self.requests[f"FORBIDDEN {what}"] += 1
        return self._forbidden(user, attrs)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.rbac is not None:
            refused = self._authorize(request)
            if refused is not None:
                return refused
        parts = [p for p in request.path.split("/") if p]
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-double"})
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            return web.json_response(self._groups())
        if len(parts) == 2 and parts[0] == "api":
            return web.json_response(self._resource_list("", parts[1]))
        if len(parts) == 3 and parts[0] == "apis":
            listing = self._resource_list(parts[1], parts[2])
            if not listing["resources"]:
                return _error(
                    404, "NotFound", f"the server could not find the requested resource {request.path}"
                )
            return web.json_response(listing)
        if parts and parts[0] == "api":
            group, version, rest = "", parts[1] if len(parts) > 1 else "", parts[2:]
        elif parts and parts[0] == "apis" and len(parts) > 2:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return _error(404, "NotFound", f"the server could not find {request.path}")
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in BY_PATH:
            namespace, rest = rest[1], rest[2:]
        rtype = BY_PATH.get((group, version, rest[0] if rest else ""))
        if rtype is None or len(rest) > 2 or rtype.plural in self.unserved:
            return _error(404, "NotFound", f"the server could not find the requested resource {request.path}")
        if rtype.plural in self.forbidden:
            self.requests[f"FORBIDDEN {rtype.plural}"] += 1
            user = (self._user(request) if self.rbac is not None else None) or AGENT_USER
            return self._forbidden(user, request_attributes(request.method, request.path, request.query))
        name = rest[1] if len(rest) == 2 else None
        if name is None:
            if request.method == "GET":
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, rtype, namespace)
                return self._list(request, rtype, namespace)
            if request.method == "POST":
                return await self._write(request, rtype, namespace, None)
            return _error(405, "MethodNotAllowed", f"{request.method} on a collection")
        if request.method == "GET":
            stored = self._store[rtype].get((namespace or "", name))
            if stored is None:
                return _error(404, "NotFound", f'{rtype.plural} "{name}" not found')
            return web.Response(body=stored.raw, content_type="application/json")
        if request.method == "DELETE":
            if not self.delete(rtype.kind, namespace, name):
                return _error(404, "NotFound", f'{rtype.plural} "{name}" not found')
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return await self._write(request, rtype, namespace, name)

    def _forbidden(self, user: str, attrs: Attributes) -> web.Response:
        """kube-apiserver's answer when RBAC does not grant the request: a Forbidden Status naming the
        user, verb, resource, API group and scope (and the object's name, when the request has one).
        Kept in `denied`; the caller counts it in `requests`."""
        self.denied.append((user, attrs))
        status = _status(403, "Forbidden", forbidden_message(user, attrs))
        if attrs.resource_request:
            details: dict[str, Any] = {"group": attrs.group, "kind": attrs.resource}
            if attrs.name:
                details["name"] = attrs.name
            status["details"] = details
        return web.json_response(status, status=403)

    def _groups(self) -> dict[str, Any]:
        groups: dict[str, list[str]] = {}
        for r in RESOURCES:
            if r.plural in self.unserved:
                continue
            if r.group and r.version not in groups.setdefault(r.group, []):
                groups[r.group].append(r.version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in versions],
                    "preferredVersion": {"groupVersion": f"{g}/{versions[0]}", "version": versions[0]},
                }
                for g, versions in groups.items()
            ],
        }

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for r in RESOURCES:
            if r.group != group or r.version != version or r.plural in self.unserved:
                continue
            resources.append(
                {
                    "name": r.plural,
                    "singularName": r.kind.lower(),
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    "shortNames": list(r.short_names),
                }
            )
        gv = version if not group else f"{group}/{version}"
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}

    def _select(self, rtype: ResourceType, namespace: str | None, fields: dict[str, str]) -> list[bytes]:
        probe = _Watch(rtype, namespace, fields)
        return [s.raw for key, s in self._store[rtype].items() if probe.matches(key)]

    def _list(self, request: web.Request, rtype: ResourceType, namespace: str | None) -> web.Response:
        self.requests[f"LIST {rtype.plural}"] += 1
        try:
            fields = _parse_fields(request.query.get("fieldSelector"))
            limit = int(request.query.get("limit", "0") or 0)
        except ValueError as e:
            return _error(400, "BadRequest", str(e))
        token = request.query.get("continue", "")
        if token:
            snap_id, _, offset_text = token.partition(":")
            snapshot = self._snapshots.get(snap_id)
            if snapshot is None:
                return _error(410, "Expired", "the provided continue parameter is too old")
            rv, items = snapshot
            offset = int(offset_text)
        else:
            rv, items, offset, snap_id = self.resource_version, self._select(rtype, namespace, fields), 0, ""
        end = len(items) if limit <= 0 else min(len(items), offset + limit)
        next_token = ""
        if end < len(items):
            if not snap_id:
                snap_id = uuid.uuid4().hex
                self._snapshots[snap_id] = (rv, items)
                while len(self._snapshots) > 64:
                    self._snapshots.popitem(last=False)
            next_token = f"{snap_id}:{end}"
        elif snap_id:
            self._snapshots.pop(snap_id, None)
        meta = {"resourceVersion": str(rv)}
        if next_token:
            meta["continue"] = next_token
            meta["remainingItemCount"] = len(items) - end  # type: ignore[assignment]
        head = json.dumps({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": meta})
        body = head[:-1].encode() + b',"items":[' + b",".join(items[offset:end]) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def _watch(
        self, request: web.Request, rtype: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        self.requests[f"WATCH {rtype.plural}"] += 1
        try:
            fields = _parse_fields(request.query.get("fieldSelector"))
        except ValueError as e:
            return _error(400, "BadRequest", str(e))
        since_text = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(request.query.get("timeoutSeconds", "0") or 0)
        watch = _Watch(rtype, namespace, fields)
        initial: list[bytes] = []
        if since_text in ("", "0"):
            initial = [
                b'{"type":"ADDED","object":' + raw + b"}\n" for raw in self._select(rtype, namespace, fields)
            ]
        else:
            since = int(since_text)
            if since < self._oldest_valid_rv:
                self.requests[f"GONE {rtype.plural}"] += 1
                gone = _status(410, "Expired", f"too old resource version: {since} ({self._oldest_valid_rv})")
                if self.gone_as_http:
                    return web.json_response(gone, status=410)
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                await response.prepare(request)
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                await response.write_eof()
                return response
            for event in self._history:
                if event.rv > since and event.rtype is rtype and watch.matches(event.key):
                    initial.append(b'{"type":"' + event.etype.encode() + b'","object":' + event.raw + b"}\n")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self._watches.add(watch)
        watch.bookmarks = bookmarks  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            if initial:
                await response.write(b"".join(initial))
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    line = await asyncio.wait_for(watch.queue.get(), wait)
                except TimeoutError:
                    break
                if line is None:
                    break
                batch = [line]
                while not watch.queue.empty():
                    nxt = watch.queue.get_nowait()
                    if nxt is None:
                        await response.write(b"".join(batch))
                        return response
                    batch.append(nxt)
                await response.write(b"".join(batch))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.discard(watch)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _bookmarks(self) -> None:
        while True:
            await asyncio.sleep(self.bookmark_interval)
            for watch in list(self._watches):
                if getattr(watch, "bookmarks", False):
                    mark = {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": watch.rtype.kind,
                            "apiVersion": watch.rtype.api_version,
                            "metadata": {"resourceVersion": str(self.resource_version)},
                        },
                    }
                    watch.queue.put_nowait(json.dumps(mark).encode() + b"\n")

    async def _write(
        self, request: web.Request, rtype: ResourceType, namespace: str | None, name: str | None
    ) -> web.Response:
        self.requests[f"{request.method} {rtype.plural}"] += 1
        try:
            body = await request.json()
        except ValueError as e:
            return _error(400, "BadRequest", f"body is not JSON: {e}")
        if request.method == "PATCH":
            assert name is not None
            try:
                obj = self.patch(rtype.kind, namespace, name, body)
            except KeyError as e:
                return _error(404, "NotFound", str(e))
            return web.Response(body=json.dumps(obj), content_type="application/json")
        if not isinstance(body, dict):
            return _error(400, "BadRequest", "body must be an object")
        body["kind"] = rtype.kind
        meta = body.setdefault("metadata", {})
        if name is not None:
            meta["name"] = name
        if "name" not in meta:
            return _error(422, "Invalid", "metadata.name is required")
        if rtype.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        exists = self._store[rtype].get((meta.get("namespace", ""), meta["name"])) is not None
        if request.method == "POST" and exists:
            return _error(409, "AlreadyExists", f'{rtype.plural} "{meta["name"]}" already exists')
        obj = self.put(body)
        return web.Response(
            body=json.dumps(obj), content_type="application/json", status=201 if not exists else 200
        )


# ---- object builders shared by tests and benchmarks ----
def service(
    name: str,
    cluster_ip: str,
    ports: list[dict[str, Any]] | None = None,
    *,
    namespace: str = "default",
    svc_type: str = "ClusterIP",
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": svc_type,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": ports
            if ports is not None
            else [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            **spec,
        },
    }
    return body


def endpoint_slice(
    service_name: str,
    addresses: list[str],
    *,
    namespace: str = "default",
    name: str | None = None,
    ports: list[dict[str, Any]] | None = None,
    node: str | None = "node-a",
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name or f"{service_name}-abc",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [addr],
                "conditions": {
                    "ready": ready,
                    "serving": ready if serving is None else serving,
                    "terminating": terminating,
                },
                **({"nodeName": node} if node else {}),
            }
            for addr in addresses
        ],
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str, address: str, *, zone: str | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]
        },
    }


def service_cidr(name: str, *cidrs: str) -> dict[str, Any]:
    """A ServiceCIDR (networking.k8s.io/v1): one CIDR per IP family, like the "kubernetes" one the API
    server creates from --service-cluster-ip-range."""
    return {
        "kind": "ServiceCIDR",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def populate(server: FakeApiServer, services: int, endpoints: int, *, first_octets: str = "10.96") -> None:
    """Fill the server with `services` ClusterIP Services, each with one slice of `endpoints`."""
    for i in range(services):
        server.put(service(f"svc-{i}", f"{first_octets}.{i // 250}.{i % 250 + 1}"))
        addresses = [pod_ip(i * endpoints + j) for j in range(endpoints)]
        server.put(endpoint_slice(f"svc-{i}", addresses))


def pod_ip(n: int) -> str:
    """The n-th pod address of a generated cluster (10.128.0.0/9)."""
    return f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"


async def _main() -> None:
    parser = argparse.ArgumentParser(description="Run the Kubernetes API double.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--services", type=int, default=0)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--node", default="node-a")
    parser.add_argument("--node-ip", default="192.168.0.10")
    parser.add_argument("--kubeconfig", help="write a kubeconfig pointing at the double to this path")
    parser.add_argument(
        "--rbac",
        action="store_true",
        help=f"enforce the Helm chart's RBAC; token {DEFAULT_TOKEN} (the kubeconfig's) is the chart's agent",
    )
    args = parser.parse_args()
    server = FakeApiServer(rbac=Rbac.from_chart() if args.rbac else None)
    server.put(node(args.node, args.node_ip))
    populate(server, args.services, args.endpoints)
    await server.start(args.port)
    if args.kubeconfig:
        server.write_kubeconfig(args.kubeconfig)
    print(server.url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
