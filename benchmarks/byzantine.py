"""One bad peer of four: what each aggregation rule lets it do to DiLoCo, and how far its witnesses land.

A DiLoCo run of 4 peers simulated in one process on the `tiny` preset and the sample
corpus (French and English; code for the wrong-shard attacker): every round each peer
trains H inner AdamW steps (worker/step.py, a fresh optimizer each round) from the
global parameters on its own stream of rows, the pseudo-gradients are cut into the
parts hivemind would send (4 slices, each cut at tensor boundaries and part size) and
each part combined with AGGREGATIONS[rule] (worker/aggregation.py, as the reducers do),
then the outer Nesterov step (worker/outer_state.py). From round --attack-from on, peer 3
sends something else than what it trained (worker/adversary.py's kinds): x100, sign_flip,
random (same norm), nan, zero (a free rider: trains nothing), wrong_shard (trains on code).

Measured per (attack, rule): the final loss on held-out honest rows against the attack-free
run under "mean" (percent), and the time spent aggregating per round against "mean".
Per attack: the relative distance, estimated from the sketches (worker/witness.py) a reducer
would write, between what the attacker sent and an honest replay of its round (for
wrong_shard: a replay on the data it leased), slice by slice; and, for an honest peer, the
same distance with fp16 or 8-bit on the wire and with a replay in other passes (micro-batches):
the noise a validator's tolerance has to allow.

Then each attack against the whole defence (the default rule, sampled and anomaly-triggered
checks judged as a validator judges, quarantine two rounds after a failed check): the round
it is caught in, the final loss against the same run without the offender (3 honest peers),
and the validator's replays per peer-round (its share of the swarm's compute). The defaults
take 4-6 minutes on 2 cores.

Usage: python benchmarks/byzantine.py [--rounds 10 --inner-steps 20 --batch 4 --seq-len 64]
       [--attacks none,x100,...] [--rules mean,clipped_mean,trimmed_mean]
Prints two tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, NoCompression, deserialize_torch_tensor

from coordinator.config import RunSettings
from coordinator.verification import sample_probability, slice_anomalies
from model.checkpoints import tensors_digest
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config
from model.evaluate import mean_loss
from model.presets import build_model
from model.sample_corpus import write_sample_corpus
from model.shards import read_tokens
from protocol import essaim_pb2 as pb
from worker.adversary import ADVERSARIES, Adversary
from worker.aggregation import AGGREGATIONS
from worker.allreduce import COMPRESSIONS
from worker.device import plan_device
from worker.outer_state import OuterState
from worker.step import inner_optimizer, inner_step
from worker.validate import Replay, judge
from worker.witness import Comparison, compare, sketch

logging.getLogger("hivemind").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")  # hivemind's 8-bit codec, on newer torch

PEERS = 4
ATTACKER = PEERS - 1
ATTACKS = ("none", *ADVERSARIES)
HONEST_LANGUAGES = ("fr", "en")
OTHER_LANGUAGE = "code"          # what the wrong_shard attacker trains on
CHARS_PER_LANGUAGE = 400_000
EVAL_ROWS_PER_LANGUAGE = 32
DEFAULTS = RunSettings()         # the run's defaults: learning rates, momentum, aggregation rule
NOISE = ("honest, fp16 on the wire", "honest, 8bit on the wire", "honest, replayed in micro-batches")


@dataclass(frozen=True)
class Settings:
    rounds: int = 10
    inner_steps: int = 20
    batch: int = 4
    seq_len: int = 64
    vocab: int = 512
    preset: str = "tiny"
    seed: int = 0
    inner_lr: float = DEFAULTS.inner_lr
    outer_lr: float = DEFAULTS.outer_lr
    outer_momentum: float = DEFAULTS.outer_momentum
    attack_from: int = 1


@dataclass(frozen=True)
class Data:
    streams: list[torch.Tensor]  # each peer's rows (n x seq_len), honest languages mixed
    other: torch.Tensor          # rows of another source, for wrong_shard
    held_out: torch.Tensor       # 1-D tokens no stream holds


@dataclass
class Outcome:
    attack: str
    rule: str
    loss: float = 0.0
    aggregation_seconds: list[float] = field(default_factory=list)  # per round
    witness_seconds: list[float] = field(default_factory=list)      # per round: every reducer's sketches
    # kind -> per round, each slice's Comparison (None: what was sent is not finite, and its witness says so)
    comparisons: dict[str, list[list[Comparison | None]]] = field(default_factory=dict)

    def record(self, kind: str, found: list[Comparison | None]) -> None:
        self.comparisons.setdefault(kind, []).append(found)


# -- data -----------------------------------------------------------------------------------------


def prepare_data(work: Path, settings: Settings) -> Data:
    """The sample corpus, tokenized; held-out rows cut from each honest language; the rest dealt to the peers."""
    config = write_sample_corpus(work / "text", CHARS_PER_LANGUAGE)
    manifest, _ = prepare_corpus(load_corpus_config(config), work / "data", vocab_size=settings.vocab,
                                 shard_tokens=1 << 24)
    by_language: dict[str, list[torch.Tensor]] = {}
    for shard in manifest.shards:
        tokens = torch.from_numpy(read_tokens(work / "data" / shard.file, shard.dtype, 0, shard.tokens))
        by_language.setdefault(shard.language, []).append(tokens)
    generator = torch.Generator().manual_seed(settings.seed)
    held_out, per_peer = [], [[] for _ in range(PEERS)]
    for language in HONEST_LANGUAGES:
        rows = _rows(torch.cat(by_language[language]), settings.seq_len)
        held_out.append(rows[-EVAL_ROWS_PER_LANGUAGE:].reshape(-1))
        for peer, chunk in enumerate(rows[:-EVAL_ROWS_PER_LANGUAGE].chunk(PEERS)):
            per_peer[peer].append(chunk)
    streams = [_shuffled(torch.cat(chunks), generator) for chunks in per_peer]
    other = _shuffled(_rows(torch.cat(by_language[OTHER_LANGUAGE]), settings.seq_len), generator)
    return Data(streams, other, torch.cat(held_out))


def _rows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    return tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)


def _shuffled(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return rows[torch.randperm(rows.shape[0], generator=generator)]


def round_batches(rows: torch.Tensor, round_number: int, settings: Settings) -> list[torch.Tensor]:
    """A peer's batches for a round: the next inner_steps x batch rows of its stream (round it goes, in epochs)."""
    first = round_number * settings.inner_steps * settings.batch
    index = torch.arange(first, first + settings.inner_steps * settings.batch) % rows.shape[0]
    return list(rows[index].split(settings.batch))


