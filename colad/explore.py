"""Interactive explorers: controls in JupyterLab, a static figure in the built book.

An explorer is a small object with ``controls()`` (each control's choices and default) and
``update(**values)``, a plain function of those values that returns ``(figure, facts)``: the
figure to draw and the numbers it shows. :meth:`Explorer.show` puts ipywidgets controls in front
of ``update`` when a person is using the notebook, and draws ``update`` at the defaults when the
book is being built (its kernels carry ``COLAD_CHAPTER``, set by the book's extension) or when
there is no notebook front end at all. The update functions are what the tests call.

* :class:`MixtureExplorer`: pick an object; its candidates' costs, the fitted mixture and PAA's
  cut (:func:`colad.paa.paa_trace`).
* :class:`AssignmentExplorer`: pick an image and an object; the anchors each of several
  assignment rules makes positive for it (own PAA, a teacher's, CoLAD's switched costs, ATSS).
* :class:`DetectionExplorer`: pick an image, a score threshold and a class; the detections
  coloured by TIDE's verdict on each, and the objects nothing found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor

from colad import status, viz

__all__ = [
    "live",
    "Explorer",
    "MixtureExplorer",
    "AssignmentExplorer",
    "DetectionExplorer",
    "own_assignment",
    "colad_assignment",
]


def live() -> bool:
    """Whether widgets can respond here: an IPython kernel that a front end talks to, and not
    a kernel executing a chapter for the book build."""
    if os.environ.get(status.CHAPTER):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Explorer:
    """The shared part: controls, the widget around :meth:`update`, and :meth:`show`."""

    def controls(self) -> dict[str, tuple[Sequence[tuple[str, Any]], Any]]:
        """Each control's ``(choices as (label, value) pairs, default value)``, by name."""
        raise NotImplementedError

    def update(self, **values) -> tuple[plt.Figure, dict]:
        """The figure and facts for these control values."""
        raise NotImplementedError

    def defaults(self) -> dict[str, Any]:
        return {name: default for name, (_, default) in self.controls().items()}

    def widget(self):
        """ipywidgets: a dropdown per control above the figure, redrawn on every change."""
        import ipywidgets
        from IPython.display import display

        boxes = {
            name: ipywidgets.Dropdown(options=list(choices), value=default, description=name)
            for name, (choices, default) in self.controls().items()
        }
        out = ipywidgets.Output()

        def redraw(change=None) -> None:
            with out:
                out.clear_output(wait=True)
                figure, self.facts = self.update(**{n: b.value for n, b in boxes.items()})
                display(figure)
                plt.close(figure)

        for box in boxes.values():
            box.observe(redraw, names="value")
        redraw()
        return ipywidgets.VBox([ipywidgets.HBox(list(boxes.values())), out])

    def show(self) -> dict:
        """The live widget in a notebook; otherwise the figure at the default values (the book's
        static stand-in). Returns the facts of what is drawn first."""
        from IPython.display import display

        if live():
            display(self.widget())
            return self.facts
        figure, self.facts = self.update(**self.defaults())
        display(figure)
        plt.close(figure)
        return self.facts


# ----------------------------------------------------------------------------------------------
# PAA's mixture


