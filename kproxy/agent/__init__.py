"""The node agent: one asyncio loop wiring source -> store -> sync -> maps, plus attach and sweeping.

One module per part; the Agent (core) owns them and runs them:
  core       Agent: start-up in order, the tasks, shutdown; run_agent (what `kproxy agent` runs)
  dataplane  Dataplane: load the BPF object and pin its maps, attach to netdevs and follow pod
             interfaces, socket load balancing, `kproxy status`, and on exit keep (or remove) it all
  netdevs    netdev autodetection and the forwarding check (IPv4 and IPv6)
  upkeep     DatapathConfig (kp_cfg_v1: DSR mode from the agent ConfigMap, the orphaned-flow window)
             and Sweeper (conntrack/SNAT sweeps and the other chores every --sweep-interval)
  syncloop   SyncLoop (the initial full sync, then dirty Services in batches, after-apply hooks) and
             ServiceMetadata (services.json, the names of the service ids)
  sources    Sources: the file or Kubernetes source (kproxy.sources.kube, and so kopf, imported only
             for --source kubernetes), and whether SIGTERM is an uninstall
  serve      Servers: /healthz, healthCheckNodePorts and /metrics
  udpsockets ConnectedUdp: socket LB's connected UDP sockets of removed backends destroyed after each sync
  errors     AgentError

Pod interfaces are followed through netlink link events; a conntrack sweeper deletes expired entries.
The Kubernetes source also reports the agent ConfigMap: its `dsr-mode` key is written into kp_cfg_v1
live (flows keep the mode they began with; the datapath records it in conntrack).
SIGTERM/SIGINT stop the agent and leave pins and links: the programs keep running until the next agent
adopts them (`kproxy cleanup` removes everything).
"""

from __future__ import annotations

from .core import Agent, run_agent
from .errors import AgentError
from .netdevs import default_route_ifaces, detect_netdevs

__all__ = ["Agent", "AgentError", "default_route_ifaces", "detect_netdevs", "run_agent"]
