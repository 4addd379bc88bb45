"""The real agent with `--source kubernetes`: traffic follows changes made through the API double.

A one-node lab (4 pods: one client, three backends). The API double runs in this test process, on a
socket made inside the lab's external-client namespace (so the node reaches it over the LAN at
EXT_IP), its event loop in a thread of ours. The agent runs in the node's namespace with
`--source kubernetes --k8s-api-server http://EXT_IP:PORT` (no credentials: plain http, no service
account), exactly as `kproxy agent` runs in a cluster.

No timing assertions: waits are bounded only so that a failure ends.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import EXT_IP
from tests.controller.apiserver import FakeApiServer
from tests.controller.rbac import Rbac

pytestmark = pytest.mark.root

VIP = "10.96.70.10"
PORT = mf.Port(name="http", port=80, target=8080)
HC_PORT = 31999
NODE_PORT = 31080


DAEMONSET = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "kproxy", "namespace": "kube-system"},
    "spec": {"selector": {"matchLabels": {"app": "kproxy"}}},
}
DAEMONSET_REF = "kube-system/kproxy"  # the chart's DaemonSet (its Role lets the agent read it by name)


class KubeLab(Lab):
    """The lab, with the agents watching the API double instead of the manifests directory."""

    api_url = ""
    kubeconfig = ""  # the chart's ServiceAccount token: the double enforces the chart's RBAC for it

    def agent_argv(self, node: Any) -> list[str]:
        argv = super().agent_argv(node)
        i = argv.index("--source")
        argv[i + 1 : i + 2] = ["kubernetes", "--kubeconfig", self.kubeconfig, "--daemonset", DAEMONSET_REF]
        return argv


class ApiInNamespace:
    """FakeApiServer on a socket inside a lab namespace, its loop in a thread; calls are thread-safe."""

    def __init__(self, lab: Lab) -> None:
        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((EXT_IP, 0))
            s.listen(128)
            return s

        self.sock = lab.in_ns(lab.ext, listen)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api double", daemon=True)
        self.thread.start()
        self.api = FakeApiServer(host=EXT_IP, bookmark_interval=1.0, rbac=Rbac.from_chart())
        self.url = self.call(lambda: self.api.start(sock=self.sock))

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            out = fn()
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def put(self, *objs: dict[str, Any]) -> None:
        self.call(lambda: [self.api.put(o) for o in objs])

    def close(self) -> None:
        try:
            self.call(self.api.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.sock.close()


@pytest.fixture(scope="module")
def klab(
    tc_object: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KubeLab, ApiInNamespace]]:
    """Name: klab. Scope: module. Depends: root, tc_object.

    A one-node lab whose agent watches the API double (running in the lab's ext namespace).
    """
    with KubeLab(nodes=1, pods_per_node=4, start_agents=False) as lab:
        api = ApiInNamespace(lab)
        try:
            lab.api_url = api.url
            lab.kubeconfig = api.api.write_kubeconfig(str(tmp_path_factory.mktemp("kube") / "kubeconfig"))
            n1 = lab.nodes[0]
            api.put(mf.node(n1.name, n1.ip), DAEMONSET)
            lab.start_agent(n1.name)
            lab.wait_agent(n1.name)
            yield lab, api
        finally:
            api.close()


def http_get(lab: Lab, url: str) -> tuple[int, dict[str, Any]]:
    """GET from the external client's namespace: (status, JSON body)."""

    def do() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return lab.in_ns(lab.ext, do)


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_healthz_answers_200_after_sync(klab: tuple[KubeLab, ApiInNamespace]) -> None:
    lab, _ = klab
    status, body = http_get(lab, f"http://{lab.nodes[0].ip}:10256/healthz")
    assert status == 200, body
    assert "lastUpdated" in body or "currentTime" in body or body, body


def _answered_since(answers: list[tuple[float, float, str]], t0: float) -> int:
    """Connections started after t0 and already answered (a list entry is added on completion)."""
    return sum(1 for t, _, _ in answers if t > t0)


def test_traffic_follows_endpointslice_scaling(klab: tuple[KubeLab, ApiInNamespace]) -> None:
    lab, api = klab
    n1 = lab.nodes[0]
    client, *backends = lab.pods_on(n1.name)
    for p in backends:
        lab.wait_podserver(p)
    ip_of = {p.ip: p for p in backends}

    def slice_of(pods: list[Any]) -> dict[str, Any]:
        return mf.endpoint_slice("scale", [(p.ip, p.node) for p in pods], [PORT])

    api.put(mf.service("scale", [PORT], VIP), slice_of(backends[:1]))
    lab.wait_programmed(VIP, PORT.port, [backends[0].ip])

    # (connect start, answer received, answering pod ip or "error: ...") of every connection of the
    # client loop. A connection is judged by the window it lies in whole: on a busy machine the thread
    # may stall between reading the clock and sending its SYN, past the next change.
    answers: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def client_loop() -> None:
        def body() -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    with socket.create_connection((VIP, PORT.port), timeout=10) as s:
                        s.settimeout(10)
                        line = s.makefile("rb").readline()
                    answers.append((t, time.monotonic(), json.loads(line)["ip"]))
                except (OSError, ValueError) as e:
                    answers.append((t, time.monotonic(), f"error: {e}"))

        lab.in_ns(client, body)

    thread = threading.Thread(target=client_loop, name="client loop", daemon=True)
    thread.start()
    # windows: (programmed at, next change written at, backends valid in between)
    windows: list[tuple[float, float, set[str]]] = []
    try:
        steps = [backends, backends[:2], backends[2:], backends, backends[1:2], backends[:1]]
        programmed_at, valid = time.monotonic(), {backends[0].ip}
        for pods in steps:
            wait_until("client answers", lambda t0=programmed_at: _answered_since(answers, t0) >= 20)
            written_at = time.monotonic()
            windows.append((programmed_at, written_at, valid))
            api.put(slice_of(pods))
            valid = {p.ip for p in pods}
            lab.wait_programmed(VIP, PORT.port, valid)
            programmed_at = time.monotonic()
        wait_until("client answers", lambda: _answered_since(answers, programmed_at) >= 20)
        windows.append((programmed_at, time.monotonic(), valid))
    finally:
        stop.set()
        thread.join(10)

    checked = 0
    for start, end, valid in windows:
        inside = [a for t, done, a in answers if start <= t and done < end]
        assert inside, f"no connection between {start} and {end}"
        wrong = [a for a in inside if a not in valid]
        assert not wrong, f"after the change to {sorted(valid)} was programmed, answers came from {wrong[:5]}"
        checked += len(inside)
    seen = {a for _, _, a in answers if a in ip_of}
    assert seen == set(ip_of), f"not every backend ever answered: {seen}"
    assert checked >= 20 * len(windows)
    assert "watching Kubernetes at " + api.url in lab.log(f"agent-{lab.nodes[0].name}")


def test_health_check_node_port_for_local_traffic_policy(klab: tuple[KubeLab, ApiInNamespace]) -> None:
    lab, api = klab
    n1 = lab.nodes[0]
    pods = lab.pods_on(n1.name)[1:3]
    lb = mf.service(
        "local", [mf.Port(name="http", port=80, target=8080, node_port=NODE_PORT)], "10.96.70.20",
        type="LoadBalancer", external_traffic_policy="Local",
    )  # fmt: skip
    lb["spec"]["healthCheckNodePort"] = HC_PORT
    api.put(lb, mf.endpoint_slice("local", [(p.ip, n1.name) for p in pods], [PORT]))
    url = f"http://{n1.ip}:{HC_PORT}/"

    def answer_is(status: int, local: int) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return http_get(lab, url) == (
                    status,
                    {
                        "service": {"namespace": "default", "name": "local"},
                        "localEndpoints": local,
                        "serviceProxyHealthy": True,
                    },
                )
            except (OSError, ValueError):
                return False

        return check

    wait_until("healthCheckNodePort answering 200 with 2 local endpoints", answer_is(200, 2))
    # every endpoint moves to another node: none is local any more
    api.put(mf.endpoint_slice("local", [(p.ip, "elsewhere") for p in pods], [PORT]))
    wait_until("healthCheckNodePort answering 503 with no local endpoint", answer_is(503, 0))
    status, body = http_get(lab, url)
    assert status == 503 and body["localEndpoints"] == 0, (status, body)


def test_the_agent_asks_for_nothing_the_chart_does_not_grant(klab: tuple[KubeLab, ApiInNamespace]) -> None:
    """The double enforces the chart's RBAC for the agent's token: a request outside it is a 403 a
    real API server would give too (issue 12: a cluster-wide ConfigMap watch took every watch down)."""
    _lab, api = klab
    wait_until("the ConfigMap watched", lambda: api.call(lambda: api.api.watch_count("configmaps")) == 1)
    assert api.call(lambda: list(api.api.denied)) == []


def _pins(lab: KubeLab) -> list[str]:
    d = Path(lab.node("n1").bpffs)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _reaches(lab: KubeLab, vip: str, port: int) -> bool:
    """Whether a pod of n1 gets an answer through VIP:PORT (one short connection)."""
    client = lab.pods_on("n1")[0]

    def do() -> bool:
        try:
            with socket.create_connection((vip, port), timeout=3) as s:
                s.settimeout(5)
                return bool(s.makefile("rb").readline())
        except OSError:
            return False

    return lab.in_ns(client, do)


def test_restart_keeps_the_dataplane_uninstall_removes_it(klab: tuple[KubeLab, ApiInNamespace]) -> None:
    """SIGTERM with the agent's DaemonSet still there (a restart, an upgrade): programs and pins stay
    and keep serving. SIGTERM after the DaemonSet was deleted (`helm uninstall`): the agent removes its
    dataplane; issue 12 found a frozen one serving dead backends after an uninstall. Last in the
    module: the agent is restarted at the end for nothing else."""
    lab, api = klab
    vip, backend = "10.96.77.1", lab.pods_on("n1")[1]
    lab.wait_podserver(backend)
    api.put(
        mf.service("frozen", [PORT], vip), mf.endpoint_slice("frozen", [(backend.ip, backend.node)], [PORT])
    )
    lab.wait_programmed(vip, PORT.port, [backend.ip])
    assert _reaches(lab, vip, PORT.port)
    lab.stop_agent("n1")
    assert "is still there" in lab.log("agent-n1")
    assert "kp_svc4_v1" in _pins(lab)
    assert _reaches(lab, vip, PORT.port)  # no agent, the dataplane serves on

    lab.start_agent("n1")
    lab.wait_agent("n1")
    wait_until("the DaemonSet watched", lambda: api.call(lambda: api.api.watch_count("daemonsets")) == 1)
    assert api.call(lambda: list(api.api.denied)) == []  # watching its DaemonSet is in the chart's Role
    api.call(lambda: api.api.delete("DaemonSet", "kube-system", "kproxy"))
    wait_until("the agent to see its DaemonSet go", lambda: "is being deleted" in lab.log("agent-n1"))
    # helm deletes the Role, RoleBinding and ServiceAccount right after the DaemonSet, before the pods
    # get SIGTERM: by then the agent may ask nothing more
    api.call(lambda: setattr(api.api, "rbac", Rbac.from_objects([])))
    lab.stop_agent("n1")
    assert "is gone (an uninstall)" in lab.log("agent-n1"), lab.log("agent-n1")[-2000:]
    assert _pins(lab) == []
    assert not _reaches(lab, vip, PORT.port)  # the programs are gone with the pins: nothing translates
