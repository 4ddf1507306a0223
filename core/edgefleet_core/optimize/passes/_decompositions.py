"""Low-rank decompositions of weight matrices and convolution kernels, in NumPy (float64).

Written here rather than taken from a library on purpose: the SVD-based ones are a few lines over
``numpy.linalg.svd``, and a tensor library (tensorly) would be a heavy dependency for one pass.
Every function returns factors whose composition reconstructs the weight: exactly at full rank,
and as the best (SVD, spatial SVD) or a good (Tucker via HOSVD/HOOI, CP via ALS) approximation at
lower rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

ENERGY_TOLERANCE = 1e-9
"""Slack on the energy threshold, so that ``energy=1.0`` keeps the numerical rank of a weight
instead of also keeping directions that only hold rounding noise."""


def singular_values(matrix: F64) -> F64:
    """Singular values of ``matrix``, largest first."""
    return np.asarray(np.linalg.svd(matrix, compute_uv=False), dtype=np.float64)


def energy_rank(values: F64, energy: float) -> int:
    """The smallest rank whose squared singular values hold ``energy`` of the total."""
    squares = values.astype(np.float64) ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    fraction = np.cumsum(squares) / total
    position = int(np.searchsorted(fraction, energy - ENERGY_TOLERANCE))
    return min(len(values), position + 1)


def ratio_rank(ratio: float, full: int) -> int:
    """``ceil(ratio * full)``, at least 1 and at most ``full``."""
    return max(1, min(full, math.ceil(ratio * full - ENERGY_TOLERANCE)))


def choose_rank(values: F64, energy: float, rank_ratio: float | None) -> int:
    """The rank from ``rank_ratio`` when given, else from ``energy``."""
    if rank_ratio is not None:
        return ratio_rank(rank_ratio, len(values))
    return energy_rank(values, energy)


def truncated_svd(matrix: F64, rank: int) -> tuple[F64, F64]:
    """``(left, right)`` with ``left @ right`` the best rank-``rank`` approximation of ``matrix``.

    The singular values are split as square roots between the two factors so both have the same
    scale, which keeps float32 rounding of each factor small.
    """
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def spatial_matrix(weight: F64) -> F64:
    """Conv weight ``(O, C, kh, kw)`` as the ``(C*kh, O*kw)`` matrix whose rank-r factorization is a
    vertical ``kh×1`` conv into r channels followed by a horizontal ``1×kw`` conv (Jaderberg et al., 2014)."""
    out_channels, in_channels, kh, kw = weight.shape
    return weight.transpose(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)


def spatial_svd(weight: F64, rank: int) -> tuple[F64, F64]:
    """``(vertical (r, C, kh, 1), horizontal (O, r, 1, kw))`` kernels approximating ``weight``."""
    out_channels, in_channels, kh, kw = weight.shape
    left, right = truncated_svd(spatial_matrix(weight), rank)
    vertical = left.reshape(in_channels, kh, rank).transpose(2, 0, 1)[..., None]
    horizontal = right.reshape(rank, out_channels, kw).transpose(1, 0, 2)[:, :, None, :]
    return vertical, horizontal


def unfold(tensor: F64, mode: int) -> F64:
    """Mode-``mode`` unfolding: that axis first, the others flattened in order."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def _leading(matrix: F64, rank: int) -> F64:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


@dataclass(frozen=True)
class Tucker2:
    """``weight ≈ core ×₀ out_basis ×₁ in_basis``.

    As convolutions: 1×1 by ``in_basis.T``, then the ``kh×kw`` core, then 1×1 by ``out_basis``.
    """

    in_basis: F64
    """``(C, R_in)`` with orthonormal columns."""
    core: F64
    """``(R_out, R_in, kh, kw)``."""
    out_basis: F64
    """``(O, R_out)`` with orthonormal columns."""


