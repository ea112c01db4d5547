"""Grafana backend plugin protocol (package pluginv2)."""