# -- one round's pieces ---------------------------------------------------------------------------


class Trainer:
    """One model that every simulated peer trains in turn, from the global parameters of the outer state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.plan = plan_device("cpu", "fp32")
        self.model = build_model(settings.preset, settings.vocab, seed=settings.seed)
        self.outer = OuterState([p for p in self.model.parameters() if p.requires_grad], settings.outer_lr,
                                settings.outer_momentum, self.plan)

    def train(self, rows: torch.Tensor, round_number: int, micro_batch_size: int = 0) -> list[torch.Tensor]:
        """A peer's round on its rows, with a fresh AdamW: its pseudo-gradient (global - local)."""
        self.outer.reset_local()
        optimizer = inner_optimizer(self.outer.local, self.settings.inner_lr, self.plan)
        for batch in round_batches(rows, round_number, self.settings):
            inner_step(self.model, optimizer, batch, self.plan, micro_batch_size)
        pseudo_gradient = [torch.zeros_like(p) for p in self.outer.global_params]
        self.outer.pseudo_gradient(into=pseudo_gradient)
        return pseudo_gradient

    def held_out_loss(self, tokens: torch.Tensor) -> float:
        self.outer.reset_local()
        return mean_loss(self.model, tokens, self.settings.seq_len)


def reducer_parts(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """The parts of each of the 4 slices, as hivemind cuts them (flat views into `tensors`)."""
    container = TensorPartContainer(tensors, [1.0] * PEERS, NoCompression())
    return [container.get_raw_input_parts(reducer) for reducer in range(PEERS)]


def slice_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) of each slice in the flattened tensors: what the reducers' witnesses cover."""
    ranges, start = [], 0
    for parts in reducer_parts(tensors):
        end = start + sum(part.numel() for part in parts)
        ranges.append((start, end))
        start = end
    return ranges


