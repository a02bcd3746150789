"""The site side of federated fine-tuning: a Flower ClientApp that trains LoRA adapters on the site's private data.

Flower starts a fresh process for every message, and a SecAgg+ round sends four
of which only one trains. So this module imports Flower alone; torch,
transformers and peft (about 5 s) are imported by the messages that train or
evaluate (worker.finetune_site), not by the key exchanges.

Privacy is the server's choice, made per run, within the site's floor:
`privacy_mod` first refuses a round that asks for less than this site accepts
(worker.finetune_floor), then applies SecAgg+ masking when the round's messages
carry its protocol, and local differential privacy (clip the update, add
Gaussian noise) when the instructions ask for it.
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import LocalDpMod, secaggplus_mod
from flwr.common import Context, Message, MessageType
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from protocol.finetune import SiteInstructions
from protocol.finetune_privacy import SiteFloor
from worker.finetune_floor import admit_evaluation, admit_round, ledger_of

FIT_CONFIG = "fitins.config"  # where Flower's legacy fit messages carry the server's config
EVALUATE_CONFIG = "evaluateins.config"  # and its evaluate messages


class SiteClient(NumPyClient):
    def __init__(self, node_config: dict) -> None:
        self.node_config = node_config

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        started = time.monotonic()
        from worker.finetune_site import Site, train_round  # in the clock: a cold process pays for it here

        site = Site.from_node_config(self.node_config)
        instructions = SiteInstructions.from_config(config)
        arrays, examples, loss = train_round(site, instructions, parameters)
        log(INFO, "site %s: round %d: trained %d steps on %d pairs, loss %.4f",
            site.name, instructions.server_round, instructions.local_steps, examples, loss)
        # The floor and what the site has spent travel in clear beside the (masked) adapter: the run record lists them.
        floor = SiteFloor.from_node_config(self.node_config)
        spent = ledger_of(self.node_config).epsilon(floor.delta) if instructions.dp_enabled else 0.0
        return arrays, examples, {"site": site.name, "train_loss": loss, "floor": floor.to_json(),
                                  "epsilon_all_runs": spent, "fit_seconds": time.monotonic() - started}

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        from worker.finetune_site import Site, evaluate_round

        site = Site.from_node_config(self.node_config)
        loss, pairs = evaluate_round(site, SiteInstructions.from_config(config), parameters)
        log(INFO, "site %s: held-out answer loss %.4f on %d pairs", site.name, loss, pairs)
        return loss, pairs, {"site": site.name}


def privacy_mod(message: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    if message.metadata.message_type == MessageType.EVALUATE:
        evaluate_config = message.content.config_records.get(EVALUATE_CONFIG)
        if evaluate_config is not None:
            admit_evaluation(dict(context.node_config), SiteInstructions.from_config(dict(evaluate_config)))
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    fit_config = message.content.config_records.get(FIT_CONFIG)  # absent from SecAgg+'s key-exchange messages
    instructions = SiteInstructions.from_config(dict(fit_config)) if fit_config is not None else None
    secagg = RECORD_KEY_CONFIGS in message.content.config_records  # the protocol itself, not the server's word
    if instructions is not None:
        # Before anything trains: a refused round never reads the site's data, and the server gets the reason.
        admit_round(dict(context.node_config), instructions, secagg, context.run_id)
    inner = call_next
    if instructions is not None and instructions.dp_enabled:
        # Two datasets of one site can move its clipped update anywhere within 2 x clip.
        local_dp = LocalDpMod(
            clipping_norm=instructions.dp_clip, sensitivity=2 * instructions.dp_clip,
            epsilon=instructions.dp_epsilon, delta=instructions.dp_delta,
        )

        def inner(message: Message, context: Context) -> Message:
            return local_dp(message, context, call_next)

    if secagg:
        return secaggplus_mod(message, context, inner)
    return inner(message, context)


def _client(context: Context):  # type: ignore[no-untyped-def]
    return SiteClient(dict(context.node_config)).to_client()


app = ClientApp(client_fn=_client, mods=[privacy_mod])