class MixtureExplorer(Explorer):
    """One object's candidate costs, its two-component mixture and PAA's cut.

    Args:
        trace: a :class:`colad.paa.PAATrace` (:func:`colad.paa.paa_trace`) of a batch.
    """

    def __init__(self, trace) -> None:
        self.costs = trace.candidate_costs.flatten(0, 1)
        self.valid = trace.candidate_valid.flatten(0, 1)
        self.positive = trace.positive.flatten(0, 1)
        self.mixture = trace.mixture
        self.per_image = trace.candidates.shape[1]
        counts = self.valid.sum(1)
        self.objects = [int(g) for g in torch.nonzero(counts > 0).flatten()]
        if not self.objects:
            raise ValueError("MixtureExplorer: no object of the batch has a candidate")
        self.default = int(counts.argmax())  # the object with the most candidates

    def controls(self):
        labels = [(f"image {g // self.per_image}, object {g % self.per_image}", g)
                  for g in self.objects]  # fmt: skip
        return {"object": (labels, self.default)}

    def update(self, object: int) -> tuple[plt.Figure, dict]:  # noqa: A002 -- the control's name
        if object not in self.objects:
            raise ValueError(f"object {object} has no candidates; choose one of {self.objects}")
        ok = self.valid[object]
        m = self.mixture
        costs, positive = self.costs[object][ok], self.positive[object][ok]
        title = f"image {object // self.per_image}, object {object % self.per_image}"
        figure = viz.plot_mixture(costs, m.weights[object], m.means[object],
                                  m.variances[object], positive, title=title)  # fmt: skip
        facts = {
            "candidates": int(ok.sum()),
            "positives": int(positive.sum()),
            "means": [float(v) for v in m.means[object]],
            "largest positive cost": float(costs[positive].max()) if positive.any() else None,
        }
        return figure, facts


# ----------------------------------------------------------------------------------------------
# Assignments side by side

#: An assignment rule: ``rule(image, target)`` returns the matched object of every anchor
#: (``Tensor[A]``, -1 for none) and the anchors (``Tensor[A, 4]``).
Rule = Callable[[Tensor, Mapping[str, Tensor]], tuple[Tensor, Tensor]]


def own_assignment(detector) -> Rule:
    """The rule a detector trains with on its own predictions (PAA's split, or ATSS for GFL);
    for a LAD teacher, the assignment its student learns from."""

    @torch.no_grad()
    def rule(image, target):
        predictions = detector.eval().predict([image])
        return detector.assign(predictions, [target]).matched_idxs[0], predictions.anchors

    return rule


def colad_assignment(first, second, *, rule: str = "std_mean") -> Rule:
    """CoLAD's assignment: per object and level the switch picks whose costs PAA splits
    (:func:`colad.distill.colad_trace`); both networks get this same assignment."""
    from colad.distill import colad_trace

    @torch.no_grad()
    def assign(image, target):
        predictions = [net.eval().predict([image]) for net in (first, second)]
        trace = colad_trace(*predictions, [target], first.config, rule=rule,
                            box_coder=first.box_coder)  # fmt: skip
        return trace.paa.assignment().matched_idxs[0], predictions[0].anchors

    return assign


class AssignmentExplorer(Explorer):
    """The anchors that each rule makes positive for one object (or all) of one image.

    Args:
        rules: named rules (:func:`own_assignment`, :func:`colad_assignment`), on the same
            anchors.
        dataset: ``(image, target)`` items.
        indices: the images to choose from.
    """

    def __init__(self, rules: Mapping[str, Rule], dataset, indices: Sequence[int] = range(8)):
        if not rules:
            raise ValueError("AssignmentExplorer needs at least one rule")
        self.rules, self.dataset = dict(rules), dataset
        self.indices = [i for i in indices if i < len(dataset)]
        if not self.indices:
            raise ValueError("AssignmentExplorer: none of the indices is in the dataset")
        self._cache: dict[int, tuple] = {}

    def controls(self):
        most = max(self.indices, key=lambda i: len(self.dataset[i][1]["boxes"]))
        objects = [("all", -1)] + [(str(k), k) for k in range(len(self.dataset[most][1]["boxes"]))]
        return {"image": ([(str(i), i) for i in self.indices], most), "object": (objects, -1)}

    def _assign(self, index: int):
        if index not in self._cache:
            image, target = self.dataset[index]
            found = {name: rule(image, target) for name, rule in self.rules.items()}
            anchors = next(iter(found.values()))[1]
            matched = {name: m for name, (m, _) in found.items()}
            self._cache[index] = (image, target, anchors, matched)
        return self._cache[index]

    def update(self, image: int, object: int = -1) -> tuple[plt.Figure, dict]:  # noqa: A002
        picture, target, anchors, matched = self._assign(image)
        boxes = target["boxes"]
        if object >= len(boxes):
            raise ValueError(f"image {image} has {len(boxes)} objects; object {object} is not one")
        if object >= 0:  # one object: the others' positives are left out
            matched = {n: torch.where(m == object, m, torch.full_like(m, -1))
                       for n, m in matched.items()}  # fmt: skip
        figure = viz.plot_positives(picture, boxes, anchors, matched)
        names = list(matched)
        positives = {n: int((m >= 0).sum()) for n, m in matched.items()}
        facts = {"positives": positives}
        if len(names) >= 2:
            a, b = matched[names[0]], matched[names[1]]
            facts["shared"] = int(((a >= 0) & (a == b)).sum())
        return figure, facts


