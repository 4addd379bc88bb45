"""Host checks the agent repeats while it runs (issue 12): IPv4 forwarding, often turned on by the CNI
after the agent started, is checked at every sweep, and the log says when it changed.

Runs in a private network namespace (`unshare -n`), where the test turns forwarding off, then on.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

SCRIPT = """
import logging
from kproxy.agent import Agent
from kproxy.config import AgentConfig

def forwarding(value):
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/lo/forwarding"):
        with open(path, "w") as f:
            f.write(value)

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
# a new namespace copies the host's settings (devconf_inherit_init_net): start from "off" whatever they are
forwarding("0")
agent = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], netdevs=["lo"]))
print("first", agent.check_forwarding(), flush=True)
print("again", agent.check_forwarding(), flush=True)
forwarding("1")
print("later", agent.check_forwarding(), flush=True)
"""


def test_forwarding_turned_on_later_is_noticed() -> None:
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["first ['lo']", "again ['lo']", "later []"]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING") and "forwarding is off" in ln]
    assert len(warnings) == 1, r.stderr  # said once, not at every sweep
    assert "INFO IPv4 forwarding is on now on lo" in r.stderr.splitlines()
