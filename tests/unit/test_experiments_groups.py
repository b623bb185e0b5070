"""Task groupings (megamt.experiments.groups) and Spearman's rank correlation, against brute force."""

import itertools
import json

import numpy as np
import pytest

from megamt.experiments.groups import (best_partition, load_matrix, main, partition_score, partitions, rank_of)
from megamt.experiments.pairs import compare_affinity, spearman


def stirling2(n, k):
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    return k * stirling2(n - 1, k) + stirling2(n - 1, k - 1)


@pytest.mark.parametrize("n,k", [(1, 1), (4, 2), (5, 3), (6, 3), (7, 7), (8, 4)])
def test_partitions_are_all_distinct_set_partitions_into_k_groups(n, k):
    seen = set()
    for labels in partitions(n, k):
        assert len(set(labels)) == k  # exactly k non-empty groups
        groups = frozenset(frozenset(i for i in range(n) if labels[i] == g) for g in range(k))
        assert groups not in seen
        seen.add(groups)
    assert len(seen) == stirling2(n, k)


def brute_force(A, k):
    """Every assignment of n tasks to k labels (k^n), groups non-empty: the best score."""
    n = A.shape[0]
    return max(partition_score(A, lab) for lab in itertools.product(range(k), repeat=n) if len(set(lab)) == k)


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_and_branch_and_bound_find_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    n = 6 + seed % 2
    A = rng.normal(size=(n, n)) * rng.choice([0.1, 1.0], size=(n, n))  # mixed signs and scales, asymmetric
    for k in (1, 2, 3, 4):
        want = brute_force(A, k)
        ex = best_partition(A, k, method="exhaustive")
        bb = best_partition(A, k, method="branch_and_bound")
        assert ex["score"] == pytest.approx(want, abs=1e-9) and bb["score"] == pytest.approx(want, abs=1e-9)
        assert partition_score(A, bb["labels"]) == pytest.approx(want, abs=1e-9)
        assert len(set(bb["labels"])) == k


def test_branch_and_bound_beyond_ten_tasks_equals_exhaustive_and_prunes():
    rng = np.random.default_rng(11)
    n, k = 12, 3  # S(12, 3) = 86,526 partitions
    A = rng.normal(size=(n, n))
    auto = best_partition(A, k)
    assert auto["method"] == "branch_and_bound"
    ex = best_partition(A, k, method="exhaustive")
    assert auto["score"] == pytest.approx(ex["score"], abs=1e-9)
    assert auto["searched"] < ex["searched"]  # nodes visited vs partitions enumerated


def test_nan_entries_count_as_zero_and_rank():
    A = np.array([[0, 5, -1, np.nan], [5, 0, -1, 0], [-1, -1, 0, 3], [np.nan, 0, 3, 0]], dtype=float)
    r = best_partition(A, 2)
    assert sorted(map(sorted, [[i for i, g in enumerate(r["labels"]) if g == h] for h in set(r["labels"])])) == [[0, 1], [2, 3]]
    assert r["score"] == 16.0
    assert rank_of(A, r["labels"], 2) == (1, stirling2(4, 2))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 5, size=9).astype(float)  # many ties
        y = x * rng.choice([-1, 1]) + rng.normal(size=9)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman([1, 2], [2, 1]))  # fewer than 3 points
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side


def test_compare_affinity_orients_gain_against_transposed_affinity():
    gain = np.array([[np.nan, 1.0, -2.0], [3.0, np.nan, 0.5], [-1.0, 2.0, np.nan]])
    Z = gain.T.copy()  # Z[j][i] = gain[i][j]: a perfect one-run predictor
    c = compare_affinity(gain, Z)
    assert c["spearman_ordered"] == pytest.approx(1.0) and c["n_ordered"] == 6
    assert c["spearman_unordered"] == pytest.approx(1.0) and c["n_unordered"] == 3


def test_groups_cli_compares_affinity_with_pairs(tmp_path, capsys):
    tasks = ["a", "b", "c", "d"]
    Z = [[0.0, 0.3, -0.1, -0.2], [0.2, 0.0, -0.3, -0.1], [-0.2, -0.1, 0.0, 0.4], [-0.1, -0.2, 0.5, 0.0]]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "affinity.json").write_text(json.dumps(
        {"tasks": tasks, "lookahead": {"mean": Z, "steps": 3}, "first_order": {"mean": Z, "steps": 3}}))
    gain = np.array(Z).T.tolist()  # the same effects written as pair gains (row = the task measured)
    for i in range(4):
        gain[i][i] = None
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "pairs.json").write_text(json.dumps({"tasks": tasks, "gain": gain}))
    assert main(["--affinity", str(tmp_path / "run"), "--pairs", str(tmp_path / "pairs"), "-k", "2",
                 "--out", str(tmp_path / "g")]) == 0
    res = json.loads((tmp_path / "g" / "groups.json").read_text())
    for label in ("affinity", "pairs"):
        r = res["k"]["2"][label]
        assert sorted(map(sorted, r["groups"])) == [["a", "b"], ["c", "d"]]
        other = "pairs" if label == "affinity" else "affinity"
        assert r["scored_under"][other]["rank"] == 1 and r["scored_under"][other]["of"] == 7
    assert res["spearman_pairs"] == pytest.approx(1.0)
    assert "{a, b} / {c, d}" in (tmp_path / "g" / "groups.md").read_text()
    names, A, _ = load_matrix(tmp_path / "pairs")
    assert np.allclose(np.nan_to_num(A), np.array(Z))  # pairs transposed to the affinity's orientation
    assert main(["--affinity", str(tmp_path / "nope"), "-k", "2"]) == 2
    assert "no affinity.json" in capsys.readouterr().err
