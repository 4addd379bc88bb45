"""How the Kubernetes source reaches the API server: kubeconfig, in-cluster service account, or an
explicit server, as a kopf.ConnectionInfo; and an HTTP session with those credentials."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
import yaml

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class CredentialsError(RuntimeError):
    pass


def resolve_connection(
    kubeconfig: str | None = None,
    api_server: str | None = None,
    env: Mapping[str, str] | None = None,
    sa_dir: str = SA_DIR,
) -> kopf.ConnectionInfo:
    """Find how to reach the API server, in the order a node agent without kube-proxy needs.

    1. --kubeconfig FILE (its server replaced by --k8s-api-server when both are given);
    2. --k8s-api-server URL, with the service account's token and CA when running in a pod;
    3. KUBECONFIG;
    4. in-cluster: KUBERNETES_SERVICE_HOST/_PORT and the service account. A kube-proxy replacement
       cannot use the `kubernetes` ClusterIP kubelet puts there by default, so the DaemonSet sets
       them to the real API server address;
    5. ~/.kube/config.
    """
    env = os.environ if env is None else env
    if kubeconfig:
        return _override_server(_from_kubeconfig(kubeconfig), api_server)
    if api_server:
        return _in_cluster(_normalize_server(api_server), sa_dir, required=False)
    if env.get("KUBECONFIG"):
        return _from_kubeconfig(env["KUBECONFIG"])
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if host and os.path.exists(os.path.join(sa_dir, "token")):
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        return _in_cluster(f"https://{host}:{port or '443'}", sa_dir, required=True)
    home_config = os.path.expanduser("~/.kube/config")
    if os.path.exists(home_config):
        return _from_kubeconfig(home_config)
    raise CredentialsError(
        "no Kubernetes credentials: pass --kubeconfig FILE or --k8s-api-server URL, set KUBECONFIG, "
        "or run in a pod with a service account and KUBERNETES_SERVICE_HOST/_PORT naming the API server"
    )


def _normalize_server(server: str) -> str:
    return server if "://" in server else f"https://{server}"


def _override_server(info: kopf.ConnectionInfo, api_server: str | None) -> kopf.ConnectionInfo:
    return info if not api_server else dataclasses.replace(info, server=_normalize_server(api_server))


def _in_cluster(server: str, sa_dir: str, required: bool) -> kopf.ConnectionInfo:
    token_path, ca_path = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    token = None
    if os.path.exists(token_path):
        with open(token_path, encoding="utf-8") as f:
            token = f.read().strip() or None
    elif required:
        raise CredentialsError(f"service account token {token_path} is missing")
    namespace = None
    ns_path = os.path.join(sa_dir, "namespace")
    if os.path.exists(ns_path):
        with open(ns_path, encoding="utf-8") as f:
            namespace = f.read().strip() or None
    return kopf.ConnectionInfo(
        server=server,
        ca_path=ca_path if os.path.exists(ca_path) else None,
        token=token,
        default_namespace=namespace,
    )


def _read_kubeconfigs(
    paths: str,
) -> tuple[str | None, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The current context, contexts, clusters and users of the kubeconfig files PATHS (separated as
    in KUBECONFIG), merged (the first file to name something wins), the file paths in them made
    absolute."""
    contexts: dict[str, Any] = {}
    clusters: dict[str, Any] = {}
    users: dict[str, Any] = {}
    current: str | None = None
    for path in [os.path.expanduser(p.strip()) for p in paths.split(os.pathsep) if p.strip()]:
        try:
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CredentialsError(f"cannot read kubeconfig {path}: {e}") from e
        base = os.path.dirname(os.path.abspath(path))
        current = current or config.get("current-context")
        for item in config.get("contexts") or []:
            contexts.setdefault(item["name"], item.get("context") or {})
        for item in config.get("clusters") or []:
            cluster = dict(item.get("cluster") or {})
            if cluster.get("certificate-authority"):
                cluster["certificate-authority"] = os.path.join(base, cluster["certificate-authority"])
            clusters.setdefault(item["name"], cluster)
        for item in config.get("users") or []:
            user = dict(item.get("user") or {})
            for key in ("client-certificate", "client-key", "tokenFile"):
                if user.get(key):
                    user[key] = os.path.join(base, user[key])
            users.setdefault(item["name"], user)
    return current, contexts, clusters, users


def _from_kubeconfig(paths: str) -> kopf.ConnectionInfo:
    current, contexts, clusters, users = _read_kubeconfigs(paths)
    if not current or current not in contexts:
        raise CredentialsError(f"kubeconfig {paths}: current-context {current!r} is not defined")
    context = contexts[current]
    cluster = clusters.get(context.get("cluster"), {})
    user = users.get(context.get("user"), {})
    if not cluster.get("server"):
        raise CredentialsError(f"kubeconfig {paths}: cluster {context.get('cluster')!r} has no server")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        with open(user["tokenFile"], encoding="utf-8") as f:
            token = f.read().strip()
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=cluster.get("certificate-authority"),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=cluster.get("insecure-skip-tls-verify"),
        certificate_path=user.get("client-certificate"),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=user.get("client-key"),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        token=token,
        default_namespace=context.get("namespace"),
    )


def http_session(info: kopf.ConnectionInfo, user_agent: str = "kproxy") -> aiohttp.ClientSession:
    """An aiohttp session with INFO's credentials (the source's calls, and the CLI's: `kproxy dsr`)."""
    headers = dict(info.as_http_headers())
    if info.username and info.password and "Authorization" not in headers:
        raw = f"{info.username}:{info.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    headers["User-Agent"] = user_agent
    ssl_context = info.as_ssl_context() if info.server.startswith("https") else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context or False), headers=headers)
