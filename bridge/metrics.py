"""The bridge's own Prometheus metrics, named as Grafana names its plugin metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from plugin_host.supervisor import PluginState, PluginStatus

_MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_S_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class BridgeMetrics:
    """All metrics of one bridge, in a registry of their own (not the process-global one)."""

    def __init__(self, statuses: Callable[[], list[PluginStatus]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.plugin_requests = Counter(
            "grafana_plugin_request",
            "Requests the bridge made to plugins, by plugin, endpoint and outcome.",
            ("plugin_id", "endpoint", "status", "target"),
            registry=self.registry,
        )
        self.plugin_duration = Histogram(
            "grafana_plugin_request_duration_milliseconds",
            "Time plugins took to answer, in milliseconds.",
            ("plugin_id", "endpoint", "target"),
            buckets=_MS_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "grafana_bridge_http_requests",
            "HTTP requests the bridge answered itself, by endpoint and status code.",
            ("endpoint", "code"),
            registry=self.registry,
        )
        self.delegated = Counter(
            "grafana_bridge_delegated_requests",
            "Requests passed on to the Grafana delegate, by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.delegated_duration = Histogram(
            "grafana_bridge_delegated_request_duration_seconds",
            "Time the Grafana delegate took to answer, headers included, in seconds.",
            ("method",),
            buckets=_S_BUCKETS,
            registry=self.registry,
        )
        self.route_table_services = Gauge(
            "grafana_bridge_route_table_services",
            "DataPlaneServices mounted in the current route table.",
            registry=self.registry,
        )
        self.route_table_swaps = Counter(
            "grafana_bridge_route_table_swaps",
            "Times the route table was replaced.",
            registry=self.registry,
        )
        self.registry.register(_PluginCollector(statuses))
        # The bridge process itself (RSS, fds, CPU) and its event loop's task count: what the
        # soak and chaos suites watch for leaks (docs/reliability.md).
        ProcessCollector(registry=self.registry)
        self.asyncio_tasks = Gauge(
            "grafana_bridge_asyncio_tasks",
            "asyncio tasks alive on the bridge's event loop (sampled at scrape time).",
            registry=self.registry,
        )
        self.asyncio_tasks.set_function(_asyncio_tasks)

    def observe_delegated(self, method: str, code: int, seconds: float) -> None:
        self.delegated.labels(method, str(code)).inc()
        self.delegated_duration.labels(method).observe(seconds)

    @contextmanager
    def plugin_call(self, plugin_id: str, endpoint: str) -> Iterator[None]:
        """Count and time one plugin call; outcomes are Grafana's ok, error and cancelled."""
        started = perf_counter()
        status = "error"
        try:
            yield
            status = "ok"
        except BaseException as exc:
            if type(exc).__name__ == "CancelledError":
                status = "cancelled"
            raise
        finally:
            self.plugin_requests.labels(plugin_id, endpoint, status, "local").inc()
            self.plugin_duration.labels(plugin_id, endpoint, "local").observe(
                (perf_counter() - started) * 1000
            )


class _PluginCollector(Collector):
    """Plugin process figures, read from the supervisors at scrape time."""

    def __init__(self, statuses: Callable[[], list[PluginStatus]]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "grafana_bridge_plugin_state",
            "1 for the state each plugin is in, 0 for the others.",
            labels=("plugin_id", "state"),
        )
        restarts = GaugeMetricFamily(
            "grafana_bridge_plugin_restarts",
            "Times the plugin was restarted since the bridge started.",
            labels=("plugin_id",),
        )
        rss = GaugeMetricFamily(
            "grafana_bridge_plugin_resident_memory_bytes",
            "Resident memory of the plugin process.",
            labels=("plugin_id",),
        )
        cpu = GaugeMetricFamily(
            "grafana_bridge_plugin_cpu_percent",
            "CPU use of the plugin process since the previous sample, in percent of one core.",
            labels=("plugin_id",),
        )
        fds = GaugeMetricFamily(
            "grafana_bridge_plugin_open_fds",
            "Open file descriptors of the plugin process.",
            labels=("plugin_id",),
        )
        exit_code = GaugeMetricFamily(
            "grafana_bridge_plugin_last_exit_code",
            "Exit status of the plugin's last process (negative: killed by that signal).",
            labels=("plugin_id",),
        )
        for status in self._statuses():
            pid = status.plugin_id
            for candidate in PluginState:
                state.add_metric((pid, str(candidate)), 1.0 if status.state is candidate else 0.0)
            restarts.add_metric((pid,), float(status.restarts))
            if status.last_exit_code is not None:
                exit_code.add_metric((pid,), float(status.last_exit_code))
            if status.stats is not None:
                rss.add_metric((pid,), float(status.stats.rss_bytes))
                cpu.add_metric((pid,), status.stats.cpu_percent)
                fds.add_metric((pid,), float(status.stats.open_fds))
        yield from (state, restarts, rss, cpu, fds, exit_code)


def _asyncio_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped from a thread without a running loop
        return float("nan")
