"""`essaim status`: a live terminal view of a coordinator's network (its public GetStatus RPC)."""

from __future__ import annotations

import time
from collections import defaultdict

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from protocol import essaim_pb2 as pb
from protocol import essaim_pb2_grpc
from protocol.limits import GRPC_OPTIONS
from protocol.transport import ClientTLS, open_channel


class StatusUnavailable(Exception):
    """The coordinator did not answer; the message says where it was asked."""


def fetch_status(channel: grpc.Channel, address: str, page: pb.StatusRequest, timeout: float = 5.0) -> pb.StatusReply:
    try:
        return essaim_pb2_grpc.CoordinatorStub(channel).GetStatus(page, timeout=timeout)
    except grpc.RpcError as error:
        # A refused page is the request's fault, not a missing coordinator: its details say what to ask for.
        hint = "" if error.code() == grpc.StatusCode.INVALID_ARGUMENT else ": is `essaim coordinator serve` running there?"
        raise StatusUnavailable(f"no status from {address} ({error.code().name}: {error.details()}){hint}") from None


def render(status: pb.StatusReply, offset: int = 0) -> Group:
    eta = _duration(status.eta_seconds) if status.eta_seconds else "-"
    done = status.epoch_tokens_trained / status.epoch_tokens if status.epoch_tokens else 0.0
    header = (
        f"run {status.run_id}  round {status.current_round}/{status.total_rounds}  "
        f"{status.live_workers}/{status.workers_total} workers live  {status.tokens_per_second:,.0f} tokens/s  "
        f"{status.leases_out} leases out ({status.tokens_out:,} tokens)  "
        f"epoch {status.epoch}: {done:.1%} of {status.epoch_tokens:,} tokens, ETA {eta}"
    )
    # The coordinator sends one page of workers: the tables below are about that page only.
    shown = len(status.workers)
    page = f"showing {shown} of {status.workers_total:,} workers" + (f", from #{offset + 1}" if offset else "") + " (by name)"
    by_group: dict[tuple[str, str], list[pb.WorkerStatus]] = defaultdict(list)
    for worker in status.workers:
        by_group[(worker.institution, worker.trust_class)].append(worker)
    groups = Table("institution", "class", "live", "workers", "tokens/s", "leases",
                   title="By verified institution and class" + ("" if shown == status.workers_total else ", workers shown"))
    for (institution, trust_class), members in sorted(by_group.items()):
        groups.add_row(institution, trust_class, str(sum(w.live for w in members)), str(len(members)),
                       f"{sum(w.tokens_per_second for w in members if w.live):,.0f}", str(sum(w.leases for w in members)))
    workers = Table("worker", "institution", "class", "device", "precision", "round", "tokens/s", "leases", "leaves in",
                    title="Workers")
    now = time.time()
    for worker in status.workers:
        leaves = _duration(worker.available_until - now) if worker.available_until else "-"
        workers.add_row(worker.name + ("" if worker.live else " (gone)"), worker.institution, worker.trust_class,
                        worker.device, worker.precision, str(worker.round), f"{worker.tokens_per_second:,.0f}", str(worker.leases), leaves)
    rounds = Table("round", "reports", "group", "tokens", "mean loss", title="Recent rounds")
    for r in status.recent_rounds:
        rounds.add_row(str(r.number), str(r.reports), str(r.group_size), f"{r.tokens:,}", f"{r.mean_loss:.3f}")
    return Group(header, page, groups, workers, rounds)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def watch(address: str, interval: float, once: bool, tls: ClientTLS = ClientTLS(),
          console: Console | None = None, offset: int = 0, limit: int = 0) -> None:
    """Show the network, with workers [offset, offset + limit) by name (limit 0: the coordinator's default page)."""
    console = console or Console()
    page = pb.StatusRequest(worker_offset=offset, worker_limit=limit)
    with open_channel(address, tls, GRPC_OPTIONS) as channel:  # one channel: a pinned TLS check once, not per refresh
        if once:
            console.print(render(fetch_status(channel, address, page), offset))
            return
        with Live(render(fetch_status(channel, address, page), offset), console=console, refresh_per_second=4) as view:
            while True:
                time.sleep(interval)
                view.update(render(fetch_status(channel, address, page), offset))
