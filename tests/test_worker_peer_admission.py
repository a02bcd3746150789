"""Only credentialed peers average, with at most their credential's weight, and state comes from the record.

Real hivemind peers (DHT, averager processes, p2pd) in one test process, with credentials
signed by a coordinator key made here, as `essaim coordinator serve` would sign them.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from model.presets import build_model
from protocol import essaim_pb2 as pb
from protocol.credentials import CredentialCheck, CredentialError, issue_credential, sign_statement
from protocol.identity import Identity
from protocol.swarm import Swarm
from support import outer_steps_together
from worker.diloco import DiLoCoSettings, DiLoCoTrainer
from worker.peer_admission import CredentialAdmission, GroupEntry, OpenAdmission
from worker.state_download import StateCheck

RUN = "run-under-test"
PREFIX = f"essaim-{RUN}"
VOCAB = 300
SETTINGS = DiLoCoSettings(inner_lr=1e-2, outer_lr=0.7, outer_momentum=0.9, dht_prefix=PREFIX,
                          target_group_size=3, matchmaking_seconds=2.0, averaging_timeout_seconds=15.0)
ALONE = dataclasses.replace(SETTINGS, matchmaking_seconds=1.0, averaging_timeout_seconds=4.0)  # gives up sooner
COORDINATOR = Identity.generate()
CHECK = CredentialCheck(COORDINATOR.public_key, RUN)


@dataclasses.dataclass
class Peer:
    swarm: Swarm
    trainer: DiLoCoTrainer
    identity: Identity

    @property
    def peer_id(self) -> str:
        return self.swarm.dht.peer_id.to_base58()

    def entry(self, round_number: int, tokens: int, trust_class: str = "volunteer") -> GroupEntry:
        """A credential for `tokens` and an honest statement of them, as the coordinator and agent make them."""
        credential = issue_credential(COORDINATOR, pb.RoundCredential(
            run_id=RUN, worker_id=self.identity.worker_id, worker_key=self.identity.public_key, peer_id=self.peer_id,
            round=round_number, tokens=tokens, trust_class=trust_class, expires_at=time.time() + 600))
        statement = sign_statement(self.identity, pb.MemberStatement(
            run_id=RUN, worker_id=self.identity.worker_id, round=round_number,
            leases=[pb.LeaseUsage(lease_id=1, tokens_consumed=tokens)]))
        self.swarm.hold_credential(credential)
        return GroupEntry(round_number, credential, statement)


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(count: int, credentialed: bool = True, settings: DiLoCoSettings = SETTINGS) -> list[Peer]:
        for index in range(count):
            initial = started[0].swarm.visible_addresses() if started else []
            swarm = Swarm("127.0.0.1", initial_peers=initial, credentials=CHECK if credentialed else None,
                          dht_prefix=PREFIX)
            admission = CredentialAdmission(CHECK) if credentialed else OpenAdmission()
            trainer = DiLoCoTrainer(build_model("tiny", VOCAB, seed=0), settings, swarm.dht, admission=admission)
            started.append(Peer(swarm, trainer, Identity.generate()))
        return started[-count:]

    yield start
    for peer in started:
        peer.trainer.shutdown()
    for peer in reversed(started):
        peer.swarm.close()


def _train_apart(peers: list[Peer]) -> list[list[torch.Tensor]]:
    """An inner step on different data per peer; returns each one's pseudo-gradient (global - local)."""
    gradients = []
    for index, peer in enumerate(peers):
        batch = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(100 + index))
        peer.trainer.inner_step(batch)
        gradients.append([g - p.detach() for g, p in zip(peer.trainer.global_params, peer.trainer._params)])
    return gradients


