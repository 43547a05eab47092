"""Nesting by SVD: re-factor every module's trained update so that each prefix is its best rank-k approximation.

For one module with factors A [in, r_max], B [r_max, out] and the diagonal d it was trained with:

    delta = alpha * A diag(d) B                       the trained update, [in, out] (x @ delta is added)
          = V diag(S) U^T                             thin SVD, S decreasing
    A'    = V[:, :r_max] * sqrt(S)    [in, r_max]     B' = sqrt(S)[:, None] * U[:, :r_max]^T   [r_max, out]

and the nested adapter is served with scaling "none", alpha 1: rank k adds x A'[:, :k] B'[:k], the
truncated SVD of delta, which is the best rank-k approximation of delta in Frobenius and spectral
norm (Eckart-Young), and rank r_max reproduces delta exactly.

Nesting by activations (`whitened_nest`, `nest_adapter(covariances=...)`): with C = E[x x^T] the
module's input covariance on a task's data, rank k instead keeps the best rank-k approximation in the
norm that the outputs see,

    min over rank-k D of  E||x (delta - D)||^2 = ||L^T (delta - D)||_F^2     C + lambda I = L L^T
    L^T delta = W S Z^T  ->  A' = L^{-T} W sqrt(S),  B' = sqrt(S) Z^T        (lambda = damp x mean diag C)

so directions that the task's inputs excite come first; rank r_max still reproduces delta exactly.

Which diagonal d is "the trained update" (`source`):

    "p"     the method's own p: matryoshka's sum-of-slices diagonal (`build_p`), i.e. the function one
            training forward computed; for lora it equals "r_max"
    "r_max" the adapter as served at rank r_max: d_i = s_{r_max} (what dylora and svd adapters serve)
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch

from matryoshka_lora.adapters.p import build_p, rank_scale
from matryoshka_lora.adapters.store import Adapter, AdapterManifest, Weights
from matryoshka_lora.errors import ConfigError

log = logging.getLogger(__name__)

Source = Literal["p", "r_max"]
SOURCES: tuple[str, ...] = get_args(Source)


def default_source(method: str) -> str:
    """ "p" for a matryoshka adapter of either form (its training forward), "r_max" for every other method."""
    return "p" if method.startswith("matryoshka") else "r_max"


def trained_diagonal(manifest: AdapterManifest, source: str) -> torch.Tensor:
    """alpha * d (float64, [r_max]): the diagonal of the update that nesting keeps (module docstring)."""
    if source not in SOURCES:
        raise ConfigError("nesting source", source, list(SOURCES))
    m = manifest
    if source == "p" and m.method in ("lora", "matryoshka", "matryoshka-binary"):
        d = build_p(m.method, m.r_max, m.train_ranks, m.scaling)
    else:
        d = torch.full((m.r_max,), rank_scale(m.r_max, m.scaling))
    return m.alpha * d.double()


def svd_nest(lora_A: torch.Tensor, lora_B: torch.Tensor, diagonal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested (A' [in, r], B' [r, out]) with A' B' = A diag(diagonal) B and singular values decreasing.

    Thin SVD without forming delta: A = Qa Ra, B^T = Qb Rb, so delta = Qa (Ra diag(d) Rb^T) Qb^T and
    the small core's SVD W S Z^T gives V = Qa W, U = Qb Z. Directions beyond delta's rank come out as
    zero columns / rows.
    """
    qa, ra = torch.linalg.qr(lora_A.double())
    qb, rb = torch.linalg.qr(lora_B.double().T)
    w, s, zh = torch.linalg.svd((ra * diagonal.double()) @ rb.T, full_matrices=False)
    r_max, k = lora_A.shape[1], s.shape[0]
    root = s.sqrt()
    nested_A = torch.zeros(lora_A.shape[0], r_max, dtype=torch.float64)
    nested_B = torch.zeros(r_max, lora_B.shape[1], dtype=torch.float64)
    nested_A[:, :k] = (qa @ w) * root
    nested_B[:k] = root[:, None] * (qb @ zh.T).T
    return nested_A.to(lora_A.dtype), nested_B.to(lora_B.dtype)


