"""charts/kproxy: lint, render with every documented option, validate against Kubernetes 1.35 schemas, and
check what matters: RBAC, capabilities, probes, agent flags, values documentation, rejected values."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml

from kproxy.config import DEFAULT_CONFIGMAP

from .conftest import API_HOST, CHART, NAMESPACE, Renderer, RenderError

# kubernetes-validate ships schemas for 1.25 .. 1.37 offline; 1.35 is among them.
K8S_SCHEMA_VERSION = "1.35.0"

# Every flag of `kproxy agent` the chart may pass (stream D's CLI implements them).
AGENT_FLAGS = {
    "--source",
    "--node-port-range",
    "--no-protect-node-port-range",
    "--no-localhost-nodeports",
    "--socket-lb-host-netns-only",
    "--lb-algorithm",
    "--maglev-table-size",
    "--acceleration",
    "--node-name",
    "--node-ip",
    "--netdev",
    "--pod-ifaces",
    "--bpffs",
    "--no-bpffs-mount",
    "--map-size",
    "--ct-timeout-syn",
    "--ct-timeout-tcp",
    "--ct-timeout-fin",
    "--ct-timeout-udp",
    "--ct-timeout-sctp-init",
    "--ct-timeout-sctp",
    "--ct-timeout-sctp-close",
    "--log-level",
    "--k8s-api-server",
    "--kubeconfig",
    "--nodeport-addresses",
    "--service-cidr",
    "--hairpin-address",
    "--metrics-bind-address",
    "--health-bind-address",
    "--dsr-mode",
    "--socket-lb-cgroup",
    "--socket-lb-allow-root-cgroup",
    "--socket-lb-destroy-connected-udp",
    "--no-socket-lb-destroy-connected-udp",
    "--daemonset",
    "--keep-dataplane-on-uninstall",
}

AGENT_CAPS = ["BPF", "NET_ADMIN", "PERFMON"]
# socketLB.destroyConnectedUDP (on by default, with socket LB): setns into pod network namespaces, and
# opening /proc/PID/ns/net of their processes (with hostPID)
UDP_DESTROY_CAPS = ["SYS_ADMIN", "SYS_PTRACE"]
MOUNT_BPFFS_CAPS = ["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"]
CLEANUP_CAPS = ["NET_ADMIN", "NET_RAW"]


# --- helpers -------------------------------------------------------------------------------------------


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec = pod_spec(docs)
    for c in spec["containers"] + spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def init_names(docs: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in pod_spec(docs).get("initContainers", [])]


def agent_args(docs: list[dict[str, Any]]) -> list[str]:
    """The agent's argv after Kubernetes expands $(VAR) from env (ConfigMap keys, downward API)."""
    data = one(docs, "ConfigMap")["data"]
    agent = container(docs, "agent")
    env: dict[str, str] = {}
    for var in agent["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == one(docs, "ConfigMap")["metadata"]["name"]
            env[var["name"]] = data[ref["key"]]
        else:
            env[var["name"]] = "<" + var["valueFrom"]["fieldRef"]["fieldPath"] + ">"

    def expand(arg: str) -> str:
        def sub(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{arg} references undefined env var {m.group(1)}"
            return env[m.group(1)]

        return re.sub(r"\$\(([A-Z0-9_]+)\)", sub, arg)

    return [expand(a) for a in agent["command"] + agent["args"]]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]


def caps(c: dict[str, Any]) -> list[str]:
    return c["securityContext"]["capabilities"]["add"]


def validate_k8s(docs: list[dict[str, Any]]) -> None:
    try:
        from kubernetes_validate import utils
    except ImportError:
        pytest.fail(
            "kubernetes-validate is missing: add it to the dev extras (pip install kubernetes-validate)"
        )

    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; checked field by field below
        try:
            utils.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        except utils.ValidationError as e:
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            raise AssertionError(f"{where}: {e.message} at {list(e.path)}") from e


# --- lint and default render ---------------------------------------------------------------------------


def test_kubernetes_validate_is_installed() -> None:
    try:
        from kubernetes_validate import utils
    except ImportError:
        pytest.fail(
            "kubernetes-validate is missing: add it to the dev extras (pip install kubernetes-validate)"
        )
    assert K8S_SCHEMA_VERSION in utils.all_versions() or any(
        v.startswith("1.35") for v in utils.all_versions()
    ), f"kubernetes-validate has no {K8S_SCHEMA_VERSION} schemas: {utils.all_versions()}"


@pytest.mark.parametrize("extra", [[], ["--set", "dsr.enabled=true,cleanupKubeProxy.enabled=true"]])
def test_helm_lint_is_clean(helm: str, extra: list[str]) -> None:
    done = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--set", f"k8sServiceHost={API_HOST}", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


def test_default_render_is_valid_kubernetes(render: Renderer) -> None:
    docs = render()
    validate_k8s(docs)
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    assert {d["metadata"].get("namespace", NAMESPACE) for d in docs} == {NAMESPACE}


def test_daemonset_shape(render: Renderer) -> None:
    docs = render()
    ds = one(docs, "DaemonSet")
    spec = pod_spec(docs)
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert "kproxy.io/config-checksum" in ds["spec"]["template"]["metadata"]["annotations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["bpf-maps"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert volumes["cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    mounts = {m["name"]: m for m in container(docs, "agent")["volumeMounts"]}
    assert mounts["bpf-maps"]["mountPath"] == "/sys/fs/bpf"
    assert mounts["bpf-maps"]["mountPropagation"] == "HostToContainer"
    assert init_names(docs) == ["mount-bpf-fs"]


def test_default_agent_flags(render: Renderer) -> None:
    args = agent_args(render())
    assert args == [
        "kproxy",
        "agent",
        "--source=kubernetes",
        "--node-name=<spec.nodeName>",
        "--node-ip=<status.hostIPs>",
        "--bpffs=/sys/fs/bpf/kproxy",
        "--daemonset=kube-system/kproxy",
        "--dsr-mode=off",
        "--no-bpffs-mount",
        "--acceleration=off",
        "--ct-timeout-fin=10",
        "--ct-timeout-sctp=210",
        "--ct-timeout-sctp-close=10",
        "--ct-timeout-sctp-init=3",
        "--ct-timeout-syn=60",
        "--ct-timeout-tcp=21600",
        "--ct-timeout-udp=30",
        "--health-bind-address=0.0.0.0:10256",
        f"--k8s-api-server=https://{API_HOST}:6443",
        "--lb-algorithm=random",
        "--log-level=info",
        "--maglev-table-size=16381",
        "--map-size=kp_aff4_v1=65536",
        "--map-size=kp_aff6_v1=16384",
        "--map-size=kp_be4_v1=262144",
        "--map-size=kp_be6_v1=65536",
        "--map-size=kp_ct4_v1=262144",
        "--map-size=kp_ct6_v1=65536",
        "--map-size=kp_svc4_v1=262144",
        "--map-size=kp_svc6_v1=65536",
        "--metrics-bind-address=127.0.0.1:10249",
        "--node-port-range=30000-32767",
        "--pod-ifaces=veth*",
        "--socket-lb-cgroup=/run/kproxy/cgroupv2",
        "--socket-lb-allow-root-cgroup",
        "--socket-lb-destroy-connected-udp",
    ]


def test_agent_pins_in_its_own_directory_of_the_host_bpffs(render: Renderer) -> None:
    from kproxy.config import DEFAULT_BPFFS

    docs = render()
    pin_dir = flag_values(agent_args(docs), "--bpffs")
    mounts = {m["name"]: m for m in container(docs, "agent")["volumeMounts"]}
    volume = {v["name"]: v for v in pod_spec(docs)["volumes"]}["bpf-maps"]
    # Under the host's bpffs volume, not at its root next to other tools' pins.
    assert volume["hostPath"]["path"] == mounts["bpf-maps"]["mountPath"] == "/sys/fs/bpf"
    assert pin_dir == ["/sys/fs/bpf/kproxy"]
    # `kubectl exec ... kproxy services` in the agent container finds the pins without --bpffs, and no
    # KPROXY_BPFFS in the environment turns `kproxy dsr` there into standalone mode.
    assert pin_dir == [DEFAULT_BPFFS]
    assert "KPROXY_BPFFS" not in {e["name"] for e in container(docs, "agent")["env"]}
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert 'kproxy cleanup --bpffs {{ include "kproxy.pinDir" . }}' in notes


def test_no_chart_or_doc_file_pins_at_the_bpffs_root() -> None:
    root_pins = re.compile(r"--bpffs[= ]/sys/fs/bpf(?![\w/])")
    for path in [*CHART.rglob("*"), *(CHART.parents[1] / "docs").glob("*.md")]:
        if path.is_file():
            assert not root_pins.search(path.read_text()), f"{path} passes the bpffs root as --bpffs"


def test_api_server_env_points_at_the_api_server_itself(render: Renderer) -> None:
    env = {e["name"]: e for e in container(render({"k8sServicePort": 443}), "agent")["env"]}
    assert env["KUBERNETES_SERVICE_HOST"]["value"] == API_HOST
    assert env["KUBERNETES_SERVICE_PORT"]["value"] == "443"
    assert env["KPROXY_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # status.hostIPs: both families of a dual-stack node (GA since 1.30, the chart's kubeVersion)
    assert env["KPROXY_NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIPs"
    assert env["KPROXY_CONFIGMAP"]["value"] == "kproxy-config" == DEFAULT_CONFIGMAP  # the CLI's default
    assert env["KPROXY_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


# --- every documented option ---------------------------------------------------------------------------


def _flag(flag: str, value: str) -> Any:
    def check(docs: list[dict[str, Any]]) -> None:
        assert value in flag_values(agent_args(docs), flag), (flag, agent_args(docs))

    return check


def _no_flag(flag: str) -> Any:
    def check(docs: list[dict[str, Any]]) -> None:
        assert not flag_values(agent_args(docs), flag)

    return check


def _keep_dataplane(docs: list[dict[str, Any]]) -> None:
    assert "--keep-dataplane-on-uninstall" in agent_args(docs)


def _dsr(mode: str) -> Any:
    def check(docs: list[dict[str, Any]]) -> None:
        assert one(docs, "ConfigMap")["data"]["dsr-mode"] == mode
        assert flag_values(agent_args(docs), "--dsr-mode") == [mode]

    return check


def _socket_lb_off(docs: list[dict[str, Any]]) -> None:
    _no_flag("--socket-lb-cgroup")(docs)
    args = agent_args(docs)
    assert "--socket-lb-allow-root-cgroup" not in args
    assert not [a for a in args if "destroy-connected-udp" in a]
    assert "cgroup" not in {v["name"] for v in pod_spec(docs)["volumes"]}
    # nothing to destroy without socket LB: no host PIDs, no setns
    assert "hostPID" not in pod_spec(docs)
    assert not set(UDP_DESTROY_CAPS) & set(caps(container(docs, "agent")))


def _udp_destroy_off(docs: list[dict[str, Any]]) -> None:
    args = agent_args(docs)
    assert "--no-socket-lb-destroy-connected-udp" in args and "--socket-lb-destroy-connected-udp" not in args
    _flag("--socket-lb-cgroup", "/run/kproxy/cgroupv2")(docs)
    assert "hostPID" not in pod_spec(docs)
    assert caps(container(docs, "agent")) == AGENT_CAPS
    assert container(docs, "agent")["securityContext"]["allowPrivilegeEscalation"] is False


def _cgroup_path(docs: list[dict[str, Any]]) -> None:
    vol = {v["name"]: v for v in pod_spec(docs)["volumes"]}["cgroup"]
    assert vol["hostPath"]["path"] == "/sys/fs/cgroup/unified"
    _flag("--socket-lb-cgroup", "/run/kproxy/cgroupv2")(docs)


def _service_monitor(docs: list[dict[str, Any]]) -> None:
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"][0]["port"] == 9999
    labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    _flag("--metrics-bind-address", "0.0.0.0:9999")(docs)


def _health_port(docs: list[dict[str, Any]]) -> None:
    _flag("--health-bind-address", "0.0.0.0:20256")(docs)
    ports = {p["name"]: p["containerPort"] for p in container(docs, "agent")["ports"]}
    assert ports["health"] == 20256


def _image(docs: list[dict[str, Any]]) -> None:
    for c in pod_spec(docs)["containers"] + pod_spec(docs)["initContainers"]:
        assert c["image"] == "registry.example/kproxy:1.2.3"
        assert c["imagePullPolicy"] == "Always"


def _image_default_tag(docs: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(docs, "agent")["image"] == f"kproxy:{chart['appVersion']}"


def _resources(docs: list[dict[str, Any]]) -> None:
    # Helm merges maps: the default memory request stays.
    assert container(docs, "agent")["resources"] == {
        "requests": {"cpu": "250m", "memory": "128Mi"},
        "limits": {"memory": "1Gi"},
    }


def _node_selector(docs: list[dict[str, Any]]) -> None:
    assert pod_spec(docs)["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "edge"}


def _tolerations(docs: list[dict[str, Any]]) -> None:
    assert pod_spec(docs)["tolerations"] == [
        {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    ]


def _extra_args(docs: list[dict[str, Any]]) -> None:
    assert agent_args(docs)[-2:] == ["--kubeconfig=/etc/kubernetes/kproxy.conf", "--verbose-thing"]


def _privileged(docs: list[dict[str, Any]]) -> None:
    for name in ("agent", "mount-bpf-fs", "cleanup-kube-proxy"):
        sc = container(docs, name)["securityContext"]
        assert sc == {"privileged": True}, (name, sc)


def _legacy_memlock(docs: list[dict[str, Any]]) -> None:
    more = UDP_DESTROY_CAPS if "--socket-lb-destroy-connected-udp" in agent_args(docs) else []
    assert caps(container(docs, "agent")) == [*AGENT_CAPS, "SYS_RESOURCE", *more]


def _cleanup(docs: list[dict[str, Any]]) -> None:
    assert init_names(docs) == ["mount-bpf-fs", "cleanup-kube-proxy"]
    c = container(docs, "cleanup-kube-proxy")
    assert c["command"] == ["kproxy", "cleanup-kube-proxy"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/run/xtables.lock"}


def _no_bpffs_mount(docs: list[dict[str, Any]]) -> None:
    assert "initContainers" not in pod_spec(docs)
    assert "hostproc" not in {v["name"] for v in pod_spec(docs)["volumes"]}


def _priority(docs: list[dict[str, Any]]) -> None:
    assert pod_spec(docs)["priorityClassName"] == "kproxy-critical"


def _max_unavailable(docs: list[dict[str, Any]]) -> None:
    assert one(docs, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"


def _pod_meta(docs: list[dict[str, Any]]) -> None:
    meta = one(docs, "DaemonSet")["spec"]["template"]["metadata"]
    assert meta["annotations"]["team"] == "net"
    assert meta["labels"]["tier"] == "node"


def _pull_secrets(docs: list[dict[str, Any]]) -> None:
    assert pod_spec(docs)["imagePullSecrets"] == [{"name": "regcred"}]


def _map_sizes(docs: list[dict[str, Any]]) -> None:
    sizes = flag_values(agent_args(docs), "--map-size")
    assert "kp_ct4_v1=1048576" in sizes and "kp_nat4_v1=65536" in sizes


def _conntrack(docs: list[dict[str, Any]]) -> None:
    args = agent_args(docs)
    for flag, value in [("syn", "30"), ("tcp", "7200"), ("fin", "5"), ("udp", "120")]:
        assert flag_values(args, f"--ct-timeout-{flag}") == [value]


def _assert(ok: bool) -> None:
    assert ok


def _node_port_protect(docs: list[dict[str, Any]]) -> None:
    spec = pod_spec(docs)
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    assert {"name": "KPROXY_PROC_SYS_NET", "value": "/host/proc/sys/net"} in agent["env"]
    assert {"name": "proc-sys-net", "mountPath": "/host/proc/sys/net"} in agent["volumeMounts"]
    assert {"name": "proc-sys-net", "hostPath": {"path": "/proc/sys/net", "type": "Directory"}} in spec[
        "volumes"
    ]
    assert "--no-protect-node-port-range" not in agent_args(docs)
    assert "--no-localhost-nodeports" not in agent_args(docs)
    assert "--socket-lb-host-netns-only" not in agent_args(docs)


def _node_port_unprotected(docs: list[dict[str, Any]]) -> None:
    spec = pod_spec(docs)
    assert "--no-protect-node-port-range" in agent_args(docs)
    assert "proc-sys-net" not in {v["name"] for v in spec["volumes"]}
    _flag("--node-port-range", "20000-22767")(docs)


OPTIONS: list[tuple[str, dict[str, Any], Any]] = [
    ("node-port-protect-default", {}, _node_port_protect),
    (
        "localhost-nodeports-off",
        {"nodePort": {"localhost": False}},
        lambda docs: _assert("--no-localhost-nodeports" in agent_args(docs)),
    ),
    (
        "socket-lb-host-namespace-only",
        {"socketLB": {"hostNamespaceOnly": True}},
        lambda docs: _assert("--socket-lb-host-netns-only" in agent_args(docs)),
    ),
    (
        "socket-lb-off-ignores-host-namespace-only",
        {"socketLB": {"enabled": False, "hostNamespaceOnly": True}},
        lambda docs: _assert("--socket-lb-host-netns-only" not in agent_args(docs)),
    ),
    (
        "node-port-range-unprotected",
        {"nodePort": {"range": "20000-22767", "protectRange": False}},
        _node_port_unprotected,
    ),
    ("dsr-opt", {"dsr": {"enabled": True, "mode": "opt"}}, _dsr("opt")),
    ("dsr-ipip", {"dsr": {"enabled": True, "mode": "ipip"}}, _dsr("ipip")),
    ("dsr-disabled-keeps-mode-off", {"dsr": {"enabled": False, "mode": "ipip"}}, _dsr("off")),
    ("api-port", {"k8sServicePort": 443}, _flag("--k8s-api-server", f"https://{API_HOST}:443")),
    ("api-ipv6", {"k8sServiceHost": "fd00::10"}, _flag("--k8s-api-server", "https://[fd00::10]:6443")),
    ("api-dns", {"k8sServiceHost": "api.example"}, _flag("--k8s-api-server", "https://api.example:6443")),
    (
        "nodeport-addresses",
        {"nodePortAddresses": ["192.168.0.0/16", "10.1.2.0/24"]},
        _flag("--nodeport-addresses", "192.168.0.0/16,10.1.2.0/24"),
    ),
    (
        "service-cidrs-dual-stack",
        {"serviceCIDRs": ["10.96.0.0/12", "fd00:10:96::/108"]},
        _flag("--service-cidr", "10.96.0.0/12,fd00:10:96::/108"),
    ),
    (
        "hairpin-addresses",
        {"hairpinAddresses": ["169.254.7.1", "100::a9fe:701"]},
        _flag("--hairpin-address", "169.254.7.1,100::a9fe:701"),
    ),
    ("netdevs", {"interfaces": {"netdevs": ["eth0", "bond0"]}}, _flag("--netdev", "eth0,bond0")),
    ("netdevs-autodetect", {"interfaces": {"netdevs": []}}, _no_flag("--netdev")),
    ("pod-glob", {"interfaces": {"podInterfaceGlob": "cali*"}}, _flag("--pod-ifaces", "cali*")),
    ("map-sizes", {"mapSizes": {"kp_ct4_v1": 1048576, "kp_nat4_v1": 65536}}, _map_sizes),
    (
        "conntrack",
        {"conntrack": {"synTimeout": 30, "tcpTimeout": 7200, "finTimeout": 5, "udpTimeout": 120}},
        _conntrack,
    ),
    ("socket-lb-off", {"socketLB": {"enabled": False}}, _socket_lb_off),
    (
        "socket-lb-off-destroy-on",
        {"socketLB": {"enabled": False, "destroyConnectedUDP": True}},
        _socket_lb_off,
    ),
    ("udp-destroy-off", {"socketLB": {"destroyConnectedUDP": False}}, _udp_destroy_off),
    ("socket-lb-cgroup", {"socketLB": {"cgroupPath": "/sys/fs/cgroup/unified"}}, _cgroup_path),
    ("log-level", {"logLevel": "debug"}, _flag("--log-level", "debug")),
    (
        "maglev",
        {"loadBalancer": {"algorithm": "maglev", "maglevTableSize": 65521, "acceleration": "best-effort"}},
        lambda docs: (
            _flag("--lb-algorithm", "maglev")(docs),
            _flag("--maglev-table-size", "65521")(docs),
            _flag("--acceleration", "best-effort")(docs),
        ),
    ),
    (
        "service-monitor",
        {
            "metrics": {
                "port": 9999,
                "bindAddress": "0.0.0.0",
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
            }
        },
        _service_monitor,
    ),
    ("health-port", {"healthPort": 20256}, _health_port),
    (
        "image",
        {
            "image": {"repository": "registry.example/kproxy", "tag": "1.2.3", "pullPolicy": "Always"},
            "cleanupKubeProxy": {"enabled": True},
        },
        _image,
    ),
    ("image-default-tag", {}, _image_default_tag),
    ("image-pull-secrets", {"imagePullSecrets": [{"name": "regcred"}]}, _pull_secrets),
    ("resources", {"resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}}, _resources),
    ("node-selector", {"nodeSelector": {"pool": "edge"}}, _node_selector),
    (
        "tolerations",
        {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]},
        _tolerations,
    ),
    (
        "extra-args",
        {"extraArgs": ["--kubeconfig=/etc/kubernetes/kproxy.conf", "--verbose-thing"]},
        _extra_args,
    ),
    ("privileged", {"privileged": True, "cleanupKubeProxy": {"enabled": True}}, _privileged),
    ("legacy-memlock", {"legacyMemlock": True}, _legacy_memlock),
    ("cleanup-kube-proxy", {"cleanupKubeProxy": {"enabled": True}}, _cleanup),
    ("no-bpffs-automount", {"bpffs": {"autoMount": False}}, _no_bpffs_mount),
    ("uninstall-keeps-dataplane", {"uninstall": {"keepDataplane": True}}, _keep_dataplane),
    ("priority-class", {"priorityClassName": "kproxy-critical"}, _priority),
    ("max-unavailable", {"maxUnavailable": "10%"}, _max_unavailable),
    ("pod-metadata", {"podAnnotations": {"team": "net"}, "podLabels": {"tier": "node"}}, _pod_meta),
    (
        "many-options-at-once",
        {
            "dsr": {"enabled": True, "mode": "ipip"},
            "nodePortAddresses": ["192.168.0.0/16"],
            "interfaces": {"netdevs": ["eth0"], "podInterfaceGlob": "lxc*"},
            "metrics": {"bindAddress": "0.0.0.0", "serviceMonitor": {"enabled": True}},
            "cleanupKubeProxy": {"enabled": True},
            "legacyMemlock": True,
            "socketLB": {"enabled": False},
        },
        lambda docs: (_dsr("ipip")(docs), _cleanup(docs), _legacy_memlock(docs), _socket_lb_off(docs)),
    ),
]


@pytest.mark.parametrize(("values", "check"), [pytest.param(v, c, id=i) for i, v, c in OPTIONS])
def test_option_renders_valid_manifests(render: Renderer, values: dict[str, Any], check: Any) -> None:
    docs = render(values)
    validate_k8s(docs)
    check(docs)
    assert {a.split("=", 1)[0] for a in agent_args(docs)[2:] if a.startswith("--")} <= AGENT_FLAGS | {
        "--verbose-thing"
    }


def test_every_top_level_value_has_an_option_case() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exercised: set[str] = {"k8sServiceHost"}
    for _, v, _ in OPTIONS:
        exercised |= set(v)
    assert set(values) - exercised == set(), "values without a rendering test case"


# --- least privilege -----------------------------------------------------------------------------------


def test_rbac_is_exactly_read_services_slices_nodes_service_cidrs_own_configmap_and_daemonset(
    render: Renderer,
) -> None:
    docs = render()
    cluster_rules = sorted(
        (tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])))
        for r in one(docs, "ClusterRole")["rules"]
    )
    assert cluster_rules == [
        (("",), ("nodes", "services"), ("get", "list", "watch")),
        (("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch")),
        (("networking.k8s.io",), ("servicecidrs",), ("list", "watch")),
    ]
    assert all(
        "resourceNames" not in r and "nonResourceURLs" not in r for r in one(docs, "ClusterRole")["rules"]
    )
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [one(docs, "ConfigMap")["metadata"]["name"]],
            "verbs": ["get", "list", "watch", "patch"],
        },
        # its own DaemonSet, watched by name (deleted: an uninstall)
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["kproxy"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    sa = one(docs, "ServiceAccount")["metadata"]
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(docs, kind)
        assert binding["roleRef"]["kind"] == role_kind
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]


def test_capabilities_are_exactly_the_documented_ones(render: Renderer) -> None:
    docs = render({"cleanupKubeProxy": {"enabled": True}})
    expected = {
        "agent": [*AGENT_CAPS, *UDP_DESTROY_CAPS],
        "mount-bpf-fs": MOUNT_BPFFS_CAPS,
        "cleanup-kube-proxy": CLEANUP_CAPS,
    }
    for name, want in expected.items():
        sc = container(docs, name)["securityContext"]
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"], "add": want}, name
    assert container(docs, "cleanup-kube-proxy")["securityContext"]["allowPrivilegeEscalation"] is False
    # The API refuses allowPrivilegeEscalation: false next to SYS_ADMIN; mount(2) also needs AppArmor off.
    assert "allowPrivilegeEscalation" not in container(docs, "mount-bpf-fs")["securityContext"]
    assert "allowPrivilegeEscalation" not in container(docs, "agent")["securityContext"]
    assert container(docs, "mount-bpf-fs")["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    spec = pod_spec(docs)
    assert spec["hostPID"] is True and not spec.get("hostIPC")  # socketLB.destroyConnectedUDP
    assert "appArmorProfile" not in container(docs, "agent")["securityContext"]


@pytest.mark.parametrize(
    ("socket_lb", "destroy", "host_only", "needed"),
    [
        (True, True, False, True),
        (True, False, False, False),
        (False, True, False, False),
        (False, False, False, False),
        (True, True, True, False),
    ],
)
def test_host_pids_and_setns_capabilities_exactly_when_udp_sockets_are_destroyed(
    render: Renderer, socket_lb: bool, destroy: bool, host_only: bool, needed: bool
) -> None:
    """hostPID, SYS_ADMIN and SYS_PTRACE only when socket LB is on and socketLB.destroyConnectedUDP: the
    agent then walks the network namespaces of the socket-LB cgroup's processes; otherwise it never
    enters a namespace, and the flag it gets says so. socketLB.hostNamespaceOnly: pod sockets are not
    balanced at the socket, so only the agent's own namespace is walked and none of them is needed."""
    docs = render(
        {"socketLB": {"enabled": socket_lb, "destroyConnectedUDP": destroy, "hostNamespaceOnly": host_only}}
    )
    validate_k8s(docs)
    spec = pod_spec(docs)
    agent = container(docs, "agent")
    args = agent_args(docs)
    assert spec.get("hostPID", False) is needed
    assert caps(agent) == (AGENT_CAPS + UDP_DESTROY_CAPS if needed else AGENT_CAPS)
    assert ("allowPrivilegeEscalation" in agent["securityContext"]) is not needed
    flags = [a for a in args if a.endswith("socket-lb-destroy-connected-udp")]
    if not socket_lb:
        assert flags == []
    else:
        assert flags == (
            ["--socket-lb-destroy-connected-udp"] if destroy else ["--no-socket-lb-destroy-connected-udp"]
        )


def test_every_capability_is_justified_in_a_comment() -> None:
    text = (CHART / "templates" / "agent" / "daemonset.yaml").read_text()
    for cap in {*AGENT_CAPS, *MOUNT_BPFFS_CAPS, *CLEANUP_CAPS, "SYS_RESOURCE"}:
        assert re.search(rf"^\s*{cap}( \(.*\))?: \S", text, re.M), f"no comment justifying {cap}"
    for cap in UDP_DESTROY_CAPS:  # the agent container's own reasons, not the init container's
        assert re.search(rf"^\s*{cap} \(socketLB.destroyConnectedUDP only\): \S", text, re.M), cap
    assert re.search(r"^\s*# socketLB.destroyConnectedUDP: .*\n(\s*#.*\n)*\s*hostPID: true", text, re.M)


@pytest.mark.parametrize("health_port", [10256, 20256])
def test_probes_use_the_real_health_port(render: Renderer, health_port: int) -> None:
    docs = render({"healthPort": health_port})
    agent = container(docs, "agent")
    named = {p["name"]: p["containerPort"] for p in agent["ports"]}
    (bind,) = flag_values(agent_args(docs), "--health-bind-address")
    assert bind.rsplit(":", 1)[1] == str(health_port)
    # a drained or deleted Node makes /healthz 503 (KEP-3836): only readiness may follow it
    probes = (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz"))
    for probe, path in probes:
        get = agent[probe]["httpGet"]
        assert get["path"] == path, probe
        port = named[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == health_port, probe


# --- config checksum -----------------------------------------------------------------------------------


def _checksum(docs: list[dict[str, Any]]) -> str:
    return one(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["kproxy.io/config-checksum"]


def test_checksum_rolls_pods_for_startup_settings_only(render: Renderer) -> None:
    base = _checksum(render())
    assert _checksum(render()) == base
    assert _checksum(render({"conntrack": {"tcpTimeout": 3600}})) != base
    assert _checksum(render({"mapSizes": {"kp_ct4_v1": 524288}})) != base
    # DSR is a runtime setting the agent follows live: toggling it must not restart agents.
    assert _checksum(render({"dsr": {"enabled": True, "mode": "ipip"}})) == base


# --- values documentation and schema -------------------------------------------------------------------


def _value_paths(node: Any, prefix: str = "") -> list[str]:
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            paths.append(path)
            if isinstance(value, dict) and value and path != "mapSizes" and not path.endswith("resources"):
                paths += _value_paths(value, path + ".")
    return paths


def _documented_keys(text: str) -> set[str]:
    """Dotted paths of the keys whose preceding comment block starts with `# --`."""
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        m = re.match(r"^( *)([A-Za-z0-9_]+):", line)
        if not m:
            if not stripped:
                comment = []
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        if comment and comment[0].startswith("# --"):
            documented.add(path)
        stack.append((indent, key))
        comment = []
    return documented


def test_every_value_is_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    documented = _documented_keys(text)
    for path in _value_paths(values):
        node = values
        for part in path.split("."):
            node = node[part]
        is_group = isinstance(node, dict) and path not in ("mapSizes", "resources") and node
        if is_group:
            continue  # a group of values (dsr, metrics, ...): its leaves carry the documentation
        assert path in documented, f"values.yaml: {path} has no `# --` comment"


def test_every_value_is_typed_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema.get("additionalProperties") is False
    for path in _value_paths(values):
        node = schema
        for part in path.split("."):
            assert "properties" in node and part in node["properties"], f"{path} is not in values.schema.json"
            node = node["properties"][part]
        assert "type" in node or "$ref" in node or "oneOf" in node, f"{path} has no type in the schema"


# --- rejected values -----------------------------------------------------------------------------------


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    # templates/validate.yaml
    ("no-api-server", {"k8sServiceHost": ""}, "k8sServiceHost is empty"),
    ("api-server-url", {"k8sServiceHost": "https://10.0.0.10"}, "must be a bare IP address or DNS name"),
    ("dsr-mode-unknown", {"dsr": {"enabled": True, "mode": "geneve"}}, 'dsr.mode "geneve" does not exist'),
    (
        "dsr-mode-unknown-disabled",
        {"dsr": {"enabled": False, "mode": "snat"}},
        'dsr.mode "snat" does not exist',
    ),
    ("same-ports", {"healthPort": 10249}, "metrics.port and healthPort are both 10249"),
    (
        "servicemonitor-on-loopback",
        {"metrics": {"serviceMonitor": {"enabled": True}}},
        "metrics.bindAddress is the loopback address",
    ),
    ("extra-args-conflict", {"extraArgs": ["--dsr-mode=ipip"]}, "extraArgs sets --dsr-mode"),
    # values.schema.json
    ("health-port-string", {"healthPort": "http"}, "healthPort"),
    ("port-out-of-range", {"k8sServicePort": 70000}, "k8sServicePort"),
    ("log-level-unknown", {"logLevel": "loud"}, "logLevel"),
    (
        "lb-algorithm-unknown",
        {"loadBalancer": {"algorithm": "roundrobin", "maglevTableSize": 16381}},
        "algorithm",
    ),
    ("acceleration-unquoted-off", {"loadBalancer": {"acceleration": False}}, "acceleration"),
    (
        "maglev-size-not-prime",
        {"loadBalancer": {"algorithm": "maglev", "maglevTableSize": 16384}},
        "maglevTableSize",
    ),
    ("unknown-value", {"dsrMode": "opt"}, "dsrMode"),
    ("bad-cidr", {"nodePortAddresses": ["10.0.0.1"]}, "nodePortAddresses"),
    ("bad-map-name", {"mapSizes": {"svc": 10}}, "mapSizes"),
    ("zero-timeout", {"conntrack": {"udpTimeout": 0}}, "udpTimeout"),
    ("node-port-range-not-a-range", {"nodePort": {"range": "30000"}}, "range"),
    ("relative-cgroup", {"socketLB": {"cgroupPath": "sys/fs/cgroup"}}, "cgroupPath"),
    ("netdev-with-comma", {"interfaces": {"netdevs": ["eth0,eth1"]}}, "netdevs"),
    (
        "hairpin-two-of-a-family",
        {"hairpinAddresses": ["169.254.7.1", "169.254.7.2"]},
        "hairpinAddresses [169.254.7.1 169.254.7.2] has two addresses of one family",
    ),
    ("hairpin-not-an-ip", {"hairpinAddresses": ["10.0.0.0/8"]}, "hairpinAddresses"),
]


@pytest.mark.parametrize(("values", "message"), [pytest.param(v, m, id=i) for i, v, m in BAD_VALUES])
def test_bad_values_are_rejected_with_their_message(
    render: Renderer, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError) as err:
        render(values)
    assert message in str(err.value), str(err.value)


def test_missing_api_server_is_rejected_without_any_values(render: Renderer) -> None:
    with pytest.raises(RenderError, match="k8sServiceHost is empty"):
        render(with_api_host=False)


def test_uninstall_removes_the_dataplane_unless_kept(render: Renderer) -> None:
    """The agent learns its DaemonSet (deleted: an uninstall, it removes its programs and pins on SIGTERM)
    and may watch it, by name only; uninstall.keepDataplane keeps them for a migration."""
    docs = render()
    assert "--daemonset=kube-system/kproxy" in agent_args(docs)
    assert "--keep-dataplane-on-uninstall" not in agent_args(docs)
    rules = one(docs, "Role")["rules"]
    assert {
        "apiGroups": ["apps"],
        "resources": ["daemonsets"],
        "resourceNames": ["kproxy"],
        "verbs": ["get", "list", "watch"],
    } in rules
    assert "--keep-dataplane-on-uninstall" in agent_args(render({"uninstall": {"keepDataplane": True}}))


def test_the_agents_state_directory_is_the_hosts(render: Renderer) -> None:
    """The state root (service names for the CLI, the NodePort range the agent reserved) is the host's
    /run/kproxy, through KPROXY_STATE_ROOT: a restarted or upgraded agent, an uninstall and `kproxy
    cleanup` on the host find what an earlier agent recorded."""
    from kproxy.observe.metadata import DEFAULT_STATE_ROOT, STATE_ROOT_ENV

    docs = render()
    agent = container(docs, "agent")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    volume = {v["name"]: v for v in pod_spec(docs)["volumes"]}["state"]
    assert volume["hostPath"] == {"path": DEFAULT_STATE_ROOT, "type": "DirectoryOrCreate"}
    assert env[STATE_ROOT_ENV] == mounts["state"]["mountPath"]