def _stepped_with(before: list[torch.Tensor], average: list[torch.Tensor]) -> list[torch.Tensor]:
    """The global parameters after a first outer Nesterov step on `average` (momentum starts at the gradient)."""
    step = SETTINGS.outer_lr * (1 + SETTINGS.outer_momentum)
    return [b - step * a for b, a in zip(before, average)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


def _weighted(gradients: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    total = sum(weights)
    return [sum(w * g[i] for w, g in zip(weights, gradients)) / total for i in range(len(gradients[0]))]


def test_a_volunteer_claiming_100x_its_credentials_tokens_averages_with_its_credentials_weight(peers) -> None:
    """Two hpc workers reduce every slice (a volunteer reduces none, or it could send back any average)."""
    group = peers(3)
    gradients = _train_apart(group)
    before = [p.clone() for p in group[0].trainer.global_params]
    entries = [group[0].entry(0, 100, "hpc"), group[1].entry(0, 300, "hpc"), group[2].entry(0, 300, "volunteer")]
    results = outer_steps_together([p.trainer for p in group], [100, 300, 30_000], entries)  # the third claims 100x its 300 tokens
    assert [r.group_size for r in results] == [3, 3, 3]
    assert len({r.params_digest for r in results}) == 1  # still bit-identical
    after = group[0].trainer.global_params
    assert _close(after, _stepped_with(before, _weighted(gradients, [100, 300, 300])))
    assert not _close(after, _stepped_with(before, _weighted(gradients, [100, 300, 30_000])))
    assert sorted(len(r.member_statements) for r in results) == [3, 3, 3]  # each report can vouch for all


def test_a_peer_without_a_credential_neither_enters_a_group_nor_taints_the_average(peers) -> None:
    honest = peers(2)
    [intruder] = peers(1, credentialed=False, settings=ALONE)  # joined the run's DHT under its prefix, no credential
    everyone = [*honest, intruder]
    gradients = _train_apart(everyone)
    before = [p.clone() for p in honest[0].trainer.global_params]
    entries = [honest[0].entry(0, 200), honest[1].entry(0, 200), GroupEntry(0)]
    results = outer_steps_together([p.trainer for p in everyone], [200, 200, 200], entries)
    assert [r.group_size for r in results[:2]] == [2, 2], results
    assert results[2].group_size == 1  # nobody averaged with it
    assert _close(honest[0].trainer.global_params, _stepped_with(before, _weighted(gradients[:2], [1, 1])))
    assert results[0].params_digest == results[1].params_digest


def test_a_group_still_meets_once_its_peers_hold_the_next_rounds_credentials(peers) -> None:
    """Overlapped averaging: peers lease round 1 (and hold its credential) while round 0 averages."""
    group = peers(2)
    _train_apart(group)
    entries = [peer.entry(0, 100) for peer in group]
    for peer in group:
        peer.entry(1, 100)  # the next round's lease: its credential is held too, the newest
    results = outer_steps_together([p.trainer for p in group], [100, 100], entries)
    assert [r.group_size for r in results] == [2, 2], results
    assert results[0].params_digest == results[1].params_digest


def test_dht_records_without_a_valid_credential_are_refused(peers) -> None:
    [honest] = peers(1)
    [intruder] = peers(1, credentialed=False)
    honest.entry(0, 100)  # the honest peer holds a credential: its records carry it
    key = f"{PREFIX}_pseudo_gradients.all_averagers"
    assert honest.swarm.dht.store(key, subkey=honest.swarm.dht.peer_id.to_bytes(), value=1.0,
                                  expiration_time=time.time() + 60)
    intruder.swarm.dht.store(key, subkey=intruder.swarm.dht.peer_id.to_bytes(), value=99.0,
                             expiration_time=time.time() + 60)  # "download your state from me"
    listed, _ = honest.swarm.dht.get(key, latest=True)
    assert set(listed) == {honest.swarm.dht.peer_id.to_bytes()}


def test_a_downloaded_state_is_kept_only_if_it_is_the_recorded_one(peers) -> None:
    veteran, liar, newcomer = peers(3, settings=ALONE)
    for peer in (veteran, liar):
        peer.entry(0, 100)
        _train_apart([peer])
        peer.trainer.outer_step(tokens_trained=100, cancel=threading.Event())  # alone: round 1
    liar.trainer.load_outer_state(7, [torch.randn_like(t) for t in liar.trainer.outer.state()], time.time())
    kept = veteran.trainer.params_digest()  # what the coordinator recorded for round 0
    assert not newcomer.trainer.load_state_from_peers(timeout=20, check=StateCheck(1, "0" * 64, 8))
    check = StateCheck(1, kept, len(newcomer.trainer.global_params))
    assert newcomer.trainer.load_state_from_peers(timeout=20, check=check)  # the liar ranks first (round 7)
    assert newcomer.trainer.round == 1 and newcomer.trainer.params_digest() == kept


def test_an_entry_is_refused_for_a_forged_stolen_or_stale_credential() -> None:
    admission = CredentialAdmission(CHECK)
    worker = Identity.generate()

    def entry(peer_id: str = "QmPeer", round_number: int = 3, tokens: int = 50, signer: Identity = COORDINATOR,
              trained: int = 50) -> GroupEntry:
        credential = issue_credential(signer, pb.RoundCredential(
            run_id=RUN, worker_id=worker.worker_id, worker_key=worker.public_key, peer_id=peer_id,
            round=round_number, tokens=tokens, trust_class="volunteer", expires_at=time.time() + 60))
        statement = sign_statement(worker, pb.MemberStatement(run_id=RUN, worker_id=worker.worker_id, round=3,
                                                              leases=[pb.LeaseUsage(lease_id=1, tokens_consumed=trained)]))
        return GroupEntry(3, credential, statement)

    assert admission.check("QmPeer", entry(), 3).tokens == 50
    with pytest.raises(CredentialError, match="not signed by this run's coordinator"):
        admission.check("QmPeer", entry(signer=Identity.generate()), 3)
    with pytest.raises(CredentialError, match="presents the credential of peer"):
        admission.check("QmThief", entry(), 3)  # another peer's credential, seen in a group
    with pytest.raises(CredentialError, match="credential for round 2"):
        admission.check("QmPeer", entry(round_number=2), 3)
    with pytest.raises(CredentialError, match="states 80 tokens trained; its credential allows 50"):
        admission.check("QmPeer", entry(trained=80), 3)
    volunteer, hpc = entry(), entry(peer_id="QmHpc")
    hpc = dataclasses.replace(hpc, credential=issue_credential(COORDINATOR, pb.RoundCredential(
        run_id=RUN, worker_id=worker.worker_id, worker_key=worker.public_key, peer_id="QmHpc", round=3, tokens=50,
        trust_class="hpc", expires_at=time.time() + 60)))
    reducers = [a.may_reduce for a in admission.group(["QmPeer", "QmHpc"], [volunteer, hpc], 3)]
    assert reducers == [False, True]  # a volunteer reduces no slice when an hpc worker can
