"""The netns mini-cluster used by tests, the demo and the benchmarks (see cluster.py)."""

from kproxy.lab.cluster import Host, Lab, Node, Pod, Stream

__all__ = ["Host", "Lab", "Node", "Pod", "Stream"]
