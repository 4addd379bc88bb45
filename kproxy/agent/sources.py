"""The agent's source of Services: files (--source file:DIR) or Kubernetes (--source kubernetes).

kproxy.sources.kube is imported only when the agent starts its Kubernetes source (Sources.kube_source):
kopf costs the file source (the lab, the benchmarks) ~0.25 s at start for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from kproxy.config import AgentConfig
from kproxy.sources.files import FileSource
from kproxy.sources.nodes import follow_local_node
from kproxy.store import ClusterStore

from .errors import AgentError
from .serve import Servers

if TYPE_CHECKING:
    import kopf

    from kproxy.sources.kube import KubeSource, WatchStatus

log = logging.getLogger("kproxy.agent")


class Sources:
    """The source the agent runs (made by run), and what the agent asks of it on exit."""

    def __init__(
        self,
        cfg: AgentConfig,
        servers: Servers,
        *,
        on_settings: Callable[[dict[str, str]], None],
        synced: asyncio.Event,
        connection: kopf.ConnectionInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.servers = servers
        self.on_settings = on_settings  # the agent ConfigMap's keys (the Kubernetes source)
        self.synced = synced  # the sync loop's first full apply is done
        self.connection = connection  # explicit Kubernetes credentials (tests)
        self.source: KubeSource | FileSource | None = None

    async def run(self, store: ClusterStore) -> None:
        source_dir = self.cfg.source_dir
        if source_dir is not None:
            await self.file_source(source_dir, store).run()
            return
        await self.kube_source(store).run()

    def file_source(self, source_dir: str, store: ClusterStore) -> FileSource:
        health = self.servers.health
        # The file source also reads Node manifests into the store's node table; this node's manifest,
        # if there is one, decides /healthz's nodeEligible (deletionTimestamp, autoscaler taint).
        if health is not None:
            follow_local_node(store, self.cfg.node_name, health.set_node_eligible)
        self.source = FileSource(source_dir, store)
        return self.source

    def kube_source(self, store: ClusterStore) -> KubeSource:
        try:  # deferred: kopf, only for --source kubernetes (see the module docstring)
            from kproxy.sources.kube import KubeSource, KubeSourceConfig
        except ImportError as e:
            raise AgentError(
                f"--source kubernetes is not available: {e}; install kproxy with its Kubernetes "
                "dependencies (kopf, aiohttp) or use --source file:DIR"
            ) from e
        kcfg = KubeSourceConfig(
            node_name=self.cfg.node_name,
            kubeconfig=self.cfg.kubeconfig,
            api_server=self.cfg.k8s_api_server,
            settings_configmap=self.cfg.settings_configmap,
            daemonset=self.cfg.daemonset,
        )
        health = self.servers.health
        if health is not None:
            health.set_node_eligible(False)  # as kube-proxy: not eligible until its Node is seen
        self.source = KubeSource(
            store,
            kcfg,
            on_settings=self.on_settings,
            on_node_eligible=health.set_node_eligible if health is not None else None,
            on_watch_status=self.watch_status_changed,
            metrics=self.servers.metrics,
            connection=self.connection,
            # kopf's own listing waits for our first full sync: the two peaks of memory never meet.
            kopf_gate=self.synced,
        )
        return self.source

    def compact(self) -> int:
        """Shrink the source's tables that deletions left oversized (the Kubernetes source's)."""
        source = self.source
        return source.compact() if source is not None and not isinstance(source, FileSource) else 0

    def watch_status_changed(self, _status: WatchStatus) -> None:
        """A watch went up or down: /readyz fails while one the Service view needs is down."""
        health = self.servers.health
        if health is not None and self.source is not None and not isinstance(self.source, FileSource):
            health.set_stale_watches(self.source.stale_watches())

    async def uninstalling(self) -> bool:
        """On SIGTERM: is this install being removed (--daemonset gone or being deleted)? Then the
        dataplane goes with the agent, unless --keep-dataplane-on-uninstall. Anything unclear (no
        --daemonset, the API server not answering) keeps it: a frozen dataplane is better than none."""
        ref = self.cfg.daemonset
        if not ref or self.source is None or not hasattr(self.source, "daemonset_gone"):
            return False
        gone = await self.source.daemonset_gone(ref)
        if gone is None:
            log.warning("cannot tell whether DaemonSet %s is being removed: the dataplane stays", ref)
            return False
        if not gone:
            log.info(
                "DaemonSet %s is still there (a restart or an upgrade): the dataplane keeps serving", ref
            )
            return False
        if self.cfg.keep_dataplane_on_uninstall:
            log.warning(
                "DaemonSet %s is gone, and --keep-dataplane-on-uninstall: the programs stay, serving the "
                "last state; `kproxy cleanup` on the node removes them", ref,
            )  # fmt: skip
            return False
        return True

    def close(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            with contextlib.suppress(Exception):
                self.source.close()
