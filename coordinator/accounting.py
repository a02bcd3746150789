"""The accounting invariant of docs/ARCHITECTURE.md, checked from the database.

For every shard and epoch, the token ranges tile [0, tokens) with no gap and no
overlap; each trained range is one completed lease and one lineage record covering
exactly it; each leased range is held by exactly one lease out (granted, or reported and
awaiting its round's decision, coordinator/leases.py). So every token
is trained exactly once per epoch or is still in (or on its way back to) the pool.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.leases import HELD
from coordinator.store import Lease, LineageRecord, Shard, Source, TokenRange


def accounting_problems(sessions: sessionmaker[Session]) -> list[str]:
    """Every violation found, as sentences; an empty list means the books balance."""
    problems: list[str] = []
    with sessions() as session:
        shards = {shard.id: shard for shard in session.scalars(select(Shard))}
        ranges_by_key: dict[tuple[str, int], list[TokenRange]] = defaultdict(list)
        for token_range in session.scalars(select(TokenRange)):
            ranges_by_key[(token_range.shard_id, token_range.epoch)].append(token_range)
        leases_by_range: dict[int, list[Lease]] = defaultdict(list)
        for lease in session.scalars(select(Lease)):
            leases_by_range[lease.range_id].append(lease)
        lineage_by_lease = {record.lease_id: record for record in session.scalars(select(LineageRecord))}
        counted = dict(session.execute(select(Source.name, Source.assigned_tokens)).all())

    assigned: dict[str, int] = defaultdict(int)
    for (shard_id, _), ranges in ranges_by_key.items():
        assigned[shards[shard_id].source] += sum(r.end - r.start for r in ranges if r.state in ("leased", "trained"))
    for source, tokens in sorted(counted.items()):
        if tokens != assigned[source]:
            problems.append(f"source {source}: its counter says {tokens} tokens leased or trained, its ranges {assigned[source]}")

    # Every shard of a source takes part in each of the source's epochs: a (shard, epoch)
    # without any range has lost all of its tokens.
    newest_epoch: dict[str, int] = defaultdict(int)  # epoch 0 exists from the start
    for shard_id, epoch in ranges_by_key:
        newest_epoch[shards[shard_id].source] = max(newest_epoch[shards[shard_id].source], epoch)
    for shard in shards.values():
        for epoch in range(newest_epoch[shard.source] + 1):
            if shard.tokens and (shard.id, epoch) not in ranges_by_key:
                problems.append(f"shard {shard.id} epoch {epoch}: tokens 0..{shard.tokens} are in no range "
                                "(neither in the pool, on lease nor trained): lost")

    for (shard_id, epoch), ranges in sorted(ranges_by_key.items()):
        ranges.sort(key=lambda r: r.start)
        expected_start = 0
        for token_range in ranges:
            where = f"shard {shard_id} epoch {epoch} range {token_range.start}..{token_range.end}"
            if token_range.start > expected_start:
                problems.append(f"shard {shard_id} epoch {epoch}: tokens {expected_start}..{token_range.start} are in "
                                f"no range (neither in the pool, on lease nor trained): lost")
            elif token_range.start < expected_start:
                problems.append(f"{where}: overlaps the range before, which ends at {expected_start}: counted twice")
            expected_start = token_range.end
            problems.extend(_range_problems(where, token_range, leases_by_range, lineage_by_lease))
        if expected_start < shards[shard_id].tokens:
            problems.append(f"shard {shard_id} epoch {epoch}: tokens {expected_start}..{shards[shard_id].tokens} are "
                            "in no range (neither in the pool, on lease nor trained): lost")
        elif expected_start > shards[shard_id].tokens:
            problems.append(f"shard {shard_id} epoch {epoch}: ranges end at {expected_start}, past the shard's "
                            f"{shards[shard_id].tokens} tokens")
    return problems


def _range_problems(
    where: str,
    token_range: TokenRange,
    leases_by_range: dict[int, list[Lease]],
    lineage_by_lease: dict[int, LineageRecord],
) -> list[str]:
    leases = leases_by_range.get(token_range.id, [])
    granted = [lease for lease in leases if lease.state in HELD]
    completed = [lease for lease in leases if lease.state == "completed"]
    if token_range.state == "leased" and len(granted) != 1:
        return [f"{where}: leased but held by {len(granted)} leases out"]
    if token_range.state == "pool" and (granted or completed):
        return [f"{where}: in the pool but has {len(granted)} leases out and {len(completed)} completed"]
    if token_range.state != "trained":
        return []
    if len(completed) != 1:
        return [f"{where}: trained but has {len(completed)} completed leases"]
    record = lineage_by_lease.get(completed[0].id)
    if record is None:
        return [f"{where}: trained but lease {completed[0].id} has no lineage record"]
    if (record.start, record.end) != (token_range.start, token_range.end):
        return [f"{where}: lineage record {record.id} covers {record.start}..{record.end}"]
    return []
