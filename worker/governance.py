"""The worker's side of governance: the run's ledger, verified, and the training settings it puts in force.

A worker joins a governed run only with its genesis pinned (`--genesis`, from the
join line the coordinator prints): otherwise a coordinator could hand it any
ledger, signed by maintainers of its own choosing. The coordinator sends the
ledger with the run config, and its head with every heartbeat; a new head makes
the worker fetch the ledger again. A ledger that does not verify, rewrites what
was already accepted, or puts a change in force at a round this worker has
already begun, is refused with the rule it breaks, and the worker keeps training
under the one it had. At the start of each round the worker applies the config
in force for that round (the activation rounds follow from the maintainers'
signed rounds alone), so every worker replaying the same ledger switches at the
same round.
"""

from __future__ import annotations

import logging

from governance.documents import GovernanceError
from governance.ledger import Ledger, follow
from governance.state import UNGOVERNED_CONFIG_VERSION
from protocol import essaim_pb2 as pb

log = logging.getLogger("essaim.worker")


class RunGovernance:
    def __init__(self, config: pb.RunConfig, pinned_genesis: str = "") -> None:
        self.ledger: Ledger | None = None
        self._begun = -1  # the latest round whose config this worker has applied
        if config.governance_ledger:
            try:
                self.ledger = follow(None, config.governance_ledger)
            except GovernanceError as error:
                raise GovernanceError(f"the coordinator's ledger does not verify, so this worker will not "
                                      f"train under it: {error}") from None
        genesis = self.ledger.state.genesis_hash if self.ledger else ""
        if genesis and not pinned_genesis:
            raise GovernanceError(
                f"this run is governed, and a worker joins a governed run only with its genesis pinned, so that no "
                f"coordinator can hand it another run's ledger. This coordinator says its genesis is {genesis}: "
                f"check it against the join line the run publishes (its coordinator prints `essaim worker join "
                f"--coordinator ... --genesis {genesis}` at start), then join again with --genesis {genesis}")
        if pinned_genesis and genesis != pinned_genesis:
            raise GovernanceError(f"this run's genesis is {genesis[:16] or 'absent'}…, not the pinned "
                                  f"{pinned_genesis[:16]}… (--genesis): another run, or an ungoverned one")

    @property
    def head(self) -> str:
        return self.ledger.head if self.ledger else ""

    def config_version(self, round_: int) -> str:
        """The accepted proposal in force at this round (the genesis hash before any): what a checkpoint records."""
        return self.ledger.state.version_at(round_) if self.ledger else UNGOVERNED_CONFIG_VERSION

    def refresh(self, config: pb.RunConfig) -> None:
        try:
            self.ledger = follow(self.ledger, config.governance_ledger, begun_round=self._begun)
            log.info("governance: ledger head %s (%d entries)", self.head[:16], len(self.ledger.entries))
        except GovernanceError as error:
            log.error("governance: the coordinator's new ledger is refused, keeping the one verified before: %s", error)

    def round_config(self, config: pb.RunConfig, round_: int) -> pb.RunConfig:
        """The run config with the governed settings in force at this round."""
        self._begun = max(self._begun, round_)
        if self.ledger is None:
            return config
        governed = pb.RunConfig()
        governed.CopyFrom(config)
        for key, value in self.ledger.state.config_at(round_).items():
            setattr(governed, key, value)
        return governed
