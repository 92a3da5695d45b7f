"""The Q metric: a naive loop reference (helpers.naive_quality) on random data, known answers on hand-built
features, subsets, selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import naive_quality
from pipeline.distillation.quality import (
    GRAM_COLUMNS,
    QualityError,
    class_spectrum,
    draw_subsets,
    flatten_features,
    gram_matrix,
    information,
    knowledge_quality,
    pool_kernel,
    products_on_device,
    select_top_k,
    subset_a_stats,
    subset_sizes,
)


def fast_quality(x, labels, a, b, n_train, num_classes):
    stats = subset_a_stats(x[a], labels[a], num_classes, n_train)
    spectra = [class_spectrum(x[b][labels[b] == c]) for c in range(num_classes)]
    sizes = [int((labels[b] == c).sum()) for c in range(num_classes)]
    info = information(spectra, sizes, stats.mu)
    return {"S": stats.S, "I": info.I, "E": stats.E, "Q": knowledge_quality(stats, info)}, stats, info


@pytest.mark.parametrize("seed,sizes", [(0, (20, 20, 20)), (1, (25, 18, 30)), (2, (12, 12, 12, 12))])
def test_matches_naive_reference(seed, sizes):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    centres = rng.standard_normal((len(sizes), 48))
    x = (centres[labels] + 0.8 * rng.standard_normal((len(labels), 48))).astype(np.float32)
    a, b = draw_subsets(labels, len(sizes), seed)
    expected = naive_quality(x, labels, a, b, n_train=1000)
    got, _, _ = fast_quality(x, labels, a, b, 1000, len(sizes))
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    if len(set(sizes)) > 1:
        assert 0 < got["I"]  # padding zeroes the smaller classes' entropies (quirk 3), not the largest's


def test_gram_entries_stay_within_their_bound():
    """Three and a bit column blocks of features on scales 1e-3..1e3: every float32 entry is within the stated
    bound of the float64 product, the diagonal is the float64 squared norm, and the bound is not vacuous."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((60, 3 * GRAM_COLUMNS + 7)) * np.logspace(-3, 3, 60)[:, None]).astype(np.float32)
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    gram = gram_matrix(x)
    norm = np.sqrt(np.diag(exact))
    np.testing.assert_allclose(gram.sq_norm, np.diag(exact), rtol=1e-14)
    assert np.array_equal(np.diag(gram.matrix), gram.sq_norm)
    assert (np.abs(gram.matrix - exact) <= gram.bound * np.outer(norm, norm)).all()
    assert gram.bound < 1e-3
    on_device = products_on_device(x, torch.device("cpu"))  # the CUDA route's code, run where this test can run it
    off_diagonal = ~np.eye(len(x), dtype=bool)
    assert (np.abs(on_device - exact) <= gram.bound * np.outer(norm, norm))[off_diagonal].all()
    assert torch.get_float32_matmul_precision() == "highest"  # restored as it was


def test_minima_are_float64_values_where_float32_products_cancel():
    """Samples 1000 + small offsets: |x|^2 is 1e11 times the squared distances, so a float32 Gram product cannot
    tell neighbours apart, yet delta_c and m_c equal the float64 loop's (every pair is a candidate)."""
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), 12)
    x = (1000.0 + rng.standard_normal((36, 40)) * 1e-2).astype(np.float32)
    stats = subset_a_stats(x, labels, 3, 100)
    x64 = x.astype(np.float64)
    for c in range(3):
        inside, outside = x64[labels == c], x64[labels != c]
        nearest = min(np.linalg.norm(u - v) for u in inside for v in outside)
        cosines = [abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v) for u in inside for v in inside]
        assert stats.nearest_other[c] == pytest.approx(nearest, rel=1e-12)
        assert stats.min_cos[c] == pytest.approx(min(cosines), rel=1e-15)
    x32 = x.astype(np.float32)
    plain = (x32**2).sum(1)[:, None] + (x32**2).sum(1)[None, :] - 2 * (x32 @ x32.T)  # what float32 alone gives
    assert abs(np.sqrt(max(plain[labels == 0][:, labels != 0].min(), 0)) - stats.nearest_other[0]) > 1e-2


