"""Names and limits of the Kubernetes API that kproxy relies on, shared by the schema, the fast path
and translate."""

from __future__ import annotations

import re
from typing import Literal

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"  # deprecated spelling
ZONE_LABEL = "topology.kubernetes.io/zone"

DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
# Kubernetes itself sets no limit on Service ports; EndpointSlices carry at most 100. A Service with
# more ports than that is treated as malformed rather than programmed half-way.
MAX_SERVICE_PORTS = 100

Protocol = Literal["TCP", "UDP", "SCTP"]

# IPv4 exactly as ipaddress accepts it (no leading zeros, ASCII digits); anything else: the schema
IPV4_EXACT = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
).fullmatch
