"""docs/cli.md is the `--help` of every command, exactly: regenerate it and compare."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kproxy import cli_docs
from kproxy.cli import main


def test_cli_md_matches_the_generator() -> None:
    committed = cli_docs.DOC_PATH.read_text()
    assert committed == cli_docs.render(), "docs/cli.md is out of date: run `python -m kproxy.cli_docs`"


@pytest.mark.parametrize("path", [path for path, _ in cli_docs.command_helps()])
def test_each_section_is_what_help_prints(path: str) -> None:
    args = path.split()[1:]
    out = CliRunner().invoke(main, [*args, "--help"], prog_name="kproxy")
    assert out.exit_code == 0, out.output
    section = cli_docs.DOC_PATH.read_text().split(f"## `{path}`\n\n```text\n", 1)[1].split("\n```\n", 1)[0]
    assert section == out.output.rstrip("\n")


def test_every_command_is_documented() -> None:
    paths = {p for p, _ in cli_docs.command_helps()}
    for cmd in ("agent", "dsr enable", "dsr disable", "dsr status", "nat", "stats", "cleanup-kube-proxy"):
        assert f"kproxy {cmd}" in paths
