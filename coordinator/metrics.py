"""The coordinator's Prometheus metrics (`--metrics-port`): what the run does, and what its RPCs cost.

Two sources: the run's figures, read from the database through the cache the dashboard
shares (coordinator/run_figures.py), so a scrape never scans the database itself; and every
RPC's latency and refusal, counted by a gRPC server interceptor as the calls go through. The
metrics live in a registry of their own: nothing else a process imports lands in it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from coordinator.run_figures import FiguresCache, RunFigures
from protocol import essaim_pb2 as pb

RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUND_SECONDS_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
GROUP_SIZE_BUCKETS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256)


class RpcMetrics(grpc.ServerInterceptor):
    """Each RPC's latency, and its refusals by status code: the service's handlers stay as they are.

    A handler refuses by `context.abort(code, ...)`, which sets the code and raises; a handler
    that returns may also have set a code. Either way the call is counted under that code.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram("essaim_coordinator_rpc_duration_seconds",
                                 "Time the coordinator took to answer an RPC, refusals included (streams: to the end).",
                                 ["rpc"], buckets=RPC_SECONDS_BUCKETS, registry=registry)
        self.refusals = Counter("essaim_coordinator_rpc_refusals", "RPCs answered with a status other than OK.",
                                ["rpc", "code"], registry=registry)
        # A lease asked for and not granted is answered OK, with its reason in the reply's status.
        self.lease_refusals = Counter("essaim_coordinator_lease_refusals", "AcquireLease answers other than GRANTED, "
                                      "by status (POOL_EMPTY, BACKOFF, AT_LIMIT, QUARANTINED...).", ["status"],
                                      registry=registry)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)  # the service's handlers are fixed at start: wrap each once
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED itself
            return None
        rpc = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            wrapped = handler._replace(unary_unary=self._timed(rpc, handler.unary_unary))
        elif handler.unary_stream is not None:
            wrapped = handler._replace(unary_stream=self._timed_stream(rpc, handler.unary_stream))
        else:
            return handler  # the service has no client-streaming RPC: nothing to count there
        self._wrapped[method] = wrapped
        return wrapped

    def _timed(self, rpc: str, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        latency = self.latency.labels(rpc)

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                reply = behaviour(request, context)
            except BaseException:
                self._refused(rpc, context)
                raise
            finally:
                latency.observe(time.perf_counter() - started)
            if context.code() not in (None, grpc.StatusCode.OK):
                self._refused(rpc, context)
            elif isinstance(reply, pb.AcquireLeaseReply) and reply.status != pb.AcquireLeaseReply.GRANTED:
                self.lease_refusals.labels(pb.AcquireLeaseReply.Status.Name(reply.status)).inc()
            return reply

        return timed

    def _timed_stream(self, rpc: str, behaviour: Callable[[Any, grpc.ServicerContext], Iterable[Any]]
                      ) -> Callable[..., Iterator[Any]]:
        latency = self.latency.labels(rpc)

        def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                yield from behaviour(request, context)
            except GeneratorExit:  # the client went away: not a refusal
                raise
            except BaseException:
                self._refused(rpc, context)
                raise
            finally:
                latency.observe(time.perf_counter() - started)

        return timed

    def _refused(self, rpc: str, context: grpc.ServicerContext) -> None:
        code = context.code()
        # An exception without abort() is answered UNKNOWN by gRPC.
        self.refusals.labels(rpc, (code if code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.UNKNOWN).name).inc()


class RunCollector(Collector):
    """The run's figures as metric families, from the shared cached reading (one per scrape at most)."""

    def __init__(self, figures: FiguresCache) -> None:
        self._figures = figures

    def describe(self) -> Iterator[Any]:
        # Without it the registry would collect (read the database) when the collector is registered.
        return iter(())

    def collect(self) -> Iterator[Any]:
        return iter(run_families(self._figures.current()))


def run_families(figures: RunFigures) -> list[Any]:
    """Every metric family the run's figures make."""
    families: list[Any] = []
    info = InfoMetricFamily("essaim_coordinator_run", "The run this coordinator serves.")
    info.add_metric([], {"run_id": figures.run_id})
    families.append(info)
    families.append(GaugeMetricFamily("essaim_coordinator_round", "The round open now (the next one to decide).",
                                      value=figures.current_round))
    families.append(GaugeMetricFamily("essaim_coordinator_total_rounds", "Rounds the run trains in all.",
                                      value=figures.total_rounds))
    families.append(CounterMetricFamily("essaim_coordinator_rounds_decided", "Rounds decided (kept parameters).",
                                        value=len(figures.rounds)))
    loss = GaugeMetricFamily("essaim_coordinator_round_loss", "Mean training loss of the newest decided round's kept "
                             "reports (no sample before the first round).")
    if figures.rounds:
        loss.add_metric([], figures.rounds[-1].mean_loss)
    families.append(loss)
    families.append(_histogram("essaim_coordinator_round_wall_seconds",
                               "Seconds from a round's first report to the next round's (one outer step).",
                               [r.wall_seconds for r in figures.rounds if r.wall_seconds is not None],
                               ROUND_SECONDS_BUCKETS))
    families.append(_histogram("essaim_coordinator_round_group_size",
                               "The largest averaging group of each decided round.",
                               [r.group_size for r in figures.rounds], GROUP_SIZE_BUCKETS))
    families.append(CounterMetricFamily("essaim_coordinator_bytes_averaged",
                                        "Bytes workers sent averaging pseudo-gradients, as they reported them.",
                                        value=sum(r.bytes_averaged for r in figures.rounds)))

    tokens = CounterMetricFamily("essaim_coordinator_tokens_trained",
                                 "Tokens in kept rounds' lineage (rewound ones excepted).",
                                 labels=["source", "language", "institution", "trust_class"])
    by_labels: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for row in figures.trained:
        by_labels[(row.source, row.language, row.institution, row.trust_class)] += row.tokens
    for labels, count in sorted(by_labels.items()):
        tokens.add_metric(list(labels), count)
    families.append(tokens)

    live = GaugeMetricFamily("essaim_coordinator_workers_live", "Workers heard from lately and not quarantined.",
                             labels=["trust_class"])
    by_class: dict[str, int] = defaultdict(int)
    for group in figures.live:
        by_class[group.trust_class] += group.workers
    for trust_class, count in sorted(by_class.items()):
        live.add_metric([trust_class], count)
    families.append(live)
    families.append(GaugeMetricFamily("essaim_coordinator_workers_registered", "Workers ever registered.",
                                      value=figures.workers_total))
    families.append(GaugeMetricFamily("essaim_coordinator_tokens_per_second",
                                      "Throughput the live workers last measured, together.",
                                      value=figures.tokens_per_second))
    families.append(GaugeMetricFamily("essaim_coordinator_leases_out", "Leases granted and not yet ended.",
                                      value=figures.leases_out))
    families.append(GaugeMetricFamily("essaim_coordinator_lease_tokens_out", "Tokens of the leases out.",
                                      value=figures.tokens_out))
    families.append(CounterMetricFamily("essaim_coordinator_leases_expired",
                                        "Leases whose deadline passed before a report or release.",
                                        value=figures.leases_expired))

    families.append(GaugeMetricFamily("essaim_coordinator_epoch", "The oldest epoch with tokens still to train.",
                                      value=figures.epoch.epoch))
    families.append(GaugeMetricFamily("essaim_coordinator_epoch_tokens", "Tokens of that epoch.",
                                      value=figures.epoch.tokens))
    families.append(GaugeMetricFamily("essaim_coordinator_epoch_tokens_trained", "Tokens of that epoch trained.",
                                      value=figures.epoch.trained))
    families.append(GaugeMetricFamily("essaim_coordinator_epoch_eta_seconds",
                                      "Seconds to the end of the epoch at the live throughput (0: unknown or done).",
                                      value=figures.eta_seconds))

    energy = CounterMetricFamily("essaim_coordinator_energy_joules",
                                 "Energy workers reported for their rounds (measured or estimated), by institution.",
                                 labels=["institution"])
    emissions = CounterMetricFamily("essaim_coordinator_emissions_grams",
                                    "That energy times the grid intensity each worker declared (gCO2e).",
                                    labels=["institution"])
    for row in figures.energy:
        energy.add_metric([row.institution], row.energy_joules)
        emissions.add_metric([row.institution], row.emissions_grams)
    families += [energy, emissions]

    newest = {(e.group, e.name): e for e in figures.evaluations}  # oldest round first: the newest wins
    bits = GaugeMetricFamily("essaim_coordinator_eval_bits_per_byte",
                             "Held-out bits per byte at the newest evaluated round.", labels=["group", "name"])
    eval_loss = GaugeMetricFamily("essaim_coordinator_eval_loss",
                                  "Held-out loss (nats per token) at the newest evaluated round.", labels=["group", "name"])
    for (group, name), figure in sorted(newest.items()):
        bits.add_metric([group, name], figure.bits_per_byte)
        eval_loss.add_metric([group, name], figure.loss)
    families += [bits, eval_loss]
    families.append(GaugeMetricFamily("essaim_coordinator_figures_read_seconds",
                                      "How long the newest reading of these figures from the database took.",
                                      value=figures.read_seconds))
    return families


def _histogram(name: str, documentation: str, values: list[float], bounds: Iterable[float]) -> HistogramMetricFamily:
    """A histogram of values read whole from the database (each scrape recounts them)."""
    buckets = [(_bound(bound), float(sum(1 for v in values if v <= bound))) for bound in bounds]
    buckets.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=float(sum(values)))


def _bound(bound: float) -> str:
    return str(float(bound))

