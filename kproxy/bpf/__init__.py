"""BPF side of kproxy: ABI mirror, libbpf binding, pinned maps, loader and link following."""
