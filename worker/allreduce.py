"""hivemind's all-reduce, changed so that every peer of a group ends with the same bits.

hivemind's reducer for a slice of the tensors sends each sender (average - what
that sender sent), compressed, and the sender adds it to its own slice. With
lossy compression (fp16, 8-bit), and even in float32, peers then end a little
apart, and DiLoCo peers that differ by a few ulps drift apart round after round.

Here the reducer compresses the average of its slice once and every peer,
the reducer included, decompresses those same bytes and copies them in. Bytes
on the wire are the same as hivemind's (each slice goes up once per sender and
comes back once per sender). More happens on the way:
- the reducer keeps every sender's part of its slice and combines them with the run's
  aggregation rule (worker/aggregation.py: the mean, or a clipped or trimmed mean that a
  few bad senders cannot steer; non-finite parts never count), in sender order;
- the reducer writes down a witness of each sender's part of its slice (worker/witness.py:
  its norm, its sketch under the round's seed, its cosine with the aggregate), which the
  trainer reports so a validator can check what each sender averaged against its replay;
- only admitted peers average (worker/peer_admission.py): a leader refuses a follower
  without a valid round credential, every member checks the whole group before the
  all-reduce, a reducer caps each sender's weight at its credential's tokens, and
  volunteers reduce no slice when the group has an hpc or institution worker;
- the averager counts the bytes it really sends (the serialized messages);
- with error feedback, it records what compression lost from each slice it sent,
  so the trainer can add that residual to the next round's pseudo-gradient;
- a sparse codec (worker/sparse_codec.py: top-k + 2-bit) sends the average back in its own
  sparse form, and a reducer passes its own part through the codec too (its residual kept),
  so that the average stays sparse;
- if a reducer drops out mid-average, the attempt fails as a whole (peers would
  otherwise keep their own values for that slice and disagree), so hivemind
  retries with the peers that are left, from the untouched inputs;
- the side that answers a stream (a reducer, a matchmaking leader) keeps it open
  after its last message until the caller hangs up, and the caller hangs up once it
  has every message it expects. In hivemind the answering side closes right after its
  last write, and p2pd then resets the libp2p stream (doStreamPipe: closing the read
  side fails the other copy loop, which calls Reset), which can drop the last messages
  still in flight: "sent 6 parts, but we expected 7" in a peer while the others finish.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode, BannedException
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time, get_logger
from hivemind.utils.asyncio import amap_in_executor, anext, attach_event_on_finished, enter_asynchronously

from protocol.credentials import CredentialError
from worker.aggregation import AGGREGATIONS, RobustPartReducer, SenderWitness
from worker.peer_admission import Admitted, GroupEntry, OpenAdmission
from worker.sparse_codec import TopK2Bit, decode_part

logger = get_logger(__name__)

# 8-bit sends a 256-entry float32 codebook with every tensor part: on a small tensor (norm
# gains) that costs more than fp16 would, so parts under 4096 values go as fp16.
SMALL_PART_VALUES = 4096
COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "8bit": lambda: SizeAdaptiveCompression(  # 256 buckets over +-3 sigma; no bitsandbytes needed
        SMALL_PART_VALUES, less=Float16Compression(), greater_equal=Uniform8BitQuantization()
    ),
    "topk2bit": TopK2Bit,  # SparseLoCo-style: 64 of each 4,096 values at 4 levels (worker/sparse_codec.py)
}


# How long the answering side of a stream waits for the caller to hang up after its last message.
# The caller hangs up as soon as it has read everything, so this only bounds a caller that never does.
HANGUP_WAIT_SECONDS = 30.0


async def _until_caller_hangs_up() -> None:
    """Keep a stream handler open after its last message; hivemind cancels it when the caller hangs up.

    Returning would close our end at once, and p2pd answers that close with a stream reset
    that can discard our last messages before the caller has read them.
    """
    await asyncio.sleep(HANGUP_WAIT_SECONDS)


@dataclass(frozen=True)
class GroupOutcome:
    """What a finished all-reduce hands back to the trainer process (hivemind's step result)."""

    gathered: dict                   # peer id -> the data it gathered (hivemind's all-gather)
    witnesses: list[SenderWitness]   # empty when this peer reduced no slice


class ExactAllReduceRunner(AllReduceRunner):
    def __init__(self, *, bytes_sent: mp.sharedctypes.Synchronized[int], residuals: Sequence[torch.Tensor] | None,
                 max_weights: dict | None = None, aggregation: str = "mean", seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._bytes_sent = bytes_sent
        self._residuals = residuals
        self._max_weights = max_weights or {}  # peer id -> the most weight its part may carry
        self._compression = self.tensor_part_container.compression
        # How a reducer's average goes back: the same codec, unless it names another (a sparse one does).
        self._reply_compression = getattr(self._compression, "reply_codec", self._compression)
        self._averaged_parts: dict[int, asyncio.Future[runtime_pb2.Tensor]] = {}
        if residuals is not None:
            for residual in residuals:  # a retried attempt must not keep an earlier attempt's residuals
                residual.zero_()
        # One code path for every rule, "mean" included: hivemind's reducer is replaced before anything runs.
        local_parts = self.parts_for_local_averaging
        self.tensor_part_reducer.finished.set()  # unused: finalizing it would only warn that it received nothing
        self.tensor_part_reducer = RobustPartReducer(
            tuple(part.shape for part in local_parts), len(self.sender_peer_ids), rule=AGGREGATIONS[aggregation],
            flat_starts=[self._flat_start(part) for part in local_parts], seed=seed,
        )

    def witnesses(self) -> list[SenderWitness]:
        """What this peer saw, as the reducer of its slice, of each sender's part (after a finished all-reduce)."""
        assert isinstance(self.tensor_part_reducer, RobustPartReducer)
        return self.tensor_part_reducer.witnesses([peer.to_base58() for peer in self.sender_peer_ids])

    def _count(self, message: averaging_pb2.AveragingData) -> None:
        with self._bytes_sent.get_lock():
            self._bytes_sent.value += message.ByteSize()

    async def _averaged_part(self, part_index: int, average: torch.Tensor) -> runtime_pb2.Tensor:
        """The slice's average, compressed once: every peer decompresses these same bytes."""
        if part_index not in self._averaged_parts:
            self._averaged_parts[part_index] = asyncio.get_running_loop().run_in_executor(
                None, lambda: self._reply_compression.compress(average, CompressionInfo.from_tensor(average))
            )
        return await self._averaged_parts[part_index]

    async def _communicate_with_peer(self, peer_id) -> None:  # type: ignore[no-untyped-def]
        if peer_id != self.peer_id:
            return await self._communicate_with_reducer(peer_id)
        # Our own slice: reduce it, then take the same decompressed average the others receive.
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            if getattr(self._compression, "compress_own_part", False):
                tensor_part = self._as_sent(tensor_part)
            average = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, tensor_part, weight=self.weight
            )
            serialized = await self._averaged_part(part_index, average)
            self.tensor_part_container.register_processed_part(peer_index, part_index, decode_part(serialized))

    def _as_sent(self, part: torch.Tensor) -> torch.Tensor:
        """Our own part as the codec would send it, what it dropped kept as residual (a sparse codec's reducer:
        an uncompressed part of its own would make the whole average dense)."""
        sent = decode_part(self._compression.compress(part, CompressionInfo.from_tensor(part)))
        if self._residuals is not None:
            self._residual_slice(part).copy_(part - sent)
        return sent

    async def _communicate_with_reducer(self, peer_id) -> None:  # type: ignore[no-untyped-def]
        """Send our parts of another peer's slice, take back its averages, then hang up.

        hivemind's version reads until the reducer closes the stream; here the reducer waits
        for us to hang up (rpc_aggregate_part), so we stop after the parts we expect.
        """
        peer_index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        expected = container.num_parts_by_peer[peer_index]
        loop = asyncio.get_running_loop()
        replies = None
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            replies = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()  # a client-mode peer sends everything before it reads (as hivemind)
            for part_index in range(expected):
                try:
                    reply = await asyncio.wait_for(anext(replies), self.reducer_timeout)
                except StopAsyncIteration:
                    raise AllreduceException(
                        f"peer {peer_id} sent {part_index} parts, but we expected {expected}") from None
                if reply.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(reply.code)}")
                average = await loop.run_in_executor(None, decode_part, reply.tensor_part)
                container.register_processed_part(peer_index, part_index, average)
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug(f"Caught {e!r} when communicating to {peer_id}", exc_info=True)
            if not container.finished.is_set():  # a finalized container has dropped the parts to fall back on
                container.register_failed_reducer(peer_index)
            raise
        finally:
            if replies is not None:
                try:
                    await replies.aclose()  # hang up: the reducer holds the stream open until we do
                except RuntimeError as e:
                    logger.debug(f"could not close the stream to {peer_id}: {e}")

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's reducer side, which then keeps the stream open until the sender has read every reply."""
        averaged, last_code = 0, None
        async for message in super().rpc_aggregate_part(stream, context):
            averaged += message.code == averaging_pb2.AVERAGED_PART
            last_code = message.code
            yield message
        # Every average went out, or an error the sender stops at: it hangs up once it has read it.
        # (A sender banned part-way gets fewer averages and no error; it would wait for more, so close.)
        if last_code is not None and (averaged == self.tensor_part_reducer.num_parts
                                      or last_code != averaging_pb2.AVERAGED_PART):
            await _until_caller_hangs_up()

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        raw_parts = [part for part, _info in self.tensor_part_container._input_parts_by_peer[peer_index]]
        sent = 0
        async for message in super()._generate_input_for_peer(peer_index):
            self._count(message)
            if self._residuals is not None:
                raw = raw_parts[sent]
                self._residual_slice(raw).copy_(raw - decode_part(message.tensor_part))
            sent += 1
            yield message

    def _residual_slice(self, part: torch.Tensor) -> torch.Tensor:
        """The residual elements matching `part`, a flat view into one of the averaged tensors."""
        assert self._residuals is not None
        tensor_index, start = self._locate(part)
        return self._residuals[tensor_index].view(-1)[start : start + part.numel()]

    def _flat_start(self, part: torch.Tensor) -> int:
        """Where `part` begins in the flattened concatenation of the averaged tensors (what witnesses index)."""
        tensor_index, start = self._locate(part)
        return sum(tensor.numel() for tensor in self.tensor_part_container.local_tensors[:tensor_index]) + start

    def _locate(self, part: torch.Tensor) -> tuple[int, int]:
        """(which averaged tensor `part`, a flat view, belongs to; its offset in that tensor)."""
        for index, tensor in enumerate(self.tensor_part_container.local_tensors):
            if part.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                return index, part.storage_offset() - tensor.storage_offset()
        raise AssertionError("a tensor part that belongs to no averaged tensor")

    async def _accumulate_parts_streaming(self, stream, sender_index: int):  # type: ignore[no-untyped-def]
        # hivemind's reducer loop, answering with the compressed average instead of a delta.
        part_index = 0
        try:
            sender = self.sender_peer_ids[sender_index]
            max_weight = self._max_weights.get(sender, float("inf"))
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (decode_part(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                if weight > max_weight:  # claiming more than its credential's tokens gains nothing
                    if part_index == 0:
                        logger.warning(f"peer {sender} claims weight {weight:.0f}, its round credential allows "
                                       f"{max_weight:.0f}: capped")
                    weight = max_weight
                try:
                    average = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                except BannedException:
                    break  # the sender was banned: its data is no longer aggregated
                serialized = await self._averaged_part(part_index, average)
                part_index += 1
                reply = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
                self._count(reply)
                yield reply
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


COMPRESSION_NAMES = tuple(COMPRESSIONS)  # shared with the background process by index
AGGREGATION_NAMES = tuple(AGGREGATIONS)


def _reducer_bandwidths(bandwidths: Sequence[float | None], mode_ids: Sequence[int],
                        admitted: Sequence[Admitted]) -> list[float | None]:
    """Each peer's share of slices to reduce (None: unknown, an average share): none for client-mode peers,
    nor for those that may not reduce. If no peer that may reduce can (all in client mode), the others do.
    """
    reachable = [bandwidth if AveragingMode(mode) != AveragingMode.CLIENT else 0.0
                 for bandwidth, mode in zip(bandwidths, mode_ids)]
    allowed = [bandwidth if entry.may_reduce else 0.0 for bandwidth, entry in zip(reachable, admitted)]
    return allowed if any(bandwidth is None or bandwidth > 0 for bandwidth in allowed) else reachable


class ExactAverager(DecentralizedAverager):
    """A DecentralizedAverager on ExactAllReduceRunner, whose group size, compression and rule can change between steps.

    The counters, residual buffers and live settings live in shared memory, created
    before hivemind forks its background process, so each side sees what the other wrote.
    A step's result (control.result()) is a GroupOutcome: the group's gathered data and
    this peer's witnesses as a reducer.
    """

    def __init__(self, averaged_tensors: Sequence[torch.Tensor], *args: object, error_feedback: bool,
                 target_group_size: int, compression: str, aggregation: str = "mean",
                 admission: OpenAdmission = OpenAdmission(), **kwargs: object) -> None:
        self._admission = admission
        self._bytes_sent = mp.Value(ctypes.c_int64, 0)
        self._live_target_group_size = mp.Value(ctypes.c_int32, target_group_size)
        self._live_compression = mp.Value(ctypes.c_int32, COMPRESSION_NAMES.index(compression))
        self._live_aggregation = mp.Value(ctypes.c_int32, AGGREGATION_NAMES.index(aggregation))
        self._live_round = mp.Value(ctypes.c_int64, 0)  # seeds the witnesses' sign vectors
        self._compression_in_use = compression  # in the background process: what allreduce_kwargs holds
        self.residuals: list[torch.Tensor] | None = None
        if error_feedback:
            self.residuals = [torch.zeros_like(t).share_memory_() for t in averaged_tensors]
        super().__init__(averaged_tensors, *args, target_group_size=target_group_size,
                         compression=COMPRESSIONS[compression](), **kwargs)

    @property
    def bytes_sent(self) -> int:
        """All bytes of averaging messages this peer has sent so far."""
        return int(self._bytes_sent.value)

    def set_target_group_size(self, size: int) -> None:
        """Form groups of up to `size` peers: a group that reaches it starts without waiting."""
        self._live_target_group_size.value = max(2, size)

    def set_compression(self, name: str) -> None:
        """Send from the next step on compressed this way (a key of COMPRESSIONS)."""
        self._live_compression.value = COMPRESSION_NAMES.index(name)

    def set_aggregation(self, name: str) -> None:
        """Combine the slices this peer reduces with this rule (a key of AGGREGATIONS) from the next step on."""
        self._live_aggregation.value = AGGREGATION_NAMES.index(name)

    def set_round(self, round_number: int) -> None:
        """The round the next step averages: the seed of its witnesses, which a validator's replay uses too."""
        self._live_round.value = round_number

    async def _step(self, **kwargs: object) -> None:  # runs in hivemind's background process
        size = int(self._live_target_group_size.value)
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        compression = COMPRESSION_NAMES[self._live_compression.value]
        if compression != self._compression_in_use:
            self.allreduce_kwargs["compression"] = COMPRESSIONS[compression]()
            self._compression_in_use = compression
        self.allreduce_kwargs["aggregation"] = AGGREGATION_NAMES[self._live_aggregation.value]
        self.allreduce_kwargs["seed"] = int(self._live_round.value)
        await super()._step(**kwargs)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """hivemind's leader side, for admitted followers only; it then waits for the follower to hang up.

        Closing at once can lose the leader's last message (BEGIN_ALLREDUCE): the follower then
        leaves the group while the leader and the others average without it until the timeout.
        """
        refusal = self._refusal(request, context)
        if refusal:
            logger.warning(f"refused peer {context.remote_id} in a group: {refusal}")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message
        await _until_caller_hangs_up()

    def _refusal(self, request: averaging_pb2.JoinRequest, context: P2PContext) -> str:
        """Why a follower may not join our group ("" if it may); hivemind refuses it when we are not leading."""
        control = self._matchmaking.step_control
        if control is None:
            return ""
        try:
            ours = self._entry(control.data_for_gather)
            self._admission.check(context.remote_id.to_base58(), self._entry(request.gather), ours.round)
        except (CredentialError, ValueError, TypeError) as error:
            return str(error)
        return ""

    def _entry(self, data_for_gather: bytes) -> GroupEntry:
        _bandwidth, _mode, user_data = self.serializer.loads(data_for_gather)
        return GroupEntry.from_gathered(self.serializer.loads(user_data))

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int,  # type: ignore[no-untyped-def]
                                    **kwargs) -> GroupOutcome:
        """hivemind's, for an admitted group: slices go to the peers that may reduce, weights are capped.

        Returns the gathered data, as hivemind does, with this peer's witnesses as a reducer.
        """
        try:
            bandwidths, mode_ids, user_data = zip(*map(self.serializer.loads, group_info.gathered))
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_data)))
            entries = [GroupEntry.from_gathered(data) for data in user_gathered.values()]
            ours = entries[group_info.peer_ids.index(self.peer_id)]
            admitted = self._admission.group([peer.to_base58() for peer in group_info.peer_ids], entries, ours.round)
            fractions = await asyncio.get_running_loop().run_in_executor(
                None, load_balance_peers, self.total_size, _reducer_bandwidths(bandwidths, mode_ids, admitted),
                min_vector_size,
            )
            max_weights = {peer: entry.max_weight for peer, entry in zip(group_info.peer_ids, admitted)}
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                witnesses = await self._run_allreduce_inplace_(local_tensors, group_info, peer_fractions=fractions,
                                                               max_weights=max_weights, **kwargs)
                return GroupOutcome(user_gathered, witnesses)
        except CredentialError as error:
            logger.warning(f"not averaging with this group: {error}")
            raise MatchmakingException(f"a peer of the group is not admitted: {error}") from None
        except BaseException as e:
            if isinstance(e, Exception):
                logger.exception(e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}")

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None,  # type: ignore[no-untyped-def]
                                      **kwargs) -> list[SenderWitness]:
        """Average `tensors` in place with the group; returns this peer's witnesses of the slice it reduced."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, bytes_sent=self._bytes_sent, residuals=self.residuals, **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        averages = [average async for average in runner]  # inputs stay untouched until every slice is in
        container = runner.tensor_part_container
        if container.failed_size:
            raise AllreduceException(
                f"{container.failed_size} of {container.total_size} values came back from no reducer "
                "(a peer left mid-average); retrying with the peers that are left"
            )
        for tensor, average in zip(tensors, averages):
            tensor.copy_(average)
        self.last_updated = get_dht_time()
        self._state_updated.set()
        return runner.witnesses()
