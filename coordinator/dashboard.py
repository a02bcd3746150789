"""The run's live web page (`--dashboard-port`): read-only, no login, what `essaim status` shows and more.

One page (coordinator/dashboard.html, bundled: it loads nothing from the internet, and its
Content-Security-Policy forbids it to) draws its charts as SVG from `/api/summary`, which it
fetches again every few seconds. The summary comes from the figures the metrics share
(coordinator/run_figures.py): however many people watch, the database is read at most once a
second, and a reading is turned into JSON once.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import defaultdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from coordinator.mixture import target_shares
from coordinator.energy import JOULES_PER_KWH
from coordinator.run_figures import FiguresCache, InstitutionEnergy, RunFigures
from coordinator.verification import CREDIT_STATES

log = logging.getLogger("essaim.dashboard")

PAGE = Path(__file__).with_name("dashboard.html")
LOSS_POINTS = 400      # the loss chart's rounds: a long run's are thinned to about this many
RECENT_ROUNDS = 20     # rounds whose group sizes and energy the page draws
EVALUATED_ROUNDS = 100  # evaluations of the newest rounds evaluated
# The page runs its own inline script and style, and talks to this server only.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")


def summary(figures: RunFigures) -> dict[str, Any]:
    """The page's data: plain JSON, with no key, name of a file or anything `essaim status` would not show."""
    targets = target_shares({source.name: source.weight for source in figures.sources})
    by_source: dict[str, int] = defaultdict(int)
    by_institution: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(CREDIT_STATES, 0))
    for row in figures.trained:
        by_source[row.source] += row.tokens
        by_institution[row.institution][row.verification] += row.tokens
    trained = sum(by_source.values())
    energy = {row.institution: row for row in figures.energy}
    rounds = figures.rounds
    step = max(1, -(-len(rounds) // LOSS_POINTS))
    thinned = rounds[::step] + ([rounds[-1]] if rounds and (len(rounds) - 1) % step else [])
    evaluated = sorted({e.round for e in figures.evaluations})[-EVALUATED_ROUNDS:]
    by_class: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_device: dict[str, int] = defaultdict(int)
    for group in figures.live:
        by_class[group.trust_class][0] += group.workers
        by_class[group.trust_class][1] += group.tokens_per_second
        by_device[group.device] += group.workers
    return {
        "run_id": figures.run_id,
        "read_at": figures.read_at,
        "round": figures.current_round,
        "total_rounds": figures.total_rounds,
        "rounds_decided": len(rounds),
        "workers": {
            "registered": figures.workers_total,
            "live": figures.live_workers,
            "by_trust_class": [{"name": name, "workers": int(count), "tokens_per_second": rate}
                               for name, (count, rate) in sorted(by_class.items())],
            "by_device": [{"name": name, "workers": count} for name, count in sorted(by_device.items())],
        },
        "tokens_per_second": figures.tokens_per_second,
        "leases_out": figures.leases_out,
        "tokens_out": figures.tokens_out,
        "leases_expired": figures.leases_expired,
        "epoch": {"number": figures.epoch.epoch, "tokens": figures.epoch.tokens, "trained": figures.epoch.trained,
                  "eta_seconds": figures.eta_seconds, "read_at": figures.epoch.read_at},
        "loss": [{"round": r.number, "loss": r.mean_loss} for r in thinned],
        "recent_rounds": [
            {"round": r.number, "reports": r.reports, "tokens": r.tokens, "loss": r.mean_loss, "group_size": r.group_size,
             "wall_seconds": r.wall_seconds, "bytes": r.bytes_averaged, "energy_kwh": r.energy_joules / JOULES_PER_KWH}
            for r in rounds[-RECENT_ROUNDS:]
        ],
        "sources": [
            {"name": source.name, "language": source.language, "target_share": targets.get(source.name, 0.0),
             "tokens": by_source.get(source.name, 0),
             "share": by_source.get(source.name, 0) / trained if trained else 0.0}
            for source in figures.sources
        ],
        "institutions": sorted((_institution(name, by_institution, energy) for name in {*by_institution, *energy}),
                               key=lambda row: (-row["tokens"], row["name"])),
        "energy": {"kwh": sum(row.energy_joules for row in figures.energy) / JOULES_PER_KWH,
                   "emissions_kg": sum(row.emissions_grams for row in figures.energy) / 1000},
        "evaluations": [{"round": e.round, "group": e.group, "name": e.name, "loss": e.loss,
                         "bits_per_byte": e.bits_per_byte}
                        for e in figures.evaluations if evaluated and e.round >= evaluated[0]],
    }


def _institution(name: str, by_institution: dict[str, dict[str, int]], energy: dict[str, InstitutionEnergy]
                 ) -> dict[str, Any]:
    """An institution's tokens by what checks found, and what its workers' rounds cost (either may be none)."""
    states = by_institution.get(name) or dict.fromkeys(CREDIT_STATES, 0)
    spent = energy.get(name)
    return {"name": name, "tokens": sum(states.values()), **states,
            "energy_kwh": spent.energy_joules / JOULES_PER_KWH if spent else 0.0,
            "emissions_kg": spent.emissions_grams / 1000 if spent else 0.0}


class SummaryJson:
    """The summary of the current figures as JSON bytes, made once per reading however many ask."""

    def __init__(self, figures: FiguresCache) -> None:
        self._figures = figures
        self._lock = threading.Lock()
        self._made_from: RunFigures | None = None
        self._body = b""

    def body(self) -> bytes:
        figures = self._figures.current()
        with self._lock:
            if figures is not self._made_from:
                self._body = json.dumps(summary(figures), separators=(",", ":")).encode()
                self._made_from = figures
            return self._body


class DashboardServer:
    """The page and its JSON on host:port, served from a daemon thread until `stop()`."""

    def __init__(self, host: str, port: int, figures: FiguresCache) -> None:
        page, data = PAGE.read_bytes(), SummaryJson(figures)

        class Handler(_DashboardHandler):
            routes = {"/": (page, "text/html; charset=utf-8"), "/api/summary": (data, "application/json")}

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # the gRPC server's host, either kind
            daemon_threads = True

        self._server = Server((host, port), Handler)  # binds now: a busy port fails here
        self._thread = threading.Thread(target=self._server.serve_forever, name="essaim-dashboard", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class _DashboardHandler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[bytes | SummaryJson, str]] = {}
    server_version = "essaim-dashboard"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(HTTPStatus.NOT_FOUND, "this dashboard serves / and /api/summary only")
            return
        content, content_type = route
        try:
            body = content.body() if isinstance(content, SummaryJson) else content
        except Exception:  # the database, busy or gone for a moment: the page keeps its data and asks again
            log.exception("the dashboard could not read the run's figures")
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "the run's figures could not be read just now")
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)
