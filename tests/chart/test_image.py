"""dist/kproxy-image.tar, the OCI image `make image` builds without a registry or a container engine: its
layout and config (the Dockerfile's ENTRYPOINT, CMD and ENV), what its root filesystem holds and leaves
out, and `kproxy version` run inside it (unpacked with umoci, entered with chroot: no runtime needed).

Building the image takes 30 s to 2 minutes and the network, so the normal suite only checks an archive
that is already there and skips otherwise; `make test-image` builds one and runs this module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "dist" / "kproxy-image.tar"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SITE = "opt/kproxy/lib/python3.11/site-packages"
BPF_OBJECTS = ("kproxy_tc.bpf.o", "kproxy_sock.bpf.o")
EM_BPF = 247
# Generous bounds that still catch a stray toolchain or perl (bookworm's usrmerge pulls in 45 MiB of it).
MAX_ARCHIVE_MIB = 80
MAX_ROOTFS_MIB = 180

RUNTIME_PACKAGES = ("python3", "libbpf1", "iproute2", "iptables", "nftables", "util-linux", "mount")
BUILD_PACKAGES = re.compile(
    r"^(clang|llvm|gcc|g\+\+|cpp|libgcc-\d+-dev|libc6-dev|build-essential|libbpf-dev|python3(\.\d+)?-dev|"
    r"make|binutils|python3-pip|python3-venv)(-\d+)?$"
)
BUILD_TOOLS = re.compile(r"^usr/(local/)?bin/(clang|gcc|g\+\+|cc|c\+\+|ld|as|make|llc|pip3?)(-[\d.]+)?$")
# What the chart's containers run: the agent, the bpffs init container (sh, grep, nsenter, mount) and
# `kproxy cleanup-kube-proxy` (every iptables backend and nft).
TOOLS = (
    "usr/bin/sh",
    "usr/bin/grep",
    "usr/bin/nsenter",
    "usr/bin/mount",
    "usr/bin/ip",
    "usr/sbin/tc",
    "usr/sbin/nft",
    *(
        f"usr/sbin/{t}-{b}{op}"
        for t in ("iptables", "ip6tables")
        for b in ("legacy", "nft")
        for op in ("", "-save", "-restore")
    ),
)

pytestmark = pytest.mark.skipif(
    not IMAGE.exists(),
    reason="no dist/kproxy-image.tar: `make test-image` builds it (needs the network) and runs these tests",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class Layout:
    """The archive unpacked: an OCI image layout with one tagged manifest."""

    root: Path
    index: dict[str, Any] = field(init=False)
    manifest: dict[str, Any] = field(init=False)
    config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.index = json.loads((self.root / "index.json").read_text())
        self.manifest = self.blob_json(self.index["manifests"][0])
        self.config = self.blob_json(self.manifest["config"])

    def blob(self, desc: dict[str, Any]) -> Path:
        algo, digest = desc["digest"].split(":")
        return self.root / "blobs" / algo / digest

    def blob_json(self, desc: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self.blob(desc).read_bytes())  # type: ignore[no-any-return]


@dataclass
class Member:
    type: bytes
    size: int
    linkname: str


@dataclass
class Rootfs:
    """The image's one layer, read without unpacking: every member, a few files' contents, its digest."""

    members: dict[str, Member]
    files: dict[str, bytes]
    diff_id: str
    size: int


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: gzip.GzipFile) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


@pytest.fixture(scope="module")
def layout() -> Iterator[Layout]:
    """Name: layout. Scope: module. The archive extracted into a temporary directory, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="kpt-image-"))
    try:
        with tarfile.open(IMAGE) as tar:
            members = tar.getmembers()
            for m in members:  # an image layout holds plain files and directories, all below its root
                assert m.isfile() or m.isdir(), m.name
                assert not m.name.startswith("/") and ".." not in m.name.split("/"), m.name
            # The "data" filter where this Python has it (bookworm's 3.11.2 does not).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp / "oci", members=members, **safe)  # type: ignore[arg-type]
        yield Layout(tmp / "oci")
    finally:
        shutil.rmtree(tmp)


WANTED = re.compile(rf"^(var/lib/dpkg/status|{re.escape(SITE)}/kproxy/bpf/obj/[^/]+\.o)$")


@pytest.fixture(scope="module")
def rootfs(layout: Layout) -> Rootfs:
    """Name: rootfs. Scope: module. Depends: layout. The layer's member list and digest (diff_id)."""
    (layer,) = layout.manifest["layers"]
    members: dict[str, Member] = {}
    files: dict[str, bytes] = {}
    with gzip.open(layout.blob(layer)) as gz:
        stream = _Hashing(gz)
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for m in tar:
                name = m.name.removeprefix("./").rstrip("/")
                members[name] = Member(m.type, m.size, m.linkname)
                if m.isfile() and WANTED.match(name):
                    f = tar.extractfile(m)
                    assert f is not None
                    files[name] = f.read()
        while stream.read(1 << 20):  # the end-of-archive padding belongs to the digest too
            pass
    return Rootfs(members, files, "sha256:" + stream.hash.hexdigest(), stream.size)