def aggregate(sent: list[list[torch.Tensor]], rule: str, weights: list[float]) -> tuple[list[torch.Tensor], float]:
    """Every part of every slice combined with the rule, as the 4 reducers would; and the seconds it took."""
    result = [torch.zeros_like(t) for t in sent[0]]
    by_sender = [reducer_parts(tensors) for tensors in sent]
    started = time.perf_counter()
    for reducer, outputs in enumerate(reducer_parts(result)):
        for index, output in enumerate(outputs):
            output.copy_(AGGREGATIONS[rule]([parts[reducer][index] for parts in by_sender], weights))
    return result, time.perf_counter() - started


def on_the_wire(tensors: list[torch.Tensor], compression: str) -> list[torch.Tensor]:
    """What a reducer receives of `tensors` sent compressed, part by part."""
    received = [t.clone() for t in tensors]
    codec = COMPRESSIONS[compression]()
    for parts in reducer_parts(received):
        for part in parts:
            part.copy_(deserialize_torch_tensor(codec.compress(part, CompressionInfo.from_tensor(part))))
    return received


def comparisons(sent: list[torch.Tensor], replayed: list[torch.Tensor], ranges: list[tuple[int, int]],
                seed: int) -> list[Comparison | None]:
    """Per slice: a reducer's witness of `sent` against a validator's sketch of `replayed` (None: not finite)."""
    sent_flat, replay_flat = _flat(sent), _flat(replayed)
    found: list[Comparison | None] = []
    for start, end in ranges:
        witnessed = sketch(sent_flat, start, end, seed)
        found.append(compare(witnessed.norm, witnessed.projections, sketch(replay_flat, start, end, seed))
                     if witnessed.finite else None)
    return found


def round_distance(found: list[Comparison | None]) -> float | None:
    """The relative distance over every slice of a round at once: the slices' estimates pooled (4x the projections)."""
    if any(comparison is None for comparison in found):
        return None
    squared = sum(c.distance ** 2 for c in found if c is not None)
    return (squared / max(sum(c.replayed_norm ** 2 for c in found if c is not None), 1e-60)) ** 0.5


def witness_seconds(sent: list[list[torch.Tensor]], ranges: list[tuple[int, int]], seed: int) -> float:
    """What the 4 reducers spend sketching every sender's part of their slices in a round."""
    started = time.perf_counter()
    for tensors in sent:
        flat = _flat(tensors)
        for start, end in ranges:
            sketch(flat, start, end, seed)
    return time.perf_counter() - started


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# -- the network's checks -------------------------------------------------------------------------