# ----------------------------------------------------------------------------------------------
# Detections and TIDE's verdicts


class DetectionExplorer(Explorer):
    """One image's detections above a score threshold, coloured by TIDE's verdict on each
    (:func:`colad.tide.classify_detections`), with the missed objects; optionally one class.

    Args:
        dataset: the :class:`colad.data.CocoDetection` the detections were made on, without
            transforms (images at their stored size, as the detections' boxes are).
        verdicts: TIDE's verdicts on the detections.
        indices: the dataset items to choose from.
        thresholds: the score thresholds to choose from (the first is the default).
    """

    def __init__(self, dataset, verdicts, indices: Sequence[int] = range(8),
                 thresholds: Sequence[float] = (0.3, 0.05, 0.1, 0.2, 0.5)):  # fmt: skip
        self.dataset, self.verdicts = dataset, verdicts
        self.indices = [i for i in indices if i < len(dataset)]
        if not self.indices:
            raise ValueError("DetectionExplorer: none of the indices is in the dataset")
        if not thresholds:
            raise ValueError("DetectionExplorer needs at least one score threshold")
        self.thresholds = list(thresholds)

    def _errors_on(self, index: int) -> int:
        image_id = int(self.dataset.image_record(index)["id"])
        wrong = sum(self.verdicts.kinds[i] not in ("TP", "unscored")
                    for i in self.verdicts.on_image(image_id)
                    if self.verdicts.detections[i]["score"] >= self.thresholds[0])  # fmt: skip
        return wrong + sum(o["image_id"] == image_id for o in self.verdicts.missed)

    def controls(self):
        worst = max(self.indices, key=self._errors_on)  # the default shows the most errors
        index = self.dataset.index
        classes = [("all", -1)] + list(zip(index.names, index.category_ids, strict=True))
        return {
            "image": ([(str(i), i) for i in self.indices], worst),
            "min_score": ([(f"{t:g}", t) for t in self.thresholds], self.thresholds[0]),
            "category": (classes, -1),
        }

    def update(self, image: int, min_score: float = 0.3, category: int = -1):
        """Draw ``image`` with its detections scoring at least ``min_score``, of one category id
        (``-1``: all)."""
        if image not in self.indices:
            raise ValueError(f"image {image} is not one of {self.indices}")
        if category != -1 and category not in self.dataset.index.category_ids:
            raise ValueError(f"category {category} is not -1 (all) or one of the dataset's "
                             f"{self.dataset.index.category_ids}")  # fmt: skip
        figure, ax = plt.subplots(figsize=(4.6, 4.0))
        drawn = viz.draw_verdicts(ax, self.dataset, image, self.verdicts, min_score=min_score,
                                  category=None if category == -1 else category)  # fmt: skip
        shown = ", ".join(f"{n} {k}" for k, n in drawn.items()) or "nothing"
        ax.set_title(f"image {image}, score >= {min_score:g}: {shown}", fontsize=8)
        figure.tight_layout()
        return figure, {"drawn": drawn}
