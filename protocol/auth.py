"""Signed requests: what is signed, and how a receiver checks it.

A request is signed over a domain tag, the RPC method name (so a signature for one
method cannot be replayed against another) and the request serialized with its
signature field empty. The receiver checks the signature, that the timestamp is
within a skew window, and that the nonce was never seen inside that window.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Protocol

from protocol.identity import Identity, verify_signature

DOMAIN_TAG = b"essaim/request/v1\n"
NONCE_BYTES = 16
DEFAULT_MAX_SKEW_SECONDS = 120.0


class SignedRequest(Protocol):
    """Any generated request message with an `auth` (RequestAuth) field."""

    auth: object

    def SerializeToString(self, deterministic: bool = ...) -> bytes: ...

    def CopyFrom(self, other: object) -> None: ...


class AuthError(Exception):
    """A request that must be refused; the message says which check failed."""


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
    """Checks signatures, freshness and replays. Thread-safe: gRPC calls it from many threads."""

    def __init__(
        self, max_skew_seconds: float = DEFAULT_MAX_SKEW_SECONDS, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_skew_seconds = max_skew_seconds
        self._clock = clock
        self._seen: dict[tuple[str, bytes], float] = {}  # (worker id, nonce) -> forget after
        self._next_purge = 0.0
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
        key = (auth.worker_id, bytes(auth.nonce))
        with self._lock:
            self._forget_expired(now)
            if key in self._seen:
                raise AuthError(f"{method}: replayed request (nonce already used by worker {auth.worker_id})")
            # A nonce only needs remembering while its timestamp is still acceptable.
            self._seen[key] = auth.timestamp_ms / 1000 + self.max_skew_seconds

    def _forget_expired(self, now: float) -> None:
        # Sweep at most once per skew window so each request costs O(1) on average.
        if now < self._next_purge:
            return
        self._next_purge = now + self.max_skew_seconds
        expired = [key for key, forget_after in self._seen.items() if forget_after < now]
        for key in expired:
            del self._seen[key]
