"""``image-top2``: image classification scored by top-2 accuracy.

A label among the model's two most probable classes counts as right: on a small
eval set where top-1 accuracy of every soup is near 100%, top-2 still tells a model
that hesitates from one that does not. The data, its layout and the preprocessing
are the built-in ``image-classification`` task's (an image folder of
``<split>/<class>/<image>``, or a dataset with ``image_column`` and ``label_column``),
so a recipe reads the same::

    eval:
      task: image-top2
      data: examples/digits/data
      split: val

Like hub-soup's own tasks, this module imports no torch at the top (it works with tensor
methods; torch types appear only under ``TYPE_CHECKING``): ``hub-soup validate`` imports a
task to check the recipe's ``eval`` section against the task's spec, and stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from hub_soup.eval.metrics import ACCURACY, register_metric
from hub_soup.eval.tasks.image_classification import ImageClassification

if TYPE_CHECKING:
    import torch

TOP2 = register_metric(
    "top2_accuracy", higher_is_better=True, percent=True,
    description="fraction of examples whose label is among the model's two most probable classes",
)


class TopTwo(ImageClassification):
    """Top-2 accuracy (primary: greedy and the worse-soup gate decide on it), and top-1 beside it."""

    name = "image-top2"
    primary = TOP2
    others = (ACCURACY,)

    def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
        assert targets is not None  # every classification batch has labels
        targets = targets.to(outputs.device)
        best = outputs.topk(min(2, outputs.shape[-1]), dim=-1).indices
        within = (best == targets.unsqueeze(-1)).any(dim=-1).double().mean().item()
        top1 = (best[:, 0] == targets).double().mean().item()
        return {TOP2.name: within, ACCURACY.name: top1}
