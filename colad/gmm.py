"""Two-component 1-D Gaussian mixtures, fitted by EM for many rows at once.

PAA fits one mixture to the candidate costs of every object (ALGORITHMS.md §3.4). The reference
implementations call scikit-learn once per object; :func:`fit_two_component_gmm` follows the same
semantics and arithmetic for all objects of a batch together.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GaussianMixture1D", "mixture_log_prob", "log_sum_two", "fit_two_component_gmm"]


class GaussianMixture1D(NamedTuple):
    """Parameters of one two-component mixture per row: ``weights``, ``means`` and
    ``variances`` are ``Tensor[G, 2]`` (float64); ``n_iter`` is ``Tensor[G]`` long (0 for rows
    that were not fitted)."""

    weights: Tensor
    means: Tensor
    variances: Tensor
    n_iter: Tensor


def mixture_log_prob(x: Tensor, mixture: GaussianMixture1D) -> Tensor:
    """``log pi_k + log N(x | mu_k, v_k)`` for both components and every sample.

    Written as scikit-learn writes it for ``covariance_type="diag"`` (the square expanded, the
    precision's Cholesky factor ``1 / sqrt(v)``), so that the two round alike and agree on
    near-ties.

    Args:
        x (Tensor[G, K]): samples (float64).

    Returns:
        Tensor[2, G, K]: component first.
    """
    precision_chol = (1.0 / torch.sqrt(mixture.variances)).T[..., None]
    precision = precision_chol**2
    means = mixture.means.T[..., None]
    square = (means**2 * precision) - 2.0 * (x * (means * precision)) + (x**2 * precision)
    log_gauss = -0.5 * (math.log(2 * math.pi) + square) + torch.log(precision_chol)
    return log_gauss + torch.log(mixture.weights).T[..., None]


def log_sum_two(joint: Tensor) -> Tensor:
    """``log(exp(a) + exp(b))`` over the first axis of ``Tensor[2, ...]``, as scikit-learn's
    ``_logsumexp`` computes it: ``max + log1p(exp(min - max))``."""
    high = torch.maximum(joint[0], joint[1])
    low = torch.minimum(joint[0], joint[1])
    return torch.log1p(torch.exp(low - high)) + high


def fit_two_component_gmm(
    x: Tensor,
    valid: Tensor,
    *,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
) -> GaussianMixture1D:
    """Fit a two-component 1-D Gaussian mixture to every row at once by EM.

    scikit-learn's semantics (``GaussianMixture(2, weights_init=[.5, .5],
    means_init=[[min], [max]], precisions_init=[[1], [1]])``): start from weights 1/2,
    means at the row's smallest and largest value and variances 1; each step is an
    E-step, the lower bound ``mean_i log p(x_i)``, an M-step; a row stops once its bound
    changes by less than ``tol``, keeping the parameters of that last M-step. Rows with
    fewer than two valid samples are not fitted.

    The rows iterate together, with no Python loop over rows. On the CPU, finished rows
    leave the problem and the loop ends with the last one. On a GPU every row stays
    (finished ones frozen) and the loop runs ``max_iter`` steps, so that nothing waits
    for the host.

    Args:
        x (Tensor[G, K]): samples; each row sorted ascending over its valid entries.
        valid (Tensor[G, K] bool): which entries are samples; a prefix of each row.

    Returns:
        :class:`GaussianMixture1D`, float64. Component 0 starts at the smallest sample:
        in PAA it is the foreground.

    Reference:
        Dempster et al. 1977; ALGORITHMS.md §3.4; chapter {ref}`sec-paa`.
    """
    weight = valid.double()
    x = torch.where(valid, x.double(), 0.0)
    # [3, G, K]: the terms of the sufficient statistics
    powers = torch.stack([weight, x, x * x])
    totals = powers.sum(2)  # [3, G]: n, sum x, sum x^2
    last = (totals[0].long() - 1).clamp(min=0)
    means = torch.stack([x[:, 0], x.gather(1, last[:, None])[:, 0]])
    # The state is the statistics (N_k, S_k, Q_k) of each component, [3, 2, G], from
    # which pi_k = N_k / sum N, mu_k = S_k / N_k and v_k = Q_k / N_k - mu_k^2 + reg; the
    # initial state gives pi = 1/2, mu = (min, max), v = 1.
    half = torch.full_like(means, 0.5)
    stats = torch.stack([half, means * half, (1.0 - reg_covar + means * means) * half])
    final = stats.clone()  # rows that have finished, on the CPU
    n_iter = torch.zeros_like(last)
    rows = torch.arange(len(x), device=x.device)
    active = totals[0] >= 2
    inv_count = 1.0 / totals[0].clamp(min=1)
    bound = torch.full_like(totals[0], -math.inf)
    on_cpu = x.device.type == "cpu"
    for _ in range(max_iter):
        if on_cpu:  # when half the rows have finished, they leave the problem
            num_active = int(active.sum())
            if num_active == 0:
                break
            if num_active <= len(rows) // 2:
                final[:, :, rows] = stats
                keep = active.nonzero()[:, 0]
                rows, powers, totals = rows[keep], powers[:, keep], totals[:, keep]
                stats, bound, inv_count = (
                    stats[:, :, keep],
                    bound[keep],
                    inv_count[keep],
                )
                active = active[keep]
        new_stats, new_bound = _em_step(stats, powers, totals, inv_count, reg_covar)
        stats = torch.where(active, new_stats, stats)
        n_iter[rows] += active.long()
        active = active & ((new_bound - bound).abs() >= tol)
        bound = new_bound
    final[:, :, rows] = stats
    count, sums, squares = final
    means = sums / count
    return GaussianMixture1D(
        weights=(count / count.sum(0)).T,
        means=means.T,
        variances=(squares / count - means * means + reg_covar).clamp(min=reg_covar).T,
        n_iter=n_iter,
    )


def _em_step(
    stats: Tensor, powers: Tensor, totals: Tensor, inv_count: Tensor, reg_covar: float
) -> tuple[Tensor, Tensor]:
    """One EM step from the statistics ``[3, 2, G]``: the new statistics and the bound
    (the mean log-likelihood under the old parameters, as scikit-learn reports it)."""
    count, sums, squares = stats
    means = sums / count
    # scikit-learn's "diag" variance; it raises where this is not positive, we floor it
    # instead.
    variances = (squares / count - means * means + reg_covar).clamp(min=reg_covar)
    # log pi_k N(x | mu_k, v_k) = a_k + b_k x + c_k x^2, a quadratic in x.
    b, c = means / variances, -0.5 / variances
    a = torch.log(count / count.sum(0)) - 0.5 * torch.log((2 * math.pi) * variances)
    coef = torch.stack([a - 0.5 * means * b, b, c])  # [3, 2, G]
    # Responsibilities depend only on d = l_0 - l_1:
    # r_0 = sigmoid(d), r_1 = sigmoid(-d).
    weight = powers[0]
    diff = ((coef[:, 0] - coef[:, 1])[..., None] * powers).sum(0)
    resp = torch.sigmoid(torch.stack([diff, -diff])) * weight
    # log p(x_i) = l_0(x_i) - log sigmoid(d_i); the bound is its mean over the row.
    log_lik = (coef[:, 0] * totals).sum(0) - (F.logsigmoid(diff) * weight).sum(1)
    new_stats = (resp[None] * powers[:, None]).sum(3)
    new_stats[0] += 10 * torch.finfo(torch.float64).eps  # N_k + 10 eps, as scikit-learn
    return new_stats, log_lik * inv_count
