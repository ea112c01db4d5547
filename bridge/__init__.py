"""The bridge: an aiohttp front door that serves Grafana backend plugins and delegates the rest."""
