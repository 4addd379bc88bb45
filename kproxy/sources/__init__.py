"""Where the cluster view comes from: the Kubernetes API (kube.py) or manifest files (files.py)."""
