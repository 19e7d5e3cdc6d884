"""Tests for the federated copy-task generator (fedlora_lite.experiments.copy_task.tasks)."""

from __future__ import annotations

import pytest
import torch

from fedlora_lite.experiments.copy_task import (
    CONTAMINATION_KINDS,
    CopyTaskConfig,
    apply_substitution,
    make_client_pool,
    make_copy_task,
    random_derangement,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _snapshot(task):
    return [(c.kind, c.topic, c.train, c.eval, c.mapping) for c in task.clients], task.shared_map


def test_same_seed_same_task_and_different_seed_differs():
    cfg = CopyTaskConfig(num_clients=6, contamination=0.34, eval_size=5)
    a, b = make_copy_task(cfg, _gen(3)), make_copy_task(cfg, _gen(3))
    assert _snapshot(a) == _snapshot(b)
    c = make_copy_task(cfg, _gen(4))
    assert _snapshot(c) != _snapshot(a)


def test_eval_size_does_not_change_training_data():
    small = make_copy_task(CopyTaskConfig(num_clients=5, eval_size=3), _gen(1))
    large = make_copy_task(CopyTaskConfig(num_clients=5, eval_size=40), _gen(1))
    assert [c.train for c in small.clients] == [c.train for c in large.clients]
    assert [c.eval for c in small.clients] == [c.eval[:3] for c in large.clients]
    assert small.shared_map == large.shared_map


def test_contamination_count_and_kinds():
    cfg = CopyTaskConfig(num_clients=10, contamination=0.3, kinds=("corrupted", "conflicting"), eval_size=4)
    task = make_copy_task(cfg, _gen(0))
    assert task.num_clients == 10
    assert int(task.contaminated.sum()) == 3
    assert torch.equal(task.benign, ~task.contaminated)
    kinds = [k for k in task.kinds if k != "benign"]
    assert sorted(kinds) == ["conflicting", "corrupted", "corrupted"]
    # contaminated clients are spread over positions, not all at the end
    assert task.kinds[-3:] != ["corrupted", "conflicting", "corrupted"] or task.kinds[:3] != ["benign"] * 3


def test_benign_targets_follow_shared_map_and_copy_other_letters():
    cfg = CopyTaskConfig(num_clients=5, contamination=0.0, num_shared=6, eval_size=8)
    task = make_copy_task(cfg, _gen(1))
    A = task.shared_letters
    assert len(A) == 6 and sorted(task.shared_map) == sorted(A) and sorted(task.shared_map.values()) == sorted(A)
    assert all(task.shared_map[x] != x for x in A)  # a derangement
    for c in task.clients:
        assert c.benign and c.mapping == task.shared_map
        for src, tgt in c.train + c.eval:
            assert len(src) == len(tgt)
            for s, t in zip(src, tgt):
                assert t == (task.shared_map[s] if s in A else s)


def test_conflicting_clients_substitute_other_letters_each_their_own():
    cfg = CopyTaskConfig(num_clients=6, contamination=0.5, kinds=("conflicting",), eval_size=6)
    task = make_copy_task(cfg, _gen(2))
    conf = [c for c in task.clients if c.kind == "conflicting"]
    assert len(conf) == 3
    for c in conf:
        assert len(c.mapping) == cfg.num_shared and not set(c.mapping) & set(task.shared_letters)
        assert set(c.mapping) <= set(task.other_letters) and all(c.mapping[x] != x for x in c.mapping)
        for src, tgt in c.eval:
            assert tgt == apply_substitution(src, c.mapping)
    assert len({tuple(sorted(c.mapping.items())) for c in conf}) == 3  # no collusion by default


def test_colluding_clients_share_one_draw():
    cfg = CopyTaskConfig(num_clients=8, contamination=0.5, kinds=("conflicting", "corrupted"), colluding=True, eval_size=2)
    task = make_copy_task(cfg, _gen(4))
    for kind in ("conflicting", "corrupted"):
        maps = {tuple(sorted(c.mapping.items())) for c in task.clients if c.kind == kind}
        assert len(maps) == 1


def test_remapped_moves_the_same_letters_elsewhere():
    cfg = CopyTaskConfig(num_clients=4, contamination=0.5, kinds=("remapped",), eval_size=4)
    task = make_copy_task(cfg, _gen(2))
    for c in (c for c in task.clients if c.kind == "remapped"):
        assert sorted(c.mapping) == sorted(task.shared_letters)
        assert all(c.mapping[x] not in (x, task.shared_map[x]) for x in c.mapping)


def test_corrupted_noisy_and_reversed_targets():
    cfg = CopyTaskConfig(num_clients=6, contamination=0.5, kinds=("corrupted", "noisy", "reversed"), eval_size=30)
    task = make_copy_task(cfg, _gen(5))
    corr = next(c for c in task.clients if c.kind == "corrupted")
    noisy = next(c for c in task.clients if c.kind == "noisy")
    rev = next(c for c in task.clients if c.kind == "reversed")
    # corrupted: a fixed permutation of the whole alphabet, no letter kept
    assert sorted(corr.mapping) == sorted(cfg.letters) == sorted(corr.mapping.values())
    assert all(corr.mapping[x] != x for x in cfg.letters)
    assert all(t == apply_substitution(s, corr.mapping) for s, t in corr.eval)
    # noisy: fresh random letters, spaces kept
    agree = total = 0
    for src, tgt in noisy.eval:
        assert [i for i, ch in enumerate(src) if ch == " "] == [i for i, ch in enumerate(tgt) if ch == " "]
        agree += sum(s == t for s, t in zip(src, tgt) if s != " ")
        total += sum(s != " " for s in src)
    assert agree / total < 0.15  # ~1/26 by chance
    assert all(t == s[::-1] for s, t in rev.eval)


def test_clients_are_heterogeneous_and_data_scarce():
    cfg = CopyTaskConfig(num_clients=8, contamination=0.0, train_size=(3, 9), focus_size=5, focus_mass=0.9, eval_size=200)
    task = make_copy_task(cfg, _gen(7))
    sizes = [c.num_train for c in task.clients]
    assert all(3 <= n <= 9 for n in sizes) and len(set(sizes)) > 1
    assert len({c.topic for c in task.clients}) == 8
    for c in task.clients:
        letters = [ch for s, _ in c.eval for ch in s if ch != " "]
        on_topic = sum(ch in c.topic for ch in letters) / len(letters)
        assert on_topic > 0.8  # 0.9 + 0.1 * 5/26 expected
        assert torch.isclose(c.letter_probs.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_sentences_are_words_within_length_bounds():
    cfg = CopyTaskConfig(num_clients=3, contamination=0.0, length=(5, 9), word_length=(2, 3), eval_size=50)
    task = make_copy_task(cfg, _gen(0))
    for src, _ in task.clients[0].eval:
        assert 5 <= len(src) <= 9
        assert not src.startswith(" ") and not src.endswith(" ") and "  " not in src


def test_private_maps_are_client_specific_and_disjoint_from_shared():
    cfg = CopyTaskConfig(num_clients=4, contamination=0.0, num_shared=6, num_private=4, eval_size=3)
    task = make_copy_task(cfg, _gen(9))
    B = task.private_letters
    assert len(B) == 4 and not set(B) & set(task.shared_letters)
    privates = [tuple(sorted((k, v) for k, v in c.mapping.items() if k in B)) for c in task.clients]
    assert all(len(p) == 4 for p in privates)
    assert len(set(privates)) > 1


def test_pool_subsets_share_clients():
    cfg = CopyTaskConfig(eval_size=4)
    pool = make_client_pool(cfg, num_benign=6, num_contaminated=4, generator=_gen(0))
    assert pool.kinds == ["benign"] * 6 + ["corrupted", "conflicting"] * 2
    sub = pool.subset([0, 1, 2, 6, 7])
    assert sub.num_clients == 5 and sub.kinds == ["benign"] * 3 + ["corrupted", "conflicting"]
    assert sub.clients[3].train is pool.clients[6].train
    assert sub.config.contamination == pytest.approx(0.4)
    with pytest.raises(ValueError, match="indices"):
        pool.subset([0, 0, 1])


def test_random_derangement_avoids_map():
    g = _gen(0)
    base = random_derangement("abcd", g)
    other = random_derangement("abcd", g, avoid=base)
    assert all(other[c] != c and other[c] != base[c] for c in "abcd")
    with pytest.raises(ValueError, match="letters"):
        random_derangement("a", g)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clients": 2}, "num_clients"),
        ({"contamination": 1.0}, "contamination"),
        ({"kinds": ("poisoned",)}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"num_shared": 10, "num_private": 7}, "exceeds"),
        ({"colluding": 1}, "colluding"),
        ({"num_private": 1}, "num_private"),
        ({"train_size": (5, 2)}, "train_size"),
        ({"length": 0}, "length"),
        ({"letters": "aab"}, "letters"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CopyTaskConfig(**kwargs)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="cfg"):
        make_copy_task({"num_clients": 3}, _gen())
    with pytest.raises(TypeError, match="generator"):
        make_client_pool(CopyTaskConfig(), 3, 0, generator=0)
    with pytest.raises(ValueError, match="at least 3"):
        make_client_pool(CopyTaskConfig(), 1, 1, generator=_gen())


def test_zero_train_size_gives_empty_clients():
    # allowed by the generator (to exercise the pipeline's "client with no data" handling)
    task = make_copy_task(CopyTaskConfig(num_clients=3, contamination=0.0, train_size=(0, 0), eval_size=2), _gen())
    assert all(c.num_train == 0 for c in task.clients)


def test_kinds_constant():
    assert set(CONTAMINATION_KINDS) == {"corrupted", "conflicting", "remapped", "noisy", "reversed"}
