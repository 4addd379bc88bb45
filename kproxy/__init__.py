"""kproxy: a pure-eBPF replacement for kube-proxy."""

__version__ = "0.1.0"
