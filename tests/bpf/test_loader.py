"""kproxy.bpf.loader against the real kernel, in throw-away network namespaces.

Attach/detach run in a subprocess entered into the namespace with nsenter (a netns switch affects
only the calling thread; the agent itself runs that way), sharing the test's private bpffs.
"""

from __future__ import annotations

import ctypes
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kproxy import abi
from kproxy.bpf import libbpf as lb
from kproxy.bpf.loader import Loader, LoaderError, MapParamsMismatch, parse_pin_name, pin_name

pytestmark = pytest.mark.root


def in_ns(ns: Any, body: str, **params: Any) -> Any:
    """Run `body` in the namespace with `loader` = Loader(**params); it sets `out`, returned as JSON."""
    code = (
        "import json\nfrom kproxy.bpf.loader import Loader\n"
        f"loader = Loader(**{params!r})\nout = None\n" + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    )
    proc = ns.python(code)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bpffs_files(bpffs: Path) -> set[str]:
    # progs.debug and maps.debug belong to the bpffs mount itself.
    return {str(p.relative_to(bpffs)) for p in bpffs.rglob("*")} - {"progs.debug", "maps.debug"}


def test_pin_names_escape_dots() -> None:
    assert pin_name("eth0.100", "ingress") == "eth0%2E100:ingress"
    assert "." not in pin_name("a.b%c", "egress")
    assert parse_pin_name(pin_name("a.b%2Ec", "egress")) == ("a.b%2Ec", "egress")


