"""The coordinator's HTTP views, /metrics (`--metrics-port`) and the dashboard (`--dashboard-port`): started
together once the gRPC server serves, stopped with it; a busy port stops the start with a clear error."""

from __future__ import annotations

import errno
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy.orm import Session, sessionmaker

from coordinator.config import CoordinatorSettings
from coordinator.dashboard import DashboardServer
from coordinator.governed import GovernedRun
from coordinator.metrics import RpcMetrics, RunCollector
from coordinator.round_terms import round_terms
from coordinator.run_figures import FiguresCache


class PortUnavailable(ValueError):
    """A view cannot listen on its port (taken, or refused); the message names the option that chooses another."""


class WebViews:
    """Made before the gRPC server (its interceptor counts the RPCs), started after it."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self._settings = settings
        self._registry = CollectorRegistry() if settings.metrics_port else None
        # No metrics port: no interceptor, and RPCs cost what they did.
        self.interceptors = [RpcMetrics(self._registry)] if self._registry is not None else []
        self._metrics: WSGIServer | None = None
        self._dashboard: DashboardServer | None = None
        self.metrics_url = ""
        self.dashboard_url = ""

    def start(self, sessions: sessionmaker[Session], run_id: str, governed: GovernedRun | None) -> None:
        """Serve both views (those with a port); PortUnavailable, with nothing left serving, if one cannot bind."""
        settings, run = self._settings, self._settings.run
        if not (settings.metrics_port or settings.dashboard_port):
            return
        terms = round_terms(run, governed)
        figures = FiguresCache(sessions, run_id, run.total_rounds, live_within_seconds=3 * run.heartbeat_seconds,
                               voted_mixture=lambda round_: terms(round_).mixture)
        shown_host = settings.announce or settings.host
        try:
            if self._registry is not None:
                self._registry.register(RunCollector(figures))
                self._metrics = _bind("metrics", "--metrics-port", settings.host, settings.metrics_port,
                                      lambda: start_http_server(settings.metrics_port, addr=settings.host,
                                                                registry=self._registry)[0])
                self.metrics_url = f"http://{shown_host}:{settings.metrics_port}/metrics"
            if settings.dashboard_port:
                self._dashboard = _bind("dashboard", "--dashboard-port", settings.host, settings.dashboard_port,
                                        lambda: DashboardServer(settings.host, settings.dashboard_port, figures))
                self._dashboard.start()
                self.dashboard_url = f"http://{shown_host}:{settings.dashboard_port}/"
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        if self._dashboard is not None:
            self._dashboard.stop()
            self._dashboard = None


def _bind(what: str, option: str, host: str, port: int, bind):  # type: ignore[no-untyped-def]
    """bind(), its OSError said as what to do about it."""
    try:
        return bind()
    except OSError as error:
        why = ("is in use (another coordinator, or another program)" if error.errno == errno.EADDRINUSE
               else f"cannot be listened on ({error.strerror})")
        raise PortUnavailable(f"the {what} port {port} on {host} {why}: choose a free one with {option} "
                              f"(0: no {what})") from None
