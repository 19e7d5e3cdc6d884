"""Cross-checks against Flower's pure aggregation functions (flwr.server.strategy.aggregate), to 1e-6.

Same seeded inputs, one layer per client. Convention differences are tested explicitly:
Flower's Multi-Krum weights the kept updates by their sample counts (ours: plain mean).
"""

import numpy as np
import pytest
import torch

from fedlora_lite.federated import aggregate
from tests.federated.reference_impls import cross_check_table, flower_aggregate, seeded_updates, to_flower

fa = flower_aggregate()
CASES = [(11, 0, 2), (15, 1, 3), (12, 2, 1)]  # (K, seed, outliers)


def _close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("K,seed,out", CASES)
def test_median_matches_flower(K, seed, out):
    M = seeded_updates(K, seed=seed, outliers=out)
    _close(aggregate("median", M).estimates[0], fa.aggregate_median(to_flower(M))[0])


@pytest.mark.parametrize("K,seed,out", CASES)
@pytest.mark.parametrize("trim", [0.0, 0.1, 0.25, 0.4])
def test_trimmed_mean_matches_flower(K, seed, out, trim):
    M = seeded_updates(K, seed=seed, outliers=out)
    _close(aggregate("trimmed_mean", M, trim=trim).estimates[0], fa.aggregate_trimmed_avg(to_flower(M), trim)[0])


@pytest.mark.parametrize("K,seed,out", CASES)
@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_and_multi_krum_match_flower(K, seed, out, f):
    M = seeded_updates(K, seed=seed, outliers=out)
    _close(aggregate("krum", M, f=f).estimates[0], fa.aggregate_krum(to_flower(M), num_malicious=f, to_keep=0)[0])
    for m in (1, 3, K - f):
        _close(aggregate("multi_krum", M, f=f, m=m).estimates[0],
               fa.aggregate_krum(to_flower(M), num_malicious=f, to_keep=m)[0])


def test_flower_multi_krum_weights_by_sample_counts_ours_does_not():
    M = seeded_updates(11, seed=3)
    examples = list(range(1, 12))
    ours = aggregate("multi_krum", M, f=2, m=5)
    ref = fa.aggregate_krum(to_flower(M, examples), num_malicious=2, to_keep=5)[0]
    sel = ours.info["selected"]
    n = torch.tensor([examples[i] for i in sel], dtype=M.dtype)
    weighted = (n[:, None, None] * M[sel]).sum(0) / n.sum()
    _close(weighted, ref)  # Flower = the sample-weighted mean of the same selected set ...
    assert float((ours.estimates[0] - torch.as_tensor(ref)).abs().max()) > 1e-3  # ... which is not our plain mean


@pytest.mark.parametrize("K,f,seed", [(11, 2, 0), (15, 3, 1), (7, 1, 2), (9, 0, 3), (20, 4, 4)])
def test_bulyan_matches_flower(K, f, seed):
    M = seeded_updates(K, seed=seed, outliers=f)
    ref = fa.aggregate_bulyan(to_flower(M), num_malicious=f, aggregation_rule=fa.aggregate_krum, to_keep=0)[0]
    _close(aggregate("bulyan", M, f=f).estimates[0], ref)


def test_bulyan_refuses_what_flower_refuses():
    M = seeded_updates(10, seed=0)
    with pytest.raises(ValueError):
        fa.aggregate_bulyan(to_flower(M), num_malicious=2, aggregation_rule=fa.aggregate_krum, to_keep=0)
    with pytest.raises(ValueError, match="4f \\+ 3"):
        aggregate("bulyan", M, f=2)


def test_cross_check_table_rows_agree():
    rows = cross_check_table()
    assert len(rows) == 11
    assert all(diff <= 1e-6 for _, _, _, diff in rows), rows
