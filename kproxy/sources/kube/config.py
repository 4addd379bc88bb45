"""Settings of the Kubernetes source, and the counters it reports."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from kproxy.config import DEFAULT_SETTINGS_CONFIGMAP


class SourceMetrics(Protocol):
    """The counters KubeSource reports (kproxy.observe.metrics.Metrics implements them)."""

    def object_skipped(self, kind: str, reason: str) -> None: ...
    def source_event(self, kind: str, event_type: str) -> None: ...
    def source_relist(self, reason: str) -> None: ...
    def source_restart(self, resource: str) -> None: ...
    def watch_status(self, resource: str, up: bool) -> None: ...


@dataclasses.dataclass
class KubeSourceConfig:
    """Settings of the Kubernetes source (the agent maps its CLI flags onto these).

    settings_configmap: "namespace/name" of the agent's ConfigMap with runtime settings.
    resync_interval: seconds between full LISTs that catch deletions kopf missed (0 disables).
    """

    node_name: str
    kubeconfig: str | None = None
    api_server: str | None = None
    settings_configmap: str | None = DEFAULT_SETTINGS_CONFIGMAP  # the chart's
    # "namespace/name" of the agent's own DaemonSet, watched by name: its deletion means an uninstall
    daemonset: str | None = None
    resync_interval: float = 300.0
    list_chunk_size: int = 500
    # kopf keeps a worker per object, holding the object's last body, until it idled this long: during
    # its listing of every object, 0.5 s kept thousands of bodies alive at once, and the peak stayed
    # as RSS (~10 MB more at 10,000 Services). Later events cost a new worker task each: microseconds.
    kopf_idle_timeout: float = 0.05
    kopf_restart_delay: float = 1.0

    @classmethod
    def from_any(cls, cfg: Any) -> KubeSourceConfig:
        """Build from an agent config object that has (some of) these attribute names."""
        if isinstance(cfg, KubeSourceConfig):
            return cfg
        names = [f.name for f in dataclasses.fields(cls)]
        aliases = {
            "api_server": ("k8s_api_server", "api_server"),
            "settings_configmap": ("configmap", "settings_configmap"),
        }
        values: dict[str, Any] = {}
        for name in names:
            for attr in aliases.get(name, (name,)):
                if getattr(cfg, attr, None) is not None:
                    values[name] = getattr(cfg, attr)
                    break
        if "node_name" not in values:
            raise ValueError("the Kubernetes source needs the node name: pass --node-name or set NODE_NAME")
        return cls(**values)
