"""Plotting for the book: boxes on images, sample grids, TIDE error bars, anchors, assignments,
fitted mixtures, training curves and detections.

Functions take ``ax=None`` (a new figure is made) and return the ``Figure``; none calls
``plt.show()``. Only :func:`use_book_style` changes matplotlib's global settings, and only when
a chapter asks for it.

The functions live in modules by topic (``base``, ``samples``, ``assignment``,
``distillation``, ``errors``, ``objectness``); all are importable from ``colad.viz``.
"""

from __future__ import annotations

from .assignment import plot_anchor_levels, plot_candidates, plot_mixture, plot_positives
from .base import ROLE_COLORS, VERDICT_COLORS, draw_boxes, to_display, use_book_style
from .distillation import (
    assignments_side_by_side,
    own_vs_teacher,
    plot_comparison,
    plot_gains,
    plot_side_distributions,
    plot_switch,
)
from .errors import draw_verdicts, plot_error_examples, plot_tide
from .objectness import cop_neighbourhood, plot_cop_neighbourhood
from .samples import plot_history, plot_object_sizes, show_detections, show_samples

__all__ = [
    "ROLE_COLORS",
    "use_book_style",
    "to_display",
    "draw_boxes",
    "show_samples",
    "plot_object_sizes",
    "plot_tide",
    "plot_anchor_levels",
    "plot_positives",
    "plot_candidates",
    "plot_mixture",
    "plot_history",
    "show_detections",
    "own_vs_teacher",
    "assignments_side_by_side",
    "plot_side_distributions",
    "plot_switch",
    "plot_comparison",
    "cop_neighbourhood",
    "plot_cop_neighbourhood",
    "plot_gains",
    "VERDICT_COLORS",
    "draw_verdicts",
    "plot_error_examples",
]
