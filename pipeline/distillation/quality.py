"""Knowledge quality Q = S + sqrt(I·E) of one layer's features (docs/method.md §1, the paper's released code).

Pure array code, no I/O: `score.py` gathers the subsets from the store and calls these. Step numbers follow
docs/method.md. Quirks of the reference are reproduced on purpose and marked "quirk".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

POOL_THRESHOLD = 262_144  # a 4-D map with more elements per sample is max-pooled first (step 1)
SUBSET_A_TOTAL = 5000  # subset A: floor(5000 / C) samples per class (step 2)
SUBSET_B_PER_CLASS = 500  # subset B: min(500, floor(N / C)) per class
ENERGY = 0.95  # class embedding dimension: components holding 95 % of the spectrum
GRAM_COLUMNS = 4096  # feature columns per float32 product of the Gram matrix; the products are summed in float64
PAIR_BATCH = 256  # sample pairs recomputed in float64 at a time
MANY_PAIRS = 4096  # beyond this many candidates (ties: sparse features), one float64 product of their rows is cheaper


class QualityError(ValueError):
    """Features or labels on which Q is undefined (absent class, class with fewer than 2 samples in A)."""


def pool_kernel(shape: tuple[int, ...]) -> int:
    """Step 1: the max-pool window for a per-sample shape; 1 (no pooling) unless a (C, H, W) map is too large."""
    size = math.prod(shape)
    if len(shape) != 3 or size <= POOL_THRESHOLD:
        return 1
    return math.ceil(math.sqrt(size / POOL_THRESHOLD))


def flatten_features(x: np.ndarray, kernel: int, channels_last: bool = False) -> np.ndarray:
    """Step 1 on a block of samples: optional k×k max-pool over the spatial axes (stride k, leftovers dropped; an
    NHWC map is pooled over H and W too), then one row per sample."""
    x = torch.from_numpy(np.ascontiguousarray(x)).float()
    if kernel > 1:
        x = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2) if channels_last else x, kernel, stride=kernel)
    return x.reshape(len(x), -1).numpy()


def subset_sizes(num_samples: int, num_classes: int) -> tuple[int, int]:
    """Per-class caps of subsets A and B (step 2)."""
    return SUBSET_A_TOTAL // num_classes, min(SUBSET_B_PER_CLASS, num_samples // num_classes)


def draw_subset(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Row positions of a class-balanced subset: for each class in ascending order, its rows (ascending) at
    positions `default_rng(seed).permutation(n_c)[:per_class]`, concatenated by class."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        picks.append(members[rng.permutation(len(members))[:per_class]])
    return np.concatenate(picks)


def draw_subsets(labels: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Subsets A (seed) and B (seed + 1) of step 2, as row positions grouped by class."""
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise QualityError(f"label {len(counts) - 1} is out of range for {num_classes} classes")
    absent = np.flatnonzero(counts == 0)
    if len(absent):
        raise QualityError(f"class {int(absent[0])} has no cached sample; Q needs every class")
    per_a, per_b = subset_sizes(len(labels), num_classes)
    subset_a = draw_subset(labels, num_classes, per_a, seed)
    small = np.flatnonzero(np.bincount(labels[subset_a], minlength=num_classes) < 2)
    if len(small):
        raise QualityError(f"class {int(small[0])} has fewer than 2 samples in subset A; Q needs at least 2")
    return subset_a, draw_subset(labels, num_classes, per_b, seed + 1)


@dataclass
class SubsetAStats:
    """Step 3: separation S and efficiency E from the raw features of subset A, with their parts per class."""

    S: float
    E: float
    mu: float  # mean over classes of the smallest within-class |cosine| (feeds I)
    Delta: float
    R: float
    K: float
    d: int
    intra: list[float] = field(default_factory=list)  # a_c
    min_cos: list[float] = field(default_factory=list)  # m_c
    nearest_other: list[float] = field(default_factory=list)  # delta_c
    mean_norm: list[float] = field(default_factory=list)