@dataclass
class Checking:
    """The checks of a live run, simulated: sampling (or a reducer's anomaly), a validator's verdict, quarantine.

    Every peer is a volunteer. Each round, a peer's report is checked with the coordinator's
    probability (coordinator/verification.py: sample_probability, or 1 when a witness of it is
    abnormal), and a checked report is judged as a validator would (worker/validate.py: judge,
    on the witnesses of the 3 other reducers; the replay is the peer's honest round, the claim
    what it says). A failed check quarantines the peer from two rounds later on (the verdict
    takes a round to come: a quarantined attacker may still average once).
    """

    verify_fraction: float
    rng: random.Random
    passed: list[int] = field(default_factory=lambda: [0] * PEERS)
    replays: int = 0
    peer_rounds: int = 0
    caught_in: int | None = None        # the round whose check failed
    false_positives: int = 0

    def quarantined(self, peer: int, round_number: int) -> bool:
        return peer == ATTACKER and self.caught_in is not None and round_number >= self.caught_in + 2

    def after_round(self, round_number: int, active: list[int], sent: dict[int, list[torch.Tensor]],
                    claimed: dict[int, list[torch.Tensor]], trained: dict[int, list[torch.Tensor]],
                    averaged: list[torch.Tensor], ranges: list[tuple[int, int]]) -> None:
        self.peer_rounds += len(active)
        about, flagged = self._witnesses(round_number, active, sent, averaged, ranges)
        for peer in active:
            chance = 1.0 if peer in flagged else sample_probability(self.verify_fraction, "volunteer", self.passed[peer])
            if self.rng.random() >= chance:
                continue
            self.replays += 1
            claim = _flat(claimed[peer])
            check = pb.CheckAssignment(
                check_id=1, round=round_number, witnesses=about[peer], witness_classes=["volunteer"] * len(about[peer]),
                claim=pb.WorkClaim(pseudo_gradient_digest=tensors_digest(claimed[peer]),
                                   pseudo_gradient_norm=float(claim.double().norm())))
            honest = _flat(trained[peer])
            replay = Replay(tensors_digest(trained[peer]), float(honest.double().norm()), honest, 0.0, 0.0, {})
            outcome = judge(check, replay).outcome
            if outcome == pb.VerdictRequest.PASSED:
                self.passed[peer] += 1
            elif outcome == pb.VerdictRequest.INCONCLUSIVE:
                continue  # one reducer's word: neither verified nor caught
            elif peer == ATTACKER:
                self.caught_in = self.caught_in if self.caught_in is not None else round_number
            else:
                self.false_positives += 1

    @staticmethod
    def _witnesses(round_number: int, active: list[int], sent: dict[int, list[torch.Tensor]],
                   averaged: list[torch.Tensor], ranges: list[tuple[int, int]]
                   ) -> tuple[dict[int, list[pb.SliceWitness]], set[int]]:
        """What each reducer writes down of each sender (worker/aggregation.py), and who looks abnormal."""
        flats, aggregate = {peer: _flat(sent[peer]) for peer in active}, _flat(averaged)
        about: dict[int, list[pb.SliceWitness]] = {peer: [] for peer in active}
        flagged: set[int] = set()
        for reducer, (start, end) in enumerate(ranges):
            if reducer not in active:
                continue
            target = aggregate[start:end].double()
            seen = {peer: sketch(flats[peer], start, end, round_number) for peer in active}
            median = statistics.median_low([seen[peer].norm for peer in active if seen[peer].finite] or [0.0])
            witnesses = {}
            for peer in active:
                part = flats[peer][start:end].double()
                cosine = float(part.dot(target) / (part.norm() * target.norm()).clamp_min(1e-30)) \
                    if seen[peer].finite else 0.0
                witnesses[peer] = pb.SliceWitness(
                    sender_peer_id=str(peer), start=start, end=end, finite=seen[peer].finite, norm=seen[peer].norm,
                    projections=seen[peer].projections, cosine_to_aggregate=cosine, median_norm=median)
            flagged |= {int(peer) for peer in slice_anomalies(list(witnesses.values())) if int(peer) != reducer}
            for peer in active:
                if peer != reducer:  # a reducer's word about itself does not count
                    about[peer].append(witnesses[peer])
        return about, flagged


# -- a run ----------------------------------------------------------------------------------------


