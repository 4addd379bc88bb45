"""Where the cluster view comes from: the Kubernetes API (kube/) or manifest files (files.py)."""
