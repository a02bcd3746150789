"""Federated fine-tuning end to end: a real SuperLink, real SuperNodes (sites), `essaim finetune run`.

Run A (SecAgg+): four sites, one of which holds a checkpoint other than the
run's base, and one of which plants a canary in its private data. Run B (local
DP, no SecAgg): three sites, one killed after round 1, and a fourth whose floor
(--require-secagg) refuses every round.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file

from flower import FinetuneNetwork
from model.checkpoints import read_checkpoint
from model.instructions import PROMPT, Pair, write_pairs
from model.sample_instructions import site_pairs, stand_in_checkpoint
from support import wait_for

pytestmark = pytest.mark.e2e

CANARY = "CANARY-7f3e9b2a-kWh-tarif-secret"
DOMAINS = ("energy", "hospital", "bank")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune-data")
    texts = []
    for index, domain in enumerate(DOMAINS):
        pairs = site_pairs(domain, 120, seed=index)
        if domain == "energy":  # the canary: one private record of one site
            pairs[3] = Pair(f"Quel est le code client {CANARY} ?", f"Le code {CANARY} est confidentiel.")
        write_pairs(root / f"{domain}.jsonl", pairs)
        texts += [PROMPT.format(instruction=p.instruction) + p.answer for p in pairs if CANARY not in p.instruction]
    stand_in_checkpoint(root / "base", texts, seed=0)
    stand_in_checkpoint(root / "other-base", texts, seed=1)  # same shape and tokenizer, other weights
    return {"root": root, "base": root / "base", "other-base": root / "other-base",
            **{domain: root / f"{domain}.jsonl" for domain in DOMAINS}}


def finetune(network: FinetuneNetwork, checkpoint: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "essaim", "finetune", "run", "--superlink", network.address, "--checkpoint",
         str(checkpoint), "--out", str(out), "--log", str(out.parent / f"{out.name}.log"), *options],
        capture_output=True, text=True, timeout=400,
    )


@pytest.fixture
def network(sites: dict[str, Path], tmp_path: Path) -> Iterator[FinetuneNetwork]:
    """A SuperLink and the three good sites; every process is stopped at the end."""
    network = FinetuneNetwork(tmp_path)
    try:
        for domain in DOMAINS:
            network.add_site(domain, sites[domain], sites["base"])
        yield network
    finally:
        network.close()
    assert all(process.poll() is not None for process in network.processes.values())


def test_secagg_run_trains_through_a_mismatched_site_and_no_private_text_reaches_the_superlink(
    network: FinetuneNetwork, sites: dict[str, Path], tmp_path: Path
) -> None:
    network.add_site("wrong-base", sites["bank"], sites["other-base"])
    out = tmp_path / "tuned"
    done = finetune(network, sites["base"], out, "--rounds", "1", "--min-sites", "4", "--local-steps", "15",
                    "--round-timeout", "120")
    assert done.returncode == 0, done.stderr + (tmp_path / "tuned.log").read_text()[-3000:]
    record = json.loads((out / "finetune.json").read_text())

    # The mismatched site was told why, and the run went on with the other three.
    assert "this run fine-tunes" in network.log("wrong-base")
    assert "copy the run's base checkpoint" in network.log("wrong-base")
    assert [r["sites"] for r in record["rounds"]] == [sorted(DOMAINS)]
    assert all(len(r["failures"]) == 1 for r in record["rounds"])
    assert record["privacy"]["secure_aggregation"]["reconstruction_threshold"] == 3
    assert record["base"]["params_digest"] == read_checkpoint(sites["base"]).params_digest

    # Training helped: every site's held-out loss after the run is below its first round's training loss.
    first = record["rounds"][0]["train_loss"]
    for site, result in record["evaluation"]["by_site"].items():
        assert result["loss"] < first[site], (site, result, first)

    # The outputs load with transformers, and the record names the adapter by its hash.
    from transformers import AutoModelForCausalLM
    from model.lora import file_sha256
    AutoModelForCausalLM.from_pretrained(out / "merged")
    assert record["adapter"]["sha256"] == file_sha256(out / "adapter" / "adapter_model.safetensors")
    card = (out / "merged" / "MODEL_CARD.md").read_text()
    assert "bank, energy, hospital" in card and record["adapter"]["sha256"] in card

    # The canary never reached the SuperLink, nor anything it or the server wrote; the relay did
    # see the sites' traffic in clear (their metric names), so a leak would have shown.
    received = bytes(network.relay.upstream)
    assert b"train_loss" in received
    stored = [p for p in (tmp_path / "superlink").rglob("*") if p.is_file()]
    stored += [p for p in out.rglob("*") if p.is_file()] + [tmp_path / "superlink.log", tmp_path / "tuned.log"]
    assert any(p.name.startswith("state.db") for p in stored)
    for blob, where in [(received, "relay"), *((p.read_bytes(), str(p)) for p in stored)]:
        for encoding in ("utf-8", "utf-16-le"):
            assert CANARY.encode(encoding) not in blob, f"the canary reached {where}"
    assert CANARY in sites["energy"].read_text()  # it was there to leak


def test_dp_run_records_its_guarantee_adds_its_noise_survives_a_dropout_and_a_site_refuses_less_than_its_floor(
    network: FinetuneNetwork, sites: dict[str, Path], tmp_path: Path
) -> None:
    # This site takes part only under SecAgg+ (and within epsilon 100): this run has no SecAgg+.
    network.add_site("careful", sites["hospital"], sites["base"], "--require-secagg", "--max-epsilon", "100")
    out = tmp_path / "tuned"
    run = subprocess.Popen(
        [sys.executable, "-m", "essaim", "finetune", "run", "--superlink", network.address, "--checkpoint",
         str(sites["base"]), "--out", str(out), "--log", str(tmp_path / "tuned.log"), "--rounds", "2",
         "--min-sites", "4", "--local-steps", "5", "--no-secagg", "--dp-epsilon", "8", "--dp-clip", "0.5",
         "--round-timeout", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Drop out as round 2's instructions arrive: the SuperNode logs them as it picks them up,
    # seconds before its app process could have imported torch, trained and answered.
    wait_for(lambda: "ROUND 2]" in network.log("bank"), 240, "site bank to receive round 2")
    network.stop("bank")
    output, _ = run.communicate(timeout=400)
    assert run.returncode == 0, output + (tmp_path / "tuned.log").read_text()[-3000:]
    record = json.loads((out / "finetune.json").read_text())

    assert record["rounds"][0]["sites"] == sorted(DOMAINS)
    assert record["rounds"][1]["sites"] == ["energy", "hospital"]
    dp = record["privacy"]["differential_privacy"]
    assert record["privacy"]["secure_aggregation"] is None
    assert (dp["epsilon_per_round"], dp["clipping_norm"], dp["sensitivity"]) == (8, 0.5, 1.0)
    assert dp["basic_composition"] == {"epsilon_total": 16, "delta_total": pytest.approx(2e-5)}
    assert 8 < dp["epsilon_total"] < 16 and dp["delta_total"] == 1e-5  # RDP: two rounds cost less than their sum
    assert "DP per round" in (out / "merged" / "MODEL_CARD.md").read_text()

    # The careful site refused both rounds before reading its data, and the server says who, why and what to change.
    for entry in record["rounds"]:
        assert "careful" not in entry["sites"]
        assert "it requires SecAgg+ (--require-secagg)" in entry["refused"]["careful"]
        assert "without --no-secagg" in entry["refused"]["careful"]
    assert "careful" not in record["evaluation"]["by_site"] and "careful" in record["evaluation"]["refused"]
    assert "site careful refused round 1: it requires SecAgg+" in output
    assert "refuses round 1" in network.log("careful")
    assert "site careful: round" not in network.log("careful")  # never trained
    assert "site careful: held-out" not in network.log("careful")  # nor evaluated
    assert not (tmp_path / "careful" / "privacy-ledger.jsonl").exists()  # it spent nothing
    privacy = record["site_privacy"]
    assert privacy["careful"]["floor"] == {"require_secagg": True, "max_epsilon": 100, "delta": 1e-5}
    assert privacy["careful"]["rounds"] == [] and [r["rule"] for r in privacy["careful"]["refused"]] == ["secagg"] * 2
    # What each site spent, by the same accountant: energy answered both rounds (its whole ledger), bank one.
    assert privacy["energy"]["floor"] == {"require_secagg": False, "max_epsilon": None, "delta": 1e-5}
    assert privacy["energy"]["epsilon_this_run"] == pytest.approx(dp["epsilon_total"])
    assert privacy["energy"]["epsilon_all_runs"] == pytest.approx(dp["epsilon_total"])
    assert 8 < privacy["bank"]["epsilon_this_run"] < privacy["energy"]["epsilon_this_run"]
    assert "Site careful: floor: requires SecAgg+" in (out / "merged" / "MODEL_CARD.md").read_text()

    # The noise is there at the recorded scale: lora_B starts at 0 and a few clipped steps move it
    # by ~1e-3, while each round adds the average of its sites' noise: variance s^2/3 + s^2/2.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = np.concatenate([v.ravel() for k, v in adapter.items() if "lora_B" in k])
    expected = dp["noise_stddev"] * np.sqrt(1 / 3 + 1 / 2)
    assert 0.8 * expected < lora_b.std() < 1.2 * expected, (lora_b.std(), expected)


def test_sites_join_a_tls_superlink_with_its_certificate_and_a_plaintext_site_cannot(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    from essaim.flower import flower_env, write_connection
    from essaim.processes import free_port, start_role, terminate_group
    from protocol.transport import write_self_signed

    cert, key = write_self_signed(tmp_path / "tls", ["127.0.0.1"])
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    processes = [start_role(["finetune", "serve", "--workdir", str(tmp_path / "superlink"), "--port", str(port),
                             "--tls-cert", str(cert), "--tls-key", str(key)], tmp_path / "superlink.log")]

    def site(name: str, *tls: str) -> subprocess.Popen[bytes]:
        return start_role(["finetune", "site", "--superlink", superlink, "--name", name, "--data", str(sites["energy"]),
                           "--checkpoint", str(sites["base"]), "--workdir", str(tmp_path / name), *tls],
                          tmp_path / f"{name}.log")

    write_connection(tmp_path / "home", superlink, cert)  # `flwr` itself checks the SuperLink against the certificate

    def online() -> list[dict]:
        done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "ls", "--format", "json"],
                              env=flower_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
        listed = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {}
        return [node for node in listed.get("nodes", []) if node["status"] == "online"]

    try:
        processes += [site("verified", "--ca-cert", str(cert)), site("plaintext")]
        wait_for(lambda: online(), 90, "the TLS site to connect")
        wait_for(lambda: "Connection attempt failed" in (tmp_path / "plaintext.log").read_text(errors="replace"),
                 60, "the plaintext site to be turned away")
        assert len(online()) == 1
    finally:
        for process in processes:
            terminate_group(process)
    assert all(process.poll() is not None for process in processes)