def subset_a_stats(
    x: np.ndarray, labels: np.ndarray, num_classes: int, n_train: int, device: torch.device | None = None
) -> SubsetAStats:
    """Step 3 from one Gram product: cosines, distances and norms all derive from it.

    The product runs in float32 (on `device`: CUDA when given) with a proven bound on each entry's error; the
    means (S) average millions of such entries, and each minimum (m_c, delta_c), where one entry decides, is
    recomputed in float64 over every pair the bound cannot rule out, so it is the float64 value. Norms are float64.
    """
    gram = gram_matrix(x, device)
    norm = np.sqrt(gram.sq_norm)
    cos_abs = np.abs(gram.matrix)  # quirk 6: absolute cosines; NaN for a zero-norm sample
    with np.errstate(divide="ignore", invalid="ignore"):
        cos_abs /= norm[:, None]
        cos_abs /= norm[None, :]
    sq_dist = gram.matrix  # reused in place: |x_i - x_j|^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j
    sq_dist *= -2.0
    sq_dist += gram.sq_norm[:, None]
    sq_dist += gram.sq_norm[None, :]
    np.clip(sq_dist, 0.0, None, out=sq_dist)
    onehot = np.eye(num_classes)[labels]
    counts = onehot.sum(0)
    block_means = (onehot.T @ cos_abs @ onehot) / np.outer(counts, counts)  # quirk 1: diagonal included
    intra = np.diag(block_means)
    off_diagonal = ~np.eye(num_classes, dtype=bool)
    separation = intra.mean() - block_means[off_diagonal].mean()
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    min_cos = np.array([_smallest_cosine(x, m, cos_abs, norm, gram.bound) for m in members])
    nearest = np.array(
        [_nearest_other(x, m, np.flatnonzero(labels != c), sq_dist, norm, gram.bound) for c, m in enumerate(members)]
    )
    mean_norm = np.array([norm[m].mean() for m in members])
    d = min(x.shape[0], x.shape[1])  # quirk 4: the length of the singular-value spectrum of A
    k_factor = (n_train / math.pi) ** (1.0 / d)
    delta, radius = nearest.mean(), mean_norm.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        efficiency = k_factor * 2.0 * delta / radius
    return SubsetAStats(
        S=float(separation),
        E=float(efficiency),
        mu=float(min_cos.mean()),
        Delta=float(delta),
        R=float(radius),
        K=float(k_factor),
        d=int(d),
        intra=intra.tolist(),
        min_cos=min_cos.tolist(),
        nearest_other=nearest.tolist(),
        mean_norm=mean_norm.tolist(),
    )


@dataclass
class Gram:
    """x x^T with the float64 squared norms on its diagonal. Off the diagonal each entry is within
    `bound` * |x_i| |x_j| of the exact product."""

    matrix: np.ndarray
    sq_norm: np.ndarray
    bound: float


def gram_matrix(x: np.ndarray, device: torch.device | None = None) -> Gram:
    """x @ x.T as float32 products of GRAM_COLUMNS-wide column blocks, summed in float64.

    A float32 dot product of n terms, in any summation order (BLAS or GPU), is within n*u/(1 - n*u) of
    sum_k |x_ik x_jk| <= |x_i| |x_j| (Higham, Accuracy and Stability, §3.1; u = 2^-24), so blocks of n columns
    bound every entry by that factor of |x_i| |x_j| whatever D is; summing the blocks in float64 adds 2^-52 each.
    float32 products run at twice float64's speed on a CPU (P4) and far faster on a GPU.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    sq_norm = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # float64 products and sums, no float64 copy of x
    matrix = products_on_device(x, device) if device is not None and device.type == "cuda" else _products_with_syrk(x)
    np.fill_diagonal(matrix, sq_norm)
    n = min(GRAM_COLUMNS, x.shape[1]) * 2.0**-24
    return Gram(matrix, sq_norm, n / (1.0 - n) + math.ceil(x.shape[1] / GRAM_COLUMNS) * 2.0**-52)


def _products_with_syrk(x: np.ndarray) -> np.ndarray:
    """numpy's x_b @ x_b.T of a view with its own transpose is one BLAS syrk: half the multiplications of a
    general product, which torch's CPU matmul does not skip."""
    matrix = np.zeros((len(x), len(x)))
    for start in range(0, x.shape[1], GRAM_COLUMNS):
        block = x[:, start : start + GRAM_COLUMNS]
        matrix += block @ block.T
    return matrix


def products_on_device(x: np.ndarray, device: torch.device) -> np.ndarray:
    """The same products on a GPU: one column block on it at a time, TF32 off (its 10-bit products would void the
    bound)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        matrix = torch.zeros(len(x), len(x), dtype=torch.float64, device=device)
        for start in range(0, x.shape[1], GRAM_COLUMNS):
            block = torch.from_numpy(x[:, start : start + GRAM_COLUMNS].copy()).to(device)
            matrix += (block @ block.T).double()
        return matrix.cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(precision)


def _smallest_cosine(x: np.ndarray, members: np.ndarray, cos_abs: np.ndarray, norm: np.ndarray, bound: float) -> float:
    """m_c: the smallest |cosine| within the class, in float64 over every pair within 2 * bound of the smallest
    estimate (no other pair can be smaller); NaN when a sample has zero norm."""
    block = cos_abs[np.ix_(members, members)]
    if np.isnan(block).any():
        return float("nan")
    i, j = np.nonzero(np.triu(block <= block.min() + 2.0 * bound + 2.0**-40))  # symmetric: one triangle
    left, right = members[i], members[j]
    return float((np.abs(_float64_dots(x, left, right)) / (norm[left] * norm[right])).min())


def _nearest_other(
    x: np.ndarray, members: np.ndarray, others: np.ndarray, sq_dist: np.ndarray, norm: np.ndarray, bound: float
) -> float:
    """delta_c: the distance from the class to its nearest sample of another class, in float64 over every pair
    whose estimate, less its error bound, is within the smallest estimate plus its bound."""
    block = sq_dist[np.ix_(members, others)]
    r_i, r_j = norm[members][:, None], norm[others][None, :]
    slack = 2.0 * bound * r_i * r_j + 2.0**-48 * (r_i**2 + r_j**2)  # the product's bound, then float64 rounding
    i, j = np.nonzero(block - slack <= (block + slack).min())
    left, right = members[i], others[j]
    if len(left) <= MANY_PAIRS:
        sq = _pairwise(x, left, right, lambda a, b: np.square(a - b).sum(1))
    else:  # as a float64 Gram gives it: within 2^-50 |x|^2 of the difference form
        sq = np.maximum(norm[left] ** 2 + norm[right] ** 2 - 2.0 * _float64_dots(x, left, right), 0.0)
    return math.sqrt(sq.min())


def _float64_dots(x: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """x[left[k]] . x[right[k]] in float64: pair by pair for a few pairs; for many, from float64 products (in
    GRAM_COLUMNS-wide blocks) of the rows they involve, which costs at most a class's share of the Gram product."""
    if len(left) <= MANY_PAIRS:
        return _pairwise(x, left, right, lambda a, b: np.einsum("ij,ij->i", a, b))
    rows_left, at_left = np.unique(left, return_inverse=True)
    rows_right, at_right = np.unique(right, return_inverse=True)
    products = np.zeros((len(rows_left), len(rows_right)))
    for start in range(0, x.shape[1], GRAM_COLUMNS):
        columns = slice(start, start + GRAM_COLUMNS)
        products += x[rows_left, columns].astype(np.float64) @ x[rows_right, columns].astype(np.float64).T
    return products[at_left, at_right]