def cholesky_factor(covariance: torch.Tensor, damp: float) -> torch.Tensor:
    """L (float64, lower) with L L^T = C + damp * mean(diag C) * I (damp > 0 keeps a rank-deficient C definite)."""
    if not damp > 0:
        raise ConfigError("damp", damp, "a number > 0")
    c = covariance.double()
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(c + damp * float(c.diagonal().mean().clamp_min(1e-12)) * eye)


def whitened_nest(
    lora_A: torch.Tensor, lora_B: torch.Tensor, diagonal: torch.Tensor, covariance: torch.Tensor, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested (A', B') with A' B' = A diag(d) B whose k-prefixes minimise ||L^T (delta - A'_k B'_k)||_F
    (module docstring): svd_nest of the whitened factor L^T A, then A' = L^{-T} (that factor)."""
    chol = cholesky_factor(covariance, damp)
    white_A, nested_B = svd_nest(chol.T @ lora_A.double(), lora_B.double(), diagonal)
    nested_A = torch.linalg.solve_triangular(chol.T, white_A.double(), upper=True)
    return nested_A.to(lora_A.dtype), nested_B.to(lora_B.dtype)


def fold_diagonal(
    lora_A: torch.Tensor, lora_B: torch.Tensor, diagonal: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A diag(d), B): the same trained update with the diagonal folded into A, columns in their trained
    order (a diagnostic: slice k keeps the first k entries of P, without SVD re-ordering)."""
    return (lora_A.double() * diagonal.double()).to(lora_A.dtype), lora_B.clone()


def nest_adapter(
    adapter: Adapter,
    source: str | None = None,
    name: str | None = None,
    svd: bool = True,
    covariances: dict[str, torch.Tensor] | None = None,
    damp: float = 0.01,
) -> Adapter:
    """The adapter re-factored by SVD (module docstring), by SVD in the norm of each module's input
    `covariances` (module path -> C, every module), or with the diagonal only folded into A
    (`svd=False`); method "svd", scaling "none", alpha 1."""
    m = adapter.manifest
    source = default_source(m.method) if source is None else source
    diagonal = trained_diagonal(m, source)
    if covariances is not None:
        missing = sorted(set(adapter.weights) - set(covariances))
        if missing or not svd:
            raise ConfigError(
                "covariances",
                f"{len(missing)} modules missing" if missing else "with svd=False",
                "one per module, with svd",
            )
        weights: Weights = {
            path: whitened_nest(a.float(), b.float(), diagonal, covariances[path], damp)
            for path, (a, b) in adapter.weights.items()
        }
    else:
        refactor = svd_nest if svd else fold_diagonal
        weights = {path: refactor(a.float(), b.float(), diagonal) for path, (a, b) in adapter.weights.items()}
    how = (
        ("nested by SVD in the input-covariance norm" if covariances is not None else "nested by SVD")
        if svd
        else "diagonal folded into A, trained column order"
    )
    manifest = AdapterManifest(
        name=name or m.name,
        base_model=m.base_model,
        base_fingerprint=m.base_fingerprint,
        target_modules=m.target_modules,
        r_max=m.r_max,
        train_ranks=m.train_ranks,
        scaling="none",
        method="svd",
        alpha=1.0,
        notes=f"{how} (source {source!r}) from {m.method} adapter {m.name!r} "
        f"(scaling {m.scaling}, alpha {m.alpha:g}); its notes: {m.notes}",
    )
    log.info("nested %r (%s, source %s, %d modules)", m.name, m.method, source, len(weights))
    return Adapter(manifest, weights, None)


def truncation_error(lora_A: torch.Tensor, lora_B: torch.Tensor, diagonal: torch.Tensor, rank: int) -> float:
    """||A diag(d) B - A'[:, :k] B'[:k]||_F / ||A diag(d) B||_F for the nested factors: how much rank k drops."""
    delta = (lora_A.double() * diagonal.double()) @ lora_B.double()
    nested_A, nested_B = svd_nest(lora_A, lora_B, diagonal)
    approx = nested_A[:, :rank].double() @ nested_B[:rank].double()
    norm = float(torch.linalg.matrix_norm(delta))
    return float(torch.linalg.matrix_norm(delta - approx)) / norm if norm else 0.0
