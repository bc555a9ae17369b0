"""Benchmarks that compare colad with the reference implementations, side by side in one process.

* ``python -m colad bench assign`` times :func:`colad.paa.split_candidates` against the reference
  implementations' approach, a scikit-learn ``GaussianMixture`` fitted per object in a Python
  loop, on the same inputs, and checks that both choose the same positives.
* ``python -m colad bench train`` and ``bench infer`` time a training step and inference of the
  PAA detector against torchvision's RetinaNet with the same backbone, FPN width, head depth,
  image size and batch.

The benchmarks live in ``assign`` and ``detector``, on the timing helpers of ``timing``.
"""

from __future__ import annotations

from .assign import bench_assign, format_table, split_candidates_sklearn, synthetic_costs
from .detector import (
    bench_head,
    bench_infer,
    bench_method,
    bench_train,
    retinanet_like,
    saved_bytes,
)

__all__ = [
    "synthetic_costs",
    "split_candidates_sklearn",
    "bench_assign",
    "format_table",
    "retinanet_like",
    "bench_train",
    "bench_infer",
    "bench_method",
    "bench_head",
    "saved_bytes",
]
