"""Find, verify, launch and supervise Grafana backend plugins; talk to them over pluginv2."""
