"""What a checkpoint's training cost in energy, and an emissions estimate, from lineage.

Each worker reports what a round cost its device (worker/energy.py): measured by the
GPU's counter ("nvml") or the CPU package's ("rapl"), or an "estimate" from the device's
rated power and its measured use. The coordinator shares a round's energy among its
lineage records by tokens (coordinator/rounds.py), so summing the records a checkpoint
holds gives what its weights cost. Not counted: rounds that were not kept, the
coordinator and the network, and the members a group vouched for (no figure of theirs).

Emissions come from the grid intensity each worker declared at Register (gCO2e per kWh);
the energy of workers that declared none is stated as such, not given a guessed intensity.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from coordinator.store import Contribution, LineageRecord, Worker
from protocol.choices import ENERGY_ESTIMATE, ENERGY_METHODS, ENERGY_NVML, ENERGY_RAPL, INDEPENDENT

JOULES_PER_KWH = 3.6e6
UNKNOWN = "unknown"  # a record whose round's report is gone (a rewound round, in an older checkpoint)


def energy_summary(session: Session, records: ColumnElement[bool]) -> dict:
    """kWh of the lineage records `records` selects: overall, by method, per institution and round; kg CO2e."""
    rows = session.execute(
        select(LineageRecord.round, LineageRecord.worker_id, LineageRecord.institution, LineageRecord.energy_joules,
               LineageRecord.end - LineageRecord.start, Worker.grid_gco2_per_kwh)
        .join(Worker, Worker.id == LineageRecord.worker_id).where(records)
    ).all()
    last_round = max((row[0] for row in rows), default=-1)
    methods = {(round_number, worker_id): method for round_number, worker_id, method in session.execute(
        select(Contribution.round, Contribution.worker_id, Contribution.energy_method)
        .where(Contribution.round <= last_round))}
    by_method: dict[str, float] = dict.fromkeys(ENERGY_METHODS, 0.0)
    by_institution: dict[str, float] = defaultdict(float)
    by_round: dict[int, float] = defaultdict(float)
    grams = undeclared = 0.0
    tokens_without = tokens = 0
    for round_number, worker_id, institution, joules, record_tokens, intensity in rows:
        tokens += record_tokens
        by_round[round_number] += joules
        if not joules:
            tokens_without += record_tokens
            continue
        method = methods.get((round_number, worker_id)) or UNKNOWN
        by_method[method] = by_method.get(method, 0.0) + joules
        by_institution[institution] += joules
        if intensity > 0:
            grams += joules / JOULES_PER_KWH * intensity
        else:
            undeclared += joules
    total = sum(by_method.values())
    return {
        "kwh": total / JOULES_PER_KWH,
        "kwh_by_method": {method: joules / JOULES_PER_KWH for method, joules in by_method.items()},
        "measured_share": _share(by_method[ENERGY_NVML] + by_method[ENERGY_RAPL], total),
        "estimated_share": _share(by_method[ENERGY_ESTIMATE], total),
        "rounds": len(by_round),
        "kwh_per_round": total / JOULES_PER_KWH / len(by_round) if by_round else 0.0,
        "institutions": {name: joules / JOULES_PER_KWH for name, joules in sorted(by_institution.items())
                         if name != INDEPENDENT},  # verified institutions only, as in the card's contributors
        "volunteers_kwh": by_institution.get(INDEPENDENT, 0.0) / JOULES_PER_KWH,
        "emissions_kg_co2e": grams / 1000,
        "undeclared_intensity_share": _share(undeclared, total),  # of the kWh: not in the emissions figure
        "tokens_without_energy": tokens_without,
        "tokens": tokens,
    }


def energy_markdown(energy: dict) -> list[str]:
    """The card's "Energy" section."""
    lines = ["## Energy", "",
             "Each worker measures what its rounds cost its device: the GPU's energy counter (NVML), the CPU package's "
             "(RAPL) where the host lets it be read, otherwise an estimate from the device's rated power and its "
             "measured use. A round's energy is shared among the data it trained by tokens. Not counted: rounds that "
             "were not kept, the coordinator, the network.", ""]
    if not energy["kwh"]:
        return lines + ["No round of this checkpoint reported its energy.", ""]
    by_method = energy["kwh_by_method"]
    lines += [
        f"- Energy: {_kwh(energy['kwh'])} kWh over {energy['rounds']} rounds, {_kwh(energy['kwh_per_round'])} kWh "
        "per round on average",
        f"- Measured: {energy['measured_share']:.0%} (NVML {_kwh(by_method[ENERGY_NVML])} kWh, RAPL "
        f"{_kwh(by_method[ENERGY_RAPL])} kWh); estimated: {energy['estimated_share']:.0%} "
        f"({_kwh(by_method[ENERGY_ESTIMATE])} kWh)",
        f"- Emissions estimate: {energy['emissions_kg_co2e']:.3g} kg CO2e, from each worker's declared grid intensity"
        + (f"; {energy['undeclared_intensity_share']:.0%} of the energy ran where no intensity was declared and is "
           "not in this figure" if energy["undeclared_intensity_share"] else ""),
    ]
    if by_method.get(UNKNOWN):
        lines.append(f"- {_kwh(by_method[UNKNOWN])} kWh of rounds since rewound: how it was obtained is not recorded")
    if energy["tokens_without_energy"]:
        lines.append(f"- {energy['tokens_without_energy']:,} tokens "
                     f"({_share(energy['tokens_without_energy'], energy['tokens']):.1%}) have no energy figure: their "
                     "group vouched for them, or their worker reported none")
    lines += ["", "| verified institution | kWh | share |", "|---|---:|---:|",
              *(f"| {name} | {_kwh(kwh)} | {kwh / energy['kwh']:.1%} |" for name, kwh in energy["institutions"].items()),
              f"| volunteers (no institution) | {_kwh(energy['volunteers_kwh'])} "
              f"| {energy['volunteers_kwh'] / energy['kwh']:.1%} |", ""]
    return lines


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _kwh(kwh: float) -> str:
    """Readable at a supercomputer's scale and at a test run's (microwatt-hours)."""
    return f"{kwh:,.2f}" if kwh >= 1 else f"{kwh:.3g}"