def _pairwise(x: np.ndarray, left: np.ndarray, right: np.ndarray, pair_value) -> np.ndarray:
    """`pair_value` of rows left[k], right[k] in float64, PAIR_BATCH pairs at a time."""
    values = [
        pair_value(x[left[s : s + PAIR_BATCH]].astype(np.float64), x[right[s : s + PAIR_BATCH]].astype(np.float64))
        for s in range(0, len(left), PAIR_BATCH)
    ]
    return np.concatenate(values)


def class_spectrum(x: np.ndarray) -> np.ndarray:
    """Step 4 for one class of subset B: the normalised squared singular values of its centred rows, in float32
    as the reference computes them (NaN when the class has no variance)."""
    z = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    z = z - z.mean(0, keepdim=True)
    energy = torch.linalg.svdvals(z) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (energy / energy.sum()).numpy()


@dataclass
class InformationStats:
    """Step 4: information I with the per-class embedding dimensions and entropies."""

    I: float  # noqa: E741 (the method's name)
    mean_entropy: float
    embedding_dims: list[int]
    entropies: list[float]


def information(spectra: list[np.ndarray], class_sizes: list[int], mu: float) -> InformationStats:
    """I = (1 - mu) · mean_c H_c / ln 5 from the class spectra of subset B (quirks 2, 3, 5, 7).

    Each spectrum is zero-padded to M = the largest class size in B (M counts samples, not capped by D).
    """
    width = max(class_sizes)
    rows = np.zeros((len(spectra), width), dtype=np.float32)
    for c, p in enumerate(spectra):
        rows[c, : len(p)] = p
    dims = [_embedding_dim(row, width) for row in rows]
    keep = min(sum(dims), width)  # quirk 2: the sum of the dimensions, so rows are in effect kept whole
    entropies = [_entropy(row[:keep]) for row in rows]
    mean_entropy = float(np.mean(entropies))
    return InformationStats(
        I=float((1.0 - mu) * mean_entropy / math.log(5.0)),
        mean_entropy=mean_entropy,
        embedding_dims=dims,
        entropies=entropies,
    )


def _embedding_dim(p: np.ndarray, width: int) -> int:
    """Smallest k >= 1 whose first k components hold 95 % of the spectrum, capped at width - 1; 1 for NaN rows."""
    if np.isnan(p).any():
        return 1
    reached = np.flatnonzero(np.cumsum(p, dtype=np.float32) >= np.float32(ENERGY))
    k = int(reached[0]) + 1 if len(reached) else len(p)
    return max(1, min(k, width - 1))


def _entropy(q: np.ndarray) -> float:
    """Shannon entropy of the renormalised row; 0 if it holds an exact zero or a NaN (quirk 3)."""
    if np.isnan(q).any() or (q == 0.0).any():
        return 0.0
    q_hat = q.astype(np.float64) / q.sum(dtype=np.float64)
    return float(-(q_hat * np.log(q_hat)).sum())


def knowledge_quality(a: SubsetAStats, info: InformationStats) -> float:
    """Step 5: Q = S + sqrt(I · E)."""
    product = info.I * a.E
    return float("nan") if math.isnan(product) else a.S + math.sqrt(product)


def select_top_k(qualities: list[float], k: int) -> list[int]:
    """Positions of the k best layers by Q (NaN last, ties to the shallower layer), returned in depth order."""
    return sorted(rank_by_quality(qualities)[:k])


def rank_by_quality(qualities: list[float]) -> list[int]:
    """Every position, best Q first: NaN last, ties to the shallower layer."""
    return sorted(range(len(qualities)), key=lambda i: (math.isnan(qualities[i]), -_finite(qualities[i]), i))


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value
