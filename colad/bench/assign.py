"""PAA's batched mixture split against the reference implementations' scikit-learn
loop: the same inputs, the same positives, and the time of each (``bench assign``)."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..paa import split_candidates
from .timing import _seconds, _timed

__all__ = ["synthetic_costs", "split_candidates_sklearn", "bench_assign", "format_table"]


def synthetic_costs(
    num_gts: int, *, max_candidates: int = 45, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Candidate costs shaped like a trained detector's: a few cheap anchors per object (the
    foreground mode, ``c`` about 0.4-1.2) and more expensive ones (about 1.5-3.5), in random order.

    The number of candidates per object is uniform in ``[2, max_candidates]``, the foreground
    count in ``[1, 10]``; the padding slots hold garbage that ``valid`` masks out.

    Returns:
        ``costs`` (Tensor[G, K] float32) and ``valid`` (Tensor[G, K] bool), ``K = max_candidates``.
    """
    rng = np.random.default_rng(seed)
    shape = (num_gts, max_candidates)
    fg = rng.normal(
        rng.uniform(0.4, 1.2, (num_gts, 1)), rng.uniform(0.05, 0.3, (num_gts, 1)), shape
    )
    bg = rng.normal(rng.uniform(1.5, 3.5, (num_gts, 1)), rng.uniform(0.1, 0.6, (num_gts, 1)), shape)
    num_fg = rng.integers(1, 11, (num_gts, 1))
    costs = np.where(np.arange(max_candidates) < num_fg, fg, bg).clip(min=0.01)
    costs = rng.permuted(costs, axis=1)
    num = rng.integers(2, max_candidates + 1, (num_gts, 1))
    valid = np.arange(max_candidates) < num
    costs = np.where(valid, costs, rng.uniform(-5, 50, shape))
    return torch.from_numpy(costs.astype(np.float32)), torch.from_numpy(valid)


def split_candidates_sklearn(costs: Tensor, valid: Tensor) -> Tensor:
    """The reference implementations' PAA split: one scikit-learn fit per object.

    mmdetection's ``PAAHead.paa_reassign`` and the CoLAD code sort each object's candidate costs,
    fit ``GaussianMixture(2, covariance_type="diag", weights_init=[0.5, 0.5],
    means_init=[[min], [max]], precisions_init=[[1], [1]])``, and keep the foreground-predicted
    candidates up to the one with the highest ``score_samples`` (ALGORITHMS.md §3.4-3.5).

    Args and returns as :func:`colad.paa.split_candidates` (computed on the CPU in float64).
    """
    from sklearn.mixture import GaussianMixture

    costs_np = costs.detach().double().cpu().numpy()
    valid_np = valid.cpu().numpy()
    positive = np.zeros(costs_np.shape, dtype=bool)
    for g in range(len(costs_np)):
        slots = np.flatnonzero(valid_np[g])
        if len(slots) < 2:
            continue
        slots = slots[np.argsort(costs_np[g, slots], kind="stable")]
        x = costs_np[g, slots][:, None]
        gmm = GaussianMixture(
            2,
            covariance_type="diag",
            weights_init=[0.5, 0.5],
            means_init=[[x[0, 0]], [x[-1, 0]]],
            precisions_init=[[1.0], [1.0]],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning after max_iter steps
            gmm.fit(x)
        foreground = gmm.predict(x) == 0
        if not foreground.any():
            continue
        cut = np.argmax(np.where(foreground, gmm.score_samples(x), -np.inf))
        positive[g, slots[foreground & (np.arange(len(x)) <= cut)]] = True
    return torch.from_numpy(positive)


def bench_assign(
    sizes: Sequence[int] = (10, 100, 1000),
    *,
    max_candidates: int = 45,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[dict]:
    """Time ``split_candidates`` and the scikit-learn loop on the same inputs, alternating them.

    For each size, both run ``repeats`` times in turn (after a warm-up of each); the medians are
    reported. Agreement is the fraction of objects whose positive sets are identical (the loop's
    last result against ours from the warm-up).

    Returns:
        One dict per size: ``gts``, ``device``, ``agreement``, ``sklearn_ms``, ``colad_ms``,
        ``speedup``.
    """
    device = torch.device(device)
    rows = []
    for size in sizes:
        costs, valid = synthetic_costs(size, max_candidates=max_candidates, seed=seed)
        costs_dev, valid_dev = costs.to(device), valid.to(device)
        ours = split_candidates(costs_dev, valid_dev)  # warm-up
        split_candidates_sklearn(costs[:1], valid[:1])  # scikit-learn's first-call costs
        sk_times, our_times = [], []
        for _ in range(repeats):
            seconds, reference = _timed(torch.device("cpu"), split_candidates_sklearn, costs, valid)
            sk_times.append(seconds)
            our_times.append(_seconds(device, split_candidates, costs_dev, valid_dev))
        agreement = (ours.cpu() == reference).all(dim=1).double().mean().item()
        sk_ms = statistics.median(sk_times) * 1e3
        our_ms = statistics.median(our_times) * 1e3
        rows.append(
            {"gts": size, "device": str(device), "agreement": agreement,
             "sklearn_ms": sk_ms, "colad_ms": our_ms, "speedup": sk_ms / our_ms}
        )  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`bench_assign`'s rows."""
    lines = [
        f"{'GTs':>6} {'device':>7} {'agree':>8} {'sklearn ms':>11} {'colad ms':>9} {'speedup':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['gts']:>6} {r['device']:>7} {r['agreement']:>8.2%} {r['sklearn_ms']:>11.1f} "
            f"{r['colad_ms']:>9.2f} {r['speedup']:>7.1f}x"
        )
    return "\n".join(lines)
