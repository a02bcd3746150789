"""DHT records only credentialed peers may write: this run's averaging keys, each bound to a round credential.

hivemind's DHT stores whatever any peer sends, so a stranger could announce itself for
matchmaking or as a source of state. With this validator (hivemind's RecordValidatorBase
hook) every record a peer stores carries its round credential (protocol/credentials.py),
and every node refuses, on store and on lookup, a record whose credential is not signed
by this run's coordinator, has expired, names another peer than the record's subkey, or
whose key is not one of the run's: the averaging group key of the credential's round, or
the state-sharing key. hivemind runs the DHT in a child process: the peer's current
credential is kept in shared memory so the worker can hand it over as it leases.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer

from protocol.credentials import MAX_SIGNED_BYTES, CredentialCheck, CredentialError, claimed_round

ROUND_BITS = 16  # rounds are told apart modulo 2**16 in averaging group keys


def averaging_prefix(dht_prefix: str) -> str:
    """The averager's key prefix for a run (hivemind forbids "." in prefixes)."""
    return f"{dht_prefix}_pseudo_gradients"


def group_bits(round_number: int) -> str:
    return format(round_number % 2**ROUND_BITS, f"0{ROUND_BITS}b")


HELD_ROUNDS = 2  # overlapped averaging: round r's group still meets while round r+1 is leased


class CredentialRecords(RecordValidatorBase):
    def __init__(self, check: CredentialCheck, dht_prefix: str) -> None:
        self._check = check
        self._prefix = averaging_prefix(dht_prefix)
        self._state_key = DHTID.generate(source=f"{self._prefix}.all_averagers").to_bytes()
        # One credential per round slot (round % HELD_ROUNDS), shared with the DHT process.
        self._lock = mp.Lock()
        self._credentials = [mp.Array(ctypes.c_char, MAX_SIGNED_BYTES, lock=False) for _ in range(HELD_ROUNDS)]
        self._lengths = mp.Array(ctypes.c_int32, HELD_ROUNDS, lock=False)
        self._rounds = mp.Array(ctypes.c_int64, [-1] * HELD_ROUNDS, lock=False)

    def hold(self, credential: bytes) -> None:
        """A credential this peer's records carry from now on (the newest lease's). Records under its
        round's group key carry it; those under the round before's keep that round's credential (its
        group may still be meeting, overlapped); the state-sharing record carries the newest."""
        round_number = claimed_round(credential)
        slot = round_number % HELD_ROUNDS
        with self._lock:
            self._credentials[slot].raw = credential.ljust(MAX_SIGNED_BYTES, b"\0")
            self._lengths[slot] = len(credential)
            self._rounds[slot] = round_number

    def _held(self, key: bytes) -> bytes:
        """The credential for a record under `key`: its round's, else the newest."""
        with self._lock:
            held = [(self._rounds[i], self._credentials[i].raw[: self._lengths[i]])
                    for i in range(HELD_ROUNDS) if self._lengths[i]]
        for round_number, credential in held:
            if key == self._group_key(round_number):
                return credential
        return max(held)[1] if held else b""

    def sign_value(self, record: DHTRecord) -> bytes:
        # Without a credential the record goes out bare, and every node (this one too) refuses it.
        credential = self._held(record.key)
        return MSGPackSerializer.dumps([record.value, credential]) if credential else record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return MSGPackSerializer.loads(record.value)[0]

    def validate(self, record: DHTRecord) -> bool:
        try:
            value, blob = MSGPackSerializer.loads(record.value)
            credential = self._check.read(blob)
            peer_id = PeerID.from_base58(credential.peer_id).to_bytes()
        except (CredentialError, ValueError, TypeError):
            return False
        if not isinstance(value, bytes) or MSGPackSerializer.loads(record.subkey) != peer_id:
            return False  # a credential admits only the peer it names
        return record.key in (self._state_key, self._group_key(credential.round))

    def _group_key(self, round_number: int) -> bytes:
        """The DHT key of a round's averaging group (hivemind's matchmaking key for the round's group bits)."""
        return DHTID.generate(source=f"{self._prefix}.0b{group_bits(round_number)}").to_bytes()