def test_many_tied_candidates_take_the_float64_product_route_with_the_same_answers(monkeypatch):
    """Sparse features (3 of 400 coordinates each) are mostly orthogonal: thousands of pairs tie at |cosine| 0 and
    all are candidates, so m_c comes from float64 products of their rows. Each route (by default, all pair by pair,
    all by products) gives the float64 loop's m_c and delta_c."""
    import pipeline.distillation.quality as quality

    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(2), 120)
    x = np.zeros((240, 400), dtype=np.float32)
    for row in x:
        row[rng.choice(400, 3, replace=False)] = rng.uniform(0.5, 2.0, 3)
    routes = {}
    for name, many_pairs in (("default", quality.MANY_PAIRS), ("pair by pair", 10**9), ("products", 0)):
        monkeypatch.setattr(quality, "MANY_PAIRS", many_pairs)
        routes[name] = subset_a_stats(x, labels, 2, 100)
    x64 = x.astype(np.float64)
    for c in range(2):
        inside, outside = x64[labels == c], x64[labels != c]
        nearest = min(np.linalg.norm(u - v) for u in inside for v in outside)
        for name, stats in routes.items():
            assert stats.min_cos[c] == 0.0, name
            assert stats.nearest_other[c] == pytest.approx(nearest, rel=1e-12), name


