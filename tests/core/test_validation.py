"""Input checks at the numerical core's boundary (fedlora_lite.core.validation, core.runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora_lite import decompose
from fedlora_lite.core import make_generator
from fedlora_lite.core.validation import as_matrix
from fedlora_lite.federated import aggregate


def _updates(K=4, d=5, p=3):
    return np.random.default_rng(0).standard_normal((K, d, p))


@pytest.mark.parametrize("dtype", [object, "U3", "datetime64[s]"])
def test_non_numeric_numpy_arrays_name_the_argument(dtype):
    bad = _updates().astype(dtype) if dtype is object else np.zeros((4, 5, 3), dtype=dtype)
    with pytest.raises(TypeError, match=r"updates\[0\] must be a real numeric array, got numpy dtype"):
        aggregate("fedavg", bad)
    with pytest.raises(TypeError, match=r"blocks\[0\] must be a real numeric array"):
        decompose(list(bad))
    with pytest.raises(TypeError, match="X must be a real numeric array"):
        as_matrix(np.array([[1, "a"]], dtype=object), "X")


def test_big_endian_arrays_are_read_by_value():
    native = _updates()
    big = native.astype(">f8")
    assert not big.dtype.isnative
    res_big, res_native = aggregate("fedavg", big), aggregate("fedavg", native)
    assert torch.equal(res_big.estimates, res_native.estimates)
    assert torch.equal(as_matrix(big[0], "X"), torch.from_numpy(native[0]))


def test_make_generator_checks_the_device_like_resolve_device():
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda"):
        make_generator(0, "gpu")
    if torch.cuda.is_available():
        assert make_generator(0, "cuda").device.type == "cuda"
    else:
        with pytest.raises(ValueError, match="device='cuda' requested but CUDA is not available"):
            make_generator(0, "cuda")
    assert make_generator(0).device.type == "cpu"
