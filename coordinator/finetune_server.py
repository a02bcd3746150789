"""The server side of federated fine-tuning: a Flower ServerApp averaging the sites' LoRA adapters.

It loads the community checkpoint to build the starting adapter (B = 0, so
round 1 starts from the base model), runs Flower's legacy workflow (SecAgg+
lives there) with FedAvg weighted by each site's examples, and writes the
adapter, the merged model and the lineage record. It never holds site data:
with SecAgg+ it does not even hold one site's adapter, only their sum.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
from flwr.common import Context, EvaluateIns, FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.compat.common import recorddict_compat as compat

from coordinator.finetune_config import FinetuneSettings
from coordinator.finetune_site_privacy import SitesPrivacy, split_refusals
from protocol.finetune import SiteInstructions
from protocol.flower_pulls import retry_object_pulls_sooner

# SecAgg+ weighs each site by examples / MAX_WEIGHT inside its quantization: larger sites
# than this lose precision, not correctness. Our sites hold hundreds to thousands of pairs.
MAX_WEIGHT = 100_000.0


class SiteAveraging(FedAvg):
    """FedAvg that tells sites what to do, records who took part in each round, and evaluates only when asked.

    It averages whatever sites answered: a site that fails, drops out or refuses the
    round (its privacy floor asks for more) is left out of its round (with SecAgg+, as
    long as the reconstruction threshold answers), and the record says which and why.
    """

    def __init__(self, settings: FinetuneSettings, base_digest: str, initial: list[np.ndarray]) -> None:
        # Rounds go on with whoever is connected: at least the SecAgg+ threshold, else one site.
        # Only round 1 waits for min_sites (configure_fit).
        fewest = settings.threshold if settings.secagg else 1
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=fewest, min_evaluate_clients=fewest,
            min_available_clients=fewest, initial_parameters=ndarrays_to_parameters(initial), accept_failures=True,
        )
        self.settings = settings
        self.base_digest = base_digest
        self.rounds: list[dict] = []
        self.evaluation: dict = {}
        self.sites_privacy = SitesPrivacy(settings)
        self.round_started = 0.0

    def instructions(self, server_round: int) -> dict:
        s = self.settings
        return SiteInstructions(
            base_digest=self.base_digest, server_round=server_round, local_steps=s.local_steps,
            batch_size=s.batch_size, learning_rate=s.learning_rate, max_tokens=s.max_tokens,
            lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, lora_targets=s.lora_targets,
            dp_epsilon=s.dp_epsilon, dp_delta=s.dp_delta, dp_clip=s.dp_clip, secagg=s.secagg,
        ).to_config()

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        if server_round == 1:
            log(INFO, "waiting for %d sites to connect", self.settings.min_sites)
            client_manager.wait_for(self.settings.min_sites, timeout=24 * 3600)
        self.round_started = time.monotonic()
        chosen = super().configure_fit(server_round, parameters, client_manager)
        return [(client, FitIns(parameters, self.instructions(server_round))) for client, _ in chosen]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        refusals, others = split_refusals(_failures(failures))
        self.rounds.append({
            "round": server_round,
            "sites": sorted(str(fit.metrics.get("site", "?")) for _, fit in results),
            "examples": sum(fit.num_examples for _, fit in results),
            "train_loss": {str(fit.metrics.get("site", "?")): float(fit.metrics.get("train_loss", float("nan")))
                           for _, fit in results},
            # Each site's own time in its fit (imports, loading, training): the rest of `seconds` is the round's overhead.
            "site_seconds": {str(fit.metrics.get("site", "?")): round(float(fit.metrics.get("fit_seconds", 0.0)), 2)
                             for _, fit in results},
            "refused": {refusal.site: refusal.reason for refusal in refusals},
            "failures": others,
            "seconds": round(time.monotonic() - self.round_started, 2),  # from sending instructions to aggregating
        })
        for _, fit in results:
            self.sites_privacy.answered(server_round, fit.metrics)
        for refusal in refusals:
            self.sites_privacy.refused(refusal)
            log(WARNING, "round %d: site %s refused the round (its privacy floor) and is left out: %s",
                server_round, refusal.site, refusal.reason)
        for reason in others:
            log(WARNING, "round %d: a site failed and is left out: %s", server_round, reason)
        return super().aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        every = self.settings.evaluate_every
        due = server_round == self.settings.rounds or (every and server_round % every == 0)
        if not due:
            return []
        chosen = super().configure_evaluate(server_round, parameters, client_manager)
        return [(client, EvaluateIns(parameters, self.instructions(server_round))) for client, _ in chosen]

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        refusals, others = split_refusals(_failures(failures))
        self.evaluation = {
            "round": server_round, "held_out_loss": loss,
            "by_site": {str(res.metrics.get("site", "?")): {"loss": res.loss, "pairs": res.num_examples}
                        for _, res in results},
            "refused": {refusal.site: refusal.reason for refusal in refusals},
            "failures": others,
        }
        return loss, metrics


def _failures(failures: list) -> list[str]:
    """Why sites failed, as they said it. Flower's SecAgg+ workflow lists each failed site twice: once is enough."""
    return sorted({_reason(failure) for failure in failures})


def _reason(failure: object) -> str:
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else failure
        return str(getattr(error, "reason", error))
    _, result = failure  # (client, FitRes) whose status is not OK
    return getattr(getattr(result, "status", None), "message", "") or repr(result)


def prompt_replies(grid, poll_seconds: float):  # type: ignore[no-untyped-def]
    """The grid, its send_and_receive looking for replies every `poll_seconds` instead of Flower's 3 s.

    Every stage of a round (SecAgg+ has four) waits for the slowest site's reply; a
    3 s poll adds 1.5 s to each on average. Built on the Grid's public push and pull;
    a reply's objects still on their way are asked for again soon, not after 1 s.
    """
    if poll_seconds <= 0:
        return grid  # Flower's own
    from flwr.superlink.grid import http_grid

    retry_object_pulls_sooner(http_grid, "pull_objects")

    def send_and_receive(messages, *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        waiting = set(grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(grid.pull_messages(waiting))
            replies += pulled
            waiting -= {message.metadata.reply_to_message_id for message in pulled}
            if waiting:
                time.sleep(poll_seconds)
        return replies

    grid.send_and_receive = send_and_receive
    return grid


app = ServerApp()


@app.main()
def main(grid, context: Context) -> None:  # type: ignore[no-untyped-def]
    from coordinator.finetune_lineage import base_adapter, write_outputs

    settings = FinetuneSettings.load(str(context.run_config["settings-file"]))
    grid = prompt_replies(grid, settings.reply_poll_seconds)
    base, model, initial = base_adapter(settings)
    strategy = SiteAveraging(settings, base.params_digest, initial)
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=settings.rounds, round_timeout=settings.round_timeout),
        strategy=strategy,
    )
    fit_workflow = None
    if settings.secagg:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=settings.shares, reconstruction_threshold=settings.threshold,
            max_weight=MAX_WEIGHT, timeout=settings.round_timeout,
        )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)

    parameters: Parameters = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], True)
    final = parameters_to_ndarrays(parameters)
    out = write_outputs(settings, base, model, final, strategy.rounds, strategy.evaluation,
                        strategy.sites_privacy.record(), context.run_id)
    log(INFO, "fine-tune done: adapter, merged model and lineage in %s", out)

