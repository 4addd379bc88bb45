"""`python -m kproxy ...` is the `kproxy` command (the lab starts agents this way)."""

from kproxy.cli import main

main(prog_name="kproxy")