def tucker2(weight: F64, out_rank: int, in_rank: int, iterations: int = 10) -> Tucker2:
    """Tucker-2 of a conv kernel on its channel modes: HOSVD, refined by a few HOOI sweeps.

    At full multilinear rank HOSVD is exact; below it, HOOI (alternating subspace updates) lowers
    the error HOSVD leaves, and never raises it.
    """
    out_basis = _leading(unfold(weight, 0), out_rank)
    in_basis = _leading(unfold(weight, 1), in_rank)
    for _ in range(iterations):
        out_basis = _leading(unfold(np.einsum("ocij,cs->osij", weight, in_basis), 0), out_rank)
        in_basis = _leading(unfold(np.einsum("ocij,or->rcij", weight, out_basis), 1), in_rank)
    core = np.einsum("ocij,or,cs->rsij", weight, out_basis, in_basis)
    return Tucker2(in_basis, core, out_basis)


def _khatri_rao(factors: list[F64]) -> F64:
    """Column-wise Kronecker product, rows ordered like :func:`unfold`'s columns."""
    rank = factors[0].shape[1]
    product = factors[0]
    for factor in factors[1:]:
        product = (product[:, None, :] * factor[None, :, :]).reshape(-1, rank)
    return product


@dataclass(frozen=True)
class CPResult:
    """Factor matrices ``(dim_n, R)`` with ``weight ≈ Σ_r ∏_n factors[n][:, r]``, and the fit reached."""

    factors: list[F64]
    fit: float
    """``1 - ‖weight - approximation‖² / ‖weight‖²``: the energy the decomposition holds."""


def cp_als(weight: F64, rank: int, *, seed: int = 0, iterations: int = 300, tolerance: float = 1e-8) -> CPResult:
    """CP decomposition by alternating least squares, deterministic for a given ``seed``.

    Initialised from the leading singular vectors of each unfolding (random columns where a mode
    has fewer than ``rank``), each factor solved against the others' Gram matrices with a tiny
    ridge term so degenerate solutions cannot blow up, until the fit stops improving. The scale
    is spread evenly over the factors at the end so no factor carries huge values that cancel.
    """
    rng = np.random.default_rng(seed)
    ndim = weight.ndim
    factors: list[F64] = []
    for mode in range(ndim):
        basis = _leading(unfold(weight, mode), rank)
        if basis.shape[1] < rank:
            extra = rng.standard_normal((weight.shape[mode], rank - basis.shape[1]))
            basis = np.concatenate([basis, extra / np.sqrt(weight.shape[mode])], axis=1)
        factors.append(basis)
    unfoldings = [unfold(weight, mode) for mode in range(ndim)]
    norm2 = float((weight**2).sum())
    fit = 0.0
    residual = norm2
    for _ in range(iterations):
        for mode in range(ndim):
            others = [factors[m] for m in range(ndim) if m != mode]
            gram = np.ones((rank, rank))
            for other in others:
                gram *= other.T @ other
            mttkrp = unfoldings[mode] @ _khatri_rao(others)
            ridge = 1e-12 * max(float(np.trace(gram)), 1e-300) / rank
            updated = np.asarray(np.linalg.solve(gram + ridge * np.eye(rank), mttkrp.T).T, dtype=np.float64)
            if mode < ndim - 1:
                norms = np.linalg.norm(updated, axis=0)
                norms[norms == 0] = 1.0
                factors[mode] = updated / norms
            else:
                factors[mode] = updated
                inner = float((mttkrp * updated).sum())
                approx2 = float((gram * (updated.T @ updated)).sum())
                residual = max(norm2 - 2 * inner + approx2, 0.0)
        previous, fit = fit, 1.0 - residual / norm2 if norm2 else 1.0
        if abs(fit - previous) < tolerance:
            break
    scale = np.linalg.norm(factors[-1], axis=0)
    scale[scale == 0] = 1.0
    factors[-1] = factors[-1] / scale
    share = scale ** (1.0 / ndim)
    return CPResult([factor * share for factor in factors], fit)


def cp_reconstruct(factors: list[F64]) -> F64:
    """The tensor a CP decomposition represents."""
    shape = tuple(f.shape[0] for f in factors)
    return (factors[0] @ _khatri_rao(factors[1:]).T).reshape(shape)