def simulate(settings: Settings, data: Data, attack: str, rule: str, witness: bool,
             checking: Checking | None = None) -> Outcome:
    """A DiLoCo run of PEERS peers where peer ATTACKER attacks ("absent": is not there at all); with witness, the
    sketch distances too; with checking, the network's checks quarantine it when they catch it."""
    trainer = Trainer(settings)
    outcome = Outcome(attack, rule)
    tokens = float(settings.inner_steps * settings.batch * settings.seq_len)  # every peer claims its round's tokens
    ranges = slice_ranges(trainer.outer.global_params)
    for round_number in range(settings.rounds):
        active = [peer for peer in range(PEERS) if not (peer == ATTACKER and (
            attack == "absent" or (checking is not None and checking.quarantined(peer, round_number))))]
        attacking = attack not in ("none", "absent") and round_number >= settings.attack_from and ATTACKER in active
        trained = {peer: trainer.train(data.streams[peer], round_number) for peer in active}
        sent, claimed = dict(trained), dict(trained)  # an attacker's claim is its honest round where it trained one
        if attacking:
            honest = trained[ATTACKER]  # what it leased and should have trained: a validator's replay
            sent[ATTACKER] = _attacked(attack, honest, trainer, data, round_number)
            if attack in ("zero", "wrong_shard"):
                claimed[ATTACKER] = sent[ATTACKER]  # it trained nothing, or other data: that is all it can say
            if witness:
                outcome.record(attack, comparisons(sent[ATTACKER], honest, ranges, round_number))
        if witness and attack == "none":
            _noise(outcome, trainer, data, sent[0], ranges, round_number)
        if witness:
            outcome.witness_seconds.append(witness_seconds(list(sent.values()), ranges, round_number))
        averaged, seconds = aggregate([sent[peer] for peer in active], rule, [tokens] * len(active))
        outcome.aggregation_seconds.append(seconds)
        if checking is not None:
            checking.after_round(round_number, active, sent, claimed, trained, averaged, ranges)
        trainer.outer.step(averaged)
    outcome.loss = trainer.held_out_loss(data.held_out)
    return outcome


def _attacked(attack: str, honest: list[torch.Tensor], trainer: Trainer, data: Data,
              round_number: int) -> list[torch.Tensor]:
    """What the attacker sends instead of its honest pseudo-gradient (worker/adversary.py's behaviour)."""
    if attack == "wrong_shard":
        return trainer.train(data.other, round_number)
    sent = [t.clone() for t in honest]  # zero: a free rider's zeros, whatever it trained
    torch.manual_seed(trainer.settings.seed * 1_000_003 + round_number)  # the random attack's noise, alike run to run
    Adversary(attack).sent_transform(sent)
    return sent


