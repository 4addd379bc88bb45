"""Operability: health endpoints (health.py), Prometheus metrics (metrics.py) and map inspection."""