def test_tcx_attach_upgrade_readopt_cleanup(
    netns: Callable[[], Any], bpffs: Path, probe_object: Path
) -> None:
    ns = netns()
    ns.veth("kpv0", "kpv1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(probe_object)}
    first = in_ns(
        ns,
        """
        loader.load()
        a = loader.attach("kpv0", "ingress", "kp_from_pod")
        b = loader.attach("kpv0", "egress", "kp_to_pod")
        out = [a.mode, a.program, a.prog_id, a.link_id, b.program, sorted(x.pin for x in loader.attached())]
        """,
        **params,
    )
    mode, prog, prog_id, link_id, egress_prog, pins = first
    assert (mode, prog, egress_prog) == ("tcx", "kp_from_pod", "kp_to_pod")
    assert pins == [str(bpffs / "links" / "kpv0:egress"), str(bpffs / "links" / "kpv0:ingress")]
    assert {abi.MAP_SVC4, "links/kpv0:ingress", "links/kpv0:egress"} <= bpffs_files(bpffs)

    # The first process is gone; its pinned links keep the programs attached. A second process
    # (a restarted or upgraded agent) adopts the link and swaps the program in place.
    second = in_ns(
        ns,
        """
        loader.load()
        before = {a.direction: (a.link_id, a.prog_id, a.program) for a in loader.attached()}
        a = loader.attach("kpv0", "ingress", "kp_to_pod")
        out = [before["ingress"], a.link_id, a.prog_id, a.program]
        """,
        **params,
    )
    assert second[0] == [link_id, prog_id, "kp_from_pod"]
    assert second[1] == link_id, "an upgrade must update the existing link, not create a new one"
    assert second[2] != prog_id and second[3] == "kp_to_pod"

    removed = in_ns(ns, "out = loader.detach('kpv0', 'egress')", **params)
    assert removed == 1
    assert "links/kpv0:egress" not in bpffs_files(bpffs)

    in_ns(ns, "loader.load(); loader.cleanup()", **params)
    assert bpffs_files(bpffs) == set()


def test_stale_link_of_deleted_interface_is_reconciled(
    netns: Callable[[], Any], bpffs: Path, probe_object: Path
) -> None:
    ns = netns()
    ns.veth("kpv0", "kpv1")
    ns.veth("kpw0", "kpw1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(probe_object)}
    in_ns(
        ns,
        """
        loader.attach("kpv0", "ingress", "kp_from_pod")
        loader.attach("kpw0", "ingress", "kp_from_pod")
        """,
        **params,
    )
    ns.ip("link", "del", "kpv0")
    out = in_ns(
        ns,
        """
        alive = {a.ifname: a.alive for a in loader.attached()}
        removed = loader.reconcile()
        out = [alive, removed, [a.ifname for a in loader.attached()]]
        """,
        **params,
    )
    assert out[0] == {"kpv0": False, "kpw0": True}
    assert out[1] == [str(bpffs / "links" / "kpv0:ingress")]
    assert out[2] == ["kpw0"]


def test_recreated_interface_gets_a_new_link(
    netns: Callable[[], Any], bpffs: Path, probe_object: Path
) -> None:
    ns = netns()
    ns.veth("kpv0", "kpv1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(probe_object)}
    first = in_ns(ns, "out = loader.attach('kpv0', 'ingress', 'kp_from_pod').link_id", **params)
    ns.ip("link", "del", "kpv0")
    ns.veth("kpv0", "kpv1")
    second = in_ns(
        ns, "a = loader.attach('kpv0', 'ingress', 'kp_from_pod'); out = [a.link_id, a.alive]", **params
    )
    assert second[0] != first and second[1] is True


def test_cls_bpf_fallback_replaces_in_place(
    netns: Callable[[], Any], bpffs: Path, probe_object: Path
) -> None:
    ns = netns()
    ns.veth("kpv0", "kpv1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(probe_object), "mode": "tc"}
    out = in_ns(
        ns,
        """
        import subprocess
        show = lambda: subprocess.run(["tc", "filter", "show", "dev", "kpv0", "ingress"],
                                      capture_output=True, text=True).stdout
        a = loader.attach("kpv0", "ingress", "kp_from_pod")
        s1 = show()
        b = loader.attach("kpv0", "ingress", "kp_to_pod")
        s2 = show()
        n = loader.detach("kpv0")
        out = [a.mode, s1, s2, n, show()]
        """,
        **params,
    )
    mode, s1, s2, n, s3 = out
    assert mode == "tc"
    assert "kp_from_pod" in s1 and "direct-action" in s1
    assert "kp_to_pod" in s2 and "kp_from_pod" not in s2
    assert s2.count("handle 0x1") == 1, "replace must not add a second filter"
    assert n == 1 and "bpf" not in s3


def test_uninstall_teardown_removes_cls_bpf_filters(
    netns: Callable[[], Any], bpffs: Path, probe_object: Path
) -> None:
    """Where the kernel has no tcx (before 6.6) the filters have no pin: the agent's teardown on
    uninstall goes through its own loader, which knows them (issue 12 review)."""
    ns = netns()
    ns.veth("kpv0", "kpv1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(probe_object), "mode": "tc"}
    out = in_ns(
        ns,
        """
        import subprocess
        from kproxy.bpf.teardown import remove_dataplane
        show = lambda d: subprocess.run(["tc", "filter", "show", "dev", "kpv0", d],
                                        capture_output=True, text=True).stdout
        loader.attach("kpv0", "ingress", "kp_from_pod")
        loader.attach("kpv0", "egress", "kp_to_pod")
        before = show("ingress") + show("egress")
        detached = remove_dataplane(loader.bpffs_dir, loader)
        out = [before, sorted(detached), show("ingress") + show("egress")]
        """,
        **params,
    )
    before, detached, after = out
    assert "kp_from_pod" in before and "kp_to_pod" in before
    assert detached == ["kpv0.egress", "kpv0.ingress"]
    assert "bpf" not in after
    # the kernel's own files of a bpffs mount root stay
    left = sorted(p.name for p in bpffs.iterdir() if not p.name.endswith(".debug")) if bpffs.exists() else []
    assert left == [], left


def test_map_size_mismatch_names_map_and_sizes(bpffs: Path, probe_object: Path) -> None:
    with Loader(bpffs, probe_object, map_sizes={abi.MAP_CT4: 4096}) as loader:
        loader.load()
    with (
        Loader(bpffs, probe_object, map_sizes={abi.MAP_CT4: 8192}) as loader,
        pytest.raises(MapParamsMismatch) as exc,
    ):
        loader.load()
    text = str(exc.value)
    assert "kp_ct4_v1" in text and "max_entries 4096 pinned vs 8192 requested" in text
    assert "--map-size kp_ct4_v1=4096" in text
    # the pinned size is accepted
    with Loader(bpffs, probe_object, map_sizes={abi.MAP_CT4: 4096}) as loader:
        loader.load()
        with loader.open_maps() as km:
            assert km.ct4.max_entries == 4096


def test_load_refuses_non_bpffs_directory(tmp_path: Path, probe_object: Path) -> None:
    with pytest.raises(LoaderError, match="not on a bpf filesystem"):
        Loader(tmp_path, probe_object).load()
    with pytest.raises(LoaderError, match="does not exist"):
        Loader(tmp_path / "a" / "b", probe_object).load()


def test_load_creates_subdirectory_on_bpffs(bpffs: Path, probe_object: Path) -> None:
    sub = bpffs / "kproxy"
    loader = Loader(sub, probe_object)
    loader.load()
    assert (sub / abi.MAP_SVC4).exists()
    loader.cleanup()
    assert not sub.exists()


def test_attach_unknown_interface_is_clear(bpffs: Path, probe_object: Path) -> None:
    with Loader(bpffs, probe_object) as loader, pytest.raises(LoaderError, match="no interface 'kpt-nope'"):
        loader.attach("kpt-nope", "ingress", "kp_from_pod")


def test_loader_closes_its_fds(bpffs: Path, probe_object: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with Loader(bpffs, probe_object) as loader:
            loader.load()
            loader.program("kp_from_pod")
    assert len(os.listdir("/proc/self/fd")) == before
    Loader(bpffs, probe_object).cleanup()


def test_real_object_loads(bpffs: Path, tc_object: Path) -> None:
    with Loader(bpffs, tc_object) as loader:
        obj = loader.load()
        for name in ("kp_from_pod", "kp_to_pod", "kp_from_netdev", "kp_to_netdev"):
            assert lb.prog_info(obj.program(name).fd).name == name
    Loader(bpffs, tc_object).cleanup()
    assert bpffs_files(bpffs) == set()


def test_pins_of_an_agent_that_used_the_parent_are_taken_over(bpffs: Path, probe_object: Path) -> None:
    """The chart pinned at the root of /sys/fs/bpf before it used /sys/fs/bpf/kproxy: the new agent moves
    those pins into its directory and adopts them (state kept; links updated, not duplicated)."""
    from kproxy.bpf.loader import prepare_pin_dir

    with Loader(bpffs, probe_object) as old:
        old.load()
        with old.open_maps() as km:
            km.be4.put_many([(ctypes.c_uint32(7), abi.Be4Val(abi.ip_to_nbo("10.0.0.7"), 80, 6, 0, 0))])
    (bpffs / "unrelated_tool_pin").mkdir()
    new_dir = bpffs / "kproxy"
    done = prepare_pin_dir(new_dir, bpffs_root=str(bpffs))
    assert done and done[-1].startswith(f"moved the pins of an earlier agent from {bpffs} to {new_dir}")
    assert not (bpffs / abi.MAP_SVC4).exists() and (new_dir / abi.MAP_SVC4).exists()
    assert (bpffs / "unrelated_tool_pin").is_dir(), "only kproxy's own pins move"
    with Loader(new_dir, probe_object) as new:
        new.load()
        with new.open_maps() as km:
            got = km.be4.get(ctypes.c_uint32(7))
            assert got is not None and abi.nbo_to_ip(got.addr) == "10.0.0.7"
    assert prepare_pin_dir(new_dir, bpffs_root=str(bpffs)) == [], "a second start moves nothing"
    Loader(new_dir, probe_object).cleanup()


def test_xdp_attach_upgrade_listing_and_detach(
    netns: Callable[[], Any], bpffs: Path, tc_object: Path
) -> None:
    """Native XDP through a pinned link (a veth has native XDP): a second loader (an agent restart or
    upgrade) swaps the program in the same link; attached() lists it, cleanup removes it."""
    ns = netns()
    ns.veth("kpv0", "kpv1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(tc_object)}
    refused = in_ns(
        ns,
        "from kproxy.bpf.loader import XdpUnsupported\nloader.load()\n"
        "try:\n    loader.attach_xdp('kpv0')\n    out = 'attached'\n"
        "except XdpUnsupported as e:\n    out = str(e)",
        **params,
    )
    assert refused.startswith("kpv0 is a veth: XDP_TX from it reaches nothing unless its peer runs XDP"), (
        refused
    )
    first = in_ns(
        ns,
        "loader.load(); a = loader.attach_xdp('kpv0', allow_veth=True)\n"
        "out = [a.mode, a.direction, a.program, a.link_id, a.prog_id]",
        **params,
    )
    assert first[:3] == ["xdp", "xdp", "kp_xdp"]
    assert "links/kpv0:xdp" in bpffs_files(bpffs)
    assert "xdp" in ns.ip("link", "show", "kpv0").stdout
    second = in_ns(
        ns,
        "loader.load(); a = loader.attach_xdp('kpv0', allow_veth=True)\n"
        "out = [a.link_id, a.prog_id, [x.mode for x in loader.attached()]]",
        **params,
    )
    assert second[0] == first[3] and second[1] != first[4], "an upgrade updates the link in place"
    assert second[2] == ["xdp"]
    assert in_ns(ns, "out = [loader.detach_xdp('kpv0'), loader.detach_xdp('kpv0')]", **params) == [
        True,
        False,
    ]
    assert "prog/xdp" not in ns.ip("-d", "link", "show", "kpv0").stdout
    in_ns(ns, "loader.load(); loader.attach_xdp('kpv0', allow_veth=True); loader.cleanup()", **params)
    assert bpffs_files(bpffs) == set() and "prog/xdp" not in ns.ip("-d", "link", "show", "kpv0").stdout


def test_xdp_ifindex_follows_the_live_link_and_cleanup_empties_xdevs_first(
    netns: Callable[[], Any], bpffs: Path, tc_object: Path
) -> None:
    """xdp_ifindex: the interface kproxy's XDP link runs on; None once the interface is gone, also when
    a new one took its name (the link died with the old one). cleanup empties kp_xdevs_v1 before it
    removes any XDP program."""
    ns = netns()
    ns.veth("kpv0", "kpv1")
    params = {"bpffs_dir": str(bpffs), "object_path": str(tc_object)}
    got = in_ns(
        ns,
        """
        import socket
        loader.load()
        loader.attach_xdp('kpv0', allow_veth=True)
        out = [loader.xdp_ifindex('kpv0'), socket.if_nametoindex('kpv0'), loader.xdp_ifindex('kpv1')]
        """,
        **params,
    )
    assert got[0] == got[1] and got[2] is None
    ns.ip("link", "del", "kpv0")
    ns.veth("kpv0", "kpv1")
    assert in_ns(ns, "out = loader.xdp_ifindex('kpv0')", **params) is None
    order = in_ns(
        ns,
        """
        import ctypes, socket
        from kproxy import abi
        from kproxy.bpf import libbpf as lb
        loader.load()
        loader.attach_xdp('kpv0', allow_veth=True)
        maps = loader.open_maps()
        maps.xdevs.put(ctypes.c_uint32(socket.if_nametoindex('kpv0')), abi.XdevVal(0))
        maps.close()
        seen = []
        real = loader._detach_pin
        def detach(pin):
            with lb.Map.open_pinned(loader.bpffs_dir + '/' + abi.MAP_XDEVS) as m:
                seen.append(len(list(m.iter_keys())))
            real(pin)
        loader._detach_pin = detach
        loader.cleanup()
        out = seen
        """,
        **params,
    )
    assert order and set(order) == {0}, order
    assert bpffs_files(bpffs) == set()


def test_xdp_on_a_device_without_native_xdp_is_refused_clearly(
    netns: Callable[[], Any], bpffs: Path, tc_object: Path
) -> None:
    """A bridge has no native XDP: XdpUnsupported names it (never generic XDP, slower than TC)."""
    ns = netns()
    ns.ip("link", "add", "kpd0", "type", "bridge")
    ns.ip("link", "set", "kpd0", "up")
    out = in_ns(
        ns,
        """
        from kproxy.bpf.loader import XdpUnsupported
        loader.load()
        try:
            loader.attach_xdp('kpd0')
            out = 'attached'
        except XdpUnsupported as e:
            out = str(e)
        """,
        bpffs_dir=str(bpffs), object_path=str(tc_object),
    )  # fmt: skip
    assert out.startswith("kpd0's driver refuses native XDP") or out.startswith("kpd0 has no native XDP"), out
    assert "links/kpd0:xdp" not in bpffs_files(bpffs)
