"""kproxy.bpf.reserved_ports: parsing and merging net.ipv4.ip_local_reserved_ports, and reserve/release
against a stand-in file (KPROXY_PROC_SYS_NET), never the real sysctl."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxy.bpf import reserved_ports as rp
from kproxy.config import AgentConfig

NODE_PORTS = (30000, 32767)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", []),
        ("\n", []),
        ("8080", [(8080, 8080)]),
        ("8080,30000-32767\n", [(8080, 8080), (30000, 32767)]),
        ("30000-32767,8080", [(8080, 8080), (30000, 32767)]),  # unsorted
        ("1-3,2-5,7", [(1, 5), (7, 7)]),  # overlapping
        ("10-20,21-30", [(10, 30)]),  # adjacent
        ("10-20,22-30", [(10, 20), (22, 30)]),  # a gap of one port stays
        (" 5 , 6 ", [(5, 6)]),
        ("0-65535", [(0, 65535)]),
    ],
)
def test_parse(text: str, want: list[rp.Range]) -> None:
    assert rp.parse(text) == want


@pytest.mark.parametrize(
    "text", ["abc", "1-", "-5", "5-3", "70000", "1-70000", "1;2", "1 2", "0x10", "1-2-3"]
)
def test_malformed_content_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        rp.parse(text)


@pytest.mark.parametrize(
    ("have", "want", "missing"),
    [
        ("", NODE_PORTS, [NODE_PORTS]),
        ("30000-32767", NODE_PORTS, []),
        ("20000-40000", NODE_PORTS, []),  # covered by a larger range
        ("30000-31000,31001-32767", NODE_PORTS, []),  # by adjacent ones
        ("30000-31000", NODE_PORTS, [(31001, 32767)]),
        ("31000-31010,8080", NODE_PORTS, [(30000, 30999), (31011, 32767)]),
        ("32767", NODE_PORTS, [(30000, 32766)]),
    ],
)
def test_missing(have: str, want: rp.Range, missing: list[rp.Range]) -> None:
    assert rp.missing(rp.parse(have), want) == missing


def test_render_and_subtract() -> None:
    assert rp.render([(30000, 32767), (8080, 8080), (8081, 8081)]) == "8080-8081,30000-32767"
    assert rp.render([]) == ""
    assert rp.subtract(rp.parse("8080,20000-40000"), [NODE_PORTS]) == [
        (8080, 8080),
        (20000, 29999),
        (32768, 40000),
    ]
    assert rp.subtract(rp.parse("8080"), [NODE_PORTS]) == [(8080, 8080)]


@pytest.fixture
def sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc-sys-net"
    (root / "ipv4").mkdir(parents=True)
    monkeypatch.setenv(rp.PROC_SYS_NET_ENV, str(root))
    (root / "ipv4/ip_local_port_range").write_text("32768\t60999\n")  # the kernel's default
    path = root / rp.SYSCTL
    path.write_text("\n")
    return path


def test_reserve_merges_records_and_release_removes_only_its_own(sysctl: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    sysctl.write_text("8080,31000-31010\n")
    assert rp.reserve(NODE_PORTS, state) == [(30000, 30999), (31011, 32767)]
    assert sysctl.read_text() == "8080,30000-32767\n"
    # covered now: nothing written (a write would change the file's mtime)
    before = sysctl.stat().st_mtime_ns
    assert rp.reserve(NODE_PORTS, state) == []
    assert sysctl.stat().st_mtime_ns == before
    # another entry added meanwhile survives the release, as do the ports that were there before
    sysctl.write_text("8080,9000,30000-32767\n")
    assert rp.release(state) == [(30000, 30999), (31011, 32767)]
    assert rp.parse(sysctl.read_text()) == [(8080, 8080), (9000, 9000), (31000, 31010)]
    assert rp.release(state) == []  # the record is gone with the release


def test_release_without_a_record_touches_nothing(sysctl: Path, tmp_path: Path) -> None:
    sysctl.write_text("30000-32767\n")  # reserved by someone else (or the record was lost)
    assert rp.reserve(NODE_PORTS, tmp_path / "state") == []
    assert rp.release(tmp_path / "state") == []
    assert sysctl.read_text() == "30000-32767\n"


def test_malformed_content_is_never_rewritten(sysctl: Path, tmp_path: Path) -> None:
    sysctl.write_text("garbage\n")
    with pytest.raises(ValueError):
        rp.reserve(NODE_PORTS, tmp_path / "state")
    assert sysctl.read_text() == "garbage\n"


@pytest.mark.parametrize(
    ("port_range", "have"),
    [
        ("30000\t32767\n", "\n"),  # ip_local_port_range inside the NodePort range
        ("31000\t33000\n", "32768-33000\n"),  # with others' entries, nothing would be left either
    ],
)
def test_a_merge_that_would_leave_no_ephemeral_port_is_refused(
    sysctl: Path, tmp_path: Path, port_range: str, have: str
) -> None:
    """Every ephemeral port reserved fails each connect() without a bound port on the node
    (EADDRNOTAVAIL): the agent must refuse, write nothing and record nothing."""
    (sysctl.parent / "ip_local_port_range").write_text(port_range)
    sysctl.write_text(have)
    with pytest.raises(ValueError, match="ip_local_port_range .* ephemeral"):
        rp.reserve(NODE_PORTS, tmp_path / "state")
    assert sysctl.read_text() == have
    assert rp.release(tmp_path / "state") == []


def test_a_merge_that_leaves_some_ephemeral_ports_is_written(sysctl: Path, tmp_path: Path) -> None:
    (sysctl.parent / "ip_local_port_range").write_text("32000\t60999\n")  # overlaps, ports remain
    assert rp.reserve(NODE_PORTS, tmp_path / "state") == [NODE_PORTS]
    assert sysctl.read_text() == "30000-32767\n"


def test_node_port_range_flag() -> None:
    cfg = AgentConfig(node_name="n", node_ips=["192.0.2.1"])
    assert (cfg.node_port_min, cfg.node_port_max, cfg.protect_node_port_range) == (30000, 32767, True)
    with pytest.raises(ValueError, match="node-port-range"):
        AgentConfig(node_name="n", node_ips=["192.0.2.1"], node_port_min=32000, node_port_max=31000)


def _protect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protect: bool) -> None:
    from kproxy.agent.dataplane import Dataplane
    from kproxy.observe import metadata

    monkeypatch.setenv(metadata.STATE_ROOT_ENV, str(tmp_path / "run"))
    c = AgentConfig(
        node_name="n", node_ips=["192.0.2.1"], bpffs=str(tmp_path / "bpffs"), protect_node_port_range=protect
    )
    Dataplane(c).protect_node_ports()


def test_agent_warnings_say_what_failed(
    sysctl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure to take the agent's own range out (--no-protect-node-port-range) is reported as that,
    not as a failure to protect the range the flag turned off."""
    _protect(tmp_path, monkeypatch, True)
    assert sysctl.read_text() == "30000-32767\n"
    sysctl.write_text("garbage\n")
    caplog.clear()
    _protect(tmp_path, monkeypatch, False)
    msg = caplog.text
    assert "--no-protect-node-port-range: cannot take the ports" in msg and "garbage" in msg, msg
    assert "cannot keep the NodePort range" not in msg, msg
    assert sysctl.read_text() == "garbage\n"


class _NoLoader:
    def attached(self) -> list[object]:
        return []

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_cleanup_names_the_ports_it_could_not_release(
    sysctl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`kproxy cleanup` / an uninstall deletes the record with the state directory: a failed release
    must say which ports stay reserved, not pass in silence."""
    from kproxy.bpf.teardown import remove_dataplane

    _protect(tmp_path, monkeypatch, True)
    sysctl.write_text("garbage\n")
    caplog.clear()
    detached = remove_dataplane(str(tmp_path / "bpffs"), _NoLoader())  # type: ignore[arg-type]
    assert detached == []
    assert "cannot take 30000-32767 out of net.ipv4.ip_local_reserved_ports" in caplog.text, caplog.text
    assert "garbage" in caplog.text
