"""Signed requests: what is signed, and how a receiver checks it.

A request is signed over a domain tag, the RPC method name (so a signature for one
method cannot be replayed against another) and the request serialized with its
signature field empty. The receiver checks the signature, that the timestamp is
within a skew window, and that the nonce was never seen inside that window (with a
cap on how many nonces it remembers, in all and per worker).
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable, Protocol

from protocol.identity import Identity, verify_signature

DOMAIN_TAG = b"essaim/request/v1\n"
NONCE_BYTES = 16
DEFAULT_MAX_SKEW_SECONDS = 120.0
# A remembered nonce costs ~150 bytes of memory: 1,000,000 is ~150 MB at most, 10,000 signed
# requests from every one of 100 busy workers inside one skew window.
DEFAULT_MAX_NONCES = 1_000_000
# A worker sends a heartbeat every few seconds and a handful of calls a round: 10,000 inside a
# 120 s window is over 80 a second, far more than an honest worker needs.
DEFAULT_MAX_NONCES_PER_WORKER = 10_000
SLOTS_PER_WINDOW = 16  # nonces are forgotten at most two sixteenths of the skew late


class SignedRequest(Protocol):
    """Any generated request message with an `auth` (RequestAuth) field."""

    auth: object

    def SerializeToString(self, deterministic: bool = ...) -> bytes: ...

    def CopyFrom(self, other: object) -> None: ...


class AuthError(Exception):
    """A request that must be refused; the message says which check failed."""


class NoncesExhausted(AuthError):
    """Too many nonces to remember: the request is refused rather than an older nonce forgotten."""


def signing_payload(method: str, request: SignedRequest) -> bytes:
    unsigned = type(request)()
    unsigned.CopyFrom(request)
    unsigned.auth.signature = b""
    return DOMAIN_TAG + method.encode() + b"\n" + unsigned.SerializeToString(deterministic=True)


def sign_request(
    method: str, request: SignedRequest, identity: Identity, now: Callable[[], float] = time.time
) -> SignedRequest:
    """Fill `request.auth` (id, timestamp from `now`, fresh nonce, signature) in place and return it."""
    request.auth.worker_id = identity.worker_id
    request.auth.timestamp_ms = int(now() * 1000)
    request.auth.nonce = os.urandom(NONCE_BYTES)
    request.auth.signature = b""
    request.auth.signature = identity.sign(signing_payload(method, request))
    return request


class RequestVerifier:
    """Checks signatures, freshness and replays. Thread-safe: gRPC calls it from many threads.

    A nonce is remembered while its timestamp is still acceptable, and never forgotten
    earlier: a forgotten nonce could be replayed. So memory is bounded by refusing, not by
    forgetting: past `max_nonces` remembered in all, or `max_nonces_per_worker` for one
    worker, new requests are refused until old nonces expire.
    """

    def __init__(
        self,
        max_skew_seconds: float = DEFAULT_MAX_SKEW_SECONDS,
        clock: Callable[[], float] = time.time,
        max_nonces: int = DEFAULT_MAX_NONCES,
        max_nonces_per_worker: int = DEFAULT_MAX_NONCES_PER_WORKER,
    ) -> None:
        if max_nonces < 1 or max_nonces_per_worker < 1:
            raise ValueError(f"max_nonces ({max_nonces}) and max_nonces_per_worker ({max_nonces_per_worker}) "
                             "must be at least 1")
        self.max_skew_seconds = max_skew_seconds
        self.max_nonces = max_nonces
        self.max_nonces_per_worker = max_nonces_per_worker
        self._clock = clock
        self._seen: dict[str, set[bytes]] = {}  # worker id -> its nonces still remembered
        self.remembered = 0  # nonces in _seen, all workers together
        # Nonces by the time slot after which they may be forgotten: expiring one slot forgets
        # its nonces in one go, so no request pays for a sweep of everything remembered.
        self._slot_seconds = max_skew_seconds / SLOTS_PER_WINDOW
        self._expiring: dict[int, dict[str, list[bytes]]] = {}
        self._last_sweep = -math.inf
        self._lock = threading.Lock()

    def verify(self, method: str, request: SignedRequest, public_key: bytes) -> None:
        auth = request.auth
        if not auth.signature:
            raise AuthError(f"{method}: the request is not signed; sign it with the worker's Ed25519 key")
        if len(auth.nonce) != NONCE_BYTES:
            raise AuthError(f"{method}: the nonce must be {NONCE_BYTES} random bytes, got {len(auth.nonce)}")
        if not verify_signature(public_key, auth.signature, signing_payload(method, request)):
            raise AuthError(
                f"{method}: bad signature for worker {auth.worker_id}; the request was altered "
                "or signed with a key other than the one registered"
            )
        now = self._clock()
        offset = auth.timestamp_ms / 1000 - now  # the worker's clock minus the coordinator's
        if abs(offset) > self.max_skew_seconds:
            raise AuthError(
                f"{method}: the request's timestamp says the worker's clock is {abs(offset):.0f} s "
                f"{'ahead of' if offset > 0 else 'behind'} the coordinator's (limit {self.max_skew_seconds:.0f} s); "
                "synchronise the worker's clock with NTP (e.g. `timedatectl set-ntp true`, or chrony), then try again"
            )
        worker_id, nonce = auth.worker_id, bytes(auth.nonce)
        with self._lock:
            self._forget_expired(now)
            nonces = self._seen.get(worker_id, set())
            if nonce in nonces:
                raise AuthError(f"{method}: replayed request (nonce already used by worker {worker_id})")
            if len(nonces) >= self.max_nonces_per_worker:
                raise NoncesExhausted(
                    f"{method}: worker {worker_id} sent {len(nonces):,} signed requests within the last "
                    f"{self.max_skew_seconds:.0f} s, the most this coordinator accepts from one worker "
                    "(max_nonces_per_worker); slow down and retry in a few seconds"
                )
            if self.remembered >= self.max_nonces:
                raise NoncesExhausted(
                    f"{method}: the coordinator already remembers {self.remembered:,} request nonces from the last "
                    f"{self.max_skew_seconds:.0f} s, its limit (max_nonces); retry in a few seconds, and if the "
                    "network really sends this many requests, its operator raises max_nonces"
                )
            # A nonce only needs remembering while its timestamp is still acceptable, until
            # timestamp + skew: it is forgotten at the end of the slot holding that instant.
            slot = math.floor((auth.timestamp_ms / 1000 + self.max_skew_seconds) / self._slot_seconds) + 1
            self._seen[worker_id] = nonces
            nonces.add(nonce)
            self._expiring.setdefault(slot, {}).setdefault(worker_id, []).append(nonce)
            self.remembered += 1

    def _forget_expired(self, now: float) -> None:
        # Once per slot, and at most 2 * SLOTS_PER_WINDOW + 2 slots hold nonces (timestamps
        # span twice the skew): each request costs O(1) on average.
        # A clock stepped back (NTP) sweeps at once, rather than only when it has caught up again.
        if self._last_sweep <= now < self._last_sweep + self._slot_seconds:
            return
        self._last_sweep = now
        for slot in [slot for slot in self._expiring if slot * self._slot_seconds < now]:
            for worker_id, expired in self._expiring.pop(slot).items():
                nonces = self._seen[worker_id]
                nonces.difference_update(expired)
                self.remembered -= len(expired)
                if not nonces:
                    del self._seen[worker_id]
