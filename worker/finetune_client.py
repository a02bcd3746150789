"""The site side of federated fine-tuning: a Flower ClientApp that trains LoRA adapters on the site's private data.

Flower starts a fresh process for every message, and a SecAgg+ round sends four
of which only one trains. So this module imports Flower alone; torch,
transformers and peft (about 5 s) are imported by the messages that train or
evaluate (worker.finetune_site), not by the key exchanges.

Privacy is the server's choice, made per run: `privacy_mod` applies SecAgg+
masking when the round's messages carry its protocol, and local differential
privacy (clip the update, add Gaussian noise) when the instructions ask for it.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import LocalDpMod, secaggplus_mod
from flwr.common import Context, Message, MessageType
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from protocol.finetune import SiteInstructions

FIT_CONFIG = "fitins.config"  # where Flower's legacy fit messages carry the server's config


class SiteClient(NumPyClient):
    def __init__(self, node_config: dict) -> None:
        self.node_config = node_config

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        from worker.finetune_site import Site, train_round

        site = Site.from_node_config(self.node_config)
        instructions = SiteInstructions.from_config(config)
        arrays, examples, loss = train_round(site, instructions, parameters)
        log(INFO, "site %s: round %d: trained %d steps on %d pairs, loss %.4f",
            site.name, instructions.server_round, instructions.local_steps, examples, loss)
        return arrays, examples, {"site": site.name, "train_loss": loss}

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        from worker.finetune_site import Site, evaluate_round

        site = Site.from_node_config(self.node_config)
        loss, pairs = evaluate_round(site, SiteInstructions.from_config(config), parameters)
        log(INFO, "site %s: held-out answer loss %.4f on %d pairs", site.name, loss, pairs)
        return loss, pairs, {"site": site.name}


def privacy_mod(message: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    fit_config = message.content.config_records.get(FIT_CONFIG)  # absent from SecAgg+'s key-exchange messages
    instructions = SiteInstructions.from_config(dict(fit_config)) if fit_config is not None else None
    inner = call_next
    if instructions is not None and instructions.dp_enabled:
        # Two datasets of one site can move its clipped update anywhere within 2 x clip.
        local_dp = LocalDpMod(
            clipping_norm=instructions.dp_clip, sensitivity=2 * instructions.dp_clip,
            epsilon=instructions.dp_epsilon, delta=instructions.dp_delta,
        )

        def inner(message: Message, context: Context) -> Message:
            return local_dp(message, context, call_next)

    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, inner)
    return inner(message, context)


def _client(context: Context):  # type: ignore[no-untyped-def]
    return SiteClient(dict(context.node_config)).to_client()


app = ClientApp(client_fn=_client, mods=[privacy_mod])
