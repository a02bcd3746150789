"""The fine-tune's privacy accountant and a site's floor as both sides share them (protocol.finetune_privacy)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Error, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.differential_privacy import add_localdp_gaussian_noise_to_params

from coordinator.finetune_server import _failures
from coordinator.finetune_site_privacy import split_refusals
from protocol.finetune_privacy import Refusal, SiteFloor, noise_multiplier, rdp_epsilon


@pytest.mark.parametrize("epsilon_per_round", [1.0, 4.0, 8.0])
def test_twenty_rounds_cost_far_less_by_rdp_than_by_basic_composition_and_more_with_every_round(
    epsilon_per_round: float,
) -> None:
    z = noise_multiplier(epsilon_per_round, 1e-5)
    by_rounds = [rdp_epsilon([z] * rounds, 1e-5) for rounds in (1, 2, 5, 10, 20)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 5  # strictly growing
    assert by_rounds[-1] < 0.4 * 20 * epsilon_per_round
    assert rdp_epsilon([], 1e-5) == 0.0


def test_one_round_at_a_large_epsilon_costs_a_little_more_than_the_classical_formula_claims() -> None:
    # sqrt(2 ln(1.25/delta)) / epsilon is only a guarantee for epsilon < 1: the accountant says what it really is.
    assert 8.0 < rdp_epsilon([noise_multiplier(8.0, 1e-5)], 1e-5) < 9.0
    assert rdp_epsilon([noise_multiplier(0.5, 1e-5)], 1e-5) < 0.5


def test_the_noise_multiplier_is_the_noise_flowers_local_dp_adds_per_unit_of_sensitivity() -> None:
    sensitivity, epsilon, delta = 1.0, 4.0, 1e-5
    noised = add_localdp_gaussian_noise_to_params(
        ndarrays_to_parameters([np.zeros(200_000, dtype=np.float32)]), sensitivity, epsilon, delta)
    measured = parameters_to_ndarrays(noised)[0].std()
    assert measured == pytest.approx(sensitivity * noise_multiplier(epsilon, delta), rel=0.01)


def test_a_floor_survives_the_supernodes_node_config_and_a_bad_ceiling_is_refused() -> None:
    floor = SiteFloor(require_secagg=True, max_epsilon=12.5, delta=1e-6)
    config = floor.to_node_config()
    assert all(isinstance(value, str) for value in config.values())  # all that --node-config carries
    assert SiteFloor.from_node_config(config) == floor
    assert SiteFloor.from_json(floor.to_json()) == floor
    assert SiteFloor.from_node_config({"name": "older-site"}) == SiteFloor()  # no keys: no floor
    assert SiteFloor().describe() == "no floor"
    with pytest.raises(ValueError, match="--max-epsilon must be > 0"):
        SiteFloor(max_epsilon=0)


def test_the_server_tells_a_refusal_from_other_failures_after_flower_has_wrapped_it() -> None:
    refusal = Refusal(site="careful-bank", round=3, rule="secagg", reason="it requires SecAgg+; run with SecAgg+",
                      floor=SiteFloor(require_secagg=True))
    # What a SuperNode sends back when the ClientApp raises (flwr.supernode.runtime.run_clientapp), twice as
    # the SecAgg+ workflow lists it, beside an ordinary failure.
    wrapped = f"<class 'worker.finetune_floor.FloorRefused'>:<'{refusal}'>"
    failures = [Exception(Error(code=2, reason=wrapped)), Exception(Error(code=2, reason=wrapped)),
                Exception(Error(code=2, reason="<class 'SiteError'>:<'site x: checkpoint mismatch'>"))]
    refusals, others = split_refusals(_failures(failures))
    assert refusals == [refusal]
    assert others == ["<class 'SiteError'>:<'site x: checkpoint mismatch'>"]
    assert str(refusal).startswith("site careful-bank refuses round 3: it requires SecAgg+")
