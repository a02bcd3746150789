"""Made-up private data for fine-tuning demos, tests and benchmarks: one domain per site, so sites differ (non-IID).

Each site is a kind of company answering its customers in French: an energy
utility, a hospital, a bank. Answers follow from a fixed table of facts per
site (a contract's price, a service's hours), so a model can learn them and a
held-out question about a known fact measures what it learnt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from model.instructions import Pair

DAYS = ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi"]


@dataclass(frozen=True)
class Domain:
    name: str
    entities: list[str]
    questions: list[str]        # templates with {entity}
    answers: list[str]          # templates with {entity} and the fact's fields
    facts: "dict[str, dict[str, object]]"


def _energy(rng: random.Random) -> Domain:
    entities = ["Base", "Heures Creuses", "Tempo", "Vert Fixe", "Éco Week-end", "Pro Solaire", "Zen Flex",
                "Online", "Essentielle", "Référence", "Idéo", "Azur"]
    facts = {e: {"price": rng.randint(15, 32), "fee": rng.randint(8, 25)} for e in entities}
    return Domain(
        "energy", entities,
        ["Quel est le prix du kWh pour l'offre {entity} ?", "Combien coûte le kWh avec {entity} ?",
         "Quel est l'abonnement mensuel de l'offre {entity} ?", "Je suis client {entity}, quel est mon abonnement ?"],
        ["L'offre {entity} facture le kWh à {price} centimes.", "Avec {entity}, le kWh coûte {price} centimes.",
         "L'abonnement {entity} coûte {fee} euros par mois.", "Votre abonnement {entity} est de {fee} euros par mois."],
        facts,
    )


def _hospital(rng: random.Random) -> Domain:
    entities = ["cardiologie", "pédiatrie", "radiologie", "dermatologie", "ophtalmologie", "neurologie",
                "orthopédie", "maternité", "urgences", "oncologie", "rhumatologie", "pneumologie"]
    facts = {}
    for entity in entities:
        first = rng.randrange(0, 3)
        facts[entity] = {"day1": DAYS[first], "day2": DAYS[first + rng.randint(2, 3)],
                         "open": rng.randint(7, 10), "floor": rng.randint(1, 6)}
    return Domain(
        "hospital", entities,
        ["Quels sont les horaires du service de {entity} ?", "Quand puis-je consulter en {entity} ?",
         "À quel étage se trouve la {entity} ?", "Où est le service de {entity} ?"],
        ["Le service de {entity} reçoit du {day1} au {day2} à partir de {open} h.",
         "La {entity} consulte du {day1} au {day2}, dès {open} h.",
         "La {entity} est au niveau {floor} du bâtiment principal.", "Le service de {entity} est au niveau {floor}."],
        facts,
    )


def _bank(rng: random.Random) -> Domain:
    entities = ["Visa Classic", "Visa Premier", "Mastercard Gold", "Carte Jeune", "Carte Pro", "Infinite",
                "Carte Platine", "Carte Essentiel", "Carte Online", "Carte Avantage", "Carte Étudiant", "Carte Sérénité"]
    facts = {e: {"limit": rng.choice([500, 800, 1000, 1500, 2000, 3000, 5000]), "cost": rng.randint(0, 15) * 10}
             for e in entities}
    return Domain(
        "bank", entities,
        ["Quel est le plafond de paiement de la {entity} ?", "Jusqu'à combien puis-je payer avec ma {entity} ?",
         "Combien coûte la {entity} par an ?", "Quelle est la cotisation annuelle de la {entity} ?"],
        ["La {entity} permet de payer jusqu'à {limit} euros par mois.", "Votre {entity} est plafonnée à {limit} euros par mois.",
         "La {entity} coûte {cost} euros par an.", "La cotisation de la {entity} est de {cost} euros par an."],
        facts,
    )


DOMAINS = {"energy": _energy, "hospital": _hospital, "bank": _bank}


def site_pairs(domain: str, count: int, seed: int = 0) -> list[Pair]:
    """`count` question/answer pairs of one domain; the facts depend on the domain only, the draw on the seed."""
    table = DOMAINS[domain](random.Random(domain))
    draw = random.Random(f"{domain}-{seed}")
    pairs = []
    for _ in range(count):
        entity = draw.choice(table.entities)
        template = draw.randrange(len(table.questions))
        fields = {"entity": entity, **table.facts[entity]}
        pairs.append(Pair(table.questions[template].format(**fields), table.answers[template].format(**fields)))
    return pairs


def stand_in_checkpoint(directory: Path, texts: list[str], preset: str = "tiny", vocab_size: int = 512, seed: int = 0) -> Path:
    """A checkpoint to fine-tune when no pretraining run is at hand: a tokenizer trained on `texts`, fresh weights."""
    from model.checkpoints import write_checkpoint_files
    from model.presets import build_model
    from model.tokenizer import train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size, directory)
    model = build_model(preset, len(tokenizer), seed)
    write_checkpoint_files(directory, model, tokenizer, {
        "run_id": f"stand-in-{preset}-{seed}", "completed_round": 0, "next_round": 1, "lineage_head": 0,
        "config_version": "none", "run_config": {"model_preset": preset}, "saved_at": 0.0,
    })
    return directory
