"""Downloading the swarm's state from a peer, kept only if it is the state the coordinator recorded.

hivemind's `load_state_from_peers` takes the first state any peer sends, from the peer
that claims the highest priority. Here the peers are tried in the same order, but a state
is kept only if it passes a `StateCheck`: the round the coordinator says the run is at,
with the parameters its decided round kept (their digest). A peer that sends anything
else is skipped, and the next one is asked. (Which peers are listed is already limited
to credentialed ones by the DHT's record validation, protocol/dht_records.py.)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_logger
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from model.checkpoints import tensors_digest
from protocol import essaim_pb2 as pb

logger = get_logger(__name__)


@dataclass(frozen=True)
class StateCheck:
    """What a downloaded state must be: at `round`, its first `param_count` tensors hashing to `params_digest`."""

    round: int
    params_digest: str
    param_count: int

    @classmethod
    def for_status(cls, status: pb.HeartbeatReply, param_count: int) -> "StateCheck | None":
        """The coordinator's current round, with the parameters the round before kept; None before any round."""
        if not status.kept_params_digest:
            return None  # no round decided yet: every peer starts from the same seed
        return cls(status.current_round, status.kept_params_digest, param_count)

    def problem(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str:
        """Why the state is not the recorded one ("" if it is)."""
        if not isinstance(metadata, dict) or metadata.get("round") != self.round:
            got = metadata.get("round") if isinstance(metadata, dict) else metadata
            return f"it is at round {got!r}, the run at round {self.round}"
        if len(tensors) < self.param_count:
            return f"it has {len(tensors)} tensors, fewer than the model's {self.param_count}"
        digest = tensors_digest(list(tensors[: self.param_count]))
        if digest != self.params_digest:
            return f"its parameters {digest[:12]} are not the ones round {self.round - 1} kept ({self.params_digest[:12]})"
        return ""


class CheckedStateDownload:
    """A DecentralizedAverager mixin: `load_state_from_peers(check=...)` skips peers whose state fails the check."""

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None,
                              check: StateCheck | None = None):  # type: ignore[no-untyped-def]
        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future, check=check)))
        return future.result(timeout=timeout) if wait else future

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None,
                                     check: StateCheck | None = None) -> None:
        """hivemind's loop over peers by priority, with the check before a state is taken."""
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            prefix = self._matchmaking.group_key_manager.prefix
            listed, _ = self.dht.get(f"{prefix}.all_averagers", latest=True) or ({}, None)
            priority = {
                PeerID(peer_id): (float(info.value), random.random())  # random: the tie breaker
                for peer_id, info in (listed.items() if isinstance(listed, dict) else ())
                if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))
            }
            for peer in sorted(priority, key=priority.get, reverse=True):
                if peer == self.peer_id:
                    continue
                try:
                    metadata, tensors = await self._download_state(peer, timeout)
                except Exception as error:
                    logger.warning(f"could not download the state of peer {peer}: {error!r}")
                    continue
                problem = check.problem(metadata, tensors) if check is not None and metadata else ""
                if not metadata or problem:
                    logger.warning(f"not taking the state of peer {peer}: {problem or 'it sent none'}")
                    continue
                future.set_result((metadata, tensors))
                return
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_state(self, peer: PeerID, timeout: float | None) -> tuple[Any, list[torch.Tensor]]:
        started = time.monotonic()
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, parts, tensors = None, [], []
        async for message in aiter_with_timeout(stream, timeout=timeout):
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:  # a dtype marks the first part of the next tensor
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        logger.info(f"downloaded the state of peer {peer} in {time.monotonic() - started:.3f}s")
        return metadata, tensors
