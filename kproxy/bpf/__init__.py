"""BPF side of kproxy: libbpf binding, pinned maps, loader, netlink and link following, map upkeep.

The map vocabulary (layouts, flags, packing) is kproxy.abi, below this package.
"""

BPFFS_ROOT = "/sys/fs/bpf"  # where the kernel provides an empty directory for a bpf filesystem
DEFAULT_BPFFS = f"{BPFFS_ROOT}/kproxy"  # the agent's pin directory (the chart's kproxy.pinDir too)
