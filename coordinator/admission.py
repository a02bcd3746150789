"""Every check Register makes, in one place: a well-formed request, its key, its rate, and what it is credited as.

A worker is whatever its key proves, nothing it types. Its institution and trust
class come only from a certificate (protocol/certificates.py) of an institution
this run admits (the ledger's institutions in a governed run, the coordinator's
`--admit-institution` otherwise), checked against the key the run admits it with.
Without one it registers as a volunteer of no institution ("independent"), and
Register says why in its reply's trailing metadata; only where the run admits
certified workers only (`--institutions-only`) is it refused. Refusals name what
the worker presented, never the admitted institutions.

New keys are rate-limited per source address (a token bucket: `burst` at once,
refilled at `per_minute`), so one machine cannot flood the workers table; a key
already registered registers again freely (a restarted worker).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import grpc

from coordinator.config import AdmissionSettings
from coordinator.governed import GovernedRun
from coordinator.reachability import peer_host
from protocol import essaim_pb2 as pb
from protocol.auth import AuthError, RequestVerifier
from protocol.certificates import CertificateError, check, parse
from protocol.choices import INDEPENDENT, PRECISIONS, TRUST_CLASSES, VOLUNTEER
from protocol.identity import PUBLIC_KEY_BYTES, worker_id_for

log = logging.getLogger("essaim.coordinator")


class Refused(Exception):
    """A request refused with a gRPC status; the message says why and what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Admitted:
    worker_id: str
    institution: str   # a verified institution, or INDEPENDENT
    trust_class: str   # what its certificate grants, or VOLUNTEER
    note: str = ""     # why what it claimed or presented was not credited; "" when nothing was lost


class RegistrationLimit:
    """New registrations per source address: a token bucket of ``burst``, refilled at ``per_minute``. Thread-safe."""

    def __init__(self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.burst = per_minute, burst
        self._rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)
        self._next_sweep = 0.0
        self._lock = threading.Lock()

    def take(self, address: str) -> float:
        """0.0 when ``address`` may register one more new key now; else the seconds to wait."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            tokens, then = self._buckets.get(address, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self._rate)
            if tokens < 1.0:
                self._buckets[address] = (tokens, now)
                return (1.0 - tokens) / self._rate
            self._buckets[address] = (tokens - 1.0, now)
            return 0.0

    def _sweep(self, now: float) -> None:
        # A bucket refilled to the brim is the same as none: forget it, at most once per refill time,
        # so memory follows the addresses registering lately, not every address ever seen.
        refill = self.burst / self._rate
        if now < self._next_sweep:
            return
        self._next_sweep = now + refill
        for address in [a for a, (_, then) in self._buckets.items() if now - then >= refill]:
            del self._buckets[address]


class Admission:
    def __init__(self, verifier: RequestVerifier, institutions: Callable[[], Mapping[str, str]],
                 limit: RegistrationLimit, institutions_only: bool = False, clock: Callable[[], float] = time.time
                 ) -> None:
        self._verifier = verifier
        self._institutions = institutions  # admitted now: name -> Ed25519 public key (hex)
        self._limit = limit
        self._institutions_only = institutions_only
        self._clock = clock

    @classmethod
    def for_run(cls, settings: AdmissionSettings, verifier: RequestVerifier, governed: GovernedRun | None,
                current_round: Callable[[], int]) -> "Admission":
        """A governed run admits the institutions its ledger has in force; another, the operator's list."""
        if governed is None:
            def institutions() -> Mapping[str, str]:
                return settings.institutions
        else:
            def institutions() -> Mapping[str, str]:
                return governed.current().state.institutions_at(current_round())
        limit = RegistrationLimit(settings.registrations_per_minute, settings.registration_burst)
        return cls(verifier, institutions, limit, settings.institutions_only)

    def admit(self, request: pb.RegisterRequest, peer: str, registered: Callable[[str], bool]) -> Admitted:
        """Check a Register request from gRPC peer ``peer``; what the worker is, or Refused/AuthError saying why not.

        ``registered`` tells a key already registered (it is not counted against the rate).
        """
        _check_fields(request)
        worker_id = worker_id_for(request.public_key)
        if request.auth.worker_id != worker_id:
            raise AuthError(f"Register: worker_id {request.auth.worker_id!r} does not belong to this public key")
        if not registered(worker_id):
            address = _address(peer)
            wait = self._limit.take(address)  # before any signature is checked: a flood is refused cheaply
            if wait:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"Register: too many registrations from {address}: {self._limit.per_minute} per "
                              f"minute allowed; wait {math.ceil(wait)} s")
        self._verifier.verify("Register", request, request.public_key)
        admitted = self._credit(request, worker_id)
        if admitted.note:
            log.info("worker %s: %s", worker_id[:12], admitted.note)
        return admitted

    def _credit(self, request: pb.RegisterRequest, worker_id: str) -> Admitted:
        if request.institution_certificate:
            try:
                certificate = parse(request.institution_certificate)
                check(certificate, request.public_key, self._institutions(), self._clock())
            except CertificateError as error:
                reason = f"its certificate is not credited: {error}"
            else:
                typed = request.institution not in ("", INDEPENDENT, certificate.institution)
                note = (f"Register: credited to {certificate.institution!r}, as its certificate says, not to the "
                        f"{request.institution!r} it typed") if typed else ""
                return Admitted(worker_id, certificate.institution, certificate.trust_class, note)
        else:
            reason = "it presented no certificate"
        if self._institutions_only:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, (
                f"Register: this run admits only workers certified by an institution it admits, and {reason}. "
                "Ask your institution to certify your key (`essaim worker id` prints it; they run `essaim "
                "institution certify`), then join with --certificate"))
        claims = [f"institution {request.institution!r}"] if request.institution not in ("", INDEPENDENT) else []
        claims += [f"class {request.trust_class!r}"] if request.trust_class not in ("", VOLUNTEER) else []
        if not claims and not request.institution_certificate:
            return Admitted(worker_id, INDEPENDENT, VOLUNTEER)  # claimed nothing, lost nothing
        return Admitted(worker_id, INDEPENDENT, VOLUNTEER, (
            f"Register: registered as a {VOLUNTEER} of no institution ({INDEPENDENT!r}), "
            f"{' and '.join(claims) or 'its certificate'} not credited: {reason}. Only a certificate from an "
            "institution the run admits credits one (`essaim institution certify`; join with --certificate)"))


def _check_fields(request: pb.RegisterRequest) -> None:
    if len(request.public_key) != PUBLIC_KEY_BYTES:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"Register: public_key must be a raw {PUBLIC_KEY_BYTES}-byte Ed25519 key, "
                      f"got {len(request.public_key)} bytes")
    if request.trust_class not in ("", *TRUST_CLASSES):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"Register: trust_class {request.trust_class!r} is not one of {', '.join(TRUST_CLASSES)}")
    if request.precision not in ("", *PRECISIONS):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"Register: precision {request.precision!r} is not one of {', '.join(PRECISIONS)}")
    if request.bandwidth_mbit < 0 or request.available_until < 0:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      "Register: bandwidth_mbit and available_until must be 0 (unknown, open-ended) or positive")


def _address(peer: str) -> str:
    """The source host of a gRPC peer string (its port changes with every connection)."""
    try:
        return peer_host(peer)
    except ValueError:
        return peer  # not an IP peer (a Unix socket): the whole string
