"""What image and text classification share: class probabilities, accuracy and log loss, labels.

Like every task module, this one imports no torch at the top (:mod:`hub_soup.eval.tasks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hub_soup.errors import EvalError
from hub_soup.eval.metrics import ACCURACY, NLL
from hub_soup.eval.spec import LabelColumn
from hub_soup.eval.tasks import EvalTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hub_soup.eval.data import Inputs


class Classification(EvalTask):
    """A classifier scored by top-1 accuracy (primary) and the mean negative log-likelihood of the label.

    Outputs are class probabilities ``[N, C]`` in float64: their mean over models is the
    output ensemble's, and a confident mistake keeps a finite log loss.
    """

    spec: LabelColumn  # each task's own spec reads a label column
    primary = ACCURACY
    others = (NLL,)

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        from hub_soup.eval.models import logits

        return logits(model, inputs).float().log_softmax(dim=-1).double().exp()

    def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
        assert targets is not None  # every classification batch has labels
        targets = targets.to(outputs.device)
        correct = (outputs.argmax(dim=-1) == targets).double().mean().item()
        likelihood = outputs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return {ACCURACY.name: correct, NLL.name: -likelihood.log().mean().item()}

    def class_index(self, value: Any) -> int:
        """A class index from an int label or a class name the model's config knows."""
        if isinstance(value, (int, bool)) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        config = self.architecture.config
        names = config.get("label2id") or {n: i for i, n in enumerate(config.get("label_names") or [])}
        if isinstance(value, str) and value in names:
            return int(names[value])
        raise EvalError(
            f"label {value!r} in column {self.spec.label_column!r} is not a class index, nor a class name of "
            f"{self.architecture.label}",
            hint="use integer labels in the model's class order",
        )

    def check_labels(self, labels: Sequence[int]) -> None:
        """Labels outside the model's classes mean the eval set does not match the model."""
        classes = self.architecture.num_classes()
        if classes is None or not labels:
            return
        low, high = min(labels), max(labels)
        if low < 0 or high >= classes:
            raise EvalError(
                f"{self.spec.data} ({self.split}) has labels {low}..{high}, but {self.architecture.label} has "
                f"{classes} classes",
                hint="the eval set's classes must be the model's classes, in the model's order",
            )