def _clusters(rng, spread: float, n: int = 30, dim: int = 64, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(classes), n)
    centres = 5.0 * rng.standard_normal((classes, dim))
    return (centres[labels] + spread * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def test_tight_separated_clusters_separate_better_than_mixed():
    rng = np.random.default_rng(0)
    tight, labels = _clusters(rng, spread=0.3)
    mixed, _ = _clusters(rng, spread=20.0)
    s_tight = subset_a_stats(tight, labels, 3, 100).S
    s_mixed = subset_a_stats(mixed, labels, 3, 100).S
    assert s_tight > 0.5 > 0.1 > s_mixed


def test_orthogonal_class_means_give_full_separation():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    x = (10.0 * np.eye(16)[labels] + 0.01 * rng.standard_normal((40, 16))).astype(np.float32)
    stats = subset_a_stats(x, labels, 4, 100)
    assert stats.S == pytest.approx(1.0, abs=2e-3)
    assert min(stats.intra) == pytest.approx(1.0, abs=1e-4)


def test_one_dominant_direction_has_low_spectral_entropy():
    rng = np.random.default_rng(0)
    n, dim = 40, 64
    direction = rng.standard_normal(dim)
    line = (rng.standard_normal((n, 1)) * direction + 1e-3 * rng.standard_normal((n, dim))).astype(np.float32)
    cloud = rng.standard_normal((n, dim)).astype(np.float32)
    low = information([class_spectrum(line)], [n], mu=0.0)
    high = information([class_spectrum(cloud)], [n], mu=0.0)
    assert low.embedding_dims == [1] and high.embedding_dims[0] > 20
    assert low.mean_entropy < 0.1 < 2.5 < high.mean_entropy


def test_scaling_leaves_s_i_e_unchanged():
    rng = np.random.default_rng(3)
    x, labels = _clusters(rng, spread=2.0, n=15)
    a, b = draw_subsets(labels, 3, 0)
    base, _, _ = fast_quality(x, labels, a, b, 500, 3)
    scaled, _, _ = fast_quality(x * np.float32(37.5), labels, a, b, 500, 3)
    for key in ("S", "I", "E", "Q"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-5), key


def test_efficiency_by_hand():
    """Class 0 at (1,0),(3,0); class 1 at (0,2),(0,4): nearest other-class points are sqrt(5) apart."""
    x = np.array([[1, 0], [3, 0], [0, 2], [0, 4]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    stats = subset_a_stats(x, labels, 2, n_train=100)
    assert stats.Delta == pytest.approx(math.sqrt(5))
    assert stats.R == pytest.approx(2.5)  # mean of per-class mean norms (2 and 3)
    assert stats.d == 2 and stats.K == pytest.approx(math.sqrt(100 / math.pi))
    assert stats.E == pytest.approx(math.sqrt(100 / math.pi) * 2 * math.sqrt(5) / 2.5)
    assert stats.S == pytest.approx(1.0) and stats.mu == pytest.approx(1.0)  # collinear classes, orthogonal pairs


def test_zero_norm_sample_gives_nan_and_constant_class_gives_no_crash():
    x = np.array([[0, 0], [1, 1], [2, 0], [3, 0.5]], dtype=np.float32)
    stats = subset_a_stats(x, np.array([0, 0, 1, 1]), 2, 10)
    assert math.isnan(stats.S)
    p = class_spectrum(np.ones((5, 8), dtype=np.float32))
    assert np.isnan(p).all()
    info = information([p, class_spectrum(np.eye(5, 8, dtype=np.float32))], [5, 5], mu=0.5)
    assert info.embedding_dims[0] == 1 and info.entropies[0] == 0.0 and info.entropies[1] > 0


@pytest.mark.parametrize(
    "num_samples,num_classes,expected",
    [
        (50_000, 10, (500, 500)),
        (50_000, 100, (50, 500)),
        (100_000, 200, (25, 500)),
        (10_000, 200, (25, 50)),
    ],
)
def test_subset_sizes_follow_method(num_samples, num_classes, expected):
    assert subset_sizes(num_samples, num_classes) == expected
    labels = np.arange(num_samples) % num_classes
    a, b = draw_subsets(labels, num_classes, seed=0)
    assert (len(a), len(b)) == (expected[0] * num_classes, expected[1] * num_classes)
    assert np.all(np.bincount(labels[a]) == expected[0])


def test_subsets_are_seeded_as_specified():
    labels = np.random.default_rng(9).integers(0, 3, 6000)
    a, b = draw_subsets(labels, 3, seed=5)
    members = np.flatnonzero(labels == 0)
    assert len(members) > 1666
    assert np.array_equal(a[:1666], members[np.random.default_rng(5).permutation(len(members))[:1666]])
    assert np.array_equal(b[:500], members[np.random.default_rng(6).permutation(len(members))[:500]])
    a2, b2 = draw_subsets(labels, 3, seed=5)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert not np.array_equal(b, draw_subsets(labels, 3, seed=6)[1])


def test_subsets_reject_absent_and_singleton_classes():
    with pytest.raises(QualityError, match="class 2 has no cached sample"):
        draw_subsets(np.array([0, 0, 1, 1]), 3, 0)
    with pytest.raises(QualityError, match="class 1 has fewer than 2"):
        draw_subsets(np.array([0, 0, 1]), 2, 0)


def test_pooling_rule():
    assert pool_kernel((256, 32, 32)) == 1 and pool_kernel((197, 768)) == 1 and pool_kernel((300_000,)) == 1
    assert pool_kernel((64, 112, 112)) == 2 and pool_kernel((64, 224, 224)) == 4
    x = np.arange(2 * 1 * 5 * 5, dtype=np.float32).reshape(2, 1, 5, 5)
    pooled = flatten_features(x, 2)
    assert pooled.shape == (2, 4)  # leftover row and column dropped
    assert pooled[0].tolist() == [6, 8, 16, 18]


def test_selection_ties_nan_and_large_k():
    assert select_top_k([0.1, 0.9, 0.5, 0.7], 2) == [1, 3]
    assert select_top_k([0.5, 0.9, 0.5, 0.1], 2) == [0, 1]  # tie: the shallower layer wins
    assert select_top_k([float("nan"), 0.2, 0.1], 2) == [1, 2]  # NaN last
    assert select_top_k([0.3, 0.2], 5) == [0, 1]