def _noise(outcome: Outcome, trainer: Trainer, data: Data, honest: list[torch.Tensor],
           ranges: list[tuple[int, int]], round_number: int) -> None:
    """How far an honest peer's witnesses land from its replay when nothing is wrong but the bits."""
    for kind, received in ((NOISE[0], on_the_wire(honest, "fp16")), (NOISE[1], on_the_wire(honest, "8bit"))):
        outcome.record(kind, comparisons(received, honest, ranges, round_number))
    batch = trainer.settings.batch
    if batch > 1:  # the same steps in two passes a batch: other float sums, as another device would do
        replayed = trainer.train(data.streams[0], round_number, micro_batch_size=max(1, batch // 2))
        outcome.record(NOISE[2], comparisons(honest, replayed, ranges, round_number))


# -- report ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--inner-steps", type=int, default=Settings.inner_steps)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--seq-len", type=int, default=Settings.seq_len)
    parser.add_argument("--attack-from", type=int, default=Settings.attack_from)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rules", default=",".join(AGGREGATIONS))
    parser.add_argument("--verify-fraction", type=float, default=DEFAULTS.verify_fraction)
    args = parser.parse_args()
    settings = Settings(rounds=args.rounds, inner_steps=args.inner_steps, batch=args.batch, seq_len=args.seq_len,
                        attack_from=args.attack_from)
    attacks = ["none", *(a for a in args.attacks.split(",") if a and a != "none")]
    rules = ["mean", *(r for r in args.rules.split(",") if r and r != "mean")]
    for name in (*attacks, *rules):
        if name not in (*ATTACKS, *AGGREGATIONS):
            raise SystemExit(f"unknown attack or rule {name!r}: attacks {', '.join(ATTACKS)}; "
                             f"rules {', '.join(AGGREGATIONS)}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="essaim-byzantine-") as work:
        data = prepare_data(Path(work), settings)
    print(f"{PEERS} peers, peer {ATTACKER} attacking from round {settings.attack_from}; {settings.rounds} rounds of "
          f"{settings.inner_steps} steps x {settings.batch} x {settings.seq_len} tokens; {settings.preset} preset; "
          f"inner lr {settings.inner_lr}, outer lr {settings.outer_lr}, momentum {settings.outer_momentum}\n")
    outcomes = {(attack, rule): simulate(settings, data, attack, rule, witness=rule == "mean")
                for attack in attacks for rule in rules}
    clean = outcomes[("none", "mean")].loss
    gap = {key: 100.0 * (outcome.loss - clean) / clean for key, outcome in outcomes.items()}
    ms = {rule: 1000.0 * statistics.median(s for (_, r), o in outcomes.items() if r == rule
                                            for s in o.aggregation_seconds) for rule in rules}
    print_losses(outcomes, gap, ms)
    distance_summary = print_distances(outcomes)
    checked = print_checked(settings, data, attacks, clean, args.verify_fraction)
    witness_ms = 1000.0 * statistics.median(s for o in outcomes.values() for s in o.witness_seconds)
    values = sum(p.numel() for p in Trainer(settings).outer.global_params)
    print(f"\nwitness sketches: {witness_ms:.1f} ms per round for all {PEERS} reducers ({values} values, "
          f"{PEERS} senders); wall {time.perf_counter() - started:.0f} s")

    default_rule = DEFAULTS.aggregation
    per_rule_worst = {rule: round(max(gap[(a, rule)] for a in attacks), 3) for rule in rules}
    print(json.dumps({
        "default_rule": default_rule,
        "worst_loss_gap_pct_default_rule": per_rule_worst.get(default_rule),
        "per_rule_worst_gap_pct": per_rule_worst,
        "loss_gap_pct": {f"{a}/{r}": round(g, 3) for (a, r), g in gap.items()},
        "aggregation_ms_per_round": {rule: round(value, 3) for rule, value in ms.items()},
        "aggregation_cost_vs_mean": {rule: round(value / ms["mean"], 2) for rule, value in ms.items()},
        "witness_ms_per_round": round(witness_ms, 2),
        "sketch_relative_distance": distance_summary,
        **checked,
    }))


def print_losses(outcomes: dict[tuple[str, str], Outcome], gap: dict[tuple[str, str], float],
                 ms: dict[str, float]) -> None:
    print(f"{'attack':12} {'rule':13} {'held-out loss':>13} {'vs clean mean':>14} {'aggregation ms/round':>21}")
    for (attack, rule), outcome in outcomes.items():
        per_round = 1000.0 * statistics.median(outcome.aggregation_seconds)
        print(f"{attack:12} {rule:13} {outcome.loss:13.4f} {gap[(attack, rule)]:+13.2f}% {per_round:12.2f} "
              f"({per_round / ms['mean']:.1f}x mean)")
    if ("nan", "mean") in outcomes:
        print("(nan is left out by every rule: nan/mean is the 3 honest peers alone, what losing one peer's "
              "work costs before any damage)")


def print_checked(settings: Settings, data: Data, attacks: list[str], clean: float,
                  verify_fraction: float) -> dict[str, object]:
    """Each attack against the network's defences: the default rule, checks and quarantine; the validator's cost."""
    rule = DEFAULTS.aggregation
    without = simulate(settings, data, "absent", rule, witness=False).loss  # the same run without the offender
    print(f"\nwith checks: rule {rule}, verify_fraction {verify_fraction}, every peer a volunteer; "
          f"against the run without the offender (3 honest peers: held-out loss {without:.4f})")
    print(f"{'attack':12} {'caught in':>9} {'rounds to':>9} {'held-out loss':>13} {'vs without':>11} "
          f"{'vs clean 4':>11} {'replays / peer-rounds':>22} {'false positives':>16}")
    gaps, rounds_to, costs = {}, {}, {}
    for index, attack in enumerate(attacks):
        checking = Checking(verify_fraction, random.Random(settings.seed * 7919 + index))
        outcome = simulate(settings, data, attack, rule, witness=False, checking=checking)
        gaps[attack] = 100.0 * (outcome.loss - without) / without
        caught = checking.caught_in
        rounds_to[attack] = None if caught is None else caught - settings.attack_from + 1
        costs[attack] = checking.replays / checking.peer_rounds
        print(f"{attack:12} {'-' if caught is None else caught:>9} {rounds_to[attack] or '-':>9} {outcome.loss:13.4f} "
              f"{gaps[attack]:+10.2f}% {100.0 * (outcome.loss - clean) / clean:+10.2f}% {costs[attack]:22.3f} "
              f"{checking.false_positives:16d}")
    first = sample_probability(verify_fraction, "volunteer", 0)
    steady = sample_probability(verify_fraction, "volunteer", 10**9)
    print(f"an offender no witness flags (wrong data that looks normal) is checked with p = {first:.3f} every round "
          f"until caught: caught within 10 rounds with probability {1 - (1 - first) ** 10:.3f}; an established "
          f"volunteer's reports are replayed at p = {steady:.3f}, hpc ones' at "
          f"{sample_probability(verify_fraction, 'hpc', 10**9):.4f}: the validators' share of the swarm's compute")
    return {
        "checked_rule": rule, "verify_fraction": verify_fraction,
        "checked_loss_gap_pct_vs_without_offender": {a: round(g, 3) for a, g in gaps.items()},
        "checked_worst_gap_pct": round(max(gaps.values()), 3),
        "rounds_to_detection": rounds_to,
        "validator_cost_measured": {a: round(c, 3) for a, c in costs.items()},
        "validator_cost_steady_volunteers": round(steady, 4),
        "p_caught_within_10_rounds_unflagged": round(1 - (1 - first) ** 10, 3),
    }


def print_distances(outcomes: dict[tuple[str, str], Outcome]) -> dict[str, dict | None]:
    """The sketch distances, per witnessed slice and per round (all slices pooled); their summary for the JSON line."""
    kinds = [kind for kind in (*ATTACKS[1:], *NOISE) if any(kind in o.comparisons for o in outcomes.values())]
    print(f"\n{'sent vs honest replay (relative distance)':42} {'per slice: mean':>16} {'min':>9} {'max':>9} "
          f"{'per round: mean':>16} {'min':>9} {'max':>9}")
    summary: dict[str, dict | None] = {}
    for kind in kinds:
        rounds = [found for o in outcomes.values() for found in o.comparisons.get(kind, [])]
        per_slice = [c.relative_distance for found in rounds for c in found if c is not None]
        per_round = [d for d in map(round_distance, rounds) if d is not None]
        if not per_slice:
            summary[kind] = None
            print(f"{kind:42} {'not finite: the witnesses say so':>35}")
            continue
        summary[kind] = {"slice": _spread(per_slice), "round": _spread(per_round)}
        print(f"{kind:42} " + " ".join(f"{summary[kind][scope][stat]:{16 if stat == 'mean' else 9}.4g}"
                                       for scope in ("slice", "round") for stat in ("mean", "min", "max")))
    return summary


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(f"{statistics.mean(values):.4g}"), "min": float(f"{min(values):.4g}"),
            "max": float(f"{max(values):.4g}")}

if __name__ == "__main__":
    main()
