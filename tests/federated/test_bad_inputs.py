"""Clear errors for bad inputs to the synthetic generators and the aggregators (issue 9's small gaps)."""

from __future__ import annotations

import pytest
import torch

from fedlora_lite.federated import (
    aggregate,
    make_regression_federation,
    make_update_federation,
    random_lora_factors,
)

GENERATORS = {
    "make_update_federation": lambda device: make_update_federation(6, 8, 4, 2, 0.3, seed=0, device=device),
    "make_regression_federation": lambda device: make_regression_federation(6, 8, 4, 2, 0.3, seed=0, device=device),
    "random_lora_factors": lambda device: random_lora_factors(8, 6, 5, 3, shared_rank=2, device=device),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_give_resolve_devices_error_for_an_absent_accelerator(name):
    make = GENERATORS[name]
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda"):
        make("gpu")
    if torch.cuda.is_available():
        make("cuda")  # runs where there is a GPU
    else:
        with pytest.raises(ValueError, match="device='cuda' requested but CUDA is not available"):
            make("cuda")


@pytest.mark.parametrize("weights", [["a", "b", "c", "d"], [object()] * 4, [[1, 2], [3]], "1234"])
def test_fedavg_weights_of_the_wrong_type_name_the_argument(weights):
    M = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises((TypeError, ValueError), match="weights must be 4"):
        aggregate("fedavg", M, weights=weights)
