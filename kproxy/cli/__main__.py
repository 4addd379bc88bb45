"""`python -m kproxy.cli ...`: the same as `python -m kproxy` and the `kproxy` command."""

from kproxy.cli import main

main(prog_name="kproxy")
