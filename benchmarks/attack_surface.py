"""Attacks on a live run: does any stranger end, steer, hoard, poison or take credit?

A real coordinator on 127.0.0.1 with honest `hpc` workers (certified by an admitted
institution) trains a tiny model. While it runs, strangers try, one after another:
- end the run: report the last round on a lease of the open round;
- a future round: report a round the swarm has not reached;
- report first: report the open round first, with parameters no group has;
- claim an institution: register naming the admitted institution, as hpc, without a certificate;
- hoard leases: lease until told to stop, never report (then vanish);
- join the DHT unregistered: a hivemind peer under the run's key prefix, no credential, trying
  to average every round and announcing itself as the best source of state;
- claim 100x weight: a registered volunteer peer that averages with 100 times its tokens;
- flood registrations: 10,000 Register calls from one address (coordinator CPU measured).
Outcome per attack: refused (answered no), contained (it ran, the run was unaffected beyond the
stated bound) or succeeded. Then: did every round keep one set of parameters, did the honest
workers finish, how many tokens were credited to any stranger.

Usage: python benchmarks/attack_surface.py [--workers 3] [--rounds 8]
Prints a table, then one JSON line. Goal: 0 succeeded, 0 tokens credited to a stranger,
coordinator CPU under the registration flood below one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from essaim.processes import kill_group, start_role, stop_group, wait_for_ready_file  # noqa: E402
from protocol import essaim_pb2 as pb  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from worker.capabilities import Capabilities  # noqa: E402
from worker.client import CoordinatorClient, CoordinatorRefused  # noqa: E402

INSTITUTION = "Lab"
VOLUNTEER = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)
FLOOD = 10_000


def prepare(work: Path) -> Path:
    from model.corpus import prepare_corpus
    from model.corpus_config import load_corpus_config
    from model.sample_corpus import write_sample_corpus

    data = work / "data"
    prepare_corpus(load_corpus_config(write_sample_corpus(work / "text", chars_per_language=40_000)), data,
                   vocab_size=512, shard_tokens=4096, chunk_bytes=2048)
    return data


def report(round_number: int, lease: pb.Lease, digest: str) -> pb.CompleteRoundRequest:
    usage = pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=lease.end - lease.start)
    return pb.CompleteRoundRequest(round=round_number, leases=[usage], loss=1.0, pseudo_gradient_digest="d" * 64,
                                   params_digest=digest, group_size=1)


def open_lease(client: CoordinatorClient) -> pb.Lease:
    while True:
        reply = client.acquire_lease(1, client.heartbeat(0, 0.0, 1.0).current_round)
        if reply.status == pb.AcquireLeaseReply.GRANTED:
            return reply.lease
        time.sleep(0.1)


def stranger(address: str, name: str, capabilities: Capabilities = VOLUNTEER, **claims: str) -> CoordinatorClient:
    client = CoordinatorClient(address, Identity.generate(), retry_seconds=10)
    client.register(name, claims.get("institution", "independent"), capabilities)
    return client


def refused_by(call) -> str:  # type: ignore[no-untyped-def]
    try:
        call()
    except CoordinatorRefused as error:
        return f"refused ({error.code.name})"
    return "succeeded"


def attack_end_run(address: str, rounds: int) -> tuple[str, str]:
    client = stranger(address, "end-run")
    lease = open_lease(client)
    return refused_by(lambda: client.complete_round(report(rounds - 1, lease, "e" * 64))), client.identity.worker_id


def attack_future_round(address: str) -> tuple[str, str]:
    client = stranger(address, "future-round")
    lease = open_lease(client)
    return refused_by(lambda: client.complete_round(report(lease.round + 1, lease, "f" * 64))), client.identity.worker_id


def attack_report_first(address: str) -> tuple[str, str]:
    client = stranger(address, "report-first")
    lease = open_lease(client)
    reply = client.complete_round(report(lease.round, lease, "5" * 64))  # polls until the round is decided
    return ("succeeded" if reply.accepted else "contained (not kept)"), client.identity.worker_id


def attack_claim_institution(address: str, sessions) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    from coordinator.store import Worker

    claimed = Capabilities("cpu", 0, "hpc", 0.0, "", 0.0)
    client = stranger(address, "claimant", claimed, institution=INSTITUTION)
    with sessions() as session:
        worker = session.get(Worker, client.identity.worker_id)
        credited = (worker.institution, worker.trust_class) != ("independent", "volunteer")
    return ("succeeded" if credited else "refused (registered as an independent volunteer)"), client.identity.worker_id


def attack_hoard(address: str) -> tuple[str, str]:
    client = stranger(address, "hoarder")
    for held in range(1000):
        reply = client.acquire_lease(10**9, client.heartbeat(0, 0.0, 1.0).current_round)
        if reply.status == pb.AcquireLeaseReply.AT_LIMIT:
            return f"contained (AT_LIMIT after {held} leases)", client.identity.worker_id
    return "succeeded", client.identity.worker_id


def current_round(address: str) -> int:
    """From the public, unsigned GetStatus: what anyone, registered or not, can read."""
    from protocol import essaim_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return essaim_pb2_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(worker_limit=1), timeout=10).current_round


def _trainer(run: pb.RunConfig, swarm, admission=None):  # type: ignore[no-untyped-def]
    from model.presets import build_model
    from worker.diloco import DiLoCoSettings, DiLoCoTrainer
    from worker.peer_admission import OpenAdmission

    settings = DiLoCoSettings(inner_lr=run.inner_lr, outer_lr=run.outer_lr, outer_momentum=run.outer_momentum,
                              dht_prefix=run.dht_prefix, target_group_size=run.target_group_size,
                              matchmaking_seconds=run.matchmaking_seconds, averaging_timeout_seconds=5.0)
    return DiLoCoTrainer(build_model(run.model_preset, run.vocab_size, run.seed), settings, swarm.dht,
                         admission=admission or OpenAdmission())


def attack_dht_intruder(address: str, run: pb.RunConfig, peers: tuple, seconds: float) -> str:  # type: ignore[type-arg]
    """An unregistered hivemind peer under the run's prefix: averages every round it can, offers its state.

    `peers`: its swarm and trainer, and an observer's swarm that checks records as workers do
    (made in the main thread: hivemind's averager sets signal handlers).
    """
    from protocol.dht_records import averaging_prefix

    swarm, trainer, observer = peers
    groups: list[int] = []
    try:
        trainer.averager.state_sharing_priority = 10**6  # "download the swarm's state from me"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            trainer.round = current_round(address)
            result = trainer.outer_step(tokens_trained=1000, cancel=threading.Event())
            groups.append(result.group_size if result else 1)
        listed, _ = observer.dht.get(f"{averaging_prefix(run.dht_prefix)}.all_averagers", latest=True) or ({}, None)
        offered = swarm.dht.peer_id.to_bytes() in (listed or {})
    finally:
        trainer.shutdown()
        observer.close()
        swarm.close()
    if max(groups, default=1) > 1 or offered:
        return f"succeeded (groups {groups}, listed as a state source: {offered})"
    return f"refused (alone in all {len(groups)} averaging attempts; not listed as a source of state)"


def intruder_peers(run: pb.RunConfig) -> tuple:  # type: ignore[type-arg]
    from protocol.credentials import CredentialCheck
    from protocol.swarm import Swarm

    swarm = Swarm("127.0.0.1", initial_peers=list(run.initial_peers))  # no validator: it stores what it likes
    observer = Swarm("127.0.0.1", initial_peers=list(run.initial_peers),
                     credentials=CredentialCheck(run.credential_key, run.run_id), dht_prefix=run.dht_prefix)
    return swarm, _trainer(run, swarm), observer


def heavy_peer(run: pb.RunConfig) -> tuple:  # type: ignore[type-arg]
    from protocol.credentials import CredentialCheck
    from protocol.swarm import Swarm
    from worker.peer_admission import CredentialAdmission

    check = CredentialCheck(run.credential_key, run.run_id)
    swarm = Swarm("127.0.0.1", initial_peers=list(run.initial_peers), credentials=check, dht_prefix=run.dht_prefix)
    return swarm, _trainer(run, swarm, CredentialAdmission(check))


def attack_heavy_weight(address: str, run: pb.RunConfig, peer: tuple, seconds: float) -> tuple[list[int], str]:  # type: ignore[type-arg]
    """A registered volunteer that averages with 100x the tokens it leased (and never reports)."""
    from protocol.credentials import sign_statement
    from worker.peer_admission import GroupEntry

    client = stranger(address, "heavy")
    swarm, trainer = peer
    groups: list[int] = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            round_number = client.heartbeat(0, 0.0, 1.0).current_round
            reply = client.acquire_lease(1, round_number, swarm.dht.peer_id.to_base58())
            if reply.status != pb.AcquireLeaseReply.GRANTED:
                time.sleep(0.2)
                continue
            lease, tokens = reply.lease, reply.lease.end - reply.lease.start
            swarm.hold_credential(reply.round_credential)
            statement = sign_statement(client.identity, pb.MemberStatement(
                run_id=run.run_id, worker_id=client.identity.worker_id, round=round_number,
                leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=tokens)]))
            trainer.round = round_number
            result = trainer.outer_step(tokens_trained=100 * tokens, cancel=threading.Event(),
                                        entry=GroupEntry(round_number, reply.round_credential, statement))
            groups.append(result.group_size if result else 1)
            try:
                client.release_lease(lease.lease_id, "never reports")
            except CoordinatorRefused:
                pass
    finally:
        trainer.shutdown()
        swarm.close()
    return groups, client.identity.worker_id


def attack_registration_flood(address: str, coordinator_pid: int) -> tuple[str, float, float]:
    """10,000 new keys from one address: how many get in, and the coordinator's CPU meanwhile (cores)."""
    from coordinator.config import AdmissionSettings
    from protocol import essaim_pb2_grpc
    from protocol.auth import sign_request

    requests = [sign_request("Register", pb.RegisterRequest(public_key=identity.public_key, name="flood"), identity)
                for identity in (Identity.generate() for _ in range(FLOOD))]
    accepted = 0
    channel = grpc.insecure_channel(address)
    stub = essaim_pb2_grpc.CoordinatorStub(channel)

    def register(request: pb.RegisterRequest) -> bool:
        try:
            stub.Register(request, timeout=30)
            return True
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            return False

    cpu_before, started = _cpu_seconds(coordinator_pid), time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(register, requests))
    wall = time.monotonic() - started
    cores = (_cpu_seconds(coordinator_pid) - cpu_before) / wall
    channel.close()
    limits = AdmissionSettings()  # the coordinator runs with the defaults: a burst, then a steady rate
    allowed = limits.registration_burst + limits.registrations_per_minute * wall / 60 + 1
    outcome = "contained" if accepted <= allowed else "succeeded"
    return f"{outcome} ({accepted} of {FLOOD} registered, {allowed:.0f} allowed)", cores, FLOOD / wall


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    from coordinator.store import Contribution, LineageRecord, open_engine, session_factory, sqlite_url
    from governance.documents import generate_key, load_key
    from protocol.certificates import certify
    from sqlalchemy import func, select

    work = Path(tempfile.mkdtemp(prefix="essaim-attacks-"))
    data = prepare(work)
    institution_key = generate_key(work / "lab.key")
    run_toml = work / "run.toml"
    run_toml.write_text(
        f"total_rounds = {args.rounds}\ntarget_group_size = {args.workers + 1}\ninner_steps = 30\nbatch_size = 4\n"
        "seq_len = 64\nlease_seconds = 5\nheartbeat_seconds = 1\nmatchmaking_seconds = 2.0\n"
        "averaging_timeout_seconds = 10.0\n")
    database = sqlite_url(work / "coordinator.db")
    processes = []
    outcomes: dict[str, tuple[str, str]] = {}
    strangers: list[str] = []
    flood_cores = flood_rate = 0.0
    try:
        coordinator = start_role(
            ["coordinator", "serve", "--data", str(data), "--database", database, "--port", "0",
             "--run", str(run_toml), "--ready-file", str(work / "ready.json"),
             "--admit-institution", f"{INSTITUTION}={institution_key}"], work / "coordinator.log")
        processes.append(coordinator)
        address = wait_for_ready_file(coordinator, work / "ready.json", work / "coordinator.log", 120)["address"]
        workers = []
        for i in range(args.workers):
            identity = Identity.load_or_create(work / f"h{i}.key")
            certificate = certify(INSTITUTION, load_key(work / "lab.key"), identity.public_key, "hpc",
                                  int(time.time()) + 3600)
            (work / f"h{i}.cert").write_bytes(certificate.to_bytes())
            workers.append(start_role(
                ["worker", "join", "--coordinator", address, "--name", f"h{i}", "--identity", str(work / f"h{i}.key"),
                 "--certificate", str(work / f"h{i}.cert"), "--device", "cpu"],
                work / f"h{i}.log", env={"OMP_NUM_THREADS": "1"}))
        processes += workers
        deadline = time.monotonic() + 180
        while not all("first inner step" in (work / f"h{i}.log").read_text() for i in range(args.workers)):
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "honest workers did not start"
            time.sleep(0.5)
        probe = stranger(address, "probe")
        run = probe.run_config()
        strangers.append(probe.identity.worker_id)

        with ThreadPoolExecutor(2) as background:  # the averaging attacks run beside the others
            intruder = background.submit(attack_dht_intruder, address, run, intruder_peers(run), 25.0)
            heavy = background.submit(attack_heavy_weight, address, run, heavy_peer(run), 25.0)
            for name, attack in (("end the run", lambda: attack_end_run(address, args.rounds)),
                                 ("report a future round", lambda: attack_future_round(address)),
                                 ("report first, made-up parameters", lambda: attack_report_first(address)),
                                 ("claim an institution, no certificate",
                                  lambda: attack_claim_institution(address, session_factory(open_engine(database)))),
                                 ("hoard leases", lambda: attack_hoard(address))):
                outcome, worker_id = attack()
                outcomes[name] = (outcome, worker_id)
                strangers.append(worker_id)
            outcomes["join the DHT unregistered"] = (intruder.result(), "")
            groups, heavy_id = heavy.result()
            strangers.append(heavy_id)
        capped = sum((work / f"h{i}.log").read_text().count("its round credential allows") for i in range(args.workers))
        averaged = sum(size > 1 for size in groups)
        if not averaged:
            verdict = f"not tested (no group in {len(groups)} tries)"
        else:
            verdict = "contained" if capped else "succeeded (its weight was not capped)"
        outcomes["claim 100x weight"] = (f"{verdict}: averaged {averaged} times, capped {capped} times", heavy_id)
        flood, flood_cores, flood_rate = attack_registration_flood(address, coordinator.pid)
        outcomes["flood 10,000 registrations"] = (flood, "")

        deadline = time.monotonic() + 600
        while any(w.poll() is None for w in workers):
            assert time.monotonic() < deadline, "the honest workers did not finish"
            time.sleep(1)
        finished = all(w.returncode == 0 for w in workers)
        sessions = session_factory(open_engine(database))
        with sessions() as session:
            digests = dict(session.execute(select(Contribution.round, func.count(func.distinct(Contribution.params_digest)))
                                           .group_by(Contribution.round)).all())
            rounds_kept = len(digests)
            credited = dict(session.execute(
                select(LineageRecord.worker_id, func.sum(LineageRecord.end - LineageRecord.start))
                .where(LineageRecord.worker_id.in_(strangers)).group_by(LineageRecord.worker_id)).all())
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                stop_group(process)
            kill_group(process)  # whatever of its group is left
    agree = finished and rounds_kept == args.rounds and set(digests.values()) == {1}
    succeeded = sum(outcome.startswith("succeeded") for outcome, _ in outcomes.values())
    print(f"\n{'attack':40} {'outcome':70} tokens credited")
    for name, (outcome, worker_id) in outcomes.items():
        print(f"{name:40} {outcome[:70]:70} {credited.get(worker_id, 0) if worker_id else '-'}")
    print(f"\nhonest workers finished: {finished}; rounds kept {rounds_kept} of {args.rounds}, each on one set of "
          f"parameters: {agree}; coordinator under the flood: {flood_cores:.2f} cores at {flood_rate:.0f} Register/s")
    print(f"logs in {work}")
    print(json.dumps({"attacks": len(outcomes), "succeeded": succeeded, "tokens_credited_to_strangers":
                      int(sum(credited.values())), "digests_agree": agree,
                      "flood_coordinator_cores": round(flood_cores, 2), "flood_register_per_second": round(flood_rate)}))


if __name__ == "__main__":
    main()