def dpkg_packages(status: bytes) -> set[str]:
    packages = set()
    for block in status.decode().split("\n\n"):
        name = re.search(r"^Package: (\S+)$", block, re.M)
        if name and re.search(r"^Status: install ok installed$", block, re.M):
            packages.add(name.group(1))
    return packages


def dockerfile_runtime() -> dict[str, Any]:
    """ENTRYPOINT, CMD and ENV of the Dockerfile's runtime stage."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    runtime = text.split(" AS runtime", 1)[1]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV\s+(.*)$", runtime, re.M))))
    return {
        "Entrypoint": json.loads(re.search(r"^ENTRYPOINT\s+(.*)$", runtime, re.M).group(1)),  # type: ignore[union-attr]
        "Cmd": json.loads(re.search(r"^CMD\s+(.*)$", runtime, re.M).group(1)),  # type: ignore[union-attr]
        "Env": env,
    }


# --- the archive and its config ---------------------------------------------------------------------------


def test_archive_is_an_oci_layout_tagged_with_the_version(layout: Layout) -> None:
    with tarfile.open(IMAGE) as tar:
        names = tar.getnames()
    assert names == sorted(names), "archive members are not sorted"
    assert {n.split("/")[0] for n in names} == {"oci-layout", "index.json", "blobs"}
    assert json.loads((layout.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}

    (desc,) = layout.index["manifests"]
    assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == VERSION
    assert desc["annotations"]["io.containerd.image.name"] == f"docker.io/library/kproxy:{VERSION}"

    assert layout.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = layout.manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    # Every blob is where its digest says, with its size, and nothing else is stored.
    descs = [desc, layout.manifest["config"], layer]
    for d in descs:
        blob = layout.blob(d)
        assert sha256_file(blob) == d["digest"]
        assert blob.stat().st_size == d["size"]
    assert sorted(p.name for p in (layout.root / "blobs" / "sha256").iterdir()) == sorted(
        d["digest"].split(":")[1] for d in descs
    )
    assert IMAGE.stat().st_size < MAX_ARCHIVE_MIB << 20


def test_config_is_the_dockerfiles(layout: Layout) -> None:
    cfg = layout.config
    want = dockerfile_runtime()
    assert cfg["os"] == "linux"
    assert cfg["architecture"] == {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine)
    assert cfg["config"]["Entrypoint"] == want["Entrypoint"] == ["kproxy"]
    assert cfg["config"]["Cmd"] == want["Cmd"] == ["agent"]
    env = dict(e.split("=", 1) for e in cfg["config"]["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == want["Env"]["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == want["Env"]["PYTHONUNBUFFERED"] == "1"
    assert want["Env"]["PATH"] == "/opt/kproxy/bin:$PATH"
    # debian:bookworm-slim's PATH behind the virtualenv's, as the Dockerfile's ENV makes it.
    assert env["PATH"] == "/opt/kproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    labels = cfg["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    # Reproducible dates: the commit's, the same in the config, its history and the labels.
    assert cfg["created"] == labels["org.opencontainers.image.created"]
    assert [h["created"] for h in cfg["history"]] == [cfg["created"]]


# --- the root filesystem ----------------------------------------------------------------------------------


def test_rootfs_is_the_layer_the_config_names(layout: Layout, rootfs: Rootfs) -> None:
    assert layout.config["rootfs"] == {"type": "layers", "diff_ids": [rootfs.diff_id]}
    assert rootfs.size < MAX_ROOTFS_MIB << 20


def test_rootfs_has_the_runtime_packages_and_tools(rootfs: Rootfs) -> None:
    packages = dpkg_packages(rootfs.files["var/lib/dpkg/status"])
    assert set(RUNTIME_PACKAGES) | {"ca-certificates", "usr-is-merged"} <= packages
    # Merged /usr, as debian:bookworm-slim: no usrmerge (and with it no perl beyond perl-base).
    assert not {"usrmerge", "perl"} & packages
    for top in ("bin", "sbin", "lib"):
        assert rootfs.members[top].type == tarfile.SYMTYPE and rootfs.members[top].linkname == f"usr/{top}"
    missing = [t for t in TOOLS if t not in rootfs.members]
    assert not missing, f"tools the chart's containers run are missing: {missing}"
    assert rootfs.members["opt/kproxy/bin/kproxy"].type == tarfile.REGTYPE


def test_rootfs_has_no_compiler_docs_caches_or_bytecode(rootfs: Rootfs) -> None:
    packages = dpkg_packages(rootfs.files["var/lib/dpkg/status"])
    assert not sorted(p for p in packages if BUILD_PACKAGES.match(p)), "build packages in the image"
    names = rootfs.members.keys()
    assert not [n for n in names if BUILD_TOOLS.match(n)], "build tools in the image"
    apt_lists = {n for n in names if n.startswith("var/lib/apt/lists/")}
    assert apt_lists <= {"var/lib/apt/lists/partial", "var/lib/apt/lists/lock"}, "apt lists in the image"
    assert not [n for n in names if n.startswith("var/cache/apt/") and n.endswith(".deb")]
    assert not [n for n in names if n.endswith((".pyc", ".pyo")) or n.endswith("/__pycache__")]
    excluded = ("usr/share/man/", "usr/share/locale/", "usr/share/info/")
    # usr/share/info/dir: install-info's (empty) index, made by a trigger rather than shipped.
    assert not [n for n in names if n.startswith(excluded) and n != "usr/share/info/dir"]
    docs = [
        n for n, m in rootfs.members.items() if n.startswith("usr/share/doc/") and m.type == tarfile.REGTYPE
    ]
    assert docs and all(n.endswith("/copyright") for n in docs), "only copyright files under /usr/share/doc"
    # Device nodes belong to the runtime, host files to the node.
    assert not [n for n in names if n.startswith("dev/")]
    assert not {"etc/resolv.conf", "etc/hostname"} & names
    # The virtualenv runs the agent; nothing installs packages into it later.
    assert not [n for n in names if n.startswith("opt/kproxy/bin/pip")]


def test_virtualenv_ships_the_bpf_objects(rootfs: Rootfs) -> None:
    for obj in BPF_OBJECTS:
        data = rootfs.files[f"{SITE}/kproxy/bpf/obj/{obj}"]
        assert data[:4] == b"\x7fELF", obj
        assert int.from_bytes(data[18:20], "little") == EM_BPF, f"{obj} is not a BPF object"
    dist_info = [n for n in rootfs.members if re.fullmatch(rf"{re.escape(SITE)}/kproxy-[^/]+\.dist-info", n)]
    assert dist_info == [f"{SITE}/kproxy-{VERSION}.dist-info"]


# --- run it -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(layout: Layout) -> Iterator[Path]:
    """Name: bundle. Scope: module. Depends: layout, root, umoci. An OCI runtime bundle unpacked by umoci
    (its rootfs/ is what a runtime would start), removed afterwards."""
    umoci = shutil.which("umoci")
    if umoci is None:
        pytest.skip("umoci is not installed (`make image` installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="kpt-bundle-"))
    try:
        done = subprocess.run(
            [umoci, "unpack", "--image", f"{layout.root}:{VERSION}", str(tmp / "bundle")],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        yield tmp / "bundle"
    finally:
        shutil.rmtree(tmp)


def in_image(bundle: Path, layout: Layout, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run argv in the unpacked root with the image's environment only (chroot: no namespaces, no mounts)."""
    env = layout.config["config"]["Env"]
    return subprocess.run(
        ["chroot", str(bundle / "rootfs"), "/usr/bin/env", "-i", *env, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.root
def test_kproxy_version_in_the_image_reports_the_bpf_objects(bundle: Path, layout: Layout) -> None:
    runtime = json.loads((bundle / "config.json").read_text())
    assert runtime["process"]["args"] == ["kproxy", "agent"]
    assert runtime["process"]["cwd"] == "/"
    # The image's entrypoint, with `version` in place of the default command.
    done = in_image(bundle, layout, [*layout.config["config"]["Entrypoint"], "version", "-o", "json"])
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["version"] == VERSION
    assert info["bpf_object"] == f"/{SITE}/kproxy/bpf/obj/kproxy_tc.bpf.o"
    assert info["bpf_object_present"] is True
    assert info["python"].startswith("3.11.")
    # PYTHONDONTWRITEBYTECODE: running it left no bytecode behind.
    assert not list((bundle / "rootfs" / SITE / "kproxy").rglob("__pycache__"))


@pytest.mark.root
def test_tools_run_in_the_image(bundle: Path, layout: Layout) -> None:
    # Version queries only: nothing here reads or changes network or firewall state.
    for argv in (
        ["ip", "-V"],
        ["tc", "-V"],
        ["nft", "--version"],
        ["iptables-legacy", "--version"],
        ["iptables-nft", "--version"],
        ["nsenter", "--version"],
        ["mount", "--version"],
        ["sh", "-c", "echo ok"],
        ["kproxy", "cleanup-kube-proxy", "--help"],
    ):
        done = in_image(bundle, layout, argv)
        assert done.returncode == 0, f"{argv}: {done.stderr}"
